// Tensor type used across tilt's public headers.
//
// Public headers include only <ATen/core/Tensor.h> (about 2 s to parse) and never <torch/torch.h>
// (about 17 s per translation unit).
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
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

}  // namespace tilt
