// tilt: reward fine-tuning of flow and diffusion models by Adjoint Matching (command-line tool).
// The subcommands register themselves (registry.h); this file builds the parser and dispatches. main.cpp
// calls it; so does the fuzz corpus's fork server (tests/fuzz/fork_server.cpp), once per case.
#include "registry.h"

#include "tilt/core/error.h"
#include "tilt/core/log.h"
#include "tilt/io/run.h"

#include <CLI/CLI.hpp>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <new>
#include <string>
#include <utility>

namespace {

// A LibTorch allocation failure ("[enforce fail at alloc_cpu.cpp:75] err == 0. DefaultCPUAllocator: can't
// allocate memory: ...", "CUDA out of memory. ...") or std::bad_alloc, said as what it is and what to change;
// empty for any other error.
std::string out_of_memory(const std::string& what) {
  size_t start = std::string::npos;
  for (const char* marker : {"DefaultCPUAllocator", "CUDA out of memory", "std::bad_alloc"}) {
    start = std::min(start, what.find(marker));
  }
  if (start == std::string::npos) return "";
  const std::string detail = what.substr(start, what.find('\n', start) - start);
  return "out of memory (" + detail +
         "); a smaller batch size, evaluation batch, model or image size, or fewer steps, needs less";
}

// The validator of integer flags: optional sign, decimal digits, within int64.
CLI::Validator decimal_integer() {
  return CLI::Validator(
      [](std::string& text) -> std::string {
        const size_t digits = !text.empty() && (text[0] == '-' || text[0] == '+') ? 1 : 0;
        if (text.size() == digits || text.find_first_not_of("0123456789", digits) != std::string::npos) {
          return "must be a whole number in decimal digits, got '" + text + "'";
        }
        errno = 0;
        const long long value = std::strtoll(text.c_str(), nullptr, 10);
        if (errno == ERANGE) return "'" + text + "' is out of range (a 64-bit integer)";
        text = std::to_string(value);  // "010" is ten, not octal 8
        return std::string();
      },
      "");
}

}  // namespace

int tilt::cli::run_command_line(int argc, char** argv) {
  // A write to a socket or pipe whose reader is gone (a rank of a group that stopped, `tilt ... | head`) fails with
  // EPIPE, which the writer reports, instead of killing the process without a word (exit 141).
  std::signal(SIGPIPE, SIG_IGN);
  CLI::App app{"tilt: fine-tune flow and diffusion models towards a reward with Adjoint Matching.\n"
               "Samples p*(x) ∝ p_base(x) exp(lambda r(x)) by memoryless stochastic optimal control."};
  app.set_version_flag("--version", "tilt 0.1.0");
  app.require_subcommand(1);
  tilt::cli::CommonOptions& common = tilt::cli::mutable_common_options();
  std::vector<std::pair<CLI::App*, std::function<int()>>> runs;
  std::vector<CLI::Option*> devices;  // each subcommand's --device
  for (const auto& command : tilt::cli::commands()) {
    CLI::App* sub = app.add_subcommand(command.name, command.help);
    runs.emplace_back(sub, command.setup(*sub));
    sub->add_flag("--json", common.json, "Print the result as one line of JSON on stdout");
    devices.push_back(sub->add_option("--device", common.device,
                                      "Device: cpu, cuda or cuda:N (default: the config's device, else cpu); pretrain, finetune and sample "
                                      "run there, the other commands on the CPU (docs/devices.md)"));
    // CLI11 reads an integer with strtoll in base 0: a value past 64 bits became the largest one (two --seed
    // values, one run), "010" octal 8 and "0x10" 16. An integer flag takes decimal digits that fit.
    for (CLI::Option* opt : sub->get_options()) {
      if (opt->get_type_name() == "INT" || opt->get_type_name() == "UINT") opt->transform(decimal_integer());
    }
  }
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
    const bool device_given = std::any_of(devices.begin(), devices.end(), [](CLI::Option* o) { return o->count() > 0; });
    if (device_given) tilt::set_run_device(tilt::parse_device(common.device, "--device"), true);
    for (auto& [sub, run] : runs) {
      if (!sub->parsed()) continue;
      const std::string name = sub->get_name();
      if (!tilt::run_device().is_cpu() && name != "pretrain" && name != "finetune" && name != "sample") {
        tilt::warning("--device " + common.device + ": tilt " + name +
                      " runs on the CPU (pretrain, finetune and sample take a device; docs/devices.md)");
      }
      return run();
    }
  } catch (const tilt::Error& e) {
    std::fprintf(stderr, "tilt: error: %s\n", e.what());
    return 1;
  } catch (const c10::Error& e) {
    const std::string what = e.what_without_backtrace();
    if (const std::string memory = out_of_memory(what); !memory.empty()) {
      std::fprintf(stderr, "tilt: error: %s\n", memory.c_str());
    } else {
      std::fprintf(stderr, "tilt: error (LibTorch): %s\n", what.c_str());
    }
    return 1;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "tilt: error: %s\n", out_of_memory("std::bad_alloc").c_str());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "tilt: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
