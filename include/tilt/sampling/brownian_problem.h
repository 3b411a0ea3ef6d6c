// Adjoint Sampling as a stochastic optimal control problem (docs/equations.md, E95): the Brownian base of
// sampling/brownian.h is the uncontrolled process,
//
//   dX = sigma(t) u dt + sigma(t) dB,   sigma(t) = g(t) I (g(t) P for a centre-of-mass-free system,
//                                        P the projector),   X_0 = 0,   T = 1,
//
// with no drift, no running cost (f = 0) and the terminal cost of E61 without clipping,
//   g(x) = E(x) / tau + log p_1^base(x),
// so that the optimally controlled X_1 has law pi ∝ exp(-E / tau) and J(u*) = V(0, 0) = -log Z. The SOC
// control u and Adjoint Sampling's control u_AS (drift g^2 u_AS, sampling/adjoint_sampling.h) are one
// control in two parametrisations: u = g(t) u_AS. The lean adjoint (E34) is constant in time,
// a(t) = grad g(X_1), the vector ReciprocalAdjointMatching regresses -u_AS onto (E62). For a Gaussian
// energy the value function and the optimal control are known in closed form (E95).
#pragma once

#include "tilt/sampling/brownian.h"
#include "tilt/sampling/energy.h"
#include "tilt/soc/problem.h"

namespace tilt::sampling {

class BrownianProblem : public soc::Problem {
 public:
  /// steps: the default (uniform) grid of [0, 1]. Throws tilt::Error if the dimensions differ, or if the
  /// base is centre-of-mass free exactly when the energy has no particles.
  BrownianProblem(EnergyPtr energy, double tau, BrownianBasePtr base, int64_t steps = 100);

  std::string name() const override { return "adjoint_sampling"; }
  int64_t dim() const override { return base_->dim(); }
  double horizon() const override { return 1.0; }
  int64_t default_steps() const override { return steps_; }
  /// 0, and its VJP 0.
  Tensor drift(const Tensor& x, double t) const override;
  Tensor drift_vjp(const Tensor& x, double t, const Tensor& a) const override;
  /// g(t) I, or g(t) P with particles.
  Tensor sigma(double t) const override;
  bool constant_sigma() const override;
  Tensor state_cost(const Tensor& x, double t) const override;
  Tensor state_cost_grad(const Tensor& x, double t) const override;
  /// E(x) / tau + log p_1^base(x), [B] double; its gradient is sampling::terminal_cost_grad without clipping.
  Tensor terminal_cost(const Tensor& x) const override;
  Tensor terminal_cost_grad(const Tensor& x) const override;
  /// X_0 = 0.
  Tensor initial_state(int64_t batch, Generator& gen) const override;

  /// Known for a Gaussian energy without particles (E95).
  bool has_ground_truth() const override;
  /// u*(x, t) = g(t) u_AS*(x, t) [B, d] double, and V(x, t) [B] double (E95); throw without a ground truth.
  Tensor optimal_control(const Tensor& x, double t) const override;
  Tensor value(const Tensor& x, double t) const override;

  const Energy& energy() const { return *energy_; }
  const BrownianBase& base() const { return *base_; }
  double tau() const { return tau_; }

 private:
  const GaussianEnergy& gaussian() const;  // throws without a ground truth
  EnergyPtr energy_;
  double tau_;
  BrownianBasePtr base_;
  int64_t steps_;
};

}  // namespace tilt::sampling
