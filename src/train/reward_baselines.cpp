#include "tilt/train/reward_baselines.h"

#include "tilt/core/error.h"
#include "tilt/sde/engine.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <cmath>

namespace tilt {

RewardBaseline::RewardBaseline(std::shared_ptr<FineTunedVelocity> model, RewardPtr reward,
                               const RewardBaselineOptions& options, const std::string& name)
    : model_(std::move(model)), reward_(std::move(reward)), options_(options), grid_(TimeGrid::uniform(options.num_steps)) {
  if (!model_) throw Error(name + ": no model");
  if (!reward_) throw Error(name + ": no reward");
  if (reward_->dim() != model_->dim()) {
    throw Error(name + ": the reward has dimension " + std::to_string(reward_->dim()) + " but the model has dimension " +
                std::to_string(model_->dim()));
  }
  if (options_.num_steps < 2) throw Error(name + ": num_steps must be >= 2");
  if (options_.batch_size < 1) throw Error(name + ": batch_size must be >= 1");
  if (!std::isfinite(options_.lambda)) throw Error(name + ": lambda must be finite");
  check_conditions(options_.conditions, model_->condition_dim(), name);
  check_reward_condition(*reward_, model_->condition_dim(), name);
}

void RewardBaseline::set_batch_size(int64_t n) {
  if (n < 1) throw Error(name() + ": batch_size must be >= 1, got " + std::to_string(n));
  options_.batch_size = n;
}

Tensor RewardBaseline::draw_conditions(Generator& gen) const {
  return options_.conditions ? options_.conditions->draw(options_.batch_size, gen).to(model_->device()) : Tensor();
}

Tensor RewardBaseline::ode_steps(const VelocityField& v, Tensor x, int64_t from, int64_t to) const {
  return flow_ode_steps(v, std::move(x), grid_, from, to);
}

RewardPtr RewardBaseline::reward_at(const Tensor& c) const {
  return bind_condition(reward_, reward_->condition_dim() > 0 ? c : Tensor());
}

Tensor RewardBaseline::reward_surrogate(const Reward& reward, const Tensor& x1) const {
  const Tensor g = reward.grad(x1.detach()).detach();
  return -options_.lambda * (g * x1).sum(1).mean();
}

// ---------------------------------------------------------------------------------------------

DraftK::DraftK(std::shared_ptr<FineTunedVelocity> model, RewardPtr reward, const RewardBaselineOptions& options)
    : RewardBaseline(std::move(model), std::move(reward), options, "draft") {
  if (options_.draft_k < 1 || options_.draft_k > options_.num_steps) {
    throw Error("draft: draft_k must be in 1..num_steps = " + std::to_string(options_.num_steps) + ", got " +
                std::to_string(options_.draft_k));
  }
}

LossOutput DraftK::compute(Generator& gen) {
  const int64_t K = options_.num_steps;
  const Tensor c = draw_conditions(gen);  // first: an unconditional run draws nothing
  const VelocityFieldPtr v = bind_condition(model_, c);
  const RewardPtr reward = reward_at(c);
  Tensor x = normal_draws({options_.batch_size, model_->dim()}, gen, at::TensorOptions().device(model_->device()));
  {
    at::NoGradGuard no_grad;
    x = ode_steps(*v, x, 0, K - options_.draft_k);
  }
  // Gradients through the last draft_k steps only (DRaFT-K, Clark et al. 2024, Sec. 4.1).
  const Tensor x1 = ode_steps(*v, x.detach(), K - options_.draft_k, K);
  LossOutput out;
  out.loss = reward_surrogate(*reward, x1);
  at::NoGradGuard no_grad;
  out.metrics.emplace_back("reward", reward->value(x1.detach()).mean().item<double>());
  return out;
}

// ---------------------------------------------------------------------------------------------

Refl::Refl(std::shared_ptr<FineTunedVelocity> model, RewardPtr reward, const RewardBaselineOptions& options)
    : RewardBaseline(std::move(model), std::move(reward), options, "refl") {
  for (int64_t k = 0; k < options_.num_steps; ++k) {
    if (grid_[k] >= options_.refl_t_min && grid_[k] > 0.0) candidates_.push_back(k);
  }
  if (candidates_.empty()) {
    throw Error("refl: no step has t_k >= refl_t_min = " + std::to_string(options_.refl_t_min) + " (and t_k < 1)");
  }
}

Tensor Refl::predict_x1(const Tensor& x, double t, const Tensor& v) const {
  // x = alpha x1 + beta x0, v = alpha' x1 + beta' x0  =>  x1 = (beta v - beta' x) / (beta alpha' - beta' alpha)
  // (Adjoint Matching, App. F.1; linear schedule: x + (1 - t) v).
  const ScheduleValues s = model_->schedule()->at(t);
  return (s.beta * v - s.d_beta * x) / (s.beta * s.d_alpha - s.d_beta * s.alpha);
}

LossOutput Refl::compute(Generator& gen) {
  const Tensor c = draw_conditions(gen);  // first: an unconditional run draws nothing
  const VelocityFieldPtr v = bind_condition(model_, c);
  const RewardPtr reward = reward_at(c);
  Tensor x = normal_draws({options_.batch_size, model_->dim()}, gen, at::TensorOptions().device(model_->device()));
  const auto n = static_cast<int64_t>(candidates_.size());
  const int64_t k = candidates_[at::randint(n, {1}, gen, at::TensorOptions().dtype(at::kLong)).item<int64_t>()];
  {
    at::NoGradGuard no_grad;
    x = ode_steps(*v, x, 0, k);
  }
  const Tensor xk = x.detach();
  const Tensor x1_hat = predict_x1(xk, grid_[k], v->velocity(xk, grid_[k]));
  LossOutput out;
  out.loss = reward_surrogate(*reward, x1_hat);
  at::NoGradGuard no_grad;
  out.metrics.emplace_back("reward_prediction", reward->value(x1_hat.detach()).mean().item<double>());
  out.metrics.emplace_back("t", grid_[k]);
  return out;
}

// ---------------------------------------------------------------------------------------------

DiscreteAdjoint::DiscreteAdjoint(std::shared_ptr<FineTunedVelocity> model, RewardPtr reward, NoiseSchedulePtr noise,
                                 const RewardBaselineOptions& options)
    : RewardBaseline(std::move(model), std::move(reward), options, "discrete_adjoint"),
      finetuned_sde_(model_, std::move(noise)) {
  for (int64_t k = 0; k + 1 < options_.num_steps; ++k) {
    const double sigma = finetuned_sde_.sigma(grid_[k]);
    if (!(sigma > 0.0) || !std::isfinite(sigma)) {
      throw Error("discrete_adjoint needs sigma(t) > 0 and finite on the grid, but " + finetuned_sde_.noise().describe() +
                  " gives sigma(" + std::to_string(grid_[k]) + ") = " + std::to_string(sigma));
    }
  }
}

LossOutput DiscreteAdjoint::compute(Generator& gen) {
  const int64_t K = options_.num_steps;
  const int64_t B = options_.batch_size;
  const Tensor c = draw_conditions(gen);  // first: an unconditional run draws nothing
  const VelocityFieldPtr base = bind_condition(model_->base(), c);
  const RewardPtr reward = reward_at(c);
  Tensor x = normal_draws({B, model_->dim()}, gen, at::TensorOptions().device(model_->device()));
  Tensor control_cost = at::zeros({B}, x.options());
  // Controlled memoryless SDE, Euler-Maruyama, with the whole graph kept:
  //   X_{k+1} = X_k + h (c_v v_theta - c_x X_k) + sqrt(h) sigma eps,  u_k = (c_v / sigma)(v_theta - v_base)
  // (docs/equations.md, E49); then the noiseless final step with the base velocity, as Adjoint Matching
  // takes it (App. G.1), so that both losses solve the same discretised problem.
  for (int64_t k = 0; k + 1 < K; ++k) {
    const double t = grid_[k], h = grid_.step(k);
    const double sigma = finetuned_sde_.sigma(t);
    const Tensor v_base = base->velocity(x, t);
    const Tensor delta = model_->delta(x, at::full({B}, t, x.options()), v_base, c);
    const Tensor u = (finetuned_sde_.coefficients(t).c_v / sigma) * delta;
    control_cost = control_cost + 0.5 * h * u.pow(2).sum(1);
    const Tensor eps = normal_draws(x.sizes(), gen, x.options());
    x = euler_kernel(finetuned_sde_, t, grid_[k + 1]).next(x, v_base + delta, eps);
  }
  const Tensor x1 = StepKernel{1.0, grid_.step(K - 1), 0.0}.mean(x, base->velocity(x, grid_[K - 1]));
  LossOutput out;
  out.loss = control_cost.mean() + reward_surrogate(*reward, x1);
  at::NoGradGuard no_grad;
  const Tensor r = reward->value(x1.detach());
  out.metrics.emplace_back("reward", r.mean().item<double>());
  out.metrics.emplace_back("control_cost", control_cost.detach().mean().item<double>());
  out.metrics.emplace_back("objective", (control_cost.detach() - options_.lambda * r).mean().item<double>());
  return out;
}

}  // namespace tilt
