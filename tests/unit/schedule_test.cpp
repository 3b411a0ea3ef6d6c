// Schedules and noise schedules against their definitions (docs/equations.md, E1-E12).
#include "tilt/core/error.h"
#include "tilt/schedule/noise_schedule.h"
#include "tilt/schedule/schedule.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>

namespace tilt {
namespace {

const std::vector<double> kInterior = {0.03, 0.2, 0.5, 0.77, 0.95};

std::vector<SchedulePtr> all_schedules() {
  return {make_linear_schedule(), make_cosine_schedule(), make_vp_schedule()};
}

TEST(Schedule, DerivativesMatchFiniteDifferences) {
  for (const auto& s : all_schedules()) {
    for (double t : kInterior) {
      const double eps = 1e-6;
      const ScheduleValues v = s->at(t), p = s->at(t + eps), m = s->at(t - eps);
      EXPECT_NEAR(v.d_alpha, (p.alpha - m.alpha) / (2 * eps), 1e-6 * (1 + std::abs(v.d_alpha))) << s->name() << " t=" << t;
      EXPECT_NEAR(v.d_beta, (p.beta - m.beta) / (2 * eps), 1e-6 * (1 + std::abs(v.d_beta))) << s->name() << " t=" << t;
    }
  }
}

TEST(Schedule, BoundaryValues) {
  for (const auto& s : all_schedules()) {
    const ScheduleValues one = s->at(1.0);
    EXPECT_NEAR(one.alpha, 1.0, 1e-12) << s->name();
    EXPECT_NEAR(one.beta, 0.0, 1e-12) << s->name();
    const ScheduleValues zero = s->at(0.0);
    EXPECT_NEAR(zero.beta, 1.0, 1e-4) << s->name();
    EXPECT_NEAR(zero.alpha, 0.0, s->name() == "vp" ? 1e-2 : 1e-12) << s->name();
  }
}

TEST(Schedule, KappaAndEtaFollowTheirDefinitions) {
  for (const auto& s : all_schedules()) {
    for (double t : kInterior) {
      const ScheduleValues v = s->at(t);
      const double kappa = v.d_alpha / v.alpha;
      const double eta = v.beta * (kappa * v.beta - v.d_beta);
      EXPECT_NEAR(s->kappa(t), kappa, 1e-12 * (1 + std::abs(kappa)));
      EXPECT_NEAR(s->eta(t), eta, 1e-12 * (1 + std::abs(eta)));
      // kappa_h and eta_h with h = 0 are kappa and eta.
      EXPECT_NEAR(s->kappa_h(t, 0.0), kappa, 1e-10 * (1 + std::abs(kappa)));
      EXPECT_NEAR(s->eta_h(t, 0.0), eta, 1e-10 * (1 + std::abs(eta)));
      EXPECT_NEAR(s->inverse_eta_h(t, 0.0), 1.0 / eta, 1e-10 * (1 + 1.0 / eta));
      EXPECT_NEAR(s->kappa_over_eta_h(t, 0.0), kappa / eta, 1e-10 * (1 + kappa / eta));
    }
  }
}

TEST(Schedule, ClosedForms) {
  const auto lin = make_linear_schedule();
  const auto cosine = make_cosine_schedule();
  const auto vp = make_vp_schedule();
  for (double t : kInterior) {
    EXPECT_NEAR(lin->kappa(t), 1.0 / t, 1e-12 / t);
    EXPECT_NEAR(lin->eta(t), (1 - t) / t, 1e-12 / t);
    const ScheduleValues c = cosine->at(t);
    EXPECT_NEAR(cosine->eta(t), M_PI / 2 * c.beta / c.alpha, 1e-10 / t);
    EXPECT_NEAR(vp->eta(t), vp->kappa(t), 1e-10 * vp->kappa(t));  // DDPM: eta = kappa = abar'/(2 abar)
  }
}

TEST(Schedule, OffsetMatchesThePaper) {
  // Adjoint Matching App. G.1: sigma(t) = sqrt(2 (1 - t + h) / (t + h)), kappa = 1/(t + h).
  const auto lin = make_linear_schedule();
  for (double h : {0.025, 0.1}) {
    for (double t : {0.0, 0.3, 0.975, 1.0}) {
      EXPECT_NEAR(lin->kappa_h(t, h), 1.0 / (t + h), 1e-12);
      EXPECT_NEAR(lin->eta_h(t, h), (1 - t + h) / (t + h), 1e-12);
    }
  }
}

TEST(Schedule, TensorAndScalarVersionsAgree) {
  const at::Tensor t = at::tensor({0.0, 0.1, 0.5, 0.9, 0.99}, at::kDouble);
  for (const auto& s : all_schedules()) {
    const ScheduleTensors v = s->at(t);
    for (int64_t i = 0; i < t.size(0); ++i) {
      const ScheduleValues e = s->at(t[i].item<double>());
      EXPECT_NEAR(v.alpha[i].item<double>(), e.alpha, 1e-14);
      EXPECT_NEAR(v.beta[i].item<double>(), e.beta, 1e-14);
      EXPECT_NEAR(v.d_alpha[i].item<double>(), e.d_alpha, 1e-12);
      EXPECT_NEAR(v.d_beta[i].item<double>(), e.d_beta, 1e-12);
    }
  }
}

TEST(Schedule, UnknownNameIsAnError) {
  try {
    make_schedule("cosin");
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cosin"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("linear"), std::string::npos);
  }
}

TEST(NoiseSchedule, MemorylessIsSqrtTwoEtaWithDriftTwoVMinusKappaX) {
  for (const auto& s : all_schedules()) {
    const auto noise = make_memoryless_noise(0.025);
    for (double t : {0.0, 0.2, 0.6, 0.975}) {
      const double sigma = noise->sigma(*s, t);
      EXPECT_NEAR(sigma * sigma, 2 * s->eta_h(t, 0.025), 1e-12 * (1 + sigma * sigma));
      const DriftCoefficients c = noise->drift(*s, t);
      EXPECT_EQ(c.c_v, 2.0);
      EXPECT_NEAR(c.c_x, s->kappa_h(t, 0.025), 1e-12);
      // The generic formula (base class) gives the same coefficients.
      const DriftCoefficients g = noise->NoiseSchedule::drift(*s, t);
      EXPECT_NEAR(g.c_v, 2.0, 1e-10);
      EXPECT_NEAR(g.c_x, c.c_x, 1e-10 * (1 + c.c_x));
    }
  }
  // The paper's linear-schedule formula.
  const auto lin = make_linear_schedule();
  EXPECT_NEAR(make_memoryless_noise(0.025)->sigma(*lin, 0.5), std::sqrt(2 * 0.525 / 0.525), 1e-12);
}

TEST(NoiseSchedule, GenericDriftIsMarginalPreservingFormula) {
  // b = v + sigma^2/(2 eta) (v - kappa x): c_v = 1 + sigma^2 / (2 eta), c_x = sigma^2 kappa / (2 eta).
  for (const auto& s : all_schedules()) {
    for (double sigma : {0.2, 1.0}) {
      const auto noise = make_constant_noise(sigma);
      for (double t : kInterior) {
        const DriftCoefficients c = noise->drift(*s, t);
        const double ratio = sigma * sigma / (2 * s->eta(t));
        EXPECT_NEAR(c.c_v, 1 + ratio, 1e-10 * (1 + ratio));
        EXPECT_NEAR(c.c_x, ratio * s->kappa(t), 1e-10 * (1 + ratio * s->kappa(t)));
      }
    }
  }
  // Finite at t = 0 where kappa and eta are infinite: linear c_v(0) = 1, c_x(0) = sigma^2 / 2.
  const auto lin = make_linear_schedule();
  const DriftCoefficients c0 = make_constant_noise(1.0)->drift(*lin, 0.0);
  EXPECT_NEAR(c0.c_v, 1.0, 1e-15);
  EXPECT_NEAR(c0.c_x, 0.5, 1e-15);
}

TEST(NoiseSchedule, ScaledMemorylessAndZero) {
  const auto lin = make_linear_schedule();
  const auto scaled = make_scaled_memoryless_noise(1.0, 0.025);
  const auto mem = make_memoryless_noise(0.025);
  for (double t : {0.0, 0.4, 0.9}) {
    EXPECT_NEAR(scaled->sigma(*lin, t), mem->sigma(*lin, t), 1e-14);
    EXPECT_NEAR(scaled->drift(*lin, t).c_v, 2.0, 1e-14);
    EXPECT_NEAR(scaled->drift(*lin, t).c_x, mem->drift(*lin, t).c_x, 1e-14);
  }
  const auto half = make_scaled_memoryless_noise(0.5, 0.025);
  EXPECT_NEAR(half->sigma(*lin, 0.3), 0.5 * mem->sigma(*lin, 0.3), 1e-14);
  EXPECT_NEAR(half->drift(*lin, 0.3).c_v, 1.25, 1e-14);
  const auto zero = make_zero_noise();
  EXPECT_EQ(zero->sigma(*lin, 0.5), 0.0);
  EXPECT_EQ(zero->drift(*lin, 0.5).c_v, 1.0);
  EXPECT_EQ(zero->drift(*lin, 0.5).c_x, 0.0);
}

TEST(NoiseSchedule, ParsesSpecsAndRejectsBadOnes) {
  EXPECT_TRUE(parse_noise_schedule("memoryless")->is_memoryless());
  EXPECT_NEAR(parse_noise_schedule("memoryless:0.1")->h(), 0.1, 0);
  EXPECT_EQ(parse_noise_schedule("constant:0.2")->describe(), "constant(sigma=0.2)");
  EXPECT_TRUE(parse_noise_schedule("ode")->is_zero());
  EXPECT_EQ(parse_noise_schedule("scaled_memoryless:0.5")->name(), "scaled_memoryless");
  EXPECT_THROW(parse_noise_schedule("constant"), Error);
  EXPECT_THROW(parse_noise_schedule("constant:abc"), Error);
  EXPECT_THROW(parse_noise_schedule("constant:-1"), Error);
  EXPECT_THROW(parse_noise_schedule("brownian"), Error);
}

}  // namespace
}  // namespace tilt
