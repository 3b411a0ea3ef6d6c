// tilt pretrain and tilt finetune: training runs with checkpoints, metrics and a final model.
#include "commands.h"

#include "tilt/core/error.h"
#include "tilt/core/fs.h"
#include "tilt/io/builders.h"
#include "tilt/io/model_io.h"
#include "tilt/io/plot.h"
#include "tilt/io/samples.h"
#include "tilt/model/finetuned.h"
#include "tilt/schedule/noise_schedule.h"
#include "tilt/sde/gddim.h"
#include "tilt/train/adjoint_matching.h"
#include "tilt/train/flow_matching.h"
#include "tilt/train/policy_gradient.h"
#include "tilt/train/ode_adjoint_matching.h"
#include "tilt/train/reward_baselines.h"
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

// [finetune] keys of the policy-gradient baselines (docs/policy_gradient.md); the window keys are GRPO's.
PolicyGradientOptions read_policy_gradient(ConfigSection& section, bool grouped) {
  PolicyGradientOptions o;
  o.reduction = parse_log_prob_reduction(section.choice("log_prob", {"mean", "sum"}, "mean"));
  o.clip_range = section.number("clip_range", o.clip_range);
  if (!(o.clip_range > 0.0)) section.fail("clip_range", "must be > 0");
  o.adv_clip_max = section.number("adv_clip_max", o.adv_clip_max);
  if (!(o.adv_clip_max > 0.0)) section.fail("adv_clip_max", "must be > 0");
  o.scale_advantages = section.boolean("scale_advantages", o.scale_advantages);
  o.inner_epochs = section.integer("inner_epochs", o.inner_epochs);
  if (o.inner_epochs < 1 || o.inner_epochs > 1000) {  // Adam steps per sampled batch (docs/config.md)
    section.fail("inner_epochs", "must be in 1..1000, got " + std::to_string(o.inner_epochs));
  }
  if (grouped) {
    o.group_size = section.integer("group_size", o.group_size);
    if (o.group_size < 2) section.fail("group_size", "must be >= 2");
    o.window = section.integer("window", o.window);
    if (o.window < 0) section.fail("window", "must be >= 0 (0: every step)");
    o.window_strategy = parse_window_strategy(section.choice("window_strategy", {"progressive", "random"}, "progressive"));
    o.window_iters = section.integer("window_iters", o.window_iters);
    if (o.window_iters < 1) section.fail("window_iters", "must be >= 1");
    o.window_shift = section.integer("window_shift", o.window_shift);
    if (o.window_shift < 1) section.fail("window_shift", "must be >= 1");
  }
  return o;
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
  const std::string method =
      section.choice("method", {"adjoint_matching", "draft", "refl", "discrete_adjoint", "ddpo", "grpo",
                                "ode_adjoint_matching"},
                     "adjoint_matching");
  const bool is_am = method == "adjoint_matching";
  const bool is_pg = method == "ddpo" || method == "grpo";  // policy gradient: the policy's gamma is noise's
  const bool uses_noise = is_am || method == "discrete_adjoint" || is_pg;
  for (const char* key : {"loss_early_steps", "loss_late_steps", "clip_factor", "loss_weighting", "final_noiseless_step",
                          "tape_activations"}) {
    if (!is_am && section.has(key)) warn(section.where(key) + " is ignored by method = \"" + method + "\"");
  }
  if (!uses_noise && section.has("noise")) {
    warn(section.where("noise") + " is ignored by method = \"" + method + "\" (it samples with the flow ODE)");
  }
  const std::string noise_spec = section.string("noise", "memoryless");
  const FineTuneMode mode = parse_finetune_mode(section.choice("model", {"residual", "copy"}, "residual"));
  const MlpOptions mlp = read_mlp(section, base->dim(), {128, 128, 128});
  AdjointMatchingOptions am = read_adjoint_matching(section);
  RewardBaselineOptions baseline;
  baseline.num_steps = am.num_steps;
  baseline.batch_size = am.batch_size;
  baseline.lambda = lambda;
  if (method == "draft") {
    baseline.draft_k = section.integer("draft_k", baseline.draft_k);
    if (baseline.draft_k < 1 || baseline.draft_k > am.num_steps) section.fail("draft_k", "must be in 1..num_steps");
  }
  if (method == "refl") {
    baseline.refl_t_min = section.number("refl_t_min", baseline.refl_t_min);
    if (!(baseline.refl_t_min >= 0.0 && baseline.refl_t_min < 1.0)) section.fail("refl_t_min", "must be in [0, 1)");
  }
  PolicyGradientOptions pg;
  if (is_pg) pg = read_policy_gradient(section, method == "grpo");
  // The paper's offset is one step, h = 1/K: on a uniform grid the memoryless drift's -x/t part is
  // then integrated exactly (docs/method.md, choice 1).
  NoiseSchedulePtr noise;
  try {
    noise = noise_spec == "memoryless" ? make_memoryless_noise(1.0 / static_cast<double>(am.num_steps))
                                       : parse_noise_schedule(noise_spec);
  } catch (const Error& e) {
    section.fail("noise", std::string("is invalid: ") + e.what());
  }
  am.lambda = lambda;
  if (is_pg) {
    pg.num_steps = am.num_steps;
    pg.batch_size = am.batch_size;
    pg.lambda = lambda;
    // The policy is the exact gDDIM step of the noise schedule's stochasticity gamma (> 0).
    pg.gamma = stochasticity_of(*noise);
    if (!(pg.gamma > 0.0)) section.fail("noise", "the policy needs gamma > 0 (memoryless or scaled_memoryless:<gamma>): the ODE has no log-probability");
    if (method == "grpo" && am.batch_size % pg.group_size != 0) {
      section.fail("group_size", "must divide batch_size = " + std::to_string(am.batch_size));
    }
    if (pg.window > am.num_steps - 1) section.fail("window", "must be <= num_steps - 1 = " + std::to_string(am.num_steps - 1));
  }
  OdeAdjointMatchingOptions ode_am;
  RegulariserPtr regulariser;
  if (method == "ode_adjoint_matching") {
    ode_am = read_ode_adjoint_matching(section, am);
    regulariser = read_regulariser(section);
  }
  TrainerOptions defaults;  // the paper's Adam settings (App. G)
  defaults.checkpoint_every = 100;
  TrainerOptions topt = read_trainer(section, defaults);
  if (topt.shards > am.batch_size) section.fail("shards", "must be at most batch_size = " + std::to_string(am.batch_size));
  if (mode == FineTuneMode::copy && base->kind() == "gmm") {
    section.fail("model", "is \"copy\", which needs a network base, but [base] is the exact mixture (use \"residual\")");
  }
  section.finish();
  finish_root(root);

  ProcessGroupPtr group;
  const RunDirectory run = start_run(config, "finetune", topt.shards, args, group);
  if (uses_noise && noise->is_memoryless() && noise->h() > kLargeMemorylessOffset) {
    warn(section.where("noise") + " = \"" + noise_spec + "\": an offset h above " + number_string(kLargeMemorylessOffset) +
         " is far from memoryless near t = 0, and the run will miss p* by more (the default is one step, h = 1/num_steps)");
  }
  if (uses_noise && !is_pg && !noise->is_memoryless()) {
    warn("fine-tuning with the " + noise->describe() +
         " noise schedule: only the memoryless schedule reaches p* ∝ p_base exp(lambda r); this run will be biased "
         "(the value-function bias, Adjoint Matching Sec. 4)");
  }
  if (method == "draft" || method == "refl" || is_pg) {
    warn("method = \"" + method + "\" maximises the reward with no KL term: it does not target p* ∝ p_base exp(lambda r) "
         "and loses diversity as it trains (a baseline, for comparison)");
  }
  if (method == "ode_adjoint_matching") {
    warn("method = \"ode_adjoint_matching\" solves a deterministic control problem (" + regulariser->describe() +
         "): its optimum steers each noise seed on its own and is NOT p* ∝ p_base exp(lambda r) "
         "(docs/ode_adjoint_matching.md)");
  }
  auto model = make_finetuned(base, mode, mlp.hidden, mlp.time_features, mix_seed(settings.seed, 1));
  std::unique_ptr<Loss> loss;
  if (is_am) {
    loss = std::make_unique<AdjointMatching>(model, reward, noise, am);
  } else if (method == "draft") {
    loss = std::make_unique<DraftK>(model, reward, baseline);
  } else if (method == "refl") {
    loss = std::make_unique<Refl>(model, reward, baseline);
  } else if (method == "ddpo") {
    loss = std::make_unique<Ddpo>(model, reward, pg);
  } else if (method == "grpo") {
    loss = std::make_unique<Grpo>(model, reward, pg);
  } else if (method == "ode_adjoint_matching") {
    loss = std::make_unique<OdeAdjointMatching>(model, reward, regulariser, ode_am);
  } else {
    loss = std::make_unique<DiscreteAdjoint>(model, reward, noise, baseline);
  }
  attach_to_run(topt, run, settings, args.quiet, "finetune", group);
  Trainer trainer(*loss, topt);
  resume_if_asked(trainer, topt, run, args.resume);
  double clipped = 0.0;
  int64_t counted = 0;
  try {
    trainer.run([&](const StepResult& r) {
      for (const auto& [key, value] : r.output.metrics) {
        if (key == "clipped_fraction" && counted < 20) clipped += value, ++counted;
      }
      if (counted == 20) {
        if (clipped / counted > 0.5) {
          warn("over half of the loss terms are clipped (clip_factor = " + std::to_string(am.clip_factor) +
               ", so LCT = clip_factor lambda^2 = " + std::to_string(am.clip_factor * lambda * lambda) +
               "); clipped terms give no gradient. Raise finetune.clip_factor or set it to 0");
        }
        ++counted;
      }
    });
  } catch (const Error&) {
    report_failure_context(run);
    throw;
  }
  // The schedule `tilt sample` uses by default: the one fine-tuned with, or the ODE for the
  // baselines that sample with it.
  const Json info_json = {{"trained_by", "tilt finetune"},
                          {"method", method},
                          {"noise", uses_noise ? noise_spec : std::string("ode")},
                          {"lambda", lambda},
                          {"reward", reward->kind()},
                          {"num_steps", am.num_steps},
                          {"iterations", trainer.iteration()}};
  if (!is_writer(group)) return 0;
  save_velocity(*model, run.path("model.pt"), info_json);
  plot_curves(topt.metrics_path, {"loss", method == "refl" ? "reward_prediction" : "reward"}, run.path("training.png"),
              method == "adjoint_matching" ? "adjoint matching" : method);
  info("wrote " + run.path("model.pt"));
  return 0;
}

}  // namespace tilt::cli
