// An Adjoint Sampling run: its configuration, training, evaluation and control file
// (tilt/io/sampling_run.h; docs/adjoint_sampling.md).
#include "tilt/io/sampling_run.h"

#include "archive.h"
#include "model_file.h"

#include "tilt/core/check.h"
#include "tilt/core/error.h"
#include "tilt/core/fs.h"
#include "tilt/core/progress.h"
#include "tilt/eval/metrics.h"
#include "tilt/io/builders.h"
#include "tilt/io/model_io.h"
#include "tilt/io/samples.h"
#include "tilt/io/sampling_config.h"
#include "tilt/model/mlp.h"
#include "tilt/sampling/sample_metrics.h"
#include "tilt/sde/importance.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>  // at::NoGradGuard; not pulled in by ATen.h since LibTorch 2.0

#include <chrono>
#include <cmath>
#include <cstdio>
#include <sstream>

namespace tilt::sampling {

namespace {

// [adjoint_sampling]: the method's keys, the control network's widths and the trainer's keys.
void read_method(ConfigSection& as, AdjointSamplingRunOptions& run) {
  run.method = read_adjoint_sampling(as);
  run.method.tau = run.tau;
  run.hidden = as.integers("hidden", std::vector<int64_t>{128, 128, 128});
  if (run.hidden.empty()) as.fail("hidden", "must list at least one layer width");
  for (int64_t w : run.hidden) {
    if (w < 1 || w > limits::kWidth) as.fail("hidden", "widths must be in 1.." + std::to_string(limits::kWidth) + ", got " + std::to_string(w));
  }
  TrainerOptions defaults;
  defaults.iterations = 2000;
  defaults.adam = {1e-3, 0.9, 0.999, 1e-8, 0.0};
  defaults.grad_clip = 0;  // the adjoint is clipped instead (max_adjoint_norm)
  defaults.checkpoint_every = 500;
  run.trainer = read_trainer(as, defaults);
  if (run.trainer.shards > 1) as.fail("shards", "must be 1: the replay buffer is one process's (no sharded batches)");
  as.finish();
}

SamplerEvaluationOptions read_evaluation(ConfigSection ev, int64_t default_steps) {
  SamplerEvaluationOptions o;
  o.samples = ev.integer("samples", o.samples);
  if (o.samples < 2 || o.samples > limits::kSamples) {
    ev.fail("samples", "must be in 2.." + std::to_string(limits::kSamples) + ", got " + std::to_string(o.samples));
  }
  o.steps = ev.integer("steps", default_steps);
  if (o.steps < 1 || o.steps > limits::kSteps) {
    ev.fail("steps", "must be in 1.." + std::to_string(limits::kSteps) + ", got " + std::to_string(o.steps));
  }
  o.grid = parse_sampler_grid(ev.choice("grid", {"nu", "uniform"}, "nu"));
  o.reference = ev.string("reference", "");
  ev.finish();
  return o;
}

std::string weights_text(const std::vector<double>& w) {
  std::string s;
  for (double v : w) s += (s.empty() ? "" : " / ") + format_number(v, "%.3f");
  return s.empty() ? "-" : s;
}

// The metrics of a sample set against one reference set; the noise floor is the same metric between
// two independent halves of the reference (or a second exact set), so that "at the floor" reads as "as
// close as the reference is to itself".
Json compare(const Energy& energy, const Tensor& x, const Tensor& ref, const Tensor& ref2) {
  Json j;
  j["n_reference"] = ref.size(0);
  j["energy_w2"] = energy_w2(energy, x, ref);
  j["energy_w2_floor"] = energy_w2(energy, ref2, ref);
  if (energy.particles() > 0) {
    j["distance_w2"] = distance_w2(x, ref, energy.particles());
    j["distance_w2_floor"] = distance_w2(ref2, ref, energy.particles());
  } else {
    // Without particles: W2 of the first coordinate's marginal (where the modes of the double well sit).
    j["x0_w2"] = w2_1d(x.select(1, 0), ref.select(1, 0));
    j["x0_w2_floor"] = w2_1d(ref2.select(1, 0), ref.select(1, 0));
  }
  if (energy.modes() > 0) j["mode_weights"] = mode_weights(energy, ref);
  return j;
}

// Against exact samples of the target: two independent sets, the second for the floor.
Json compare_with_exact(const Energy& energy, double tau, const Tensor& x, uint64_t seed, Tensor* exact) {
  Generator egen = make_generator(mix_seed(seed, 8));
  *exact = energy.sample_exact(x.size(0), tau, egen);
  const Tensor exact_b = energy.sample_exact(x.size(0), tau, egen);
  Json e = compare(energy, x, *exact, exact_b);
  // The energy distance in the state space, against its floor: two independent exact sets.
  e["energy_distance"] = energy_distance(x.to(at::kFloat), exact->to(at::kFloat));
  e["energy_distance_floor"] = energy_distance(exact_b.to(at::kFloat), exact->to(at::kFloat));
  return e;
}

// Against reference samples (e.g. MCMC chains); the floor: the chains' second half against the whole.
Json compare_with_reference(const Energy& energy, const Tensor& x, const std::string& reference, const Tensor& exact) {
  const Tensor ref = read_reference_samples(energy, reference);
  const int64_t h = ref.size(0) / 2;
  Json m = compare(energy, x, ref, ref.narrow(0, h, ref.size(0) - h));
  m["floor_note"] = "second half of the reference against the whole";
  m["path"] = reference;
  if (exact.defined()) m["reference_vs_exact_energy_w2"] = energy_w2(energy, ref, exact);
  return m;
}

// The samples' own statistics: log Z by importance weights, ESS, mode weights.
void describe_samples(const Energy& energy, double tau, const Tensor& x, const Tensor& log_w, Json& result) {
  const WeightSummary ws = summarize_log_weights(log_w);
  result["mean_energy"] = energy.energy(x).mean().item<double>();
  Json lz{{"estimate", ws.log_z}, {"standard_error", ws.standard_error}};
  const double exact_log_z = energy.exact_log_z(tau);
  if (std::isfinite(exact_log_z)) {
    lz["exact"] = exact_log_z;
    lz["z_score"] = (ws.log_z - exact_log_z) / ws.standard_error;
  }
  result["log_z"] = lz;
  result["ess_fraction"] = ws.ess_fraction;
  if (energy.modes() > 0) {
    result["mode_weights"] = mode_weights(energy, x);
    result["mode_weights_reweighted"] = mode_weights(energy, x, log_w);
    const auto exact_w = energy.exact_mode_weights(tau);
    if (!exact_w.empty()) result["mode_weights_exact"] = exact_w;
  }
}

// eval.txt's line of one comparison ("vs_exact" or "vs_reference").
std::string comparison_text(const std::string& key, const Json& c) {
  std::ostringstream txt;
  txt << key << ": energy W2 " << format_number(c["energy_w2"].get<double>()) << " (floor " << format_number(c["energy_w2_floor"].get<double>())
      << ")";
  if (c.contains("distance_w2")) {
    txt << ", distance W2 " << format_number(c["distance_w2"].get<double>()) << " (floor " << format_number(c["distance_w2_floor"].get<double>()) << ")";
  }
  if (c.contains("x0_w2")) txt << ", x0 W2 " << format_number(c["x0_w2"].get<double>()) << " (floor " << format_number(c["x0_w2_floor"].get<double>()) << ")";
  if (c.contains("energy_distance")) {
    txt << ", energy distance " << format_number(c["energy_distance"].get<double>()) << " (floor "
        << format_number(c["energy_distance_floor"].get<double>()) << ")";
  }
  if (c.contains("mode_weights")) txt << ", reference modes " << weights_text(c["mode_weights"]);
  txt << "\n";
  return txt.str();
}

}  // namespace

AdjointSamplingRunOptions read_adjoint_sampling_run(ConfigSection& root) {
  AdjointSamplingRunOptions run;
  run.settings = read_run_settings(root);
  run.energy = read_energy(root.section("energy"), &run.tau);
  run.brownian = read_brownian(root.section("brownian", /*optional=*/true));
  ConfigSection as = root.section("adjoint_sampling", /*optional=*/true);
  read_method(as, run);
  run.evaluation = read_evaluation(root.section("evaluation", /*optional=*/true), run.method.steps);
  root.allow({"mcmc"});
  root.finish();
  return run;
}

Tensor read_reference_samples(const Energy& energy, const std::string& reference) {
  const Tensor ref = read_samples_csv(reference).to(at::kDouble);
  if (ref.size(1) != energy.dim()) {
    throw Error("the reference samples '" + reference + "' have dimension " + std::to_string(ref.size(1)) +
                ", the energy " + std::to_string(energy.dim()));
  }
  if (ref.size(0) < 4) throw Error("the reference samples '" + reference + "' hold fewer than 4 samples");
  return ref;
}

void check_reference_input(const std::string& reference, const Energy& energy, const std::string& config_path,
                           const std::string& out) {
  if (reference.empty()) return;
  if (!file_exists(reference)) {
    throw Error("the reference samples '" + reference + "' do not exist (make them with `tilt mcmc -c " + config_path +
                " -o " + reference + "`)");
  }
  for (const char* name : {"samples.csv", "eval.json", "eval.txt", "model.pt", "checkpoint.pt"}) {
    if (same_file(out + "/" + name, reference)) {
      throw Error("--reference '" + reference + "' is " + name + " of the run in --out '" + out +
                  "', which this run writes; copy it elsewhere first");
    }
  }
  read_reference_samples(energy, reference);  // read now: a bad file fails before training, not after it
}

AdjointSampler make_adjoint_sampler(const AdjointSamplingRunOptions& run) {
  if (!run.energy) throw Error("adjoint sampling: the run has no energy");
  AdjointSampler s;
  s.base = std::make_shared<BrownianBase>(run.brownian, run.energy->dim(), run.energy->particles());
  s.control = std::make_shared<soc::ControlNetwork>(run.energy->dim(), 1.0, run.hidden, mix_seed(run.settings.seed, 1),
                                                    /*zero_output=*/true);
  return s;
}

AdjointSamplingTraining train_adjoint_sampler(const AdjointSamplingRunOptions& run, const AdjointSampler& sampler,
                                              const RunDirectory& dir, bool resume, bool quiet) {
  ReciprocalAdjointMatching loss(run.energy, sampler.base, sampler.control, run.method);
  TrainerOptions topt = run.trainer;
  attach_to_run(topt, dir, run.settings, quiet, "adjoint sampling");
  Trainer trainer(loss, topt);
  resume_if_asked(trainer, topt, dir, resume);
  AdjointSamplingTraining out;
  trainer.run([&](const StepResult& r) { out.seconds += r.seconds; });
  out.gradient_steps = loss.gradient_steps();
  out.energy_evaluations = loss.energy_evaluations();
  out.iterations = trainer.iteration();
  return out;
}

SamplerEvaluation evaluate_adjoint_sampler(const AdjointSamplingRunOptions& run, const AdjointSampler& sampler,
                                           const AdjointSamplingTraining& training, bool quiet) {
  const Energy& energy = *run.energy;
  const SamplerEvaluationOptions& o = run.evaluation;
  at::NoGradGuard no_grad;
  Generator gen = make_generator(mix_seed(run.settings.seed, 7));
  const auto t0 = std::chrono::steady_clock::now();
  SamplerPaths paths;
  {
    ProgressBar bar("sampling", o.samples, 0, !quiet);
    paths = simulate(*sampler.base, sampler.control.get(), o.samples, o.steps, gen, o.grid, o.batch,
                     [&](int64_t done, int64_t) { bar.update(done); });
  }
  const double sample_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  SamplerEvaluation out;
  out.samples = paths.x1;
  Json& result = out.result;
  result["energy"] = energy.name();
  result["dim"] = energy.dim();
  result["tau"] = run.tau;
  result["brownian"] = sampler.base->describe();
  result["gradient_steps"] = training.gradient_steps;
  result["energy_evaluations"] = training.energy_evaluations;
  result["energy_evaluations_per_gradient_step"] =
      static_cast<double>(training.energy_evaluations) / static_cast<double>(std::max<int64_t>(training.gradient_steps, 1));
  result["train_seconds_this_session"] = training.seconds;
  result["samples"] = o.samples;
  result["sample_steps"] = o.steps;
  result["sample_seconds"] = sample_seconds;
  describe_samples(energy, run.tau, paths.x1, log_importance_weights(energy, run.tau, *sampler.base, paths), result);
  if (energy.has_exact_samples(run.tau)) {
    result["vs_exact"] = compare_with_exact(energy, run.tau, paths.x1, run.settings.seed, &out.exact);
  }
  if (!o.reference.empty()) result["vs_reference"] = compare_with_reference(energy, paths.x1, o.reference, out.exact);
  return out;
}

std::string evaluation_text(const Json& r) {
  std::ostringstream txt;
  const Json& lz = r["log_z"];
  txt << r["energy"].get<std::string>() << " (d = " << r["dim"].get<int64_t>() << ", tau = " << r["tau"].get<double>()
      << "), Brownian base " << r["brownian"].get<std::string>() << "\n"
      << "gradient steps " << r["gradient_steps"].get<int64_t>() << ", energy evaluations "
      << r["energy_evaluations"].get<int64_t>() << " (" << format_number(r["energy_evaluations_per_gradient_step"].get<double>(), "%.3f")
      << " per step)\n"
      << r["samples"].get<int64_t>() << " samples, " << r["sample_steps"].get<int64_t>() << " steps: mean energy "
      << format_number(r["mean_energy"].get<double>()) << ", log Z " << format_number(lz["estimate"].get<double>()) << " ± "
      << format_number(lz["standard_error"].get<double>(), "%.2g");
  if (lz.contains("exact")) {
    txt << " (exact " << format_number(lz["exact"].get<double>()) << ", z = " << format_number(lz["z_score"].get<double>(), "%.2f") << ")";
  }
  txt << ", ESS/n " << format_number(r["ess_fraction"].get<double>(), "%.3f") << "\n";
  if (r.contains("mode_weights")) {
    txt << "mode weights: samples " << weights_text(r["mode_weights"]) << ", reweighted "
        << weights_text(r["mode_weights_reweighted"]);
    if (r.contains("mode_weights_exact")) txt << ", exact " << weights_text(r["mode_weights_exact"]);
    txt << "\n";
  }
  for (const char* key : {"vs_exact", "vs_reference"}) {
    if (r.contains(key)) txt << comparison_text(key, r[key]);
  }
  return txt.str();
}

Json mcmc_report(const Energy& energy, double tau, const MalaOptions& mala, const MalaResult& r, uint64_t seed,
                 double seconds) {
  Json j{{"energy", energy.name()},       {"tau", tau},
         {"samples", r.samples.size(0)},  {"chains", mala.chains},
         {"steps", mala.steps},           {"burn_in", mala.burn_in},
         {"thin", mala.thin},             {"temperatures", mala.temperatures.empty() ? std::vector<double>{1.0} : mala.temperatures},
         {"acceptance", r.acceptance},    {"step_sizes", r.step_sizes},
         {"swap_rates", r.swap_rates},    {"seed", seed},
         {"seconds", seconds},            {"mean_energy", energy.energy(r.samples).mean().item<double>()}};
  if (energy.modes() > 0) j["mode_weights"] = mode_weights(energy, r.samples);
  return j;
}

void save_adjoint_sampling_control(const AdjointSampler& sampler, const Energy& energy, double tau,
                                   const std::string& path, const Json& info) {
  if (!sampler.base || !sampler.control) throw Error("save_adjoint_sampling_control: the sampler has no base or control");
  archive::TensorMap tensors;
  ModelWriter writer(tensors, "");
  const BrownianOptions& b = sampler.base->options();
  Json model{{"kind", kAdjointSamplingControlKind},
             {"control", writer.nested("control", sampler.control->mlp())},
             {"horizon", sampler.control->horizon()},
             {"brownian", {{"noise", to_string(b.noise)}, {"sigma_max", b.sigma_max}, {"sigma_min", b.sigma_min},
                           {"sigma", b.sigma}, {"dim", sampler.base->dim()}, {"particles", sampler.base->particles()}}},
             {"energy", {{"name", energy.name()}, {"dim", energy.dim()}, {"particles", energy.particles()}, {"tau", tau}}}};
  Json meta{{"format", model_file::kFormat}, {"version", model_file::kVersion}, {"model", model}, {"info", info}};
  // The control network's own schedule (a velocity network's form, not a generative model's): load_velocity
  // reads the schedule before it meets the kind and refuses the file.
  meta["schedule"]["type"] = sampler.control->mlp().schedule()->name();
  archive::write(path, meta, tensors);
}

bool is_adjoint_sampling_control(const std::string& path) {
  const archive::Contents contents = archive::read(path, "model file", model_file::kFormat, model_file::kVersion);
  return contents.meta.contains("model") && contents.meta["model"].value("kind", "") == kAdjointSamplingControlKind;
}

LoadedAdjointSampler load_adjoint_sampling_control(const std::string& path) {
  archive::Contents contents = archive::read(path, "model file", model_file::kFormat, model_file::kVersion);
  const Json& meta = contents.meta;
  const std::string kind = meta.contains("model") ? meta["model"].value("kind", "") : "";
  if (kind != kAdjointSamplingControlKind) {
    throw Error("model file '" + path + "' holds a model of kind '" + kind +
                "', not an Adjoint Sampling control (tilt adjoint-sampling's model.pt)");
  }
  try {
    const Json& node = meta.at("model");
    const ModelReader reader(path, contents.tensors, make_linear_schedule(), "");
    auto mlp = std::dynamic_pointer_cast<MlpVelocity>(reader.nested(node.at("control"), "control"));
    if (!mlp) throw reader.fail("the control is not an MLP");
    const Json& b = node.at("brownian");
    BrownianOptions o;
    try {
      o.noise = parse_brownian_noise(b.at("noise").get<std::string>());
    } catch (const Error& e) {
      throw reader.fail(e.what());
    }
    o.sigma_max = b.at("sigma_max").get<double>();
    o.sigma_min = b.at("sigma_min").get<double>();
    o.sigma = b.at("sigma").get<double>();
    LoadedAdjointSampler out;
    out.sampler.base = std::make_shared<BrownianBase>(o, reader.whole(b.at("dim"), "dim"), reader.whole(b.at("particles"), "particles"));
    out.sampler.control = std::make_shared<soc::ControlNetwork>(mlp, node.at("horizon").get<double>());
    if (out.sampler.control->dim() != out.sampler.base->dim()) throw reader.fail("the control's and the base's dimensions differ");
    out.energy = node.at("energy").at("name").get<std::string>();
    out.tau = node.at("energy").at("tau").get<double>();
    out.info = meta.value("info", Json::object());
    return out;
  } catch (const Json::exception& e) {
    throw Error("model file '" + path + "' has malformed metadata: " + e.what());
  } catch (const Error& e) {
    const std::string message = e.what();
    if (message.find("'" + path + "'") != std::string::npos) throw;
    throw Error("model file '" + path + "': " + message);
  }
}

}  // namespace tilt::sampling
