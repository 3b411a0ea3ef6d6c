// Sample-quality metrics for samplers of unnormalised densities (docs/equations.md, E81): 1-D
// Wasserstein-2 distances between the energies, and between the interparticle distances, of a
// generated set and a reference set; mode weights.
#pragma once

#include "tilt/sampling/energy.h"

#include <vector>

namespace tilt::sampling {

/// Exact W2 between the empirical laws of two 1-D samples of any sizes: the L2 distance of their
/// quantile functions, integrated over the merged breakpoints i/n and j/m (sorting; no subsampling).
double w2_1d(const Tensor& a, const Tensor& b);

/// W2 between the energies E(x) and E(y).
double energy_w2(const Energy& energy, const Tensor& x, const Tensor& y);

/// W2 between all interparticle distances of x and of y, pooled (the 1-D OT cost of adjoint_samplers'
/// evaluator, reported here as W2, i.e. with the square root).
double distance_w2(const Tensor& x, const Tensor& y, int64_t particles);

/// Fraction of rows in each mode (energy.mode_of), optionally weighted by exp(log_w) (self-normalised);
/// empty if the energy has no modes.
std::vector<double> mode_weights(const Energy& energy, const Tensor& x, const Tensor& log_w = {});

}  // namespace tilt::sampling
