// Noise schedules sigma(t): the diffusion coefficient of the generative SDE (docs/equations.md, E9-E12)
//
//   dX = b(X,t) dt + sigma(t) dB,   b = v + (sigma^2 / (2 eta)) (v - kappa x)  =  c_v v - c_x x.
//
// For every sigma(t) the time marginals equal those of the reference flow; sigma = 0 is the flow
// ODE. The memoryless schedule sigma^2 = 2 eta (so b = 2 v - kappa x) makes X0 and X1 independent,
// which is what lets reward fine-tuning reach p* ∝ p_base exp(lambda r): FINE-TUNE WITH IT.
// Any other schedule during fine-tuning leaves the value-function bias (Adjoint Matching,
// arXiv 2409.08861, Sec. 4 and Thm. 1). After fine-tuning, sample with any schedule.
#pragma once

#include "tilt/schedule/schedule.h"

#include <memory>
#include <optional>
#include <string>

namespace tilt {

/// b(x, t) = c_v(t) v(x, t) - c_x(t) x.
struct DriftCoefficients {
  double c_v;
  double c_x;
};

class NoiseSchedule {
 public:
  explicit NoiseSchedule(double h) : h_(h) {}
  virtual ~NoiseSchedule() = default;

  /// "memoryless", "constant", "scaled_memoryless" or "zero".
  virtual std::string name() const = 0;
  /// A short description with the parameters, e.g. "constant(sigma=0.2)".
  virtual std::string describe() const = 0;
  virtual double sigma(const Schedule& schedule, double t) const = 0;
  virtual bool is_memoryless() const { return false; }
  /// gamma when sigma(t) = gamma sqrt(2 eta_h(t)) (memoryless: 1, scaled_memoryless: its scale,
  /// zero: 0); nullopt for schedules outside that family (constant). See tilt/sde/gddim.h.
  virtual std::optional<double> stochasticity() const { return std::nullopt; }
  bool is_zero() const { return name() == "zero"; }

  /// Drift coefficients c_v = 1 + sigma^2/(2 eta_h), c_x = sigma^2 kappa_h / (2 eta_h), written so
  /// that nothing is evaluated at infinity at t = 0 (kappa_h / eta_h = alpha' / (W (beta + h|beta'|))).
  virtual DriftCoefficients drift(const Schedule& schedule, double t) const;

  /// Offset that removes the singularity at t = 0 (Schedule::kappa_h, Schedule::eta_h).
  double h() const { return h_; }
  /// The same schedule with another offset (h = 0: the exact, unregularised one).
  virtual std::shared_ptr<const NoiseSchedule> with_offset(double h) const = 0;

 private:
  double h_;
};

using NoiseSchedulePtr = std::shared_ptr<const NoiseSchedule>;

/// The paper's offset is one step, h = 1/K (Adjoint Matching, App. G.1); this default is that for K = 40.
/// With another K pass make_memoryless_noise(1.0 / K), as tilt finetune does (AdjointMatching warns otherwise).
constexpr double kDefaultMemorylessOffset = 1.0 / 40.0;

/// sigma(t) = sqrt(2 eta_h(t)); linear schedule: sqrt(2 (1 - t + h) / (t + h)).  b = 2 v - kappa_h x.
NoiseSchedulePtr make_memoryless_noise(double h = kDefaultMemorylessOffset);
/// sigma(t) = scale * sqrt(2 eta_h(t)); scale = 1 is the memoryless schedule.
NoiseSchedulePtr make_scaled_memoryless_noise(double scale, double h = kDefaultMemorylessOffset);
/// sigma(t) = sigma, constant.  h = 0 keeps the drift exact: c_x stays finite at t = 0.
NoiseSchedulePtr make_constant_noise(double sigma, double h = 0.0);
/// sigma(t) = 0: the probability-flow ODE dX/dt = v(X, t).
NoiseSchedulePtr make_zero_noise();

/// Parses "memoryless", "memoryless:h", "constant:0.2", "scaled_memoryless:0.5", "zero"/"ode".
/// A user's h must be in (0, 1) and sigma and scale in [0, 1000] (docs/config.md, [finetune] noise).
NoiseSchedulePtr parse_noise_schedule(const std::string& spec);

/// Above this offset the memoryless schedule is still accepted, but the commands warn: h only
/// regularises t = 0 (docs/method.md, choice 1), and the default is one step, h = 1/K.
constexpr double kLargeMemorylessOffset = 0.1;

}  // namespace tilt
