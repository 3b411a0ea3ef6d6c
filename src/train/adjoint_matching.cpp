#include "tilt/train/adjoint_matching.h"

#include "tilt/core/check.h"
#include "tilt/core/error.h"
#include "tilt/model/mlp.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>  // at::NoGradGuard; not pulled in by ATen.h since LibTorch 2.0
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <chrono>
#include <functional>
#include <cmath>
#include <numeric>

namespace tilt {

namespace {

// Adds the time since the last lap to *slot (if timing is on).
class PhaseClock {
 public:
  explicit PhaseClock(bool on) : on_(on), last_(now()) {}
  void lap(double* slot) {
    if (!on_) return;
    const double t = now();
    *slot += t - last_;
    last_ = t;
  }

 private:
  static double now() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
  }
  bool on_;
  double last_;
};

// (grad_x b_base(X_k, t_k))^T a and v_base(X_k, t_k): by the base field's own VJP, or from a tape.
using DriftVjp = std::function<Tensor(int64_t k, const Tensor& a, Tensor* v_base)>;

LeanAdjoint lean_adjoint_impl(const std::vector<Tensor>& x, const TimeGrid& grid, const Reward& reward,
                              double lambda, bool final_noiseless_step, const DriftVjp& drift_vjp,
                              const std::function<Tensor(int64_t k, const Tensor& a, Tensor* v)>& velocity_vjp) {
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
    // a_{K-1} = a_K + h (dv_base/dx)^T a_K, the adjoint of that step. The reward's gradient is needed
    // before the VJP, so the velocity comes from a first call with a = 0 when it is not taped.
    const double h = grid.step(k);
    Tensor v;
    velocity_vjp(k, Tensor(), &v);
    out.x1 = (x[k] + h * v).detach();
    out.a[K] = -lambda * reward.grad(out.x1);
    out.a[k] = out.a[K] + h * velocity_vjp(k, out.a[K], nullptr);
    out.v_base[k] = v;
    --k;
  } else {
    out.x1 = x[K];
    out.a[K] = -lambda * reward.grad(out.x1);
  }
  for (; k >= 0; --k) {
    // a_k = a_{k+1} + h_k (grad_x b_base(X_k, t_k))^T a_{k+1}  (Adjoint Matching, Eq. 41; spec sec. 4)
    out.a[k] = out.a[k + 1] + grid.step(k) * drift_vjp(k, out.a[k + 1], &out.v_base[k]);
  }
  return out;
}

}  // namespace

LeanAdjoint lean_adjoint(const GenerativeSDE& base_sde, const std::vector<Tensor>& x, const TimeGrid& grid,
                         const Reward& reward, double lambda, bool final_noiseless_step) {
  // The last noiseless step through autograd, keeping the graph between the two calls.
  Tensor xg, v;
  auto velocity_vjp = [&](int64_t k, const Tensor& a, Tensor* v_out) -> Tensor {
    if (!a.defined()) {
      at::AutoGradMode enable_grad(true);
      xg = x[k].detach().requires_grad_(true);
      v = base_sde.velocity().velocity(xg, grid[k]);
      *v_out = v.detach();
      return Tensor();
    }
    at::AutoGradMode enable_grad(true);
    return torch::autograd::grad({v}, {xg}, {a})[0];
  };
  auto drift_vjp = [&](int64_t k, const Tensor& a, Tensor* v_out) {
    return base_sde.drift_vjp(x[k], grid[k], a, v_out);
  };
  return lean_adjoint_impl(x, grid, reward, lambda, final_noiseless_step, drift_vjp, velocity_vjp);
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

bool AdjointMatching::taped() const {
  return options_.tape_activations && std::dynamic_pointer_cast<MlpVelocity>(model_->trainable()) != nullptr;
}

LossOutput AdjointMatching::compute(Generator& gen) {
  if (taped()) return compute_taped(gen);
  PhaseClock clock(times_ != nullptr);
  AdjointMatchingTimes unused;
  AdjointMatchingTimes& times = times_ ? *times_ : unused;
  const Trajectory traj = rollout(gen);
  clock.lap(&times.rollout_s);
  const LeanAdjoint adj = lean_adjoint(base_sde_, traj.x, grid_, *reward_, options_.lambda,
                                       options_.final_noiseless_step);
  clock.lap(&times.adjoint_s);
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
  clock.lap(&times.regression_s);
  return out;
}

}  // namespace tilt

namespace tilt {

// The same iteration as compute()'s autograd path, with the networks run once. The rollout records the
// activations of the trainable MLP (and of an MLP base) at every step; the lean adjoint takes the base's
// VJPs from the tapes; the regression's residuals come from the taped outputs, and the gradient of the
// loss with respect to them,
//   dL/d delta_k = (2 / B) s_k^2 (delta_k + rho_k a_k)   (0 for clipped terms),
// is backpropagated through the taped layers by hand (MlpVelocity::parameter_grads). The loss returned
// is the value plus sum_p <p - stop_grad(p), dL/dp>, which is the value itself and whose gradient is dL/dp.
LossOutput AdjointMatching::compute_taped(Generator& gen) {
  const auto trainable = std::dynamic_pointer_cast<MlpVelocity>(model_->trainable());
  const auto base_mlp = std::dynamic_pointer_cast<MlpVelocity>(model_->base());
  const bool residual_mode = model_->mode() == FineTuneMode::residual;
  const int64_t B = options_.batch_size, K = grid_.steps();
  PhaseClock clock(times_ != nullptr);
  AdjointMatchingTimes unused;
  AdjointMatchingTimes& times = times_ ? *times_ : unused;
  LossOutput out;
  std::vector<Tensor> grads;
  {
    at::NoGradGuard no_grad;
    // Rollout: the Euler-Maruyama steps of simulate(), with the same random draws.
    const Tensor x0 = at::randn({B, model_->dim()}, gen);
    const int64_t steps = options_.final_noiseless_step ? K - 1 : K;
    std::vector<Tensor> x{x0};
    std::vector<MlpTape> base_tapes(static_cast<size_t>(K)), tapes(static_cast<size_t>(K));
    std::vector<Tensor> v_base(static_cast<size_t>(K)), net_out(static_cast<size_t>(K));
    for (int64_t k = 0; k < steps; ++k) {
      const double t = grid_[k], h = grid_.step(k);
      const Tensor& xk = x.back();
      v_base[k] = base_mlp ? base_mlp->forward_taped(xk, t, &base_tapes[k]) : model_->base()->velocity(xk, t);
      net_out[k] = trainable->forward_taped(xk, t, &tapes[k], true);
      const Tensor v = residual_mode ? v_base[k] + net_out[k] : net_out[k];
      Tensor next = xk + h * finetuned_sde_.drift_from_velocity(v, xk, t);
      const double sigma = finetuned_sde_.sigma(t);
      if (sigma != 0.0) next = next + (std::sqrt(h) * sigma) * at::randn(next.sizes(), gen, next.options());
      x.push_back(next);
    }
    if (options_.final_noiseless_step && base_mlp) {
      v_base[K - 1] = base_mlp->forward_taped(x[K - 1], grid_[K - 1], &base_tapes[K - 1]);
    }
    clock.lap(&times.rollout_s);

    // Lean adjoint from the tapes (or the base's own VJP when it is not an MLP).
    auto drift_vjp = [&](int64_t k, const Tensor& a, Tensor* v_out) -> Tensor {
      if (!base_mlp) return base_sde_.drift_vjp(x[k], grid_[k], a, v_out);
      const DriftCoefficients c = base_sde_.coefficients(grid_[k]);
      *v_out = v_base[k];
      return c.c_v * base_mlp->vjp_taped(base_tapes[k], a) - c.c_x * a;
    };
    Tensor xg, vg;  // the noiseless last step of a non-MLP base, through autograd as in lean_adjoint()
    auto velocity_vjp = [&](int64_t k, const Tensor& a, Tensor* v_out) -> Tensor {
      if (base_mlp) {
        if (!a.defined()) {
          *v_out = v_base[k];
          return Tensor();
        }
        return base_mlp->vjp_taped(base_tapes[k], a);
      }
      at::AutoGradMode enable_grad(true);
      if (!a.defined()) {
        xg = x[k].detach().requires_grad_(true);
        vg = model_->base()->velocity(xg, grid_[k]);
        *v_out = vg.detach();
        return Tensor();
      }
      return torch::autograd::grad({vg}, {xg}, {a})[0];
    };
    const LeanAdjoint adj = lean_adjoint_impl(x, grid_, *reward_, options_.lambda, options_.final_noiseless_step,
                                              drift_vjp, velocity_vjp);
    clock.lap(&times.adjoint_s);
    const std::vector<int64_t> loss_k = loss_steps(gen);

    // Regression terms |s_k (delta_k + rho_k a_k)|^2 per sample, as in the autograd path.
    std::vector<const MlpTape*> used;
    std::vector<Tensor> residual;  // s_k (delta_k + rho_k a_k), [B, d] per loss step
    for (int64_t k : loss_k) {
      if (!net_out[k].defined()) net_out[k] = trainable->forward_taped(x[k], grid_[k], &tapes[k], true);
      const Tensor delta = residual_mode ? net_out[k] : net_out[k] - adj.v_base[k];
      residual.push_back(scale_[k] * (delta + rho_[k] * adj.a[k]));
      used.push_back(&tapes[k]);
    }
    const Tensor terms = at::cat(residual).pow(2).sum(1);  // [S * B]
    Tensor kept = at::ones_like(terms);
    double clipped_fraction = 0.0;
    Tensor loss = terms.sum();
    if (options_.clip_factor > 0) {
      // clamp_max(terms, LCT) passes the gradient where terms <= LCT.
      const double lct = options_.clip_factor * options_.lambda * options_.lambda;
      kept = (terms <= lct).to(terms.scalar_type());
      clipped_fraction = (terms > lct).to(at::kDouble).mean().item<double>();
      loss = at::clamp_max(terms, lct).sum();
    }
    loss = loss / static_cast<double>(B);
    // dL/d delta_k = (2 / B) s_k^2 (delta_k + rho_k a_k) on kept terms = (2 / B) s_k residual_k kept.
    std::vector<Tensor> g_out;
    for (size_t i = 0; i < loss_k.size(); ++i) {
      const Tensor kept_i = kept.narrow(0, static_cast<int64_t>(i) * B, B).unsqueeze(1);
      g_out.push_back((2.0 * scale_[loss_k[i]] / static_cast<double>(B)) * residual[i] * kept_i);
    }
    grads = trainable->parameter_grads(used, g_out);

    out.loss = loss;
    out.metrics.emplace_back("reward", reward_->value(adj.x1).mean().item<double>());
    out.metrics.emplace_back("loss_unclipped", terms.sum().item<double>() / static_cast<double>(B));
    out.metrics.emplace_back("clipped_fraction", clipped_fraction);
    out.metrics.emplace_back("adjoint_norm_t0", adj.a[0].norm(2, {1}).mean().item<double>());
  }
  // A loss whose value is the loss and whose gradient with respect to the parameters is `grads`.
  const std::vector<Tensor> params = trainable->parameters();
  if (params.size() != grads.size()) throw Error("adjoint matching: the trainable network has frozen parameters");
  Tensor zero;
  for (size_t i = 0; i < params.size(); ++i) {
    const Tensor term = (params[i] - params[i].detach()).mul(grads[i]).sum();
    zero = zero.defined() ? zero + term : term;
  }
  out.loss = out.loss + zero;
  clock.lap(&times.regression_s);
  return out;
}

}  // namespace tilt
