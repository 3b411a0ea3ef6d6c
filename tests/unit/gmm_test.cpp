// The exact Gaussian-mixture model: velocity, score, Jacobian, sampling and tilts (docs/equations.md, E72-E77).
#include "tilt/core/error.h"
#include "tilt/model/gmm.h"
#include "tilt/model/random_problem.h"
#include "tilt/model/reward.h"

#include "../support/checks.h"
#include "../support/helpers.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>

#include <cmath>
#include <vector>

namespace tilt {
namespace {

const auto kDouble = at::TensorOptions().dtype(at::kDouble);

TEST(GaussianMixture, VelocityJacobianMatchesFiniteDifferences) {
  for (const auto& schedule : {make_linear_schedule(), make_cosine_schedule(), make_vp_schedule()}) {
    for (auto mixture : {test::ring_mixture_2d(), test::random_mixture(5, 3, 7)}) {
      GmmVelocity field(mixture, schedule);
      Generator gen = make_generator(1);
      const at::Tensor x = 2.0 * at::randn({6, mixture->dim()}, gen, kDouble);
      for (double t : {0.0, 0.1, 0.5, 0.9, 0.99}) {
        const auto f = [&](const at::Tensor& y) { return field.velocity(y, t); };
        const at::Tensor J = test::autograd_jacobian(f, x);
        const at::Tensor J_fd = test::fd_jacobian(f, x);
        EXPECT_LT((J - J_fd).abs().max().item<double>(), 1e-6 * (1 + J.abs().max().item<double>()))
            << schedule->name() << " d=" << mixture->dim() << " t=" << t;
      }
    }
  }
}

TEST(GaussianMixture, ClosedFormVjpMatchesAutogradAndFiniteDifferences) {
  // GmmVelocity::vjp (closed form) against the autograd default and against central differences of
  // v, for rotated and diagonal covariances, in double and in float32.
  for (const auto& schedule : {make_linear_schedule(), make_vp_schedule()}) {
    for (auto mixture : {test::ring_mixture_2d(), test::random_mixture(5, 3, 7)}) {
      GmmVelocity field(mixture, schedule);
      Generator gen = make_generator(3);
      const at::Tensor x = 2.0 * at::randn({7, mixture->dim()}, gen, kDouble);
      const at::Tensor a = at::randn({7, mixture->dim()}, gen, kDouble);
      for (double t : {0.0, 0.05, 0.5, 0.97}) {
        at::Tensor v;
        const at::Tensor closed = field.vjp(x, t, a, &v);
        const at::Tensor reference = field.VelocityField::vjp(x, t, a);
        const double scale = 1 + reference.abs().max().item<double>();
        EXPECT_LT((closed - reference).abs().max().item<double>(), 1e-10 * scale)
            << schedule->name() << " d=" << mixture->dim() << " t=" << t;
        EXPECT_LT((v - field.velocity(x, t)).abs().max().item<double>(), 1e-12);
        const at::Tensor J_fd = test::fd_jacobian([&](const at::Tensor& y) { return field.velocity(y, t); }, x);
        const at::Tensor fd = at::matmul(J_fd.transpose(1, 2), a.unsqueeze(-1)).squeeze(-1);  // J^T a
        EXPECT_LT((closed - fd).abs().max().item<double>(), 1e-6 * scale) << "finite differences, t=" << t;
        const at::Tensor closed32 = field.vjp(x.to(at::kFloat), t, a.to(at::kFloat));
        EXPECT_EQ(closed32.scalar_type(), at::kFloat);
        EXPECT_LT((closed32.to(at::kDouble) - reference).abs().max().item<double>(), 1e-4 * scale);
      }
    }
  }
}

TEST(GaussianMixture, FusedVelocityEqualsTheTensorExpressions) {
  // At one time the velocity takes a fused loop over the rows (diagonal covariances, and rotated ones in up to 12
  // dimensions) unless a graph is wanted through the result: both ways must agree, in double and float32,
  // including t = 0 and t = 1; so must the VJP (its autograd reference: ClosedFormVjpMatchesAutogradAndFiniteDifferences).
  for (const auto& schedule : {make_linear_schedule(), make_cosine_schedule()}) {
    for (auto mixture : {test::ring_mixture_2d(), test::random_mixture(5, 3, 7), test::random_mixture(9, 4, 2),
                         test::random_mixture(12, 3, 5), test::random_mixture(40, 2, 3)}) {
      GmmVelocity field(mixture, schedule);
      Generator gen = make_generator(5);
      for (auto dtype : {at::kDouble, at::kFloat}) {
        // float32 beyond 12 dimensions takes the tensor expressions in float, less accurate than this test's bound
        if (dtype == at::kFloat && mixture->dim() > 12) continue;
        const at::Tensor x = 3.0 * at::randn({33, mixture->dim()}, gen, at::TensorOptions().dtype(dtype));
        const at::Tensor a = at::randn({33, mixture->dim()}, gen, at::TensorOptions().dtype(dtype));
        for (double t : {0.0, 0.3, 0.8, 1.0}) {
          const at::Tensor fused = field.velocity(x, t);
          EXPECT_EQ(fused.scalar_type(), dtype);
          // The reference in double (the fused loop accumulates in double; float32's error is its schedule's
          // coefficients, computed in float).
          const at::Tensor xg = x.to(at::kDouble).requires_grad_(true);
          const at::Tensor tensors = field.velocity(xg, t);
          const double tol = (dtype == at::kDouble ? 1e-12 : 1e-5) * (1 + tensors.abs().max().item<double>());
          EXPECT_LT((fused.to(at::kDouble) - tensors.detach()).abs().max().item<double>(), tol)
              << schedule->name() << " d=" << mixture->dim() << " t=" << t;
          at::Tensor v;
          const at::Tensor g = field.vjp(x, t, a, &v);
          const at::Tensor g_ref = torch::autograd::grad({tensors}, {xg}, {a.to(at::kDouble)})[0];
          const double gtol = (dtype == at::kDouble ? 1e-10 : 1e-5) * (1 + g_ref.abs().max().item<double>());
          EXPECT_LT((g.to(at::kDouble) - g_ref).abs().max().item<double>(), gtol)
              << schedule->name() << " d=" << mixture->dim() << " t=" << t;
          EXPECT_LT((v - fused).abs().max().item<double>(), tol);
        }
      }
    }
  }
}

TEST(GaussianMixture, VelocityIsKappaXPlusEtaScore) {
  // v = kappa x + eta s (docs/equations.md, E7) at interior times, where both are finite.
  for (const auto& schedule : {make_linear_schedule(), make_cosine_schedule(), make_vp_schedule()}) {
    const auto mixture = test::random_mixture(3, 4, 11);
    Generator gen = make_generator(2);
    const at::Tensor x = at::randn({50, 3}, gen, kDouble);
    for (double t : {0.05, 0.5, 0.95}) {
      const ScheduleTensors s = schedule->at(at::scalar_tensor(t, kDouble));
      const at::Tensor v = mixture->velocity(x, s);
      const at::Tensor score = mixture->marginal_score(x, s);
      const at::Tensor expected = schedule->kappa(t) * x + schedule->eta(t) * score;
      EXPECT_LT((v - expected).abs().max().item<double>(), 1e-9 * (1 + v.abs().max().item<double>()))
          << schedule->name() << " t=" << t;
    }
  }
}

TEST(GaussianMixture, VelocityAtTimeZeroIsFinite) {
  // Linear schedule: v(x, 0) = E[X1] - x.
  const auto mixture = test::ring_mixture_2d();
  GmmVelocity field(mixture, make_linear_schedule());
  const at::Tensor x = at::tensor({0.3, -1.2, 2.0, 0.5}, kDouble).reshape({2, 2});
  const at::Tensor v = field.velocity(x, 0.0);
  EXPECT_LT((v - (mixture->mean().unsqueeze(0) - x)).abs().max().item<double>(), 1e-12);
}

TEST(GaussianMixture, ScoreIsGradientOfLogDensity) {
  const auto mixture = test::random_mixture(4, 3, 5);
  Generator gen = make_generator(3);
  const at::Tensor x = at::randn({10, 4}, gen, kDouble);
  const at::Tensor score = mixture->score(x);
  for (int64_t j = 0; j < 4; ++j) {
    at::Tensor e = at::zeros_like(x);
    e.select(1, j).fill_(1e-6);
    const at::Tensor fd = (mixture->log_prob(x + e) - mixture->log_prob(x - e)) / 2e-6;
    EXPECT_LT((fd - score.select(1, j)).abs().max().item<double>(), 1e-6);
  }
  // The marginal at t = 1 is the mixture itself.
  const at::Tensor one = at::ones({}, kDouble);
  EXPECT_LT((mixture->marginal_score(x, {one, one * 0, one, one * -1}) - score).abs().max().item<double>(), 1e-12);
}

TEST(GaussianMixture, SampleMomentsMatch) {
  const auto mixture = test::random_mixture(3, 4, 9);
  Generator gen = make_generator(4);
  const at::Tensor x = mixture->sample(200000, gen, at::kDouble);
  const at::Tensor cov = mixture->covariance();
  const at::Tensor se = (at::diagonal(cov) / 200000.0).sqrt();
  EXPECT_LT(((x.mean(0) - mixture->mean()).abs() / se).max().item<double>(), 4.5);
  const at::Tensor c = x - x.mean(0);
  const at::Tensor emp = at::matmul(c.t(), c) / 200000.0;
  EXPECT_LT((emp - cov).abs().max().item<double>(), 0.03 * cov.abs().max().item<double>());
}

// Self-normalised importance sampling of E_{p*}[x], E_{p*}[x x^T] and log Z with base samples.
struct IsEstimate {
  at::Tensor mean, second;
  double log_z;
};
IsEstimate importance(const GaussianMixture& base, const Reward& reward, double lambda, int64_t n, uint64_t seed) {
  Generator gen = make_generator(seed);
  const at::Tensor x = base.sample(n, gen, at::kDouble);
  const at::Tensor logw = lambda * reward.value(x);
  const at::Tensor w = at::softmax(logw, 0).unsqueeze(1);
  IsEstimate e;
  e.mean = (w * x).sum(0);
  e.second = at::matmul((w * x).t(), x);
  e.log_z = (at::logsumexp(logw, {0}) - std::log(static_cast<double>(n))).item<double>();
  return e;
}

void expect_matches(const GaussianMixture& tilted, double log_z, const IsEstimate& is, double tol) {
  const at::Tensor second = tilted.covariance() + at::outer(tilted.mean(), tilted.mean());
  EXPECT_LT((tilted.mean() - is.mean).abs().max().item<double>(), tol);
  EXPECT_LT((second - is.second).abs().max().item<double>(), 2 * tol);
  EXPECT_NEAR(log_z, is.log_z, tol);
}

TEST(GaussianMixture, LinearTiltMatchesImportanceSampling) {
  const auto base = test::ring_mixture_2d();
  LinearReward reward(at::tensor({0.6, -0.3}, kDouble));
  double log_z = 0;
  const GaussianMixture tilted = *reward.tilt(*base, 1.5, &log_z);
  expect_matches(tilted, log_z, importance(*base, reward, 1.5, 1000000, 21), 0.03);
}

TEST(GaussianMixture, QuadraticTiltMatchesImportanceSampling) {
  const auto base = test::ring_mixture_2d();
  QuadraticReward reward(at::tensor({1.5, 1.0}, kDouble), at::tensor({1.0, 0.3, 0.3, 0.5}, kDouble).reshape({2, 2}));
  double log_z = 0;
  const GaussianMixture tilted = *reward.tilt(*base, 0.8, &log_z);
  expect_matches(tilted, log_z, importance(*base, reward, 0.8, 1000000, 22), 0.03);
  // The formula for invertible A (docs/equations.md, E76): Sigma' = (Sigma^-1 + A)^-1, mu' = Sigma'(Sigma^-1 mu + A c).
  const at::Tensor A = 0.8 * reward.matrix();
  const at::Tensor S = base->covariances()[0];
  const at::Tensor S_new = at::inverse(at::inverse(S) + A);
  const at::Tensor mu_new = at::matmul(S_new, at::matmul(at::inverse(S), base->means()[0]) + at::matmul(A, reward.center()));
  // Component order is kept by the tilt.
  EXPECT_LT((tilted.covariances()[0] - S_new).abs().max().item<double>(), 1e-12);
  EXPECT_LT((tilted.means()[0] - mu_new).abs().max().item<double>(), 1e-12);
}

TEST(GaussianMixture, QuadraticTiltWithSingularMatrix) {
  // A reward on one coordinate only: A = diag(1, 0) is not invertible.
  const auto base = test::ring_mixture_2d();
  QuadraticReward reward(at::tensor({2.0, 0.0}, kDouble), at::tensor({1.0, 0.0, 0.0, 0.0}, kDouble).reshape({2, 2}));
  double log_z = 0;
  const GaussianMixture tilted = *reward.tilt(*base, 2.0, &log_z);
  expect_matches(tilted, log_z, importance(*base, reward, 2.0, 1000000, 23), 0.03);
}

// A strong linear tilt: the log weights log w_k + lambda a.mu_k + lambda^2 a.Sigma_k a / 2 are 50 and 860, and the first
// component's weight underflows. The tilt is the second component alone, N(mu_2 + lambda Sigma_2 a, Sigma_2), and
// log Z its log weight (E75); at lambda = 0.3 both stay, and agree with importance sampling.
TEST(GaussianMixture, StrongTiltLeavesOutComponentsWithoutMass) {
  const GaussianMixture base(at::tensor({0.5, 0.5}, kDouble), at::tensor({0.0, 0.0, 3.0, 0.0}, kDouble).reshape({2, 2}),
                             at::stack({0.25 * at::eye(2, kDouble), 4.0 * at::eye(2, kDouble)}));
  LinearReward reward(at::tensor({1.0, 0.0}, kDouble));
  double log_z = 0;
  const GaussianMixture strong = *reward.tilt(base, 20.0, &log_z);
  ASSERT_EQ(strong.components(), 1);
  EXPECT_NEAR(strong.means()[0][0].item<double>(), 83.0, 1e-12);
  EXPECT_NEAR(strong.means()[0][1].item<double>(), 0.0, 1e-12);
  EXPECT_TRUE(at::allclose(strong.covariances()[0], 4.0 * at::eye(2, kDouble)));
  EXPECT_NEAR(log_z, std::log(0.5) + 860.0, 1e-9);
  const GaussianMixture mild = *reward.tilt(base, 0.3, &log_z);
  EXPECT_EQ(mild.components(), 2);
  expect_matches(mild, log_z, importance(base, reward, 0.3, 1000000, 25), 0.05);
}

// exp(lambda r) with lambda < 0 grows away from the centre: p* exists only where Sigma_k^{-1} + lambda P is positive
// definite for every component. Just inside the bound the tilt is formed; past it the error says why.
TEST(GaussianMixture, QuadraticTiltWithoutAFiniteIntegralIsRefused) {
  const auto base = test::ring_mixture_2d();
  const double var = at::linalg_eigvalsh(base->covariances()).max().item<double>();  // the largest variance
  QuadraticReward reward(at::tensor({0.5, 0.0}, kDouble), at::eye(2, kDouble));
  EXPECT_TRUE(reward.tilt(*base, -0.9 / var).has_value());
  test::expect_contains(test::error_of([&] { reward.tilt(*base, -1.1 / var); }), "has no finite integral");
}

TEST(GaussianMixture, ProductMatchesImportanceSampling) {
  const auto base = test::ring_mixture_2d();
  auto q = test::random_mixture(2, 2, 3);
  GmmLogDensityReward reward(q);
  double log_z = 0;
  const GaussianMixture tilted = *reward.tilt(*base, 1.0, &log_z);
  EXPECT_EQ(tilted.components(), base->components() * q->components());
  expect_matches(tilted, log_z, importance(*base, reward, 1.0, 1000000, 24), 0.03);
  EXPECT_FALSE(reward.tilt(*base, 2.0).has_value());
}

// The random family of tilt_ode_gap (scripts/random_family.sh): every problem's exact p* is its tilt (checked
// against importance sampling of the base, as above, in d = 2..10, linear and quadratic rewards), a seed gives the
// same problem twice and different seeds different ones.
TEST(RandomTiltProblem, ExactTiltMatchesImportanceSamplingInEveryDimension) {
  const std::vector<int64_t> dims = {2, 3, 4, 5, 6, 7, 8, 9, 10, 3};
  for (uint64_t seed = 0; seed < dims.size(); ++seed) {
    const RandomTiltProblem p = random_tilt_problem(dims[seed], seed);
    ASSERT_EQ(p.base->dim(), dims[seed]);
    ASSERT_EQ(p.reward->dim(), dims[seed]);
    EXPECT_EQ(p.reward->kind(), seed % 2 == 0 ? "quadratic" : "linear");
    EXPECT_GE(p.base->components(), 2);
    EXPECT_LE(p.base->components(), 4);
    EXPECT_NEAR(p.base->weights().sum().item<double>(), 1.0, 1e-12);
    double log_z = 0;
    const auto tilted = exact_tilt(*p.reward, *p.base, p.lambda, &log_z);
    ASSERT_TRUE(tilted.has_value()) << "seed " << seed;
    // The tilt must move the law (else the family tests nothing): its mean by a tenth of a standard deviation.
    EXPECT_GT((tilted->mean() - p.base->mean()).norm().item<double>(), 0.1) << "seed " << seed;
    expect_matches(*tilted, log_z, importance(*p.base, *p.reward, p.lambda, 400000, 40 + seed), 0.05);
  }
  const RandomTiltProblem a = random_tilt_problem(4, 7), b = random_tilt_problem(4, 7), c = random_tilt_problem(4, 9);
  EXPECT_TRUE(at::equal(a.base->means(), b.base->means()));
  EXPECT_GT((a.base->mean() - c.base->mean()).norm().item<double>(), 1e-3);
  EXPECT_THROW(random_tilt_problem(0, 1), Error);
}

TEST(GaussianMixture, RejectsBadParameters) {
  const at::Tensor w = at::ones({2}, kDouble), mu = at::zeros({2, 2}, kDouble);
  const at::Tensor cov = at::eye(2, kDouble).expand({2, 2, 2}).clone();
  EXPECT_THROW(GaussianMixture(w, mu, cov.slice(0, 0, 1)), Error);
  EXPECT_THROW(GaussianMixture(-w, mu, cov), Error);
  at::Tensor bad = cov.clone();
  bad[0][0][0] = -1.0;
  EXPECT_THROW(GaussianMixture(w, mu, bad), Error);
  at::Tensor asym = cov.clone();
  asym[0][0][1] = 0.5;
  EXPECT_THROW(GaussianMixture(w, mu, asym), Error);
}

}  // namespace
}  // namespace tilt
