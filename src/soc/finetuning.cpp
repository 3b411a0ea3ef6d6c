#include "tilt/soc/finetuning.h"

#include "tilt/core/check.h"
#include "tilt/core/error.h"
#include "tilt/sde/importance.h"

#include <ATen/ATen.h>

#include <cmath>

namespace tilt::soc {

FineTuningProblem::FineTuningProblem(GenerativeSDE base, RewardPtr reward, double lambda, int64_t steps,
                                     VelocityFieldPtr optimum)
    : base_(std::move(base)), reward_(std::move(reward)), lambda_(lambda), steps_(steps), optimum_(std::move(optimum)) {
  const std::string me = "fine-tuning SOC problem: ";
  if (!reward_) throw Error(me + "no reward");
  if (reward_->dim() != base_.dim()) {
    throw Error(me + "the reward has dimension " + std::to_string(reward_->dim()) + " but the base has dimension " +
                std::to_string(base_.dim()));
  }
  if (optimum_ && optimum_->dim() != base_.dim()) throw Error(me + "the optimal velocity has another dimension");
  if (!std::isfinite(lambda_)) throw Error(me + "lambda must be finite");
  if (steps_ < 1) throw Error(me + "steps must be >= 1, got " + std::to_string(steps_));
  for (int64_t k = 0; k < steps_; ++k) {
    const double t = static_cast<double>(k) / static_cast<double>(steps_), s = base_.sigma(t);
    if (!(s > 0.0) || !std::isfinite(s)) {
      throw Error(me + "needs sigma(t) > 0 and finite on the grid, but " + base_.noise().describe() + " gives sigma(" +
                  std::to_string(t) + ") = " + std::to_string(s) + " (the control would be infinite)");
    }
  }
}

Tensor FineTuningProblem::to_base(const Tensor& x) const {
  const std::vector<Tensor> params = base_.velocity().parameters();
  return params.empty() ? x : x.to(params.front().scalar_type());
}

Tensor FineTuningProblem::drift(const Tensor& x, double t) const {
  return base_.drift(to_base(x), t).to(x.scalar_type());
}

Tensor FineTuningProblem::drift_vjp(const Tensor& x, double t, const Tensor& a) const {
  const Tensor xb = to_base(x);
  return base_.drift_vjp(xb, t, a.to(xb.scalar_type())).to(x.scalar_type());
}

Tensor FineTuningProblem::sigma(double t) const { return base_.sigma(t) * at::eye(dim(), at::kDouble); }

Tensor FineTuningProblem::state_cost(const Tensor& x, double) const { return at::zeros({x.size(0)}, x.options()); }

Tensor FineTuningProblem::state_cost_grad(const Tensor& x, double) const { return at::zeros_like(x); }

Tensor FineTuningProblem::terminal_cost(const Tensor& x) const { return -lambda_ * reward_->value(x); }

Tensor FineTuningProblem::terminal_cost_grad(const Tensor& x) const { return -lambda_ * reward_->grad(x); }

Tensor FineTuningProblem::initial_state(int64_t batch, Generator& gen) const {
  return at::randn({batch, dim()}, gen, at::kDouble);
}

Tensor FineTuningProblem::optimal_control(const Tensor& x, double t) const {
  if (!optimum_) return Problem::optimal_control(x, t);
  // u* = (c_v / sigma)(v* - v_base): the control whose velocity v_base + sigma u / c_v is v*.
  const Tensor xb = to_base(x);
  const double scale = base_.coefficients(t).c_v / base_.sigma(t);
  return (scale * (optimum_->velocity(xb, t) - base_.velocity().velocity(xb, t))).to(x.scalar_type());
}

VelocityFieldPtr FineTuningProblem::controlled_velocity(ParametricControlPtr control) const {
  if (!control) throw Error("fine-tuning SOC problem: no control");
  if (control->dim() != dim()) throw Error("fine-tuning SOC problem: the control has another dimension");
  return std::make_shared<ControlledVelocity>(base_.velocity_ptr(), base_.noise_ptr(),
                                              [control](const Tensor& x, double t) { return (*control)(x, t); });
}

}  // namespace tilt::soc
