// tilt: reward fine-tuning of flow and diffusion models by Adjoint Matching (command-line tool).
#include "commands.h"

#include "tilt/core/error.h"

#include <CLI/CLI.hpp>
#include <c10/util/Exception.h>

#include <cstdio>

namespace {

void add_config(CLI::App* app, tilt::cli::ConfigArgs& args, bool required) {
  auto* opt = app->add_option("-c,--config", args.config, "Configuration file (.toml or .json)");
  if (required) opt->required();
  opt->check([](const std::string& path) { return path.empty() ? std::string("the config file name is empty") : std::string(); });
  app->add_option("--set", args.set, "Override a config key, e.g. --set finetune.lr=1e-3 (repeatable)");
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"tilt: fine-tune flow and diffusion models towards a reward with Adjoint Matching.\n"
               "Samples p*(x) ∝ p_base(x) exp(lambda r(x)) by memoryless stochastic optimal control."};
  app.set_version_flag("--version", "tilt 0.1.0");
  app.require_subcommand(1);

  tilt::cli::TrainArgs pretrain, finetune, classifier;
  for (auto [name, args, help] :
       {std::tuple{"pretrain", &pretrain, "Pretrain a velocity network by flow matching on [data]"},
        std::tuple{"finetune", &finetune, "Fine-tune [base] towards [reward] with Adjoint Matching (or a baseline)"},
        std::tuple{"classifier", &classifier, "Train an image classifier on [data] (for [reward] type = \"classifier\")"}}) {
    auto* cmd = app.add_subcommand(name, help);
    add_config(cmd, args->config, true);
    cmd->add_option("-o,--out", args->out, "Run directory (model.pt, checkpoint.pt, metrics.jsonl, ...)")->required();
    cmd->add_flag("--resume", args->resume, "Continue the run in --out from its last checkpoint");
    cmd->add_flag("-q,--quiet", args->quiet, "No progress bar");
    cmd->add_option("--dist-timeout", args->dist_timeout,
                    "Several processes (WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT set, as by torchrun): the longest "
                    "wait for the others, in seconds, before a clear error")->capture_default_str();
  }

  tilt::cli::SampleArgs sample;
  auto* sample_cmd = app.add_subcommand("sample", "Draw samples from a model file, or exact samples of a config's base or target");
  sample_cmd->add_option("-m,--model", sample.model, "Model file (model.pt of a run)");
  sample_cmd->add_option("--exact", sample.exact, "Exact samples instead: 'base' or 'target' (needs --config)");
  add_config(sample_cmd, sample.config, false);
  sample_cmd->add_option("-n,--n", sample.n, "Number of samples")->capture_default_str();
  sample_cmd->add_option("--noise", sample.noise,
                         "Noise schedule: memoryless[:h], constant:<sigma>, scaled_memoryless:<s>, ode "
                         "(default: the one the model was fine-tuned with)");
  sample_cmd->add_option("--steps", sample.steps, "Time steps (default 100)");
  sample_cmd->add_option("--integrator", sample.integrator,
                         "euler, heun (ODE only), exact (the gDDIM step; noise memoryless, scaled_memoryless:<gamma> or ode), "
                         "or auto")->capture_default_str();
  sample_cmd->add_option("--seed", sample.seed, "Random seed")->capture_default_str();
  sample_cmd->add_option("--threads", sample.threads, "Threads (0: all cores; at most 1024)")->capture_default_str();
  sample_cmd->add_option("-o,--out", sample.out, "CSV file for the samples")->required();
  sample_cmd->add_option("--png", sample.png, "Also draw the samples (first two coordinates) to this PNG");

  tilt::cli::ExportArgs exp;
  auto* export_cmd = app.add_subcommand("export", "Write a model file as a TorchScript module that PyTorch's torch.jit.load runs");
  export_cmd->add_option("-m,--model", exp.model, "Model file (model.pt of a run)")->required();
  export_cmd->add_option("-o,--out", exp.out, "TorchScript file to write (forward(x [B, d], t [B]) -> velocity [B, d])")->required();
  export_cmd->add_option("--reference", exp.reference,
                         "Also write points x, times t and tilt's velocity v there to this file (a dict torch.load reads), "
                         "to check the module against in Python");
  export_cmd->add_option("--points", exp.points, "Number of points in --reference")->capture_default_str();
  export_cmd->add_option("--seed", exp.seed, "Random seed of the points")->capture_default_str();

  tilt::cli::EvalArgs eval;
  auto* eval_cmd = app.add_subcommand("eval", "Measure sample sets against the exact target p* of a config");
  add_config(eval_cmd, eval.config, true);
  eval_cmd->add_option("-s,--samples", eval.samples, "Samples file(s) to evaluate (repeatable)")->required();
  eval_cmd->add_option("--reference", eval.reference, "Reference samples, when the config has no exact target");
  eval_cmd->add_option("--replicates", eval.replicates, "Fresh target sets per distance")->capture_default_str();
  eval_cmd->add_option("--seed", eval.seed, "Random seed")->capture_default_str();
  eval_cmd->add_flag("--json", eval.json, "Print the metrics as one JSON object");

  tilt::cli::EvalImagesArgs eval_images;
  auto* eval_images_cmd = app.add_subcommand(
      "eval-images", "Measure generated images against the classifier of [reward]: class share, diversity, Frechet distance");
  add_config(eval_images_cmd, eval_images.config, true);
  eval_images_cmd->add_option("-s,--samples", eval_images.samples, "Samples file(s) to evaluate (repeatable)")->required();
  eval_images_cmd->add_option("--base", eval_images.base,
                              "Samples of the base model: also estimate the target p* ∝ p_base exp(lambda r) by reweighting them");
  eval_images_cmd->add_flag("--json", eval_images.json, "Print the metrics as one JSON object");

  tilt::cli::LogzArgs logz;
  auto* logz_cmd = app.add_subcommand("logz", "Importance weights, ESS and log Z = log E_base[exp(lambda r)] for a proposal");
  add_config(logz_cmd, logz.config, true);
  logz_cmd->add_option("-m,--model", logz.model, "Proposal: a model file (e.g. a fine-tuned model.pt)");
  logz_cmd->add_option("--control", logz.control, "Proposal: zero, optimal or optimal:<scale> (needs the exact target)");
  logz_cmd->add_option("--method", logz.method, "girsanov (against the base chain), noising (against the exact noising "
                                                "chain; needs a mixture base), jarzynski (escorted)")->capture_default_str();
  logz_cmd->add_option("--noise", logz.noise, "Noise schedule (default memoryless; constant:1 for jarzynski)");
  logz_cmd->add_option("--integrator", logz.integrator, "euler or exact")->capture_default_str();
  logz_cmd->add_option("--steps", logz.steps, "Time steps")->capture_default_str();
  logz_cmd->add_option("-n,--n", logz.n, "Paths")->capture_default_str();
  logz_cmd->add_option("--batch", logz.batch, "Paths simulated at once")->capture_default_str();
  logz_cmd->add_option("--seed", logz.seed, "Random seed (-1: the config's)")->capture_default_str();
  logz_cmd->add_option("--threads", logz.threads, "Threads (0: the config's; at most 1024)")->capture_default_str();
  logz_cmd->add_flag("--json", logz.json, "Print the result as one JSON object");
  logz_cmd->add_flag("-q,--quiet", logz.quiet, "No progress bar");

  tilt::cli::PlotArgs plot;
  auto* plot_cmd = app.add_subcommand("plot", "Draw sample sets side by side (first two coordinates) to a PNG");
  plot_cmd->add_option("panels", plot.panels, "Samples files, each FILE or FILE:TITLE")->required();
  plot_cmd->add_option("-o,--out", plot.out, "PNG file")->required();
  plot_cmd->add_option("--title", plot.title, "Figure title");
  plot_cmd->add_option("--columns", plot.columns, "Panels per row (0: one row)");
  plot_cmd->add_option("--size", plot.size, "Panel size in pixels")->capture_default_str();
  plot_cmd->add_option("--images", plot.images, "Draw each sample as an image of HxW pixels (e.g. 8x8) instead of a point");
  plot_cmd->add_option("--max-images", plot.max_images, "Images per panel with --images")->capture_default_str();

  tilt::cli::SocArgs soc;
  auto* soc_cmd = app.add_subcommand("soc", "Solve an SOC benchmark problem with one or several losses and compare them");
  soc_cmd->add_option("-p,--problem", soc.problem, "quadratic_ou_easy, quadratic_ou_hard, linear_ou, double_well or molecular_dynamics")->capture_default_str();
  soc_cmd->add_option("-l,--loss", soc.losses,
                      "Loss (repeatable): adjoint_matching, continuous_adjoint, discrete_adjoint, socm, socm_const_M, "
                      "cross_entropy, log_variance, variance, moment, reinforce")->required();
  soc_cmd->add_option("--iterations", soc.iterations, "Training iterations per loss")->capture_default_str();
  soc_cmd->add_option("--batch", soc.batch, "Paths per iteration")->capture_default_str();
  soc_cmd->add_option("--steps", soc.steps, "Euler-Maruyama steps (0: the problem's default)")->capture_default_str();
  soc_cmd->add_option("--lr", soc.lr, "Adam learning rate (constant)")->capture_default_str();
  soc_cmd->add_option("--hidden", soc.hidden, "Hidden widths of the control network")->delimiter(',')->capture_default_str();
  soc_cmd->add_option("--seed", soc.seed, "Random seed (also draws the problem's x0 / matrices)")->capture_default_str();
  soc_cmd->add_option("--threads", soc.threads, "Threads (0: all cores; at most 1024)")->capture_default_str();
  soc_cmd->add_option("--shards", soc.shards,
                      "Draw each batch in this many shards, each with its own seed (0: one per process); the result "
                      "depends on the seed and the shards, not on the number of processes")->capture_default_str();
  soc_cmd->add_option("--dist-timeout", soc.dist_timeout,
                      "Several processes (WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT set, as by torchrun): the longest "
                      "wait for the others, in seconds, before a clear error")->capture_default_str();
  soc_cmd->add_option("--eval-every", soc.eval_every, "Evaluate the control every this many iterations")->capture_default_str();
  soc_cmd->add_option("--eval-batch", soc.eval_batch, "Paths per evaluation")->capture_default_str();
  soc_cmd->add_option("-o,--out", soc.out, "Directory for the curves, metrics and summary")->required();
  soc_cmd->add_flag("-q,--quiet", soc.quiet, "No progress bar");
  soc_cmd->add_flag("--json", soc.json, "Print the summary as one JSON object instead of a Markdown table");

  tilt::cli::AdjointSamplingArgs as;
  auto* as_cmd = app.add_subcommand("adjoint-sampling",
                                    "Train a sampler of exp(-E / tau) by Adjoint Sampling ([energy], [brownian], "
                                    "[adjoint_sampling]) and evaluate it ([evaluation])");
  add_config(as_cmd, as.config, true);
  as_cmd->add_option("-o,--out", as.out, "Run directory (model.pt, checkpoint.pt, metrics.jsonl, samples.csv, eval.json)")->required();
  as_cmd->add_option("--reference", as.reference, "Reference samples (CSV, e.g. from tilt mcmc) to evaluate against");
  as_cmd->add_flag("--resume", as.resume, "Continue the run in --out from its last checkpoint");
  as_cmd->add_flag("-q,--quiet", as.quiet, "No progress bar");
  as_cmd->add_flag("--json", as.json, "Print the evaluation as one JSON object");

  tilt::cli::McmcArgs mcmc;
  auto* mcmc_cmd = app.add_subcommand("mcmc", "Reference samples of exp(-E / tau) ([energy]) by MALA with parallel tempering ([mcmc])");
  add_config(mcmc_cmd, mcmc.config, true);
  mcmc_cmd->add_option("-o,--out", mcmc.out, "CSV file for the samples (diagnostics go to <out>.json)")->required();
  mcmc_cmd->add_option("--seed", mcmc.seed, "Random seed (-1: from the config's seed)")->capture_default_str();
  mcmc_cmd->add_flag("-q,--quiet", mcmc.quiet, "No progress bar");

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {  // a bad flag: one line, exit 1, like every other error
    std::fprintf(stderr, "tilt: error: %s (see --help)\n", e.what());
    return 1;
  }
  try {
    if (app.got_subcommand("pretrain")) return tilt::cli::run_pretrain(pretrain);
    if (app.got_subcommand("finetune")) return tilt::cli::run_finetune(finetune);
    if (app.got_subcommand("classifier")) return tilt::cli::run_classifier(classifier);
    if (app.got_subcommand("eval-images")) return tilt::cli::run_eval_images(eval_images);
    if (app.got_subcommand("sample")) return tilt::cli::run_sample(sample);
    if (app.got_subcommand("export")) return tilt::cli::run_export(exp);
    if (app.got_subcommand("eval")) return tilt::cli::run_eval(eval);
    if (app.got_subcommand("plot")) return tilt::cli::run_plot(plot);
    if (app.got_subcommand("logz")) return tilt::cli::run_logz(logz);
    if (app.got_subcommand("soc")) return tilt::cli::run_soc(soc);
    if (app.got_subcommand("adjoint-sampling")) return tilt::cli::run_adjoint_sampling(as);
    if (app.got_subcommand("mcmc")) return tilt::cli::run_mcmc(mcmc);
  } catch (const tilt::Error& e) {
    std::fprintf(stderr, "tilt: error: %s\n", e.what());
    return 1;
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "tilt: error (LibTorch): %s\n", e.what_without_backtrace());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "tilt: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
