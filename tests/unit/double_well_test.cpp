// The separable control, the drift curriculum and what they do on the double well (docs/double_well.md).
#include "tilt/core/error.h"
#include "tilt/core/fs.h"
#include "tilt/io/soc_benchmark.h"
#include "tilt/soc/losses.h"
#include "tilt/soc/problems.h"
#include "tilt/soc/separable_control.h"
#include "tilt/soc/simulate.h"
#include "tilt/train/trainer.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <gtest/gtest.h>

#include "../support/checks.h"
#include <torch/csrc/autograd/autograd.h>

#include <cmath>
#include <cstdio>

namespace tilt::soc {
namespace {

const auto kDouble = at::TensorOptions().dtype(at::kDouble);

// Coordinate i's network by hand, in double: [x_i, s, sin(pi f s), cos(pi f s)] through its layers.
Tensor by_hand(const SeparableControl& c, const Tensor& x, const Tensor& t, int64_t i) {
  const Tensor s = (t / c.horizon()).reshape({-1, 1});
  std::vector<Tensor> e{x.select(1, i).reshape({-1, 1}), s};
  const Tensor f = at::arange(1, 9, kDouble).unsqueeze(0) * M_PI;  // the default 16 time features
  e.push_back(at::sin(s * f));
  e.push_back(at::cos(s * f));
  Tensor z = at::cat(e, 1);
  const auto& W = c.weights();
  const auto& b = c.biases();
  for (size_t l = 0; l < W.size(); ++l) {
    z = at::matmul(z, W[l][i].to(at::kDouble)) + b[l][i].to(at::kDouble);
    if (l + 1 < W.size()) z = z * at::sigmoid(z);  // SiLU
  }
  return z.squeeze(1);
}

TEST(SeparableControl, IsOneNetworkPerCoordinate) {
  const int64_t d = 3, B = 7;
  SeparableControl c(d, 2.0, {8, 5}, 11, /*zero_output=*/false);
  ASSERT_EQ(c.parameters().size(), 6u);
  EXPECT_EQ(c.weights()[0].sizes(), (at::IntArrayRef{d, 18, 8}));
  EXPECT_EQ(c.weights()[2].sizes(), (at::IntArrayRef{d, 5, 1}));
  Generator gen = make_generator(1);
  const Tensor x = at::randn({B, d}, gen, kDouble);
  const Tensor t = at::rand({B}, gen, kDouble) * 2.0;
  const Tensor u = c.evaluate(x, t);
  ASSERT_EQ(u.sizes(), (at::IntArrayRef{B, d}));
  EXPECT_EQ(u.scalar_type(), at::kDouble);
  for (int64_t i = 0; i < d; ++i) {
    EXPECT_LT((u.select(1, i) - by_hand(c, x, t, i)).abs().max().item<double>(), 1e-5) << "coordinate " << i;
  }
  // u_i depends on x_i only: the Jacobian du/dx is diagonal.
  const Tensor xg = x.clone().requires_grad_(true);
  const Tensor ui = c.evaluate(xg, t);
  for (int64_t i = 0; i < d; ++i) {
    const Tensor g = torch::autograd::grad({ui.select(1, i).sum()}, {xg}, {}, true)[0];
    for (int64_t j = 0; j < d; ++j) {
      const double m = g.select(1, j).abs().max().item<double>();
      if (j == i) EXPECT_GT(m, 1e-4) << i;
      else EXPECT_EQ(m, 0.0) << i << " " << j;
    }
  }
  // A zero-output control starts at u = 0.
  SeparableControl zero(d, 2.0, {8}, 11);
  EXPECT_EQ(zero.evaluate(x, t).abs().max().item<double>(), 0.0);
  EXPECT_THROW(SeparableControl(d, 2.0, {}, 1), Error);
  EXPECT_THROW(SeparableControl(d, 0.0, {4}, 1), Error);
  EXPECT_THROW(c.evaluate(at::zeros({B, d + 1}, kDouble), t), Error);
}

TEST(SeparableControl, ParameterGradientsMatchFiniteDifferences) {
  const int64_t d = 2, B = 5;
  SeparableControl c(d, 1.0, {6, 6}, 3, /*zero_output=*/false);
  Generator gen = make_generator(2);
  const Tensor x = at::randn({B, d}, gen, kDouble), t = at::rand({B}, gen, kDouble);
  const Tensor w = at::randn({B, d}, gen, kDouble);
  const auto objective = [&] { return (c.evaluate(x, t) * w).sum(); };
  const std::vector<Tensor> params = c.parameters();
  const auto grads = torch::autograd::grad({objective()}, params);
  at::NoGradGuard no_grad;
  int checked = 0;
  for (size_t p = 0; p < params.size(); ++p) {
    const Tensor flat = params[p].view({-1});
    for (int64_t k : {int64_t{0}, flat.size(0) / 2, flat.size(0) - 1}) {
      const float v = flat[k].item<float>();
      const double eps = 1e-2;
      flat[k] = v + eps;
      const double up = objective().item<double>();
      flat[k] = v - eps;
      const double down = objective().item<double>();
      flat[k] = v;
      const double fd = (up - down) / (2 * eps), ad = grads[p].view({-1})[k].item<double>();
      EXPECT_NEAR(ad, fd, 2e-3 + 1e-2 * std::abs(fd)) << "parameter " << p << " entry " << k;
      ++checked;
    }
  }
  EXPECT_EQ(checked, 18);
}

TEST(DriftCurriculum, ScalesTheDriftAndItsVjpAndRampsLinearly) {
  const ProblemPtr base = double_well(3);
  DriftScaledProblem scaled(base, 0.25);
  Generator gen = make_generator(4);
  const Tensor x = at::randn({6, 3}, gen, kDouble), a = at::randn({6, 3}, gen, kDouble);
  EXPECT_TRUE(at::allclose(scaled.drift(x, 0.3), 0.25 * base->drift(x, 0.3)));
  EXPECT_TRUE(at::allclose(scaled.drift_vjp(x, 0.3, a), 0.25 * base->drift_vjp(x, 0.3, a)));
  EXPECT_TRUE(at::allclose(scaled.terminal_cost_grad(x), base->terminal_cost_grad(x)));
  EXPECT_FALSE(scaled.has_ground_truth());
  // The double well with kappa scaled by c is the drift scaled by c (E45, E120).
  const DoubleWell kappa_quarter("dw", {1.25, 1.25, 1.25}, {3, 3, 3}, at::zeros({3}, kDouble), 1.0, 200);
  EXPECT_TRUE(at::allclose(scaled.drift(x, 0.0), kappa_quarter.drift(x, 0.0)));
  scaled.set_scale(1.0);
  EXPECT_TRUE(at::allclose(scaled.drift(x, 0.0), base->drift(x, 0.0)));
  EXPECT_THROW(scaled.set_scale(-1.0), Error);
  EXPECT_DOUBLE_EQ(curriculum_scale(0.2, 0.5, 1, 100), 0.2);
  EXPECT_DOUBLE_EQ(curriculum_scale(0.2, 0.5, 26, 100), 0.6);
  EXPECT_DOUBLE_EQ(curriculum_scale(0.2, 0.5, 51, 100), 1.0);
  EXPECT_DOUBLE_EQ(curriculum_scale(0.2, 0.5, 100, 100), 1.0);
  EXPECT_DOUBLE_EQ(curriculum_scale(1.0, 0.5, 1, 100), 1.0);
  EXPECT_THROW(curriculum_scale(0.0, 0.5, 1, 100), Error);
  EXPECT_THROW(curriculum_scale(0.5, 1.5, 1, 100), Error);
}


// E121 on the double well, by hand: at u = 0 the damped loss is (1/K) sum_k w_k m_k with w_k = min(1, mean m / m_k),
// m_k the batch's mean |a_k|^2; and the diagnosis of docs/double_well.md: the targets' mean square is largest at
// the early times (paths start at the barrier top, where (grad b)^T a grows backwards), which are the damped
// ones, while the second half of [0, T] (where u* lives) keeps weight 1.
TEST(DoubleWellStudy, DampedTimesAreTheEarlyNoisyOnes) {
  const ProblemPtr p = double_well(10);
  const int64_t B = 256, K = 200;
  auto control = std::make_shared<SeparableControl>(10, 1.0, std::vector<int64_t>{4}, 1);  // u = 0
  SocLossOptions so;
  so.batch_size = B;
  so.damp_noisy_times = true;
  AdjointMatchingSoc damped(p, control, so);
  so.damp_noisy_times = false;
  AdjointMatchingSoc plain(p, control, so);
  Generator g1 = make_generator(9), g2 = make_generator(9), g3 = make_generator(9);
  const double loss_damped = damped.compute(g1).loss.item<double>();
  const double loss_plain = plain.compute(g2).loss.item<double>();
  at::NoGradGuard no_grad;
  const ControlledPaths paths = simulate(*p, control->as_control(), B, K, g3);
  const std::vector<Tensor> a = lean_adjoint(*p, paths.x, 1.0);
  std::vector<double> m(K);
  double mean = 0;
  for (int64_t k = 0; k < K; ++k) {
    m[k] = a[k].pow(2).sum(1).mean().item<double>();
    mean += m[k] / K;
  }
  double by_hand = 0, late_min = 1, early_max = 0;
  for (int64_t k = 0; k < K; ++k) {
    const double w = std::min(1.0, mean / m[k]);
    by_hand += w * m[k] / K;
    if (k >= K / 2) late_min = std::min(late_min, w);
    if (k < K / 10) early_max = std::max(early_max, w);
  }
  std::printf("[ double well ] mean |a_k|^2: t = 0 %.3g, t = 0.5 %.3g, t = 0.95 %.3g, average %.3g; weights: first tenth <= %.3g, "
              "second half >= %.3g\n", m[0], m[K / 2], m[190], mean, early_max, late_min);
  EXPECT_NEAR(loss_plain, mean, 1e-9 * mean);
  EXPECT_NEAR(loss_damped, by_hand, 1e-9 * by_hand);
  EXPECT_GT(m[0], 5 * mean);      // the early targets are the noisy ones
  EXPECT_LT(early_max, 0.5);      // ... and are damped
  EXPECT_EQ(late_min, 1.0);       // the second half keeps the paper's weights
  EXPECT_LT(loss_damped, 0.6 * loss_plain);
}


// tilt soc's keys for the study: read from [soc], run (a separable control, a curriculum, damped times and a
// cosine schedule on a 2-D double well), written to soc.resolved.json; bad values name the key.
TEST(DoubleWellStudy, SocBenchmarkReadsAndRunsTheStudyKeys) {
  test::TempDir dir;
  const auto options_of = [](const Json& soc) {
    Config config(Json{{"soc", soc}}, "'soc.toml'");
    ConfigSection root = config.root();
    SocBenchmarkOptions o;
    read_soc_benchmark(root, o, [](const std::string&) { return false; });
    return o;
  };
  Json soc{{"problem", "double_well"}, {"losses", {"adjoint_matching"}}, {"iterations", 4}, {"batch", 8},
           {"steps", 20}, {"eval_batch", 16}, {"eval_every", 2}, {"hidden", {4}}, {"control", "separable"},
           {"curriculum_start", 0.25}, {"curriculum_fraction", 0.5}, {"time_weights", "damped"},
           {"lr_schedule", "cosine"}, {"double_well", {{"dim", 2}}}};
  SocBenchmarkOptions o = options_of(soc);
  EXPECT_EQ(o.control, "separable");
  EXPECT_EQ(o.curriculum_start, 0.25);
  EXPECT_EQ(o.time_weights, "damped");
  EXPECT_EQ(o.lr_schedule, "cosine");
  o.quiet = true;
  o.threads = 2;
  o.out = dir.file("soc");
  const SocBenchmarkResult r = run_soc_benchmark(o);
  EXPECT_TRUE(std::isfinite(r.summary["losses"]["adjoint_matching"]["control_l2_error"].get<double>()));
  const Json resolved = Json::parse(read_file(o.out + "/soc.resolved.json"));
  EXPECT_EQ(resolved["control"], "separable");
  EXPECT_EQ(resolved["curriculum_start"], 0.25);
  EXPECT_EQ(resolved["time_weights"], "damped");
  const auto message = [&](const char* key, const Json& value) {
    Json bad = soc;
    bad[key] = value;
    return test::error_of([&] { check_soc_benchmark(options_of(bad)); });
  };
  EXPECT_NE(message("control", "sep").find("'soc.control'"), std::string::npos);
  EXPECT_NE(message("time_weights", "x").find("'soc.time_weights'"), std::string::npos);
  EXPECT_NE(message("curriculum_start", 0.0).find("'soc.curriculum_start' must be in (0, 1]"), std::string::npos);
  EXPECT_NE(message("curriculum_fraction", 1.5).find("'soc.curriculum_fraction' must be in (0, 1]"), std::string::npos);
}

}  // namespace
}  // namespace tilt::soc
