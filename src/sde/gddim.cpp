#include "tilt/sde/gddim.h"

#include "tilt/core/check.h"
#include "tilt/core/error.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

namespace tilt {
namespace {

// W_t = alpha'_t beta_t - alpha_t beta'_t > 0: the determinant of the map (x1, eps) -> (x, v).
double wronskian(const ScheduleValues& a) { return a.d_alpha * a.beta - a.alpha * a.d_beta; }

}  // namespace

ExponentialStep exponential_step(const Schedule& schedule, double t, double s, double gamma) {
  if (!(t >= 0.0 && t < s && s <= 1.0)) {
    throw Error("exact gDDIM step: needs 0 <= t < s <= 1, got t = " + number_string(t) + ", s = " + number_string(s));
  }
  if (!(gamma >= 0.0) || !std::isfinite(gamma)) {
    throw Error("exact gDDIM step: stochasticity gamma must be finite and >= 0, got " + number_string(gamma));
  }
  const ScheduleValues a = schedule.at(t);
  ScheduleValues b = schedule.at(s);
  if (s == 1.0) b.beta = 0.0;  // the data end, exactly (the cosine schedule's cos(pi / 2) is 6e-17, not 0)
  const double W = wronskian(a);
  if (!(W > 0.0) || !std::isfinite(W)) {
    throw Error("exact gDDIM step: the " + schedule.name() + " schedule has no finite, positive alpha' beta - alpha beta' at t = " + number_string(t));
  }
  // rho = (SNR_t / SNR_s)^{gamma^2 / 2} = (alpha_t beta_s / (alpha_s beta_t))^{gamma^2}.
  double rho = 1.0;
  if (gamma > 0.0) {
    if (a.alpha <= 0.0 || b.beta <= 0.0) {
      rho = 0.0;  // from pure noise, or onto the data: nothing of eps^ is kept
    } else {
      const double log_ratio = std::log(a.alpha) + std::log(b.beta) - std::log(b.alpha) - std::log(a.beta);
      rho = std::exp(gamma * gamma * std::min(log_ratio, 0.0));
    }
  }
  ExponentialStep step;
  step.rho = rho;
  // mean = alpha_s x1^ + beta_s rho eps^ with x1^ = (beta_t v - beta'_t x)/W, eps^ = (alpha'_t x - alpha_t v)/W.
  step.c_x = (b.beta * rho * a.d_alpha - b.alpha * a.d_beta) / W;
  step.c_v = (b.alpha * a.beta - b.beta * rho * a.alpha) / W;
  step.std = b.beta * std::sqrt(std::max(0.0, (1.0 - rho) * (1.0 + rho)));
  return step;
}

double stochasticity_of(const NoiseSchedule& noise) {
  const auto gamma = noise.stochasticity();
  if (!gamma) {
    throw Error("the exact gDDIM step needs a noise schedule sigma = gamma sqrt(2 eta) (memoryless, "
                "scaled_memoryless:<gamma> or ode), not " + noise.describe());
  }
  return *gamma;
}

Tensor data_estimate(const Schedule& schedule, const Tensor& x, const Tensor& v, double t) {
  const ScheduleValues a = schedule.at(t);
  const double W = wronskian(a);
  return (a.beta / W) * v - (a.d_beta / W) * x;
}

Tensor noise_estimate(const Schedule& schedule, const Tensor& x, const Tensor& v, double t) {
  const ScheduleValues a = schedule.at(t);
  const double W = wronskian(a);
  return (a.d_alpha / W) * x - (a.alpha / W) * v;
}

}  // namespace tilt
