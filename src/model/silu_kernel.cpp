// Compiled with -fno-trapping-math (src/CMakeLists.txt): without it GCC keeps the clamps below as
// branches and vectorises nothing. NaN still propagates: every comparison with a NaN is false.
#include "silu_kernel.h"
#include "../core/simd_clones.h"

#include "tilt/core/error.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>


namespace tilt::detail {
namespace {

// exp(x) in float32 within ~1 ulp, without a library call so that the loops vectorise: x = n ln 2 + r
// with |r| <= ln2 / 2 (Cody-Waite: ln 2 in two parts), exp(r) by its degree-7 Taylor-like minimax
// polynomial (Cephes' expf coefficients), and 2^n assembled in the exponent bits. x is clamped to
// [-87, 80]: below, exp underflows anyway; above, the sigmoid it feeds is 1 / (1 + e^80) ~ 1.8e-35, a
// normal float (no slow denormals), where the exact value would be smaller still.
inline float exp_clamped(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 80.0f ? 80.0f : x;
  // n = round(x / ln 2): adding and subtracting 1.5 * 2^23 rounds to the nearest integer.
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}

// One row: h = silu(v), z = silu'(v) = s (1 + v (1 - s)), v = z + b, s = 1 / (1 + e^-v).
TILT_SIMD_CLONES void bias_silu_slope_rows(float* z, const float* b, float* h, int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows; ++i) {
    float* __restrict zr = z + i * cols;
    float* __restrict hr = h + i * cols;
    const float* __restrict br = b;
    for (int64_t j = 0; j < cols; ++j) {
      const float v = zr[j] + br[j];
      const float s = 1.0f / (1.0f + exp_clamped(-v));
      hr[j] = v * s;
      zr[j] = s * (1.0f + v * (1.0f - s));
    }
  }
}

// The same without the derivative: h = silu(z + b), z left as it is.
TILT_SIMD_CLONES void bias_silu_rows(const float* z, const float* b, float* h, int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* __restrict zr = z + i * cols;
    float* __restrict hr = h + i * cols;
    const float* __restrict br = b;
    for (int64_t j = 0; j < cols; ++j) {
      const float v = zr[j] + br[j];
      hr[j] = v / (1.0f + exp_clamped(-v));
    }
  }
}

void check_shapes(const Tensor& z, const Tensor& bias, const Tensor& h) {
  if (z.dim() != 2 || !h.sizes().equals(z.sizes()) || bias.numel() != z.size(1)) {
    throw Error("bias_silu: needs z and h of one shape [B, H] and a bias of H values, got z " +
                std::to_string(z.dim()) + "-D, bias of " + std::to_string(bias.numel()));
  }
}

}  // namespace

bool bias_silu_is_fused(const Tensor& z, const Tensor& bias, const Tensor& h) {
  for (const Tensor* t : {&z, &bias, &h}) {
    if (!t->device().is_cpu() || t->scalar_type() != at::kFloat || !t->is_contiguous()) return false;
  }
  return !h.is_same(z);
}

void bias_silu(const Tensor& z, const Tensor& bias, const Tensor& h, bool keep_slope) {
  check_shapes(z, bias, h);
  if (h.is_same(z)) throw Error("bias_silu: h must not be z");
  if (!bias_silu_is_fused(z, bias, h)) {
    const Tensor v = z + bias.reshape({1, -1});
    if (keep_slope) {
      const Tensor s = at::sigmoid(v);
      h.copy_(v * s);
      z.copy_(s * (1 + v * (1 - s)));
    } else {
      h.copy_(at::silu(v));
    }
    return;
  }
  const int64_t cols = z.size(1);
  float* zp = z.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  float* hp = h.data_ptr<float>();
  // Rows in parallel where there are enough; inside an at::parallel_for (one block of rows per thread)
  // this runs on the calling thread.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1));
  at::parallel_for(0, z.size(0), grain, [&](int64_t begin, int64_t end) {
    if (keep_slope) {
      bias_silu_slope_rows(zp + begin * cols, bp, hp + begin * cols, end - begin, cols);
    } else {
      bias_silu_rows(zp + begin * cols, bp, hp + begin * cols, end - begin, cols);
    }
  });
}

}  // namespace tilt::detail
