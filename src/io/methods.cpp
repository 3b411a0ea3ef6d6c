#include "tilt/io/methods.h"

#include "tilt/core/check.h"
#include "tilt/core/error.h"
#include "tilt/core/fs.h"
#include "tilt/io/builders.h"
#include "tilt/io/run.h"
#include "tilt/model/gmm.h"
#include "tilt/model/unet.h"
#include "tilt/sde/gddim.h"
#include "tilt/train/adjoint_matching.h"
#include "tilt/train/buffered_adjoint_matching.h"
#include "tilt/train/efficient_adjoint_matching.h"
#include "tilt/train/ode_adjoint_matching.h"
#include "tilt/train/policy_gradient.h"
#include "tilt/train/reinforce_adjoint_matching.h"
#include "tilt/train/reward_baselines.h"
#include "tilt/train/unified_losses.h"

#include <algorithm>
#include <deque>

namespace tilt {
namespace {

// The keys of [finetune.adjoint_matching]; old files have them in [finetune], where the other
// methods ignore them (with a note).
const std::vector<std::string> kAdjointMatchingKeys{"loss_early_steps", "loss_late_steps",      "clip_factor",
                                                    "loss_weighting",   "final_noiseless_step", "tape_activations",
                                                    "guidance",         "guidance_adjoint",     "guidance_control",
                                                    "dsm_until",        "dsm_rollout",          "dsm_rollout_steps",
                                                    "buffer_size",      "buffer_passes",        "buffer_weights",
                                                    "integrator",       "target"};
const std::vector<std::string> kPolicyKeys{"log_prob", "clip_range", "adv_clip_max", "scale_advantages", "inner_epochs"};
const std::vector<std::string> kGroupKeys{"group_size", "window", "window_strategy", "window_iters", "window_shift"};

std::string no_kl_warning(const std::string& method) {
  return "method = \"" + method + "\" maximises the reward with no KL term: it does not target p* ∝ p_base exp(lambda r) "
         "and loses diversity as it trains (a baseline, for comparison)";
}

// Two warnings about Adjoint Matching's regression (docs/method.md, "Is the run converging?"), each at most once,
// judged on the last kSignalWindow iterations: over half of the loss terms clipped in every one of them (clipped
// terms give no gradient); the largest 1% of the terms carrying over kDominatedShare of the loss in most of them
// (the median of loss_top_share: a few rows set the gradient). The regression's terms are heavy-tailed even in a
// healthy run: on configs/demo_2d.toml the top 1% carry 0.67 of the loss (median over 2400 iterations; the largest
// 20-iteration median 0.79), hence 0.9.
constexpr size_t kSignalWindow = 20;
constexpr double kDominatedShare = 0.9;

std::function<std::string(const LossOutput&)> regression_monitor(double clip_factor, double lambda,
                                                               const std::string& weighting, double dsm_until) {
  struct State {
    std::deque<double> clipped, top;
    bool warned_clipped = false, warned_top = false;
  };
  auto state = std::make_shared<State>();
  return [=](const LossOutput& out) -> std::string {
    State& st = *state;
    for (const auto& [key, value] : out.metrics) {
      if (key == "clipped_fraction") st.clipped.push_back(value);
      if (key == "loss_top_share") st.top.push_back(value);
    }
    if (st.clipped.size() > kSignalWindow) st.clipped.pop_front();
    if (st.top.size() > kSignalWindow) st.top.pop_front();
    const std::string window = "each of the last " + std::to_string(kSignalWindow) + " iterations";
    if (!st.warned_clipped && st.clipped.size() == kSignalWindow &&
        *std::min_element(st.clipped.begin(), st.clipped.end()) > 0.5) {
      st.warned_clipped = true;
      return "over half of the loss terms are clipped in " + window + " (clip_factor = " + number_string(clip_factor) +
             ", so LCT = clip_factor lambda^2 = " + number_string(clip_factor * lambda * lambda) +
             "); clipped terms give no gradient. Raise finetune.adjoint_matching.clip_factor or set it to 0";
    }
    if (!st.warned_top && st.top.size() == kSignalWindow &&
        quantile(std::vector<double>(st.top.begin(), st.top.end()), 0.5) > kDominatedShare) {
      st.warned_top = true;
      return "the loss is dominated by a few rows: the largest 1% of its terms carry over " +
             number_string(kDominatedShare) + " of it in most of the "
             "last " + std::to_string(kSignalWindow) + " iterations (median loss_top_share " +
             number_string(quantile(std::vector<double>(st.top.begin(), st.top.end()), 0.5)) +
             "), so a few (X_k, t_k) set the gradient. A larger batch_size" +
             (weighting == "velocity" ? std::string(", ") : std::string(", loss_weighting = \"velocity\" ")) +
             "or a clip_factor that clips only the outliers spreads it; when the early times carry it (the lean "
             "adjoint's heavy tail), " +
             (dsm_until > 0 ? "a larger finetune.adjoint_matching.dsm_until (now " + number_string(dsm_until) +
                                  ") gives more of them a light-tailed target"
                            : std::string("finetune.adjoint_matching.dsm_until = 0.5 gives them a light-tailed target")) +
             " (docs/method.md)";
    }
    return "";
  };
}

// preset = "small" (docs/config.md): the settings with which the random problem family (d = 2..10, twenty problems)
// reached p* (configs/random_family.toml with num_steps = 20, loss steps 6 + 3, integrator = "exact", dsm_until = 0.5,
// dsm_rollout = "exact" and dsm_rollout_steps = 120; README, "Problems nobody tuned for"). Where the exact step or the
// DSM term cannot serve the plan (small_preset_exact_chain), the K = 60 Euler-Maruyama chain the family passed first.
// Keys given win.
constexpr int64_t kSmallPresetExactSteps = 20, kSmallPresetEulerSteps = 60;
Json small_preset_finetune(bool exact_chain) {
  return Json{{"num_steps", exact_chain ? kSmallPresetExactSteps : kSmallPresetEulerSteps},
              {"batch_size", 256},
              {"iterations", 2400},
              {"lr", 4e-3},
              {"beta1", 0.9},
              {"weight_decay", 0.0},
              {"grad_clip", 0.0},
              {"lr_schedule", "cosine"}};
}

// Whether preset = "small" trains on its exact chain: Adjoint Matching on an unconditional base, sampled with the
// memoryless family sigma = gamma sqrt(2 eta) (what the exact step integrates, E135) to a noiseless last step, with the
// DSM term on (no guidance, the velocity weighting, dsm_until not 0) -- the configuration the twenty problems passed,
// 0.67x the cost of K = 60 (scripts/preset_cost.sh). Without the DSM term K = 20 is far worse on the family's hard
// problems (docs/random_family_k20_exact.md), hence the K = 60 Euler chain there. Read from the keys as given (peek),
// before num_steps is.
bool small_preset_exact_chain(const ConfigSection& finetune, const ConfigSection& table, const FinetunePlan& plan) {
  if (plan.method != "adjoint_matching" || plan.conditions) return false;
  const auto is = [](const Json* v, const Json& value) { return v == nullptr || *v == value; };
  const auto number_is = [](const Json* v, double value) { return v == nullptr || (v->is_number() && v->get<double>() == value); };
  if (!is(table.peek("integrator"), "exact") || !is(table.peek("final_noiseless_step"), true) ||
      !number_is(table.peek("guidance"), 0.0) || !is(table.peek("loss_weighting"), "velocity")) {
    return false;
  }
  if (const Json* tau = table.peek("dsm_until"); tau && tau->is_number() && tau->get<double>() == 0.0) return false;
  const Json* noise = finetune.peek("noise");
  if (noise == nullptr) return true;  // "memoryless"
  if (!noise->is_string()) return false;  // refused when read
  try {
    stochasticity_of(*parse_noise_schedule(noise->get<std::string>()));
    return true;
  } catch (const Error&) {
    return false;  // another schedule (or an invalid one, refused when read)
  }
}

// preset = "auto": "small" for Adjoint Matching on a vector base (a tilt MLP, a mixture, a TorchScript module) of at
// most kSmallPresetMaxDim dimensions, the problems on which "small" was validated (the random family, d = 2..10, four
// more random problems at d = 12..16, docs/random_family_high_d.md, and an outside check at 11 and 16, where the
// paper's defaults left the base as it was, 333x the noise floor; the 2-D demos); "paper" elsewhere (image models,
// other methods). A run resumes with the preset it started with (keep_preset_of_run), whatever this limit was then.
constexpr int64_t kSmallPresetMaxDim = 16;
bool vector_base(const VelocityField& base) {
  const std::string kind = base.kind();
  return kind == "mlp" || kind == "gmm" || kind == "conditional_gmm" || kind == "torchscript";
}
std::string auto_preset(const std::string& method, const VelocityField& base) {
  return method == "adjoint_matching" && vector_base(base) && base.dim() <= kSmallPresetMaxDim ? "small" : "paper";
}

// ... and of [finetune.adjoint_matching] at K = num_steps: a third of the steps drawn and the last sixth always
// (6 and 3 at K = 20, 20 and 10 at K = 60), the velocity weighting, no clipping, the exact step on its exact chain.
// dsm_until: small_preset_dsm_until; dsm_rollout_steps: small_preset_rollout_steps.
Json small_preset_adjoint_matching(int64_t num_steps, bool exact_chain) {
  return Json{{"loss_early_steps", num_steps / 3},
              {"loss_late_steps", std::max<int64_t>(1, num_steps / 6)},
              {"loss_weighting", "velocity"},
              {"clip_factor", 0.0},
              {"integrator", exact_chain ? "exact" : "euler"}};
}

// ... and the DSM rollouts' chain: 120 steps, or twice the grid where that is finer (E115: its error is the DSM
// target's; with 2K = 40 at K = 20 the family's ODE median was 1.35x the floor against 1.05x with 120,
// docs/random_family_small_k20_exact_dsm40.md), within the limits.
constexpr int64_t kSmallPresetRolloutSteps = 120;
int64_t small_preset_rollout_steps(const FinetunePlan& plan) {
  return std::min<int64_t>({std::max(kSmallPresetRolloutSteps, 2 * plan.num_steps), limits::kSteps,
                            limits::kStepsTimesBatch / plan.batch_size});
}

// Why dsm_until = tau (in range) cannot serve this plan, as the message of an error on the key; empty if it can:
// it needs an unconditional base, no guidance, the velocity weighting, and enough steps at t >= tau for the loss's.
std::string dsm_until_conflict(const FinetunePlan& plan, const AdjointMatchingOptions& am, double tau) {
  if (plan.conditions) return "needs an unconditional base (the weighted samples are of one p*)";
  if (am.guidance != 0.0) return "cannot be combined with guidance in training";
  if (am.loss_weighting != "velocity") return "needs loss_weighting = \"velocity\" (both regressions are of v_theta - v_base)";
  int64_t left = 0;  // the grid's steps t_k = k / K >= tau with a finite target (k >= 1)
  for (int64_t k = 1; k < plan.num_steps; ++k) left += static_cast<double>(k) / static_cast<double>(plan.num_steps) >= tau - 1e-9;
  if (am.loss_early_steps + am.loss_late_steps > left) {
    return "= " + number_string(tau) + " leaves " + std::to_string(left) + " of the " + std::to_string(plan.num_steps) +
           " steps to Adjoint Matching (t_k >= loss_t_min = " + number_string(tau) +
           "), fewer than loss_early_steps + loss_late_steps = " +
           std::to_string(am.loss_early_steps + am.loss_late_steps);
  }
  return "";
}

// preset = "small" regresses t < 0.5 onto DSM (E106) where dsm_until can serve the plan; elsewhere the paper's loss
// (0).
constexpr double kSmallPresetDsmUntil = 0.5;
double small_preset_dsm_until(const FinetunePlan& plan, const AdjointMatchingOptions& am) {
  return dsm_until_conflict(plan, am, kSmallPresetDsmUntil).empty() ? kSmallPresetDsmUntil : 0.0;
}

// A method's options with the plan's grid, batch and lambda (what every method shares).
template <class Options>
Options plan_grid(const FinetunePlan& plan) {
  Options o;
  o.num_steps = plan.num_steps;
  o.batch_size = plan.batch_size;
  o.lambda = plan.lambda;
  return o;
}

// ... and the training conditions, for the methods that take them.
template <class Options>
Options plan_options(const FinetunePlan& plan) {
  Options o = plan_grid<Options>(plan);
  o.conditions = plan.conditions;
  return o;
}

void read_adjoint_matching_method(ConfigSection& table, MethodContext& ctx) {
  FinetunePlan& plan = ctx.plan;
  AdjointMatchingOptions am = plan_options<AdjointMatchingOptions>(plan);
  read_adjoint_matching_keys(table, am);
  // integrator: the training chain's step, the paper's Euler-Maruyama or the exact gDDIM step (E135); it steps the
  // rollout and the lean adjoint.
  am.integrator = parse_integrator(table.choice("integrator", {"euler", "exact"}, "euler"));
  // target: the paper's continuous-time target, or the training chain's own (its tilt; E135).
  am.target = table.choice("target", {"continuous", "chain"}, "continuous");
  if (am.integrator == Integrator::exact) {
    if (!am.final_noiseless_step) {
      table.fail("integrator", "= \"exact\" needs final_noiseless_step = true (the exact step to t = 1 has no noise)");
    }
    try {
      stochasticity_of(*plan.noise_schedule);
    } catch (const Error& e) {
      table.fail("integrator", "= \"exact\" steps the schedules sigma = gamma sqrt(2 eta) (finetune.noise = "
                               "\"memoryless\" or \"scaled_memoryless:<gamma>\"), not " + plan.noise_schedule->describe());
    }
  }
  // The label-free convergence signals (docs/method.md): the loss's median over the last 50 iterations, and the
  // rollout's ESS (not reported with guidance: E104).
  plan.trainer.loss_window = 50;
  plan.curves = {"loss_median"};
  plan.reports_ess = am.guidance == 0.0;
  if (plan.reports_ess) plan.curves.push_back("ess");
  // dsm_until = tau > 0: the times t < tau regress onto the denoising score on the rollouts' path-weighted samples
  // instead of the lean adjoint, whose pathwise estimate of grad V is heavy-tailed there (docs/equations.md, E106).
  const double tau = table.number("dsm_until", plan.preset == "small" ? small_preset_dsm_until(plan, am) : 0.0);
  plan.monitor = regression_monitor(am.clip_factor, plan.lambda, am.loss_weighting, tau);
  // buffer_size = N > 0: N trajectories and their lean adjoints serve N * buffer_passes / batch_size iterations
  // (docs/equations.md, E126).
  BufferOptions buffer;
  buffer.size = table.integer("buffer_size", 0);
  buffer.passes = table.integer("buffer_passes", buffer.passes);
  buffer.weights = table.choice("buffer_weights", {"future", "none"}, buffer.weights);
  if (buffer.size < 0 || (buffer.size > 0 && buffer.size % plan.batch_size != 0) || buffer.size > limits::kBatch) {
    table.fail("buffer_size", "must be 0 (no buffer) or a positive multiple of batch_size = " +
                                  std::to_string(plan.batch_size) + " up to " + std::to_string(limits::kBatch) +
                                  ", got " + std::to_string(buffer.size));
  }
  if (buffer.size * plan.num_steps > limits::kStepsTimesBatch) {
    table.fail("buffer_size", "x num_steps = " + std::to_string(buffer.size * plan.num_steps) + " states to keep; at most " +
                                  std::to_string(limits::kStepsTimesBatch));
  }
  constexpr int64_t kMaxPasses = 100000;
  if (buffer.passes < 1 || buffer.passes > kMaxPasses) {
    table.fail("buffer_passes", "must be in 1.." + std::to_string(kMaxPasses) + ", got " + std::to_string(buffer.passes));
  }
  if (buffer.size > 0) plan.shardable = false;
  // Adjoint Matching's regression on the times it keeps: on fresh trajectories, or on the buffer's.
  const auto adjoint_matching = [buffer, reward = plan.reward, noise = plan.noise_schedule](
                                    std::shared_ptr<FineTunedVelocity> model,
                                    const AdjointMatchingOptions& o) -> std::unique_ptr<Loss> {
    if (buffer.size > 0) return std::make_unique<BufferedAdjointMatching>(std::move(model), reward, noise, o, buffer);
    return std::make_unique<AdjointMatching>(std::move(model), reward, noise, o);
  };
  // dsm_rollout: the steps of the rollouts whose weighted endpoints DSM regresses on (UnifiedLossOptions).
  // dsm_rollout_steps: their number of steps (0: num_steps); the weighted law is the tilt of that chain's (E115).
  const bool rollout_given = table.has("dsm_rollout"), rollout_steps_given = table.has("dsm_rollout_steps");
  const std::string rollout = table.choice("dsm_rollout", {"euler", "exact"}, plan.preset == "small" ? "exact" : "euler");
  const int64_t rollout_steps =
      table.integer("dsm_rollout_steps", plan.preset == "small" ? small_preset_rollout_steps(plan) : 0);
  if (rollout_steps != 0 && (rollout_steps < 2 || rollout_steps > limits::kSteps)) {
    table.fail("dsm_rollout_steps", "must be 0 (num_steps) or in 2.." + std::to_string(limits::kSteps) + ", got " +
                                        std::to_string(rollout_steps));
  }
  if (rollout_steps * plan.batch_size > limits::kStepsTimesBatch) {
    table.fail("dsm_rollout_steps", "with batch_size = " + std::to_string(plan.batch_size) + ": " +
                                        std::to_string(rollout_steps * plan.batch_size) +
                                        " states per rollout, over the limit of " + std::to_string(limits::kStepsTimesBatch));
  }
  if (tau == 0.0) {
    for (const auto& [given, key] : {std::pair<bool, const char*>{rollout_given, "dsm_rollout"},
                                     std::pair<bool, const char*>{rollout_steps_given, "dsm_rollout_steps"}}) {
      if (given) plan.notes.push_back(table.where(key) + " is ignored: it is for dsm_until > 0");
    }
    plan.make_loss = [am, adjoint_matching](std::shared_ptr<FineTunedVelocity> model) {
      return adjoint_matching(std::move(model), am);
    };
    return;
  }
  UnifiedLossOptions dsm = plan_grid<UnifiedLossOptions>(plan);
  if (!(tau > dsm.t_min && tau < 1.0)) {
    table.fail("dsm_until", "must be 0 (off) or in (" + number_string(dsm.t_min) + ", 1), got " + number_string(tau));
  }
  if (const std::string why = dsm_until_conflict(plan, am, tau); !why.empty()) table.fail("dsm_until", why);
  am.loss_t_min = tau;
  dsm.t_max = tau;
  dsm.rollout_integrator = parse_integrator(rollout);
  if (rollout_steps > 0) dsm.num_steps = rollout_steps;
  // Equal weight per unit of time: AM sums its S = loss_early_steps + loss_late_steps steps over [tau, 1]; DSM
  // averages over t ~ U[t_min, tau].
  const double weight = static_cast<double>(am.loss_early_steps + am.loss_late_steps) * (tau - dsm.t_min) / (1.0 - tau);
  // With a buffer, its trajectories serve the times t >= tau; the DSM term draws its own weighted samples each
  // iteration (the buffer is the sum's first term's state in checkpoints).
  plan.make_loss = [am, dsm, weight, adjoint_matching, reward = plan.reward,
                    noise = plan.noise_schedule](std::shared_ptr<FineTunedVelocity> model) -> std::unique_ptr<Loss> {
    std::vector<LossSum::Term> terms;
    terms.push_back({adjoint_matching(model, am), 1.0});
    terms.push_back({std::make_unique<TiltScoreMatching>(ScoreTarget::denoising, model, reward, noise, dsm), weight});
    return std::make_unique<LossSum>("adjoint_matching", std::move(terms));
  };
}

void read_draft(ConfigSection& table, MethodContext& ctx) {
  RewardBaselineOptions o = plan_options<RewardBaselineOptions>(ctx.plan);
  o.draft_k = table.integer("draft_k", o.draft_k);
  if (o.draft_k < 1 || o.draft_k > o.num_steps) table.fail("draft_k", "must be in 1..num_steps");
  ctx.plan.warnings.push_back(no_kl_warning("draft"));
  ctx.plan.make_loss = [o, reward = ctx.plan.reward](std::shared_ptr<FineTunedVelocity> model) {
    return std::make_unique<DraftK>(std::move(model), reward, o);
  };
}

void read_refl(ConfigSection& table, MethodContext& ctx) {
  RewardBaselineOptions o = plan_options<RewardBaselineOptions>(ctx.plan);
  o.refl_t_min = table.number("refl_t_min", o.refl_t_min);
  if (!(o.refl_t_min >= 0.0 && o.refl_t_min < 1.0)) table.fail("refl_t_min", "must be in [0, 1)");
  ctx.plan.warnings.push_back(no_kl_warning("refl"));
  ctx.plan.make_loss = [o, reward = ctx.plan.reward](std::shared_ptr<FineTunedVelocity> model) {
    return std::make_unique<Refl>(std::move(model), reward, o);
  };
}

void read_discrete_adjoint(ConfigSection&, MethodContext& ctx) {
  const RewardBaselineOptions o = plan_options<RewardBaselineOptions>(ctx.plan);
  ctx.plan.make_loss = [o, reward = ctx.plan.reward, noise = ctx.plan.noise_schedule](std::shared_ptr<FineTunedVelocity> model) {
    return std::make_unique<DiscreteAdjoint>(std::move(model), reward, noise, o);
  };
}

// The keys of the policy-gradient baselines (docs/policy_gradient.md); the window keys are GRPO's.
PolicyGradientOptions read_policy_keys(ConfigSection& s, const FinetunePlan& plan, bool grouped) {
  PolicyGradientOptions o = plan_options<PolicyGradientOptions>(plan);
  o.reduction = parse_log_prob_reduction(s.choice("log_prob", {"mean", "sum"}, "mean"));
  o.clip_range = s.number("clip_range", o.clip_range);
  if (!(o.clip_range > 0.0)) s.fail("clip_range", "must be > 0");
  o.adv_clip_max = s.number("adv_clip_max", o.adv_clip_max);
  if (!(o.adv_clip_max > 0.0)) s.fail("adv_clip_max", "must be > 0");
  o.scale_advantages = s.boolean("scale_advantages", o.scale_advantages);
  o.inner_epochs = s.integer("inner_epochs", o.inner_epochs);
  if (o.inner_epochs < 1 || o.inner_epochs > 1000) {  // Adam steps per sampled batch (docs/config.md)
    s.fail("inner_epochs", "must be in 1..1000, got " + std::to_string(o.inner_epochs));
  }
  if (!grouped) return o;
  o.group_size = s.integer("group_size", o.group_size);
  if (o.group_size < 2) s.fail("group_size", "must be >= 2");
  o.window = s.integer("window", o.window);
  if (o.window < 0) s.fail("window", "must be >= 0 (0: every step)");
  o.window_strategy = parse_window_strategy(s.choice("window_strategy", {"progressive", "random"}, "progressive"));
  o.window_iters = s.integer("window_iters", o.window_iters);
  if (o.window_iters < 1) s.fail("window_iters", "must be >= 1");
  o.window_shift = s.integer("window_shift", o.window_shift);
  if (o.window_shift < 1) s.fail("window_shift", "must be >= 1");
  return o;
}

void read_policy_gradient(ConfigSection& table, MethodContext& ctx, bool grouped) {
  FinetunePlan& plan = ctx.plan;
  PolicyGradientOptions o = read_policy_keys(table, plan, grouped);
  // The policy is the exact gDDIM step of the noise schedule's stochasticity gamma (> 0).
  o.gamma = stochasticity_of(*plan.noise_schedule);
  if (!(o.gamma > 0.0)) {
    ctx.finetune.fail("noise", "the policy needs gamma > 0 (memoryless or scaled_memoryless:<gamma>): the ODE has no "
                               "log-probability");
  }
  if (grouped && o.batch_size % o.group_size != 0) {
    table.fail("group_size", "must divide batch_size = " + std::to_string(o.batch_size));
  }
  if (o.window > o.num_steps - 1) table.fail("window", "must be <= num_steps - 1 = " + std::to_string(o.num_steps - 1));
  plan.warnings.push_back(no_kl_warning(plan.method));
  plan.make_loss = [o, grouped, reward = plan.reward](std::shared_ptr<FineTunedVelocity> model) -> std::unique_ptr<Loss> {
    if (grouped) return std::make_unique<Grpo>(std::move(model), reward, o);
    return std::make_unique<Ddpo>(std::move(model), reward, o);
  };
}

// noise_draws, t_min and t_max: the noisings of clean endpoints that ram and eam regress on (E128, E132).
void read_noisings(ConfigSection& table, NoisedEndpointOptions& o) {
  o.noise_draws = table.integer("noise_draws", o.noise_draws);
  if (o.noise_draws < 1 || o.noise_draws > 1024) table.fail("noise_draws", "must be in 1..1024");
  o.t_min = table.number("t_min", o.t_min);
  o.t_max = table.number("t_max", o.t_max);
  if (!(o.t_min >= 0.0 && o.t_min < 1.0)) table.fail("t_min", "must be in [0, 1)");
  if (!(o.t_max > o.t_min && o.t_max <= 1.0)) table.fail("t_max", "must be in (t_min, 1]");
}

// Reinforce Adjoint Matching (docs/ram.md; E128-E130): flow-matching regressions on the model's ODE samples.
void read_ram(ConfigSection& table, MethodContext& ctx) {
  FinetunePlan& plan = ctx.plan;
  ReinforceAdjointMatchingOptions o = plan_options<ReinforceAdjointMatchingOptions>(plan);
  read_noisings(table, o);
  o.group_size = table.integer("group_size", plan.conditions ? 8 : 0);
  if (o.group_size == 1 || o.group_size < 0) table.fail("group_size", "must be 0 (the whole batch) or >= 2");
  if (o.group_size == 0 && plan.conditions) {
    table.fail("group_size", "must be >= 2 for a conditional model (the endpoints of one condition share a baseline)");
  }
  if (o.group_size > 0 && o.batch_size % o.group_size != 0) {
    table.fail("group_size", "must divide batch_size = " + std::to_string(o.batch_size));
  }
  if (o.group_size == 0 && o.batch_size < 2) ctx.finetune.fail("batch_size", "must be >= 2 for ram");
  // The critic of the baseline (docs/ram.md); [] turns it off (the group's mean alone, which can diverge).
  if (table.has("critic_hidden") && table.value("critic_hidden") == Json::array()) {
    o.critic_hidden.clear();
  } else {
    o.critic_hidden = read_widths(table, "critic_hidden", o.critic_hidden);
  }
  plan.warnings.push_back("method = \"ram\" reaches p* only to first order in lambda: it drops the gradient of the "
                          "expected future control cost (exact for a linear reward on a Gaussian base; docs/ram.md)");
  plan.make_loss = [o, reward = plan.reward](std::shared_ptr<FineTunedVelocity> model) {
    return std::make_unique<ReinforceAdjointMatching>(std::move(model), reward, o);
  };
}

// Efficient Adjoint Matching (docs/eam.md; E131-E134): Adjoint Matching against a linear reference drift, its lean
// adjoint in closed form, on noisings of the model's ODE samples or of its path-weighted SDE samples.
void read_eam(ConfigSection& table, MethodContext& ctx) {
  FinetunePlan& plan = ctx.plan;
  EfficientAdjointMatchingOptions o = plan_options<EfficientAdjointMatchingOptions>(plan);
  read_noisings(table, o);
  o.path_weights = table.boolean("path_weights", o.path_weights);
  if (o.path_weights && plan.conditions) table.fail("path_weights", "is for an unconditional model");
  if (o.path_weights) {
    // The weighted endpoints are rollouts of [finetune] noise (any schedule with noise on every step: E115).
    if (plan.noise_schedule->is_zero()) {
      ctx.finetune.fail("noise", "must put noise on every step for [finetune.eam] path_weights = true (the path weight "
                                 "of an ODE step is undefined); the default memoryless schedule does");
    }
    o.noise = plan.noise_schedule;
    ctx.uses_noise = true;
  }
  o.weights_until = table.number("weights_until", o.weights_until);
  if (!(o.weights_until > 0.0 && o.weights_until <= 1.0)) table.fail("weights_until", "must be in (0, 1]");
  // score_time: unset, a mixture base's exact score (else kDefaultScoreTime); set, the velocity's at that time.
  const bool exact = dynamic_cast<const GmmVelocity*>(&ctx.base) != nullptr && !plan.conditions;
  if (table.has("score_time")) {
    o.score_time = table.number("score_time", kDefaultScoreTime);
    if (!(o.score_time > 0.0 && o.score_time < 1.0)) table.fail("score_time", "must be in (0, 1)");
  }
  if (!exact || o.score_time > 0.0) {
    const double tau = o.score_time > 0.0 ? o.score_time : kDefaultScoreTime;
    const ScheduleValues at_tau = ctx.base.schedule()->at(tau);
    plan.notes.push_back("method = \"eam\" reads the base's score at the data end off its velocity at score_time = " +
                         number_string(tau) + ": it targets the tilt of the base blurred by N(0, s^2 I), s = " +
                         number_string(at_tau.beta / at_tau.alpha) + " (docs/eam.md)");
  }
  plan.make_loss = [o, reward = plan.reward](std::shared_ptr<FineTunedVelocity> model) {
    return std::make_unique<EfficientAdjointMatching>(std::move(model), reward, o);
  };
}

void read_ode_adjoint_matching_method(ConfigSection& table, MethodContext& ctx) {
  FinetunePlan& plan = ctx.plan;
  AdjointMatchingOptions am = plan_options<AdjointMatchingOptions>(plan);
  const OdeAdjointMatchingOptions o = read_ode_adjoint_matching(table, am);
  const RegulariserPtr regulariser = read_regulariser(table);
  plan.warnings.push_back("method = \"ode_adjoint_matching\" solves a deterministic control problem (" +
                          regulariser->describe() +
                          "): its optimum steers each noise seed on its own and is NOT p* ∝ p_base exp(lambda r) "
                          "(docs/ode_adjoint_matching.md)");
  plan.make_loss = [o, regulariser, reward = plan.reward](std::shared_ptr<FineTunedVelocity> model) {
    return std::make_unique<OdeAdjointMatching>(std::move(model), reward, regulariser, o);
  };
}

// The loss family of the unified view of tilting (docs/equations.md, E110-E117): the times of the regression.
UnifiedLossOptions read_unified_keys(ConfigSection& table, const FinetunePlan& plan) {
  UnifiedLossOptions o = plan_grid<UnifiedLossOptions>(plan);
  // TSM's target grows like 1/alpha_t^2 as t -> 0 (E111): on configs/demo_2d.toml its loss is ~7e4 with t_min = 0.02
  // and it does not move in 300 iterations; 0.2 by default.
  o.t_min = table.number("t_min", plan.method == "tsm" ? 0.2 : o.t_min);
  o.t_max = table.number("t_max", o.t_max);
  if (!(o.t_min > 0.0 && o.t_min < 1.0)) table.fail("t_min", "must be in (0, 1)");
  if (!(o.t_max > o.t_min && o.t_max <= 1.0)) table.fail("t_max", "must be in (t_min, 1]");
  return o;
}

void read_unified_method(ConfigSection& table, MethodContext& ctx) {
  FinetunePlan& plan = ctx.plan;
  if (plan.conditions) ctx.finetune.fail("method", "\"" + plan.method + "\" fine-tunes an unconditional base only");
  const std::string method = plan.method;
  const UnifiedLossOptions o = method == "cmcd_kl" || method == "cmcd_logvar" ? plan_grid<UnifiedLossOptions>(plan)
                                                                              : read_unified_keys(table, plan);
  // Refused here, naming the key, rather than when the loss is built: TSM needs the base score at the data end,
  // NSM a linear-Gaussian posterior (docs/equations.md, E111, E113).
  const auto* gmm = dynamic_cast<const GmmVelocity*>(&ctx.base);
  if (method == "tsm" && !gmm) {
    ctx.finetune.fail("method", "\"tsm\" needs the base's score at the data end, which tilt has for a 'gmm' base only "
                                "(the base is '" + ctx.base.kind() + "')");
  }
  if (method == "nsm" && (!gmm || gmm->mixture().components() != 1)) {
    ctx.finetune.fail("method", "\"nsm\" needs a Gaussian base (a 'gmm' base with one component), whose posterior mean "
                                "is linear in x_t (the base is '" + ctx.base.kind() + "'" +
                                (gmm ? " with " + std::to_string(gmm->mixture().components()) + " components" : std::string()) +
                                ")");
  }
  if (method == "cmcd_logvar" && o.batch_size < 2) ctx.finetune.fail("batch_size", "must be >= 2 for cmcd_logvar");
  if (method == "tsm" || method == "dsm" || method == "nsm" || method == "cmcd_kl" || method == "cmcd_logvar") {
    plan.reports_ess = true;
    plan.curves = {"ess"};
  }
  if (method == "nets") plan.curves = {"log_z"};
  plan.make_loss = [o, method, reward = plan.reward,
                    noise = plan.noise_schedule](std::shared_ptr<FineTunedVelocity> model) -> std::unique_ptr<Loss> {
    if (method == "tsm") return std::make_unique<TiltScoreMatching>(ScoreTarget::target, model, reward, noise, o);
    if (method == "dsm") return std::make_unique<TiltScoreMatching>(ScoreTarget::denoising, model, reward, noise, o);
    if (method == "nsm") return std::make_unique<TiltScoreMatching>(ScoreTarget::novel, model, reward, noise, o);
    if (method == "nets") return std::make_unique<TiltNets>(model, reward, o);
    return std::make_unique<TiltCmcd>(model, reward, noise, o, method == "cmcd_logvar");
  };
}

std::vector<std::string> concat(std::vector<std::string> a, const std::vector<std::string>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

std::vector<FinetuneMethod>& registry() {
  static std::vector<FinetuneMethod> methods{
      {"adjoint_matching", "Adjoint Matching: regression onto the lean adjoint (targets p*)", kAdjointMatchingKeys, true,
       false, read_adjoint_matching_method},
      {"draft", "DRaFT-K: backpropagate the reward through the last K ODE steps (no KL term)", {"draft_k"}, false, false,
       read_draft},
      {"refl", "ReFL: the reward of a one-step prediction from a random late step (no KL term)", {"refl_t_min"}, false,
       false, read_refl},
      {"discrete_adjoint", "the discrete adjoint of the memoryless SDE (targets p*)", {}, true, false,
       read_discrete_adjoint},
      {"ddpo", "DDPO: clipped policy gradient of the gDDIM policy (no KL term)", kPolicyKeys, true, true,
       [](ConfigSection& t, MethodContext& c) { read_policy_gradient(t, c, false); }, true},
      {"grpo", "GRPO: group-relative policy gradient, with a MixGRPO window (no KL term)",
       concat(kPolicyKeys, kGroupKeys), true, true,
       [](ConfigSection& t, MethodContext& c) { read_policy_gradient(t, c, true); }, true},
      {"ode_adjoint_matching", "ODE Adjoint Matching: a deterministic control problem (not p*)",
       {"adjoint_steps", "truncated_control", "loss_steps", "regulariser", "reg_weight", "reg_weight_start", "reg_clip",
        "reg_power"},
       false, false, read_ode_adjoint_matching_method},
      {"tsm", "target score matching on the model's path-weighted samples (targets p*; needs a mixture base)",
       {"t_min", "t_max"}, true, false, read_unified_method},
      {"dsm", "denoising score matching on the model's path-weighted samples (targets p*)", {"t_min", "t_max"}, true,
       false, read_unified_method},
      {"nsm", "tilted novel score matching (targets p*; a Gaussian base only)", {"t_min", "t_max"}, true, false,
       read_unified_method},
      {"cmcd_kl", "CMCD, KL form: the path weight against the base chain, through the rollout (targets p*)", {}, true,
       false, read_unified_method},
      {"cmcd_logvar", "CMCD, log-variance form: the batch variance of the log path weight (targets p*)", {}, true, false,
       read_unified_method},
      {"ram", "Reinforce Adjoint Matching: regression on the model's ODE samples, reward values only (p* to first order)",
       {"noise_draws", "t_min", "t_max", "group_size", "critic_hidden"}, false, false, read_ram, true},
      {"eam", "Efficient Adjoint Matching: a linear reference drift, its adjoint in closed form, on the model's ODE samples "
       "or path-weighted SDE samples (targets p*; needs the base's score at the data end)",
       {"noise_draws", "t_min", "t_max", "score_time", "path_weights", "weights_until"}, false, false, read_eam},
      {"nets", "tilted NETS: the PINN residual of the escorted weight rate; samples with the ODE (targets p*)",
       {"t_min", "t_max"}, false, false, read_unified_method},
  };
  return methods;
}

const FinetuneMethod& find_method(const std::string& name) {
  for (const auto& m : registry()) {
    if (m.name == name) return m;
  }
  throw Error("no fine-tuning method '" + name + "'");
}

// The noise schedule: the paper's offset is one step, h = 1/K, for memoryless (on a uniform grid
// the memoryless drift's -x/t part is then integrated exactly; docs/method.md, choice 1).
void read_noise(ConfigSection& s, const FinetuneMethod& method, FinetunePlan& plan) {
  plan.noise = s.string("noise", "memoryless");
  try {
    plan.noise_schedule = plan.noise == "memoryless" ? make_memoryless_noise(1.0 / static_cast<double>(plan.num_steps))
                                                     : parse_noise_schedule(plan.noise);
  } catch (const Error& e) {
    s.fail("noise", std::string("is invalid: ") + e.what());
  }
  if (!method.uses_noise) return;
  const NoiseSchedule& noise = *plan.noise_schedule;
  if (noise.is_memoryless() && noise.h() > kLargeMemorylessOffset) {
    plan.warnings.push_back(
        plan.noise == "memoryless"
            ? s.where("num_steps") + " = " + std::to_string(plan.num_steps) + " makes the memoryless offset h = 1/num_steps " +
                  "above " + number_string(kLargeMemorylessOffset) + ": far from memoryless near t = 0, the run will " +
                  "miss p* by more; 10 steps or more keep it small"
            : s.where("noise") + " = \"" + plan.noise + "\": an offset h above " + number_string(kLargeMemorylessOffset) +
                  " is far from memoryless near t = 0, and the run will miss p* by more (the default is one step, h = "
                  "1/num_steps)");
  }
  if (!method.policy && !noise.is_memoryless()) {
    plan.warnings.push_back("fine-tuning with the " + noise.describe() +
                            " noise schedule: only the memoryless schedule reaches p* ∝ p_base exp(lambda r); this run "
                            "will be biased (the value-function bias, Adjoint Matching Sec. 4)");
  }
}

// The tables of the methods not chosen: their keys are checked by name; the Adjoint Matching keys
// of old files, flat in [finetune], are noted as ignored.
void check_other_tables(ConfigSection& s, const FinetuneMethod& chosen, FinetunePlan& plan) {
  for (const auto& m : registry()) {
    if (m.name == chosen.name) continue;
    if (m.name == "adjoint_matching") {
      for (const auto& key : m.keys) {
        if (s.has(key)) plan.notes.push_back(s.where(key) + " is ignored by method = \"" + chosen.name + "\"");
      }
      s.allow(m.keys);
    }
    if (!s.has(m.name)) continue;
    const Json table = s.value(m.name);
    if (!table.is_object()) s.fail(m.name, "must be a table (the keys of method = \"" + m.name + "\")");
    for (auto it = table.begin(); it != table.end(); ++it) {
      if (std::find(m.keys.begin(), m.keys.end(), it.key()) == m.keys.end()) {
        std::string known;
        for (const auto& k : m.keys) known += (known.empty() ? "" : ", ") + k;
        throw Error("in " + s.origin() + ": unknown key '" + s.where(m.name) + "." + it.key() + "' in [" + s.where(m.name) +
                    "]" + (known.empty() ? " (the method has no keys)" : "; its keys: " + known));
      }
    }
    plan.notes.push_back("[" + s.where(m.name) + "] is ignored by method = \"" + chosen.name + "\"");
  }
}

void read_common(ConfigSection& s, const VelocityField& base, FinetunePlan& plan) {
  plan.mode = parse_finetune_mode(s.choice("model", {"residual", "copy", "lora"}, "residual"));
  if (base.kind() == "unet") {
    for (const char* key : {"hidden", "time_features"}) {
      if (s.has(key)) s.fail(key, "is for an MLP; with a U-Net base the residual network is a U-Net of the base's architecture");
    }
  }
  plan.mlp = read_mlp(s, base.dim(), {128, 128, 128});
  if (plan.mode == FineTuneMode::lora) {
    if (base.kind() != "unet") {
      s.fail("model", "is \"lora\", which needs a U-Net base (a model file of kind 'unet'), but [base] is of kind '" +
                          base.kind() + "' (use \"residual\" or \"copy\")");
    }
    plan.lora.rank = read_integer_in(s, "lora_rank", plan.lora.rank, 1, 4096);
    plan.lora.alpha = read_number_in(s, "lora_alpha", plan.lora.alpha, 1e-6, 1e6);
    if (const auto* unet = dynamic_cast<const UNetVelocity*>(&base); unet && plan.lora.rank > unet->largest_lora_rank()) {
      plan.warnings.push_back(s.where("lora_rank") + " = " + std::to_string(plan.lora.rank) + " is above every adapted " +
                              "layer's min(fan in, fan out) (at most " + std::to_string(unet->largest_lora_rank()) +
                              " in this U-Net): no adapter is low-rank, and they hold more numbers than the network; "
                              "model = \"copy\" fine-tunes the whole network with fewer");
    }
  } else {
    for (const char* key : {"lora_rank", "lora_alpha"}) {
      if (!s.has(key)) continue;
      s.allow({key});
      plan.notes.push_back("[" + s.where(key) + "] is ignored: it is for model = \"lora\"");
    }
  }
  read_steps_and_batch(s, plan.num_steps, plan.batch_size);
}

// early_stop and its keys (docs/config.md): only for a method that reports the ESS.
void read_early_stop(ConfigSection& s, FinetunePlan& plan) {
  EarlyStopOptions& o = plan.trainer.early_stop;
  const bool on = s.choice("early_stop", {"off", "ess"}, "off") == "ess";
  o.window = s.integer("early_stop_window", o.window);
  if (o.window < 1 || o.window > 1000000) s.fail("early_stop_window", "must be in 1..1000000, got " + std::to_string(o.window));
  o.tolerance = s.number("early_stop_tolerance", o.tolerance);
  if (!(o.tolerance >= 0 && o.tolerance <= 1)) s.fail("early_stop_tolerance", "must be in [0, 1], got " + number_string(o.tolerance));
  o.min_iterations = s.integer("early_stop_min_iterations", o.min_iterations);
  if (o.min_iterations < 0) s.fail("early_stop_min_iterations", "must be >= 0, got " + std::to_string(o.min_iterations));
  if (!on) return;
  if (!plan.reports_ess) {
    s.fail("early_stop", "is \"ess\", but method = \"" + plan.method + "\"" +
                             (plan.method == "adjoint_matching" ? " with guidance" : "") +
                             " reports no ESS (only adjoint_matching without guidance does); set it to \"off\"");
  }
  o.metric = "ess";
  const int64_t first = std::max(2 * o.window, o.min_iterations);
  if (first > plan.trainer.iterations) {
    plan.warnings.push_back(s.where("early_stop") + " = \"ess\" cannot stop this run: its first check is after " +
                            std::to_string(first) + " iterations (2 x early_stop_window, or early_stop_min_iterations), "
                            "and iterations = " + std::to_string(plan.trainer.iterations));
  }
}

void read_trainer_keys(ConfigSection& s, const VelocityField& base, FinetunePlan& plan) {
  TrainerOptions defaults;  // the paper's Adam settings (App. G)
  defaults.checkpoint_every = 100;
  defaults.loss_window = plan.trainer.loss_window;  // the method's choice
  plan.trainer = read_trainer(s, defaults);
  read_early_stop(s, plan);
  if (plan.trainer.shards > plan.batch_size) {
    s.fail("shards", "must be at most batch_size = " + std::to_string(plan.batch_size));
  }
  if (!plan.shardable && plan.trainer.shards > 1) {
    s.fail("shards", "must be 0 or 1 with finetune.adjoint_matching.buffer_size > 0: the buffer is the batch, it is not "
                     "split (nor spread over several processes)");
  }
  if (plan.mode == FineTuneMode::copy && base.kind() == "gmm") {
    s.fail("model", "is \"copy\", which needs a network base, but [base] is the exact mixture (use \"residual\")");
  }
}

}  // namespace

void register_finetune_method(FinetuneMethod method) {
  for (const auto& m : registry()) {
    if (m.name == method.name) throw Error("a fine-tuning method '" + method.name + "' is registered already");
  }
  if (!method.read) throw Error("fine-tuning method '" + method.name + "' has no reader");
  registry().push_back(std::move(method));
}

const std::vector<FinetuneMethod>& finetune_methods() { return registry(); }

std::vector<std::string> finetune_method_names() {
  std::vector<std::string> names;
  for (const auto& m : registry()) names.push_back(m.name);
  return names;
}

FinetunePlan read_finetune(ConfigSection& s, const VelocityField& base, RewardPtr reward, double lambda,
                           ConditionSetPtr conditions) {
  FinetunePlan plan;
  plan.reward = std::move(reward);
  plan.lambda = lambda;
  check_conditions(conditions, base.condition_dim(), "fine-tuning");
  // A mixture base knows its target: one that cannot be formed (an improper p*) is refused before training.
  if (const auto* gmm = dynamic_cast<const GmmVelocity*>(&base); gmm && plan.reward) {
    exact_target(*plan.reward, gmm->mixture(), lambda);
  }
  plan.conditions = std::move(conditions);
  plan.method = s.choice("method", finetune_method_names(), "adjoint_matching");

  const FinetuneMethod& method = find_method(plan.method);
  if (plan.reward && !plan.reward->differentiable() && !method.values_only) {
    std::string which;
    for (const auto& m : registry()) {
      if (m.values_only) which += (which.empty() ? "" : ", ") + m.name;
    }
    s.fail("method", "\"" + plan.method + "\" needs the reward's gradient, and the reward '" + plan.reward->kind() +
                         "' has none: use one of " + which);
  }
  check_other_tables(s, method, plan);
  // The preset replaces the defaults of the keys not given (docs/config.md, `preset`); "auto" is "small" where that
  // was validated and "paper" elsewhere, and the resolved config records which.
  plan.preset = s.choice("preset", {"auto", "paper", "small"}, "auto");
  if (plan.preset == "auto") {
    plan.preset = auto_preset(plan.method, base);
    s.resolve("preset", plan.preset);
    if (plan.preset == "paper" && vector_base(base) && !s.has("lr")) {
      plan.notes.push_back(s.where("preset") + " = \"auto\" keeps the Adjoint Matching paper's defaults, for image models "
                           "(lr = 2e-5, clip_factor = 1.6): \"small\" was validated for adjoint_matching on bases of at "
                           "most " + std::to_string(kSmallPresetMaxDim) + " dimensions; for a problem of a few to tens of "
                           "dimensions, " + s.where("preset") + " = \"small\" (docs/config.md)");
    }
  }
  ConfigSection table = s.section(method.name, /*optional=*/true);
  table.accept_moved_keys(s, [&plan](const std::string& note) { plan.notes.push_back(note); });
  const bool exact_chain = plan.preset == "small" && small_preset_exact_chain(s, table, plan);
  if (plan.preset == "small") s.set_defaults(small_preset_finetune(exact_chain));
  read_common(s, base, plan);
  read_noise(s, method, plan);
  if (plan.preset == "small" && method.name == "adjoint_matching") {
    table.set_defaults(small_preset_adjoint_matching(plan.num_steps, exact_chain));
  }
  MethodContext ctx{plan, s, base, method.uses_noise};
  method.read(table, ctx);
  table.finish();
  if (!ctx.uses_noise && s.has("noise")) {
    plan.notes.push_back(s.where("noise") + " is ignored by method = \"" + method.name +
                         "\" (it samples with the flow ODE)");
  }
  read_trainer_keys(s, base, plan);
  s.finish();
  if (plan.monitor) {  // the trainer calls it, so that its warnings reach metrics.jsonl too
    plan.trainer.monitor = [monitor = plan.monitor](const StepResult& r) { return monitor(r.output); };
  }
  if (!method.uses_noise) plan.noise = "ode";
  return plan;
}

void keep_preset_of_run(ConfigSection& s, const std::string& run_dir) {
  const std::string path = run_dir + "/config.resolved.json";
  if (!file_exists(path)) return;
  const Json j = Json::parse(read_file(path, "resolved config"), nullptr, false);
  if (j.is_discarded() || !j.is_object() || !j.contains("finetune") || !j["finetune"].is_object()) return;
  const Json& f = j["finetune"];
  // Started before the key existed: with the paper's defaults.
  const Json preset = f.contains("preset") ? f["preset"] : Json("paper");
  if (preset != "paper" && preset != "small") return;
  const Json* given = s.peek("preset");
  if (given && *given != preset && *given != "auto") return;  // another preset: a change of problem, refused later
  Json pinned{{"preset", preset}};
  // ... and the chain "small" chose then: before its exact chain it took K = 60 Euler steps everywhere (the record of
  // such a run says integrator = "euler", or nothing, older than the key).
  if (preset == "small" && f.contains("method") && f["method"] == "adjoint_matching") {
    const bool exact = f.contains("adjoint_matching") && f["adjoint_matching"].is_object() &&
                       f["adjoint_matching"].contains("integrator") && f["adjoint_matching"]["integrator"] == "exact";
    pinned["adjoint_matching"] = Json{{"integrator", exact ? "exact" : "euler"}};
  }
  s.set_defaults(pinned);
}

FinetunePlan make_finetune_plan(const Json& finetune, const VelocityField& base, RewardPtr reward, double lambda,
                                ConditionSetPtr conditions) {
  Config config(Json{{"finetune", finetune}}, "the finetune table");
  ConfigSection root = config.root();
  ConfigSection s = root.section("finetune");
  return read_finetune(s, base, std::move(reward), lambda, std::move(conditions));
}

std::shared_ptr<FineTunedVelocity> FinetunePlan::make_model(VelocityFieldPtr base, uint64_t seed) const {
  return make_finetuned(std::move(base), mode, mlp.hidden, mlp.time_features, seed, lora);
}

Json FinetunePlan::model_info() const {
  return Json{{"method", method}, {"noise", noise}, {"lambda", lambda}, {"reward", reward ? reward->kind() : ""},
              {"num_steps", num_steps}};
}

}  // namespace tilt
