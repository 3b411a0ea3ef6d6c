// tilt soc: train a control network on an SOC benchmark problem with one or several losses, and
// compare them (the library's tilt/io/soc_benchmark.h).
#include "commands.h"

#include "tilt/io/soc_benchmark.h"
#include "tilt/soc/losses.h"
#include "tilt/soc/problems.h"

#include <cstdio>
#include <exception>
#include <memory>
#include <string>
#include <vector>

namespace tilt::cli {
namespace {

// --hidden's comma-separated widths, every one an integer: "64,,64" or "64,x" is an error, where CLI11's own
// splitting dropped the empty width and trained a 64,64 network.
std::vector<int64_t> parse_widths(const std::string& flag, const std::string& text) {
  std::vector<int64_t> widths;
  size_t start = 0;
  while (true) {
    const size_t comma = text.find(',', start);
    std::string part = text.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    part.erase(0, part.find_first_not_of(' '));
    part.erase(part.find_last_not_of(' ') + 1);
    size_t used = 0;
    long long w = 0;
    try {
      w = std::stoll(part, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (part.empty() || used != part.size()) {
      throw Error(flag + " must be comma-separated layer widths such as 256,128,64, got '" + text + "'");
    }
    widths.push_back(w);
    if (comma == std::string::npos) return widths;
    start = comma + 1;
  }
}

const bool registered = add_command(
    {"soc", "Solve an SOC benchmark problem with one or several losses and compare them", 100, [](CLI::App& app) {
       auto args = std::make_shared<std::pair<ConfigArgs, SocBenchmarkOptions>>();
       auto& [config, o] = *args;
       add_config(app, config, false);
       app.add_option("-p,--problem", o.problem, joined(soc::problem_names()))->capture_default_str();
       app.add_option("--instance", o.instance,
                      "The problem's instance: tilt (tilt's draws from --seed) or socm (the SOC-matching paper's: x0 and "
                      "matrices drawn as its code draws them from the seed); parameters: the config's [soc.<problem>]")
           ->capture_default_str();
       app.add_option("-l,--loss", o.losses, "Loss (repeatable): " + joined(soc::soc_loss_names()));
       app.add_option("--iterations", o.iterations, "Training iterations per loss")->capture_default_str();
       app.add_option("--batch", o.batch, "Paths per iteration")->capture_default_str();
       app.add_option("--steps", o.steps, "Euler-Maruyama steps (0: the problem's default)")->capture_default_str();
       app.add_option("--lr", o.lr, "Adam learning rate")->capture_default_str();
       app.add_option("--lr-schedule", o.lr_schedule,
                      "constant, or cosine (from --lr to --lr / 100 over the run)")->capture_default_str();
       auto hidden = std::make_shared<std::vector<std::string>>();  // each --hidden given, widths 256,128 or one
       {
         std::string widths;
         for (int64_t w : o.hidden) widths += (widths.empty() ? "" : ",") + std::to_string(w);
         app.add_option("--hidden", *hidden, "Hidden widths of the control network, comma-separated")->default_str(widths);
       }
       app.add_option("--control", o.control,
                      "The control's parametrisation: mlp (one MLP of (x, t)) or separable (one MLP of (x_i, t) per "
                      "coordinate, each of the --hidden widths)")->capture_default_str();
       app.add_option("--time-weights", o.time_weights,
                      "adjoint_matching's weights over time: uniform (the paper's) or damped (times whose targets are "
                      "far noisier than average count less: w_k = min(1, mean_j m_j / m_k), m_k the mean |target_k|^2)")
           ->capture_default_str();
       app.add_option("--curriculum-start", o.curriculum_start,
                      "Drift curriculum: train on the drift scaled by c, from this value at the first iteration to 1 "
                      "(1: none; the double well's barriers scale with it)")->capture_default_str();
       app.add_option("--curriculum-fraction", o.curriculum_fraction,
                      "The fraction of the iterations over which the curriculum's scale rises to 1")->capture_default_str();
       add_seed_threads(app, config, "also draws the problem's x0 / matrices");
       app.add_option("--shards", o.shards,
                      "Draw each batch in this many shards, each with its own seed (0: one per process); the result "
                      "depends on the seed and the shards, not on the number of processes")->capture_default_str();
       app.add_option("--dist-timeout", o.dist_timeout,
                      "Several processes (WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT set, as by torchrun): the longest "
                      "wait for the others, in seconds, before a clear error")->capture_default_str();
       app.add_option("--eval-every", o.eval_every, "Evaluate the control every this many iterations")->capture_default_str();
       app.add_option("--eval-batch", o.eval_batch, "Paths per evaluation")->capture_default_str();
       app.add_option("--l2-error", o.l2_error,
                      "Control L2 error: tilt (self-normalised weights, K times) or socm (SOC-matching's published "
                      "definition: K + 1 times, weights over a normaliser E[w]; docs/soc.md, Metrics)")
           ->capture_default_str();
       app.add_option("--checkpoint-every", o.checkpoint_every,
                      "Write each loss's checkpoint (<loss>.checkpoint.pt) every this many iterations and at its end "
                      "(0: only at the end)")->capture_default_str();
       app.add_option("-o,--out", o.out, "Directory: the curves, metrics and summary")->required();
       app.add_flag("--resume", o.resume,
                    "Continue the run in --out: each loss from its checkpoint, exactly as if never stopped; only "
                    "--iterations, --checkpoint-every and --eval-every may change");
       app.add_flag("-q,--quiet", o.quiet, "No progress bar");
       return [args, hidden, &app] {
         auto& [config, o] = *args;
         if (!hidden->empty()) {  // --hidden 64,32 or --hidden 64 --hidden 32
           o.hidden.clear();
           for (const std::string& text : *hidden) {
             for (int64_t w : parse_widths("--hidden", text)) o.hidden.push_back(w);
           }
         }
         o.seed = config.seed.value_or(0);
         o.threads = static_cast<int>(config.threads.value_or(0));
         // A config's top-level seed and threads and its [soc] table; the flags given win.
         if (!config.config.empty() || !config.set.empty()) {
           Config file(config.config, config.set);
           ConfigSection root = file.root();
           read_soc_benchmark(root, o, [&app](const std::string& flag) { return app.get_option(flag)->count() > 0; });
         }
         const SocBenchmarkResult result = run_soc_benchmark(o);
         if (!result.writer) return 0;
         if (common_options().json) report(result.summary);
         else std::printf("%s", result.markdown.c_str());
         info("wrote " + o.out + "/{summary.md, summary.json, curves.png, <loss>.jsonl, <loss>.eval.jsonl}");
         return 0;
       };
     }});

}  // namespace
}  // namespace tilt::cli
