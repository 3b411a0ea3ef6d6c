// The control network and the SOC losses.
#include "tilt/soc/control.h"
#include "tilt/soc/losses.h"

#include "tilt/core/error.h"
#include "tilt/sde/engine.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>  // at::NoGradGuard; not pulled in by ATen.h since LibTorch 2.0
#include <torch/csrc/autograd/autograd.h>

#include <cmath>

namespace tilt::soc {

ControlNetwork::ControlNetwork(int64_t dim, double horizon, std::vector<int64_t> hidden, uint64_t seed,
                               bool zero_output)
    : horizon_(horizon) {
  if (!(horizon > 0)) throw Error("control network: the horizon must be > 0");
  MlpOptions o;
  o.dim = dim;
  o.hidden = std::move(hidden);
  o.zero_output = zero_output;
  // The MLP is a velocity field only in form: it maps (x, s) with s = t / T in [0, 1] to R^d.
  mlp_ = std::make_shared<MlpVelocity>(o, make_linear_schedule(), seed);
}

ControlNetwork::ControlNetwork(std::shared_ptr<MlpVelocity> mlp, double horizon) : mlp_(std::move(mlp)), horizon_(horizon) {
  if (!mlp_) throw Error("control network: no network");
  if (!(horizon > 0)) throw Error("control network: the horizon must be > 0");
}

Tensor ParametricControl::operator()(const Tensor& x, double t) const {
  return evaluate(x, at::full({x.size(0)}, t, x.options().dtype(at::kDouble)));
}

Control ParametricControl::as_control() const {
  return [this](const Tensor& x, double t) { return (*this)(x, t); };
}

Tensor ControlNetwork::evaluate(const Tensor& x, const Tensor& t) const {
  return mlp_->velocity(x.to(at::kFloat), (t / horizon_).to(at::kFloat)).to(at::kDouble);
}

std::vector<Tensor> lean_adjoint(const Problem& problem, const std::vector<Tensor>& x, double T) {
  const int64_t K = static_cast<int64_t>(x.size()) - 1;
  if (K < 1) throw Error("lean adjoint: needs at least two recorded states");
  at::NoGradGuard no_grad;
  const double h = T / static_cast<double>(K);
  std::vector<Tensor> a(static_cast<size_t>(K) + 1);
  a[K] = problem.terminal_cost_grad(x[K]).to(at::kDouble);
  // a_k = d/dX_k of sum_{j >= k} f(X_j) h + g(X_K) through the uncontrolled Euler step
  // X_{j+1} = X_j + h b(X_j) (the kernel {1, h, 0} of the drift): the control's dependence on X and its
  // cost are left out, which is what makes the adjoint "lean" (Adjoint Matching, Eq. 38-39;
  // docs/equations.md, E34).
  lean_adjoint_recursion(
      a, std::vector<StepKernel>(static_cast<size_t>(K), StepKernel{1.0, h, 0.0}),
      [&](int64_t k, const Tensor& ak) { return problem.drift_vjp(x[k], static_cast<double>(k) * h, ak).to(at::kDouble); },
      [&](int64_t k) { return problem.state_cost_grad(x[k], static_cast<double>(k) * h).to(at::kDouble); });
  return a;
}

std::vector<Tensor> full_adjoint(const Problem& problem, const ParametricControl& control, const std::vector<Tensor>& x,
                                 double T) {
  const int64_t K = static_cast<int64_t>(x.size()) - 1;
  if (K < 1) throw Error("full adjoint: needs at least two recorded states");
  const double h = T / static_cast<double>(K);
  std::vector<Tensor> a(static_cast<size_t>(K) + 1);
  a[K] = problem.terminal_cost_grad(x[K]).to(at::kDouble).detach();
  // The lean recursion plus the control's terms, (grad_x u)^T (sigma^T a_{k+1} + u), by one
  // vector-Jacobian product in x only: grad_x (sigma u)^T a = (grad_x u)^T sigma^T a and
  // grad_x 1/2 |u|^2 = (grad_x u)^T u.
  auto control_term = [&](int64_t k, const Tensor& a_next) {
    at::AutoGradMode enable_grad(true);
    const Tensor xg = x[k].detach().to(at::kDouble).requires_grad_(true);
    const Tensor u = control(xg, static_cast<double>(k) * h);
    const Tensor sigma = problem.sigma(static_cast<double>(k) * h).to(at::kDouble);
    const Tensor weight = (at::matmul(a_next, sigma) + u).detach();  // rows of (sigma^T a + u)^T
    return torch::autograd::grad({(u * weight).sum()}, {xg}, {}, false, false)[0].detach();
  };
  lean_adjoint_recursion(
      a, std::vector<StepKernel>(static_cast<size_t>(K), StepKernel{1.0, h, 0.0}),
      [&](int64_t k, const Tensor& ak) {
        const Tensor c = control_term(k, ak);
        at::NoGradGuard no_grad;
        return problem.drift_vjp(x[k], static_cast<double>(k) * h, ak).to(at::kDouble) + c;
      },
      [&](int64_t k) { return problem.state_cost_grad(x[k], static_cast<double>(k) * h).to(at::kDouble); });
  return a;
}

SocLoss::SocLoss(const std::string& label, ProblemPtr problem, ParametricControlPtr control,
                 const SocLossOptions& options, bool stopping_time)
    : problem_(std::move(problem)), control_(std::move(control)), options_(options), label_(label) {
  if (!problem_) throw Error(label + ": no SOC problem");
  if (problem_->has_stopping_time() && !stopping_time) {
    // Its target differentiates the path, and the stopping time's dependence on the path is not in it.
    throw Error(label + ": the SOC problem '" + problem_->name() +
                "' has a stopping time, which this loss does not handle (use cross_entropy, log_variance, "
                "variance, moment or reinforce)");
  }
  if (!control_) throw Error(label + ": no control network");
  if (control_->dim() != problem_->dim()) {
    throw Error(label + ": the control network has dimension " + std::to_string(control_->dim()) +
                " but the problem '" + problem_->name() + "' has dimension " + std::to_string(problem_->dim()));
  }
  if (options_.batch_size < 1) throw Error(label + ": batch_size must be >= 1");
}

void SocLoss::set_batch_size(int64_t n) {
  if (n < min_batch_) {
    throw Error(label_ + ": " + std::to_string(n) + " path(s) per batch (or per shard of it) are too few; it needs " +
                std::to_string(min_batch_) + (min_batch_ > 1 ? " (it is a variance): use fewer shards or a larger batch" : ""));
  }
  options_.batch_size = n;
}

int64_t SocLoss::steps() const { return options_.num_steps > 0 ? options_.num_steps : problem_->default_steps(); }

AdjointMatchingSoc::AdjointMatchingSoc(ProblemPtr problem, ParametricControlPtr control, const SocLossOptions& options)
    : SocLoss("adjoint matching", std::move(problem), std::move(control), options) {}

LossOutput AdjointMatchingSoc::compute(Generator& gen) {
  const int64_t K = steps();
  const int64_t B = options_.batch_size;
  const double T = problem_->horizon(), h = T / static_cast<double>(K);
  const Control u = control_->as_control();
  ControlledPaths paths;
  {
    at::NoGradGuard no_grad;
    paths = simulate(*problem_, u, B, K, gen);
  }
  const std::vector<Tensor> a = lean_adjoint(*problem_, paths.x, T);
  std::vector<Tensor> xs, ts, targets;
  for (int64_t k = 0; k < K; ++k) {
    const double t = static_cast<double>(k) * h;
    xs.push_back(paths.x[k]);
    ts.push_back(at::full({B}, t, at::kDouble));
    targets.push_back(-at::matmul(a[k], problem_->sigma(t).to(at::kDouble)));  // rows of -(sigma^T a)^T
  }
  const Tensor residual = control_->evaluate(at::cat(xs), at::cat(ts)) - at::cat(targets);
  LossOutput out;
  Tensor weights;
  if (options_.damp_noisy_times) {
    // E121: w_k = min(1, mean_j m_j / m_k), m_k = mean_b |target_k|^2; every time's regression keeps its
    // minimiser E[-sigma^T a_k | X_k], so u* stays the fixed point.
    at::NoGradGuard no_grad;
    const Tensor m = at::stack(targets).pow(2).sum(2).mean(1);  // [K]
    weights = at::clamp_max(m.mean() / at::clamp_min(m, 1e-300), 1.0);
  }
  const Tensor sq = residual.pow(2).sum(1).view({K, B});
  out.loss = options_.damp_noisy_times ? (sq * weights.unsqueeze(1)).mean()
                                       : sq.mean();  // = (1/K) sum_k mean_b |u + sigma^T a|^2
  at::NoGradGuard no_grad;
  out.metrics.emplace_back("control_objective", control_objective(paths));
  return out;
}

namespace {
// (1/K) sum_k mean_b |u_theta(X_k, t_k) - target_k|^2 (optionally sum_b weight_b instead of the mean).
Tensor regression_loss(const ParametricControl& control, const ControlledPaths& paths, const std::vector<Tensor>& target,
                       const Tensor& weight = Tensor()) {
  const int64_t K = static_cast<int64_t>(paths.u.size());
  const int64_t B = paths.x[0].size(0);
  std::vector<Tensor> xs, ts;
  for (int64_t k = 0; k < K; ++k) {
    xs.push_back(paths.x[k]);
    ts.push_back(at::full({B}, paths.t[k], at::kDouble));
  }
  std::vector<Tensor> targets(target.begin(), target.begin() + K);
  const Tensor sq = (control.evaluate(at::cat(xs), at::cat(ts)) - at::cat(targets)).pow(2).sum(1).view({K, B});
  if (!weight.defined()) return sq.mean();
  return (sq * weight.unsqueeze(0)).sum() / static_cast<double>(K);
}
}  // namespace

ContinuousAdjointSoc::ContinuousAdjointSoc(ProblemPtr problem, ParametricControlPtr control,
                                           const SocLossOptions& options)
    : SocLoss("continuous adjoint", std::move(problem), std::move(control), options) {}

LossOutput ContinuousAdjointSoc::compute(Generator& gen) {
  const int64_t K = steps();
  ControlledPaths paths;
  {
    at::NoGradGuard no_grad;
    paths = simulate(*problem_, control_->as_control(), options_.batch_size, K, gen);
  }
  const std::vector<Tensor> a = full_adjoint(*problem_, *control_, paths.x, problem_->horizon());
  std::vector<Tensor> target;
  for (size_t k = 0; k < a.size(); ++k) {
    target.push_back(-at::matmul(a[k], problem_->sigma(paths.t[k]).to(at::kDouble)));  // rows of -(sigma^T a)^T
  }
  LossOutput out;
  out.loss = regression_loss(*control_, paths, target);
  at::NoGradGuard no_grad;
  out.metrics.emplace_back("control_objective", control_objective(paths));
  return out;
}

ReparametrisationMatrix::ReparametrisationMatrix(int64_t dim, std::vector<int64_t> hidden, double gamma, uint64_t seed,
                                                 double init_scale)
    : dim_(dim) {
  if (dim < 1) throw Error("SOCM's M: the dimension must be >= 1");
  if (!std::isfinite(gamma) || !std::isfinite(init_scale)) throw Error("SOCM's M: gamma and init_scale must be finite");
  Generator gen = make_generator(seed);
  std::vector<int64_t> widths{2};
  widths.insert(widths.end(), hidden.begin(), hidden.end());
  widths.push_back(dim * dim);
  for (size_t l = 0; l + 1 < widths.size(); ++l) {
    // PyTorch's nn.Linear initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), times init_scale (SOCM's 0.1).
    const double bound = init_scale / std::sqrt(static_cast<double>(widths[l]));
    weights_.push_back(((at::rand({widths[l + 1], widths[l]}, gen, at::kDouble) * 2 - 1) * bound).requires_grad_(true));
    biases_.push_back(((at::rand({widths[l + 1]}, gen, at::kDouble) * 2 - 1) * bound).requires_grad_(true));
  }
  gamma_ = at::full({}, gamma, at::kDouble).requires_grad_(true);
}

std::pair<Tensor, Tensor> ReparametrisationMatrix::operator()(const Tensor& t, const Tensor& s) const {
  const int64_t P = t.size(0);
  // N(t, s) and its tangent dN/ds, pushed forward through the layers together (forward mode).
  Tensor z = at::stack({t.to(at::kDouble), s.to(at::kDouble)}, 1);
  Tensor dz = at::stack({at::zeros({P}, at::kDouble), at::ones({P}, at::kDouble)}, 1);
  for (size_t l = 0; l < weights_.size(); ++l) {
    if (l > 0) {
      const Tensor active = (z > 0).to(at::kDouble);
      z = at::relu(z);
      dz = dz * active;
    }
    z = at::matmul(z, weights_[l].t()) + biases_[l];
    dz = at::matmul(dz, weights_[l].t());
  }
  const Tensor N = z.view({P, dim_, dim_}), dN = dz.view({P, dim_, dim_});
  const Tensor e = at::exp(-gamma_ * (s.to(at::kDouble) - t.to(at::kDouble))).view({P, 1, 1});
  const Tensor I = at::eye(dim_, at::kDouble).unsqueeze(0);
  const Tensor M = e * I + (1 - e) * N;
  // d/ds: -gamma e I + gamma e N + (1 - e) dN/ds.
  const Tensor dM = gamma_ * e * (N - I) + (1 - e) * dN;
  return {M, dM};
}

std::vector<Tensor> ReparametrisationMatrix::parameters() const {
  std::vector<Tensor> p;
  for (size_t l = 0; l < weights_.size(); ++l) {
    p.push_back(weights_[l]);
    p.push_back(biases_[l]);
  }
  p.push_back(gamma_);
  return p;
}

SocmSoc::SocmSoc(ProblemPtr problem, ParametricControlPtr control, const SocLossOptions& options, bool learnt_M)
    : SocLoss(learnt_M ? "SOCM" : "SOCM (constant M)", std::move(problem), std::move(control), options) {
  if (!problem_->constant_sigma()) {
    throw Error(label_ + ": the SOC problem '" + problem_->name() +
                "' has a time-dependent sigma(t), which SOCM's reparametrisation (z = sigma^{-1} ...) does not handle");
  }
  if (learnt_M) {
    M_ = std::make_shared<ReparametrisationMatrix>(problem_->dim(), std::vector<int64_t>{128, 128}, options.socm_gamma,
                                                   options.seed);
  }
}

std::vector<Tensor> SocmSoc::parameters() const {
  std::vector<Tensor> p = control_->parameters();
  if (M_) {
    const std::vector<Tensor> m = M_->parameters();
    p.insert(p.end(), m.begin(), m.end());
  }
  return p;
}

std::vector<ParameterGroup> SocmSoc::parameter_groups() const {
  std::vector<ParameterGroup> g{{control_->parameters(), 0.0}};
  if (M_) g.push_back({M_->parameters(), options_.M_lr});
  return g;
}

LossOutput SocmSoc::compute(Generator& gen) {
  const int64_t K = steps();
  const int64_t B = options_.batch_size, d = problem_->dim();
  const double h = problem_->horizon() / static_cast<double>(K);
  ControlledPaths paths;
  Tensor weight;
  std::vector<Tensor> e(static_cast<size_t>(K) + 1), z(static_cast<size_t>(K) + 1);
  const Tensor sigma = problem_->sigma(0.0).to(at::kDouble);  // constant (checked by the constructor)
  {
    at::NoGradGuard no_grad;
    paths = simulate(*problem_, control_->as_control(), B, K, gen);
    weight = at::softmax(log_importance_weights(paths), 0);  // self-normalised dP*/dP^{u_s}
    const Tensor sigma_inv = at::linalg_inv(sigma);
    for (int64_t j = 0; j < K; ++j) {
      // z_j = sigma^{-1 T} (dW_j + u_s h): as rows, (dW_j + u_s h)^T sigma^{-1}.
      z[j] = at::matmul(paths.dW[j] + paths.u[j] * h, sigma_inv);
      e[j] = problem_->state_cost_grad(paths.x[j], paths.t[j]).to(at::kDouble) * h -
             problem_->drift_vjp(paths.x[j], paths.t[j], z[j]).to(at::kDouble);
    }
    e[K] = problem_->terminal_cost_grad(paths.x[K]).to(at::kDouble);  // M_{t_k}(T) grad g(X_K)
    z[K] = at::zeros({B, d}, at::kDouble);
  }
  std::vector<Tensor> target(static_cast<size_t>(K));
  if (!M_) {
    // M = I: w_k = grad g(X_K) + sum_{j >= k} e_j, backwards.
    Tensor w = e[K];
    for (int64_t k = K - 1; k >= 0; --k) {
      w = w + e[k];
      target[k] = -at::matmul(w, sigma);  // rows of -(sigma^T w)^T
    }
  } else {
    // All pairs (t_k, t_j), k <= j <= K, in one batch, ordered by k then j.
    std::vector<double> tk, tj;
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t j = k; j <= K; ++j) {
        tk.push_back(paths.t[k]);
        tj.push_back(paths.t[j]);
      }
    }
    const auto [M, dM] = (*M_)(at::tensor(at::ArrayRef<double>(tk), at::kDouble), at::tensor(at::ArrayRef<double>(tj), at::kDouble));
    const Tensor E = at::stack(e), Z = at::stack(z);  // [K + 1, B, d]
    int64_t offset = 0;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t n = K + 1 - k;
      // w_k = sum_{j = k}^{K} M_{t_k}(t_j) e_j + dM_{t_k}(t_j) z_j  (z_K = 0; e_K = grad g)
      const Tensor w = at::einsum("jpq,jbq->bp", {M.narrow(0, offset, n), E.narrow(0, k, n)}) +
                       at::einsum("jpq,jbq->bp", {dM.narrow(0, offset, n), Z.narrow(0, k, n)});
      target[k] = -at::matmul(w, sigma);
      offset += n;
    }
  }
  LossOutput out;
  out.loss = regression_loss(*control_, paths, target, weight);
  at::NoGradGuard no_grad;
  out.metrics.emplace_back("control_objective", control_objective(paths));
  out.metrics.emplace_back("normalised_weight_std", normalised_weight_std(paths));
  return out;
}

DiscreteAdjointSoc::DiscreteAdjointSoc(ProblemPtr problem, ParametricControlPtr control, const SocLossOptions& options)
    : SocLoss("discrete adjoint", std::move(problem), std::move(control), options) {}

LossOutput DiscreteAdjointSoc::compute(Generator& gen) {
  const int64_t K = steps();
  const int64_t B = options_.batch_size, d = problem_->dim();
  const double h = problem_->horizon() / static_cast<double>(K), sqrt_h = std::sqrt(h);
  // The same Euler-Maruyama scheme as simulate(), with the graph kept.
  Tensor x = problem_->initial_state(B, gen).to(at::kDouble);
  Tensor cost = at::zeros({B}, at::kDouble);
  for (int64_t k = 0; k < K; ++k) {
    const double t = static_cast<double>(k) * h;
    const Tensor sigma_t = problem_->sigma(t).to(at::kDouble).t();
    const Tensor u = (*control_)(x, t);
    const Tensor dW = sqrt_h * at::randn({B, d}, gen, at::kDouble);
    cost = cost + (problem_->state_cost(x, t) + 0.5 * u.pow(2).sum(1)) * h;
    x = x + (problem_->drift(x, t) + at::matmul(u, sigma_t)) * h + at::matmul(dW, sigma_t);
  }
  cost = cost + problem_->terminal_cost(x);
  LossOutput out;
  out.loss = cost.mean();
  out.metrics.emplace_back("control_objective", out.loss.item<double>());
  return out;
}

namespace {
// Paths of the current control (no gradients), and u_theta on their states, differentiable: [K, B, d].
struct OnPolicy {
  ControlledPaths paths;
  Tensor u_theta, u_s, dW;
  Tensor h;  ///< [K, B]: the time step where the path runs, 0 once it has stopped
};

OnPolicy on_policy(const Problem& problem, const ParametricControl& control, int64_t K, int64_t B, Generator& gen) {
  OnPolicy o;

  {
    at::NoGradGuard no_grad;
    o.paths = simulate(problem, control.as_control(), B, K, gen);
  }
  std::vector<Tensor> ts;
  for (int64_t k = 0; k < K; ++k) ts.push_back(at::full({B}, o.paths.t[k], at::kDouble));
  const std::vector<Tensor> xs(o.paths.x.begin(), o.paths.x.end() - 1);
  o.u_theta = control.evaluate(at::cat(xs), at::cat(ts)).view({K, B, -1});
  o.u_s = at::stack(o.paths.u);
  o.dW = at::stack(o.paths.dW);
  o.h = problem.horizon() / static_cast<double>(K) * at::stack(o.paths.alive);
  return o;
}
}  // namespace

CrossEntropySoc::CrossEntropySoc(ProblemPtr problem, ParametricControlPtr control, const SocLossOptions& options)
    : SocLoss("cross-entropy", std::move(problem), std::move(control), options, /*stopping_time=*/true) {}

LossOutput CrossEntropySoc::compute(Generator& gen) {
  const OnPolicy o = on_policy(*problem_, *control_, steps(), options_.batch_size, gen);
  Tensor w;
  {
    at::NoGradGuard no_grad;
    const Tensor lw = log_importance_weights(o.paths);
    w = at::softmax(lw, 0);  // self-normalised weights, sum 1
  }
  const Tensor per_path = ((0.5 * o.u_theta.pow(2) - o.u_theta * o.u_s).sum(2) * o.h - (o.u_theta * o.dW).sum(2)).sum(0);
  LossOutput out;
  out.loss = (w * per_path).sum();
  at::NoGradGuard no_grad;
  out.metrics.emplace_back("control_objective", control_objective(o.paths));
  out.metrics.emplace_back("normalised_weight_std", normalised_weight_std(o.paths));
  return out;
}

LogVarianceSoc::LogVarianceSoc(ProblemPtr problem, ParametricControlPtr control, const SocLossOptions& options)
    : SocLoss("log-variance", std::move(problem), std::move(control), options, /*stopping_time=*/true) {
  if (options_.batch_size < 2) throw Error("log-variance: batch_size must be >= 2 (it is a variance)");
  min_batch_ = 2;
}

namespace {
// Y = sum_k (1/2 |u_theta|^2 - u_theta . u_s - f) h - sum_k u_theta . dW_k - g: the log-variance family's
// statistic; -V(x0) on every path when u_theta = u* (SOCM, Nusken & Richter 2021).
Tensor log_ratio_statistic(const OnPolicy& o) {
  return ((0.5 * o.u_theta.pow(2) - o.u_theta * o.u_s).sum(2) * o.h - (o.u_theta * o.dW).sum(2)).sum(0) -
         o.paths.state_cost - o.paths.terminal_cost;
}
}  // namespace

LossOutput LogVarianceSoc::compute(Generator& gen) {
  const OnPolicy o = on_policy(*problem_, *control_, steps(), options_.batch_size, gen);
  const Tensor Y = log_ratio_statistic(o);
  LossOutput out;
  out.loss = Y.var(/*unbiased=*/true);
  at::NoGradGuard no_grad;
  out.metrics.emplace_back("control_objective", control_objective(o.paths));
  return out;
}

VarianceSoc::VarianceSoc(ProblemPtr problem, ParametricControlPtr control, const SocLossOptions& options)
    : SocLoss("variance", std::move(problem), std::move(control), options, /*stopping_time=*/true) {
  if (options_.batch_size < 2) throw Error("variance: batch_size must be >= 2 (it is a variance)");
  min_batch_ = 2;
}

LossOutput VarianceSoc::compute(Generator& gen) {
  const OnPolicy o = on_policy(*problem_, *control_, steps(), options_.batch_size, gen);
  const Tensor Y = log_ratio_statistic(o);
  // exp(Y - shift) with a detached shift: the ratio var / mean^2 does not depend on it.
  const Tensor shift = Y.detach().max();
  const Tensor e = at::exp(Y - shift);
  LossOutput out;
  out.loss = e.var(/*unbiased=*/true) / e.detach().mean().pow(2);
  at::NoGradGuard no_grad;
  out.metrics.emplace_back("control_objective", control_objective(o.paths));
  return out;
}

MomentSoc::MomentSoc(ProblemPtr problem, ParametricControlPtr control, const SocLossOptions& options, double y0)
    : SocLoss("moment", std::move(problem), std::move(control), options, /*stopping_time=*/true),
      y0_(at::full({}, y0, at::kDouble).requires_grad_(true)) {}

std::vector<Tensor> MomentSoc::parameters() const {
  std::vector<Tensor> p = control_->parameters();
  p.push_back(y0_);
  return p;
}

std::vector<ParameterGroup> MomentSoc::parameter_groups() const {
  return {{control_->parameters(), 0.0}, {{y0_}, options_.y0_lr}};
}

double MomentSoc::y0() const { return y0_.item<double>(); }

LossOutput MomentSoc::compute(Generator& gen) {
  const OnPolicy o = on_policy(*problem_, *control_, steps(), options_.batch_size, gen);
  LossOutput out;
  out.loss = (log_ratio_statistic(o) + y0_).pow(2).mean();
  at::NoGradGuard no_grad;
  out.metrics.emplace_back("control_objective", control_objective(o.paths));
  out.metrics.emplace_back("y0", y0());
  return out;
}

ReinforceSoc::ReinforceSoc(ProblemPtr problem, ParametricControlPtr control, const SocLossOptions& options)
    : SocLoss("reinforce", std::move(problem), std::move(control), options, /*stopping_time=*/true) {}

LossOutput ReinforceSoc::compute(Generator& gen) {
  const OnPolicy o = on_policy(*problem_, *control_, steps(), options_.batch_size, gen);
  // grad log p(path) = sum_k (d u_theta(X_k))^T dW_k for the Euler-Maruyama kernel with control u_theta.
  const Tensor cost = (o.paths.running_cost + o.paths.terminal_cost).detach();
  const Tensor score = (o.u_theta * o.dW).sum(2).sum(0);
  const Tensor explicit_cost = (0.5 * o.u_theta.pow(2).sum(2) * o.h).sum(0);
  LossOutput out;
  out.loss = (cost * score + explicit_cost).mean();
  at::NoGradGuard no_grad;
  out.metrics.emplace_back("control_objective", cost.mean().item<double>());
  return out;
}

const std::vector<std::string>& soc_loss_names() {
  static const std::vector<std::string> names{"adjoint_matching", "continuous_adjoint", "discrete_adjoint", "socm",
                                              "socm_const_M",     "cross_entropy",      "log_variance",     "variance",
                                              "moment",           "reinforce"};
  return names;
}

void check_soc_loss_name(const std::string& name) {
  std::string valid;
  for (const auto& n : soc_loss_names()) {
    if (n == name) return;
    valid += (valid.empty() ? "" : ", ") + n;
  }
  throw Error("unknown SOC loss '" + name + "' (valid: " + valid + ")");
}

std::unique_ptr<Loss> make_soc_loss(const std::string& name, ProblemPtr problem, ParametricControlPtr control,
                                    const SocLossOptions& options) {
  check_soc_loss_name(name);
  if (name == "adjoint_matching") return std::make_unique<AdjointMatchingSoc>(problem, control, options);
  if (name == "continuous_adjoint") return std::make_unique<ContinuousAdjointSoc>(problem, control, options);
  if (name == "discrete_adjoint") return std::make_unique<DiscreteAdjointSoc>(problem, control, options);
  if (name == "socm") return std::make_unique<SocmSoc>(problem, control, options, /*learnt_M=*/true);
  if (name == "socm_const_M") return std::make_unique<SocmSoc>(problem, control, options, /*learnt_M=*/false);
  if (name == "cross_entropy") return std::make_unique<CrossEntropySoc>(problem, control, options);
  if (name == "log_variance") return std::make_unique<LogVarianceSoc>(problem, control, options);
  if (name == "variance") return std::make_unique<VarianceSoc>(problem, control, options);
  if (name == "moment") return std::make_unique<MomentSoc>(problem, control, options);
  return std::make_unique<ReinforceSoc>(problem, control, options);  // the last name check_soc_loss_name lets through
}

}  // namespace tilt::soc
