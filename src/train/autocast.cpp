#include "autocast.h"

#include "tilt/core/error.h"

#include <ATen/autocast_mode.h>
#include <torch/version.h>

namespace tilt {
namespace {

#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
bool is_enabled(at::DeviceType t) { return at::autocast::is_autocast_enabled(t); }
void set_enabled(at::DeviceType t, bool on) { at::autocast::set_autocast_enabled(t, on); }
at::ScalarType get_dtype(at::DeviceType t) { return at::autocast::get_autocast_dtype(t); }
void set_dtype(at::DeviceType t, at::ScalarType d) { at::autocast::set_autocast_dtype(t, d); }
#else
bool is_enabled(at::DeviceType t) { return t == at::kCUDA ? at::autocast::is_enabled() : at::autocast::is_cpu_enabled(); }
void set_enabled(at::DeviceType t, bool on) {
  if (t == at::kCUDA) at::autocast::set_enabled(on);
  else at::autocast::set_cpu_enabled(on);
}
at::ScalarType get_dtype(at::DeviceType t) {
  return t == at::kCUDA ? at::autocast::get_autocast_gpu_dtype() : at::autocast::get_autocast_cpu_dtype();
}
void set_dtype(at::DeviceType t, at::ScalarType d) {
  if (t == at::kCUDA) at::autocast::set_autocast_gpu_dtype(d);
  else at::autocast::set_autocast_cpu_dtype(d);
}
#endif

}  // namespace

AutocastScope::AutocastScope(const at::Device& device, bool enabled) {
  if (!enabled) return;
  type_ = device.type();
  if (type_ != at::kCPU && type_ != at::kCUDA) {
    throw Error("precision = \"bfloat16\": autocast is available on cpu and cuda devices, not " + device.str());
  }
  was_enabled_ = is_enabled(type_);
  was_dtype_ = get_dtype(type_);
  was_cached_ = at::autocast::is_autocast_cache_enabled();
  // No cast cache: it keeps the bfloat16 copy of a leaf that requires grad, and a copy made under NoGradGuard (the
  // rollout) would then serve the regression without a graph back to the parameter (LibTorch 1.13 does not key the
  // cache on the grad mode). Recasting the weights at each call costs little beside the convolutions.
  at::autocast::set_autocast_cache_enabled(false);
  set_dtype(type_, at::kBFloat16);
  set_enabled(type_, true);
  at::autocast::increment_nesting();
  active_ = true;
}

AutocastScope::~AutocastScope() {
  if (!active_) return;
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  set_enabled(type_, was_enabled_);
  set_dtype(type_, was_dtype_);
  at::autocast::set_autocast_cache_enabled(was_cached_);
}

}  // namespace tilt
