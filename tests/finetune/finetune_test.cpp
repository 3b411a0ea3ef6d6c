// End-to-end claims of the core issue, on exact ground truth (docs/equations.md, E72-E77):
//  * memoryless Adjoint Matching reaches p* ∝ p_base exp(lambda r): the energy distance of its samples
//    to exact p* samples is within 2x the noise floor, for memoryless SDE sampling AND for ODE sampling;
//  * fine-tuning with constant sigma = 1 stays biased: at least 5x the memoryless distance;
// in d = 2 and d = 10, with fixed seeds. Settings (docs/method.md has the sweeps behind them):
//  * K = 90 steps: the fixed point of the discretised loss is biased at early times (fitting the
//    exact control to the regression targets gives 0.91x the control for t < 0.1 at K = 60, 1.00x at
//    K = 120), and ODE sampling exposes it: at K = 60 the 2-D ODE ratio was 1.64-2.00 over six seeds;
//  * every step in the loss (79 random early + the last 10, i.e. all 89 with a finite target): with
//    20 + 10 the 10-D ratio varied from run to run (1.1-2.2x);
//  * a residual network of width 64 (the demo's 128 gave no better ratios and costs 1.7x);
//  * 1200 iterations in 2-D (three seeds: SDE 1.06-1.27, ODE 0.86-0.97) and 2400 in 10-D, where
//    1200 is not enough (three seeds: 1.9-2.4);
//  * lr 4e-3 with a cosine decay, batch 256, velocity weighting, no clipping (as configs/demo_2d.toml).
// And (OnTheExactStepsChainReachesThe2DTargetInFewSteps) the exact step's training chain gets there at K = 20 (E135);
// (DsmUntilFixesTheEarlyTimesOfAHeavyTailedTarget) dsm_until repairs the early times where the lean adjoint's
// target is heavy-tailed (docs/equations.md, E106).
// The memoryless and the sigma = 1 runs train side by side, one thread each: the iteration is made of
// small kernels that two threads barely speed up, so this nearly halves the wall time.
#include "tilt/eval/metrics.h"
#include "tilt/io/methods.h"
#include "tilt/model/random_problem.h"
#include "tilt/model/finetuned.h"
#include "tilt/model/gmm.h"
#include "tilt/model/reward.h"
#include "tilt/sde/sampler.h"
#include "tilt/train/adjoint_matching.h"
#include "tilt/train/trainer.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <ATen/Parallel.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <future>

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

struct Settings {
  int64_t K = 90;
  int64_t iterations = 2400;
  int64_t early = 79;  // + the last 10 steps
  Integrator integrator = Integrator::euler;  // the training chain's step (E135)
  bool sde = true;                            // also measure memoryless SDE samples (else ODE only)
};

// Fine-tunes on one thread (called from a worker thread) and measures the energy distances.
Outcome finetune(const Problem& p, const NoiseSchedulePtr& noise, const Settings& settings) {
  at::set_num_threads(1);
  const int64_t K = settings.K;
  const auto schedule = make_linear_schedule();
  auto base = std::make_shared<GmmVelocity>(p.base, schedule);
  auto model = make_finetuned(base, FineTuneMode::residual, {64, 64, 64}, 16, 1);
  AdjointMatchingOptions am;
  am.num_steps = K;
  am.batch_size = 256;
  am.lambda = p.lambda;
  am.loss_early_steps = settings.early;
  am.loss_late_steps = 10;
  am.clip_factor = 0;
  am.loss_weighting = "velocity";
  am.integrator = settings.integrator;
  AdjointMatching loss(model, p.reward, noise, am);
  TrainerOptions to;
  to.iterations = settings.iterations;
  to.adam = {4e-3, 0.9, 0.999, 1e-8, 0.0};
  to.lr_schedule = LrSchedule::cosine;
  to.grad_clip = 0;
  to.seed = 7;
  to.progress = false;
  const auto t0 = std::chrono::steady_clock::now();
  Trainer(loss, to).run();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  const auto target = *p.reward->tilt(*p.base, p.lambda);
  const int64_t n = 2000, replicates = 48;
  Generator gen = make_generator(99);
  // A single sample set's energy distance is heavy-tailed (the mode counts fluctuate): over 24 sets
  // of one 2-D model the ratio to the floor ranged 0.3-5.7 with a median of 1.1, and a mean over 12
  // sets still moved by +-0.4. So each distance is the mean over 48 fresh model and target sets, and
  // the floor the mean over 96 pairs of exact sets.
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
  Outcome out{settings.sde ? measure(same, Integrator::euler, 200) : NAN, measure(make_zero_noise(), Integrator::heun, 100)};
  std::printf("[ %s, %s, K=%lld, %s chain: %.0f s ] energy distance: SDE %.3e, ODE %.3e\n", p.name.c_str(),
              noise->describe().c_str(), static_cast<long long>(K),
              settings.integrator == Integrator::exact ? "exact-step" : "Euler", seconds, out.sde, out.ode);
  return out;
}

double noise_floor(const Problem& p, int64_t n) {
  const auto target = *p.reward->tilt(*p.base, p.lambda);
  Generator gen = make_generator(5);
  double floor = 0;
  const int pairs = 96;
  for (int r = 0; r < pairs; ++r) floor += energy_distance(target.sample(n, gen), target.sample(n, gen)) / pairs;
  return floor;
}

void check_claims(const Problem& p, const Settings& settings) {
  const double floor = noise_floor(p, 2000);
  const int threads = at::get_num_threads();
  auto memoryless_run = std::async(std::launch::async, finetune, std::cref(p),
                                   make_memoryless_noise(1.0 / settings.K), std::cref(settings));
  auto constant_run = std::async(std::launch::async, finetune, std::cref(p), make_constant_noise(1.0),
                                 std::cref(settings));
  const Outcome memoryless = memoryless_run.get();
  const Outcome constant = constant_run.get();
  at::set_num_threads(threads);  // the workers set the default for new threads to 1
  std::printf("[ %s ] noise floor %.3e; memoryless SDE %.2fx, ODE %.2fx; sigma = 1: %.1fx the memoryless distance\n",
              p.name.c_str(), floor, memoryless.sde / floor, memoryless.ode / floor, constant.sde / memoryless.sde);
  EXPECT_LT(memoryless.sde, 2.0 * floor) << "memoryless fine-tuning, memoryless SDE sampling";
  EXPECT_LT(memoryless.ode, 2.0 * floor) << "memoryless fine-tuning, ODE sampling";
  EXPECT_GT(constant.sde, 5.0 * memoryless.sde) << "sigma = 1 fine-tuning should stay biased";
  EXPECT_GT(constant.ode, 5.0 * memoryless.ode) << "sigma = 1 fine-tuning should stay biased (ODE)";
}

// docs/equations.md, E106: on the random family's seed 5 (d = 7, a linear reward), the lean adjoint's target at early
// times has a tail of index ~1.3 and plain Adjoint Matching fits its bulk, not its mean: after 300 iterations its
// field is off by more than the tilt's own size at t <= 0.1 (and stays so at 2400: docs/random_family.md).
// dsm_until = 0.5 regresses those times onto denoising score matching on the rollouts' weighted samples. Measured
// (one thread each, side by side): relative errors at t = 0.02, 0.05, 0.1 of 1.77-1.87 (AM) against 0.02-0.05.
double early_relative_error(const RandomTiltProblem& p, const VelocityField& model, const GmmVelocity& base,
                            const GmmVelocity& exact) {
  at::NoGradGuard no_grad;
  const GaussianMixture target = *exact_tilt(*p.reward, *p.base, p.lambda);
  double sum = 0;
  for (const double t : {0.02, 0.05, 0.1}) {
    Generator g1 = make_generator(31), g0 = make_generator(32);
    const at::Tensor x1 = target.sample(4000, g1, at::kFloat);
    const ScheduleValues ab = base.schedule()->at(t);
    const at::Tensor xt = ab.alpha * x1 + ab.beta * at::randn(x1.sizes(), g0, at::kFloat);
    const at::Tensor tt = at::full({xt.size(0)}, t, at::kFloat);
    const at::Tensor vs = exact.velocity(xt, tt);
    sum += (model.velocity(xt, tt) - vs).pow(2).sum(1).mean().item<double>() /
           (vs - base.velocity(xt, tt)).pow(2).sum(1).mean().item<double>();
  }
  return sum / 3.0;
}

TEST(AdjointMatchingEndToEnd, DsmUntilFixesTheEarlyTimesOfAHeavyTailedTarget) {
  const RandomTiltProblem p = random_tilt_problem(7, 5);
  const SchedulePtr schedule = make_linear_schedule();
  auto base = std::make_shared<GmmVelocity>(p.base, schedule);
  const GmmVelocity exact(std::make_shared<GaussianMixture>(*exact_tilt(*p.reward, *p.base, p.lambda)), schedule);
  const auto run = [&](double dsm_until) {
    Json am = {{"loss_early_steps", 20}, {"loss_late_steps", 10}, {"loss_weighting", "velocity"}, {"clip_factor", 0.0}};
    if (dsm_until > 0) am["dsm_until"] = dsm_until;
    const Json finetune = {{"preset", "paper"}, {"model", "residual"}, {"hidden", {128, 128, 128}}, {"num_steps", 60}, {"batch_size", 128},
                           {"iterations", 300}, {"lr", 4e-3}, {"lr_schedule", "cosine"}, {"grad_clip", 0.0},
                           {"adjoint_matching", am}};
    const FinetunePlan plan = make_finetune_plan(finetune, *base, p.reward, p.lambda);
    auto model = plan.make_model(base, 1);
    auto loss = plan.make_loss(model);
    TrainerOptions to = plan.trainer;
    to.seed = 7;
    to.progress = false;
    to.checkpoint_path.clear();
    to.metrics_path.clear();
    at::set_num_threads(1);
    Trainer(*loss, to).run();
    return early_relative_error(p, *model, *base, exact);
  };
  auto plain = std::async(std::launch::async, run, 0.0);
  const double hybrid = run(0.5);
  const double am = plain.get();
  std::printf("relative error at t <= 0.1 after 300 iterations: adjoint matching %.3f, dsm_until = 0.5 %.3f\n", am, hybrid);
  EXPECT_GT(am, 1.0) << "the heavy-tailed target no longer fails plain AM here: the claim needs another problem";
  EXPECT_LT(hybrid, 0.25);
  EXPECT_LT(4.0 * hybrid, am);
}

TEST(AdjointMatchingEndToEnd, ReachesTheTiltedTargetIn2D) {
  Settings settings;
  settings.iterations = 1200;
  check_claims(ring_2d(), settings);
}

TEST(AdjointMatchingEndToEnd, ReachesTheTiltedTargetIn10D) { check_claims(mixture_10d(), Settings{}); }

// E135: trained on the exact step's chain, Adjoint Matching reaches the 2-D target at K = 20 steps (ODE sampling, within
// 2x the noise floor), where Euler's chain at the same K and iterations stays several times further (the K = 90 above
// is what Euler's needs). Measured: 1.38 against 4.33 (two runs side by side on one thread each, 45 s each on the 2-core
// VM); scripts/exact_step_study.sh has more seeds, with the demo's wider network.
TEST(AdjointMatchingEndToEnd, OnTheExactStepsChainReachesThe2DTargetInFewSteps) {
  const Problem p = ring_2d();
  Settings exact;
  exact.K = 20;
  exact.iterations = 1000;
  exact.early = 9;  // + the last 10: every step with a target
  exact.sde = false;
  exact.integrator = Integrator::exact;
  Settings euler = exact;
  euler.integrator = Integrator::euler;
  const double floor = noise_floor(p, 2000);
  const int threads = at::get_num_threads();
  auto euler_run = std::async(std::launch::async, finetune, std::cref(p), make_memoryless_noise(1.0 / 20), std::cref(euler));
  const Outcome on_exact = finetune(p, make_memoryless_noise(1.0 / 20), exact);
  const Outcome on_euler = euler_run.get();
  at::set_num_threads(threads);
  std::printf("[ K = 20 ] ODE energy distance / noise floor: exact step's chain %.2f, Euler's %.2f\n", on_exact.ode / floor,
              on_euler.ode / floor);
  EXPECT_LT(on_exact.ode, 2.0 * floor);
  EXPECT_GT(on_euler.ode, 2.0 * on_exact.ode);
}

}  // namespace
}  // namespace tilt
