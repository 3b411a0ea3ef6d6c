// Adjoint Sampling: the Brownian base, the replay buffer, the sampler with its importance weights, and
// the Reciprocal Adjoint Matching loss (see the headers for the formulas and their sources).
#include "tilt/sampling/adjoint_sampling.h"
#include "tilt/sampling/brownian.h"
#include "tilt/sampling/replay_buffer.h"

#include "tilt/core/check.h"
#include "tilt/core/error.h"
#include "tilt/sde/engine.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>  // at::NoGradGuard; not pulled in by ATen.h since LibTorch 2.0

#include <cmath>
#include <limits>
#include <sstream>
#include <utility>

namespace tilt::sampling {

std::string to_string(BrownianNoise noise) {
  switch (noise) {
    case BrownianNoise::geometric: return "geometric";
    case BrownianNoise::linear: return "linear";
    case BrownianNoise::constant: return "constant";
  }
  return "geometric";
}

BrownianNoise parse_brownian_noise(const std::string& name) {
  if (name == "geometric") return BrownianNoise::geometric;
  if (name == "linear") return BrownianNoise::linear;
  if (name == "constant") return BrownianNoise::constant;
  throw Error("unknown Brownian noise '" + name + "' (valid: geometric, linear, constant)");
}

// ---------------------------------------------------------------------------------------------------
// Brownian base

BrownianBase::BrownianBase(const BrownianOptions& o, int64_t dim, int64_t particles)
    : options_(o), dim_(dim), particles_(particles) {
  if (dim < 1) throw Error("brownian base: dim must be >= 1");
  if (particles < 0 || (particles > 0 && (particles < 2 || dim % particles != 0))) {
    throw Error("brownian base: " + std::to_string(particles) + " particles do not divide dimension " +
                std::to_string(dim) + " (need >= 2 particles, or 0 for none)");
  }
  switch (o.noise) {
    case BrownianNoise::geometric:
      if (!(o.sigma_min > 0) || !(o.sigma_max > o.sigma_min)) {
        throw Error("brownian base: the geometric schedule needs sigma_max > sigma_min > 0");
      }
      break;
    case BrownianNoise::linear:
      if (!(o.sigma_max > 0) || !(o.sigma_min >= 0)) {
        throw Error("brownian base: the linear schedule needs sigma_max > 0 and sigma_min >= 0");
      }
      break;
    case BrownianNoise::constant:
      if (!(o.sigma > 0)) throw Error("brownian base: the constant schedule needs sigma > 0");
      break;
  }
}

int64_t BrownianBase::free_dim() const { return particles_ > 0 ? dim_ - dim_ / particles_ : dim_; }

std::string BrownianBase::describe() const {
  std::ostringstream s;
  switch (options_.noise) {
    case BrownianNoise::geometric: s << "geometric(sigma_max=" << options_.sigma_max << ", sigma_min=" << options_.sigma_min << ")"; break;
    case BrownianNoise::linear: s << "linear(sigma_max=" << options_.sigma_max << ", sigma_min=" << options_.sigma_min << ")"; break;
    case BrownianNoise::constant: s << "constant(sigma=" << options_.sigma << ")"; break;
  }
  return s.str();
}

double BrownianBase::g(double t) const {
  const BrownianOptions& o = options_;
  switch (o.noise) {
    case BrownianNoise::geometric: {
      // docs/equations.md, E59: g(t) = s_min (s_max / s_min)^(1 - t) sqrt(2 ln(s_max / s_min)).
      const double r = o.sigma_max / o.sigma_min;
      return o.sigma_min * std::pow(r, 1.0 - t) * std::sqrt(2.0 * std::log(r));
    }
    case BrownianNoise::linear: return o.sigma_max + (o.sigma_min - o.sigma_max) * t;
    case BrownianNoise::constant: return o.sigma;
  }
  return 0.0;
}

double BrownianBase::nu(double t) const {
  const BrownianOptions& o = options_;
  switch (o.noise) {
    case BrownianNoise::geometric: {
      // int_0^t g^2 = s_min^2 2 ln r int_0^t r^(2 - 2s) ds = s_max^2 (1 - r^(-2t)).
      const double r = o.sigma_max / o.sigma_min;
      return o.sigma_max * o.sigma_max * -std::expm1(-2.0 * t * std::log(r));
    }
    case BrownianNoise::linear: {
      const double delta = o.sigma_min - o.sigma_max;
      if (std::abs(delta) < 1e-12 * o.sigma_max) return o.sigma_max * o.sigma_max * t;
      const double gt = o.sigma_max + delta * t;
      return (gt * gt * gt - o.sigma_max * o.sigma_max * o.sigma_max) / (3.0 * delta);
    }
    case BrownianNoise::constant: return o.sigma * o.sigma * t;
  }
  return 0.0;
}

Tensor BrownianBase::nu(const Tensor& t) const {
  // nu() above, elementwise.
  const BrownianOptions& o = options_;
  switch (o.noise) {
    case BrownianNoise::geometric:
      return o.sigma_max * o.sigma_max * -at::expm1(-2.0 * std::log(o.sigma_max / o.sigma_min) * t);
    case BrownianNoise::linear: {
      const double delta = o.sigma_min - o.sigma_max;
      if (std::abs(delta) < 1e-12 * o.sigma_max) return o.sigma_max * o.sigma_max * t;
      return ((o.sigma_max + delta * t).pow(3) - std::pow(o.sigma_max, 3)) / (3.0 * delta);
    }
    case BrownianNoise::constant: return o.sigma * o.sigma * t;
  }
  return t;
}

Tensor BrownianBase::project(const Tensor& x) const { return remove_center_of_mass(x, particles_); }

Tensor BrownianBase::noise(int64_t n, Generator& gen, at::ScalarType dtype) const {
  // The projection of a standard normal onto a subspace is a standard normal of the subspace.
  return project(at::randn({n, dim_}, gen, at::TensorOptions().dtype(dtype)));
}

Tensor BrownianBase::bridge(const Tensor& x1, const Tensor& t, Generator& gen) const {
  check_batch(x1, dim_, "brownian bridge: x1");
  check_time(t, x1.size(0), "brownian bridge: t");
  // X_t | X_0 = 0, X_1 ~ N((nu_t / nu_1) X_1, nu_t (nu_1 - nu_t) / nu_1 I) (docs/equations.md, E60).
  const Tensor nu_t = nu(t.to(at::kDouble).reshape({-1}).expand({x1.size(0)})).unsqueeze(1);
  const double n1 = nu1();
  const Tensor mean = (nu_t / n1) * x1.to(at::kDouble);
  const Tensor std = at::sqrt(at::clamp_min(nu_t * (n1 - nu_t) / n1, 0.0));
  return (mean + std * noise(x1.size(0), gen)).to(x1.scalar_type());
}

Tensor BrownianBase::sample_p1(int64_t n, Generator& gen, at::ScalarType dtype) const {
  return (std::sqrt(nu1()) * noise(n, gen)).to(dtype);
}

Tensor BrownianBase::log_p1(const Tensor& x) const {
  check_batch(x, dim_, "log p_1^base: x");
  const double n1 = nu1();
  const Tensor xd = project(x.to(at::kDouble));
  return -xd.pow(2).sum(1) / (2.0 * n1) - 0.5 * static_cast<double>(free_dim()) * std::log(2.0 * M_PI * n1);
}

Tensor BrownianBase::grad_log_p1(const Tensor& x) const {
  check_batch(x, dim_, "grad log p_1^base: x");
  return -project(x.to(at::kDouble)) / nu1();
}

// ---------------------------------------------------------------------------------------------------
// Replay buffer

ReplayBuffer::ReplayBuffer(int64_t capacity, int64_t dim) : capacity_(capacity), dim_(dim) {
  if (capacity < 1) throw Error("replay buffer: capacity must be >= 1");
  x1_ = at::empty({0, dim}, at::kDouble);
  adjoint_ = at::empty({0, dim}, at::kDouble);
}

int64_t ReplayBuffer::size() const { return x1_.size(0); }

void ReplayBuffer::push(const Tensor& x1, const Tensor& adjoint) {
  check_batch(x1, dim_, "replay buffer: x1");
  check_batch(adjoint, dim_, "replay buffer: adjoint");
  if (x1.size(0) != adjoint.size(0)) throw Error("replay buffer: x1 and adjoint have different numbers of rows");
  x1_ = at::cat({x1_, x1.to(at::kDouble)});
  adjoint_ = at::cat({adjoint_, adjoint.to(at::kDouble)});
  if (size() > capacity_) {  // FIFO: the oldest rows go
    x1_ = x1_.narrow(0, size() - capacity_, capacity_).clone();
    adjoint_ = adjoint_.narrow(0, adjoint_.size(0) - capacity_, capacity_).clone();
  }
}

std::pair<Tensor, Tensor> ReplayBuffer::sample(int64_t n, Generator& gen) const {
  if (size() == 0) throw Error("replay buffer: cannot sample from an empty buffer");
  const Tensor idx = at::randint(0, size(), {n}, gen, at::kLong);
  return {x1_.index_select(0, idx), adjoint_.index_select(0, idx)};
}

void ReplayBuffer::restore(const Tensor& x1, const Tensor& adjoint) {
  check_batch(x1, dim_, "replay buffer (restored): x1");
  check_batch(adjoint, dim_, "replay buffer (restored): adjoint");
  if (x1.size(0) != adjoint.size(0) || x1.size(0) > capacity_) {
    throw Error("replay buffer: the restored contents have " + std::to_string(x1.size(0)) + " / " +
                std::to_string(adjoint.size(0)) + " rows for a capacity of " + std::to_string(capacity_));
  }
  x1_ = x1.to(at::kDouble).clone();
  adjoint_ = adjoint.to(at::kDouble).clone();
}

// ---------------------------------------------------------------------------------------------------
// Sampler and importance weights

SamplerGrid parse_sampler_grid(const std::string& name) {
  if (name == "uniform") return SamplerGrid::uniform;
  if (name == "nu") return SamplerGrid::nu;
  throw Error("unknown sampler grid '" + name + "' (valid: uniform, nu)");
}

std::vector<double> sampler_times(const BrownianBase& base, int64_t steps, SamplerGrid grid) {
  if (steps < 1) throw Error("adjoint sampling: needs at least one step");
  std::vector<double> t(static_cast<size_t>(steps) + 1);
  const double n1 = base.nu1();
  for (int64_t k = 0; k <= steps; ++k) {
    const double frac = static_cast<double>(k) / static_cast<double>(steps);
    if (grid == SamplerGrid::uniform || k == 0 || k == steps) {
      t[static_cast<size_t>(k)] = frac;
      continue;
    }
    // nu is increasing: bisection for nu(t) = frac nu_1.
    double lo = 0.0, hi = 1.0;
    for (int it = 0; it < 100; ++it) {
      const double mid = 0.5 * (lo + hi);
      (base.nu(mid) < frac * n1 ? lo : hi) = mid;
    }
    t[static_cast<size_t>(k)] = 0.5 * (lo + hi);
  }
  return t;
}

SamplerPaths simulate(const BrownianBase& base, const soc::ParametricControl* control, int64_t n, int64_t steps,
                      Generator& gen, SamplerGrid grid, int64_t batch,
                      const std::function<void(int64_t, int64_t)>& progress) {
  if (n < 1 || steps < 1 || batch < 1) throw Error("adjoint sampling: simulate needs n, steps and batch >= 1");
  if (control && control->dim() != base.dim()) {
    throw Error("adjoint sampling: the control has dimension " + std::to_string(control->dim()) + ", the base " +
                std::to_string(base.dim()));
  }
  at::NoGradGuard no_grad;
  std::vector<Tensor> xs, logs;
  const int64_t d = base.dim();
  const std::vector<double> times = sampler_times(base, steps, grid);
  std::vector<double> nus(static_cast<size_t>(steps) + 1);
  for (int64_t k = 0; k <= steps; ++k) nus[static_cast<size_t>(k)] = base.nu(times[static_cast<size_t>(k)]);
  for (int64_t done = 0; done < n;) {
    const int64_t B = std::min(batch, n - done);
    Tensor x = at::zeros({B, d}, at::kDouble);
    PathWeight weight(B);
    for (int64_t k = 0; k < steps; ++k) {
      // X_{k+1} = X_k + dnu_k u_k + sqrt(dnu_k) xi_k: the base's exact transition plus the control's
      // drift int g^2 u dt ~ dnu_k u(X_k, t_k) (Euler-Maruyama in the control, exact in the noise): the
      // kernel {1, dnu_k, sqrt(dnu_k)} applied to u, whose mean differs from the base's by dnu_k u.
      const double t = times[static_cast<size_t>(k)];
      const double dnu = nus[static_cast<size_t>(k) + 1] - nus[static_cast<size_t>(k)];
      const StepKernel q{1.0, dnu, std::sqrt(dnu)};
      const Tensor xi = base.noise(B, gen);
      if (control) {
        const Tensor u = base.project((*control)(x, t).to(at::kDouble));
        weight.add_step(dnu * u, xi, q.std);  // log dP/dQ of one step (docs/equations.md, E63)
        x = q.next(x, u, xi);
      } else {
        x = at::add(x, xi, q.std);
      }
    }
    xs.push_back(base.project(x));
    logs.push_back(weight.log_weight());
    done += B;
    if (progress) progress(done, n);
  }
  return {at::cat(xs), at::cat(logs)};
}

Tensor log_importance_weights(const Energy& energy, double tau, const BrownianBase& base, const SamplerPaths& paths) {
  if (!(tau > 0)) throw Error("importance weights: the temperature must be > 0");
  // log w = -E / tau - log p_1^base + log dP/dQ (docs/equations.md, E63): E_Q[w] = int exp(-E / tau)
  // over the state space.
  return -energy.energy(paths.x1) / tau - base.log_p1(paths.x1) + paths.log_path;
}

Tensor terminal_cost_grad(const Energy& energy, double tau, const BrownianBase& base, const Tensor& x1,
                          double max_norm) {
  Tensor ge = energy.grad(x1) / tau;
  if (max_norm > 0) {
    // Clip grad E / tau to norm max_norm per particle (adjoint_samplers' clipper; docs/equations.md, E61),
    // or per sample.
    const int64_t B = ge.size(0), P = std::max<int64_t>(energy.particles(), 1);
    const Tensor v = ge.reshape({B, P, -1});
    const Tensor scale = at::clamp_max(max_norm / at::clamp_min(v.norm(2, {2}, /*keepdim=*/true), 1e-300), 1.0);
    ge = (v * scale).reshape({B, -1});
  }
  // grad g = grad E / tau + grad log p_1^base (docs/equations.md, E61), centre-of-mass free.
  return base.project(ge + base.grad_log_p1(x1));
}

// ---------------------------------------------------------------------------------------------------
// Reciprocal Adjoint Matching

ReciprocalAdjointMatching::ReciprocalAdjointMatching(EnergyPtr energy, BrownianBasePtr base,
                                                     soc::ParametricControlPtr control,
                                                     const AdjointSamplingOptions& options)
    : energy_(std::move(energy)), base_(std::move(base)), control_(std::move(control)), options_(options),
      buffer_(std::max<int64_t>(options.buffer_size, 1), energy_ ? energy_->dim() : 1) {
  if (!energy_ || !base_ || !control_) throw Error("adjoint sampling: needs an energy, a base and a control");
  if (energy_->dim() != base_->dim() || control_->dim() != base_->dim()) {
    throw Error("adjoint sampling: the energy (d = " + std::to_string(energy_->dim()) + "), the base (d = " +
                std::to_string(base_->dim()) + ") and the control (d = " + std::to_string(control_->dim()) +
                ") must have one dimension");
  }
  if (energy_->particles() != base_->particles()) {
    throw Error("adjoint sampling: the base must be centre-of-mass free exactly when the energy has particles");
  }
  const AdjointSamplingOptions& o = options_;
  if (!(o.tau > 0)) throw Error("adjoint sampling: tau must be > 0");
  if (o.batch_size < 1 || o.steps < 1 || o.initial_samples < 1 || o.samples_per_refresh < 1 || o.refresh_every < 1 ||
      o.buffer_size < 1) {
    throw Error("adjoint sampling: batch_size, steps, initial_samples, samples_per_refresh, refresh_every and "
                "buffer_size must be >= 1");
  }
  if (o.time_sampling == SamplerGrid::nu) nu_times_ = at::tensor(sampler_times(*base_, 4096, SamplerGrid::nu), at::kDouble);
}

void ReciprocalAdjointMatching::refresh(Generator& gen, bool initial) {
  at::NoGradGuard no_grad;
  // The buffer: the first samples come straight from p_1^base (the zero control's law); later ones from the
  // current control. One energy-gradient evaluation per new sample.
  const Tensor x1 = initial ? base_->sample_p1(options_.initial_samples, gen)
                            : simulate(*base_, control_.get(), options_.samples_per_refresh, options_.steps, gen, options_.grid).x1;
  const Tensor adjoint = terminal_cost_grad(*energy_, options_.tau, *base_, x1, options_.max_adjoint_norm);
  if (!at::isfinite(adjoint).all().item<bool>()) {
    throw NonFiniteError("adjoint sampling: a new sample's adjoint grad g(X_1) is not finite (the control diverged?); "
                         "try a lower lr or max_adjoint_norm");
  }
  refresh_energy_ = energy_->energy(x1).mean().item<double>();
  energy_evaluations_ += x1.size(0);
  buffer_.push(x1, adjoint);
}

LossOutput ReciprocalAdjointMatching::compute(Generator& gen) {
  if (buffer_.size() == 0) {
    refresh(gen, /*initial=*/true);
  } else if (calls_ > 0 && calls_ % options_.refresh_every == 0) {
    refresh(gen, /*initial=*/false);
  }
  ++calls_;
  const int64_t B = options_.batch_size;
  auto [x1, adjoint] = buffer_.sample(B, gen);
  Tensor t = at::rand({B}, gen, at::kDouble);
  if (nu_times_.defined()) {
    // nu_t uniform: t = nu^{-1}(U nu_1), linear between the 4097 tabulated points.
    const int64_t G = nu_times_.size(0) - 1;
    const Tensor pos = t * static_cast<double>(G);
    const Tensor i = at::clamp(pos.floor().to(at::kLong), 0, G - 1);
    const Tensor t0 = nu_times_.index_select(0, i), t1 = nu_times_.index_select(0, i + 1);
    t = t0 + (pos - i.to(at::kDouble)) * (t1 - t0);
  }
  const Tensor xt = base_->bridge(x1, t, gen);
  // RAM (docs/equations.md, E62): | u(X_t, t) + grad g(X_1) |^2, the control's centre-of-mass part projected out.
  const Tensor u = base_->project(control_->evaluate(xt, t));
  LossOutput out;
  out.loss = (u + adjoint).pow(2).sum(1).mean();
  out.metrics = {{"energy_evaluations", static_cast<double>(energy_evaluations_)},
                 {"buffer", static_cast<double>(buffer_.size())},
                 {"refresh_energy", refresh_energy_}};
  return out;
}

std::vector<std::pair<std::string, Tensor>> ReciprocalAdjointMatching::state() const {
  return {{"buffer_x1", buffer_.x1()},
          {"buffer_adjoint", buffer_.adjoint()},
          {"counters", at::tensor(std::vector<int64_t>{calls_, energy_evaluations_}, at::kLong)},
          {"refresh_energy", at::scalar_tensor(refresh_energy_, at::kDouble)}};
}

void ReciprocalAdjointMatching::load_state(const std::vector<std::pair<std::string, Tensor>>& state) {
  Tensor x1, adjoint, counters, energy;
  for (const auto& [key, value] : state) {
    if (key == "buffer_x1") x1 = value;
    else if (key == "buffer_adjoint") adjoint = value;
    else if (key == "counters") counters = value;
    else if (key == "refresh_energy") energy = value;
  }
  if (!x1.defined() || !adjoint.defined() || !counters.defined() || counters.numel() != 2 || !energy.defined()) {
    throw Error("adjoint sampling: the checkpoint's loss state is incomplete");
  }
  buffer_.restore(x1, adjoint);
  calls_ = counters[0].item<int64_t>();
  energy_evaluations_ = counters[1].item<int64_t>();
  refresh_energy_ = energy.item<double>();
}

}  // namespace tilt::sampling
