#include "tilt/train/adjoint_matching.h"
#include "weight_metrics.h"

#include "tilt/core/check.h"
#include "tilt/core/error.h"
#include "tilt/core/log.h"
#include "tilt/model/taped.h"
#include "tilt/sde/engine.h"
#include "tilt/sde/gddim.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>  // at::NoGradGuard; not pulled in by ATen.h since LibTorch 2.0

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

// The kernels the lean adjoint runs back through (Adjoint Matching, Eq. 41;
// docs/equations.md, E23): the Euler steps of the
// frozen base drift, a_k = (1 - h c_x) a_{k+1} + h c_v (dv_base/dx)^T a_{k+1}. With the noiseless final
// step, the last kernel is the step actually taken, X^_1 = X_{K-1} + h v_base(X_{K-1}), so that a_k is
// exactly the gradient of g(X^_1) with respect to X_k through the discretised base dynamics. With the exact
// step (E135) they are the base's exact gDDIM steps, whose last one, to t = 1, is noiseless already.
std::vector<StepKernel> adjoint_kernels(const GenerativeSDE& base_sde, const TimeGrid& grid, bool final_noiseless_step,
                                        Integrator integrator) {
  std::vector<StepKernel> kernels = step_kernels(base_sde, grid, integrator);
  if (final_noiseless_step && integrator == Integrator::euler) kernels.back() = {1.0, grid.step(grid.steps() - 1), 0.0};
  return kernels;
}

// log dP_base / dQ_model of a rollout of the fine-tuned SDE (docs/equations.md, E93, E104): on each noisy step k
// the two kernels (Euler-Maruyama or exact) have the same std and means that differ by c_v,k (v_model - v_base)(X_k), given
// by `difference(k)`; xi[k] is the step's draw. Steps without a draw (the noiseless final step, the same for both
// chains) add nothing. [n] in double.
Tensor control_log_path(const std::vector<StepKernel>& kernels, const std::vector<Tensor>& xi, int64_t n,
                        const std::function<Tensor(int64_t)>& difference) {
  PathWeight weight(n);
  for (size_t k = 0; k < xi.size(); ++k) {
    if (xi[k].defined()) weight.add_step(kernels[k].c_v * difference(static_cast<int64_t>(k)), xi[k], kernels[k].std);
  }
  return weight.log_weight();
}

// The share of the loss carried by its largest terms, the top 1% (at least one; `terms` after clipping, [n]): 1% when
// the terms are alike, near 1 when a few (X_k, t_k) rows carry the loss and so set its gradient.
double top_share(const Tensor& terms) {
  const Tensor t = terms.detach().reshape({-1}).to(at::kDouble);
  const double total = t.sum().item<double>();
  if (!(total > 0)) return 0.0;
  const int64_t k = std::max<int64_t>(1, (t.numel() + 99) / 100);
  return std::get<0>(at::topk(t, k)).sum().item<double>() / total;
}

// The metrics of a regression on `batch`: the mean reward of its paths, the loss before clipping, the clipped share of
// the terms and the top share of the kept ones (`terms`, weighted as in the loss), and |a_0|.
void add_regression_metrics(LossOutput& out, const AdjointBatch& batch, double loss_unclipped, double clipped_fraction,
                            const Tensor& terms) {
  out.metrics.emplace_back("reward", batch.reward.mean().item<double>());
  out.metrics.emplace_back("loss_unclipped", loss_unclipped);
  out.metrics.emplace_back("clipped_fraction", clipped_fraction);
  out.metrics.emplace_back("adjoint_norm_t0", batch.adjoint.a[0].norm(2, {1}).mean().item<double>());
  out.metrics.emplace_back("loss_top_share", top_share(terms));
}

}  // namespace

LeanAdjoint lean_adjoint(const GenerativeSDE& base_sde, const std::vector<Tensor>& x, const TimeGrid& grid,
                         const Reward& reward, double lambda, bool final_noiseless_step, const Tensor& c,
                         double guidance, std::vector<KeptForwards>* kept_base, Integrator integrator) {
  const int64_t K = grid.steps();
  if (integrator == Integrator::exact && !final_noiseless_step) {
    throw Error("lean adjoint: the exact step needs the noiseless final step (its step to t = 1 has no noise)");
  }
  const std::vector<StepKernel> kernels = adjoint_kernels(base_sde, grid, final_noiseless_step, integrator);
  const size_t needed = static_cast<size_t>(final_noiseless_step ? K : K + 1);
  if (x.size() < needed) {
    throw Error("lean adjoint: needs " + std::to_string(needed) + " recorded states, got " +
                std::to_string(x.size()));
  }
  at::NoGradGuard no_grad;
  const VelocityFieldPtr& base = base_sde.velocity_ptr();
  LeanAdjoint out;
  out.a.resize(static_cast<size_t>(K) + 1);
  out.v_base.resize(static_cast<size_t>(K));
  if (final_noiseless_step) {
    // X^_1 = X_{K-1} + h v_base(X_{K-1}, t_{K-1}), the noiseless last step (App. G.1); the exact step's own.
    out.v_base[K - 1] = velocity_by_rows(base, c, guidance, x[K - 1], grid[K - 1]);
    out.x1 = kernels.back().mean(x[K - 1], out.v_base[K - 1]);
  } else {
    out.x1 = x[K];
  }
  out.a[K] = -lambda * reward.grad(out.x1);
  lean_adjoint_recursion(out.a, kernels,
                         [&](int64_t k, const Tensor& a) {
                           KeptForwards* kept = kept_base && k < static_cast<int64_t>(kept_base->size())
                                                    ? &(*kept_base)[static_cast<size_t>(k)]
                                                    : nullptr;
                           return vjp_by_rows(base, c, guidance, x[k], grid[k], a, &out.v_base[k], kept);
                         });
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
  check_conditions(options_.conditions, model_->condition_dim(), "adjoint matching");
  check_reward_condition(*reward_, model_->condition_dim(), "adjoint matching");
  check_guidance();
  if (options_.loss_early_steps < 0 || options_.loss_late_steps < 0 ||
      options_.loss_early_steps + options_.loss_late_steps < 1) {
    throw Error("adjoint matching: need loss_early_steps, loss_late_steps >= 0 with a positive sum, got " +
                std::to_string(options_.loss_early_steps) + " + " + std::to_string(options_.loss_late_steps));
  }
  if (!std::isfinite(options_.lambda)) throw Error("adjoint matching: lambda must be finite");
  if (!(options_.loss_t_min >= 0.0 && options_.loss_t_min < 1.0)) {
    throw Error("adjoint matching: loss_t_min must be in [0, 1), got " + number_string(options_.loss_t_min));
  }
  if (options_.loss_weighting != "control" && options_.loss_weighting != "velocity") {
    throw Error("adjoint matching: loss_weighting must be 'control' or 'velocity', got '" + options_.loss_weighting + "'");
  }
  // The paper's offset is one step of the grid, h = 1/K (as tilt finetune and make_finetune_plan set it);
  // the library's default, 1/40, is that only for K = 40. Not an error: any h > 0 is a valid schedule.
  const double one_step = 1.0 / static_cast<double>(options_.num_steps);
  if (noise->is_memoryless() && options_.integrator != Integrator::exact && std::abs(noise->h() - one_step) > 1e-9 * one_step) {
    warning("adjoint matching: the memoryless offset h = " + number_string(noise->h()) + " is not one step 1/K = " +
            number_string(one_step) + " of its K = " + std::to_string(options_.num_steps) +
            " steps (the paper's choice: noise = \"memoryless\" without an offset in a config, "
            "make_memoryless_noise(1.0 / K) in C++)");
  }
  const bool exact_step = options_.integrator == Integrator::exact;
  if (options_.integrator == Integrator::heun) {
    throw Error("adjoint matching: integrator must be euler or exact (heun's step is not Gaussian), got heun");
  }
  if (exact_step) {
    if (!options_.final_noiseless_step) {
      throw Error("adjoint matching: integrator = exact needs final_noiseless_step = true (the exact step to t = 1 has "
                  "no noise: the reward is taken at the base's X^_1)");
    }
    try {
      stochasticity_of(*noise);
    } catch (const Error& e) {
      throw Error("adjoint matching: integrator = exact steps the schedules sigma = gamma sqrt(2 eta) (memoryless, "
                  "scaled_memoryless): " + std::string(e.what()));
    }
  }
  if (options_.target != "continuous" && options_.target != "chain") {
    throw Error("adjoint matching: target must be 'continuous' or 'chain', got '" + options_.target + "'");
  }
  const bool chain_target = options_.target == "chain";
  if (chain_target) target_shift_ = 1;
  const std::vector<StepKernel> kernels = chain_target ? chain_kernels() : std::vector<StepKernel>();
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
    // rho = sigma^2 / c_v with h = 0; the memoryless schedule gives eta_t (infinite at t = 0). The chain target:
    // the tilt of a Gaussian step shifts its mean by -std^2 a_{k+1}, so rho = std_k^2 / c_v,k (E135), finite at
    // t = 0; the noiseless last step (final_noiseless_step, or the exact step to t = 1) has no noise to tilt and so
    // no target.
    const double sigma0 = exact->sigma(*model_->schedule(), t);
    const StepKernel* q = chain_target ? &kernels[static_cast<size_t>(k)] : nullptr;
    const bool noiseless = q && (q->deterministic() || (options_.final_noiseless_step && k == grid_.steps() - 1));
    const double rho = q ? (noiseless ? INFINITY : q->std * q->std / q->c_v)
                         : sigma0 * sigma0 / exact->drift(*model_->schedule(), t).c_v;
    rho_.push_back(std::isfinite(rho) ? rho : INFINITY);
    if (std::isfinite(rho) && t >= options_.loss_t_min - 1e-9) candidates_.push_back(k);  // a grid point at loss_t_min is in
  }
  const int64_t available = static_cast<int64_t>(candidates_.size());
  if (options_.loss_early_steps + options_.loss_late_steps > available) {
    throw Error("adjoint matching: loss_early_steps + loss_late_steps = " +
                std::to_string(options_.loss_early_steps + options_.loss_late_steps) + " but only " +
                std::to_string(available) + " of the " + std::to_string(options_.num_steps) +
                " steps have a finite regression target" +
                (options_.loss_t_min > 0 ? " at t >= loss_t_min = " + number_string(options_.loss_t_min) : std::string()) +
                " (the noiseless last step has none); lower loss_early_steps or loss_late_steps so that they sum to at most " +
                std::to_string(available));
  }
}

void AdjointMatching::set_batch_size(int64_t n) {
  if (n < 1) throw Error("adjoint matching: batch_size must be >= 1, got " + std::to_string(n));
  options_.batch_size = n;
}

Trajectory AdjointMatching::rollout(Generator& gen, const Tensor& c) const {
  Trajectory out;
  Rollout r = recorded_rollout(gen, c, false);
  out.t = grid_.times();
  if (options_.final_noiseless_step) out.t.pop_back();
  out.x = std::move(r.x);
  return out;
}

// The rollout of simulate() (the same kernels and draws: X_0, then one N(0, I) per noisy step), recording
// the states and, with `weights`, each step's draw xi_k and the fine-tuned velocity for the path weight.
Rollout AdjointMatching::recorded_rollout(Generator& gen, const Tensor& c, bool weights,
                                          std::vector<KeptForwards>* kept_base) const {
  at::NoGradGuard no_grad;
  const Tensor x0 = normal_draws({options_.batch_size, model_->dim()}, gen, at::TensorOptions().device(model_->device()));
  // With the noiseless final step, X_K is never used: stop at t_{K-1}.
  std::vector<double> times = grid_.times();
  if (options_.final_noiseless_step) times.pop_back();
  if (times.size() < 2) {
    Rollout only_x0;
    only_x0.x = {x0};
    return only_x0;
  }
  RolloutRecord record;
  record.states = true;
  record.noise = record.velocities = weights;
  const TimeGrid grid(times);
  const VelocityFieldPtr model = model_;
  const double w = c.defined() ? options_.guidance : 0.0;
  if (kept_base) kept_base->assign(static_cast<size_t>(grid_.steps()), KeptForwards());
  std::vector<StepKernel> kernels = chain_kernels();  // the chain's, to the last of `times`
  kernels.resize(static_cast<size_t>(grid.steps()));
  return tilt::rollout(kernels,
                       [&](int64_t k, const Tensor& x) {
                         if (!kept_base) return velocity_by_rows(model, c, w, x, grid[k]);
                         // Residual mode, unguided: v_base + r_theta (FineTunedVelocity), the base's graph kept.
                         const Tensor v_base = velocity_by_rows(model_->base(), c, 0.0, x, grid[k],
                                                                &(*kept_base)[static_cast<size_t>(k)]);
                         return v_base + velocity_by_rows(model_->trainable(), c, 0.0, x, grid[k]);
                       },
                       x0, gen, record);
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

void AdjointMatching::check_guidance() const {
  const double w = options_.guidance;
  if (!std::isfinite(w)) throw Error("adjoint matching: guidance must be finite, got " + number_string(w));
  if (w == 0.0) {
    if (options_.guidance_adjoint || options_.guidance_control) {
      throw Error("adjoint matching: guidance_adjoint and guidance_control need guidance != 0 (the weight w of the "
                  "guided field they use)");
    }
    return;
  }
  if (!options_.conditions) {
    throw Error("adjoint matching: guidance = " + number_string(w) + " needs a conditional model and its training "
                "conditions (guidance is (1 + w) v(x, t | c) - w v(x, t | null))");
  }
  try {  // the base's null condition, at one point
    at::NoGradGuard no_grad;
    const at::TensorOptions on = at::TensorOptions().device(model_->base()->device());
    model_->base()->conditional_velocity(at::zeros({1, model_->dim()}, on), at::full({1}, 0.5, on), Tensor());
  } catch (const Error& e) {
    throw Error("adjoint matching: guidance = " + number_string(w) + " needs a base with a null condition (a model "
                "pretrained with condition dropout), but the base has none: " + e.what());
  }
}

// The regressed difference at the chosen states: (v_theta - v_base)(x, t | c), or with guidance_control its
// guided form (1 + w) (v_theta - v_base)(c) - w (v_theta - v_base)(null). v_base_c is v_base(x, t | c) when the
// caller has it (undefined: computed here, only where the copy mode needs it).
Tensor AdjointMatching::regressed_difference(const Tensor& x, const Tensor& t, const Tensor& v_base_c,
                                             const Tensor& c) const {
  const bool residual = model_->mode() == FineTuneMode::residual;
  auto base_at = [&](const Tensor& cond) {
    at::NoGradGuard no_grad;
    return residual ? Tensor() : model_->base()->conditional_velocity(x, t, cond);
  };
  const Tensor delta_c = model_->delta(x, t, v_base_c.defined() || residual ? v_base_c : base_at(c), c);
  if (!options_.guidance_control) return delta_c;
  const double w = options_.guidance;
  return (1.0 + w) * delta_c - w * model_->delta(x, t, base_at(Tensor()), Tensor());
}

bool AdjointMatching::keeps_base_forward() const {
  return options_.tape_activations && model_->mode() == FineTuneMode::residual && options_.guidance == 0.0 &&
         model_->base()->vjp_needs_autograd();
}

bool AdjointMatching::taped() const {
  return options_.tape_activations && !options_.conditions && model_->trainable()->taped_network() != nullptr;
}

AdjointBatch AdjointBatch::rows(const Tensor& index) const {
  auto pick = [&](const Tensor& t) { return t.defined() ? t.index_select(0, index.to(t.device())) : Tensor(); };
  auto pick_all = [&](const std::vector<Tensor>& v) {
    std::vector<Tensor> out;
    out.reserve(v.size());
    for (const Tensor& t : v) out.push_back(pick(t));
    return out;
  };
  AdjointBatch out;
  out.x = pick_all(x);
  out.adjoint.a = pick_all(adjoint.a);
  out.adjoint.v_base = pick_all(adjoint.v_base);
  out.adjoint.x1 = pick(adjoint.x1);
  out.c = pick(c);
  out.xi = pick_all(xi);
  out.v = pick_all(v);
  out.reward = pick(reward);
  out.log_w = pick(log_w);
  return out;
}

AdjointBatch AdjointMatching::simulate(Generator& gen, bool record_policy) const {
  PhaseClock clock(times_ != nullptr);
  AdjointMatchingTimes unused;
  AdjointMatchingTimes& times = times_ ? *times_ : unused;
  const int64_t B = options_.batch_size;
  AdjointBatch batch;
  // Each trajectory's condition, drawn first (an unconditional run draws nothing: its numbers stay).
  batch.c = options_.conditions ? options_.conditions->draw(B, gen).to(model_->device()) : Tensor();
  const bool weights = path_weights();
  std::vector<KeptForwards> kept_base;  // the base's forward graphs, step by step, when kept
  Rollout traj = recorded_rollout(gen, batch.c, weights || record_policy, keeps_base_forward() ? &kept_base : nullptr);
  clock.lap(&times.rollout_s);
  const RewardPtr reward = bind_condition(reward_, reward_->condition_dim() > 0 ? batch.c : Tensor());
  // guidance != 0 needs conditions (check_guidance), and kept graphs need guidance == 0.
  const double w_adjoint = options_.guidance_adjoint ? options_.guidance : 0.0;
  batch.adjoint = lean_adjoint(base_sde_, traj.x, grid_, *reward, options_.lambda, options_.final_noiseless_step,
                               batch.c, w_adjoint, kept_base.empty() ? nullptr : &kept_base, options_.integrator);
  clock.lap(&times.adjoint_s);
  at::NoGradGuard no_grad;
  batch.reward = reward->value(batch.adjoint.x1);
  if (weights) {
    // The rollout's velocities are v_theta(. | c) (no guidance) and the adjoint's v_base is v_base(. | c).
    batch.log_w = options_.lambda * batch.reward.to(at::kDouble) +
                  control_log_path(chain_kernels(), traj.xi, B,
                                   [&](int64_t k) { return traj.v[k] - batch.adjoint.v_base[k]; });
  }
  batch.x = std::move(traj.x);
  if (record_policy) {
    batch.xi = std::move(traj.xi);
    batch.v = std::move(traj.v);
  }
  return batch;
}

Tensor AdjointMatching::policy_velocity(const Tensor& x, int64_t k, const Tensor& c) const {
  at::NoGradGuard no_grad;
  if (!c.defined()) return model_->velocity(x, grid_[k]);
  return bind_condition(model_, c, options_.guidance)->velocity(x, grid_[k]);
}

Tensor AdjointMatching::regression_target(const std::vector<Tensor>& a, int64_t k) const {
  return -rho_.at(static_cast<size_t>(k)) * a.at(static_cast<size_t>(target_adjoint_step(k)));
}

std::vector<StepKernel> AdjointMatching::chain_kernels() const {
  return step_kernels(finetuned_sde_, grid_, options_.integrator);
}

LossOutput AdjointMatching::regression(const AdjointBatch& batch, const std::vector<int64_t>& steps,
                                       const std::vector<Tensor>& weights) const {
  if (taped() && !batch.c.defined()) return taped_regression(batch, steps, weights);
  PhaseClock clock(times_ != nullptr);
  AdjointMatchingTimes unused;
  AdjointMatchingTimes& times = times_ ? *times_ : unused;
  const int64_t B = batch.rows();
  const Tensor& c = batch.c;
  const LeanAdjoint& adj = batch.adjoint;
  const bool weighted = !weights.empty();
  // All chosen (k, sample) pairs in one batch through the trainable network.
  std::vector<Tensor> xs, ts, vb, target, scale, cs, ws;
  for (int64_t k : steps) {
    const auto opts = batch.x[k].options();
    xs.push_back(batch.x[k]);
    if (c.defined()) cs.push_back(c.to(opts));
    ts.push_back(at::full({B}, grid_[k], opts));
    vb.push_back(adj.v_base[k]);
    target.push_back(rho_[k] * adj.a[static_cast<size_t>(target_adjoint_step(k))]);
    scale.push_back(at::full({B, 1}, scale_[k], opts));
    if (weighted) ws.push_back(weights.at(static_cast<size_t>(k)).to(opts));
  }
  const Tensor x = at::cat(xs), t = at::cat(ts);
  // adj.v_base is v_base(. | c) unless the adjoint ran through the guided base.
  const bool guided_adjoint = options_.guidance_adjoint && options_.guidance != 0.0;
  const Tensor delta = regressed_difference(x, t, guided_adjoint ? Tensor() : at::cat(vb), c.defined() ? at::cat(cs) : Tensor());
  // (c_v / sigma)(v_theta - v_base + rho a); = u + sigma a when h = 0.
  const Tensor residual = at::cat(scale) * (delta + at::cat(target));
  Tensor terms = residual.pow(2).sum(1);  // [S * B]
  const Tensor w = weighted ? at::cat(ws) : Tensor();
  const Tensor raw = weighted ? terms.detach() * w : terms.detach();
  double clipped_fraction = 0.0;
  if (options_.clip_factor > 0) {
    const double lct = options_.clip_factor * options_.lambda * options_.lambda;
    clipped_fraction = (terms.detach() > lct).to(at::kDouble).mean().item<double>();
    terms = at::clamp_max(terms, lct);
  }
  if (weighted) terms = terms * w;
  LossOutput out;
  // Sum over the chosen times, mean over the batch (App. G.3).
  out.loss = terms.sum() / static_cast<double>(B);
  at::NoGradGuard no_grad;
  add_regression_metrics(out, batch, raw.sum().item<double>() / static_cast<double>(B), clipped_fraction, terms);
  clock.lap(&times.regression_s);
  return out;
}

LossOutput AdjointMatching::compute(Generator& gen) {
  if (taped()) return compute_taped(gen);
  const AdjointBatch batch = simulate(gen, false);
  LossOutput out = regression(batch, loss_steps(gen));
  if (batch.log_w.defined()) {
    last_log_w_ = batch.log_w;
    detail::add_weight_metrics(out, last_log_w_);
  }
  return out;
}

}  // namespace tilt

namespace tilt {

// One block of rows [r0, r0 + n) of the batch, with everything the taped iteration keeps for them. The
// tapes stay from one iteration to the next (forward_taped overwrites their tensors instead of
// allocating); the rest is rebuilt each iteration.
struct AdjointMatching::Tapes {
  struct Block {
    int64_t r0 = 0, n = 0;
    std::vector<std::unique_ptr<Tape>> base, trainable;
    std::vector<Tensor> x, v_base, net_out, a;  // X_k, v_base(X_k), the trainable net's output, a_k
    std::vector<Tensor> terms;                  // |residual|^2 per loss step, [n]
    std::vector<Tensor> grads;                  // this block's share of dL/dtheta
  };
  std::vector<Block> blocks;

  // n_blocks blocks of the batch x0 (B rows), for K steps, keeping the tapes of the last iteration.
  void prepare(int64_t n_blocks, int64_t K, const Tensor& x0, const TapedNetwork& trainable, const TapedNetwork* base) {
    const int64_t B = x0.size(0);
    blocks.resize(static_cast<size_t>(n_blocks));
    for (int64_t i = 0; i < n_blocks; ++i) {
      Block& b = blocks[i];
      b.r0 = B * i / n_blocks;
      b.n = B * (i + 1) / n_blocks - b.r0;
      b.base.resize(static_cast<size_t>(K));
      b.trainable.resize(static_cast<size_t>(K));
      for (size_t k = 0; k < b.base.size(); ++k) {
        if (!b.trainable[k]) b.trainable[k] = trainable.new_tape();
        if (base && !b.base[k]) b.base[k] = base->new_tape();
      }
      b.x.assign(1, x0.narrow(0, b.r0, b.n));
      b.v_base.assign(static_cast<size_t>(K), Tensor());
      b.net_out.assign(static_cast<size_t>(K), Tensor());
      b.a.assign(static_cast<size_t>(K) + 1, Tensor());
      b.terms.clear();
      b.grads.clear();
    }
  }

  // Runs f on every block, each on its own thread (nested tensor operations run single-threaded).
  void each(const std::function<void(Block&)>& f) {
    at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t begin, int64_t end) {
      at::NoGradGuard no_grad_here;  // grad mode is per thread
      for (int64_t i = begin; i < end; ++i) f(blocks[i]);
    });
  }

  // The blocks' rows of one per-block tensor, joined (block-major).
  Tensor join(const std::function<Tensor(const Block&)>& part) const {
    std::vector<Tensor> parts;
    for (const Block& b : blocks) parts.push_back(part(b));
    return at::cat(parts);
  }
};

AdjointMatching::~AdjointMatching() = default;

int64_t AdjointMatching::taped_blocks() const {
  return tapes_ ? std::max<int64_t>(1, static_cast<int64_t>(tapes_->blocks.size())) : 1;
}

namespace {

// A loss whose value is `value` and whose gradient with respect to `params` is `grads`:
// value + sum_p <p - stop_grad(p), dL/dp>.
Tensor loss_with_gradient(const Tensor& value, const std::vector<Tensor>& params, const std::vector<Tensor>& grads) {
  if (params.size() != grads.size()) throw Error("adjoint matching: the trainable network has frozen parameters");
  Tensor loss = value;
  for (size_t i = 0; i < params.size(); ++i) loss = loss + (params[i] - params[i].detach()).mul(grads[i]).sum();
  return loss;
}

}  // namespace

// The same iteration as compute()'s autograd path, with the networks run once. The rollout records the
// activations of the trainable network (and of a taped base) at every step; the lean adjoint takes the
// base's VJPs from the tapes; the regression's residuals come from the taped outputs, and the gradient of
// the loss with respect to them,
//   dL/d delta_k = (2 / B) s_k^2 (delta_k + rho_k a_k)   (0 for clipped terms),
// is backpropagated through the taped layers by hand (TapedNetwork::parameter_grads).
//
// Every row of the batch is independent until the sums of the loss and of the gradients, so on the CPU
// the batch is cut into one block of rows per thread and each thread runs the rollout, the adjoint and
// the regression of its block with single-threaded kernels: two parallel regions per phase instead of
// one per tensor operation (on the small matrices of these problems, the threads of a per-operation
// region spend more time meeting than multiplying). The random draws are made up front, in the order of
// simulate(), so the blocks see exactly the numbers the whole batch would.
LossOutput AdjointMatching::compute_taped(Generator& gen) {
  const TapedNetwork& trainable = *model_->trainable()->taped_network();
  const TapedNetwork* base_taped = model_->base()->taped_network();
  const int64_t B = options_.batch_size, K = grid_.steps();
  PhaseClock clock(times_ != nullptr);
  AdjointMatchingTimes unused;
  AdjointMatchingTimes& times = times_ ? *times_ : unused;
  LossOutput out;
  std::vector<Tensor> grads;
  {
    at::NoGradGuard no_grad;
    // The random draws of simulate(): X_0, then one N(0, I) per noisy step.
    const Tensor x0 = normal_draws({B, model_->dim()}, gen, at::TensorOptions().device(model_->device()));
    const std::vector<StepKernel> kernels = chain_kernels();
    std::vector<Tensor> noise(static_cast<size_t>(options_.final_noiseless_step ? K - 1 : K));
    for (size_t k = 0; k < noise.size(); ++k) {
      if (!kernels[k].deterministic()) noise[k] = normal_draws(x0.sizes(), gen, x0.options());
    }
    // Blocks of rows: one per thread on the CPU, when the base's VJP needs no autograd (a taped network
    // or an exact mixture: VelocityField::vjp_needs_autograd); at least 16 rows each.
    const bool split = x0.device().is_cpu() && (base_taped || !model_->base()->vjp_needs_autograd());
    if (!tapes_) tapes_ = std::make_unique<Tapes>();
    tapes_->prepare(split ? std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), B / 16)) : 1, K, x0,
                    trainable, base_taped);
    taped_rollout(kernels, noise);
    // Taken before the adjoint and the regression pass back through the tapes.
    const Tensor log_path = path_weights() ? taped_log_path(kernels, noise) : Tensor();
    clock.lap(&times.rollout_s);
    const Tensor x1 = taped_adjoint();
    clock.lap(&times.adjoint_s);
    out = taped_regression(loss_steps(gen), x1, grads);
    if (log_path.defined()) {
      last_log_w_ = options_.lambda * last_reward_.to(at::kDouble) + log_path;
      detail::add_weight_metrics(out, last_log_w_);
    }
  }
  out.loss = loss_with_gradient(out.loss, model_->trainable()->parameters(), grads);
  clock.lap(&times.regression_s);
  return out;
}

// Rollout: the kernels of simulate(), recording the activations.
void AdjointMatching::taped_rollout(const std::vector<StepKernel>& kernels, const std::vector<Tensor>& noise) {
  const TapedNetwork& trainable = *model_->trainable()->taped_network();
  const TapedNetwork* base_taped = model_->base()->taped_network();
  const VelocityField& base = *model_->base();
  const bool residual_mode = model_->mode() == FineTuneMode::residual;
  const int64_t K = grid_.steps(), steps = static_cast<int64_t>(noise.size());
  auto v_base = [&](Tapes::Block& b, int64_t k) {
    return base_taped ? base_taped->forward_taped(b.x[k], grid_[k], b.base[k].get()) : base.velocity(b.x[k], grid_[k]);
  };
  tapes_->each([&](Tapes::Block& b) {
    for (int64_t k = 0; k < steps; ++k) {
      b.v_base[k] = v_base(b, k);
      b.net_out[k] = trainable.forward_taped(b.x[k], grid_[k], b.trainable[k].get(), true);
      const Tensor v = residual_mode ? b.v_base[k] + b.net_out[k] : b.net_out[k];
      b.x.push_back(kernels[k].next(b.x[k], v, noise[k].defined() ? noise[k].narrow(0, b.r0, b.n) : Tensor()));
    }
    if (steps < K) b.v_base[K - 1] = v_base(b, K - 1);  // the noiseless final step's base velocity
  });
}

// Lean adjoint from the tapes (or the base's own VJP when it is not taped); with the noiseless final
// step, X^_1 = X_{K-1} + h v_base(X_{K-1}). Returns the point where the reward gradient was taken.
Tensor AdjointMatching::taped_adjoint() {
  const TapedNetwork* base_taped = model_->base()->taped_network();
  const VelocityField& base = *model_->base();
  const int64_t K = grid_.steps();
  const bool final_noiseless = options_.final_noiseless_step;
  const std::vector<StepKernel> back = adjoint_kernels(base_sde_, grid_, final_noiseless, options_.integrator);
  const Tensor x1 = tapes_->join([&](const Tapes::Block& b) {
    return final_noiseless ? back[K - 1].mean(b.x[K - 1], b.v_base[K - 1]) : b.x[K];
  });
  const Tensor a_K = -options_.lambda * reward_->grad(x1);
  tapes_->each([&](Tapes::Block& b) {
    b.a[K] = a_K.narrow(0, b.r0, b.n);
    lean_adjoint_recursion(b.a, back, [&](int64_t k, const Tensor& a) {
      return base_taped ? base_taped->vjp_taped(*b.base[k], a) : base.vjp(b.x[k], grid_[k], a);
    });
  });
  return x1;
}

// Regression terms |s_k (delta_k + rho_k a_k)|^2 per sample, as in the autograd path, and their gradient
// dL/d delta_k = (2 / B) s_k residual_k on kept terms (clamp_max passes it where terms <= LCT),
// backpropagated through the tapes into *grads. Returns the loss's value and the metrics.
LossOutput AdjointMatching::taped_regression(const std::vector<int64_t>& loss_k, const Tensor& x1,
                                             std::vector<Tensor>& grads) {
  const TapedNetwork& trainable = *model_->trainable()->taped_network();
  const bool residual_mode = model_->mode() == FineTuneMode::residual;
  const int64_t B = options_.batch_size;
  const bool clip = options_.clip_factor > 0;
  const double lct = options_.clip_factor * options_.lambda * options_.lambda;
  tapes_->each([&](Tapes::Block& b) {
    std::vector<const Tape*> used;
    std::vector<Tensor> g_out;
    for (int64_t k : loss_k) {
      if (!b.net_out[k].defined()) b.net_out[k] = trainable.forward_taped(b.x[k], grid_[k], b.trainable[k].get(), true);
      const Tensor delta = residual_mode ? b.net_out[k] : b.net_out[k] - b.v_base[k];
      const Tensor residual = scale_[k] * at::add(delta, b.a[target_adjoint_step(k)], rho_[k]);
      const Tensor terms = residual.pow(2).sum(1);
      Tensor g = (2.0 * scale_[k] / static_cast<double>(B)) * residual;
      if (clip) g.mul_((terms <= lct).unsqueeze(1).to(g.scalar_type()));
      b.terms.push_back(terms);
      g_out.push_back(g);
      used.push_back(b.trainable[k].get());
    }
    b.grads = trainable.parameter_grads(used, g_out);
  });
  const Tensor terms = tapes_->join([](const Tapes::Block& b) { return at::cat(b.terms); });  // [S * B], block-major
  grads = tapes_->blocks[0].grads;
  for (size_t i = 1; i < tapes_->blocks.size(); ++i) {
    for (size_t j = 0; j < grads.size(); ++j) grads[j].add_(tapes_->blocks[i].grads[j]);
  }
  LossOutput out;
  double clipped_fraction = 0.0;
  out.loss = terms.sum() / static_cast<double>(B);
  if (clip) {
    clipped_fraction = (terms > lct).to(at::kDouble).mean().item<double>();
    out.loss = at::clamp_max(terms, lct).sum() / static_cast<double>(B);
  }
  last_reward_ = reward_->value(x1);
  out.metrics.emplace_back("reward", last_reward_.mean().item<double>());
  out.metrics.emplace_back("loss_unclipped", terms.sum().item<double>() / static_cast<double>(B));
  out.metrics.emplace_back("clipped_fraction", clipped_fraction);
  out.metrics.emplace_back("adjoint_norm_t0",
                           tapes_->join([](const Tapes::Block& b) { return b.a[0]; }).norm(2, {1}).mean().item<double>());
  out.metrics.emplace_back("loss_top_share", top_share(clip ? at::clamp_max(terms, lct) : terms));
  return out;
}

// regression() through the trainable network's tapes (taped(), unconditional): one taped forward per loss step and the
// parameter gradients by hand, the same loss, gradients and metrics as the autograd path (a buffer's minibatch has no
// rollout tapes to reuse).
LossOutput AdjointMatching::taped_regression(const AdjointBatch& batch, const std::vector<int64_t>& steps,
                                             const std::vector<Tensor>& weights) const {
  PhaseClock clock(times_ != nullptr);
  AdjointMatchingTimes unused;
  AdjointMatchingTimes& times = times_ ? *times_ : unused;
  const TapedNetwork& trainable = *model_->trainable()->taped_network();
  const bool residual_mode = model_->mode() == FineTuneMode::residual;
  const int64_t B = batch.rows();
  const bool clip = options_.clip_factor > 0;
  const double lct = options_.clip_factor * options_.lambda * options_.lambda;
  // Blocks of rows, one per thread on the CPU (at least 16 rows each), as compute_taped splits its batch.
  const int64_t blocks = batch.x.front().device().is_cpu() ? std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), B / 16)) : 1;
  struct Part {
    std::vector<Tensor> terms, w, grads;  // per loss step: |residual|^2 and the weights, [n]; dL/dtheta of the block
  };
  std::vector<Part> parts(static_cast<size_t>(blocks));
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    at::NoGradGuard no_grad;  // grad mode is per thread
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r0 = B * i / blocks, n = B * (i + 1) / blocks - r0;
      Part& part = parts[static_cast<size_t>(i)];
      std::vector<std::unique_ptr<Tape>> tapes;
      std::vector<const Tape*> used;
      std::vector<Tensor> g_out;
      for (int64_t k : steps) {
        tapes.push_back(trainable.new_tape());
        const Tensor out_k = trainable.forward_taped(batch.x[k].narrow(0, r0, n), grid_[k], tapes.back().get(), true);
        const Tensor delta = residual_mode ? out_k : out_k - batch.adjoint.v_base[k].narrow(0, r0, n);
        const Tensor residual =
            scale_[k] * at::add(delta, batch.adjoint.a[target_adjoint_step(k)].narrow(0, r0, n), rho_[k]);
        const Tensor terms = residual.pow(2).sum(1);
        const Tensor w = weights.empty() ? at::ones_like(terms)
                                         : weights.at(static_cast<size_t>(k)).narrow(0, r0, n).to(terms.options());
        Tensor g = (2.0 * scale_[k] / static_cast<double>(B)) * residual * w.unsqueeze(1);
        if (clip) g.mul_((terms <= lct).unsqueeze(1).to(g.scalar_type()));
        part.terms.push_back(terms);
        part.w.push_back(w);
        g_out.push_back(g);
        used.push_back(tapes.back().get());
      }
      part.grads = trainable.parameter_grads(used, g_out);
    }
  });
  std::vector<Tensor> grads = parts.front().grads, all_terms, all_w;
  for (size_t i = 1; i < parts.size(); ++i) {
    for (size_t j = 0; j < grads.size(); ++j) grads[j].add_(parts[i].grads[j]);
  }
  for (const Part& part : parts) {
    all_terms.push_back(at::cat(part.terms));
    all_w.push_back(at::cat(part.w));
  }
  const Tensor raw = at::cat(all_terms), w = at::cat(all_w);
  const Tensor kept = (clip ? at::clamp_max(raw, lct) : raw) * w;  // the loss's terms
  LossOutput out;
  out.loss = loss_with_gradient(kept.sum() / static_cast<double>(B), model_->trainable()->parameters(), grads);
  at::NoGradGuard no_grad;
  const double clipped_fraction = clip ? (raw > lct).to(at::kDouble).mean().item<double>() : 0.0;
  add_regression_metrics(out, batch, (raw * w).sum().item<double>() / static_cast<double>(B), clipped_fraction, kept);
  clock.lap(&times.regression_s);
  return out;
}

// log dP_base/dQ_model of the taped rollout (E104), from the noise drawn up front and the velocities of the tapes.
Tensor AdjointMatching::taped_log_path(const std::vector<StepKernel>& kernels, const std::vector<Tensor>& noise) const {
  const bool residual_mode = model_->mode() == FineTuneMode::residual;
  return tapes_->join([&](const Tapes::Block& b) {
    std::vector<Tensor> xi;
    for (const Tensor& n : noise) xi.push_back(n.defined() ? n.narrow(0, b.r0, b.n) : Tensor());
    return control_log_path(kernels, xi, b.n, [&](int64_t k) {
      return residual_mode ? b.net_out[k] : b.net_out[k] - b.v_base[k];
    });
  });
}

}  // namespace tilt
