// Targets for sampling unnormalised densities: energies with analytic gradients and their ground
// truths, the MALA / parallel-tempering reference sampler, and the sample metrics.
#include "tilt/sampling/energy.h"
#include "tilt/sampling/mcmc.h"
#include "tilt/sampling/sample_metrics.h"

#include "tilt/core/check.h"
#include "tilt/core/error.h"
#include "tilt/model/gmm.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>  // at::NoGradGuard; not pulled in by ATen.h since LibTorch 2.0

#include <algorithm>
#include <cmath>

namespace tilt::sampling {

namespace {
Tensor as_double(const Tensor& x, int64_t dim, const std::string& what) {
  check_batch(x, dim, what);
  return x.to(at::kDouble);
}
}  // namespace

// ---------------------------------------------------------------------------------------------------
// Energy defaults

Tensor Energy::sample_exact(int64_t, double tau, Generator&) const {
  throw Error("the " + name() + " energy has no exact sampler at temperature " + std::to_string(tau));
}

Tensor Energy::mode_of(const Tensor&) const { throw Error("the " + name() + " energy has no mode labels"); }

// ---------------------------------------------------------------------------------------------------
// Gaussian: E = |x - m|^2 / (2 s^2), grad E = (x - m) / s^2, Z(tau) = (2 pi s^2 tau)^(d/2).

GaussianEnergy::GaussianEnergy(std::vector<double> mean, double std) : mean_(std::move(mean)), std_(std) {
  if (mean_.empty()) throw Error("gaussian energy: the mean must have at least one coordinate");
  if (!(std_ > 0)) throw Error("gaussian energy: std must be > 0");
}

Tensor GaussianEnergy::energy(const Tensor& x) const {
  const Tensor xd = as_double(x, dim(), "gaussian energy: x");
  return (xd - at::tensor(mean_, at::kDouble)).pow(2).sum(1) / (2.0 * std_ * std_);
}

Tensor GaussianEnergy::grad(const Tensor& x) const {
  const Tensor xd = as_double(x, dim(), "gaussian energy: x");
  return (xd - at::tensor(mean_, at::kDouble)) / (std_ * std_);
}

double GaussianEnergy::exact_log_z(double tau) const {
  return 0.5 * static_cast<double>(dim()) * std::log(2.0 * M_PI * std_ * std_ * tau);
}

Tensor GaussianEnergy::sample_exact(int64_t n, double tau, Generator& gen) const {
  return at::tensor(mean_, at::kDouble) + std_ * std::sqrt(tau) * at::randn({n, dim()}, gen, at::kDouble);
}

// ---------------------------------------------------------------------------------------------------
// Gaussian mixture: E = -log p.

MixtureEnergy::MixtureEnergy(std::shared_ptr<const GaussianMixture> mixture) : mixture_(std::move(mixture)) {
  if (!mixture_) throw Error("gmm energy: no mixture");
}
int64_t MixtureEnergy::dim() const { return mixture_->dim(); }
int64_t MixtureEnergy::modes() const { return mixture_->components(); }

Tensor MixtureEnergy::energy(const Tensor& x) const {
  return -mixture_->log_prob(as_double(x, dim(), "gmm energy: x")).to(at::kDouble);
}

Tensor MixtureEnergy::grad(const Tensor& x) const {
  return -mixture_->score(as_double(x, dim(), "gmm energy: x")).to(at::kDouble);
}

Tensor MixtureEnergy::sample_exact(int64_t n, double tau, Generator& gen) const {
  if (tau != 1.0) return Energy::sample_exact(n, tau, gen);
  return mixture_->sample(n, gen, at::kDouble);
}

Tensor MixtureEnergy::mode_of(const Tensor& x) const {
  // The component of largest posterior responsibility: argmax_k log w_k + log N(x; mu_k, Sigma_k).
  const Tensor xd = as_double(x, dim(), "gmm energy: x");
  const Tensor prec = at::linalg_inv(mixture_->covariances());               // [K, d, d]
  const Tensor logdet = std::get<1>(at::linalg_slogdet(mixture_->covariances()));  // [K]
  const Tensor diff = xd.unsqueeze(1) - mixture_->means().unsqueeze(0);      // [B, K, d]
  const Tensor maha = (diff.unsqueeze(2).matmul(prec.unsqueeze(0)).squeeze(2) * diff).sum(2);  // [B, K]
  const Tensor score = mixture_->weights().log().unsqueeze(0) - 0.5 * maha - 0.5 * logdet.unsqueeze(0);
  return score.argmax(1);
}

std::vector<double> MixtureEnergy::exact_mode_weights(double tau) const {
  if (tau != 1.0) return {};
  const Tensor w = mixture_->weights().to(at::kDouble).contiguous();
  return std::vector<double>(w.data_ptr<double>(), w.data_ptr<double>() + w.numel());
}

// ---------------------------------------------------------------------------------------------------
// Double well: f(y) = a y^4 - b y^2 + c y on the first `wells` coordinates, y^2 / 2 on the others.

namespace {
double well(const DoubleWellOptions& o, double y) { return o.a * std::pow(y, 4) - o.b * y * y + o.c * y; }
double well_slope(const DoubleWellOptions& o, double y) { return 4.0 * o.a * y * y * y - 2.0 * o.b * y + o.c; }
}  // namespace

DoubleWellEnergy::DoubleWellEnergy(const DoubleWellOptions& o) : options_(o) {
  if (o.dim < 1) throw Error("double well: dim must be >= 1");
  if (o.wells < 1 || o.wells > o.dim) throw Error("double well: wells must be in [1, dim]");
  if (!(o.a > 0)) throw Error("double well: a must be > 0 (else exp(-E) is not integrable)");
  // The barrier: where f' turns from + to - (the local maximum between the wells); 0 if f has one well.
  barrier_ = 0.0;
  const double L = 2.0 * std::sqrt(std::max(o.b, 0.0) / o.a) + 1.0;
  const int G = 20000;
  for (int i = 0; i < G; ++i) {
    const double y0 = -L + 2.0 * L * i / G, y1 = -L + 2.0 * L * (i + 1) / G;
    if (well_slope(o, y0) > 0 && well_slope(o, y1) <= 0) {
      // bisection to machine precision
      double lo = y0, hi = y1;
      for (int k = 0; k < 60; ++k) {
        const double mid = 0.5 * (lo + hi);
        (well_slope(o, mid) > 0 ? lo : hi) = mid;
      }
      barrier_ = 0.5 * (lo + hi);
      break;
    }
  }
}

Tensor DoubleWellEnergy::energy(const Tensor& x) const {
  const Tensor xd = as_double(x, dim(), "double well: x");
  const DoubleWellOptions& o = options_;
  const Tensor y = xd.narrow(1, 0, o.wells);
  Tensor e = (o.a * y.pow(4) - o.b * y.pow(2) + o.c * y).sum(1);
  if (o.wells < o.dim) e = e + 0.5 * xd.narrow(1, o.wells, o.dim - o.wells).pow(2).sum(1);
  return e;
}

Tensor DoubleWellEnergy::grad(const Tensor& x) const {
  const Tensor xd = as_double(x, dim(), "double well: x");
  const DoubleWellOptions& o = options_;
  Tensor g = xd.clone();  // the Gaussian coordinates: grad = y
  const Tensor y = xd.narrow(1, 0, o.wells);
  g.narrow(1, 0, o.wells).copy_(4.0 * o.a * y.pow(3) - 2.0 * o.b * y + o.c);
  return g;
}

DoubleWellEnergy::Quadrature DoubleWellEnergy::quadrature(double tau) const {
  if (!(tau > 0)) throw Error("double well: the temperature must be > 0");
  const DoubleWellOptions& o = options_;
  // The range: both tails at least 60 tau above the minimum (exp(-60) ~ 1e-26 of the mass).
  double L = 2.0 * std::sqrt(std::max(o.b, 0.0) / o.a) + 1.0;
  const double fmin_guess = std::min({well(o, -L / 2), well(o, L / 2), well(o, barrier_), 0.0,
                                      well(o, -std::sqrt(std::max(o.b, 0.0) / (2 * o.a))),
                                      well(o, std::sqrt(std::max(o.b, 0.0) / (2 * o.a)))});
  while (std::min(well(o, -L), well(o, L)) - fmin_guess < 60.0 * tau) L *= 1.25;
  const int64_t G = 200001;
  const Tensor y = at::linspace(-L, L, G, at::kDouble);
  const Tensor f = o.a * y.pow(4) - o.b * y.pow(2) + o.c * y;
  const double fmin = f.min().item<double>();
  const Tensor p = at::exp(-(f - fmin) / tau);
  const double dy = 2.0 * L / static_cast<double>(G - 1);
  // Cumulative trapezoid integral of exp(-(f - fmin) / tau).
  Tensor cdf = at::zeros({G}, at::kDouble);
  cdf.narrow(0, 1, G - 1).copy_(at::cumsum(0.5 * dy * (p.narrow(0, 0, G - 1) + p.narrow(0, 1, G - 1)), 0));
  Quadrature q;
  q.y = y;
  q.cdf = cdf;
  q.log_scale = -fmin / tau;  // int exp(-f / tau) = cdf[G - 1] exp(log_scale)
  return q;
}

double DoubleWellEnergy::exact_log_z(double tau) const {
  const Quadrature q = quadrature(tau);
  const double log_z1 = std::log(q.cdf[-1].item<double>()) + q.log_scale;
  return static_cast<double>(options_.wells) * log_z1 +
         0.5 * static_cast<double>(options_.dim - options_.wells) * std::log(2.0 * M_PI * tau);
}

Tensor DoubleWellEnergy::sample_exact(int64_t n, double tau, Generator& gen) const {
  const Quadrature q = quadrature(tau);
  const DoubleWellOptions& o = options_;
  Tensor x = std::sqrt(tau) * at::randn({n, o.dim}, gen, at::kDouble);
  // Inverse CDF of each well coordinate, linear within a grid cell.
  const double total = q.cdf[-1].item<double>();
  const Tensor u = at::rand({n, o.wells}, gen, at::kDouble) * total;
  const int64_t G = q.y.size(0);
  const Tensor idx = at::clamp(at::searchsorted(q.cdf, u) - 1, 0, G - 2);  // cdf[idx] <= u < cdf[idx + 1]
  const Tensor c0 = q.cdf.index_select(0, idx.reshape({-1})).reshape(idx.sizes());
  const Tensor c1 = q.cdf.index_select(0, (idx + 1).reshape({-1})).reshape(idx.sizes());
  const Tensor y0 = q.y.index_select(0, idx.reshape({-1})).reshape(idx.sizes());
  const double dy = (q.y[1] - q.y[0]).item<double>();
  const Tensor frac = at::clamp((u - c0) / at::clamp_min(c1 - c0, 1e-300), 0.0, 1.0);
  x.narrow(1, 0, o.wells).copy_(y0 + frac * dy);
  return x;
}

Tensor DoubleWellEnergy::mode_of(const Tensor& x) const {
  const Tensor xd = as_double(x, dim(), "double well: x");
  return (xd.select(1, 0) > barrier_).to(at::kLong);
}

std::vector<double> DoubleWellEnergy::exact_mode_weights(double tau) const {
  const Quadrature q = quadrature(tau);
  const double total = q.cdf[-1].item<double>();
  // cdf at the barrier, interpolated linearly in the grid
  const double L = -q.y[0].item<double>(), dy = (q.y[1] - q.y[0]).item<double>();
  const double pos = (barrier_ + L) / dy;
  const int64_t i = std::clamp<int64_t>(static_cast<int64_t>(std::floor(pos)), 0, q.y.size(0) - 2);
  const double c = q.cdf[i].item<double>() + (pos - static_cast<double>(i)) * (q.cdf[i + 1] - q.cdf[i]).item<double>();
  return {c / total, 1.0 - c / total};
}

// ---------------------------------------------------------------------------------------------------
// DW-n: E = sum_{i<j} a (d_ij - d0)^4 + b (d_ij - d0)^2,
// grad_{x_i} E = sum_{j != i} [4 a (d_ij - d0)^3 + 2 b (d_ij - d0)] (x_i - x_j) / d_ij.

MultiDoubleWellEnergy::MultiDoubleWellEnergy(const MultiDoubleWellOptions& o) : options_(o) {
  if (o.particles < 2) throw Error("multi double well: needs at least 2 particles");
  if (o.spatial_dim < 1) throw Error("multi double well: spatial_dim must be >= 1");
}

Tensor MultiDoubleWellEnergy::energy(const Tensor& x) const {
  const Tensor r = interparticle_distances(as_double(x, dim(), "dw energy: x"), options_.particles) - options_.offset;
  return (options_.a * r.pow(4) + options_.b * r.pow(2)).sum(1);
}

Tensor MultiDoubleWellEnergy::grad(const Tensor& x) const {
  const Tensor xd = as_double(x, dim(), "dw energy: x");
  const int64_t n = options_.particles, D = options_.spatial_dim, B = xd.size(0);
  const Tensor p = xd.view({B, n, D});
  const Tensor diff = p.unsqueeze(2) - p.unsqueeze(1);          // [B, n, n, D]: x_i - x_j
  const Tensor eye = at::eye(n, at::kDouble);
  const Tensor dist = diff.pow(2).sum(3).add(eye).sqrt();       // the diagonal's 1 avoids 0 / 0
  const Tensor r = dist - options_.offset;
  const Tensor dphi = (4.0 * options_.a * r.pow(3) + 2.0 * options_.b * r) * (1.0 - eye) / dist;  // [B, n, n]
  return (dphi.unsqueeze(3) * diff).sum(2).reshape({B, n * D});
}

Tensor interparticle_distances(const Tensor& x, int64_t particles) {
  if (particles < 2 || x.dim() != 2 || x.size(1) % particles != 0) {
    throw Error("interparticle distances: x must be [B, particles * D] with particles >= 2, got " + shape_string(x) +
                " for " + std::to_string(particles) + " particles");
  }
  const int64_t B = x.size(0), D = x.size(1) / particles;
  const Tensor p = x.to(at::kDouble).view({B, particles, D});
  const Tensor ij = at::triu_indices(particles, particles, 1, at::kLong);
  const Tensor diff = p.index_select(1, ij[0]) - p.index_select(1, ij[1]);  // [B, P, D]
  return diff.pow(2).sum(2).sqrt();
}

Tensor remove_center_of_mass(const Tensor& x, int64_t particles) {
  if (particles <= 0) return x;
  if (x.dim() != 2 || x.size(1) % particles != 0) {
    throw Error("centre of mass: x must be [B, particles * D], got " + shape_string(x) + " for " +
                std::to_string(particles) + " particles");
  }
  const int64_t B = x.size(0), D = x.size(1) / particles;
  const Tensor p = x.reshape({B, particles, D});
  return (p - p.mean(1, /*keepdim=*/true)).reshape({B, particles * D});
}

// ---------------------------------------------------------------------------------------------------
// MALA with parallel tempering (see mcmc.h).

MalaResult run_mala(const Energy& energy, double tau, const MalaOptions& o, Generator& gen,
                    const std::function<void(int64_t, int64_t)>& progress) {
  if (!(tau > 0)) throw Error("mala: the temperature must be > 0");
  if (o.chains < 1 || o.steps < 1 || o.burn_in < 0 || o.thin < 1) {
    throw Error("mala: needs chains >= 1, steps >= 1, burn_in >= 0, thin >= 1");
  }
  if (!(o.step_size > 0) || !(o.init_std > 0)) throw Error("mala: step_size and init_std must be > 0");
  std::vector<double> ladder = o.temperatures.empty() ? std::vector<double>{1.0} : o.temperatures;
  if (ladder[0] != 1.0) throw Error("mala: the first temperature of the ladder must be 1 (the target)");
  for (size_t i = 1; i < ladder.size(); ++i) {
    if (!(ladder[i] > ladder[i - 1])) throw Error("mala: the temperatures must increase");
  }
  at::NoGradGuard no_grad;
  const int64_t T = static_cast<int64_t>(ladder.size()), C = o.chains, d = energy.dim(), N = T * C;
  const int64_t particles = energy.particles();
  auto project = [&](const Tensor& v) { return remove_center_of_mass(v, particles); };
  // Row r belongs to temperature r / C.
  std::vector<double> temps(static_cast<size_t>(N));
  for (int64_t r = 0; r < N; ++r) temps[static_cast<size_t>(r)] = tau * ladder[static_cast<size_t>(r / C)];
  const Tensor temp = at::tensor(temps, at::kDouble).unsqueeze(1);  // [N, 1]
  std::vector<double> log_h(static_cast<size_t>(T), std::log(o.step_size));
  auto h_rows = [&] {
    Tensor h = at::empty({N, 1}, at::kDouble);
    for (int64_t r = 0; r < N; ++r) h[r][0] = std::exp(log_h[static_cast<size_t>(r / C)]);
    return h;
  };
  Tensor h = h_rows();

  Tensor x = project(o.init_std * at::randn({N, d}, gen, at::kDouble));
  Tensor E = energy.energy(x), G = energy.grad(x);
  std::vector<double> accepted(static_cast<size_t>(T), 0.0), swaps(static_cast<size_t>(std::max<int64_t>(T - 1, 0)), 0.0),
      swap_tries(swaps.size(), 0.0);
  std::vector<Tensor> kept;
  const int64_t total = o.burn_in + o.steps;
  for (int64_t step = 0; step < total; ++step) {
    const bool burning = step < o.burn_in;
    const Tensor mean_x = x - h * G / temp;
    const Tensor y = project(mean_x + at::sqrt(2.0 * h) * project(at::randn({N, d}, gen, at::kDouble)));
    const Tensor Ey = energy.energy(y), Gy = energy.grad(y);
    const Tensor mean_y = y - h * Gy / temp;
    const Tensor hv = h.squeeze(1), tv = temp.squeeze(1);
    const Tensor log_q_back = -(x - mean_y).pow(2).sum(1) / (4.0 * hv);
    const Tensor log_q_fwd = -(y - mean_x).pow(2).sum(1) / (4.0 * hv);
    Tensor log_alpha = -(Ey - E) / tv + log_q_back - log_q_fwd;
    log_alpha = at::where(at::isfinite(log_alpha), log_alpha, at::full_like(log_alpha, -INFINITY));
    const Tensor accept = at::log(at::rand({N}, gen, at::kDouble)) < log_alpha;
    x = at::where(accept.unsqueeze(1), y, x);
    E = at::where(accept, Ey, E);
    G = at::where(accept.unsqueeze(1), Gy, G);
    const Tensor acc_rate = accept.to(at::kDouble).view({T, C}).mean(1);
    for (int64_t k = 0; k < T; ++k) {
      const double a = acc_rate[k].item<double>();
      if (burning) {
        // Robbins-Monro on log h towards acceptance 0.574 (Roberts and Rosenthal 1998), with a decaying gain.
        log_h[static_cast<size_t>(k)] += (a - 0.574) * 2.0 / std::pow(1.0 + static_cast<double>(step), 0.6);
      } else {
        accepted[static_cast<size_t>(k)] += a;
      }
    }
    if (burning) h = h_rows();
    // Swaps between neighbouring temperatures (even pairs on even steps, odd pairs on odd steps).
    for (int64_t k = step % 2; k + 1 < T; k += 2) {
      const Tensor Ei = E.narrow(0, k * C, C), Ej = E.narrow(0, (k + 1) * C, C);
      const double bi = 1.0 / (tau * ladder[static_cast<size_t>(k)]), bj = 1.0 / (tau * ladder[static_cast<size_t>(k + 1)]);
      const Tensor sw = at::log(at::rand({C}, gen, at::kDouble)) < (Ei - Ej) * (bi - bj);
      if (!burning) {
        swaps[static_cast<size_t>(k)] += sw.to(at::kDouble).mean().item<double>();
        swap_tries[static_cast<size_t>(k)] += 1.0;
      }
      const Tensor swc = sw.unsqueeze(1);
      for (Tensor* t : {&x, &G}) {
        const Tensor a = t->narrow(0, k * C, C).clone(), b = t->narrow(0, (k + 1) * C, C).clone();
        t->narrow(0, k * C, C).copy_(at::where(swc, b, a));
        t->narrow(0, (k + 1) * C, C).copy_(at::where(swc, a, b));
      }
      const Tensor a = Ei.clone(), b = Ej.clone();
      E.narrow(0, k * C, C).copy_(at::where(sw, b, a));
      E.narrow(0, (k + 1) * C, C).copy_(at::where(sw, a, b));
    }
    if (!burning && (step - o.burn_in + 1) % o.thin == 0) kept.push_back(x.narrow(0, 0, C).clone());
    if (progress && (step % 200 == 0 || step + 1 == total)) progress(step + 1, total);
  }
  MalaResult out;
  out.samples = kept.empty() ? at::empty({0, d}, at::kDouble) : at::cat(kept);
  for (int64_t k = 0; k < T; ++k) {
    out.acceptance.push_back(accepted[static_cast<size_t>(k)] / static_cast<double>(o.steps));
    out.step_sizes.push_back(std::exp(log_h[static_cast<size_t>(k)]));
  }
  for (size_t k = 0; k < swaps.size(); ++k) out.swap_rates.push_back(swap_tries[k] > 0 ? swaps[k] / swap_tries[k] : 0.0);
  return out;
}

// ---------------------------------------------------------------------------------------------------
// Metrics

double w2_1d(const Tensor& a, const Tensor& b) {
  if (a.numel() < 1 || b.numel() < 1) throw Error("w2: both samples must be non-empty");
  const Tensor sa = std::get<0>(a.reshape({-1}).to(at::kDouble).sort()).contiguous();
  const Tensor sb = std::get<0>(b.reshape({-1}).to(at::kDouble).sort()).contiguous();
  const double* pa = sa.data_ptr<double>();
  const double* pb = sb.data_ptr<double>();
  const int64_t n = sa.numel(), m = sb.numel();
  // The quantile functions are step functions with steps at i/n and j/m: integrate their squared
  // difference piece by piece (in integer units of 1/(n m) to avoid rounding in the breakpoints).
  int64_t i = 0, j = 0, u = 0;
  double sum = 0.0;
  while (i < n && j < m) {
    const int64_t next_a = (i + 1) * m, next_b = (j + 1) * n;
    const int64_t next = std::min(next_a, next_b);
    const double diff = pa[i] - pb[j];
    sum += diff * diff * static_cast<double>(next - u);
    u = next;
    if (next_a == next) ++i;
    if (next_b == next) ++j;
  }
  return std::sqrt(sum / (static_cast<double>(n) * static_cast<double>(m)));
}

double energy_w2(const Energy& energy, const Tensor& x, const Tensor& y) {
  return w2_1d(energy.energy(x), energy.energy(y));
}

double distance_w2(const Tensor& x, const Tensor& y, int64_t particles) {
  return w2_1d(interparticle_distances(x, particles), interparticle_distances(y, particles));
}

std::vector<double> mode_weights(const Energy& energy, const Tensor& x, const Tensor& log_w) {
  const int64_t K = energy.modes();
  if (K == 0) return {};
  const Tensor mode = energy.mode_of(x);
  Tensor w = log_w.defined() ? at::softmax(log_w.to(at::kDouble), 0) : at::full({x.size(0)}, 1.0 / static_cast<double>(x.size(0)), at::kDouble);
  const Tensor sums = at::zeros({K}, at::kDouble).index_add_(0, mode, w);
  std::vector<double> out(static_cast<size_t>(K));
  for (int64_t k = 0; k < K; ++k) out[static_cast<size_t>(k)] = sums[k].item<double>();
  return out;
}

}  // namespace tilt::sampling
