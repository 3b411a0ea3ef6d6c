// Efficient Adjoint Matching (EAM; arXiv 2605.11480), as tilt derives it (docs/equations.md, E131-E134): Adjoint
// Matching against a LINEAR reference drift, with the difference between the base and the reference folded into
// the terminal cost. The lean adjoint is then in closed form (no backward sweep, no VJP through the base) and the
// on-policy states come from noising the model's clean endpoints as in pretraining (no SDE rollout).
//
// The reference is the memoryless SDE of the flow whose data law is N(0, I): its drift is linear, b_ref(x, t) =
// (D'_t / D_t - kappa_t) x with D_t = alpha_t^2 + beta_t^2, and its velocity v_ref(x, t) = (D'_t / (2 D_t)) x. Under
// the memoryless schedule the base and the reference both draw X_0 independent of X_1 and share the noising kernel
// of X_t given X_1, so their path laws differ only through X_1: dP_base / dP_ref = p_base(X_1) / N(X_1; 0, I). The
// control problem of the base with terminal cost -lambda r is therefore the problem of the reference with
//   g~(x) = -lambda r(x) - log p_base(x) + log N(x; 0, I),
// same optimal path law, same p* (E131). Its lean adjoint runs through a drift whose Jacobian is a multiple of I:
//   a~(t) = (alpha_t / D_t) a~(1),   a~(1) = grad g~(X_1) = -(lambda grad r + grad log p_base + X_1)(X_1)   (E132),
// and Adjoint Matching's regression becomes, in velocity space (memoryless: v_theta - v_ref = -eta_t a~(t)),
//   loss = mean_rows | v_theta(x_t, t) - v_ref(x_t, t) - (beta_t W_t / D_t) (G + X_1) |^2,   G = lambda grad r + grad log p_base,
// on x_t = alpha_t X_1 + beta_t X_0, X_1 from the current model: under the optimal path law (X_t, X_1) is p*(x_1)
// times the pretraining kernel, so these are on-policy pairs at the optimum. The target is a convex mix of target
// score matching's and denoising score matching's (weights alpha^2 / D and beta^2 / D), each unbiased for the score
// of p*_t, so p* is a fixed point; on a standard Gaussian G + X_1 = 0 and the target has no variance at all (E132).
//
// What it needs that Adjoint Matching does not: grad log p_base at the data end. A Gaussian-mixture base has it in
// closed form; for a learnt base it is read off the velocity at time tau = score_time < 1, which is the exact score
// of the base blurred by N(0, (beta_tau / alpha_tau)^2 I): the fixed point is then the tilt of that blurred base
// (E133, tested on a mixture).
//
// Which endpoints (E132, E134): on the model's own ODE samples the regression only sees grad log(p* / q) at them, ~0
// inside well-separated modes, so it cannot reweight modes; path_weights draws them from the model's SDE instead and
// weights the early rows by their path weights towards P*, which can.
//
// One iteration: B endpoints from the model's flow ODE (num_steps Euler steps, no gradients) or its weighted SDE, B
// reward gradients and base scores, M = noise_draws noisings each, one forward-backward on B M rows. This is our reading of the paper's
// abstract; the authors' code is not public, so their reference drift and weighting may differ.
#pragma once

#include "tilt/model/condition.h"
#include "tilt/model/finetuned.h"
#include "tilt/model/reward.h"
#include "tilt/schedule/noise_schedule.h"
#include "tilt/soc/loss.h"
#include "tilt/train/noised_endpoint_options.h"

#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace tilt {

/// The time at which EAM reads a learnt base's score off its velocity unless told otherwise (E133): the blur it
/// brings, beta / alpha = 0.053 on the linear schedule, against an amplification of the velocity's error by
/// alpha^2 / (beta W) = 18.
constexpr double kDefaultScoreTime = 0.95;

/// grad log p_base at the data end, (x [B, d], c [B, dc] or undefined) -> [B, d].
using DataEndScore = std::function<Tensor(const Tensor& x, const Tensor& c)>;

/// The score of the base blurred by N(0, (beta_tau / alpha_tau)^2 I) (the law of X_tau / alpha_tau), read off its
/// velocity at time tau (E7, E133):
///   alpha_tau s_tau(alpha_tau x) = (alpha_tau^2 / (beta_tau W_tau)) (v(alpha_tau x, tau | c) - alpha'_tau x).
/// Throws tilt::Error unless 0 < tau < 1.
Tensor blurred_data_end_score(const VelocityField& base, const Tensor& x, const Tensor& c, double tau);

/// The closed-form lean adjoint of the linear reference (E132): a~(t) / a~(1) = alpha_t / (alpha_t^2 + beta_t^2), per t.
Tensor reference_adjoint_factor(const Schedule& schedule, const Tensor& t);

/// The shared options (batch_size, num_steps, lambda, noise_draws, t_min, t_max, endpoints; conditions: one c per
/// endpoint), and EAM's own.
struct EfficientAdjointMatchingOptions : NoisedEndpointOptions {
  /// tau in (0, 1): the base's score at the data end is blurred_data_end_score at tau. 0: the mixture's exact score
  /// for an unconditional Gaussian-mixture base, else tau = kDefaultScoreTime.
  double score_time = 0.0;
  /// Where X_1 comes from. false: the model's flow ODE, unweighted (the fixed point is p*, but the regression only
  /// sees grad log(p* / q) at the endpoints, ~0 inside well-separated modes, so it barely moves mass between them:
  /// E132). true: the model's memoryless SDE (num_steps Euler-Maruyama steps of `noise`), each endpoint weighted by
  /// its path weight towards P* (E104), self-normalised over the batch: the weighted law is p* whatever the model
  /// (E115), at the price of K base evaluations and the weights' variance. Unconditional models only.
  bool path_weights = false;
  /// With path_weights, only the rows with t < weights_until carry the weights; the later rows are unweighted (mean
  /// 1/B), because a weighted regression leaves the late field unfitted wherever the model goes and p* does not
  /// (E134). 1: every row weighted.
  double weights_until = 0.5;
  /// The rollouts' noise schedule when path_weights (null: memoryless with the offset h = 1/num_steps).
  NoiseSchedulePtr noise;
  /// grad log p_base at the data end; null: as score_time says.
  DataEndScore base_score;
};

class EfficientAdjointMatching : public Loss {
 public:
  /// Throws tilt::Error for a missing model or reward, mismatched dimensions or conditions, or options out of range
  /// (naming them).
  EfficientAdjointMatching(std::shared_ptr<FineTunedVelocity> model, RewardPtr reward,
                           const EfficientAdjointMatchingOptions& options);
  std::string name() const override { return "eam"; }
  std::vector<Tensor> parameters() const override { return model_->parameters(); }
  int64_t batch_size() const override { return options_.batch_size; }
  void set_batch_size(int64_t n) override;
  /// Draws, in this order: the conditions (one per endpoint), the endpoints (X_0 of the ODE, or the SDE's X_0 and
  /// noise), then t and X_0 of the noisings. Metrics: reward (mean r of the endpoints), reward_std,
  /// score_gap (mean |G + X_1|^2: how far the tilted score is from the reference's, 0 when p* is N(0, I) and the
  /// target is deterministic); with path_weights, ess (the weights' effective sample size over B).
  LossOutput compute(Generator& gen) override;

  /// G = lambda grad r(x1 | c) + grad log p_base(x1 | c), [B, d] (no gradients): the tilted score at the data end.
  Tensor terminal_score(const Tensor& x1, const Tensor& c) const;
  /// The regression target of v_theta at x_t = alpha_t x1 + beta_t x0 (E132):
  ///   v_ref(x_t, t) + (beta_t W_t / D_t) (G + x1),   x1, x0, G [N, d], t [N].
  Tensor target(const Tensor& x1, const Tensor& x0, const Tensor& t, const Tensor& G) const;
  const EfficientAdjointMatchingOptions& options() const { return options_; }

 private:
  std::shared_ptr<FineTunedVelocity> model_;
  RewardPtr reward_;
  EfficientAdjointMatchingOptions options_;
  DataEndScore base_score_;
};

}  // namespace tilt
