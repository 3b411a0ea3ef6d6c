// The training loop shared by every loss: Adam, gradient-norm clipping, a NaN guard, metrics as
// JSON lines, progress, and checkpoints that resume exactly.
//
// Iteration i draws all its randomness from its own generator, seeded by mix_seed(seed, i), so a
// run resumed from a checkpoint at iteration i continues bit for bit as if never interrupted.
//
// The batch may be drawn in shards (gradient accumulation), and the shards may be spread over
// several processes (data-parallel training, train/distributed.h). Each shard has its own generator,
// so what a run computes depends on (seed, shards), not on the number of processes.
#pragma once

#include "tilt/soc/loss.h"

#include <functional>
#include <memory>
#include <string>

namespace tilt {

class ProcessGroup;

struct AdamOptions {
  // Adjoint Matching, App. G: Adam, lr 2e-5, betas (0.95, 0.999), eps 1e-8, weight decay 1e-2.
  double lr = 2e-5;
  double beta1 = 0.95;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 1e-2;
};

/// Learning rate against the iteration: constant, or a cosine decay from lr to lr * lr_final_factor.
enum class LrSchedule { constant, cosine };
LrSchedule parse_lr_schedule(const std::string& name);  // "constant" | "cosine"

struct TrainerOptions {
  int64_t iterations = 1000;
  AdamOptions adam;
  LrSchedule lr_schedule = LrSchedule::constant;
  double lr_final_factor = 0.01;   ///< cosine schedule: the last iteration's lr is lr * this
  double grad_clip = 1.0;          ///< max global gradient norm; <= 0 disables
  uint64_t seed = 0;
  std::string checkpoint_path;     ///< empty: no checkpoints
  int64_t checkpoint_every = 0;    ///< also at the end; 0: only at the end
  std::string metrics_path;        ///< JSON lines, one per iteration; empty: none
  bool progress = true;            ///< progress bar on stderr
  std::string label = "train";     ///< progress-bar label
  /// The loss's batch is drawn as this many shards of batch / shards samples (the first batch % shards
  /// shards one more), shard s of iteration i from its own generator: mix_seed(seed, i) for shard 0
  /// (so one shard is the plain batch), mix_seed(mix_seed(seed, i), s) for s > 0. The loss and its
  /// gradient are the shards' weighted by their share of the batch. Needs a loss with a batch_size().
  /// 0: one shard per process of the group.
  int64_t shards = 1;
  /// Data-parallel training: the processes sharing the shards (rank r computes shards r, r + W, ...,
  /// W the world size; shards >= W). The gradient, the loss and the metrics are summed over the ranks
  /// before the NaN guard, clipping and Adam, so every rank takes the same step from the same
  /// parameters (rank 0's, broadcast at the first step). Only rank 0 writes the metrics file,
  /// checkpoints and progress. Null: this process alone.
  std::shared_ptr<ProcessGroup> group;
  /// > 0: a robust summary of the loss, which single iterations can spike by orders of magnitude: metrics.jsonl
  /// gets loss_median, loss_q10 and loss_q90, the median and the 10% / 90% quantiles of the loss over the last
  /// loss_window iterations (fewer at the start; a resumed run counts the kept lines of the metrics file), and the
  /// progress line the median and the metric `ess` when the loss reports one. 0: neither.
  int64_t loss_window = 0;
};

/// The q-quantile (0 <= q <= 1) of `values` by linear interpolation between order statistics (q = 0.5: the
/// median). Throws tilt::Error if `values` is empty.
double quantile(std::vector<double> values, double q);

struct StepResult {
  int64_t iteration;   ///< 1-based number of the iteration just done
  double loss;
  double lr;
  double grad_norm;    ///< before clipping
  double seconds;
  LossOutput output;
};

class Trainer {
 public:
  Trainer(Loss& loss, const TrainerOptions& options);
  ~Trainer();

  /// Iterations done so far (0 for a new run; the checkpoint's after resume()).
  int64_t iteration() const;
  /// The learning rate of iteration i (0-based); a pure function of i, so resuming is exact.
  double learning_rate(int64_t i) const;

  /// One optimisation step. Throws tilt::NonFiniteError if the loss or a gradient is NaN/Inf,
  /// before any parameter is changed.
  StepResult step();

  /// Steps until options.iterations, writing metrics, checkpoints and progress.
  void run(const std::function<void(const StepResult&)>& on_step = {});

  /// Writes parameters, optimiser state and the iteration counter, atomically.
  void save_checkpoint(const std::string& path) const;
  /// Restores a checkpoint written by save_checkpoint for the same loss and model. Throws
  /// tilt::Error naming the file if it is missing, corrupt or does not match the model. With a
  /// group, rank 0 reads the file and sends it to the others (only rank 0 needs it).
  void load_checkpoint(const std::string& path);
  /// load_checkpoint(path) if the file exists (on rank 0); returns whether it did.
  bool resume(const std::string& path);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace tilt
