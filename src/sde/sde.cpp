#include "tilt/sde/engine.h"
#include "tilt/sde/sampler.h"
#include "tilt/sde/sde.h"

#include "tilt/core/check.h"
#include "tilt/core/error.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>  // at::NoGradGuard; not pulled in by ATen.h since LibTorch 2.0

#include <cmath>

namespace tilt {

TimeGrid TimeGrid::uniform(int64_t steps, double t0, double t1) {
  if (steps < 1) throw Error("time grid: number of steps must be >= 1, got " + std::to_string(steps));
  std::vector<double> t(static_cast<size_t>(steps) + 1);
  for (int64_t k = 0; k <= steps; ++k) t[k] = t0 + (t1 - t0) * static_cast<double>(k) / static_cast<double>(steps);
  t.back() = t1;
  return TimeGrid(std::move(t));
}

TimeGrid::TimeGrid(std::vector<double> times) : t_(std::move(times)) {
  if (t_.size() < 2) throw Error("time grid: needs at least two times");
  // The generative flow's time runs from 0 (noise) to 1 (data): the schedules are not defined outside.
  if (!(t_.front() >= 0.0) || !(t_.back() <= 1.0)) {
    throw Error("time grid: times must lie in [0, 1], got " + number_string(t_.front()) + " .. " + number_string(t_.back()));
  }
  for (size_t k = 0; k + 1 < t_.size(); ++k) {
    if (!(t_[k + 1] > t_[k])) throw Error("time grid: times must be strictly increasing");
  }
}

GenerativeSDE::GenerativeSDE(VelocityFieldPtr velocity, NoiseSchedulePtr noise)
    : velocity_(std::move(velocity)), noise_(std::move(noise)) {
  if (!velocity_) throw Error("generative SDE: no velocity field");
  if (!noise_) throw Error("generative SDE: no noise schedule");
  if (!velocity_->schedule()) throw Error("generative SDE: the velocity field has no schedule");
}

Tensor GenerativeSDE::drift_from_velocity(const Tensor& v, const Tensor& x, double t) const {
  const DriftCoefficients c = coefficients(t);
  if (c.c_x == 0.0) return c.c_v == 1.0 ? v : c.c_v * v;
  return c.c_v * v - c.c_x * x;
}

Tensor GenerativeSDE::drift(const Tensor& x, double t) const {
  return drift_from_velocity(velocity_->velocity(x, t), x, t);
}

Tensor GenerativeSDE::drift_vjp(const Tensor& x, double t, const Tensor& a, Tensor* v_out) const {
  const DriftCoefficients c = coefficients(t);
  return c.c_v * velocity_->vjp(x, t, a, v_out) - c.c_x * a;
}

Integrator parse_integrator(const std::string& name) {
  if (name == "euler") return Integrator::euler;
  if (name == "heun") return Integrator::heun;
  if (name == "exact") return Integrator::exact;
  throw Error("unknown integrator '" + name + "' (valid: euler, heun, exact)");
}

Trajectory simulate(const GenerativeSDE& sde, const Tensor& x0, const TimeGrid& grid, Generator& gen,
                    const SampleOptions& options) {
  check_batch(x0, sde.dim(), "initial state X0");
  Trajectory out;
  out.t = grid.times();
  if (options.integrator != Integrator::heun) {
    // Euler-Maruyama and the exact step are Gaussian kernels: one velocity evaluation per step.
    const VelocityField& v = sde.velocity();
    RolloutRecord record;
    record.states = options.record;
    const std::vector<StepKernel> kernels = step_kernels(sde, grid, options.integrator);
    check_finite_steps(kernels, sde, grid);
    out.x = rollout(kernels,
                    [&](int64_t k, const Tensor& x) {
                      Tensor vk = v.velocity(x, grid[k]);
                      if (options.on_step) options.on_step(k + 1);
                      return vk;
                    },
                    x0, gen, record)
                .x;
    return out;
  }
  if (!sde.noise().is_zero()) {
    throw Error("the heun integrator is for the ODE only; noise schedule is " + sde.noise().describe());
  }
  out.x.reserve(options.record ? grid.times().size() : 2);
  out.x.push_back(x0);
  Tensor x = x0;
  for (int64_t k = 0; k < grid.steps(); ++k) {
    const double h = grid.step(k);
    const Tensor b = sde.drift(x, grid[k]);
    const Tensor x_pred = x + h * b;
    x = x + (0.5 * h) * (b + sde.drift(x_pred, grid[k + 1]));
    if (options.record || k + 1 == grid.steps()) out.x.push_back(x);
    if (options.on_step) options.on_step(k + 1);
  }
  return out;
}

Tensor sample(const GenerativeSDE& sde, int64_t n, const TimeGrid& grid, Generator& gen,
              const SampleOptions& options, at::ScalarType dtype) {
  if (n < 0) throw Error("sample: cannot draw " + std::to_string(n) + " samples");
  if (!at::isFloatingType(dtype)) throw Error("sample: samples must be of a floating-point dtype");
  at::NoGradGuard no_grad;
  const Tensor x0 = normal_draws({n, sde.dim()}, gen, at::TensorOptions().dtype(dtype).device(sde.velocity().device()));
  SampleOptions opts = options;
  opts.record = false;
  return simulate(sde, x0, grid, gen, opts).final();
}

}  // namespace tilt
