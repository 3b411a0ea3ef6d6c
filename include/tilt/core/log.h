// Messages for the person running tilt: one line each on stderr, prefixed "tilt: ". In a group of
// processes every rank but the first is silenced (set_messages_silent), so nothing prints twice.
#pragma once

#include <string>

namespace tilt {

void note(const std::string& message);     ///< "tilt: <message>"
void warning(const std::string& message);  ///< "tilt: warning: <message>"
void set_messages_silent(bool silent);
bool messages_silent();

}  // namespace tilt
