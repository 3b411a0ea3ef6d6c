#include "tilt/model/conditional_gmm.h"

#include "tilt/core/check.h"
#include "tilt/core/error.h"

#include <ATen/ATen.h>

#include <cmath>
#include <vector>

namespace tilt {

namespace {

Tensor matrix(const Tensor& m, int64_t rows, const std::string& what) {
  if (!m.defined() || m.dim() != 2 || m.size(0) != rows || m.size(1) < 1) {
    throw Error(what + " must be [" + std::to_string(rows) + ", dc] with dc >= 1, got " + shape_string(m));
  }
  return m.to(at::kDouble).contiguous();
}

Tensor vector(const Tensor& v, const std::string& what) {
  if (!v.defined() || v.dim() != 1 || v.size(0) < 1) throw Error(what + " must be a vector [d], got " + shape_string(v));
  return v.to(at::kDouble).contiguous();
}

// One condition as a row [1, dc] (float64), from [dc] or [1, dc].
Tensor one_condition(const Tensor& c, int64_t dc, const std::string& who) {
  if (!c.defined() || c.numel() != dc || (c.dim() != 1 && !(c.dim() == 2 && c.size(0) == 1))) {
    throw Error(who + ": needs one condition of size " + std::to_string(dc) + ", got " + shape_string(c));
  }
  return c.to(at::kDouble).reshape({1, dc});
}

// M c per row, [B, d], in x's dtype.
Tensor moved(const Tensor& x, const Tensor& c, const Tensor& M, const std::string& who) {
  const Tensor rows = condition_rows(c, x.size(0), M.size(1), who);
  if (!rows.defined()) throw Error(who + " needs a condition (it has no null one)");
  return at::matmul(rows.to(x.scalar_type()), M.to(x.scalar_type()).t());
}

}  // namespace

ConditionalGmmVelocity::ConditionalGmmVelocity(std::shared_ptr<const GaussianMixture> mixture, Tensor shift,
                                               SchedulePtr schedule, std::shared_ptr<const GaussianMixture> null)
    : VelocityField(std::move(schedule)), mixture_(std::move(mixture)), null_(std::move(null)) {
  if (!mixture_) throw Error("conditional mixture: no mixture given");
  shift_ = matrix(shift, mixture_->dim(), "conditional mixture: the shift M");
  if (null_ && null_->dim() != mixture_->dim()) {
    throw Error("conditional mixture: the null condition's mixture has dimension " + std::to_string(null_->dim()) +
                ", the base " + std::to_string(mixture_->dim()));
  }
}

VelocityFieldPtr ConditionalGmmVelocity::clone() const {
  return std::make_shared<ConditionalGmmVelocity>(mixture_, shift_, schedule(), null_);
}

Tensor ConditionalGmmVelocity::velocity(const Tensor& x, const Tensor& t) const {
  const GaussianMixture& null = null_mixture();
  check_batch(x, dim(), "x");
  check_time(t, x.size(0), "t");
  return null.velocity(x, schedule()->at(t.to(x.scalar_type())));
}

Tensor ConditionalGmmVelocity::vjp(const Tensor& x, double t, const Tensor& a, Tensor* v_out) const {
  const GaussianMixture& null = null_mixture();
  check_batch(x, dim(), "x");
  return null.velocity_vjp(x, schedule()->at(at::scalar_tensor(t, x.options())), a, v_out);
}

// v(x, t | c) = v_0(x - alpha_t M c, t) + alpha'_t M c.
Tensor ConditionalGmmVelocity::conditional_velocity(const Tensor& x, const Tensor& t, const Tensor& c) const {
  if (!c.defined()) return velocity(x, t);
  check_batch(x, dim(), "x");
  check_time(t, x.size(0), "t");
  const ScheduleTensors s = schedule()->at(t.to(x.scalar_type()));
  const Tensor m = moved(x, c, shift_, "conditional mixture");
  const Tensor alpha = s.alpha.dim() == 0 ? s.alpha : s.alpha.reshape({-1, 1});
  const Tensor d_alpha = s.d_alpha.dim() == 0 ? s.d_alpha : s.d_alpha.reshape({-1, 1});
  return mixture_->velocity(x - alpha * m, s) + d_alpha * m;
}

Tensor ConditionalGmmVelocity::conditional_vjp(const Tensor& x, double t, const Tensor& c, const Tensor& a,
                                               Tensor* v_out) const {
  if (!c.defined()) return vjp(x, t, a, v_out);
  check_batch(x, dim(), "x");
  const ScheduleValues s = schedule()->at(t);
  const Tensor m = moved(x, c, shift_, "conditional mixture");
  const Tensor g = mixture_->velocity_vjp(x - s.alpha * m, schedule()->at(at::scalar_tensor(t, x.options())), a, v_out);
  if (v_out) *v_out = *v_out + s.d_alpha * m;
  return g;
}

GaussianMixture moved_mixture(const GaussianMixture& p0, const Tensor& shift, const Tensor& c) {
  const Tensor row = one_condition(c, shift.size(1), "conditional mixture");
  return GaussianMixture(p0.weights(), p0.means() + at::matmul(row, shift.to(at::kDouble).t()), p0.covariances());
}

GaussianMixture ConditionalGmmVelocity::mixture_at(const Tensor& c) const { return moved_mixture(*mixture_, shift_, c); }

const GaussianMixture& ConditionalGmmVelocity::null_mixture() const {
  if (!null_) {
    throw Error("conditional mixture: there is no null condition for guidance (no unconditional law was given: "
                "[base] null = \"none\"; null = \"average\" gives the average over the training conditions)");
  }
  return *null_;
}

GaussianMixture ConditionalGmmVelocity::marginal(const ConditionSet& conditions) const {
  if (conditions.dim() != condition_dim()) {
    throw Error("conditional mixture: the conditions have size " + std::to_string(conditions.dim()) +
                " but the mixture takes " + std::to_string(condition_dim()));
  }
  if (conditions.is_box()) {
    throw Error("conditional mixture: the average over a box of conditions is not a finite mixture (give a finite set)");
  }
  const int64_t N = conditions.size(), K = mixture_->components(), d = dim();
  // Component (j, k): mean mu_k + M c_j, weight w_k / N.
  const Tensor shifts = at::matmul(conditions.values(), shift_.t());  // [N, d]
  const Tensor means = (mixture_->means().unsqueeze(0) + shifts.unsqueeze(1)).reshape({N * K, d});
  const Tensor weights = mixture_->weights().unsqueeze(0).expand({N, K}).reshape({N * K});
  const Tensor covs = mixture_->covariances().unsqueeze(0).expand({N, K, d, d}).reshape({N * K, d, d});
  return GaussianMixture(weights, means, covs);
}

ConditionalQuadraticReward::ConditionalQuadraticReward(Tensor center, Tensor N, Tensor A) {
  center_ = vector(center, "conditional quadratic reward: the center");
  N_ = matrix(N, center_.size(0), "conditional quadratic reward: N");
  QuadraticReward check(center_, A);  // validates A (square, symmetric, positive semi-definite)
  A_ = check.matrix();
}

Tensor ConditionalQuadraticReward::centres(const Tensor& x, const Tensor& c) const {
  return center_.to(x.scalar_type()).unsqueeze(0) + moved(x, c, N_, "conditional quadratic reward");
}

Tensor ConditionalQuadraticReward::value(const Tensor& x) const { return conditional_value(x, Tensor()); }

Tensor ConditionalQuadraticReward::conditional_value(const Tensor& x, const Tensor& c) const {
  check_batch(x, dim(), "x");
  const Tensor r = x - centres(x, c);
  return -0.5 * (r * at::matmul(r, A_.to(x.scalar_type()))).sum(1);
}

Tensor ConditionalQuadraticReward::conditional_grad(const Tensor& x, const Tensor& c) const {
  check_batch(x, dim(), "x");
  return -at::matmul(x - centres(x, c), A_.to(x.scalar_type()));
}

RewardPtr ConditionalQuadraticReward::at(const Tensor& c) const {
  const Tensor row = one_condition(c, condition_dim(), "conditional quadratic reward");
  return std::make_shared<QuadraticReward>(center_ + at::matmul(row, N_.t())[0], A_);
}

ConditionalLinearReward::ConditionalLinearReward(Tensor a, Tensor N) {
  a_ = vector(a, "conditional linear reward: a");
  N_ = matrix(N, a_.size(0), "conditional linear reward: N");
}

Tensor ConditionalLinearReward::directions(const Tensor& x, const Tensor& c) const {
  return a_.to(x.scalar_type()).unsqueeze(0) + moved(x, c, N_, "conditional linear reward");
}

Tensor ConditionalLinearReward::value(const Tensor& x) const { return conditional_value(x, Tensor()); }

Tensor ConditionalLinearReward::conditional_value(const Tensor& x, const Tensor& c) const {
  check_batch(x, dim(), "x");
  return (x * directions(x, c)).sum(1);
}

Tensor ConditionalLinearReward::conditional_grad(const Tensor& x, const Tensor& c) const {
  check_batch(x, dim(), "x");
  return directions(x, c).expand_as(x).clone();
}

RewardPtr ConditionalLinearReward::at(const Tensor& c) const {
  const Tensor row = one_condition(c, condition_dim(), "conditional linear reward");
  return std::make_shared<LinearReward>(a_ + at::matmul(row, N_.t())[0]);
}

std::optional<GaussianMixture> exact_conditional_tilt(const VelocityField& base, const Reward& reward,
                                                      const Tensor& c, double lambda, double* log_z) {
  std::optional<GaussianMixture> mixture;
  if (const auto* conditional = dynamic_cast<const ConditionalGmmVelocity*>(&base)) {
    mixture = conditional->mixture_at(c);
  } else if (const auto* plain = dynamic_cast<const GmmVelocity*>(&base)) {
    mixture = plain->mixture();
  } else {
    return std::nullopt;
  }
  if (reward.condition_dim() == 0) return exact_tilt(reward, *mixture, lambda, log_z);
  const auto* moving = dynamic_cast<const ConditionalMixtureTilt*>(&reward);
  if (!moving) return std::nullopt;
  return exact_tilt(*moving->at(c), *mixture, lambda, log_z);
}

}  // namespace tilt

namespace tilt {

GaussianMixture ConditionalProblem::exact(const Tensor& c) const {
  auto tilted = exact_conditional_tilt(*base, *reward, c, lambda);
  if (!tilted) throw Error("conditional problem: no closed-form tilt");
  return *tilted;
}

ConditionalProblem random_conditional_problem(int64_t d, int64_t dc, uint64_t seed, SchedulePtr schedule,
                                              int64_t n_train, int64_t n_held_out, int64_t n_outside) {
  if (d < 1 || dc < 1 || n_train < 1 || n_held_out < 1 || n_outside < 1) {
    throw Error("random conditional problem: needs d, dc and every set size >= 1");
  }
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  Generator gen = make_generator(mix_seed(seed, 0x636f6e64));  // "cond"
  const int64_t K = 3;
  // Means spread over a few standard deviations; covariances R diag(s^2) R^T with s in [0.3, 0.8].
  const Tensor means = 1.5 * at::randn({K, d}, gen, f64);
  std::vector<Tensor> covs;
  for (int64_t k = 0; k < K; ++k) {
    const Tensor R = std::get<0>(at::linalg_qr(at::randn({d, d}, gen, f64)));
    const Tensor s = 0.3 + 0.5 * at::rand({d}, gen, f64);
    covs.push_back(at::matmul(R * (s * s).unsqueeze(0), R.t()));
  }
  const Tensor weights = 0.5 + at::rand({K}, gen, f64);
  const double scale = 1.0 / std::sqrt(static_cast<double>(dc));
  ConditionalProblem p;
  p.base = std::make_shared<ConditionalGmmVelocity>(
      std::make_shared<GaussianMixture>(weights, means, at::stack(covs)), scale * at::randn({d, dc}, gen, f64),
      std::move(schedule));
  p.reward = std::make_shared<ConditionalQuadraticReward>(at::randn({d}, gen, f64), 1.5 * scale * at::randn({d, dc}, gen, f64),
                                                          at::diag(0.3 + 0.5 * at::rand({d}, gen, f64)));
  p.train = 2.0 * at::rand({n_train, dc}, gen, f64) - 1.0;
  p.held_out = 2.0 * at::rand({n_held_out, dc}, gen, f64) - 1.0;
  // Outside: a direction of [-1, 1]^dc scaled so that its largest coordinate is 1.5 or 2 in magnitude.
  const Tensor u = 2.0 * at::rand({n_outside, dc}, gen, f64) - 1.0;
  const Tensor reach = at::arange(n_outside, f64).remainder(2.0) * 0.5 + 1.5;
  p.outside = u / std::get<0>(u.abs().max(1, true)) * reach.unsqueeze(1);
  return p;
}

}  // namespace tilt
