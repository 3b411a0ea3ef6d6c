#include "gemm.h"

#include "tilt/core/error.h"

#include <ATen/ATen.h>

#include <dlfcn.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

namespace tilt::detail {
namespace {

// oneDNN's C API (dnnl.h), row-major: C = alpha op(A) op(B) + beta C, op given by 'N' or 'T'; returns
// dnnl_status_t, 0 on success. Declared here so that building needs no oneDNN headers.
using SgemmFn = int (*)(char transa, char transb, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                        int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

struct Library {
  SgemmFn sgemm = nullptr;
  std::string error;  // set where TILT_GEMM cannot be honoured
};

Library load(const char* env) {
  Library lib;
  const std::string choice = env ? env : "auto";
  if (choice != "auto" && choice != "onednn" && choice != "aten") {
    lib.error = "TILT_GEMM must be 'auto', 'onednn' or 'aten', got '" + choice + "'";
    return lib;
  }
  if (choice == "aten") return lib;
  // Already loaded with LibTorch where it links oneDNN; otherwise try to load it.
  void* sym = dlsym(RTLD_DEFAULT, "dnnl_sgemm");
  if (!sym) {
    if (void* handle = dlopen("libdnnl.so.2", RTLD_NOW | RTLD_LOCAL)) sym = dlsym(handle, "dnnl_sgemm");
  }
  lib.sgemm = reinterpret_cast<SgemmFn>(sym);
  if (!lib.sgemm && choice == "onednn") {
    lib.error = "TILT_GEMM=onednn, but oneDNN (libdnnl.so.2, Debian package libdnnl2) could not be loaded";
  }
  return lib;
}

const Library& library() {
  static const Library lib = load(std::getenv("TILT_GEMM"));
  if (!lib.error.empty()) throw Error(lib.error);
  return lib;
}

// Rows contiguous, float32 on the CPU: what dnnl_sgemm can read with a leading dimension.
bool row_major(const Tensor& x) {
  return x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 &&
         (x.size(1) <= 1 || x.stride(1) == 1) && x.stride(0) >= std::max<int64_t>(x.size(1), 1);
}

}  // namespace

std::string gemm_library() { return library().sgemm ? "oneDNN" : "ATen"; }

std::string gemm_library_for(const char* tilt_gemm) {
  const Library lib = load(tilt_gemm);
  if (!lib.error.empty()) throw Error(lib.error);
  return lib.sgemm ? "oneDNN" : "ATen";
}

void gemm(const Tensor& C, const Tensor& A, bool transpose_a, const Tensor& B, bool transpose_b, double beta) {
  if (A.dim() != 2 || B.dim() != 2 || C.dim() != 2) {
    throw Error("gemm: needs matrices, got " + std::to_string(A.dim()) + "-D, " + std::to_string(B.dim()) +
                "-D and " + std::to_string(C.dim()) + "-D tensors");
  }
  const Tensor opA = transpose_a ? A.t() : A, opB = transpose_b ? B.t() : B;
  if (opA.size(1) != opB.size(0) || C.size(0) != opA.size(0) || C.size(1) != opB.size(1)) {
    throw Error("gemm: cannot multiply " + std::to_string(opA.size(0)) + " x " + std::to_string(opA.size(1)) +
                " by " + std::to_string(opB.size(0)) + " x " + std::to_string(opB.size(1)) + " into " +
                std::to_string(C.size(0)) + " x " + std::to_string(C.size(1)));
  }
  const int64_t M = C.size(0), N = C.size(1), K = opA.size(1);
  const SgemmFn sgemm = library().sgemm;
  if (sgemm && M > 0 && N > 0 && K > 0 && row_major(A) && row_major(B) && row_major(C)) {
    const int status = sgemm(transpose_a ? 'T' : 'N', transpose_b ? 'T' : 'N', M, N, K, 1.0f, A.data_ptr<float>(),
                             A.stride(0), B.data_ptr<float>(), B.stride(0), static_cast<float>(beta),
                             C.data_ptr<float>(), C.stride(0));
    if (status != 0) throw Error("gemm: oneDNN's dnnl_sgemm failed with status " + std::to_string(status));
    return;
  }
  Tensor out = C;  // the same tensor: ATen's out= functions take a non-const reference
  if (beta == 0.0) {
    at::mm_out(out, opA, opB);
  } else {
    at::addmm_out(out, C, opA, opB, beta, 1.0);
  }
}

}  // namespace tilt::detail
