// Files written atomically: a reader (or a crash) never sees a half-written file, and an earlier
// version stays intact until the new one is complete.
#pragma once

#include <functional>
#include <string>

namespace tilt {

/// Writes `content` to path.tmp.<pid>, flushes it, then renames it over path.
void atomic_write(const std::string& path, const std::string& content);

/// Calls write_to(temporary path), then renames the temporary file over path. If write_to throws,
/// the temporary file is removed and path is left as it was.
void atomic_write_with(const std::string& path, const std::function<void(const std::string&)>& write_to);

/// Reads a whole file; throws tilt::Error("cannot read <what> '<path>': ...") if it is missing.
std::string read_file(const std::string& path, const std::string& what = "file");

/// Creates a directory and its parents; throws tilt::Error on failure.
void make_directories(const std::string& path);

bool file_exists(const std::string& path);

}  // namespace tilt
