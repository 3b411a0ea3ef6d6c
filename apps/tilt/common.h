// Shared pieces of the tilt command-line tool (the library side is tilt/io/run.h).
#pragma once

#include "tilt/core/fs.h"
#include "tilt/core/check.h"
#include "tilt/core/error.h"
#include "tilt/io/config.h"
#include "tilt/io/datasets.h"
#include "tilt/io/run.h"
#include "tilt/model/gmm.h"
#include "tilt/model/reward.h"
#include "tilt/model/velocity.h"
#include "tilt/train/distributed.h"
#include "tilt/train/trainer.h"

#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace tilt::cli {

/// Options every command reading a config file takes.
struct ConfigArgs {
  std::string config;
  std::vector<std::string> set;
  std::optional<int64_t> seed;     ///< --seed (add_seed_threads); with a config, also in `set`
  std::optional<int64_t> threads;  ///< --threads; likewise
};

/// Flag checks (docs/config.md, Limits): tilt::Error("<flag> must be in lo..hi, got value").
inline void check_flag(const std::string& flag, int64_t value, int64_t lo, int64_t hi) {
  check_in_range(flag, value, lo, hi);
}
inline void check_flag_number(const std::string& flag, double value, double lo, double hi) {
  check_number_in_range(flag, value, lo, hi);
}

/// Checks the top level for unknown keys; the tables of other commands are allowed.
void finish_root(ConfigSection& root);

/// Messages on stderr, prefixed "tilt: ".
void info(const std::string& message);
void warn(const std::string& message);

}  // namespace tilt::cli
