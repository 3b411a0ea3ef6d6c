// tilt pretrain and tilt finetune: training runs with checkpoints, metrics and a final model.
#include "commands.h"

#include "tilt/core/error.h"
#include "tilt/core/fs.h"
#include "tilt/io/builders.h"
#include "tilt/io/methods.h"
#include "tilt/io/model_io.h"
#include "tilt/io/plot.h"
#include "tilt/io/samples.h"
#include "tilt/model/finetuned.h"
#include "tilt/train/flow_matching.h"
#include "tilt/train/trainer.h"

#include <ATen/ATen.h>

#include <fstream>
#include <sstream>

namespace tilt::cli {
namespace {

// Training curves from the metrics file, one panel per key.
void plot_curves(const std::string& metrics_path, const std::vector<std::string>& keys, const std::string& out,
                 const std::string& title) {
  std::istringstream in(read_file(metrics_path, "metrics file"));
  std::vector<plot::Series> series(keys.size());
  for (size_t i = 0; i < keys.size(); ++i) series[i].label = keys[i];
  std::string line;
  while (std::getline(in, line)) {
    const Json j = Json::parse(line, nullptr, false);
    if (!j.is_object()) continue;
    for (size_t i = 0; i < keys.size(); ++i) {
      if (j.contains(keys[i]) && j[keys[i]].is_number()) {
        series[i].x.push_back(j["iteration"].get<double>());
        series[i].y.push_back(j[keys[i]].get<double>());
      }
    }
  }
  for (size_t i = 0; i < keys.size(); ++i) {
    plot::LineOptions o;
    o.title = title + ": " + keys[i];
    o.x_label = "iteration";
    o.y_label = keys[i];
    o.log_y = keys[i] == "loss";
    const std::string path = keys.size() == 1 ? out : out.substr(0, out.size() - 4) + "_" + keys[i] + ".png";
    plot::write_line_png(path, {series[i]}, o);
  }
}

void report_failure_context(const RunDirectory& run) {
  if (file_exists(run.path("checkpoint.pt"))) {  // warn() prints on rank 0 only, which writes it
    warn("the last checkpoint, " + run.path("checkpoint.pt") + ", is intact; continue with --resume once fixed");
  }
}

// Joins the process group of the environment (if any) and prepares the run directory on rank 0
// (the other ranks write nothing). The resolved config records the shards actually used, and every
// rank must have resolved the same config.
RunDirectory start_run(const Config& config, const std::string& section, int64_t shards, const TrainArgs& args,
                       ProcessGroupPtr& group) {
  check_flag_number("--dist-timeout", args.dist_timeout, 1e-3, 86400);  // seconds; at most a day
  group = join_group(args.dist_timeout);
  Json resolved = config.resolved();
  resolved[section]["shards"] = effective_shards(shards, group);
  if (group) group->check_same(resolved.dump(), "configuration (config file and --set)");
  RunDirectory run{args.out, nullptr, ""};
  run_on_rank0(group.get(), [&] { run = prepare_run_directory(args.out, resolved, args.resume); });
  return run;
}

}  // namespace

int run_pretrain(const TrainArgs& args) {
  Config config(args.config.config, args.config.set);
  ConfigSection root = config.root();
  const RunSettings settings = read_run_settings(root);
  const SchedulePtr schedule = read_schedule(root.section("schedule", /*optional=*/true));
  ConfigSection data = root.section("data");
  DataSampler sampler;
  int64_t dim = 0;
  if (data.has("type") && data.string("type") == "digits") {
    const ImageDataset images = *read_image_data(root);
    dim = images.dim();
    sampler = dataset_sampler(images.images);
    info("data: " + std::to_string(images.size()) + " digit images of " + std::to_string(images.height) + " x " +
         std::to_string(images.width) + " pixels");
  } else if (data.has("type") && data.string("type") == "csv") {
    const std::string path = data.string("path");
    data.finish();
    const Tensor x = read_samples_csv(path);
    dim = x.size(1);
    sampler = dataset_sampler(x);
    info("data: " + std::to_string(x.size(0)) + " samples of dimension " + std::to_string(dim) + " from " + path);
  } else {
    auto mixture = read_mixture(data);
    dim = mixture->dim();
    sampler = [mixture](int64_t n, Generator& gen) { return mixture->sample(n, gen); };
  }
  ConfigSection section = root.section("pretrain");
  const MlpOptions mlp = read_mlp(section, dim, {256, 256, 256});
  FlowMatchingOptions fm;
  fm.batch_size = section.integer("batch_size", 256);
  if (fm.batch_size < 1 || fm.batch_size > limits::kBatch) {
    section.fail("batch_size", "must be in 1.." + std::to_string(limits::kBatch) + ", got " + std::to_string(fm.batch_size));
  }
  TrainerOptions defaults;
  defaults.iterations = 5000;
  defaults.adam = {1e-3, 0.9, 0.999, 1e-8, 0.0};
  defaults.lr_schedule = LrSchedule::cosine;
  defaults.checkpoint_every = 500;
  TrainerOptions topt = read_trainer(section, defaults);
  if (topt.shards > fm.batch_size) section.fail("shards", "must be at most batch_size = " + std::to_string(fm.batch_size));
  section.finish();
  finish_root(root);

  ProcessGroupPtr group;
  const RunDirectory run = start_run(config, "pretrain", topt.shards, args, group);
  auto model = std::make_shared<MlpVelocity>(mlp, schedule, mix_seed(settings.seed, 1));
  FlowMatching loss(model, sampler, fm);
  attach_to_run(topt, run, settings, args.quiet, "pretrain", group);
  Trainer trainer(loss, topt);
  resume_if_asked(trainer, topt, run, args.resume);
  try {
    trainer.run();
  } catch (const Error&) {
    report_failure_context(run);
    throw;
  }
  if (!is_writer(group)) return 0;
  save_velocity(*model, run.path("model.pt"), Json{{"trained_by", "tilt pretrain"}, {"iterations", trainer.iteration()}});
  plot_curves(topt.metrics_path, {"loss"}, run.path("training.png"), "flow matching");
  info("wrote " + run.path("model.pt"));
  report({{"model", run.path("model.pt")}, {"iterations", trainer.iteration()}});
  return 0;
}

int run_finetune(const TrainArgs& args) {
  Config config(args.config.config, args.config.set);
  ConfigSection root = config.root();
  const RunSettings settings = read_run_settings(root);
  const VelocityFieldPtr base = read_base(root);
  double lambda = 1.0;
  const RewardPtr reward = read_reward(root.section("reward"), base->dim(), &lambda);
  ConfigSection section = root.section("finetune");
  FinetunePlan plan = read_finetune(section, *base, reward, lambda);
  finish_root(root);

  ProcessGroupPtr group;
  const RunDirectory run = start_run(config, "finetune", plan.trainer.shards, args, group);
  // After start_run, which silences every rank but the first.
  for (const auto& note : plan.notes) warn(note);
  for (const auto& w : plan.warnings) warn(w);
  auto model = plan.make_model(base, mix_seed(settings.seed, 1));
  std::unique_ptr<Loss> loss = plan.make_loss(model);
  TrainerOptions topt = plan.trainer;
  attach_to_run(topt, run, settings, args.quiet, "finetune", group);
  Trainer trainer(*loss, topt);
  resume_if_asked(trainer, topt, run, args.resume);
  try {
    trainer.run([&](const StepResult& r) {
      if (!plan.monitor) return;
      if (const std::string w = plan.monitor(r.output); !w.empty()) warn(w);
    });
  } catch (const Error&) {
    report_failure_context(run);
    throw;
  }
  Json info_json = plan.model_info();
  info_json["trained_by"] = "tilt finetune";
  info_json["iterations"] = trainer.iteration();
  if (!is_writer(group)) return 0;
  save_velocity(*model, run.path("model.pt"), info_json);
  plot_curves(topt.metrics_path, {"loss", plan.method == "refl" ? "reward_prediction" : "reward"}, run.path("training.png"),
              plan.method == "adjoint_matching" ? "adjoint matching" : plan.method);
  info("wrote " + run.path("model.pt"));
  report({{"model", run.path("model.pt")}, {"iterations", trainer.iteration()}});
  return 0;
}

CommandSetup train_setup(int (*run)(const TrainArgs&)) {
  return [run](CLI::App& app) {
    auto args = std::make_shared<TrainArgs>();
    add_config(app, args->config, true);
    add_seed_threads(app, args->config);
    app.add_option("-o,--out", args->out, "Directory: the run's (model.pt, checkpoint.pt, metrics.jsonl, ...)")->required();
    app.add_flag("--resume", args->resume, "Continue the run in --out from its last checkpoint");
    app.add_flag("-q,--quiet", args->quiet, "No progress bar");
    app.add_option("--dist-timeout", args->dist_timeout,
                   "Several processes (WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT set, as by torchrun): the longest "
                   "wait for the others, in seconds, before a clear error")->capture_default_str();
    return [run, args] { return run(*args); };
  };
}

namespace {
const bool registered_pretrain = add_command({"pretrain", "Pretrain a velocity network by flow matching on [data]", 10,
                                              train_setup(run_pretrain)});
const bool registered_finetune = add_command(
    {"finetune", "Fine-tune [base] towards [reward] with Adjoint Matching (or a baseline)", 20, [](CLI::App& app) {
       app.description("Fine-tune [base] towards [reward]: [finetune] method = " + joined(finetune_method_names()) +
                       " (each with its table [finetune.<method>])");
       return train_setup(run_finetune)(app);
     }});
}  // namespace

}  // namespace tilt::cli
