// Rewards r(x) with their gradients. Fine-tuning targets p*(x) ∝ p_base(x) exp(lambda r(x))
// (docs/equations.md, E18); for a Gaussian-mixture base each reward here says whether p* is closed form.
#pragma once

#include "tilt/core/tensor.h"
#include "tilt/model/gmm.h"

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
  /// grad_x r(x), shape [B, d].
  virtual Tensor grad(const Tensor& x) const = 0;
  /// The exact tilted target p_base exp(lambda r) / Z when it is a Gaussian mixture again, with
  /// log Z in *log_z; nullopt when there is no closed form.
  virtual std::optional<GaussianMixture> tilt(const GaussianMixture& base, double lambda,
                                              double* log_z = nullptr) const = 0;
};

using RewardPtr = std::shared_ptr<const Reward>;

/// r(x) = a . x.
class LinearReward : public Reward {
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
class QuadraticReward : public Reward {
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

/// r(x) = log q(x) for a Gaussian mixture q; p* is closed form for lambda = 1 (a product).
class GmmLogDensityReward : public Reward {
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
