// SOC benchmark problems: each ground truth is checked independently of the code that computes it.
//  * Riccati against the scalar closed form (no state cost: a Bernoulli equation);
//  * the value function against Monte Carlo of -log E[exp(-cost)] under the uncontrolled process;
//  * the optimal control attains the value (J(u*) = V(x0, 0)) and makes the importance weights
//    constant, which a wrong u* cannot do;
//  * the problems' hand-written gradients against autograd and finite differences.
#include "tilt/core/error.h"
#include "tilt/soc/losses.h"
#include "tilt/soc/problems.h"
#include "tilt/train/trainer.h"
#include "tilt/soc/simulate.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <gtest/gtest.h>

#include <cmath>

namespace tilt::soc {
namespace {

const auto kDouble = at::TensorOptions().dtype(at::kDouble);

TEST(SocRiccati, ScalarCaseMatchesClosedForm) {
  // dF/dt = -2 a F + 2 s^2 F^2 (P = 0): G = 1/F solves G' = 2 a G - 2 s^2, so with tau = T - t,
  // G(t) = exp(-2 a tau) / q + (s^2 / a)(1 - exp(-2 a tau)).
  const double a = 0.7, s = 0.8, q = 0.5, T = 1.0;
  QuadraticOU p("scalar", at::full({1, 1}, a, kDouble), at::zeros({1, 1}, kDouble), at::full({1, 1}, q, kDouble),
                at::full({1, 1}, s, kDouble), at::zeros({1}, kDouble), T, 50);
  for (double t : {0.0, 0.3, 0.77, 1.0}) {
    const double tau = T - t, e = std::exp(-2 * a * tau);
    const double F = 1.0 / (e / q + (s * s / a) * (1 - e));
    EXPECT_NEAR(p.riccati(t).item<double>(), F, 1e-7 * F) << "t = " << t;
  }
}

// -log mean exp(-(int f dt + g)) of the uncontrolled process from x, with its standard error.
std::pair<double, double> monte_carlo_value(const QuadraticOU& like, const Tensor& x, int64_t n, int64_t steps,
                                            uint64_t seed) {
  const int64_t d = like.dim();
  const Tensor I = at::eye(d, kDouble);
  // The same problem started at x: recover A, P, Q from the problem's own maps (all symmetric here).
  const Tensor A = like.drift(I, 0.0).t();
  const Tensor P = 0.5 * like.state_cost_grad(I, 0.0);
  const Tensor Q = 0.5 * like.terminal_cost_grad(I);
  QuadraticOU from_x("from_x", A, P, Q, like.sigma(), x, like.horizon(), steps);
  Generator gen = make_generator(seed);
  const ControlledPaths paths = simulate(from_x, zero_control(d), n, steps, gen);
  const Tensor cost = paths.state_cost + paths.terminal_cost;
  const Tensor z = at::exp(-(cost - cost.min()));
  const double mean = z.mean().item<double>();
  const double se = z.std().item<double>() / (mean * std::sqrt(static_cast<double>(n)));
  return {-std::log(mean) + cost.min().item<double>(), se};
}

TEST(SocRiccati, ValueMatchesMonteCarlo) {
  for (const auto& problem : {quadratic_ou_easy(20, 0), quadratic_ou_hard(4, 0)}) {
    Generator gen = make_generator(3);
    const Tensor x0 = problem->initial_state(1, gen)[0];
    for (const Tensor& x : {x0, 2.0 * x0, 0.7 * at::randn({problem->dim()}, gen, kDouble)}) {
      const auto [mc, se] = monte_carlo_value(*problem, x, 5000, 200, 11);
      const double exact = problem->value(x.unsqueeze(0), 0.0).item<double>();
      // 4 standard errors, plus an allowance of 1% of the value for the O(h) Euler-Maruyama bias (h = 1/200).
      EXPECT_NEAR(mc, exact, 4 * se + 0.01 * std::abs(exact)) << problem->name() << ", |x| = " << x.norm().item<double>();
    }
  }
}

void expect_optimal_control_attains_value(const ProblemPtr& problem) {
  Generator gen = make_generator(5);
  const int64_t n = 4000, steps = 200;
  const ControlledPaths opt = simulate(*problem, optimal_control_of(problem), n, steps, gen);
  const ControlledPaths zero = simulate(*problem, zero_control(problem->dim()), n, steps, gen);
  const Tensor cost = opt.running_cost + opt.terminal_cost;
  const double J = cost.mean().item<double>(), se = cost.std().item<double>() / std::sqrt(static_cast<double>(n));
  const double V = problem->value(problem->initial_state(1, gen), 0.0).item<double>();
  EXPECT_NEAR(J, V, 4 * se + 0.01 * std::abs(V)) << problem->name();
  // The zero control costs more.
  EXPECT_GT(control_objective(zero), V + 4 * se) << problem->name();
  // Under u* every path has the same weight dP*/dP^u (= exp(-V)) up to the time step; not so under u = 0.
  const double w_opt = normalised_weight_std(opt), w_zero = normalised_weight_std(zero);
  EXPECT_GT(w_zero, 10 * w_opt) << problem->name();
  EXPECT_NEAR(log_importance_weights(opt).mean().item<double>(), -V, 4 * se + 0.01 * std::abs(V)) << problem->name();
  std::printf("[ %s ] J(u*) = %.4f +- %.4f, V = %.4f; J(0) = %.4f; weight std: u* %.4f, 0 %.3f\n",
              problem->name().c_str(), J, se, V, control_objective(zero), w_opt, w_zero);
}

TEST(SocGroundTruth, OptimalControlAttainsTheValueQuadraticEasy) { expect_optimal_control_attains_value(quadratic_ou_easy()); }
TEST(SocGroundTruth, OptimalControlAttainsTheValueQuadraticHard) { expect_optimal_control_attains_value(quadratic_ou_hard()); }
TEST(SocGroundTruth, OptimalControlAttainsTheValueLinearOU) { expect_optimal_control_attains_value(linear_ou()); }

TEST(SocMetrics, ControlL2ErrorOfAShiftedControl) {
  const ProblemPtr problem = quadratic_ou_easy(6, 1);
  Generator gen = make_generator(2);
  const Control opt = optimal_control_of(problem);
  const ControlledPaths paths = simulate(*problem, opt, 256, 0, gen);
  EXPECT_NEAR(control_l2_error(*problem, paths, opt), 0.0, 1e-24);
  const Tensor c = at::randn({6}, gen, kDouble);
  const Control shifted = [&](const Tensor& x, double t) { return opt(x, t) + c; };
  // The weights are self-normalised, so a constant shift costs exactly |c|^2 at every step.
  EXPECT_NEAR(control_l2_error(*problem, paths, shifted), c.pow(2).sum().item<double>(), 1e-10);
  // On paths drawn by a control, the recorded controls give the same error as evaluating it again.
  const ControlledPaths own = simulate(*problem, shifted, 256, 0, gen);
  EXPECT_NEAR(control_l2_error(*problem, own), control_l2_error(*problem, own, shifted), 1e-12);
  EXPECT_NEAR(control_l2_error(*problem, own), c.pow(2).sum().item<double>(), 1e-10);
}

TEST(SocProblems, HandWrittenGradientsMatchAutogradAndFiniteDifferences) {
  Generator gen = make_generator(4);
  for (const ProblemPtr& p : {ProblemPtr(quadratic_ou_hard(5, 2)), ProblemPtr(linear_ou(5, 2))}) {
    const Tensor x = at::randn({7, 5}, gen, kDouble), a = at::randn({7, 5}, gen, kDouble);
    EXPECT_TRUE(at::allclose(p->drift_vjp(x, 0.3, a), p->Problem::drift_vjp(x, 0.3, a), 1e-12, 1e-12)) << p->name();
    EXPECT_TRUE(at::allclose(p->state_cost_grad(x, 0.3), p->Problem::state_cost_grad(x, 0.3), 1e-12, 1e-12)) << p->name();
    EXPECT_TRUE(at::allclose(p->terminal_cost_grad(x), p->Problem::terminal_cost_grad(x), 1e-12, 1e-12)) << p->name();
    // Central differences of g along a random direction.
    const Tensor v = at::randn({7, 5}, gen, kDouble);
    const double eps = 1e-6;
    const Tensor fd = (p->terminal_cost(x + eps * v) - p->terminal_cost(x - eps * v)) / (2 * eps);
    EXPECT_TRUE(at::allclose(fd, (p->terminal_cost_grad(x) * v).sum(1), 1e-6, 1e-6)) << p->name();
  }
}

TEST(SocProblems, OptimalControlIsMinusSigmaTransposeGradV) {
  // u* = -sigma^T grad V: compare the problems' u* with central differences of their V.
  Generator gen = make_generator(6);
  for (const ProblemPtr& p : {ProblemPtr(quadratic_ou_hard(3, 1)), ProblemPtr(linear_ou(3, 1))}) {
    const Tensor x = at::randn({1, 3}, gen, kDouble);
    const double t = 0.4, eps = 1e-5;
    Tensor grad = at::zeros({1, 3}, kDouble);
    for (int64_t i = 0; i < 3; ++i) {
      Tensor e = at::zeros({1, 3}, kDouble);
      e[0][i] = eps;
      grad[0][i] = (p->value(x + e, t) - p->value(x - e, t)).item<double>() / (2 * eps);
    }
    const Tensor expected = -at::matmul(grad, p->sigma());
    EXPECT_TRUE(at::allclose(p->optimal_control(x, t), expected, 1e-6, 1e-7)) << p->name();
  }
}

TEST(SocProblems, ErrorsNameTheProblem) {
  try {
    make_problem("quadratic_ou_medium");
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("valid: quadratic_ou_easy"), std::string::npos) << e.what();
  }
  EXPECT_THROW(QuadraticOU("bad", at::eye(3, kDouble), at::eye(2, kDouble), at::eye(3, kDouble), at::eye(3, kDouble),
                           at::zeros({3}, kDouble), 1.0, 10),
               Error);
  Generator gen = make_generator(1);
  const auto p = linear_ou(4, 0);
  const Control wrong = [](const Tensor& x, double) { return at::zeros({x.size(0), 3}, kDouble); };
  EXPECT_THROW(simulate(*p, wrong, 8, 10, gen), Error);
}

TEST(SocAdjointMatching, LeanAdjointOfLinearOUIsTheExactAdjoint) {
  // b = A x, f = 0, g = omega . x: a_k = (I + h A^T)^(K - k) omega on every path, and
  // -sigma^T a_k -> u*(t_k) = -sigma^T exp((T - t_k) A^T) omega as h -> 0, at first order.
  const auto p = linear_ou(5, 3);
  Generator gen = make_generator(1);
  double previous = 0;
  for (int64_t K : {50, 100, 200}) {
    const ControlledPaths paths = simulate(*p, zero_control(5), 4, K, gen);
    const auto a = lean_adjoint(*p, paths.x, 1.0);
    double worst = 0;
    for (int64_t k = 0; k < K; k += K / 10) {
      const Tensor target = -at::matmul(a[k], p->sigma());
      worst = std::max(worst, (target - p->optimal_control(paths.x[k], paths.t[k])).abs().max().item<double>());
    }
    if (previous > 0) EXPECT_NEAR(previous / worst, 2.0, 0.2) << "K = " << K;  // first order
    previous = worst;
  }
  EXPECT_LT(previous, 0.02);
}

// u(x, t) = u*(x, t) + shift x + x Theta^T, with Theta [d, d] the only parameter (0 at the start):
// a control family that contains u* exactly, for fixed-point tests of the losses.
class PerturbedOptimal : public ParametricControl {
 public:
  PerturbedOptimal(ProblemPtr p, double shift)
      : p_(std::move(p)), shift_(shift), theta_(at::zeros({p_->dim(), p_->dim()}, kDouble).requires_grad_(true)) {}
  int64_t dim() const override { return p_->dim(); }
  std::vector<Tensor> parameters() const override { return {theta_}; }
  Tensor evaluate(const Tensor& x, const Tensor& t) const override {
    // Rows come in blocks of one time each.
    std::vector<Tensor> parts;
    const auto [values, counts] = [&] {
      auto r = at::unique_consecutive(t, false, true);
      return std::make_pair(std::get<0>(r), std::get<2>(r));
    }();
    int64_t row = 0;
    for (int64_t i = 0; i < values.size(0); ++i) {
      const int64_t n = counts[i].item<int64_t>();
      const Tensor xi = x.slice(0, row, row + n).to(at::kDouble);
      parts.push_back(p_->optimal_control(xi, values[i].item<double>()) + shift_ * xi);
      row += n;
    }
    return at::cat(parts) + at::matmul(x.to(at::kDouble), theta_.t());
  }

 private:
  ProblemPtr p_;
  double shift_;
  Tensor theta_;
};

struct GradientStats {
  Tensor mean, se;  // of the gradient in Theta at Theta = 0, over independent batches
  double loss = 0;  // mean loss value
  double z() const { return (mean.norm() / se.pow(2).sum().sqrt()).item<double>(); }
};

// The loss's gradient with respect to Theta at Theta = 0 on the control u* + shift x + x Theta^T.
template <class L>
GradientStats gradient_stats(const ProblemPtr& p, double shift, int batches = 16, int64_t steps = 200) {
  auto control = std::make_shared<PerturbedOptimal>(p, shift);
  SocLossOptions so;
  so.batch_size = 512;
  so.num_steps = steps;
  L loss(p, control, so);
  Generator gen = make_generator(8);
  std::vector<Tensor> grads;
  GradientStats g;
  for (int r = 0; r < batches; ++r) {
    Tensor theta = control->parameters()[0];
    theta.mutable_grad() = Tensor();
    const LossOutput out = loss.compute(gen);
    out.loss.backward();
    g.loss += out.loss.item<double>() / batches;
    grads.push_back(theta.grad().clone());
  }
  const Tensor all = at::stack(grads);
  g.mean = all.mean(0);
  g.se = all.std(0) / std::sqrt(static_cast<double>(batches));
  return g;
}

template <class L>
double gradient_z(const ProblemPtr& p, double shift, double* norm = nullptr, double* loss_value = nullptr) {
  const GradientStats g = gradient_stats<L>(p, shift);
  if (norm) *norm = g.mean.norm().item<double>();
  if (loss_value) *loss_value = g.loss;
  return g.z();
}

// Regression-type losses: at u* the expected gradient vanishes (|G| within 3 standard errors, up to
// the O(h) bias); at u* + 0.3 x it is at least min_z_off standard errors from zero.
template <class L>
void expect_fixed_point_at_the_optimal_control(const char* label, double min_z_off) {
  const ProblemPtr p = quadratic_ou_easy(4, 0);
  const double z_opt = gradient_z<L>(p, 0.0), z_off = gradient_z<L>(p, 0.3);
  std::printf("[ %s ] |grad| / se: at u* %.2f, at u* + 0.3 x %.1f\n", label, z_opt, z_off);
  EXPECT_LT(z_opt, 3.0);
  EXPECT_GT(z_off, min_z_off);
}

TEST(SocAdjointMatching, OptimalControlIsAFixedPoint) {
  expect_fixed_point_at_the_optimal_control<AdjointMatchingSoc>("adjoint matching", 20.0);
}

TEST(SocCrossEntropy, OptimalControlIsAFixedPoint) {
  expect_fixed_point_at_the_optimal_control<CrossEntropySoc>("cross-entropy", 10.0);
}

// Losses that are 0 at u* (Y = -V(x0) on every path there): the loss and its gradient must be over
// 20x smaller at u* (only the time step keeps them off zero) than at u* + 0.3 x.
template <class L>
void expect_vanishes_at_the_optimal_control(const char* label) {
  const ProblemPtr p = quadratic_ou_easy(4, 0);
  double g_opt = 0, g_off = 0, l_opt = 0, l_off = 0;
  gradient_z<L>(p, 0.0, &g_opt, &l_opt);
  gradient_z<L>(p, 0.3, &g_off, &l_off);
  std::printf("[ %s ] loss: at u* %.3g, at u* + 0.3 x %.3g; |grad|: %.3g, %.3g\n", label, l_opt, l_off, g_opt, g_off);
  EXPECT_LT(l_opt, 0.05 * l_off);
  EXPECT_LT(g_opt, 0.05 * g_off);
}

TEST(SocLogVariance, VanishesAtTheOptimalControl) { expect_vanishes_at_the_optimal_control<LogVarianceSoc>("log-variance"); }

TEST(SocAdjointMatching, LearnsTheOptimalControlOfQuadraticOUEasy) {
  const ProblemPtr p = quadratic_ou_easy();
  auto control = std::make_shared<ControlNetwork>(p->dim(), p->horizon(), std::vector<int64_t>{128, 128}, 1);
  SocLossOptions so;
  so.batch_size = 128;
  AdjointMatchingSoc loss(p, control, so);
  const auto error_now = [&] {
    Generator gen = make_generator(77);
    at::NoGradGuard no_grad;
    const ControlledPaths paths = simulate(*p, control->as_control(), 2048, 0, gen);
    return control_l2_error(*p, paths, control->as_control());
  };
  const double initial = error_now();
  TrainerOptions to;
  to.iterations = 600;
  to.adam = {3e-3, 0.9, 0.999, 1e-8, 0.0};
  to.lr_schedule = LrSchedule::cosine;
  to.grad_clip = 0;
  to.seed = 3;
  to.progress = false;
  Trainer(loss, to).run();
  const double final_error = error_now();
  std::printf("[ quadratic OU easy ] control L2 error %.4g -> %.4g (%.0fx)\n", initial, final_error, initial / final_error);
  EXPECT_LT(final_error, initial / 100);
}

TEST(SocVariance, VanishesAtTheOptimalControl) { expect_vanishes_at_the_optimal_control<VarianceSoc>("variance"); }

TEST(SocMoment, VanishesAtTheOptimalControlWithY0EqualToTheValue) {
  // (Y + y0)^2 with Y = -V(x0) on every path at u*: zero at y0 = V(x0), and y0's gradient points to it.
  const ProblemPtr p = quadratic_ou_easy(4, 0);
  Generator gen = make_generator(12);
  const double V = p->value(p->initial_state(1, gen), 0.0).item<double>();
  SocLossOptions so;
  so.batch_size = 512;
  so.num_steps = 200;
  const auto moment = [&](double shift, double y0) {
    MomentSoc loss(p, std::make_shared<PerturbedOptimal>(p, shift), so, y0);
    const LossOutput out = loss.compute(gen);
    out.loss.backward();
    return std::make_pair(out.loss.item<double>(), loss.parameters().back().grad().item<double>());
  };
  const auto [at_opt, dy_opt] = moment(0.0, V);
  const auto [off, dy_off] = moment(0.3, V);
  const auto [low_y0, dy_low] = moment(0.0, V - 1.0);
  std::printf("[ moment ] loss at u*, y0 = V: %.3g; at u* + 0.3 x: %.3g; at u*, y0 = V - 1: %.3g (d/dy0 %.3g)\n", at_opt,
              off, low_y0, dy_low);
  EXPECT_LT(at_opt, 0.05 * off);
  EXPECT_NEAR(low_y0, 1.0, 0.1);  // (Y + V - 1)^2 = 1
  EXPECT_NEAR(dy_low, -2.0, 0.2);
  EXPECT_NEAR(dy_opt, 0.0, 0.1);
}

TEST(SocReinforce, ExpectedGradientEqualsTheDiscreteAdjoints) {
  // Both estimate grad J of the discretised problem (score function vs pathwise): their means over
  // independent batches must agree, at a control where that gradient is far from zero.
  const ProblemPtr p = quadratic_ou_easy(4, 0);
  const GradientStats reinforce = gradient_stats<ReinforceSoc>(p, 0.3, 32, 50);
  const GradientStats pathwise = gradient_stats<DiscreteAdjointSoc>(p, 0.3, 32, 50);
  const double gap = (reinforce.mean - pathwise.mean).norm().item<double>();
  const double se = (reinforce.se.pow(2) + pathwise.se.pow(2)).sum().sqrt().item<double>();
  std::printf("[ reinforce ] |grad| %.3f (pathwise %.3f), gap %.3f, se %.3f\n", reinforce.mean.norm().item<double>(),
              pathwise.mean.norm().item<double>(), gap, se);
  EXPECT_GT(pathwise.mean.norm().item<double>(), 5 * se);  // the comparison has power
  EXPECT_LT(gap, 4 * se);
}

TEST(SocDiscreteAdjoint, GradientMatchesFiniteDifferencesOfTheObjective) {
  // With the noise fixed (same generator seed), the sampled objective is a smooth function of the
  // parameters: its backpropagated gradient must match central differences along a random direction.
  const ProblemPtr p = quadratic_ou_hard(3, 0);
  auto control = std::make_shared<ControlNetwork>(3, 1.0, std::vector<int64_t>{16}, 5, /*zero_output=*/false);
  SocLossOptions so;
  so.batch_size = 64;
  so.num_steps = 20;
  DiscreteAdjointSoc loss(p, control, so);
  const auto objective = [&] {
    Generator g = make_generator(9);
    return loss.compute(g).loss;
  };
  const std::vector<Tensor> params = control->parameters();
  for (const Tensor& q : params) q.mutable_grad() = Tensor();
  objective().backward();
  Generator gen = make_generator(10);
  std::vector<Tensor> dir;
  double directional = 0;
  for (const Tensor& q : params) {
    dir.push_back(at::randn(q.sizes(), gen, q.options()));
    directional += (q.grad().to(at::kDouble) * dir.back().to(at::kDouble)).sum().item<double>();
  }
  const double eps = 1e-3;
  const auto shifted = [&](double s) {
    at::NoGradGuard no_grad;
    for (size_t i = 0; i < params.size(); ++i) params[i].add_(dir[i], s);
    const double v = objective().item<double>();
    for (size_t i = 0; i < params.size(); ++i) params[i].add_(dir[i], -s);
    return v;
  };
  const double fd = (shifted(eps) - shifted(-eps)) / (2 * eps);
  EXPECT_NEAR(fd, directional, 1e-2 * std::abs(directional) + 1e-3) << "fd " << fd << " vs backprop " << directional;
}

}  // namespace
}  // namespace tilt::soc
