// tilt pretrain and tilt finetune: training runs with checkpoints, metrics and a final model.
#include "commands.h"

#include "tilt/core/error.h"
#include "tilt/core/fs.h"
#include "tilt/io/builders.h"
#include "tilt/io/methods.h"
#include "tilt/io/model_io.h"
#include "tilt/io/training.h"
#include "tilt/model/finetuned.h"
#include "tilt/train/flow_matching.h"
#include "tilt/train/trainer.h"

#include <functional>

namespace tilt::cli {
namespace {

// Joins the process group of the environment (if any; it silences every rank but the first).
ProcessGroupPtr join_run_group(const TrainArgs& args) {
  check_flag_number("--dist-timeout", args.dist_timeout, 1e-3, 86400);  // seconds; at most a day
  ProcessGroupPtr group = join_group(args.dist_timeout);
  if (group && !run_device().is_cpu()) {
    throw Error("several processes train on the CPU only (Gloo); on CUDA devices they would need NCCL, which tilt "
                "does not use yet: run one process with --device " + run_device().str());
  }
  return group;
}

// Prepares the run directory on rank 0 (the other ranks write nothing), once the model and its loss exist: a
// setting that only the loss refuses (a noise schedule the method cannot use) writes nothing. The resolved config
// records the shards actually used, and every rank must have resolved the same config.
RunDirectory start_run(const Config& config, const std::string& section, int64_t shards, const TrainArgs& args,
                       const ProcessGroupPtr& group) {
  Json resolved = config.resolved();
  resolved[section]["shards"] = effective_shards(shards, group);
  if (group) group->check_same(resolved.dump(), "configuration (config file and --set)");
  RunDirectory run{args.out, nullptr, ""};
  run_on_rank0(group.get(), [&] { run = prepare_run_directory(args.out, resolved, args.resume); });
  return run;
}

// Trains `loss` in the run (resuming if asked); a failure says whether the last checkpoint is intact.
// Returns the iterations done.
int64_t train_in_run(Loss& loss, TrainerOptions topt, const RunDirectory& run, const RunSettings& settings,
                     const TrainArgs& args, const std::string& label, const ProcessGroupPtr& group,
                     const std::function<void(const StepResult&)>& each = nullptr) {
  attach_to_run(topt, run, settings, args.quiet, label, group);
  Trainer trainer(loss, topt);
  resume_if_asked(trainer, topt, run, args.resume);
  try {
    trainer.run(each);
  } catch (const Error&) {
    if (file_exists(run.path("checkpoint.pt"))) {  // warn() prints on rank 0 only, which writes it
      warn("the last checkpoint, " + run.path("checkpoint.pt") + ", is intact; continue with --resume once fixed");
    }
    throw;
  }
  return trainer.iteration();
}

// Rank 0 writes the model, the training curves and the report.
int finish_velocity_run(const VelocityField& model, const RunDirectory& run, const Json& model_info,
                        const std::vector<std::string>& curves, const std::string& title, const ProcessGroupPtr& group,
                        const ConditionSetPtr& conditions = nullptr) {
  if (!is_writer(group)) return 0;
  Json meta = model_info;
  // A box's file records its corners [lo; hi], which are not conditions to draw at (tilt sample asks for one).
  if (conditions && conditions->is_box()) meta["conditions_law"] = "uniform";
  save_velocity(model, run.path("model.pt"), meta, conditions ? conditions->values() : Tensor());
  info("wrote " + run.path("model.pt"));  // before the curves: a full disk there leaves the model whole, and says so
  plot_training_curves(run.path("metrics.jsonl"), curves, run.path("training.png"), title);
  report({{"model", run.path("model.pt")}, {"iterations", model_info["iterations"]}});
  return 0;
}

}  // namespace

int run_pretrain(const TrainArgs& args) {
  Config config(args.config.config, args.config.set);
  ConfigSection root = config.root();
  const RunSettings settings = read_run_settings(root);
  const PretrainPlan plan = read_pretrain(root);
  if (!plan.data_note.empty()) info("data: " + plan.data_note);
  finish_root(root);

  const ProcessGroupPtr group = join_run_group(args);
  auto model = plan.make_model(mix_seed(settings.seed, 1));
  model->to(settings.device);  // before the loss and its optimiser take the parameters
  std::unique_ptr<FlowMatching> loss = make_flow_matching(plan, model);
  const RunDirectory run = start_run(config, "pretrain", plan.trainer.shards, args, group);
  const int64_t iterations = train_in_run(*loss, plan.trainer, run, settings, args, "pretrain", group);
  Json model_info{{"trained_by", "tilt pretrain"}, {"iterations", iterations}};
  if (plan.conditions) model_info["condition_dropout"] = plan.flow_matching.condition_dropout;
  return finish_velocity_run(*model, run, model_info, {"loss"}, "flow matching", group, plan.conditions);
}

int run_finetune(const TrainArgs& args) {
  Config config(args.config.config, args.config.set);
  ConfigSection root = config.root();
  const RunSettings settings = read_run_settings(root);
  const VelocityFieldPtr base = read_base(root);
  base->to(settings.device);
  double lambda = 1.0;
  const RewardPtr reward = read_reward(root.section("reward"), base->dim(), &lambda);
  reward->to(settings.device);
  const ConditionSetPtr conditions = read_training_conditions(root, *base);
  ConfigSection section = root.section("finetune", /*optional=*/true);  // every key has a default
  if (args.resume) keep_preset_of_run(section, args.out);
  FinetunePlan plan = read_finetune(section, *base, reward, lambda, conditions);
  finish_root(root);

  const ProcessGroupPtr group = join_run_group(args);
  // After joining, which silences every rank but the first.
  for (const auto& note : plan.notes) warn(note);
  for (const auto& w : plan.warnings) warn(w);
  auto model = plan.make_model(base, mix_seed(settings.seed, 1));
  model->to(settings.device);  // a residual network is made on the CPU
  std::unique_ptr<Loss> loss;
  try {  // what only the method itself refuses (sigma = 0 where it divides by sigma), before anything is written
    loss = plan.make_loss(model);
  } catch (const Error& e) {
    throw Error("in " + root.origin() + ": [finetune] (method = " + plan.method + "): " + e.what());
  }
  const RunDirectory run = start_run(config, "finetune", plan.trainer.shards, args, group);
  // plan.trainer.monitor prints the method's warnings and writes them to metrics.jsonl.
  const int64_t iterations = train_in_run(*loss, plan.trainer, run, settings, args, "finetune", group);
  Json model_info = plan.model_info();
  model_info["trained_by"] = "tilt finetune";
  model_info["iterations"] = iterations;
  std::vector<std::string> curves{"loss", plan.method == "refl" ? "reward_prediction" : "reward"};
  curves.insert(curves.end(), plan.curves.begin(), plan.curves.end());
  return finish_velocity_run(*model, run, model_info, curves, plan.method == "adjoint_matching" ? "adjoint matching" : plan.method, group, plan.conditions);
}

CommandSetup train_setup(int (*run)(const TrainArgs&), const std::string& out_files, bool distributed) {
  return [run, out_files, distributed](CLI::App& app) {
    auto args = std::make_shared<TrainArgs>();
    add_config(app, args->config, true);
    add_seed_threads(app, args->config);
    app.add_option("-o,--out", args->out, "Directory: the run's (" + out_files + ")")->required();
    app.add_flag("--resume", args->resume, "Continue the run in --out from its last checkpoint");
    app.add_flag("-q,--quiet", args->quiet, "No progress bar");
    if (distributed) {
      app.add_option("--dist-timeout", args->dist_timeout,
                     "Several processes (WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT set, as by torchrun): the longest "
                     "wait for the others, in seconds, before a clear error")->capture_default_str();
    }
    return [run, args] { return run(*args); };
  };
}

namespace {
const char* const kVelocityRunFiles = "model.pt, checkpoint.pt, metrics.jsonl, config.resolved.json, inputs.json, training*.png, run.lock";
const bool registered_pretrain = add_command({"pretrain", "Pretrain a velocity network by flow matching on [data]", 10,
                                              train_setup(run_pretrain, kVelocityRunFiles, true)});
const bool registered_finetune = add_command(
    {"finetune", "Fine-tune [base] towards [reward] with Adjoint Matching (or a baseline)", 20, [](CLI::App& app) {
       app.description("Fine-tune [base] towards [reward]: [finetune] method = " + joined(finetune_method_names()) +
                       " (each with its table [finetune.<method>])");
       return train_setup(run_finetune, kVelocityRunFiles, true)(app);
     }});
}  // namespace

}  // namespace tilt::cli
