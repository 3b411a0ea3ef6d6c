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

class VelocityField;
class TapedNetwork;
using VelocityFieldPtr = std::shared_ptr<VelocityField>;

/// Named tensors, in a fixed order (state dicts, checkpoints).
using NamedTensors = std::vector<std::pair<std::string, Tensor>>;
/// The tensors of `named`, in its order (the same tensors, not copies).
std::vector<Tensor> tensors_of(const NamedTensors& named);
/// Throws tilt::Error unless `keep` is a [batch] bool tensor (VelocityField::conditional_velocity_masked).
void check_keep(const Tensor& keep, int64_t batch);

/// A velocity field. A user's own field implements kind(), dim() and velocity() (differentiable in x
/// and its parameters) and, as it needs them: parameters() and set_trainable() to be fine-tuned,
/// clone() for copy-mode fine-tuning, named_parameters() to be saved (tilt/io/model_io.h:
/// register_model_kind). docs/extending.md shows one.
class VelocityField {
 public:
  /// Throws tilt::Error for a null schedule: a velocity is only meaningful with its reference flow.
  explicit VelocityField(SchedulePtr schedule);
  virtual ~VelocityField() = default;

  /// What model files and TorchScript export know the field by: tilt's own are "gmm", "conditional_gmm",
  /// "mlp", "unet", "torchscript" and "finetuned".
  virtual std::string kind() const = 0;
  virtual int64_t dim() const = 0;

  /// v(x, t) for x of shape [B, d] and t a 0-dim tensor or of shape [B].  Differentiable in x
  /// (and in the parameters, for networks).
  virtual Tensor velocity(const Tensor& x, const Tensor& t) const = 0;
  /// v(x, t) at one time for the whole batch.
  Tensor velocity(const Tensor& x, double t) const;

  /// The size of the condition c the field takes (a class's one-hot vector, an embedding: the stand-in
  /// for a prompt; docs/conditions.md); 0 for an unconditional field, the default.
  virtual int64_t condition_dim() const { return 0; }
  /// v(x, t | c) for conditions c of shape [B, condition_dim()], one per row of x, or [1, ...], one for
  /// the whole batch. An undefined c is the null condition: the unconditional field that guidance
  /// subtracts. For a conditional field velocity(x, t) is the null condition. The default accepts only
  /// an undefined c (an unconditional field) and throws tilt::Error naming the kind otherwise.
  virtual Tensor conditional_velocity(const Tensor& x, const Tensor& t, const Tensor& c) const;
  /// v(x, t | c_i) in the rows where keep ([B] bool) is true and v(x, t | null) in the others: flow
  /// matching's condition dropout (docs/equations.md, E100). By default the two sets of rows go through
  /// conditional_velocity separately; tilt's networks, whose null condition is an input flag, override it
  /// with one pass of fixed shape (a GPU then reuses its kernels' plans from one batch to the next).
  virtual Tensor conditional_velocity_masked(const Tensor& x, const Tensor& t, const Tensor& c, const Tensor& keep) const;
  /// (dv/dx)^T a at one time given c (as conditional_velocity); by default by autograd, or vjp() for an
  /// undefined c.
  virtual Tensor conditional_vjp(const Tensor& x, double t, const Tensor& c, const Tensor& a,
                                 Tensor* v_out = nullptr) const;

  /// The vector-Jacobian product (dv/dx)^T a at one time t for the whole batch (a: [B, d]); if
  /// v_out is given it receives v(x, t), detached. The default runs one reverse pass of autograd
  /// (with gradients enabled even under a NoGradGuard); closed-form fields override it.
  virtual Tensor vjp(const Tensor& x, double t, const Tensor& a, Tensor* v_out = nullptr) const;

  /// The parameters a trainer updates; empty for closed-form fields. By default the tensors of
  /// named_parameters(), so that a field of one's own needs only that.
  virtual std::vector<Tensor> parameters() const;
  /// Freezes (false) or unfreezes (true) the parameters. By default sets requires_grad on each of
  /// parameters(); no-op for closed-form fields.
  virtual void set_trainable(bool trainable);
  /// Every parameter (trainable or frozen) by name, in a fixed order; the tensors themselves, not
  /// copies. Empty by default. Model files of kinds registered with register_model_kind store these.
  virtual NamedTensors named_parameters() const { return {}; }

  /// A deep copy with its own parameters (what copy-mode fine-tuning trains). The default throws
  /// tilt::Error naming the kind: a field that is to be copied must implement it.
  virtual VelocityFieldPtr clone() const;

  /// The taped forward and backward passes of Adjoint Matching's fast path, if the field has them
  /// (tilt/model/taped.h; MlpVelocity does); nullptr by default.
  virtual const TapedNetwork* taped_network() const { return nullptr; }
  /// Whether vjp() runs an autograd graph (true by default). A field whose vjp() is closed form or
  /// by hand returns false: then the fast path may call it from several threads at once.
  virtual bool vjp_needs_autograd() const { return true; }
  /// Whether a batch's velocity() and vjp() may be computed on blocks of its rows, one per thread at once
  /// (by_row_blocks, velocity_by_rows), and gain by it: each row's value depends on that row alone, calls share no
  /// mutable state, and a row costs enough work (the U-Net). False by default.
  virtual bool parallel_rows() const { return false; }

  /// Moves the field's tensors to `device` (docs/devices.md). By default each of named_parameters() in
  /// place (its data replaced, so the tensors that parameters() returned, and optimisers holding them,
  /// follow). Closed-form fields need nothing: they compute on the device of their input.
  virtual void to(const at::Device& device);
  /// Where the field's parameters live: by default the device of the first of named_parameters(), the
  /// CPU for a field without any. Trainers and samplers draw their states there.
  virtual at::Device device() const;

  /// The reference flow this field belongs to: a velocity is only meaningful with its schedule.
  const SchedulePtr& schedule() const { return schedule_; }

 private:
  SchedulePtr schedule_;
};

}  // namespace tilt
