// The engine (tilt/sde/engine.h): the step kernels against the drift they discretise, the lean-adjoint
// recursion against autograd through the same chain, the path weight against the explicit ratio of
// Gaussian densities, and the number of network evaluations each method spends per step.
#include "tilt/core/error.h"
#include "tilt/model/gmm.h"
#include "tilt/model/reward.h"
#include "tilt/sde/engine.h"
#include "tilt/sde/gddim.h"
#include "tilt/train/adjoint_matching.h"

#include "../support/helpers.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>

#include <atomic>
#include <cmath>

namespace tilt {
namespace {

const auto kDouble = at::TensorOptions().dtype(at::kDouble);

double max_abs(const at::Tensor& t) { return t.abs().max().item<double>(); }

// r(x) = -(precision / 2) |x - c|^2.
RewardPtr quadratic_reward(std::vector<double> c, double precision) {
  const auto n = static_cast<int64_t>(c.size());
  return std::make_shared<QuadraticReward>(at::tensor(c, kDouble), precision * at::eye(n, kDouble));
}

TEST(Engine, EulerKernelIsTheEulerMaruyamaStepOfTheDrift) {
  auto field = std::make_shared<GmmVelocity>(test::random_mixture(3, 3, 2), make_linear_schedule());
  Generator gen = make_generator(1);
  const at::Tensor x = at::randn({6, 3}, gen, kDouble);
  for (const auto& noise : {make_memoryless_noise(0.05), make_constant_noise(0.7), make_zero_noise()}) {
    GenerativeSDE sde(field, noise);
    for (double t : {0.1, 0.5, 0.9}) {
      const double s = t + 0.05;
      const StepKernel q = euler_kernel(sde, t, s);
      const at::Tensor expected = x + (s - t) * sde.drift(x, t);
      EXPECT_LT(max_abs(q.mean(x, field->velocity(x, t)) - expected), 1e-14) << noise->describe();
      EXPECT_DOUBLE_EQ(q.std, std::sqrt(s - t) * sde.sigma(t));
    }
  }
  // heun is not a Gaussian step; exact needs a schedule of the family sigma = gamma sqrt(2 eta).
  GenerativeSDE ode(field, make_zero_noise());
  EXPECT_THROW(step_kernel(ode, Integrator::heun, 0.0, 0.1), Error);
  GenerativeSDE constant(field, make_constant_noise(0.5));
  EXPECT_THROW(step_kernels(constant, TimeGrid::uniform(4), Integrator::exact), Error);
}

TEST(Engine, ExactKernelIsTheGddimStep) {
  const auto schedule = make_linear_schedule();
  for (double gamma : {0.0, 0.5, 1.0}) {
    const ExponentialStep e = exponential_step(*schedule, 0.2, 0.3, gamma);
    const StepKernel q = exact_kernel(*schedule, 0.2, 0.3, gamma);
    EXPECT_EQ(q.c_x, e.c_x);
    EXPECT_EQ(q.c_v, e.c_v);
    EXPECT_EQ(q.std, e.std);
  }
}

TEST(Engine, RolloutRecordsItsDraws) {
  auto field = std::make_shared<GmmVelocity>(test::random_mixture(2, 2, 3), make_linear_schedule());
  GenerativeSDE sde(field, make_memoryless_noise(0.1));
  const TimeGrid grid = TimeGrid::uniform(8);
  const std::vector<StepKernel> kernels = step_kernels(sde, grid, Integrator::exact);
  ASSERT_TRUE(kernels.back().deterministic());  // onto t = 1 the exact step has no noise
  Generator gen = make_generator(2);
  const at::Tensor x0 = at::randn({5, 2}, gen, kDouble);
  RolloutRecord all;
  all.states = all.noise = all.velocities = true;
  const Rollout r = rollout(kernels, [&](int64_t k, const at::Tensor& x) { return field->velocity(x, grid[k]); }, x0, gen,
                            all);
  ASSERT_EQ(r.x.size(), 9u);
  for (int64_t k = 0; k < 8; ++k) {
    const at::Tensor step = r.x[k + 1] - kernels[k].mean(r.x[k], r.v[k]);
    if (kernels[k].deterministic()) {
      EXPECT_FALSE(r.xi[k].defined());
      EXPECT_LT(max_abs(step), 1e-14);
    } else {
      EXPECT_LT(max_abs(step - kernels[k].std * r.xi[k]), 1e-12) << k;
    }
  }
  // The same generator state gives the same path as simulate().
  Generator g1 = make_generator(3), g2 = make_generator(3);
  SampleOptions opts;
  opts.integrator = Integrator::exact;
  const at::Tensor a = simulate(sde, x0, grid, g1, opts).final();
  const at::Tensor b =
      rollout(kernels, [&](int64_t k, const at::Tensor& x) { return field->velocity(x, grid[k]); }, x0, g2).final();
  EXPECT_TRUE(at::equal(a, b));
}

TEST(Engine, LeanAdjointRecursionIsTheGradientThroughTheChain) {
  // a_k from the recursion must be d/dX_k of  sum_{j >= k} c_v,j f(X_j) + g(X_K)  through the mean maps
  // X_{j+1} = c_x,j X_j + c_v,j v(X_j, t_j), for a nonlinear v and any kernels.
  auto field = std::make_shared<GmmVelocity>(test::random_mixture(3, 3, 5), make_linear_schedule());
  const TimeGrid grid = TimeGrid::uniform(6, 0.0, 0.9);
  GenerativeSDE sde(field, make_memoryless_noise(0.1));
  const std::vector<StepKernel> kernels = step_kernels(sde, grid, Integrator::euler);
  const at::Tensor c = at::tensor({0.3, -0.2, 0.5}, kDouble);
  auto f = [&](const at::Tensor& x) { return (x * c).sum(1).pow(2); };  // a running cost
  auto g = [&](const at::Tensor& x) { return x.pow(3).sum(1); };        // a terminal cost
  Generator gen = make_generator(4);
  const at::Tensor x0 = at::randn({4, 3}, gen, kDouble);

  std::vector<at::Tensor> xs{x0.clone().requires_grad_(true)};
  at::Tensor J = at::zeros({4}, kDouble);
  for (int64_t k = 0; k < 6; ++k) {
    J = J + kernels[k].c_v * f(xs[k]);
    xs.push_back(kernels[k].mean(xs[k], field->velocity(xs[k], grid[k])));
  }
  J = J + g(xs[6]);
  const std::vector<at::Tensor> expected = torch::autograd::grad({J.sum()}, {xs.begin(), xs.end() - 1});

  std::vector<at::Tensor> x_detached, a(7);
  for (const auto& x : xs) x_detached.push_back(x.detach());
  a[6] = torch::autograd::grad({g(xs[6]).sum()}, {xs[6]}, {}, true)[0].detach();
  lean_adjoint_recursion(
      a, kernels, [&](int64_t k, const at::Tensor& ak) { return field->vjp(x_detached[k], grid[k], ak); },
      [&](int64_t k) {
        const at::Tensor xg = x_detached[k].clone().requires_grad_(true);
        return torch::autograd::grad({f(xg).sum()}, {xg})[0];
      });
  for (int64_t k = 0; k < 6; ++k) {
    EXPECT_LT(max_abs(a[k] - expected[k]), 1e-10 * (1 + max_abs(expected[k]))) << k;
  }
  std::vector<at::Tensor> short_a(3);
  EXPECT_THROW(lean_adjoint_recursion(short_a, kernels, nullptr), Error);
}

TEST(Engine, PathWeightIsTheRatioOfTheStepDensities) {
  Generator gen = make_generator(5);
  const at::Tensor m_p = at::randn({7, 4}, gen, kDouble), shift = 0.3 * at::randn({7, 4}, gen, kDouble);
  const at::Tensor xi = at::randn({7, 4}, gen, kDouble);
  const double s = 0.4;
  const at::Tensor x_next = m_p + shift + s * xi;  // drawn from Q
  auto log_normal = [&](const at::Tensor& m) { return -0.5 * ((x_next - m) / s).pow(2).sum(1); };
  PathWeight w(7);
  w.add_step(shift, xi, s);
  EXPECT_LT(max_abs(w.log_weight() - (log_normal(m_p) - log_normal(m_p + shift))), 1e-12);
  w.add(at::ones({7}, kDouble));
  EXPECT_LT(max_abs(w.log_weight() - (log_normal(m_p) - log_normal(m_p + shift)) - 1.0), 1e-12);
  EXPECT_THROW(w.add_step(shift, xi, 0.0), Error);
}

// ---- Network evaluations per step ----

using test::CountingVelocity;

TEST(NetworkEvaluations, OnePerStepForEveryGaussianIntegratorTwoForHeun) {
  auto counting = std::make_shared<CountingVelocity>(
      std::make_shared<GmmVelocity>(test::random_mixture(2, 2, 6), make_linear_schedule()));
  const TimeGrid grid = TimeGrid::uniform(10);
  struct Case {
    NoiseSchedulePtr noise;
    Integrator integrator;
    int64_t per_step;
  };
  for (const Case& c : {Case{make_memoryless_noise(0.1), Integrator::euler, 1},
                        Case{make_memoryless_noise(0.1), Integrator::exact, 1},
                        Case{make_zero_noise(), Integrator::exact, 1}, Case{make_zero_noise(), Integrator::heun, 2}}) {
    counting->velocities = 0;
    Generator gen = make_generator(7);
    SampleOptions opts;
    opts.integrator = c.integrator;
    // The progress callback hears of each step once, in order, after its evaluations.
    std::vector<int64_t> heard;
    opts.on_step = [&](int64_t done) {
      heard.push_back(done);
      EXPECT_EQ(counting->velocities.load(), c.per_step * done);
    };
    sample(GenerativeSDE(counting, c.noise), 16, grid, gen, opts);
    EXPECT_EQ(counting->velocities.load(), c.per_step * 10) << c.noise->describe() << " " << static_cast<int>(c.integrator);
    EXPECT_EQ(heard, (std::vector<int64_t>{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}));
  }
}

TEST(NetworkEvaluations, AdjointMatchingCallsTheBaseOncePerStepForwardAndOnceBackward) {
  // One iteration on K steps: K - 1 rollout steps and the noiseless last step evaluate the base once
  // each, and the lean adjoint takes K VJPs (which also return v_base: no extra evaluation).
  const int64_t K = 12;
  for (const bool taped : {false, true}) {
    auto base = std::make_shared<CountingVelocity>(
        std::make_shared<GmmVelocity>(test::ring_mixture_2d(), make_linear_schedule()));
    auto model = make_finetuned(base, FineTuneMode::residual, {16, 16}, 4, 3);
    AdjointMatchingOptions o;
    o.num_steps = K;
    o.batch_size = 20;
    o.loss_early_steps = 3;
    o.loss_late_steps = 3;
    o.tape_activations = taped;
    AdjointMatching am(model, quadratic_reward({1.0, 0.5}, 0.5), make_memoryless_noise(1.0 / K), o);
    ASSERT_EQ(am.taped(), taped);
    Generator gen = make_generator(8);
    am.compute(gen);
    EXPECT_EQ(base->velocities.load(), K) << (taped ? "taped" : "autograd");
    EXPECT_EQ(base->vjps.load(), K) << (taped ? "taped" : "autograd");
  }
}

}  // namespace
}  // namespace tilt
