// log Z = log E_{p_base}[exp(lambda r)], importance weights and their effective sample size for a
// proposal (a model file, a multiple of the exact optimal control, or the base), as `tilt logz` does it:
// by Girsanov against the base chain, against the exact noising chain, or by escorted Jarzynski
// (tilt/sde/importance.h; docs/equations.md). The base, the reward, the seed and the threads come from
// a config.
#pragma once

#include "tilt/io/config.h"

#include <cstdint>
#include <string>

namespace tilt {

/// The options of a log Z estimate, with tilt logz's defaults; messages name them by their flags.
struct LogzOptions {
  std::string model;    ///< a proposal model file; or
  std::string control;  ///< "zero" | "optimal" | "optimal:<scale>" (needs the exact target); empty: the base
  std::string method = "girsanov";  ///< girsanov | noising | jarzynski
  std::string noise;    ///< empty: memoryless with h = 1/steps (girsanov, noising), constant:1 (jarzynski)
  std::string integrator = "euler";  ///< euler | exact
  int64_t steps = 100;
  int64_t n = 10000;     ///< paths
  int64_t batch = 4096;  ///< paths simulated at once
  bool quiet = false;    ///< no progress bar
  /// A conditional problem (docs/conditions.md): the condition, comma-separated numbers; the base, the reward,
  /// the proposal model and the exact target are taken at it.
  std::string condition;
};

/// Throws tilt::Error naming the flag of an option out of bounds or unknown (what estimate_log_z
/// checks first, before it reads the config).
void check_log_z_options(const LogzOptions& options);

/// Checks the options, reads the config (top-level seed and threads, [base], [reward], [data]), draws
/// the weighted paths with the generator mix_seed(seed, 41), and returns the result: method, proposal,
/// noise, integrator, steps, lambda, n, log_z, log_z_standard_error, ess, ess_fraction, mean_reward,
/// weighted_mean_reward, and with an exact target exact_log_z and z_score.
Json estimate_log_z(Config& config, const LogzOptions& options);

/// The result as tilt logz prints it.
std::string log_z_text(const Json& result);

}  // namespace tilt
