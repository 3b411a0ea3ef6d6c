// Rewards, the drift's vector-Jacobian product, and the sampler (orders and marginals).
#include "tilt/core/error.h"
#include "tilt/eval/metrics.h"
#include "tilt/model/gmm.h"
#include "tilt/model/reward.h"
#include "tilt/sde/sampler.h"

#include "../support/helpers.h"

#include <ATen/ATen.h>
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
  const Tensor xy = at::cdist(x, y), xx = at::cdist(x, x), yy = at::cdist(y, y);
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
