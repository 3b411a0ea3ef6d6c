// tilt sample, tilt eval, tilt plot: draw samples, measure them against the exact target, draw them.
#include "commands.h"

#include "tilt/core/error.h"
#include "tilt/eval/metrics.h"
#include "tilt/io/builders.h"
#include "tilt/io/model_io.h"
#include "tilt/io/plot.h"
#include "tilt/io/samples.h"
#include "tilt/sde/sampler.h"

#include <ATen/ATen.h>

#include <cstdio>
#include <iostream>
#include <map>

namespace tilt::cli {
namespace {

std::vector<plot::Point> first_two_coordinates(const Tensor& x) {
  const Tensor xy = x.to(at::kFloat).contiguous();
  std::vector<plot::Point> out(static_cast<size_t>(xy.size(0)));
  const float* p = xy.data_ptr<float>();
  const int64_t d = xy.size(1);
  for (int64_t i = 0; i < xy.size(0); ++i) out[i] = {p[i * d], d > 1 ? p[i * d + 1] : 0.0f};
  return out;
}

}  // namespace

int run_sample(const SampleArgs& args) {
  if (args.out.empty()) throw Error("--out is required: the CSV file for the samples");
  refuse_output_over_input("--out", args.out, {{"--model", args.model}, {"--config", args.config.config}, {"--png", args.png}});
  if (!args.png.empty()) refuse_output_over_input("--png", args.png, {{"--model", args.model}, {"--config", args.config.config}});
  check_flag("--n", args.n, 1, limits::kSamples);
  if (args.steps) check_flag("--steps", *args.steps, 1, limits::kSteps);  // -7 silently meant 100
  if (args.seed < 0) throw Error("--seed must be >= 0");
  if (args.model.empty() == args.exact.empty()) {
    throw Error("give either --model FILE, or --exact base|target with --config");
  }
  set_threads(args.threads);
  Generator gen = make_generator(mix_seed(static_cast<uint64_t>(args.seed), 17));
  Tensor x;
  std::string what;
  if (!args.exact.empty()) {
    if (args.exact != "base" && args.exact != "target") throw Error("--exact must be 'base' or 'target'");
    if (args.config.config.empty()) throw Error("--exact needs --config (-c): the config whose base and target to sample");
    Config config(args.config.config, args.config.set);
    ConfigSection root = config.root();
    read_run_settings(root);
    std::string why;
    auto exact = read_exact_problem(root, &why);
    if (!exact) throw Error("no exact " + args.exact + " for this config: " + why);
    finish_root(root);
    x = (args.exact == "base" ? exact->base : exact->target)->sample(args.n, gen);
    what = "exact " + args.exact + " samples";
  } else {
    const LoadedModel m = load_velocity(args.model);
    if (m.info.value("trained_by", std::string()) == "tilt adjoint-sampling") {
      throw Error("model file '" + args.model + "' is an Adjoint Sampling control, not a velocity field: its samples "
                  "come from tilt adjoint-sampling (samples.csv of its run)");
    }
    const int64_t steps = args.steps.value_or(100);
    std::string spec = args.noise.empty() ? m.info.value("noise", std::string("memoryless")) : args.noise;
    // The paper's offset h = 1/K goes with the number of steps.
    if (spec == "memoryless") spec += ":" + std::to_string(1.0 / static_cast<double>(steps));
    NoiseSchedulePtr noise;
    try {
      noise = parse_noise_schedule(spec);
    } catch (const Error& e) {
      throw Error(args.noise.empty() ? "the noise schedule " + args.model + " was fine-tuned with: " + e.what() + "; give --noise"
                                     : std::string("--noise: ") + e.what());
    }
    if (noise->is_memoryless() && noise->h() > kLargeMemorylessOffset) {
      warn((args.noise.empty() ? "the model's noise schedule " : "--noise ") + spec + ": an offset h above " + number_string(kLargeMemorylessOffset) +
           " is far from memoryless near t = 0 (the default is one step, h = 1/steps)");
    }
    SampleOptions opts;
    try {
      opts.integrator = args.integrator == "auto" ? (noise->is_zero() ? Integrator::heun : Integrator::euler)
                                                  : parse_integrator(args.integrator);
    } catch (const Error& e) {
      throw Error(std::string("--integrator: ") + e.what());
    }
    if (opts.integrator == Integrator::heun && !noise->is_zero()) {
      throw Error("--integrator heun is for the ODE only (--noise ode); the noise schedule is " + noise->describe());
    }
    x = sample(GenerativeSDE(m.field, noise), args.n, TimeGrid::uniform(steps), gen, opts);
    what = "samples of " + args.model + " with " + noise->describe() + ", " + std::to_string(steps) + " steps";
  }
  // A NaN row is never written with success: a model whose velocity is finite at the points
  // load_velocity probes can still be non-finite elsewhere on the path.
  const int64_t bad = (~x.isfinite()).any(1).sum().item<int64_t>();
  if (bad > 0) {
    throw Error((args.model.empty() ? what : "model file '" + args.model + "'") + " gave " + std::to_string(bad) +
                " of " + std::to_string(args.n) + " samples with NaN or Inf values; nothing was written to " +
                args.out + " (the model's velocity is not finite somewhere on the sampling path: its weights are "
                "damaged, or too large)");
  }
  write_samples_csv(args.out, x);
  info("wrote " + std::to_string(args.n) + " " + what + " to " + args.out);
  if (!args.png.empty()) {
    plot::write_scatter_png(args.png, {{what, first_two_coordinates(x)}});
    info("wrote " + args.png);
  }
  report({{"samples", args.out}, {"n", args.n}, {"png", args.png.empty() ? Json() : Json(args.png)}});
  return 0;
}

int run_eval(const EvalArgs& args) {
  if (args.samples.empty()) throw Error("give at least one --samples FILE");
  check_flag("--replicates", args.replicates, 1, 1000);
  if (args.seed < 0) throw Error("--seed must be >= 0");
  Config config(args.config.config, args.config.set);
  ConfigSection root = config.root();
  const RunSettings settings = read_run_settings(root);
  (void)settings;
  std::string why;
  const auto exact = read_exact_problem(root, &why);
  RewardPtr reward;
  double lambda = 1.0;
  if (exact) {
    reward = exact->reward;
    lambda = exact->lambda;
  } else if (root.has("reward") && root.has("data")) {
    auto mixture = read_data_mixture(root);
    if (mixture) reward = read_reward(root.section("reward"), mixture->dim(), &lambda);
  }
  finish_root(root);
  Tensor reference;
  if (!exact) {
    if (args.reference.empty()) throw Error("no exact target for this config (" + why + "); give --reference FILE");
    reference = read_samples_csv(args.reference);
  }
  Generator gen = make_generator(mix_seed(static_cast<uint64_t>(args.seed), 29));
  auto target_sample = [&](int64_t n) {
    if (exact) return exact->target->sample(n, gen);
    const Tensor idx = at::randperm(reference.size(0), gen, at::TensorOptions().dtype(at::kLong)).slice(0, 0, n);
    return reference.index_select(0, idx);
  };

  Json out;
  out["target"]["kind"] = exact ? "exact" : "reference";
  if (exact) {
    out["target"]["log_z"] = exact->log_z;
    out["target"]["lambda"] = lambda;
    out["target"]["mean_reward"] = reward_stats(*reward, exact->target->sample(100000, gen)).mean;
    out["base"]["mean_reward"] = reward_stats(*reward, exact->base->sample(100000, gen)).mean;
  } else {
    out["target"]["path"] = args.reference;
  }
  // Kernel bandwidths fixed once, from the target, so that every MMD below is comparable.
  const std::vector<double> bandwidths = median_bandwidths(target_sample(2000));
  out["mmd_bandwidths"] = bandwidths;
  // The noise floor depends only on n: estimated once per sample size, over 2 x replicates pairs.
  std::map<int64_t, std::pair<double, double>> floors;
  const double R = static_cast<double>(args.replicates);
  for (const std::string& path : args.samples) {
    const Tensor x = read_samples_csv(path);
    const int64_t n = x.size(0);
    const int64_t dim = exact ? exact->target->dim() : reference.size(1);
    if (x.size(1) != dim) {
      throw Error("samples file '" + path + "' has dimension " + std::to_string(x.size(1)) + ", the target has " +
                  std::to_string(dim));
    }
    if (!exact && 2 * n > reference.size(0)) {
      throw Error("--reference needs at least 2n = " + std::to_string(2 * n) + " samples to estimate the noise floor");
    }
    if (!floors.count(n)) {
      double ed = 0, mm = 0;
      for (int64_t r = 0; r < 2 * args.replicates; ++r) {
        const SampleDistances d = sample_distances(target_sample(n), target_sample(n), bandwidths);
        ed += d.energy / (2 * R);
        mm += d.mmd / (2 * R);
      }
      floors[n] = {ed, mm};
    }
    // Distances between finite samples of a multimodal law are heavy-tailed, so each is averaged
    // over `replicates` fresh target sets.
    double ed = 0, mm = 0;
    for (int64_t r = 0; r < args.replicates; ++r) {
      const SampleDistances d = sample_distances(x, target_sample(n), bandwidths);
      ed += d.energy / R;
      mm += d.mmd / R;
    }
    Json& s = out["samples"][path];
    s["n"] = n;
    s["energy_distance"] = ed;
    s["energy_distance_noise_floor"] = floors[n].first;
    s["energy_distance_ratio"] = ed / floors[n].first;
    s["mmd"] = mm;
    s["mmd_noise_floor"] = floors[n].second;
    s["mmd_ratio"] = mm / floors[n].second;
    if (reward) {
      const RewardStats rs = reward_stats(*reward, x);
      s["mean_reward"] = rs.mean;
      s["mean_reward_se"] = rs.standard_error;
    }
  }
  if (common_options().json) {
    report(out);
    return 0;
  }
  std::printf("target: %s", exact ? "exact p* ∝ p_base exp(lambda r)" : ("reference " + args.reference).c_str());
  if (exact) {
    std::printf(" (lambda = %g, log Z = %.4f, mean reward %.4f; base mean reward %.4f)",
                lambda, exact->log_z, out["target"]["mean_reward"].get<double>(), out["base"]["mean_reward"].get<double>());
  }
  std::printf("\n%-40s %7s %12s %12s %8s %12s %14s\n", "samples", "n", "energy dist", "noise floor", "ratio",
              "MMD", "mean reward");
  for (const std::string& path : args.samples) {
    const Json& s = out["samples"][path];
    std::printf("%-40s %7lld %12.3e %12.3e %8.2f %12.3e", path.c_str(), static_cast<long long>(s["n"].get<int64_t>()),
                s["energy_distance"].get<double>(), s["energy_distance_noise_floor"].get<double>(),
                s["energy_distance_ratio"].get<double>(), s["mmd"].get<double>());
    if (s.contains("mean_reward")) {
      std::printf(" %8.4f±%.4f", s["mean_reward"].get<double>(), s["mean_reward_se"].get<double>());
    }
    std::printf("\n");
  }
  std::printf("(energy distance and MMD averaged over %lld fresh target sets of the same size; the noise floor is "
              "the mean distance between two independent target sets, over twice as many pairs)\n",
              static_cast<long long>(args.replicates));
  return 0;
}

int run_plot(const PlotArgs& args) {
  if (args.out.empty()) throw Error("--out is required: the PNG file to write");
  if (args.panels.empty()) throw Error("give at least one samples file (FILE or FILE:TITLE)");
  check_flag("--size", args.size, 64, 4096);
  check_flag("--columns", args.columns, 0, 1000);
  check_flag("--max-images", args.max_images, 1, 100000);
  for (const std::string& spec : args.panels) {
    refuse_output_over_input("--out", args.out, {{"the samples file", spec.substr(0, spec.find(':'))}});
  }
  struct Input {
    std::string path, title;
    Tensor x;
  };
  std::vector<Input> inputs;
  for (const std::string& spec : args.panels) {
    const auto colon = spec.find(':');
    const std::string path = spec.substr(0, colon);
    inputs.push_back({path, colon == std::string::npos ? path : spec.substr(colon + 1), read_samples_csv(path)});
  }
  if (!args.images.empty()) {
    int h = 0, w = 0;
    char extra = 0;
    if (std::sscanf(args.images.c_str(), "%dx%d%c", &h, &w, &extra) != 2 || h < 1 || w < 1) {
      throw Error("--images must be HxW, e.g. 8x8; got '" + args.images + "'");
    }
    std::vector<plot::ImagePanel> grids;
    for (const Input& in : inputs) {
      const Tensor x = in.x.to(at::kFloat).contiguous();
      if (x.size(1) != static_cast<int64_t>(h) * w) {
        throw Error("'" + in.path + "' has dimension " + std::to_string(x.size(1)) + ", not " + args.images + " = " +
                    std::to_string(h * w) + " pixels");
      }
      const float* p = x.data_ptr<float>();
      grids.push_back({in.title, std::vector<float>(p, p + x.numel())});
    }
    plot::ImageGridOptions o;
    o.height = h;
    o.width = w;
    o.title = args.title;
    o.panel_columns = args.columns;
    o.max_images = args.max_images;
    plot::write_image_grid_png(args.out, grids, o);
    info("wrote " + args.out);
    report({{"png", args.out}});
    return 0;
  }
  std::vector<plot::Panel> panels;
  for (const Input& in : inputs) panels.push_back({in.title, first_two_coordinates(in.x)});
  plot::ScatterOptions o;
  o.title = args.title;
  o.columns = args.columns;
  o.panel_size = args.size;
  plot::write_scatter_png(args.out, panels, o);
  info("wrote " + args.out);
  report({{"png", args.out}});
  return 0;
}

namespace {
const bool registered_sample = add_command(
    {"sample", "Draw samples from a model file, or exact samples of a config's base or target", 40, [](CLI::App& app) {
       auto args = std::make_shared<SampleArgs>();
       app.add_option("-m,--model", args->model, "Model file (model.pt of a run)");
       app.add_option("--exact", args->exact, "Exact samples instead: 'base' or 'target' (needs --config)");
       add_config(app, args->config, false);
       app.add_option("-n,--n", args->n, "Number of samples")->capture_default_str();
       app.add_option("--noise", args->noise,
                      "Noise schedule: memoryless[:h], constant:<sigma>, scaled_memoryless:<s>, ode "
                      "(default: the one the model was fine-tuned with)");
       app.add_option("--steps", args->steps, "Time steps (default 100)");
       app.add_option("--integrator", args->integrator,
                      "euler, heun (ODE only), exact (the gDDIM step; noise memoryless, scaled_memoryless:<gamma> or ode), "
                      "or auto")->capture_default_str();
       app.add_option("--seed", args->seed, "Random seed")->capture_default_str();
       app.add_option("--threads", args->threads, "Threads (0: all cores; at most 1024)")->capture_default_str();
       app.add_option("-o,--out", args->out, "File: the samples (CSV)")->required();
       app.add_option("--png", args->png, "Also draw the samples (first two coordinates) to this PNG");
       return [args] { return run_sample(*args); };
     }});
const bool registered_eval = add_command(
    {"eval", "Measure sample sets against the exact target p* of a config", 60, [](CLI::App& app) {
       auto args = std::make_shared<EvalArgs>();
       add_config(app, args->config, true);
       app.add_option("-s,--samples", args->samples, "Samples file(s) to evaluate (repeatable)")->required();
       app.add_option("--reference", args->reference, "Reference samples, when the config has no exact target");
       app.add_option("--replicates", args->replicates, "Fresh target sets per distance")->capture_default_str();
       app.add_option("--seed", args->seed, "Random seed")->capture_default_str();
       return [args] { return run_eval(*args); };
     }});
const bool registered_plot = add_command(
    {"plot", "Draw sample sets side by side (first two coordinates) to a PNG", 90, [](CLI::App& app) {
       auto args = std::make_shared<PlotArgs>();
       app.add_option("panels", args->panels, "Samples files, each FILE or FILE:TITLE")->required();
       app.add_option("-o,--out", args->out, "File: the PNG")->required();
       app.add_option("--title", args->title, "Figure title");
       app.add_option("--columns", args->columns, "Panels per row (0: one row)");
       app.add_option("--size", args->size, "Panel size in pixels")->capture_default_str();
       app.add_option("--images", args->images, "Draw each sample as an image of HxW pixels (e.g. 8x8) instead of a point");
       app.add_option("--max-images", args->max_images, "Images per panel with --images")->capture_default_str();
       return [args] { return run_plot(*args); };
     }});
}  // namespace

}  // namespace tilt::cli
