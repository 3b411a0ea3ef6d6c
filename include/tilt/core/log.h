// Messages for the person running tilt: one line each on stderr, prefixed "tilt: ". In a group of
// processes every rank but the first is silenced (set_messages_silent), so nothing prints twice.
#pragma once

#include <functional>
#include <string>

namespace tilt {

void note(const std::string& message);     ///< "tilt: <message>"
void warning(const std::string& message);  ///< "tilt: warning: <message>"
/// Where note() and warning() go instead of stderr, for a C++ caller with a logger of its own (or none):
/// called with is_warning and the message, without the "tilt: " prefix, from whichever thread
/// reported it (calls are serialised: the handler must not itself call note() or warning()). An empty
/// handler restores stderr. Silenced ranks call nothing.
using MessageHandler = std::function<void(bool is_warning, const std::string& message)>;
void set_message_handler(MessageHandler handler);
void set_messages_silent(bool silent);
bool messages_silent();

}  // namespace tilt
