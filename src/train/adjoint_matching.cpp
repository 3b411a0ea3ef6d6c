#include "tilt/train/adjoint_matching.h"

#include "tilt/core/check.h"
#include "tilt/core/error.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>  // at::NoGradGuard; not pulled in by ATen.h since LibTorch 2.0
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <cmath>
#include <numeric>

namespace tilt {

LeanAdjoint lean_adjoint(const GenerativeSDE& base_sde, const std::vector<Tensor>& x, const TimeGrid& grid,
                         const Reward& reward, double lambda, bool final_noiseless_step) {
  const int64_t K = grid.steps();
  const size_t needed = static_cast<size_t>(final_noiseless_step ? K : K + 1);
  if (x.size() < needed) {
    throw Error("lean adjoint: needs " + std::to_string(needed) + " recorded states, got " +
                std::to_string(x.size()));
  }
  at::NoGradGuard no_grad;
  LeanAdjoint out;
  out.a.resize(static_cast<size_t>(K) + 1);
  out.v_base.resize(static_cast<size_t>(K));
  int64_t k = K - 1;
  if (final_noiseless_step) {
    // X^_1 = X_{K-1} + h v_base(X_{K-1}, t_{K-1}); a_K = -lambda grad r(X^_1);
    // a_{K-1} = a_K + h (dv_base/dx)^T a_K, the adjoint of that step.
    const double h = grid.step(k);
    at::AutoGradMode enable_grad(true);
    const Tensor xg = x[k].detach().requires_grad_(true);
    const Tensor v = base_sde.velocity().velocity(xg, grid[k]);
    out.x1 = (x[k] + h * v).detach();
    out.a[K] = -lambda * reward.grad(out.x1);
    const Tensor vjp = torch::autograd::grad({v}, {xg}, {out.a[K]})[0];
    out.a[k] = out.a[K] + h * vjp;
    out.v_base[k] = v.detach();
    --k;
  } else {
    out.x1 = x[K];
    out.a[K] = -lambda * reward.grad(out.x1);
  }
  for (; k >= 0; --k) {
    // a_k = a_{k+1} + h_k (grad_x b_base(X_k, t_k))^T a_{k+1}  (Adjoint Matching, Eq. 41; spec sec. 4)
    out.a[k] = out.a[k + 1] + grid.step(k) * base_sde.drift_vjp(x[k], grid[k], out.a[k + 1], &out.v_base[k]);
  }
  return out;
}

AdjointMatching::AdjointMatching(std::shared_ptr<FineTunedVelocity> model, RewardPtr reward,
                                 NoiseSchedulePtr noise, const AdjointMatchingOptions& options)
    : model_(std::move(model)),
      reward_(std::move(reward)),
      options_(options),
      finetuned_sde_(model_, noise),
      base_sde_(model_->base(), noise),
      grid_(TimeGrid::uniform(options.num_steps)) {
  if (!reward_) throw Error("adjoint matching: no reward");
  if (reward_->dim() != model_->dim()) {
    throw Error("adjoint matching: the reward has dimension " + std::to_string(reward_->dim()) +
                " but the model has dimension " + std::to_string(model_->dim()));
  }
  if (options_.batch_size < 1) throw Error("adjoint matching: batch_size must be >= 1");
  if (options_.loss_early_steps < 0 || options_.loss_late_steps < 0 ||
      options_.loss_early_steps + options_.loss_late_steps < 1) {
    throw Error("adjoint matching: need loss_early_steps, loss_late_steps >= 0 with a positive sum, got " +
                std::to_string(options_.loss_early_steps) + " + " + std::to_string(options_.loss_late_steps));
  }
  if (!std::isfinite(options_.lambda)) throw Error("adjoint matching: lambda must be finite");
  if (options_.loss_weighting != "control" && options_.loss_weighting != "velocity") {
    throw Error("adjoint matching: loss_weighting must be 'control' or 'velocity', got '" + options_.loss_weighting + "'");
  }
  const NoiseSchedulePtr exact = noise->with_offset(0.0);
  for (int64_t k = 0; k < grid_.steps(); ++k) {
    const double t = grid_[k];
    const double sigma = finetuned_sde_.sigma(t);
    if (!(sigma > 0.0) || !std::isfinite(sigma)) {
      throw Error("adjoint matching needs sigma(t) > 0 and finite on the grid, but " +
                  noise->describe() + " gives sigma(" + std::to_string(t) + ") = " +
                  std::to_string(sigma) + "; fine-tune with the memoryless schedule");
    }
    scale_.push_back(options_.loss_weighting == "velocity" ? 1.0 : finetuned_sde_.coefficients(t).c_v / sigma);
    // rho = sigma^2 / c_v with h = 0; the memoryless schedule gives eta_t (infinite at t = 0).
    const double sigma0 = exact->sigma(*model_->schedule(), t);
    const double rho = sigma0 * sigma0 / exact->drift(*model_->schedule(), t).c_v;
    rho_.push_back(std::isfinite(rho) ? rho : INFINITY);
    if (std::isfinite(rho)) candidates_.push_back(k);
  }
  const int64_t available = static_cast<int64_t>(candidates_.size());
  if (options_.loss_early_steps + options_.loss_late_steps > available) {
    throw Error("adjoint matching: loss_early_steps + loss_late_steps = " +
                std::to_string(options_.loss_early_steps + options_.loss_late_steps) + " but only " +
                std::to_string(available) + " of the " + std::to_string(options_.num_steps) +
                " steps have a finite regression target");
  }
}

void AdjointMatching::set_batch_size(int64_t n) {
  if (n < 1) throw Error("adjoint matching: batch_size must be >= 1, got " + std::to_string(n));
  options_.batch_size = n;
}

Trajectory AdjointMatching::rollout(Generator& gen) const {
  at::NoGradGuard no_grad;
  const Tensor x0 = at::randn({options_.batch_size, model_->dim()}, gen);
  // With the noiseless final step, X_K is never used: stop at t_{K-1}.
  std::vector<double> times = grid_.times();
  if (options_.final_noiseless_step) times.pop_back();
  if (times.size() < 2) {
    Trajectory only_x0;
    only_x0.t = times;
    only_x0.x = {x0};
    return only_x0;
  }
  SampleOptions opts;
  opts.record = true;
  return simulate(finetuned_sde_, x0, TimeGrid(times), gen, opts);
}

std::vector<int64_t> AdjointMatching::loss_steps(Generator& gen) const {
  // The last loss_late_steps candidates always; loss_early_steps drawn without replacement from
  // the others (Adjoint Matching, App. G.2).
  const int64_t n = static_cast<int64_t>(candidates_.size());
  const int64_t first_late = n - options_.loss_late_steps;
  std::vector<int64_t> steps(candidates_.begin() + first_late, candidates_.end());
  if (options_.loss_early_steps > 0 && first_late > 0) {
    const Tensor perm = at::randperm(first_late, gen, at::TensorOptions().dtype(at::kLong));
    const int64_t take = std::min(options_.loss_early_steps, first_late);
    for (int64_t i = 0; i < take; ++i) steps.push_back(candidates_[perm[i].item<int64_t>()]);
  }
  std::sort(steps.begin(), steps.end());
  return steps;
}

LossOutput AdjointMatching::compute(Generator& gen) {
  const Trajectory traj = rollout(gen);
  const LeanAdjoint adj = lean_adjoint(base_sde_, traj.x, grid_, *reward_, options_.lambda,
                                       options_.final_noiseless_step);
  const std::vector<int64_t> steps = loss_steps(gen);

  // All chosen (k, sample) pairs in one batch through the trainable network.
  std::vector<Tensor> xs, ts, vb, target, scale;
  const int64_t B = options_.batch_size;
  for (int64_t k : steps) {
    const auto opts = traj.x[k].options();
    xs.push_back(traj.x[k]);
    ts.push_back(at::full({B}, grid_[k], opts));
    vb.push_back(adj.v_base[k]);
    target.push_back(rho_[k] * adj.a[k]);
    scale.push_back(at::full({B, 1}, scale_[k], opts));
  }
  const Tensor x = at::cat(xs), t = at::cat(ts);
  const Tensor delta = model_->delta(x, t, at::cat(vb));
  // (c_v / sigma)(v_theta - v_base + rho a); = u + sigma a when h = 0.
  const Tensor residual = at::cat(scale) * (delta + at::cat(target));
  Tensor terms = residual.pow(2).sum(1);  // [S * B]
  const Tensor raw = terms.detach();
  double clipped_fraction = 0.0;
  if (options_.clip_factor > 0) {
    const double lct = options_.clip_factor * options_.lambda * options_.lambda;
    clipped_fraction = (raw > lct).to(at::kDouble).mean().item<double>();
    terms = at::clamp_max(terms, lct);
  }
  LossOutput out;
  // Sum over the chosen times, mean over the batch (App. G.3).
  out.loss = terms.sum() / static_cast<double>(B);
  at::NoGradGuard no_grad;
  out.metrics.emplace_back("reward", reward_->value(adj.x1).mean().item<double>());
  out.metrics.emplace_back("loss_unclipped", raw.sum().item<double>() / static_cast<double>(B));
  out.metrics.emplace_back("clipped_fraction", clipped_fraction);
  out.metrics.emplace_back("adjoint_norm_t0", adj.a[0].norm(2, {1}).mean().item<double>());
  return out;
}

}  // namespace tilt
