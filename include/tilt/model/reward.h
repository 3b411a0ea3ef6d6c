// Rewards r(x) with their gradients. Fine-tuning targets p*(x) ∝ p_base(x) exp(lambda r(x))
// (docs/equations.md, E18). A reward needs only its value: the gradient defaults to autograd. The
// closed-form rewards below also implement MixtureTilt (tilt/model/gmm.h): for a Gaussian-mixture
// base they give p* exactly (exact_tilt).
#pragma once

#include "tilt/core/tensor.h"
#include "tilt/model/gmm.h"

#include <functional>
#include <memory>
#include <optional>
#include <string>

namespace tilt {

class Reward {
 public:
  virtual ~Reward() = default;
  virtual std::string kind() const = 0;
  virtual int64_t dim() const = 0;
  /// r(x), shape [B].
  virtual Tensor value(const Tensor& x) const = 0;
  /// grad_x r(x), shape [B, d]. The default differentiates value() by autograd (with gradients
  /// enabled even under a NoGradGuard); rewards with a closed-form gradient override it.
  virtual Tensor grad(const Tensor& x) const;
  /// False for a reward with no gradient (a class indicator): only the methods that need reward values alone
  /// (ram, ddpo, grpo) take it, and grad() throws tilt::Error.
  virtual bool differentiable() const { return true; }

  /// The size of the condition c of r(x, c) (docs/conditions.md); 0 for an unconditional reward.
  virtual int64_t condition_dim() const { return 0; }
  /// r(x, c) for c [B, condition_dim()] or [1, ...]. The default accepts only an undefined c (an
  /// unconditional reward: value(x)) and throws tilt::Error naming the kind otherwise.
  virtual Tensor conditional_value(const Tensor& x, const Tensor& c) const;
  /// grad_x r(x, c); by default grad(x) for an undefined c, else autograd of conditional_value().
  virtual Tensor conditional_grad(const Tensor& x, const Tensor& c) const;
  /// Moves the reward's network to `device` (docs/devices.md); closed-form rewards need nothing (they
  /// compute on their input's device), the default. Const: a move changes no value, and rewards are
  /// shared as RewardPtr (const).
  virtual void to(const at::Device& device) const { (void)device; }
};

using RewardPtr = std::shared_ptr<const Reward>;

/// A reward from a C++ callable: r(x) maps x [B, d] to [B] with differentiable tensor operations;
/// the gradient is taken by autograd. No closed-form tilt.
class FunctionReward : public Reward {
 public:
  using Function = std::function<Tensor(const Tensor& x)>;
  /// Throws tilt::Error if dim < 1 or the function is empty.
  FunctionReward(int64_t dim, Function r, std::string kind = "function");
  std::string kind() const override { return kind_; }
  int64_t dim() const override { return dim_; }
  /// Throws tilt::Error naming the reward if r(x) is not a floating-point tensor of shape [B].
  Tensor value(const Tensor& x) const override;

 private:
  int64_t dim_;
  Function r_;
  std::string kind_;
};

/// r(x) = a . x.
class LinearReward : public Reward, public MixtureTilt {
 public:
  explicit LinearReward(Tensor a);
  std::string kind() const override { return "linear"; }
  int64_t dim() const override { return a_.size(0); }
  Tensor value(const Tensor& x) const override;
  Tensor grad(const Tensor& x) const override;
  std::optional<GaussianMixture> tilt(const GaussianMixture& base, double lambda,
                                      double* log_z = nullptr) const override;
  const Tensor& a() const { return a_; }

 private:
  Tensor a_;
};

/// r(x) = -1/2 (x - c)^T A (x - c), A symmetric positive semi-definite.
class QuadraticReward : public Reward, public MixtureTilt {
 public:
  QuadraticReward(Tensor center, Tensor A);
  std::string kind() const override { return "quadratic"; }
  int64_t dim() const override { return c_.size(0); }
  Tensor value(const Tensor& x) const override;
  Tensor grad(const Tensor& x) const override;
  std::optional<GaussianMixture> tilt(const GaussianMixture& base, double lambda,
                                      double* log_z = nullptr) const override;
  const Tensor& center() const { return c_; }
  const Tensor& matrix() const { return A_; }

 private:
  Tensor c_, A_;
};

/// r(x) = the share of x's coordinates above a threshold: for images, the share of inked pixels. A count, so it has
/// no gradient (grad throws; only the methods that need reward values alone take it: docs/ram.md).
class InkCountReward : public Reward {
 public:
  /// Throws tilt::Error if dim < 1 or the threshold is not finite.
  InkCountReward(int64_t dim, double threshold);
  std::string kind() const override { return "ink_count"; }
  int64_t dim() const override { return dim_; }
  Tensor value(const Tensor& x) const override;
  Tensor grad(const Tensor& x) const override;
  bool differentiable() const override { return false; }
  double threshold() const { return threshold_; }

 private:
  int64_t dim_;
  double threshold_;
};

/// r(x) = log q(x) for a Gaussian mixture q; p* is closed form for lambda = 1 (a product).
class GmmLogDensityReward : public Reward, public MixtureTilt {
 public:
  explicit GmmLogDensityReward(std::shared_ptr<const GaussianMixture> q);
  std::string kind() const override { return "gmm"; }
  int64_t dim() const override { return q_->dim(); }
  Tensor value(const Tensor& x) const override;
  Tensor grad(const Tensor& x) const override;
  std::optional<GaussianMixture> tilt(const GaussianMixture& base, double lambda,
                                      double* log_z = nullptr) const override;
  const GaussianMixture& mixture() const { return *q_; }

 private:
  std::shared_ptr<const GaussianMixture> q_;
};

}  // namespace tilt
