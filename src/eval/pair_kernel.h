// The fused pair sums behind the energy distance and the MMD (src/eval/metrics.cpp): private to the eval layer.
#pragma once

#include "tilt/core/tensor.h"

#include <vector>

namespace tilt::detail {

/// The sums over all pairs (a_i, b_j) of |a_i - b_j| and of each Gaussian kernel exp(-|a_i - b_j|^2 / (2 s_k^2)).
struct PairSums {
  double dist = 0;
  std::vector<double> kernel;  ///< one per bandwidth, in the order given
};

/// a [n, d], b [m, d] (any floating type; summed in float64). symmetric: b is a, and the sums over all n^2
/// ordered pairs (the diagonal's zero distances and unit kernels included) come from the pairs i < j,
/// doubled. One pass over the pairs serves the distance and every kernel; rows in blocks on torch's
/// threads, the blocks' sums added in a fixed order (the same numbers for any number of threads).
PairSums pair_sums(const Tensor& a, const Tensor& b, const std::vector<double>& bandwidths, bool symmetric);

}  // namespace tilt::detail
