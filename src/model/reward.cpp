#include "tilt/model/reward.h"

#include "tilt/core/check.h"
#include "tilt/core/error.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/autograd.h>

#include <cmath>
#include <functional>

namespace tilt {

namespace {

// grad_x of r(x) = value(x) ([B]) by autograd, with gradients enabled even under a NoGradGuard.
Tensor autograd_gradient(const Tensor& x, const std::function<Tensor(const Tensor&)>& value) {
  at::AutoGradMode enable_grad(true);
  const Tensor xg = x.detach().requires_grad_(true);
  const Tensor r = value(xg);
  // A reward that does not depend on x (or detaches it) has gradient 0.
  if (!r.requires_grad()) return at::zeros_like(x);
  Tensor g = torch::autograd::grad({r.sum()}, {xg}, /*grad_outputs=*/{}, /*retain_graph=*/false,
                                   /*create_graph=*/false, /*allow_unused=*/true)[0];
  return g.defined() ? g : at::zeros_like(x);
}

}  // namespace

Tensor Reward::grad(const Tensor& x) const {
  check_batch(x, dim(), "x");
  return autograd_gradient(x, [this](const Tensor& xg) { return value(xg); });
}

Tensor Reward::conditional_value(const Tensor& x, const Tensor& c) const {
  if (c.defined()) {
    throw Error("the reward '" + kind() + "' takes no condition, but one was given (" + shape_string(c) + ")");
  }
  return value(x);
}

Tensor Reward::conditional_grad(const Tensor& x, const Tensor& c) const {
  if (!c.defined()) return grad(x);
  check_batch(x, dim(), "x");
  const Tensor cd = c.detach();
  return autograd_gradient(x, [this, &cd](const Tensor& xg) { return conditional_value(xg, cd); });
}

FunctionReward::FunctionReward(int64_t dim, Function r, std::string kind)
    : dim_(dim), r_(std::move(r)), kind_(std::move(kind)) {
  if (dim_ < 1) throw Error("reward '" + kind_ + "': dim must be >= 1, got " + std::to_string(dim_));
  if (!r_) throw Error("reward '" + kind_ + "': no function given");
}

Tensor FunctionReward::value(const Tensor& x) const {
  check_batch(x, dim_, "x");
  Tensor r = r_(x);
  if (!r.defined() || r.dim() != 1 || r.size(0) != x.size(0)) {
    throw Error("reward '" + kind_ + "': the function must return one value per row, [" +
                std::to_string(x.size(0)) + "], got " + shape_string(r));
  }
  if (!at::isFloatingType(r.scalar_type())) {  // an integer reward has no gradient for the adjoint
    throw Error("reward '" + kind_ + "': the function must return floating-point values, got " +
                std::string(c10::toString(r.scalar_type())));
  }
  return r;
}

InkCountReward::InkCountReward(int64_t dim, double threshold) : dim_(dim), threshold_(threshold) {
  if (dim_ < 1) throw Error("ink count reward: dim must be >= 1, got " + std::to_string(dim_));
  if (!std::isfinite(threshold_)) throw Error("ink count reward: the threshold must be finite");
}

Tensor InkCountReward::value(const Tensor& x) const {
  check_batch(x, dim(), "x");
  return x.gt(threshold_).to(x.scalar_type()).mean(1);
}

Tensor InkCountReward::grad(const Tensor&) const {
  throw Error("the reward 'ink_count' (the share of pixels above a threshold) has no gradient: fine-tune with a method "
              "that needs reward values only (ram, ddpo, grpo)");
}

LinearReward::LinearReward(Tensor a) : a_(a.defined() ? a.to(at::kDouble).contiguous() : a) {
  if (!a_.defined() || a_.dim() != 1 || a_.size(0) < 1) {
    throw Error("linear reward: a must be a vector [d], got " + shape_string(a_));
  }
}

Tensor LinearReward::value(const Tensor& x) const {
  check_batch(x, dim(), "x");
  return at::matmul(x, a_.to(x.device(), x.scalar_type()));
}

Tensor LinearReward::grad(const Tensor& x) const {
  check_batch(x, dim(), "x");
  return a_.to(x.device(), x.scalar_type()).unsqueeze(0).expand_as(x).clone();
}

std::optional<GaussianMixture> LinearReward::tilt(const GaussianMixture& base, double lambda,
                                                  double* log_z) const {
  return base.tilt_linear(lambda * a_, log_z);
}

QuadraticReward::QuadraticReward(Tensor center, Tensor A) {
  if (!center.defined() || center.dim() != 1) {
    throw Error("quadratic reward: center must be a vector [d], got " + shape_string(center));
  }
  c_ = center.to(at::kDouble).contiguous();
  const int64_t d = c_.size(0);
  if (!A.defined() || A.dim() != 2 || A.size(0) != d || A.size(1) != d) {
    throw Error("quadratic reward: precision matrix must be [" + std::to_string(d) + ", " +
                std::to_string(d) + "], got " + shape_string(A));
  }
  A_ = A.to(at::kDouble).contiguous();
  if ((A_ - A_.t()).abs().max().item<double>() > 1e-9 * (1.0 + A_.abs().max().item<double>())) {
    throw Error("quadratic reward: precision matrix must be symmetric");
  }
  if (at::linalg_eigvalsh(A_).min().item<double>() < -1e-9) {
    throw Error("quadratic reward: precision matrix must be positive semi-definite");
  }
}

Tensor QuadraticReward::value(const Tensor& x) const {
  check_batch(x, dim(), "x");
  const Tensor r = x - c_.to(x.device(), x.scalar_type());
  return -0.5 * (r * at::matmul(r, A_.to(x.device(), x.scalar_type()))).sum(1);
}

Tensor QuadraticReward::grad(const Tensor& x) const {
  check_batch(x, dim(), "x");
  return -at::matmul(x - c_.to(x.device(), x.scalar_type()), A_.to(x.device(), x.scalar_type()));
}

std::optional<GaussianMixture> QuadraticReward::tilt(const GaussianMixture& base, double lambda,
                                                     double* log_z) const {
  return base.tilt_quadratic(c_, lambda * A_, log_z);
}

GmmLogDensityReward::GmmLogDensityReward(std::shared_ptr<const GaussianMixture> q) : q_(std::move(q)) {
  if (!q_) throw Error("gmm reward: no mixture given");
}

Tensor GmmLogDensityReward::value(const Tensor& x) const { return q_->log_prob(x); }

Tensor GmmLogDensityReward::grad(const Tensor& x) const { return q_->score(x); }

std::optional<GaussianMixture> GmmLogDensityReward::tilt(const GaussianMixture& base, double lambda,
                                                         double* log_z) const {
  if (lambda != 1.0) return std::nullopt;
  return base.product(*q_, log_z);
}

}  // namespace tilt
