// Compiled with -fno-math-errno -fno-trapping-math (src/CMakeLists.txt): without them GCC keeps sqrt as a
// library call (it may set errno) and the clamp in exp_nonpositive as a branch, and vectorises nothing.
#include "pair_kernel.h"
#include "../core/simd_clones.h"

#include "tilt/core/error.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>


namespace tilt::detail {
namespace {

// Each sum is kept in this many partial sums (one per SIMD lane), added up at the end of a block in a fixed
// order: the order of the additions is written here, not left to the vectoriser, so it is the same on every run.
constexpr int64_t kLanes = 8;
// Columns per tile: a tile's coordinates and its row of squared distances and kernels stay in the L1 cache.
constexpr int64_t kTileColumns = 512;
// Rows per block: the unit of work of a thread, and of the fixed order in which the sums are added.
constexpr int64_t kBlockRows = 32;

// exp(x) for x <= 0 in float64 within a few ulp, without a library call so that the loops vectorise:
// x = k ln 2 + r with |r| <= ln 2 / 2 (Cody-Waite: ln 2 in two parts, the first exact in k ln2_hi), exp(r)
// by its Taylor polynomial of degree 12 (truncation below 2e-16 relative), 2^k assembled in the exponent
// bits. x is clamped at -708: below, exp(x) < 3.3e-308 is nothing next to the sums it goes into (each at
// least 1: a set's own pairs include the diagonal), and denormals would only be slow.
inline double exp_nonpositive(double x) {
  x = x < -708.0 ? -708.0 : x;
  constexpr double kShift = 6755399441055744.0;  // 1.5 * 2^52: adding it rounds to an integer in the low bits
  const double shifted = x * 1.4426950408889634 + kShift;
  const double k = shifted - kShift;
  const double r = (x - k * 0.693145751953125) - k * 1.42860682030941723212e-6;
  double p = 1.0 / 479001600.0;  // 1/12!
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  // shifted's bits are those of kShift plus k, and kShift's low 12 bits are zero: shifting the sum with the
  // exponent bias left by 52 leaves (k + 1023) << 52, the bits of 2^k (k in [-1021, 0]).
  const uint64_t bits = (__builtin_bit_cast(uint64_t, shifted) + 1023u) << 52;
  return p * __builtin_bit_cast(double, bits);
}

// How each kernel is evaluated, widest bandwidth first: exp(-coefficient d^2), or (ladder) the previous
// kernel squared twice, since exp(-d^2 / (2 (s/2)^2)) = exp(-d^2 / (2 s^2))^4.
struct Rung {
  double coefficient;  ///< 1 / (2 s^2)
  bool from_previous;
  int64_t slot;        ///< the kernel's index in the bandwidths as given
};

// For one row a and `count` columns of bt (d rows, `stride` apart: the other set transposed), adds each lane's
// share of sum sqrt(d^2) to acc[0 .. kLanes) and of kernel q to acc[(1 + slot) kLanes ...). d2 and u hold
// `count` doubles of scratch.
TILT_SIMD_CLONES void row_tile(const double* __restrict a, const double* __restrict bt, int64_t stride, int64_t d,
                               int64_t count, const Rung* rungs, int64_t kernels, double* __restrict d2,
                               double* __restrict u, double* __restrict acc) {
  for (int64_t j = 0; j < count; ++j) d2[j] = 0.0;
  for (int64_t k = 0; k < d; ++k) {
    const double ak = a[k];
    const double* __restrict column = bt + k * stride;
    for (int64_t j = 0; j < count; ++j) {
      const double t = ak - column[j];
      d2[j] += t * t;
    }
  }
  const int64_t full = count - count % kLanes;
  double s[kLanes] = {};
  for (int64_t j = 0; j < full; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) s[l] += std::sqrt(d2[j + l]);
  }
  for (int64_t j = full; j < count; ++j) s[j - full] += std::sqrt(d2[j]);
  for (int64_t l = 0; l < kLanes; ++l) acc[l] += s[l];
  for (int64_t q = 0; q < kernels; ++q) {
    double sk[kLanes] = {};
    if (rungs[q].from_previous) {
      for (int64_t j = 0; j < count; ++j) {
        const double v = u[j] * u[j];
        u[j] = v * v;
      }
    } else {
      const double c = -rungs[q].coefficient;
      for (int64_t j = 0; j < count; ++j) u[j] = exp_nonpositive(c * d2[j]);
    }
    for (int64_t j = 0; j < full; j += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) sk[l] += u[j + l];
    }
    for (int64_t j = full; j < count; ++j) sk[j - full] += u[j];
    double* slot = acc + (1 + rungs[q].slot) * kLanes;
    for (int64_t l = 0; l < kLanes; ++l) slot[l] += sk[l];
  }
}

std::vector<Rung> rungs_of(const std::vector<double>& bandwidths) {
  std::vector<int64_t> order(bandwidths.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return bandwidths[x] > bandwidths[y]; });
  std::vector<Rung> rungs;
  for (size_t i = 0; i < order.size(); ++i) {
    const double s = bandwidths[order[i]];
    const bool ladder = i > 0 && bandwidths[order[i - 1]] == 2.0 * s;
    rungs.push_back({1.0 / (2.0 * s * s), ladder, order[i]});
  }
  return rungs;
}

// The pair sums of rows [row0, row1) of a against the columns of bt (all of them; symmetric: those after each
// row), as lanes added up: out[0] the distances, out[1 + k] kernel k.
void block_sums(const double* a, const double* bt, int64_t d, int64_t m, int64_t row0, int64_t row1, bool symmetric,
                const std::vector<Rung>& rungs, double* out) {
  const int64_t kernels = static_cast<int64_t>(rungs.size());
  std::vector<double> d2(kTileColumns), u(kTileColumns), acc((1 + kernels) * kLanes, 0.0);
  for (int64_t tile = symmetric ? row0 + 1 : 0; tile < m; tile += kTileColumns) {
    const int64_t tile_end = std::min(tile + kTileColumns, m);
    for (int64_t i = row0; i < row1; ++i) {
      const int64_t j0 = symmetric ? std::max(tile, i + 1) : tile;
      if (j0 >= tile_end) continue;
      row_tile(a + i * d, bt + j0, m, d, tile_end - j0, rungs.data(), kernels, d2.data(), u.data(), acc.data());
    }
  }
  for (int64_t q = 0; q <= kernels; ++q) {
    double sum = 0;
    for (int64_t l = 0; l < kLanes; ++l) sum += acc[q * kLanes + l];
    out[q] = sum;
  }
}

}  // namespace

PairSums pair_sums(const Tensor& a_in, const Tensor& b_in, const std::vector<double>& bandwidths, bool symmetric) {
  at::NoGradGuard no_grad;
  const Tensor a = a_in.to(at::kDouble).contiguous();
  const Tensor bt = b_in.to(at::kDouble).t().contiguous();  // [d, m]: each coordinate of the columns in a row
  const int64_t n = a.size(0), m = bt.size(1), d = a.size(1);
  if (bt.size(0) != d || (symmetric && n != m)) throw Error("pair_sums: the sets must be [n, d] and [m, d]");
  const std::vector<Rung> rungs = rungs_of(bandwidths);
  const int64_t width = 1 + static_cast<int64_t>(rungs.size());
  const int64_t blocks = (n + kBlockRows - 1) / kBlockRows;
  std::vector<double> sums(blocks * width, 0.0);
  // A thread takes a contiguous run of tasks; symmetric, block k (long rows) goes with block blocks-1-k
  // (short ones), so that every task is about the same work.
  const int64_t tasks = symmetric ? (blocks + 1) / 2 : blocks;
  const double* ap = a.data_ptr<double>();
  const double* bp = bt.data_ptr<double>();
  const auto run_block = [&](int64_t k) {
    block_sums(ap, bp, d, m, k * kBlockRows, std::min(n, (k + 1) * kBlockRows), symmetric, rungs,
               sums.data() + k * width);
  };
  // Small sums stay on the calling thread: waking the others costs more than they would save.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / (kBlockRows * m));
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      run_block(t);
      if (symmetric && blocks - 1 - t != t) run_block(blocks - 1 - t);
    }
  });
  PairSums out;
  out.kernel.assign(bandwidths.size(), 0.0);
  const double weight = symmetric ? 2.0 : 1.0;
  for (int64_t k = 0; k < blocks; ++k) {
    out.dist += weight * sums[k * width];
    for (const Rung& r : rungs) out.kernel[r.slot] += weight * sums[k * width + 1 + r.slot];
  }
  // The diagonal of a set with itself: distance 0 and every kernel 1.
  if (symmetric) {
    for (double& k : out.kernel) k += static_cast<double>(n);
  }
  return out;
}

}  // namespace tilt::detail
