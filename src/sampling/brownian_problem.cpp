// Adjoint Sampling's Brownian base as an SOC problem (tilt/sampling/brownian_problem.h; docs/equations.md, E95).
#include "tilt/sampling/brownian_problem.h"

#include "tilt/core/check.h"
#include "tilt/core/error.h"
#include "tilt/sampling/adjoint_sampling.h"

#include <ATen/ATen.h>

#include <cmath>
#include <utility>

namespace tilt::sampling {

BrownianProblem::BrownianProblem(EnergyPtr energy, double tau, BrownianBasePtr base, int64_t steps)
    : energy_(std::move(energy)), tau_(tau), base_(std::move(base)), steps_(steps) {
  if (!energy_ || !base_) throw Error("adjoint sampling problem: needs an energy and a base");
  if (!(tau > 0)) throw Error("adjoint sampling problem: tau must be > 0");
  if (steps < 1) throw Error("adjoint sampling problem: steps must be >= 1");
  if (energy_->dim() != base_->dim()) {
    throw Error("adjoint sampling problem: the energy has dimension " + std::to_string(energy_->dim()) + ", the base " +
                std::to_string(base_->dim()));
  }
  if (energy_->particles() != base_->particles()) {
    throw Error("adjoint sampling problem: the base must be centre-of-mass free exactly when the energy has particles");
  }
}

Tensor BrownianProblem::drift(const Tensor& x, double) const { return at::zeros_like(x, x.options().dtype(at::kDouble)); }

Tensor BrownianProblem::drift_vjp(const Tensor& x, double, const Tensor&) const {
  return at::zeros_like(x, x.options().dtype(at::kDouble));
}

Tensor BrownianProblem::sigma(double t) const {
  // P = the projection of the identity's rows (P is symmetric); I without particles.
  return base_->g(t) * base_->project(at::eye(dim(), at::kDouble));
}

bool BrownianProblem::constant_sigma() const { return base_->options().noise == BrownianNoise::constant; }

Tensor BrownianProblem::state_cost(const Tensor& x, double) const { return at::zeros({x.size(0)}, at::kDouble); }

Tensor BrownianProblem::state_cost_grad(const Tensor& x, double) const {
  return at::zeros_like(x, x.options().dtype(at::kDouble));
}

Tensor BrownianProblem::terminal_cost(const Tensor& x) const {
  // docs/equations.md, E61: g = E / tau + log p_1^base.
  return energy_->energy(x) / tau_ + base_->log_p1(x);
}

Tensor BrownianProblem::terminal_cost_grad(const Tensor& x) const {
  return sampling::terminal_cost_grad(*energy_, tau_, *base_, x, /*max_norm=*/0.0);
}

Tensor BrownianProblem::initial_state(int64_t batch, Generator&) const { return at::zeros({batch, dim()}, at::kDouble); }

bool BrownianProblem::has_ground_truth() const { return dynamic_cast<const GaussianEnergy*>(energy_.get()) != nullptr; }

const GaussianEnergy& BrownianProblem::gaussian() const {
  const auto* e = dynamic_cast<const GaussianEnergy*>(energy_.get());
  if (!e) throw Error("SOC problem 'adjoint_sampling' has a known optimal control and value only for a Gaussian energy");
  return *e;
}

Tensor BrownianProblem::optimal_control(const Tensor& x, double t) const {
  const GaussianEnergy& e = gaussian();
  check_batch(x, dim(), "adjoint sampling problem: x");
  // docs/equations.md, E95: u_AS* = (m - rho x) / (nu_1 - rho nu_t), rho = 1 - S / nu_1, S = s^2 tau; u* = g u_AS*.
  const double S = e.std() * e.std() * tau_, n1 = base_->nu1(), rho = 1.0 - S / n1;
  const Tensor m = at::tensor(e.mean(), at::kDouble);
  return base_->g(t) * (m - rho * x.to(at::kDouble)) / (n1 - rho * base_->nu(t));
}

Tensor BrownianProblem::value(const Tensor& x, double t) const {
  const GaussianEnergy& e = gaussian();
  check_batch(x, dim(), "adjoint sampling problem: x");
  // docs/equations.md, E95: V = -log int N(y; x, r I) exp(-g(y)) dy, r = nu_1 - nu_t, written without the
  // 1 / r terms that cancel, so that it holds up to t = 1 (where it is g).
  const double S = e.std() * e.std() * tau_, n1 = base_->nu1(), r = n1 - base_->nu(t);
  const double q = 1.0 + r * (1.0 / S - 1.0 / n1), d = static_cast<double>(dim());
  const Tensor m = at::tensor(e.mean(), at::kDouble), xd = x.to(at::kDouble);
  const double mm = m.pow(2).sum().item<double>();
  const Tensor xx = xd.pow(2).sum(1), xm = at::matmul(xd, m);
  return 0.5 * d * std::log(q / (2.0 * M_PI * n1)) + mm / (2.0 * S) -
         ((2.0 * xm - xx) / S + xx / n1 + r * mm / (S * S)) / (2.0 * q);
}

}  // namespace tilt::sampling
