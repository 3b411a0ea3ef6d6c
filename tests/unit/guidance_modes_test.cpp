// Classifier-free guidance during Adjoint Matching (docs/conditions.md, E101-E103), against closed forms.
//
// The base is a conditional Gaussian, N(M c, Sigma) at c and N(mu_null, Sigma) at the null condition: with equal
// covariances the guided field is exactly the field of N(mu_w, Sigma), mu_w = (1 + w) M c - w mu_null, and the
// guided base's lean adjoint equals the unguided one (their Jacobians agree). So:
// - no guidance in training (w = 0) learns the tilt at c: mu_c + lambda Sigma a for a linear reward a^T x;
// - guided trajectories only: for a linear reward the lean adjoint is deterministic, so the regression's target
//   does not depend on which law the trajectories came from: the same fixed point as w = 0 (E103);
// - full guidance (trajectories, adjoint and control): the SOC problem of the guided base, whose optimum samples
//   N(mu_w, Sigma) tilted by exp(lambda r) (E102): mu_w + lambda Sigma a for the linear reward, and the
//   Gaussian product for a quadratic one.
#include "tilt/core/error.h"
#include "tilt/model/condition.h"
#include "tilt/model/conditional_gmm.h"
#include "tilt/model/finetuned.h"
#include "tilt/model/gmm.h"
#include "tilt/model/reward.h"
#include "tilt/schedule/noise_schedule.h"
#include "tilt/sde/sampler.h"
#include "tilt/train/adjoint_matching.h"
#include "tilt/train/trainer.h"

#include "../support/helpers.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <vector>

namespace tilt {
namespace {

const auto kDouble = at::TensorOptions().dtype(at::kDouble);

struct GuidedGaussian {
  Tensor Sigma = at::tensor({0.5, 0.2, 0.2, 0.3}, kDouble).reshape({2, 2});
  Tensor M = at::tensor({1.0, 0.5}, kDouble).reshape({2, 1});
  Tensor mu_null = at::tensor({-0.5, 0.5}, kDouble);
  std::shared_ptr<GaussianMixture> p0;
  std::shared_ptr<ConditionalGmmVelocity> base;
  ConditionSetPtr conditions = std::make_shared<const ConditionSet>(at::tensor({-1.0, 0.0, 1.0}, kDouble).reshape({3, 1}));

  GuidedGaussian() {
    p0 = std::make_shared<GaussianMixture>(at::ones({1}, kDouble), at::zeros({1, 2}, kDouble),
                                                      Sigma.unsqueeze(0));
    const auto null = std::make_shared<GaussianMixture>(at::ones({1}, kDouble), mu_null.reshape({1, 2}),
                                                        Sigma.unsqueeze(0));
    base = std::make_shared<ConditionalGmmVelocity>(p0, M, make_linear_schedule(), null);
  }
  // The guided base's mean at condition c (a number: dc = 1).
  Tensor mu_w(double c, double w) const { return (1 + w) * c * M.reshape({2}) - w * mu_null; }
};

template <class F>
void expect_error_containing(F&& f, const std::string& text) {
  try {
    f();
    ADD_FAILURE() << "no error; expected one containing '" << text << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << e.what();
  }
}

struct Mode {
  std::string name;
  double w;
  bool adjoint, control;
};

// Adjoint Matching over the three training conditions in `mode`, then the mean of samples of the model at
// condition c guided by w_sample, with the memoryless SDE and with the ODE.
std::vector<Tensor> train_and_sample_means(const GuidedGaussian& g, const RewardPtr& reward, const Mode& mode,
                                           double c, double w_sample) {
  const auto model = make_finetuned(g.base, FineTuneMode::residual, {64, 64}, 8, 3);
  AdjointMatchingOptions o;
  o.num_steps = 20;
  o.batch_size = 128;
  o.loss_early_steps = 10;
  o.loss_late_steps = 5;
  o.clip_factor = 0;
  o.loss_weighting = "velocity";
  o.conditions = g.conditions;
  o.guidance = mode.w;
  o.guidance_adjoint = mode.adjoint;
  o.guidance_control = mode.control;
  AdjointMatching loss(model, reward, make_memoryless_noise(1.0 / 20), o);
  TrainerOptions t;
  t.iterations = 300;
  t.adam.lr = 3e-3;
  t.lr_schedule = LrSchedule::cosine;
  t.grad_clip = 0.0;
  t.seed = 4;
  t.progress = false;
  Trainer(loss, t).run();
  std::vector<Tensor> means;
  for (const bool ode : {false, true}) {
    const GenerativeSDE sde(bind_condition(model, at::full({1, 1}, c), w_sample),
                            ode ? make_zero_noise() : make_memoryless_noise(1.0 / 100));
    SampleOptions so;
    so.integrator = ode ? Integrator::heun : Integrator::euler;
    Generator gen = make_generator(11);
    means.push_back(sample(sde, 6000, TimeGrid::uniform(100), gen, so).mean(0).to(at::kDouble));
  }
  return means;
}

void expect_means(const std::vector<Tensor>& means, const Tensor& expected, const std::string& what) {
  const char* sampler[] = {"SDE", "ODE"};
  for (size_t i = 0; i < means.size(); ++i) {
    EXPECT_LT((means[i] - expected).abs().max().item<double>(), 0.07)
        << what << " (" << sampler[i] << "): mean " << means[i] << " expected " << expected;
  }
}

TEST(GuidanceModes, LinearRewardEachModeReachesItsClosedForm) {
  const GuidedGaussian g;
  const Tensor a = at::tensor({1.0, -0.5}, kDouble);
  const RewardPtr reward = std::make_shared<ConditionalLinearReward>(a, at::zeros({2, 1}, kDouble));
  const double c = 1.0, w = 2.0;
  const Tensor shift = at::matmul(g.Sigma, a);  // lambda = 1: the tilt moves the mean by Sigma a
  // No guidance in training: the tilt at c.
  expect_means(train_and_sample_means(g, reward, {"none", 0.0, false, false}, c, 0.0), g.mu_w(c, 0.0) + shift,
               "w = 0 in training, sampled at w = 0");
  // Guided trajectories only: the same fixed point, although every trajectory was guided.
  expect_means(train_and_sample_means(g, reward, {"trajectories", w, false, false}, c, 0.0), g.mu_w(c, 0.0) + shift,
               "guided trajectories, sampled at w = 0");
  // Full guidance: the guided base tilted once, which neither of the others gives at w = 2 (their guided
  // samples depend on the fine-tuned null condition, which they do not train).
  expect_means(train_and_sample_means(g, reward, {"full", w, true, true}, c, w), g.mu_w(c, w) + shift,
               "full guidance, sampled at w = 2");
}

TEST(GuidanceModes, FullGuidanceWithAQuadraticRewardTiltsTheGuidedBase) {
  const GuidedGaussian g;
  // r = -1/2 (x - m)^T A (x - m): N(mu_w, Sigma) tilted is N(S (Sigma^-1 mu_w + A m), S), S^-1 = Sigma^-1 + A.
  const Tensor m = at::tensor({1.5, -1.0}, kDouble), A = at::tensor({1.0, 0.0, 0.0, 0.5}, kDouble).reshape({2, 2});
  const RewardPtr reward = std::make_shared<ConditionalQuadraticReward>(m, at::zeros({2, 1}, kDouble), A);
  const double c = 0.0, w = 1.5;
  const Tensor P = at::inverse(g.Sigma);
  const Tensor S = at::inverse(P + A);
  const Tensor expected = at::matmul(S, at::matmul(P, g.mu_w(c, w)) + at::matmul(A, m));
  expect_means(train_and_sample_means(g, reward, {"full", w, true, true}, c, w), expected,
               "full guidance, quadratic reward, sampled at w = 1.5");
}

// E103: with equal-covariance Gaussians the guided base's Jacobian is the unguided one, so the lean adjoint
// through the guided base is the same; with a mixture base (whose conditional and null Jacobians differ) it is not.
// A linear reward, whose gradient is the same at every point: with another reward the guided base's noiseless
// last step would also move the point X^_1 where the gradient is taken.
TEST(GuidanceModes, GuidedAdjointIsTheUnguidedOneOnlyForEqualCovarianceGaussians) {
  const GuidedGaussian g;
  const auto two = std::make_shared<GaussianMixture>(at::full({2}, 0.5, kDouble),
                                                     at::tensor({-1.0, 0.0, 1.0, 0.5}, kDouble).reshape({2, 2}),
                                                     at::stack({0.3 * at::eye(2, kDouble), g.Sigma}));
  const auto mixture = std::make_shared<ConditionalGmmVelocity>(two, g.M, make_linear_schedule(), g.p0);
  const RewardPtr reward = std::make_shared<LinearReward>(at::tensor({1.0, -1.0}, kDouble));
  const auto noise = make_memoryless_noise(1.0 / 20);
  const TimeGrid grid = TimeGrid::uniform(20);
  std::vector<double> times = grid.times();
  times.pop_back();
  const Tensor c = at::tensor({1.0, -1.0, 0.5, 0.0}, kDouble).reshape({4, 1});
  const double w = 3.0;
  std::vector<double> gaps;
  for (const VelocityFieldPtr base : {VelocityFieldPtr(g.base), VelocityFieldPtr(mixture)}) {
    Generator gen = make_generator(2);
    SampleOptions so;
    so.record = true;
    const Trajectory traj = simulate(GenerativeSDE(bind_condition(base, c, w), noise),
                                     at::randn({4, 2}, gen, kDouble), TimeGrid(times), gen, so);
    const LeanAdjoint plain = lean_adjoint(GenerativeSDE(bind_condition(base, c), noise), traj.x, grid, *reward, 1.0, true);
    const LeanAdjoint guided =
        lean_adjoint(GenerativeSDE(bind_condition(base, c, w), noise), traj.x, grid, *reward, 1.0, true);
    double gap = 0;
    for (size_t k = 0; k < plain.a.size(); ++k) {
      gap = std::max(gap, ((guided.a[k] - plain.a[k]).norm() / plain.a.back().norm()).item<double>());
    }
    gaps.push_back(gap);
  }
  EXPECT_LT(gaps[0], 1e-9) << "equal-covariance Gaussians: the guided adjoint must be the unguided one";
  EXPECT_GT(gaps[1], 0.05) << "a mixture base: guidance must change the adjoint";
}

TEST(GuidanceModes, RefusedWithoutConditionsANullOrAWeight) {
  const GuidedGaussian g;
  const RewardPtr reward = std::make_shared<ConditionalLinearReward>(at::tensor({1.0, 0.0}, kDouble),
                                                                     at::zeros({2, 1}, kDouble));
  const auto model = make_finetuned(g.base, FineTuneMode::residual, {8}, 4, 1);
  AdjointMatchingOptions o;
  o.num_steps = 10;
  o.conditions = g.conditions;
  o.loss_early_steps = 3;
  o.loss_late_steps = 3;
  o.guidance_control = true;
  const auto noise = make_memoryless_noise(0.1);
  expect_error_containing([&] { AdjointMatching(model, reward, noise, o); }, "need guidance != 0");
  o.guidance_control = false;
  o.guidance = NAN;
  expect_error_containing([&] { AdjointMatching(model, reward, noise, o); }, "guidance must be finite");
  o.guidance = 1.0;
  // A base without a null condition.
  const auto no_null = std::make_shared<ConditionalGmmVelocity>(g.p0, g.M, make_linear_schedule());
  expect_error_containing(
      [&] { AdjointMatching(make_finetuned(no_null, FineTuneMode::residual, {8}, 4, 1), reward, noise, o); },
      "needs a base with a null condition");
  // An unconditional run cannot be guided.
  const auto gauss = std::make_shared<GmmVelocity>(g.p0, make_linear_schedule());
  AdjointMatchingOptions u = o;
  u.conditions = nullptr;
  expect_error_containing([&] {
    AdjointMatching(make_finetuned(gauss, FineTuneMode::residual, {8}, 4, 1),
                    std::make_shared<LinearReward>(at::tensor({1.0, 0.0}, kDouble)), noise, u);
  }, "needs a conditional model");
}

}  // namespace
}  // namespace tilt
