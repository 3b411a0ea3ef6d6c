// Importance weights for any control (discrete Girsanov), the effective sample size, and estimators
// of the normalising constant Z = E_{p_base}[exp(lambda r(X_1))] of the tilted target
// p* = p_base exp(lambda r) / Z (docs/equations.md, E18 and E55-E58).
//
// Girsanov. The base chain P draws X_0 ~ N(0, I) and steps X_{k+1} = m_p(X_k) + std_k xi_k with the
// base velocity (Euler-Maruyama or the exact gDDIM step); the proposal Q is the same chain with a
// control, m_q = m_p + Delta_k, and the same std_k. Along a path drawn from Q,
//
//   log dP/dQ = sum_k [ -Delta_k . xi_k / std_k - |Delta_k|^2 / (2 std_k^2) ],
//   log w     = lambda r(X_K) + log dP/dQ,                 E_Q[w] = E_{P}[exp(lambda r(X_K))],
//
// exactly, for any control and any step size: the ratio of two Gaussian kernels of equal covariance.
// For Euler-Maruyama Delta_k / std_k = sqrt(h_k) u(X_k, t_k), the discrete form of
// exp(-int u dB - 1/2 int |u|^2 dt). With the zero control the weight is exp(lambda r(X_K)); with
// the optimal control u* = sigma grad log h (memoryless schedule) it is the constant Z in continuous
// time. What the identity estimates is the expectation under the *discretised* base chain, whose
// law at t = 1 differs from p_base by the sampler's O(1/K) error (docs/sampling.md measures it).
//
// A step whose std is 0 is only allowed last (the exact step onto t = 1 for gamma > 0): both chains
// take the base's deterministic step there (X_K = x1^ of the base, as Adjoint Matching's final
// noiseless step), so the identity still holds and the control has no say on it.
//
// Against the exact noising process (needs the base's density). The O(1/K) error above disappears
// if the reference is not the discretised generative chain but the exact noising chain of p_base:
// X_K ~ p_base, then backwards X_k | X_{k+1} ~ N((alpha_k / alpha_{k+1}) X_{k+1}, (beta_k^2 -
// (alpha_k beta_{k+1} / alpha_{k+1})^2) I), the Markov chain whose marginals are exactly
// p_{t_k} (the gamma = 1 kernel of tilt/sde/gddim.h, reversed). For any Gaussian proposal kernels q_k,
//   log w = log p_base(X_K) + lambda r(X_K) + sum_k log n_k(X_k | X_{k+1}) - log N(X_0; 0, I) - sum_k log q_k(X_{k+1} | X_k)
// has E_Q[w] = Z exactly, at every K (the path density of the tilted noising chain integrates to Z).
// A deterministic last step (exact step, gamma > 0) is replaced by N(x1^, (beta/alpha)^2 I) at
// t_{K-1}, the reversal of the last noising kernel for a locally flat p_base.
//
// Escorted Jarzynski (docs/equations.md, E57, b^ = 0; derived by Feynman-Kac, checked here by Monte Carlo): run
//   dX = [b + (sigma^2 / 2) grad r_t] dt + sigma dB,   r_t = t lambda r,
// and accumulate the work A = int_0^1 [d_t r_t + v . grad r_t](X_t) dt with v the base velocity;
// then E[exp(A)] = Z and exp(A) weights the paths towards p*. Needs a noise schedule that keeps the
// marginals exactly (h = 0): constant:<sigma> or the ODE (sigma = 0: A = lambda r(X_1) up to
// discretisation, the push-forward reweighting).
#pragma once

#include "tilt/model/reward.h"
#include "tilt/sde/sampler.h"

#include <functional>

namespace tilt {

/// A control u(x, t): [B, d] -> [B, d].
using ControlFn = std::function<Tensor(const Tensor& x, double t)>;

/// The velocity v_q = v_base + sigma u / c_v whose generative SDE under `noise` is the controlled
/// one, dX = (b_base + sigma u) dt + sigma dB. Conversely u = c_v (v_q - v_base) / sigma (for the
/// memoryless schedule u = (2 / sigma)(v_q - v_base); docs/equations.md, E21).
class ControlledVelocity : public VelocityField {
 public:
  ControlledVelocity(VelocityFieldPtr base, NoiseSchedulePtr noise, ControlFn u);
  std::string kind() const override { return "controlled"; }
  int64_t dim() const override { return base_->dim(); }
  using VelocityField::velocity;
  /// t must be one time for the batch (0-dim).
  Tensor velocity(const Tensor& x, const Tensor& t) const override;
  at::Device device() const override { return base_->device(); }

 private:
  VelocityFieldPtr base_;
  NoiseSchedulePtr noise_;
  ControlFn u_;
};

/// The control of a velocity v_q under base's noise schedule, times `scale`:
/// u = scale c_v (v_q - v_base) / sigma (0 where sigma = 0). scale = 1 reproduces v_q; scale = 0 is
/// the zero control; for v_q the velocity of p*, other scales give deliberately wrong controls.
ControlFn control_of(const GenerativeSDE& base, VelocityFieldPtr v_q, double scale = 1.0);

/// v_base + scale (v_q - v_base): the velocity whose control is `scale` times v_q's (u is linear in
/// v - v_base), without evaluating v_base twice as ControlledVelocity(base, noise, control_of(...)) does.
class ScaledControlVelocity : public VelocityField {
 public:
  ScaledControlVelocity(VelocityFieldPtr base, VelocityFieldPtr v_q, double scale);
  std::string kind() const override { return "scaled_control"; }
  int64_t dim() const override { return base_->dim(); }
  using VelocityField::velocity;
  Tensor velocity(const Tensor& x, const Tensor& t) const override;
  at::Device device() const override { return v_q_->device(); }

 private:
  VelocityFieldPtr base_, v_q_;
  double scale_;
};

struct ImportanceOptions {
  Integrator integrator = Integrator::euler;  ///< euler or exact (heun has no path density)
  int64_t batch = 8192;                       ///< paths simulated at once
  at::ScalarType dtype = at::kFloat;          ///< of the states; weights are accumulated in double
  /// Called after each batch with (paths done, total).
  std::function<void(int64_t, int64_t)> progress;
};

/// n paths with their weights; every tensor has n rows, weights and rewards in double.
struct WeightedPaths {
  Tensor x;         ///< X_1, [n, d]
  Tensor reward;    ///< r(X_1), [n]
  Tensor log_path;  ///< log w - lambda r(X_1): log dP/dQ (Girsanov), the path-density ratio against the noising
                    ///< chain (log p_base(X_1) included), or the Jarzynski work minus lambda r(X_1); [n]
  Tensor log_w;     ///< lambda r(X_1) + log_path, [n]
};

/// Paths of the proposal (`proposal`'s velocity under base's noise schedule) on `grid`, weighted
/// against the base chain (see the file comment). Throws tilt::Error for a step with no noise
/// before the last, a proposal of another dimension, or an integrator without path density.
WeightedPaths girsanov_weights(const GenerativeSDE& base, const VelocityField& proposal, const Reward& reward,
                               double lambda, int64_t n, const TimeGrid& grid, Generator& gen,
                               const ImportanceOptions& options = {});

/// log p_base(x), [B] (e.g. GaussianMixture::log_prob).
using LogDensityFn = std::function<Tensor(const Tensor& x)>;

/// Paths of `proposal` (a velocity under a noise schedule, stepped by options.integrator) weighted
/// against the exact noising chain of p_base (see the file comment): unbiased for Z at every K.
WeightedPaths noising_weights(const GenerativeSDE& proposal, const LogDensityFn& log_p_base, const Reward& reward,
                              double lambda, int64_t n, const TimeGrid& grid, Generator& gen,
                              const ImportanceOptions& options = {});

/// Escorted Jarzynski paths and work (see the file comment), Euler-Maruyama on `grid`. Throws
/// tilt::Error unless base's noise schedule has offset h = 0 (constant:<sigma> or the ODE).
WeightedPaths jarzynski_weights(const GenerativeSDE& base, const Reward& reward, double lambda, int64_t n,
                                const TimeGrid& grid, Generator& gen, const ImportanceOptions& options = {});

/// What a set of log-weights says.
struct WeightSummary {
  int64_t n = 0;
  double log_z = 0;               ///< log mean w
  double standard_error = 0;      ///< of log_z, by the delta method: sqrt((n / ess - 1) / (n - 1))
  double ess = 0;                 ///< effective sample size (sum w)^2 / sum w^2, in [1, n]
  double ess_fraction = 0;        ///< ess / n
  double mean_reward = 0;         ///< of the paths as drawn, sum r / n
  double weighted_mean_reward = 0;///< self-normalised estimate of E_{p*}[r]: sum w r / sum w
};
WeightSummary summarize_weights(const WeightedPaths& paths);
/// From log-weights alone (mean rewards left at 0).
WeightSummary summarize_log_weights(const Tensor& log_w);

}  // namespace tilt
