// Adjoint Sampling (Havens, Miller, Yan, Domingo-Enrich, ..., Chen; ICML 2025, arXiv 2504.11713):
// a diffusion sampler of pi ∝ exp(-E / tau) trained by Reciprocal Adjoint Matching (RAM) with a
// replay buffer. docs/equations.md, E59-E64; docs/adjoint_sampling.md.
//
// SOC problem. The Brownian base (sampling/brownian.h) from X_0 = 0 with terminal cost
//   g(x) = E(x) / tau + log p_1^base(x),
// so that the optimally controlled X_1 has law p_1^base exp(-g) / Z = pi. With no base drift the lean
// adjoint is constant in time, a(t) = grad g(X_1), and the optimal control (drift g(t)^2 u*) is
//   u*(t, x) = -E[grad g(X_1) | X_t = x]
// under the reciprocal process "X_1 ~ pi, X_t | X_1 a Brownian bridge from 0" (docs/equations.md, E62).
//
// RAM loss (docs/equations.md, E62; the "VE" parametrisation of adjoint_samplers' AdjointVEMatcher):
//   L(u) = E_{t ~ U[0,1], X_1 ~ buffer, X_t ~ bridge(0, X_1)} | u(X_t, t) + grad g(X_1) |^2,
// whose minimiser over u is the conditional expectation above once the buffer holds pi. The buffer is
// filled with samples of the current control: initial_samples drawn directly from p_1^base (the zero
// control's law, no simulation), then every refresh_every gradient steps samples_per_refresh new
// X_1 from an Euler-Maruyama simulation without autograd, each with one energy-gradient evaluation
// (as in Adjoint Sampling's code). So energy evaluations << gradient steps, the method's point.
//
// Adjoint clipping (docs/equations.md, E61): grad E / tau is clipped to norm max_adjoint_norm per particle (per sample
// without particles) before grad log p_1^base is added. For particle systems the adjoint, the noise
// and the states are kept centre-of-mass free.
//
// Importance weights (docs/equations.md, E63, [D]): the Euler-Maruyama step
// X_{k+1} = X_k + dnu_k u_k + sqrt(dnu_k) xi_k, dnu_k = nu_{t_{k+1}} - nu_{t_k}, has the base chain's
// exact transition (u = 0) with an equal covariance, so for any control and any step count
//   log w = -E(X_1) / tau - log p_1^base(X_1) - sum_k [ sqrt(dnu_k) u_k . xi_k + dnu_k |u_k|^2 / 2 ]
// has E[w] = int exp(-E / tau) dx = Z exactly (the base chain's X_1 is exactly p_1^base). log Z =
// log mean w, ESS = (sum w)^2 / sum w^2 (summarize_log_weights in sde/importance.h).
#pragma once

#include "tilt/sampling/brownian.h"
#include "tilt/sampling/energy.h"
#include "tilt/sampling/replay_buffer.h"
#include "tilt/soc/control.h"
#include "tilt/soc/loss.h"

#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace tilt::sampling {

/// Terminal samples of the controlled base and log dP/dQ of their paths (Q: the controlled chain,
/// P: the base chain), both double.
struct SamplerPaths {
  Tensor x1;        ///< [n, d]
  Tensor log_path;  ///< [n]
};

/// Where the sampler's steps fall: uniform in t, or uniform in nu_t (equal noise variance per step).
/// In the VE parametrisation the process is a Brownian motion in "nu-time" with drift u, so the
/// nu grid is the natural one; for the geometric schedule, whose variance arrives early, it is far
/// more accurate than the uniform one at equal cost (the constant schedule's two grids coincide).
enum class SamplerGrid { uniform, nu };
SamplerGrid parse_sampler_grid(const std::string& name);  // "uniform" | "nu"

/// The times t_0 = 0 < ... < t_K = 1 of a grid.
std::vector<double> sampler_times(const BrownianBase& base, int64_t steps, SamplerGrid grid);

/// n paths of the controlled Brownian base on `steps` steps of `grid`, without autograd (see the file
/// comment). control may be null (the base itself). progress(done, n) after each batch.
SamplerPaths simulate(const BrownianBase& base, const soc::ParametricControl* control, int64_t n, int64_t steps,
                      Generator& gen, SamplerGrid grid = SamplerGrid::nu, int64_t batch = 4096,
                      const std::function<void(int64_t, int64_t)>& progress = {});

/// log w of each path against the base chain (file comment): its mean estimates Z.
Tensor log_importance_weights(const Energy& energy, double tau, const BrownianBase& base, const SamplerPaths& paths);

/// grad g(x1) = clip(grad E / tau) + grad log p_1^base, centre-of-mass free for particle systems;
/// max_norm <= 0: no clipping. [B, d] double.
Tensor terminal_cost_grad(const Energy& energy, double tau, const BrownianBase& base, const Tensor& x1,
                          double max_norm);

struct AdjointSamplingOptions {
  double tau = 1.0;                  ///< temperature of the target exp(-E / tau)
  int64_t batch_size = 512;          ///< buffer items per gradient step
  int64_t steps = 100;               ///< Euler-Maruyama steps when generating new samples
  SamplerGrid grid = SamplerGrid::nu;///< where those steps fall
  int64_t initial_samples = 1024;    ///< drawn from p_1^base into the empty buffer
  int64_t samples_per_refresh = 256; ///< new samples of the current control per refresh
  int64_t refresh_every = 50;        ///< gradient steps between refreshes
  int64_t buffer_size = 5000;        ///< FIFO capacity (items)
  double max_adjoint_norm = 0;       ///< clip grad E / tau per particle (or per sample); <= 0: none
  /// The loss's times: t ~ U[0, 1] (adjoint_samplers' choice, the AM loss weighted by 1/g^2), or
  /// nu_t ~ U[0, nu_1] (the AM loss's own weight g(t)^2 dt = dnu). Both have the same minimiser.
  SamplerGrid time_sampling = SamplerGrid::uniform;
};

/// Reciprocal Adjoint Matching with a replay buffer (file comment), behind the Loss interface so that
/// the Trainer drives it. Metrics: energy_evaluations (so far), buffer (items), refresh_energy (mean
/// E of the last refresh's samples). The buffer and counters are part of state(), so a checkpoint
/// resumes exactly. It cannot draw its batch in shards.
class ReciprocalAdjointMatching : public Loss {
 public:
  ReciprocalAdjointMatching(EnergyPtr energy, BrownianBasePtr base, soc::ParametricControlPtr control,
                            const AdjointSamplingOptions& options);

  std::string name() const override { return "reciprocal_adjoint_matching"; }
  std::vector<Tensor> parameters() const override { return control_->parameters(); }
  LossOutput compute(Generator& gen) override;
  std::vector<std::pair<std::string, Tensor>> state() const override;
  void load_state(const std::vector<std::pair<std::string, Tensor>>& state) override;

  int64_t energy_evaluations() const { return energy_evaluations_; }
  int64_t gradient_steps() const { return calls_; }
  const ReplayBuffer& buffer() const { return buffer_; }

 private:
  void refresh(Generator& gen, bool initial);
  EnergyPtr energy_;
  BrownianBasePtr base_;
  soc::ParametricControlPtr control_;
  AdjointSamplingOptions options_;
  ReplayBuffer buffer_;
  int64_t calls_ = 0, energy_evaluations_ = 0;
  double refresh_energy_ = NAN;
  Tensor nu_times_;  // t on a fine grid uniform in nu (time_sampling = nu), for inverse-CDF draws
};

}  // namespace tilt::sampling
