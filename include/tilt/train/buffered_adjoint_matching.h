// Buffered Adjoint Matching: one rollout and one lean adjoint serve several regression steps.
//
// Adjoint Matching pays, per iteration, a K-step rollout and K vector-Jacobian products through the base for B
// trajectories, and then regresses on them once. The lean adjoint runs through the FROZEN base, so it does not
// change when the model does: a trajectory with its adjoint stays a valid regression sample after the model has
// moved; only the law it was drawn from is stale. Buffered Adjoint Matching (the replay buffer of the Adjoint
// Matching authors' Stable Diffusion code: 100 trajectories, 10 passes) simulates `size` trajectories at once and
// takes size * passes / batch_size optimiser steps on minibatches of them before it simulates again.
//
// The regression's minimiser is the conditional mean of the target -rho_k a_k given X_k, under the law of the
// paths after t_k. On-policy that law is the current model's Q_theta; from the buffer it is the old model's Q_old.
// weights = "future" corrects it: each term at step k is weighted by dQ_theta/dQ_old of the path from t_k to 1,
//   log w_k = sum_{j >= k} [-d_j . xi_j - |d_j|^2 / 2],   d_j = c_v,j (v_old - v_theta)(X_j, t_j) / std_j,
// the discrete Girsanov theorem between the two Euler chains (docs/equations.md, E93, E126), self-normalised over
// the minibatch at each step. The states X_k keep Q_old's law, which changes where the regression is fitted but
// not the conditional mean it fits. weights = "none" regresses onto Q_old's conditional mean: the buffer of the
// Stable Diffusion code, which logs these weights' ESS but does not use them. Both reach p* at convergence (at the
// fixed point Q_old = Q_theta = P*); they differ on the way there, and a buffer that is never refilled
// (passes -> infinity) reaches a different law without the weights (E127).
#pragma once

#include "tilt/train/adjoint_matching.h"

#include <memory>
#include <string>
#include <vector>

namespace tilt {

struct BufferOptions {
  int64_t size = 0;             ///< trajectories per refill, a positive multiple of the batch size
  int64_t passes = 10;          ///< times each trajectory enters the regression before the next refill (>= 1)
  std::string weights = "future";  ///< "future": dQ_theta/dQ_old of the path after t_k; "none": unweighted
};

class BufferedAdjointMatching : public Loss {
 public:
  /// `am` as for AdjointMatching (its batch_size is the minibatch); throws tilt::Error on a size that is not a
  /// positive multiple of am.batch_size, passes < 1 or an unknown weights name.
  BufferedAdjointMatching(std::shared_ptr<FineTunedVelocity> model, RewardPtr reward, NoiseSchedulePtr noise,
                          const AdjointMatchingOptions& am, const BufferOptions& buffer);

  std::string name() const override { return "buffered_adjoint_matching"; }
  std::vector<Tensor> parameters() const override { return am_.parameters(); }
  /// Iteration i regresses on minibatch i mod M of the buffer, M = size * passes / batch_size, after refilling it
  /// when i mod M = 0 (with i's generator: the rollout, then `passes` permutations of the rows). Metrics: those of
  /// Adjoint Matching's regression, ess and log_z of the model that filled the buffer (E104), buffer_age (i mod M),
  /// and with weights "future" weight_ess, the ESS fraction of the whole-path weights dQ_theta/dQ_old.
  LossOutput compute(Generator& gen) override;
  void begin_iteration(int64_t iteration) override { iteration_ = iteration; }
  /// The buffer is the batch: it cannot be split into shards (0).
  int64_t batch_size() const override { return 0; }
  /// The buffer, its row order and the iteration it was filled at, so that a resumed run continues exactly.
  std::vector<std::pair<std::string, Tensor>> state() const override;
  void load_state(const std::vector<std::pair<std::string, Tensor>>& state) override;

  /// Optimiser steps per refill, M.
  int64_t iterations_per_refill() const { return refill_every_; }
  /// The last compute()'s weights per step of the grid ([batch] each, mean 1; undefined where no term used one),
  /// empty with weights "none".
  const std::vector<Tensor>& last_weights() const { return last_weights_; }
  /// The rows of the buffer the last compute() regressed on, [batch] long.
  const Tensor& last_rows() const { return last_rows_; }
  /// The trajectories in the buffer (empty before the first compute()).
  const AdjointBatch& buffer() const { return buffer_; }
  const AdjointMatching& adjoint_matching() const { return am_; }

 private:
  void refill(Generator& gen);
  Tensor current_velocity(const AdjointBatch& rows, int64_t k) const;
  std::vector<Tensor> future_weights(const AdjointBatch& rows, int64_t first_step, double* whole_path_ess);

  AdjointMatching am_;
  BufferOptions options_;
  int64_t batch_, refill_every_;
  int64_t iteration_ = 0;
  bool filled_ = false;
  AdjointBatch buffer_;
  Tensor order_;  // the rows of the passes, [size * passes] long
  std::vector<Tensor> last_weights_;
  Tensor last_rows_;
};

}  // namespace tilt
