// Reinforce Adjoint Matching (RAM; Bergmeister, Jegelka, Nüsken, Domingo-Enrich, Pidstrigach 2026, arXiv
// 2605.10759), as tilt derives it (docs/equations.md, E128-E130): a flow-matching regression on clean endpoints of
// the current model whose target the reward corrects. No SDE rollout, no backward adjoint sweep and no reward
// gradient: only reward values, so r may be non-differentiable (a class indicator).
//
// One iteration:
//   1. draw B clean endpoints X_1 from the current model with its flow ODE (Euler, num_steps steps; no gradients),
//      and their rewards r_i (r(X_1, c_i) for a conditional model, one c per group of G endpoints);
//   2. noise each M = noise_draws times as in pretraining: t ~ U[t_min, t_max], X_0 ~ N(0, I),
//      x_t = alpha_t X_1 + beta_t X_0, with the pretraining target u = alpha'_t X_1 + beta'_t X_0;
//   3. regress the fine-tuned residual onto the reward-weighted deviation of u from the base (E128):
//
//        loss = mean_rows | (v_theta - v_base)(x_t, t) - lambda (r_i - b) (u - v_base(x_t, t)) |^2,
//
//      with the baseline b(x_t, t) = m_i + V(x_t, t): m_i the mean reward of the other endpoints of i's group
//      (leave-one-out) and V a critic, a small MLP (zero at the start) trained alongside on the same rows by
//      regression onto r - m, so that b -> E[r | x_t].
//
// Why a critic, and why u - v_base (E129). For samples of the model's law q, the regression's minimiser is
//   v_theta - v_base = lambda Cov_q(r, u | x_t) + lambda (E_q[r | x_t] - b)(v_q - v_base),
// v_q the flow-matching field of q: the second term vanishes only when b = E[r | x_t], so a constant baseline (the
// batch's mean) biases the fixed point by O(lambda^2 (spread of r)). The alternative target lambda (r - b)(u - sg
// v_theta) is baseline-free at v_theta = v_q, but its gradient is that of a regression with weights
// 1 + lambda (r - b): where lambda (E[r | x_t] - b) < -1 (low-reward regions at late t, once lambda times the
// reward's spread exceeds about 1) the weight is negative and the model's error there grows. On a Gaussian with a
// linear reward at lambda = 1 that form with the batch mean had a non-finite gradient at iteration 256 of 1500, and
// with a critic too on a 10-D mixture at iteration 79. With u - v_base each iteration is a plain regression (every
// weight 1), and the critic removes the bias. The critic is part of parameters() (and of checkpoints), not of the
// fine-tuned model.
//
// What it converges to (E129-E130). On the model's own samples the minimiser is
//   v_theta = v_base + lambda Cov(r(X_1), u | x_t) = v_base + eta_t grad_x E[lambda r(X_1) | X_t = x]
// (the REINFORCE form of the gradient of the expected reward), where the exact tilt has
//   v* = v_base + eta_t grad_x log E_base[exp(lambda r(X_1)) | X_t = x]
//      = v_base + eta_t grad_x ( E_P*[lambda r(X_1) | x] - E_P*[ int_t^1 |u*|^2 / 2 | x] ):
// RAM drops the gradient of the expected future control cost, which is O(lambda^2). It is exact when that cost is
// constant in x (a linear reward on a Gaussian base: tested), first-order in lambda otherwise.
//
// This is our reading of the paper's abstract and of its derivation (the adjoint-matching condition plus a
// REINFORCE identity); the authors' code could not be read here, so their baseline and weighting may differ.
#pragma once

#include "tilt/model/condition.h"
#include "tilt/model/finetuned.h"
#include "tilt/model/reward.h"
#include "tilt/soc/loss.h"
#include "tilt/train/noised_endpoint_options.h"

#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace tilt {

/// The shared options (batch_size, num_steps, lambda, noise_draws, t_min, t_max, endpoints; conditions: one c per
/// group), and RAM's own.
struct ReinforceAdjointMatchingOptions : NoisedEndpointOptions {
  /// G endpoints share one condition and the first part of the baseline (the mean reward of the other G - 1). 0: the
  /// whole batch (unconditional models only). G >= 2 and divides batch_size.
  int64_t group_size = 0;
  /// The critic V(x_t, t [, c]): hidden widths of its MLP (its time features: 8); empty: no critic, b is the group's
  /// leave-one-out mean alone (can diverge, see the class comment).
  std::vector<int64_t> critic_hidden{64, 64};
  uint64_t critic_seed = 7;
  /// Tests: the exact E[r | x_t] per row, (x_t [N, d], t [N]) -> [N], as the baseline instead of the mean and the
  /// critic (unconditional only).
  std::function<Tensor(const Tensor& xt, const Tensor& t)> exact_value;
};

class ReinforceAdjointMatching : public Loss {
 public:
  /// Throws tilt::Error for a missing model or reward, mismatched dimensions or conditions (as check_conditions and
  /// check_reward_condition), or options out of range (naming them).
  ReinforceAdjointMatching(std::shared_ptr<FineTunedVelocity> model, RewardPtr reward,
                           const ReinforceAdjointMatchingOptions& options);
  std::string name() const override { return "ram"; }
  /// The model's parameters, then the critic's.
  std::vector<Tensor> parameters() const override;
  int64_t batch_size() const override { return options_.batch_size; }
  /// n must be a multiple of the group size (>= 2): each shard keeps whole groups.
  void set_batch_size(int64_t n) override;
  /// Draws, in this order: the conditions (one per group), the endpoints (X_0 of the ODE), then t and X_0 of the
  /// noisings. The loss is the regression's plus the critic's. Metrics: reward (mean r of the endpoints), reward_std,
  /// critic_loss (mean (r - b)^2: what the baseline leaves of the reward's variance).
  LossOutput compute(Generator& gen) override;

  /// The group size in use (options().group_size, or batch_size for 0).
  int64_t group_size() const;
  /// The first part of the baseline: for each endpoint the mean reward of the other members of its group, r [B] -> [B].
  Tensor leave_one_out_mean(const Tensor& r) const;
  /// The critic V(x_t, t) per row, [N] (undefined without a critic); c: the rows' conditions or undefined.
  Tensor critic(const Tensor& xt, const Tensor& t, const Tensor& c) const;
  /// The regression target of v_theta - v_base per row (E128): lambda c (u - v_base), u = alpha'_t x1 + beta'_t x0;
  /// x1, x0 [N, d], t [N], c = r - b [N], v_base [N, d].
  Tensor target(const Tensor& x1, const Tensor& x0, const Tensor& t, const Tensor& c, const Tensor& v_base) const;
  const ReinforceAdjointMatchingOptions& options() const { return options_; }

 private:
  std::shared_ptr<FineTunedVelocity> model_;
  RewardPtr reward_;
  ReinforceAdjointMatchingOptions options_;
  VelocityFieldPtr critic_;  // an MLP of dimension d whose mean output is V; null without a critic
};

}  // namespace tilt
