// Distances between sample sets, and reward statistics.
#pragma once

#include "tilt/core/tensor.h"
#include "tilt/model/reward.h"

#include <vector>

namespace tilt {

/// Energy distance (Szekely and Rizzo's E-statistic, V-statistic form):
///   2 mean_ij |x_i - y_j| - mean_ij |x_i - x_j| - mean_ij |y_i - y_j|.
/// Non-negative; for two independent sets of n samples from one law its expectation is
/// (2/n) E|X - X'| (the noise floor), and it grows with any difference in law.
double energy_distance(const Tensor& x, const Tensor& y);

/// Squared maximum mean discrepancy (V-statistic) with a sum of Gaussian kernels
/// exp(-|x-y|^2 / (2 s^2)) over the given bandwidths s; empty: median_bandwidths of the pooled samples.
double mmd(const Tensor& x, const Tensor& y, std::vector<double> bandwidths = {});

/// Bandwidths m/4, m/2, m, 2m from the median pairwise distance m of (up to 2000 of) the samples:
/// compute them once from the target so that MMDs of different sample sets are comparable.
std::vector<double> median_bandwidths(const Tensor& reference);

/// Energy distance and MMD (with the given bandwidths) from one computation of the pairwise
/// distances.
struct SampleDistances {
  double energy, mmd;
};
SampleDistances sample_distances(const Tensor& x, const Tensor& y, const std::vector<double>& bandwidths);

/// The terms of sample_distances that depend on x alone (the sums of its pairwise distances and kernels),
/// computed once for a set compared with many fresh sets y (tilt eval's replicates): a third of the work.
struct SampleSelfTerms {
  int64_t n = 0;
  std::vector<double> bandwidths;
  double dist = 0;
  std::vector<double> kernel;
};
SampleSelfTerms sample_self_terms(const Tensor& x, const std::vector<double>& bandwidths);
/// sample_distances(x, y, bandwidths) with x's own terms given (the same numbers); throws tilt::Error if
/// x_self was computed for another size or other bandwidths.
SampleDistances sample_distances(const Tensor& x, const Tensor& y, const SampleSelfTerms& x_self);
/// The same with y's own terms given too (a target set met by several files): only the pairs (x_i, y_j) are
/// summed. Throws tilt::Error if either was computed for another size, or they have other bandwidths.
SampleDistances sample_distances(const Tensor& x, const Tensor& y, const SampleSelfTerms& x_self,
                                 const SampleSelfTerms& y_self);

/// The noise floor (docs/equations.md, E78 and E108): the expected energy distance, (2/n) E|X - X'|, and
/// MMD, (2/n) sum_s (1 - E k_s(X, X')), between two independent sets of n samples of one law, estimated
/// without bias from the self terms of one set of that law (of any size m >= 2: the means over its m (m - 1)
/// pairs i != j). Much less noisy than the distance between two fresh sets, and free once the set's own
/// terms are known.
SampleDistances noise_floor(const SampleSelfTerms& y_self, int64_t n);

/// Mean and standard error of r(x).
struct RewardStats {
  double mean, standard_error;
};
RewardStats reward_stats(const Reward& reward, const Tensor& x);

}  // namespace tilt
