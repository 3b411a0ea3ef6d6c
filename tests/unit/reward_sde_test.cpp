// Rewards, the drift's vector-Jacobian product, and the sampler (orders and marginals).
#include "tilt/core/error.h"
#include "tilt/eval/metrics.h"
#include "tilt/model/gmm.h"
#include "tilt/model/reward.h"
#include "tilt/sde/sampler.h"

#include "../support/helpers.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>

#include <cmath>

namespace tilt {
namespace {

const auto kDouble = at::TensorOptions().dtype(at::kDouble);

void expect_gradient_matches_fd(const Reward& reward, int64_t d) {
  Generator gen = make_generator(5);
  const at::Tensor x = 1.5 * at::randn({8, d}, gen, kDouble);
  const at::Tensor g = reward.grad(x);
  for (int64_t j = 0; j < d; ++j) {
    at::Tensor e = at::zeros_like(x);
    e.select(1, j).fill_(1e-6);
    const at::Tensor fd = (reward.value(x + e) - reward.value(x - e)) / 2e-6;
    EXPECT_LT((fd - g.select(1, j)).abs().max().item<double>(), 1e-6 * (1 + g.abs().max().item<double>()))
        << reward.kind();
  }
}

TEST(Reward, GradientsMatchFiniteDifferences) {
  expect_gradient_matches_fd(LinearReward(at::tensor({0.5, -1.0, 2.0}, kDouble)), 3);
  Generator gen = make_generator(1);
  const at::Tensor L = at::randn({3, 3}, gen, kDouble);
  expect_gradient_matches_fd(QuadraticReward(at::tensor({1.0, 0.0, -1.0}, kDouble), at::matmul(L, L.t())), 3);
  expect_gradient_matches_fd(GmmLogDensityReward(test::random_mixture(3, 3, 2)), 3);
}

TEST(Reward, QuadraticValue) {
  QuadraticReward r(at::tensor({1.0, 2.0}, kDouble), at::tensor({2.0, 0.0, 0.0, 1.0}, kDouble).reshape({2, 2}));
  const at::Tensor x = at::tensor({0.0, 0.0}, kDouble).reshape({1, 2});
  EXPECT_NEAR(r.value(x).item<double>(), -0.5 * (2.0 * 1 + 1.0 * 4), 1e-14);
  EXPECT_THROW(QuadraticReward(at::zeros({2}), at::tensor({1.0, 0.0, 0.0, -1.0}).reshape({2, 2})), Error);
}

TEST(GenerativeSDE, DriftVjpMatchesFiniteDifferences) {
  const auto mixture = test::random_mixture(3, 3, 4);
  auto field = std::make_shared<GmmVelocity>(mixture, make_linear_schedule());
  for (const auto& noise : {make_memoryless_noise(), make_constant_noise(0.7), make_zero_noise()}) {
    GenerativeSDE sde(field, noise);
    Generator gen = make_generator(6);
    const at::Tensor x = at::randn({5, 3}, gen, kDouble);
    const at::Tensor a = at::randn({5, 3}, gen, kDouble);
    for (double t : {0.0, 0.3, 0.9}) {
      at::Tensor v;
      const at::Tensor vjp = sde.drift_vjp(x, t, a, &v);
      EXPECT_LT((v - field->velocity(x, t)).abs().max().item<double>(), 1e-14);
      const at::Tensor J = test::fd_jacobian([&](const at::Tensor& y) { return sde.drift(y, t); }, x);
      const at::Tensor expected = at::matmul(a.unsqueeze(1), J).squeeze(1);  // a^T (db/dx)
      EXPECT_LT((vjp - expected).abs().max().item<double>(), 1e-6 * (1 + expected.abs().max().item<double>()))
          << noise->describe() << " t=" << t;
    }
  }
}

TEST(Metrics, BlockedDistancesEqualTheWholeMatrix) {
  // Against the whole matrix of pairwise distances at once: the row blocks (here 131 rows for 4,000 columns, so
  // three blocks of x with a partial last one) must not change the sums.
  Generator gen = make_generator(41);
  const Tensor x = at::randn({300, 3}, gen, at::kDouble);
  const Tensor y = 0.5 + 1.3 * at::randn({4000, 3}, gen, at::kDouble);
  // cdist's mode 2 takes the coordinate differences: its default, |a|^2 + |b|^2 - 2 a.b for sets this large, is
  // off by 3e-11 relative in the energy distance below, which the sums of differences do not reach.
  const auto cdist = [](const Tensor& a, const Tensor& b) { return at::cdist(a, b, 2.0, 2); };
  const Tensor xy = cdist(x, y), xx = cdist(x, x), yy = cdist(y, y);
  const double n = 300, m = 4000;
  const double energy = 2 * xy.sum().item<double>() / (n * m) - xx.sum().item<double>() / (n * n) -
                        yy.sum().item<double>() / (m * m);
  const auto whole_mmd = [&](const std::vector<double>& bw) {
    double mmd = 0;
    for (double s : bw) {
      const auto k = [&](const Tensor& d) { return at::exp(d.pow(2) / (-2 * s * s)).sum().item<double>(); };
      mmd += k(xx) / (n * n) + k(yy) / (m * m) - 2 * k(xy) / (n * m);
    }
    return mmd;
  };
  const std::vector<double> bw{0.5, 2.0};
  const double mmd = whole_mmd(bw);
  EXPECT_NEAR(energy_distance(x, y), energy, 1e-12 * std::abs(energy) + 1e-14);
  const SampleDistances d = sample_distances(x, y, bw);
  // (the self terms take half the matrix, doubled, and the diagonal blocks whole)
  EXPECT_NEAR(d.energy, energy, 1e-12 * std::abs(energy) + 1e-14);
  EXPECT_NEAR(d.mmd, mmd, 1e-12 * std::abs(mmd) + 1e-14);
  // Bandwidths in a ladder s, s/2, s/4, s/8 (given in any order) take one exp and squarings: the same sums.
  const std::vector<double> ladder{0.3, 2.4, 0.6, 1.2};
  const double mmd_ladder = whole_mmd(ladder);
  EXPECT_NEAR(sample_distances(x, y, ladder).mmd, mmd_ladder, 1e-11 * std::abs(mmd_ladder) + 1e-14);
  EXPECT_GT(mmd_ladder, 1e-3);
  EXPECT_GT(energy, 0.1);  // the two laws differ: not a vacuous comparison of zeros
  // x's own terms computed once (tilt eval's replicates) give the same numbers, bit for bit, against fresh sets.
  const SampleSelfTerms x_self = sample_self_terms(x, bw);
  for (int r = 0; r < 2; ++r) {
    const Tensor y_r = 0.5 + 1.3 * at::randn({4000, 3}, gen, at::kDouble);
    const SampleDistances once = sample_distances(x, y_r, bw), reused = sample_distances(x, y_r, x_self);
    EXPECT_EQ(once.energy, reused.energy);
    EXPECT_EQ(once.mmd, reused.mmd);
  }
  EXPECT_THROW(sample_distances(x.slice(0, 0, 200), y, x_self), Error);
}

// The plain whole-matrix sums the fused pair kernel must reproduce: every pairwise squared distance by its
// coordinate differences, in float64, then sqrt and one exp per bandwidth.
struct WholeMatrix {
  double energy = 0, mmd = 0;
};
WholeMatrix whole_matrix(const Tensor& x, const Tensor& y, const std::vector<double>& bw) {
  const auto d2 = [](const Tensor& a, const Tensor& b) { return (a.unsqueeze(1) - b.unsqueeze(0)).pow(2).sum(-1); };
  const Tensor xy = d2(x, y), xx = d2(x, x), yy = d2(y, y);
  const auto mean = [](const Tensor& t) { return t.sum().item<double>() / static_cast<double>(t.numel()); };
  WholeMatrix r;
  r.energy = 2 * mean(xy.sqrt()) - mean(xx.sqrt()) - mean(yy.sqrt());
  for (double s : bw) {
    const auto k = [&](const Tensor& t) { return mean(at::exp(t / (-2 * s * s))); };
    r.mmd += k(xx) + k(yy) - 2 * k(xy);
  }
  return r;
}

TEST(Metrics, FusedPairKernelEqualsThePlainWholeMatrix) {
  // Sizes that divide neither the kernel's blocks of rows (32), its tiles of columns (512) nor its 8 lanes;
  // dimensions 1, 3 and 7; a ladder of bandwidths (one exp, then squarings), a set that is no ladder (one exp
  // each), a mixed one, and none.
  Generator gen = make_generator(43);
  const std::vector<std::vector<double>> bandwidth_sets{{0.3, 2.4, 0.6, 1.2}, {0.7, 1.9, 0.33}, {0.5, 1.0, 3.0}, {}};
  for (int64_t d : {1, 3, 7}) {
    const Tensor x = at::randn({97, d}, gen, at::kDouble);
    const Tensor y = 0.4 + 1.2 * at::randn({1031, d}, gen, at::kDouble);
    for (const auto& bw : bandwidth_sets) {
      const WholeMatrix w = whole_matrix(x, y, bw);
      const SampleDistances f = sample_distances(x, y, bw);
      EXPECT_NEAR(f.energy, w.energy, 1e-12 * std::abs(w.energy)) << "d = " << d;
      EXPECT_NEAR(f.mmd, w.mmd, 1e-12 * std::abs(w.mmd) + 1e-15) << "d = " << d << ", " << bw.size() << " bandwidths";
      if (!bw.empty()) EXPECT_GT(w.mmd, 1e-4);
      // y against x: the other shape of the non-symmetric sums.
      const SampleDistances g = sample_distances(y, x, bw);
      EXPECT_NEAR(g.energy, w.energy, 1e-12 * std::abs(w.energy));
      EXPECT_NEAR(g.mmd, w.mmd, 1e-12 * std::abs(w.mmd) + 1e-15);
    }
    EXPECT_NEAR(energy_distance(x, y), whole_matrix(x, y, {}).energy, 1e-12 * whole_matrix(x, y, {}).energy);
    // The symmetric sums (a set with itself, from the pairs i < j doubled, and the diagonal) alone.
    const std::vector<double> bw{0.25, 0.5, 1.0, 2.0};
    const SampleSelfTerms self = sample_self_terms(y, bw);
    const Tensor yy = (y.unsqueeze(1) - y.unsqueeze(0)).pow(2).sum(-1);
    EXPECT_NEAR(self.dist, yy.sqrt().sum().item<double>(), 1e-12 * self.dist);
    for (size_t k = 0; k < bw.size(); ++k) {
      const double whole = at::exp(yy / (-2 * bw[k] * bw[k])).sum().item<double>();
      EXPECT_NEAR(self.kernel[k], whole, 1e-12 * whole) << "bandwidth " << bw[k];
    }
  }
  // One sample against one; float32 input is summed in float64.
  const Tensor a = at::tensor({1.0, 2.0}, kDouble).reshape({1, 2}), b = at::tensor({4.0, 6.0}, kDouble).reshape({1, 2});
  EXPECT_NEAR(sample_distances(a, b, std::vector<double>{5.0}).energy, 10.0, 1e-14);
  EXPECT_NEAR(sample_distances(a, b, std::vector<double>{5.0}).mmd, 2.0 - 2.0 * std::exp(-0.5), 1e-15);
  const Tensor xf = at::randn({50, 3}, gen, at::kDouble), yf = at::randn({61, 3}, gen, at::kDouble);
  EXPECT_NEAR(energy_distance(xf.to(at::kFloat), yf.to(at::kFloat)),
              whole_matrix(xf.to(at::kFloat).to(at::kDouble), yf.to(at::kFloat).to(at::kDouble), {}).energy, 1e-12);
}

TEST(Metrics, PairSumsAreTheSameForAnyNumberOfThreads) {
  // The blocks' sums are added in a fixed order: 1 and 2 threads give the same bits.
  Generator gen = make_generator(44);
  const Tensor x = at::randn({1500, 3}, gen, at::kDouble), y = 0.3 + at::randn({1700, 3}, gen, at::kDouble);
  const std::vector<double> bw{0.25, 0.5, 1.0, 2.0};
  const int threads_before = at::get_num_threads();
  at::set_num_threads(1);
  const SampleDistances one = sample_distances(x, y, bw);
  at::set_num_threads(2);
  const SampleDistances two = sample_distances(x, y, bw);
  at::set_num_threads(threads_before);
  EXPECT_EQ(one.energy, two.energy);
  EXPECT_EQ(one.mmd, two.mmd);
}

TEST(Metrics, NoiseFloorFromOneSetsOwnPairs) {
  // X ~ N(0, 1) in 1-D: E|X - X'| = 2 / sqrt(pi), and X - X' ~ N(0, 2), so E exp(-(X - X')^2 / (2 s^2)) =
  // (1 + 2 / s^2)^(-1/2). The floor for sets of n is (2/n) of the first, and (2/n) sum_s (1 - the second).
  const std::vector<double> bw{0.5, 1.0, 2.0};
  const int64_t n = 40;
  double exact_mmd = 0;
  for (double s : bw) exact_mmd += 2.0 / n * (1.0 - 1.0 / std::sqrt(1.0 + 2.0 / (s * s)));
  const double exact_energy = 2.0 / n * 2.0 / std::sqrt(M_PI);
  Generator gen = make_generator(45);
  // From the own pairs of one large set: within four times its sampling error (2 sd(E[|x - X'|]) / sqrt(m),
  // about 0.5% here).
  const SampleDistances f = noise_floor(sample_self_terms(at::randn({20000, 1}, gen, at::kDouble), bw), n);
  EXPECT_NEAR(f.energy, exact_energy, 0.02 * exact_energy);
  EXPECT_NEAR(f.mmd, exact_mmd, 0.02 * exact_mmd);
  // And what it estimates: the mean distance between two fresh sets of n (E78, E108), over 3000 pairs.
  double energy = 0, mmd = 0;
  const int pairs = 3000;
  for (int p = 0; p < pairs; ++p) {
    const SampleDistances d = sample_distances(at::randn({n, 1}, gen, at::kDouble), at::randn({n, 1}, gen, at::kDouble), bw);
    energy += d.energy / pairs;
    mmd += d.mmd / pairs;
  }
  EXPECT_NEAR(energy, exact_energy, 0.04 * exact_energy);
  EXPECT_NEAR(mmd, exact_mmd, 0.04 * exact_mmd);
  // The unbiased mean over the m (m - 1) pairs i != j, exactly.
  const Tensor y = at::randn({9, 2}, gen, at::kDouble);
  const double off = (y.unsqueeze(1) - y.unsqueeze(0)).pow(2).sum(-1).sqrt().sum().item<double>() / (9 * 8);
  EXPECT_NEAR(noise_floor(sample_self_terms(y, {}), 5).energy, 2.0 / 5 * off, 1e-14);
  EXPECT_THROW(noise_floor(sample_self_terms(y.slice(0, 0, 1), {}), 5), Error);
  EXPECT_THROW(noise_floor(sample_self_terms(y, {}), 0), Error);
}

TEST(Sampler, OdeSolversHaveTheirOrders) {
  // Gaussian data N(mu, s^2 I): the flow ODE maps X0 to X1 = mu + s X0 exactly.
  const double s = 0.6;
  const auto mixture = test::isotropic_gaussian({1.0, -0.5}, s);
  GenerativeSDE ode(std::make_shared<GmmVelocity>(mixture, make_cosine_schedule()), make_zero_noise());
  Generator gen = make_generator(7);
  const at::Tensor x0 = at::randn({64, 2}, gen, kDouble);
  const at::Tensor exact = mixture->means()[0] + s * x0;
  for (Integrator integrator : {Integrator::euler, Integrator::heun}) {
    std::vector<double> h, err;
    for (int64_t K : {10, 20, 40, 80, 160}) {
      SampleOptions opts;
      opts.integrator = integrator;
      const at::Tensor x1 = simulate(ode, x0, TimeGrid::uniform(K), gen, opts).final();
      h.push_back(1.0 / K);
      err.push_back((x1 - exact).abs().max().item<double>());
    }
    const double order = test::fitted_order(h, err);
    EXPECT_NEAR(order, integrator == Integrator::euler ? 1.0 : 2.0, 0.25) << "fitted order " << order;
  }
}

TEST(Sampler, HeunIsOnlyForTheOde) {
  GenerativeSDE sde(std::make_shared<GmmVelocity>(test::ring_mixture_2d(), make_linear_schedule()),
                    make_memoryless_noise());
  Generator gen = make_generator(0);
  SampleOptions opts;
  opts.integrator = Integrator::heun;
  EXPECT_THROW(simulate(sde, at::zeros({2, 2}), TimeGrid::uniform(4), gen, opts), Error);
}

TEST(Sampler, EveryNoiseScheduleKeepsTheMarginals) {
  // For every sigma(t) the generative SDE has the data distribution at t = 1 (docs/equations.md, E9).
  const auto mixture = test::ring_mixture_2d();
  auto field = std::make_shared<GmmVelocity>(mixture, make_linear_schedule());
  // Energy distances between finite samples of a multimodal law are heavy-tailed (mode counts
  // fluctuate), so both sides are averaged: 8 replicates, and 16 pairs for the floor.
  const int64_t n = 2000;
  const int replicates = 8;
  const double floor = test::energy_noise_floor(*mixture, n, 16, 100);
  Generator gen = make_generator(8);
  for (const auto& noise : {make_memoryless_noise(0.002), make_constant_noise(0.2), make_constant_noise(1.0),
                            make_scaled_memoryless_noise(0.5, 0.002), make_zero_noise()}) {
    SampleOptions opts;
    opts.integrator = noise->is_zero() ? Integrator::heun : Integrator::euler;
    double ed = 0;
    for (int r = 0; r < replicates; ++r) {
      const at::Tensor x = sample(GenerativeSDE(field, noise), n, TimeGrid::uniform(200), gen, opts);
      ed += energy_distance(x, mixture->sample(n, gen)) / replicates;
    }
    EXPECT_LT(ed, 2.0 * floor) << noise->describe() << ": energy distance " << ed << ", floor " << floor;
  }
}

}  // namespace
}  // namespace tilt
