// Taped networks: a forward pass that records what a backward pass needs, so that the input VJP and
// the parameter gradients are computed by hand, without an autograd graph. Adjoint Matching's fast
// path (AdjointMatching::compute with tape_activations) tapes the rollout through this interface and
// never runs the networks forward again. MlpVelocity implements it.
#pragma once

#include "tilt/core/tensor.h"

#include <memory>
#include <vector>

namespace tilt {

/// The activations of one forward pass at one time; each network defines its own (opaque here).
class Tape {
 public:
  virtual ~Tape() = default;
};

class TapedNetwork {
 public:
  virtual ~TapedNetwork() = default;

  /// An empty tape for this network. Tapes are reused: forward_taped overwrites their tensors in place.
  virtual std::unique_ptr<Tape> new_tape() const = 0;
  /// v(x, t) at one time for the whole batch [B, d], without gradients, recording the activations in
  /// `tape` (if not null; with keep_activations also those parameter_grads needs).
  virtual Tensor forward_taped(const Tensor& x, double t, Tape* tape, bool keep_activations = false) const = 0;
  /// (dv/dx)^T a at the taped point (a: [B, d]).
  virtual Tensor vjp_taped(const Tape& tape, const Tensor& a) const = 0;
  /// The gradients of sum_i sum_rows <g_i, v(x_i, t_i)> with respect to every parameter, in the order
  /// of parameters(), from tapes recorded with keep_activations; g[i] is [B_i, d]. Throws tilt::Error
  /// for a tape without activations or recorded by another kind of network.
  virtual std::vector<Tensor> parameter_grads(const std::vector<const Tape*>& tapes,
                                              const std::vector<Tensor>& g) const = 0;
};

}  // namespace tilt
