// The SOC benchmark problems with exact optimal controls (SOCM, Domingo-Enrich et al. 2024;
// parameters: docs/equations.md, E46). Each owns its ground truth.
#pragma once

#include "tilt/soc/problem.h"

#include <map>
#include <vector>

namespace tilt::soc {

/// Linear dynamics, quadratic costs: b = A x, f = x^T P x, g = x^T Q x, fixed X_0 = x0.
/// Ground truth from the Riccati equation (docs/equations.md, E43)
///   dF/dt = -A^T F - F A + 2 F sigma sigma^T F - P,  F(T) = Q,
/// with V(x,t) = x^T F(t) x + c(t), c(t) = integral_t^T tr(sigma sigma^T F(s)) ds, u* = -2 sigma^T F(t) x.
/// F is integrated backwards by RK4 on a grid of `riccati_steps` (far finer than any simulation
/// grid; the SOCM code uses explicit Euler on the simulation grid) and interpolated linearly in t.
class QuadraticOU : public Problem {
 public:
  QuadraticOU(std::string name, Tensor A, Tensor P, Tensor Q, Tensor sigma, Tensor x0, double T, int64_t steps,
              int64_t riccati_steps = 1000);

  std::string name() const override { return name_; }
  int64_t dim() const override { return A_.size(0); }
  double horizon() const override { return T_; }
  int64_t default_steps() const override { return steps_; }
  Tensor drift(const Tensor& x, double t) const override;
  Tensor drift_vjp(const Tensor& x, double t, const Tensor& a) const override;
  Tensor sigma(double) const override { return sigma_; }
  Tensor state_cost(const Tensor& x, double t) const override;
  Tensor state_cost_grad(const Tensor& x, double t) const override;
  Tensor terminal_cost(const Tensor& x) const override;
  Tensor terminal_cost_grad(const Tensor& x) const override;
  Tensor initial_state(int64_t batch, Generator& gen) const override;

  bool has_ground_truth() const override { return true; }
  Tensor optimal_control(const Tensor& x, double t) const override;
  Tensor value(const Tensor& x, double t) const override;
  /// F(t) [d, d] and c(t) of the Riccati solution.
  Tensor riccati(double t) const;
  double value_offset(double t) const;

 private:
  std::string name_;
  Tensor A_, P_, Q_, sigma_, x0_;
  double T_;
  int64_t steps_;
  std::vector<Tensor> F_;     // F at t_j = j T / riccati_steps
  std::vector<double> c_;     // c at the same times
};

/// Linear dynamics, linear terminal cost: b = A x, f = 0, g = <omega, x>, X_0 = 0.
/// Ground truth: beta(t) = exp((T - t) A^T) omega, V(x,t) = beta(t) . x + c(t) with
/// c(t) = -1/2 integral_t^T |sigma^T beta(s)|^2 ds, and u*(t) = -sigma^T beta(t), the same for every x.
class LinearOU : public Problem {
 public:
  /// x0: the fixed initial state; undefined means 0 (SOCM's).
  LinearOU(std::string name, Tensor A, Tensor sigma, Tensor omega, double T, int64_t steps, Tensor x0 = Tensor());

  std::string name() const override { return name_; }
  int64_t dim() const override { return A_.size(0); }
  double horizon() const override { return T_; }
  int64_t default_steps() const override { return steps_; }
  Tensor drift(const Tensor& x, double t) const override;
  Tensor drift_vjp(const Tensor& x, double t, const Tensor& a) const override;
  Tensor sigma(double) const override { return sigma_; }
  Tensor state_cost(const Tensor& x, double t) const override;
  Tensor state_cost_grad(const Tensor& x, double t) const override;
  Tensor terminal_cost(const Tensor& x) const override;
  Tensor terminal_cost_grad(const Tensor& x) const override;
  Tensor initial_state(int64_t batch, Generator& gen) const override;

  bool has_ground_truth() const override { return true; }
  Tensor optimal_control(const Tensor& x, double t) const override;
  Tensor value(const Tensor& x, double t) const override;

 private:
  std::string name_;
  Tensor A_, sigma_, omega_, x0_;
  double T_;
  int64_t steps_;
};

/// Double well (SOCM; docs/equations.md, E45-E46): U(x) = sum_i kappa_i (x_i^2 - 1)^2, b = -grad U,
/// sigma = I, f = 0, g(x) = sum_i nu_i (x_i^2 - 1)^2, fixed X_0 = x0.
///
/// Ground truth (docs/equations.md, E45): b, f and g separate by coordinate, so
/// psi = exp(-V) = prod_i psi_i with psi_i(x, t) = E[exp(-nu_i (X_T^2 - 1)^2) | X_t = x] for the 1-D
/// diffusion dX = -U_i'(X) dt + dB (Feynman-Kac), the solution of the backward Kolmogorov equation
///   d psi_i/dt + b_i(x) d psi_i/dx + 1/2 d^2 psi_i/dx^2 = 0,   psi_i(x, T) = exp(-nu_i (x^2 - 1)^2).
/// V = sum_i V_i with V_i = -log psi_i, and u*_i = -dV_i/dx_i (sigma = I).
///
/// Each distinct (kappa_i, nu_i) is solved once, by finite differences on [-L, L] (SOCM: L = 2.75):
/// the symmetric ("square-root approximation") generator of the reversible diffusion,
///   (G psi)_j = (1 / (2 dx^2)) [ e^{-(U_{j+1} - U_j)} (psi_{j+1} - psi_j) + e^{-(U_{j-1} - U_j)} (psi_{j-1} - psi_j) ],
/// which is (1/2) psi'' - U' psi' + O(dx^2) and has reflecting (Neumann) ends; Crank-Nicolson in
/// time (the first step as two implicit-Euler half steps, to damp the stiff modes) with a tridiagonal
/// solve. V_i and dV_i/dx (central differences of V_i) are stored on the x grid at `stored_times` + 1
/// equally spaced times and interpolated linearly in x and t; x outside [-L, L] is clamped to it.
struct DoubleWellGrid {
  double half_width = 2.75;    ///< L
  double dx = 0.0025;
  int64_t time_steps = 2000;   ///< Crank-Nicolson steps on [0, T]
  int64_t stored_times = 200;  ///< the tables' time resolution; must divide time_steps
};

class DoubleWell : public Problem {
 public:
  DoubleWell(std::string name, std::vector<double> kappa, std::vector<double> nu, Tensor x0, double T, int64_t steps,
             const DoubleWellGrid& grid = {});

  std::string name() const override { return name_; }
  int64_t dim() const override { return static_cast<int64_t>(kappa_.size()); }
  double horizon() const override { return T_; }
  int64_t default_steps() const override { return steps_; }
  Tensor drift(const Tensor& x, double t) const override;
  Tensor drift_vjp(const Tensor& x, double t, const Tensor& a) const override;
  Tensor sigma(double t) const override;
  Tensor state_cost(const Tensor& x, double t) const override;
  Tensor state_cost_grad(const Tensor& x, double t) const override;
  Tensor terminal_cost(const Tensor& x) const override;
  Tensor terminal_cost_grad(const Tensor& x) const override;
  Tensor initial_state(int64_t batch, Generator& gen) const override;

  bool has_ground_truth() const override { return true; }
  Tensor optimal_control(const Tensor& x, double t) const override;
  Tensor value(const Tensor& x, double t) const override;

 private:
  /// Per coordinate, V_i(x_i, t) (derivative = false) or dV_i/dx_i (true), interpolated: [B, d].
  Tensor lookup(const Tensor& x, double t, bool derivative) const;

  std::string name_;
  std::vector<double> kappa_, nu_;
  Tensor kappa_t_, nu_t_, x0_;
  double T_;
  int64_t steps_;
  DoubleWellGrid grid_;
  int64_t nodes_ = 0;
  Tensor V_, dV_;      // [tables, stored_times + 1, nodes]
  Tensor table_of_;    // [d] long: the table of coordinate i
};

/// Molecular dynamics (SOCM; docs/equations.md, E30, E46): 1-D, b = -d/dx kappa (x^2 - 1)^2, sigma = 1,
/// f = 1 (a time cost), g = 0, X_0 = -1, T = 1, 150 steps, stopped when X > 0 (Phi(x) = -x < 0): the
/// control pays 1/2 |u|^2 to push the particle over the barrier at 0 sooner. No known optimal control:
/// report the control objective E[tau ^ T + integral_0^{tau ^ T} 1/2 |u|^2 dt].
class MolecularDynamics : public Problem {
 public:
  MolecularDynamics(double kappa = 1.0, double x0 = -1.0, double T = 1.0, int64_t steps = 150);

  std::string name() const override { return "molecular_dynamics"; }
  int64_t dim() const override { return 1; }
  double horizon() const override { return T_; }
  int64_t default_steps() const override { return steps_; }
  Tensor drift(const Tensor& x, double t) const override;
  Tensor drift_vjp(const Tensor& x, double t, const Tensor& a) const override;
  Tensor sigma(double t) const override;
  Tensor state_cost(const Tensor& x, double t) const override;
  Tensor state_cost_grad(const Tensor& x, double t) const override;
  Tensor terminal_cost(const Tensor& x) const override;
  Tensor terminal_cost_grad(const Tensor& x) const override;
  Tensor initial_state(int64_t batch, Generator& gen) const override;
  bool has_stopping_time() const override { return true; }
  Tensor stopped(const Tensor& x) const override;

 private:
  double kappa_, x0_, T_;
  int64_t steps_;
};

/// SOCM's settings (docs/equations.md, E46). The random draws (x0 ~ 0.5 N(0, I) for the
/// quadratic problems, xi_ij ~ 0.1 N(0, 1) for the linear one) come from tilt's own generator with
/// `seed`, so they are not SOCM's numbers, only its distribution.
std::shared_ptr<QuadraticOU> quadratic_ou_easy(int64_t d = 20, uint64_t seed = 0);  // A = 0.2 I, P = 0.2 I, Q = 0.1 I
std::shared_ptr<QuadraticOU> quadratic_ou_hard(int64_t d = 20, uint64_t seed = 0);  // A = I, P = I, Q = 0.5 I
std::shared_ptr<LinearOU> linear_ou(int64_t d = 10, uint64_t seed = 0);             // A = -I + xi, sigma = I + xi
/// kappa_i = 5, nu_i = 3 for the first 3 coordinates, 1 and 1 for the rest; X_0 = 0, T = 1, 200 steps.
std::shared_ptr<DoubleWell> double_well(int64_t d = 10, const DoubleWellGrid& grid = {});

/// One of problem_names() with its default dimension; throws tilt::Error listing the names otherwise.
ProblemPtr make_problem(const std::string& name, uint64_t seed = 0);

/// One parameter of a benchmark problem as a config gives it: a number, a vector or a matrix (row-major).
struct ProblemParam {
  std::vector<double> data;
  std::vector<int64_t> shape;  ///< {}: a number; {n}: a vector; {rows, cols}: a matrix
};

/// A benchmark problem with its instance and parameters (docs/soc.md, "Instances").
/// `instance` says how the random parameters not given in `params` are drawn from `seed`:
///  - "tilt": tilt's generator in double precision (make_problem(name, seed); tilt's numbers);
///  - "socm": as SOC-matching draws them after torch.manual_seed(seed), the first draws of a CPU
///    generator in float32 (x0 = 0.5 N(0, I) for the quadratic problems, [0.4, 0.6] when d = 2;
///    xi = 0.1 N(0, 1) for linear OU, A = -I + xi and sigma = I + xi formed in float32), which is the
///    paper's instance for its seed (seed 0: |x0|^2 = 6.026, V(x0, 0) = 5.82 on quadratic OU easy).
/// `params` overrides any parameter by name (problem_param_names(name)): a matrix may be given as a
/// number s (s I), a vector as a number s (s in every entry). Throws tilt::Error naming the parameter
/// for an unknown name, a wrong size or a bad value.
struct ProblemSpec {
  std::string name = "quadratic_ou_easy";
  std::string instance = "tilt";
  uint64_t seed = 0;
  std::map<std::string, ProblemParam> params;
};
ProblemPtr make_problem(const ProblemSpec& spec);
/// The parameters a problem takes: quadratic OU: dim, x0, A, P, Q, sigma, T; linear OU: dim, x0, A,
/// sigma, omega, T; double well: dim, x0, kappa, nu, T; molecular dynamics: x0, kappa, T.
const std::vector<std::string>& problem_param_names(const std::string& problem);
/// tilt, socm.
const std::vector<std::string>& instance_names();
/// quadratic_ou_easy, quadratic_ou_hard, linear_ou, double_well, molecular_dynamics.
const std::vector<std::string>& problem_names();

}  // namespace tilt::soc
