// Matrix products of the hand-written network passes (internal to the library).
#pragma once

#include "tilt/core/tensor.h"

#include <string>

namespace tilt::detail {

/// C <- beta C + op(A) op(B), with op(X) = X^T where asked; A, B and C are 2-D and C is written in
/// place (beta = 0: C's old values are ignored, NaN included).
///
/// float32 CPU matrices whose rows are contiguous (unit column stride, any row stride: a column slice
/// of a weight matrix qualifies) go to oneDNN's dnnl_sgemm when libdnnl.so.2 is loaded: Debian's
/// LibTorch links it, and its just-in-time kernels run the iteration's small products (128 x 256 by
/// 256 x 256) ~1.3x faster than OpenBLAS on one thread. Everything else, or TILT_GEMM=aten in the
/// environment, takes ATen's addmm. On a thread inside a parallel region the product runs on that
/// thread alone (oneDNN and OpenBLAS both check).
void gemm(const Tensor& C, const Tensor& A, bool transpose_a, const Tensor& B, bool transpose_b, double beta);

/// The library float32 CPU products go to: "oneDNN" or "ATen", as TILT_GEMM (read once) chooses.
std::string gemm_library();

/// The library a TILT_GEMM value chooses: "auto" (or null) oneDNN where it loads, else ATen; "onednn";
/// "aten". Throws tilt::Error naming the problem for any other value, or for "onednn" without
/// libdnnl.so.2. gemm() and gemm_library() throw the same error on every call.
std::string gemm_library_for(const char* tilt_gemm);

}  // namespace tilt::detail
