// The fine-tuned velocity field v_theta: a full trainable copy of a base network, or the frozen
// base plus a zero-initialised residual network (so that v_theta = v_base at the start).
#pragma once

#include "tilt/model/mlp.h"
#include "tilt/model/unet.h"
#include "tilt/model/velocity.h"

#include <memory>
#include <string>

namespace tilt {

enum class FineTuneMode {
  residual,  ///< v_theta = v_base + r_theta, r_theta an MLP whose last layer starts at zero
  copy,      ///< v_theta = a trainable copy of the base network (an MLP or TorchScript base)
  lora,      ///< v_theta = the frozen base network with trainable low-rank adapters (a U-Net base; E125)
};

FineTuneMode parse_finetune_mode(const std::string& name);  // "residual" | "copy" | "lora"
std::string to_string(FineTuneMode mode);

class FineTunedVelocity : public VelocityField {
 public:
  /// The base is frozen here (its parameters stop requiring gradients). `trainable` is the residual
  /// r_theta (residual mode) or the full network v_theta (copy and lora modes).
  FineTunedVelocity(VelocityFieldPtr base, VelocityFieldPtr trainable, FineTuneMode mode);

  std::string kind() const override { return "finetuned"; }
  int64_t dim() const override { return base_->dim(); }
  using VelocityField::velocity;
  Tensor velocity(const Tensor& x, const Tensor& t) const override;
  /// The base's condition (the trainable network takes the same one).
  int64_t condition_dim() const override { return base_->condition_dim(); }
  Tensor conditional_velocity(const Tensor& x, const Tensor& t, const Tensor& c) const override;
  std::vector<Tensor> parameters() const override { return trainable_->parameters(); }
  void set_trainable(bool trainable) override { trainable_->set_trainable(trainable); }
  /// Clones of the base (frozen) and of the trainable network.
  VelocityFieldPtr clone() const override;
  /// Moves the base and the trainable network.
  void to(const at::Device& device) override;
  at::Device device() const override { return trainable_->device(); }
  bool parallel_rows() const override { return base_->parallel_rows() && trainable_->parallel_rows(); }

  /// v_theta(x, t | c) - v_base(x, t | c), given v_base(x, t | c) already computed (the residual mode
  /// does not need it: the difference is the residual network itself). c undefined: unconditional.
  Tensor delta(const Tensor& x, const Tensor& t, const Tensor& v_base, const Tensor& c = Tensor()) const;

  const VelocityFieldPtr& base() const { return base_; }
  const VelocityFieldPtr& trainable() const { return trainable_; }
  FineTuneMode mode() const { return mode_; }

 private:
  VelocityFieldPtr base_;
  VelocityFieldPtr trainable_;
  FineTuneMode mode_;
};

/// Builds the fine-tuned field from a base: in residual mode a new residual network seeded by `seed`
/// that starts at zero and takes the base's condition (for a U-Net base a U-Net of the base's options,
/// otherwise an MLP with the given hidden widths and time features); in copy mode base->clone(), made
/// trainable (a network with parameters: an MLP, a U-Net, a TorchScript module or a user's field that
/// implements clone()); in lora mode the base U-Net with adapters `lora` (throws tilt::Error for any other base).
std::shared_ptr<FineTunedVelocity> make_finetuned(VelocityFieldPtr base, FineTuneMode mode,
                                                  const std::vector<int64_t>& hidden,
                                                  int64_t time_features, uint64_t seed,
                                                  const LoraOptions& lora = {});

}  // namespace tilt
