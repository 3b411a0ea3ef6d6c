// Data-parallel training as users run it: the tilt binary started as two processes on 127.0.0.1
// (WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT, as torchrun sets them), against one process that
// draws the same global batch in two shards (the ground truth: same seeds, same shards).
//
// Usage: tilt_dist_tests path/to/tilt [gtest flags]
#include "tilt/io/config.h"
#include "tilt/io/model_io.h"
#include "tilt/train/distributed.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <thread>

extern char** environ;

namespace tilt {
namespace {

namespace fs = std::filesystem;

std::string g_tilt;  // the tilt binary
fs::path g_work;     // this run's scratch directory
std::vector<pid_t> g_started;  // killed at the end of each test if still running (a failed test's long runs)

std::string slurp(const fs::path& p) {
  std::ifstream in(p);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// A TCP port that was free a moment ago (the kernel's choice for port 0).
int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  socklen_t len = sizeof a;
  if (fd < 0 || ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    if (fd >= 0) ::close(fd);
    return -1;
  }
  ::close(fd);
  return ntohs(a.sin_port);
}

struct Process {
  pid_t pid = -1;
  fs::path log;
};

// Starts tilt with `args` in g_work, stdout and stderr to `log`, one thread, plus `env`.
Process start(const std::vector<std::string>& args, const std::map<std::string, std::string>& env, const std::string& log) {
  std::vector<std::string> envs;
  for (char** e = environ; *e; ++e) {
    const std::string kv = *e;
    const std::string key = kv.substr(0, kv.find('='));
    if (!env.count(key) && key != "OMP_NUM_THREADS" && key != "WORLD_SIZE" && key != "RANK") envs.push_back(kv);
  }
  envs.push_back("OMP_NUM_THREADS=1");
  for (const auto& [k, v] : env) envs.push_back(k + "=" + v);
  std::vector<std::string> argv_s{g_tilt};
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  std::vector<char*> argv, envp;
  for (auto& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);
  for (auto& e : envs) envp.push_back(e.data());
  envp.push_back(nullptr);
  Process p;
  p.log = g_work / log;
  const std::string log_path = p.log.string(), dir = g_work.string();
  p.pid = ::fork();
  if (p.pid == 0) {  // only async-signal-safe calls until exec
    if (::chdir(dir.c_str()) != 0) ::_exit(126);
    FILE* f = std::fopen(log_path.c_str(), "w");
    if (!f) ::_exit(126);
    ::dup2(::fileno(f), 1);
    ::dup2(::fileno(f), 2);
    ::execve(argv[0], argv.data(), envp.data());
    ::_exit(127);
  }
  g_started.push_back(p.pid);
  return p;
}

// The exit code of p, waiting at most timeout_s (then it is killed and -1 returned). *seconds: how long.
int wait_for(const Process& p, double timeout_s, double* seconds = nullptr) {
  const auto t0 = std::chrono::steady_clock::now();
  int status = 0;
  while (true) {
    const pid_t r = ::waitpid(p.pid, &status, WNOHANG);
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (seconds) *seconds = dt;
    if (r == p.pid) return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    if (dt > timeout_s) {
      ::kill(p.pid, SIGKILL);
      ::waitpid(p.pid, &status, 0);
      return -1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

std::map<std::string, std::string> rank_env(int rank, int port) {
  return {{"WORLD_SIZE", "2"}, {"RANK", std::to_string(rank)}, {"MASTER_ADDR", "127.0.0.1"},
          {"MASTER_PORT", std::to_string(port)}, {"LOCAL_WORLD_SIZE", "2"}};
}

// Runs `args` as ranks 0 and 1 of a 2-process group; returns both exit codes, both logs in *logs.
std::pair<int, int> run_two(const std::vector<std::string>& args, const std::string& name, std::string* log0 = nullptr,
                            std::string* log1 = nullptr, const std::vector<std::string>& extra1 = {}) {
  const int port = free_port();
  std::vector<std::string> args1 = args;
  args1.insert(args1.end(), extra1.begin(), extra1.end());
  const Process r0 = start(args, rank_env(0, port), name + ".rank0.log");
  const Process r1 = start(args1, rank_env(1, port), name + ".rank1.log");
  const int c0 = wait_for(r0, 120), c1 = wait_for(r1, 120);
  if (log0) *log0 = slurp(r0.log);
  if (log1) *log1 = slurp(r1.log);
  return {c0, c1};
}

int run_one(const std::vector<std::string>& args, const std::string& name, std::string* log = nullptr) {
  const Process p = start(args, {}, name + ".log");
  const int c = wait_for(p, 120);
  if (log) *log = slurp(p.log);
  return c;
}

std::vector<at::Tensor> parameters_of(const fs::path& model) { return load_velocity(model.string()).field->parameters(); }

double max_abs_difference(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  EXPECT_EQ(a.size(), b.size());
  double d = 0;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) d = std::max(d, (a[i] - b[i]).abs().max().item<double>());
  return d;
}

std::vector<Json> json_lines(const fs::path& p) {
  std::vector<Json> out;
  std::istringstream in(slurp(p));
  std::string line;
  while (std::getline(in, line)) out.push_back(Json::parse(line));
  return out;
}

// Every number of two metrics files agrees to `rel` (relative), except the timings.
void expect_same_metrics(const fs::path& a, const fs::path& b, double rel, size_t lines) {
  const auto x = json_lines(a), y = json_lines(b);
  ASSERT_EQ(x.size(), lines) << a;
  ASSERT_EQ(y.size(), lines) << b;
  for (size_t i = 0; i < lines; ++i) {
    for (auto it = x[i].begin(); it != x[i].end(); ++it) {
      if (it.key() == "seconds" || !it.value().is_number()) continue;
      ASSERT_TRUE(y[i].contains(it.key())) << it.key();
      const double u = it.value().get<double>(), v = y[i][it.key()].get<double>();
      EXPECT_NEAR(u, v, rel * (1e-12 + std::abs(u))) << a << " line " << i + 1 << " " << it.key();
    }
  }
}

const char* kTiny = R"(seed = 1
threads = 1
[data]
type = "ring"
components = 4
radius = 2.0
std = 0.5
[base]
type = "exact"
[reward]
type = "quadratic"
center = [2.0, 0.0]
precision = 0.5
[finetune]
preset = "paper"
hidden = [32, 32]
num_steps = 20
batch_size = 32
iterations = 12
loss_early_steps = 5
loss_late_steps = 5
clip_factor = 0.0
lr = 1e-3
checkpoint_every = 6
)";

class TwoProcesses : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!distributed_available()) {
      GTEST_SKIP() << "this tilt was built without c10d's Gloo headers (Debian: libgloo-dev); nothing to test";
    }
    if (free_port() < 0) GTEST_SKIP() << "cannot bind a TCP port on 127.0.0.1 here";
    std::ofstream(g_work / "tiny.toml") << kTiny;
  }
  void TearDown() override {
    for (pid_t pid : g_started) {
      if (::waitpid(pid, nullptr, WNOHANG) == 0) {  // still running
        ::kill(pid, SIGKILL);
        ::kill(pid, SIGCONT);
        ::waitpid(pid, nullptr, 0);
      }
    }
    g_started.clear();
  }
};

// The parameters after 12 iterations of 2 processes x 1 shard equal those of 1 process x 2 shards,
// also when the 2-process run is stopped after 6 iterations and resumed; 1 process x 1 shard differs.
TEST_F(TwoProcesses, FinetuneMatchesOneProcessWithTwoShardsAlsoAfterResume) {
  std::string log0, log1;
  const auto [c0, c1] = run_two({"finetune", "-q", "-c", "tiny.toml", "-o", "two"}, "two", &log0, &log1);
  ASSERT_EQ(c0, 0) << log0;
  ASSERT_EQ(c1, 0) << log1;
  EXPECT_EQ(log1, "") << "rank 1 should be silent";
  EXPECT_NE(log0.find("distributed: 2 processes"), std::string::npos) << log0;
  std::string log;
  ASSERT_EQ(run_one({"finetune", "-q", "-c", "tiny.toml", "--set", "finetune.shards=2", "-o", "one"}, "one", &log), 0) << log;
  ASSERT_EQ(run_one({"finetune", "-q", "-c", "tiny.toml", "-o", "plain"}, "plain", &log), 0) << log;

  // Rank 0 wrote the run's files (and holds its lock), no temporaries are left, and the config records 2 shards.
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(g_work / "two")) files.push_back(e.path().filename().string());
  std::sort(files.begin(), files.end());
  EXPECT_EQ(files, (std::vector<std::string>{"checkpoint.pt", "config.resolved.json", "metrics.jsonl", "model.pt",
                                             "run.lock", "training_ess.png", "training_loss.png",
                                             "training_loss_median.png", "training_reward.png"}));
  EXPECT_EQ(Json::parse(slurp(g_work / "two/config.resolved.json"))["finetune"]["shards"], 2);

  const auto one = parameters_of(g_work / "one/model.pt");
  const double d = max_abs_difference(parameters_of(g_work / "two/model.pt"), one);
  double scale = 0;
  for (const auto& p : one) scale = std::max(scale, p.abs().max().item<double>());
  std::printf("2 processes vs 1 process x 2 shards: max |parameter difference| = %.3g (largest |parameter| %.3g)\n", d,
              scale);
  EXPECT_LE(d, 1e-6 * scale);
  const double d_plain = max_abs_difference(parameters_of(g_work / "plain/model.pt"), one);
  EXPECT_GT(d_plain, 1e-3 * scale) << "1 shard should draw other samples than 2 shards";
  expect_same_metrics(g_work / "two/metrics.jsonl", g_work / "one/metrics.jsonl", 1e-6, 12);

  // Distributed resume: 6 iterations, then --resume to 12, both on 2 processes.
  auto [r0, r1] = run_two({"finetune", "-q", "-c", "tiny.toml", "--set", "finetune.iterations=6", "-o", "resumed"},
                          "resumed6", &log0, &log1);
  ASSERT_EQ(r0, 0) << log0;
  ASSERT_EQ(r1, 0) << log1;
  std::tie(r0, r1) = run_two({"finetune", "-q", "-c", "tiny.toml", "-o", "resumed", "--resume"}, "resumed12", &log0, &log1);
  ASSERT_EQ(r0, 0) << log0;
  ASSERT_EQ(r1, 0) << log1;
  EXPECT_NE(log0.find("resumed resumed at iteration 6"), std::string::npos) << log0;
  const double d_resumed = max_abs_difference(parameters_of(g_work / "resumed/model.pt"), one);
  std::printf("resumed on 2 processes vs 1 process x 2 shards: max |parameter difference| = %.3g\n", d_resumed);
  EXPECT_LE(d_resumed, 1e-6 * scale);
  expect_same_metrics(g_work / "resumed/metrics.jsonl", g_work / "one/metrics.jsonl", 1e-6, 12);
}

// An early stop on 2 processes: both stop at the same iteration (rank 0's decision), and a --resume stops both again
// at once, although only rank 0 replays the metrics file; with the early stop off both train on to 12.
TEST_F(TwoProcesses, AnEarlyStopStopsEveryRankAlsoOnResume) {
  const std::vector<std::string> early{"finetune", "-q", "-c", "tiny.toml", "--set", "finetune.early_stop=ess",
                                       "--set", "finetune.early_stop_window=2", "--set",
                                       "finetune.early_stop_tolerance=1", "-o", "early"};
  std::string log0, log1;
  auto [c0, c1] = run_two(early, "early", &log0, &log1);
  ASSERT_EQ(c0, 0) << log0;
  ASSERT_EQ(c1, 0) << log1;
  const auto lines = json_lines(g_work / "early/metrics.jsonl");
  ASSERT_GE(lines.size(), 4u);
  ASSERT_LT(lines.size(), 12u);
  EXPECT_TRUE(lines.back().contains("early_stop")) << lines.back().dump();
  EXPECT_NE(log0.find("stopped early at iteration " + std::to_string(lines.size())), std::string::npos) << log0;

  std::vector<std::string> again = early;
  again.push_back("--resume");
  std::tie(c0, c1) = run_two(again, "early_again", &log0, &log1);
  ASSERT_EQ(c0, 0) << log0;
  ASSERT_EQ(c1, 0) << log1;
  EXPECT_NE(log0.find("nothing to resume"), std::string::npos) << log0;
  EXPECT_EQ(json_lines(g_work / "early/metrics.jsonl").size(), lines.size());

  std::tie(c0, c1) = run_two({"finetune", "-q", "-c", "tiny.toml", "-o", "early", "--resume"}, "early_off", &log0, &log1);
  ASSERT_EQ(c0, 0) << log0;
  ASSERT_EQ(c1, 0) << log1;
  EXPECT_EQ(json_lines(g_work / "early/metrics.jsonl").size(), 12u);
}

// tilt soc with a loss that has a second parameter group (moment's y0) and one with self-normalised
// weights, in double precision: the same per-iteration losses and evaluations as 1 process x 2 shards.
TEST_F(TwoProcesses, SocMatchesOneProcessWithTwoShards) {
  const std::vector<std::string> args{"soc",         "-q", "-p", "linear_ou",    "-l",   "moment", "-l", "socm_const_M",
                                      "--iterations", "8", "--batch", "32", "--hidden", "16", "--eval-every", "4",
                                      "--eval-batch", "64", "--threads", "1", "--json"};
  std::string log0, log1, log;
  auto two = args, one = args;
  two.insert(two.end(), {"-o", "soc_two"});
  one.insert(one.end(), {"--shards", "2", "-o", "soc_one"});
  const auto [c0, c1] = run_two(two, "soc_two", &log0, &log1);
  ASSERT_EQ(c0, 0) << log0;
  ASSERT_EQ(c1, 0) << log1;
  EXPECT_EQ(log1, "") << "rank 1 should print nothing";
  ASSERT_EQ(run_one(one, "soc_one", &log), 0) << log;
  for (const char* loss : {"moment", "socm_const_M"}) {
    expect_same_metrics(g_work / "soc_two" / (std::string(loss) + ".jsonl"), g_work / "soc_one" / (std::string(loss) + ".jsonl"),
                        1e-9, 8);
    expect_same_metrics(g_work / "soc_two" / (std::string(loss) + ".eval.jsonl"),
                        g_work / "soc_one" / (std::string(loss) + ".eval.jsonl"), 1e-9, 3);
  }
}

// Starts a long 2-process run and waits for its first checkpoint.
std::pair<Process, Process> start_long_run(const std::string& name, const std::string& timeout) {
  const int port = free_port();
  const std::vector<std::string> args{"finetune", "-q", "-c", "tiny.toml", "--set", "finetune.iterations=1000000",
                                      "--set", "finetune.checkpoint_every=3", "--dist-timeout", timeout, "-o", name};
  const Process r0 = start(args, rank_env(0, port), name + ".rank0.log");
  const Process r1 = start(args, rank_env(1, port), name + ".rank1.log");
  for (int i = 0; i < 600 && !fs::exists(g_work / name / "checkpoint.pt"); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  return {r0, r1};
}

// The last checkpoint of a failed run loads, and training continues from it in one process.
void expect_resumable(const std::string& name) {
  std::string log;
  const int iterations = json_lines(g_work / name / "metrics.jsonl").size();
  EXPECT_EQ(run_one({"finetune", "-q", "-c", "tiny.toml", "--set", "finetune.shards=2", "--set",
                     "finetune.iterations=" + std::to_string(iterations + 3), "-o", name, "--resume"},
                    name + ".resume", &log),
            0)
      << log;
  EXPECT_NE(log.find("resumed " + name + " at iteration"), std::string::npos) << log;
}

TEST_F(TwoProcesses, AKilledRankStopsTheOtherWithAClearErrorAndTheCheckpointLoads) {
  auto [r0, r1] = start_long_run("killed", "60");
  ASSERT_TRUE(fs::exists(g_work / "killed/checkpoint.pt")) << slurp(r0.log) << slurp(r1.log);
  ::kill(r1.pid, SIGKILL);
  double seconds = 0;
  const int code = wait_for(r0, 30, &seconds);
  wait_for(r1, 5);
  const std::string log = slurp(r0.log);
  std::printf("rank 0 stopped %.2f s after rank 1 was killed:\n%s", seconds, log.c_str());
  EXPECT_EQ(code, 1) << log;
  EXPECT_LT(seconds, 10) << "rank 0 should notice the closed connection at once, not wait for the time-out";
  EXPECT_NE(log.find("rank 1 closed its connection: it has probably died"), std::string::npos) << log;
  EXPECT_NE(log.find("the last checkpoint, killed/checkpoint.pt, is intact"), std::string::npos) << log;
  expect_resumable("killed");

  // Rank 0 (the rendezvous server and the writer) killed: rank 1 stops too.
  std::tie(r0, r1) = start_long_run("killed0", "60");
  ASSERT_TRUE(fs::exists(g_work / "killed0/checkpoint.pt")) << slurp(r0.log) << slurp(r1.log);
  ::kill(r0.pid, SIGKILL);
  EXPECT_EQ(wait_for(r1, 30, &seconds), 1) << slurp(r1.log);
  wait_for(r0, 5);
  EXPECT_LT(seconds, 10);
  EXPECT_NE(slurp(r1.log).find("rank 0 closed its connection: it has probably died"), std::string::npos) << slurp(r1.log);
}

TEST_F(TwoProcesses, AStalledRankTimesOutWithAClearError) {
  auto [r0, r1] = start_long_run("stalled", "2");
  ASSERT_TRUE(fs::exists(g_work / "stalled/checkpoint.pt")) << slurp(r0.log) << slurp(r1.log);
  ::kill(r1.pid, SIGSTOP);
  double seconds = 0;
  const int code = wait_for(r0, 30, &seconds);
  ::kill(r1.pid, SIGKILL);
  ::kill(r1.pid, SIGCONT);
  wait_for(r1, 5);
  const std::string log = slurp(r0.log);
  std::printf("rank 0 stopped %.2f s after rank 1 was frozen (time-out 2 s):\n%s", seconds, log.c_str());
  EXPECT_EQ(code, 1) << log;
  EXPECT_LT(seconds, 10);
  EXPECT_NE(log.find("rank 1 did not answer within the time-out of 2 s"), std::string::npos) << log;
  expect_resumable("stalled");
}

TEST_F(TwoProcesses, MismatchedConfigurationsAndMissingRanksAreClearErrors) {
  std::string log0, log1;
  const auto [c0, c1] = run_two({"finetune", "-q", "-c", "tiny.toml", "-o", "mismatch"}, "mismatch", &log0, &log1,
                                {"--set", "finetune.lr=2e-3"});
  EXPECT_EQ(c0, 1) << log0;
  EXPECT_EQ(c1, 1) << log1;
  for (const std::string& log : {log0, log1}) {
    EXPECT_NE(log.find("the configuration (config file and --set) of rank 1 differs from rank 0's"), std::string::npos)
        << log;
  }
  EXPECT_FALSE(fs::exists(g_work / "mismatch"));

  // Rank 0 alone: nobody comes within the time-out.
  const Process lone = start({"finetune", "-q", "-c", "tiny.toml", "--dist-timeout", "1", "-o", "lone"},
                             rank_env(0, free_port()), "lone.log");
  double seconds = 0;
  EXPECT_EQ(wait_for(lone, 30, &seconds), 1);
  EXPECT_NE(slurp(lone.log).find("only 1 of the 2 processes joined the rendezvous"), std::string::npos) << slurp(lone.log);
  EXPECT_LT(seconds, 10);
}

// A program that holds a TCP port on 127.0.0.1, accepts every connection and never answers: not a
// c10d TCPStore, so a rank that takes it for rank 0's store gets no reply to its first request.
class MuteServer {
 public:
  MuteServer() {
    fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    if (fd_ < 0 || ::bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || ::listen(fd_, 16) != 0 ||
        ::getsockname(fd_, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
      return;
    }
    port_ = ntohs(a.sin_port);
    thread_ = std::thread([this] {
      while (!stop_) {
        pollfd p{fd_, POLLIN, 0};
        if (::poll(&p, 1, 50) > 0) {
          const int c = ::accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
          if (c >= 0) {
            connections_.push_back(c);  // held open, never read or written
            ++accepted_;
          }
        }
      }
    });
  }
  ~MuteServer() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
    for (int c : connections_) ::close(c);
    if (fd_ >= 0) ::close(fd_);
  }
  int port() const { return port_; }
  int connections() const { return accepted_; }

 private:
  int fd_ = -1, port_ = -1;
  std::atomic<bool> stop_{false};
  std::atomic<int> accepted_{0};
  std::vector<int> connections_;  // only the thread touches it until it is joined
  std::thread thread_;
};

// MASTER_PORT held by a program that accepts connections and never answers: rank 1 (a client of
// rank 0's store), and rank 0 under torchrun's agent store (a client too), stop within their
// time-out with an error naming the address and the time-out, instead of waiting for ever.
TEST_F(TwoProcesses, AMasterPortHeldByAProgramThatNeverAnswersIsAClearErrorWithinTheTimeOut) {
  MuteServer mute;
  ASSERT_GT(mute.port(), 0);
  const std::vector<std::string> args{"finetune", "-q", "-c", "tiny.toml", "--dist-timeout", "2", "-o", "mute"};
  auto agent = rank_env(0, mute.port());
  agent["TORCHELASTIC_USE_AGENT_STORE"] = "True";
  const Process r1 = start(args, rank_env(1, mute.port()), "mute.rank1.log");
  const Process r0 = start(args, agent, "mute.agent0.log");
  const std::string where = "127.0.0.1:" + std::to_string(mute.port());
  for (const Process& p : {r1, r0}) {
    double seconds = 0;
    const int code = wait_for(p, 30, &seconds);
    const std::string log = slurp(p.log);
    std::printf("%s stopped after %.2f s (time-out 2 s):\n%s", p.log.filename().c_str(), seconds, log.c_str());
    EXPECT_EQ(code, 1) << log;
    EXPECT_LT(seconds, 10) << log;
    EXPECT_NE(log.find("tilt: error: "), std::string::npos) << log;
    EXPECT_NE(log.find(where), std::string::npos) << log;
    EXPECT_NE(log.find("within the time-out of 2 s"), std::string::npos) << log;
  }
  EXPECT_GE(mute.connections(), 2);
  EXPECT_FALSE(fs::exists(g_work / "mute"));
}

}  // namespace
}  // namespace tilt

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s path/to/tilt [gtest flags]\n", argv[0]);
    return 2;
  }
  tilt::g_tilt = std::filesystem::absolute(argv[1]).string();
  tilt::g_work = std::filesystem::temp_directory_path() / ("tilt_dist_" + std::to_string(::getpid()));
  std::filesystem::create_directories(tilt::g_work);
  const int rc = RUN_ALL_TESTS();
  if (rc == 0) std::filesystem::remove_all(tilt::g_work);  // kept on failure, for the logs
  return rc;
}
