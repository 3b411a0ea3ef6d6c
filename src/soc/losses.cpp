// The control network and the SOC losses.
#include "tilt/soc/control.h"
#include "tilt/soc/losses.h"

#include "tilt/core/error.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>  // at::NoGradGuard; not pulled in by ATen.h since LibTorch 2.0

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
  for (int64_t k = K - 1; k >= 0; --k) {
    // a_k = d/dX_k of sum_{j >= k} f(X_j) h + g(X_K) through the uncontrolled Euler step
    // X_{j+1} = X_j + h b(X_j): the control's dependence on X and its cost are left out, which is what
    // makes the adjoint "lean" (Adjoint Matching, Eq. 38-39; spec section 4).
    const double t = static_cast<double>(k) * h;
    a[k] = a[k + 1] + h * (problem.drift_vjp(x[k], t, a[k + 1]).to(at::kDouble) +
                           problem.state_cost_grad(x[k], t).to(at::kDouble));
  }
  return a;
}

SocLoss::SocLoss(const std::string& label, ProblemPtr problem, ParametricControlPtr control,
                 const SocLossOptions& options)
    : problem_(std::move(problem)), control_(std::move(control)), options_(options) {
  if (!problem_) throw Error(label + ": no SOC problem");
  if (!control_) throw Error(label + ": no control network");
  if (control_->dim() != problem_->dim()) {
    throw Error(label + ": the control network has dimension " + std::to_string(control_->dim()) +
                " but the problem '" + problem_->name() + "' has dimension " + std::to_string(problem_->dim()));
  }
  if (options_.batch_size < 1) throw Error(label + ": batch_size must be >= 1");
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
  const Tensor sigma = problem_->sigma().to(at::kDouble);
  std::vector<Tensor> xs, ts, targets;
  for (int64_t k = 0; k < K; ++k) {
    xs.push_back(paths.x[k]);
    ts.push_back(at::full({B}, static_cast<double>(k) * h, at::kDouble));
    targets.push_back(-at::matmul(a[k], sigma));  // rows of -(sigma^T a)^T
  }
  const Tensor residual = control_->evaluate(at::cat(xs), at::cat(ts)) - at::cat(targets);
  LossOutput out;
  out.loss = residual.pow(2).sum(1).mean();  // = (1/K) sum_k mean_b |u + sigma^T a|^2
  at::NoGradGuard no_grad;
  out.metrics.emplace_back("control_objective", control_objective(paths));
  return out;
}

DiscreteAdjointSoc::DiscreteAdjointSoc(ProblemPtr problem, ParametricControlPtr control, const SocLossOptions& options)
    : SocLoss("discrete adjoint", std::move(problem), std::move(control), options) {}

LossOutput DiscreteAdjointSoc::compute(Generator& gen) {
  const int64_t K = steps();
  const int64_t B = options_.batch_size, d = problem_->dim();
  const double h = problem_->horizon() / static_cast<double>(K), sqrt_h = std::sqrt(h);
  const Tensor sigma_t = problem_->sigma().to(at::kDouble).t();
  // The same Euler-Maruyama scheme as simulate(), with the graph kept.
  Tensor x = problem_->initial_state(B, gen).to(at::kDouble);
  Tensor cost = at::zeros({B}, at::kDouble);
  for (int64_t k = 0; k < K; ++k) {
    const double t = static_cast<double>(k) * h;
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
  double h;
};

OnPolicy on_policy(const Problem& problem, const ParametricControl& control, int64_t K, int64_t B, Generator& gen) {
  OnPolicy o;
  o.h = problem.horizon() / static_cast<double>(K);
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
  return o;
}
}  // namespace

CrossEntropySoc::CrossEntropySoc(ProblemPtr problem, ParametricControlPtr control, const SocLossOptions& options)
    : SocLoss("cross-entropy", std::move(problem), std::move(control), options) {}

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
    : SocLoss("log-variance", std::move(problem), std::move(control), options) {
  if (options_.batch_size < 2) throw Error("log-variance: batch_size must be >= 2 (it is a variance)");
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
    : SocLoss("variance", std::move(problem), std::move(control), options) {
  if (options_.batch_size < 2) throw Error("variance: batch_size must be >= 2 (it is a variance)");
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
    : SocLoss("moment", std::move(problem), std::move(control), options),
      y0_(at::full({}, y0, at::kDouble).requires_grad_(true)) {}

std::vector<Tensor> MomentSoc::parameters() const {
  std::vector<Tensor> p = control_->parameters();
  p.push_back(y0_);
  return p;
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
    : SocLoss("reinforce", std::move(problem), std::move(control), options) {}

LossOutput ReinforceSoc::compute(Generator& gen) {
  const OnPolicy o = on_policy(*problem_, *control_, steps(), options_.batch_size, gen);
  // grad log p(path) = sum_k (d u_theta(X_k))^T dW_k for the Euler-Maruyama kernel with control u_theta.
  const Tensor cost = (o.paths.running_cost + o.paths.terminal_cost).detach();
  const Tensor score = (o.u_theta * o.dW).sum(2).sum(0);
  const Tensor explicit_cost = 0.5 * o.u_theta.pow(2).sum(2).sum(0) * o.h;
  LossOutput out;
  out.loss = (cost * score + explicit_cost).mean();
  at::NoGradGuard no_grad;
  out.metrics.emplace_back("control_objective", cost.mean().item<double>());
  return out;
}

const std::vector<std::string>& soc_loss_names() {
  static const std::vector<std::string> names{"adjoint_matching", "discrete_adjoint", "cross_entropy", "log_variance",
                                              "variance",         "moment",           "reinforce"};
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
  if (name == "discrete_adjoint") return std::make_unique<DiscreteAdjointSoc>(problem, control, options);
  if (name == "cross_entropy") return std::make_unique<CrossEntropySoc>(problem, control, options);
  if (name == "log_variance") return std::make_unique<LogVarianceSoc>(problem, control, options);
  if (name == "variance") return std::make_unique<VarianceSoc>(problem, control, options);
  if (name == "moment") return std::make_unique<MomentSoc>(problem, control, options);
  return std::make_unique<ReinforceSoc>(problem, control, options);  // the last name check_soc_loss_name lets through
}

}  // namespace tilt::soc
