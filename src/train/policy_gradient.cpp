#include "tilt/train/policy_gradient.h"

#include "tilt/core/check.h"
#include "tilt/core/error.h"
#include "tilt/sde/engine.h"
#include "tilt/sde/gddim.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <cmath>

namespace tilt {

LogProbReduction parse_log_prob_reduction(const std::string& name) {
  if (name == "sum") return LogProbReduction::sum;
  if (name == "mean") return LogProbReduction::mean;
  throw Error("unknown log_prob reduction '" + name + "' (valid: sum, mean)");
}

WindowStrategy parse_window_strategy(const std::string& name) {
  if (name == "progressive") return WindowStrategy::progressive;
  if (name == "random") return WindowStrategy::random;
  throw Error("unknown window strategy '" + name + "' (valid: progressive, random)");
}

Tensor gaussian_log_prob(const Tensor& x_next, const Tensor& mean, double std, LogProbReduction reduction) {
  if (!(std > 0.0) || !std::isfinite(std)) throw Error("gaussian_log_prob: std must be finite and > 0, got " + number_string(std));
  if (x_next.sizes() != mean.sizes()) throw Error("gaussian_log_prob: x_next and mean differ in shape");
  // log N(x; m, std^2 I) = sum_j [-(x_j - m_j)^2 / (2 std^2) - log std - log(2 pi) / 2], in double so that
  // the log-ratios of the clipped loss (differences of terms of size ~ d log std) keep their precision.
  const Tensor z = (x_next.to(at::kDouble) - mean.to(at::kDouble)) / std;
  const Tensor per_coordinate = -0.5 * z.pow(2) - (std::log(std) + 0.5 * std::log(2.0 * M_PI));
  return reduction == LogProbReduction::sum ? per_coordinate.sum(-1) : per_coordinate.mean(-1);
}

Tensor clipped_ratio_loss(const Tensor& log_prob, const Tensor& old_log_prob, const Tensor& advantage,
                          double clip_range) {
  if (!(clip_range > 0.0) || !std::isfinite(clip_range)) {
    throw Error("clipped_ratio_loss: clip_range must be finite and > 0, got " + number_string(clip_range));
  }
  // PPO's pessimistic surrogate (Schulman et al. 2017, eq. 7) as DDPO writes it (docs/equations.md, E51).
  const Tensor ratio = at::exp(log_prob - old_log_prob);
  const Tensor A = advantage.to(ratio.scalar_type());
  return at::max(-A * ratio, -A * at::clamp(ratio, 1.0 - clip_range, 1.0 + clip_range));
}

Tensor batch_advantages(const Tensor& r, bool scale, double std_eps, double adv_clip_max) {
  if (r.dim() != 1 || r.size(0) < 2) throw Error("batch advantages need a batch of >= 2 rewards");
  Tensor A = r - r.mean();
  // DDPO's stat tracker: np.std (population) + 1e-6 (docs/equations.md, E52).
  if (scale) A = A / (r.std(/*unbiased=*/false) + std_eps);
  return at::clamp(A, -adv_clip_max, adv_clip_max);
}

Tensor group_advantages(const Tensor& r, int64_t group_size, bool scale, double std_eps, double adv_clip_max) {
  if (group_size < 2) throw Error("group advantages need group_size >= 2, got " + std::to_string(group_size));
  if (r.dim() != 1 || r.size(0) % group_size != 0) {
    throw Error("group advantages: " + std::to_string(r.numel()) + " rewards are not groups of " +
                std::to_string(group_size));
  }
  // (r - group mean) / (group std + eps) (docs/equations.md, E53; torch's unbiased std).
  const Tensor g = r.view({-1, group_size});
  Tensor A = g - g.mean(1, /*keepdim=*/true);
  if (scale) A = A / (g.std(1, /*unbiased=*/true, /*keepdim=*/true) + std_eps);
  return at::clamp(A, -adv_clip_max, adv_clip_max).reshape({-1});
}

int64_t progressive_window_start(int64_t iteration, int64_t iters, int64_t shift, int64_t max_start) {
  if (iteration < 0 || iters < 1 || shift < 1 || max_start < 0) {
    throw Error("progressive window: needs iteration >= 0, window_iters >= 1, window_shift >= 1, max start >= 0");
  }
  // MixGRPO's "progressive" strategy (docs/equations.md, E54): the start moves by `shift` every `iters`
  // iterations while it stays <= max_start, then rolls back to 0.
  const int64_t positions = max_start / shift + 1;
  return ((iteration / iters) % positions) * shift;
}

// ---------------------------------------------------------------------------------------------

PolicyGradient::PolicyGradient(std::shared_ptr<FineTunedVelocity> model, RewardPtr reward,
                               const PolicyGradientOptions& options, bool grouped)
    : model_(std::move(model)), reward_(std::move(reward)), options_(options), grouped_(grouped),
      grid_(TimeGrid::uniform(std::max<int64_t>(options.num_steps, 1))) {
  const std::string n = name();
  const PolicyGradientOptions& o = options_;
  if (!model_) throw Error(n + ": no model");
  if (!reward_) throw Error(n + ": no reward");
  if (reward_->dim() != model_->dim()) {
    throw Error(n + ": the reward has dimension " + std::to_string(reward_->dim()) + " but the model has dimension " +
                std::to_string(model_->dim()));
  }
  if (o.num_steps < 2) throw Error(n + ": num_steps must be >= 2 (the last step is deterministic)");
  if (o.batch_size < 2) throw Error(n + ": batch_size must be >= 2 (advantages are batch statistics)");
  if (!(o.gamma > 0.0) || !std::isfinite(o.gamma)) {
    throw Error(n + ": the policy's stochasticity gamma must be finite and > 0 (gamma = 0 is the ODE, which has no "
                "log-probability), got " + number_string(o.gamma));
  }
  if (!std::isfinite(o.lambda) || o.lambda == 0.0) throw Error(n + ": lambda must be finite and nonzero, got " + number_string(o.lambda));
  if (!(o.clip_range > 0.0) || !std::isfinite(o.clip_range)) throw Error(n + ": clip_range must be > 0, got " + number_string(o.clip_range));
  if (!(o.adv_clip_max > 0.0)) throw Error(n + ": adv_clip_max must be > 0, got " + number_string(o.adv_clip_max));
  if (!(o.std_eps >= 0.0)) throw Error(n + ": std_eps must be >= 0, got " + number_string(o.std_eps));
  if (o.inner_epochs < 1) throw Error(n + ": inner_epochs must be >= 1, got " + std::to_string(o.inner_epochs));
  if (grouped_) {
    if (o.group_size < 2) throw Error(n + ": group_size must be >= 2, got " + std::to_string(o.group_size));
    if (o.batch_size % o.group_size != 0) {
      throw Error(n + ": batch_size = " + std::to_string(o.batch_size) + " is not a multiple of group_size = " +
                  std::to_string(o.group_size));
    }
  }
  if (o.window < 0 || o.window > o.num_steps - 1) {
    throw Error(n + ": window must be in 0..num_steps - 1 = " + std::to_string(o.num_steps - 1) + " (0: every step), got " +
                std::to_string(o.window));
  }
  if (o.window_iters < 1) throw Error(n + ": window_iters must be >= 1");
  if (o.window_shift < 1) throw Error(n + ": window_shift must be >= 1");
  check_conditions(o.conditions, model_->condition_dim(), n);
  check_reward_condition(*reward_, model_->condition_dim(), n);
}

void PolicyGradient::set_batch_size(int64_t n) {
  if (n != options_.batch_size) {
    throw Error("the " + name() + " loss cannot draw its batch in shards: its advantages are statistics of the whole "
                "batch (batch_size = " + std::to_string(options_.batch_size) + ", asked for " + std::to_string(n) + ")");
  }
}

std::vector<int64_t> PolicyGradient::sde_steps(int64_t iteration, Generator& gen) const {
  const int64_t stochastic = options_.num_steps - 1;  // steps 0..K-2; the step onto t = 1 is deterministic
  int64_t first = 0, count = stochastic;
  if (options_.window > 0) {
    count = options_.window;
    const int64_t max_start = stochastic - count;
    if (options_.window_strategy == WindowStrategy::progressive) {
      first = progressive_window_start(iteration, options_.window_iters, options_.window_shift, max_start);
    } else {
      first = at::randint(max_start + 1, {1}, gen, at::TensorOptions().dtype(at::kLong)).item<int64_t>();
    }
  }
  std::vector<int64_t> steps;
  for (int64_t k = first; k < first + count; ++k) steps.push_back(k);
  return steps;
}

PolicyBatch PolicyGradient::sample(const Tensor& x0, const std::vector<int64_t>& sde_steps, Generator& gen,
                                   const Tensor& c) const {
  at::NoGradGuard no_grad;
  const Schedule& schedule = *model_->schedule();
  const int64_t K = options_.num_steps;
  PolicyBatch batch;
  batch.sde_steps = sde_steps;
  batch.conditions = condition_rows(c, x0.size(0), model_->condition_dim(), name() + " sample");
  // The policy and the base at the trajectories' conditions (themselves for an unconditional model).
  const VelocityFieldPtr policy = bind_condition(model_, batch.conditions);
  const VelocityFieldPtr base = bind_condition(model_->base(), batch.conditions);
  std::vector<Tensor> states, next_states, log_probs;
  Tensor x = x0;
  size_t next_sde = 0;
  for (int64_t k = 0; k < K; ++k) {
    const bool stochastic = next_sde < sde_steps.size() && sde_steps[next_sde] == k;
    // The exact gDDIM step (sde/gddim.h): at gamma = 0 (outside the window) and onto t = 1 it is deterministic.
    const StepKernel e = exact_kernel(schedule, grid_[k], grid_[k + 1], stochastic ? options_.gamma : 0.0);
    // The last step onto t = 1 has no noise, hence no log-probability: taken with v_theta it would
    // carry a pathwise dependence on theta that the score-function gradient misses. It is taken
    // with the base velocity, as Adjoint Matching's final noiseless step (App. G.1), so that the
    // on-policy gradient is unbiased for E[r] of the sampled chain.
    const Tensor v = k == K - 1 ? base->velocity(x, grid_[k]) : policy->velocity(x, grid_[k]);
    const Tensor mean = e.mean(x, v);
    if (!stochastic) {
      x = mean;
      continue;
    }
    if (!(e.std > 0.0)) throw Error(name() + ": step " + std::to_string(k) + " has no noise; it cannot be a policy step");
    ++next_sde;
    const Tensor x_next = mean + e.std * normal_draws(x.sizes(), gen, x.options());
    states.push_back(x);
    next_states.push_back(x_next);
    log_probs.push_back(gaussian_log_prob(x_next, mean, e.std, options_.reduction));
    x = x_next;
  }
  if (next_sde != sde_steps.size()) throw Error(name() + ": SDE steps out of range 0..num_steps - 2");
  batch.states = at::stack(states);
  batch.next_states = at::stack(next_states);
  batch.old_log_prob = at::stack(log_probs);
  batch.x1 = x;
  return batch;
}

Tensor PolicyGradient::log_prob(const PolicyBatch& batch) const {
  const Schedule& schedule = *model_->schedule();
  const int64_t S = batch.states.size(0), B = batch.states.size(1), d = batch.states.size(2);
  // All steps in one evaluation of v_theta on S B rows, each at its own time.
  std::vector<double> t(static_cast<size_t>(S)), c_x(t.size()), c_v(t.size()), sd(t.size());
  for (int64_t j = 0; j < S; ++j) {
    const int64_t k = batch.sde_steps[static_cast<size_t>(j)];
    const StepKernel e = exact_kernel(schedule, grid_[k], grid_[k + 1], options_.gamma);
    t[j] = grid_[k], c_x[j] = e.c_x, c_v[j] = e.c_v, sd[j] = e.std;
  }
  const auto options = batch.states.options();
  auto per_row = [&](const std::vector<double>& values) {
    return at::tensor(values, at::kDouble).to(options.dtype()).repeat_interleave(B);  // [S B]
  };
  const Tensor x = batch.states.reshape({S * B, d});
  // Row j B + b is trajectory b at step j: its condition is conditions[b] (undefined: unconditional).
  const Tensor c = batch.conditions.defined() ? batch.conditions.repeat({S, 1}) : Tensor();
  const Tensor v = model_->conditional_velocity(x, per_row(t), c);
  const Tensor mean = (per_row(c_x).unsqueeze(1) * x + per_row(c_v).unsqueeze(1) * v).view({S, B, d});
  std::vector<Tensor> rows;
  for (int64_t j = 0; j < S; ++j) {
    rows.push_back(gaussian_log_prob(batch.next_states[j], mean[j], sd[j], options_.reduction));
  }
  return at::stack(rows);
}

LossOutput PolicyGradient::compute(Generator& gen) {
  const PolicyGradientOptions& o = options_;
  const int64_t epoch = o.inner_epochs > 1 ? iteration_ % o.inner_epochs : 0;
  // A new batch at the first epoch; also when the stored one is missing (a resumed run) or not from
  // this cycle of inner epochs.
  const bool fresh = epoch == 0 || !have_batch_ || iteration_ - batch_iteration_ != epoch;
  double log_prob_mismatch = 0.0;
  if (fresh) {
    const int64_t B = o.batch_size, d = model_->dim();
    // The prompts first (an unconditional run draws nothing); GRPO's group is one prompt.
    Tensor c;
    if (o.conditions) {
      c = grouped_ ? o.conditions->draw(B / o.group_size, gen).repeat_interleave(o.group_size, 0)
                   : o.conditions->draw(B, gen);
      c = c.to(model_->device());
    }
    const at::TensorOptions on = at::TensorOptions().device(model_->device());
    Tensor x0;
    if (grouped_) {
      // G generations share each initial noise (MixGRPO's init_same_noise).
      x0 = normal_draws({B / o.group_size, d}, gen, on).repeat_interleave(o.group_size, 0);
    } else {
      x0 = normal_draws({B, d}, gen, on);
    }
    batch_ = sample(x0, sde_steps(iteration_, gen), gen, c);
    at::NoGradGuard no_grad;
    const RewardPtr reward = bind_condition(reward_, reward_->condition_dim() > 0 ? c : Tensor());
    batch_.reward = o.lambda * reward->value(batch_.x1).to(at::kDouble);
    batch_.advantage = grouped_ ? group_advantages(batch_.reward, o.group_size, o.scale_advantages, o.std_eps, o.adv_clip_max)
                                : batch_advantages(batch_.reward, o.scale_advantages, o.std_eps, o.adv_clip_max);
    have_batch_ = true;
    batch_iteration_ = iteration_ - epoch;
  }
  const Tensor log_prob_theta = log_prob(batch_);
  if (fresh) {
    // pi_old is the policy that sampled the batch, i.e. theta now. Its log-probabilities are taken
    // from this same evaluation so that the first epoch's ratio is exactly 1; they agree with the
    // sampling pass's up to rounding (logged as log_prob_mismatch).
    log_prob_mismatch = (log_prob_theta.detach() - batch_.old_log_prob).abs().max().item<double>();
    batch_.old_log_prob = log_prob_theta.detach();
  }
  const Tensor terms = clipped_ratio_loss(log_prob_theta, batch_.old_log_prob, batch_.advantage.unsqueeze(0), o.clip_range);
  LossOutput out;
  out.loss = terms.mean().to(model_->parameters().empty() ? at::kFloat : model_->parameters()[0].scalar_type());
  at::NoGradGuard no_grad;
  const Tensor log_ratio = log_prob_theta.detach() - batch_.old_log_prob;
  const Tensor ratio = at::exp(log_ratio);
  const Tensor A = batch_.advantage.unsqueeze(0).expand_as(ratio);
  const Tensor clipped = ((A > 0) & (ratio > 1.0 + o.clip_range)) | ((A < 0) & (ratio < 1.0 - o.clip_range));
  const Tensor r = batch_.reward / o.lambda;
  out.metrics.emplace_back("reward", r.mean().item<double>());
  out.metrics.emplace_back("reward_std", r.std(/*unbiased=*/false).item<double>());
  out.metrics.emplace_back("ratio_clipped_fraction", clipped.to(at::kDouble).mean().item<double>());
  out.metrics.emplace_back("approx_kl", (0.5 * log_ratio.pow(2)).mean().item<double>());
  out.metrics.emplace_back("log_prob_mismatch", log_prob_mismatch);
  out.metrics.emplace_back("epoch", static_cast<double>(epoch));
  out.metrics.emplace_back("window_start", static_cast<double>(batch_.sde_steps.front()));
  return out;
}

}  // namespace tilt
