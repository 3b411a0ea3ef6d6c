// Mixed precision for the trainer (TrainerOptions::precision): LibTorch's autocast, switched on for one
// device type while a scope lives. Inside, the ops that autocast lists (convolutions, linear layers, matrix
// products) run in bfloat16 on float32 inputs; the rest, and every float64 tensor, keep their dtype. As
// torch.autocast does, the backward pass runs outside the scope; unlike it, the cast cache is off (autocast.cpp). The API changed in LibTorch 2.4 (one call per device type); both are handled here.
#pragma once

#include <ATen/ATen.h>

namespace tilt {

class AutocastScope {
 public:
  /// Enables bfloat16 autocast for `device`'s type (CPU or CUDA) if `enabled`; otherwise does nothing.
  /// Throws tilt::Error for another device type.
  AutocastScope(const at::Device& device, bool enabled);
  ~AutocastScope();
  AutocastScope(const AutocastScope&) = delete;
  AutocastScope& operator=(const AutocastScope&) = delete;

 private:
  bool active_ = false;
  at::DeviceType type_ = at::kCPU;
  bool was_enabled_ = false;
  bool was_cached_ = true;
  at::ScalarType was_dtype_ = at::kFloat;
};

}  // namespace tilt
