// A multilayer perceptron velocity field v_theta(x, t) with a sinusoidal time embedding.
#pragma once

#include "tilt/model/taped.h"
#include "tilt/model/velocity.h"

#include <memory>
#include <string>
#include <vector>

namespace tilt {

struct MlpOptions {
  int64_t dim = 2;                              ///< d, the data dimension
  std::vector<int64_t> hidden{256, 256, 256};   ///< widths of the hidden layers (SiLU between)
  int64_t time_features = 16;                   ///< t, then sin/cos(pi f t) for f = 1..time_features/2
  bool zero_output = false;                     ///< initialise the last layer to 0 (residual nets)
  /// The size of a condition c (0: unconditional). A conditional network's first layer also reads c and
  /// a flag that is 1 for a given condition and 0 for the null one (c = 0 then): the null condition is
  /// an input of its own, what condition dropout trains for classifier-free guidance.
  int64_t condition_dim = 0;
};

/// A taped network (tilt/model/taped.h): Adjoint Matching's fast path runs it without autograd.
class MlpVelocity : public VelocityField, public TapedNetwork {
 public:
  /// Initialises the weights from `seed` (PyTorch's default uniform(+-1/sqrt(fan_in)) law).
  MlpVelocity(const MlpOptions& options, SchedulePtr schedule, uint64_t seed);
  ~MlpVelocity() override;

  std::string kind() const override { return "mlp"; }
  int64_t dim() const override { return options_.dim; }
  using VelocityField::velocity;
  Tensor velocity(const Tensor& x, const Tensor& t) const override;
  int64_t condition_dim() const override { return options_.condition_dim; }
  Tensor conditional_velocity(const Tensor& x, const Tensor& t, const Tensor& c) const override;
  /// One pass: the dropped rows get the null condition's inputs (c = 0, flag 0).
  Tensor conditional_velocity_masked(const Tensor& x, const Tensor& t, const Tensor& c, const Tensor& keep) const override;
  std::vector<Tensor> parameters() const override;

  /// The input VJP (dv/dx)^T a by hand: one taped forward pass and the transposed chain of layers,
  /// no autograd (checked against autograd in the tests).
  Tensor vjp(const Tensor& x, double t, const Tensor& a, Tensor* v_out = nullptr) const override;
  bool vjp_needs_autograd() const override { return false; }

  const TapedNetwork* taped_network() const override { return this; }
  std::unique_ptr<Tape> new_tape() const override;
  /// The time embedding enters the first layer as one bias row per call, b_1 + W_1t e(t), instead of
  /// B identical rows. A conditional network runs here at the null condition.
  Tensor forward_taped(const Tensor& x, double t, Tape* tape, bool keep_activations = false) const override;
  Tensor vjp_taped(const Tape& tape, const Tensor& a) const override;
  /// Replaces a forward and a backward pass of autograd when the activations are already known.
  std::vector<Tensor> parameter_grads(const std::vector<const Tape*>& tapes,
                                      const std::vector<Tensor>& g) const override;

  const MlpOptions& options() const { return options_; }
  NamedTensors named_parameters() const override;
  /// Copies values in; throws tilt::Error naming a missing, unexpected or mis-shaped tensor.
  void load_parameters(const NamedTensors& values);
  void set_trainable(bool trainable) override;
  /// A deep copy with its own parameters (trainable where these are).
  VelocityFieldPtr clone() const override;

 private:
  Tensor conditioned(const Tensor& x, const Tensor& t, const Tensor& c, const Tensor& keep) const;
  Tensor fused_forward(const Tensor& x, double t, const Tensor& condition, Tape* tape, bool keep_activations) const;
  struct Impl;
  MlpOptions options_;
  std::unique_ptr<Impl> impl_;
};

/// The library that the taped passes' float32 CPU matrix products go to: "oneDNN" (its dnnl_sgemm, where
/// libdnnl.so.2 loads) or "ATen", as the environment variable TILT_GEMM (auto, onednn, aten) chooses.
/// Throws tilt::Error naming the problem for a value it cannot honour; the CLI asks before it writes
/// anything, so that a typo stops a run at once.
std::string matrix_library();

}  // namespace tilt
