// Adjoint Sampling (docs/equations.md, E59-E71): energies and their ground truths, the Brownian base
// and bridge, the sampler's importance weights, the RAM fixed point on a Gaussian target, a short
// training run, MALA references, metrics, and exact resume of the replay buffer.
#include "tilt/sampling/adjoint_sampling.h"
#include "tilt/sampling/brownian.h"
#include "tilt/sampling/brownian_problem.h"
#include "tilt/sampling/energy.h"
#include "tilt/sampling/mcmc.h"
#include "tilt/sampling/sample_metrics.h"

#include "tilt/io/config.h"
#include "tilt/io/model_io.h"
#include "tilt/io/sampling_config.h"
#include "tilt/io/sampling_run.h"
#include "tilt/model/mlp.h"
#include "tilt/model/gmm.h"
#include "tilt/sde/importance.h"
#include "tilt/soc/losses.h"
#include "tilt/soc/simulate.h"
#include "tilt/train/trainer.h"

#include "../support/checks.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>

#include <cmath>
#include <map>

using namespace tilt;
using namespace tilt::sampling;
using tilt::test::expect_contains;

namespace {

std::shared_ptr<GaussianMixture> three_mixture() {
  // Unequal weights, well separated: modes are unambiguous.
  const Tensor w = at::tensor({0.5, 0.3, 0.2}, at::kDouble);
  const Tensor mu = at::tensor({-2.0, 0.0, 2.0, 1.0, 0.0, -2.0}, at::kDouble).reshape({3, 2});
  const Tensor cov = 0.16 * at::eye(2, at::kDouble).unsqueeze(0).repeat({3, 1, 1});
  return std::make_shared<GaussianMixture>(w, mu, cov);
}

std::vector<EnergyPtr> all_energies() {
  DoubleWellOptions dw;
  dw.dim = 3;
  dw.wells = 2;
  return {std::make_shared<GaussianEnergy>(std::vector<double>{1.0, -0.5, 0.3}, 0.7),
          std::make_shared<MixtureEnergy>(three_mixture()), std::make_shared<DoubleWellEnergy>(dw),
          std::make_shared<MultiDoubleWellEnergy>(MultiDoubleWellOptions{})};
}

// The exact optimal control (docs/equations.md, E62) for pi = N(m, s^2 I) (tau = 1) under a Brownian base, two ways:
// -E[grad g(X_1) | X_t = x] and (E[X_1 | X_t = x] - x) / (nu_1 - nu_t), with
// E[X_1 | X_t = x] = m + c s^2 (x - c m) / (c^2 s^2 + nu_t (nu_1 - nu_t) / nu_1), c = nu_t / nu_1.
Tensor posterior_mean(const BrownianBase& base, const GaussianEnergy& target, const Tensor& x, double t) {
  const double n1 = base.nu1(), nt = base.nu(t), c = nt / n1, s2 = target.std() * target.std();
  const Tensor m = at::tensor(target.mean(), at::kDouble);
  return m + c * s2 * (x - c * m) / (c * c * s2 + nt * (n1 - nt) / n1);
}
Tensor optimal_control_adjoint(const BrownianBase& base, const GaussianEnergy& target, const Tensor& x, double t) {
  const Tensor mu = posterior_mean(base, target, x, t);
  const Tensor m = at::tensor(target.mean(), at::kDouble);
  return -(mu - m) / (target.std() * target.std()) + mu / base.nu1();
}
Tensor optimal_control_bridge(const BrownianBase& base, const GaussianEnergy& target, const Tensor& x, double t) {
  return (posterior_mean(base, target, x, t) - x) / (base.nu1() - base.nu(t));
}

// A fixed (untrained) control with an explicit formula, for the unbiasedness of the weights.
class LinearControl : public soc::ParametricControl {
 public:
  explicit LinearControl(int64_t d) : d_(d) {}
  int64_t dim() const override { return d_; }
  Tensor evaluate(const Tensor& x, const Tensor& t) const override {
    return 0.8 - 0.5 * x.to(at::kDouble) * (1.0 + t.to(at::kDouble).unsqueeze(1));
  }
  std::vector<Tensor> parameters() const override { return {}; }

 private:
  int64_t d_;
};

}  // namespace

TEST(AdjointSamplingEnergy, GradientsMatchFiniteDifferences) {
  Generator gen = make_generator(1);
  for (const EnergyPtr& e : all_energies()) {
    const Tensor x = 1.5 * at::randn({5, e->dim()}, gen, at::kDouble) + (e->particles() ? 0.0 : 0.2);
    const Tensor g = e->grad(x);
    Tensor fd = at::zeros_like(x);
    const double h = 1e-5;
    for (int64_t i = 0; i < e->dim(); ++i) {
      Tensor xp = x.clone(), xm = x.clone();
      xp.select(1, i).add_(h);
      xm.select(1, i).sub_(h);
      fd.select(1, i).copy_((e->energy(xp) - e->energy(xm)) / (2 * h));
    }
    const double scale = 1.0 + g.abs().max().item<double>();
    EXPECT_LT((g - fd).abs().max().item<double>(), 1e-6 * scale) << e->name();
  }
}

TEST(AdjointSamplingEnergy, Dw4MatchesItsDefinitionAndIsInvariant) {
  MultiDoubleWellEnergy e(MultiDoubleWellOptions{});
  // Four particles on a unit square of side 4: four distances 4 (E = 0 each) and two 4 sqrt 2.
  const Tensor x = at::tensor({0.0, 0.0, 4.0, 0.0, 4.0, 4.0, 0.0, 4.0}, at::kDouble).unsqueeze(0);
  const double r = 4.0 * std::sqrt(2.0) - 4.0;
  EXPECT_NEAR(e.energy(x).item<double>(), 2.0 * (0.9 * std::pow(r, 4) - 4.0 * r * r), 1e-12);
  Generator gen = make_generator(2);
  const Tensor y = at::randn({6, 8}, gen, at::kDouble) * 2.0;
  const Tensor shift = at::tensor({0.7, -1.3}, at::kDouble).repeat({4});
  EXPECT_LT((e.energy(y + shift) - e.energy(y)).abs().max().item<double>(), 1e-10);
  // The gradient of a translation-invariant energy has no centre-of-mass part.
  EXPECT_LT(e.grad(y).view({6, 4, 2}).sum(1).abs().max().item<double>(), 1e-10);
  EXPECT_EQ(interparticle_distances(y, 4).size(1), 6);
}

TEST(AdjointSamplingEnergy, CenterOfMassProjection) {
  Generator gen = make_generator(3);
  const Tensor x = 5.0 * at::randn({100, 8}, gen, at::kDouble) + 3.0;
  const Tensor p = remove_center_of_mass(x, 4);
  EXPECT_LT(p.view({100, 4, 2}).sum(1).abs().max().item<double>(), 1e-12);
  EXPECT_LT((remove_center_of_mass(p, 4) - p).abs().max().item<double>(), 1e-12);  // a projection
  BrownianBase base(BrownianOptions{}, 8, 4);
  EXPECT_EQ(base.free_dim(), 6);
  EXPECT_LT(base.noise(50, gen).view({50, 4, 2}).sum(1).abs().max().item<double>(), 1e-12);
  soc::ControlNetwork control(8, 1.0, {16}, 4, /*zero_output=*/false);
  const SamplerPaths paths = simulate(base, &control, 50, 20, gen);
  EXPECT_LT(paths.x1.view({50, 4, 2}).sum(1).abs().max().item<double>(), 1e-12);
  expect_contains(test::error_of([&] { remove_center_of_mass(at::zeros({2, 7}), 4); }), "particles");
}

TEST(AdjointSamplingEnergy, DoubleWellQuadratureAgainstMonteCarlo) {
  // log Z and the mode weights by quadrature against independent Monte Carlo: importance sampling
  // from N(0, 2.5^2 I) for Z, and the exact sampler for the weights (tolerances: 4 standard errors).
  DoubleWellOptions o;  // d = 2, one well, a = 1, b = 6, c = 0.5
  DoubleWellEnergy e(o);
  for (double tau : {1.0, 2.0}) {
    Generator gen = make_generator(5);
    const int64_t n = 200000;
    const double q = 2.5;
    const Tensor x = q * at::randn({n, 2}, gen, at::kDouble);
    const Tensor log_q = -x.pow(2).sum(1) / (2 * q * q) - std::log(2 * M_PI * q * q);
    const WeightSummary s = summarize_log_weights(-e.energy(x) / tau - log_q);
    EXPECT_NEAR(s.log_z, e.exact_log_z(tau), 4 * s.standard_error + 1e-3) << "tau " << tau;
    const std::vector<double> w = e.exact_mode_weights(tau);
    const Tensor xs = e.sample_exact(n, tau, gen);
    const double right = e.mode_of(xs).to(at::kDouble).mean().item<double>();
    EXPECT_NEAR(right, w[1], 4 * std::sqrt(w[0] * w[1] / n)) << "tau " << tau;
    EXPECT_NEAR(xs.select(1, 1).var().item<double>(), tau, 0.02 * tau);
  }
  // The barrier: the root of f' = 4 y^3 - 12 y + 0.5 near 0 (Newton's method: 0.0416908...).
  EXPECT_NEAR(e.barrier(), 0.04169082, 1e-6);
  // The tilt c = 0.5 favours the left well.
  EXPECT_GT(e.exact_mode_weights(1.0)[0], 0.8);
}

TEST(AdjointSamplingMetrics, OneDimensionalW2) {
  const Tensor a = at::tensor({0.0}, at::kDouble), b = at::tensor({0.0, 1.0}, at::kDouble);
  EXPECT_NEAR(w2_1d(a, b), std::sqrt(0.5), 1e-12);
  const Tensor c = at::tensor({3.0, 1.0, 2.0}, at::kDouble);
  EXPECT_NEAR(w2_1d(c, c + 0.25), 0.25, 1e-12);
  EXPECT_NEAR(w2_1d(c, c), 0.0, 1e-12);
  // Gaussians: W2(N(0, 1), N(1, 2^2)) = sqrt(1 + (2 - 1)^2).
  Generator gen = make_generator(6);
  const double w = w2_1d(at::randn({40000}, gen, at::kDouble), 1.0 + 2.0 * at::randn({30000}, gen, at::kDouble));
  EXPECT_NEAR(w, std::sqrt(2.0), 0.03);
}

TEST(AdjointSamplingBase, ScheduleIntegratesGSquared) {
  BrownianOptions geo, lin, con;
  lin.noise = BrownianNoise::linear;
  lin.sigma_max = 1.5;
  lin.sigma_min = 0.1;
  con.noise = BrownianNoise::constant;
  con.sigma = 0.8;
  for (const BrownianOptions& o : {geo, lin, con}) {
    BrownianBase base(o, 2);
    // nu_t against the trapezoid rule on g^2, and the tensor form against the scalar one.
    const int N = 200000;
    double integral = 0.0;
    for (int i = 0; i < N; ++i) {
      const double t0 = static_cast<double>(i) / N, t1 = static_cast<double>(i + 1) / N;
      integral += 0.5 * (base.g(t0) * base.g(t0) + base.g(t1) * base.g(t1)) / N;
      if (i + 1 == N / 3 || i + 1 == N) {
        EXPECT_NEAR(base.nu(t1), integral, 1e-6 * (1 + integral)) << base.describe() << " t " << t1;
        EXPECT_NEAR(base.nu(at::full({1}, t1, at::kDouble)).item<double>(), base.nu(t1), 1e-12);
      }
    }
  }
  EXPECT_NEAR(BrownianBase(geo, 1).nu1(), 4.0 * (1.0 - 1e-3 * 1e-3 / 4.0), 1e-12);
}

TEST(AdjointSamplingBase, BridgeMoments) {
  BrownianBase base(BrownianOptions{}, 2);
  Generator gen = make_generator(7);
  const int64_t n = 40000;
  const Tensor x1 = at::tensor({1.5, -0.5}, at::kDouble).unsqueeze(0).expand({n, 2});
  for (double t : {0.1, 0.5, 0.9}) {
    const Tensor xt = base.bridge(x1, at::full({n}, t, at::kDouble), gen);
    const double n1 = base.nu1(), nt = base.nu(t);
    const double var = nt * (n1 - nt) / n1;
    const Tensor mean = xt.mean(0), v = xt.var(0);
    for (int64_t i = 0; i < 2; ++i) {
      EXPECT_NEAR(mean[i].item<double>(), nt / n1 * x1[0][i].item<double>(), 4 * std::sqrt(var / n)) << t;
      EXPECT_NEAR(v[i].item<double>(), var, 4 * var * std::sqrt(2.0 / n)) << t;
    }
  }
}

TEST(AdjointSamplingBase, UntrainedControlReproducesTheBase) {
  // The zero-initialised control network is the base: X_1 ~ N(0, nu_1 I) and log dP/dQ = 0.
  BrownianBase base(BrownianOptions{}, 3);
  soc::ControlNetwork control(3, 1.0, {16, 16}, 8, /*zero_output=*/true);
  Generator gen = make_generator(8);
  const int64_t n = 20000;
  const SamplerPaths paths = simulate(base, &control, n, 25, gen);
  EXPECT_EQ(paths.log_path.abs().max().item<double>(), 0.0);
  const double nu1 = base.nu1();
  for (int64_t i = 0; i < 3; ++i) {
    EXPECT_NEAR(paths.x1.select(1, i).mean().item<double>(), 0.0, 4 * std::sqrt(nu1 / n));
    EXPECT_NEAR(paths.x1.select(1, i).var().item<double>(), nu1, 4 * nu1 * std::sqrt(2.0 / n));
  }
  EXPECT_NEAR(base.log_p1(at::zeros({1, 3}, at::kDouble)).item<double>(), -1.5 * std::log(2 * M_PI * nu1), 1e-12);
}

TEST(AdjointSamplingBase, ImportanceWeightsAreUnbiasedForAnyControl) {
  // E[w] = Z for the zero control, a fixed linear control and the exact optimal one; the optimal
  // control's weights are nearly constant (ESS close to n). 6 steps only: exact at any step count.
  GaussianEnergy target({1.0, -0.5}, 0.5);
  BrownianBase base(BrownianOptions{}, 2);
  const double exact = target.exact_log_z(1.0);
  class Optimal : public soc::ParametricControl {
   public:
    Optimal(const BrownianBase& b, const GaussianEnergy& e) : b_(b), e_(e) {}
    int64_t dim() const override { return 2; }
    Tensor evaluate(const Tensor& x, const Tensor& t) const override {
      return optimal_control_adjoint(b_, e_, x.to(at::kDouble), std::max(t[0].item<double>(), 1e-9));  // the t -> 0 limit
    }
    std::vector<Tensor> parameters() const override { return {}; }
   private:
    const BrownianBase& b_;
    const GaussianEnergy& e_;
  };
  Optimal optimal(base, target);
  LinearControl linear(2);
  const std::vector<std::pair<std::string, const soc::ParametricControl*>> controls{
      {"zero", nullptr}, {"linear", &linear}, {"optimal", &optimal}};
  std::map<std::string, double> ess;
  for (const auto& [label, control] : controls) {
    Generator gen = make_generator(9);
    const SamplerPaths paths = simulate(base, control, 20000, 6, gen);
    const WeightSummary s = summarize_log_weights(log_importance_weights(target, 1.0, base, paths));
    EXPECT_NEAR(s.log_z, exact, 3 * s.standard_error) << label << ": ESS " << s.ess_fraction;
    ess[label] = s.ess_fraction;
  }
  EXPECT_GT(ess["optimal"], 2.5 * ess["zero"]);  // 6 coarse steps: 0.33 against 0.10
  // With finer steps the exact control's weights are nearly constant; on the uniform grid of t the
  // geometric schedule's early variance makes the same steps far less accurate.
  std::map<std::string, double> fine;
  for (SamplerGrid grid : {SamplerGrid::nu, SamplerGrid::uniform}) {
    Generator gen = make_generator(9);
    const SamplerPaths paths = simulate(base, &optimal, 4000, 200, gen, grid);
    const WeightSummary s = summarize_log_weights(log_importance_weights(target, 1.0, base, paths));
    EXPECT_NEAR(s.log_z, exact, 3 * s.standard_error);
    fine[grid == SamplerGrid::nu ? "nu" : "uniform"] = s.ess_fraction;
  }
  EXPECT_GT(fine["nu"], 0.9);   // 0.94 (0.97 at 1000 steps)
  EXPECT_LT(fine["uniform"], fine["nu"] - 0.03);  // 0.88
}

TEST(AdjointSamplingRam, GaussianFixedPoint) {
  // The two forms of the optimal control (docs/equations.md, E62) agree in closed form, and u* satisfies the RAM normal
  // equations E[(u*(X_t, t) + grad g(X_1)) phi(X_t, t)] = 0 for phi = 1 and phi = X_t under "X_1 ~ pi,
  // X_t ~ bridge" (Monte Carlo, 4 standard errors); a control 10% off does not.
  GaussianEnergy target({1.0, -0.5}, 0.5);
  for (const BrownianOptions& o : {BrownianOptions{}, BrownianOptions{BrownianNoise::constant, 2, 1e-3, 1.3}}) {
    BrownianBase base(o, 2);
    Generator gen = make_generator(10);
    const Tensor x = at::randn({7, 2}, gen, at::kDouble);
    for (double t : {0.05, 0.4, 0.95}) {
      EXPECT_LT((optimal_control_adjoint(base, target, x, t) - optimal_control_bridge(base, target, x, t)).abs().max().item<double>(),
                1e-9);
    }
    const int64_t n = 100000;
    const Tensor x1 = target.sample_exact(n, 1.0, gen);
    const double t = 0.6;
    const Tensor xt = base.bridge(x1, at::full({n}, t, at::kDouble), gen);
    const Tensor adjoint = terminal_cost_grad(target, 1.0, base, x1, 0.0);
    for (double scale : {1.0, 0.9}) {
      const Tensor r = scale * optimal_control_adjoint(base, target, xt, t) + adjoint;
      double z = 0.0;
      for (const Tensor& f : {r, r * xt}) {
        const Tensor m = f.mean(0), se = f.std(0) / std::sqrt(static_cast<double>(n));
        z = std::max(z, (m / se).abs().max().item<double>());
      }
      if (scale == 1.0) {
        EXPECT_LT(z, 4.0) << base.describe();
      } else {
        EXPECT_GT(z, 8.0) << base.describe();
      }
    }
  }
}

TEST(AdjointSamplingRam, ShortTrainingOnAGaussian) {
  // RAM with a replay buffer on pi = N(m, 0.5^2 I): the learnt control approaches the exact one, its
  // samples approach pi, and log Z from its importance weights is within 3 standard errors of exact.
  auto target = std::make_shared<GaussianEnergy>(std::vector<double>{1.0, -0.5}, 0.5);
  auto base = std::make_shared<BrownianBase>(BrownianOptions{}, 2);
  auto control = std::make_shared<soc::ControlNetwork>(2, 1.0, std::vector<int64_t>{64, 64}, 11);
  AdjointSamplingOptions o;
  o.batch_size = 256;
  o.steps = 40;
  o.initial_samples = 512;
  o.samples_per_refresh = 256;
  o.refresh_every = 20;
  o.buffer_size = 1024;
  ReciprocalAdjointMatching loss(target, base, control, o);
  auto l2_error = [&] {
    Generator gen = make_generator(12);
    double err = 0.0;
    for (double t : {0.1, 0.3, 0.5, 0.7, 0.9}) {
      const Tensor x = base->bridge(target->sample_exact(512, 1.0, gen), at::full({512}, t, at::kDouble), gen);
      at::NoGradGuard ng;
      err += ((*control)(x, t) - optimal_control_adjoint(*base, *target, x, t)).pow(2).sum(1).mean().item<double>();
    }
    return std::sqrt(err / 5);
  };
  const double before = l2_error();
  TrainerOptions to;
  to.iterations = 600;
  to.adam = {3e-3, 0.9, 0.999, 1e-8, 0.0};
  to.grad_clip = 0;
  to.progress = false;
  Trainer trainer(loss, to);
  trainer.run();
  const double after = l2_error();
  EXPECT_LT(after, 0.2 * before) << before << " -> " << after;
  EXPECT_EQ(loss.energy_evaluations(), 512 + 29 * 256);
  EXPECT_EQ(loss.gradient_steps(), 600);
  Generator gen = make_generator(13);
  const SamplerPaths paths = simulate(*base, control.get(), 8000, 40, gen);
  const WeightSummary s = summarize_log_weights(log_importance_weights(*target, 1.0, *base, paths));
  EXPECT_NEAR(s.log_z, target->exact_log_z(1.0), 3 * s.standard_error) << "ESS " << s.ess_fraction;
  EXPECT_GT(s.ess_fraction, 0.5);
  const Tensor exact = target->sample_exact(8000, 1.0, gen);
  for (int64_t i = 0; i < 2; ++i) EXPECT_LT(w2_1d(paths.x1.select(1, i), exact.select(1, i)), 0.1);
}

TEST(AdjointSamplingRam, ResumeKeepsTheReplayBuffer) {
  // 12 iterations straight, against 7 + a checkpoint + 5 more in a new trainer and loss: the same
  // parameters, buffer and counters (the buffer refreshes at iterations 5 and 10).
  test::TempDir dir;
  auto target = std::make_shared<GaussianEnergy>(std::vector<double>{1.0, -0.5}, 0.5);
  auto base = std::make_shared<BrownianBase>(BrownianOptions{}, 2);
  AdjointSamplingOptions o;
  o.batch_size = 32;
  o.steps = 5;
  o.initial_samples = 40;
  o.samples_per_refresh = 16;
  o.refresh_every = 5;
  o.buffer_size = 60;
  auto run = [&](int64_t iterations, bool resume) {
    auto control = std::make_shared<soc::ControlNetwork>(2, 1.0, std::vector<int64_t>{8}, 11);
    auto loss = std::make_shared<ReciprocalAdjointMatching>(target, base, control, o);
    TrainerOptions to;
    to.iterations = iterations;
    to.progress = false;
    to.adam.lr = 1e-2;
    to.checkpoint_path = dir.file(resume ? "b.pt" : "a.pt");
    Trainer trainer(*loss, to);
    if (resume) trainer.load_checkpoint(dir.file("a.pt"));
    trainer.run();
    return std::make_pair(control, loss);
  };
  auto [c_straight, l_straight] = run(12, false);
  { run(7, false); }
  auto [c_resumed, l_resumed] = run(12, true);
  EXPECT_EQ(l_straight->energy_evaluations(), 40 + 2 * 16);
  EXPECT_EQ(l_resumed->energy_evaluations(), l_straight->energy_evaluations());
  EXPECT_TRUE(at::equal(l_resumed->buffer().x1(), l_straight->buffer().x1()));
  const auto p = c_straight->parameters(), q = c_resumed->parameters();
  for (size_t i = 0; i < p.size(); ++i) EXPECT_TRUE(at::equal(p[i], q[i])) << i;
}

TEST(AdjointSamplingMcmc, MalaWithTemperingFindsBothWells) {
  // A 1-D double well with a barrier of ~10 kT: parallel-tempered MALA against the quadrature's mode
  // weight and mean energy. The tolerance allows for autocorrelation (about 10 effective samples per
  // chain per 1000 steps at the target temperature).
  DoubleWellOptions dwo;
  dwo.dim = 1;
  DoubleWellEnergy e(dwo);
  MalaOptions o;
  o.chains = 32;
  o.steps = 4000;
  o.burn_in = 500;
  o.thin = 5;
  o.step_size = 0.05;
  o.temperatures = {1.0, 2.0, 4.0, 8.0, 16.0};
  Generator gen = make_generator(14);
  const MalaResult r = run_mala(e, 1.0, o, gen);
  EXPECT_EQ(r.samples.size(0), 32 * 800);
  const double right = e.mode_of(r.samples).to(at::kDouble).mean().item<double>();
  EXPECT_NEAR(right, e.exact_mode_weights(1.0)[1], 0.03);
  for (double a : r.acceptance) EXPECT_GT(a, 0.3);
  for (double s : r.swap_rates) EXPECT_GT(s, 0.05);
  // Energy distribution against exact samples.
  const Tensor exact = e.sample_exact(20000, 1.0, gen);
  EXPECT_LT(energy_w2(e, r.samples, exact), 0.15);
}

TEST(AdjointSamplingConfig, ErrorsNameTheKey) {
  auto read = [](const Json& j) {
    Config c(j, "test.toml");
    ConfigSection root = c.root();
    double tau = 0;
    return read_energy(root.section("energy"), &tau);
  };
  expect_contains(test::error_of([&] { read(Json{{"energy", {{"type", "dw4"}, {"particle", 4}}}}); }), "particle");
  expect_contains(test::error_of([&] { read(Json{{"energy", {{"type", "gmm"}, {"temperature", 2.0}, {"means", {{0, 0}}}}}}); }),
                  "temperature");
  expect_contains(test::error_of([&] { read(Json{{"energy", {{"type", "lj13"}}}}); }), "energy.type");
  EXPECT_EQ(read(Json{{"energy", {{"type", "dw4"}}}})->dim(), 8);
  BrownianBase base(BrownianOptions{}, 8, 4);
  auto control = std::make_shared<soc::ControlNetwork>(8, 1.0, std::vector<int64_t>{8}, 0);
  expect_contains(test::error_of([&] {
                    ReciprocalAdjointMatching(std::make_shared<GaussianEnergy>(std::vector<double>(8, 0.0), 1.0),
                                              std::make_shared<BrownianBase>(base), control, AdjointSamplingOptions{});
                  }),
                  "centre-of-mass");
}

TEST(AdjointSamplingFiles, ControlRoundTripsAndIsRefusedAsAVelocity) {
  // tilt adjoint-sampling's model.pt is a control of the Brownian base, not a velocity (issue 18): its file
  // reproduces the control and the base exactly, and load_velocity refuses it, naming the file and the run's
  // samples; load_adjoint_sampling_control refuses a velocity's file in turn.
  test::TempDir dir;
  AdjointSamplingRunOptions run;
  run.energy = std::make_shared<MultiDoubleWellEnergy>(MultiDoubleWellOptions{});
  run.brownian = BrownianOptions{BrownianNoise::linear, 1.5, 0.2, 1.0};
  run.hidden = {8, 6};
  run.tau = 0.7;
  const AdjointSampler sampler = make_adjoint_sampler(run);
  {
    at::NoGradGuard no_grad;
    Generator g = make_generator(3);
    for (Tensor p : sampler.control->parameters()) p.copy_(at::randn(p.sizes(), g, p.options()));
  }
  const std::string path = dir.file("model.pt");
  save_adjoint_sampling_control(sampler, *run.energy, run.tau, path, {{"iterations", 5}});
  const LoadedAdjointSampler back = load_adjoint_sampling_control(path);
  EXPECT_EQ(back.energy, "dw4");
  EXPECT_EQ(back.tau, 0.7);
  EXPECT_EQ(back.info.at("iterations").get<int>(), 5);
  EXPECT_EQ(back.sampler.base->describe(), sampler.base->describe());
  EXPECT_EQ(back.sampler.base->particles(), 4);
  Generator gen = make_generator(4);
  const Tensor x = at::randn({16, 8}, gen, at::kDouble), t = at::rand({16}, gen, at::kDouble);
  at::NoGradGuard no_grad;
  const Tensor u = sampler.control->evaluate(x, t);
  EXPECT_GT(u.abs().max().item<double>(), 0.0);
  EXPECT_TRUE(at::equal(back.sampler.control->evaluate(x, t), u));
  const std::string refusal = test::error_of([&] { load_velocity(path); });
  expect_contains(refusal, "model file '" + path + "': it is an Adjoint Sampling control");
  expect_contains(refusal, dir.file("samples.csv"));
  MlpOptions mo;
  mo.dim = 2;
  mo.hidden = {4};
  save_velocity(MlpVelocity(mo, make_linear_schedule(), 0), dir.file("velocity.pt"));
  expect_contains(test::error_of([&] { load_adjoint_sampling_control(dir.file("velocity.pt")); }),
                  "holds a model of kind 'mlp', not an Adjoint Sampling control");
}

// Adjoint Sampling as an SOC problem (docs/equations.md, E95).

TEST(AdjointSamplingProblem, TerminalCostGradientAndLeanAdjointAreAdjointSamplings) {
  // The problem's grad g is what ReciprocalAdjointMatching regresses onto (terminal_cost_grad, unclipped) and the
  // autograd gradient of its g; its SOC lean adjoint (E34) along controlled paths is that same vector at every
  // step, the constant adjoint of Adjoint Sampling (E62). With particles the noise sigma(t) = g(t) P keeps the
  // paths centre-of-mass free.
  for (const EnergyPtr& energy : all_energies()) {
    const double tau = energy->name() == "gmm" ? 1.0 : 1.3;
    auto base = std::make_shared<BrownianBase>(BrownianOptions{BrownianNoise::linear, 1.8, 0.1, 1.0}, energy->dim(),
                                               energy->particles());
    auto problem = std::make_shared<BrownianProblem>(energy, tau, base, 20);
    Generator gen = make_generator(21);
    const Tensor x = base->project(at::randn({9, energy->dim()}, gen, at::kDouble));
    const Tensor grad = problem->terminal_cost_grad(x);
    EXPECT_TRUE(at::equal(grad, terminal_cost_grad(*energy, tau, *base, x, 0.0))) << energy->name();
    EXPECT_LT((grad - problem->soc::Problem::terminal_cost_grad(x)).abs().max().item<double>(), 1e-9) << energy->name();
    EXPECT_LT((problem->sigma(0.3) - base->g(0.3) * base->project(at::eye(energy->dim(), at::kDouble))).abs().max().item<double>(),
              1e-15);
    const soc::Control u = [](const Tensor& y, double t) { return 0.4 - 0.3 * y * (1.0 + t); };
    const soc::ControlledPaths paths = soc::simulate(*problem, u, 9, 0, gen);
    ASSERT_EQ(paths.x.size(), 21u);
    const Tensor expected = terminal_cost_grad(*energy, tau, *base, paths.x.back(), 0.0);
    for (const Tensor& a : soc::lean_adjoint(*problem, paths.x, 1.0)) {
      EXPECT_LT((a - expected).abs().max().item<double>(), 1e-12) << energy->name();
    }
    if (energy->particles() > 0) {
      EXPECT_LT(paths.x.back().reshape({9, energy->particles(), -1}).sum(1).abs().max().item<double>(), 1e-10);
    }
  }
}

TEST(AdjointSamplingProblem, GaussianValueAndOptimalControlInClosedForm) {
  // E95 against independent facts: u* / g is E62's -E[grad g(X_1) | X_t = x] (the posterior-mean formula of a
  // Gaussian pi = N(m, s^2 tau I)); u* = -g grad V (autograd of V); V(0, 0) = -log Z; V(x, 1) = g(x).
  for (const double tau : {1.0, 1.7}) {
    auto energy = std::make_shared<GaussianEnergy>(std::vector<double>{1.0, -0.5}, 0.5);
    const GaussianEnergy at_tau_one({1.0, -0.5}, 0.5 * std::sqrt(tau));  // the same pi at tau = 1
    for (const BrownianOptions& o : {BrownianOptions{}, BrownianOptions{BrownianNoise::constant, 2, 1e-3, 0.4},
                                     BrownianOptions{BrownianNoise::linear, 1.5, 0.3, 1.0}}) {
      auto base = std::make_shared<BrownianBase>(o, 2);
      const BrownianProblem problem(energy, tau, base);
      ASSERT_TRUE(problem.has_ground_truth());
      Generator gen = make_generator(22);
      const Tensor x = 2.0 * at::randn({6, 2}, gen, at::kDouble);
      for (const double t : {0.0, 0.2, 0.7, 0.99}) {
        const Tensor u = problem.optimal_control(x, t);
        if (t > 0) EXPECT_LT((u / base->g(t) - optimal_control_adjoint(*base, at_tau_one, x, t)).abs().max().item<double>(), 1e-9)
            << base->describe() << " t " << t;
        at::AutoGradMode grad_mode(true);
        const Tensor xg = x.clone().requires_grad_(true);
        const Tensor dv = torch::autograd::grad({problem.value(xg, t).sum()}, {xg})[0];
        EXPECT_LT((u + base->g(t) * dv).abs().max().item<double>(), 1e-9) << base->describe() << " t " << t;
      }
      EXPECT_NEAR(problem.value(at::zeros({1, 2}, at::kDouble), 0.0).item<double>(), -energy->exact_log_z(tau), 1e-12);
      EXPECT_LT((problem.value(x, 1.0) - problem.terminal_cost(x)).abs().max().item<double>(), 1e-12);
    }
  }
  EXPECT_FALSE(BrownianProblem(std::make_shared<MixtureEnergy>(three_mixture()), 1.0,
                               std::make_shared<BrownianBase>(BrownianOptions{}, 2))
                   .has_ground_truth());
}

TEST(AdjointSamplingProblem, OptimalControlCostsMinusLogZOnEveryPath) {
  // Simulated as an SOC problem (soc::simulate, Euler-Maruyama), the optimal control of E95 drives X_1 to pi, and
  // its cost plus noise integral, -log w, is V(0, 0) = -log Z on every path: the weights' spread is the time
  // step's alone (it halves when the step is quartered, Euler-Maruyama's strong order 1/2), while the zero
  // control's weights are far from constant.
  auto energy = std::make_shared<GaussianEnergy>(std::vector<double>{1.0, -0.5}, 0.5);
  auto base = std::make_shared<BrownianBase>(BrownianOptions{BrownianNoise::constant, 2, 1e-3, 1.5}, 2);
  auto problem = std::make_shared<BrownianProblem>(energy, 1.0, base, 400);
  Generator gen = make_generator(23);
  const soc::ControlledPaths coarse = soc::simulate(*problem, soc::optimal_control_of(problem), 2000, 400, gen);
  const soc::ControlledPaths paths = soc::simulate(*problem, soc::optimal_control_of(problem), 2000, 1600, gen);
  const Tensor minus_log_w = -soc::log_importance_weights(paths);
  EXPECT_NEAR(minus_log_w.mean().item<double>(), -energy->exact_log_z(1.0), 0.01);
  EXPECT_LT(soc::normalised_weight_std(paths), 0.1);
  EXPECT_LT(soc::normalised_weight_std(paths), 0.6 * soc::normalised_weight_std(coarse));
  const Tensor x1 = paths.x.back();
  EXPECT_LT((x1.mean(0) - at::tensor(energy->mean(), at::kDouble)).abs().max().item<double>(), 0.04);
  EXPECT_LT((x1.std(0) - 0.5).abs().max().item<double>(), 0.03);
  const soc::ControlledPaths zero = soc::simulate(*problem, soc::zero_control(2), 2000, 400, gen);
  EXPECT_GT(soc::normalised_weight_std(zero), 1.0);
}

TEST(AdjointSamplingProblem, AnSocLossTrainsItsOptimalControl) {
  // SOC Adjoint Matching (the SOC layer's loss, not RAM) trained on the problem of a Gaussian energy reaches E95's
  // u*: the control's L2 error under the optimal paths falls below a tenth of the zero control's (2.8 -> 0.09
  // in 120 iterations).
  auto energy = std::make_shared<GaussianEnergy>(std::vector<double>{1.0, -0.5}, 0.5);
  auto base = std::make_shared<BrownianBase>(BrownianOptions{BrownianNoise::constant, 2, 1e-3, 1.5}, 2);
  auto problem = std::make_shared<BrownianProblem>(energy, 1.0, base, 20);
  auto control = std::make_shared<soc::ControlNetwork>(2, 1.0, std::vector<int64_t>{32}, 24);
  soc::SocLossOptions o;
  o.batch_size = 64;
  auto loss = soc::make_soc_loss("adjoint_matching", problem, control, o);
  Generator gen = make_generator(25);
  const soc::ControlledPaths optimal = soc::simulate(*problem, soc::optimal_control_of(problem), 500, 0, gen);
  const double before = soc::control_l2_error(*problem, optimal, control->as_control());
  TrainerOptions to;
  to.iterations = 120;
  to.adam = {1e-2, 0.9, 0.999, 1e-8, 0.0};
  to.grad_clip = 0;
  to.progress = false;
  Trainer trainer(*loss, to);
  trainer.run();
  const double after = soc::control_l2_error(*problem, optimal, control->as_control());
  EXPECT_LT(after, 0.1 * before) << before << " -> " << after;
}
