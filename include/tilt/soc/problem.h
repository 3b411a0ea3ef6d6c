// A stochastic optimal control (SOC) problem (docs/equations.md, E19-E20):
//
//   dX = (b(X,t) + sigma u(X,t)) dt + sigma dB,   X_0 ~ initial_state,   t in [0, T],
//   minimise  J(u) = E[ integral_0^T (1/2 |u|^2 + f(X,t)) dt + g(X_T) ].
//
// sigma is a constant d x d matrix (as in every benchmark problem here). The value function is
// V(x,t) = -log E[exp(-integral_t^T f ds - g(X_T)) | X_t = x] under the uncontrolled process, and the
// optimal control is u* = -sigma^T grad_x V. Each problem owns its ground truth where one is known:
// optimal_control() and value() then return it, else they throw.
#pragma once

#include "tilt/core/tensor.h"

#include <memory>
#include <string>

namespace tilt::soc {

class Problem {
 public:
  virtual ~Problem() = default;
  virtual std::string name() const = 0;
  virtual int64_t dim() const = 0;
  /// The horizon T and the number of Euler-Maruyama steps the benchmarks use on [0, T].
  virtual double horizon() const = 0;
  virtual int64_t default_steps() const = 0;

  /// b(x, t), [B, d] -> [B, d].
  virtual Tensor drift(const Tensor& x, double t) const = 0;
  /// (grad_x b(x,t))^T a, by autograd unless a problem knows better.
  virtual Tensor drift_vjp(const Tensor& x, double t, const Tensor& a) const;
  /// sigma(t), [d, d] (double).
  virtual Tensor sigma(double t) const = 0;
  /// Whether sigma(t) is the same at every t (SOCM's reparametrisation matrices assume it).
  virtual bool constant_sigma() const { return true; }
  /// f(x, t), [B]; and its gradient [B, d] (autograd unless overridden).
  virtual Tensor state_cost(const Tensor& x, double t) const = 0;
  virtual Tensor state_cost_grad(const Tensor& x, double t) const;
  /// g(x), [B]; and its gradient [B, d] (autograd unless overridden).
  virtual Tensor terminal_cost(const Tensor& x) const = 0;
  virtual Tensor terminal_cost_grad(const Tensor& x) const;
  /// `batch` initial states, [batch, d].
  virtual Tensor initial_state(int64_t batch, Generator& gen) const = 0;

  /// A stopping time (SOCM's molecular dynamics; docs/equations.md, E30): a path stops at the first grid
  /// time t_k with stopped(X_k) true, and from then on neither moves nor accrues cost; the cost is
  /// integral_0^{tau ^ T} (1/2 |u|^2 + f) dt + g(X_{tau ^ T}). Problems without one never stop.
  virtual bool has_stopping_time() const { return false; }
  /// [B] bool: whether each x is in the stopping set (all false unless overridden).
  virtual Tensor stopped(const Tensor& x) const;

  /// Ground truth, where known: u*(x, t) [B, d] and V(x, t) [B].
  virtual bool has_ground_truth() const { return false; }
  virtual Tensor optimal_control(const Tensor& x, double t) const;
  virtual Tensor value(const Tensor& x, double t) const;
};

using ProblemPtr = std::shared_ptr<const Problem>;

}  // namespace tilt::soc
