// Velocity fields v(x, t) of the reference flow (docs/equations.md, E5): the base model, the exact
// Gaussian-mixture field, networks, and fine-tuned fields all honour this one interface.
#pragma once

#include "tilt/core/tensor.h"
#include "tilt/schedule/schedule.h"

#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace tilt {

class VelocityField {
 public:
  explicit VelocityField(SchedulePtr schedule) : schedule_(std::move(schedule)) {}
  virtual ~VelocityField() = default;

  /// "gmm", "mlp" or "finetuned".
  virtual std::string kind() const = 0;
  virtual int64_t dim() const = 0;

  /// v(x, t) for x of shape [B, d] and t a 0-dim tensor or of shape [B].  Differentiable in x
  /// (and in the parameters, for networks).
  virtual Tensor velocity(const Tensor& x, const Tensor& t) const = 0;
  /// v(x, t) at one time for the whole batch.
  Tensor velocity(const Tensor& x, double t) const;

  /// The vector-Jacobian product (dv/dx)^T a at one time t for the whole batch (a: [B, d]); if
  /// v_out is given it receives v(x, t), detached. The default runs one reverse pass of autograd
  /// (with gradients enabled even under a NoGradGuard); closed-form fields override it.
  virtual Tensor vjp(const Tensor& x, double t, const Tensor& a, Tensor* v_out = nullptr) const;

  /// Trainable parameters; empty for closed-form fields and frozen models.
  virtual std::vector<Tensor> parameters() const { return {}; }
  /// Freezes (false) or unfreezes (true) the parameters; no-op for closed-form fields.
  virtual void set_trainable(bool /*trainable*/) {}

  /// The reference flow this field belongs to: a velocity is only meaningful with its schedule.
  const SchedulePtr& schedule() const { return schedule_; }

 private:
  SchedulePtr schedule_;
};

using VelocityFieldPtr = std::shared_ptr<VelocityField>;

/// Named tensors, in a fixed order (state dicts, checkpoints).
using NamedTensors = std::vector<std::pair<std::string, Tensor>>;

}  // namespace tilt
