// Reward fine-tuning baselines that Adjoint Matching is compared with (Adjoint Matching, Sec. 7 and
// App. F; docs/equations.md, E47-E49), each a Loss on the same fine-tuned velocity field v_theta:
//
//   DraftK          DRaFT-K (Clark et al., ICLR 2024, arXiv 2309.17400): sample with the flow ODE
//                   (Euler, K_total steps), backpropagate -lambda r(X_1) through the last K steps only.
//   Refl            ReFL (Xu et al., "ImageReward", NeurIPS 2023, arXiv 2304.05977): run the ODE without
//                   gradients to a random step t_k, predict X^_1 = (beta v - beta' x) / (beta alpha' - beta' alpha)
//                   from one evaluation of v_theta (Adjoint Matching, App. F.1), maximise r(X^_1).
//   DiscreteAdjoint The memoryless SOC objective of Adjoint Matching, J = E[sum_k 1/2 |u_k|^2 h_k
//                   - lambda r(X^_1)], differentiated by backpropagation through the whole simulated
//                   trajectory (Adjoint Matching, Sec. 5.1.1): nearly the fixed point of Adjoint Matching
//                   (its control cost uses the offset sigma_h; docs/equations.md, E49), at the memory
//                   cost of the whole graph.
//
// DRaFT and ReFL maximise the reward with no KL term: they do not target p* and collapse diversity
// as they train; that is the point of the comparison. The reward's gradient enters through the
// surrogate <stop_grad(grad r(X_1)), X_1>, so any Reward works (r need not be differentiable by
// autograd); the logged "reward" is r itself.
//
// Conditions (docs/conditions.md): with RewardBaselineOptions::conditions, each trajectory draws its own
// c from the training set (before anything else of the iteration), and the fine-tuned model, the base and
// the reward (when it takes a condition) are evaluated at it: the same loss on the bound problem
// v(x, t | c), r(x, c) with one c per row.
#pragma once

#include "tilt/model/condition.h"
#include "tilt/model/finetuned.h"
#include "tilt/model/reward.h"
#include "tilt/schedule/noise_schedule.h"
#include "tilt/sde/sde.h"
#include "tilt/sde/time_grid.h"
#include "tilt/soc/loss.h"

#include <memory>

namespace tilt {

struct RewardBaselineOptions {
  int64_t num_steps = 40;     ///< K_total uniform steps on [0, 1]
  int64_t batch_size = 40;
  double lambda = 1.0;        ///< reward multiplier (the loss is -lambda r)
  int64_t draft_k = 1;        ///< DRaFT-K: the last K steps carry gradients (1 <= K <= num_steps)
  double refl_t_min = 0.5;    ///< ReFL: the prediction step is drawn uniformly from the steps with t_k >= this
  /// The training conditions: each trajectory draws its own c from them (docs/conditions.md). Null for
  /// an unconditional model, required for a conditional one.
  ConditionSetPtr conditions;
};

/// Shared checks and the Euler ODE of v_theta.
class RewardBaseline : public Loss {
 public:
  /// Throws tilt::Error for a missing model or reward, mismatched dimensions or conditions (a set for a
  /// conditional model, of its size; none for an unconditional one; a conditional reward takes the
  /// model's condition), or options out of range.
  RewardBaseline(std::shared_ptr<FineTunedVelocity> model, RewardPtr reward, const RewardBaselineOptions& options,
                 const std::string& name);
  std::vector<Tensor> parameters() const override { return model_->parameters(); }
  int64_t batch_size() const override { return options_.batch_size; }
  void set_batch_size(int64_t n) override;
  const RewardBaselineOptions& options() const { return options_; }

 protected:
  /// Each of the batch's trajectories' condition, [batch, dc], drawn from options().conditions; undefined
  /// (and nothing drawn) for an unconditional model.
  Tensor draw_conditions(Generator& gen) const;
  /// X_{k+1} = X_k + h v(X_k, t_k) for k in [from, to), with gradients only if enabled by the caller; v is
  /// v_theta bound to the conditions c (one per row of x; undefined: unconditional).
  Tensor ode_steps(const VelocityField& v, Tensor x, int64_t from, int64_t to) const;
  /// The reward at the conditions c (the reward itself when it takes none).
  RewardPtr reward_at(const Tensor& c) const;
  /// -lambda mean <stop_grad(grad r(x1)), x1>: its gradient is that of -lambda mean r(x1).
  Tensor reward_surrogate(const Reward& reward, const Tensor& x1) const;

  std::shared_ptr<FineTunedVelocity> model_;
  RewardPtr reward_;
  RewardBaselineOptions options_;
  TimeGrid grid_;
};

class DraftK : public RewardBaseline {
 public:
  DraftK(std::shared_ptr<FineTunedVelocity> model, RewardPtr reward, const RewardBaselineOptions& options);
  std::string name() const override { return "draft"; }
  LossOutput compute(Generator& gen) override;
};

class Refl : public RewardBaseline {
 public:
  Refl(std::shared_ptr<FineTunedVelocity> model, RewardPtr reward, const RewardBaselineOptions& options);
  std::string name() const override { return "refl"; }
  LossOutput compute(Generator& gen) override;
  /// X^_1(x, t) from the velocity v at (x, t): the flow-matching denoiser E[X_1 | X_t = x].
  Tensor predict_x1(const Tensor& x, double t, const Tensor& v) const;

 private:
  std::vector<int64_t> candidates_;
};

class DiscreteAdjoint : public RewardBaseline {
 public:
  /// `noise` is the schedule of the controlled SDE (memoryless for an unbiased result).
  DiscreteAdjoint(std::shared_ptr<FineTunedVelocity> model, RewardPtr reward, NoiseSchedulePtr noise,
                  const RewardBaselineOptions& options);
  std::string name() const override { return "discrete_adjoint"; }
  LossOutput compute(Generator& gen) override;

 private:
  GenerativeSDE finetuned_sde_;
};

}  // namespace tilt
