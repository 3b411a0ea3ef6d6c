// Tensor type used across tilt's public headers.
//
// Public headers include only <ATen/core/Tensor.h> (about 2 s to parse) and never <torch/torch.h>
// (about 17 s per translation unit).
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace tilt {

using Tensor = at::Tensor;
using Generator = at::Generator;

/// A CPU random generator seeded deterministically.
Generator make_generator(uint64_t seed);

/// Mixes a base seed with a stream index (splitmix64), so that iteration i of a run seeded with s
/// draws from its own generator: resuming a run at iteration i reproduces it exactly.
uint64_t mix_seed(uint64_t seed, uint64_t stream);

}  // namespace tilt
