// SOC losses behind the common Loss interface (train/loss.h).
//
// AdjointMatchingSoc: Adjoint Matching for a general SOC problem (Domingo-Enrich et al., ICLR 2025,
// Sec. 5.2 and Eq. 38-42; SOCM-dq's "work_adjoint"). Paths are simulated with the current control and
// no gradient; the lean adjoint runs backwards through the problem's drift and state cost,
//   a_K = grad g(X_K),   a_k = a_{k+1} + h [ (grad_x b(X_k, t_k))^T a_{k+1} + grad_x f(X_k, t_k) ],
// and the control is regressed onto -sigma^T a:
//   loss = (1/K) sum_k mean_b | u_theta(X_k, t_k) + sigma^T a_k |^2.
// Its only critical point is u*: E[-sigma^T a_k | X_k = x] = u*(x, t_k) (up to the time step).
#pragma once

#include "tilt/soc/control.h"
#include "tilt/soc/problem.h"
#include "tilt/train/loss.h"

#include <memory>
#include <string>
#include <vector>

namespace tilt::soc {

struct SocLossOptions {
  int64_t batch_size = 128;
  int64_t num_steps = 0;  ///< 0: the problem's default
};

/// The lean adjoint a_k, k = 0..K, along recorded states x_0..x_K on a uniform grid of [0, T].
std::vector<Tensor> lean_adjoint(const Problem& problem, const std::vector<Tensor>& x, double T);

/// What every SOC loss holds: the problem, the control it trains, the batch and grid. The
/// constructor checks them (names the loss in its errors); parameters() are the control's.
class SocLoss : public Loss {
 public:
  std::vector<Tensor> parameters() const override { return control_->parameters(); }

 protected:
  SocLoss(const std::string& label, ProblemPtr problem, ParametricControlPtr control, const SocLossOptions& options);
  /// K: options.num_steps, or the problem's default.
  int64_t steps() const;

  ProblemPtr problem_;
  ParametricControlPtr control_;
  SocLossOptions options_;
};

/// Adjoint Matching (above). Metrics: the batch's control objective.
class AdjointMatchingSoc : public SocLoss {
 public:
  AdjointMatchingSoc(ProblemPtr problem, ParametricControlPtr control, const SocLossOptions& options);
  std::string name() const override { return "adjoint_matching"; }
  LossOutput compute(Generator& gen) override;
};

/// The discrete adjoint (SOCM's "rel_entropy"): the control objective itself,
///   loss = mean_b [ sum_k (1/2 |u_theta(X_k, t_k)|^2 + f(X_k, t_k)) h + g(X_K) ],
/// backpropagated through the whole simulated trajectory (the control's effect on later states
/// included). Its gradient is that of J(u_theta) for the discretised problem; the memory grows with K.
class DiscreteAdjointSoc : public SocLoss {
 public:
  DiscreteAdjointSoc(ProblemPtr problem, ParametricControlPtr control, const SocLossOptions& options);
  std::string name() const override { return "discrete_adjoint"; }
  LossOutput compute(Generator& gen) override;
};

/// Cross-entropy (SOCM's "cross_entropy"): KL(P* || P^{u_theta}) up to a constant, estimated on paths
/// of the current control u_s (detached) with self-normalised importance weights w ∝ dP*/dP^{u_s}:
///   loss = sum_b w_b [ sum_k (1/2 |u_theta|^2 - u_theta . u_s) h - sum_k u_theta . dW_k ].
class CrossEntropySoc : public SocLoss {
 public:
  CrossEntropySoc(ProblemPtr problem, ParametricControlPtr control, const SocLossOptions& options);
  std::string name() const override { return "cross_entropy"; }
  LossOutput compute(Generator& gen) override;
};

/// Log-variance (SOCM's "log-variance"): the batch variance of
///   Y = sum_k (1/2 |u_theta|^2 - u_theta . u_s - f) h - sum_k u_theta . dW_k - g,
/// on paths of the current control u_s (detached), no weights. Y = -V(x0) on every path when
/// u_theta = u*, whatever u_s, so the loss is 0 there.
class LogVarianceSoc : public SocLoss {
 public:
  LogVarianceSoc(ProblemPtr problem, ParametricControlPtr control, const SocLossOptions& options);
  std::string name() const override { return "log_variance"; }
  LossOutput compute(Generator& gen) override;
};

/// Variance (SOCM's "variance"): the batch variance of exp(Y) (Y as in LogVarianceSoc), divided by
/// the squared batch mean of exp(Y) (detached) so that its scale does not depend on V(x0).
class VarianceSoc : public SocLoss {
 public:
  VarianceSoc(ProblemPtr problem, ParametricControlPtr control, const SocLossOptions& options);
  std::string name() const override { return "variance"; }
  LossOutput compute(Generator& gen) override;
};

/// REINFORCE: the score-function estimator of grad J(u_theta) on detached paths of the current control,
///   loss = mean_b [ C_b sum_k u_theta(X_k) . dW_k + sum_k 1/2 |u_theta(X_k)|^2 h ],
/// C_b the path's cost (detached). Its expected gradient is that of the discretised J, the same as the
/// discrete adjoint's; its value is not J.
class ReinforceSoc : public SocLoss {
 public:
  ReinforceSoc(ProblemPtr problem, ParametricControlPtr control, const SocLossOptions& options);
  std::string name() const override { return "reinforce"; }
  LossOutput compute(Generator& gen) override;
};

/// Moment (SOCM's "moment"): mean_b (Y + y0)^2 with a learnt scalar y0 (Y as in LogVarianceSoc); at
/// u* it is 0 with y0 = V(x0). parameters() = the control's, then y0.
class MomentSoc : public SocLoss {
 public:
  MomentSoc(ProblemPtr problem, ParametricControlPtr control, const SocLossOptions& options, double y0 = 0.0);
  std::string name() const override { return "moment"; }
  std::vector<Tensor> parameters() const override;
  LossOutput compute(Generator& gen) override;
  double y0() const;

 private:
  Tensor y0_;
};

/// The loss called `name`: adjoint_matching, discrete_adjoint, cross_entropy, log_variance, variance,
/// moment, reinforce. Throws tilt::Error listing them otherwise.
std::unique_ptr<Loss> make_soc_loss(const std::string& name, ProblemPtr problem, ParametricControlPtr control,
                                    const SocLossOptions& options);
/// The names make_soc_loss accepts.
const std::vector<std::string>& soc_loss_names();
/// Throws make_soc_loss's error (which lists the names) unless `name` is one of them.
void check_soc_loss_name(const std::string& name);

}  // namespace tilt::soc
