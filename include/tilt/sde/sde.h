// The generative SDE of a velocity field under a noise schedule (docs/equations.md, E9):
//   dX = b(X,t) dt + sigma(t) dB,   b(x,t) = c_v(t) v(x,t) - c_x(t) x,   X0 ~ N(0, I).
#pragma once

#include "tilt/model/velocity.h"
#include "tilt/schedule/noise_schedule.h"

namespace tilt {

class GenerativeSDE {
 public:
  GenerativeSDE(VelocityFieldPtr velocity, NoiseSchedulePtr noise);

  const VelocityField& velocity() const { return *velocity_; }
  const VelocityFieldPtr& velocity_ptr() const { return velocity_; }
  const NoiseSchedule& noise() const { return *noise_; }
  const NoiseSchedulePtr& noise_ptr() const { return noise_; }
  const Schedule& schedule() const { return *velocity_->schedule(); }
  int64_t dim() const { return velocity_->dim(); }

  double sigma(double t) const { return noise_->sigma(schedule(), t); }
  DriftCoefficients coefficients(double t) const { return noise_->drift(schedule(), t); }

  /// b(x, t).
  Tensor drift(const Tensor& x, double t) const;
  /// b(x, t) from an already computed v(x, t).
  Tensor drift_from_velocity(const Tensor& v, const Tensor& x, double t) const;
  /// The vector-Jacobian product (grad_x b(x,t))^T a = c_v (dv/dx)^T a - c_x a, by the velocity
  /// field's vjp (one reverse pass of autograd, or a closed form; x is not modified). If v_out is
  /// given it receives v(x, t), detached. Works under a NoGradGuard.
  Tensor drift_vjp(const Tensor& x, double t, const Tensor& a, Tensor* v_out = nullptr) const;

 private:
  VelocityFieldPtr velocity_;
  NoiseSchedulePtr noise_;
};

}  // namespace tilt
