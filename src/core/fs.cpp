#include "tilt/core/fs.h"

#include "tilt/core/error.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

namespace tilt {
namespace fs = std::filesystem;

namespace {

const std::string kTemporaryInfix = ".tmp.";

std::string temporary_path(const std::string& path) {
  return path + kTemporaryInfix + std::to_string(static_cast<long>(getpid()));
}

// The PID of a temporary file name "<name>.tmp.<pid>", or 0 if the name is not one.
long temporary_owner(const std::string& name) {
  const auto at = name.rfind(kTemporaryInfix);
  if (at == std::string::npos || at == 0) return 0;
  const std::string digits = name.substr(at + kTemporaryInfix.size());
  if (digits.empty() || digits.size() > 9 || digits.find_first_not_of("0123456789") != std::string::npos) return 0;
  return std::stol(digits);
}

// A process of that PID exists (kill(pid, 0) fails with ESRCH only when none does).
bool process_alive(long pid) { return kill(static_cast<pid_t>(pid), 0) == 0 || errno != ESRCH; }

void remove_if_stale(const fs::path& file) {
  const long pid = temporary_owner(file.filename().string());
  if (pid <= 0 || pid == static_cast<long>(getpid()) || process_alive(pid)) return;
  std::error_code ec;
  fs::remove(file, ec);  // best effort: a file we cannot remove is ignored, never read
}

// Makes a rename durable: the directory entry reaches the disk too. Some file systems refuse
// fsync on a directory; the rename itself has happened, so that is not an error.
void sync_directory(const fs::path& dir) {
  const int fd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd < 0) return;
  ::fsync(fd);
  ::close(fd);
}

[[noreturn]] void fail_write(const std::string& path, int err) {
  throw Error("cannot write '" + path + "': " + std::strerror(err));
}

}  // namespace

int write_all(int fd, const void* data, size_t size) {
  const char* p = static_cast<const char*>(data);
  size_t done = 0;
  while (done < size) {
    const ssize_t n = ::write(fd, p + done, size - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return n < 0 ? errno : ENOSPC;
    done += static_cast<size_t>(n);
  }
  return 0;
}

void remove_stale_temporaries(const std::string& path) {
  const fs::path p(path);
  const fs::path dir = p.parent_path().empty() ? fs::path(".") : p.parent_path();
  const std::string prefix = p.filename().string() + kTemporaryInfix;
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    if (it->path().filename().string().rfind(prefix, 0) == 0) remove_if_stale(it->path());
  }
}

void remove_stale_temporaries_in(const std::string& dir) {
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    if (it->is_regular_file(ec)) remove_if_stale(it->path());
  }
}

namespace {

// The file that writing `path` replaces: path itself, or the end of the chain of symbolic links it names (a link
// is written through, not replaced by a file of its own). Something other than a regular file there (a device such
// as /dev/full, a pipe, a socket) is refused: tilt writes whole files by renaming, which would replace it.
fs::path write_target(const std::string& path) {
  if (!path.empty() && path.back() == '/') throw Error("cannot write '" + path + "': it names a directory; give a file path");
  fs::path at(path);
  std::error_code ec;
  for (int hops = 0; fs::is_symlink(fs::symlink_status(at, ec)); ++hops) {
    if (hops == 40) throw Error("cannot write '" + path + "': too many levels of symbolic links");
    const fs::path next = fs::read_symlink(at, ec);
    if (ec) throw Error("cannot write '" + path + "': " + ec.message());
    at = next.is_absolute() ? next : at.parent_path() / next;
    // /dev/stdout -> /proc/self/fd/1 -> the shell's pipe or file: a descriptor of this process, not a path that
    // renaming could write.
    if (at.string().rfind("/proc/", 0) == 0) {
      throw Error("cannot write '" + path + "': it names one of the process's open files (" + at.string() +
                  "), not a file path; tilt writes its outputs as whole files. Give a file path");
    }
  }
  const fs::file_status st = fs::status(at, ec);
  if (fs::is_directory(st)) throw Error("cannot write '" + path + "': it is a directory");
  if (fs::exists(st) && !fs::is_regular_file(st)) {
    throw Error("cannot write '" + path + "': it is not a regular file (a device, pipe or socket); tilt writes " +
                "its outputs as whole files, which would replace it. Give a file path");
  }
  return at;
}

}  // namespace

void atomic_write_with(const std::string& path, const std::function<void(const std::string&)>& write_to) {
  std::error_code ec;
  const fs::path target = write_target(path);
  const fs::path parent = target.parent_path();
  if (!parent.empty()) make_directories(parent.string());
  remove_stale_temporaries(target.string());
  const std::string tmp = temporary_path(target.string());
  try {
    write_to(tmp);
  } catch (...) {
    fs::remove(tmp, ec);
    throw;
  }
  fs::rename(tmp, target, ec);
  if (ec) {
    std::error_code ignored;
    fs::remove(tmp, ignored);
    throw Error("cannot write '" + path + "': " + ec.message());
  }
  sync_directory(parent);
}

void atomic_write(const std::string& path, const std::string& content) {
  atomic_write_with(path, [&](const std::string& tmp) {
    const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) fail_write(path, errno);
    if (const int err = write_all(fd, content.data(), content.size())) {
      ::close(fd);
      fail_write(path, err);
    }
    if (::fsync(fd) != 0) {
      const int err = errno;
      ::close(fd);
      fail_write(path, err);
    }
    if (::close(fd) != 0) fail_write(path, errno);
  });
}

void refuse_unreadable_kind(const std::string& path, const std::string& what) {
  std::error_code ec;
  const fs::file_status status = fs::status(path, ec);  // through symbolic links
  if (fs::is_directory(status)) throw Error("cannot read " + what + " '" + path + "': it is a directory");
  // /dev/zero or /dev/urandom never end: read whole, they filled the memory. A pipe (a shell's <(...)) is read.
  if (fs::is_character_file(status) || fs::is_block_file(status) || fs::is_socket(status)) {
    throw Error("cannot read " + what + " '" + path + "': it is a device or a socket, not a file");
  }
}

std::string read_file(const std::string& path, const std::string& what) {
  refuse_unreadable_kind(path, what);
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error("cannot read " + what + " '" + path + "': " + std::strerror(errno));
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) throw Error("cannot read " + what + " '" + path + "': read error");
  return ss.str();
}

void make_directories(const std::string& path) {
  if (path.empty()) return;
  std::error_code ec;
  fs::create_directories(path, ec);
  if (ec) throw Error("cannot create directory '" + path + "': " + ec.message());
}

bool file_exists(const std::string& path) {
  std::error_code ec;
  return fs::exists(path, ec);
}

bool same_file(const std::string& a, const std::string& b) {
  if (a.empty() || b.empty()) return false;
  std::error_code ec;
  if (fs::exists(a, ec) && fs::exists(b, ec)) {
    const bool same = fs::equivalent(a, b, ec);
    if (!ec) return same;
  }
  const fs::path ca = fs::weakly_canonical(fs::absolute(a, ec), ec);
  const fs::path cb = fs::weakly_canonical(fs::absolute(b, ec), ec);
  return ca == cb;
}

void refuse_output_over_input(const std::string& flag, const std::string& out,
                              const std::vector<std::pair<std::string, std::string>>& inputs) {
  std::error_code ec;
  const fs::path target = write_target(out);
  const fs::path parent = target.parent_path().empty() ? fs::path(".") : target.parent_path();
  for (const auto& [what, in] : inputs) {
    if (same_file(out, in)) {
      throw Error(flag + " '" + out + "' is also " + what + " '" + in + "': writing it would destroy what this command reads; choose another " + flag);
    }
    // An input directory (a data set's) is read file by file: none of its files is replaced. New files are allowed.
    if (!in.empty() && fs::is_directory(in, ec) && fs::is_regular_file(target, ec) && same_file(parent.string(), in)) {
      throw Error(flag + " '" + out + "' is a file of " + what + " '" + in +
                  "', a directory this command reads: writing it could destroy its data; choose another " + flag);
    }
  }
  // A file of a run directory (one a DirectoryLock marks) is the run's: a command writing one file
  // never replaces it. New files beside them are allowed.
  if (fs::is_regular_file(target, ec) && fs::exists(parent / "run.lock", ec)) {
    throw Error(flag + " '" + out + "' is a file of the run in '" + parent.string() +
                "': writing it would replace the run's own file; choose another " + flag);
  }
}

DirectoryLock::DirectoryLock(const std::string& dir, const std::string& name) {
  make_directories(dir);
  const std::string path = (fs::path(dir) / name).string();
  fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd_ < 0) throw Error("cannot lock '" + dir + "': cannot open '" + path + "': " + std::strerror(errno));
  if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    char buf[32] = {0};
    const ssize_t n = ::pread(fd_, buf, sizeof buf - 1, 0);
    ::close(fd_);
    fd_ = -1;
    if (err == EWOULDBLOCK) {
      std::string pid = n > 0 ? std::string(buf, static_cast<size_t>(n)) : std::string("?");
      while (!pid.empty() && (pid.back() == '\n' || pid.back() == ' ')) pid.pop_back();
      throw Error("'" + dir + "' is in use by another tilt process (PID " + pid +
                  "); wait for it to finish or stop it, or choose another directory");
    }
    throw Error("cannot lock '" + dir + "': " + std::strerror(err));
  }
  const std::string pid = std::to_string(static_cast<long>(getpid())) + "\n";
  if (::ftruncate(fd_, 0) != 0 || ::pwrite(fd_, pid.data(), pid.size(), 0) != static_cast<ssize_t>(pid.size())) {
    // The lock is held; only the PID shown to a second process is missing (e.g. a full disk).
  }
}

DirectoryLock::~DirectoryLock() {
  if (fd_ >= 0) ::close(fd_);  // closing releases the lock
}

}  // namespace tilt
