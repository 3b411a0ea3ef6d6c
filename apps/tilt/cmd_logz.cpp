// tilt logz: importance weights, effective sample size and log Z = log E_{p_base}[exp(lambda r)]
// for a proposal (the library's tilt/io/logz.h).
#include "commands.h"

#include "tilt/io/logz.h"

#include <cstdio>

namespace tilt::cli {
namespace {

const bool registered = add_command(
    {"logz", "Importance weights, ESS and log Z = log E_base[exp(lambda r)] for a proposal", 80, [](CLI::App& app) {
       auto args = std::make_shared<std::pair<ConfigArgs, LogzOptions>>();
       auto& [config, o] = *args;
       add_config(app, config, true);
       app.add_option("-m,--model", o.model, "Proposal: a model file (e.g. a fine-tuned model.pt)");
       app.add_option("--control", o.control, "Proposal: zero, optimal or optimal:<scale> (needs the exact target)");
       app.add_option("--method", o.method, "girsanov (against the base chain), noising (against the exact noising "
                                             "chain; needs a mixture base), jarzynski (escorted)")->capture_default_str();
       app.add_option("--noise", o.noise, "Noise schedule (default memoryless; constant:1 for jarzynski)");
       app.add_option("--integrator", o.integrator, "euler or exact")->capture_default_str();
       app.add_option("--condition", o.condition, "A conditional config: the condition, comma-separated numbers");
       app.add_option("--steps", o.steps, "Time steps")->capture_default_str();
       app.add_option("-n,--n", o.n, "Paths")->capture_default_str();
       app.add_option("--batch", o.batch, "Paths simulated at once")->capture_default_str();
       add_seed_threads(app, config);
       app.add_flag("-q,--quiet", o.quiet, "No progress bar");
       return [args] {
         check_log_z_options(args->second);  // before the config is read, as the flags come first
         Config file(args->first.config, args->first.set);
         const Json result = estimate_log_z(file, args->second);
         if (common_options().json) report(result);
         else std::printf("%s", log_z_text(result).c_str());
         return 0;
       };
     }});

}  // namespace
}  // namespace tilt::cli
