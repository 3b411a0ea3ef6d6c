#include "tilt/sde/engine.h"

#include "tilt/core/check.h"
#include "tilt/core/error.h"
#include "tilt/sde/gddim.h"

#include <ATen/ATen.h>

#include <cmath>

namespace tilt {
namespace {
bool finite(const StepKernel& q) { return std::isfinite(q.c_x) && std::isfinite(q.c_v) && std::isfinite(q.std); }
}  // namespace

Tensor StepKernel::mean(const Tensor& x, const Tensor& v) const {
  return at::add(c_x == 1.0 ? x : x * c_x, v, c_v);
}

Tensor StepKernel::next(const Tensor& x, const Tensor& v, const Tensor& xi) const {
  const Tensor m = mean(x, v);
  return deterministic() ? m : at::add(m, xi, std);
}

Tensor StepKernel::adjoint(const Tensor& a, const Tensor& vjp) const {
  return at::add(c_x == 1.0 ? a : a * c_x, vjp, c_v);
}

StepKernel euler_kernel(const GenerativeSDE& sde, double t, double s) {
  const double h = s - t;
  const DriftCoefficients c = sde.coefficients(t);
  return {1.0 - h * c.c_x, h * c.c_v, std::sqrt(h) * sde.sigma(t)};
}

StepKernel exact_kernel(const Schedule& schedule, double t, double s, double gamma) {
  const ExponentialStep e = exponential_step(schedule, t, s, gamma);
  return {e.c_x, e.c_v, e.std};
}

StepKernel step_kernel(const GenerativeSDE& sde, Integrator integrator, double t, double s) {
  if (integrator == Integrator::heun) throw Error("the heun integrator is not a Gaussian step (it has no step kernel)");
  if (integrator == Integrator::exact) return exact_kernel(sde.schedule(), t, s, stochasticity_of(sde.noise()));
  return euler_kernel(sde, t, s);
}

void check_finite_steps(const std::vector<StepKernel>& kernels, const GenerativeSDE& sde, const TimeGrid& grid) {
  for (size_t k = 0; k < kernels.size(); ++k) {
    if (!finite(kernels[k])) {
      throw Error("the step from t = " + number_string(grid[static_cast<int64_t>(k)]) + " to " +
                  number_string(grid[static_cast<int64_t>(k) + 1]) + " is not finite under the noise schedule " +
                  sde.noise().describe() + " (a memoryless schedule is infinite at t = 0 without an offset: give it "
                  "one, h = 1/K for K steps)");
    }
  }
}

std::vector<StepKernel> step_kernels(const GenerativeSDE& sde, const TimeGrid& grid, Integrator integrator) {
  std::vector<StepKernel> kernels;
  kernels.reserve(static_cast<size_t>(grid.steps()));
  for (int64_t k = 0; k < grid.steps(); ++k) kernels.push_back(step_kernel(sde, integrator, grid[k], grid[k + 1]));
  return kernels;
}

Tensor flow_ode_steps(const VelocityField& v, Tensor x, const TimeGrid& grid, int64_t from, int64_t to) {
  for (int64_t k = from; k < to; ++k) x = StepKernel{1.0, grid.step(k), 0.0}.mean(x, v.velocity(x, grid[k]));
  return x;
}

Rollout rollout(const std::vector<StepKernel>& kernels, const StepVelocity& velocity, const Tensor& x0, Generator& gen,
                const RolloutRecord& record) {
  const size_t K = kernels.size();
  // A kernel that is not finite (the memoryless schedule without offset at t = 0) gave NaN states.
  for (size_t k = 0; k < K; ++k) {
    const StepKernel& q = kernels[k];
    if (!finite(q)) {
      throw Error("rollout: step " + std::to_string(k) + " is not finite (x' = " + number_string(q.c_x) + " x + " +
                  number_string(q.c_v) + " v + " + number_string(q.std) + " xi): its noise schedule is infinite there " +
                  "(a memoryless schedule without an offset at t = 0?)");
    }
  }
  Rollout out;
  out.x.reserve(record.states ? K + 1 : 2);
  out.x.push_back(x0);
  if (record.noise) out.xi.resize(K);
  if (record.velocities) out.v.resize(K);
  Tensor x = x0;
  for (size_t k = 0; k < K; ++k) {
    const StepKernel& q = kernels[k];
    const Tensor v = velocity(static_cast<int64_t>(k), x);
    Tensor xi;
    if (!q.deterministic()) xi = normal_draws(x.sizes(), gen, x.options());
    x = q.next(x, v, xi);
    if (record.noise) out.xi[k] = xi;
    if (record.velocities) out.v[k] = v;
    if (record.states || k + 1 == K) out.x.push_back(x);
  }
  return out;
}

void lean_adjoint_recursion(std::vector<Tensor>& a, const std::vector<StepKernel>& kernels, const StepVjp& vjp,
                            const StepSource& source) {
  const int64_t K = static_cast<int64_t>(kernels.size());
  if (static_cast<int64_t>(a.size()) != K + 1 || !a[K].defined()) {
    throw Error("lean adjoint: needs K + 1 = " + std::to_string(K + 1) + " entries with the terminal one set, got " +
                std::to_string(a.size()));
  }
  for (int64_t k = K - 1; k >= 0; --k) {
    Tensor g = vjp(k, a[k + 1]);
    if (source) g = g + source(k);
    a[k] = kernels[k].adjoint(a[k + 1], g);
  }
}

PathWeight::PathWeight(int64_t batch) : log_w_(at::zeros({batch}, at::kDouble)) {}

void PathWeight::add_step(const Tensor& shift, const Tensor& xi, double std) {
  if (!(std > 0.0)) throw Error("path weight: a step without noise has no density ratio");
  const Tensor d = shift.to(at::kDouble) / std;
  // The sum follows its terms' device (a run on a GPU adds GPU tensors).
  log_w_ = log_w_.to(d.device()) - (d * xi.to(at::kDouble)).sum(1) - 0.5 * (d * d).sum(1);
}

void PathWeight::add(const Tensor& log_ratio) { log_w_ = log_w_.to(log_ratio.device()) + log_ratio.to(at::kDouble); }

}  // namespace tilt
