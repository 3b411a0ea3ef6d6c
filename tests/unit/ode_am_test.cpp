// Deterministic (ODE) Adjoint Matching against ground truth (docs/equations.md, E83-E90):
//  1. regularisers: grad psi*(grad psi(u)) = u, Fenchel-Young equality, grad psi* = autograd of psi*;
//  2. the lean adjoint equals (dX_K/dX_k)^T lambda grad r by central differences through the frozen
//     base's Euler ODE, and the product of the base's Jacobians along a controlled trajectory;
//  3. truncation: the window's adjoints are the full run's, K_adj - 1 base VJPs per iteration, and for
//     the rectified flow of N(0, I) the adjoint factor a(t)/a(1) = 1/sqrt(t^2 + (1-t)^2) (E90 [D]);
//  4. linear-quadratic closed form (1-D and 3-D diagonal): the fixed-point iteration of the regression
//     converges to the optimum of the discretised problem (to 1e-8) and, as h -> 0, to the continuous
//     u* = -(k/mu) E (E x - y) / (1 + k G / mu) of E89; Adam on the loss gets there too;
//  5. that optimum's terminal law is N(0.775, 0.138), not the KL tilt N(0.845, 0.422) (E89).
#include "tilt/model/finetuned.h"
#include "tilt/model/gmm.h"
#include "tilt/model/mlp.h"
#include "tilt/model/reward.h"
#include "tilt/train/ode_adjoint_matching.h"
#include "tilt/train/regulariser.h"
#include "tilt/train/trainer.h"

#include "../support/checks.h"
#include "../support/helpers.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>

#include <cmath>
#include <iostream>

namespace tilt {
namespace {

const auto kDouble = at::TensorOptions().dtype(at::kDouble);

double max_abs(const at::Tensor& x) { return x.abs().max().item<double>(); }

// v(x, t) = A x with A diagonal: the linear-quadratic base of docs/equations.md, E89 (any X_0 ~ N(0, I) flow).
class LinearField : public VelocityField {
 public:
  explicit LinearField(std::vector<double> A) : VelocityField(make_linear_schedule()), A_(at::tensor(A, kDouble)) {}
  std::string kind() const override { return "linear_test"; }
  int64_t dim() const override { return A_.size(0); }
  using VelocityField::velocity;
  Tensor velocity(const Tensor& x, const Tensor& /*t*/) const override { return x * A_.to(x.scalar_type()); }

 private:
  Tensor A_;
};

// u(x, t_k) = gain_k * x + offset_k per coordinate, one (gain, offset) per grid step: it represents the
// linear-quadratic optimum exactly.
class TabularLinearControl : public VelocityField {
 public:
  TabularLinearControl(int64_t K, int64_t d)
      : VelocityField(make_linear_schedule()), K_(K), gain_(at::zeros({K, d}, kDouble)), offset_(at::zeros({K, d}, kDouble)) {
    gain_.requires_grad_(true);
    offset_.requires_grad_(true);
  }
  std::string kind() const override { return "tabular_test"; }
  int64_t dim() const override { return gain_.size(1); }
  using VelocityField::velocity;
  Tensor velocity(const Tensor& x, const Tensor& t) const override {
    const Tensor tt = t.dim() == 0 ? t.expand({x.size(0)}) : t;
    const Tensor k = at::clamp(at::round(tt.to(at::kDouble) * K_), 0, K_ - 1).to(at::kLong);
    return gain_.index_select(0, k) * x + offset_.index_select(0, k);
  }
  std::vector<Tensor> parameters() const override { return {gain_, offset_}; }
  Tensor& gain() { return gain_; }
  Tensor& offset() { return offset_; }

 private:
  int64_t K_;
  Tensor gain_, offset_;
};

// ---------------------------------------------------------------------------------------------
// 1. Regularisers.

std::vector<RegulariserPtr> all_regularisers() {
  return {make_quadratic_regulariser(0.7),       make_quadratic_regulariser(0.5, 2.0),
          make_clipped_regulariser(1.5, 0.8),    make_pnorm_regulariser(1.5, 1.3),
          make_pnorm_regulariser(3.0, 0.6, 1.4), make_pnorm_regulariser(2.0)};
}

TEST(OdeAmRegulariser, ConjugateInvertsTheGradient) {
  Generator gen = make_generator(1);
  for (const auto& psi : all_regularisers()) {
    for (double t : {0.0, 0.3, 1.0}) {
      at::Tensor u = at::randn({64, 3}, gen, kDouble);
      if (psi->name() == "clipped") u = u * (1.4 / (1e-9 + max_abs(u.norm(2, {1}))));  // inside |u| <= delta
      const at::Tensor a = psi->grad_psi(u, t);
      EXPECT_LT(max_abs(psi->grad_conjugate(a, t) - u), 1e-12) << psi->describe() << " t=" << t;
      // Fenchel-Young: psi(u) + psi*(a) = <u, a> exactly when a = grad psi(u).
      EXPECT_LT(max_abs(psi->psi(u, t) + psi->conjugate(a, t) - (u * a).sum(1)), 1e-12) << psi->describe();
      // grad psi* is the gradient of psi*, by autograd, on arbitrary costates.
      const at::Tensor b = (2.0 * at::randn({64, 3}, gen, kDouble)).requires_grad_(true);
      const at::Tensor g = torch::autograd::grad({psi->conjugate(b, t).sum()}, {b})[0];
      EXPECT_LT(max_abs(g - psi->grad_conjugate(b.detach(), t)), 1e-12) << psi->describe();
    }
  }
  EXPECT_DOUBLE_EQ(make_quadratic_regulariser(0.5, 2.0)->weight(0.25), 0.75 * 2.0 + 0.25 * 0.5);
}

TEST(OdeAmRegulariser, ClippedTargetsStayInTheBallAndZeroCostateIsSafe) {
  const auto psi = make_clipped_regulariser(0.5, 1.0);
  const at::Tensor a = at::tensor({3.0, 4.0, 0.3, 0.0}, kDouble).reshape({2, 2});
  const at::Tensor u = psi->grad_conjugate(a, 0.5);
  EXPECT_NEAR(u[0][0].item<double>(), 0.3, 1e-15);  // (3, 4) / 1 has norm 5, clipped to 0.5
  EXPECT_NEAR(u[0][1].item<double>(), 0.4, 1e-15);
  EXPECT_NEAR(u[1][0].item<double>(), 0.3, 1e-15);  // inside: a / mu
  for (const auto& r : all_regularisers()) {
    EXPECT_EQ(max_abs(r->grad_conjugate(at::zeros({3, 2}, kDouble), 0.5)), 0.0) << r->describe();
    EXPECT_EQ(max_abs(r->grad_psi(at::zeros({3, 2}, kDouble), 0.5)), 0.0) << r->describe();
  }
}

TEST(OdeAmRegulariser, BadParametersAreErrors) {
  test::expect_contains(test::error_of([] { make_pnorm_regulariser(1.0); }), "p > 1");
  test::expect_contains(test::error_of([] { make_clipped_regulariser(0.0); }), "delta > 0");
  test::expect_contains(test::error_of([] { make_quadratic_regulariser(-1.0); }), "mu must be > 0");
  test::expect_contains(test::error_of([] { make_regulariser("huber", 1, 0, 1, 2); }), "unknown regulariser 'huber'");
}

// ---------------------------------------------------------------------------------------------
// 2. The lean adjoint.

// Euler of the frozen base from step `from` to K.
at::Tensor base_euler(const VelocityField& base, at::Tensor x, const TimeGrid& grid, int64_t from) {
  for (int64_t k = from; k < grid.steps(); ++k) x = x + grid.step(k) * base.velocity(x, grid[k]);
  return x;
}

TEST(OdeAmLeanAdjoint, EqualsFiniteDifferencesThroughTheFrozenBaseOde) {
  const double lambda = 1.3;
  const int64_t K = 20;
  const TimeGrid grid = TimeGrid::uniform(K);
  auto base = std::make_shared<GmmVelocity>(test::ring_mixture_2d(), make_linear_schedule());
  const auto reward = std::make_shared<GmmLogDensityReward>(test::random_mixture(2, 3, 5));
  Generator gen = make_generator(2);
  std::vector<at::Tensor> x{at::randn({4, 2}, gen, kDouble)};
  for (int64_t k = 0; k + 1 < K; ++k) x.push_back(x.back() + grid.step(k) * base->velocity(x.back(), grid[k]));
  const at::Tensor x1 = base_euler(*base, x.back(), grid, K - 1);
  const auto a = ode_lean_adjoint(*base, x, grid, lambda * reward->grad(x1));
  ASSERT_EQ(a.size(), static_cast<size_t>(K + 1));
  for (int64_t k : {0, 7, 19}) {
    const double eps = 2e-6;  // central differences: O(eps^2) truncation, O(1e-16 |r| / eps) rounding
    for (int64_t i = 0; i < 2; ++i) {
      at::Tensor e = at::zeros_like(x[k]);
      e.select(1, i).fill_(eps);
      const at::Tensor fd = lambda * (reward->value(base_euler(*base, x[k] + e, grid, k)) -
                                      reward->value(base_euler(*base, x[k] - e, grid, k))) / (2 * eps);
      EXPECT_LT(max_abs(fd - a[k].select(1, i)), 1e-6 * (1 + max_abs(fd))) << "k=" << k << " i=" << i;
    }
  }
}

TEST(OdeAmLeanAdjoint, IsTheProductOfBaseJacobiansAlongAControlledTrajectory) {
  // Along the fine-tuned model's trajectory the lean adjoint uses the base's Jacobians only.
  const int64_t K = 8;
  const TimeGrid grid = TimeGrid::uniform(K);
  auto base = std::make_shared<GmmVelocity>(test::ring_mixture_2d(), make_linear_schedule());
  auto model = make_finetuned(base, FineTuneMode::residual, {16}, 2, 4);
  {
    at::NoGradGuard no_grad;
    for (auto& p : model->parameters()) p.normal_(0.0, 0.5);
  }
  Generator gen = make_generator(3);
  std::vector<at::Tensor> x{at::randn({3, 2}, gen, kDouble)};
  {
    at::NoGradGuard no_grad;
    for (int64_t k = 0; k + 1 < K; ++k) {
      x.push_back(x.back() + grid.step(k) * model->velocity(x.back().to(at::kFloat), grid[k]).to(at::kDouble));
    }
  }
  const at::Tensor aK = at::randn({3, 2}, gen, kDouble);
  const auto a = ode_lean_adjoint(*base, x, grid, aK);
  at::Tensor expected = aK;
  for (int64_t k = K - 1; k >= 0; --k) {
    const at::Tensor J = test::fd_jacobian([&](const at::Tensor& y) { return base->velocity(y, grid[k]); }, x[k]);
    expected = expected + grid.step(k) * at::matmul(J.transpose(1, 2), expected.unsqueeze(2)).squeeze(2);
    EXPECT_LT(max_abs(a[k] - expected), 1e-7) << "k=" << k;
  }
}

// ---------------------------------------------------------------------------------------------
// 3. Truncation.

TEST(OdeAmTruncation, WindowEqualsTheFullAdjointAndCostsKadjMinusOneVjps) {
  const int64_t K = 12;
  auto counting = std::make_shared<test::CountingVelocity>(std::make_shared<GmmVelocity>(test::ring_mixture_2d(), make_linear_schedule()));
  auto model = make_finetuned(counting, FineTuneMode::residual, {16}, 2, 4);
  {
    at::NoGradGuard no_grad;
    for (auto& p : model->parameters()) p.normal_(0.0, 0.3);
  }
  const auto reward = std::make_shared<QuadraticReward>(at::tensor({2.5, 0.0}, kDouble), 0.25 * at::eye(2, kDouble));
  OdeAdjointMatchingOptions o;
  o.num_steps = K;
  o.batch_size = 5;
  o.lambda = 1.5;
  OdeAdjointMatching full(model, reward, make_quadratic_regulariser(0.8), o);
  Generator g1 = make_generator(9);
  counting->vjps = 0;
  const OdeRegressionBatch f = full.regression_batch(g1);
  EXPECT_EQ(counting->vjps.load(), K - 1);
  EXPECT_EQ(f.steps.size(), static_cast<size_t>(K));
  for (int64_t K_adj : {K, int64_t{4}, int64_t{1}}) {
    for (std::string mode : {"keep", "zero"}) {
      o.adjoint_steps = K_adj;
      o.truncated_control = mode;
      OdeAdjointMatching trunc(model, reward, make_quadratic_regulariser(0.8), o);
      Generator g2 = make_generator(9);
      counting->vjps = 0;
      const OdeRegressionBatch b = trunc.regression_batch(g2);
      EXPECT_EQ(counting->vjps.load(), K_adj - 1);
      EXPECT_EQ(trunc.window_start(), K - K_adj);
      EXPECT_TRUE(at::equal(b.x1, f.x1));
      EXPECT_TRUE(at::equal(b.control_cost, f.control_cost));
      ASSERT_EQ(b.adjoint.size(), static_cast<size_t>(K_adj));
      for (int64_t j = 0; j < K_adj; ++j) EXPECT_TRUE(at::equal(b.adjoint[j], f.adjoint[K - K_adj + j]));
      // The regression rows: the window's equal the full run's; "zero" adds every earlier step with target 0.
      const int64_t rows = mode == "zero" ? K : K_adj;
      ASSERT_EQ(b.steps.size(), static_cast<size_t>(rows));
      const int64_t B = o.batch_size, k0 = K - K_adj;
      EXPECT_TRUE(at::equal(b.target.slice(0, (rows - K_adj) * B), f.target.slice(0, k0 * B)));
      if (mode == "zero" && k0 > 0) EXPECT_EQ(max_abs(b.target.slice(0, 0, k0 * B)), 0.0);
    }
  }
}

TEST(OdeAmTruncation, LossIsTheWeightedRegressionOfTheBatch) {
  const int64_t K = 10;
  auto base = std::make_shared<GmmVelocity>(test::ring_mixture_2d(), make_linear_schedule());
  auto model = make_finetuned(base, FineTuneMode::residual, {16}, 2, 4);
  {
    at::NoGradGuard no_grad;
    for (auto& p : model->parameters()) p.normal_(0.0, 0.3);
  }
  const auto reward = std::make_shared<QuadraticReward>(at::tensor({2.5, 0.0}, kDouble), 0.25 * at::eye(2, kDouble));
  OdeAdjointMatchingOptions o;
  o.num_steps = K;
  o.batch_size = 6;
  o.adjoint_steps = 6;
  o.loss_steps = 4;
  OdeAdjointMatching loss(model, reward, make_pnorm_regulariser(1.5), o);
  Generator g1 = make_generator(4), g2 = make_generator(4);
  const LossOutput out = loss.compute(g1);
  const OdeRegressionBatch b = loss.regression_batch(g2);
  ASSERT_EQ(b.steps.size(), 4u);
  for (int64_t k : b.steps) EXPECT_GE(k, K - 6);
  const at::Tensor u = model->delta(b.x, b.t, b.v_base);
  // (6 trained steps / 4 drawn) * sum h |u - target|^2 / B
  const double expected = (6.0 / 4.0) * (1.0 / K) * (u - b.target).pow(2).sum().item<double>() / 6.0;
  EXPECT_NEAR(out.loss.item<double>(), expected, 1e-6 * expected);
}

TEST(OdeAmTruncation, RectifiedFlowAdjointFactorIsOneOverSqrtD) {
  // Base: the exact velocity of data N(0, I) on the linear path, v = (2t - 1) x / D(t), D = t^2 + (1-t)^2.
  // Its adjoint factor is exp(int_t^1 (2s-1)/D ds) = D(t)^{-1/2} (docs/equations.md, E90): 1 at t = 0 and 1,
  // sqrt(2) at 1/2.
  auto base = std::make_shared<GmmVelocity>(test::isotropic_gaussian({0.0, 0.0}, 1.0), make_linear_schedule());
  std::vector<double> errors;
  for (int64_t K : {100, 400}) {
    errors.push_back(0.0);
    const TimeGrid grid = TimeGrid::uniform(K);
    Generator gen = make_generator(5);
    std::vector<at::Tensor> x{at::randn({3, 2}, gen, kDouble)};
    for (int64_t k = 0; k + 1 < K; ++k) x.push_back(x.back() + grid.step(k) * base->velocity(x.back(), grid[k]));
    const at::Tensor aK = at::ones({3, 2}, kDouble);
    const auto a = ode_lean_adjoint(*base, x, grid, aK);
    double discrete_product = 1.0;
    for (int64_t k = K - 1; k >= 0; --k) {
      const double t = grid[k], D = t * t + (1 - t) * (1 - t);
      discrete_product *= 1.0 + grid.step(k) * (2 * t - 1) / D;  // the Euler map's exact factor
      EXPECT_LT(max_abs(a[k] - discrete_product), 1e-10);
      errors.back() = std::max(errors.back(), max_abs(a[k] - 1.0 / std::sqrt(D)));
    }
    EXPECT_NEAR(a[K / 2][0][0].item<double>(), std::sqrt(2.0), 2.0 / K);
    EXPECT_LT(errors.back(), 2.0 / K) << "K=" << K;
  }
  EXPECT_NEAR(errors[0] / errors[1], 4.0, 0.4);  // first order in h: 4x the steps, a quarter of the error
}

TEST(OdeAmTruncation, OptionsAreChecked) {
  auto base = std::make_shared<GmmVelocity>(test::ring_mixture_2d(), make_linear_schedule());
  auto model = make_finetuned(base, FineTuneMode::residual, {8}, 2, 4);
  const auto reward = std::make_shared<QuadraticReward>(at::tensor({2.5, 0.0}, kDouble), 0.25 * at::eye(2, kDouble));
  const auto psi = make_quadratic_regulariser();
  OdeAdjointMatchingOptions o;
  o.num_steps = 10;
  o.adjoint_steps = 11;
  test::expect_contains(test::error_of([&] { OdeAdjointMatching(model, reward, psi, o); }), "adjoint_steps must be in 0..num_steps = 10");
  o.adjoint_steps = 0;
  o.truncated_control = "drop";
  test::expect_contains(test::error_of([&] { OdeAdjointMatching(model, reward, psi, o); }), "truncated_control");
  o.truncated_control = "keep";
  const auto reward3 = std::make_shared<QuadraticReward>(at::zeros({3}, kDouble), at::eye(3, kDouble));
  test::expect_contains(test::error_of([&] { OdeAdjointMatching(model, reward3, psi, o); }), "dimension 3");
}

// ---------------------------------------------------------------------------------------------
// 4-5. Linear-quadratic closed form: v_base = A x (diagonal), r = -(1/2) sum_i k_i (x_i - y_i)^2,
// psi = (mu_t/2)|u|^2, per coordinate.

struct LqProblem {
  std::vector<double> A, k, y;
  double lambda = 1.0, mu = 1.0, mu_start = 0.0;
};

// The optimum of the Euler-discretised problem x_{k+1} = (1 + hA) x_k + h u_k, maximising
// lambda r(x_K) - sum h (mu_k/2) u_k^2 [D]: with Phi_j = (1 + hA)^{K-j}, G_k = sum_{j>=k} h Phi_{j+1}^2 / mu_j,
//   u_k(x) = -(lambda k / mu_k) Phi_{k+1} (Phi_k x - y) / (1 + lambda k G_k).
// Returns (gain, offset) per step and coordinate, [K, d] each.
std::pair<at::Tensor, at::Tensor> discrete_lq_optimum(const LqProblem& p, const RegulariserPtr& psi, int64_t K) {
  const int64_t d = static_cast<int64_t>(p.A.size());
  const double h = 1.0 / K;
  at::Tensor gain = at::zeros({K, d}, kDouble), offset = at::zeros({K, d}, kDouble);
  for (int64_t i = 0; i < d; ++i) {
    const double lk = p.lambda * p.k[i];
    double G = 0.0;
    for (int64_t s = K - 1; s >= 0; --s) {
      const double phi1 = std::pow(1 + h * p.A[i], K - s - 1), phi0 = phi1 * (1 + h * p.A[i]);
      const double mu_s = psi->weight(s * h);
      G += h * phi1 * phi1 / mu_s;
      const double c = -(lk / mu_s) * phi1 / (1 + lk * G);
      gain[s][i] = c * phi0;
      offset[s][i] = -c * p.y[i];
    }
  }
  return {gain, offset};
}

// The continuous optimum (docs/equations.md, E89): u*(x,t) = -(lambda k/mu) E (E x - y)/(1 + lambda k G/mu),
// E = e^{A(1-t)}, G = (e^{2A(1-t)} - 1)/(2A); constant mu.
std::pair<double, double> continuous_lq_optimum(double A, double lk, double y, double mu, double t) {
  const double E = std::exp(A * (1 - t)), G = (std::exp(2 * A * (1 - t)) - 1) / (2 * A);
  const double c = -(lk / mu) * E / (1 + lk * G / mu);
  return {c * E, -c * y};
}

struct LqSetup {
  std::shared_ptr<TabularLinearControl> control;
  std::shared_ptr<FineTunedVelocity> model;
  std::unique_ptr<OdeAdjointMatching> loss;
};

LqSetup make_lq(const LqProblem& p, const RegulariserPtr& psi, int64_t K, int64_t batch) {
  LqSetup s;
  const int64_t d = static_cast<int64_t>(p.A.size());
  s.control = std::make_shared<TabularLinearControl>(K, d);
  s.model = std::make_shared<FineTunedVelocity>(std::make_shared<LinearField>(p.A), s.control, FineTuneMode::residual);
  at::Tensor kdiag = at::diag(at::tensor(p.k, kDouble));
  const auto reward = std::make_shared<QuadraticReward>(at::tensor(p.y, kDouble), kdiag);
  OdeAdjointMatchingOptions o;
  o.num_steps = K;
  o.batch_size = batch;
  o.lambda = p.lambda;
  s.loss = std::make_unique<OdeAdjointMatching>(s.model, reward, psi, o);
  return s;
}

// One step of the method of successive approximations: regress each step's targets exactly on the
// linear family (least squares per step and coordinate), damped.
void fixed_point_step(LqSetup& s, Generator& gen, double damping) {
  const OdeRegressionBatch b = s.loss->regression_batch(gen);
  const int64_t S = static_cast<int64_t>(b.steps.size()), B = s.loss->options().batch_size, d = s.control->dim();
  const at::Tensor x = b.x.reshape({S, B, d}), y = b.target.reshape({S, B, d});
  const at::Tensor xm = x.mean(1, true), ym = y.mean(1, true);
  const at::Tensor gain = ((x - xm) * (y - ym)).sum(1) / (x - xm).pow(2).sum(1);  // [S, d]
  const at::Tensor offset = ym.squeeze(1) - gain * xm.squeeze(1);
  at::NoGradGuard no_grad;
  const at::Tensor idx = at::tensor(b.steps, at::TensorOptions().dtype(at::kLong));
  s.control->gain().index_copy_(0, idx, (1 - damping) * s.control->gain().index_select(0, idx) + damping * gain);
  s.control->offset().index_copy_(0, idx, (1 - damping) * s.control->offset().index_select(0, idx) + damping * offset);
}

TEST(OdeAmLinearQuadratic, FixedPointIsTheDiscreteOptimumAndConvergesToTheContinuousOne) {
  // 1-D: the example of docs/equations.md, E89 (A = 0.5, k = 2, y = 1, lambda = mu = 1); 3-D: diagonal A with a
  // time-dependent weight mu_t from 2 (t = 0) to 0.5 (t = 1).
  const LqProblem one{{0.5}, {2.0}, {1.0}};
  LqProblem three{{0.5, -0.7, 1.2}, {2.0, 0.5, 1.0}, {1.0, -2.0, 0.3}};
  three.lambda = 1.5;
  for (const auto& [p, psi] : {std::pair{one, make_quadratic_regulariser(1.0)},
                               std::pair{three, make_quadratic_regulariser(0.5, 2.0)}}) {
    std::vector<double> continuous_err;
    for (int64_t K : {25, 50}) {
      LqSetup s = make_lq(p, psi, K, 4);
      Generator gen = make_generator(7);
      for (int it = 0; it < 60; ++it) fixed_point_step(s, gen, 1.0);
      const auto [gain, offset] = discrete_lq_optimum(p, psi, K);
      EXPECT_LT(max_abs(s.control->gain() - gain), 1e-8) << "K=" << K << " d=" << p.A.size();
      EXPECT_LT(max_abs(s.control->offset() - offset), 1e-8) << "K=" << K << " d=" << p.A.size();
      if (p.A.size() == 1) {
        double err = 0.0;
        for (int64_t k = 0; k < K; ++k) {
          const auto [g, c] = continuous_lq_optimum(0.5, 2.0, 1.0, 1.0, k / static_cast<double>(K));
          err = std::max({err, std::abs(gain[k][0].item<double>() - g), std::abs(offset[k][0].item<double>() - c)});
        }
        continuous_err.push_back(err);
      }
    }
    if (!continuous_err.empty()) {
      EXPECT_LT(continuous_err[1], 0.05);
      EXPECT_NEAR(continuous_err[0] / continuous_err[1], 2.0, 0.3);  // first order in h
    }
  }
}

TEST(OdeAmLinearQuadratic, TheDeterministicOptimumIsNotTheTilt) {
  // docs/equations.md, E89: A = 0.5, lambda = mu = 1, k = 2, y = 1, X_0 ~ N(0, 1). The optimally controlled ODE
  // maps x_0 to (E x_0 + k G y)/(1 + k G) (E = e^A, G = (e^{2A} - 1)/(2A)): N(0.775, 0.138), whereas the
  // tilt p_base exp(r) of p_base = N(0, e^{2A}) is N(0.845, 0.422).
  const double A = 0.5, k = 2.0, y = 1.0, E = std::exp(A), G = (std::exp(2 * A) - 1) / (2 * A);
  const double det_mean = k * G * y / (1 + k * G), det_var = std::pow(E / (1 + k * G), 2);
  const double tilt_var = 1.0 / (1.0 / (E * E) + k), tilt_mean = tilt_var * k * y;
  EXPECT_NEAR(det_mean, 0.775, 5e-4);
  EXPECT_NEAR(det_var, 0.138, 5e-4);
  EXPECT_NEAR(tilt_mean, 0.845, 5e-4);
  EXPECT_NEAR(tilt_var, 0.422, 5e-4);

  // The control learned by the fixed-point iteration (K = 200) pushes x_0 = 0 and 1 to the affine map's
  // intercept and slope: its terminal law must be the deterministic optimum (to O(h)), far from the tilt.
  const int64_t K = 200;
  LqSetup s = make_lq({{A}, {k}, {y}}, make_quadratic_regulariser(1.0), K, 4);
  Generator gen = make_generator(8);
  for (int it = 0; it < 40; ++it) fixed_point_step(s, gen, 1.0);
  at::Tensor x = at::tensor({0.0, 1.0}, kDouble).reshape({2, 1});
  {
    at::NoGradGuard no_grad;
    const TimeGrid grid = TimeGrid::uniform(K);
    for (int64_t j = 0; j < K; ++j) x = x + grid.step(j) * s.model->velocity(x, grid[j]);
  }
  const double mean = x[0][0].item<double>(), var = std::pow(x[1][0].item<double>() - mean, 2);
  EXPECT_NEAR(mean, det_mean, 5e-3);
  EXPECT_NEAR(var, det_var, 5e-3);
  EXPECT_GT(std::abs(var - tilt_var), 0.25);  // 3x narrower than the tilt
  EXPECT_GT(std::abs(mean - tilt_mean), 0.05);
}

TEST(OdeAmLinearQuadratic, AdamOnTheLossReachesTheOptimum) {
  // The Loss with the trainer (Adam) on the 1-D problem, K = 10: the parameters end near the discrete optimum.
  const LqProblem p{{0.5}, {2.0}, {1.0}};
  const auto psi = make_quadratic_regulariser(1.0);
  const int64_t K = 10;
  LqSetup s = make_lq(p, psi, K, 16);
  TrainerOptions topt;
  topt.iterations = 600;
  topt.adam.lr = 0.05;
  topt.adam.weight_decay = 0.0;
  topt.grad_clip = 0.0;
  topt.progress = false;
  topt.lr_schedule = LrSchedule::cosine;
  Trainer trainer(*s.loss, topt);
  trainer.run();
  const auto [gain, offset] = discrete_lq_optimum(p, psi, K);
  EXPECT_LT(max_abs(s.control->gain() - gain), 0.01);
  EXPECT_LT(max_abs(s.control->offset() - offset), 0.01);
}

}  // namespace
}  // namespace tilt
