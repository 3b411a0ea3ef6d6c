// An SOC benchmark run, as `tilt soc` does it: a control network trained on one of the benchmark
// problems (tilt/soc/problems.h) with one or several SOC losses, each from the same initial network,
// evaluated on fixed fresh paths by the control L2 error under the optimal path law (docs/equations.md,
// E33) when the problem knows its optimum, else by the control objective. The run writes, in its
// directory: soc.resolved.json, <loss>.jsonl (training metrics), <loss>.eval.jsonl (the evaluations),
// summary.json, summary.md and curves.png. A C++ program gets the same run from the same options.
#pragma once

#include "tilt/io/config.h"
#include "tilt/soc/problems.h"

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

namespace tilt {

/// The options of an SOC benchmark run, with tilt soc's defaults. In messages a setting is named by
/// its flag (--batch), or by where `names` says it came from (read_soc_benchmark fills it).
struct SocBenchmarkOptions {
  std::string problem = "quadratic_ou_easy";  ///< soc::problem_names()
  std::string instance = "tilt";  ///< soc::instance_names(): "socm" is the SOC-matching paper's instance for the seed
  std::map<std::string, soc::ProblemParam> problem_params;  ///< soc::problem_param_names(problem), by name
  std::string l2_error = "tilt";  ///< control L2 error: "tilt" (soc::control_l2_error) or "socm" (soc::socm_control_l2_error)
  std::vector<std::string> losses;            ///< soc::soc_loss_names(); at least one
  int64_t iterations = 1000;
  int64_t batch = 128;    ///< paths per iteration
  int64_t steps = 0;      ///< Euler-Maruyama steps; 0: the problem's default
  double lr = 1e-3;       ///< Adam
  std::string lr_schedule = "constant";  ///< "constant" or "cosine" (from lr to lr / 100 over the run)
  std::vector<int64_t> hidden{128, 128};
  /// The control's parametrisation: "mlp" (soc::ControlNetwork, an MLP of (x, t / T)) or "separable"
  /// (soc::SeparableControl, one MLP of (x_i, t / T) per coordinate, each of widths `hidden`).
  std::string control = "mlp";
  /// Drift curriculum (docs/equations.md, E120): training sees the drift scaled by c, rising linearly from
  /// curriculum_start at the first iteration to 1 at a curriculum_fraction of the run (1: no curriculum).
  /// Evaluations always score against the problem itself.
  double curriculum_start = 1.0;
  double curriculum_fraction = 0.5;
  /// adjoint_matching's weights over time: "uniform" (the paper's) or "damped" (soc::SocLossOptions::
  /// damp_noisy_times: a time whose targets' mean square exceeds the average counts less; E121).
  std::string time_weights = "uniform";
  int64_t seed = 0;       ///< also draws the problem's x0 / matrices
  int threads = 0;        ///< 0: all cores
  int64_t shards = 0;     ///< 0: one per process
  double dist_timeout = 300;  ///< several processes: the longest wait for the others, seconds
  int64_t eval_every = 50;
  int64_t eval_batch = 1024;
  /// Each loss's control, Adam state and iteration go to <out>/<loss>.checkpoint.pt every this many
  /// iterations and at its end (0: only at the end), so that a stopped run resumes exactly (`resume`).
  int64_t checkpoint_every = 1000;
  /// Continue the run in `out` (which must hold soc.resolved.json): each loss from its checkpoint (a loss
  /// without one starts afresh), its evaluations up to the checkpoint kept. Only iterations, checkpoint_every
  /// and eval_every may differ from the run's start; anything else is refused, naming the keys.
  bool resume = false;
  std::string out;        ///< the run's directory
  bool quiet = false;     ///< no progress bars
  std::map<std::string, std::string> names;  ///< flag -> its name in messages (e.g. "in 'a.toml': 'soc.batch'")
};

/// Reads a config's top-level seed and threads and its [soc] table into `options`, each setting whose
/// flag is not `given` (flags win), with the problem's parameters from the sub-table [soc.<problem>],
/// and checks the top level for unknown keys.
void read_soc_benchmark(ConfigSection& root, SocBenchmarkOptions& options,
                        const std::function<bool(const std::string& flag)>& given);

/// Throws tilt::Error naming the setting outside its bounds (docs/config.md, Limits), an unknown loss,
/// or a loss that cannot take the problem; sets the threads.
void check_soc_benchmark(const SocBenchmarkOptions& options);
/// The run's problem: options.problem as options.instance draws it from options.seed, with
/// options.problem_params; a bad parameter's message names where it came from.
soc::ProblemPtr make_soc_benchmark_problem(const SocBenchmarkOptions& options);

struct SocBenchmarkResult {
  bool writer = true;    ///< this process wrote the files (rank 0, or the only process)
  Json summary;          ///< summary.json: problem, dim, iterations, optimal_value, losses.<name>.{...}
  std::string markdown;  ///< summary.md
};
/// The median of the "seconds" of a metrics file's lines (<loss>.jsonl: each iteration's training time,
/// evaluations excluded), in milliseconds; NAN when no line has them. The median, so that iterations a
/// stopped or busy machine made long do not count as the method's cost. Lines that are not JSON objects
/// with numeric "seconds" are skipped; a missing file is an Error naming it.
double ms_per_iteration(const std::string& metrics_path);

/// Checks the options, then trains every loss in turn and writes the run's files (rank 0 of a group
/// of processes writes; all train together). Refuses a directory that holds a run.
SocBenchmarkResult run_soc_benchmark(const SocBenchmarkOptions& options);

}  // namespace tilt
