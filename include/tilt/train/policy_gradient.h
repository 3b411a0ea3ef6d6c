// Policy-gradient reward fine-tuning baselines (docs/equations.md, E50-E54), each a Loss on
// the fine-tuned velocity field v_theta:
//
//   Ddpo  DDPO (Black, Janner, Du, Kostrikov, Levine, ICLR 2024, arXiv 2305.13301; "DDPO_IS"):
//         the PPO clipped-ratio surrogate over the steps of the stochastic sampler, advantages by
//         standardising the batch's rewards (DDPO's per-prompt statistics with one prompt).
//   Grpo  GRPO-style group advantages as in Flow-GRPO / MixGRPO (Li et al. 2025, arXiv 2507.21802):
//         groups of G generations from the same initial noise, advantage = (r - group mean) /
//         (group std + eps); optionally MixGRPO's window: SDE steps (and loss terms) only on a window
//         of consecutive steps, the exact ODE step elsewhere.
//
// The policy. Each step t_k -> t_{k+1} of the sampler is the exact gDDIM Gaussian step of
// stochasticity gamma (sde/gddim.h; docs/equations.md, E16-E17):
//
//   pi_theta(x_{k+1} | x_k) = N(x_{k+1}; mu_k, std_k^2 I),   mu_k = c_x x_k + c_v v_theta(x_k, t_k),
//
// so every step has an exact log-density; gamma = 1 (memoryless, DDPM-like) by default. The last
// step onto t = 1 is deterministic (std = 0) and carries no log-probability; it is taken with the
// base velocity (as Adjoint Matching's final noiseless step), so that nothing in the chain depends on
// theta except through the Gaussian steps and the on-policy gradient is unbiased for grad E[r]
// (tested against the exact gradient of a linear-Gaussian chain). With MixGRPO's window the ODE
// steps outside it use v_theta and their dependence on theta is ignored, as in MixGRPO. Log-probabilities are summed or (DDPO's and MixGRPO's choice) averaged over the d
// coordinates; averaging divides every log-ratio by d, i.e. the ratio is a geometric mean over
// coordinates and the on-policy gradient is the sum's divided by d.
//
// The loss (docs/equations.md, E51; PPO, Schulman et al. 2017, eq. 7, as a loss to minimise), over
// sample i and SDE step k:
//
//   L = mean_{i,k} max( -A_i rho_ik, -A_i clip(rho_ik, 1 - eps, 1 + eps) ),
//   rho_ik = exp(log pi_theta(x_{k+1} | x_k) - log pi_old(x_{k+1} | x_k)).
//
// Trajectories are sampled without gradients by the current policy (which becomes pi_old) and
// stored; with inner_epochs = E they are reused for E consecutive iterations (the trainer's Adam
// steps change theta between them, so the ratio leaves 1 and the clip matters). On-policy (the first
// epoch, rho = 1) grad L = -(1 / (B S)) sum_i A_i sum_k grad log pi_theta: REINFORCE with a baseline,
// 1/S of the score-function estimate of grad E[A] (S = SDE steps per trajectory).
//
// Conditions (docs/conditions.md): with PolicyGradientOptions::conditions, each trajectory draws its own
// prompt c from the training set (first in the iteration), and the policy, the base's last step and the
// reward (when it takes a condition) are evaluated at it; the stored batch keeps c, so that inner epochs
// and log_prob() use the same conditions. GRPO draws one c per group: a group is one prompt with one
// initial noise, as in Flow-GRPO, so its advantages are per prompt. DDPO standardises over the whole
// batch (DDPO without its per-prompt statistics tracker, which keeps a history of rewards per prompt).
//
// These methods maximise E[r] with no KL term (lambda only scales r, which the standardised
// advantages undo): they do not target p* ∝ p_base exp(lambda r). The trainer's gradient-norm clip
// (TrainerOptions::grad_clip, 1.0 by default, as in DDPO) applies.
#pragma once

#include "tilt/model/condition.h"
#include "tilt/model/finetuned.h"
#include "tilt/model/reward.h"
#include "tilt/sde/time_grid.h"
#include "tilt/soc/loss.h"

#include <memory>
#include <string>
#include <vector>

namespace tilt {

/// How a step's log-density is reduced over the d coordinates.
enum class LogProbReduction { sum, mean };
LogProbReduction parse_log_prob_reduction(const std::string& name);  // "sum" | "mean"

/// MixGRPO's choice of the window of SDE steps at each iteration.
enum class WindowStrategy { progressive, random };
WindowStrategy parse_window_strategy(const std::string& name);  // "progressive" | "random"

struct PolicyGradientOptions {
  int64_t num_steps = 40;        ///< K uniform steps on [0, 1]; steps 0..K-2 are stochastic, the last is not
  int64_t batch_size = 64;       ///< trajectories per batch (GRPO: a multiple of group_size)
  double lambda = 1.0;           ///< reward multiplier: the reward is lambda r
  double gamma = 1.0;            ///< stochasticity of the gDDIM policy (> 0); 1 = memoryless
  LogProbReduction reduction = LogProbReduction::mean;
  double clip_range = 1e-4;      ///< eps of the clipped ratio (DDPO's default)
  double adv_clip_max = 5.0;     ///< advantages are clipped to [-adv_clip_max, adv_clip_max]
  bool scale_advantages = true;  ///< divide by the (batch or group) std; false: only subtract the mean
  double std_eps = 1e-6;         ///< added to the std before dividing
  int64_t inner_epochs = 1;      ///< iterations each sampled batch is trained on
  // GRPO only
  int64_t group_size = 8;        ///< G generations per initial noise
  int64_t window = 0;            ///< MixGRPO: SDE steps per window; 0: all K - 1 stochastic steps
  WindowStrategy window_strategy = WindowStrategy::progressive;
  int64_t window_iters = 25;     ///< progressive: iterations per window position
  int64_t window_shift = 1;      ///< progressive: steps the window advances per move
  /// The training prompts: each trajectory (GRPO: each group) draws its own c from them
  /// (docs/conditions.md). Null for an unconditional model, required for a conditional one.
  ConditionSetPtr conditions;
};

/// log N(x_next; mean, std^2 I) per row ([B, d] -> [B]), summed or averaged over the coordinates.
/// Differentiable in mean.
Tensor gaussian_log_prob(const Tensor& x_next, const Tensor& mean, double std, LogProbReduction reduction);

/// The per-term clipped-ratio loss max(-A rho, -A clip(rho, 1 - eps, 1 + eps)), rho = exp(log_prob -
/// old_log_prob), elementwise (advantage broadcasts). Its gradient in log_prob is -A rho inside the
/// trust region and where the unclipped term is the larger, else 0.
Tensor clipped_ratio_loss(const Tensor& log_prob, const Tensor& old_log_prob, const Tensor& advantage,
                          double clip_range);

/// DDPO advantages: (r - mean) / (std + std_eps) over the batch (population std, as DDPO's
/// stat tracker), clipped to [-adv_clip_max, adv_clip_max]. r: [B], B >= 2.
Tensor batch_advantages(const Tensor& r, bool scale, double std_eps, double adv_clip_max);

/// GRPO advantages: rows [g G, (g + 1) G) are a group; (r - group mean) / (group std + std_eps)
/// (unbiased std, as torch's default), clipped to [-adv_clip_max, adv_clip_max].
Tensor group_advantages(const Tensor& r, int64_t group_size, bool scale, double std_eps, double adv_clip_max);

/// MixGRPO's progressive window (docs/equations.md, E54): the first SDE step of the window at iteration i (0-based) is
/// shift * (i / iters) while that is <= max_start, then it rolls back to 0 and repeats.
int64_t progressive_window_start(int64_t iteration, int64_t iters, int64_t shift, int64_t max_start);

/// Trajectories of the gDDIM policy, stored for the clipped-ratio loss.
struct PolicyBatch {
  std::vector<int64_t> sde_steps;  ///< the stochastic steps k (with log-probabilities), ascending
  Tensor states;                   ///< [S, B, d]: x_k for each k in sde_steps
  Tensor next_states;              ///< [S, B, d]: x_{k+1}
  Tensor old_log_prob;             ///< [S, B]: log pi_old(x_{k+1} | x_k), from the sampling pass
  Tensor conditions;               ///< [B, dc]: each trajectory's condition; undefined: unconditional
  Tensor x1;                       ///< [B, d]: the samples
  Tensor reward;                   ///< [B]: lambda r(x1)
  Tensor advantage;                ///< [B]
};

class PolicyGradient : public Loss {
 public:
  /// Throws tilt::Error for a missing model or reward, mismatched dimensions or conditions (as
  /// check_conditions and check_reward_condition), or options out of range.
  PolicyGradient(std::shared_ptr<FineTunedVelocity> model, RewardPtr reward, const PolicyGradientOptions& options,
                 bool grouped);
  std::string name() const override { return grouped_ ? "grpo" : "ddpo"; }
  std::vector<Tensor> parameters() const override { return model_->parameters(); }
  int64_t batch_size() const override { return options_.batch_size; }
  /// Refuses n != batch_size(): the advantages are statistics of the whole batch (or its groups) and
  /// a stored batch is reused over inner epochs.
  void set_batch_size(int64_t n) override;
  void begin_iteration(int64_t iteration) override { iteration_ = iteration; }
  LossOutput compute(Generator& gen) override;

  /// Samples B trajectories from x0 ([B, d]) with the current policy, without gradients; only the
  /// steps in sde_steps are stochastic (the others are the exact gamma = 0 step). c: the trajectories'
  /// conditions, [B, dc] or [1, dc] (undefined: unconditional, or a conditional model's null condition),
  /// kept in the batch as [B, dc].
  PolicyBatch sample(const Tensor& x0, const std::vector<int64_t>& sde_steps, Generator& gen,
                     const Tensor& c = Tensor()) const;
  /// log pi_theta(next_states | states) per (step, sample), [S, B], with the graph to theta, at the
  /// batch's conditions.
  Tensor log_prob(const PolicyBatch& batch) const;
  /// The SDE steps of iteration i: all of 0..K-2, or GRPO's window.
  std::vector<int64_t> sde_steps(int64_t iteration, Generator& gen) const;
  const PolicyGradientOptions& options() const { return options_; }
  /// The stored batch of the last compute() (empty before the first).
  const PolicyBatch& batch() const { return batch_; }

 private:
  std::shared_ptr<FineTunedVelocity> model_;
  RewardPtr reward_;
  PolicyGradientOptions options_;
  bool grouped_;
  TimeGrid grid_;
  int64_t iteration_ = 0;
  bool have_batch_ = false;
  int64_t batch_iteration_ = 0;  ///< the iteration the stored batch was sampled at
  PolicyBatch batch_;
};

class Ddpo : public PolicyGradient {
 public:
  Ddpo(std::shared_ptr<FineTunedVelocity> model, RewardPtr reward, const PolicyGradientOptions& options)
      : PolicyGradient(std::move(model), std::move(reward), options, /*grouped=*/false) {}
};

class Grpo : public PolicyGradient {
 public:
  Grpo(std::shared_ptr<FineTunedVelocity> model, RewardPtr reward, const PolicyGradientOptions& options)
      : PolicyGradient(std::move(model), std::move(reward), options, /*grouped=*/true) {}
};

}  // namespace tilt
