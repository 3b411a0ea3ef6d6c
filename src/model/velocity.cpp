#include "tilt/model/finetuned.h"
#include "tilt/model/velocity.h"

#include "tilt/core/error.h"

#include "tilt/core/check.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/autograd.h>

#include <functional>

namespace tilt {

VelocityField::VelocityField(SchedulePtr schedule) : schedule_(std::move(schedule)) {
  // A null schedule failed later, as a segmentation fault in the first velocity().
  if (!schedule_) throw Error("a velocity field needs its schedule (the reference flow it belongs to); got none");
}

Tensor VelocityField::velocity(const Tensor& x, double t) const {
  return velocity(x, at::scalar_tensor(t, x.options()));
}

namespace {

// (dv/dx)^T a by one reverse pass of autograd through v = velocity(x) (gradients enabled even under a
// NoGradGuard); v in *v_out if given.
Tensor autograd_vjp(const Tensor& x, const Tensor& a, const std::function<Tensor(const Tensor&)>& velocity,
                    Tensor* v_out) {
  at::AutoGradMode enable_grad(true);
  const Tensor xg = x.detach().requires_grad_(true);
  const Tensor v = velocity(xg);
  Tensor g = torch::autograd::grad({v}, {xg}, {a}, /*retain_graph=*/false, /*create_graph=*/false)[0];
  if (v_out) *v_out = v.detach();
  return g;
}

}  // namespace

Tensor VelocityField::vjp(const Tensor& x, double t, const Tensor& a, Tensor* v_out) const {
  check_batch(a, dim(), "adjoint");
  return autograd_vjp(x, a, [this, t](const Tensor& xg) { return velocity(xg, t); }, v_out);
}

Tensor VelocityField::conditional_velocity(const Tensor& x, const Tensor& t, const Tensor& c) const {
  if (c.defined()) {
    throw Error("the velocity field of kind '" + kind() + "' takes no condition, but one was given (" +
                shape_string(c) + ")");
  }
  return velocity(x, t);
}

std::vector<Tensor> tensors_of(const NamedTensors& named) {
  std::vector<Tensor> out;
  out.reserve(named.size());
  for (const auto& item : named) out.push_back(item.second);
  return out;
}

void check_keep(const Tensor& keep, int64_t batch) {
  if (!keep.defined() || keep.dim() != 1 || keep.size(0) != batch || keep.scalar_type() != at::kBool) {
    throw Error("conditional_velocity_masked: keep must be a [" + std::to_string(batch) + "] bool tensor, got " +
                shape_string(keep));
  }
}

Tensor VelocityField::conditional_velocity_masked(const Tensor& x, const Tensor& t, const Tensor& c,
                                                 const Tensor& keep) const {
  const int64_t B = x.size(0);
  check_keep(keep, B);
  const Tensor kept = at::nonzero(keep).squeeze(1), dropped = at::nonzero(at::logical_not(keep)).squeeze(1);
  auto rows_of = [&](const Tensor& rows, const Tensor& cond) {
    const Tensor tr = t.dim() == 0 ? t : t.index_select(0, rows);
    return conditional_velocity(x.index_select(0, rows), tr, cond.defined() ? cond.index_select(0, rows) : Tensor());
  };
  // Each set's rows are put back in place (index_copy is differentiable in what it copies).
  Tensor v;
  for (const auto& [rows, cond] : {std::make_pair(kept, c), std::make_pair(dropped, Tensor())}) {
    if (rows.numel() == 0) continue;
    const Tensor part = rows_of(rows, cond);
    if (!v.defined()) v = at::zeros({B, part.size(1)}, part.options());
    v = v.index_copy(0, rows, part);
  }
  return v;
}

Tensor VelocityField::conditional_vjp(const Tensor& x, double t, const Tensor& c, const Tensor& a,
                                      Tensor* v_out) const {
  if (!c.defined()) return vjp(x, t, a, v_out);
  check_batch(a, dim(), "adjoint");
  const Tensor ts = at::scalar_tensor(t, x.options()), cd = c.detach();
  return autograd_vjp(x, a, [&](const Tensor& xg) { return conditional_velocity(xg, ts, cd); }, v_out);
}

std::vector<Tensor> VelocityField::parameters() const { return tensors_of(named_parameters()); }

void VelocityField::set_trainable(bool trainable) {
  for (Tensor p : parameters()) p.set_requires_grad(trainable);
}

void VelocityField::to(const at::Device& device) { move_tensors(tensors_of(named_parameters()), device); }

at::Device VelocityField::device() const {
  const NamedTensors named = named_parameters();
  return named.empty() ? at::Device(at::kCPU) : named.front().second.device();
}

VelocityFieldPtr VelocityField::clone() const {
  throw Error("the velocity field of kind '" + kind() +
              "' cannot be copied: it does not implement VelocityField::clone() (fine-tuning in copy mode "
              "needs it; residual mode does not)");
}

FineTuneMode parse_finetune_mode(const std::string& name) {
  if (name == "residual") return FineTuneMode::residual;
  if (name == "copy") return FineTuneMode::copy;
  if (name == "lora") return FineTuneMode::lora;
  throw Error("unknown fine-tuning model '" + name + "' (valid: residual, copy, lora)");
}

std::string to_string(FineTuneMode mode) {
  switch (mode) {
    case FineTuneMode::residual: return "residual";
    case FineTuneMode::copy: return "copy";
    case FineTuneMode::lora: return "lora";
  }
  return "?";
}

FineTunedVelocity::FineTunedVelocity(VelocityFieldPtr base, VelocityFieldPtr trainable,
                                     FineTuneMode mode)
    : VelocityField(base ? base->schedule() : nullptr),
      base_(std::move(base)),
      trainable_(std::move(trainable)),
      mode_(mode) {
  if (!base_ || !trainable_) throw Error("fine-tuned model: base and trainable network are required");
  if (trainable_->dim() != base_->dim()) {
    throw Error("fine-tuned model: trainable network has dim " + std::to_string(trainable_->dim()) +
                " but the base has dim " + std::to_string(base_->dim()));
  }
  if (trainable_->schedule() != base_->schedule() &&
      trainable_->schedule()->name() != base_->schedule()->name()) {
    throw Error("fine-tuned model: the trainable network uses the " + trainable_->schedule()->name() +
                " schedule but the base uses " + base_->schedule()->name());
  }
  if (trainable_->condition_dim() != base_->condition_dim()) {
    throw Error("fine-tuned model: the trainable network takes a condition of size " +
                std::to_string(trainable_->condition_dim()) + " but the base takes " +
                std::to_string(base_->condition_dim()));
  }
  base_->set_trainable(false);
}

Tensor FineTunedVelocity::velocity(const Tensor& x, const Tensor& t) const {
  if (mode_ != FineTuneMode::residual) return trainable_->velocity(x, t);
  return base_->velocity(x, t) + trainable_->velocity(x, t);
}

Tensor FineTunedVelocity::conditional_velocity(const Tensor& x, const Tensor& t, const Tensor& c) const {
  if (!c.defined()) return velocity(x, t);
  if (mode_ != FineTuneMode::residual) return trainable_->conditional_velocity(x, t, c);
  return base_->conditional_velocity(x, t, c) + trainable_->conditional_velocity(x, t, c);
}

VelocityFieldPtr FineTunedVelocity::clone() const {
  auto copy = std::make_shared<FineTunedVelocity>(base_->clone(), trainable_->clone(), mode_);
  return copy;
}

void FineTunedVelocity::to(const at::Device& device) {
  base_->to(device);
  trainable_->to(device);
}

Tensor FineTunedVelocity::delta(const Tensor& x, const Tensor& t, const Tensor& v_base, const Tensor& c) const {
  const Tensor v = trainable_->conditional_velocity(x, t, c);
  return mode_ == FineTuneMode::residual ? v : v - v_base;
}

std::shared_ptr<FineTunedVelocity> make_finetuned(VelocityFieldPtr base, FineTuneMode mode,
                                                  const std::vector<int64_t>& hidden,
                                                  int64_t time_features, uint64_t seed, const LoraOptions& lora) {
  if (!base) throw Error("fine-tuned model: no base model");
  const auto* unet = dynamic_cast<const UNetVelocity*>(base.get());
  if (mode == FineTuneMode::lora) {
    if (!unet) {
      throw Error("fine-tuning model 'lora' needs a U-Net base (kind 'unet'), but the base is '" + base->kind() +
                  "' (use model = \"residual\" or \"copy\")");
    }
    return std::make_shared<FineTunedVelocity>(base, unet->with_lora(lora, seed), mode);
  }
  if (mode == FineTuneMode::copy) {
    VelocityFieldPtr copy = base->clone();
    copy->set_trainable(true);
    if (copy->parameters().empty()) {
      throw Error("fine-tuning model 'copy' needs a network base, but the base is '" + base->kind() +
                  "' (use model = \"residual\")");
    }
    return std::make_shared<FineTunedVelocity>(base, copy, mode);
  }
  if (unet) {
    UNetOptions options = unet->options();
    options.zero_output = true;
    return std::make_shared<FineTunedVelocity>(base, std::make_shared<UNetVelocity>(options, base->schedule(), seed),
                                               mode);
  }
  MlpOptions options;
  options.dim = base->dim();
  options.hidden = hidden;
  options.time_features = time_features;
  options.condition_dim = base->condition_dim();
  options.zero_output = true;
  auto residual = std::make_shared<MlpVelocity>(options, base->schedule(), seed);
  return std::make_shared<FineTunedVelocity>(base, residual, mode);
}

}  // namespace tilt
