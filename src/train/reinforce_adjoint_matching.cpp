// Reinforce Adjoint Matching (docs/equations.md, E128-E130). See tilt/train/reinforce_adjoint_matching.h.
#include "tilt/train/reinforce_adjoint_matching.h"

#include "noised_endpoints.h"

#include "tilt/core/check.h"
#include "tilt/core/error.h"
#include "tilt/model/mlp.h"
#include "tilt/schedule/schedule.h"
#include "tilt/sde/engine.h"
#include "tilt/sde/time_grid.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <cmath>

namespace tilt {

ReinforceAdjointMatching::ReinforceAdjointMatching(std::shared_ptr<FineTunedVelocity> model, RewardPtr reward,
                                                   const ReinforceAdjointMatchingOptions& options)
    : model_(std::move(model)), reward_(std::move(reward)), options_(options) {
  const std::string n = "ram";
  detail::check_noised_endpoints(n, model_.get(), reward_.get(), options_);
  if (options_.group_size == 0 && options_.conditions) {
    throw Error(n + ": a conditional model needs group_size >= 2 (the endpoints of one condition share a baseline)");
  }
  if (options_.group_size != 0 && options_.group_size < 2) {
    throw Error(n + ": group_size must be 0 (the whole batch) or >= 2, got " + std::to_string(options_.group_size));
  }
  if ((options_.endpoints || options_.exact_value) && options_.conditions) {
    throw Error(n + ": exact endpoints and values are for an unconditional model");
  }
  for (int64_t h : options_.critic_hidden) {
    if (h < 1) throw Error(n + ": critic_hidden widths must be >= 1, got " + std::to_string(h));
  }
  set_batch_size(options_.batch_size);
  if (!options_.critic_hidden.empty() && !options_.exact_value) {
    MlpOptions o;
    o.dim = model_->dim();
    o.hidden = options_.critic_hidden;
    o.time_features = 8;
    o.zero_output = true;  // V = 0 at the start: the baseline is the group's mean
    o.condition_dim = model_->condition_dim();
    auto critic = std::make_shared<MlpVelocity>(o, model_->schedule(), options_.critic_seed);
    critic->to(model_->device());
    critic_ = critic;
  }
}

std::vector<Tensor> ReinforceAdjointMatching::parameters() const {
  std::vector<Tensor> p = model_->parameters();
  if (critic_) {
    for (const Tensor& q : critic_->parameters()) p.push_back(q);
  }
  return p;
}

Tensor ReinforceAdjointMatching::critic(const Tensor& xt, const Tensor& t, const Tensor& c) const {
  if (!critic_) return Tensor();
  return bind_condition(critic_, c)->velocity(xt, t).mean(1);
}

int64_t ReinforceAdjointMatching::group_size() const {
  return options_.group_size == 0 ? options_.batch_size : options_.group_size;
}

void ReinforceAdjointMatching::set_batch_size(int64_t n) {
  if (n < 2) throw Error("ram: batch_size must be >= 2 (the baseline is the mean of the other endpoints), got " + std::to_string(n));
  if (options_.group_size != 0 && n % options_.group_size != 0) {
    throw Error("ram: batch_size = " + std::to_string(n) + " is not a multiple of group_size = " +
                std::to_string(options_.group_size));
  }
  options_.batch_size = n;
}

Tensor ReinforceAdjointMatching::leave_one_out_mean(const Tensor& r) const {
  const int64_t G = group_size();
  const Tensor g = r.reshape({-1, G});
  return ((g.sum(1, /*keepdim=*/true) - g) / static_cast<double>(G - 1)).reshape({-1});
}

Tensor ReinforceAdjointMatching::target(const Tensor& x1, const Tensor& x0, const Tensor& t, const Tensor& c,
                                        const Tensor& v_base) const {
  const ScheduleTensors s = model_->schedule()->at(t);
  const Tensor u = s.d_alpha.reshape({-1, 1}) * x1 + s.d_beta.reshape({-1, 1}) * x0;
  return options_.lambda * c.reshape({-1, 1}) * (u - v_base);
}

LossOutput ReinforceAdjointMatching::compute(Generator& gen) {
  const int64_t B = options_.batch_size, G = group_size(), M = options_.noise_draws, d = model_->dim();
  const at::TensorOptions opts = at::TensorOptions().dtype(at::kFloat).device(model_->device());
  // 1. The endpoints and their rewards, without gradients.
  Tensor cond;  // [B, dc]: one condition per group; undefined for an unconditional model (nothing drawn)
  if (options_.conditions) cond = options_.conditions->draw(B / G, gen).repeat_interleave(G, 0).to(model_->device());
  Tensor x1, r;
  {
    at::NoGradGuard no_grad;
    if (options_.endpoints) {
      x1 = options_.endpoints(B, gen).to(opts);
    } else {
      x1 = flow_ode_steps(*bind_condition(model_, cond), normal_draws({B, d}, gen, opts),
                          TimeGrid::uniform(options_.num_steps), 0, options_.num_steps);
    }
    r = bind_condition(reward_, reward_->condition_dim() > 0 ? cond : Tensor())->value(x1).to(at::kFloat);
  }
  if (!at::isfinite(r).all().item<bool>()) {
    throw Error("ram: the reward of the model's samples is not finite (reward '" + reward_->kind() + "')");
  }
  const Tensor mean_r = leave_one_out_mean(r);
  // 2. M noisings per endpoint, endpoint-major rows.
  const Tensor x1r = x1.repeat_interleave(M, 0), rr = r.repeat_interleave(M, 0), mr = mean_r.repeat_interleave(M, 0);
  const Tensor condr = cond.defined() ? cond.repeat_interleave(M, 0) : Tensor();
  const auto [t, x0, xt] = detail::draw_noisings(*model_->schedule(), x1r, options_.t_min, options_.t_max, gen);
  // 3. The baseline b = mean + V(x_t, t), its critic trained onto r - mean; the regression of the residual (E128).
  const Tensor V = critic(xt, t, condr);
  Tensor b = V.defined() ? mr + V.detach() : mr;
  if (options_.exact_value) {
    at::NoGradGuard no_grad;
    b = options_.exact_value(xt, t).to(rr.options());
  }
  const Tensor c = rr - b;
  Tensor vb;
  {
    at::NoGradGuard no_grad;
    vb = bind_condition(model_->base(), condr)->velocity(xt, t);
  }
  const Tensor delta = model_->delta(xt, t, vb, condr);
  const Tensor D = target(x1r, x0, t, c, vb);
  LossOutput out;
  out.loss = (delta - D).pow(2).sum(1).mean();
  const Tensor critic_loss = (V.defined() ? rr - mr - V : c).pow(2).mean();
  if (V.defined()) out.loss = out.loss + critic_loss;
  out.metrics.emplace_back("reward", r.to(at::kDouble).mean().item<double>());
  out.metrics.emplace_back("reward_std", r.to(at::kDouble).std(/*unbiased=*/false).item<double>());
  out.metrics.emplace_back("critic_loss", critic_loss.item<double>());
  return out;
}

}  // namespace tilt
