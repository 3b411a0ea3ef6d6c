// The lean adjoint's norm along t under classifier-free guidance (docs/conditions.md, "Guidance during
// fine-tuning"; scripts/guidance_study.sh). The Adjoint Matching authors' Stable Diffusion code reports that
// guidance in the adjoint ("full CFG") fails because the lean adjoint blows up in norm. This measures it: for
// each guidance weight w, trajectories of the model guided by w are drawn with the memoryless SDE at the
// config's training conditions, and the lean adjoint (E24, terminal -lambda grad r) is run backwards along them
// twice, through the unguided base (no guidance, or guided trajectories only) and through the guided base
// (guidance in the adjoint, E101). Reported at every step: the batch mean of |a~(t)|, and of |a~(t)| / |a~(1)|,
// the amplification of the adjoint ODE itself (a blow-up shows there whatever the reward's gradient).
//
// Usage: tilt_guidance_study -c CONFIG [--set KEY=VALUE]... [--model FINETUNED.pt] [--w 0,1,4] [--batch B]
//        [--steps K] [--seed S] [--threads T] [--json FILE] [--png FILE]
// CONFIG is a fine-tuning config with a conditional [base] that has a null condition, a [reward] and
// [conditions] (configs/digits_conditional.toml). --model rolls out a fine-tuned model instead of the base.
#include "tilt/core/error.h"
#include "tilt/core/fs.h"
#include "tilt/io/builders.h"
#include "tilt/io/config.h"
#include "tilt/io/model_io.h"
#include "tilt/io/plot.h"
#include "tilt/io/run.h"
#include "tilt/model/condition.h"
#include "tilt/schedule/noise_schedule.h"
#include "tilt/sde/sampler.h"
#include "tilt/train/adjoint_matching.h"

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

namespace {

struct Settings {
  std::string config, model, json, png;
  std::vector<std::string> overrides;
  std::vector<double> weights{0.0, 1.0, 4.0};
  int64_t batch = 64, steps = 40, threads = 0;
  uint64_t seed = 0;
};

std::vector<double> parse_list(const std::string& v) {
  std::vector<double> out;
  std::stringstream in(v);
  std::string item;
  while (std::getline(in, item, ',')) {
    try {
      out.push_back(std::stod(item));
    } catch (const std::exception&) {
      throw tilt::Error("--w: '" + item + "' is not a number");
    }
  }
  if (out.empty()) throw tilt::Error("--w needs at least one weight");
  return out;
}

Settings parse(int argc, char** argv) {
  Settings s;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (i + 1 >= argc) throw tilt::Error("option " + a + " needs a value");
    const std::string v = argv[++i];
    if (a == "-c" || a == "--config") s.config = v;
    else if (a == "--set") s.overrides.push_back(v);
    else if (a == "--model") s.model = v;
    else if (a == "--json") s.json = v;
    else if (a == "--png") s.png = v;
    else if (a == "--w") s.weights = parse_list(v);
    else if (a == "--batch" || a == "--steps" || a == "--seed" || a == "--threads") {
      int64_t n = 0;
      try {
        n = std::stoll(v);
      } catch (const std::exception&) {
        throw tilt::Error(a + ": '" + v + "' is not an integer");
      }
      if (n < (a == "--seed" || a == "--threads" ? 0 : 1)) throw tilt::Error(a + " is out of range: " + v);
      if (a == "--batch") s.batch = n;
      else if (a == "--steps") s.steps = n;
      else if (a == "--seed") s.seed = static_cast<uint64_t>(n);
      else s.threads = n;
    } else {
      throw tilt::Error("unknown option " + a);
    }
  }
  if (s.config.empty()) throw tilt::Error("give a config: -c CONFIG");
  if (s.steps < 2) throw tilt::Error("--steps must be at least 2");
  return s;
}

// Mean |a~(t_k)| over the batch, k = 0..K.
std::vector<double> norms(const tilt::LeanAdjoint& adj) {
  std::vector<double> out;
  for (const auto& a : adj.a) out.push_back(a.norm(2, {1}).mean().item<double>());
  return out;
}

// The adjoint ODE's own amplification, free of the terminal gradient's size: the batch mean of
// |a~(t_k)| / |a~(1)| per trajectory, k = 0..K.
std::vector<double> amplification(const tilt::LeanAdjoint& adj) {
  const at::Tensor end = adj.a.back().norm(2, {1}).clamp_min(1e-30);
  std::vector<double> out;
  for (const auto& a : adj.a) out.push_back((a.norm(2, {1}) / end).mean().item<double>());
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Settings s = parse(argc, argv);
    tilt::set_threads(static_cast<int>(s.threads));
    tilt::Config config(s.config, s.overrides);
    tilt::ConfigSection root = config.root();
    const tilt::VelocityFieldPtr base = tilt::read_base(root);
    double lambda = 1.0;
    const tilt::RewardPtr reward = tilt::read_reward(root.section("reward"), base->dim(), &lambda);
    const tilt::ConditionSetPtr conditions = tilt::read_training_conditions(root, *base);
    if (!conditions) throw tilt::Error(s.config + ": needs a conditional base and [conditions]");
    const tilt::VelocityFieldPtr rolled = s.model.empty() ? base : tilt::load_velocity(s.model).field;
    const tilt::NoiseSchedulePtr noise = tilt::make_memoryless_noise(1.0 / static_cast<double>(s.steps));
    const tilt::TimeGrid grid = tilt::TimeGrid::uniform(s.steps);
    std::vector<double> times = grid.times();
    times.pop_back();  // the noiseless final step: X^_1 = X_{K-1} + h v_base, as Adjoint Matching takes it
    nlohmann::json report = {{"config", s.config}, {"model", s.model.empty() ? "base" : s.model}, {"t", grid.times()},
                             {"batch", s.batch}, {"lambda", lambda}, {"runs", nlohmann::json::array()}};
    std::vector<tilt::plot::Series> series;
    std::printf("| w | adjoint through | mean |a(1)| | |a(0.5)| / |a(1)| | |a(0)| / |a(1)| | max over t of |a(t)| / |a(1)| |\n"
                "|---|---|---|---|---|---|\n");
    for (const double w : s.weights) {
      tilt::Generator gen = tilt::make_generator(s.seed);
      const tilt::Tensor c = conditions->draw(s.batch, gen);
      const tilt::RewardPtr r = tilt::bind_condition(reward, reward->condition_dim() > 0 ? c : tilt::Tensor());
      tilt::SampleOptions so;
      so.record = true;
      at::Tensor x0;
      {
        at::NoGradGuard no_grad;
        x0 = at::randn({s.batch, base->dim()}, gen);
      }
      const tilt::Trajectory traj =
          tilt::simulate(tilt::GenerativeSDE(tilt::bind_condition(rolled, c, w), noise), x0, tilt::TimeGrid(times), gen, so);
      for (const bool guided : {false, true}) {
        if (guided && w == 0.0) continue;
        const tilt::LeanAdjoint adj = tilt::lean_adjoint(
            tilt::GenerativeSDE(tilt::bind_condition(base, c, guided ? w : 0.0), noise), traj.x, grid, *r, lambda, true);
        const std::vector<double> n = norms(adj), amp = amplification(adj);
        const double peak = *std::max_element(amp.begin(), amp.end());
        const std::string through = guided ? "guided base" : "base";
        std::printf("| %g | %s | %.3g | %.3g | %.3g | %.3g |\n", w, through.c_str(), n.back(), amp[amp.size() / 2],
                    amp.front(), peak);
        std::fflush(stdout);
        report["runs"].push_back(
            {{"w", w}, {"adjoint", guided ? "guided" : "unguided"}, {"norm", n}, {"amplification", amp}});
        char label[64];
        std::snprintf(label, sizeof label, "w = %g, %s", w, guided ? "guided adjoint" : "unguided adjoint");
        series.push_back({label, grid.times(), amp});
      }
    }
    if (!s.json.empty()) tilt::atomic_write(s.json, report.dump(2) + "\n");
    if (!s.png.empty()) {
      tilt::plot::LineOptions o;
      o.width = 1000;  // the nine curves' legend beside the plot
      o.height = 460;
      o.title = "lean adjoint norm along guided trajectories";
      o.x_label = "t";
      o.y_label = "mean |a(t)| / |a(1)|";
      o.log_y = true;
      tilt::plot::write_line_png(s.png, series, o);
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "tilt_guidance_study: %s\n", e.what());
    return 1;
  }
}
