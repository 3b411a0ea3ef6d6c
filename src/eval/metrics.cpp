#include "tilt/eval/metrics.h"

#include "tilt/core/check.h"
#include "tilt/core/error.h"

#include "pair_kernel.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>  // at::NoGradGuard; not pulled in by ATen.h since LibTorch 2.0

#include <algorithm>
#include <cmath>

namespace tilt {
namespace {

void check_pair(const Tensor& x, const Tensor& y, const char* what) {
  if (!x.defined() || !y.defined() || x.dim() != 2 || y.dim() != 2 || x.size(1) != y.size(1) ||
      x.size(0) < 1 || y.size(0) < 1) {
    throw Error(std::string(what) + ": sample sets must be [n, d] and [m, d] with the same d, got " +
                shape_string(x) + " and " + shape_string(y));
  }
  // A NaN sample made the distance NaN with no word of where it came from.
  if (!at::isfinite(x).all().item<bool>() || !at::isfinite(y).all().item<bool>()) {
    throw Error(std::string(what) + ": the sample sets must be finite (a NaN or Inf sample: a diverged model?)");
  }
}

}  // namespace

std::vector<double> median_bandwidths(const Tensor& reference) {
  at::NoGradGuard no_grad;
  const Tensor r = reference.to(at::kDouble).slice(0, 0, 2000);
  const Tensor d = at::cdist(r, r);
  const Tensor off = d.masked_select(~at::eye(d.size(0), at::kBool));
  const double median = off.numel() ? off.median().item<double>() : 1.0;
  const double m = median > 0 ? median : 1.0;
  return {m / 4, m / 2, m, 2 * m};
}

namespace {

void check_bandwidths(const std::vector<double>& bandwidths) {
  for (double s : bandwidths) {
    if (!(s > 0)) throw Error("MMD: bandwidths must be positive");
  }
}

}  // namespace

double energy_distance(const Tensor& x, const Tensor& y) {
  check_pair(x, y, "energy distance");
  const double n = static_cast<double>(x.size(0)), m = static_cast<double>(y.size(0));
  return 2.0 * detail::pair_sums(x, y, {}, false).dist / (n * m) - detail::pair_sums(x, x, {}, true).dist / (n * n) -
         detail::pair_sums(y, y, {}, true).dist / (m * m);
}

SampleSelfTerms sample_self_terms(const Tensor& x, const std::vector<double>& bandwidths) {
  check_pair(x, x, "sample distances");
  check_bandwidths(bandwidths);
  const detail::PairSums xx = detail::pair_sums(x, x, bandwidths, /*symmetric=*/true);
  return {x.size(0), bandwidths, xx.dist, xx.kernel};
}

namespace {

void check_self_terms(const Tensor& x, const SampleSelfTerms& xx, const char* which) {
  if (xx.n != x.size(0) || xx.kernel.size() != xx.bandwidths.size()) {
    throw Error(std::string("sample distances: the self terms are of ") + std::to_string(xx.n) + " samples, " + which +
                " has " + std::to_string(x.size(0)));
  }
}

}  // namespace

SampleDistances sample_distances(const Tensor& x, const Tensor& y, const SampleSelfTerms& xx,
                                 const SampleSelfTerms& yy) {
  check_pair(x, y, "sample distances");
  check_self_terms(x, xx, "x");
  check_self_terms(y, yy, "y");
  if (xx.bandwidths != yy.bandwidths) throw Error("sample distances: the self terms of x and y have other bandwidths");
  const double n = static_cast<double>(x.size(0)), m = static_cast<double>(y.size(0));
  // Each pairwise distance serves the energy distance and every kernel.
  const detail::PairSums xy = detail::pair_sums(x, y, xx.bandwidths, false);
  SampleDistances r{2.0 * xy.dist / (n * m) - xx.dist / (n * n) - yy.dist / (m * m), 0.0};
  for (size_t k = 0; k < xx.bandwidths.size(); ++k) {
    r.mmd += xx.kernel[k] / (n * n) + yy.kernel[k] / (m * m) - 2.0 * xy.kernel[k] / (n * m);
  }
  return r;
}

SampleDistances sample_distances(const Tensor& x, const Tensor& y, const SampleSelfTerms& xx) {
  check_pair(x, y, "sample distances");
  check_self_terms(x, xx, "x");
  return sample_distances(x, y, xx, sample_self_terms(y, xx.bandwidths));
}

SampleDistances sample_distances(const Tensor& x, const Tensor& y, const std::vector<double>& bandwidths) {
  return sample_distances(x, y, sample_self_terms(x, bandwidths));
}

SampleDistances noise_floor(const SampleSelfTerms& yy, int64_t n) {
  if (yy.n < 2 || n < 1 || yy.kernel.size() != yy.bandwidths.size()) {
    throw Error("noise floor: needs the self terms of at least 2 samples and n >= 1, got " + std::to_string(yy.n) +
                " and n = " + std::to_string(n));
  }
  // The V-statistic sums hold the m diagonal pairs (distance 0, kernel 1) and m (m - 1) others, whose mean
  // is an unbiased estimate of E|X - X'| and of E k(X, X') (docs/equations.md, E78 and E108).
  const double m = static_cast<double>(yy.n), pairs = m * (m - 1.0), size = static_cast<double>(n);
  SampleDistances floor{2.0 / size * yy.dist / pairs, 0.0};
  for (double kernel : yy.kernel) floor.mmd += 2.0 / size * (1.0 - (kernel - m) / pairs);
  return floor;
}

double mmd(const Tensor& x, const Tensor& y, std::vector<double> bandwidths) {
  if (bandwidths.empty()) bandwidths = median_bandwidths(at::cat({x.slice(0, 0, 1000), y.slice(0, 0, 1000)}));
  return sample_distances(x, y, bandwidths).mmd;
}

RewardStats reward_stats(const Reward& reward, const Tensor& x) {
  if (!x.defined() || x.dim() < 1 || x.size(0) < 1) throw Error("reward statistics: needs at least one sample, got " + shape_string(x));
  at::NoGradGuard no_grad;
  const Tensor r = reward.value(x).to(at::kDouble);
  const double n = static_cast<double>(r.numel());
  const double se = n > 1 ? r.std().item<double>() / std::sqrt(n) : 0.0;
  return {r.mean().item<double>(), se};
}

}  // namespace tilt
