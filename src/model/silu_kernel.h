// The SiLU layer's elementwise work as one pass (internal to the library): bias, activation and the
// activation's derivative together, so that a taped forward pass leaves behind exactly what the
// backward pass multiplies by, and the backward pass needs no exponential.
#pragma once

#include "tilt/core/tensor.h"

namespace tilt::detail {

/// For pre-activations without their bias, z [B, H], and a bias of H values, writes h <- silu(z + b)
/// into h [B, H] (not z), and with keep_slope overwrites z with the derivative
///   silu'(z + b) = s (1 + (z + b)(1 - s)),  s = sigmoid(z + b),
/// which is all a backward pass through the layer needs: g_in = (g_out W) * silu'.
/// Contiguous float32 CPU tensors take a fused, vectorised loop (one exponential per element, run-time
/// dispatch to AVX-512 or AVX2 where the CPU has them); anything else takes ATen's operations.
void bias_silu(const Tensor& z, const Tensor& bias, const Tensor& h, bool keep_slope);

/// Whether bias_silu takes the fused loop for these tensors (the tests check both paths).
bool bias_silu_is_fused(const Tensor& z, const Tensor& bias, const Tensor& h);

}  // namespace tilt::detail
