// The fuzz corpus's fork server: tilt's command line (apps/tilt/cli.cpp), loaded once and forked for each case.
//
// Why: a fresh tilt process spends ~0.65 s of CPU before main (Debian's LibTorch loads ~290 shared libraries
// and registers its operators), and the corpus starts ~600 of them. This process pays that once; each case's
// stand-in (fork_client.cpp) hands it the case's command line, environment, working directory, address-space
// limit and standard streams, and a forked copy runs tilt on them, as `tilt` would have from main. What the
// corpus checks (the exit code or signal, stderr, the files) is the forked copy's. FUZZ_FORK=0 in
// fuzz_test.sh runs every case as a fresh process instead.
//
// Usage: tilt_fork_server SOCKET PROGRAM
//   SOCKET   the Unix socket to listen on (created; removed first if it exists)
//   PROGRAM  argv[0] of the forked tilt (the real binary's path, as a fresh process would see it)
//
// Protocol, one connection per case: the client sends its stdin, stdout and stderr (SCM_RIGHTS) with a
// 4-byte length, then that many bytes of NUL-terminated strings: the working directory, RLIMIT_AS's soft
// and hard limits, the umask, argc, the arguments, then the environment. While tilt runs, each 4-byte
// value the client sends is a signal to forward (its own SIGTERM from `timeout`, say); if the client
// goes away, tilt is killed. When tilt ends the server answers its 4-byte wait status.
//
// Forking is safe only while this process has a single thread: it checks that before listening, and
// touches nothing of LibTorch itself.
#include "registry.h"

#include <dirent.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

namespace {

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "tilt_fork_server: %s: %s\n", what.c_str(), std::strerror(errno));
  std::exit(2);
}

bool read_full(int fd, void* data, size_t size) {
  auto* bytes = static_cast<char*>(data);
  while (size > 0) {
    const ssize_t n = read(fd, bytes, size);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    bytes += n;
    size -= static_cast<size_t>(n);
  }
  return true;
}

int thread_count() {
  DIR* tasks = opendir("/proc/self/task");
  if (tasks == nullptr) return -1;
  int count = 0;
  while (const dirent* entry = readdir(tasks)) {
    if (entry->d_name[0] != '.') ++count;
  }
  closedir(tasks);
  return count;
}

// The request's first message: the three streams and the length of what follows.
bool receive_streams(int connection, int streams[3], uint32_t& length) {
  char control[CMSG_SPACE(3 * sizeof(int))];
  iovec data{&length, sizeof(length)};
  msghdr message{};
  message.msg_iov = &data;
  message.msg_iovlen = 1;
  message.msg_control = control;
  message.msg_controllen = sizeof(control);
  ssize_t n;
  do {
    n = recvmsg(connection, &message, MSG_CMSG_CLOEXEC);
  } while (n < 0 && errno == EINTR);
  const cmsghdr* header = CMSG_FIRSTHDR(&message);
  if (n != static_cast<ssize_t>(sizeof(length)) || header == nullptr || header->cmsg_type != SCM_RIGHTS ||
      header->cmsg_len != CMSG_LEN(3 * sizeof(int))) {
    return false;
  }
  std::memcpy(streams, CMSG_DATA(header), 3 * sizeof(int));
  return true;
}

void on_child(int) {}  // SIGCHLD only has to interrupt ppoll

// In the forked copy: become the case's process, then run tilt. Never returns.
[[noreturn]] void run_tilt(const std::vector<std::string>& fields, const int streams[3], const std::string& program,
                           const sigset_t& mask) {
  for (int fd = 0; fd < 3; ++fd) {
    if (dup2(streams[fd], fd) < 0) _exit(125);
  }
  for (int fd = 0; fd < 3; ++fd) {
    if (streams[fd] > 2) close(streams[fd]);
  }
  signal(SIGPIPE, SIG_DFL);
  signal(SIGCHLD, SIG_DFL);
  sigprocmask(SIG_SETMASK, &mask, nullptr);
  size_t next = 0;
  const std::string& cwd = fields[next++];
  const rlimit limit{std::strtoull(fields[next].c_str(), nullptr, 10), std::strtoull(fields[next + 1].c_str(), nullptr, 10)};
  next += 2;
  umask(static_cast<mode_t>(std::strtoul(fields[next++].c_str(), nullptr, 10)));
  const size_t argc = std::strtoul(fields[next++].c_str(), nullptr, 10);
  if (argc == 0 || next + argc > fields.size()) _exit(125);
  if (chdir(cwd.c_str()) != 0 || setrlimit(RLIMIT_AS, &limit) != 0) {
    std::fprintf(stderr, "tilt_fork_server: the case's directory or memory limit: %s\n", std::strerror(errno));
    _exit(125);
  }
  std::vector<std::string> arguments(fields.begin() + static_cast<long>(next), fields.begin() + static_cast<long>(next + argc));
  arguments[0] = program;
  clearenv();
  for (size_t i = next + argc; i < fields.size(); ++i) putenv(strdup(fields[i].c_str()));
  std::vector<char*> argv;
  for (auto& argument : arguments) argv.push_back(argument.data());
  argv.push_back(nullptr);
  const int code = tilt::cli::run_command_line(static_cast<int>(argc), argv.data());
  // The streams flushed, then out without the static destructors: in a forked copy, LibTorch's take ~0.5 s of
  // copy-on-write page faults, as long as the start-up this server saves. (A fresh tilt runs them; the
  // other CLI tests do.)
  std::cout.flush();
  std::cerr.flush();
  std::fflush(nullptr);
  _exit(code);
}

// One case, in a process of its own: receive the request, fork tilt, forward signals, answer its wait status.
[[noreturn]] void serve(int connection, const std::string& program) {
  // The server ignores SIGCHLD (its workers need no reaping); this worker waits for tilt, woken by SIGCHLD,
  // which stays blocked but while ppoll waits (so that an exit between waitpid and ppoll is not missed).
  struct sigaction child_action {};
  child_action.sa_handler = on_child;
  sigemptyset(&child_action.sa_mask);
  sigaction(SIGCHLD, &child_action, nullptr);
  signal(SIGPIPE, SIG_IGN);
  sigset_t only_child, mask, unblocked;
  sigemptyset(&only_child);
  sigaddset(&only_child, SIGCHLD);
  sigprocmask(SIG_BLOCK, &only_child, &mask);
  unblocked = mask;
  sigdelset(&unblocked, SIGCHLD);
  int streams[3];
  uint32_t length = 0;
  if (!receive_streams(connection, streams, length) || length > (64u << 20)) _exit(1);
  std::string payload(length, '\0');
  if (!read_full(connection, payload.data(), length)) _exit(1);
  std::vector<std::string> fields;
  for (size_t start = 0; start < payload.size();) {
    const size_t end = payload.find('\0', start);
    if (end == std::string::npos) _exit(1);
    fields.push_back(payload.substr(start, end - start));
    start = end + 1;
  }
  if (fields.size() < 6) _exit(1);
  std::fflush(nullptr);
  const pid_t child = fork();
  if (child < 0) _exit(1);
  if (child == 0) {
    close(connection);
    run_tilt(fields, streams, program, mask);
  }
  for (int fd : streams) close(fd);
  bool client_gone = false;
  int status = 0;
  for (;;) {
    const pid_t done = waitpid(child, &status, client_gone ? 0 : WNOHANG);
    if (done == child) break;
    if (client_gone) continue;  // then waitpid blocks
    pollfd wait_for{connection, POLLIN, 0};
    if (ppoll(&wait_for, 1, nullptr, &unblocked) > 0) {
      int32_t signal_number = 0;
      if (read_full(connection, &signal_number, sizeof(signal_number))) {
        kill(child, signal_number);
      } else {
        kill(child, SIGKILL);  // the client was killed (`timeout -k`): so is tilt
        client_gone = true;
      }
    }
  }
  const int32_t answer = status;
  send(connection, &answer, sizeof(answer), MSG_NOSIGNAL);
  _exit(0);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: tilt_fork_server SOCKET PROGRAM\n");
    return 2;
  }
  const std::string path = argv[1];
  const std::string program = argv[2];
  prctl(PR_SET_PDEATHSIG, SIGTERM);  // the test that started it ends, or is killed: so is the server
  const int threads = thread_count();
  if (threads != 1) {
    std::fprintf(stderr, "tilt_fork_server: %d threads after start-up; forking would not be safe\n", threads);
    return 2;
  }
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  if (path.size() >= sizeof(address.sun_path)) {
    std::fprintf(stderr, "tilt_fork_server: socket path too long: %s\n", path.c_str());
    return 2;
  }
  std::memcpy(address.sun_path, path.c_str(), path.size() + 1);
  const int listener = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (listener < 0) die("socket");
  unlink(path.c_str());
  if (bind(listener, reinterpret_cast<const sockaddr*>(&address), sizeof(address)) != 0) die("bind " + path);
  if (listen(listener, 64) != 0) die("listen");
  signal(SIGCHLD, SIG_IGN);
  for (;;) {
    const int connection = accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
    if (connection < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      die("accept");
    }
    std::fflush(nullptr);
    const pid_t worker = fork();
    if (worker == 0) {
      close(listener);
      serve(connection, program);
    }
    if (worker < 0) std::fprintf(stderr, "tilt_fork_server: fork: %s\n", std::strerror(errno));
    close(connection);
  }
}
