// Sample sets as CSV: one sample per line, d comma-separated numbers, an optional header line
// "x0,x1,...". Samples of a conditional model carry their condition in further columns, named by the
// header "x0,...,x{d-1},c0,...,c{dc-1}" (docs/conditions.md). Written atomically.
#pragma once

#include "tilt/core/tensor.h"

#include <string>

namespace tilt {

/// conditions: [n, dc] written after the samples' columns, or undefined (none).
void write_samples_csv(const std::string& path, const Tensor& x, const Tensor& conditions = Tensor());
/// [n, d] float32. Throws tilt::Error with the file and line for ragged rows or non-numbers. The
/// condition columns (those the header names c0, c1, ...) go to *conditions ([n, dc] float64; undefined
/// when the file has none); without a pointer they are left out. `what` names the file in messages ("conditions
/// file" for tilt sample --conditions). Fields are decimal numbers (spaces around them allowed).
Tensor read_samples_csv(const std::string& path, Tensor* conditions = nullptr, const std::string& what = "samples file");

/// One condition given as comma-separated numbers ("0.5" or "1,0,0"), [dc] float64. Throws tilt::Error
/// naming `flag` for anything else.
Tensor parse_condition(const std::string& text, const std::string& flag);

/// Conditions given by a user (a flag or a file), returned as they are when every entry is finite and of
/// magnitude at most limits::kMagnitude, the bound of the config's [conditions]; else tilt::Error naming `what`.
Tensor check_conditions(const Tensor& c, const std::string& what);

}  // namespace tilt
