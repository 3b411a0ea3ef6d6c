#include "tilt/eval/metrics.h"

#include "tilt/core/check.h"
#include "tilt/core/error.h"

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
}

// Rows of a block of pairwise distances: about 4 MB of doubles. Small enough that the allocator keeps reusing
// the same memory (blocks over its mmap threshold were mapped and unmapped each time, and the page faults took
// more time than the arithmetic: 34 s of system time in a 28 s eval of 10,000 samples), large enough to keep
// the products efficient.
int64_t pair_block_rows(int64_t columns) { return std::max<int64_t>(16, (int64_t{1} << 19) / std::max<int64_t>(columns, 1)); }

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

// The sums over all pairs (a_i, b_j) of |a_i - b_j| and of each kernel, in blocks of rows.
struct PairSums {
  double dist = 0;
  std::vector<double> kernel;
};

// How the kernels exp(-d^2 / (2 s^2)) are evaluated: when the bandwidths form a ladder s, s/2, s/4, ... (in any
// order; median_bandwidths' four do), one exp for the widest and two squarings per rung down, since
// exp(-d^2 / (2 (s/2)^2)) = exp(-d^2 / (2 s^2))^4; otherwise one exp each.
struct KernelLadder {
  std::vector<size_t> order;  // bandwidth indices, widest first
  bool ladder = false;
  explicit KernelLadder(const std::vector<double>& bw) : order(bw.size()) {
    for (size_t k = 0; k < bw.size(); ++k) order[k] = k;
    std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return bw[a] > bw[b]; });
    ladder = bw.size() > 1;
    for (size_t i = 1; i < order.size(); ++i) ladder = ladder && bw[order[i - 1]] == 2.0 * bw[order[i]];
  }
  // Adds weight * sum of each kernel over the distances squared d2 to sums.
  void add(const Tensor& d2, const std::vector<double>& bw, double weight, std::vector<double>& sums) const {
    if (!ladder) {
      for (size_t k = 0; k < bw.size(); ++k) sums[k] += weight * at::exp(d2 / (-2.0 * bw[k] * bw[k])).sum().item<double>();
      return;
    }
    Tensor u = at::exp(d2 / (-2.0 * bw[order[0]] * bw[order[0]]));
    sums[order[0]] += weight * u.sum().item<double>();
    for (size_t i = 1; i < order.size(); ++i) {
      u = u * u;
      u.mul_(u);
      sums[order[i]] += weight * u.sum().item<double>();
    }
  }
};

// With b the same set as a (symmetric: the self terms), each block of rows meets only the columns from its own
// first row on: the block on the diagonal once (it holds both orders of its pairs), the columns after it twice.
PairSums pair_sums(const Tensor& a, const Tensor& b, const std::vector<double>& bandwidths, bool symmetric = false) {
  PairSums out;
  out.kernel.assign(bandwidths.size(), 0.0);
  const KernelLadder kernels(bandwidths);
  const int64_t block = pair_block_rows(b.size(0));
  const auto add = [&](const Tensor& rows, const Tensor& columns, double weight) {
    if (columns.size(0) == 0) return;
    const Tensor d = at::cdist(rows, columns);
    out.dist += weight * d.sum().item<double>();
    if (!bandwidths.empty()) kernels.add(d.pow(2), bandwidths, weight, out.kernel);
  };
  for (int64_t i = 0; i < a.size(0); i += block) {
    const int64_t end = std::min(i + block, a.size(0));
    const Tensor rows = a.slice(0, i, end);
    if (!symmetric) {
      add(rows, b, 1.0);
      continue;
    }
    add(rows, b.slice(0, i, end), 1.0);
    add(rows, b.slice(0, end, b.size(0)), 2.0);
  }
  return out;
}

}  // namespace

double energy_distance(const Tensor& x_in, const Tensor& y_in) {
  check_pair(x_in, y_in, "energy distance");
  at::NoGradGuard no_grad;
  const Tensor x = x_in.to(at::kDouble), y = y_in.to(at::kDouble);
  const double n = static_cast<double>(x.size(0)), m = static_cast<double>(y.size(0));
  return 2.0 * pair_sums(x, y, {}).dist / (n * m) - pair_sums(x, x, {}, true).dist / (n * n) -
         pair_sums(y, y, {}, true).dist / (m * m);
}

SampleSelfTerms sample_self_terms(const Tensor& x_in, const std::vector<double>& bandwidths) {
  check_pair(x_in, x_in, "sample distances");
  check_bandwidths(bandwidths);
  at::NoGradGuard no_grad;
  const Tensor x = x_in.to(at::kDouble);
  const PairSums xx = pair_sums(x, x, bandwidths, /*symmetric=*/true);
  return {x.size(0), bandwidths, xx.dist, xx.kernel};
}

SampleDistances sample_distances(const Tensor& x_in, const Tensor& y_in, const SampleSelfTerms& xx) {
  check_pair(x_in, y_in, "sample distances");
  if (xx.n != x_in.size(0) || xx.kernel.size() != xx.bandwidths.size()) {
    throw Error("sample distances: the self terms are of " + std::to_string(xx.n) + " samples, x has " +
                std::to_string(x_in.size(0)));
  }
  at::NoGradGuard no_grad;
  const Tensor x = x_in.to(at::kDouble), y = y_in.to(at::kDouble);
  const double n = static_cast<double>(x.size(0)), m = static_cast<double>(y.size(0));
  // Each block of pairwise distances serves the energy distance and every kernel.
  const PairSums xy = pair_sums(x, y, xx.bandwidths), yy = pair_sums(y, y, xx.bandwidths, /*symmetric=*/true);
  SampleDistances r{2.0 * xy.dist / (n * m) - xx.dist / (n * n) - yy.dist / (m * m), 0.0};
  for (size_t k = 0; k < xx.bandwidths.size(); ++k) {
    r.mmd += xx.kernel[k] / (n * n) + yy.kernel[k] / (m * m) - 2.0 * xy.kernel[k] / (n * m);
  }
  return r;
}

SampleDistances sample_distances(const Tensor& x, const Tensor& y, const std::vector<double>& bandwidths) {
  return sample_distances(x, y, sample_self_terms(x, bandwidths));
}

double mmd(const Tensor& x, const Tensor& y, std::vector<double> bandwidths) {
  if (bandwidths.empty()) bandwidths = median_bandwidths(at::cat({x.slice(0, 0, 1000), y.slice(0, 0, 1000)}));
  return sample_distances(x, y, bandwidths).mmd;
}

RewardStats reward_stats(const Reward& reward, const Tensor& x) {
  at::NoGradGuard no_grad;
  const Tensor r = reward.value(x).to(at::kDouble);
  const double n = static_cast<double>(r.numel());
  const double se = n > 1 ? r.std().item<double>() / std::sqrt(n) : 0.0;
  return {r.mean().item<double>(), se};
}

}  // namespace tilt
