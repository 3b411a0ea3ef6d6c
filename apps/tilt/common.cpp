#include "common.h"

#include "tilt/core/log.h"

namespace tilt::cli {

void info(const std::string& message) { note(message); }
void warn(const std::string& message) { warning(message); }

void finish_root(ConfigSection& root) {
  finish_config_root(root);
}

}  // namespace tilt::cli
