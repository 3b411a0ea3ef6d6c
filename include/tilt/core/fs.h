// Files written atomically: a reader (or a crash) never sees a half-written file, and an earlier
// version stays intact until the new one is complete. Run directories are locked while a process
// writes them.
#pragma once

#include <cstddef>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace tilt {

/// Writes `content` to path.tmp.<pid>, flushes and syncs it, then renames it over path (and syncs
/// the directory). On any error (a full disk, a directory in the way) the temporary file is removed,
/// path is left as it was, and tilt::Error names path and the reason.
void atomic_write(const std::string& path, const std::string& content);

/// Calls write_to(temporary path), then renames the temporary file over path. If write_to throws,
/// the temporary file is removed and path is left as it was. write_to must report its own write
/// errors by throwing (prefer atomic_write with the bytes built in memory: it checks every write).
void atomic_write_with(const std::string& path, const std::function<void(const std::string&)>& write_to);

/// Writes all `size` bytes to the file descriptor (retrying short writes and EINTR); returns 0, or
/// the errno of the failure (ENOSPC for a write that made no progress).
int write_all(int fd, const void* data, size_t size);

/// Removes the temporary files path.tmp.<pid> that a killed process left behind (those whose
/// process no longer runs). atomic_write calls it before each write.
void remove_stale_temporaries(const std::string& path);
/// The same for every file of a directory (not its subdirectories).
void remove_stale_temporaries_in(const std::string& dir);

/// Throws tilt::Error naming `what` and `path` if the path is a directory, a device (/dev/zero, which never ends)
/// or a socket; a regular file, a pipe or a missing path passes (the reader reports a missing one).
void refuse_unreadable_kind(const std::string& path, const std::string& what);
/// Reads a whole file; throws tilt::Error("cannot read <what> '<path>': ...") if it is missing, or not a file
/// (refuse_unreadable_kind).
std::string read_file(const std::string& path, const std::string& what = "file");

/// Creates a directory and its parents; throws tilt::Error on failure.
void make_directories(const std::string& path);

bool file_exists(const std::string& path);

/// Whether two paths name the same file: the same inode when both exist, else the same path once
/// made absolute and normalised (so "run/model.pt" and "./run/../run/model.pt" are the same).
bool same_file(const std::string& a, const std::string& b);

/// Throws tilt::Error("<flag> '<out>' is also <input description> ...") if an output path names
/// one of the inputs, so that a command never destroys what it reads, or an existing file of a run
/// directory (one holding a run.lock), so that it never replaces a run's file, or an existing file inside an input
/// that is a directory (a data set's). inputs: (description, path).
void refuse_output_over_input(const std::string& flag, const std::string& out,
                              const std::vector<std::pair<std::string, std::string>>& inputs);

/// An exclusive lock on a directory (flock on <dir>/<name>, which holds the owner's PID). The
/// kernel releases it when the process ends, however it ends (kill -9 included), so a lock is
/// never stale. Held until the object is destroyed.
class DirectoryLock {
 public:
  /// Creates dir if needed and locks it; if another process holds the lock, throws tilt::Error
  /// naming the directory and that process's PID.
  explicit DirectoryLock(const std::string& dir, const std::string& name = "run.lock");
  ~DirectoryLock();
  DirectoryLock(const DirectoryLock&) = delete;
  DirectoryLock& operator=(const DirectoryLock&) = delete;

 private:
  int fd_ = -1;
};

}  // namespace tilt
