// The SOC problem's autograd defaults, the controlled simulation, importance weights and metrics.
#include "tilt/soc/problem.h"
#include "tilt/soc/simulate.h"

#include "tilt/core/check.h"
#include "tilt/core/error.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>  // at::NoGradGuard; not pulled in by ATen.h since LibTorch 2.0
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <cmath>

namespace tilt::soc {

namespace {
// grad_x of sum_b (fn(x) . a) for a [B, d] -> [B, d] or [B] function.
Tensor autograd_vjp(const std::function<Tensor(const Tensor&)>& fn, const Tensor& x, const Tensor& a) {
  at::AutoGradMode enable_grad(true);
  const Tensor xg = x.detach().to(at::kDouble).requires_grad_(true);
  const Tensor y = fn(xg);
  if (!y.requires_grad()) return at::zeros_like(xg).detach();  // fn does not depend on x
  return torch::autograd::grad({y}, {xg}, {a.to(y.scalar_type())}, false, false)[0];
}
}  // namespace

Tensor Problem::drift_vjp(const Tensor& x, double t, const Tensor& a) const {
  return autograd_vjp([&](const Tensor& z) { return drift(z, t); }, x, a);
}

Tensor Problem::state_cost_grad(const Tensor& x, double t) const {
  return autograd_vjp([&](const Tensor& z) { return state_cost(z, t); }, x, at::ones({x.size(0)}, at::kDouble));
}

Tensor Problem::terminal_cost_grad(const Tensor& x) const {
  return autograd_vjp([&](const Tensor& z) { return terminal_cost(z); }, x, at::ones({x.size(0)}, at::kDouble));
}

Tensor Problem::stopped(const Tensor& x) const { return at::zeros({x.size(0)}, at::kBool); }

Tensor Problem::optimal_control(const Tensor&, double) const {
  throw Error("SOC problem '" + name() + "' has no known optimal control");
}

Tensor Problem::value(const Tensor&, double) const {
  throw Error("SOC problem '" + name() + "' has no known value function");
}

Control zero_control(int64_t dim) {
  return [dim](const Tensor& x, double) { return at::zeros({x.size(0), dim}, x.options()); };
}

Control optimal_control_of(ProblemPtr problem) {
  if (!problem) throw Error("optimal_control_of: no problem given");
  if (!problem->has_ground_truth()) throw Error("SOC problem '" + problem->name() + "' has no known optimal control");
  return [problem](const Tensor& x, double t) { return problem->optimal_control(x, t); };
}

ControlledPaths simulate(const Problem& problem, const Control& u, int64_t batch, int64_t steps, Generator& gen) {
  if (batch < 1) throw Error("SOC simulation: batch must be >= 1, got " + std::to_string(batch));
  if (!u) throw Error("SOC simulation: no control given (an empty Control; zero_control(dim) is u = 0)");
  if (steps <= 0) steps = problem.default_steps();
  at::NoGradGuard no_grad;
  const int64_t d = problem.dim();
  const double T = problem.horizon(), h = T / static_cast<double>(steps), sqrt_h = std::sqrt(h);
  ControlledPaths p;
  Tensor x = problem.initial_state(batch, gen).to(at::kDouble);
  check_batch(x, d, "initial state of " + problem.name());
  p.running_cost = at::zeros({batch}, at::kDouble);
  p.state_cost = at::zeros({batch}, at::kDouble);
  p.noise_integral = at::zeros({batch}, at::kDouble);
  p.x.push_back(x);
  const bool stopping = problem.has_stopping_time();
  Tensor alive = at::ones({batch}, at::kDouble);
  if (stopping) alive = alive * at::logical_not(problem.stopped(x)).to(at::kDouble);
  for (int64_t k = 0; k < steps; ++k) {
    const double t = static_cast<double>(k) * h;
    const Tensor sigma_t = problem.sigma(t).to(at::kDouble).t();
    const Tensor uk = u(x, t).to(at::kDouble);
    if (!uk.sizes().equals(x.sizes())) {
      throw Error("SOC simulation: the control returned shape " + std::string(c10::str(uk.sizes())) +
                  ", expected " + std::string(c10::str(x.sizes())));
    }
    const Tensor f = problem.state_cost(x, t).to(at::kDouble);
    Tensor dW = sqrt_h * at::randn({batch, d}, gen, at::kDouble);
    if (stopping) dW = dW * alive.unsqueeze(1);
    // Euler-Maruyama: X_{k+1} = X_k + (b + sigma u) h + sigma dW (no move once stopped).
    const Tensor drift = problem.drift(x, t).to(at::kDouble) + at::matmul(uk, sigma_t);
    x = x + (stopping ? alive.unsqueeze(1) * drift : drift) * h + at::matmul(dW, sigma_t);
    const Tensor h_alive = stopping ? h * alive : at::full({batch}, h, at::kDouble);
    p.running_cost += (f + 0.5 * uk.pow(2).sum(1)) * h_alive;
    p.state_cost += f * h_alive;
    p.noise_integral += (uk * dW).sum(1);
    p.t.push_back(t);
    p.u.push_back(uk);
    p.dW.push_back(dW);
    p.alive.push_back(alive);
    p.x.push_back(x);
    if (stopping) alive = alive * at::logical_not(problem.stopped(x)).to(at::kDouble);
  }
  p.t.push_back(T);
  p.terminal_cost = problem.terminal_cost(x).to(at::kDouble);
  return p;
}

Tensor log_importance_weights(const ControlledPaths& p) {
  // Girsanov: dP^{u*}/dP^u ∝ exp(-int (f + |u|^2/2) dt - g - int u . dB) (lambda = 1).
  return -(p.running_cost + p.terminal_cost) - p.noise_integral;
}

double control_objective(const ControlledPaths& p) { return (p.running_cost + p.terminal_cost).mean().item<double>(); }

namespace {
Tensor normalised_weights(const ControlledPaths& p) {
  const Tensor lw = log_importance_weights(p);
  const Tensor w = at::exp(lw - lw.max());
  return w / w.sum();
}
}  // namespace

double normalised_weight_std(const ControlledPaths& p) {
  const Tensor w = normalised_weights(p);
  return (w.std(/*unbiased=*/false) / w.mean()).item<double>();
}

namespace {
// sum_k sum_b w_b |u_k - u*(X_k, t_k)|^2 / K with self-normalised weights, u_k given by `control_at(k)`.
double weighted_control_error(const Problem& problem, const ControlledPaths& p,
                              const std::function<Tensor(int64_t)>& control_at) {
  at::NoGradGuard no_grad;
  const Tensor w = normalised_weights(p);
  const int64_t K = static_cast<int64_t>(p.u.size());
  double total = 0.0;
  for (int64_t k = 0; k < K; ++k) {
    const Tensor diff = control_at(k).to(at::kDouble) - problem.optimal_control(p.x[k], p.t[k]).to(at::kDouble);
    total += (w * diff.pow(2).sum(1)).sum().item<double>();
  }
  return total / static_cast<double>(K);
}
}  // namespace

double control_l2_error(const Problem& problem, const ControlledPaths& p, const Control& u) {
  return weighted_control_error(problem, p, [&](int64_t k) { return u(p.x[k], p.t[k]); });
}

double control_l2_error(const Problem& problem, const ControlledPaths& p) {
  return weighted_control_error(problem, p, [&](int64_t k) { return p.u[k]; });
}

Tensor socm_log_importance_weights(const Problem& problem, const ControlledPaths& p) {
  at::NoGradGuard no_grad;
  const int64_t K = static_cast<int64_t>(p.u.size());
  Tensor running = at::zeros_like(p.terminal_cost);
  for (int64_t k = 0; k < K; ++k) {
    const double h = p.t[k + 1] - p.t[k];
    const Tensor f_after = problem.state_cost(p.x[k + 1], p.t[k]).to(at::kDouble);  // SOCM: f(t_k, X_{k+1})
    running += (f_after + 0.5 * p.u[k].pow(2).sum(1)) * h * p.alive[k];
  }
  return -(running + p.terminal_cost) - p.noise_integral;
}

double socm_control_l2_error(const Problem& problem, const ControlledPaths& p, const Control& u, double log_normaliser) {
  at::NoGradGuard no_grad;
  if (!std::isfinite(log_normaliser)) throw Error("socm_control_l2_error: the log normaliser must be finite");
  const Tensor w = at::exp(socm_log_importance_weights(problem, p) - log_normaliser);
  const int64_t points = static_cast<int64_t>(p.x.size());  // K + 1: t_K = T included
  double total = 0.0;
  for (int64_t k = 0; k < points; ++k) {
    const Tensor diff = u(p.x[k], p.t[k]).to(at::kDouble) - problem.optimal_control(p.x[k], p.t[k]).to(at::kDouble);
    total += (w * diff.pow(2).sum(1)).sum().item<double>();
  }
  return total / static_cast<double>(points * w.size(0));
}

double socm_log_normaliser(const Problem& problem, int64_t batch, int64_t steps, Generator& gen) {
  if (batch < 1) throw Error("socm_log_normaliser: batch must be >= 1, got " + std::to_string(batch));
  const Control optimal = [&problem](const Tensor& x, double t) { return problem.optimal_control(x, t); };
  std::vector<Tensor> log_w;
  for (int64_t done = 0; done < batch;) {
    const int64_t n = std::min<int64_t>(4096, batch - done);
    log_w.push_back(socm_log_importance_weights(problem, simulate(problem, optimal, n, steps, gen)));
    done += n;
  }
  const Tensor all = at::cat(log_w);
  return (at::logsumexp(all, 0) - std::log(static_cast<double>(all.size(0)))).item<double>();
}

}  // namespace tilt::soc
