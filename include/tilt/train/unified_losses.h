// The loss family of the unified view of tilting (Domingo-Enrich, Du, Albergo 2026, "A unified perspective on
// fine-tuning and sampling with diffusion and flow models", arXiv 2605.00229; docs/equations.md, E110-E117):
// every loss below fine-tunes a base (velocity field v_base, schedule) towards p* ∝ p_base exp(lambda r) by
// training the model Adjoint Matching trains, a FineTunedVelocity v_theta, so that its result is sampled like AM's.
//
//   TSM   target score matching (De Bortoli et al. 2024, arXiv 2402.08667; E111): regress the tilted score onto
//         (1/alpha_t)(grad log p_base + lambda grad r)(X_1), x_t = alpha_t X_1 + beta_t X_0, X_1 ~ p*;
//   DSM   denoising (conditional) score matching (E112): the same regression onto -(x_t - alpha_t X_1) / beta_t^2;
//   NSM   tilted novel score matching (Phillips et al. 2024, PDDS, arXiv 2402.06320; E113): regress grad V_t onto
//         c_t lambda grad r(X_1), c_t the x_t-coefficient of the base posterior mean: only for a Gaussian base;
//   CMCD  the discrete path weight between the model's chain and the base's chain (Vargas et al. 2024, CMCD; E114),
//         in its KL form (reparametrised gradient through the rollout) and its log-variance form (detached paths);
//   NETS  the PINN residual of the escorted Jarzynski weight rate (Albergo & Vanden-Eijnden, arXiv 2410.02711;
//         E116), over a drift correction b_hat (the model's residual) and a learnt free energy F_t.
//
// Every regression is written in velocity space (E110): v_theta - v_base is regressed onto eta_t (Y - s_base(x_t))
// for a score target Y, or onto eta_t G for a target G of grad V, with v = kappa_t x + eta_t s (E7).
#pragma once

#include "tilt/model/finetuned.h"
#include "tilt/model/reward.h"
#include "tilt/schedule/noise_schedule.h"
#include "tilt/sde/sampler.h"
#include "tilt/soc/loss.h"

#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace tilt {

/// n draws of a law, [n, d] (exact samples of p* or of the base, for tests and for known laws).
using LawSampler = std::function<Tensor(int64_t n, Generator& gen)>;

struct UnifiedLossOptions {
  int64_t batch_size = 256;  ///< samples X_1 (TSM, DSM, NSM, NETS) or trajectories (CMCD) per compute()
  double lambda = 1.0;       ///< p* ∝ p_base exp(lambda r)
  int64_t num_steps = 40;    ///< K uniform Euler-Maruyama steps of the rollouts (CMCD; weighted samples of p*)
  /// TSM, DSM, NSM, NETS: times t ~ U[t_min, t_max] of the regression (TSM's target grows like 1/alpha_t^2 as
  /// t -> 0 and kappa_t x like 1/t: t_min keeps it finite).
  double t_min = 0.02;
  double t_max = 1.0;
  /// TSM, DSM, NSM: exact samples of p*. Null: the current model's rollouts, self-normalised-weighted by their
  /// path weights (E104, E115), whose fixed point is p*.
  LawSampler target_samples;
  /// TSM, DSM, NSM with weighted rollouts: the rollout's steps, Euler-Maruyama or the exact gDDIM step of the
  /// memoryless schedule (tilt/sde/gddim.h). The weighted law is the tilt of the base CHAIN's terminal law (E115), so
  /// the chain's own error becomes the target's: on narrow modes the exact step's chain is much nearer p_base at the
  /// same K (docs/method.md, "The ODE gap").
  Integrator rollout_integrator = Integrator::euler;
  /// TSM: grad log p_base at the data end, x [B, d] -> [B, d]. Null: the mixture's for a Gaussian-mixture base.
  std::function<Tensor(const Tensor&)> base_score;
  /// NETS: samples of the base, from which x_t = alpha_t X_1 + beta_t X_0 is drawn (the residual may be taken
  /// under any law). Null: the mixture's own samples, else rollouts of the base.
  LawSampler base_samples;
  /// NETS: the hidden widths of F_t's network and its seed.
  std::vector<int64_t> free_energy_hidden{32, 32};
  uint64_t seed = 0;
};

/// The x_t-coefficient of the posterior mean of a Gaussian base N(mu, Sigma) (E113):
///   E[X_1 | X_t = x] = mu + c_t (x - alpha_t mu),   c_t = alpha_t Sigma (alpha_t^2 Sigma + beta_t^2 I)^{-1},
/// per time of t [B] -> [B, d, d] (double). Sigma [d, d].
Tensor gaussian_posterior_coefficient(const Tensor& Sigma, const ScheduleTensors& s);

/// The three score-matching losses (E111-E113): which target.
enum class ScoreTarget { target, denoising, novel };

/// TSM, DSM or NSM, regressing the model's residual v_theta - v_base in velocity space (E110):
///   loss = sum_b wbar_b | (v_theta - v_base)(x_t, t) - D(x_t, t; X_1) |^2,   t ~ U[t_min, t_max],
///   x_t = alpha_t X_1 + beta_t X_0,   D = eta_t (Y - s_base(x_t)) (TSM, DSM),   D = eta_t c_t lambda grad r(X_1) (NSM),
/// wbar = 1/B with exact samples, else the self-normalised path weights of the model's rollouts (E115).
class TiltScoreMatching : public Loss {
 public:
  /// Throws tilt::Error: NSM with a base that is not one Gaussian (GmmVelocity with one component); TSM without a
  /// base score (no base_score and no mixture base); a reward of another dimension; t_min, t_max outside
  /// 0 < t_min < t_max <= 1.
  TiltScoreMatching(ScoreTarget target, std::shared_ptr<FineTunedVelocity> model, RewardPtr reward,
                    NoiseSchedulePtr noise, const UnifiedLossOptions& options);
  std::string name() const override;
  std::vector<Tensor> parameters() const override { return model_->parameters(); }
  LossOutput compute(Generator& gen) override;
  /// The options it was built with (the rollouts' steps and integrator among them).
  const UnifiedLossOptions& options() const { return options_; }
  int64_t batch_size() const override { return options_.batch_size; }
  void set_batch_size(int64_t n) override;

  /// The regression target D of v_theta - v_base at x_t = alpha_t x1 + beta_t x0, t [B] (see the class comment);
  /// v_base: the base's velocity there when the caller has it (else evaluated here).
  Tensor target_difference(const Tensor& x1, const Tensor& x0, const Tensor& t, const Tensor& v_base = Tensor()) const;
  /// B samples X_1 and their normalised weights wbar [B] (summing to 1): exact samples, or weighted rollouts.
  std::pair<Tensor, Tensor> terminal_samples(int64_t B, Generator& gen) const;

 private:
  ScoreTarget target_;
  std::shared_ptr<FineTunedVelocity> model_;
  RewardPtr reward_;
  NoiseSchedulePtr noise_;
  UnifiedLossOptions options_;
  std::function<Tensor(const Tensor&)> base_score_;
  Tensor sigma_, mu_;  // NSM: the Gaussian base
};

/// A rollout of the fine-tuned model's chain with what the path weight needs (E114).
struct TiltRollout {
  std::vector<Tensor> x;      ///< X_0..X_K
  std::vector<Tensor> xi;     ///< the noise of each step
  std::vector<Tensor> delta;  ///< (v_theta - v_base)(X_k, t_k)
  std::vector<Tensor> v_base; ///< v_base(X_k, t_k)
  Tensor log_w;               ///< lambda r(X_K) + log dP_base/dQ_model, [B] double (E114)
};

/// Rolls the model out from X_0 ~ N(0, I) with K steps of the noise schedule (Euler-Maruyama, or the exact gDDIM
/// step of a memoryless or scaled-memoryless schedule) and accumulates the discrete path weight against the base's
/// chain of the same kernels (E93, E114). Gradients flow through the states and the log weight unless the caller
/// disables them.
TiltRollout tilt_rollout(const std::shared_ptr<FineTunedVelocity>& model, const NoiseSchedulePtr& noise,
                         const Reward& reward, double lambda, int64_t steps, int64_t batch, Generator& gen,
                         Integrator integrator = Integrator::euler);

/// CMCD for tilting (E114): log w = lambda r(X_K) + sum_k (-d_k . xi_k - |d_k|^2 / 2), d_k = c_v,k (v_theta -
/// v_base)(X_k) / std_k, the Radon-Nikodym derivative of the tilted base chain against the model's chain.
///   KL:           loss = -mean_b log w_b, with the gradient through the rollout (reparametrised), = KL(Q || P*) - log Z;
///   log-variance: loss = Var_b(log w_b) on detached paths of the current model, log w re-evaluated in theta.
/// Both vanish in expected gradient at the control whose transitions are those of the tilted base chain, where
/// w = h_0(X_0) (constant when the base's X_0 is independent of X_K, as in the continuous memoryless case).
class TiltCmcd : public Loss {
 public:
  TiltCmcd(std::shared_ptr<FineTunedVelocity> model, RewardPtr reward, NoiseSchedulePtr noise,
           const UnifiedLossOptions& options, bool log_variance);
  std::string name() const override { return log_variance_ ? "cmcd_logvar" : "cmcd_kl"; }
  std::vector<Tensor> parameters() const override { return model_->parameters(); }
  LossOutput compute(Generator& gen) override;
  int64_t batch_size() const override { return options_.batch_size; }
  void set_batch_size(int64_t n) override;
  /// log w of a fresh batch of rollouts of the current model, [B] double, without gradients.
  Tensor log_weights(Generator& gen) const;

 private:
  std::shared_ptr<FineTunedVelocity> model_;
  RewardPtr reward_;
  NoiseSchedulePtr noise_;
  UnifiedLossOptions options_;
  bool log_variance_;
};

/// Tilted NETS (E116): the PINN residual of the escorted Jarzynski weight rate on the annealing path
/// r_t = t lambda r (so rho_t ∝ p_t exp(t lambda r), rho_1 = p*),
///   R(x, t) = lambda r(x) + v_t . t lambda grad r + div b_hat + b_hat . (s_t + t lambda grad r) - d_t F_t,
///   loss = mean_b R(x_t, t)^2,   t ~ U[t_min, t_max],   x_t = alpha_t X_1 + beta_t X_0,   X_1 ~ the base,
/// with b_hat = v_theta - v_base (the model's residual), v_t, s_t the base's velocity and score, div b_hat by
/// Hutchinson's estimator (one Rademacher probe per row) and F_t a network of t. At R = 0 the ODE of
/// v_base + b_hat transports rho_t, so the fine-tuned model sampled with the ODE (not the memoryless SDE) draws
/// p*, and F_1 - F_0 = log Z (E117).
class TiltNets : public Loss {
 public:
  /// free_energy: a field of dimension 1 read at x = 0 as F_t (differentiable in t); null: an MLP of t.
  TiltNets(std::shared_ptr<FineTunedVelocity> model, RewardPtr reward, const UnifiedLossOptions& options,
           VelocityFieldPtr free_energy = nullptr);
  std::string name() const override { return "nets"; }
  /// The model's, then F's.
  std::vector<Tensor> parameters() const override;
  LossOutput compute(Generator& gen) override;
  int64_t batch_size() const override { return options_.batch_size; }
  void set_batch_size(int64_t n) override;
  /// R(x, t) per row, t [B], with a Hutchinson probe drawn from gen; differentiable in the parameters.
  Tensor residual(const Tensor& x, const Tensor& t, Generator& gen) const;
  /// F_1 - F_0, the estimate of log Z.
  double log_z() const;

 private:
  std::shared_ptr<FineTunedVelocity> model_;
  RewardPtr reward_;
  UnifiedLossOptions options_;
  VelocityFieldPtr free_energy_;
};

}  // namespace tilt
