// ODE Adjoint Matching and its regularisers (one translation unit: each one that includes ATen costs
// ~20 s of CI build time). Formulas: docs/equations.md, E83-E88 [D], and docs/ode_adjoint_matching.md.
#include "tilt/train/ode_adjoint_matching.h"

#include "tilt/core/check.h"
#include "tilt/core/error.h"
#include "tilt/sde/engine.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <cmath>

namespace tilt {

// ---------------------------------------------------------------------------------------------
// Regularisers (docs/equations.md, E88 [D]).

namespace {

void check_mu(double mu, const std::string& what) {
  if (!(mu > 0.0) || !std::isfinite(mu)) throw Error("regulariser: " + what + " must be > 0 and finite, got " + number_string(mu));
}

Tensor norms(const Tensor& a) { return a.norm(2, {1}, /*keepdim=*/true); }  // [B, 1]

/// psi = (mu/2)|u|^2: grad psi = mu u, psi* = |a|^2 / (2 mu), grad psi* = a / mu.
class QuadraticRegulariser : public Regulariser {
 public:
  using Regulariser::Regulariser;
  std::string name() const override { return "quadratic"; }
  std::string describe() const override { return "quadratic(" + weight_string() + ")"; }
  Tensor psi(const Tensor& u, double t) const override { return 0.5 * weight(t) * u.pow(2).sum(1); }
  Tensor grad_psi(const Tensor& u, double t) const override { return weight(t) * u; }
  Tensor conjugate(const Tensor& a, double t) const override { return a.pow(2).sum(1) / (2.0 * weight(t)); }
  Tensor grad_conjugate(const Tensor& a, double t) const override { return a / weight(t); }
};

/// psi = (mu/2)|u|^2 + indicator(|u| <= delta). psi*(a) = |a|^2/(2 mu) for |a| <= mu delta, else
/// delta |a| - mu delta^2 / 2; grad psi*(a) = a/mu norm-clipped at delta (the projection onto the
/// ball of the unconstrained maximiser; docs/equations.md, E88).
class ClippedRegulariser : public Regulariser {
 public:
  ClippedRegulariser(double delta, double mu, double mu_start) : Regulariser(mu, mu_start), delta_(delta) {
    if (!(delta > 0.0) || !std::isfinite(delta)) {
      throw Error("regulariser: clipped needs a norm bound delta > 0 and finite, got " + number_string(delta));
    }
  }
  std::string name() const override { return "clipped"; }
  std::string describe() const override { return "clipped(delta=" + number_string(delta_) + ", " + weight_string() + ")"; }
  Tensor psi(const Tensor& u, double t) const override { return 0.5 * weight(t) * u.pow(2).sum(1); }
  Tensor grad_psi(const Tensor& u, double t) const override { return weight(t) * u; }
  Tensor conjugate(const Tensor& a, double t) const override {
    const double mu = weight(t);
    const Tensor n = a.norm(2, {1});
    return at::where(n <= mu * delta_, n.pow(2) / (2.0 * mu), delta_ * n - 0.5 * mu * delta_ * delta_);
  }
  Tensor grad_conjugate(const Tensor& a, double t) const override {
    const Tensor u = a / weight(t);
    const Tensor n = norms(u);
    return u * at::clamp_max(delta_ / at::clamp_min(n, 1e-300), 1.0);
  }

 private:
  double delta_;
};

/// psi = (mu/p)|u|^p: grad psi = mu |u|^{p-2} u; psi*(a) = (mu/q)(|a|/mu)^q with q = p/(p-1);
/// grad psi*(a) = (|a|/mu)^{1/(p-1)} a/|a| (0 at a = 0).
class PnormRegulariser : public Regulariser {
 public:
  PnormRegulariser(double p, double mu, double mu_start) : Regulariser(mu, mu_start), p_(p) {
    if (!(p > 1.0) || !std::isfinite(p)) throw Error("regulariser: pnorm needs a power p > 1, got " + number_string(p));
  }
  std::string name() const override { return "pnorm"; }
  std::string describe() const override { return "pnorm(p=" + number_string(p_) + ", " + weight_string() + ")"; }
  Tensor psi(const Tensor& u, double t) const override { return (weight(t) / p_) * u.norm(2, {1}).pow(p_); }
  Tensor grad_psi(const Tensor& u, double t) const override {
    const Tensor n = norms(u);
    return at::where(n > 0, weight(t) * n.pow(p_ - 2.0), at::zeros_like(n)) * u;
  }
  Tensor conjugate(const Tensor& a, double t) const override {
    const double mu = weight(t), q = p_ / (p_ - 1.0);
    return (mu / q) * (a.norm(2, {1}) / mu).pow(q);
  }
  Tensor grad_conjugate(const Tensor& a, double t) const override {
    const double mu = weight(t);
    const Tensor n = norms(a);
    return at::where(n > 0, (n / mu).pow(1.0 / (p_ - 1.0)) / n, at::zeros_like(n)) * a;
  }

 private:
  double p_;
};

}  // namespace

Regulariser::Regulariser(double mu, double mu_start) : mu_(mu), mu_start_(mu_start > 0.0 ? mu_start : mu) {
  check_mu(mu, "the weight mu");
  check_mu(mu_start_, "the weight at t = 0, mu_start");
}

std::string Regulariser::weight_string() const {
  return mu_start_ == mu_ ? "mu=" + number_string(mu_) : "mu=" + number_string(mu_start_) + ".." + number_string(mu_);
}

RegulariserPtr make_quadratic_regulariser(double mu, double mu_start) {
  return std::make_shared<QuadraticRegulariser>(mu, mu_start);
}
RegulariserPtr make_clipped_regulariser(double delta, double mu, double mu_start) {
  return std::make_shared<ClippedRegulariser>(delta, mu, mu_start);
}
RegulariserPtr make_pnorm_regulariser(double p, double mu, double mu_start) {
  return std::make_shared<PnormRegulariser>(p, mu, mu_start);
}
RegulariserPtr make_regulariser(const std::string& name, double mu, double mu_start, double delta, double p) {
  if (name == "quadratic") return make_quadratic_regulariser(mu, mu_start);
  if (name == "clipped") return make_clipped_regulariser(delta, mu, mu_start);
  if (name == "pnorm") return make_pnorm_regulariser(p, mu, mu_start);
  throw Error("unknown regulariser '" + name + "' (quadratic, clipped, pnorm)");
}

// ---------------------------------------------------------------------------------------------
// The lean adjoint of the ODE (docs/equations.md, E85 [D]): the exact adjoint of the Euler
// map of the frozen base, X_{k+1} = X_k + h v_base(X_k, t_k), so a_k = (dX_K / dX_k)^T a_K for the
// base's own trajectory; along the fine-tuned one it drops the control's Jacobian.

std::vector<Tensor> ode_lean_adjoint(const VelocityField& base, const std::vector<Tensor>& x, const TimeGrid& grid,
                                     const Tensor& a_final) {
  const int64_t K = grid.steps();
  const auto n = static_cast<int64_t>(x.size());
  if (n > K) throw Error("ODE lean adjoint: " + std::to_string(n) + " states for " + std::to_string(K) + " steps");
  check_batch(a_final, base.dim(), "ODE lean adjoint: a_K");
  at::NoGradGuard no_grad;
  // The adjoint of the last n Euler steps of the base ODE, X_{k+1} = X_k + h_k v_base(X_k, t_k).
  std::vector<StepKernel> kernels;
  for (int64_t j = 0; j < n; ++j) kernels.push_back({1.0, grid.step(K - n + j), 0.0});
  std::vector<Tensor> a(static_cast<size_t>(n) + 1);
  a[n] = a_final;
  lean_adjoint_recursion(a, kernels, [&](int64_t j, const Tensor& aj) { return base.vjp(x[j], grid[K - n + j], aj); });
  return a;
}

// ---------------------------------------------------------------------------------------------

OdeAdjointMatching::OdeAdjointMatching(std::shared_ptr<FineTunedVelocity> model, RewardPtr reward,
                                       RegulariserPtr regulariser, const OdeAdjointMatchingOptions& options)
    : model_(std::move(model)),
      reward_(std::move(reward)),
      regulariser_(std::move(regulariser)),
      options_(options),
      grid_(TimeGrid::uniform(options.num_steps >= 1 ? options.num_steps : 1)) {
  const std::string me = "ode adjoint matching: ";
  if (!model_) throw Error(me + "no model");
  if (!reward_) throw Error(me + "no reward");
  if (!regulariser_) throw Error(me + "no regulariser");
  if (reward_->dim() != model_->dim()) {
    throw Error(me + "the reward has dimension " + std::to_string(reward_->dim()) + " but the model has dimension " +
                std::to_string(model_->dim()));
  }
  if (options_.num_steps < 1) throw Error(me + "num_steps must be >= 1, got " + std::to_string(options_.num_steps));
  if (options_.batch_size < 1) throw Error(me + "batch_size must be >= 1, got " + std::to_string(options_.batch_size));
  if (!std::isfinite(options_.lambda)) throw Error(me + "lambda must be finite");
  if (options_.adjoint_steps < 0 || options_.adjoint_steps > options_.num_steps) {
    throw Error(me + "adjoint_steps must be in 0..num_steps = " + std::to_string(options_.num_steps) +
                " (0: all steps), got " + std::to_string(options_.adjoint_steps));
  }
  if (options_.truncated_control != "keep" && options_.truncated_control != "zero") {
    throw Error(me + "truncated_control must be 'keep' or 'zero', got '" + options_.truncated_control + "'");
  }
  if (options_.loss_steps < 0) throw Error(me + "loss_steps must be >= 0 (0: all), got " + std::to_string(options_.loss_steps));
  check_conditions(options_.conditions, model_->condition_dim(), "ode adjoint matching");
  check_reward_condition(*reward_, model_->condition_dim(), "ode adjoint matching");
  const int64_t K_adj = options_.adjoint_steps == 0 ? options_.num_steps : options_.adjoint_steps;
  window_start_ = options_.num_steps - K_adj;
}

void OdeAdjointMatching::set_batch_size(int64_t n) {
  if (n < 1) throw Error("ode adjoint matching: batch_size must be >= 1, got " + std::to_string(n));
  options_.batch_size = n;
}

OdeRegressionBatch OdeAdjointMatching::regression_batch(Generator& gen) const {
  at::NoGradGuard no_grad;
  const int64_t K = grid_.steps(), B = options_.batch_size, k0 = window_start_;
  const std::vector<Tensor> params = model_->parameters();
  const auto dtype = params.empty() ? at::typeMetaToScalarType(at::get_default_dtype()) : params.front().scalar_type();
  OdeRegressionBatch out;
  // Each trajectory's condition, first (an unconditional run draws nothing); the base is bound to them.
  if (options_.conditions) out.conditions = options_.conditions->draw(B, gen, dtype).to(model_->device());
  const Tensor& c = out.conditions;
  const VelocityFieldPtr base_at_c = bind_condition(model_->base(), c);
  const VelocityField& base = *base_at_c;
  // X_0 ~ N(0, I) in the trainable network's dtype (float for tilt's MLPs).
  Tensor x = normal_draws({B, model_->dim()}, gen, at::TensorOptions().dtype(dtype).device(model_->device()));

  // The trained steps: the window [k0, K), or every step when the prefix is regressed to zero.
  const int64_t first_trained = options_.truncated_control == "zero" ? 0 : k0;
  const int64_t n_trained = K - first_trained;
  const int64_t S = options_.loss_steps == 0 ? n_trained : std::min(options_.loss_steps, n_trained);
  std::vector<char> in_loss(static_cast<size_t>(K), 0);
  if (S == n_trained) {
    for (int64_t k = first_trained; k < K; ++k) in_loss[k] = 1;
  } else {
    const Tensor perm = at::randperm(n_trained, gen, at::TensorOptions().dtype(at::kLong));
    for (int64_t i = 0; i < S; ++i) in_loss[first_trained + perm[i].item<int64_t>()] = 1;
  }

  // 1. Forward Euler of v_theta = v_base + u_theta; states kept only where needed.
  std::vector<Tensor> xs(static_cast<size_t>(K)), vbs(static_cast<size_t>(K));
  out.control_cost = at::zeros({B}, x.options());
  for (int64_t k = 0; k < K; ++k) {
    const double t = grid_[k], h = grid_.step(k);
    const Tensor v_base = base.velocity(x, t);
    const Tensor u = model_->delta(x, at::full({B}, t, x.options()), v_base, c);
    out.control_cost += h * regulariser_->psi(u, t);
    if (k > k0 || in_loss[k]) xs[k] = x;
    if (in_loss[k]) vbs[k] = v_base;
    x = StepKernel{1.0, h, 0.0}.mean(x, v_base + u);
  }
  out.x1 = x;

  // 2. Lean adjoint over the window: a_K = lambda grad r(X_K), then K_adj - 1 base VJPs (a_{k0} is
  //    not needed: step k's target uses a_{k+1}).
  std::vector<Tensor> window(xs.begin() + (k0 + 1), xs.end());
  const RewardPtr reward = bind_condition(reward_, reward_->condition_dim() > 0 ? c : Tensor());
  out.adjoint = ode_lean_adjoint(base, window, grid_, options_.lambda * reward->grad(out.x1));

  // 3. Regression rows: target grad psi*_{t_k}(a_{k+1}) in the window, 0 before it.
  std::vector<Tensor> rx, rt, rv, target;
  for (int64_t k = 0; k < K; ++k) {
    if (!in_loss[k]) continue;
    out.steps.push_back(k);
    rx.push_back(xs[k]);
    rt.push_back(at::full({B}, grid_[k], x.options()));
    rv.push_back(vbs[k]);
    target.push_back(k >= k0 ? regulariser_->grad_conjugate(out.adjoint[k + 1 - (k0 + 1)], grid_[k])
                             : at::zeros_like(xs[k]));
  }
  out.x = at::cat(rx);
  out.t = at::cat(rt);
  out.v_base = at::cat(rv);
  out.target = at::cat(target);
  // Row j B + b is trajectory b at the j-th step: c repeated like X_k.
  if (c.defined()) out.c = c.repeat({static_cast<int64_t>(out.steps.size()), 1});
  return out;
}

LossOutput OdeAdjointMatching::compute(Generator& gen) {
  const OdeRegressionBatch batch = regression_batch(gen);
  const int64_t B = options_.batch_size;
  const auto S = static_cast<int64_t>(batch.steps.size());
  const int64_t n_trained = grid_.steps() - (options_.truncated_control == "zero" ? 0 : window_start_);
  std::vector<Tensor> hs;
  for (int64_t k : batch.steps) hs.push_back(at::full({B}, grid_.step(k), batch.x.options()));
  const Tensor h = at::cat(hs);
  const Tensor u = model_->delta(batch.x, batch.t, batch.v_base, batch.c);
  const Tensor terms = h * (u - batch.target).pow(2).sum(1);  // [S B]
  LossOutput out;
  out.loss = terms.sum() * (static_cast<double>(n_trained) / static_cast<double>(S * B));
  at::NoGradGuard no_grad;
  const Tensor r = bind_condition(reward_, reward_->condition_dim() > 0 ? batch.conditions : Tensor())->value(batch.x1);
  out.metrics.emplace_back("reward", r.mean().item<double>());
  out.metrics.emplace_back("control_cost", batch.control_cost.mean().item<double>());
  out.metrics.emplace_back("objective", (options_.lambda * r - batch.control_cost).mean().item<double>());
  out.metrics.emplace_back("adjoint_norm_tc", batch.adjoint.front().norm(2, {1}).mean().item<double>());
  return out;
}

}  // namespace tilt
