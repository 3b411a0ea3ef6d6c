// tilt adjoint-sampling: train a sampler of pi ∝ exp(-E / tau) by Adjoint Sampling (Reciprocal Adjoint
// Matching with a replay buffer) and evaluate it against exact samples and/or an MCMC reference.
// tilt mcmc: long MALA / parallel-tempering chains for such a reference. (tilt/sampling/*.h;
// docs/adjoint_sampling.md.)
#include "commands.h"

#include "tilt/core/error.h"
#include "tilt/core/fs.h"
#include "tilt/core/progress.h"
#include "tilt/eval/metrics.h"
#include "tilt/io/builders.h"
#include "tilt/io/model_io.h"
#include "tilt/io/plot.h"
#include "tilt/io/samples.h"
#include "tilt/io/sampling_config.h"
#include "tilt/sampling/adjoint_sampling.h"
#include "tilt/sampling/mcmc.h"
#include "tilt/sampling/sample_metrics.h"
#include "tilt/sde/importance.h"
#include "tilt/train/trainer.h"

#include <ATen/ATen.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <sstream>

namespace tilt::cli {

namespace {

using namespace tilt::sampling;

std::string fmt(double x, const char* spec = "%.4g") {
  if (!std::isfinite(x)) return "-";
  char buf[48];
  std::snprintf(buf, sizeof buf, spec, x);
  return buf;
}

std::string weights_text(const std::vector<double>& w) {
  std::string s;
  for (double v : w) s += (s.empty() ? "" : " / ") + fmt(v, "%.3f");
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

}  // namespace

int run_adjoint_sampling(const AdjointSamplingArgs& args) {
  Config config(args.config.config, args.config.set);
  ConfigSection root = config.root();
  const RunSettings settings = read_run_settings(root);
  double tau = 1.0;
  const EnergyPtr energy = read_energy(root.section("energy"), &tau);
  const BrownianOptions brownian = read_brownian(root.section("brownian", /*optional=*/true));
  ConfigSection as = root.section("adjoint_sampling", /*optional=*/true);
  AdjointSamplingOptions opts = read_adjoint_sampling(as);
  opts.tau = tau;
  const std::vector<int64_t> hidden = as.integers("hidden", std::vector<int64_t>{128, 128, 128});
  if (hidden.empty()) as.fail("hidden", "must list at least one layer width");
  for (int64_t w : hidden) {
    if (w < 1 || w > limits::kWidth) as.fail("hidden", "widths must be in 1.." + std::to_string(limits::kWidth) + ", got " + std::to_string(w));
  }
  TrainerOptions defaults;
  defaults.iterations = 2000;
  defaults.adam = {1e-3, 0.9, 0.999, 1e-8, 0.0};
  defaults.grad_clip = 0;  // the adjoint is clipped instead (max_adjoint_norm)
  defaults.checkpoint_every = 500;
  TrainerOptions topt = read_trainer(as, defaults);
  if (topt.shards > 1) as.fail("shards", "must be 1: the replay buffer is one process's (no sharded batches)");
  as.finish();
  ConfigSection ev = root.section("evaluation", /*optional=*/true);
  const int64_t n_eval = ev.integer("samples", 4000);
  if (n_eval < 2 || n_eval > limits::kSamples) {
    ev.fail("samples", "must be in 2.." + std::to_string(limits::kSamples) + ", got " + std::to_string(n_eval));
  }
  const int64_t eval_steps = ev.integer("steps", opts.steps);
  if (eval_steps < 1 || eval_steps > limits::kSteps) {
    ev.fail("steps", "must be in 1.." + std::to_string(limits::kSteps) + ", got " + std::to_string(eval_steps));
  }
  const SamplerGrid eval_grid = parse_sampler_grid(ev.choice("grid", {"nu", "uniform"}, "nu"));
  std::string reference = args.reference.empty() ? ev.string("reference", "") : args.reference;
  ev.finish();
  root.allow({"mcmc"});
  root.finish();
  if (!reference.empty() && !file_exists(reference)) {
    throw Error("the reference samples '" + reference + "' do not exist (make them with `tilt mcmc -c " +
                args.config.config + " -o " + reference + "`)");
  }
  if (args.out.empty()) throw Error("--out is required: the directory for this run's files");

  if (!reference.empty()) {
    for (const char* name : {"samples.csv", "eval.json", "eval.txt", "model.pt", "checkpoint.pt"}) {
      if (same_file(args.out + "/" + name, reference)) {
        throw Error("--reference '" + reference + "' is " + name + " of the run in --out '" + args.out +
                    "', which this run writes; copy it elsewhere first");
      }
    }
  }
  const RunDirectory run = prepare_run_directory(args.out, config.resolved(), args.resume);
  auto base = std::make_shared<BrownianBase>(brownian, energy->dim(), energy->particles());
  auto control = std::make_shared<soc::ControlNetwork>(energy->dim(), 1.0, hidden, mix_seed(settings.seed, 1),
                                                        /*zero_output=*/true);
  ReciprocalAdjointMatching loss(energy, base, control, opts);
  attach_to_run(topt, run, settings, args.quiet, "adjoint sampling");
  Trainer trainer(loss, topt);
  resume_if_asked(trainer, topt, run, args.resume);
  double train_seconds = 0;
  trainer.run([&](const StepResult& r) { train_seconds += r.seconds; });
  const Json model_info = {{"trained_by", "tilt adjoint-sampling"}, {"energy", energy->name()},
                           {"tau", tau}, {"brownian", base->describe()}, {"iterations", trainer.iteration()},
                           {"note", "a control network u(x, t) (drift g(t)^2 u of the Brownian base), not a velocity"}};
  save_velocity(control->mlp(), run.path("model.pt"), model_info);

  // Evaluation: fresh samples of the trained sampler with their importance weights.
  at::NoGradGuard no_grad;
  Generator gen = make_generator(mix_seed(settings.seed, 7));
  const auto t0 = std::chrono::steady_clock::now();
  SamplerPaths paths;
  {
    ProgressBar bar("sampling", n_eval, 0, !args.quiet);
    paths = simulate(*base, control.get(), n_eval, eval_steps, gen, eval_grid, 4096,
                     [&](int64_t done, int64_t) { bar.update(done); });
  }
  const double sample_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const Tensor log_w = log_importance_weights(*energy, tau, *base, paths);
  const WeightSummary ws = summarize_log_weights(log_w);
  write_samples_csv(run.path("samples.csv"), paths.x1);

  Json result;
  result["energy"] = energy->name();
  result["dim"] = energy->dim();
  result["tau"] = tau;
  result["brownian"] = base->describe();
  result["gradient_steps"] = loss.gradient_steps();
  result["energy_evaluations"] = loss.energy_evaluations();
  result["energy_evaluations_per_gradient_step"] =
      static_cast<double>(loss.energy_evaluations()) / static_cast<double>(std::max<int64_t>(loss.gradient_steps(), 1));
  result["train_seconds_this_session"] = train_seconds;
  result["samples"] = n_eval;
  result["sample_steps"] = eval_steps;
  result["sample_seconds"] = sample_seconds;
  result["mean_energy"] = energy->energy(paths.x1).mean().item<double>();
  Json lz{{"estimate", ws.log_z}, {"standard_error", ws.standard_error}};
  const double exact_log_z = energy->exact_log_z(tau);
  if (std::isfinite(exact_log_z)) {
    lz["exact"] = exact_log_z;
    lz["z_score"] = (ws.log_z - exact_log_z) / ws.standard_error;
  }
  result["log_z"] = lz;
  result["ess_fraction"] = ws.ess_fraction;
  if (energy->modes() > 0) {
    result["mode_weights"] = mode_weights(*energy, paths.x1);
    result["mode_weights_reweighted"] = mode_weights(*energy, paths.x1, log_w);
    const auto exact_w = energy->exact_mode_weights(tau);
    if (!exact_w.empty()) result["mode_weights_exact"] = exact_w;
  }
  Tensor exact_a, exact_b;
  if (energy->has_exact_samples(tau)) {
    Generator egen = make_generator(mix_seed(settings.seed, 8));
    exact_a = energy->sample_exact(n_eval, tau, egen);
    exact_b = energy->sample_exact(n_eval, tau, egen);
    write_samples_csv(run.path("exact.csv"), exact_a);
    Json e = compare(*energy, paths.x1, exact_a, exact_b);
    // The energy distance in the state space, against its floor: two independent exact sets.
    e["energy_distance"] = energy_distance(paths.x1.to(at::kFloat), exact_a.to(at::kFloat));
    e["energy_distance_floor"] = energy_distance(exact_b.to(at::kFloat), exact_a.to(at::kFloat));
    result["vs_exact"] = e;
  }
  if (!reference.empty()) {
    const Tensor ref = read_samples_csv(reference).to(at::kDouble);
    if (ref.size(1) != energy->dim()) {
      throw Error("the reference samples '" + reference + "' have dimension " + std::to_string(ref.size(1)) +
                  ", the energy " + std::to_string(energy->dim()));
    }
    if (ref.size(0) < 4) throw Error("the reference samples '" + reference + "' hold fewer than 4 samples");
    // Floor: the first half of the chains' samples against the second half (later in the chains).
    const int64_t h = ref.size(0) / 2;
    Json m = compare(*energy, paths.x1, ref, ref.narrow(0, h, ref.size(0) - h));
    m["floor_note"] = "second half of the reference against the whole";
    m["path"] = reference;
    if (exact_a.defined()) m["reference_vs_exact_energy_w2"] = energy_w2(*energy, ref, exact_a);
    result["vs_reference"] = m;
  }
  atomic_write(run.path("eval.json"), result.dump(2) + "\n");

  std::ostringstream txt;
  txt << energy->name() << " (d = " << energy->dim() << ", tau = " << tau << "), Brownian base " << base->describe()
      << "\n"
      << "gradient steps " << loss.gradient_steps() << ", energy evaluations " << loss.energy_evaluations() << " ("
      << fmt(result["energy_evaluations_per_gradient_step"].get<double>(), "%.3f") << " per step)\n"
      << n_eval << " samples, " << eval_steps << " steps: mean energy " << fmt(result["mean_energy"].get<double>())
      << ", log Z " << fmt(ws.log_z) << " ± " << fmt(ws.standard_error, "%.2g");
  if (std::isfinite(exact_log_z)) txt << " (exact " << fmt(exact_log_z) << ", z = " << fmt(lz["z_score"].get<double>(), "%.2f") << ")";
  txt << ", ESS/n " << fmt(ws.ess_fraction, "%.3f") << "\n";
  if (energy->modes() > 0) {
    txt << "mode weights: samples " << weights_text(result["mode_weights"]) << ", reweighted "
        << weights_text(result["mode_weights_reweighted"]);
    if (result.contains("mode_weights_exact")) txt << ", exact " << weights_text(result["mode_weights_exact"]);
    txt << "\n";
  }
  for (const char* key : {"vs_exact", "vs_reference"}) {
    if (!result.contains(key)) continue;
    const Json& c = result[key];
    txt << key << ": energy W2 " << fmt(c["energy_w2"].get<double>()) << " (floor " << fmt(c["energy_w2_floor"].get<double>())
        << ")";
    if (c.contains("distance_w2")) {
      txt << ", distance W2 " << fmt(c["distance_w2"].get<double>()) << " (floor " << fmt(c["distance_w2_floor"].get<double>()) << ")";
    }
    if (c.contains("x0_w2")) txt << ", x0 W2 " << fmt(c["x0_w2"].get<double>()) << " (floor " << fmt(c["x0_w2_floor"].get<double>()) << ")";
    if (c.contains("energy_distance")) {
      txt << ", energy distance " << fmt(c["energy_distance"].get<double>()) << " (floor "
          << fmt(c["energy_distance_floor"].get<double>()) << ")";
    }
    if (c.contains("mode_weights")) txt << ", reference modes " << weights_text(c["mode_weights"]);
    txt << "\n";
  }
  atomic_write(run.path("eval.txt"), txt.str());
  if (common_options().json) {
    report(result);
  } else {
    std::printf("%s", txt.str().c_str());
  }
  info("wrote " + run.dir + "/{model.pt, checkpoint.pt, metrics.jsonl, samples.csv, [exact.csv,] eval.json, eval.txt}");
  return 0;
}

int run_mcmc(const McmcArgs& args) {
  Config config(args.config.config, args.config.set);
  ConfigSection root = config.root();
  const RunSettings settings = read_run_settings(root);
  double tau = 1.0;
  const EnergyPtr energy = read_energy(root.section("energy"), &tau);
  const MalaOptions mala = read_mala(root.section("mcmc", /*optional=*/true));
  root.allow({"brownian", "adjoint_sampling", "evaluation"});
  root.finish();
  if (args.out.empty()) throw Error("--out is required: the CSV file for the samples");
  refuse_output_over_input("--out", args.out, {{"--config", args.config.config}});
  refuse_output_over_input("--out", args.out + ".json", {{"--config", args.config.config}});
  if (args.seed < -1) throw Error("--seed must be >= 0 (or -1: from the config's seed)");
  const uint64_t seed = args.seed >= 0 ? static_cast<uint64_t>(args.seed) : mix_seed(settings.seed, 9);
  Generator gen = make_generator(seed);
  const auto t0 = std::chrono::steady_clock::now();
  MalaResult r;
  {
    ProgressBar bar("mcmc", mala.burn_in + mala.steps, 0, !args.quiet);
    r = run_mala(*energy, tau, mala, gen, [&](int64_t done, int64_t) { bar.update(done); });
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  write_samples_csv(args.out, r.samples);
  Json j{{"energy", energy->name()},       {"tau", tau},
         {"samples", r.samples.size(0)},   {"chains", mala.chains},
         {"steps", mala.steps},            {"burn_in", mala.burn_in},
         {"thin", mala.thin},              {"temperatures", mala.temperatures.empty() ? std::vector<double>{1.0} : mala.temperatures},
         {"acceptance", r.acceptance},     {"step_sizes", r.step_sizes},
         {"swap_rates", r.swap_rates},     {"seed", seed},
         {"seconds", seconds},             {"mean_energy", energy->energy(r.samples).mean().item<double>()}};
  if (energy->modes() > 0) j["mode_weights"] = mode_weights(*energy, r.samples);
  atomic_write(args.out + ".json", j.dump(2) + "\n");
  std::printf("%s\n", j.dump().c_str());  // with or without --json: the diagnostics are its result
  info("wrote " + args.out + " (" + std::to_string(r.samples.size(0)) + " samples) and " + args.out + ".json");
  return 0;
}

namespace {
const bool registered_as = add_command(
    {"adjoint-sampling",
     "Train a sampler of exp(-E / tau) by Adjoint Sampling ([energy], [brownian], [adjoint_sampling]) and evaluate it "
     "([evaluation])",
     110, [](CLI::App& app) {
       auto args = std::make_shared<AdjointSamplingArgs>();
       add_config(app, args->config, true);
       app.add_option("-o,--out", args->out, "Directory: the run's (model.pt, checkpoint.pt, metrics.jsonl, samples.csv, eval.json)")
           ->required();
       app.add_option("--reference", args->reference, "Reference samples (CSV, e.g. from tilt mcmc) to evaluate against");
       app.add_flag("--resume", args->resume, "Continue the run in --out from its last checkpoint");
       app.add_flag("-q,--quiet", args->quiet, "No progress bar");
       return [args] { return run_adjoint_sampling(*args); };
     }});
const bool registered_mcmc = add_command(
    {"mcmc", "Reference samples of exp(-E / tau) ([energy]) by MALA with parallel tempering ([mcmc])", 120,
     [](CLI::App& app) {
       auto args = std::make_shared<McmcArgs>();
       add_config(app, args->config, true);
       app.add_option("-o,--out", args->out, "File: the samples (CSV; diagnostics go to <out>.json)")->required();
       app.add_option("--seed", args->seed, "Random seed (-1: from the config's seed)")->capture_default_str();
       app.add_flag("-q,--quiet", args->quiet, "No progress bar");
       return [args] { return run_mcmc(*args); };
     }});
}  // namespace

}  // namespace tilt::cli
