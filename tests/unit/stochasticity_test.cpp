// The exact gDDIM step of tunable stochasticity gamma (tilt/sde/gddim.h): it solves the point-mass
// SDE exactly, reduces to DDIM/Euler (gamma = 0) and to the DDPM posterior (gamma = 1), and every
// gamma keeps the marginals: exactly (moments propagated in closed form) for Gaussian data, with a
// first-order error in the step; by Monte Carlo against exact samples for a Gaussian mixture.
#include "tilt/core/error.h"
#include "tilt/eval/metrics.h"
#include "tilt/model/gmm.h"
#include "tilt/sde/gddim.h"
#include "tilt/sde/sampler.h"

#include "../support/helpers.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>

namespace tilt {
namespace {

const auto kDouble = at::TensorOptions().dtype(at::kDouble);

// Mean and variance of X_s given X_t = x for data that is a point mass at x1, by RK4 on the moment
// ODEs of the exact SDE dX = [v + gamma^2 eta s] dt + gamma sqrt(2 eta) dB (h = 0), which is linear:
// v = alpha' x1 + beta' (x - alpha x1)/beta, s = -(x - alpha x1)/beta^2.
//   m' = a(t) m + f(t),  V' = 2 a(t) V + 2 gamma^2 eta_t.
std::pair<double, double> point_mass_moments(const Schedule& sch, double gamma, double x, double x1, double t,
                                             double s, int n) {
  auto rhs = [&](double u, double m, double V) {
    const ScheduleValues a = sch.at(u);
    const double eta = a.beta * a.beta * a.d_alpha / a.alpha - a.beta * a.d_beta;
    const double drift_x = a.d_beta / a.beta - gamma * gamma * eta / (a.beta * a.beta);
    const double drift_1 = (a.d_alpha - a.d_beta * a.alpha / a.beta + gamma * gamma * eta * a.alpha / (a.beta * a.beta)) * x1;
    return std::pair<double, double>{drift_x * m + drift_1, 2.0 * drift_x * V + 2.0 * gamma * gamma * eta};
  };
  double m = x, V = 0.0;
  const double h = (s - t) / n;
  for (int i = 0; i < n; ++i) {
    const double u = t + i * h;
    const auto k1 = rhs(u, m, V);
    const auto k2 = rhs(u + h / 2, m + h / 2 * k1.first, V + h / 2 * k1.second);
    const auto k3 = rhs(u + h / 2, m + h / 2 * k2.first, V + h / 2 * k2.second);
    const auto k4 = rhs(u + h, m + h * k3.first, V + h * k3.second);
    m += h / 6 * (k1.first + 2 * k2.first + 2 * k3.first + k4.first);
    V += h / 6 * (k1.second + 2 * k2.second + 2 * k3.second + k4.second);
  }
  return {m, V};
}

TEST(ExactStep, SolvesThePointMassSdeExactly) {
  // docs/equations.md, E16 is derived [D]: check it against an independent integration of the SDE.
  for (const auto& schedule : {make_linear_schedule(), make_cosine_schedule(), make_vp_schedule()}) {
    for (double gamma : {0.0, 0.5, 1.0, 2.0, 5.0}) {
      for (auto [t, s] : {std::pair{0.1, 0.3}, std::pair{0.4, 0.45}, std::pair{0.2, 0.9}}) {
        const double x = 0.7, x1 = -1.3;
        const ScheduleValues a = schedule->at(t);
        const double v = a.d_alpha * x1 + a.d_beta * (x - a.alpha * x1) / a.beta;  // point-mass velocity
        const ExponentialStep step = exponential_step(*schedule, t, s, gamma);
        const auto [m, V] = point_mass_moments(*schedule, gamma, x, x1, t, s, 20000);
        const std::string where = schedule->name() + " gamma=" + std::to_string(gamma) + " t=" +
                                  std::to_string(t) + " s=" + std::to_string(s);
        EXPECT_NEAR(step.c_x * x + step.c_v * v, m, 1e-8 * (1 + std::abs(m))) << where;
        EXPECT_NEAR(step.std * step.std, V, 1e-8 * (1 + V)) << where;
      }
    }
  }
}

TEST(ExactStep, ReducesToEulerDdimAndTheDdpmPosterior) {
  // gamma = 0, linear schedule: DDIM with x1-prediction is Euler's step x + (s - t) v.
  const auto linear = make_linear_schedule();
  for (auto [t, s] : {std::pair{0.0, 0.1}, std::pair{0.3, 0.7}, std::pair{0.9, 1.0}}) {
    const ExponentialStep e = exponential_step(*linear, t, s, 0.0);
    EXPECT_NEAR(e.c_x, 1.0, 1e-15);
    EXPECT_NEAR(e.c_v, s - t, 1e-15);
    EXPECT_EQ(e.std, 0.0);
  }
  // gamma = 1, VP schedule: DDPM's posterior variance (1 - abar_s)(1 - abar_t/abar_s)/(1 - abar_t) in
  // flow time (abar = alpha^2; s is the cleaner time).
  const auto vp = make_vp_schedule();
  for (auto [t, s] : {std::pair{0.1, 0.2}, std::pair{0.5, 0.51}, std::pair{0.3, 0.95}}) {
    const double ab_t = std::pow(vp->at(t).alpha, 2), ab_s = std::pow(vp->at(s).alpha, 2);
    const double posterior = (1 - ab_s) * (1 - ab_t / ab_s) / (1 - ab_t);
    EXPECT_NEAR(std::pow(exponential_step(*vp, t, s, 1.0).std, 2), posterior, 1e-12 * posterior);
  }
  // From pure noise (alpha_0 = 0) any gamma > 0 forgets X_0; onto the data (beta_1 = 0) the step is x1^.
  const ExponentialStep first = exponential_step(*linear, 0.0, 0.25, 1.0);
  EXPECT_EQ(first.rho, 0.0);
  EXPECT_NEAR(first.std, 0.75, 1e-15);
  const ExponentialStep last = exponential_step(*linear, 0.75, 1.0, 3.0);
  EXPECT_EQ(last.std, 0.0);
  EXPECT_NEAR(last.c_x, 1.0, 1e-15);   // x1^ = x + (1 - t) v
  EXPECT_NEAR(last.c_v, 0.25, 1e-15);
  EXPECT_THROW(exponential_step(*linear, 0.5, 0.5, 1.0), Error);
  EXPECT_THROW(exponential_step(*linear, 0.1, 0.2, -1.0), Error);
}

TEST(ExactStep, StochasticityOfTheNoiseSchedules) {
  EXPECT_EQ(stochasticity_of(*make_memoryless_noise()), 1.0);
  EXPECT_EQ(stochasticity_of(*make_scaled_memoryless_noise(0.3)), 0.3);
  EXPECT_EQ(stochasticity_of(*make_zero_noise()), 0.0);
  EXPECT_THROW(stochasticity_of(*make_constant_noise(0.5)), Error);
  GenerativeSDE sde(std::make_shared<GmmVelocity>(test::ring_mixture_2d(), make_linear_schedule()),
                    make_constant_noise(0.5));
  Generator gen = make_generator(0);
  SampleOptions opts;
  opts.integrator = Integrator::exact;
  EXPECT_THROW(simulate(sde, at::zeros({2, 2}), TimeGrid::uniform(4), gen, opts), Error);
}

TEST(ExactStep, EveryStochasticityKeepsTheGaussianMarginalWithFirstOrderError) {
  // Anisotropic Gaussian data, so that the step's error is not hidden by symmetry.
  const auto data = std::make_shared<GaussianMixture>(
      at::ones({1}, kDouble), at::tensor({1.0, -0.5}, kDouble).reshape({1, 2}),
      at::tensor({0.5, 0.2, 0.2, 0.3}, kDouble).reshape({1, 2, 2}));
  const GmmVelocity field(data, make_linear_schedule());
  const at::Tensor mu = data->mean(), S = data->covariance();
  const std::vector<int64_t> Ks{10, 20, 40, 80, 160, 320, 640, 1280};
  std::printf("  terminal error |m_K - mu| + |V_K - S|_F of the chain's exact law:\n  %-6s %-6s", "gamma", "");
  for (int64_t K : Ks) std::printf(" %9s", ("K=" + std::to_string(K)).c_str());
  std::printf(" %6s\n", "order");
  for (double gamma : {0.0, 0.5, 1.0, 2.0, 5.0}) {
    for (bool exact : {true, false}) {
      if (!exact && gamma > 2.0) continue;  // Euler-Maruyama is unstable there at K = 10 (c_x h > 2)
      std::vector<double> h, err;
      for (int64_t K : Ks) {
        const auto [m, V] = test::chain_law(field, gamma, K, exact);
        h.push_back(1.0 / static_cast<double>(K));
        err.push_back((m - mu).norm().item<double>() + (V - S).norm().item<double>());
      }
      // The order over the last four step counts: the asymptotic regime starts later for larger gamma.
      const double order = test::fitted_order({h.end() - 4, h.end()}, {err.end() - 4, err.end()});
      std::printf("  %-6g %-6s", gamma, exact ? "exact" : "EM");
      for (double e : err) std::printf(" %9.2e", e);
      std::printf(" %6.2f\n", order);
      if (!exact) continue;
      for (size_t i = 1; i < err.size(); ++i) EXPECT_LT(err[i], err[i - 1]) << "gamma " << gamma << ", K = " << Ks[i];
      if (gamma <= 2.0) {
        EXPECT_NEAR(order, 1.0, 0.15) << "gamma " << gamma;  // weak order 1
        EXPECT_LT(err[4], 0.07) << "gamma " << gamma << " at K = 160";
      } else {
        EXPECT_GT(order, 0.5) << "gamma " << gamma;  // still on its way to order 1 at K = 1280
        EXPECT_LT(err.back(), 0.08) << "gamma " << gamma << " at K = 1280";
      }
    }
  }
}

TEST(ExactStep, EveryStochasticityKeepsTheMixtureMarginal) {
  // Gaussian-mixture data with its exact velocity: the sample mean and second moments at t = 1 must
  // agree with the mixture's within Monte Carlo error (z-scores from the samples' own spread). K is
  // large enough that the step's O(gamma^2 / K) bias (previous test) stays well under the standard error.
  const auto mixture = test::ring_mixture_2d();
  auto field = std::make_shared<GmmVelocity>(mixture, make_linear_schedule());
  const at::Tensor mu = mixture->mean(), S = mixture->covariance();
  const int64_t n = 4000, K = 300;
  Generator gen = make_generator(11);
  for (double gamma : {0.0, 0.5, 1.0, 2.0}) {
    SampleOptions opts;
    opts.integrator = Integrator::exact;
    const at::Tensor x =
        sample(GenerativeSDE(field, make_scaled_memoryless_noise(gamma)), n, TimeGrid::uniform(K), gen, opts).to(at::kDouble);
    const at::Tensor xc = x - mu;
    const at::Tensor z_mean = xc.mean(0) / (S.diagonal() / n).sqrt();
    // Each entry of (X - mu)(X - mu)^T is a mean of n i.i.d. terms; their sample std gives the SE.
    const at::Tensor prods = (xc.unsqueeze(2) * xc.unsqueeze(1)).reshape({n, 4});
    const at::Tensor z_cov = (prods.mean(0) - S.reshape({4})) / (prods.std(0) / std::sqrt(static_cast<double>(n)));
    std::printf("  gamma %-4g z-scores: mean %6.2f %6.2f, second moments %6.2f %6.2f %6.2f\n", gamma,
                z_mean[0].item<double>(), z_mean[1].item<double>(), z_cov[0].item<double>(), z_cov[1].item<double>(),
                z_cov[3].item<double>());
    EXPECT_LT(z_mean.abs().max().item<double>(), 3.5) << "gamma " << gamma << ": mean z-scores " << z_mean;
    EXPECT_LT(z_cov.abs().max().item<double>(), 3.5) << "gamma " << gamma << ": second-moment z-scores " << z_cov;
  }
}

}  // namespace
}  // namespace tilt
