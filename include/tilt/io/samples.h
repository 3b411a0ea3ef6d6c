// Sample sets as CSV: one sample per line, d comma-separated numbers, an optional header line
// "x0,x1,...". Written atomically.
#pragma once

#include "tilt/core/tensor.h"

#include <string>

namespace tilt {

void write_samples_csv(const std::string& path, const Tensor& x);
/// [n, d] float32. Throws tilt::Error with the file and line for ragged rows or non-numbers.
Tensor read_samples_csv(const std::string& path);

}  // namespace tilt
