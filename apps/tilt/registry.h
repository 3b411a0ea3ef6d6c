// The subcommands of the tilt tool. Each cmd_*.cpp registers its own: a name, a one-line help, its
// options and the function that runs it; cli.cpp only builds the parser from this list and dispatches.
//
// Flags that mean the same everywhere: -o/--out (a run directory for the commands that train, a file
// for the others: each command's help says which), --json (one line of JSON on stdout, the
// command's result), --device (cpu only for now), -q/--quiet (no progress bar), -c/--config and --set,
// --seed and --threads (add_seed_threads).
#pragma once

#include "tilt/io/config.h"

#include <CLI/CLI.hpp>

#include <functional>
#include <string>
#include <vector>

namespace tilt::cli {

struct ConfigArgs;

/// Declares a subcommand's options on `app` and returns the function that runs it (the exit code).
using CommandSetup = std::function<std::function<int()>(CLI::App& app)>;

struct Command {
  std::string name;
  std::string help;
  int order = 0;  ///< place in `tilt --help`
  CommandSetup setup;
};

/// Registers a subcommand (at static initialisation: `const bool registered = add_command({...});`).
bool add_command(Command command);
/// Every subcommand, by order.
std::vector<Command> commands();

/// The options every subcommand takes, set by run_command_line before the command runs.
struct CommonOptions {
  bool json = false;
  std::string device;  ///< --device; empty: the config's device, else the CPU
};
const CommonOptions& common_options();
CommonOptions& mutable_common_options();

/// With --json: `result` as one line on stdout. Every command's JSON goes through here.
void report(const Json& result);

/// -c/--config and --set.
void add_config(CLI::App& app, ConfigArgs& args, bool required);
/// --seed and --threads, one rule on every command (docs/config.md, "Seed and threads"): with a config
/// they override its top-level seed and threads, as --set seed=N and --set threads=N would (they are
/// appended to args.set once the command line is parsed); without one the command takes
/// args.seed.value_or(0) and args.threads.value_or(0) (0: all cores). Bad values fail the parse, naming the flag.
/// `seed_use`, if given, ends --seed's help: what else the seed draws. `with_config` false: the command reads
/// no config, and the help says the defaults are 0.
void add_seed_threads(CLI::App& app, ConfigArgs& args, const std::string& seed_use = "", bool with_config = true);
/// The whole tool: parses `argv` (argv[0] the program) and runs the subcommand it names; returns the exit code.
int run_command_line(int argc, char** argv);
/// Names joined by ", " (help texts list what the registries hold).
std::string joined(const std::vector<std::string>& names);

}  // namespace tilt::cli
