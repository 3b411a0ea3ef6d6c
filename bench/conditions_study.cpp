// Generalisation to conditions never trained on, against exact ground truth (docs/conditions.md;
// scripts/conditions_study.sh). For each random conditional problem (random_conditional_problem: a
// mixture whose means move with c and a quadratic reward whose centre moves with c, so that p*(x | c)
// is closed form for every c), Adjoint Matching fine-tunes a residual model over the training
// conditions, each trajectory drawing its own c. Then the energy distance to p*(. | c), relative to its
// noise floor, is scored at every condition of three sets (training, held-out inside their range,
// outside it), with the memoryless SDE and with the ODE; the base model is scored alike.
//
// Usage: tilt_conditions_study [--dim D] [--cdim DC] [--seed S] [--problems P] [--iterations N]
//        [--batch B] [--steps K] [--samples N] [--train N] [--threads T] [--json FILE] [--png FILE] [--quiet]
// --train: the number of training conditions (8; with 1, the fine-tune is the unconditional problem at one condition).
// --png (dc = 1): the ratio against c of the first problem, every set, for the base and AM (SDE, ODE);
// with --plot-from REPORT.json, only that figure, redrawn from an earlier run's --json report.
#include "tilt/core/error.h"
#include "tilt/core/fs.h"
#include "tilt/eval/conditions.h"
#include "tilt/io/plot.h"
#include "tilt/io/run.h"
#include "tilt/model/conditional_gmm.h"
#include "tilt/model/finetuned.h"
#include "tilt/schedule/noise_schedule.h"
#include "tilt/train/adjoint_matching.h"
#include "tilt/train/trainer.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

namespace {

struct Settings {
  int64_t dim = 2, cdim = 1, problems = 1, iterations = 2400, batch = 256, steps = 60, samples = 2000, threads = 0;
  int64_t train = 8;  ///< training conditions (1: the unconditional problem at one condition, for comparison)
  uint64_t seed = 0;
  std::string json, png, plot_from;
  bool quiet = false;
};

Settings parse(int argc, char** argv) {
  Settings s;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--quiet") {
      s.quiet = true;
      continue;
    }
    if (i + 1 >= argc) throw tilt::Error("option " + a + " needs a value");
    const std::string v = argv[++i];
    if (a == "--json" || a == "--png" || a == "--plot-from") {
      (a == "--json" ? s.json : a == "--png" ? s.png : s.plot_from) = v;
      continue;
    }
    int64_t n = 0;
    try {
      size_t used = 0;
      n = std::stoll(v, &used);
      if (used != v.size()) throw std::invalid_argument(v);
    } catch (const std::exception&) {
      throw tilt::Error("option " + a + " needs a whole number, got '" + v + "'");
    }
    if (n < (a == "--threads" || a == "--seed" ? 0 : 1)) throw tilt::Error("option " + a + " is out of range: " + v);
    if (a == "--dim") s.dim = n;
    else if (a == "--cdim") s.cdim = n;
    else if (a == "--seed") s.seed = static_cast<uint64_t>(n);
    else if (a == "--problems") s.problems = n;
    else if (a == "--iterations") s.iterations = n;
    else if (a == "--batch") s.batch = n;
    else if (a == "--steps") s.steps = n;
    else if (a == "--samples") s.samples = n;
    else if (a == "--threads") s.threads = n;
    else if (a == "--train") s.train = n;
    else throw tilt::Error("unknown option '" + a + "'");
  }
  return s;
}

// Adjoint Matching over the training conditions, with the settings of configs/demo_2d.toml.
std::shared_ptr<tilt::FineTunedVelocity> finetune(const tilt::ConditionalProblem& p, const Settings& s, uint64_t seed) {
  auto model = tilt::make_finetuned(p.base, tilt::FineTuneMode::residual, {128, 128, 128}, 16, seed);
  tilt::AdjointMatchingOptions am;
  am.num_steps = s.steps;
  am.batch_size = s.batch;
  am.lambda = p.lambda;
  am.loss_early_steps = std::min<int64_t>(20, s.steps - 11);
  am.loss_late_steps = 10;
  am.loss_weighting = "velocity";
  am.clip_factor = 0.0;
  am.conditions = std::make_shared<const tilt::ConditionSet>(p.train);
  tilt::AdjointMatching loss(model, p.reward, tilt::make_memoryless_noise(1.0 / static_cast<double>(s.steps)), am);
  tilt::TrainerOptions t;
  t.iterations = s.iterations;
  t.adam.lr = 4e-3;
  t.adam.beta1 = 0.9;
  t.adam.weight_decay = 0.0;
  t.lr_schedule = tilt::LrSchedule::cosine;
  t.grad_clip = 0.0;
  t.seed = seed;
  t.progress = !s.quiet;
  t.label = "conditional AM";
  tilt::Trainer trainer(loss, t);
  trainer.run();
  return model;
}

nlohmann::json score_sets(const tilt::ConditionalProblem& p, const tilt::VelocityFieldPtr& field, const Settings& s,
                          uint64_t seed, const std::string& who) {
  nlohmann::json out;
  const std::vector<std::pair<std::string, tilt::Tensor>> sets{
      {"train", p.train}, {"held_out", p.held_out}, {"outside", p.outside}};
  const std::vector<std::pair<std::string, tilt::NoiseSchedulePtr>> samplers{
      {"sde", tilt::make_memoryless_noise(1.0 / 100.0)}, {"ode", tilt::make_zero_noise()}};
  for (const auto& [sampler, noise] : samplers) {
    for (const auto& [set, conditions] : sets) {
      tilt::ConditionScoreOptions o;
      o.samples = s.samples;
      o.steps = 100;
      o.seed = seed;
      const auto scores = tilt::score_conditions(tilt::GenerativeSDE(field, noise), conditions,
                                                 [&](const tilt::Tensor& c) { return p.exact(c); }, o);
      const tilt::ScoreSummary sum = tilt::summarise(scores);
      nlohmann::json rows = nlohmann::json::array();
      for (const auto& sc : scores) rows.push_back({{"condition", sc.condition}, {"ratio", sc.ratio}, {"energy", sc.energy}});
      out[sampler][set] = {{"median", sum.median}, {"worst", sum.worst}, {"conditions", rows}};
      std::printf("| %s | %s | %s | %.2f | %.2f |\n", who.c_str(), sampler.c_str(), set.c_str(), sum.median, sum.worst);
      std::fflush(stdout);
    }
  }
  return out;
}

// The ratio against the (scalar) condition, all three sets in one line per model and sampler.
void plot_ratios(const std::string& path, const nlohmann::json& problem) {
  std::vector<tilt::plot::Series> series;
  for (const char* model : {"finetuned", "base"}) {
    for (const char* sampler : {"sde", "ode"}) {
      std::vector<std::pair<double, double>> points;
      for (const char* set : {"train", "held_out", "outside"}) {
        for (const auto& row : problem[model][sampler][set]["conditions"]) {
          points.emplace_back(row["condition"][0].get<double>(), row["ratio"].get<double>());
        }
      }
      std::sort(points.begin(), points.end());
      tilt::plot::Series line{std::string(model == std::string("base") ? "base" : "AM") + ", " + sampler, {}, {}};
      for (const auto& [c, r] : points) {
        line.x.push_back(c);
        line.y.push_back(r);
      }
      series.push_back(line);
    }
  }
  tilt::plot::LineOptions o;
  o.width = 720;
  o.height = 420;
  o.title = "distance / noise floor per condition (trained in [-1, 1])";
  o.x_label = "condition c";
  o.y_label = "ratio (1 = exact)";
  o.log_y = true;
  tilt::plot::write_line_png(path, series, o);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Settings s = parse(argc, argv);
    if (!s.plot_from.empty()) {
      if (s.png.empty()) throw tilt::Error("--plot-from needs --png");
      const nlohmann::json report = nlohmann::json::parse(tilt::read_file(s.plot_from));
      // A report, or a list of them (scripts/conditions_study.sh's docs/conditions_study.json): the first.
      plot_ratios(s.png, (report.is_array() ? report.at(0) : report).at("problems").at(0));
      return 0;
    }
    tilt::set_threads(static_cast<int>(s.threads));
    nlohmann::json report = {{"dim", s.dim}, {"cdim", s.cdim}, {"iterations", s.iterations}, {"batch", s.batch},
                             {"steps", s.steps}, {"samples", s.samples}, {"problems", nlohmann::json::array()}};
    std::printf("| model | sampler | conditions | median ratio | worst ratio |\n|---|---|---|---|---|\n");
    for (int64_t i = 0; i < s.problems; ++i) {
      const uint64_t seed = s.seed + static_cast<uint64_t>(i);
      const tilt::ConditionalProblem p =
          tilt::random_conditional_problem(s.dim, s.cdim, seed, tilt::make_linear_schedule(), s.train);
      const auto start = std::chrono::steady_clock::now();
      const auto model = finetune(p, s, seed);
      const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      nlohmann::json entry = {{"seed", seed}, {"train_seconds", seconds}};
      entry["base"] = score_sets(p, p.base, s, seed, "base (seed " + std::to_string(seed) + ")");
      entry["finetuned"] = score_sets(p, model, s, seed, "AM (seed " + std::to_string(seed) + ")");
      report["problems"].push_back(entry);
    }
    if (!s.json.empty()) tilt::atomic_write(s.json, report.dump(2) + "\n");
    if (!s.png.empty()) {
      if (s.cdim != 1) throw tilt::Error("--png needs --cdim 1 (the ratio is drawn against a scalar condition)");
      plot_ratios(s.png, report["problems"][0]);
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "tilt_conditions_study: %s\n", e.what());
    return 1;
  }
}
