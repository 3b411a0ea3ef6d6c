#include "tilt/io/soc_benchmark.h"

#include "tilt/core/check.h"
#include "tilt/core/error.h"
#include "tilt/core/fs.h"
#include "tilt/core/log.h"
#include "tilt/io/builders.h"
#include "tilt/io/plot.h"
#include "tilt/io/run.h"
#include "tilt/soc/losses.h"
#include "tilt/soc/problems.h"
#include "tilt/soc/separable_control.h"
#include "tilt/train/distributed.h"
#include "tilt/train/trainer.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>  // at::NoGradGuard; not pulled in by ATen.h since LibTorch 2.0

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <sstream>

namespace tilt {
namespace {

struct Evaluation {
  int64_t iteration = 0;
  double l2_error = NAN, objective = NAN, weight_std = NAN;
};

// Which control L2 error a run reports: tilt's (self-normalised, K times), or SOC-matching's with
// the log normaliser estimated once per run (docs/soc.md, "Metrics").
struct L2Metric {
  bool socm = false;
  double log_normaliser = 0;
};

// The paths of u* that estimate SOC-matching's normaliser E[w]. Under u* the weights' std / mean is small
// (0.09 on quadratic OU easy), so 16 384 paths give E[w] to ~0.1%; SOC-matching's initial estimate takes
// 65 536 paths of the initial control, whose weights vary far more.
constexpr int64_t kNormaliserPaths = 16384;

// The seed of every evaluation's paths (the same noise for every loss and iteration).
uint64_t soc_eval_seed(const SocBenchmarkOptions& o) { return mix_seed(static_cast<uint64_t>(o.seed), 3); }

// The metrics on a fixed set of fresh paths of the current control (the same noise every time, so
// that the curves compare iterates rather than noise).
Evaluation evaluate(const soc::Problem& problem, const soc::ParametricControl& control, int64_t batch, int64_t steps,
                    uint64_t seed, int64_t iteration, const L2Metric& metric) {
  at::NoGradGuard no_grad;
  Generator gen = make_generator(seed);
  const soc::Control u = control.as_control();
  const soc::ControlledPaths paths = soc::simulate(problem, u, batch, steps, gen);
  Evaluation e;
  e.iteration = iteration;
  e.objective = soc::control_objective(paths);
  e.weight_std = soc::normalised_weight_std(paths);
  if (problem.has_ground_truth()) {
    e.l2_error = metric.socm ? soc::socm_control_l2_error(problem, paths, u, metric.log_normaliser)
                             : soc::control_l2_error(problem, paths);
  }
  return e;
}

Json to_json(const Evaluation& e) {
  Json j{{"iteration", e.iteration}, {"control_objective", e.objective}, {"normalised_weight_std", e.weight_std}};
  if (std::isfinite(e.l2_error)) j["control_l2_error"] = e.l2_error;
  return j;
}

// The name of a setting in messages: the flag, or the config key it came from.
std::string name_of(const SocBenchmarkOptions& o, const std::string& flag) {
  const auto it = o.names.find(flag);
  return it == o.names.end() ? flag : it->second;
}

Json params_json(const std::map<std::string, soc::ProblemParam>& params) {
  Json j = Json::object();
  for (const auto& [key, p] : params) j[key] = Json{{"data", p.data}, {"shape", p.shape}};
  return j;
}

// summary.md: one row per loss, and the optimal value when the problem knows it.
std::string markdown_of(const SocBenchmarkOptions& o, const soc::Problem& problem, const Json& summary) {
  std::ostringstream md;
  md << "| loss | control L2 error: initial | final | reduction | control objective | weight std | ms / iteration |\n"
     << "|---|---|---|---|---|---|---|\n";
  for (const auto& name : o.losses) {
    const Json& r = summary["losses"][name];
    const double e0 = r["initial_control_l2_error"].is_number() ? r["initial_control_l2_error"].get<double>() : NAN;
    const double e1 = r.contains("control_l2_error") ? r["control_l2_error"].get<double>() : NAN;
    const auto cell = [&](const char* key, const char* spec) { return format_number(r[key].get<double>(), spec); };
    md << "| " << name << " | " << format_number(e0) << " | " << format_number(e1) << " | "
       << format_number(e0 / e1, "%.0fx") << " | " << cell("control_objective", "%.4g") << " | "
       << cell("normalised_weight_std", "%.3g") << " | " << cell("ms_per_iteration", "%.1f") << " |\n";
  }
  if (summary.contains("optimal_value")) {
    md << "\nOptimal control objective V(x0, 0) = " << format_number(summary["optimal_value"].get<double>());
    if (summary.contains("optimal_objective_on_grid")) {
      md << "; the optimal control's own objective on the evaluation's paths and steps (the column's Euler estimate) = "
         << format_number(summary["optimal_objective_on_grid"].get<double>(), "%.4g");
    }
    md << ".\n";
    if (o.l2_error == "socm") md << "Control L2 error: SOC-matching's definition (docs/soc.md, Metrics).\n";
  } else {
    md << "\n" << problem.name() << " has no known optimal control: no control L2 error; compare the control "
       << "objectives (lower is better).\n";
  }
  return md.str();
}

// The settings a resumed run may change: how long it trains and how often it saves and evaluates.
constexpr const char* kResumeMutable[] = {"iterations", "checkpoint_every", "eval_every"};

// A resumed run must be the run it continues: the same soc.resolved.json but for kResumeMutable. Returns
// what changed of those ("iterations 1000 -> 2000"), for a note once the resume is known to go ahead.
std::string check_same_run(const std::string& config_path, const Json& resolved) {
  Json before = Json::parse(read_file(config_path, "resolved SOC settings"), nullptr, false);
  if (before.is_discarded() || !before.is_object()) throw Error("--resume: '" + config_path + "' is corrupt");
  Json now = resolved;
  std::string changed;
  for (const char* key : kResumeMutable) {
    if (before.contains(key) && now.contains(key) && before[key] != now[key]) {
      changed += (changed.empty() ? "" : ", ") + std::string(key) + " " + before[key].dump() + " -> " + now[key].dump();
    }
    before.erase(key);
    now.erase(key);
  }
  if (before != now) {
    std::string keys;
    for (const std::string& key : differing_keys(before, now)) keys += (keys.empty() ? "'" : ", '") + key + "'";
    throw Error("--resume: the settings differ from those '" + config_path + "' was started with (in: " + keys +
                "); only iterations, checkpoint_every and eval_every may change");
  }
  return changed;
}

// <loss>.eval.jsonl of a resumed run: its evaluations up to `iteration` (the checkpoint's; later ones are
// made again, identically). A missing file is no evaluation; a corrupt line is an error naming the file.
std::vector<Evaluation> read_evaluations(const std::string& path, int64_t iteration) {
  std::vector<Evaluation> evals;
  if (!file_exists(path)) return evals;
  std::istringstream lines(read_file(path, "evaluations"));
  std::string line;
  for (int64_t n = 1; std::getline(lines, line); ++n) {
    const Json j = Json::parse(line, nullptr, false);
    const auto number = [&](const char* key) {
      if (!j.contains(key)) return std::nan("");
      if (!j[key].is_number()) throw Error("--resume: '" + path + "' line " + std::to_string(n) + ": '" + key + "' is not a number");
      return j[key].get<double>();
    };
    if (j.is_discarded() || !j.is_object() || !j.contains("iteration") || !j["iteration"].is_number_integer()) {
      throw Error("--resume: '" + path + "' line " + std::to_string(n) + " is not an evaluation");
    }
    Evaluation e;
    e.iteration = j["iteration"].get<int64_t>();
    e.objective = number("control_objective");
    e.weight_std = number("normalised_weight_std");
    e.l2_error = number("control_l2_error");
    if (e.iteration <= iteration) evals.push_back(e);
  }
  return evals;
}

// Rank 0 opens the directory: a new run refuses one that holds a run, a resumed one needs the run it
// continues (check_same_run). Locks it and writes soc.resolved.json.
std::unique_ptr<DirectoryLock> open_directory(const std::string& out, const Json& resolved, bool resume) {
  const std::string config_path = out + "/soc.resolved.json";
  const auto check = [&] {
    if (file_exists(out + "/config.resolved.json") || file_exists(out + "/checkpoint.pt") ||
        file_exists(out + "/model.pt")) {
      throw Error("'" + out + "' holds a training run; choose another --out");
    }
    if (resume && !file_exists(config_path)) {
      throw Error("--resume: '" + out + "' holds no SOC run to resume (no soc.resolved.json)");
    }
    if (!resume && (file_exists(out + "/summary.json") || file_exists(config_path))) {
      throw Error("'" + out + "' already holds an SOC run; use --resume to continue it, or choose another --out");
    }
  };
  check();
  auto lock = std::make_unique<DirectoryLock>(out);
  check();  // again under the lock, so that two processes cannot both pass
  remove_stale_temporaries_in(out);
  if (resume) {
    const std::string changed = check_same_run(config_path, resolved);
    // A loss that has trained past --iterations cannot be resumed to them, and damaged files cannot be read:
    // refused before anything is written.
    const int64_t iterations = resolved["iterations"].get<int64_t>();
    for (const auto& name : resolved["losses"].get<std::vector<std::string>>()) {
      const std::string checkpoint = out + "/" + name + ".checkpoint.pt";
      read_evaluations(out + "/" + name + ".eval.jsonl", 0);  // a damaged one fails here, not after training
      const int64_t at = file_exists(checkpoint) ? checkpoint_iteration(checkpoint) : 0;
      if (at > iterations) {
        throw Error("--resume: " + name + "'s checkpoint is at iteration " + std::to_string(at) +
                    ", past --iterations " + std::to_string(iterations) + " (a resumed run may train longer, not shorter)");
      }
    }
    if (!changed.empty()) note("resuming with changed settings: " + changed);
  }
  atomic_write(config_path, resolved.dump(2) + "\n");
  return lock;
}

void write_evaluations(const std::string& path, const std::vector<Evaluation>& evals) {
  std::ostringstream lines;
  for (const auto& e : evals) lines << to_json(e).dump() << '\n';
  atomic_write(path, lines.str());
}

const std::vector<std::string>& time_weight_names() {
  static const std::vector<std::string> names{"uniform", "damped"};
  return names;
}

const std::vector<std::string>& control_names() {
  static const std::vector<std::string> names{"mlp", "separable"};
  return names;
}

// The control network of --control, u = 0 at the start.
soc::ParametricControlPtr make_control(const SocBenchmarkOptions& o, const soc::Problem& problem, uint64_t seed) {
  if (o.control == "separable") {
    return std::make_shared<soc::SeparableControl>(problem.dim(), problem.horizon(), o.hidden, seed);
  }
  return std::make_shared<soc::ControlNetwork>(problem.dim(), problem.horizon(), o.hidden, seed);
}

struct Context {
  const SocBenchmarkOptions& o;
  soc::ProblemPtr problem;
  ProcessGroupPtr group;
  bool writer = true;
  int64_t shards = 1, steps = 0;
  L2Metric metric;
};

// One loss of the run, made as it trains: its control, the curriculum's problem (null without one), the loss and
// the trainer's options (file paths only when `with_files`).
struct LossSetup {
  soc::ParametricControlPtr control;
  std::shared_ptr<soc::DriftScaledProblem> scaled;
  std::unique_ptr<Loss> loss;
  TrainerOptions topt;
};

LossSetup make_loss_setup(const Context& c, const std::string& name, bool with_files) {
  const SocBenchmarkOptions& o = c.o;
  const auto seed = static_cast<uint64_t>(o.seed);
  LossSetup l;
  l.control = make_control(o, *c.problem, mix_seed(seed, 1));
  soc::SocLossOptions so;
  so.batch_size = o.batch;
  so.num_steps = c.steps;
  so.seed = mix_seed(seed, 4);  // SOCM's M network
  so.damp_noisy_times = o.time_weights == "damped";
  // The curriculum trains on the drift scaled by c (E120); the evaluations use the problem itself.
  if (o.curriculum_start < 1.0) {
    l.scaled = std::make_shared<soc::DriftScaledProblem>(
        c.problem, soc::curriculum_scale(o.curriculum_start, o.curriculum_fraction, 1, o.iterations));
  }
  l.loss = soc::make_soc_loss(name, l.scaled ? soc::ProblemPtr(l.scaled) : c.problem, l.control, so);
  TrainerOptions& topt = l.topt;
  topt.iterations = o.iterations;
  topt.adam = {o.lr, 0.9, 0.999, 1e-8, 0.0};
  topt.lr_schedule = parse_lr_schedule(o.lr_schedule);
  topt.lr_final_factor = 0.01;
  topt.grad_clip = 0;
  topt.seed = mix_seed(seed, 2);
  if (with_files) {
    topt.metrics_path = o.out + "/" + name + ".jsonl";
    topt.checkpoint_path = o.out + "/" + name + ".checkpoint.pt";
  }
  topt.checkpoint_every = o.checkpoint_every;
  topt.progress = !o.quiet;
  topt.label = name;
  topt.shards = c.shards;
  topt.group = c.group;
  return l;
}

// Trains one loss from the common initial network; on the writer, its evaluations go to
// <loss>.eval.jsonl and its curve and summary row are returned.
Json train_loss(const Context& c, const std::string& name, std::vector<plot::Series>& curves) {
  const SocBenchmarkOptions& o = c.o;
  LossSetup setup = make_loss_setup(c, name, true);
  const soc::ParametricControlPtr& control = setup.control;
  const std::shared_ptr<soc::DriftScaledProblem>& scaled = setup.scaled;
  const TrainerOptions& topt = setup.topt;
  const auto scale_at = [&](int64_t iteration) {
    return soc::curriculum_scale(o.curriculum_start, o.curriculum_fraction, iteration, o.iterations);
  };
  Trainer trainer(*setup.loss, topt);
  if (o.resume && trainer.resume(topt.checkpoint_path) && c.writer) {
    note("resumed " + name + " at iteration " + std::to_string(trainer.iteration()));
  }
  if (scaled) scaled->set_scale(scale_at(trainer.iteration() + 1));
  // Rank 0 evaluates (every rank holds the same control); the others go on to the next step's all-reduce.
  // Each evaluation is written at once, before the checkpoint of its iteration: a resumed run finds those
  // up to its checkpoint.
  const uint64_t eval_seed = soc_eval_seed(o);
  const std::string eval_path = o.out + "/" + name + ".eval.jsonl";
  const auto due = [&](int64_t i) { return i % o.eval_every == 0 || i == o.iterations; };
  std::vector<Evaluation> evals;
  if (c.writer) {
    const int64_t at = trainer.iteration();
    if (o.resume) evals = read_evaluations(eval_path, at);
    if (evals.empty() || (evals.back().iteration < at && due(at))) {
      evals.push_back(evaluate(*c.problem, *control, o.eval_batch, c.steps, eval_seed, at, c.metric));
    }
    write_evaluations(eval_path, evals);
  }
  trainer.run([&](const StepResult& r) {
    if (scaled) scaled->set_scale(scale_at(r.iteration + 1));
    if (c.writer && due(r.iteration)) {
      evals.push_back(evaluate(*c.problem, *control, o.eval_batch, c.steps, eval_seed, r.iteration, c.metric));
      write_evaluations(eval_path, evals);
    }
  });
  if (!c.writer) return Json();
  plot::Series curve{name, {}, {}};
  for (const auto& e : evals) {
    curve.x.push_back(static_cast<double>(e.iteration));
    curve.y.push_back(c.problem->has_ground_truth() ? e.l2_error : e.objective);
  }
  curves.push_back(curve);
  Json row = to_json(evals.back());
  row.erase("iteration");
  row["initial_control_l2_error"] = std::isfinite(evals.front().l2_error) ? Json(evals.front().l2_error) : Json();
  row["ms_per_iteration"] = ms_per_iteration(topt.metrics_path);
  return row;
}

void write_curves(const SocBenchmarkOptions& o, const soc::Problem& problem, const std::vector<plot::Series>& curves) {
  plot::LineOptions po;
  po.width = 900, po.height = 460;  // room for the legend of ten losses beside the plot
  po.title = problem.name() + " (d = " + std::to_string(problem.dim()) + ")";
  po.x_label = "iteration";
  po.y_label = problem.has_ground_truth() ? "control L2 error" : "control objective";
  po.log_y = problem.has_ground_truth();
  plot::write_line_png(o.out + "/curves.png", curves, po);
}

const std::vector<std::string>& l2_error_names() {
  static const std::vector<std::string> names{"tilt", "socm"};
  return names;
}

// A parameter's value: a number, an array of numbers or an array of equally long rows of numbers.
soc::ProblemParam param_of(ConfigSection& t, const std::string& key) {
  const Json v = t.value(key);
  const auto numbers = [](const Json& a) {
    return a.is_array() && std::all_of(a.begin(), a.end(), [](const Json& e) { return e.is_number(); });
  };
  soc::ProblemParam p;
  if (v.is_number()) {
    p.data = {v.get<double>()};
  } else if (numbers(v) && !v.empty()) {
    p.data = v.get<std::vector<double>>();
    p.shape = {static_cast<int64_t>(v.size())};
  } else if (v.is_array() && !v.empty() && std::all_of(v.begin(), v.end(), [&](const Json& r) {
               return numbers(r) && r.size() == v[0].size() && !r.empty();
             })) {
    for (const auto& row : v) {
      for (const auto& e : row) p.data.push_back(e.get<double>());
    }
    p.shape = {static_cast<int64_t>(v.size()), static_cast<int64_t>(v[0].size())};
  } else {
    t.fail(key, "must be a number, an array of numbers or an array of equally long rows of numbers");
  }
  return p;
}

// The sub-table [soc.<problem>]: the problem's parameters by name. A sub-table of another problem is an error.
void read_problem_params(ConfigSection& s, SocBenchmarkOptions& a) {
  for (const auto& name : soc::problem_names()) {
    if (name != a.problem && s.has(name)) {
      s.fail(name, "sets the parameters of " + name + ", but the problem is " + a.problem);
    }
  }
  if (!s.has(a.problem)) return;
  ConfigSection t = s.section(a.problem);
  for (const auto& key : soc::problem_param_names(a.problem)) {
    if (t.has(key)) a.problem_params[key] = param_of(t, key);
  }
  t.allow(soc::problem_param_names(a.problem));  // an unknown key's message lists them all
  t.finish();
  a.names["problem parameters"] = "in " + t.origin() + ": '" + s.where(a.problem) + "'";
}

}  // namespace

// The median training time per iteration from <loss>.jsonl (its "seconds", without the evaluations), which
// holds every iteration of the run, those before a resume included. The median, not the mean: a run stopped
// meanwhile (SIGSTOP, a suspended machine) or sharing its cores for a while has a few very long iterations,
// which the mean would count as the method's cost.
double ms_per_iteration(const std::string& metrics_path) {
  std::istringstream lines(read_file(metrics_path, "metrics"));
  std::string line;
  std::vector<double> seconds;
  while (std::getline(lines, line)) {
    const Json j = Json::parse(line, nullptr, false);
    if (j.is_object() && j.contains("seconds") && j["seconds"].is_number()) seconds.push_back(j["seconds"].get<double>());
  }
  if (seconds.empty()) return NAN;
  const size_t half = seconds.size() / 2;
  std::nth_element(seconds.begin(), seconds.begin() + half, seconds.end());
  double median = seconds[half];
  if (seconds.size() % 2 == 0) median = 0.5 * (median + *std::max_element(seconds.begin(), seconds.begin() + half));
  return 1e3 * median;
}

soc::ProblemPtr make_soc_benchmark_problem(const SocBenchmarkOptions& o) {
  soc::ProblemSpec spec;
  spec.name = o.problem;
  spec.instance = o.instance;
  spec.seed = static_cast<uint64_t>(o.seed);
  spec.params = o.problem_params;
  try {
    return soc::make_problem(spec);
  } catch (const Error& e) {
    const auto it = o.names.find("problem parameters");
    if (it == o.names.end() || o.problem_params.empty()) throw;
    throw Error(it->second + ": " + e.what());
  }
}

void read_soc_benchmark(ConfigSection& root, SocBenchmarkOptions& a,
                        const std::function<bool(const std::string&)>& given) {
  ConfigSection s = root.section("soc", /*optional=*/true);
  auto take = [&](ConfigSection& t, const std::string& key, const std::string& flag, auto read) {
    if (given(flag) || !t.has(key)) return t.allow({key});
    read();
    a.names[flag] = "in " + t.origin() + ": '" + t.where(key) + "'";
  };
  take(root, "seed", "--seed", [&] { a.seed = root.integer("seed"); });
  take(root, "threads", "--threads", [&] {
    const int64_t threads = root.integer("threads");  // checked before the narrowing to int
    if (threads < 0 || threads > kMaxThreads) root.fail("threads", "must be in 0.." + std::to_string(kMaxThreads));
    a.threads = static_cast<int>(threads);
  });
  take(s, "problem", "--problem", [&] { a.problem = s.choice("problem", soc::problem_names()); });
  take(s, "instance", "--instance", [&] { a.instance = s.choice("instance", soc::instance_names()); });
  take(s, "l2_error", "--l2-error", [&] { a.l2_error = s.choice("l2_error", l2_error_names()); });
  read_problem_params(s, a);
  take(s, "losses", "--loss", [&] {
    const Json v = s.value("losses");
    if (!v.is_array() || v.empty() || !std::all_of(v.begin(), v.end(), [](const Json& e) { return e.is_string(); })) {
      std::string names;
      for (const auto& n : soc::soc_loss_names()) names += (names.empty() ? "" : ", ") + n;
      s.fail("losses", "must be a non-empty array of loss names (" + names + ")");
    }
    a.losses = v.get<std::vector<std::string>>();
  });
  take(s, "iterations", "--iterations", [&] { a.iterations = s.integer("iterations"); });
  take(s, "batch", "--batch", [&] { a.batch = s.integer("batch"); });
  take(s, "steps", "--steps", [&] { a.steps = s.integer("steps"); });
  take(s, "lr", "--lr", [&] { a.lr = s.number("lr"); });
  take(s, "hidden", "--hidden", [&] { a.hidden = s.integers("hidden"); });
  take(s, "control", "--control", [&] { a.control = s.choice("control", control_names()); });
  take(s, "lr_schedule", "--lr-schedule", [&] { a.lr_schedule = s.choice("lr_schedule", {"constant", "cosine"}); });
  take(s, "time_weights", "--time-weights", [&] { a.time_weights = s.choice("time_weights", time_weight_names()); });
  take(s, "curriculum_start", "--curriculum-start", [&] { a.curriculum_start = s.number("curriculum_start"); });
  take(s, "curriculum_fraction", "--curriculum-fraction",
       [&] { a.curriculum_fraction = s.number("curriculum_fraction"); });
  take(s, "shards", "--shards", [&] { a.shards = s.integer("shards"); });
  take(s, "eval_every", "--eval-every", [&] { a.eval_every = s.integer("eval_every"); });
  take(s, "eval_batch", "--eval-batch", [&] { a.eval_batch = s.integer("eval_batch"); });
  take(s, "checkpoint_every", "--checkpoint-every", [&] { a.checkpoint_every = s.integer("checkpoint_every"); });
  s.finish();
  root.allow({"energy", "brownian", "adjoint_sampling", "evaluation", "mcmc", "soc"});
  finish_config_root(root);
}

void check_soc_benchmark(const SocBenchmarkOptions& o) {
  auto n = [&](const std::string& flag) { return name_of(o, flag); };
  set_threads(o.threads);
  soc::problem_param_names(o.problem);  // throws for an unknown problem: named before a missing --loss
  if (o.losses.empty()) throw Error("give at least one --loss (or [soc] losses in a config)");
  // Bounds of docs/config.md, Limits: --steps -3 silently meant the default, --lr 1e300 reached LibTorch.
  if (o.iterations < 1) throw Error(n("--iterations") + " must be >= 1");
  check_in_range(n("--batch"), o.batch, 1, limits::kBatch);
  check_in_range(n("--steps"), o.steps, 0, limits::kSteps);
  if (o.eval_every < 1) throw Error(n("--eval-every") + " must be >= 1");
  if (o.checkpoint_every < 0) throw Error(n("--checkpoint-every") + " must be >= 0 (0: only at the end of each loss)");
  check_in_range(n("--eval-batch"), o.eval_batch, 2, limits::kBatch);
  check_number_in_range(n("--lr"), o.lr, limits::kLrMin, limits::kLrMax);
  if (o.hidden.empty()) throw Error(n("--hidden") + " must list at least one layer width");
  for (int64_t w : o.hidden) check_in_range(n("--hidden") + " widths", w, 1, limits::kWidth);
  if (o.seed < 0) throw Error(n("--seed") + " must be >= 0");
  check_number_in_range("--dist-timeout", o.dist_timeout, 1e-3, 86400);
  if (o.shards < 0) throw Error(n("--shards") + " must be >= 0 (0: one per process)");
  const auto one_of = [&](const std::string& flag, const std::string& v, const std::vector<std::string>& names) {
    if (std::find(names.begin(), names.end(), v) == names.end()) {
      std::string valid;
      for (const auto& x : names) valid += (valid.empty() ? "" : ", ") + x;
      throw Error(n(flag) + " must be one of " + valid + ", got '" + v + "'");
    }
  };
  one_of("--instance", o.instance, soc::instance_names());
  one_of("--l2-error", o.l2_error, l2_error_names());
  one_of("--control", o.control, control_names());
  one_of("--time-weights", o.time_weights, time_weight_names());
  one_of("--lr-schedule", o.lr_schedule, {"constant", "cosine"});
  if (!(o.curriculum_start > 0 && o.curriculum_start <= 1)) {
    throw Error(n("--curriculum-start") + " must be in (0, 1] (1: no curriculum), got " + number_string(o.curriculum_start));
  }
  if (!(o.curriculum_fraction > 0 && o.curriculum_fraction <= 1)) {
    throw Error(n("--curriculum-fraction") + " must be in (0, 1], got " + number_string(o.curriculum_fraction));
  }
}

SocBenchmarkResult run_soc_benchmark(const SocBenchmarkOptions& o) {
  check_soc_benchmark(o);
  Context c{o, make_soc_benchmark_problem(o), nullptr, true, 1, 0, {}};
  for (size_t i = 0; i < o.losses.size(); ++i) {
    try {
      soc::check_soc_loss_name(o.losses[i]);
    } catch (const Error& e) {
      throw Error(name_of(o, "--loss") + ": " + e.what());  // the flag, or the config's key and file
    }
    if (std::find(o.losses.begin(), o.losses.begin() + static_cast<std::ptrdiff_t>(i), o.losses[i]) !=
        o.losses.begin() + static_cast<std::ptrdiff_t>(i)) {
      throw Error(name_of(o, "--loss") + " names " + o.losses[i] + " twice: each loss trains once, into its own files");
    }
  }
  if (o.out.empty()) throw Error("--out is required: the directory for this run's files");
  // Several processes: rank 0 writes every file; all train together.
  c.group = join_group(o.dist_timeout);
  c.writer = is_writer(c.group);
  c.shards = effective_shards(o.shards, c.group);
  c.steps = o.steps > 0 ? o.steps : c.problem->default_steps();
  // Each loss and its trainer made once before any file is written: a loss that cannot take the problem (a
  // stopping time), a batch too small for a variance or for the shards fails here, for every loss.
  for (const auto& name : o.losses) {
    LossSetup setup = make_loss_setup(c, name, false);
    Trainer check(*setup.loss, setup.topt);
  }
  const Json resolved{{"problem", o.problem}, {"losses", o.losses},    {"iterations", o.iterations},
                      {"batch", o.batch},     {"steps", o.steps},      {"lr", o.lr},
                      {"hidden", o.hidden},   {"seed", o.seed},        {"eval_every", o.eval_every},
                      {"eval_batch", o.eval_batch}, {"shards", c.shards}, {"instance", o.instance},
                      {"l2_error", o.l2_error}, {"problem_params", params_json(o.problem_params)},
                      {"control", o.control}, {"curriculum_start", o.curriculum_start},
                      {"curriculum_fraction", o.curriculum_fraction}, {"time_weights", o.time_weights},
                      {"lr_schedule", o.lr_schedule}, {"checkpoint_every", o.checkpoint_every}};
  if (c.group) c.group->check_same(resolved.dump(), "command line");
  std::unique_ptr<DirectoryLock> lock;  // rank 0 writes the directory; a second writer is refused
  run_on_rank0(c.group.get(), [&] { lock = open_directory(o.out, resolved, o.resume); });

  SocBenchmarkResult result;
  result.writer = c.writer;
  Json& summary = result.summary;
  summary = Json{{"problem", c.problem->name()}, {"dim", c.problem->dim()}, {"iterations", o.iterations}, {"losses", Json::object()}};
  if (c.problem->has_ground_truth()) {
    Generator gen = make_generator(0);
    summary["optimal_value"] = c.problem->value(c.problem->initial_state(1, gen), 0.0).item<double>();
    // V is the continuous problem's; the losses' objectives are Euler estimates on the evaluation's grid and paths,
    // which for u* itself exceed V by the discretisation error (3.835 against V = 3.749 on a 3-D quadratic OU at
    // 50 steps): this is the number a control's objective is to be compared with.
    if (c.writer) {
      Generator egen = make_generator(soc_eval_seed(o));
      summary["optimal_objective_on_grid"] = soc::control_objective(
          soc::simulate(*c.problem, soc::optimal_control_of(c.problem), o.eval_batch, c.steps, egen));
    }
    summary["l2_error"] = o.l2_error;
    if (o.l2_error == "socm" && c.writer) {
      Generator ngen = make_generator(mix_seed(static_cast<uint64_t>(o.seed), 5));
      c.metric = {true, soc::socm_log_normaliser(*c.problem, kNormaliserPaths, c.steps, ngen)};
      summary["log_weight_normaliser"] = c.metric.log_normaliser;
    }
  }
  std::vector<plot::Series> curves;
  for (const auto& name : o.losses) {
    Json row = train_loss(c, name, curves);
    if (c.writer) summary["losses"][name] = row;
  }
  if (!c.writer) return result;
  atomic_write(o.out + "/summary.json", summary.dump(2) + "\n");
  write_curves(o, *c.problem, curves);
  result.markdown = markdown_of(o, *c.problem, summary);
  atomic_write(o.out + "/summary.md", result.markdown);
  return result;
}

}  // namespace tilt
