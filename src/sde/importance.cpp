#include "tilt/sde/importance.h"

#include "tilt/core/check.h"
#include "tilt/core/error.h"
#include "tilt/sde/engine.h"
#include "tilt/sde/gddim.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <cmath>

namespace tilt {

ControlledVelocity::ControlledVelocity(VelocityFieldPtr base, NoiseSchedulePtr noise, ControlFn u)
    : VelocityField(base ? base->schedule() : nullptr), base_(std::move(base)), noise_(std::move(noise)), u_(std::move(u)) {
  if (!base_ || !noise_ || !u_) throw Error("controlled velocity: base, noise schedule and control are required");
}

Tensor ControlledVelocity::velocity(const Tensor& x, const Tensor& t) const {
  if (t.dim() != 0) throw Error("controlled velocity: t must be one time for the batch, got " + shape_string(t));
  const double tt = t.item<double>();
  const Tensor v = base_->velocity(x, t);
  const double sigma = noise_->sigma(*schedule(), tt);
  if (sigma == 0.0) return v;  // no noise: a control cannot act (and u would be unbounded)
  return v + (sigma / noise_->drift(*schedule(), tt).c_v) * u_(x, tt).to(x.scalar_type());
}

ScaledControlVelocity::ScaledControlVelocity(VelocityFieldPtr base, VelocityFieldPtr v_q, double scale)
    : VelocityField(base ? base->schedule() : nullptr), base_(std::move(base)), v_q_(std::move(v_q)), scale_(scale) {
  if (!base_ || !v_q_) throw Error("scaled control: base and controlled velocity are required");
  if (v_q_->dim() != base_->dim()) {
    throw Error("scaled control: the base has dimension " + std::to_string(base_->dim()) + ", the controlled velocity " +
                std::to_string(v_q_->dim()));
  }
}

Tensor ScaledControlVelocity::velocity(const Tensor& x, const Tensor& t) const {
  if (scale_ == 1.0) return v_q_->velocity(x, t);
  const Tensor v = base_->velocity(x, t);
  if (scale_ == 0.0) return v;
  return v + scale_ * (v_q_->velocity(x, t) - v);
}

ControlFn control_of(const GenerativeSDE& base, VelocityFieldPtr v_q, double scale) {
  if (!v_q) throw Error("control_of: no velocity field");
  const VelocityFieldPtr v_base = base.velocity_ptr();
  const NoiseSchedulePtr noise = base.noise_ptr();
  return [v_base, v_q, noise, scale](const Tensor& x, double t) {
    const double sigma = noise->sigma(*v_base->schedule(), t);
    if (sigma == 0.0) return at::zeros_like(x);
    const double c_v = noise->drift(*v_base->schedule(), t).c_v;
    return (scale * c_v / sigma) * (v_q->velocity(x, t) - v_base->velocity(x, t));
  };
}

namespace {

// The batches of endpoints and log path weights joined, with r(X1) and log w = lambda r + log path.
WeightedPaths assemble_paths(const Reward& reward, double lambda, const std::vector<Tensor>& xs,
                             const std::vector<Tensor>& log_paths) {
  WeightedPaths out;
  out.x = at::cat(xs);
  out.reward = reward.value(out.x.to(at::kDouble));
  out.log_path = at::cat(log_paths);
  out.log_w = lambda * out.reward + out.log_path;
  return out;
}

void check_integrator(const ImportanceOptions& options, const char* what) {
  if (options.integrator == Integrator::heun) {
    throw Error(std::string(what) + ": the heun integrator is deterministic and has no path density; use euler or exact");
  }
  if (options.batch < 1) throw Error(std::string(what) + ": batch must be >= 1");
}

}  // namespace

WeightedPaths girsanov_weights(const GenerativeSDE& base, const VelocityField& proposal, const Reward& reward,
                               double lambda, int64_t n, const TimeGrid& grid, Generator& gen,
                               const ImportanceOptions& options) {
  check_integrator(options, "importance weights");
  if (n < 1) throw Error("importance weights: n must be >= 1");
  if (proposal.dim() != base.dim() || reward.dim() != base.dim()) {
    throw Error("importance weights: the base has dimension " + std::to_string(base.dim()) + ", the proposal " +
                std::to_string(proposal.dim()) + " and the reward " + std::to_string(reward.dim()));
  }
  const int64_t K = grid.steps();
  const std::vector<StepKernel> kernels = step_kernels(base, grid, options.integrator);
  for (int64_t k = 0; k < K; ++k) {
    if (kernels[k].deterministic() && k + 1 < K) {
      throw Error("importance weights need noise on every step but a final deterministic one; step " + std::to_string(k) +
                  " (t = " + std::to_string(grid[k]) + ") has none with " + base.noise().describe() +
                  " (the ODE has no path density: use a stochastic schedule)");
    }
  }
  at::NoGradGuard no_grad;
  const auto opts = at::TensorOptions().dtype(options.dtype).device(base.velocity().device());
  std::vector<Tensor> xs, log_paths;
  for (int64_t done = 0; done < n;) {
    const int64_t B = std::min(options.batch, n - done);
    Tensor x = normal_draws({B, base.dim()}, gen, opts);
    PathWeight weight(B);
    for (int64_t k = 0; k < K; ++k) {
      const StepKernel& q = kernels[static_cast<size_t>(k)];
      const Tensor v_p = base.velocity().velocity(x, grid[k]);
      if (q.deterministic()) {  // the final deterministic step: the base's, for both chains
        x = q.mean(x, v_p);
        continue;
      }
      // Q's step is P's kernel applied to the proposal's velocity: the means differ by c_v (v_q - v_p).
      const Tensor v_q = proposal.velocity(x, grid[k]);
      const Tensor xi = normal_draws({B, base.dim()}, gen, opts);
      x = q.next(x, v_q, xi);
      weight.add_step(q.c_v * (v_q - v_p), xi, q.std);
    }
    xs.push_back(x);
    log_paths.push_back(weight.log_weight());
    done += B;
    if (options.progress) options.progress(done, n);
  }
  return assemble_paths(reward, lambda, xs, log_paths);
}

namespace {

// sum over coordinates of log N(x; m, s^2 I), in double.
Tensor gaussian_log_density(const Tensor& x, const Tensor& m, double s) {
  const Tensor z = (x.to(at::kDouble) - m.to(at::kDouble)) / s;
  return -0.5 * (z * z).sum(1) - static_cast<double>(x.size(1)) * (std::log(s) + 0.5 * std::log(2.0 * M_PI));
}

}  // namespace

WeightedPaths noising_weights(const GenerativeSDE& proposal, const LogDensityFn& log_p_base, const Reward& reward,
                              double lambda, int64_t n, const TimeGrid& grid, Generator& gen,
                              const ImportanceOptions& options) {
  check_integrator(options, "importance weights");
  if (n < 1) throw Error("importance weights: n must be >= 1");
  if (!log_p_base) throw Error("importance weights against the noising chain need the base's log-density");
  if (reward.dim() != proposal.dim()) {
    throw Error("importance weights: the proposal has dimension " + std::to_string(proposal.dim()) + ", the reward " +
                std::to_string(reward.dim()));
  }
  if (grid[0] != 0.0 || grid[grid.steps()] != 1.0) throw Error("importance weights: the grid must run from 0 to 1");
  const Schedule& sch = proposal.schedule();
  const int64_t K = grid.steps();
  std::vector<StepKernel> kernels = step_kernels(proposal, grid, options.integrator);
  std::vector<double> back_mean, back_std;  // noising kernel n_k: mean (alpha_k / alpha_{k+1}) x_{k+1}, std
  for (int64_t k = 0; k < K; ++k) {
    StepKernel& q = kernels[static_cast<size_t>(k)];
    const ScheduleValues a = sch.at(grid[k]), b = sch.at(grid[k + 1]);
    if (q.std == 0.0) {
      if (k + 1 < K || !(a.alpha > 0.0)) {
        throw Error("importance weights need noise on every step but a final one; step " + std::to_string(k) + " (t = " +
                    std::to_string(grid[k]) + ") has none with " + proposal.noise().describe());
      }
      q.std = a.beta / a.alpha;  // x_K ~ N(x1^, (beta/alpha)^2 I): the flat-prior reversal of n_{K-1}
    }
    const double ratio = a.alpha / b.alpha;
    back_mean.push_back(ratio);
    back_std.push_back(std::sqrt(std::max(0.0, a.beta * a.beta - std::pow(ratio * b.beta, 2))));
    if (!(back_std.back() > 0.0)) {
      throw Error("importance weights: the noising kernel of the " + sch.name() + " schedule is degenerate on step " +
                  std::to_string(k));
    }
  }
  at::NoGradGuard no_grad;
  const auto opts = at::TensorOptions().dtype(options.dtype).device(proposal.velocity().device());
  std::vector<Tensor> xs, log_paths;
  for (int64_t done = 0; done < n;) {
    const int64_t B = std::min(options.batch, n - done);
    Tensor x = normal_draws({B, proposal.dim()}, gen, opts);
    Tensor log_path = -gaussian_log_density(x, at::zeros_like(x), 1.0);  // - log N(X_0; 0, I)
    for (int64_t k = 0; k < K; ++k) {
      const StepKernel& q = kernels[static_cast<size_t>(k)];
      const Tensor m = q.mean(x, proposal.velocity().velocity(x, grid[k]));
      const Tensor x_next = m + q.std * normal_draws({B, proposal.dim()}, gen, opts);
      log_path = log_path - gaussian_log_density(x_next, m, q.std) +
                 gaussian_log_density(x, back_mean[static_cast<size_t>(k)] * x_next.to(at::kDouble), back_std[static_cast<size_t>(k)]);
      x = x_next;
    }
    log_paths.push_back(log_path + log_p_base(x.to(at::kDouble)).to(at::kDouble));
    xs.push_back(x);
    done += B;
    if (options.progress) options.progress(done, n);
  }
  return assemble_paths(reward, lambda, xs, log_paths);
}

WeightedPaths jarzynski_weights(const GenerativeSDE& base, const Reward& reward, double lambda, int64_t n,
                                const TimeGrid& grid, Generator& gen, const ImportanceOptions& options) {
  check_integrator(options, "Jarzynski weights");
  if (options.integrator != Integrator::euler) throw Error("Jarzynski weights: only the euler integrator is implemented");
  if (n < 1) throw Error("Jarzynski weights: n must be >= 1");
  if (reward.dim() != base.dim()) {
    throw Error("Jarzynski weights: the base has dimension " + std::to_string(base.dim()) + ", the reward " +
                std::to_string(reward.dim()));
  }
  if (base.noise().h() != 0.0) {
    throw Error("Jarzynski weights need a noise schedule that keeps the marginals exactly (offset h = 0: constant:<sigma> "
                "or ode), not " + base.noise().describe());
  }
  at::NoGradGuard no_grad;
  const auto opts = at::TensorOptions().dtype(options.dtype).device(base.velocity().device());
  std::vector<Tensor> xs, works;
  for (int64_t done = 0; done < n;) {
    const int64_t B = std::min(options.batch, n - done);
    Tensor x = normal_draws({B, base.dim()}, gen, opts);
    Tensor work = at::zeros({B}, opts.dtype(at::kDouble));
    for (int64_t k = 0; k < grid.steps(); ++k) {
      // r_t = tau(t) lambda r with tau(t) = t: d_t r_t = lambda r, grad r_t = t lambda grad r.
      const double t = grid[k], h = grid.step(k), sigma = base.sigma(t);
      const Tensor v = base.velocity().velocity(x, t);
      const Tensor xd = x.to(at::kDouble);
      const Tensor grad_r = reward.grad(xd);
      work = work + h * lambda * (reward.value(xd) + t * (v.to(at::kDouble) * grad_r).sum(1));
      const Tensor escort = (0.5 * sigma * sigma * t * lambda) * grad_r.to(options.dtype);
      const StepKernel q = euler_kernel(base, t, grid[k + 1]);
      x = q.next(x, v, q.deterministic() ? Tensor() : normal_draws({B, base.dim()}, gen, opts)) + h * escort;
    }
    xs.push_back(x);
    works.push_back(work);
    done += B;
    if (options.progress) options.progress(done, n);
  }
  WeightedPaths out;
  out.x = at::cat(xs);
  out.reward = reward.value(out.x.to(at::kDouble));
  const Tensor work = at::cat(works);
  out.log_w = work;
  out.log_path = work - lambda * out.reward;
  return out;
}

WeightSummary summarize_log_weights(const Tensor& log_w) {
  if (log_w.dim() != 1 || log_w.size(0) < 2) throw Error("weight summary: needs a 1-D tensor of at least 2 log-weights");
  const Tensor lw = log_w.to(at::kDouble);
  if (!at::isfinite(lw).all().item<bool>()) throw Error("weight summary: a log-weight is not finite");
  WeightSummary s;
  s.n = lw.size(0);
  const double nd = static_cast<double>(s.n);
  const double lse = at::logsumexp(lw, 0).item<double>();
  const double lse2 = at::logsumexp(2.0 * lw, 0).item<double>();
  s.log_z = lse - std::log(nd);
  s.ess = std::exp(2.0 * lse - lse2);
  s.ess_fraction = s.ess / nd;
  s.standard_error = std::sqrt(std::max(0.0, nd / s.ess - 1.0) / (nd - 1.0));
  return s;
}

WeightSummary summarize_weights(const WeightedPaths& paths) {
  WeightSummary s = summarize_log_weights(paths.log_w);
  s.mean_reward = paths.reward.mean().item<double>();
  s.weighted_mean_reward = (at::softmax(paths.log_w.to(at::kDouble), 0) * paths.reward).sum().item<double>();
  return s;
}

}  // namespace tilt
