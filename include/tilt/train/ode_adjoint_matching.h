// Deterministic (ODE) Adjoint Matching with a truncated adjoint: reward fine-tuning as optimal control
// of the flow ODE itself, with any convex running cost psi (tilt/train/regulariser.h).
//
// After Guo, Sheng, Yao, Tang, "Improved techniques for fine-tuning flow models via adjoint matching:
// a deterministic control pipeline" (arXiv 2605.06583; only its abstract was readable), reconstructed
// in docs/equations.md, E83-E90 [D]. Notation (docs/ode_adjoint_matching.md):
//
//   dX/dt = v_base(X, t) + u(X, t),  X_0 ~ N(0, I),   u = v_theta - v_base  (model/finetuned.h)
//   maximise  J(u) = E[ lambda r(X_1) - int_0^1 psi_t(u(X_t, t)) dt ]
//
// Discretised by forward Euler on K uniform steps, X_{k+1} = X_k + h (v_base + u)(X_k, t_k). Each
// iteration (no graph is kept anywhere):
//   1. roll out the current model without gradients, storing the states of the last K_adj steps only
//      (the window [t_c, 1], t_c = t_{K - K_adj});
//   2. lean adjoint backwards through the FROZEN base (docs/equations.md, E85; costate of the reward, so a > 0
//      points uphill, the opposite sign of tilt's Adjoint Matching):
//        a_K = lambda grad r(X_K),   a_k = a_{k+1} + h (grad_x v_base(X_k, t_k))^T a_{k+1},
//      K_adj - 1 vector-Jacobian products of the base (none of the fine-tuned field);
//   3. regress u_theta(X_k, t_k) onto grad psi*_{t_k}(a_{k+1}) on the window's steps.
// The target uses a_{k+1}, the costate after step k: h psi'(u_k) = h a_{k+1} is exactly the first-order
// condition of the Euler-discretised objective, and at that fixed point the dropped terms of the full
// discrete adjoint cancel, so the fixed point is the discrete problem's optimum, not an O(h) neighbour
// of it [D]. Steps before t_c keep the control they have ("keep"), or are regressed to 0 ("zero").
//
// Conditions (docs/conditions.md): with OdeAdjointMatchingOptions::conditions, each trajectory draws its
// own c (first in the iteration); the rollout, the base's adjoint, the reward (when it takes a condition)
// and the regression rows (c repeated over the steps like X_k) are all at it.
//
// The optimum is NOT p* ∝ p_base exp(lambda r): each noise seed is steered on its own (a transport
// cost), e.g. N(0.775, 0.138) against the tilt's N(0.845, 0.422) (docs/equations.md, E89).
#pragma once

#include "tilt/model/condition.h"
#include "tilt/model/finetuned.h"
#include "tilt/model/reward.h"
#include "tilt/sde/time_grid.h"
#include "tilt/soc/loss.h"
#include "tilt/train/regulariser.h"

#include <memory>
#include <string>
#include <vector>

namespace tilt {

struct OdeAdjointMatchingOptions {
  int64_t num_steps = 40;      ///< K uniform Euler steps on [0, 1]
  int64_t batch_size = 40;     ///< trajectories per iteration
  double lambda = 1.0;         ///< reward multiplier: a_K = lambda grad r(X_1)
  int64_t adjoint_steps = 0;   ///< K_adj: the adjoint runs over the last K_adj steps; 0 = all (no truncation)
  /// Before t_c: "keep" (not trained) or "zero" (u_theta regressed onto 0 there).
  std::string truncated_control = "keep";
  int64_t loss_steps = 0;      ///< steps drawn per iteration from the trained ones; 0 = all of them
  /// The training conditions: each trajectory draws its own c from them (docs/conditions.md). Null for
  /// an unconditional model, required for a conditional one.
  ConditionSetPtr conditions;
};

/// The lean adjoint of the ODE backwards through the frozen base, over the last n = x.size() steps:
/// x[j] = X_{K-n+j} (j = 0..n-1) on `grid` (K = grid.steps()), a_final = a_K. Returns a[j] = a_{K-n+j},
/// j = 0..n (a[n] = a_final), from n vector-Jacobian products of `base`.
std::vector<Tensor> ode_lean_adjoint(const VelocityField& base, const std::vector<Tensor>& x, const TimeGrid& grid,
                                     const Tensor& a_final);

/// The regression problem of one iteration: rows are (step, trajectory) pairs, step-major.
struct OdeRegressionBatch {
  std::vector<int64_t> steps;  ///< the grid steps k in the loss, increasing
  Tensor x, t, v_base;         ///< X_k, t_k, v_base(X_k, t_k): [S B, d], [S B], [S B, d]
  Tensor target;               ///< grad psi*_{t_k}(a_{k+1}) in the window, 0 before it: [S B, d]
  Tensor c;                    ///< the rows' conditions, [S B, dc] (undefined: unconditional)
  Tensor conditions;           ///< the trajectories' conditions, [B, dc] (undefined: unconditional)
  Tensor x1;                   ///< X_K, [B, d]
  Tensor control_cost;         ///< sum_k h psi_{t_k}(u(X_k, t_k)) along the rollout, [B]
  std::vector<Tensor> adjoint; ///< a_{k0+1..K} (k0 = K - K_adj), each [B, d]
};

class OdeAdjointMatching : public Loss {
 public:
  /// Throws tilt::Error for a missing or mismatched reward, mismatched conditions (as check_conditions
  /// and check_reward_condition), or options out of range.
  OdeAdjointMatching(std::shared_ptr<FineTunedVelocity> model, RewardPtr reward, RegulariserPtr regulariser,
                     const OdeAdjointMatchingOptions& options);

  std::string name() const override { return "ode_adjoint_matching"; }
  std::vector<Tensor> parameters() const override { return model_->parameters(); }
  /// loss = (n_trained / S) sum over the S chosen steps of h |u_theta(X_k, t_k) - target_k|^2, batch
  /// mean: an unbiased estimate of sum_k h |u_theta - target|^2 over the trained steps.
  LossOutput compute(Generator& gen) override;
  int64_t batch_size() const override { return options_.batch_size; }
  void set_batch_size(int64_t n) override;

  /// Steps 1-3 of the header, without the network's forward on the regression rows.
  OdeRegressionBatch regression_batch(Generator& gen) const;
  /// k0 = K - K_adj: the first step of the window (t_c = t_{k0}).
  int64_t window_start() const { return window_start_; }
  const TimeGrid& grid() const { return grid_; }
  const OdeAdjointMatchingOptions& options() const { return options_; }
  const Regulariser& regulariser() const { return *regulariser_; }

 private:
  std::shared_ptr<FineTunedVelocity> model_;
  RewardPtr reward_;
  RegulariserPtr regulariser_;
  OdeAdjointMatchingOptions options_;
  TimeGrid grid_;
  int64_t window_start_;
};

}  // namespace tilt
