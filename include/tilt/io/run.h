// What a command-line run of tilt does around the library: the run's settings (seed, threads), the
// base, data and exact problem of a configuration, and the run directory a training run writes
// (locked, resumable, never overwriting its own inputs). `tilt` uses these, and so can a C++
// program that wants the same behaviour from the same config files (docs/config.md).
#pragma once

#include "tilt/core/fs.h"
#include "tilt/io/config.h"
#include "tilt/model/condition.h"
#include "tilt/model/gmm.h"
#include "tilt/model/reward.h"
#include "tilt/model/velocity.h"
#include "tilt/train/dataset.h"
#include "tilt/train/distributed.h"
#include "tilt/train/trainer.h"

#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace tilt {

/// seed, threads and device from the top level of the config; sets LibTorch's thread count and the
/// process's device (unless --device fixed it: set_run_device).
struct RunSettings {
  uint64_t seed = 0;
  int threads = 0;
  at::Device device{at::kCPU};  ///< where the run's models and tensors live (docs/devices.md)
};
RunSettings read_run_settings(ConfigSection& root);
/// The device of this process's runs: the CPU until set. `from_flag` (--device) makes it win over a
/// config's device key, which read_run_settings then only checks to be a string.
void set_run_device(const at::Device& device, bool from_flag);
at::Device run_device();
/// The most threads a config or --threads may ask for (docs/config.md, Limits): a fixed bound, so
/// that a config valid on one machine is valid on every other. 100000 blocked in futex_wait.
constexpr int kMaxThreads = 1024;
/// 0: all cores, shared among the processes of a group on this machine (LOCAL_WORLD_SIZE, as torchrun sets it).
/// Throws tilt::Error naming --threads outside 0..kMaxThreads. Also keeps freed CPU memory for reuse
/// (keep_cpu_memory in tilt/core/tensor.h; TILT_MALLOC=system: not).
void set_threads(int threads);

/// Bounds of a flag or option (docs/config.md, Limits): tilt::Error("<name> must be in lo..hi, got value"),
/// for numbers "<name> must be in [lo, hi], got value". `name` is the flag, or the key it came from.
void check_in_range(const std::string& name, int64_t value, int64_t lo, int64_t hi);
void check_number_in_range(const std::string& name, double value, double lo, double hi);

/// Checks the top level of a config for unknown keys; the tables of the other commands (seed, threads,
/// schedule, data, base, reward, pretrain, finetune, classifier, soc) are allowed.
void finish_config_root(ConfigSection& root);

/// Joins the group of processes that the environment describes (WORLD_SIZE, RANK, MASTER_ADDR,
/// MASTER_PORT, as torchrun sets them), each collective waiting at most timeout_seconds; null for
/// one process. From then on note() and warning() (tilt/core/log.h) print on rank 0 only.
ProcessGroupPtr join_group(double timeout_seconds);
/// Whether this process writes the run's files: rank 0, or the only process.
bool is_writer(const ProcessGroupPtr& group);
/// The shards a run uses: `shards`, or one per process when it is 0.
int64_t effective_shards(int64_t shards, const ProcessGroupPtr& group);

/// The data distribution of [data] when it is a Gaussian mixture (nullptr for a CSV data set). A mixture
/// whose means move with a condition (shift = M, d rows of dc numbers; docs/conditions.md) puts M in
/// *shift; with shift null such a [data] is refused, naming the key.
std::shared_ptr<GaussianMixture> read_data_mixture(ConfigSection& root, Tensor* shift = nullptr);

/// Whether [data] type names a labelled image data set: "digits" or "fashion_mnist".
bool is_image_data_type(const std::string& type);

/// The labelled images of [data] when it is an image data set (type = "digits": path, default
/// data/digits/digits.csv.gz; type = "fashion_mnist": path, the directory, default
/// /usr/share/datasets/fashion-mnist, its training set), limit > 0 keeping the first `limit` images;
/// nullopt for mixtures and CSV samples.
/// *holdout receives the share of each class that `tilt classifier` holds out for testing (default 0.2
/// for digits, 0.1 for Fashion-MNIST).
std::optional<ImageDataset> read_image_data(ConfigSection& root, double* holdout = nullptr);

/// The base model of [base]: "exact" (the Gaussian-mixture velocity of [data], conditional when [data]
/// has a shift), "model" (a file), or "torchscript" (a module exported from PyTorch, frozen).
VelocityFieldPtr read_base(ConfigSection& root);

/// The training conditions of [conditions] for a conditional base (docs/conditions.md); null for an
/// unconditional one. Throws tilt::Error when a conditional base has no [conditions], or an unconditional
/// one has some.
ConditionSetPtr read_training_conditions(ConfigSection& root, const VelocityField& base);

/// The exact ground truth of a config whose data is a Gaussian mixture and whose reward has a
/// closed-form tilt: p_base and p* (docs/equations.md, E75-E77).
struct ExactProblem {
  std::shared_ptr<GaussianMixture> base, target;
  RewardPtr reward;
  double lambda = 1.0;
  double log_z = 0.0;
};
/// The problem of a config whose data is a Gaussian mixture, conditional or not (docs/conditions.md):
/// p_0 and M of [data] (shift undefined: the data do not move with c), the reward of [reward], lambda.
struct ConditionalExactProblem {
  std::shared_ptr<GaussianMixture> mixture;
  Tensor shift;
  RewardPtr reward;
  double lambda = 1.0;
  /// dc of the data (or of the reward, when only the reward moves); 0 for an unconditional problem.
  int64_t condition_dim() const;
  /// The exact problem at one condition ([dc]; undefined for an unconditional problem): p_base(. | c),
  /// r(., c), p*(. | c) (E96-E99). nullopt, with the reason in *why, when there is no closed form.
  std::optional<ExactProblem> at(const Tensor& condition, std::string* why = nullptr) const;
  /// What `at` tilts: p_base(. | c), r(., c) and lambda, without the target (left null; log_z 0). There whether or
  /// not the reward has a closed-form tilt; nullopt, with the reason in *why, for a conditional problem without c.
  std::optional<ExactProblem> bound_at(const Tensor& condition, std::string* why = nullptr) const;
};
/// p* of a Gaussian-mixture base and [reward] in closed form (exact_tilt), nullopt for a reward without one. A target
/// that cannot be formed (a quadratic reward whose lambda * precision is below minus a component's precision: p_base
/// exp(lambda r) has no finite integral) throws tilt::Error naming [reward] and lambda.
std::optional<GaussianMixture> exact_target(const Reward& reward, const GaussianMixture& base, double lambda,
                                            double* log_z = nullptr);
/// nullopt (with the reason in *why) if [data] is not a Gaussian mixture.
std::optional<ConditionalExactProblem> read_conditional_exact_problem(ConfigSection& root, std::string* why = nullptr);

/// nullopt (with the reason in *why) if there is no exact target. For conditional data or a conditional
/// reward the problem is the one at `condition` ([dc]): p_base(. | c), r(., c), p*(. | c) (E96-E99);
/// without a condition there is no single target (nullopt, saying so).
std::optional<ExactProblem> read_exact_problem(ConfigSection& root, std::string* why = nullptr,
                                               const Tensor& condition = Tensor());

/// A run directory for training, locked while this process writes it (a second writer is refused,
/// naming this PID). Refuses to overwrite a run that has a checkpoint or a model unless resuming;
/// on resume checks that the configuration is the one the run was started with. A run that stopped
/// before its first checkpoint is started afresh. Refuses a config whose input files are among the
/// run's outputs, and removes temporary files a killed process left behind.
struct RunDirectory {
  std::string dir;
  std::shared_ptr<DirectoryLock> lock;  ///< rank 0's (the writer's); null on the other ranks
  std::string pending_config;           ///< on resume: written once the checkpoint was read
  std::string path(const std::string& name) const { return dir + "/" + name; }
};
RunDirectory prepare_run_directory(const std::string& dir, const Json& resolved, bool resume);

/// The files a resolved configuration names (a base model, a reward's classifier, a data set): (dotted key, path) for
/// each string value that names an existing file. What an output must not replace.
std::vector<std::pair<std::string, std::string>> config_files(const Json& resolved);

/// The dotted keys whose values differ between two resolved configurations (e.g. "finetune.hidden"; a key in only
/// one of them counts), in b's order, then a's keys missing from b: what a refused --resume names.
std::vector<std::string> differing_keys(const Json& a, const Json& b);

/// Points a training run at its directory (checkpoint.pt, metrics.jsonl), seeds it from the config's seed,
/// and labels its progress bar (none if quiet).
void attach_to_run(TrainerOptions& topt, const RunDirectory& run, const RunSettings& settings, bool quiet,
                   const std::string& label, const ProcessGroupPtr& group = nullptr);
/// With resume, continues from the run's checkpoint when there is one (rank 0's, sent to the others) and says so;
/// then writes the resolved config that prepare_run_directory held back.
void resume_if_asked(Trainer& trainer, const TrainerOptions& topt, const RunDirectory& run, bool resume);

/// Training curves from a run's metrics.jsonl, one PNG per key (loss and loss_median on a log scale): `out`
/// itself for one key, `out` with "_<key>" before ".png" for several.
void plot_training_curves(const std::string& metrics_path, const std::vector<std::string>& keys, const std::string& out,
                          const std::string& title);

}  // namespace tilt
