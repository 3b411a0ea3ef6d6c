// tilt soc: train a control network on an SOC benchmark problem with one or several losses, and
// compare them on the control L2 error under the optimal path law (docs/equations.md, E33).
#include "commands.h"

#include "tilt/core/error.h"
#include "tilt/core/fs.h"
#include "tilt/io/builders.h"
#include "tilt/io/plot.h"
#include "tilt/soc/losses.h"
#include "tilt/soc/problems.h"
#include "tilt/train/distributed.h"
#include "tilt/train/trainer.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>  // at::NoGradGuard; not pulled in by ATen.h since LibTorch 2.0

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <sstream>

namespace tilt::cli {

namespace {

struct Evaluation {
  int64_t iteration = 0;
  double l2_error = NAN, objective = NAN, weight_std = NAN;
};

// The metrics on a fixed set of fresh paths of the current control (the same noise every time, so
// that the curves compare iterates rather than noise).
Evaluation evaluate(const soc::Problem& problem, const soc::ParametricControl& control, int64_t batch, int64_t steps,
                    uint64_t seed, int64_t iteration) {
  at::NoGradGuard no_grad;
  Generator gen = make_generator(seed);
  const soc::ControlledPaths paths = soc::simulate(problem, control.as_control(), batch, steps, gen);
  Evaluation e;
  e.iteration = iteration;
  e.objective = soc::control_objective(paths);
  e.weight_std = soc::normalised_weight_std(paths);
  if (problem.has_ground_truth()) e.l2_error = soc::control_l2_error(problem, paths);
  return e;
}

Json to_json(const Evaluation& e) {
  Json j{{"iteration", e.iteration}, {"control_objective", e.objective}, {"normalised_weight_std", e.weight_std}};
  if (std::isfinite(e.l2_error)) j["control_l2_error"] = e.l2_error;
  return j;
}

std::string fmt(double x, const char* spec = "%.4g") {
  if (!std::isfinite(x)) return "-";
  char buf[32];
  std::snprintf(buf, sizeof buf, spec, x);
  return buf;
}

// The name of a setting in messages: the flag, or the config key it came from.
std::string name_of(const SocArgs& args, const std::string& flag) {
  const auto it = args.from_config.find(flag);
  return it == args.from_config.end() ? flag : it->second;
}

void check_soc_args(const SocArgs& args) {
  auto n = [&](const std::string& flag) { return name_of(args, flag); };
  set_threads(args.threads);
  if (args.losses.empty()) throw Error("give at least one --loss (or [soc] losses in a config)");
  // Bounds of docs/config.md, Limits: --steps -3 silently meant the default, --lr 1e300 reached LibTorch.
  if (args.iterations < 1) throw Error(n("--iterations") + " must be >= 1");
  check_flag(n("--batch"), args.batch, 1, limits::kBatch);
  check_flag(n("--steps"), args.steps, 0, limits::kSteps);
  if (args.eval_every < 1) throw Error(n("--eval-every") + " must be >= 1");
  check_flag(n("--eval-batch"), args.eval_batch, 2, limits::kBatch);
  check_flag_number(n("--lr"), args.lr, limits::kLrMin, limits::kLrMax);
  if (args.hidden.empty()) throw Error(n("--hidden") + " must list at least one layer width");
  for (int64_t w : args.hidden) check_flag(n("--hidden") + " widths", w, 1, limits::kWidth);
  if (args.seed < 0) throw Error(n("--seed") + " must be >= 0");
  check_flag_number("--dist-timeout", args.dist_timeout, 1e-3, 86400);
  if (args.shards < 0) throw Error(n("--shards") + " must be >= 0 (0: one per process)");
}

// summary.json, curves.png and summary.md (a Markdown table, printed unless --json) of a finished run.
void write_summary(const SocArgs& args, const soc::Problem& problem_ref, const Json& summary,
                   const std::vector<plot::Series>& curves) {
  const soc::Problem* problem = &problem_ref;
  atomic_write(args.out + "/summary.json", summary.dump(2) + "\n");

  plot::LineOptions po;
  po.title = problem->name() + " (d = " + std::to_string(problem->dim()) + ")";
  po.x_label = "iteration";
  po.y_label = problem->has_ground_truth() ? "control L2 error" : "control objective";
  po.log_y = problem->has_ground_truth();
  plot::write_line_png(args.out + "/curves.png", curves, po);

  std::ostringstream md;
  md << "| loss | control L2 error: initial | final | reduction | control objective | weight std | ms / iteration |\n"
     << "|---|---|---|---|---|---|---|\n";
  for (const auto& name : args.losses) {
    const Json& r = summary["losses"][name];
    const double e0 = r["initial_control_l2_error"].is_number() ? r["initial_control_l2_error"].get<double>() : NAN;
    const double e1 = r.contains("control_l2_error") ? r["control_l2_error"].get<double>() : NAN;
    md << "| " << name << " | " << fmt(e0) << " | " << fmt(e1) << " | " << fmt(e0 / e1, "%.0fx") << " | "
       << fmt(r["control_objective"].get<double>()) << " | " << fmt(r["normalised_weight_std"].get<double>(), "%.3g")
       << " | " << fmt(r["ms_per_iteration"].get<double>(), "%.1f") << " |\n";
  }
  if (summary.contains("optimal_value")) {
    md << "\nOptimal control objective V(x0, 0) = " << fmt(summary["optimal_value"].get<double>()) << ".\n";
  } else {
    md << "\n" << problem->name() << " has no known optimal control: no control L2 error; compare the control "
       << "objectives (lower is better).\n";
  }
  atomic_write(args.out + "/summary.md", md.str());
  if (common_options().json) {
    report(summary);
  } else {
    std::printf("%s", md.str().c_str());
  }
}

}  // namespace

void read_soc_config(SocArgs& a, const std::function<bool(const std::string&)>& given) {
  Config config(a.config.config, a.config.set);
  ConfigSection root = config.root();
  ConfigSection s = root.section("soc", /*optional=*/true);
  auto take = [&](ConfigSection& t, const std::string& key, const std::string& flag, auto read) {
    if (given(flag) || !t.has(key)) return t.allow({key});
    read();
    a.from_config[flag] = "in " + t.origin() + ": '" + t.where(key) + "'";
  };
  take(root, "seed", "--seed", [&] { a.seed = root.integer("seed"); });
  take(root, "threads", "--threads", [&] {
    const int64_t threads = root.integer("threads");  // checked before the narrowing to int
    if (threads < 0 || threads > kMaxThreads) root.fail("threads", "must be in 0.." + std::to_string(kMaxThreads));
    a.threads = static_cast<int>(threads);
  });
  take(s, "problem", "--problem", [&] { a.problem = s.choice("problem", soc::problem_names()); });
  take(s, "losses", "--loss", [&] {
    const Json v = s.value("losses");
    if (!v.is_array() || v.empty() || !std::all_of(v.begin(), v.end(), [](const Json& e) { return e.is_string(); })) {
      s.fail("losses", "must be a non-empty array of loss names (" + joined(soc::soc_loss_names()) + ")");
    }
    a.losses = v.get<std::vector<std::string>>();
  });
  take(s, "iterations", "--iterations", [&] { a.iterations = s.integer("iterations"); });
  take(s, "batch", "--batch", [&] { a.batch = s.integer("batch"); });
  take(s, "steps", "--steps", [&] { a.steps = s.integer("steps"); });
  take(s, "lr", "--lr", [&] { a.lr = s.number("lr"); });
  take(s, "hidden", "--hidden", [&] { a.hidden = s.integers("hidden"); });
  take(s, "shards", "--shards", [&] { a.shards = s.integer("shards"); });
  take(s, "eval_every", "--eval-every", [&] { a.eval_every = s.integer("eval_every"); });
  take(s, "eval_batch", "--eval-batch", [&] { a.eval_batch = s.integer("eval_batch"); });
  s.finish();
  root.allow({"energy", "brownian", "adjoint_sampling", "evaluation", "mcmc", "soc"});
  finish_root(root);
}

int run_soc(const SocArgs& args) {
  check_soc_args(args);
  const soc::ProblemPtr problem = soc::make_problem(args.problem, static_cast<uint64_t>(args.seed));
  for (const auto& name : args.losses) {
    soc::check_soc_loss_name(name);
    // Fails here, before any file is written, where a loss cannot take the problem (a stopping time).
    soc::make_soc_loss(name, problem, std::make_shared<soc::ControlNetwork>(problem->dim(), problem->horizon(),
                                                                            std::vector<int64_t>{1}, 0),
                       soc::SocLossOptions{});
  }
  if (args.out.empty()) throw Error("--out is required: the directory for this run's files");
  // Several processes: rank 0 writes every file and prints the summary; all train together.
  const ProcessGroupPtr group = join_group(args.dist_timeout);
  const bool writer = is_writer(group);
  const int64_t shards = effective_shards(args.shards, group);
  const Json resolved{{"problem", args.problem}, {"losses", args.losses},    {"iterations", args.iterations},
                      {"batch", args.batch},     {"steps", args.steps},      {"lr", args.lr},
                      {"hidden", args.hidden},   {"seed", args.seed},        {"eval_every", args.eval_every},
                      {"eval_batch", args.eval_batch}, {"shards", shards}};
  if (group) group->check_same(resolved.dump(), "command line");
  std::unique_ptr<DirectoryLock> lock;  // rank 0 writes the directory; a second writer is refused
  run_on_rank0(group.get(), [&] {
    const auto check = [&] {
      if (file_exists(args.out + "/summary.json") || file_exists(args.out + "/soc.resolved.json")) {
        throw Error("'" + args.out + "' already holds an SOC run; choose another --out");
      }
      if (file_exists(args.out + "/config.resolved.json") || file_exists(args.out + "/checkpoint.pt") ||
          file_exists(args.out + "/model.pt")) {
        throw Error("'" + args.out + "' holds a training run; choose another --out");
      }
    };
    check();
    lock = std::make_unique<DirectoryLock>(args.out);
    check();
    remove_stale_temporaries_in(args.out);
    atomic_write(args.out + "/soc.resolved.json", resolved.dump(2) + "\n");
  });
  const int64_t steps = args.steps > 0 ? args.steps : problem->default_steps();
  const uint64_t eval_seed = mix_seed(static_cast<uint64_t>(args.seed), 3);

  Json summary{{"problem", problem->name()}, {"dim", problem->dim()}, {"iterations", args.iterations}, {"losses", Json::object()}};
  if (problem->has_ground_truth()) {
    Generator gen = make_generator(0);
    summary["optimal_value"] = problem->value(problem->initial_state(1, gen), 0.0).item<double>();
  }
  std::vector<plot::Series> curves;
  for (const auto& name : args.losses) {
    // Every loss starts from the same network.
    auto control = std::make_shared<soc::ControlNetwork>(problem->dim(), problem->horizon(), args.hidden,
                                                         mix_seed(static_cast<uint64_t>(args.seed), 1));
    soc::SocLossOptions so;
    so.batch_size = args.batch;
    so.num_steps = steps;
    so.seed = mix_seed(static_cast<uint64_t>(args.seed), 4);  // SOCM's M network
    auto loss = soc::make_soc_loss(name, problem, control, so);
    TrainerOptions topt;
    topt.iterations = args.iterations;
    topt.adam = {args.lr, 0.9, 0.999, 1e-8, 0.0};
    topt.grad_clip = 0;
    topt.seed = mix_seed(static_cast<uint64_t>(args.seed), 2);
    topt.metrics_path = args.out + "/" + name + ".jsonl";
    topt.progress = !args.quiet;
    topt.label = name;
    topt.shards = shards;
    topt.group = group;
    Trainer trainer(*loss, topt);
    // Rank 0 evaluates (every rank holds the same control); the others go on to the next step's all-reduce.
    std::vector<Evaluation> evals;
    if (writer) evals.push_back(evaluate(*problem, *control, args.eval_batch, steps, eval_seed, 0));
    double train_seconds = 0;
    trainer.run([&](const StepResult& r) {
      train_seconds += r.seconds;
      if (writer && (r.iteration % args.eval_every == 0 || r.iteration == args.iterations)) {
        evals.push_back(evaluate(*problem, *control, args.eval_batch, steps, eval_seed, r.iteration));
      }
    });
    if (!writer) continue;
    std::ostringstream lines;
    plot::Series curve{name, {}, {}};
    for (const auto& e : evals) {
      lines << to_json(e).dump() << '\n';
      curve.x.push_back(static_cast<double>(e.iteration));
      curve.y.push_back(problem->has_ground_truth() ? e.l2_error : e.objective);
    }
    atomic_write(args.out + "/" + name + ".eval.jsonl", lines.str());
    curves.push_back(curve);
    const Evaluation& first = evals.front();
    const Evaluation& last = evals.back();
    Json row = to_json(last);
    row.erase("iteration");
    row["initial_control_l2_error"] = std::isfinite(first.l2_error) ? Json(first.l2_error) : Json();
    row["ms_per_iteration"] = 1e3 * train_seconds / static_cast<double>(args.iterations);
    summary["losses"][name] = row;
  }
  if (!writer) return 0;
  write_summary(args, *problem, summary, curves);
  info("wrote " + args.out + "/{summary.md, summary.json, curves.png, <loss>.jsonl, <loss>.eval.jsonl}");
  return 0;
}

namespace {
const bool registered = add_command(
    {"soc", "Solve an SOC benchmark problem with one or several losses and compare them", 100, [](CLI::App& app) {
       auto args = std::make_shared<SocArgs>();
       add_config(app, args->config, false);
       app.add_option("-p,--problem", args->problem, joined(soc::problem_names()))->capture_default_str();
       app.add_option("-l,--loss", args->losses, "Loss (repeatable): " + joined(soc::soc_loss_names()));
       app.add_option("--iterations", args->iterations, "Training iterations per loss")->capture_default_str();
       app.add_option("--batch", args->batch, "Paths per iteration")->capture_default_str();
       app.add_option("--steps", args->steps, "Euler-Maruyama steps (0: the problem's default)")->capture_default_str();
       app.add_option("--lr", args->lr, "Adam learning rate (constant)")->capture_default_str();
       app.add_option("--hidden", args->hidden, "Hidden widths of the control network")->delimiter(',')->capture_default_str();
       app.add_option("--seed", args->seed, "Random seed (also draws the problem's x0 / matrices)")->capture_default_str();
       app.add_option("--threads", args->threads, "Threads (0: all cores; at most 1024)")->capture_default_str();
       app.add_option("--shards", args->shards,
                      "Draw each batch in this many shards, each with its own seed (0: one per process); the result "
                      "depends on the seed and the shards, not on the number of processes")->capture_default_str();
       app.add_option("--dist-timeout", args->dist_timeout,
                      "Several processes (WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT set, as by torchrun): the longest "
                      "wait for the others, in seconds, before a clear error")->capture_default_str();
       app.add_option("--eval-every", args->eval_every, "Evaluate the control every this many iterations")->capture_default_str();
       app.add_option("--eval-batch", args->eval_batch, "Paths per evaluation")->capture_default_str();
       app.add_option("-o,--out", args->out, "Directory: the curves, metrics and summary")->required();
       app.add_flag("-q,--quiet", args->quiet, "No progress bar");
       return [args, &app] {
         // A config's top-level seed and threads and its [soc] table; the flags given win.
         if (!args->config.config.empty() || !args->config.set.empty()) {
           read_soc_config(*args, [&app](const std::string& flag) { return app.get_option(flag)->count() > 0; });
         }
         return run_soc(*args);
       };
     }});
}  // namespace

}  // namespace tilt::cli
