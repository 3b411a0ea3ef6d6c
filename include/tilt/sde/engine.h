// The engine under every method: the Gaussian kernel of one step, a rollout that records what later
// passes need, the lean-adjoint recursion over a vector-Jacobian-product provider, and the path-weight
// accumulator of two chains whose steps share one covariance. Sampling, Adjoint Matching (both paths),
// the discrete adjoint, the policy gradients, importance weights, the SOC adjoints and Adjoint Sampling
// are all written with these four pieces (docs/architecture.md; docs/equations.md, E91-E93).
//
// Every stochastic step of tilt is a Gaussian transition whose mean is linear in the state and in one
// velocity evaluation,
//
//   X_s = c_x X_t + c_v v(X_t, t) + std xi,   xi ~ N(0, I),
//
// Euler-Maruyama (c_x = 1 - h c_x(t), c_v = h c_v(t), std = sqrt(h) sigma(t), with the drift
// b = c_v(t) v - c_x(t) x of tilt/sde/sde.h) and the exact gDDIM step (tilt/sde/gddim.h) alike.
#pragma once

#include "tilt/sde/sampler.h"

#include <functional>
#include <vector>

namespace tilt {

/// One step t -> s: X_s = c_x X_t + c_v v + std xi.
struct StepKernel {
  double c_x = 1.0, c_v = 0.0, std = 0.0;

  /// c_x x + c_v v: the step's mean.
  Tensor mean(const Tensor& x, const Tensor& v) const;
  /// The step with a given draw: mean + std xi (xi may be undefined on a deterministic step).
  Tensor next(const Tensor& x, const Tensor& v, const Tensor& xi) const;
  /// The adjoint of the mean map x -> c_x x + c_v v(x), given vjp = (dv/dx)^T a: c_x a + c_v vjp.
  Tensor adjoint(const Tensor& a, const Tensor& vjp) const;
  bool deterministic() const { return std == 0.0; }
};

/// Euler-Maruyama's kernel of the SDE from t to s.
StepKernel euler_kernel(const GenerativeSDE& sde, double t, double s);
/// The exact gDDIM kernel (tilt/sde/gddim.h) of sigma = gamma sqrt(2 eta) from t to s.
StepKernel exact_kernel(const Schedule& schedule, double t, double s, double gamma);
/// The kernel of `integrator` (euler or exact; heun is not a Gaussian step and throws) from t to s.
/// The exact step integrates sigma = gamma sqrt(2 eta) with gamma = stochasticity_of(sde.noise()).
StepKernel step_kernel(const GenerativeSDE& sde, Integrator integrator, double t, double s);
/// The kernels of every step of the grid, k = 0..K-1. A kernel may be infinite (the memoryless schedule without an
/// offset at t = 0): the lean adjoint may run through it, a rollout refuses it (tilt::Error).
std::vector<StepKernel> step_kernels(const GenerativeSDE& sde, const TimeGrid& grid, Integrator integrator);
/// Throws tilt::Error naming the step's times and the noise schedule unless every kernel is finite.
void check_finite_steps(const std::vector<StepKernel>& kernels, const GenerativeSDE& sde, const TimeGrid& grid);

/// The flow ODE dX = v dt by Euler's steps k = from, ..., to - 1 of the grid (the kernel {1, h, 0}): what DRaFT, ReFL,
/// RAM and EAM draw their endpoints with. Gradients flow through the states unless the caller disables them.
Tensor flow_ode_steps(const VelocityField& v, Tensor x, const TimeGrid& grid, int64_t from, int64_t to);

/// v(X_k, t_k) at step k: how a rollout evaluates its velocity (a network, a base plus a control...).
using StepVelocity = std::function<Tensor(int64_t k, const Tensor& x)>;

/// What a rollout keeps.
struct RolloutRecord {
  bool states = false;      ///< every X_k (else X_0 and X_K)
  bool noise = false;       ///< every xi_k (undefined tensors on deterministic steps)
  bool velocities = false;  ///< every v(X_k, t_k)
};

/// A recorded rollout: x[k] = X_k (all, or the first and last), xi[k] and v[k] per step when recorded.
struct Rollout {
  std::vector<Tensor> x, xi, v;
  const Tensor& final() const { return x.back(); }
};

/// Steps x0 through the kernels, one velocity evaluation per step, drawing xi_k ~ N(0, I) from gen
/// (in the states' dtype and device) on every step with std > 0. Gradients flow through the states
/// unless the caller disables them.
Rollout rollout(const std::vector<StepKernel>& kernels, const StepVelocity& velocity, const Tensor& x0, Generator& gen,
                const RolloutRecord& record = {});

/// (dv/dx (X_k, t_k))^T a at step k, for the lean adjoint.
using StepVjp = std::function<Tensor(int64_t k, const Tensor& a)>;
/// An extra term added to step k's adjoint, c_v-scaled with the VJP (a running cost's gradient); may be null.
using StepSource = std::function<Tensor(int64_t k)>;

/// The lean adjoint backwards through the mean maps of the kernels (the base dynamics without noise):
///   a_k = c_x,k a_{k+1} + c_v,k [ vjp(k, a_{k+1}) + source(k) ],   k = K-1, ..., 0,
/// given a[K] (the terminal cost's gradient). a must have K + 1 entries with a[K] set; a[0..K-1] are
/// written. With Euler kernels and source = h-free grad f this is the discretised lean adjoint ODE
/// da/dt = -(grad_x b)^T a - grad_x f (Adjoint Matching, Eq. 38-41; docs/equations.md, E92).
void lean_adjoint_recursion(std::vector<Tensor>& a, const std::vector<StepKernel>& kernels, const StepVjp& vjp,
                            const StepSource& source = nullptr);

/// log dP/dQ along paths drawn from Q, where P and Q take Gaussian steps of the same covariance std^2 I
/// whose means differ by shift = m_Q - m_P: each step adds -d . xi - |d|^2 / 2 with d = shift / std
/// (the discrete Girsanov theorem, docs/equations.md, E93; exact at every step size). Accumulated in double.
class PathWeight {
 public:
  /// For a batch of `batch` paths (log weight 0 each).
  explicit PathWeight(int64_t batch);
  /// One step of Q drawn as m_Q + std xi with m_Q - m_P = shift.
  void add_step(const Tensor& shift, const Tensor& xi, double std);
  /// Any other per-path log-ratio term, [B].
  void add(const Tensor& log_ratio);
  /// log dP/dQ so far, [B] (double).
  const Tensor& log_weight() const { return log_w_; }

 private:
  Tensor log_w_;
};

}  // namespace tilt
