// Simulating a controlled SOC problem, importance weights, and the metrics (as the SOCM code defines
// them; docs/equations.md, E30-E33).
#pragma once

#include "tilt/soc/problem.h"

#include <functional>
#include <vector>

namespace tilt::soc {

/// A control u(x, t): [B, d] -> [B, d].
using Control = std::function<Tensor(const Tensor& x, double t)>;

/// The zero control and a problem's optimal control as Controls.
Control zero_control(int64_t dim);
Control optimal_control_of(ProblemPtr problem);

struct ControlledPaths {
  std::vector<double> t;        ///< t_0 = 0 < ... < t_K = T (uniform)
  std::vector<Tensor> x;        ///< X_{t_k}, k = 0..K, each [B, d] (double)
  std::vector<Tensor> u;        ///< u(X_{t_k}, t_k), k = 0..K-1
  std::vector<Tensor> dW;       ///< the Brownian increments B_{t_{k+1}} - B_{t_k} that drove step k (0 once stopped)
  std::vector<Tensor> alive;    ///< [B] (double) 1 where the path runs during step k, 0 once it has stopped
  Tensor running_cost;          ///< sum_k alive_k (f(X_k, t_k) + 1/2 |u_k|^2) h, [B]
  Tensor state_cost;            ///< sum_k alive_k f(X_k, t_k) h, [B]
  Tensor terminal_cost;         ///< g(X_K) (the stopped state where a path stopped), [B]
  Tensor noise_integral;        ///< sum_k u_k . dW_k, [B]
};

/// Euler-Maruyama on `steps` uniform steps of [0, T] (steps <= 0: the problem's default), in double
/// precision and without gradients. With a stopping time (Problem::has_stopping_time), a path whose
/// state X_{k+1} is in the stopping set is frozen there: later steps add no drift, noise or cost.
/// A control returning NaN or Inf gives non-finite costs and weights, not an error: an evaluation of a diverged
/// control reports it so.
ControlledPaths simulate(const Problem& problem, const Control& u, int64_t batch, int64_t steps, Generator& gen);

/// log w = -[sum (f + 1/2 |u|^2) h + g] - sum u . dW, so that w ∝ dP^{u*}/dP^u along each path
/// (Girsanov; docs/equations.md, E31). [B]
Tensor log_importance_weights(const ControlledPaths& paths);

/// The control objective estimate: mean over paths of running cost + terminal cost.
double control_objective(const ControlledPaths& paths);

/// std(w) / mean(w) over the paths: 0 exactly when u = u* (up to discretisation).
double normalised_weight_std(const ControlledPaths& paths);

/// Control L2 error under the optimal path law: sum_k sum_b w_b |u(X_k,t_k) - u*(X_k,t_k)|^2 / (K sum_b w_b),
/// self-normalised over the batch (SOCM's norm_sqd_diff). `u` is evaluated on the paths' states.
double control_l2_error(const Problem& problem, const ControlledPaths& paths, const Control& u);
/// The same for the control that drew the paths, from the values recorded in paths.u (no new evaluation).
double control_l2_error(const Problem& problem, const ControlledPaths& paths);

/// SOC-matching's published control L2 error (its norm_sqd_diff divided by its normaliser; docs/soc.md,
/// "Metrics", which says how it differs from control_l2_error; docs/equations.md, E33):
///   sum_{k=0}^{K} sum_b w_b |u(X_k, t_k) - u*(X_k, t_k)|^2 / ((K + 1) B Z),
/// K + 1 times (t_K = T included), the weights w of socm_log_importance_weights, not self-normalised,
/// and Z = exp(log_normaliser) an estimate of E[w] (which is the same for every control).
double socm_control_l2_error(const Problem& problem, const ControlledPaths& paths, const Control& u,
                             double log_normaliser);
/// log w as SOC-matching forms it: -sum_k (f(X_{k+1}, t_k) + 1/2 |u_k|^2) h - g(X_K) - sum_k u_k . dW_k,
/// the running cost at the post-step state (log_importance_weights takes f(X_k, t_k)). [B]
Tensor socm_log_importance_weights(const Problem& problem, const ControlledPaths& paths);
/// log E[w] for socm_control_l2_error: the log of the mean of exp(socm_log_importance_weights) over `batch`
/// paths of the optimal control, simulated in chunks. E_{P^u}[w] = E_{P^0}[exp(-sum f h - g)] for every u
/// (discrete Girsanov); under u* the weights are nearly constant, so few paths estimate it well.
/// SOC-matching tracks it by a running average of its training batches' mean weights instead.
double socm_log_normaliser(const Problem& problem, int64_t batch, int64_t steps, Generator& gen);

}  // namespace tilt::soc
