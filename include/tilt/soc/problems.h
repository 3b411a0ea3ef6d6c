// The SOC benchmark problems with exact optimal controls (SOCM, Domingo-Enrich et al. 2024;
// parameters in mission-anchors section 2.2). Each owns its ground truth.
#pragma once

#include "tilt/soc/problem.h"

#include <vector>

namespace tilt::soc {

/// Linear dynamics, quadratic costs: b = A x, f = x^T P x, g = x^T Q x, fixed X_0 = x0.
/// Ground truth from the Riccati equation (spec section 5)
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
  Tensor sigma() const override { return sigma_; }
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
  LinearOU(std::string name, Tensor A, Tensor sigma, Tensor omega, double T, int64_t steps);

  std::string name() const override { return name_; }
  int64_t dim() const override { return A_.size(0); }
  double horizon() const override { return T_; }
  int64_t default_steps() const override { return steps_; }
  Tensor drift(const Tensor& x, double t) const override;
  Tensor drift_vjp(const Tensor& x, double t, const Tensor& a) const override;
  Tensor sigma() const override { return sigma_; }
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
  Tensor A_, sigma_, omega_;
  double T_;
  int64_t steps_;
};

/// SOCM's settings (mission-anchors section 2.2). The random draws (x0 ~ 0.5 N(0, I) for the
/// quadratic problems, xi_ij ~ 0.1 N(0, 1) for the linear one) come from tilt's own generator with
/// `seed`, so they are not SOCM's numbers, only its distribution.
std::shared_ptr<QuadraticOU> quadratic_ou_easy(int64_t d = 20, uint64_t seed = 0);  // A = 0.2 I, P = 0.2 I, Q = 0.1 I
std::shared_ptr<QuadraticOU> quadratic_ou_hard(int64_t d = 20, uint64_t seed = 0);  // A = I, P = I, Q = 0.5 I
std::shared_ptr<LinearOU> linear_ou(int64_t d = 10, uint64_t seed = 0);             // A = -I + xi, sigma = I + xi

/// One of "quadratic_ou_easy", "quadratic_ou_hard", "linear_ou" with its default dimension; throws
/// tilt::Error listing the names otherwise.
ProblemPtr make_problem(const std::string& name, uint64_t seed = 0);

}  // namespace tilt::soc
