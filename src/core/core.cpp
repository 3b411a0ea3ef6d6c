#include "tilt/core/check.h"
#include "tilt/core/log.h"
#include "tilt/core/tensor.h"

#include <ATen/CPUGeneratorImpl.h>

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
