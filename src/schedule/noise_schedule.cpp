#include "tilt/schedule/noise_schedule.h"

#include "tilt/core/check.h"
#include "tilt/core/error.h"

#include <cmath>
#include <cstdlib>

namespace tilt {
namespace {

class Memoryless : public NoiseSchedule {
 public:
  explicit Memoryless(double h) : NoiseSchedule(h) {}
  std::string name() const override { return "memoryless"; }
  std::string describe() const override { return "memoryless(h=" + number_string(h()) + ")"; }
  double sigma(const Schedule& s, double t) const override { return std::sqrt(2.0 * s.eta_h(t, h())); }
  bool is_memoryless() const override { return true; }
  std::optional<double> stochasticity() const override { return 1.0; }
  NoiseSchedulePtr with_offset(double h) const override { return std::make_shared<Memoryless>(h); }
  // sigma^2 = 2 eta_h exactly, so c_v = 2 and c_x = kappa_h (Adjoint Matching, Eq. 27).
  DriftCoefficients drift(const Schedule& s, double t) const override {
    return {2.0, s.kappa_h(t, h())};
  }
};

class ScaledMemoryless : public NoiseSchedule {
 public:
  ScaledMemoryless(double scale, double h) : NoiseSchedule(h), scale_(scale) {}
  std::string name() const override { return "scaled_memoryless"; }
  std::string describe() const override {
    return "scaled_memoryless(scale=" + number_string(scale_) + ", h=" + number_string(h()) + ")";
  }
  double sigma(const Schedule& s, double t) const override {
    return scale_ * std::sqrt(2.0 * s.eta_h(t, h()));
  }
  std::optional<double> stochasticity() const override { return scale_; }
  NoiseSchedulePtr with_offset(double h) const override {
    return std::make_shared<ScaledMemoryless>(scale_, h);
  }
  // sigma^2 / (2 eta_h) = scale^2.
  DriftCoefficients drift(const Schedule& s, double t) const override {
    return {1.0 + scale_ * scale_, scale_ * scale_ * s.kappa_h(t, h())};
  }

 private:
  double scale_;
};

class Constant : public NoiseSchedule {
 public:
  Constant(double sigma, double h) : NoiseSchedule(h), sigma_(sigma) {}
  std::string name() const override { return "constant"; }
  std::string describe() const override {
    return "constant(sigma=" + number_string(sigma_) + (h() > 0 ? ", h=" + number_string(h()) : std::string()) + ")";
  }
  double sigma(const Schedule&, double) const override { return sigma_; }
  NoiseSchedulePtr with_offset(double h) const override { return std::make_shared<Constant>(sigma_, h); }

 private:
  double sigma_;
};

class Zero : public NoiseSchedule {
 public:
  Zero() : NoiseSchedule(0.0) {}
  std::string name() const override { return "zero"; }
  std::string describe() const override { return "zero (ODE)"; }
  double sigma(const Schedule&, double) const override { return 0.0; }
  std::optional<double> stochasticity() const override { return 0.0; }
  DriftCoefficients drift(const Schedule&, double) const override { return {1.0, 0.0}; }
  NoiseSchedulePtr with_offset(double) const override { return std::make_shared<Zero>(); }
};

void check_offset(double h, const char* what) {
  if (!(h >= 0.0) || !std::isfinite(h)) {
    throw Error(std::string(what) + ": offset h must be finite and >= 0, got " + number_string(h));
  }
}

}  // namespace

DriftCoefficients NoiseSchedule::drift(const Schedule& schedule, double t) const {
  const double sigma_t = sigma(schedule, t);
  if (sigma_t == 0.0) return {1.0, 0.0};
  const double half_sigma2 = 0.5 * sigma_t * sigma_t;
  return {1.0 + half_sigma2 * schedule.inverse_eta_h(t, h()),
          half_sigma2 * schedule.kappa_over_eta_h(t, h())};
}

NoiseSchedulePtr make_memoryless_noise(double h) {
  check_offset(h, "memoryless noise schedule");
  return std::make_shared<Memoryless>(h);
}

NoiseSchedulePtr make_scaled_memoryless_noise(double scale, double h) {
  check_offset(h, "scaled_memoryless noise schedule");
  if (!(scale >= 0.0) || !std::isfinite(scale)) {
    throw Error("scaled_memoryless noise schedule: scale must be finite and >= 0, got " + number_string(scale));
  }
  return std::make_shared<ScaledMemoryless>(scale, h);
}

NoiseSchedulePtr make_constant_noise(double sigma, double h) {
  check_offset(h, "constant noise schedule");
  if (!(sigma >= 0.0) || std::signbit(sigma) || !std::isfinite(sigma)) {  // -0 too: it prints as -0
    throw Error("constant noise schedule: sigma must be finite and >= 0, got " + number_string(sigma));
  }
  return std::make_shared<Constant>(sigma, h);
}

NoiseSchedulePtr make_zero_noise() { return std::make_shared<Zero>(); }

NoiseSchedulePtr parse_noise_schedule(const std::string& spec) {
  const auto colon = spec.find(':');
  const std::string kind = spec.substr(0, colon);
  const bool has_arg = colon != std::string::npos;
  double arg = 0.0;
  if (has_arg) {
    const std::string text = spec.substr(colon + 1);
    char* end = nullptr;
    arg = std::strtod(text.c_str(), &end);
    if (text.empty() || *end != '\0') {
      throw Error("noise schedule '" + spec + "': '" + text + "' is not a number");
    }
  }
  if (kind == "memoryless") {
    // h only regularises sigma(t)^2 = 2 eta_h(t) near t = 0 (docs/method.md, choice 1; the default
    // is one step, h = 1/K). From h = 1 on, sigma^2 = 2 (1 - t + h) / (t + h) is nearly constant:
    // X0 and X1 are no longer independent and fine-tuning misses p* (memoryless:5 landed 115x the
    // noise floor away). h = 0 makes sigma infinite at t = 0.
    if (has_arg && !(arg > 0.0 && arg < 1.0)) {
      throw Error("noise schedule '" + spec + "': the offset h must be in (0, 1), got " + number_string(arg) +
                  " (a small h such as 1/num_steps, the default, keeps the schedule memoryless)");
    }
    return make_memoryless_noise(has_arg ? arg : kDefaultMemorylessOffset);
  }
  // Bounds of the user-facing parameters (docs/config.md): more noise than that drives any state to overflow.
  constexpr double kMaxNoise = 1000.0;
  if (kind == "scaled_memoryless") {
    if (!has_arg) throw Error("noise schedule 'scaled_memoryless' needs a scale, e.g. scaled_memoryless:0.5");
    if (!(arg >= 0.0 && arg <= kMaxNoise)) {
      throw Error("noise schedule '" + spec + "': the scale must be in [0, " + number_string(kMaxNoise) + "], got " +
                  number_string(arg));
    }
    return make_scaled_memoryless_noise(arg);
  }
  if (kind == "constant") {
    if (!has_arg) throw Error("noise schedule 'constant' needs a value, e.g. constant:0.2");
    if (!(arg >= 0.0 && arg <= kMaxNoise)) {
      throw Error("noise schedule '" + spec + "': sigma must be in [0, " + number_string(kMaxNoise) + "], got " +
                  number_string(arg));
    }
    return make_constant_noise(arg);
  }
  if ((kind == "zero" || kind == "ode") && !has_arg) return make_zero_noise();
  throw Error("unknown noise schedule '" + spec +
              "' (valid: memoryless[:h], constant:<sigma>, scaled_memoryless:<scale>, zero, ode)");
}

}  // namespace tilt
