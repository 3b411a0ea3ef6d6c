// The loss family of the unified view of tilting (docs/equations.md, E110-E117; Domingo-Enrich, Du, Albergo 2026,
// arXiv 2605.00229). See tilt/train/unified_losses.h.
#include "tilt/train/unified_losses.h"
#include "weight_metrics.h"

#include "tilt/core/check.h"
#include "tilt/core/error.h"
#include "tilt/model/gmm.h"
#include "tilt/model/mlp.h"
#include "tilt/sde/engine.h"
#include "tilt/sde/sde.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/autograd.h>

#include <cmath>

namespace tilt {
namespace {

// kappa_t, eta_t (E6) and the Wronskian W_t = alpha' beta - alpha beta' per row, [B, 1] each, from t [B].
struct Coefficients {
  Tensor alpha, beta, kappa, eta, wronskian;
};

Coefficients coefficients(const Schedule& schedule, const Tensor& t) {
  const ScheduleTensors s = schedule.at(t);
  Coefficients c;
  c.alpha = s.alpha.reshape({-1, 1});
  c.beta = s.beta.reshape({-1, 1});
  const Tensor da = s.d_alpha.reshape({-1, 1}), db = s.d_beta.reshape({-1, 1});
  c.wronskian = da * c.beta - c.alpha * db;
  c.kappa = da / c.alpha;
  c.eta = c.wronskian * c.beta / c.alpha;
  return c;
}

const GmmVelocity* mixture_base(const FineTunedVelocity& model) {
  return dynamic_cast<const GmmVelocity*>(model.base().get());
}

void check_common(const std::string& label, const std::shared_ptr<FineTunedVelocity>& model, const RewardPtr& reward,
                  const UnifiedLossOptions& o) {
  if (!model) throw Error(label + ": no model");
  if (!reward) throw Error(label + ": no reward");
  if (reward->dim() != model->dim()) {
    throw Error(label + ": the reward has dimension " + std::to_string(reward->dim()) + " but the model has dimension " +
                std::to_string(model->dim()));
  }
  if (o.batch_size < 1) throw Error(label + ": batch_size must be >= 1, got " + std::to_string(o.batch_size));
  if (o.num_steps < 1) throw Error(label + ": num_steps must be >= 1, got " + std::to_string(o.num_steps));
  if (!std::isfinite(o.lambda)) throw Error(label + ": lambda must be finite");
  if (!(o.t_min > 0.0 && o.t_min < o.t_max && o.t_max <= 1.0)) {
    throw Error(label + ": need 0 < t_min < t_max <= 1, got t_min = " + number_string(o.t_min) +
                ", t_max = " + number_string(o.t_max));
  }
}

// t ~ U[t_min, t_max], [B], in the dtype of `like`.
Tensor draw_times(int64_t B, const UnifiedLossOptions& o, Generator& gen, const Tensor& like) {
  return o.t_min + (o.t_max - o.t_min) * uniform_draws({B}, gen, like.options());
}

std::vector<StepKernel> model_kernels(const std::shared_ptr<FineTunedVelocity>& model, const NoiseSchedulePtr& noise,
                                      int64_t steps, Integrator integrator = Integrator::euler) {
  return step_kernels(GenerativeSDE(model, noise), TimeGrid::uniform(steps), integrator);
}

}  // namespace

Tensor gaussian_posterior_coefficient(const Tensor& Sigma, const ScheduleTensors& s) {
  const Tensor S = Sigma.to(at::kDouble);
  const int64_t d = S.size(0);
  const Tensor a = s.alpha.to(at::kDouble).reshape({-1, 1, 1}), b = s.beta.to(at::kDouble).reshape({-1, 1, 1});
  const Tensor C = a * a * S.unsqueeze(0) + b * b * at::eye(d, S.options()).unsqueeze(0);
  // c = alpha Sigma C^{-1} = alpha C^{-1} Sigma (Sigma and C commute): solve C c = alpha Sigma.
  return at::linalg_solve(C, a * S.unsqueeze(0).expand({C.size(0), d, d}));
}

// ---------------------------------------------------------------------------------------------------------------
// The rollout and its path weight (E93, E114).

TiltRollout tilt_rollout(const std::shared_ptr<FineTunedVelocity>& model, const NoiseSchedulePtr& noise,
                         const Reward& reward, double lambda, int64_t steps, int64_t batch, Generator& gen,
                         Integrator integrator) {
  const TimeGrid grid = TimeGrid::uniform(steps);
  const std::vector<StepKernel> kernels = model_kernels(model, noise, steps, integrator);
  const VelocityField& base = *model->base();
  const at::TensorOptions opts = at::TensorOptions().dtype(at::kFloat).device(model->device());
  TiltRollout r;
  Tensor x = normal_draws({batch, model->dim()}, gen, opts);
  r.x.push_back(x);
  PathWeight weight(batch);
  for (int64_t k = 0; k < steps; ++k) {
    const Tensor t = at::scalar_tensor(grid[k], x.options());
    const Tensor vb = base.velocity(x, t);
    const Tensor delta = model->delta(x, t, vb);
    const StepKernel& K = kernels[static_cast<size_t>(k)];
    Tensor xi;
    if (!K.deterministic()) {
      xi = normal_draws(x.sizes(), gen, x.options());
      weight.add_step(K.c_v * delta, xi, K.std);  // E93: shift m_Q - m_P = c_v (v_theta - v_base)
    }
    x = K.next(x, vb + delta, xi);
    r.x.push_back(x);
    r.xi.push_back(xi);
    r.delta.push_back(delta);
    r.v_base.push_back(vb);
  }
  weight.add(lambda * reward.value(x));
  r.log_w = weight.log_weight();
  return r;
}

// ---------------------------------------------------------------------------------------------------------------
// TSM, DSM, NSM (E110-E113, E115).

TiltScoreMatching::TiltScoreMatching(ScoreTarget target, std::shared_ptr<FineTunedVelocity> model, RewardPtr reward,
                                     NoiseSchedulePtr noise, const UnifiedLossOptions& options)
    : target_(target), model_(std::move(model)), reward_(std::move(reward)), noise_(std::move(noise)), options_(options) {
  const std::string label = name();
  check_common(label, model_, reward_, options_);
  if (!options_.target_samples && !noise_) throw Error(label + ": no noise schedule for the weighted rollouts");
  if (options_.rollout_integrator == Integrator::heun) throw Error(label + ": the weighted rollouts need a Gaussian step (euler or exact)");
  // The exact step's schedule family (sigma = gamma sqrt(2 eta)) is checked now, not at the first rollout.
  if (!options_.target_samples && noise_) model_kernels(model_, noise_, options_.num_steps, options_.rollout_integrator);
  const GmmVelocity* gmm = mixture_base(*model_);
  if (target_ == ScoreTarget::target) {
    base_score_ = options_.base_score;
    if (!base_score_) {
      if (!gmm) {
        throw Error("tsm: needs the base's score at the data end (base_score) for a base that is not a Gaussian "
                    "mixture; the base is '" + model_->base()->kind() + "'");
      }
      auto mixture = std::make_shared<GaussianMixture>(gmm->mixture());
      base_score_ = [mixture](const Tensor& x) { return mixture->score(x).to(x.scalar_type()); };
    }
  }
  if (target_ == ScoreTarget::novel) {
    // E113 needs a linear-Gaussian posterior map X_1 = c_t x_t + noise: one Gaussian component.
    if (!gmm || gmm->mixture().components() != 1) {
      throw Error("nsm: tilted novel score matching needs a Gaussian base (a 'gmm' base with one component), whose "
                  "posterior mean is linear in x_t; the base is '" + model_->base()->kind() + "'" +
                  (gmm ? " with " + std::to_string(gmm->mixture().components()) + " components" : std::string()) +
                  " (docs/equations.md, E113)");
    }
    sigma_ = gmm->mixture().covariances()[0];
    mu_ = gmm->mixture().means()[0];
  }
}

std::string TiltScoreMatching::name() const {
  switch (target_) {
    case ScoreTarget::target: return "tsm";
    case ScoreTarget::denoising: return "dsm";
    case ScoreTarget::novel: return "nsm";
  }
  return "tsm";
}

void TiltScoreMatching::set_batch_size(int64_t n) {
  if (n < 1) throw Error(name() + ": batch_size must be >= 1, got " + std::to_string(n));
  options_.batch_size = n;
}

Tensor TiltScoreMatching::target_difference(const Tensor& x1, const Tensor& x0, const Tensor& t,
                                            const Tensor& v_base) const {
  at::NoGradGuard no_grad;
  const Coefficients c = coefficients(*model_->schedule(), t);
  const Tensor xt = c.alpha * x1 + c.beta * x0;
  const double lambda = options_.lambda;
  if (target_ == ScoreTarget::novel) {
    // E113: eta_t c_t lambda grad r(X_1), eta_t = W_t beta_t / alpha_t.
    const Tensor ct = gaussian_posterior_coefficient(sigma_, model_->schedule()->at(t));
    const Tensor g = (lambda * reward_->grad(x1)).to(at::kDouble).unsqueeze(2);
    const Tensor eta = (c.wronskian * c.beta / c.alpha).to(at::kDouble);
    return (eta * at::matmul(ct, g).squeeze(2)).to(x1.scalar_type());
  }
  // E110: eta_t (Y - s_base(x_t)) = eta_t Y - v_base(x_t) + kappa_t x_t (E7).
  const Tensor vb = v_base.defined() ? v_base : model_->base()->velocity(xt, t);
  Tensor eta_y;
  if (target_ == ScoreTarget::target) {
    // E111: Y = (1/alpha_t)(grad log p_base + lambda grad r)(X_1); eta_t / alpha_t = W_t beta_t / alpha_t^2.
    eta_y = (c.wronskian * c.beta / (c.alpha * c.alpha)) * (base_score_(x1) + lambda * reward_->grad(x1));
  } else {
    // E112: Y = -(x_t - alpha_t X_1) / beta_t^2 = -X_0 / beta_t; eta_t / beta_t = W_t / alpha_t (finite at t = 1).
    eta_y = -(c.wronskian / c.alpha) * x0;
  }
  return eta_y - vb + c.kappa * xt;
}

std::pair<Tensor, Tensor> TiltScoreMatching::terminal_samples(int64_t B, Generator& gen) const {
  if (options_.target_samples) {
    const Tensor x1 = options_.target_samples(B, gen).to(at::kFloat);
    check_batch(x1, model_->dim(), name() + ": target_samples");
    return {x1, at::full({x1.size(0)}, 1.0 / static_cast<double>(x1.size(0)), x1.options())};
  }
  // E115: the model's rollouts, weighted by w ∝ dP*/dQ (E104), so that the weighted law is p* whatever the model.
  at::NoGradGuard no_grad;
  const TiltRollout r =
      tilt_rollout(model_, noise_, *reward_, options_.lambda, options_.num_steps, B, gen, options_.rollout_integrator);
  return {r.x.back(), at::softmax(r.log_w, 0).to(at::kFloat)};
}

LossOutput TiltScoreMatching::compute(Generator& gen) {
  const auto [x1, w] = terminal_samples(options_.batch_size, gen);
  const int64_t B = x1.size(0);
  const Tensor t = draw_times(B, options_, gen, x1);
  const Tensor x0 = normal_draws(x1.sizes(), gen, x1.options());
  const Coefficients c = coefficients(*model_->schedule(), t);
  const Tensor xt = (c.alpha * x1 + c.beta * x0).detach();
  Tensor vb;
  {
    at::NoGradGuard no_grad;
    vb = model_->base()->velocity(xt, t);
  }
  // One base evaluation serves the target (E110) and the model's residual.
  const Tensor target = target_difference(x1, x0, t, target_ == ScoreTarget::novel ? Tensor() : vb);
  const Tensor residual = model_->delta(xt, t, vb) - target;
  LossOutput out;
  out.loss = (w * residual.pow(2).sum(1)).sum();
  if (!options_.target_samples) {
    const Tensor wd = w.to(at::kDouble);
    out.metrics.emplace_back("ess", 1.0 / (static_cast<double>(B) * (wd * wd).sum().item<double>()));
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// CMCD (E114).

TiltCmcd::TiltCmcd(std::shared_ptr<FineTunedVelocity> model, RewardPtr reward, NoiseSchedulePtr noise,
                   const UnifiedLossOptions& options, bool log_variance)
    : model_(std::move(model)), reward_(std::move(reward)), noise_(std::move(noise)), options_(options),
      log_variance_(log_variance) {
  check_common(name(), model_, reward_, options_);
  if (!noise_) throw Error(name() + ": no noise schedule");
  if (log_variance_ && options_.batch_size < 2) {
    throw Error(name() + ": batch_size must be >= 2 for a batch variance, got " + std::to_string(options_.batch_size));
  }
  for (const StepKernel& k : model_kernels(model_, noise_, options_.num_steps)) {
    if (k.deterministic()) throw Error(name() + ": the noise schedule has a step without noise (sigma = 0): no path weight");
  }
}

void TiltCmcd::set_batch_size(int64_t n) {
  if (n < (log_variance_ ? 2 : 1)) throw Error(name() + ": batch_size too small: " + std::to_string(n));
  options_.batch_size = n;
}

Tensor TiltCmcd::log_weights(Generator& gen) const {
  at::NoGradGuard no_grad;
  return tilt_rollout(model_, noise_, *reward_, options_.lambda, options_.num_steps, options_.batch_size, gen).log_w;
}

LossOutput TiltCmcd::compute(Generator& gen) {
  LossOutput out;
  if (!log_variance_) {
    // KL(Q || P*) - log Z = -E_Q log w, differentiated through the reparametrised rollout.
    const TiltRollout r = tilt_rollout(model_, noise_, *reward_, options_.lambda, options_.num_steps,
                                       options_.batch_size, gen);
    out.loss = -r.log_w.mean().to(at::kFloat);
    detail::add_weight_metrics(out, r.log_w);
    return out;
  }
  // Log-variance on detached paths of the current model u_s: with e_k = xi_k + d_s,k the step's residual against
  // the base mean (in units of std), log dP/dQ_theta = sum_k (-d_theta,k . e_k + |d_theta,k|^2 / 2).
  TiltRollout r;
  {
    at::NoGradGuard no_grad;
    r = tilt_rollout(model_, noise_, *reward_, options_.lambda, options_.num_steps, options_.batch_size, gen);
  }
  const std::vector<StepKernel> kernels = model_kernels(model_, noise_, options_.num_steps);
  const TimeGrid grid = TimeGrid::uniform(options_.num_steps);
  Tensor y = (options_.lambda * reward_->value(r.x.back())).detach().to(at::kDouble);
  for (int64_t k = 0; k < options_.num_steps; ++k) {
    const StepKernel& K = kernels[static_cast<size_t>(k)];
    const Tensor& x = r.x[static_cast<size_t>(k)];
    const Tensor t = at::scalar_tensor(grid[k], x.options());
    const Tensor e = (r.xi[k] + K.c_v * r.delta[k] / K.std).to(at::kDouble);
    const Tensor d = (K.c_v / K.std) * model_->delta(x, t, r.v_base[k]).to(at::kDouble);  // the rollout's v_base
    y = y - (d * e).sum(1) + 0.5 * (d * d).sum(1);
  }
  out.loss = (y - y.mean()).pow(2).mean().to(at::kFloat);
  detail::add_weight_metrics(out, r.log_w);
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// NETS (E116, E117).

TiltNets::TiltNets(std::shared_ptr<FineTunedVelocity> model, RewardPtr reward, const UnifiedLossOptions& options,
                   VelocityFieldPtr free_energy)
    : model_(std::move(model)), reward_(std::move(reward)), options_(options), free_energy_(std::move(free_energy)) {
  check_common("nets", model_, reward_, options_);
  if (!free_energy_) {
    MlpOptions o;
    o.dim = 1;
    o.hidden = options_.free_energy_hidden;
    o.time_features = 4;
    free_energy_ = std::make_shared<MlpVelocity>(o, model_->schedule(), options_.seed);
  }
  if (free_energy_->dim() != 1) {
    throw Error("nets: the free energy F_t must be a field of dimension 1, got " + std::to_string(free_energy_->dim()));
  }
}

std::vector<Tensor> TiltNets::parameters() const {
  std::vector<Tensor> p = model_->parameters();
  for (const Tensor& q : free_energy_->parameters()) p.push_back(q);
  return p;
}

void TiltNets::set_batch_size(int64_t n) {
  if (n < 1) throw Error("nets: batch_size must be >= 1, got " + std::to_string(n));
  options_.batch_size = n;
}

Tensor TiltNets::residual(const Tensor& x_in, const Tensor& t, Generator& gen) const {
  const Schedule& schedule = *model_->schedule();
  const Tensor x = x_in.detach().clone().requires_grad_(true);
  const double lambda = options_.lambda;
  Tensor v, s, r, gr;
  {
    at::NoGradGuard no_grad;
    const Tensor xd = x.detach();
    v = model_->base()->velocity(xd, t);
    if (const GmmVelocity* gmm = mixture_base(*model_)) {
      s = gmm->mixture().marginal_score(xd, schedule.at(t)).to(xd.scalar_type());
    } else {
      const Coefficients c = coefficients(schedule, t);
      s = (v - c.kappa * xd) / c.eta;  // E7
    }
    r = reward_->value(xd);
    gr = reward_->grad(xd);
  }
  // b_hat = v_theta - v_base and its divergence by Hutchinson's estimator, eps^T (d b_hat / dx) eps.
  const Tensor b_hat = model_->delta(x, t, v);
  Tensor div = at::zeros({x.size(0)}, x.options());
  if (b_hat.requires_grad()) {
    const Tensor eps = at::randint(0, 2, x.sizes(), gen, x.options()) * 2.0 - 1.0;
    const Tensor g = torch::autograd::grad({(b_hat * eps).sum()}, {x}, {}, /*retain_graph=*/true,
                                           /*create_graph=*/true, /*allow_unused=*/true)[0];
    if (g.defined()) div = (g * eps).sum(1);
  }
  // d_t F_t by autograd in t.
  const Tensor tt = t.detach().clone().requires_grad_(true);
  const Tensor F = free_energy_->velocity(at::zeros({x.size(0), 1}, x.options()), tt).select(1, 0);
  const Tensor dF = torch::autograd::grad({F.sum()}, {tt}, {}, /*retain_graph=*/true, /*create_graph=*/true)[0];
  // E116 with r_t = t lambda r: d_t r_t = lambda r, grad r_t = t lambda grad r.
  const Tensor grad_rt = (t * lambda).reshape({-1, 1}) * gr;
  return lambda * r + (v * grad_rt).sum(1) + div + (b_hat * (s + grad_rt)).sum(1) - dF;
}

LossOutput TiltNets::compute(Generator& gen) {
  const int64_t B = options_.batch_size;
  Tensor x1;
  if (options_.base_samples) {
    x1 = options_.base_samples(B, gen).to(at::kFloat);
  } else if (const GmmVelocity* gmm = mixture_base(*model_)) {
    x1 = gmm->mixture().sample(B, gen);
  } else {
    at::NoGradGuard no_grad;
    const GenerativeSDE base_sde(model_->base(), make_memoryless_noise(1.0 / static_cast<double>(options_.num_steps)));
    const TimeGrid grid = TimeGrid::uniform(options_.num_steps);
    const VelocityField& vb = *model_->base();
    x1 = rollout(step_kernels(base_sde, grid, Integrator::euler),
                 [&](int64_t k, const Tensor& x) { return vb.velocity(x, grid[k]); },
                 normal_draws({B, model_->dim()}, gen, at::TensorOptions().device(model_->device())), gen)
             .final();
  }
  check_batch(x1, model_->dim(), "nets: base_samples");
  const Tensor t = draw_times(x1.size(0), options_, gen, x1);
  const Coefficients c = coefficients(*model_->schedule(), t);
  const Tensor xt = c.alpha * x1 + c.beta * normal_draws(x1.sizes(), gen, x1.options());
  LossOutput out;
  out.loss = residual(xt, t, gen).pow(2).mean();
  out.metrics.emplace_back("log_z", log_z());
  return out;
}

double TiltNets::log_z() const {
  at::NoGradGuard no_grad;
  const Tensor x = at::zeros({2, 1});
  const Tensor t = at::tensor({0.0f, 1.0f});
  const Tensor F = free_energy_->velocity(x, t);
  return (F[1][0] - F[0][0]).item<double>();
}

}  // namespace tilt
