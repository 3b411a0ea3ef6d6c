// The distributed engine: c10d's TCPStore and ProcessGroupGloo, as PyTorch's own
// torch.distributed.init_process_group("gloo", init_method="env://") uses them
// (torch/distributed/rendezvous.py: rank 0 hosts the TCPStore, or torchrun's agent does, and every
// rank waits for the others;
// torch/distributed/distributed_c10d.py: ProcessGroupGloo over that store, Options.timeout).
// Every c10d and gloo header stays in this file.
#include "tilt/train/distributed.h"

#include "tilt/core/error.h"

#include <ATen/ATen.h>

#if TILT_HAVE_GLOO
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#endif

#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <limits>
#include <mutex>
#include <thread>

namespace tilt {

namespace {

std::string env_or_empty(const std::function<const char*(const char*)>& getenv, const char* name) {
  const char* v = getenv ? getenv(name) : std::getenv(name);
  return v ? std::string(v) : std::string();
}

// A whole non-negative decimal integer, or throws naming the variable.
int64_t parse_env_integer(const std::string& name, const std::string& value, int64_t lo, int64_t hi) {
  if (value.empty() || value.find_first_not_of("0123456789") != std::string::npos || value.size() > 10) {
    throw Error("distributed training: " + name + "='" + value + "' is not a whole number");
  }
  const int64_t v = std::stoll(value);
  if (v < lo || v > hi) {
    throw Error("distributed training: " + name + "=" + value + " is out of range [" + std::to_string(lo) + ", " +
                std::to_string(hi) + "]");
  }
  return v;
}

[[maybe_unused]] bool is_loopback(const std::string& host) {  // unused without Gloo
  return host == "localhost" || host.rfind("127.", 0) == 0 || host == "::1";
}

// FNV-1a, 64 bits: the same on every machine (std::hash need not be).
[[maybe_unused]] int64_t fnv1a(const std::string& s) {
  uint64_t h = 1469598103934665603ULL;
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ULL;
  }
  return static_cast<int64_t>(h);
}

}  // namespace

std::optional<DistributedOptions> distributed_options_from_env(const std::function<const char*(const char*)>& getenv) {
  const std::string world = env_or_empty(getenv, "WORLD_SIZE");
  if (world.empty()) return std::nullopt;
  DistributedOptions o;
  o.world_size = static_cast<int>(parse_env_integer("WORLD_SIZE", world, 1, 1 << 20));
  if (o.world_size == 1) return std::nullopt;
  const std::string rank = env_or_empty(getenv, "RANK");
  if (rank.empty()) {
    throw Error("distributed training: WORLD_SIZE=" + world + " but RANK is not set (each process needs its rank, "
                "0.." + std::to_string(o.world_size - 1) + "; torchrun sets it)");
  }
  o.rank = static_cast<int>(parse_env_integer("RANK", rank, 0, o.world_size - 1));
  o.master_addr = env_or_empty(getenv, "MASTER_ADDR");
  if (o.master_addr.empty()) {
    throw Error("distributed training: WORLD_SIZE=" + world + " but MASTER_ADDR is not set (the address of rank 0, "
                "e.g. 127.0.0.1 on one machine)");
  }
  const std::string port = env_or_empty(getenv, "MASTER_PORT");
  if (port.empty()) throw Error("distributed training: WORLD_SIZE=" + world + " but MASTER_PORT is not set");
  o.master_port = static_cast<int>(parse_env_integer("MASTER_PORT", port, 1, 65535));
  o.interface = env_or_empty(getenv, "GLOO_SOCKET_IFNAME");
  // torch/distributed/rendezvous.py, _create_c10d_store: under torchrun's agent ("True", exactly).
  o.agent_store = env_or_empty(getenv, "TORCHELASTIC_USE_AGENT_STORE") == "True";
  if (o.agent_store) {
    const std::string restart = env_or_empty(getenv, "TORCHELASTIC_RESTART_COUNT");
    o.restart_count = restart.empty() ? 0 : static_cast<int>(parse_env_integer("TORCHELASTIC_RESTART_COUNT", restart, 0, 1 << 20));
  }
  return o;
}

void run_on_rank0(ProcessGroup* group, const std::function<void()>& f) {
  if (!group || group->world_size() == 1) {
    f();
    return;
  }
  if (group->rank() == 0) {
    try {
      f();
    } catch (const std::exception& e) {
      // Tell the others why before going; if that fails too, the original error matters more.
      try {
        group->broadcast_bytes(std::string("E") + e.what(), "rank 0's report of its error");
      } catch (const Error&) {
      }
      throw;
    }
    group->broadcast_bytes("", "rank 0's go-ahead");
  } else {
    const std::string status = group->broadcast_bytes("", "waiting for rank 0");
    if (!status.empty()) throw Error("rank 0 stopped: " + status.substr(1));
  }
}

#if TILT_HAVE_GLOO

bool distributed_available() { return true; }

struct ProcessGroup::Impl {
  DistributedOptions options;
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::ProcessGroupGloo> pg;

  // Turns a failed collective into a message that says what happened and what to look at.
  std::string lost_contact(const std::string& what, const std::string& detail) const {
    const bool timed_out = detail.find("imed out") != std::string::npos || detail.find("imeout") != std::string::npos;
    const std::string others =
        options.world_size == 2 ? "rank " + std::to_string(1 - options.rank) : "another rank";
    std::string why = timed_out ? others + " did not answer within the time-out of " +
                                      std::to_string(static_cast<int64_t>(options.timeout_seconds)) +
                                      " s: it has stalled, or died without closing its connections"
                                : others + " closed its connection: it has probably died (see its own output)";
    return "distributed training, rank " + std::to_string(options.rank) + " of " + std::to_string(options.world_size) +
           ": " + what + " failed: " + why + " [Gloo: " + detail + "]";
  }

  template <class F>
  void wait(const std::string& what, F&& start) {
    try {
      c10::intrusive_ptr<c10d::Work> work = start();
      work->wait();
    } catch (const c10::Error& e) {
      throw Error(lost_contact(what, e.what_without_backtrace()));
    } catch (const Error&) {
      throw;
    } catch (const std::exception& e) {
      throw Error(lost_contact(what, e.what()));
    }
  }
};

ProcessGroup::ProcessGroup(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ProcessGroup::~ProcessGroup() = default;

namespace {

// rank 0 hosts the TCPStore (unless torchrun's agent does); the others connect to it.
c10::intrusive_ptr<c10d::Store> open_store(const DistributedOptions& options, std::chrono::milliseconds timeout,
                                           const std::string& where, const std::string& who,
                                           const std::string& seconds) {
  try {
    c10d::TCPStoreOptions so;
    so.port = static_cast<std::uint16_t>(options.master_port);
    so.isServer = options.rank == 0 && !options.agent_store;
    so.numWorkers = static_cast<std::size_t>(options.world_size);
    so.waitWorkers = false;  // counted in count_in, with a message that says how many came
    so.timeout = timeout;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(options.master_addr, so);
    if (options.agent_store) {
      return c10::make_intrusive<c10d::PrefixStore>("/worker/attempt_" + std::to_string(options.restart_count), tcp);
    }
    return tcp;
  } catch (const std::exception& e) {
    const std::string detail = dynamic_cast<const c10::Error*>(&e) ? static_cast<const c10::Error&>(e).what_without_backtrace()
                                                                    : std::string(e.what());
    throw Error(who + ": the rendezvous at " + where + " failed" +
                (options.rank == 0 && !options.agent_store
                     ? " (rank 0 serves it there: is the port taken, or the address not this machine's?)"
                     : " (is rank 0 running, and " + where + " reachable from here?)") +
                "; it waits at most " + seconds + " s for all " + std::to_string(options.world_size) +
                " processes [c10d: " + detail + "]");
  }
}

// Every rank counts itself in, then waits for the others until the deadline.
void count_in(c10d::Store& store, const DistributedOptions& options, std::chrono::steady_clock::time_point deadline,
              const std::string& where, const std::string& who, const std::string& seconds) {
  int64_t joined = 0;
  try {
    joined = store.add("tilt/joined", 1);
    while (joined < options.world_size && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
      joined = store.add("tilt/joined", 0);
    }
  } catch (const std::exception& e) {
    throw Error(who + ": lost the rendezvous store at " + where +
                " while waiting for the other processes (has rank 0 stopped?) [c10d: " + e.what() + "]");
  }
  if (joined < options.world_size) {
    throw Error(who + ": only " + std::to_string(joined) + " of the " + std::to_string(options.world_size) +
                " processes joined the rendezvous at " + where + " within " + seconds +
                " s (start every rank with the same WORLD_SIZE, MASTER_ADDR and MASTER_PORT)");
  }
}

}  // namespace

std::shared_ptr<ProcessGroup> ProcessGroup::connect(const DistributedOptions& options) {
  if (options.world_size < 1 || options.rank < 0 || options.rank >= options.world_size) {
    throw Error("distributed training: rank " + std::to_string(options.rank) + " is not in 0.." +
                std::to_string(options.world_size - 1));
  }
  if (options.master_port < 1 || options.master_port > 65535) {
    throw Error("distributed training: MASTER_PORT " + std::to_string(options.master_port) + " is not a TCP port");
  }
  if (!(options.timeout_seconds > 0) || !std::isfinite(options.timeout_seconds)) {
    throw Error("distributed training: the time-out must be > 0 seconds");
  }
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  const auto timeout = std::chrono::milliseconds(static_cast<int64_t>(std::ceil(options.timeout_seconds * 1000)));
  const std::string where = options.master_addr + ":" + std::to_string(options.master_port);
  const std::string who = "distributed training, rank " + std::to_string(options.rank) + " of " +
                          std::to_string(options.world_size);
  const std::string seconds = std::to_string(static_cast<int64_t>(options.timeout_seconds));
  // The whole rendezvous (connecting to the store, every process counting itself in) ends by one
  // deadline. c10d's TCPStore bounds its connect and its get/wait by the time-out, but not add():
  // against a program that holds MASTER_PORT, accepts and never answers, add() waits for ever. So
  // the store is opened and the count taken on a thread of its own, and this one stops waiting at
  // the deadline (plus a little, for the thread's own time-out to be reported first). A thread left
  // waiting then holds only its own store and socket, until the process exits on the error.
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  struct Join {
    std::mutex mutex;
    std::condition_variable finished;
    bool done = false;
    c10::intrusive_ptr<c10d::Store> store;
    std::exception_ptr error;
  };
  auto join = std::make_shared<Join>();
  std::thread([join, options, timeout, deadline, where, who, seconds] {
    c10::intrusive_ptr<c10d::Store> store;
    std::exception_ptr error;
    try {
      store = open_store(options, timeout, where, who, seconds);
      count_in(*store, options, deadline, where, who, seconds);
    } catch (...) {
      error = std::current_exception();
    }
    std::lock_guard<std::mutex> lock(join->mutex);
    join->store = std::move(store);
    join->error = error;
    join->done = true;
    join->finished.notify_all();
  }).detach();
  {
    std::unique_lock<std::mutex> lock(join->mutex);
    const auto grace = std::chrono::milliseconds(1000) + timeout / 10;
    if (!join->finished.wait_until(lock, deadline + grace, [&] { return join->done; })) {
      throw Error(who + ": no answer from the rendezvous store at " + where + " within the time-out of " + seconds +
                  " s: something accepts connections there but does not answer like rank 0's c10d TCPStore (is "
                  "MASTER_PORT used by another program? or has rank 0 stalled?)");
    }
    if (join->error) std::rethrow_exception(join->error);
    impl->store = join->store;
  }
  try {
    auto go = c10d::ProcessGroupGloo::Options::create(timeout);
    if (!options.interface.empty()) {
      go->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(options.interface));
    } else if (is_loopback(options.master_addr)) {
      go->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
    } else {
      go->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    }
    go->threads = 1;  // tilt runs one collective at a time
    impl->pg = c10::make_intrusive<c10d::ProcessGroupGloo>(impl->store, options.rank, options.world_size, go);
  } catch (const std::exception& e) {
    const std::string detail = dynamic_cast<const c10::Error*>(&e) ? static_cast<const c10::Error&>(e).what_without_backtrace()
                                                                    : std::string(e.what());
    throw Error("distributed training, rank " + std::to_string(options.rank) + " of " +
                std::to_string(options.world_size) + ": could not connect to the other ranks after the rendezvous at " +
                where + " (set GLOO_SOCKET_IFNAME to the network interface the machines share) [Gloo: " + detail + "]");
  }
  return std::shared_ptr<ProcessGroup>(new ProcessGroup(std::move(impl)));
}

int ProcessGroup::rank() const { return impl_->options.rank; }
int ProcessGroup::world_size() const { return impl_->options.world_size; }
const DistributedOptions& ProcessGroup::options() const { return impl_->options; }

void ProcessGroup::all_reduce_sum(std::vector<Tensor>& tensors, const std::string& what) {
  for (Tensor& t : tensors) {
    // One call per tensor: several tensors in one call are one input per device, summed together.
    std::vector<Tensor> one{t};
    impl_->wait(what, [&] { return impl_->pg->allreduce(one); });
  }
}

void ProcessGroup::broadcast(std::vector<Tensor>& tensors, int root, const std::string& what) {
  for (Tensor& t : tensors) {
    std::vector<Tensor> one{t};
    c10d::BroadcastOptions bo;
    bo.rootRank = root;
    impl_->wait(what, [&] { return impl_->pg->broadcast(one, bo); });
  }
}

std::string ProcessGroup::broadcast_bytes(const std::string& bytes, const std::string& what) {
  std::vector<Tensor> size{at::full({1}, rank() == 0 ? static_cast<int64_t>(bytes.size()) : 0, at::kLong)};
  broadcast(size, 0, what);
  const int64_t n = size[0].item<int64_t>();
  if (n == 0) return {};
  std::vector<Tensor> data{rank() == 0 ? at::from_blob(const_cast<char*>(bytes.data()), {n}, at::kByte).clone()
                                       : at::empty({n}, at::kByte)};
  broadcast(data, 0, what);
  return std::string(reinterpret_cast<const char*>(data[0].data_ptr<uint8_t>()), static_cast<size_t>(n));
}

void ProcessGroup::check_same(const std::string& value, const std::string& what) {
  std::vector<Tensor> hash{at::full({1}, fnv1a(value), at::kLong)};
  broadcast(hash, 0, "comparing the " + what);
  std::vector<Tensor> differs{at::zeros({world_size()}, at::kLong)};
  differs[0][rank()] = hash[0].item<int64_t>() == fnv1a(value) ? 0 : 1;
  all_reduce_sum(differs, "comparing the " + what);
  std::string ranks;
  for (int r = 0; r < world_size(); ++r) {
    if (differs[0][r].item<int64_t>() != 0) ranks += (ranks.empty() ? "" : ", ") + std::to_string(r);
  }
  if (!ranks.empty()) {
    throw Error("distributed training: the " + what + " of rank " + ranks + " differs from rank 0's; every process "
                "must be started with the same settings");
  }
}

#else  // built without the c10d Gloo headers (Debian: libgloo-dev)

bool distributed_available() { return false; }

struct ProcessGroup::Impl {};
ProcessGroup::ProcessGroup(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ProcessGroup::~ProcessGroup() = default;

namespace {
[[noreturn]] void unavailable() {
  throw Error("distributed training: this tilt was built without c10d's Gloo backend (its headers come with "
              "Debian's libgloo-dev; install it, e.g. with scripts/setup.sh, and rebuild)");
}
}  // namespace

std::shared_ptr<ProcessGroup> ProcessGroup::connect(const DistributedOptions&) { unavailable(); }
int ProcessGroup::rank() const { unavailable(); }
int ProcessGroup::world_size() const { unavailable(); }
const DistributedOptions& ProcessGroup::options() const { unavailable(); }
void ProcessGroup::all_reduce_sum(std::vector<Tensor>&, const std::string&) { unavailable(); }
void ProcessGroup::broadcast(std::vector<Tensor>&, int, const std::string&) { unavailable(); }
std::string ProcessGroup::broadcast_bytes(const std::string&, const std::string&) { unavailable(); }
void ProcessGroup::check_same(const std::string&, const std::string&) { unavailable(); }

#endif

}  // namespace tilt
