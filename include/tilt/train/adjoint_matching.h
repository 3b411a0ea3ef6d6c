// Adjoint Matching: reward fine-tuning as memoryless stochastic optimal control.
//
// Implements Domingo-Enrich, Drozdzal, Karrer, Chen, "Adjoint Matching" (ICLR 2025,
// arXiv 2409.08861), Algorithm 1 (Sec. 5.2, Eq. 40-42) with the practical recipe of App. G;
// docs/equations.md, E22-E28. Notation:
//   X_k        state at t_k of the fine-tuned SDE  dX = (c_v v_theta - c_x X) dt + sigma dB
//   a_k        lean adjoint a~(t_k); a_K = grad g(X^_1) = -lambda grad r(X^_1)
//   u          control (c_v / sigma)(v_theta - v_base); memoryless: (2 / sigma)(v_theta - v_base)
// Trajectories are sampled without gradients; the lean adjoint runs backwards through the FROZEN
// base drift by vector-Jacobian products:  a_k = a_{k+1} + h_k (grad_x b_base(X_k, t_k))^T a_{k+1}.
//
// Loss: v_theta is regressed onto v_base - rho_k a_k (docs/equations.md, E25: "v_base - eta_t a~"), with
// rho = sigma^2 / c_v of the EXACT schedule (h = 0; memoryless: rho = eta_t), each term weighted
// as in |u + sigma a|^2:
//   loss = sum over chosen k of min(LCT, |(c_v / sigma)(v_theta - v_base + rho_k a_k)|^2), batch mean.
// With h = 0 this is exactly sum |u + sigma a|^2. With the paper's offset h > 0, sigma_h and
// kappa_h only regularise the simulation; using sigma_h in the target as well would make v_theta
// converge to v_base - eta_h a~, a velocity field off by eta_h / eta near t = 0 and t = 1 (up to a
// factor 2 at the last step), which the ODE sampler exposes. Steps whose exact target is infinite
// (t = 0 for the memoryless schedule: eta_0 = inf, a_0 = 0) are left out of the loss.
#pragma once

#include "tilt/model/condition.h"
#include "tilt/model/finetuned.h"
#include "tilt/model/reward.h"
#include "tilt/schedule/noise_schedule.h"
#include "tilt/sde/engine.h"
#include "tilt/sde/sampler.h"
#include "tilt/soc/loss.h"

#include <memory>
#include <vector>

namespace tilt {

struct AdjointMatchingOptions {
  int64_t num_steps = 40;        ///< K uniform steps on [0, 1]
  int64_t batch_size = 40;       ///< trajectories per iteration
  double lambda = 1.0;           ///< reward multiplier: p* ∝ p_base exp(lambda r)
  int64_t loss_early_steps = 10; ///< drawn without replacement from the steps before the last ones
  int64_t loss_late_steps = 10;  ///< the last steps, always in the loss
  double clip_factor = 1.6;      ///< per-term clip LCT = clip_factor lambda^2; <= 0 disables
  /// Only the steps with t_k >= loss_t_min enter the regression (0: all; in [0, 1)). The early times are then left
  /// to another loss: `dsm_until` of tilt finetune regresses them onto the denoising score (docs/equations.md, E106).
  double loss_t_min = 0.0;
  /// Weight of each step's squared residual: "control" = (c_v / sigma)^2, the paper's |u + sigma a|^2;
  /// "velocity" = 1, the plain regression of v_theta - v_base. Both have the same minimiser (the
  /// conditional mean at each step); "velocity" does not let late steps (sigma -> 0) dominate.
  std::string loss_weighting = "control";
  /// Evaluate the reward at X^_1 = X_{K-1} + h v_base(X_{K-1}, t_{K-1}), a noiseless last step with
  /// the base velocity, instead of the noisy X_K (App. G.1).
  bool final_noiseless_step = true;
  /// The training chain's step (docs/equations.md, E135): Integrator::euler, the paper's Euler-Maruyama rollout and
  /// lean adjoint; or Integrator::exact, the exact gDDIM step of the noise schedule (sigma = gamma sqrt(2 eta),
  /// tilt/sde/gddim.h) for the rollout and the lean adjoint through the base's exact steps, a chain nearer p_base
  /// than Euler's at the same K on narrow modes. Needs final_noiseless_step (the reward is taken at the base's X^_1).
  Integrator integrator = Integrator::euler;
  /// What v_theta - v_base at X_k is regressed onto (E135): "continuous", the paper's -rho_k a_k with rho = sigma^2 /
  /// c_v of the exact schedule (eta_t for memoryless), whose critical point tends to u* as K grows, for any sampler;
  /// or "chain", -(std_k^2 / c_v,k) a_{k+1} with the chain's own step (none on its noiseless last one), whose fixed
  /// point is the TRAINING CHAIN's law tilted: exactly so for a linear-Gaussian chain. For sampling with that K-step
  /// chain; off v* by O(1) where 1 - t is a few steps (a fine sampler then sees less tilt).
  std::string target = "continuous";
  /// Trade memory for time: when the trainable network is a TapedNetwork (tilt's MLP), record its
  /// activations (and the base's, if the base is one too) during the rollout and compute the lean adjoint's VJPs and the
  /// regression's gradients from them by hand, instead of running the networks again under autograd.
  /// In residual mode over a base whose VJP needs autograd (a U-Net), without guidance: keep the base's forward
  /// passes of the rollout with their autograd graphs, so that each VJP of the lean adjoint is a backward pass only.
  /// The same loss and gradients up to float rounding; memory grows by the activations of K steps.
  bool tape_activations = true;
  /// The training conditions (docs/conditions.md): each trajectory draws its own c from them, and the
  /// base, the fine-tuned model and the reward are evaluated at it. Null for an unconditional model.
  /// Conditional iterations take the autograd path (tape_activations applies to unconditional ones).
  ConditionSetPtr conditions;
  /// Classifier-free guidance DURING fine-tuning, the three modes of the Adjoint Matching authors' Stable
  /// Diffusion code (docs/conditions.md, E101-E103). guidance = w != 0 rolls out the guided fine-tuned model
  /// (1 + w) v_theta(x, t | c) - w v_theta(x, t | null); guidance_adjoint also runs the lean adjoint through the
  /// guided base; guidance_control regresses the guided difference (1 + w) (v_theta - v_base)(c) - w (v_theta -
  /// v_base)(null) instead of (v_theta - v_base)(c). Both flags: the SOC problem of the guided base, whose
  /// optimum samples the guided base's law tilted by exp(lambda r) (E102); trajectories only: not a tilt (E103).
  /// w = 0 (the default): no guidance in training, guidance after it (the AM paper's setting). Needs conditions
  /// and a base with a null condition.
  double guidance = 0.0;
  bool guidance_adjoint = false;
  bool guidance_control = false;
};

/// Wall time spent in each phase of compute(), summed over calls (for benchmarks: AdjointMatching::set_timer).
struct AdjointMatchingTimes {
  double rollout_s = 0;     ///< the K sampler steps (with the taped path: and the taping)
  double adjoint_s = 0;     ///< the lean adjoint's K VJPs and the reward's gradient
  double regression_s = 0;  ///< the regression loss (with the taped path: and its parameter gradients)
};

/// The backward pass of the lean adjoint, shared by the trainer and the tests.
struct LeanAdjoint {
  std::vector<Tensor> a;       ///< a[k] = a~(t_k), k = 0..K
  std::vector<Tensor> v_base;  ///< v_base(X_k, t_k), k = 0..K-1 (a by-product of the VJPs)
  Tensor x1;                   ///< the point where the reward gradient was taken
};

/// Lean adjoint along states x[0..K-1] (x[K] too unless final_noiseless_step) on `grid`, for the
/// terminal cost g = -lambda r. With final_noiseless_step the last backward step uses the Jacobian
/// of the noiseless step actually taken, I + h dv_base/dx, so that a[k] is exactly the gradient of
/// g(X^_1) with respect to X_k through the discretised base dynamics. With conditions c ([B, dc]; undefined:
/// none) the base runs bound to them with guidance weight `guidance` (bind_condition). The VJPs run on blocks of
/// rows at once where the base allows it (velocity_by_rows). With `kept_base` ((*kept_base)[k]: the base's forward
/// pass at x[k] kept by velocity_by_rows, the same c and guidance), step k's VJP is one backward pass through it.
/// With integrator = exact the backward steps are the adjoints of the base's exact gDDIM steps (the last one, to t = 1,
/// noiseless: X^_1 is its mean); final_noiseless_step must then be true.
LeanAdjoint lean_adjoint(const GenerativeSDE& base_sde, const std::vector<Tensor>& x, const TimeGrid& grid,
                         const Reward& reward, double lambda, bool final_noiseless_step, const Tensor& c = Tensor(),
                         double guidance = 0.0, std::vector<KeptForwards>* kept_base = nullptr,
                         Integrator integrator = Integrator::euler);

/// One batch of trajectories of the fine-tuned model with their lean adjoints: everything the regression needs
/// (AdjointMatching::simulate). Buffered Adjoint Matching keeps one and regresses on its rows several times.
struct AdjointBatch {
  std::vector<Tensor> x;       ///< X_k, k = 0..K-1 (and X_K without the noiseless final step), [B, d]
  LeanAdjoint adjoint;         ///< a_k, v_base(X_k | c) and X^_1
  Tensor c;                    ///< the trajectories' conditions [B, dc]; undefined for an unconditional model
  /// With record_policy: each noisy step's draw xi_k (undefined on the noiseless final step) and the velocity
  /// v(X_k, t_k) of the model that drew the trajectory (guided when it was), for path weights to another model.
  std::vector<Tensor> xi, v;
  Tensor reward;               ///< r(X^_1 | c), [B]
  Tensor log_w;                ///< the path weights of AdjointMatching::last_log_weights (undefined with guidance)
  int64_t rows() const { return x.front().size(0); }
  /// The rows `index` ([n] long) of every tensor.
  AdjointBatch rows(const Tensor& index) const;
};

class AdjointMatching : public Loss {
 public:
  /// Throws tilt::Error if sigma(t) = 0 somewhere on the grid (the control would be infinite),
  /// or if the reward's dimension differs from the model's.
  AdjointMatching(std::shared_ptr<FineTunedVelocity> model, RewardPtr reward, NoiseSchedulePtr noise,
                  const AdjointMatchingOptions& options);
  ~AdjointMatching() override;

  std::string name() const override { return "adjoint_matching"; }
  std::vector<Tensor> parameters() const override { return model_->parameters(); }
  LossOutput compute(Generator& gen) override;
  int64_t batch_size() const override { return options_.batch_size; }
  void set_batch_size(int64_t n) override;

  /// Trajectory of the current fine-tuned model from X0 ~ N(0, I), without gradients, at conditions c
  /// ([B, dc], one per trajectory; undefined for an unconditional model), guided by options().guidance.
  Trajectory rollout(Generator& gen, const Tensor& c = Tensor()) const;
  /// The first half of compute()'s autograd path: batch_size() trajectories of the current model (conditions drawn
  /// first), the lean adjoint along them, the reward at X^_1 and, without guidance, the path weights. With
  /// record_policy the draws and the model's velocities too (AdjointBatch::xi, v). No gradients.
  AdjointBatch simulate(Generator& gen, bool record_policy = false) const;
  /// The second half: the regression loss of v_theta - v_base onto -rho_k a_k on `batch` at `steps`, and its metrics
  /// (reward, loss_unclipped, clipped_fraction, adjoint_norm_t0, loss_top_share). weights: empty, or one [B] tensor
  /// per step of the grid (those in `steps` are used) multiplying each row's term after clipping.
  LossOutput regression(const AdjointBatch& batch, const std::vector<int64_t>& steps,
                        const std::vector<Tensor>& weights = {}) const;
  /// The velocity the rollout follows at step k: v_theta(x, t_k | c), guided by options().guidance. No gradients.
  Tensor policy_velocity(const Tensor& x, int64_t k, const Tensor& c = Tensor()) const;
  /// The time indices that enter the loss: loss_early_steps random early ones + the last ones.
  std::vector<int64_t> loss_steps(Generator& gen) const;
  /// Whether compute() takes the taped path (tape_activations, no conditions, and a trainable network
  /// with VelocityField::taped_network()).
  bool taped() const;
  /// Whether simulate() keeps the base's forward passes of the rollout for the lean adjoint's VJPs
  /// (tape_activations, residual mode, no guidance, a base whose VJP needs autograd).
  bool keeps_base_forward() const;
  /// The blocks of rows the last taped iteration ran, one per thread (1 when it ran none, on one
  /// thread, on a GPU, or with a base whose VJP needs autograd).
  int64_t taped_blocks() const;
  /// Whether compute() reports the rollout's path weights as the metrics `ess` and `log_z` (docs/equations.md,
  /// E104): always but with guidance, whose rollout is not a tilt of the base (E103).
  bool path_weights() const { return options_.guidance == 0.0; }
  /// The last iteration's per-path log weights log w = lambda r(X^_1) + log dP_base/dQ_model, [B] double
  /// (undefined before the first compute() or without path_weights()).
  const Tensor& last_log_weights() const { return last_log_w_; }
  /// Accumulate the wall time of compute()'s phases into `times` (null: stop).
  void set_timer(AdjointMatchingTimes* times) { times_ = times; }

  /// Per step k: the weight c_v / sigma of the residual and the target coefficient rho_k
  /// (v_theta - v_base is regressed onto -rho_k a_j, j = target_adjoint_step(k)); rho_k is infinite where no target
  /// exists.
  double residual_scale(int64_t k) const { return scale_[k]; }
  double target_coefficient(int64_t k) const { return rho_[k]; }
  /// The adjoint a step's target takes: k with the continuous target (the paper's a_k), k + 1 with the chain target.
  int64_t target_adjoint_step(int64_t k) const { return k + target_shift_; }
  /// -rho_k a_{target_adjoint_step(k)}: what v_theta - v_base at X_k is regressed onto, [B, d].
  Tensor regression_target(const std::vector<Tensor>& a, int64_t k) const;
  /// The kernels of the fine-tuned chain's K steps (options().integrator's), as the rollout takes them.
  std::vector<StepKernel> chain_kernels() const;

  const FineTunedVelocity& model() const { return *model_; }
  const GenerativeSDE& finetuned_sde() const { return finetuned_sde_; }
  const GenerativeSDE& base_sde() const { return base_sde_; }
  const RewardPtr& reward() const { return reward_; }
  const TimeGrid& grid() const { return grid_; }
  const AdjointMatchingOptions& options() const { return options_; }

 private:
  void check_guidance() const;
  Tensor regressed_difference(const Tensor& x, const Tensor& t, const Tensor& v_base_c, const Tensor& c) const;
  Rollout recorded_rollout(Generator& gen, const Tensor& c, bool weights,
                           std::vector<KeptForwards>* kept_base = nullptr) const;
  LossOutput compute_taped(Generator& gen);
  Tensor taped_log_path(const std::vector<StepKernel>& kernels, const std::vector<Tensor>& noise) const;
  // compute_taped's three phases, on the blocks of tapes_.
  void taped_rollout(const std::vector<StepKernel>& kernels, const std::vector<Tensor>& noise);
  Tensor taped_adjoint();
  LossOutput taped_regression(const std::vector<int64_t>& loss_steps, const Tensor& x1, std::vector<Tensor>& grads);
  LossOutput taped_regression(const AdjointBatch& batch, const std::vector<int64_t>& steps,
                              const std::vector<Tensor>& weights) const;

  std::shared_ptr<FineTunedVelocity> model_;
  RewardPtr reward_;
  AdjointMatchingOptions options_;
  GenerativeSDE finetuned_sde_;
  GenerativeSDE base_sde_;
  TimeGrid grid_;
  std::vector<double> scale_, rho_;
  int64_t target_shift_ = 0;         // 1 with the chain target: it takes a_{k+1}
  std::vector<int64_t> candidates_;  // steps with a finite target, in increasing order
  AdjointMatchingTimes* times_ = nullptr;
  Tensor last_log_w_, last_reward_;
  // The taped path's activations, kept from one iteration to the next so that their memory is reused.
  struct Tapes;
  std::unique_ptr<Tapes> tapes_;
};

}  // namespace tilt
