#include "tilt/core/check.h"
#include "tilt/core/log.h"
#include "tilt/core/tensor.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/cuda.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <sstream>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace tilt {

Generator make_generator(uint64_t seed) { return at::make_generator<at::CPUGeneratorImpl>(seed); }

uint64_t mix_seed(uint64_t seed, uint64_t stream) {
  // splitmix64 of (seed, stream): consecutive streams get unrelated generators.
  uint64_t z = seed + 0x9E3779B97F4A7C15ULL * (stream + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

namespace {

// Draws on the CPU with `gen` (CPU generators cannot fill a GPU tensor), then moves the result.
template <typename Draw>
Tensor drawn(const at::TensorOptions& options, Draw draw) {
  const at::Device device = options.device();
  if (device.is_cpu()) return draw(options);
  return draw(options.device(at::kCPU)).to(device);
}

}  // namespace

Tensor normal_draws(at::IntArrayRef sizes, Generator& gen, const at::TensorOptions& options) {
  return drawn(options, [&](const at::TensorOptions& o) { return at::randn(sizes, gen, o); });
}

Tensor uniform_draws(at::IntArrayRef sizes, Generator& gen, const at::TensorOptions& options) {
  return drawn(options, [&](const at::TensorOptions& o) { return at::rand(sizes, gen, o); });
}

void move_tensors(const std::vector<Tensor>& tensors, const at::TensorOptions& options) {
  if (options.has_device()) require_device(options.device(), "moving a model to " + options.device().str());
  for (Tensor t : tensors) {
    if (!t.defined()) continue;
    const at::TensorOptions want = t.options().merge_in(options);
    if (t.device() == want.device() && t.scalar_type() == at::typeMetaToScalarType(want.dtype())) continue;
    t.mutable_grad() = Tensor();
    t.set_data(t.data().to(want));
  }
}

at::Device parse_device(const std::string& name, const std::string& what) {
  if (name == "cpu") return at::Device(at::kCPU);
  const std::string usage = what + " must be cpu, cuda or cuda:N, got '" + name + "'";
  int64_t index = 0;
  if (name.rfind("cuda:", 0) == 0) {
    const std::string digits = name.substr(5);
    if (digits.empty() || digits.size() > 3 || digits.find_first_not_of("0123456789") != std::string::npos) {
      throw Error(usage);
    }
    index = std::stoll(digits);
    // at::DeviceIndex is 8 bits: cuda:255 became -1 (the current device), cuda:200 a negative index.
    if (index > std::numeric_limits<at::DeviceIndex>::max()) throw Error(what + " = " + name + ": no such CUDA device");
  } else if (name != "cuda") {
    throw Error(usage);
  }
  const at::Device device(at::kCUDA, static_cast<at::DeviceIndex>(index));
  require_device(device, what + " = " + name);
  return device;
}

void require_device(const at::Device& device, const std::string& what) {
  if (device.is_cpu()) return;
  if (!device.is_cuda()) throw Error(what + ": tilt runs on cpu or cuda, not on " + device.str());
  if (!torch::cuda::is_available()) {
    throw Error(what + ": no CUDA device is available (this LibTorch " +
                (at::hasCUDA() ? "has CUDA, but no GPU was found" : "was built without CUDA") + "); use cpu");
  }
  const auto count = static_cast<int64_t>(torch::cuda::device_count());
  if (device.index() < -1 || (device.has_index() && device.index() >= count)) {
    throw Error(what + ": this machine has " + std::to_string(count) + " CUDA device(s), cuda:0.." +
                "cuda:" + std::to_string(count - 1));
  }
}

bool keep_cpu_memory() {
  const char* choice = std::getenv("TILT_MALLOC");
  if (choice && *choice && std::strcmp(choice, "system") != 0) {
    throw Error("TILT_MALLOC must be unset or 'system', got '" + std::string(choice) + "'");
  }
  static std::once_flag once;
  static bool in_force = false;
  std::call_once(once, [choice] {
    if (choice && std::strcmp(choice, "system") == 0) return;
#if defined(__GLIBC__)
    // 32 MiB is the largest threshold glibc accepts on a 64-bit machine; setting either one also stops glibc's own
    // adaptive threshold, which would trim the heap back after every large free.
    in_force = mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1 && mallopt(M_TRIM_THRESHOLD, -1) == 1;
#endif
  });
  return in_force;
}

std::vector<Tensor> by_row_blocks(int64_t rows, bool parallel, int64_t min_rows,
                                  const std::function<std::vector<Tensor>(int64_t r0, int64_t n)>& out) {
  const int64_t blocks = parallel && !at::in_parallel_region()
                             ? std::min<int64_t>(at::get_num_threads(), rows / std::max<int64_t>(1, min_rows))
                             : 1;
  if (blocks <= 1) return out(0, rows);
  std::vector<std::vector<Tensor>> parts(static_cast<size_t>(blocks));
  const at::ThreadLocalState state;  // the caller's grad mode and autocast, for the threads that run the blocks
  // at::parallel_for rethrows the first exception of a block here.
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard guard(state);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r0 = rows * i / blocks;
      parts[static_cast<size_t>(i)] = out(r0, rows * (i + 1) / blocks - r0);
    }
  });
  std::vector<Tensor> joined(parts.front().size());
  for (size_t j = 0; j < joined.size(); ++j) {
    std::vector<Tensor> column;
    for (const auto& part : parts) {
      if (part.size() != joined.size()) throw Error("by_row_blocks: the blocks returned different numbers of outputs");
      if (part[j].defined()) column.push_back(part[j]);
    }
    if (column.size() == parts.size()) joined[j] = at::cat(column);
    else if (!column.empty()) throw Error("by_row_blocks: an output is defined in some blocks only");
  }
  return joined;
}

std::string format_number(double x, const char* spec) {
  if (!std::isfinite(x)) return "-";
  char buf[64];
  std::snprintf(buf, sizeof buf, spec, x);
  return buf;
}

std::string number_string(double x) {
  std::ostringstream os;
  os << x;
  return os.str();
}

std::string shape_string(const Tensor& x) {
  if (!x.defined()) return "<undefined>";
  std::ostringstream os;
  os << "[";
  for (int64_t i = 0; i < x.dim(); ++i) os << (i ? ", " : "") << x.size(i);
  os << "]";
  return os.str();
}

void check_batch(const Tensor& x, int64_t dim, const std::string& what) {
  if (!x.defined() || x.dim() != 2 || x.size(1) != dim) {
    throw Error(what + " must be [B, dim] = [*, " + std::to_string(dim) + "], got " +
                shape_string(x));
  }
  // An integer x went through the mixture's formulas in integer arithmetic and came back NaN.
  if (!at::isFloatingType(x.scalar_type())) {
    throw Error(what + " must hold floating-point numbers (float32 or float64), got " +
                std::string(c10::toString(x.scalar_type())));
  }
}

void check_time(const Tensor& t, int64_t batch, const std::string& what) {
  if (!t.defined() || !(t.dim() == 0 || (t.dim() == 1 && t.size(0) == batch))) {
    throw Error(what + " must be a scalar or [" + std::to_string(batch) + "], got " +
                shape_string(t));
  }
}

}  // namespace tilt

// ---- messages (tilt/core/log.h) ----
namespace tilt {
namespace {
bool g_messages_silent = false;  // a rank other than 0: its messages would repeat rank 0's
std::mutex g_handler_mutex;
MessageHandler g_handler;  // empty: stderr

void emit(bool is_warning, const std::string& message) {
  if (g_messages_silent) return;
  std::lock_guard<std::mutex> lock(g_handler_mutex);
  if (g_handler) {
    g_handler(is_warning, message);
  } else {
    std::fprintf(stderr, is_warning ? "tilt: warning: %s\n" : "tilt: %s\n", message.c_str());
  }
}
}  // namespace
void note(const std::string& message) { emit(false, message); }
void warning(const std::string& message) { emit(true, message); }
void set_message_handler(MessageHandler handler) {
  std::lock_guard<std::mutex> lock(g_handler_mutex);
  g_handler = std::move(handler);
}
void set_messages_silent(bool silent) { g_messages_silent = silent; }
bool messages_silent() { return g_messages_silent; }
}  // namespace tilt
