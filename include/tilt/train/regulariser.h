// Convex running costs psi(u) of deterministic (ODE) control, "regularisers beyond KL", and the
// gradient of their convex conjugate psi*(a) = sup_u <u, a> - psi(u), which maps a costate a to the
// optimal control u = grad psi*(a) (Pontryagin / HJB: u*(x,t) = grad psi*(grad V(x,t));
// docs/equations.md, E84 and E88, [D]).
//
// Every regulariser carries a weight mu_t > 0, interpolated linearly in time between mu_start (t = 0)
// and mu (t = 1) ("a time-dependent weight, stronger regularisation early"); constant by default.
//
//   quadratic   psi = (mu/2)|u|^2                        grad psi* (a) = a / mu
//   clipped     psi = (mu/2)|u|^2 + indicator(|u| <= delta)  grad psi* (a) = a / mu, norm-clipped at delta
//   pnorm       psi = (mu/p)|u|^p, p > 1                 grad psi* (a) = (|a|/mu)^{1/(p-1)} a / |a|
//
// The quadratic one with mu = 1 is the deterministic analogue of Adjoint Matching's KL term (for the
// memoryless SDE, E int |u|^2 / 2 dt IS KL(P^u | P)); for the ODE it is a transport cost and its
// optimum is NOT p_base exp(lambda r) (docs/ode_adjoint_matching.md).
#pragma once

#include "tilt/core/tensor.h"

#include <memory>
#include <string>

namespace tilt {

class Regulariser {
 public:
  /// mu: the weight at t = 1; mu_start: at t = 0 (<= 0: the same as mu). Throws tilt::Error unless both
  /// are positive and finite.
  Regulariser(double mu, double mu_start);
  virtual ~Regulariser() = default;

  virtual std::string name() const = 0;
  /// e.g. "pnorm(p=1.5, mu=1)".
  virtual std::string describe() const = 0;
  /// psi_t(u) for u [B, d], shape [B]. The clipped one returns its finite part (mu/2)|u|^2 (the
  /// indicator is +inf outside the ball; a fitted control may leave it by its fitting error).
  virtual Tensor psi(const Tensor& u, double t) const = 0;
  /// grad psi_t(u), [B, d] (inside the ball for the clipped one).
  virtual Tensor grad_psi(const Tensor& u, double t) const = 0;
  /// psi*_t(a), [B].
  virtual Tensor conjugate(const Tensor& a, double t) const = 0;
  /// grad psi*_t(a), [B, d]: the regression target for the costate a.
  virtual Tensor grad_conjugate(const Tensor& a, double t) const = 0;

  /// mu_t = (1 - t) mu_start + t mu.
  double weight(double t) const { return (1.0 - t) * mu_start_ + t * mu_; }
  double mu() const { return mu_; }
  double mu_start() const { return mu_start_; }

 protected:
  std::string weight_string() const;  // "mu=1" or "mu=0.5..1"

 private:
  double mu_, mu_start_;
};

using RegulariserPtr = std::shared_ptr<const Regulariser>;

RegulariserPtr make_quadratic_regulariser(double mu = 1.0, double mu_start = 0.0);
/// delta > 0: the largest control norm allowed.
RegulariserPtr make_clipped_regulariser(double delta, double mu = 1.0, double mu_start = 0.0);
/// p > 1.
RegulariserPtr make_pnorm_regulariser(double p, double mu = 1.0, double mu_start = 0.0);
/// By name: "quadratic" | "clipped" (needs delta) | "pnorm" (needs p).
RegulariserPtr make_regulariser(const std::string& name, double mu, double mu_start, double delta, double p);

}  // namespace tilt
