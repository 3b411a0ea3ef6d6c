// Policy-gradient baselines (tilt/train/policy_gradient.h; docs/equations.md, E50-E54):
// the policy's log-density against the analytic Gaussian, the clipped-ratio gradient case by case,
// the on-policy DDPO and GRPO gradients against the exact gradient of E[r] of a linear-Gaussian chain
// (Monte Carlo, within standard errors), inner epochs, groups and MixGRPO's window schedule.
#include "tilt/core/error.h"
#include "tilt/model/finetuned.h"
#include "tilt/model/gmm.h"
#include "tilt/model/reward.h"
#include "tilt/sde/gddim.h"
#include "tilt/train/policy_gradient.h"
#include "tilt/train/trainer.h"

#include "../support/checks.h"
#include "../support/helpers.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>

#include <cmath>

namespace tilt {
namespace {

const auto kDouble = at::TensorOptions().dtype(at::kDouble);

// v = theta_0 + theta_1 x in every coordinate: with a Gaussian base (affine exact velocity) the gDDIM
// chain stays linear-Gaussian, so E[r] and its gradient in theta are closed form.
class AffineVelocity : public VelocityField {
 public:
  AffineVelocity(SchedulePtr schedule, int64_t d, double shift, double slope)
      : VelocityField(std::move(schedule)), d_(d),
        theta_(at::tensor(std::vector<double>{shift, slope}, at::kFloat).requires_grad_(true)) {}
  std::string kind() const override { return "affine"; }
  int64_t dim() const override { return d_; }
  using VelocityField::velocity;
  Tensor velocity(const Tensor& x, const Tensor& /*t*/) const override { return theta_[0] + theta_[1] * x; }
  std::vector<Tensor> parameters() const override { return {theta_}; }

 private:
  int64_t d_;
  Tensor theta_;
};

struct Problem {
  std::shared_ptr<GmmVelocity> base;
  std::shared_ptr<AffineVelocity> control;
  std::shared_ptr<FineTunedVelocity> model;
  RewardPtr reward;
};

// 1-D base N(0.5, 0.8^2) on the linear schedule, reward r = -(x - 1.5)^2.
Problem affine_problem(double shift = 0.3, double slope = -0.2) {
  Problem p;
  const SchedulePtr schedule = make_linear_schedule();
  p.base = std::make_shared<GmmVelocity>(test::isotropic_gaussian({0.5}, 0.8), schedule);
  p.control = std::make_shared<AffineVelocity>(schedule, 1, shift, slope);
  p.model = std::make_shared<FineTunedVelocity>(p.base, p.control, FineTuneMode::residual);
  p.reward = std::make_shared<QuadraticReward>(at::full({1}, 1.5, kDouble), at::full({1, 1}, 2.0, kDouble));
  return p;
}

// E[r(X_K)] of the chain X_{k+1} = c_x X_k + c_v (v_base(X_k) + theta_0 + theta_1 X_k) + std_k z_k, X_0 ~ N(0, 1)
// (the last, noiseless step with v_base alone),
// with its gradient in theta by autograd through the moment recursion (in double), and X_K ~ N(m, V).
struct ExactChain {
  double reward;
  std::vector<double> grad;
  double m, V;
  double reward_sd() const { return std::sqrt(2 * V * V + 4 * V * (m - 1.5) * (m - 1.5)); }  // sd of -(X - 1.5)^2
};

ExactChain exact_reward_gradient(const Problem& p, int64_t K, double gamma) {
  const Tensor theta = p.control->parameters()[0].detach().to(at::kDouble).requires_grad_(true);
  const TimeGrid grid = TimeGrid::uniform(K);
  Tensor m = at::zeros({}, kDouble), V = at::ones({}, kDouble);
  for (int64_t k = 0; k < K; ++k) {
    const double t = grid[k];
    const Tensor v0 = p.base->velocity(at::zeros({1, 1}, kDouble), t).squeeze();
    const Tensor slope = p.base->velocity(at::ones({1, 1}, kDouble), t).squeeze() - v0;
    const ExponentialStep e = exponential_step(*p.base->schedule(), t, grid[k + 1], k < K - 1 ? gamma : 0.0);
    const double on = k < K - 1 ? 1.0 : 0.0;  // the last step is the base's
    const Tensor gain = e.c_x + e.c_v * (slope + on * theta[1]);
    m = gain * m + e.c_v * (v0 + on * theta[0]);
    V = gain * gain * V + e.std * e.std;
  }
  const Tensor r = -((m - 1.5).pow(2) + V);  // E[-(X - 1.5)^2] for X ~ N(m, V)
  const Tensor g = torch::autograd::grad({r}, {theta})[0];
  return {r.item<double>(), {g[0].item<double>(), g[1].item<double>()}, m.item<double>(), V.item<double>()};
}

std::vector<double> param_grad(const Problem& p) {
  const Tensor g = p.control->parameters()[0].grad();
  return {g[0].item<double>(), g[1].item<double>()};
}

TEST(PolicyGradient, LogProbOfASampledStepIsTheAnalyticGaussianDensity) {
  // The density is rebuilt here from the variance form of docs/equations.md, E16 on the linear schedule,
  // independently of exponential_step: x1^ = x + (1 - t) v, eps^ = x - t v,
  // sig^2 = beta_s^2 [1 - (SNR_t / SNR_s)^{gamma^2}], mean = alpha_s x1^ + sqrt(beta_s^2 - sig^2) eps^.
  const SchedulePtr schedule = make_linear_schedule();
  auto base = std::make_shared<GmmVelocity>(test::ring_mixture_2d(), schedule);
  auto model = make_finetuned(base, FineTuneMode::residual, {16}, 4, 7);
  {
    at::NoGradGuard no_grad;  // a nonzero residual, so v_theta != v_base
    for (const Tensor& q : model->parameters()) q.add_(0.3 * at::randn(q.sizes(), make_generator(3)));
  }
  const RewardPtr reward = std::make_shared<LinearReward>(at::ones({2}, kDouble));
  const int64_t K = 6, B = 2000;
  for (double gamma : {0.5, 1.0, 2.0}) {
    PolicyGradientOptions o;
    o.num_steps = K, o.batch_size = B, o.gamma = gamma, o.reduction = LogProbReduction::sum;
    Ddpo loss(model, reward, o);
    Generator gen = make_generator(11);
    Generator gen_steps = make_generator(0);
    const PolicyBatch batch = loss.sample(at::randn({B, 2}, gen), loss.sde_steps(0, gen_steps), gen);
    ASSERT_EQ(batch.sde_steps.size(), static_cast<size_t>(K - 1));
    const Tensor recomputed = loss.log_prob(batch).detach();
    double z_sum = 0, z2_sum = 0;
    int64_t n = 0;
    for (int64_t j = 0; j < K - 1; ++j) {
      const double t = static_cast<double>(j) / K, s = static_cast<double>(j + 1) / K;
      const Tensor x = batch.states[j].to(at::kDouble), x_next = batch.next_states[j].to(at::kDouble);
      const Tensor v = model->velocity(batch.states[j], t).detach().to(at::kDouble);
      const double snr_ratio = (t * t / ((1 - t) * (1 - t))) / (s * s / ((1 - s) * (1 - s)));
      const double sig2 = (1 - s) * (1 - s) * (1 - std::pow(snr_ratio, gamma * gamma));
      const Tensor mean = s * (x + (1 - t) * v) + std::sqrt((1 - s) * (1 - s) - sig2) * (x - t * v);
      const Tensor expected = (-0.5 * std::log(2 * M_PI * sig2) - (x_next - mean).pow(2) / (2 * sig2)).sum(1);
      EXPECT_LT((batch.old_log_prob[j] - expected).abs().max().item<double>(), 2e-3) << "gamma " << gamma << " step " << j;
      EXPECT_LT((recomputed[j] - expected).abs().max().item<double>(), 2e-3) << "gamma " << gamma << " step " << j;
      const Tensor z = (x_next - mean) / std::sqrt(sig2);
      z_sum += z.sum().item<double>(), z2_sum += z.pow(2).sum().item<double>(), n += z.numel();
    }
    // The step is drawn from that Gaussian: standardised residuals have mean 0 (SE 1/sqrt n) and
    // variance 1 (SE sqrt(2/n)).
    EXPECT_LT(std::abs(z_sum / n), 4.0 / std::sqrt(n)) << "gamma " << gamma;
    EXPECT_LT(std::abs(z2_sum / n - 1.0), 4.0 * std::sqrt(2.0 / n)) << "gamma " << gamma;
  }
  // The mean reduction divides by d.
  const Tensor x = at::randn({5, 3}, make_generator(1)), m = at::randn({5, 3}, make_generator(2));
  EXPECT_TRUE(at::allclose(gaussian_log_prob(x, m, 0.7, LogProbReduction::mean) * 3,
                           gaussian_log_prob(x, m, 0.7, LogProbReduction::sum)));
}

TEST(PolicyGradient, ClippedRatioGradientIsMinusATimesRatioInsideTheTrustRegionAndZeroOutside) {
  // docs/equations.md, E51, for a wide and for DDPO's narrow trust region, both signs of A, ratios inside,
  // below, above.
  for (double eps : {0.2, 1e-4}) {
    const std::vector<double> ratios = {0.5, 1 - 2 * eps, 1 - eps / 2, 1.0, 1 + eps / 2, 1 + 2 * eps, 1.7};
    for (double A : {1.5, -2.5}) {
      const Tensor old_lp = at::full({static_cast<int64_t>(ratios.size())}, -0.4, kDouble);
      const Tensor lp = (old_lp + at::log(at::tensor(ratios, kDouble))).requires_grad_(true);
      const Tensor loss = clipped_ratio_loss(lp, old_lp, at::full({}, A, kDouble), eps);
      const Tensor grad = torch::autograd::grad({loss.sum()}, {lp})[0];
      for (size_t i = 0; i < ratios.size(); ++i) {
        const double rho = ratios[i];
        const bool inside = std::abs(rho - 1) <= eps;
        // Outside, the clipped term is the max (zero gradient) on the side the advantage pushes towards.
        const bool clipped = !inside && ((A > 0 && rho > 1 + eps) || (A < 0 && rho < 1 - eps));
        const double expected = clipped ? 0.0 : -A * rho;  // d(-A rho)/d log pi = -A rho
        EXPECT_NEAR(grad[i].item<double>(), expected, 1e-12) << "eps " << eps << " A " << A << " rho " << rho;
        const double value = std::max(-A * rho, -A * std::min(std::max(rho, 1 - eps), 1 + eps));
        EXPECT_NEAR(loss[i].item<double>(), value, 1e-12);
        if (!inside && !clipped) EXPECT_NE(expected, 0.0);
      }
    }
  }
}

TEST(PolicyGradient, OnPolicyGradientsMatchTheExactGradientOfTheExpectedReward) {
  // The 1-D linear-Gaussian chain (K = 8 exact gDDIM steps, gamma = 1): d E[r] / d theta in closed form.
  // DDPO's on-policy gradient is -(1/(B S)) sum_i (r_i - rbar) sum_k grad log pi_ik, whose expectation
  // is (1 - 1/B)/S grad E[r]; GRPO's is (1 - 1/G)/S grad E[r] (given the shared x0, the group's other
  // members are independent of member i's path). Scaled back, both must agree with the exact gradient
  // within 4 standard errors over independent batches; the standard errors must be small enough (10%
  // of |grad|) for the test to detect a wrong sign or factor.
  const int64_t K = 8, S = K - 1, B = 4000, batches = 12;
  Problem p = affine_problem();
  const ExactChain exact = exact_reward_gradient(p, K, 1.0);
  const std::vector<double>& expected = exact.grad;
  ASSERT_GT(std::abs(expected[0]), 0.1);
  ASSERT_GT(std::abs(expected[1]), 0.1);
  for (int grouped = 0; grouped < 2; ++grouped) {
    PolicyGradientOptions o;
    o.num_steps = K, o.batch_size = B, o.reduction = LogProbReduction::sum;
    o.scale_advantages = false, o.adv_clip_max = 1e12, o.group_size = 8;
    std::unique_ptr<PolicyGradient> loss;
    if (grouped) {
      loss = std::make_unique<Grpo>(p.model, p.reward, o);
    } else {
      loss = std::make_unique<Ddpo>(p.model, p.reward, o);
    }
    const double n_eff = grouped ? static_cast<double>(o.group_size) : static_cast<double>(B);
    const double scale = -static_cast<double>(S) * n_eff / (n_eff - 1);
    std::vector<double> sum(2, 0.0), sum2(2, 0.0);
    double reward = 0;
    for (int64_t b = 0; b < batches; ++b) {
      Generator gen = make_generator(100 + b);
      p.control->parameters()[0].mutable_grad() = Tensor();
      const LossOutput out = loss->compute(gen);
      out.loss.backward();
      const std::vector<double> g = param_grad(p);
      for (int j = 0; j < 2; ++j) sum[j] += scale * g[j], sum2[j] += scale * scale * g[j] * g[j];
      reward += out.metrics[0].second / batches;
      EXPECT_EQ(out.metrics[0].first, "reward");
    }
    for (int j = 0; j < 2; ++j) {
      const double mean = sum[j] / batches;
      const double se = std::sqrt((sum2[j] / batches - mean * mean) / (batches - 1));
      EXPECT_LT(se, 0.1 * std::abs(expected[j])) << "component " << j;
      EXPECT_LT(std::abs(mean - expected[j]), 4 * se)
          << (grouped ? "grpo" : "ddpo") << " component " << j << ": " << mean << " +- " << se << " vs exact " << expected[j];
    }
    // The logged reward is E[r] of the same chain (Var r = 2 V^2 + 4 V (m - y)^2 < 10 here).
    EXPECT_NEAR(reward, exact.reward, 4 * exact.reward_sd() / std::sqrt(static_cast<double>(B * batches)));
  }
}

TEST(PolicyGradient, StandardisedAdvantagesEstimateTheGradientOverTheRewardsStd) {
  // With DDPO's default standardisation the on-policy gradient estimates grad E[r] / sd(r) (up to
  // O(1/B)), sd(r) of r = -(X - y)^2 for X ~ N(m, V) being sqrt(2 V^2 + 4 V (m - y)^2).
  const int64_t K = 8, S = K - 1, B = 4000, batches = 8;
  Problem p = affine_problem();
  const ExactChain exact = exact_reward_gradient(p, K, 1.0);
  PolicyGradientOptions o;
  o.num_steps = K, o.batch_size = B, o.reduction = LogProbReduction::sum, o.adv_clip_max = 1e12;
  Ddpo loss(p.model, p.reward, o);
  std::vector<double> sum(2, 0.0), sum2(2, 0.0);
  for (int64_t b = 0; b < batches; ++b) {
    Generator gen = make_generator(500 + b);
    p.control->parameters()[0].mutable_grad() = Tensor();
    const LossOutput out = loss.compute(gen);
    out.loss.backward();
    const std::vector<double> g = param_grad(p);
    for (int j = 0; j < 2; ++j) sum[j] += -S * g[j], sum2[j] += S * S * g[j] * g[j];
    EXPECT_EQ(out.metrics[1].first, "reward_std");
    EXPECT_NEAR(out.metrics[1].second, exact.reward_sd(), 0.1 * exact.reward_sd());
  }
  for (int j = 0; j < 2; ++j) {
    const double mean = sum[j] / batches;
    const double se = std::sqrt((sum2[j] / batches - mean * mean) / (batches - 1));
    const double target = exact.grad[j] / exact.reward_sd();
    EXPECT_LT(se, 0.1 * std::abs(target));
    EXPECT_LT(std::abs(mean - target), 4 * se) << "component " << j << ": " << mean << " +- " << se << " vs " << target;
  }
}

TEST(PolicyGradient, InnerEpochsReuseTheBatchAndTheGradientSkipsClippedTerms) {
  Problem p = affine_problem();
  PolicyGradientOptions o;
  o.num_steps = 6, o.batch_size = 256, o.inner_epochs = 2, o.clip_range = 0.02;
  Ddpo loss(p.model, p.reward, o);
  Generator gen0 = make_generator(1), gen1 = make_generator(2);
  loss.begin_iteration(0);
  LossOutput first = loss.compute(gen0);
  first.loss.backward();
  // On-policy: ratio 1, nothing clipped, and the sampling pass's log-probabilities agree.
  for (const auto& [key, value] : first.metrics) {
    if (key == "ratio_clipped_fraction" || key == "approx_kl") EXPECT_EQ(value, 0.0) << key;
    if (key == "log_prob_mismatch") EXPECT_LT(value, 1e-5);
  }
  const Tensor theta_old = p.control->parameters()[0].detach().clone();
  const Tensor theta_new = theta_old + at::tensor(std::vector<float>{0.05f, -0.03f});  // a step, as Adam's
  {
    at::NoGradGuard no_grad;
    p.control->parameters()[0].copy_(theta_new);
    p.control->parameters()[0].mutable_grad() = Tensor();
  }
  loss.begin_iteration(1);
  const LossOutput second = loss.compute(gen1);
  second.loss.backward();
  double clipped_fraction = -1, epoch = -1;
  for (const auto& [key, value] : second.metrics) {
    if (key == "ratio_clipped_fraction") clipped_fraction = value;
    if (key == "epoch") epoch = value;
  }
  EXPECT_EQ(epoch, 1.0);
  EXPECT_GT(clipped_fraction, 0.05);
  EXPECT_LT(clipped_fraction, 0.95);
  // The same stored batch: its gradient is mean over unclipped terms of -A rho grad log pi.
  const std::vector<double> g = param_grad(p);
  p.control->parameters()[0].mutable_grad() = Tensor();
  // Rebuild the expected gradient from a batch sampled with the same generator as the first epoch.
  Ddpo replay(p.model, p.reward, o);
  PolicyBatch batch;
  {
    Generator gen = make_generator(1);
    // compute() draws x0 then the steps' noise; sample() with the same x0 draws the same noise.
    const Tensor x0 = at::randn({o.batch_size, 1}, gen);
    at::NoGradGuard no_grad;
    p.control->parameters()[0].copy_(theta_old);  // the policy that drew the batch
    batch = replay.sample(x0, replay.sde_steps(0, gen), gen);
    batch.old_log_prob = replay.log_prob(batch).detach();
    batch.reward = p.reward->value(batch.x1).to(at::kDouble);
    batch.advantage = batch_advantages(batch.reward, true, o.std_eps, o.adv_clip_max);
    p.control->parameters()[0].copy_(theta_new);
  }
  const Tensor lp = replay.log_prob(batch);
  const Tensor ratio = at::exp(lp.detach() - batch.old_log_prob);
  const Tensor A = batch.advantage.unsqueeze(0).expand_as(ratio);
  const Tensor clipped = ((A > 0) & (ratio > 1 + o.clip_range)) | ((A < 0) & (ratio < 1 - o.clip_range));
  const Tensor weight = at::where(clipped, at::zeros_like(ratio), -A * ratio);
  (weight * lp).mean().backward();
  const std::vector<double> g_expected = param_grad(p);
  for (int j = 0; j < 2; ++j) EXPECT_NEAR(g[j], g_expected[j], 1e-4 * (1 + std::abs(g_expected[j]))) << j;
  // The third iteration starts a new batch: on-policy again.
  loss.begin_iteration(2);
  Generator gen2 = make_generator(3);
  for (const auto& [key, value] : loss.compute(gen2).metrics) {
    if (key == "epoch") EXPECT_EQ(value, 0.0);
    if (key == "ratio_clipped_fraction") EXPECT_EQ(value, 0.0);
  }
}

TEST(PolicyGradient, GroupsShareTheirInitialNoiseAndHaveStandardisedAdvantages) {
  Problem p = affine_problem();
  PolicyGradientOptions o;
  o.num_steps = 5, o.batch_size = 24, o.group_size = 6;
  Grpo loss(p.model, p.reward, o);
  // The groups' advantages: zero mean, unit (unbiased) std per group.
  const Tensor r = at::randn({24}, make_generator(4)).to(at::kDouble);
  const Tensor A = group_advantages(r, 6, true, 0.0, 100.0).view({4, 6});
  EXPECT_LT(A.mean(1).abs().max().item<double>(), 1e-12);
  EXPECT_LT((A.std(1, true) - 1).abs().max().item<double>(), 1e-12);
  EXPECT_TRUE(at::allclose(batch_advantages(r, false, 0, 100), r - r.mean()));
  EXPECT_LT(group_advantages(r * 100, 6, true, 0, 1.5).abs().max().item<double>(), 1.5 + 1e-12);
  // compute() draws one x0 per group: the first SDE step starts from the same state within a group.
  Generator gen = make_generator(9);
  const Tensor x0 = at::randn({4, 1}, gen).repeat_interleave(6, 0);
  Generator gen_again = make_generator(9);
  loss.begin_iteration(0);
  loss.compute(gen_again);  // must not throw; the states are checked on a direct sample:
  Generator gen_sample = make_generator(10);
  const PolicyBatch batch = loss.sample(x0, loss.sde_steps(0, gen_sample), gen_sample);
  const Tensor first = batch.states[0].view({4, 6});
  EXPECT_TRUE(at::equal(first, first.select(1, 0).unsqueeze(1).expand({4, 6})));
  EXPECT_FALSE(at::equal(batch.x1.view({4, 6}).select(1, 0), batch.x1.view({4, 6}).select(1, 1)));
}

TEST(PolicyGradient, MixGrpoWindowSchedule) {
  // docs/equations.md, E54: a 25-step sampler, window start 0 for 25 iterations, then 1, ..., up to N - 2 = 23,
  // then back to 0.
  for (int64_t i = 0; i < 25; ++i) EXPECT_EQ(progressive_window_start(i, 25, 1, 23), 0);
  for (int64_t i = 25; i < 50; ++i) EXPECT_EQ(progressive_window_start(i, 25, 1, 23), 1);
  EXPECT_EQ(progressive_window_start(23 * 25, 25, 1, 23), 23);
  EXPECT_EQ(progressive_window_start(24 * 25 - 1, 25, 1, 23), 23);
  EXPECT_EQ(progressive_window_start(24 * 25, 25, 1, 23), 0);
  EXPECT_EQ(progressive_window_start(6 * 10, 10, 3, 20), 18);  // shift 3: 0, 3, ..., 18, then 0
  EXPECT_EQ(progressive_window_start(7 * 10, 10, 3, 20), 0);
  // The loss's window: 4 consecutive SDE steps among the K - 1 = 9 stochastic ones.
  Problem p = affine_problem();
  PolicyGradientOptions o;
  o.num_steps = 10, o.batch_size = 8, o.group_size = 4, o.window = 4, o.window_iters = 2;
  Grpo loss(p.model, p.reward, o);
  Generator gen = make_generator(0);
  EXPECT_EQ(loss.sde_steps(0, gen), (std::vector<int64_t>{0, 1, 2, 3}));
  EXPECT_EQ(loss.sde_steps(5, gen), (std::vector<int64_t>{2, 3, 4, 5}));
  EXPECT_EQ(loss.sde_steps(11, gen), (std::vector<int64_t>{5, 6, 7, 8}));  // the last of 6 positions 0..5
  EXPECT_EQ(loss.sde_steps(12, gen), (std::vector<int64_t>{0, 1, 2, 3}));  // rolled back
  loss.begin_iteration(5);
  const PolicyBatch batch = loss.sample(at::zeros({8, 1}), loss.sde_steps(5, gen), gen);
  EXPECT_EQ(batch.states.size(0), 4);
  // Outside the window the steps are the ODE's: equal initial states stay equal until step 2.
  EXPECT_TRUE(at::equal(batch.states[0], batch.states[0][0].expand_as(batch.states[0])));
  EXPECT_FALSE(at::equal(batch.next_states[0], batch.next_states[0][0].expand_as(batch.next_states[0])));
  o.window_strategy = WindowStrategy::random;
  Grpo random_window(p.model, p.reward, o);
  for (int i = 0; i < 20; ++i) {
    const std::vector<int64_t> steps = random_window.sde_steps(0, gen);
    ASSERT_EQ(steps.size(), 4u);
    EXPECT_GE(steps.front(), 0);
    EXPECT_LE(steps.back(), 8);
  }
}

TEST(PolicyGradient, TrainingRaisesTheReward) {
  // End to end with the trainer (Adam, grad clip): 60 iterations move the affine control towards the
  // reward's centre; E[r] (exact, from the moment recursion) rises well beyond its initial value.
  Problem p = affine_problem(0.0, 0.0);
  PolicyGradientOptions o;
  o.num_steps = 8, o.batch_size = 64, o.inner_epochs = 2, o.clip_range = 0.2;
  Ddpo loss(p.model, p.reward, o);
  const double before = exact_reward_gradient(p, 8, 1.0).reward;
  TrainerOptions t;
  t.iterations = 60, t.adam.lr = 0.02, t.adam.weight_decay = 0, t.progress = false;
  Trainer trainer(loss, t);
  trainer.run();
  const double after = exact_reward_gradient(p, 8, 1.0).reward;
  EXPECT_GT(after, before + 0.5 * (0.0 - before)) << before << " -> " << after;  // at least half-way to the max 0
}

TEST(PolicyGradient, BadSettingsAreClearErrors) {
  Problem p = affine_problem();
  auto error = [&](PolicyGradientOptions o, bool grouped) {
    return test::error_of([&] {
      if (grouped) {
        Grpo(p.model, p.reward, o);
      } else {
        Ddpo(p.model, p.reward, o);
      }
    });
  };
  PolicyGradientOptions o;
  o.gamma = 0;
  test::expect_contains(error(o, false), "gamma");
  o = {}, o.batch_size = 30, o.group_size = 8;
  test::expect_contains(error(o, true), "multiple of group_size");
  o = {}, o.window = 40;
  test::expect_contains(error(o, true), "window");
  o = {}, o.inner_epochs = 0;
  test::expect_contains(error(o, false), "inner_epochs");
  o = {}, o.clip_range = 0;
  test::expect_contains(error(o, false), "clip_range");
  Ddpo ok(p.model, p.reward, PolicyGradientOptions{});
  test::expect_contains(test::error_of([&] { ok.set_batch_size(16); }), "cannot draw its batch in shards");
  auto reward_2d = std::make_shared<LinearReward>(at::ones({2}, kDouble));
  test::expect_contains(test::error_of([&] { Ddpo(p.model, reward_2d, PolicyGradientOptions{}); }), "dimension");
  test::expect_contains(test::error_of([] { parse_log_prob_reduction("max"); }), "sum, mean");
}

}  // namespace
}  // namespace tilt
