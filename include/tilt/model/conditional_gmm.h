// Exact ground truth for conditions (docs/conditions.md; docs/equations.md, E98-E99): a Gaussian-mixture
// base whose means move with c, and rewards whose centre or direction moves with c, so that
// p*(x | c) ∝ p_base(x | c) exp(lambda r(x, c)) is a Gaussian mixture, in closed form, for every c.
//
//   p_base(x | c) = p_0(x - M c)                   (the mixture p_0 translated by M c, M [d, dc])
//   v(x, t | c)   = v_0(x - alpha_t M c, t) + alpha'_t M c
//
// since X_t = alpha_t X_1 + beta_t X_0 with X_1 = Y + M c, Y ~ p_0, is the flow of p_0 shifted by
// alpha_t M c. The null condition is a mixture of its own (for guidance; by default none).
#pragma once

#include "tilt/model/condition.h"
#include "tilt/model/gmm.h"
#include "tilt/model/reward.h"

#include <memory>
#include <optional>

namespace tilt {

class ConditionalGmmVelocity : public VelocityField {
 public:
  /// mixture p_0 (dimension d), shift M [d, dc]; null: the law of the null condition (nullptr: the null
  /// condition is an error). Throws tilt::Error naming a mismatched argument.
  ConditionalGmmVelocity(std::shared_ptr<const GaussianMixture> mixture, Tensor shift, SchedulePtr schedule,
                         std::shared_ptr<const GaussianMixture> null = nullptr);

  std::string kind() const override { return "conditional_gmm"; }
  int64_t dim() const override { return mixture_->dim(); }
  int64_t condition_dim() const override { return shift_.size(1); }
  using VelocityField::velocity;
  /// The null condition's field (throws tilt::Error if there is none).
  Tensor velocity(const Tensor& x, const Tensor& t) const override;
  Tensor conditional_velocity(const Tensor& x, const Tensor& t, const Tensor& c) const override;
  /// Closed form, as GmmVelocity's, at the shifted point.
  Tensor conditional_vjp(const Tensor& x, double t, const Tensor& c, const Tensor& a,
                         Tensor* v_out = nullptr) const override;
  Tensor vjp(const Tensor& x, double t, const Tensor& a, Tensor* v_out = nullptr) const override;
  bool vjp_needs_autograd() const override { return false; }
  VelocityFieldPtr clone() const override;

  /// p_base(. | c) for one condition c ([dc] or [1, dc]).
  GaussianMixture mixture_at(const Tensor& c) const;
  /// The average of p_base(. | c) over a set of conditions: what a model pretrained with condition
  /// dropout on those conditions learns as its null condition.
  GaussianMixture marginal(const ConditionSet& conditions) const;
  const GaussianMixture& mixture() const { return *mixture_; }
  const Tensor& shift() const { return shift_; }  // M, float64
  bool has_null() const { return null_ != nullptr; }
  /// The null condition's law (throws tilt::Error if there is none).
  const GaussianMixture& null_mixture() const;

 private:
  std::shared_ptr<const GaussianMixture> mixture_, null_;
  Tensor shift_;
};

/// p_0(. - M c) for one condition c ([dc] or [1, dc]): p_0's means moved by M c (E98). Throws tilt::Error
/// for a c that does not fit M [d, dc].
GaussianMixture moved_mixture(const GaussianMixture& p0, const Tensor& shift, const Tensor& c);

/// A reward whose closed-form tilt holds at every fixed condition: at(c) is r(., c) as a reward with the
/// MixtureTilt capability (tilt/model/gmm.h).
class ConditionalMixtureTilt {
 public:
  virtual ~ConditionalMixtureTilt() = default;
  virtual RewardPtr at(const Tensor& c) const = 0;
};

/// r(x, c) = -1/2 (x - m(c))^T A (x - m(c)), m(c) = m_0 + N c: a quadratic whose centre moves with c.
class ConditionalQuadraticReward : public Reward, public ConditionalMixtureTilt {
 public:
  /// center m_0 [d], N [d, dc], A [d, d] symmetric positive semi-definite.
  ConditionalQuadraticReward(Tensor center, Tensor N, Tensor A);
  std::string kind() const override { return "conditional_quadratic"; }
  int64_t dim() const override { return center_.size(0); }
  int64_t condition_dim() const override { return N_.size(1); }
  /// Throws tilt::Error: the reward needs a condition.
  Tensor value(const Tensor& x) const override;
  Tensor conditional_value(const Tensor& x, const Tensor& c) const override;
  Tensor conditional_grad(const Tensor& x, const Tensor& c) const override;
  RewardPtr at(const Tensor& c) const override;

 private:
  Tensor centres(const Tensor& x, const Tensor& c) const;  // m(c) per row, in x's dtype
  Tensor center_, N_, A_;
};

/// r(x, c) = (a_0 + N c) . x: a linear reward whose direction moves with c.
class ConditionalLinearReward : public Reward, public ConditionalMixtureTilt {
 public:
  ConditionalLinearReward(Tensor a, Tensor N);
  std::string kind() const override { return "conditional_linear"; }
  int64_t dim() const override { return a_.size(0); }
  int64_t condition_dim() const override { return N_.size(1); }
  Tensor value(const Tensor& x) const override;
  Tensor conditional_value(const Tensor& x, const Tensor& c) const override;
  Tensor conditional_grad(const Tensor& x, const Tensor& c) const override;
  RewardPtr at(const Tensor& c) const override;

 private:
  Tensor directions(const Tensor& x, const Tensor& c) const;
  Tensor a_, N_;
};

/// p_base(. | c) exp(lambda r(., c)) / Z(c) for one condition c, when closed form: a base that is a
/// ConditionalGmmVelocity (or an unconditional GmmVelocity) and a reward that is conditional with
/// ConditionalMixtureTilt or unconditional with MixtureTilt; nullopt otherwise.
std::optional<GaussianMixture> exact_conditional_tilt(const VelocityField& base, const Reward& reward,
                                                      const Tensor& c, double lambda, double* log_z = nullptr);

}  // namespace tilt

namespace tilt {

/// A random conditional problem with its exact answer at every condition (docs/conditions.md): a
/// three-component anisotropic mixture in d dimensions whose means move by M c, a quadratic reward whose
/// centre moves by N c (M, N random [d, dc], c a point of [-1, 1]^dc), lambda = 1; and three sets of
/// conditions: `train` (n_train points of [-1, 1]^dc, what fine-tuning draws from), `held_out` (other
/// points of [-1, 1]^dc) and `outside` (points whose largest coordinate is 1.5 or 2 in magnitude).
struct ConditionalProblem {
  std::shared_ptr<ConditionalGmmVelocity> base;
  std::shared_ptr<ConditionalQuadraticReward> reward;
  double lambda = 1.0;
  Tensor train, held_out, outside;  // [N, dc], float64
  /// p*(. | c) for one condition c ([dc]).
  GaussianMixture exact(const Tensor& c) const;
};
/// Throws tilt::Error unless d >= 1, dc >= 1, n_train >= 1, n_held_out >= 1, n_outside >= 1.
ConditionalProblem random_conditional_problem(int64_t d, int64_t dc, uint64_t seed, SchedulePtr schedule,
                                              int64_t n_train = 8, int64_t n_held_out = 8, int64_t n_outside = 4);

}  // namespace tilt
