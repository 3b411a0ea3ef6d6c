#include "tilt/core/check.h"
#include "tilt/core/log.h"
#include "tilt/core/tensor.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/cuda.h>

#include <cmath>
#include <cstdio>
#include <sstream>

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
  } else if (name != "cuda") {
    throw Error(usage);
  }
  if (!torch::cuda::is_available()) {
    throw Error(what + " = " + name + ": no CUDA device is available (this LibTorch " +
                (at::hasCUDA() ? "has CUDA, but no GPU was found" : "was built without CUDA") + "); use cpu");
  }
  const auto count = static_cast<int64_t>(torch::cuda::device_count());
  if (index >= count) {
    throw Error(what + " = " + name + ": this machine has " + std::to_string(count) + " CUDA device(s), cuda:0.." +
                "cuda:" + std::to_string(count - 1));
  }
  return at::Device(at::kCUDA, static_cast<at::DeviceIndex>(index));
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
}  // namespace
void note(const std::string& message) {
  if (!g_messages_silent) std::fprintf(stderr, "tilt: %s\n", message.c_str());
}
void warning(const std::string& message) {
  if (!g_messages_silent) std::fprintf(stderr, "tilt: warning: %s\n", message.c_str());
}
void set_messages_silent(bool silent) { g_messages_silent = silent; }
bool messages_silent() { return g_messages_silent; }
}  // namespace tilt
