// MlpVelocity's tape (internal): what its hand-written backward passes need of a forward pass.
#pragma once

#include "tilt/model/taped.h"

#include <vector>

namespace tilt {

/// The activations of one MlpVelocity::forward_taped at a single time t.
struct MlpTape : Tape {
  double t = 0;
  Tensor x;                   ///< the input [B, d]
  std::vector<Tensor> slope;  ///< silu'(z_l) at the hidden layers' pre-activations z_l, [B, H_l]: all a
                              ///< backward pass needs of them
  std::vector<Tensor> h;      ///< the activations silu(z_l) (kept only if asked for: parameter gradients need them)
};

}  // namespace tilt
