// SOC losses behind the common Loss interface (soc/loss.h).
//
// AdjointMatchingSoc: Adjoint Matching for a general SOC problem (Domingo-Enrich et al., ICLR 2025,
// Sec. 5.2 and Eq. 38-42; SOCM's code calls it "work_adjoint"; docs/equations.md, E34). Paths are
// simulated with the current control and no gradient; the lean adjoint runs backwards through the
// problem's drift and state cost,
//   a_K = grad g(X_K),   a_k = a_{k+1} + h [ (grad_x b(X_k, t_k))^T a_{k+1} + grad_x f(X_k, t_k) ],
// and the control is regressed onto -sigma^T a:
//   loss = (1/K) sum_k mean_b | u_theta(X_k, t_k) + sigma^T a_k |^2.
// Its only critical point is u*: E[-sigma^T a_k | X_k = x] = u*(x, t_k) (up to the time step).
#pragma once

#include "tilt/soc/control.h"
#include "tilt/soc/problem.h"
#include "tilt/soc/loss.h"

#include <memory>
#include <utility>
#include <string>
#include <vector>

namespace tilt::soc {

struct SocLossOptions {
  int64_t batch_size = 128;
  int64_t num_steps = 0;  ///< 0: the problem's default
  double y0_lr = 1e-2;    ///< moment: y0's own learning rate (SOCM's; docs/equations.md, E40); 0: the control's
  double M_lr = 1e-3;     ///< socm: the learning rate of M's network and gamma (SOCM's); 0: the control's
  double socm_gamma = 2;  ///< socm: gamma's initial value (SOCM: 2, 6 for the double well)
  uint64_t seed = 0;      ///< socm: initialises M's network
  /// adjoint_matching: weight time k's squared error by w_k = min(1, mean_j m_j / m_k), m_k the batch's mean
  /// |target_k|^2 (detached): the times whose regression targets are far noisier than average count less
  /// (docs/equations.md, E121). false: every time alike, the paper's loss.
  bool damp_noisy_times = false;
};

/// The lean adjoint a_k, k = 0..K, along recorded states x_0..x_K on a uniform grid of [0, T].
std::vector<Tensor> lean_adjoint(const Problem& problem, const std::vector<Tensor>& x, double T);

/// The full adjoint of the continuous-adjoint loss along recorded states, for the control u (its
/// parameters held fixed): a_K = grad g(X_K),
///   a_k = a_{k+1} + h [ (grad_x (b + sigma u)(X_k, t_k))^T a_{k+1} + grad_x (f + 1/2 |u|^2)(X_k, t_k) ]
/// (the adjoint ODE of "basic adjoint matching" in Adjoint Matching, Domingo-Enrich et al., ICLR 2025,
/// before the lean simplification; SOCM's code calls it continuous_adjoint; docs/equations.md, E35).
std::vector<Tensor> full_adjoint(const Problem& problem, const ParametricControl& control,
                                 const std::vector<Tensor>& x, double T);

/// What every SOC loss holds: the problem, the control it trains, the batch and grid. The
/// constructor checks them (names the loss in its errors); parameters() are the control's.
class SocLoss : public Loss {
 public:
  std::vector<Tensor> parameters() const override { return control_->parameters(); }
  int64_t batch_size() const override { return options_.batch_size; }
  /// Paths per compute(); at least 2 for the losses that take a batch variance.
  void set_batch_size(int64_t n) override;

 protected:
  /// stopping_time: whether the loss handles problems with a stopping time (else it refuses them).
  SocLoss(const std::string& label, ProblemPtr problem, ParametricControlPtr control, const SocLossOptions& options,
          bool stopping_time = false);
  /// K: options.num_steps, or the problem's default.
  int64_t steps() const;

  ProblemPtr problem_;
  ParametricControlPtr control_;
  SocLossOptions options_;
  std::string label_;
  int64_t min_batch_ = 1;  ///< 2 for a batch variance
};

/// Adjoint Matching (above). Metrics: the batch's control objective.
class AdjointMatchingSoc : public SocLoss {
 public:
  AdjointMatchingSoc(ProblemPtr problem, ParametricControlPtr control, const SocLossOptions& options);
  std::string name() const override { return "adjoint_matching"; }
  LossOutput compute(Generator& gen) override;
};

/// Continuous adjoint ("basic adjoint matching" of the Adjoint Matching paper; SOCM's code's
/// "continuous_adjoint"): the same regression as AdjointMatchingSoc, unweighted, onto -sigma^T a with
/// the full adjoint a of full_adjoint(): the control's own Jacobian and cost enter, with its
/// parameters detached. E[a_k | X_k = x] is grad_x of the cost-to-go of the current control, which is
/// grad V only at u = u*: so u* is a fixed point, but the target moves with the control.
class ContinuousAdjointSoc : public SocLoss {
 public:
  ContinuousAdjointSoc(ProblemPtr problem, ParametricControlPtr control, const SocLossOptions& options);
  std::string name() const override { return "continuous_adjoint"; }
  LossOutput compute(Generator& gen) override;
};

/// SOCM's reparametrisation matrix (SOCM, Domingo-Enrich et al. 2024; the code's SigmoidMLP, models.py):
///   M_t(s) = e^{-gamma (s - t)} I + (1 - e^{-gamma (s - t)}) N(t, s),
/// N an MLP (t, s) -> 128 -> 128 -> d^2 with ReLU (initial weights scaled by init_scale; SOCM: 0.1) and
/// gamma learnt. M_t(t) = I. Computed in double, with d/ds M by forward-mode differentiation.
class ReparametrisationMatrix {
 public:
  ReparametrisationMatrix(int64_t dim, std::vector<int64_t> hidden, double gamma, uint64_t seed, double init_scale = 0.1);
  /// M_t(s) and d/ds M_t(s) at pairs (t_p, s_p), t and s [P] -> [P, d, d] each.
  std::pair<Tensor, Tensor> operator()(const Tensor& t, const Tensor& s) const;
  /// The weights and biases of N, then gamma.
  std::vector<Tensor> parameters() const;
  int64_t dim() const { return dim_; }

 private:
  int64_t dim_;
  std::vector<Tensor> weights_, biases_;
  Tensor gamma_;
};

/// SOCM (Domingo-Enrich et al. 2024, the SOCM loss with reparametrisation matrices; the code's
/// method.py, algorithms "SOCM" and "SOCM_const_M"; docs/equations.md, E42): the importance-weighted regression
///   loss = (1/K) sum_k sum_b wbar_b |u_theta(X_k, t_k) + sigma^T w_k|^2,
/// wbar ∝ dP*/dP^{u_s} self-normalised over the batch (u_s the current control, detached), onto
///   w_k = sum_{j>=k} [ M_{t_k}(t_j) (grad f(X_j) h - (grad_x b(X_j))^T z_j) + d/ds M_{t_k}(t_j) z_j ]
///         + M_{t_k}(T) grad g(X_K),      z_j = sigma^{-T} (dW_j + u_s(X_j) h)
/// (the pathwise reparametrisation of grad V). For every M, E_{P*}[-sigma^T w_k | X_k = x] = u*(x, t_k),
/// so u* is a fixed point of the control whatever M; M (and gamma) are trained jointly on the same loss,
/// which lowers the target's variance. With learnt_M false, M = I ("socm_const_M"):
///   w_k = grad g(X_K) + sum_{j>=k} (grad f(X_j) h - (grad_x b(X_j))^T z_j).
class SocmSoc : public SocLoss {
 public:
  SocmSoc(ProblemPtr problem, ParametricControlPtr control, const SocLossOptions& options, bool learnt_M);
  std::string name() const override { return M_ ? "socm" : "socm_const_M"; }
  std::vector<Tensor> parameters() const override;
  std::vector<ParameterGroup> parameter_groups() const override;
  LossOutput compute(Generator& gen) override;
  /// The learnt M (null for M = I).
  std::shared_ptr<ReparametrisationMatrix> M() const { return M_; }
  void set_M(std::shared_ptr<ReparametrisationMatrix> M) { M_ = std::move(M); }

 private:
  std::shared_ptr<ReparametrisationMatrix> M_;
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
/// u* it is 0 with y0 = V(x0). parameters() = the control's, then y0, which trains at options.y0_lr.
class MomentSoc : public SocLoss {
 public:
  MomentSoc(ProblemPtr problem, ParametricControlPtr control, const SocLossOptions& options, double y0 = 0.0);
  std::string name() const override { return "moment"; }
  std::vector<Tensor> parameters() const override;
  std::vector<ParameterGroup> parameter_groups() const override;
  LossOutput compute(Generator& gen) override;
  double y0() const;

 private:
  Tensor y0_;
};

/// The loss called `name`: one of soc_loss_names(). Throws tilt::Error listing them otherwise.
std::unique_ptr<Loss> make_soc_loss(const std::string& name, ProblemPtr problem, ParametricControlPtr control,
                                    const SocLossOptions& options);
/// The names make_soc_loss accepts.
const std::vector<std::string>& soc_loss_names();
/// Throws make_soc_loss's error (which lists the names) unless `name` is one of them.
void check_soc_loss_name(const std::string& name);

}  // namespace tilt::soc
