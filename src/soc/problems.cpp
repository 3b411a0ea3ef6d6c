// The linear-quadratic and linear-OU benchmark problems and their exact optimal controls.
#include "tilt/soc/problems.h"

#include "tilt/core/check.h"
#include "tilt/core/error.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

namespace tilt::soc {

namespace {

const auto kDouble = at::TensorOptions().dtype(at::kDouble);

void check_square(const Tensor& m, int64_t d, const std::string& what, const std::string& problem) {
  if (!m.defined() || m.dim() != 2 || m.size(0) != d || m.size(1) != d) {
    throw Error("SOC problem '" + problem + "': " + what + " must be a " + std::to_string(d) + " x " +
                std::to_string(d) + " matrix");
  }
}

// Row-wise quadratic form x^T M x for x [B, d].
Tensor quadratic_form(const Tensor& x, const Tensor& M) { return (at::matmul(x, M) * x).sum(1); }

// Linear interpolation in a table of values at t_j = j T / N.
template <class V, class Mix>
V interpolate(const std::vector<V>& table, double t, double T, Mix mix) {
  const int64_t N = static_cast<int64_t>(table.size()) - 1;
  const double s = std::clamp(t / T, 0.0, 1.0) * static_cast<double>(N);
  const int64_t j = std::min<int64_t>(static_cast<int64_t>(std::floor(s)), N - 1);
  return mix(table[j], table[j + 1], s - static_cast<double>(j));
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Quadratic OU

QuadraticOU::QuadraticOU(std::string name, Tensor A, Tensor P, Tensor Q, Tensor sigma, Tensor x0, double T,
                         int64_t steps, int64_t riccati_steps)
    : name_(std::move(name)), T_(T), steps_(steps) {
  if (!A.defined() || A.dim() != 2) throw Error("SOC problem '" + name_ + "': A must be a square matrix");
  const int64_t d = A.size(0);
  check_square(A, d, "A", name_);
  check_square(P, d, "P", name_);
  check_square(Q, d, "Q", name_);
  check_square(sigma, d, "sigma", name_);
  if (!x0.defined() || x0.dim() != 1 || x0.size(0) != d) {
    throw Error("SOC problem '" + name_ + "': x0 must be a vector of length " + std::to_string(d));
  }
  if (!(T > 0) || steps < 1 || riccati_steps < 1) {
    throw Error("SOC problem '" + name_ + "': needs T > 0, steps >= 1, riccati_steps >= 1");
  }
  A_ = A.to(at::kDouble);
  P_ = P.to(at::kDouble);
  Q_ = Q.to(at::kDouble);
  sigma_ = sigma.to(at::kDouble);
  x0_ = x0.to(at::kDouble);

  // Backwards in s = T - t: dF/ds = A^T F + F A - 2 F S F + P, dc/ds = tr(S F), with S = sigma sigma^T,
  // F(s = 0) = Q, c(s = 0) = 0. Classical RK4 on the pair.
  const Tensor S = at::matmul(sigma_, sigma_.t());
  const Tensor At = A_.t();
  const auto rhs = [&](const Tensor& F) { return at::matmul(At, F) + at::matmul(F, A_) - 2.0 * at::matmul(at::matmul(F, S), F) + P_; };
  const auto trace_rate = [&](const Tensor& F) { return at::trace(at::matmul(S, F)).item<double>(); };
  const double H = T / static_cast<double>(riccati_steps);
  std::vector<Tensor> by_s{Q_.clone()};
  std::vector<double> c_by_s{0.0};
  Tensor F = Q_.clone();
  double c = 0.0;
  for (int64_t j = 0; j < riccati_steps; ++j) {
    const Tensor k1 = rhs(F), k2 = rhs(F + 0.5 * H * k1), k3 = rhs(F + 0.5 * H * k2), k4 = rhs(F + H * k3);
    const double c1 = trace_rate(F), c2 = trace_rate(F + 0.5 * H * k1), c3 = trace_rate(F + 0.5 * H * k2),
                 c4 = trace_rate(F + H * k3);
    F = F + (H / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4);
    F = 0.5 * (F + F.t());  // keep it exactly symmetric
    c += (H / 6.0) * (c1 + 2.0 * c2 + 2.0 * c3 + c4);
    if (!std::isfinite(c)) throw Error("SOC problem '" + name_ + "': the Riccati solution blows up on [0, T]");
    by_s.push_back(F);
    c_by_s.push_back(c);
  }
  // Store by t = T - s, increasing.
  F_.assign(by_s.rbegin(), by_s.rend());
  c_.assign(c_by_s.rbegin(), c_by_s.rend());
}

Tensor QuadraticOU::riccati(double t) const {
  return interpolate(F_, t, T_, [](const Tensor& a, const Tensor& b, double w) { return (1.0 - w) * a + w * b; });
}

double QuadraticOU::value_offset(double t) const {
  return interpolate(c_, t, T_, [](double a, double b, double w) { return (1.0 - w) * a + w * b; });
}

Tensor QuadraticOU::drift(const Tensor& x, double) const { return at::matmul(x.to(at::kDouble), A_.t()); }
Tensor QuadraticOU::drift_vjp(const Tensor&, double, const Tensor& a) const { return at::matmul(a.to(at::kDouble), A_); }
Tensor QuadraticOU::state_cost(const Tensor& x, double) const { return quadratic_form(x.to(at::kDouble), P_); }
Tensor QuadraticOU::state_cost_grad(const Tensor& x, double) const { return at::matmul(x.to(at::kDouble), P_ + P_.t()); }
Tensor QuadraticOU::terminal_cost(const Tensor& x) const { return quadratic_form(x.to(at::kDouble), Q_); }
Tensor QuadraticOU::terminal_cost_grad(const Tensor& x) const { return at::matmul(x.to(at::kDouble), Q_ + Q_.t()); }
Tensor QuadraticOU::initial_state(int64_t batch, Generator&) const { return x0_.unsqueeze(0).expand({batch, dim()}).clone(); }

Tensor QuadraticOU::optimal_control(const Tensor& x, double t) const {
  check_batch(x, dim(), "state");
  // u* = -2 sigma^T F(t) x, row-wise: -2 x F^T sigma = -2 x F sigma (F symmetric).
  return -2.0 * at::matmul(at::matmul(x.to(at::kDouble), riccati(t)), sigma_);
}

Tensor QuadraticOU::value(const Tensor& x, double t) const {
  check_batch(x, dim(), "state");
  return quadratic_form(x.to(at::kDouble), riccati(t)) + value_offset(t);
}

// ---------------------------------------------------------------------------------------------
// Linear OU

LinearOU::LinearOU(std::string name, Tensor A, Tensor sigma, Tensor omega, double T, int64_t steps, Tensor x0)
    : name_(std::move(name)), T_(T), steps_(steps) {
  if (!A.defined() || A.dim() != 2) throw Error("SOC problem '" + name_ + "': A must be a square matrix");
  const int64_t d = A.size(0);
  check_square(A, d, "A", name_);
  check_square(sigma, d, "sigma", name_);
  if (!omega.defined() || omega.dim() != 1 || omega.size(0) != d) {
    throw Error("SOC problem '" + name_ + "': omega must be a vector of length " + std::to_string(d));
  }
  if (!(T > 0) || steps < 1) throw Error("SOC problem '" + name_ + "': needs T > 0 and steps >= 1");
  if (x0.defined() && (x0.dim() != 1 || x0.size(0) != d)) {
    throw Error("SOC problem '" + name_ + "': x0 must be a vector of length " + std::to_string(d));
  }
  A_ = A.to(at::kDouble);
  sigma_ = sigma.to(at::kDouble);
  omega_ = omega.to(at::kDouble);
  x0_ = x0.defined() ? x0.to(at::kDouble) : at::zeros({d}, kDouble);
}

Tensor LinearOU::drift(const Tensor& x, double) const { return at::matmul(x.to(at::kDouble), A_.t()); }
Tensor LinearOU::drift_vjp(const Tensor&, double, const Tensor& a) const { return at::matmul(a.to(at::kDouble), A_); }
Tensor LinearOU::state_cost(const Tensor& x, double) const { return at::zeros({x.size(0)}, kDouble); }
Tensor LinearOU::state_cost_grad(const Tensor& x, double) const { return at::zeros({x.size(0), dim()}, kDouble); }
Tensor LinearOU::terminal_cost(const Tensor& x) const { return at::matmul(x.to(at::kDouble), omega_); }
Tensor LinearOU::terminal_cost_grad(const Tensor& x) const { return omega_.unsqueeze(0).expand({x.size(0), dim()}).clone(); }
Tensor LinearOU::initial_state(int64_t batch, Generator&) const { return x0_.unsqueeze(0).expand({batch, dim()}).clone(); }

Tensor LinearOU::optimal_control(const Tensor& x, double t) const {
  check_batch(x, dim(), "state");
  // beta(t) = exp((T - t) A^T) omega; u* = -sigma^T beta, the same for every x.
  const Tensor beta = at::matmul(at::linalg_matrix_exp((T_ - t) * A_.t()), omega_);
  return (-at::matmul(sigma_.t(), beta)).unsqueeze(0).expand({x.size(0), dim()}).clone();
}

Tensor LinearOU::value(const Tensor& x, double t) const {
  check_batch(x, dim(), "state");
  // V = beta(t) . x + c(t), c(t) = -1/2 int_t^T |sigma^T beta(s)|^2 ds (composite Simpson, 2000 intervals).
  const Tensor beta = at::matmul(at::linalg_matrix_exp((T_ - t) * A_.t()), omega_);
  const int64_t n = 2000;
  const double h = (T_ - t) / static_cast<double>(n);
  double integral = 0.0;
  for (int64_t j = 0; j <= n; ++j) {
    const double s = t + static_cast<double>(j) * h;
    const Tensor b = at::matmul(at::linalg_matrix_exp((T_ - s) * A_.t()), omega_);
    const double q = at::matmul(sigma_.t(), b).pow(2).sum().item<double>();
    const double weight = (j == 0 || j == n) ? 1.0 : (j % 2 ? 4.0 : 2.0);
    integral += weight * q;
  }
  integral *= h / 3.0;
  return at::matmul(x.to(at::kDouble), beta) - 0.5 * integral;
}

// ---------------------------------------------------------------------------------------------
// SOCM's settings

namespace {
// At the constructors' entry: at::eye(-3) reached LibTorch's own error, and d = 0 made a problem with J = 0.
void check_dimension(const std::string& name, int64_t d) {
  if (d < 1) throw Error("SOC problem '" + name + "': the dimension must be >= 1, got " + std::to_string(d));
}
}  // namespace

std::shared_ptr<QuadraticOU> quadratic_ou_easy(int64_t d, uint64_t seed) {
  check_dimension("quadratic_ou_easy", d);
  Generator gen = make_generator(seed);
  const Tensor I = at::eye(d, kDouble);
  return std::make_shared<QuadraticOU>("quadratic_ou_easy", 0.2 * I, 0.2 * I, 0.1 * I, I,
                                       0.5 * at::randn({d}, gen, kDouble), 1.0, 50);
}

std::shared_ptr<QuadraticOU> quadratic_ou_hard(int64_t d, uint64_t seed) {
  check_dimension("quadratic_ou_hard", d);
  Generator gen = make_generator(seed);
  const Tensor I = at::eye(d, kDouble);
  return std::make_shared<QuadraticOU>("quadratic_ou_hard", I, I, 0.5 * I, I, 0.5 * at::randn({d}, gen, kDouble),
                                       1.0, 50);
}

std::shared_ptr<LinearOU> linear_ou(int64_t d, uint64_t seed) {
  check_dimension("linear_ou", d);
  Generator gen = make_generator(seed);
  const Tensor I = at::eye(d, kDouble);
  const Tensor xi = 0.1 * at::randn({d, d}, gen, kDouble);
  return std::make_shared<LinearOU>("linear_ou", -I + xi, I + xi, at::ones({d}, kDouble), 1.0, 100);
}

const std::vector<std::string>& problem_names() {
  static const std::vector<std::string> names{"quadratic_ou_easy", "quadratic_ou_hard", "linear_ou", "double_well",
                                              "molecular_dynamics"};
  return names;
}

ProblemPtr make_problem(const std::string& name, uint64_t seed) {
  if (name == "quadratic_ou_easy") return quadratic_ou_easy(20, seed);
  if (name == "quadratic_ou_hard") return quadratic_ou_hard(20, seed);
  if (name == "linear_ou") return linear_ou(10, seed);
  if (name == "double_well") return double_well(10);  // no random draws
  if (name == "molecular_dynamics") return std::make_shared<MolecularDynamics>();
  std::string valid;
  for (const auto& n : problem_names()) valid += (valid.empty() ? "" : ", ") + n;
  throw Error("unknown SOC problem '" + name + "' (valid: " + valid + ")");
}

// ---------------------------------------------------------------------------------------------
// Molecular dynamics

MolecularDynamics::MolecularDynamics(double kappa, double x0, double T, int64_t steps)
    : kappa_(kappa), x0_(x0), T_(T), steps_(steps) {
  if (!(kappa >= 0) || !(T > 0) || steps < 1 || !std::isfinite(x0)) {
    throw Error("SOC problem 'molecular_dynamics': needs kappa >= 0, T > 0, steps >= 1 and a finite x0");
  }
}

Tensor MolecularDynamics::drift(const Tensor& x, double) const {
  const Tensor xd = x.to(at::kDouble);
  return -4.0 * kappa_ * xd * (xd.pow(2) - 1.0);
}
Tensor MolecularDynamics::drift_vjp(const Tensor& x, double, const Tensor& a) const {
  return -4.0 * kappa_ * (3.0 * x.to(at::kDouble).pow(2) - 1.0) * a.to(at::kDouble);
}
Tensor MolecularDynamics::sigma(double) const { return at::eye(1, kDouble); }
Tensor MolecularDynamics::state_cost(const Tensor& x, double) const { return at::ones({x.size(0)}, kDouble); }
Tensor MolecularDynamics::state_cost_grad(const Tensor& x, double) const { return at::zeros({x.size(0), 1}, kDouble); }
Tensor MolecularDynamics::terminal_cost(const Tensor& x) const { return at::zeros({x.size(0)}, kDouble); }
Tensor MolecularDynamics::terminal_cost_grad(const Tensor& x) const { return at::zeros({x.size(0), 1}, kDouble); }
Tensor MolecularDynamics::initial_state(int64_t batch, Generator&) const { return at::full({batch, 1}, x0_, kDouble); }
Tensor MolecularDynamics::stopped(const Tensor& x) const { return x.select(1, 0) > 0; }  // Phi(x) = -x < 0

}  // namespace tilt::soc
