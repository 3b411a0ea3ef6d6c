// The fine-tuning methods, by name: each registers its config table [finetune.<name>], reads its
// keys with every default and every check, and builds its loss. `tilt finetune` and a C++ caller
// go through read_finetune (or make_finetune_plan), so both get the same defaults; docs/config.md
// documents each key.
#pragma once

#include "tilt/io/config.h"
#include "tilt/model/condition.h"
#include "tilt/model/finetuned.h"
#include "tilt/model/mlp.h"
#include "tilt/model/reward.h"
#include "tilt/model/velocity.h"
#include "tilt/schedule/noise_schedule.h"
#include "tilt/soc/loss.h"
#include "tilt/train/trainer.h"

#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace tilt {

/// A fine-tuning run as [finetune] and the method's table describe it.
struct FinetunePlan {
  std::string method;
  std::string noise = "memoryless";  ///< [finetune] noise as given; "ode" when the method samples with the flow ODE
  /// [finetune] preset as resolved: "paper" (the defaults are the Adjoint Matching paper's, for image models) or
  /// "small" (the settings the random problem family passed); the default, "auto", resolves to "small" for Adjoint
  /// Matching on a vector base of at most 10 dimensions and to "paper" elsewhere (docs/config.md).
  std::string preset = "paper";
  NoiseSchedulePtr noise_schedule;   ///< memoryless: offset h = 1/num_steps (the paper's one step)
  int64_t num_steps = 40, batch_size = 40;
  double lambda = 1.0;
  RewardPtr reward;
  /// The training conditions of a conditional base ([conditions] train; docs/conditions.md); null otherwise.
  ConditionSetPtr conditions;
  FineTuneMode mode = FineTuneMode::residual;
  MlpOptions mlp;          ///< the trainable network (hidden, time_features)
  LoraOptions lora;        ///< the adapters of model = "lora" (lora_rank, lora_alpha)
  TrainerOptions trainer;  ///< Adam and the run's length (the Adjoint Matching paper's settings by default)
  /// About the configuration, known once it is read: old flat keys, keys the method ignores.
  std::vector<std::string> notes;
  /// About the run: what its result will not be (biased, no KL term). Worth saying once it starts.
  std::vector<std::string> warnings;
  /// The method's loss for the model being trained (make_model's).
  std::function<std::unique_ptr<Loss>(std::shared_ptr<FineTunedVelocity>)> make_loss;
  /// Optional: called with each step's loss output; a non-empty return is a warning to show (the monitor limits how
  /// often). read_finetune hands it to trainer.monitor, which prints it and writes it to metrics.jsonl.
  std::function<std::string(const LossOutput&)> monitor;
  /// The loss reports the metric `ess` (adjoint_matching without guidance), which [finetune] early_stop = "ess" needs.
  bool reports_ess = false;
  /// Whether the trainer may split the method's batch into shards (`shards`, several processes); false for a
  /// buffered Adjoint Matching, whose buffer is the batch.
  bool shardable = true;
  /// Metrics that training.png plots besides the loss and the reward (adjoint_matching: loss_median and ess).
  std::vector<std::string> curves;

  /// The model to fine-tune: the base plus a new trainable network (mode, mlp), seeded.
  std::shared_ptr<FineTunedVelocity> make_model(VelocityFieldPtr base, uint64_t seed) const;
  /// What a model file records about the run: method, noise (the schedule `tilt sample` uses by
  /// default), lambda, reward, num_steps.
  Json model_info() const;
};

/// What a method's reader gets besides its table: the plan so far (num_steps, batch_size, noise,
/// lambda, reward), the [finetune] table (to name its keys in messages) and the base.
struct MethodContext {
  FinetunePlan& plan;
  ConfigSection& finetune;
  const VelocityField& base;
  /// Whether the run simulates with [finetune] noise: FinetuneMethod::uses_noise, unless the reader says otherwise
  /// (eam's path_weights rolls the noise out though eam samples with the ODE). false with a noise key: a note.
  bool uses_noise = false;
};

/// One fine-tuning method.
struct FinetuneMethod {
  std::string name;
  std::string help;               ///< one line, for help texts
  std::vector<std::string> keys;  ///< every key of [finetune.<name>]
  bool uses_noise = true;         ///< simulates with [finetune] noise; false: with the flow ODE
  bool policy = false;            ///< the noise is its policy's (any gamma > 0 is unbiased for it)
  /// Reads [finetune.<name>] (old files: [finetune], through ConfigSection::accept_moved_keys) and
  /// sets plan.make_loss (and plan.monitor, warnings) on ctx.plan.
  std::function<void(ConfigSection& table, MethodContext& ctx)> read;
  /// Needs only the reward's values (ram, ddpo, grpo): the only methods a reward without a gradient may use.
  bool values_only = false;
};

/// Adds a method; throws tilt::Error if the name is taken. The built-in ones are registered first.
void register_finetune_method(FinetuneMethod method);
/// Every method, in registration order.
const std::vector<FinetuneMethod>& finetune_methods();
std::vector<std::string> finetune_method_names();

/// [finetune] (the keys common to all methods: method, noise, model, hidden, time_features,
/// num_steps, batch_size, and the trainer's) and the method's table [finetune.<method>]. Checks
/// every key; the tables of the other methods may be present (their keys are checked by name).
/// The section is finished (unknown keys are errors). `conditions`: the training conditions of a
/// conditional base (required for one, refused for an unconditional one).
FinetunePlan read_finetune(ConfigSection& finetune, const VelocityField& base, RewardPtr reward, double lambda,
                           ConditionSetPtr conditions = nullptr);

/// Before read_finetune of a resumed run: when [finetune] gives no preset, the default becomes the one the run in
/// `run_dir` was started with (its config.resolved.json; "paper" for a run older than the key), so that a run
/// resumes with its own defaults whatever the default is now; for "small" (given or kept), also the training chain it
/// chose then (K = 60 Euler steps before the exact chain). Does nothing where the directory holds no readable record:
/// the resume then refuses it, naming the file.
void keep_preset_of_run(ConfigSection& finetune, const std::string& run_dir);

/// For C++ callers: the same from a JSON table shaped like [finetune], e.g.
/// {{"method", "draft"}, {"num_steps", 20}, {"draft", {{"draft_k", 2}}}}.
FinetunePlan make_finetune_plan(const Json& finetune, const VelocityField& base, RewardPtr reward, double lambda,
                                ConditionSetPtr conditions = nullptr);

}  // namespace tilt
