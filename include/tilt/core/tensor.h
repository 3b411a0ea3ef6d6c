// Tensor type used across tilt's public headers.
//
// Public headers include only <ATen/core/Tensor.h> (about 2 s to parse) and never <torch/torch.h>
// (about 17 s per translation unit).
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace tilt {

using Tensor = at::Tensor;
using Generator = at::Generator;

/// A CPU random generator seeded deterministically.
Generator make_generator(uint64_t seed);

/// Mixes a base seed with a stream index (splitmix64), so that iteration i of a run seeded with s
/// draws from its own generator: resuming a run at iteration i reproduces it exactly.
uint64_t mix_seed(uint64_t seed, uint64_t stream);

/// N(0, 1) (normal_draws) or U[0, 1) (uniform_draws) numbers of the given shape from `gen`, a CPU
/// generator, returned with `options` (dtype, device). The numbers are drawn on the CPU and then moved,
/// so a seed gives the same draws on every device: a run on a GPU simulates the paths the CPU run
/// simulates, up to rounding (docs/devices.md).
Tensor normal_draws(at::IntArrayRef sizes, Generator& gen, const at::TensorOptions& options = {});
Tensor uniform_draws(at::IntArrayRef sizes, Generator& gen, const at::TensorOptions& options = {});

/// Moves or converts each tensor to `options` (a device, a dtype, or both; a Device converts) in place: its
/// data is replaced, so every handle to it (a model's member, an optimiser's parameter list, a second model
/// sharing frozen weights) sees the move. Gradients are dropped; requires_grad is kept. Tensors already
/// there are left alone.
void move_tensors(const std::vector<Tensor>& tensors, const at::TensorOptions& options);

/// The device that `name` names: "cpu", "cuda" (the first GPU) or "cuda:N". Throws tilt::Error that
/// names `what` (a flag or config key) for another name, or for a GPU that this LibTorch or machine
/// does not have.
at::Device parse_device(const std::string& name, const std::string& what);
/// Throws tilt::Error beginning with `what` unless `device` is the CPU or a CUDA device this LibTorch and
/// machine have. Models' to(device) call it, so that a CPU build refuses cuda in words.
void require_device(const at::Device& device, const std::string& what);

/// Lets the process reuse the CPU memory of freed tensors instead of handing it back to the system after each
/// one. With glibc's malloc, blocks under 32 MiB come from its heap (M_MMAP_THRESHOLD) and the heap is never
/// trimmed (M_TRIM_THRESHOLD). Without this, every tensor above the default threshold is a fresh mapping whose
/// pages fault in on first touch; on a virtual machine that can cost more than the convolution that fills it
/// (README, "Image networks": the U-Net iteration). The price: freed memory stays with the process, whose
/// resident size stays at its peak. set_threads() calls it. TILT_MALLOC=system (in the environment) leaves
/// malloc as it is; any other value is a tilt::Error that names it. Returns whether the setting is in force
/// (false without glibc or with TILT_MALLOC=system).
bool keep_cpu_memory();

/// The outputs of out(r0, n) on row blocks [r0, r0 + n) covering a batch of `rows` rows, joined along dimension
/// 0 in row order (an output a block leaves undefined stays undefined). The blocks run at once, one per thread,
/// when `parallel` is true, more than one thread is set (at::get_num_threads) and each block gets at least
/// `min_rows` rows; otherwise out(0, rows) runs once. Each block runs with the caller's thread-local state (grad
/// mode, autocast), and the tensor operations inside it run on its own thread alone. `out` must compute each row
/// from that row alone and be safe to call from several threads at once. For networks whose rows cost more
/// than the threads' synchronisation inside each of their many small operations (the U-Net at small batches).
std::vector<Tensor> by_row_blocks(int64_t rows, bool parallel, int64_t min_rows,
                                  const std::function<std::vector<Tensor>(int64_t r0, int64_t n)>& out);

}  // namespace tilt
