// Reference-flow schedules: the path Xbar_t = beta_t X0 + alpha_t X1 (docs/equations.md, E1).
//
// Notation (docs/equations.md, E1 and E6): t in [0, 1], t = 0 noise, t = 1 data; alpha_0 = 0, alpha_1 = 1,
// beta_0 = 1, beta_1 = 0.  kappa_t = alpha'_t / alpha_t,  eta_t = beta_t (kappa_t beta_t - beta'_t).
// Beware: other libraries call beta the "sigma_t" of the path. In tilt sigma(t) is ALWAYS the
// diffusion coefficient of the generative SDE (noise_schedule.h).
#pragma once

#include "tilt/core/tensor.h"

#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace tilt {

/// alpha_t, beta_t and their time derivatives at one time.
struct ScheduleValues {
  double alpha, beta, d_alpha, d_beta;
};

/// The same, evaluated elementwise on a tensor of times.
struct ScheduleTensors {
  Tensor alpha, beta, d_alpha, d_beta;
};

class Schedule {
 public:
  virtual ~Schedule() = default;
  /// "linear", "cosine" or "vp".
  virtual std::string name() const = 0;
  virtual ScheduleValues at(double t) const = 0;
  virtual ScheduleTensors at(const Tensor& t) const = 0;
  /// Named parameters (vp: beta_min, beta_max), enough to rebuild the schedule.
  virtual std::vector<std::pair<std::string, double>> parameters() const { return {}; }

  /// kappa_t = alpha'_t / alpha_t (infinite at t = 0 when alpha_0 = 0).
  double kappa(double t) const;
  /// eta_t = beta_t (kappa_t beta_t - beta'_t) = W_t beta_t / alpha_t, with the Wronskian
  /// W_t = alpha'_t beta_t - alpha_t beta'_t.  Linear schedule: kappa = 1/t, eta = (1-t)/t.
  double eta(double t) const;

  /// kappa and eta with the singularity at t = 0 removed by an offset h >= 0 (docs/equations.md, E11):
  /// alpha -> alpha + h alpha' and beta -> beta + h |beta'| inside the ratios, so that
  /// for the linear schedule kappa_h = 1/(t+h) and eta_h = (1-t+h)/(t+h), the paper's
  /// sigma(t)^2 = 2 eta_h (Adjoint Matching, arXiv 2409.08861, App. G.1). h = 0 gives kappa, eta.
  virtual double kappa_h(double t, double h) const;
  virtual double eta_h(double t, double h) const;
  /// 1 / eta_h and kappa_h / eta_h, finite at t = 0 even when h = 0 (they vanish or stay
  /// bounded where eta is infinite); the SDE drift uses these.
  virtual double inverse_eta_h(double t, double h) const;
  virtual double kappa_over_eta_h(double t, double h) const;
};

using SchedulePtr = std::shared_ptr<const Schedule>;

/// alpha = t, beta = 1 - t (rectified flow / conditional OT).
SchedulePtr make_linear_schedule();
/// alpha = sin(pi t / 2), beta = cos(pi t / 2).
SchedulePtr make_cosine_schedule();
/// Variance preserving (DDPM-type): alpha = sqrt(abar), beta = sqrt(1 - abar) with
/// abar(t) = exp(-(beta_min s + (beta_max - beta_min) s^2 / 2)), s = 1 - t.  alpha_0 is small
/// (about 6.6e-3 with the defaults) rather than exactly 0, so the schedule has no singularity at
/// t = 0 and the offset h is not used; beta'_t is infinite at t = 1.
SchedulePtr make_vp_schedule(double beta_min = 0.1, double beta_max = 20.0);

/// By name ("linear", "cosine", "vp") and parameters; throws tilt::Error listing the valid
/// names, or naming an unknown parameter.
SchedulePtr make_schedule(const std::string& name,
                          const std::vector<std::pair<std::string, double>>& parameters = {});

}  // namespace tilt
