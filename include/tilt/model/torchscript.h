// Interop with PyTorch through TorchScript: base models and rewards exported from Python
// (torch.jit.script / torch.jit.trace, then .save), and the export of tilt's models as TorchScript
// modules that Python's torch.jit.load runs.
//
// LibTorch's jit headers stay in src/model/torchscript.cpp (pimpl), as <torch/torch.h> does
// elsewhere (tilt/core/tensor.h).
#pragma once

#include "tilt/core/tensor.h"
#include "tilt/model/reward.h"
#include "tilt/model/velocity.h"

#include <functional>
#include <memory>
#include <string>

namespace tilt {

/// What a scripted base model's forward(x, t) returns.
enum class Prediction {
  velocity,  ///< v(x, t) itself
  epsilon,   ///< eps(x, t) = E[X0 | Xbar_t = x], the noise a diffusion model predicts
  score,     ///< s(x, t) = grad_x log p_t(x)
};

Prediction parse_prediction(const std::string& name);  // "velocity" | "epsilon" | "score"
std::string to_string(Prediction prediction);

struct TorchScriptOptions {
  Prediction prediction = Prediction::velocity;
  /// The data dimension d; 0: the module's integer attribute `dim` (an error if it has none).
  int64_t dim = 0;
  /// epsilon and score only: the conversion to a velocity is evaluated at t clamped to
  /// [t_min, 1 - t_min], since kappa_t = alpha'_t / alpha_t is infinite at t = 0 (alpha_0 = 0)
  /// and beta'_t at t = 1 (vp).
  double t_min = 1e-3;
  /// The size of the condition c of a conditional module (forward(x, t, c)); 0: the module's integer
  /// attribute `condition_dim` (an error if forward takes c and the module has none). A module whose
  /// forward takes (x, t) is unconditional, and a size given for it is an error.
  int64_t condition_dim = 0;
};

/// A velocity field computed by a TorchScript module whose forward(x, t) takes x [B, d] and t [B]
/// in tilt's time (t = 0 noise, t = 1 data) and returns a tensor [B, d]: the velocity, or the noise
/// or score prediction of a diffusion model, converted with the schedule (docs/equations.md, E7):
///   score:   v = kappa_t x + eta_t s
///   epsilon: s = -eps / beta_t (Tweedie), so v = kappa_t x + (beta'_t - kappa_t beta_t) eps.
/// The schedule must be the one the model was trained with.  x and t are cast to the dtype of the
/// module's parameters (or buffers; float32 if it has neither) and the result back to x's dtype.
///
/// Conditional modules: forward(x, t, c) with c [B, dc] (dc: the attribute `condition_dim`) is a
/// conditional field, v(x, t | c) = forward(x, t, c), converted as above; a condition for the whole
/// batch ([1, dc]) is expanded to B rows. The null condition (velocity(x, t), what guidance subtracts) is
/// forward(x, t, None): it needs c declared Optional[Tensor]. A module whose c is a plain Tensor has no
/// null condition: it is refused (tilt::Error naming the file) wherever the null condition is asked for.
class TorchScriptVelocity : public VelocityField {
 public:
  /// Loads and checks a module: throws tilt::Error naming `origin` (the file) if the archive is
  /// missing or corrupt, forward has the wrong signature, or a forward on [2, d] fails or does
  /// not return [2, d]. The module's parameters stay as they are (call set_trainable).
  static std::shared_ptr<TorchScriptVelocity> load(const std::string& path, SchedulePtr schedule,
                                                   const TorchScriptOptions& options = {});
  /// The same from the bytes of a TorchScript archive; `origin` names them in error messages.
  static std::shared_ptr<TorchScriptVelocity> from_bytes(const std::string& bytes, const std::string& origin,
                                                         SchedulePtr schedule,
                                                         const TorchScriptOptions& options = {});
  ~TorchScriptVelocity() override;

  std::string kind() const override { return "torchscript"; }
  int64_t dim() const override { return options_.dim; }
  using VelocityField::velocity;
  /// v(x, t); for a conditional module the null condition, forward(x, t, None).
  Tensor velocity(const Tensor& x, const Tensor& t) const override;
  int64_t condition_dim() const override { return options_.condition_dim; }
  /// forward(x, t, c) (converted); an undefined c is the null condition.
  Tensor conditional_velocity(const Tensor& x, const Tensor& t, const Tensor& c) const override;
  /// Whether the module has a null condition (forward's c is Optional[Tensor]); false if unconditional.
  bool has_null_condition() const;
  /// The module's parameters that require gradients.
  std::vector<Tensor> parameters() const override;
  void set_trainable(bool trainable) override;

  /// A deep copy (its own parameters), for fine-tuning the whole module ("copy" mode).
  VelocityFieldPtr clone() const override;
  /// Moves the module (its parameters and buffers) to `device`.
  void to(const at::Device& device) override;
  at::Device device() const override;
  /// The module, with its current parameters, as TorchScript archive bytes.
  std::string archive() const;
  const TorchScriptOptions& options() const { return options_; }

  struct Impl;
  /// For the export (src/model/torchscript.cpp).
  const Impl& impl() const { return *impl_; }

 private:
  TorchScriptVelocity(std::unique_ptr<Impl> impl, SchedulePtr schedule, const TorchScriptOptions& options);
  std::unique_ptr<Impl> impl_;
  TorchScriptOptions options_;
};

/// A reward r(x) computed by a TorchScript module whose forward(x) takes x [B, d] and returns r
/// [B]; its gradient by autograd. No closed-form tilt.
///
/// A module whose forward(x, c) takes conditions c [B, dc] is a conditional reward r(x, c); dc is the
/// module's integer attribute `condition_dim` (or given). value(x) of a conditional reward is
/// forward(x, None), which needs c declared Optional[Tensor]; otherwise it is refused.
class TorchScriptReward : public Reward {
 public:
  /// Loads and checks the module (a forward on [2, dim] (and c [2, dc]) must return [2], with a
  /// gradient in x); throws tilt::Error naming the file otherwise. condition_dim: 0 takes the module's
  /// attribute `condition_dim` for a forward(x, c); a size given for a forward(x) is an error.
  TorchScriptReward(const std::string& path, int64_t dim, int64_t condition_dim = 0);
  ~TorchScriptReward() override;
  std::string kind() const override { return "torchscript"; }
  int64_t dim() const override { return dim_; }
  Tensor value(const Tensor& x) const override;
  Tensor grad(const Tensor& x) const override;
  int64_t condition_dim() const override { return condition_dim_; }
  Tensor conditional_value(const Tensor& x, const Tensor& c) const override;
  Tensor conditional_grad(const Tensor& x, const Tensor& c) const override;
  void to(const at::Device& device) const override;

 private:
  void probe() const;
  struct Impl;
  std::unique_ptr<Impl> impl_;
  int64_t dim_;
  int64_t condition_dim_ = 0;
};

/// The velocity field as TorchScript archive bytes: a module whose forward(x, t) takes x [B, d]
/// and t [B] (or a 0-dim t) and returns v [B, d], the same velocity as field.velocity. A conditional
/// field's module (attributes `dim`, `condition_dim`, `schedule`) has forward(x, t, c: Optional[Tensor]
/// = None): c [B, dc] or [1, dc] gives conditional_velocity, None the null condition. Networks
/// are written as TorchScript source with their weights; a TorchScript base is embedded as a
/// submodule (with its epsilon/score conversion, for its schedule); a fine-tuned model is base
/// plus residual, or the trained copy; a field of a user's kind by its registered exporter
/// (register_torchscript_export). Throws tilt::Error for the closed-form Gaussian-mixture field,
/// which has no TorchScript form here, and for a kind without an exporter.
std::string export_torchscript(const VelocityField& field);

/// Registers (or replaces) how fields of a user's kind (VelocityField::kind()) are exported: `exporter`
/// returns the field as the bytes of a TorchScript archive whose forward(x, t) takes x [B, d] and t [B]
/// and returns v(x, t) [B, d] (from Python, torch.jit.save into a buffer); for a conditional field,
/// forward(x, t, c: Optional[Tensor]) with c [B, dc] or None (the null condition). export_torchscript embeds it
/// as a submodule (also as a fine-tuned model's base or trainable part) and checks it against
/// field.velocity. Throws tilt::Error for an empty kind or exporter, or one of tilt's own kinds.
void register_torchscript_export(const std::string& kind, std::function<std::string(const VelocityField&)> exporter);

}  // namespace tilt
