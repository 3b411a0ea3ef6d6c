// tilt logz: importance weights, effective sample size and log Z = log E_{p_base}[exp(lambda r)]
// for a proposal (a fine-tuned model, or a multiple of the exact optimal control), by Girsanov
// against the base chain, against the exact noising chain, or by escorted Jarzynski
// (tilt/sde/importance.h).
#include "commands.h"

#include "tilt/core/error.h"
#include "tilt/core/progress.h"
#include "tilt/io/builders.h"
#include "tilt/io/model_io.h"
#include "tilt/sde/importance.h"

#include <ATen/ATen.h>

#include <cmath>
#include <cstdio>
#include <iostream>

namespace tilt::cli {

int run_logz(const LogzArgs& args) {
  check_flag("--n", args.n, 2, limits::kSamples);
  check_flag("--steps", args.steps, 1, limits::kSteps);
  check_flag("--batch", args.batch, 1, limits::kBatch);
  check_flag("--threads", args.threads, 0, kMaxThreads);  // before the config is read (0: the config's)
  if (args.seed < -1) throw Error("--seed must be >= 0 (or -1: the config's)");
  if (args.method != "girsanov" && args.method != "noising" && args.method != "jarzynski") {
    throw Error("--method must be girsanov, noising or jarzynski, got '" + args.method + "'");
  }
  if (!args.model.empty() && !args.control.empty()) throw Error("give --model or --control, not both");
  Config config(args.config.config, args.config.set);
  ConfigSection root = config.root();
  const RunSettings settings = read_run_settings(root);
  if (args.threads != 0) set_threads(args.threads);
  const VelocityFieldPtr v_base = read_base(root);
  std::string why;
  const auto exact = read_exact_problem(root, &why);
  double lambda = 1.0;
  RewardPtr reward = exact ? exact->reward : read_reward(root.section("reward"), v_base->dim(), &lambda);
  if (exact) lambda = exact->lambda;
  finish_root(root);

  // The proposal: a model file, a multiple of the exact optimal control, or the base (zero control).
  VelocityFieldPtr proposal = v_base;
  std::string proposal_name = "zero control (the base)";
  if (!args.model.empty()) {
    proposal = load_velocity(args.model).field;
    proposal_name = args.model;
  } else if (!args.control.empty() && args.control != "zero") {
    double scale = 1.0;
    if (args.control.rfind("optimal", 0) != 0) {
      throw Error("--control must be zero, optimal or optimal:<scale>, got '" + args.control + "'");
    }
    if (args.control.size() > 7) {
      if (args.control[7] != ':') throw Error("--control: expected optimal:<scale>, got '" + args.control + "'");
      char* end = nullptr;
      scale = std::strtod(args.control.c_str() + 8, &end);
      if (*end != '\0' || end == args.control.c_str() + 8) throw Error("--control: '" + args.control.substr(8) + "' is not a number");
      if (!std::isfinite(scale)) throw Error("--control: the scale must be finite, got " + args.control.substr(8));
    }
    if (!exact) throw Error("--control optimal needs the exact target p*, and this config has none: " + why);
    if (v_base->kind() != "gmm") throw Error("--control optimal needs [base] type = \"exact\" (the control is v* - v_base of the exact fields)");
    auto v_star = std::make_shared<GmmVelocity>(exact->target, v_base->schedule());
    proposal = std::make_shared<ScaledControlVelocity>(v_base, v_star, scale);
    proposal_name = scale == 1.0 ? "exact optimal control u*" : "u* x " + args.control.substr(8);
  }
  if (proposal->dim() != v_base->dim()) {
    throw Error((args.model.empty() ? std::string("the proposal") : "--model '" + args.model + "'") + " has dimension " +
                std::to_string(proposal->dim()) + ", the base " + std::to_string(v_base->dim()));
  }

  std::string spec = args.noise;
  if (spec.empty()) spec = args.method == "jarzynski" ? "constant:1" : "memoryless";
  if (spec == "memoryless") spec += ":" + std::to_string(1.0 / static_cast<double>(args.steps));
  NoiseSchedulePtr noise;
  try {
    noise = parse_noise_schedule(spec);
  } catch (const Error& e) {
    throw Error(std::string("--noise: ") + e.what());
  }
  if (noise->is_memoryless() && noise->h() > kLargeMemorylessOffset) {
    warn("--noise " + spec + ": an offset h above " + number_string(kLargeMemorylessOffset) +
         " is far from memoryless near t = 0 (the default is one step, h = 1/steps)");
  }
  if (noise->is_zero()) throw Error("--noise " + spec + ": the ODE has no path density; importance weights need a stochastic schedule");
  ImportanceOptions opts;
  try {
    opts.integrator = parse_integrator(args.integrator);
  } catch (const Error& e) {
    throw Error(std::string("--integrator: ") + e.what());
  }
  if (opts.integrator == Integrator::heun) {
    throw Error("--integrator heun: a deterministic step has no path density; use euler or exact");
  }
  opts.batch = args.batch;
  ProgressBar bar("logz", args.n, 0, !args.quiet);
  opts.progress = [&bar](int64_t done, int64_t) { bar.update(done); };
  Generator gen = make_generator(mix_seed(args.seed >= 0 ? static_cast<uint64_t>(args.seed) : settings.seed, 41));
  const TimeGrid grid = TimeGrid::uniform(args.steps);
  const GenerativeSDE base(v_base, noise);
  WeightedPaths paths;
  if (args.method == "girsanov") {
    paths = girsanov_weights(base, *proposal, *reward, lambda, args.n, grid, gen, opts);
  } else if (args.method == "noising") {
    if (!exact) throw Error("--method noising needs the base's density: [data] must be a Gaussian mixture (" + why + ")");
    const auto density = exact->base;
    paths = noising_weights(GenerativeSDE(proposal, noise), [density](const Tensor& x) { return density->log_prob(x); },
                            *reward, lambda, args.n, grid, gen, opts);
  } else {
    if (!args.model.empty() || (!args.control.empty() && args.control != "zero")) {
      throw Error("--method jarzynski runs the escorted base dynamics; it takes no --model or --control");
    }
    proposal_name = "escorted base dynamics";
    paths = jarzynski_weights(base, *reward, lambda, args.n, grid, gen, opts);
  }
  bar.finish();
  const WeightSummary s = summarize_weights(paths);

  Json out;
  out["method"] = args.method;
  out["proposal"] = proposal_name;
  out["noise"] = noise->describe();
  out["integrator"] = args.integrator;
  out["steps"] = args.steps;
  out["lambda"] = lambda;
  out["n"] = s.n;
  out["log_z"] = s.log_z;
  out["log_z_standard_error"] = s.standard_error;
  out["ess"] = s.ess;
  out["ess_fraction"] = s.ess_fraction;
  out["mean_reward"] = s.mean_reward;
  out["weighted_mean_reward"] = s.weighted_mean_reward;
  if (exact) {
    out["exact_log_z"] = exact->log_z;
    out["z_score"] = s.standard_error > 0 ? (s.log_z - exact->log_z) / s.standard_error : 0.0;
  }
  if (common_options().json) {
    report(out);
    return 0;
  }
  std::printf("%s weights of %s (%s, %s, %lld steps), n = %lld, lambda = %g\n", args.method.c_str(), proposal_name.c_str(),
              noise->describe().c_str(), args.integrator.c_str(), static_cast<long long>(args.steps),
              static_cast<long long>(s.n), lambda);
  std::printf("  log Z         %.4f ± %.4f (one standard error, delta method)\n", s.log_z, s.standard_error);
  if (exact) {
    std::printf("  exact log Z   %.4f  (estimate off by %.2f standard errors)\n", exact->log_z, out["z_score"].get<double>());
  }
  std::printf("  ESS           %.1f (%.1f%% of n)\n", s.ess, 100.0 * s.ess_fraction);
  std::printf("  mean reward   %.4f as drawn, %.4f reweighted (an estimate of E_p*[r])\n", s.mean_reward, s.weighted_mean_reward);
  if (args.method == "girsanov") {
    std::printf("  (Girsanov weights are exact for the discretised base chain, whose law at t = 1 is p_base only up to "
                "O(1/steps); --method noising is unbiased for the exact log Z at any step count)\n");
  }
  return 0;
}

namespace {
const bool registered = add_command(
    {"logz", "Importance weights, ESS and log Z = log E_base[exp(lambda r)] for a proposal", 80, [](CLI::App& app) {
       auto args = std::make_shared<LogzArgs>();
       add_config(app, args->config, true);
       app.add_option("-m,--model", args->model, "Proposal: a model file (e.g. a fine-tuned model.pt)");
       app.add_option("--control", args->control, "Proposal: zero, optimal or optimal:<scale> (needs the exact target)");
       app.add_option("--method", args->method, "girsanov (against the base chain), noising (against the exact noising "
                                                "chain; needs a mixture base), jarzynski (escorted)")->capture_default_str();
       app.add_option("--noise", args->noise, "Noise schedule (default memoryless; constant:1 for jarzynski)");
       app.add_option("--integrator", args->integrator, "euler or exact")->capture_default_str();
       app.add_option("--steps", args->steps, "Time steps")->capture_default_str();
       app.add_option("-n,--n", args->n, "Paths")->capture_default_str();
       app.add_option("--batch", args->batch, "Paths simulated at once")->capture_default_str();
       app.add_option("--seed", args->seed, "Random seed (-1: the config's)")->capture_default_str();
       app.add_option("--threads", args->threads, "Threads (0: the config's; at most 1024)")->capture_default_str();
       app.add_flag("-q,--quiet", args->quiet, "No progress bar");
       return [args] { return run_logz(*args); };
     }});
}  // namespace

}  // namespace tilt::cli
