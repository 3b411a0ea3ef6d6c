// Efficient Adjoint Matching (docs/equations.md, E131-E134). See tilt/train/efficient_adjoint_matching.h.
#include "tilt/train/efficient_adjoint_matching.h"

#include "noised_endpoints.h"

#include "tilt/core/check.h"
#include "tilt/core/error.h"
#include "tilt/model/gmm.h"
#include "tilt/schedule/schedule.h"
#include "tilt/sde/engine.h"
#include "tilt/sde/time_grid.h"
#include "tilt/train/unified_losses.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <cmath>

namespace tilt {
namespace {

Tensor column(const Tensor& t) { return t.reshape({-1, 1}); }

}  // namespace

Tensor blurred_data_end_score(const VelocityField& base, const Tensor& x, const Tensor& c, double tau) {
  if (!(tau > 0.0 && tau < 1.0)) throw Error("eam: score_time must be in (0, 1), got " + number_string(tau));
  const ScheduleValues s = base.schedule()->at(tau);
  const double wronskian = s.d_alpha * s.beta - s.alpha * s.d_beta;
  // x = alpha_tau X_1 + beta_tau X_0 scaled by 1 / alpha_tau; its score from v = kappa x + eta s (E7), eta = beta W / alpha.
  const Tensor xs = s.alpha * x;
  const Tensor v = c.defined() ? base.conditional_velocity(xs, at::full({x.size(0)}, tau, x.options()), c)
                               : base.velocity(xs, tau);
  return (s.alpha * s.alpha / (s.beta * wronskian)) * (v - s.d_alpha * x);
}

Tensor reference_adjoint_factor(const Schedule& schedule, const Tensor& t) {
  const ScheduleTensors s = schedule.at(t);
  return s.alpha / (s.alpha * s.alpha + s.beta * s.beta);
}

EfficientAdjointMatching::EfficientAdjointMatching(std::shared_ptr<FineTunedVelocity> model, RewardPtr reward,
                                                   const EfficientAdjointMatchingOptions& options)
    : model_(std::move(model)), reward_(std::move(reward)), options_(options) {
  const std::string n = "eam";
  detail::check_noised_endpoints(n, model_.get(), reward_.get(), options_);
  if (!reward_->differentiable()) {
    throw Error(n + ": needs the reward's gradient, and reward '" + reward_->kind() + "' has none (use ram, ddpo or grpo)");
  }
  if (options_.endpoints && options_.conditions) throw Error(n + ": exact endpoints are for an unconditional model");
  if (!(options_.weights_until > 0.0 && options_.weights_until <= 1.0)) {
    throw Error(n + ": weights_until must be in (0, 1], got " + number_string(options_.weights_until));
  }
  if (options_.path_weights) {
    if (options_.conditions) throw Error(n + ": path_weights is for an unconditional model");
    if (!options_.noise) options_.noise = make_memoryless_noise(1.0 / static_cast<double>(options_.num_steps));
  }
  set_batch_size(options_.batch_size);
  base_score_ = options_.base_score;
  if (!base_score_) {
    auto mixture = std::dynamic_pointer_cast<const GmmVelocity>(model_->base());
    if (!(options_.score_time >= 0.0 && options_.score_time < 1.0)) {
      throw Error(n + ": score_time must be in (0, 1) (or 0: exact for a mixture base), got " +
                  number_string(options_.score_time));
    }
    if (options_.score_time == 0.0 && mixture && model_->condition_dim() == 0) {
      base_score_ = [mixture](const Tensor& x, const Tensor&) {
        return mixture->mixture().score(x).to(x.scalar_type());
      };
    } else {
      const VelocityFieldPtr base = model_->base();
      const double tau = options_.score_time == 0.0 ? kDefaultScoreTime : options_.score_time;
      base_score_ = [base, tau](const Tensor& x, const Tensor& c) { return blurred_data_end_score(*base, x, c, tau); };
    }
  }
}

void EfficientAdjointMatching::set_batch_size(int64_t n) {
  if (n < 1) throw Error("eam: batch_size must be >= 1, got " + std::to_string(n));
  options_.batch_size = n;
}

Tensor EfficientAdjointMatching::terminal_score(const Tensor& x1, const Tensor& c) const {
  at::NoGradGuard no_grad;
  const Tensor rc = reward_->condition_dim() > 0 ? c : Tensor();
  const Tensor g = bind_condition(reward_, rc)->grad(x1).to(x1.scalar_type());
  return options_.lambda * g + base_score_(x1, c).to(x1.scalar_type());
}

Tensor EfficientAdjointMatching::target(const Tensor& x1, const Tensor& x0, const Tensor& t, const Tensor& G) const {
  const ScheduleTensors s = model_->schedule()->at(t);
  const Tensor D = s.alpha * s.alpha + s.beta * s.beta;
  const Tensor half_dD = s.alpha * s.d_alpha + s.beta * s.d_beta;         // D'_t / 2
  const Tensor beta_w = s.beta * (s.d_alpha * s.beta - s.alpha * s.d_beta);  // beta_t W_t = eta_t alpha_t, finite at t = 0
  const Tensor xt = column(s.alpha) * x1 + column(s.beta) * x0;
  // v_ref(x_t) - eta_t a~(t), a~(t) = (alpha_t / D_t) a~(1), a~(1) = -(G + x1)  (E132).
  return column(half_dD / D) * xt + column(beta_w / D) * (G + x1);
}

LossOutput EfficientAdjointMatching::compute(Generator& gen) {
  const int64_t B = options_.batch_size, M = options_.noise_draws, d = model_->dim();
  const at::TensorOptions opts = at::TensorOptions().dtype(at::kFloat).device(model_->device());
  // 1. The endpoints, their rewards and their tilted scores, without gradients.
  Tensor cond;  // [B, dc]: one condition per endpoint; undefined for an unconditional model (nothing drawn)
  if (options_.conditions) cond = options_.conditions->draw(B, gen).to(model_->device());
  Tensor x1, r, G, w;  // w: the endpoints' self-normalised path weights (path_weights), else undefined
  {
    at::NoGradGuard no_grad;
    if (options_.endpoints) {
      x1 = options_.endpoints(B, gen).to(opts);
    } else if (options_.path_weights) {
      const TiltRollout roll = tilt_rollout(model_, options_.noise, *reward_, options_.lambda, options_.num_steps, B, gen);
      x1 = roll.x.back();
      w = at::softmax(roll.log_w, 0).to(at::kFloat);
    } else {
      x1 = flow_ode_steps(*bind_condition(model_, cond), normal_draws({B, d}, gen, opts),
                          TimeGrid::uniform(options_.num_steps), 0, options_.num_steps);
    }
    r = bind_condition(reward_, reward_->condition_dim() > 0 ? cond : Tensor())->value(x1).to(at::kFloat);
    G = terminal_score(x1, cond);
  }
  if (!at::isfinite(G).all().item<bool>()) {
    throw Error("eam: the tilted score lambda grad r + grad log p_base of the model's samples is not finite (reward '" +
                reward_->kind() + "')");
  }
  // 2. M noisings per endpoint, endpoint-major rows, and the regression onto the closed-form adjoint's target.
  const Tensor x1r = x1.repeat_interleave(M, 0), Gr = G.repeat_interleave(M, 0);
  const Tensor condr = cond.defined() ? cond.repeat_interleave(M, 0) : Tensor();
  const auto [t, x0, xt] = detail::draw_noisings(*model_->schedule(), x1r, options_.t_min, options_.t_max, gen);
  const Tensor D = target(x1r, x0, t, Gr);
  const Tensor v = bind_condition(model_, condr)->velocity(xt, t);
  LossOutput out;
  const Tensor rows = (v - D).pow(2).sum(1);
  if (w.defined()) {
    // Rows before weights_until: B w_b (mean 1 over the batch); after: 1 (E134).
    const Tensor early = t.lt(options_.weights_until).to(rows.scalar_type());
    const Tensor omega = early * (static_cast<double>(B) * w.repeat_interleave(M, 0)) + (1.0 - early);
    out.loss = (omega * rows).mean();
    const Tensor wd = w.to(at::kDouble);
    out.metrics.emplace_back("ess", 1.0 / (static_cast<double>(B) * (wd * wd).sum().item<double>()));
  } else {
    out.loss = rows.mean();
  }
  out.metrics.emplace_back("reward", r.to(at::kDouble).mean().item<double>());
  out.metrics.emplace_back("reward_std", r.to(at::kDouble).std(/*unbiased=*/false).item<double>());
  {
    at::NoGradGuard no_grad;
    const double moved = (G + x1).pow(2).sum(1).mean().item<double>();
    out.metrics.emplace_back("score_gap", moved);
  }
  return out;
}

}  // namespace tilt
