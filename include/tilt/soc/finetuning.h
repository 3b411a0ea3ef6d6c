// Reward fine-tuning as a stochastic optimal control problem (Adjoint Matching, Sec. 3-4;
// docs/equations.md, E94). The uncontrolled process is the base model's
// generative SDE under a noise schedule,
//
//   dX = b_base(X, t) dt + sigma(t) dB,   b_base = c_v(t) v_base - c_x(t) x,   X_0 ~ N(0, I),   T = 1,
//
// with no running cost (f = 0) and the terminal cost g = -lambda r. The controlled SDE
// dX = (b_base + sigma u) dt + sigma dB is the generative SDE of the velocity v_base + sigma u / c_v,
// so a control trained by any SOC loss is a fine-tuned model. Its optimal control tilts the law of
// X_1 to p_base exp(lambda r) / Z exactly when the schedule is memoryless.
#pragma once

#include "tilt/model/reward.h"
#include "tilt/soc/control.h"
#include "tilt/soc/problem.h"
#include "tilt/sde/sde.h"

namespace tilt::soc {

class FineTuningProblem : public Problem {
 public:
  /// steps: the default grid of [0, 1]. optimum: the exact tilted velocity v* (e.g. of a Gaussian
  /// mixture base with a closed-form tilt), which makes u* = (c_v / sigma)(v* - v_base) the ground
  /// truth; null when there is none. Throws tilt::Error if sigma(t) = 0 somewhere on [0, 1) (the
  /// control would be infinite) or if the dimensions differ.
  FineTuningProblem(GenerativeSDE base, RewardPtr reward, double lambda, int64_t steps,
                    VelocityFieldPtr optimum = nullptr);

  std::string name() const override { return "finetune"; }
  int64_t dim() const override { return base_.dim(); }
  double horizon() const override { return 1.0; }
  int64_t default_steps() const override { return steps_; }
  Tensor drift(const Tensor& x, double t) const override;
  Tensor drift_vjp(const Tensor& x, double t, const Tensor& a) const override;
  /// sigma(t) I.
  Tensor sigma(double t) const override;
  bool constant_sigma() const override { return false; }
  Tensor state_cost(const Tensor& x, double t) const override;
  Tensor state_cost_grad(const Tensor& x, double t) const override;
  /// -lambda r(x) and its gradient.
  Tensor terminal_cost(const Tensor& x) const override;
  Tensor terminal_cost_grad(const Tensor& x) const override;
  Tensor initial_state(int64_t batch, Generator& gen) const override;
  bool has_ground_truth() const override { return optimum_ != nullptr; }
  Tensor optimal_control(const Tensor& x, double t) const override;

  const GenerativeSDE& base() const { return base_; }
  double lambda() const { return lambda_; }
  /// The fine-tuned velocity of a control: v_base + sigma u / c_v (the control is held, not copied).
  VelocityFieldPtr controlled_velocity(ParametricControlPtr control) const;

 private:
  /// x in the base's dtype (its parameters', or x's own for closed-form fields).
  Tensor to_base(const Tensor& x) const;

  GenerativeSDE base_;
  RewardPtr reward_;
  double lambda_;
  int64_t steps_;
  VelocityFieldPtr optimum_;
};

}  // namespace tilt::soc
