// Does the training ESS track the distance to p*? Fine-tunes the model `tilt finetune` builds from a config whose
// [data] is a mixture with a closed-form tilt (configs/demo_2d.toml), records each iteration's path-weight metrics
// (ess, log_z: docs/equations.md, E104), and every --every iterations scores the model: the energy distance of
// --samples memoryless-SDE and ODE samples to exact samples of p*, over the noise floor (two independent exact
// sets). Writes PREFIX.jsonl (one line per scoring: iteration, the ESS and log Z averaged over the iterations since
// the last scoring, both distances) and PREFIX.png (1 - ESS and the distances against the iteration, log scale).
//
//   tilt_ess_study CONFIG [--iterations N] [--every N] [--samples N] [--out PREFIX]
//
// One thread. scripts/ess_study.sh runs it on configs/demo_2d.toml (docs/images/ess_vs_distance.png, docs/method.md).
#include "exact_scores.h"

#include "tilt/core/error.h"
#include "tilt/core/fs.h"
#include "tilt/eval/metrics.h"
#include "tilt/io/builders.h"
#include "tilt/io/config.h"
#include "tilt/io/methods.h"
#include "tilt/io/plot.h"
#include "tilt/model/gmm.h"
#include "tilt/schedule/noise_schedule.h"
#include "tilt/sde/sampler.h"
#include "tilt/train/trainer.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdio>
#include <iostream>
#include <sstream>
#include <string>

using namespace tilt;

namespace {

struct Study {
  std::shared_ptr<GaussianMixture> target;
  VelocityFieldPtr base;
  FinetunePlan plan;
  double log_z = 0;  // exact
  int64_t iterations = 0, every = 100, samples = 2000;
};

Study read_study(const std::string& path) {
  Config config(path, {});
  ConfigSection root = config.root();
  root.allow({"seed", "threads", "base", "pretrain", "sample", "eval"});
  Study s;
  const SchedulePtr schedule = read_schedule(root.section("schedule"));
  const auto mixture = read_mixture(root.section("data"));
  s.base = std::make_shared<GmmVelocity>(mixture, schedule);
  double lambda = 1.0;
  const RewardPtr reward = read_reward(root.section("reward"), mixture->dim(), &lambda);
  const auto target = exact_tilt(*reward, *mixture, lambda, &s.log_z);
  if (!target) throw Error(path + ": the reward has no closed-form tilt of the mixture; the study needs the exact p*");
  s.target = std::make_shared<GaussianMixture>(*target);
  ConfigSection ft = root.section("finetune");
  s.plan = read_finetune(ft, *s.base, reward, lambda);
  s.iterations = s.plan.trainer.iterations;
  return s;
}

double noise_floor(const Study& s) { return tilt_bench::exact_noise_floor(*s.target, s.samples); }

// Energy distances of the model's memoryless-SDE and ODE samples to exact p*, over the floor.
std::pair<double, double> score(const Study& s, const VelocityFieldPtr& v, double floor) {
  return tilt_bench::sde_ode_ratios(*s.target, v, s.samples, s.plan.num_steps, floor);
}

double metric(const StepResult& r, const std::string& name) {
  for (const auto& [key, value] : r.output.metrics) {
    if (key == name) return value;
  }
  throw Error("the loss reports no metric '" + name + "' (the study needs method = \"adjoint_matching\")");
}

void plot_study(const std::string& path, const Json& lines) {
  plot::Series ess{"1 - ESS (mean since the last point)", {}, {}}, sde{"energy distance / floor, SDE", {}, {}},
      ode{"energy distance / floor, ODE", {}, {}};
  for (const Json& j : lines) {
    const double it = j["iteration"].get<double>();
    if (it > 0) ess.x.push_back(it), ess.y.push_back(1.0 - j["ess"].get<double>());
    sde.x.push_back(it), sde.y.push_back(j["distance_sde"].get<double>());
    ode.x.push_back(it), ode.y.push_back(j["distance_ode"].get<double>());
  }
  plot::LineOptions o;
  o.width = 800;
  o.height = 500;
  o.title = "training ESS against the distance to p*";
  o.x_label = "iteration";
  o.y_label = "1 - ESS; energy distance / noise floor";
  o.log_y = true;
  plot::write_line_png(path, {ess, sde, ode}, o);
}

}  // namespace

int main(int argc, char** argv) try {
  if (argc < 2) throw Error("usage: tilt_ess_study CONFIG [--iterations N] [--every N] [--samples N] [--out PREFIX]");
  at::set_num_threads(1);  // a few minutes of CPU on one thread
  Study s = read_study(argv[1]);
  std::string out = "ess_study";
  for (int i = 2; i + 1 < argc; i += 2) {
    const std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--iterations") s.iterations = std::stoll(value);
    else if (flag == "--every") s.every = std::stoll(value);
    else if (flag == "--samples") s.samples = std::stoll(value);
    else if (flag == "--out") out = value;
    else throw Error("unknown option '" + flag + "'");
  }
  if (s.every < 1 || s.iterations < 1 || s.samples < 2) throw Error("--iterations, --every and --samples must be positive");
  const double floor = noise_floor(s);
  auto model = s.plan.make_model(s.base, 1);
  const std::unique_ptr<Loss> loss = s.plan.make_loss(model);
  const TrainerOptions t = tilt_bench::study_trainer(s.plan, s.iterations);
  Json lines = Json::array();
  auto add = [&](int64_t iteration, double ess, double log_z, double seconds) {
    const auto [d_sde, d_ode] = score(s, model, floor);
    Json j{{"iteration", iteration}, {"ess", ess}, {"log_z", log_z}, {"exact_log_z", s.log_z},
           {"distance_sde", d_sde}, {"distance_ode", d_ode}, {"train_seconds", seconds}};
    std::cout << j.dump() << std::endl;
    lines.push_back(j);
  };
  add(0, NAN, NAN, 0.0);
  double ess_sum = 0, log_z_sum = 0, seconds = 0;
  int64_t n = 0;
  Trainer trainer(*loss, t);
  trainer.run([&](const StepResult& r) {
    ess_sum += metric(r, "ess"), log_z_sum += metric(r, "log_z"), seconds += r.seconds, ++n;
    if (r.iteration % s.every != 0 && r.iteration != s.iterations) return;
    add(r.iteration, ess_sum / static_cast<double>(n), log_z_sum / static_cast<double>(n), seconds);
    ess_sum = log_z_sum = 0, n = 0;
  });
  std::ostringstream jsonl;
  for (const Json& j : lines) jsonl << j.dump() << "\n";
  atomic_write(out + ".jsonl", jsonl.str());
  plot_study(out + ".png", lines);
  return 0;
} catch (const std::exception& e) {
  std::cerr << "tilt_ess_study: error: " << e.what() << "\n";
  return 1;
}
