// Stands in for `tilt` in a fuzz case (fork_server.cpp says why): hands the fork server at $TILT_FORK_SERVER
// this process's arguments, environment, working directory, address-space limit (the case's `ulimit -v`),
// umask and standard streams, forwards the signals it receives (`timeout`'s SIGTERM) to the forked tilt,
// and ends as that tilt ended: the same exit code, or killed by the same signal. Links no LibTorch, so it
// starts in a millisecond. Exit code 125 (and a line on stderr) if the server cannot be reached.
#include <signal.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

extern char** environ;

namespace {

int server = -1;

[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "tilt_fork_client: %s: %s\n", what, std::strerror(errno));
  std::exit(125);
}

bool write_full(int fd, const void* data, size_t size) {
  const auto* bytes = static_cast<const char*>(data);
  while (size > 0) {
    const ssize_t n = send(fd, bytes, size, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    bytes += n;
    size -= static_cast<size_t>(n);
  }
  return true;
}

void forward(int signal_number) {  // a signal handler: send() is async-signal-safe
  const int saved = errno;
  const int32_t value = signal_number;
  send(server, &value, sizeof(value), MSG_NOSIGNAL);
  errno = saved;
}

void append(std::string& payload, const std::string& field) {
  payload += field;
  payload += '\0';
}

}  // namespace

int main(int argc, char** argv) {
  const char* path = std::getenv("TILT_FORK_SERVER");
  if (path == nullptr || std::strlen(path) >= sizeof(sockaddr_un::sun_path)) {
    errno = EINVAL;
    fail("TILT_FORK_SERVER (the fork server's socket) is not set or too long");
  }
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  std::strcpy(address.sun_path, path);
  server = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (server < 0) fail("socket");
  for (int attempt = 0;; ++attempt) {  // the server may still be starting: up to 10 s
    if (connect(server, reinterpret_cast<const sockaddr*>(&address), sizeof(address)) == 0) break;
    if ((errno != ENOENT && errno != ECONNREFUSED && errno != EINTR) || attempt >= 1000) fail(path);
    usleep(10000);
  }

  std::string payload;
  char cwd[PATH_MAX];
  if (getcwd(cwd, sizeof(cwd)) == nullptr) fail("getcwd");
  append(payload, cwd);
  rlimit limit{};
  getrlimit(RLIMIT_AS, &limit);
  append(payload, std::to_string(static_cast<unsigned long long>(limit.rlim_cur)));
  append(payload, std::to_string(static_cast<unsigned long long>(limit.rlim_max)));
  const mode_t mask = umask(0);
  umask(mask);
  append(payload, std::to_string(mask));
  append(payload, std::to_string(argc));
  for (int i = 0; i < argc; ++i) append(payload, argv[i]);
  for (char** variable = environ; *variable != nullptr; ++variable) {
    if (std::strncmp(*variable, "TILT_FORK_SERVER=", 17) != 0) append(payload, *variable);
  }

  // The three streams travel with the length of what follows.
  const auto length = static_cast<uint32_t>(payload.size());
  int streams[3] = {0, 1, 2};
  char control[CMSG_SPACE(sizeof(streams))] = {};
  iovec data{const_cast<uint32_t*>(&length), sizeof(length)};
  msghdr message{};
  message.msg_iov = &data;
  message.msg_iovlen = 1;
  message.msg_control = control;
  message.msg_controllen = sizeof(control);
  cmsghdr* header = CMSG_FIRSTHDR(&message);
  header->cmsg_level = SOL_SOCKET;
  header->cmsg_type = SCM_RIGHTS;
  header->cmsg_len = CMSG_LEN(sizeof(streams));
  std::memcpy(CMSG_DATA(header), streams, sizeof(streams));
  if (sendmsg(server, &message, MSG_NOSIGNAL) != static_cast<ssize_t>(sizeof(length))) fail("sendmsg");
  if (!write_full(server, payload.data(), payload.size())) fail("send");

  struct sigaction action {};
  action.sa_handler = forward;
  sigemptyset(&action.sa_mask);
  for (int signal_number : {SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGALRM}) {
    sigaction(signal_number, &action, nullptr);
  }

  int32_t status = 0;
  size_t received = 0;
  while (received < sizeof(status)) {
    const ssize_t n = recv(server, reinterpret_cast<char*>(&status) + received, sizeof(status) - received, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      errno = n == 0 ? ECONNRESET : errno;
      fail("the fork server went away before tilt ended");
    }
    received += static_cast<size_t>(n);
  }
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) {
    const int signal_number = WTERMSIG(status);
    const rlimit no_core{0, 0};
    setrlimit(RLIMIT_CORE, &no_core);
    signal(signal_number, SIG_DFL);
    sigset_t unblock;
    sigemptyset(&unblock);
    sigaddset(&unblock, signal_number);
    sigprocmask(SIG_UNBLOCK, &unblock, nullptr);
    raise(signal_number);
    return 128 + signal_number;
  }
  return 125;
}
