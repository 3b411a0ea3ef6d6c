// tilt adjoint-sampling: train a sampler of pi ∝ exp(-E / tau) by Adjoint Sampling (Reciprocal Adjoint
// Matching with a replay buffer) and evaluate it against exact samples and/or an MCMC reference.
// tilt mcmc: long MALA / parallel-tempering chains for such a reference. (tilt/sampling/*.h;
// docs/adjoint_sampling.md.)
#include "commands.h"

#include "tilt/core/check.h"
#include "tilt/core/error.h"
#include "tilt/core/log.h"
#include "tilt/core/fs.h"
#include "tilt/core/progress.h"
#include "tilt/io/samples.h"
#include "tilt/io/sampling_config.h"
#include "tilt/io/sampling_run.h"
#include "tilt/sampling/mcmc.h"

#include <chrono>
#include <cstdio>

namespace tilt::cli {

using namespace tilt::sampling;

int run_adjoint_sampling(const AdjointSamplingArgs& args) {
  Config config(args.config.config, args.config.set);
  ConfigSection root = config.root();
  AdjointSamplingRunOptions run = read_adjoint_sampling_run(root);
  if (!args.reference.empty()) run.evaluation.reference = args.reference;
  check_reference_input(run.evaluation.reference, *run.energy, args.config.config, args.out);
  if (args.out.empty()) throw Error("--out is required: the directory for this run's files");
  const RunDirectory dir = prepare_run_directory(args.out, config.resolved(), args.resume);
  const AdjointSampler sampler = make_adjoint_sampler(run);
  const AdjointSamplingTraining training = train_adjoint_sampler(run, sampler, dir, args.resume, args.quiet);
  save_adjoint_sampling_control(sampler, *run.energy, run.tau, dir.path("model.pt"),
                                {{"trained_by", "tilt adjoint-sampling"}, {"iterations", training.iterations}});
  const SamplerEvaluation ev = evaluate_adjoint_sampler(run, sampler, training, args.quiet);
  write_samples_csv(dir.path("samples.csv"), ev.samples);
  if (ev.exact.defined()) write_samples_csv(dir.path("exact.csv"), ev.exact);
  atomic_write(dir.path("eval.json"), ev.result.dump(2) + "\n");
  const std::string text = evaluation_text(ev.result);
  atomic_write(dir.path("eval.txt"), text);
  if (common_options().json) {
    report(ev.result);
  } else {
    std::printf("%s", text.c_str());
  }
  info("wrote " + dir.dir + "/{model.pt, checkpoint.pt, metrics.jsonl, samples.csv, [exact.csv,] eval.json, eval.txt}");
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
  const uint64_t seed = mix_seed(settings.seed, 9);
  Generator gen = make_generator(seed);
  const auto t0 = std::chrono::steady_clock::now();
  MalaResult r;
  {
    ProgressBar bar("mcmc", mala.burn_in + mala.steps, 0, !args.quiet);
    r = run_mala(*energy, tau, mala, gen, [&](int64_t done, int64_t) { bar.update(done); });
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  // Chains that never moved, or temperatures that never swapped, give samples of their starting points, not of
  // exp(-E / tau): written (the diagnostics say how), but said.
  for (size_t i = 0; i < r.acceptance.size(); ++i) {
    if (r.acceptance[i] < 0.01) {
      warning("mcmc: the chains at temperature " + number_string(mala.temperatures[i]) + " accepted " +
              number_string(r.acceptance[i]) + " of their moves (step size " + number_string(r.step_sizes[i]) +
              "): they barely moved, and their samples are not of exp(-E / tau); check [energy] (its scale, the "
              "temperature) and [mcmc] init_std and step_size");
    }
  }
  for (size_t i = 0; i < r.swap_rates.size(); ++i) {
    if (r.swap_rates[i] < 0.01) {
      warning("mcmc: temperatures " + number_string(mala.temperatures[i]) + " and " +
              number_string(mala.temperatures[i + 1]) + " swapped in " + number_string(r.swap_rates[i]) +
              " of their attempts: the ladder does not carry the chains between modes; put temperatures between them");
    }
  }
  write_samples_csv(args.out, r.samples);
  const Json j = mcmc_report(*energy, tau, mala, r, settings.seed, seconds);  // the seed that reproduces the run
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
       add_seed_threads(app, args->config);
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
       add_seed_threads(app, args->config);
       app.add_flag("-q,--quiet", args->quiet, "No progress bar");
       return [args] { return run_mcmc(*args); };
     }});
}  // namespace

}  // namespace tilt::cli
