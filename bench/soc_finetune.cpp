// Every SOC loss as a fine-tuning method: the fine-tuning problem of a config (its [data] mixture, exact
// base velocity, [reward] and [finetune] budget) is posed as soc::FineTuningProblem, each SOC loss trains
// a control network on it with the same budget, and the fine-tuned velocity v_base + sigma u / c_v is
// scored by the energy distance of its samples to the exact tilted target p*, relative to the noise
// floor (two independent sets of exact samples), with the memoryless SDE and with the ODE. Adjoint
// Matching's own fine-tuning path (a residual velocity network) is the first row.
//
//   tilt_soc_finetune CONFIG [--iterations N] [--samples N] [--losses a,b,...] [--markdown FILE]
//
// scripts/soc_finetune_study.sh runs it on configs/demo_2d.toml and writes docs/soc_finetune.md.
#include "exact_scores.h"

#include "tilt/core/error.h"
#include "tilt/core/fs.h"
#include "tilt/eval/metrics.h"
#include "tilt/io/builders.h"
#include "tilt/io/config.h"
#include "tilt/io/methods.h"
#include "tilt/model/finetuned.h"
#include "tilt/model/gmm.h"
#include "tilt/soc/finetuning.h"
#include "tilt/soc/losses.h"
#include "tilt/train/adjoint_matching.h"
#include "tilt/train/trainer.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <chrono>
#include <cstdio>
#include <iostream>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

using namespace tilt;

namespace {

struct Study {
  std::shared_ptr<GaussianMixture> base_mixture, target;
  VelocityFieldPtr base;
  RewardPtr reward;
  double lambda = 1.0;
  int64_t steps = 60, batch = 256, iterations = 2400, samples = 2000;
  std::vector<int64_t> hidden{128, 128, 128};
  double lr = 4e-3;
  FinetunePlan plan;  ///< what `tilt finetune` would run for this config (the first row)
};

Study read_study(const std::string& path) {
  Config config(path, {});
  ConfigSection root = config.root();
  root.allow({"seed", "threads", "base", "pretrain", "sample", "eval"});
  Study s;
  const SchedulePtr schedule = read_schedule(root.section("schedule"));
  s.base_mixture = read_mixture(root.section("data"));
  s.base = std::make_shared<GmmVelocity>(s.base_mixture, schedule);
  s.reward = read_reward(root.section("reward"), s.base_mixture->dim(), &s.lambda);
  const auto target = exact_tilt(*s.reward, *s.base_mixture, s.lambda);
  if (!target) throw Error(path + ": the reward has no closed-form tilt of the mixture; the study needs the exact p*");
  s.target = std::make_shared<GaussianMixture>(*target);
  ConfigSection ft = root.section("finetune");
  s.plan = read_finetune(ft, *s.base, s.reward, s.lambda);
  s.steps = s.plan.num_steps;
  s.batch = s.plan.batch_size;
  s.iterations = s.plan.trainer.iterations;
  s.hidden = s.plan.mlp.hidden;
  s.lr = s.plan.trainer.adam.lr;
  return s;
}

TrainerOptions trainer_options(const Study& s, const std::string& label) {
  TrainerOptions t;
  t.iterations = s.iterations;
  t.adam = {s.lr, 0.9, 0.999, 1e-8, 0.0};
  t.lr_schedule = LrSchedule::cosine;
  t.grad_clip = 0.0;
  t.seed = 7;
  t.progress = false;
  t.label = label;
  return t;
}

struct Score {
  double sde = 0, ode = 0, seconds = 0;
};

// Energy distance of `n` samples of v (memoryless SDE, and the ODE) to exact p*, over the noise floor.
Score score(const Study& s, const VelocityFieldPtr& v, double floor) {
  Score out;
  std::tie(out.sde, out.ode) = tilt_bench::sde_ode_ratios(*s.target, v, s.samples, s.steps, floor);
  return out;
}

double noise_floor(const Study& s) { return tilt_bench::exact_noise_floor(*s.target, s.samples); }

double train(Loss& loss, const TrainerOptions& options) {
  const auto start = std::chrono::steady_clock::now();
  Trainer trainer(loss, options);
  trainer.run([](const StepResult&) {});
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

std::vector<std::string> split(const std::string& list) {
  std::vector<std::string> out;
  std::stringstream in(list);
  for (std::string item; std::getline(in, item, ',');) out.push_back(item);
  return out;
}

}  // namespace

int main(int argc, char** argv) try {
  at::set_num_threads(std::max(1, at::get_num_threads()));
  if (argc < 2) throw Error("usage: tilt_soc_finetune CONFIG [--iterations N] [--samples N] [--losses a,b] [--markdown FILE]");
  Study s = read_study(argv[1]);
  std::vector<std::string> losses = soc::soc_loss_names();
  std::string markdown;
  for (int i = 2; i + 1 < argc; i += 2) {
    const std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--iterations") s.iterations = std::stoll(value);
    else if (flag == "--samples") s.samples = std::stoll(value);
    else if (flag == "--losses") losses = split(value);
    else if (flag == "--markdown") markdown = value;
    else throw Error("unknown option '" + flag + "'");
  }
  const NoiseSchedulePtr noise = make_memoryless_noise(1.0 / static_cast<double>(s.steps));
  const double floor = noise_floor(s);
  std::ostringstream table;
  table << "| method | memoryless SDE / floor | ODE / floor | training time (s) |\n|---|---|---|---|\n";
  auto row = [&](const std::string& name, const Score& r) {
    char line[200];
    std::snprintf(line, sizeof line, "| %s | %.2f | %.2f | %.0f |\n", name.c_str(), r.sde, r.ode, r.seconds);
    table << line;
    std::cout << line << std::flush;
  };
  {
    // Adjoint Matching's fine-tuning path: the model and loss `tilt finetune` builds from this config.
    auto model = s.plan.make_model(s.base, 1);
    const std::unique_ptr<Loss> am = s.plan.make_loss(model);
    const double seconds = train(*am, trainer_options(s, "am"));
    Score r = score(s, model, floor);
    r.seconds = seconds;
    row("adjoint matching (tilt finetune, velocity network)", r);
  }
  auto problem = std::make_shared<soc::FineTuningProblem>(GenerativeSDE(s.base, noise), s.reward, s.lambda, s.steps,
                                                           std::make_shared<GmmVelocity>(s.target, s.base->schedule()));
  for (const std::string& name : losses) {
    auto control = std::make_shared<soc::ControlNetwork>(s.base->dim(), 1.0, s.hidden, 1);
    soc::SocLossOptions o;
    o.batch_size = s.batch;
    o.num_steps = s.steps;
    std::unique_ptr<Loss> loss;
    try {
      loss = soc::make_soc_loss(name, problem, control, o);
    } catch (const Error& e) {
      table << "| " << name << " | n/a | n/a | " << e.what() << " |\n";
      continue;
    }
    const double seconds = train(*loss, trainer_options(s, name));
    Score r = score(s, problem->controlled_velocity(control), floor);
    r.seconds = seconds;
    row("soc: " + name, r);
  }
  if (!markdown.empty()) atomic_write(markdown, table.str());
  return 0;
} catch (const std::exception& e) {
  std::cerr << "tilt_soc_finetune: error: " << e.what() << "\n";
  return 1;
}
