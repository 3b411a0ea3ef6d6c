#include "tilt/io/sample_sets.h"

#include "conditional_eval.h"
#include "../train/autocast.h"

#include "tilt/core/check.h"
#include "tilt/core/error.h"
#include "tilt/core/fs.h"
#include "tilt/core/log.h"
#include "tilt/core/progress.h"
#include "tilt/eval/metrics.h"
#include "tilt/io/builders.h"
#include "tilt/io/model_io.h"
#include "tilt/io/plot.h"
#include "tilt/io/run.h"
#include "tilt/io/sampling_run.h"
#include "tilt/io/samples.h"
#include "tilt/model/condition.h"
#include "tilt/sde/sampler.h"
#include "tilt/train/trainer.h"  // parse_precision

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <sstream>

namespace tilt {
namespace {

// tilt eval shows its progress on a file from this many samples on (a distance takes a second or more there).
constexpr int64_t kProgressSamples = 4000;

std::vector<plot::Point> first_two_coordinates(const Tensor& x) {
  const Tensor xy = x.to(at::kFloat).contiguous();
  std::vector<plot::Point> out(static_cast<size_t>(xy.size(0)));
  const float* p = xy.data_ptr<float>();
  const int64_t d = xy.size(1);
  for (int64_t i = 0; i < xy.size(0); ++i) out[i] = {p[i * d], d > 1 ? p[i * d + 1] : 0.0f};
  return out;
}

// The conditions of --condition / --conditions ([N, dc] float64), undefined when neither is given.
Tensor read_draw_conditions(const DrawOptions& o) {
  if (!o.condition.empty() && !o.conditions.empty()) throw Error("give --condition or --conditions, not both");
  if (!o.conditions.empty()) {
    return check_conditions(read_samples_csv(o.conditions, nullptr, "conditions file").to(at::kDouble),
                            "--conditions '" + o.conditions + "'");
  }
  if (o.condition.empty()) return Tensor();
  return parse_condition(o.condition, "--condition").reshape({1, -1});
}

// n samples at each condition (one draw with none), condition i from its own generator; draw(c, gen) draws
// at one condition ([1, dc], undefined for none).
DrawnSamples draw_per_condition(const Tensor& conditions, int64_t n, uint64_t stream,
                                const std::function<Tensor(const Tensor&, Generator&)>& draw) {
  DrawnSamples d;
  if (!conditions.defined()) {
    Generator gen = make_generator(stream);
    d.x = draw(Tensor(), gen);
    return d;
  }
  if (conditions.size(0) * n > limits::kSamples) {
    throw Error("--n " + std::to_string(n) + " at each of " + std::to_string(conditions.size(0)) + " conditions is more than " +
                std::to_string(limits::kSamples) + " samples");
  }
  std::vector<Tensor> xs, cs;
  for (int64_t i = 0; i < conditions.size(0); ++i) {
    Generator gen = make_generator(conditions.size(0) == 1 ? stream : mix_seed(stream, static_cast<uint64_t>(i)));
    const Tensor c = conditions.narrow(0, i, 1);
    xs.push_back(draw(c, gen));
    cs.push_back(c.expand({n, c.size(1)}));
  }
  d.x = at::cat(xs);
  d.c = at::cat(cs);
  return d;
}

DrawnSamples draw_exact(const DrawOptions& o) {
  if (o.exact != "base" && o.exact != "target") throw Error("--exact must be 'base' or 'target'");
  if (o.config.empty()) throw Error("--exact needs --config (-c): the config whose base and target to sample");
  if (o.guidance != 0.0) throw Error("--guidance applies to a model's samples, not to exact ones");
  // The sampler's options have nothing to act on: exact samples come from the closed form, all at once.
  const std::pair<bool, const char*> sampler_options[] = {{!o.noise.empty(), "--noise"}, {o.steps.has_value(), "--steps"},
                                                          {o.integrator != "auto", "--integrator"}, {o.batch != 0, "--batch"},
                                                          {o.precision != "float32", "--precision"}};
  for (const auto& [given, flag] : sampler_options) {
    if (given) throw Error(std::string(flag) + " applies to a model's samples; exact ones are drawn from the closed form");
  }
  Config config(o.config, o.set);
  ConfigSection root = config.root();
  const RunSettings settings = read_run_settings(root);
  std::string why;
  const auto problem = read_conditional_exact_problem(root, &why);
  if (!problem) throw Error("no exact " + o.exact + " for this config: " + why);
  finish_config_root(root);
  const Tensor conditions = read_draw_conditions(o);
  if (problem->condition_dim() > 0 && !conditions.defined()) {
    throw Error("the config's problem is conditional: give --condition or --conditions (docs/conditions.md)");
  }
  DrawnSamples d = draw_per_condition(conditions, o.n, mix_seed(settings.seed, 17), [&](const Tensor& c, Generator& gen) {
    auto exact = problem->at(c.defined() ? c[0] : c, &why);
    if (!exact) throw Error("no exact " + o.exact + " for this config: " + why);
    return (o.exact == "base" ? exact->base : exact->target)->sample(o.n, gen);
  });
  d.what = "exact " + o.exact + " samples";
  return d;
}

NoiseSchedulePtr model_noise(const DrawOptions& o, const LoadedModel& m, int64_t steps) {
  // The paper's offset h = 1/K goes with the number of steps.
  const std::string spec =
      with_step_offset(o.noise.empty() ? m.info.value("noise", std::string("memoryless")) : o.noise, steps, "--steps");
  NoiseSchedulePtr noise;
  try {
    noise = parse_noise_schedule(spec);
  } catch (const Error& e) {
    throw Error(o.noise.empty() ? "the noise schedule " + o.model + " was fine-tuned with: " + e.what() + "; give --noise"
                                : std::string("--noise: ") + e.what());
  }
  if (noise->is_memoryless() && noise->h() > kLargeMemorylessOffset) {
    warning((o.noise.empty() ? "the model's noise schedule " : "--noise ") + spec + ": an offset h above " +
            number_string(kLargeMemorylessOffset) + " is far from memoryless near t = 0 (the default is one step, h = 1/steps)");
  }
  return noise;
}

// An Adjoint Sampling control (tilt adjoint-sampling's model.pt): its Brownian base with the learned drift
// g(t)^2 u(x, t), on the nu grid (the run's evaluation default), batch paths at a time.
DrawnSamples draw_from_adjoint_sampler(const DrawOptions& o) {
  const std::string name = "model file '" + o.model + "' (an Adjoint Sampling control)";
  if (!o.noise.empty() && o.noise != "brownian") {
    throw Error("--noise: " + name + " is sampled with the Brownian base it was trained with; no --noise");
  }
  if (o.integrator != "auto" && o.integrator != "euler") {
    throw Error("--integrator " + o.integrator + ": " + name + " is sampled by the Euler-Maruyama steps it was trained with");
  }
  if (!o.condition.empty() || !o.conditions.empty() || o.guidance != 0.0) {
    throw Error(name + " is unconditional: it takes no --condition, --conditions or --guidance");
  }
  if (!run_device().is_cpu()) throw Error(name + " samples on the CPU only; drop --device");
  const sampling::LoadedAdjointSampler loaded = sampling::load_adjoint_sampling_control(o.model);
  const int64_t steps = o.steps.value_or(100);
  const int64_t batch = o.batch > 0 ? o.batch : o.n;
  ProgressBar bar("sample", o.n, 0, o.progress);
  bar.set_delay(2.0);
  Generator gen = make_generator(mix_seed(static_cast<uint64_t>(o.seed), 17));
  at::NoGradGuard no_grad;
  const sampling::SamplerPaths paths = sampling::simulate(*loaded.sampler.base, loaded.sampler.control.get(), o.n, steps, gen,
                                                          sampling::SamplerGrid::nu, batch,
                                                          [&](int64_t done, int64_t) { bar.update(done); });
  bar.finish();
  DrawnSamples d;
  d.x = paths.x1;
  d.what = "samples of " + o.model + " (Adjoint Sampling control of energy '" + loaded.energy + "'), " +
           std::to_string(steps) + " steps";
  return d;
}

DrawnSamples draw_from_model(const DrawOptions& o) {
  set_threads(o.threads);
  if (sampling::is_adjoint_sampling_control(o.model)) return draw_from_adjoint_sampler(o);
  const LoadedModel m = load_velocity(o.model);
  m.field->to(run_device());  // --device (docs/devices.md); the samples come back to the CPU
  if (m.info.value("trained_by", std::string()) == "tilt adjoint-sampling") {  // a velocity-kind file from a run
    throw Error("model file '" + o.model + "' is an Adjoint Sampling control, not a velocity field: its samples "
                "come from tilt adjoint-sampling (samples.csv of its run)");
  }
  const int64_t steps = o.steps.value_or(100);
  const NoiseSchedulePtr noise = model_noise(o, m, steps);
  SampleOptions opts;
  try {
    opts.integrator = o.integrator == "auto" ? (noise->is_zero() ? Integrator::heun : Integrator::euler)
                                             : parse_integrator(o.integrator);
  } catch (const Error& e) {
    throw Error(std::string("--integrator: ") + e.what());
  }
  if (opts.integrator == Integrator::heun && !noise->is_zero()) {
    throw Error("--integrator heun is for the ODE only (--noise ode); the noise schedule is " + noise->describe());
  }
  bool bfloat16 = false;
  try {
    bfloat16 = parse_precision(o.precision) == Precision::bfloat16;
  } catch (const Error& e) {
    throw Error(std::string("--precision: ") + e.what());
  }
  Tensor conditions = read_draw_conditions(o);
  if (m.field->condition_dim() > 0 && !conditions.defined()) {
    if (!m.conditions.defined() || m.info.value("conditions_law", std::string()) == "uniform") {
      throw Error("model file '" + o.model + "' is conditional (a condition of " + std::to_string(m.field->condition_dim()) +
                  " numbers) and records no training conditions to draw at" +
                  (m.conditions.defined() ? std::string(" (it was trained on a uniform box)") : std::string()) +
                  ": give --condition or --conditions (docs/conditions.md)");
    }
    conditions = m.conditions;  // its training conditions
    note("no --condition given: drawing at each of the " + std::to_string(conditions.size(0)) +
         " training conditions model file '" + o.model + "' records");
  }
  if (m.field->condition_dim() == 0 && (conditions.defined() || o.guidance != 0.0)) {
    throw Error("model file '" + o.model + "' is unconditional: it takes no --condition, --conditions or --guidance");
  }
  if (conditions.defined() && conditions.size(1) != m.field->condition_dim()) {
    throw Error(std::string(o.condition.empty() ? "--conditions" : "--condition") + " gives conditions of " +
                std::to_string(conditions.size(1)) + " numbers, but model file '" + o.model + "' takes " +
                std::to_string(m.field->condition_dim()));
  }
  const int64_t batch = o.batch > 0 ? std::min(o.batch, o.n) : o.n, batches = (o.n + batch - 1) / batch;
  ProgressBar bar("sample", (conditions.defined() ? conditions.size(0) : 1) * batches * steps, 0, o.progress);
  bar.set_delay(2.0);
  int64_t steps_done = 0;
  opts.on_step = [&](int64_t) { bar.update(++steps_done); };
  DrawnSamples d = draw_per_condition(conditions, o.n, mix_seed(static_cast<uint64_t>(o.seed), 17), [&](const Tensor& c, Generator& gen) {
    const VelocityFieldPtr field = bind_condition(m.field, c.defined() ? c.to(run_device(), at::kFloat) : c, o.guidance);
    const GenerativeSDE sde(field, noise);
    const AutocastScope autocast(run_device(), bfloat16);
    std::vector<Tensor> parts;
    for (int64_t i = 0; i < o.n; i += batch) {
      parts.push_back(sample(sde, std::min(batch, o.n - i), TimeGrid::uniform(steps), gen, opts).cpu());
    }
    return at::cat(parts);
  });
  bar.finish();
  d.what = "samples of " + o.model + " with " + noise->describe() + ", " + std::to_string(steps) + " steps" +
           (o.guidance != 0.0 ? ", guidance w = " + number_string(o.guidance) : std::string()) +
           (bfloat16 ? ", bfloat16 autocast" : "");
  return d;
}

}  // namespace

DrawnSamples draw_samples(const DrawOptions& o) {
  check_in_range("--n", o.n, 1, limits::kSamples);
  if (o.steps) check_in_range("--steps", *o.steps, 1, limits::kSteps);  // -7 silently meant 100
  if (o.seed < 0) throw Error("--seed must be >= 0");
  check_in_range("--batch", o.batch, 0, limits::kSamples);
  if (!std::isfinite(o.guidance)) throw Error("--guidance must be a finite number, got " + number_string(o.guidance));
  if (o.model.empty() == o.exact.empty()) throw Error("give either --model FILE, or --exact base|target with --config");
  // A model file carries what its samples need; a config given with it was read by nothing (its seed neither).
  if (!o.model.empty() && (!o.config.empty() || !o.set.empty())) {
    throw Error(std::string(o.config.empty() ? "--set" : "--config") +
                " is read by --exact only: a model file's samples take their settings from the file and the flags "
                "(--seed, --noise, --steps, ...)");
  }
  return o.exact.empty() ? draw_from_model(o) : draw_exact(o);
}

DrawnSamples write_samples(const DrawOptions& o) {
  if (o.out.empty()) throw Error("--out is required: the CSV file for the samples");
  refuse_output_over_input("--out", o.out,
                           {{"--model", o.model}, {"--config", o.config}, {"--png", o.png}, {"--conditions", o.conditions}});
  if (!o.png.empty()) {
    refuse_output_over_input("--png", o.png, {{"--model", o.model}, {"--config", o.config}, {"--conditions", o.conditions}});
  }
  DrawnSamples d = draw_samples(o);
  // A NaN row is never written with success: a model whose velocity is finite at the points
  // load_velocity probes can still be non-finite elsewhere on the path.
  const int64_t bad = (~d.x.isfinite()).any(1).sum().item<int64_t>();
  if (bad > 0) {
    throw Error((o.model.empty() ? d.what : "model file '" + o.model + "'") + " gave " + std::to_string(bad) + " of " +
                std::to_string(o.n) + " samples with NaN or Inf values; nothing was written to " + o.out +
                " (the model's velocity is not finite somewhere on the sampling path: its weights are damaged, or too large)");
  }
  write_samples_csv(o.out, d.x, d.c);
  if (!o.png.empty()) plot::write_scatter_png(o.png, {{d.what, first_two_coordinates(d.x)}});
  return d;
}

namespace {

// What tilt eval measures against: the exact target, or reference samples; and the reward.
struct Target {
  std::optional<ExactProblem> exact;
  Tensor reference;
  RewardPtr reward;
  double lambda = 1.0;
  uint64_t seed = 0;
};

Target read_target(Config& config, const EvalOptions& o) {
  ConfigSection root = config.root();
  Target t;
  t.seed = read_run_settings(root).seed;
  std::string why;
  t.exact = read_exact_problem(root, &why);
  if (t.exact) {
    t.reward = t.exact->reward;
    t.lambda = t.exact->lambda;
  } else if (root.has("reward") && root.has("data")) {
    auto mixture = read_data_mixture(root);
    if (mixture) t.reward = read_reward(root.section("reward"), mixture->dim(), &t.lambda);
  }
  finish_config_root(root);
  if (!t.exact) {
    if (o.reference.empty()) throw Error("no exact target for this config (" + why + "); give --reference FILE");
    t.reference = read_samples_csv(o.reference, nullptr, "reference samples file");
  } else if (!o.reference.empty()) {
    throw Error("--reference '" + o.reference + "': the config has an exact target, which eval measures against; " +
                "drop --reference, or give a config without one");
  }
  return t;
}

// Fresh target samples: from the exact target, or drawn without replacement from the reference.
Tensor target_sample(const Target& t, int64_t n, Generator& gen) {
  if (t.exact) return t.exact->target->sample(n, gen);
  const Tensor idx = at::randperm(t.reference.size(0), gen, at::TensorOptions().dtype(at::kLong)).slice(0, 0, n);
  return t.reference.index_select(0, idx);
}

// The target sets of one sample size n, shared by every file of that size: `replicates` fresh sets with their
// own terms, and the noise floor (docs/equations.md, E78 and E108) from those terms.
struct TargetSets {
  std::vector<Tensor> y;
  std::vector<SampleSelfTerms> self;
  SampleDistances floor{0, 0};
};

TargetSets draw_target_sets(const Target& t, int64_t n, const EvalOptions& o, const std::vector<double>& bandwidths,
                            Generator& gen, ProgressBar& bar, int64_t& done) {
  TargetSets s;
  const double R = static_cast<double>(o.replicates);
  for (int64_t r = 0; r < o.replicates; ++r) {
    s.y.push_back(target_sample(t, n, gen));
    s.self.push_back(sample_self_terms(s.y.back(), bandwidths));
    const SampleDistances f = noise_floor(s.self.back(), n);
    s.floor.energy += f.energy / R;
    s.floor.mmd += f.mmd / R;
    bar.update(++done, "target sets");
  }
  return s;
}

// Each file's rows, or --max-n of them, drawn without replacement from a generator of its own (the same rows
// whatever the other files).
Tensor read_eval_samples(const std::string& path, const EvalOptions& o, uint64_t seed, int64_t& file_rows) {
  Tensor conditions;
  const Tensor x = read_samples_csv(path, &conditions);
  if (conditions.defined()) {  // pooled, they would be measured against one unconditional target
    throw Error("samples file '" + path + "' holds conditions (its columns c0, ...), but the config's problem is " +
                "unconditional: give the conditional config its model was trained on");
  }
  file_rows = x.size(0);
  if (!o.max_n || x.size(0) <= *o.max_n) return x;
  Generator gen = make_generator(mix_seed(seed, 31));
  const Tensor idx = at::randperm(x.size(0), gen, at::TensorOptions().dtype(at::kLong)).slice(0, 0, *o.max_n);
  return x.index_select(0, idx);
}

// The distances of one samples file, each averaged over `replicates` target sets of its size; those sets, their
// own terms and the floor are drawn and computed once per size, for every file of that size, and the file's own
// terms once for all of them. Unbiased as before: each set is independent of the file.
Json evaluate_file(const Target& t, const std::string& path, const EvalOptions& o, const std::vector<double>& bandwidths,
                   std::map<int64_t, TargetSets>& targets, Generator& gen) {
  int64_t file_rows = 0;
  const Tensor x = read_eval_samples(path, o, t.seed, file_rows);
  const int64_t n = x.size(0);
  const int64_t dim = t.exact ? t.exact->target->dim() : t.reference.size(1);
  if (x.size(1) != dim) {
    throw Error("samples file '" + path + "' has dimension " + std::to_string(x.size(1)) + ", the target has " +
                std::to_string(dim));
  }
  if (n < 2) throw Error("samples file '" + path + "' has 1 sample: the noise floor needs at least 2 of the same size");
  if (!t.exact && 2 * n > t.reference.size(0)) {
    throw Error("--reference needs at least 2n = " + std::to_string(2 * n) + " samples to estimate the noise floor");
  }
  const double R = static_cast<double>(o.replicates);
  // Each distance is O(n^2): from a few thousand samples on, one takes a second or more, so the work shows
  // its progress.
  const bool new_size = !targets.count(n);
  ProgressBar bar("eval " + path, (new_size ? 2 : 1) * o.replicates + 1, 0, o.progress && n >= kProgressSamples);
  int64_t done = 0;
  if (new_size) targets[n] = draw_target_sets(t, n, o, bandwidths, gen, bar, done);
  const TargetSets& ys = targets.at(n);
  const SampleSelfTerms x_self = sample_self_terms(x, bandwidths);  // the file's own pairs, once for every set
  bar.update(++done, "own pairs");
  double ed = 0, mm = 0;
  for (int64_t r = 0; r < o.replicates; ++r) {
    const SampleDistances d = sample_distances(x, ys.y[r], x_self, ys.self[r]);
    ed += d.energy / R;
    mm += d.mmd / R;
    bar.update(++done, "distances");
  }
  bar.finish();
  Json s{{"n", n}, {"file_rows", file_rows}, {"energy_distance", ed}, {"energy_distance_noise_floor", ys.floor.energy},
         {"energy_distance_ratio", ed / ys.floor.energy}, {"mmd", mm}, {"mmd_noise_floor", ys.floor.mmd},
         {"mmd_ratio", mm / ys.floor.mmd}};
  if (t.reward) {
    const RewardStats rs = reward_stats(*t.reward, x);
    s["mean_reward"] = rs.mean;
    s["mean_reward_se"] = rs.standard_error;
  }
  return s;
}

}  // namespace

void check_eval_options(const EvalOptions& o) {
  if (o.samples.empty()) throw Error("give at least one --samples FILE");
  check_in_range("--replicates", o.replicates, 1, 1000);
  if (o.max_n) check_in_range("--max-n", *o.max_n, 2, limits::kSamples);
}

Json evaluate_sample_files(Config& config, const EvalOptions& o) {
  check_eval_options(o);
  if (!o.condition.empty() && !config_is_conditional(config)) {
    throw Error("--condition: the config's data and reward take no condition");
  }
  if (config_is_conditional(config)) {
    if (!o.reference.empty()) throw Error("--reference: the config's problem is conditional and has an exact target at every condition");
    if (o.max_n) throw Error("--max-n: not for a conditional config (each condition's group of samples is scored whole)");
    return evaluate_conditional_sample_files(config, o.samples, o.replicates,
                                             o.condition.empty() ? Tensor() : parse_condition(o.condition, "--condition"));
  }
  const Target t = read_target(config, o);
  Generator gen = make_generator(mix_seed(t.seed, 29));
  Json out;
  out["target"]["kind"] = t.exact ? "exact" : "reference";
  if (t.exact) {
    out["target"]["log_z"] = t.exact->log_z;
    out["target"]["lambda"] = t.lambda;
    out["target"]["mean_reward"] = reward_stats(*t.reward, t.exact->target->sample(100000, gen)).mean;
    out["base"]["mean_reward"] = reward_stats(*t.reward, t.exact->base->sample(100000, gen)).mean;
  } else {
    out["target"]["path"] = o.reference;
  }
  // Kernel bandwidths fixed once, from the target, so that every MMD below is comparable.
  const std::vector<double> bandwidths = median_bandwidths(target_sample(t, 2000, gen));
  out["mmd_bandwidths"] = bandwidths;
  if (o.max_n) out["max_n"] = *o.max_n;
  std::map<int64_t, TargetSets> targets;
  for (const std::string& path : o.samples) out["samples"][path] = evaluate_file(t, path, o, bandwidths, targets, gen);
  return out;
}

std::string evaluation_text(const Json& r, const EvalOptions& o) {
  if (r["target"]["kind"] == "exact_conditional") return conditional_evaluation_text(r, o.samples, o.replicates);
  std::string out;
  char line[1024];
  const auto add = [&](int n) { out += std::string(line, static_cast<size_t>(std::min<int>(n, sizeof line - 1))); };
  const bool exact = r["target"]["kind"] == "exact";
  out += "target: " + (exact ? std::string("exact p* ∝ p_base exp(lambda r)") : "reference " + o.reference);
  if (exact) {
    add(std::snprintf(line, sizeof line, " (lambda = %g, log Z = %.4f, mean reward %.4f; base mean reward %.4f)",
                      r["target"]["lambda"].get<double>(), r["target"]["log_z"].get<double>(),
                      r["target"]["mean_reward"].get<double>(), r["base"]["mean_reward"].get<double>()));
  }
  add(std::snprintf(line, sizeof line, "\n%-40s %7s %12s %12s %8s %12s %14s\n", "samples", "n", "energy dist",
                    "noise floor", "ratio", "MMD", "mean reward"));
  for (const std::string& path : o.samples) {
    const Json& s = r["samples"][path];
    add(std::snprintf(line, sizeof line, "%-40s %7lld %12.3e %12.3e %8.2f %12.3e", path.c_str(),
                      static_cast<long long>(s["n"].get<int64_t>()), s["energy_distance"].get<double>(),
                      s["energy_distance_noise_floor"].get<double>(), s["energy_distance_ratio"].get<double>(),
                      s["mmd"].get<double>()));
    if (s.contains("mean_reward")) {
      add(std::snprintf(line, sizeof line, " %8.4f±%.4f", s["mean_reward"].get<double>(), s["mean_reward_se"].get<double>()));
    }
    out += "\n";
  }
  add(std::snprintf(line, sizeof line,
                    "(energy distance and MMD averaged over %lld fresh target sets of the same size; the noise floor is "
                    "the expected distance between two independent target sets of that size, from the same sets' own "
                    "pairs)\n",
                    static_cast<long long>(o.replicates)));
  if (o.max_n) {
    add(std::snprintf(line, sizeof line,
                      "(--max-n %lld: files of more rows are scored on %lld of them drawn at random (seeded), and the "
                      "noise floor is then that of %lld samples)\n",
                      static_cast<long long>(*o.max_n), static_cast<long long>(*o.max_n),
                      static_cast<long long>(*o.max_n)));
  }
  return out;
}


namespace {

struct Panel {
  std::string path, title;
  Tensor x;
  Tensor conditions;  ///< [n, dc] float64, or undefined
};

// --by-condition K: each panel's images as one row per condition, the conditions in the order they first
// appear over all panels (so that the rows of every panel are the same conditions), the first K samples
// of each; a condition with fewer than K in a panel is padded with blank images (lo, drawn white).
std::vector<std::vector<float>> by_condition(const std::vector<Panel>& inputs, int k, float blank) {
  std::map<std::vector<double>, int64_t> order;  // condition -> its row
  for (const Panel& in : inputs) {
    if (!in.conditions.defined()) {
      throw Error("--by-condition: '" + in.path + "' has no condition columns (c0, c1, ...): give samples of a "
                  "conditional model (tilt sample -m MODEL)");
    }
  }
  std::vector<std::vector<std::vector<int64_t>>> rows(inputs.size());  // per panel, per row: the samples drawn
  for (size_t p = 0; p < inputs.size(); ++p) {
    const Tensor c = inputs[p].conditions.to(at::kDouble).contiguous();
    const double* v = c.data_ptr<double>();
    for (int64_t i = 0; i < c.size(0); ++i) {
      const std::vector<double> key(v + i * c.size(1), v + (i + 1) * c.size(1));
      const int64_t row = order.emplace(key, static_cast<int64_t>(order.size())).first->second;
      if (static_cast<int64_t>(rows[p].size()) <= row) rows[p].resize(row + 1);
      if (static_cast<int64_t>(rows[p][row].size()) < k) rows[p][row].push_back(i);
    }
  }
  if (static_cast<double>(order.size()) * k > 100000) {
    throw Error("--by-condition: " + std::to_string(order.size()) + " conditions x " + std::to_string(k) +
                " images is too many to draw (at most 100000)");
  }
  std::vector<std::vector<float>> pixels;
  for (size_t p = 0; p < inputs.size(); ++p) {
    const Tensor x = inputs[p].x.to(at::kFloat).contiguous();
    const int64_t d = x.size(1);
    std::vector<float> out(order.size() * k * d, blank);
    for (size_t row = 0; row < rows[p].size(); ++row) {
      for (size_t j = 0; j < rows[p][row].size(); ++j) {
        const float* src = x.data_ptr<float>() + rows[p][row][j] * d;
        std::copy(src, src + d, out.begin() + static_cast<int64_t>(row * k + j) * d);
      }
    }
    pixels.push_back(std::move(out));
  }
  return pixels;
}

// Each sample as an image of h x w pixels, one grid per file.
void plot_images(const PlotOptions& o, const std::vector<Panel>& inputs) {
  int h = 0, w = 0;
  char extra = 0;
  if (std::sscanf(o.images.c_str(), "%dx%d%c", &h, &w, &extra) != 2 || h < 1 || w < 1) {
    throw Error("--images must be HxW, e.g. 8x8; got '" + o.images + "'");
  }
  for (const Panel& in : inputs) {
    if (in.x.size(1) != static_cast<int64_t>(h) * w) {
      throw Error("'" + in.path + "' has dimension " + std::to_string(in.x.size(1)) + ", not " + o.images + " = " +
                  std::to_string(h * w) + " pixels");
    }
  }
  plot::ImageGridOptions g;
  std::vector<plot::ImagePanel> grids;
  if (o.by_condition > 0) {
    std::vector<std::vector<float>> pixels = by_condition(inputs, o.by_condition, g.lo);
    for (size_t p = 0; p < inputs.size(); ++p) grids.push_back({inputs[p].title, std::move(pixels[p])});
    g.columns = o.by_condition;
    g.max_images = static_cast<int>(grids[0].pixels.size() / (static_cast<size_t>(h) * w));
  } else {
    for (const Panel& in : inputs) {
      const Tensor x = in.x.to(at::kFloat).contiguous();
      const float* p = x.data_ptr<float>();
      grids.push_back({in.title, std::vector<float>(p, p + x.numel())});
    }
    g.max_images = o.max_images;
  }
  g.height = h;
  g.width = w;
  g.title = o.title;
  g.panel_columns = o.columns;
  plot::write_image_grid_png(o.out, grids, g);
}

}  // namespace

void plot_sample_files(const PlotOptions& o) {
  if (o.out.empty()) throw Error("--out is required: the PNG file to write");
  if (o.panels.empty()) throw Error("give at least one samples file (FILE or FILE:TITLE)");
  check_in_range("--size", o.size, 64, 4096);
  check_in_range("--columns", o.columns, 0, 1000);
  check_in_range("--max-images", o.max_images, 1, 100000);
  check_in_range("--by-condition", o.by_condition, 0, 1000);
  if (o.by_condition > 0 && o.images.empty()) throw Error("--by-condition lays out images: give --images HxW too");
  for (const std::string& spec : o.panels) {
    refuse_output_over_input("--out", o.out, {{"the samples file", spec.substr(0, spec.find(':'))}});
  }
  std::vector<Panel> inputs;
  for (const std::string& spec : o.panels) {
    const auto colon = spec.find(':');
    const std::string path = spec.substr(0, colon);
    Panel in{path, colon == std::string::npos ? path : spec.substr(colon + 1), Tensor(), Tensor()};
    in.x = read_samples_csv(path, o.by_condition > 0 ? &in.conditions : nullptr);
    inputs.push_back(std::move(in));
  }
  if (!o.images.empty()) return plot_images(o, inputs);
  std::vector<plot::Panel> panels;
  for (const Panel& in : inputs) panels.push_back({in.title, first_two_coordinates(in.x)});
  plot::ScatterOptions scatter;
  scatter.title = o.title;
  scatter.columns = o.columns;
  scatter.panel_size = o.size;
  plot::write_scatter_png(o.out, panels, scatter);
}

}  // namespace tilt
