// The SOC-matching paper's instances (instance = "socm"), the problems' parameters by name, and SOC-matching's
// published control L2 error beside tilt's (docs/soc.md, "Instances" and "Metrics").
//
// The expected numbers of the "socm" instances come from scripts/socm_instances.py, which repeats
// SOC-matching's own draws in PyTorch (torch.manual_seed(0), then 0.5 * torch.randn(20) for the quadratic
// problems' x0, 0.1 * torch.randn(10, 10) for linear OU's xi, in float32 on the CPU) and computes V(x0, 0)
// independently of tilt (a scalar Riccati equation by RK4 on 100 000 steps; a matrix exponential and
// Simpson's rule on 4000 intervals). Run `python3 scripts/socm_instances.py 0` to regenerate them.
#include "tilt/core/error.h"
#include "tilt/soc/problems.h"
#include "tilt/soc/simulate.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>
#include <string>

namespace tilt::soc {
namespace {

const auto kDouble = at::TensorOptions().dtype(at::kDouble);

Tensor x0_of(const Problem& p) {
  Generator gen = make_generator(0);
  return p.initial_state(1, gen).squeeze(0);
}

double value_at_x0(const Problem& p) {
  Generator gen = make_generator(0);
  return p.value(p.initial_state(1, gen), 0.0).item<double>();
}

ProblemSpec socm(const std::string& name, uint64_t seed = 0) {
  ProblemSpec s;
  s.name = name;
  s.instance = "socm";
  s.seed = seed;
  return s;
}

TEST(SocInstances, SocmQuadraticOuIsThePapersSeedZeroInstance) {
  // scripts/socm_instances.py 0: x0 (float32 values, exact as doubles), |x0|^2 and V(x0, 0).
  const ProblemPtr easy = make_problem(socm("quadratic_ou_easy"));
  const Tensor x0 = x0_of(*easy);
  ASSERT_EQ(x0.size(0), 20);
  EXPECT_DOUBLE_EQ(x0[0].item<double>(), -0.5629199147224426);
  EXPECT_DOUBLE_EQ(x0[7].item<double>(), 0.92650306224823);
  EXPECT_DOUBLE_EQ(x0[18].item<double>(), 1.0024902820587158);
  EXPECT_DOUBLE_EQ(x0[19].item<double>(), 0.02686845138669014);
  EXPECT_NEAR(x0.pow(2).sum().item<double>(), 6.0257018928, 1e-9);
  EXPECT_NEAR(value_at_x0(*easy), 5.8182248133, 1e-7);  // the 5.82
  const ProblemPtr hard = make_problem(socm("quadratic_ou_hard"));
  EXPECT_TRUE(at::equal(x0_of(*hard), x0));
  EXPECT_NEAR(value_at_x0(*hard), 28.6117414270, 1e-6);
  // SOC-matching's 2-D instance has a fixed x0.
  ProblemSpec two = socm("quadratic_ou_easy");
  two.params["dim"] = {{2.0}, {}};
  const Tensor x2 = x0_of(*make_problem(two));
  EXPECT_DOUBLE_EQ(x2[0].item<double>(), static_cast<double>(0.4f));
  EXPECT_DOUBLE_EQ(x2[1].item<double>(), static_cast<double>(0.6f));
}

TEST(SocInstances, SocmLinearOuIsThePapersSeedZeroInstance) {
  const ProblemPtr p = make_problem(socm("linear_ou"));
  ASSERT_EQ(p->dim(), 10);
  const Tensor A = p->drift(at::eye(10, kDouble), 0.0).t();  // drift(x) = x A^T
  const Tensor sigma = p->sigma(0.0);
  EXPECT_NEAR(A[0][0].item<double>(), -1.1125839949, 1e-9);
  EXPECT_NEAR(sigma[0][0].item<double>(), 0.8874160051, 1e-9);
  EXPECT_NEAR(sigma[9][9].item<double>(), 1.0232918262, 1e-9);
  EXPECT_NEAR(sigma[0][7].item<double>(), -0.2115219384431839, 1e-9);  // xi[0][7]
  EXPECT_NEAR(A.sum().item<double>(), -9.6285886875, 1e-8);
  EXPECT_NEAR(sigma.sum().item<double>(), 10.3714112529, 1e-8);
  EXPECT_NEAR(value_at_x0(*p), -2.8563012998, 1e-7);
}

TEST(SocInstances, TiltInstanceIsUnchanged) {
  // The default instance is tilt's draw (|x0|^2 = 4.56, V = 5.39 at seed 0), the one make_problem(name, seed) gives.
  ProblemSpec spec;
  spec.seed = 3;
  EXPECT_TRUE(at::equal(x0_of(*make_problem(spec)), x0_of(*quadratic_ou_easy(20, 3))));
  spec.seed = 0;
  const ProblemPtr p = make_problem(spec);
  EXPECT_NEAR(x0_of(*p).pow(2).sum().item<double>(), 4.56, 0.005);
  EXPECT_NEAR(value_at_x0(*p), 5.39, 0.005);
  spec.name = "linear_ou";
  spec.seed = 2;
  EXPECT_TRUE(at::equal(make_problem(spec)->sigma(0), linear_ou(10, 2)->sigma(0)));
}

TEST(SocInstances, ParametersByName) {
  ProblemSpec s;
  s.params["dim"] = {{3.0}, {}};
  s.params["x0"] = {{1.0, -2.0, 0.5}, {3}};
  s.params["P"] = {{0.0}, {}};
  s.params["A"] = {{0.5}, {}};
  s.params["Q"] = {{0.25}, {}};
  const ProblemPtr p = make_problem(s);
  EXPECT_TRUE(at::equal(x0_of(*p), at::tensor({1.0, -2.0, 0.5}, kDouble)));
  // SOCM-dq's "no state cost" instance (A = 0.5 I, P = 0, Q = 0.25 I): F solves a Bernoulli equation,
  // 1/F(t) = e^{-2 a tau} / q + (1 / a)(1 - e^{-2 a tau}), tau = T - t, and V = F(0) |x0|^2 + c(0).
  const double e = std::exp(-1.0), F0 = 1.0 / (e / 0.25 + 2.0 * (1.0 - e));
  EXPECT_NEAR(std::dynamic_pointer_cast<const QuadraticOU>(p)->riccati(0.0)[0][0].item<double>(), F0, 1e-9);
  // Double well: kappa, nu and x0 as numbers or vectors.
  ProblemSpec w;
  w.name = "double_well";
  w.params["dim"] = {{2.0}, {}};
  w.params["kappa"] = {{1.0}, {}};
  w.params["x0"] = {{-1.0, 1.0}, {2}};
  EXPECT_TRUE(at::equal(x0_of(*make_problem(w)), at::tensor({-1.0, 1.0}, kDouble)));
  ProblemSpec m;
  m.name = "molecular_dynamics";
  m.params["x0"] = {{-0.5}, {}};
  EXPECT_DOUBLE_EQ(x0_of(*make_problem(m)).item<double>(), -0.5);
}

void expect_error_naming(const ProblemSpec& spec, const std::string& needle) {
  try {
    make_problem(spec);
    FAIL() << "expected an error containing " << needle;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(SocInstances, BadParametersAreRefusedByName) {
  ProblemSpec s;
  s.params["x0"] = {{1.0, 2.0}, {2}};
  expect_error_naming(s, "'x0' must be a number or a vector of 20 numbers");
  s.params = {{"A", {{1.0, 2.0, 3.0, 4.0}, {2, 2}}}};
  expect_error_naming(s, "'A' must be a number (a multiple of I) or a 20 x 20 matrix");
  s.params = {{"P", {{1.0, 2.0, 0.0, 1.0}, {2, 2}}}, {"dim", {{2.0}, {}}}};
  expect_error_naming(s, "'P' must be symmetric");
  s.params = {{"sigma", {{0.0}, {}}}};
  expect_error_naming(s, "'sigma' must be invertible");
  s.params = {{"T", {{-1.0}, {}}}};
  expect_error_naming(s, "'T' must be > 0");
  s.params = {{"dim", {{2.5}, {}}}};
  expect_error_naming(s, "'dim' must be an integer");
  s.params = {{"omega", {{1.0}, {}}}};
  expect_error_naming(s, "'omega' is not a parameter of this problem (valid: dim, x0, A, P, Q, sigma, T)");
  s.params = {{"x0", {{NAN}, {}}}};
  expect_error_naming(s, "'x0' must be finite");
  s.params = {};
  s.instance = "paper";
  expect_error_naming(s, "unknown SOC instance 'paper' (valid: tilt, socm)");
  ProblemSpec w;
  w.name = "double_well";
  w.params["x0"] = {{3.0}, {}};
  expect_error_naming(w, "'x0' must lie in [-2.75, 2.75]");
  w.params = {{"nu", {{-1.0}, {}}}};
  expect_error_naming(w, "'nu' must be >= 0");
}

// u = u* + c t on linear OU, whose u* does not depend on x: |u - u*|^2 = |c|^2 t^2 on every path, so
// tilt's error is |c|^2 (1/K) sum_{k<K} t_k^2 exactly (its weights sum to 1), and SOC-matching's, with
// the normaliser Z = the batch's own mean weight, |c|^2 (1/(K+1)) sum_{k<=K} t_k^2 exactly.
TEST(SocMetric, BothDefinitionsInClosedFormOnAnOffsetControl) {
  const ProblemPtr p = linear_ou(4, 1);
  const Tensor c = at::tensor({0.3, -0.2, 0.1, 0.5}, kDouble);
  const double c2 = c.pow(2).sum().item<double>();
  const Control u = [&](const Tensor& x, double t) { return p->optimal_control(x, t) + t * c.unsqueeze(0); };
  const int64_t K = 20;
  Generator gen = make_generator(5);
  const ControlledPaths paths = simulate(*p, u, 256, K, gen);
  double sum_before_T = 0;
  for (int64_t k = 0; k < K; ++k) sum_before_T += std::pow(static_cast<double>(k) / K, 2);
  const double sum_with_T = sum_before_T + 1.0;
  EXPECT_NEAR(control_l2_error(*p, paths, u), c2 * sum_before_T / K, 1e-12);
  const Tensor log_w = socm_log_importance_weights(*p, paths);
  const double log_batch_mean = (at::logsumexp(log_w, 0) - std::log(256.0)).item<double>();
  EXPECT_NEAR(socm_control_l2_error(*p, paths, u, log_batch_mean), c2 * sum_with_T / (K + 1), 1e-12);
  // The two differ here by the time points alone: 0.1325 |c|^2 against 0.1786 |c|^2 at K = 20.
}

// SOC-matching's weights take the running cost at the post-step state: with a time-independent f the two
// log weights differ by h (f(X_0) - f(X_K)) on every path (the sum telescopes).
TEST(SocMetric, SocmWeightsTakeTheRunningCostAfterTheStep) {
  const ProblemPtr p = quadratic_ou_easy(4, 0);
  Generator gen = make_generator(2);
  const int64_t K = 10;
  const ControlledPaths paths = simulate(*p, zero_control(4), 64, K, gen);
  const double h = 1.0 / K;
  const Tensor expected = h * (p->state_cost(paths.x.front(), 0.0) - p->state_cost(paths.x.back(), 1.0));
  EXPECT_TRUE(at::allclose(socm_log_importance_weights(*p, paths) - log_importance_weights(paths), expected, 0, 1e-12));
}

// E[w] = E_{P^0}[exp(-omega . X_K)] on linear OU (f = 0): X_K under Euler-Maruyama from 0 without control is
// N(0, S_K), S_{k+1} = M S_k M^T + h sigma sigma^T with M = I + h A, so log Z = 1/2 omega^T S_K omega.
TEST(SocMetric, NormaliserMatchesTheClosedForm) {
  const ProblemPtr p = linear_ou(4, 1);
  const int64_t K = 20;
  const double h = 1.0 / K;
  const Tensor A = p->drift(at::eye(4, kDouble), 0.0).t(), sigma = p->sigma(0.0);
  const Tensor M = at::eye(4, kDouble) + h * A;
  Tensor S = at::zeros({4, 4}, kDouble);
  for (int64_t k = 0; k < K; ++k) S = at::matmul(at::matmul(M, S), M.t()) + h * at::matmul(sigma, sigma.t());
  const Tensor omega = at::ones({4}, kDouble);
  const double log_Z = 0.5 * at::dot(omega, at::matmul(S, omega)).item<double>();
  Generator gen = make_generator(7);
  // Under u* the weights vary only by the time step (std/mean ~ 0.03 here): 8192 paths give ~4e-4.
  EXPECT_NEAR(socm_log_normaliser(*p, 8192, K, gen), log_Z, 2e-3);
}

}  // namespace
}  // namespace tilt::soc
