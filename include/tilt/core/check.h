// Checks at the public boundary: each failure says what was expected and what was given.
#pragma once

#include "tilt/core/error.h"
#include "tilt/core/tensor.h"

#include <string>

namespace tilt {

/// Throws tilt::Error("<what> must be [B, dim] = [*, <dim>], got [...]") unless x is a 2-D tensor
/// whose second dimension is dim, of a floating-point dtype.
void check_batch(const Tensor& x, int64_t dim, const std::string& what);

/// Throws unless t is a 0-dim tensor or a 1-D tensor with `batch` entries.
void check_time(const Tensor& t, int64_t batch, const std::string& what);

/// Shape as text, e.g. "[64, 2]".
std::string shape_string(const Tensor& x);

/// A number as text the way a stream writes it (6 significant digits, e.g. "0.25", "1e-05"), for messages.
std::string number_string(double x);
/// x printed with a printf format for one double (default "%.4g"), "-" if x is not finite: a table cell.
std::string format_number(double x, const char* spec = "%.4g");

}  // namespace tilt
