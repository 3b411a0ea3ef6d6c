#include "tilt/io/logz.h"

#include "tilt/core/check.h"
#include "tilt/core/error.h"
#include "tilt/core/log.h"
#include "tilt/core/progress.h"
#include "tilt/io/builders.h"
#include "tilt/io/model_io.h"
#include "tilt/io/run.h"
#include "tilt/io/samples.h"
#include "tilt/model/condition.h"
#include "tilt/model/conditional_gmm.h"
#include "tilt/sde/importance.h"

#include <ATen/ATen.h>

#include <cmath>
#include <algorithm>
#include <cstdio>
#include <cstdlib>

namespace tilt {
namespace {

// What the estimate reads from the config.
struct Problem {
  VelocityFieldPtr base;
  RewardPtr reward;
  double lambda = 1.0;
  std::optional<ExactProblem> exact;
  std::shared_ptr<GaussianMixture> density;  ///< p_base where [data] is a mixture (at the condition): noising's reference
  std::string why;  ///< why there is no exact target
  uint64_t seed = 0;
};

Problem read_problem(Config& config, const Tensor& condition) {
  ConfigSection root = config.root();
  Problem p;
  p.seed = read_run_settings(root).seed;  // also sets the threads
  p.base = read_base(root);
  const int64_t dc = p.base->condition_dim();
  if (dc > 0 && !condition.defined()) {
    throw Error("the base of [base] is conditional (a condition of " + std::to_string(dc) + " numbers): give --condition");
  }
  if (condition.defined() && condition.numel() != dc) {
    throw Error("--condition has " + std::to_string(condition.numel()) + " numbers, but the base of [base] takes " +
                std::to_string(dc));
  }
  // [data] is read only where given: a TorchScript or model-file base needs none.
  std::optional<ConditionalExactProblem> problem;
  if (root.has("data")) problem = read_conditional_exact_problem(root, &p.why);
  else p.why = "the config has no [data]";
  if (problem) p.exact = problem->at(condition, &p.why);
  // Without a closed-form target (a reward with none), the problem bound at c still has p_base's density for noising.
  const std::optional<ExactProblem> bound = p.exact ? p.exact : problem ? problem->bound_at(condition) : std::nullopt;
  if (bound) {
    p.reward = bound->reward;
    p.lambda = bound->lambda;
    p.density = bound->base;
  } else {
    p.reward = read_reward(root.section("reward"), p.base->dim(), &p.lambda);
    if (p.reward->condition_dim() > 0 && !condition.defined()) {
      throw Error("[reward] takes a condition of " + std::to_string(p.reward->condition_dim()) +
                  " numbers and none was given: log Z is estimated at one condition (--condition, with a conditional "
                  "[base])");
    }
    if (p.reward->condition_dim() > 0) p.reward = bind_condition(p.reward, condition.reshape({1, -1}));
  }
  if (condition.defined()) {
    // At one condition the problem is an unconditional one: the exact mixture's field at c, or the bound model.
    p.base = p.exact && p.base->kind() == "conditional_gmm"
                 ? std::make_shared<GmmVelocity>(p.exact->base, p.base->schedule())
                 : bind_condition(p.base, condition.reshape({1, -1}).to(at::kFloat));
  }
  finish_config_root(root);
  return p;
}

// The scale of --control optimal[:<scale>].
double control_scale(const std::string& control) {
  if (control.rfind("optimal", 0) != 0) {
    throw Error("--control must be zero, optimal or optimal:<scale>, got '" + control + "'");
  }
  if (control.size() == 7) return 1.0;
  if (control[7] != ':') throw Error("--control: expected optimal:<scale>, got '" + control + "'");
  char* end = nullptr;
  const double scale = std::strtod(control.c_str() + 8, &end);
  if (*end != '\0' || end == control.c_str() + 8) throw Error("--control: '" + control.substr(8) + "' is not a number");
  if (!std::isfinite(scale)) throw Error("--control: the scale must be finite, got " + control.substr(8));
  return scale;
}

// The proposal: a model file, a multiple of the exact optimal control, or the base (zero control).
VelocityFieldPtr read_proposal(const LogzOptions& o, const Problem& p, std::string& name) {
  VelocityFieldPtr proposal = p.base;
  name = "zero control (the base)";
  if (!o.model.empty()) {
    proposal = load_velocity(o.model).field;
    name = o.model;
    if (proposal->condition_dim() > 0) {
      if (o.condition.empty()) throw Error("--model '" + o.model + "' is conditional: give --condition");
      proposal = bind_condition(proposal, parse_condition(o.condition, "--condition").reshape({1, -1}).to(at::kFloat));
    }
  } else if (!o.control.empty() && o.control != "zero") {
    const double scale = control_scale(o.control);
    if (!p.exact) throw Error("--control optimal needs the exact target p*, and this config has none: " + p.why);
    if (p.base->kind() != "gmm") throw Error("--control optimal needs [base] type = \"exact\" (the control is v* - v_base of the exact fields)");
    auto v_star = std::make_shared<GmmVelocity>(p.exact->target, p.base->schedule());
    proposal = std::make_shared<ScaledControlVelocity>(p.base, v_star, scale);
    name = scale == 1.0 ? "exact optimal control u*" : "u* x " + o.control.substr(8);
  }
  if (proposal->dim() != p.base->dim()) {
    throw Error((o.model.empty() ? std::string("the proposal") : "--model '" + o.model + "'") + " has dimension " +
                std::to_string(proposal->dim()) + ", the base " + std::to_string(p.base->dim()));
  }
  return proposal;
}

NoiseSchedulePtr read_noise(const LogzOptions& o) {
  const std::string spec =
      with_step_offset(o.noise.empty() ? (o.method == "jarzynski" ? "constant:1" : "memoryless") : o.noise, o.steps, "--steps");
  NoiseSchedulePtr noise;
  try {
    noise = parse_noise_schedule(spec);
  } catch (const Error& e) {
    throw Error(std::string("--noise: ") + e.what());
  }
  if (noise->is_memoryless() && noise->h() > kLargeMemorylessOffset) {
    warning("--noise " + spec + ": an offset h above " + number_string(kLargeMemorylessOffset) +
            " is far from memoryless near t = 0 (the default is one step, h = 1/steps)");
  }
  // Jarzynski's escorted dynamics need no path density (README's table has its sigma = 0 row); the others do.
  if (noise->is_zero() && o.method != "jarzynski") {
    throw Error("--noise " + spec + ": the ODE has no path density; " + o.method +
                " weights need a stochastic schedule (--method jarzynski takes the ODE)");
  }
  return noise;
}

Integrator read_integrator(const std::string& name) {
  Integrator integrator;
  try {
    integrator = parse_integrator(name);
  } catch (const Error& e) {
    throw Error(std::string("--integrator: ") + e.what());
  }
  if (integrator == Integrator::heun) {
    throw Error("--integrator heun: a deterministic step has no path density; use euler or exact");
  }
  return integrator;
}

}  // namespace

void check_log_z_options(const LogzOptions& o) {
  check_in_range("--n", o.n, 2, limits::kSamples);
  check_in_range("--steps", o.steps, 1, limits::kSteps);
  check_in_range("--batch", o.batch, 1, limits::kBatch);
  if (o.method != "girsanov" && o.method != "noising" && o.method != "jarzynski") {
    throw Error("--method must be girsanov, noising or jarzynski, got '" + o.method + "'");
  }
  if (!o.model.empty() && !o.control.empty()) throw Error("give --model or --control, not both");
}

namespace {

Json summary_json(const LogzOptions& o, const std::string& proposal, const NoiseSchedule& noise, const Problem& p,
                  const WeightSummary& s) {
  Json out;
  out["method"] = o.method;
  out["proposal"] = proposal;
  out["noise"] = noise.describe();
  out["integrator"] = o.integrator;
  out["steps"] = o.steps;
  out["lambda"] = p.lambda;
  out["n"] = s.n;
  out["log_z"] = s.log_z;
  out["log_z_standard_error"] = s.standard_error;
  out["ess"] = s.ess;
  out["ess_fraction"] = s.ess_fraction;
  out["mean_reward"] = s.mean_reward;
  out["weighted_mean_reward"] = s.weighted_mean_reward;
  if (p.exact) {
    out["exact_log_z"] = p.exact->log_z;
    out["z_score"] = s.standard_error > 0 ? (s.log_z - p.exact->log_z) / s.standard_error : 0.0;
  }
  // The standard error is the Monte Carlo one only: a girsanov z_score of +18 at 100 steps (a 3-D mixture) was
  // this bias, not noise, and the JSON did not say so.
  if (o.method == "girsanov") {
    out["bias"] = "Girsanov weights are exact for the discretised base chain, whose law at t = 1 is p_base only up "
                  "to O(1/steps): log Z carries that bias, which the standard error and z_score leave out; --method "
                  "noising is unbiased for the exact log Z at any step count";
  } else if (o.method == "jarzynski") {
    // An outside check on a 1-D mixture: -0.20, -0.11, -0.05, -0.026 at 25, 50, 100, 200 steps (z = -5 at 100).
    out["bias"] = "the Jarzynski work is summed over Euler steps: log Z carries an O(1/steps) bias, which the "
                  "standard error and z_score leave out (more --steps shrink it); --method noising is unbiased for "
                  "the exact log Z at any step count";
  }
  return out;
}

}  // namespace

Json estimate_log_z(Config& config, const LogzOptions& o) {
  check_log_z_options(o);
  const Problem p = read_problem(config, o.condition.empty() ? Tensor() : parse_condition(o.condition, "--condition"));
  std::string proposal_name;
  const VelocityFieldPtr proposal = read_proposal(o, p, proposal_name);
  const NoiseSchedulePtr noise = read_noise(o);
  ImportanceOptions opts;
  opts.integrator = read_integrator(o.integrator);
  opts.batch = o.batch;
  ProgressBar bar("logz", o.n, 0, !o.quiet);
  opts.progress = [&bar](int64_t done, int64_t) { bar.update(done); };
  Generator gen = make_generator(mix_seed(p.seed, 41));
  const TimeGrid grid = TimeGrid::uniform(o.steps);
  const GenerativeSDE base(p.base, noise);
  WeightedPaths paths;
  if (o.method == "girsanov") {
    paths = girsanov_weights(base, *proposal, *p.reward, p.lambda, o.n, grid, gen, opts);
  } else if (o.method == "noising") {
    if (!p.density) throw Error("--method noising needs the base's density: [data] must be a Gaussian mixture (" + p.why + ")");
    const auto density = p.density;
    paths = noising_weights(GenerativeSDE(proposal, noise), [density](const Tensor& x) { return density->log_prob(x); },
                            *p.reward, p.lambda, o.n, grid, gen, opts);
  } else {
    if (!o.model.empty() || (!o.control.empty() && o.control != "zero")) {
      throw Error("--method jarzynski runs the escorted base dynamics; it takes no --model or --control");
    }
    proposal_name = "escorted base dynamics";
    paths = jarzynski_weights(base, *p.reward, p.lambda, o.n, grid, gen, opts);
  }
  bar.finish();
  const WeightSummary summary = summarize_weights(paths);
  Json out = summary_json(o, proposal_name, *noise, p, summary);
  // With a few paths holding the weight, the mean of w is itself a rare event: the estimate is low and its delta-method
  // standard error small and meaningless (noising with a proposal's noise far from its kernels, the memoryless ones,
  // gave ESS 2 of 3000 and log Z 110 standard errors off).
  if (summary.ess_fraction < 0.01) {
    out["warning"] = "ESS is " + format_number(100.0 * summary.ess_fraction, "%.2g") + "% of n: a few paths hold " +
                     "the weight, so log Z is biased low and its standard error is not to be trusted; use a proposal " +
                     "closer to p* (a fine-tuned model, --control optimal)" +
                     (o.method == "noising" && !noise->is_memoryless()
                          ? std::string(", or memoryless noise, whose steps match the noising chain's kernels")
                          : std::string()) +
                     ", or more paths";
    warning("logz: " + out["warning"].get<std::string>());
  }
  return out;
}

std::string log_z_text(const Json& r) {
  std::string out;
  char line[512];
  const auto add = [&](int written) { out += std::string(line, static_cast<size_t>(std::min<int>(written, sizeof line - 1))); };
  const std::string method = r["method"].get<std::string>();
  add(std::snprintf(line, sizeof line, "%s weights of %s (%s, %s, %lld steps), n = %lld, lambda = %g\n", method.c_str(),
                    r["proposal"].get<std::string>().c_str(), r["noise"].get<std::string>().c_str(),
                    r["integrator"].get<std::string>().c_str(), static_cast<long long>(r["steps"].get<int64_t>()),
                    static_cast<long long>(r["n"].get<int64_t>()), r["lambda"].get<double>()));
  add(std::snprintf(line, sizeof line, "  log Z         %.4f ± %.4f (one standard error, delta method)\n",
                    r["log_z"].get<double>(), r["log_z_standard_error"].get<double>()));
  if (r.contains("exact_log_z")) {
    add(std::snprintf(line, sizeof line, "  exact log Z   %.4f  (estimate off by %.2f standard errors)\n",
                      r["exact_log_z"].get<double>(), r["z_score"].get<double>()));
  }
  add(std::snprintf(line, sizeof line, "  ESS           %.1f (%.1f%% of n)\n", r["ess"].get<double>(),
                    100.0 * r["ess_fraction"].get<double>()));
  add(std::snprintf(line, sizeof line, "  mean reward   %.4f as drawn, %.4f reweighted (an estimate of E_p*[r])\n",
                    r["mean_reward"].get<double>(), r["weighted_mean_reward"].get<double>()));
  if (r.contains("bias")) out += "  (" + r["bias"].get<std::string>() + ")\n";
  return out;
}

}  // namespace tilt
