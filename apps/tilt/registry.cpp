#include "registry.h"

#include "common.h"

#include <algorithm>
#include <cstdio>

namespace tilt::cli {
namespace {

std::vector<Command>& registry() {
  static std::vector<Command> list;
  return list;
}

}  // namespace

bool add_command(Command command) {
  registry().push_back(std::move(command));
  return true;
}

std::vector<Command> commands() {
  std::vector<Command> list = registry();
  std::stable_sort(list.begin(), list.end(), [](const Command& a, const Command& b) { return a.order < b.order; });
  return list;
}

CommonOptions& mutable_common_options() {
  static CommonOptions options;
  return options;
}
const CommonOptions& common_options() { return mutable_common_options(); }

void report(const Json& result) {
  if (common_options().json) std::printf("%s\n", result.dump().c_str());
}

void add_config(CLI::App& app, ConfigArgs& args, bool required) {
  auto* opt = app.add_option("-c,--config", args.config, "Configuration file (.toml or .json)");
  if (required) opt->required();
  opt->check([](const std::string& path) { return path.empty() ? std::string("the config file name is empty") : std::string(); });
  app.add_option("--set", args.set, "Override a config key, e.g. --set finetune.lr=1e-3 (repeatable)");
}

void add_seed_threads(CLI::App& app, ConfigArgs& args, const std::string& seed_use, bool with_config) {
  app.add_option("--seed", args.seed,
                 std::string("Random seed, >= 0 (default: ") + (with_config ? "the config's seed, else 0)" : "0)") +
                     (seed_use.empty() ? "" : "; " + seed_use));
  app.add_option("--threads", args.threads,
                 std::string("Threads, 0..1024 (0: all cores; default: ") + (with_config ? "the config's threads, else 0)" : "0)"));
  app.final_callback([&args] {
    if (args.seed && *args.seed < 0) throw CLI::ValidationError("--seed must be >= 0, got " + std::to_string(*args.seed));
    if (args.threads && (*args.threads < 0 || *args.threads > kMaxThreads)) {
      throw CLI::ValidationError("--threads must be in 0.." + std::to_string(kMaxThreads) + " (0: all cores), got " +
                                 std::to_string(*args.threads));
    }
    if (args.config.empty() && args.set.empty()) return;  // no config: the command reads the flags
    if (args.seed) args.set.push_back("seed=" + std::to_string(*args.seed));
    if (args.threads) args.set.push_back("threads=" + std::to_string(*args.threads));
  });
}

std::string joined(const std::vector<std::string>& names) {
  std::string s;
  for (const auto& n : names) s += (s.empty() ? "" : ", ") + n;
  return s;
}

}  // namespace tilt::cli
