// A multilayer perceptron velocity field v_theta(x, t) with a sinusoidal time embedding.
#pragma once

#include "tilt/model/velocity.h"

#include <memory>
#include <string>
#include <vector>

namespace tilt {

/// The activations of one forward pass at a single time t (MlpVelocity::forward_taped), kept so that
/// the input VJP and the parameter gradients can be computed by hand, without an autograd graph:
/// the fast path of Adjoint Matching tapes the rollout and never runs the networks forward again.
struct MlpTape {
  double t = 0;
  Tensor x;               ///< the input [B, d]
  std::vector<Tensor> slope;  ///< silu'(z_l) at the hidden layers' pre-activations z_l, [B, H_l]: all a
                             ///< backward pass needs of them
  std::vector<Tensor> h;      ///< the activations silu(z_l) (kept only if asked for: parameter gradients need them)
};

struct MlpOptions {
  int64_t dim = 2;                              ///< d, the data dimension
  std::vector<int64_t> hidden{256, 256, 256};   ///< widths of the hidden layers (SiLU between)
  int64_t time_features = 16;                   ///< t, then sin/cos(pi f t) for f = 1..time_features/2
  bool zero_output = false;                     ///< initialise the last layer to 0 (residual nets)
};

class MlpVelocity : public VelocityField {
 public:
  /// Initialises the weights from `seed` (PyTorch's default uniform(+-1/sqrt(fan_in)) law).
  MlpVelocity(const MlpOptions& options, SchedulePtr schedule, uint64_t seed);
  ~MlpVelocity() override;

  std::string kind() const override { return "mlp"; }
  int64_t dim() const override { return options_.dim; }
  using VelocityField::velocity;
  Tensor velocity(const Tensor& x, const Tensor& t) const override;
  std::vector<Tensor> parameters() const override;

  /// The input VJP (dv/dx)^T a by hand: one taped forward pass and the transposed chain of layers,
  /// no autograd (checked against autograd in the tests).
  Tensor vjp(const Tensor& x, double t, const Tensor& a, Tensor* v_out = nullptr) const override;

  /// v(x, t) at one time for the whole batch, without gradients, recording the activations in `tape`
  /// (if not null; with keep_activations the silu outputs too). The time embedding enters the first
  /// layer as one bias row per call, b_1 + W_1t e(t), instead of B identical rows.
  Tensor forward_taped(const Tensor& x, double t, MlpTape* tape, bool keep_activations = false) const;
  /// (dv/dx)^T a at the taped point.
  Tensor vjp_taped(const MlpTape& tape, const Tensor& a) const;
  /// The gradients of sum_i sum_rows <g_i, v(x_i, t_i)> with respect to every parameter (in the order of
  /// named_parameters()), from tapes recorded with keep_activations; g[i] is [B_i, d]. Replaces a
  /// forward and a backward pass of autograd when the activations are already known.
  std::vector<Tensor> parameter_grads(const std::vector<const MlpTape*>& tapes, const std::vector<Tensor>& g) const;

  const MlpOptions& options() const { return options_; }
  NamedTensors named_parameters() const;
  /// Copies values in; throws tilt::Error naming a missing, unexpected or mis-shaped tensor.
  void load_parameters(const NamedTensors& values);
  void set_trainable(bool trainable) override;
  /// A deep copy with its own parameters.
  std::shared_ptr<MlpVelocity> clone() const;

 private:
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
