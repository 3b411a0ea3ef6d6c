// Data-parallel training over several processes, on LibTorch's own distributed engine: a c10d
// TCPStore for the rendezvous and a c10d ProcessGroupGloo for the collectives (CPU; the c10d headers
// need Debian's libgloo-dev). No torch or gloo header is included here.
//
// A group is formed as torchrun forms one: every process gets RANK (0..WORLD_SIZE-1), WORLD_SIZE,
// and the address of rank 0 (MASTER_ADDR, MASTER_PORT), where rank 0 serves the store. Every
// collective waits at most timeout_seconds; a process that died or stalls turns into a tilt::Error
// on the others, never a hang.
#pragma once

#include "tilt/core/tensor.h"

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace tilt {

struct DistributedOptions {
  int rank = 0;
  int world_size = 1;
  std::string master_addr = "127.0.0.1";  ///< where rank 0 serves the rendezvous store
  int master_port = 29500;
  double timeout_seconds = 300;  ///< the rendezvous and every collective wait at most this long
  /// The network interface Gloo uses (GLOO_SOCKET_IFNAME, as in PyTorch); empty: the address of
  /// this machine's hostname, or 127.0.0.1 when MASTER_ADDR is a loopback address.
  std::string interface;
  /// Under torchrun (TORCHELASTIC_USE_AGENT_STORE=True) its agent already serves the store at
  /// MASTER_ADDR:MASTER_PORT: every rank is a client, under the prefix /worker/attempt_<restart>.
  bool agent_store = false;
  int restart_count = 0;  ///< TORCHELASTIC_RESTART_COUNT
};

/// Whether this tilt was built with the distributed engine (c10d Gloo headers found at build time).
bool distributed_available();

/// The group torchrun (or a user) describes in the environment: WORLD_SIZE, RANK, MASTER_ADDR,
/// MASTER_PORT, GLOO_SOCKET_IFNAME, TORCHELASTIC_USE_AGENT_STORE and TORCHELASTIC_RESTART_COUNT.
/// nullopt when WORLD_SIZE is unset or 1 (one process). Throws
/// tilt::Error naming the variable if one is missing or malformed. `getenv` is for tests.
std::optional<DistributedOptions> distributed_options_from_env(
    const std::function<const char*(const char*)>& getenv = {});

/// The processes of one data-parallel run. Collectives must be called by every rank in the same order.
/// Each throws tilt::Error, on every surviving rank, if a process has died or does not answer within
/// the time-out; the message says which collective, and which rank where it can tell.
class ProcessGroup {
 public:
  /// Joins the group: rank 0 serves a TCPStore at master_addr:master_port, every rank connects to
  /// it, then to every other rank (Gloo's full mesh). Blocks until all world_size processes have
  /// joined, at most timeout_seconds. Throws tilt::Error if the port is taken, rank 0 cannot be
  /// reached or not all ranks come.
  static std::shared_ptr<ProcessGroup> connect(const DistributedOptions& options);
  ~ProcessGroup();
  ProcessGroup(const ProcessGroup&) = delete;
  ProcessGroup& operator=(const ProcessGroup&) = delete;

  int rank() const;
  int world_size() const;
  const DistributedOptions& options() const;

  /// Sums every tensor over the ranks, in place. `what` names the step in errors ("gradients of iteration 3").
  void all_reduce_sum(std::vector<Tensor>& tensors, const std::string& what);
  /// Rank root's values of the tensors to every rank, in place.
  void broadcast(std::vector<Tensor>& tensors, int root, const std::string& what);
  /// Rank 0's `bytes` to every rank (the argument is ignored on the others).
  std::string broadcast_bytes(const std::string& bytes, const std::string& what);
  /// Throws tilt::Error on every rank if `value` differs from rank 0's on some rank; the message
  /// names `what` and those ranks.
  void check_same(const std::string& value, const std::string& what);

 private:
  struct Impl;
  explicit ProcessGroup(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

using ProcessGroupPtr = std::shared_ptr<ProcessGroup>;

/// Runs f on rank 0 only (or on the only process when group is null), and tells the other ranks
/// whether it threw: there they throw tilt::Error("rank 0 stopped: <its message>") instead of
/// waiting for a rank that has gone. Rank 0 rethrows its own exception.
void run_on_rank0(ProcessGroup* group, const std::function<void()>& f);

}  // namespace tilt
