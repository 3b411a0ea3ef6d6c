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

#include <deque>
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

/// Stopping a run once a noisy per-iteration metric (Adjoint Matching's `ess`, E104) has stopped improving: the
/// median of its last `window` values against the median of the `window` values before them (PlateauDetector).
struct EarlyStopOptions {
  std::string metric;          ///< the loss's metric to watch (e.g. "ess"); empty: no early stop
  int64_t window = 200;        ///< W >= 1: values per window; the first check is after 2W of them
  double tolerance = 0.005;    ///< stop when the newer median exceeds the older by at most tolerance * |older|
  int64_t min_iterations = 0;  ///< never before this many values (iterations)
};

/// The plateau test of EarlyStopOptions over a stream of values, one per iteration. With m_old the median of the
/// values 2W..W+1 back and m_new that of the last W, plateau() is true once at least max(2W, min_iterations)
/// values have come and m_new - m_old <= tolerance * |m_old|: the last window improved on the one before by no
/// more than the tolerance (or got worse). Medians of whole windows, not single values, so that one noisy value
/// cannot decide it. Non-finite values are skipped (not counted).
class PlateauDetector {
 public:
  explicit PlateauDetector(const EarlyStopOptions& options);  // throws tilt::Error on window < 1, tolerance < 0
  void add(double value);
  bool plateau() const;
  int64_t count() const { return count_; }  ///< finite values added so far
  /// The medians of the older and the newer window (NaN until 2W values have come).
  double previous_median() const;
  double recent_median() const;
  /// For the log: "median ess 0.912 over the last 100 iterations against 0.910 over the 100 before (+0.22%,
  /// tolerance 0.5%)".
  std::string describe() const;

 private:
  EarlyStopOptions options_;
  std::deque<double> values_;  // the last 2W
  int64_t count_ = 0;
};

/// The arithmetic of the loss's forward computations: float32 as the model is, or bfloat16 autocast
/// (convolutions, linear layers and matrix products in bfloat16, the rest and the parameters in float32; the
/// backward pass follows the forward's dtypes). bfloat16 halves the memory traffic of those ops and can use a
/// device's bfloat16 units (0.73-0.75x the time of a U-Net iteration on a CPU with AVX512-BF16); without such units
/// no gain is expected (docs/devices.md).
enum class Precision { float32, bfloat16 };
Precision parse_precision(const std::string& name);  // "float32" | "bfloat16"

struct StepResult {
  int64_t iteration;   ///< 1-based number of the iteration just done
  double loss;
  double lr;
  double grad_norm;    ///< before clipping
  double seconds;
  LossOutput output;
};

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
  /// Optional early stop (metric empty: off). When the PlateauDetector of the loss's metric fires, the run stops
  /// after that iteration as if it were the last: the checkpoint is written, the iteration's metrics line gets
  /// "early_stop" (the reason) and a note says why. The loss must report the metric (tilt::Error at the first step
  /// otherwise). A plateau at the last iteration is the ordinary end, not an early stop. A resumed run replays the
  /// metric from the kept lines of the metrics file, so resuming a run that stopped early (or one that ended on a
  /// plateau, with more iterations) stops again at once (turn the early stop off, or loosen it, to train on).
  EarlyStopOptions early_stop;
  /// bfloat16: each step's loss is computed under autocast on the parameters' device (CPU or CUDA); the
  /// parameters must be float32. The optimiser and the gradient's norm stay in float32.
  Precision precision = Precision::float32;
  /// Optional: called with each step's result; a non-empty return is a warning, printed (tilt::warning) and
  /// written to that iteration's metrics line as "warning". Rate limiting is the monitor's business.
  std::function<std::string(const StepResult&)> monitor;
};

/// The iteration a checkpoint written by Trainer::save_checkpoint was taken at. Throws tilt::Error naming the
/// file if it is missing, damaged or not a checkpoint.
int64_t checkpoint_iteration(const std::string& path);

/// The q-quantile (0 <= q <= 1) of `values` by linear interpolation between order statistics (q = 0.5: the
/// median). Throws tilt::Error if `values` is empty.
double quantile(std::vector<double> values, double q);

class Trainer {
 public:
  /// Keeps a reference to `loss`, which must outlive the trainer (a trainer stepping after its loss was
  /// destroyed crashed).
  Trainer(Loss& loss, const TrainerOptions& options);
  ~Trainer();

  /// Iterations done so far (0 for a new run; the checkpoint's after resume()).
  int64_t iteration() const;
  /// The learning rate of iteration i (0-based); a pure function of i, so resuming is exact.
  double learning_rate(int64_t i) const;

  /// One optimisation step. Throws tilt::NonFiniteError if the loss or a gradient is NaN/Inf,
  /// before any parameter is changed.
  StepResult step();

  /// Steps until options.iterations (or an early stop), writing metrics, checkpoints and progress.
  void run(const std::function<void(const StepResult&)>& on_step = {});
  /// Why run() stopped before options.iterations (TrainerOptions::early_stop); empty if it did not.
  const std::string& early_stop_reason() const;

  /// Writes parameters, optimiser state and the iteration counter, atomically.
  void save_checkpoint(const std::string& path) const;
  /// Restores a checkpoint written by save_checkpoint for the same loss and model. Throws
  /// tilt::Error naming the file if it is missing, corrupt or does not match the model. With a
  /// group, rank 0 reads the file and sends it to the others (only rank 0 needs it).
  void load_checkpoint(const std::string& path);
  /// load_checkpoint(path) if the file exists (on rank 0); returns whether it did. Throws tilt::Error if the
  /// checkpoint is past options.iterations: run() would train nothing and the result would be a longer run than
  /// asked for.
  bool resume(const std::string& path);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace tilt
