// End-to-end claims of the core issue, on exact ground truth (spec section 5):
//  * memoryless Adjoint Matching reaches p* ∝ p_base exp(lambda r): the energy distance of its samples
//    to exact p* samples is within 2x the noise floor, for memoryless SDE sampling AND for ODE sampling;
//  * fine-tuning with constant sigma = 1 stays biased: at least 5x the memoryless distance;
// in d = 2 and d = 10, with fixed seeds. Settings: the demo's (configs/demo_2d.toml: 2400 iterations at
// lr 4e-3, batch 256, unit loss weighting, no clipping) but with K = 90 steps instead of 60, and in
// 10-D every step in the loss (79 early + the last 10) instead of 20 + 10.
// Why K = 90: the fixed point of the discretised loss is biased at early times (fitting the exact
// control to the regression targets gives 0.91x the control for t < 0.1 at K = 60, 1.00x at K = 120),
// and the ODE sampler exposes that bias. Over six training seeds at K = 60 (one CPU, 16 sets each),
// the 2-D ODE ratio was 1.64-2.00 and the 10-D ratios 1.13-2.15; at K = 90 the 2-D ODE came to
// 1.38-1.59. Why every step in 10-D: there the ratio varies from run to run (K = 90 with 20 + 10
// steps gave 1.38-2.06 over three runs), and three seeds with every step gave 1.07-1.21 (SDE) and
// 1.13-1.22 (ODE).
// docs/method.md has the tables.
#include "tilt/eval/metrics.h"
#include "tilt/model/finetuned.h"
#include "tilt/model/gmm.h"
#include "tilt/model/reward.h"
#include "tilt/sde/sampler.h"
#include "tilt/train/adjoint_matching.h"
#include "tilt/train/trainer.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdio>

namespace tilt {
namespace {

const auto kDouble = at::TensorOptions().dtype(at::kDouble);

struct Problem {
  std::string name;
  std::shared_ptr<GaussianMixture> base;
  std::shared_ptr<QuadraticReward> reward;
  double lambda = 1.0;
};

// The demo's problem (configs/demo_2d.toml): 8 Gaussians on a ring, a quadratic reward.
Problem ring_2d() {
  const int K = 8;
  std::vector<double> mu;
  for (int k = 0; k < K; ++k) {
    mu.push_back(3.0 * std::cos(2 * M_PI * k / K));
    mu.push_back(3.0 * std::sin(2 * M_PI * k / K));
  }
  Problem p;
  p.name = "2-D ring";
  p.base = std::make_shared<GaussianMixture>(at::ones({K}, kDouble), at::tensor(mu, kDouble).reshape({K, 2}),
                                             0.25 * at::eye(2, kDouble).expand({K, 2, 2}).clone());
  p.reward = std::make_shared<QuadraticReward>(at::tensor({2.5, 0.0}, kDouble), 0.25 * at::eye(2, kDouble));
  return p;
}

// 10-D: four components, two of them near the reward's centre, with correlated covariances.
Problem mixture_10d() {
  const int64_t d = 10, K = 4;
  Generator gen = make_generator(2024);
  at::Tensor mu = at::zeros({K, d}, kDouble);
  mu.index_put_({0, 0}, 3.0);
  mu.index_put_({1, 0}, -3.0);
  mu.index_put_({2, 1}, 3.0);
  mu.index_put_({3, 1}, -3.0);
  mu = mu + 0.5 * at::randn({K, d}, gen, kDouble);
  const at::Tensor L = 0.15 * at::randn({K, d, d}, gen, kDouble);
  const at::Tensor cov = at::matmul(L, L.transpose(1, 2)) + 0.3 * at::eye(d, kDouble);
  Problem p;
  p.name = "10-D mixture";
  p.base = std::make_shared<GaussianMixture>(at::ones({K}, kDouble), mu, cov);
  at::Tensor c = at::zeros({d}, kDouble);
  c[0] = 2.0;
  c[1] = 1.5;
  p.reward = std::make_shared<QuadraticReward>(c, 0.25 * at::eye(d, kDouble));
  return p;
}

struct Outcome {
  double sde, ode;  // energy distance to exact p*, averaged over fresh target sets
};

Outcome finetune(const Problem& p, const NoiseSchedulePtr& noise, int64_t K, int64_t iterations, int64_t early) {
  const auto schedule = make_linear_schedule();
  auto base = std::make_shared<GmmVelocity>(p.base, schedule);
  auto model = make_finetuned(base, FineTuneMode::residual, {128, 128, 128}, 16, 1);
  AdjointMatchingOptions am;
  am.num_steps = K;
  am.batch_size = 256;
  am.lambda = p.lambda;
  am.loss_early_steps = early;
  am.loss_late_steps = 10;
  am.clip_factor = 0;
  am.loss_weighting = "velocity";
  AdjointMatching loss(model, p.reward, noise, am);
  TrainerOptions to;
  to.iterations = iterations;
  to.adam = {4e-3, 0.9, 0.999, 1e-8, 0.0};
  to.lr_schedule = LrSchedule::cosine;
  to.grad_clip = 0;
  to.seed = 7;
  to.progress = false;
  const auto t0 = std::chrono::steady_clock::now();
  Trainer(loss, to).run();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  const auto target = *p.reward->tilt(*p.base, p.lambda);
  const int64_t n = 2000, replicates = 12;
  Generator gen = make_generator(99);
  // A single sample set's energy distance is heavy-tailed (mode counts fluctuate), so each
  // distance is averaged over fresh model and target sets.
  const auto measure = [&](const NoiseSchedulePtr& sampler, Integrator integrator, int64_t steps) {
    SampleOptions o;
    o.integrator = integrator;
    double ed = 0;
    for (int r = 0; r < replicates; ++r) {
      const at::Tensor x = sample(GenerativeSDE(model, sampler), n, TimeGrid::uniform(steps), gen, o);
      ed += energy_distance(x, target.sample(n, gen)) / replicates;
    }
    return ed;
  };
  // Sample with the schedule it was fine-tuned with (a finer grid), and with the ODE.
  const NoiseSchedulePtr same = noise->is_memoryless() ? make_memoryless_noise(1.0 / 200) : noise;
  Outcome out{measure(same, Integrator::euler, 200), measure(make_zero_noise(), Integrator::heun, 100)};
  std::printf("[ %s, %s, K=%lld: %.0f s ] energy distance: SDE %.3e, ODE %.3e\n", p.name.c_str(),
              noise->describe().c_str(), static_cast<long long>(K), seconds, out.sde, out.ode);
  return out;
}

double noise_floor(const Problem& p, int64_t n) {
  const auto target = *p.reward->tilt(*p.base, p.lambda);
  Generator gen = make_generator(5);
  double floor = 0;
  for (int r = 0; r < 24; ++r) floor += energy_distance(target.sample(n, gen), target.sample(n, gen)) / 24;
  return floor;
}

void check_claims(const Problem& p, int64_t K, int64_t iterations, int64_t early) {
  const double floor = noise_floor(p, 2000);
  const Outcome memoryless = finetune(p, make_memoryless_noise(1.0 / K), K, iterations, early);
  const Outcome constant = finetune(p, make_constant_noise(1.0), K, iterations, early);
  std::printf("[ %s ] noise floor %.3e; memoryless SDE %.2fx, ODE %.2fx; sigma = 1: %.1fx the memoryless distance\n",
              p.name.c_str(), floor, memoryless.sde / floor, memoryless.ode / floor, constant.sde / memoryless.sde);
  EXPECT_LT(memoryless.sde, 2.0 * floor) << "memoryless fine-tuning, memoryless SDE sampling";
  EXPECT_LT(memoryless.ode, 2.0 * floor) << "memoryless fine-tuning, ODE sampling";
  EXPECT_GT(constant.sde, 5.0 * memoryless.sde) << "sigma = 1 fine-tuning should stay biased";
  EXPECT_GT(constant.ode, 5.0 * memoryless.ode) << "sigma = 1 fine-tuning should stay biased (ODE)";
}

TEST(AdjointMatchingEndToEnd, ReachesTheTiltedTargetIn2D) { check_claims(ring_2d(), 90, 2400, 20); }

TEST(AdjointMatchingEndToEnd, ReachesTheTiltedTargetIn10D) { check_claims(mixture_10d(), 90, 2400, 79); }

}  // namespace
}  // namespace tilt
