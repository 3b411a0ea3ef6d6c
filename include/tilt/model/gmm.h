// Gaussian mixtures: the exact ground truth of the core tests (docs/equations.md, E72-E77).
//
// With data X1 ~ sum_k w_k N(mu_k, Sigma_k) and noise X0 ~ N(0, I), the reference-flow marginal is
//   p_t(x) = sum_k w_k N(x; alpha_t mu_k, C_k),   C_k = alpha_t^2 Sigma_k + beta_t^2 I,
// so the velocity v(x,t) = E[alpha' X1 + beta' X0 | Xbar_t = x] is closed form:
//   v = sum_k gamma_k(x) [alpha' mu_k + (alpha' alpha Sigma_k + beta' beta I) C_k^{-1} (x - alpha mu_k)],
// with gamma_k the posterior component weights. This form has no singularity at t = 0 (unlike
// kappa x + eta s), and autograd through it gives the exact Jacobian.
//
// Tilting p(x) by exp(a.x), by exp(-1/2 (x-c)^T A (x-c)) or by another mixture gives a mixture
// again: p* is known and can be sampled exactly.
#pragma once

#include "tilt/core/tensor.h"
#include "tilt/model/velocity.h"
#include "tilt/schedule/schedule.h"

#include <memory>
#include <optional>

namespace tilt {

class Reward;

class GaussianMixture {
 public:
  /// weights [K] (positive; normalised here), means [K, d], covariances [K, d, d] (symmetric
  /// positive definite). Throws tilt::Error naming the offending argument.
  GaussianMixture(Tensor weights, Tensor means, Tensor covariances);

  int64_t dim() const { return means_.size(1); }
  int64_t components() const { return means_.size(0); }
  const Tensor& weights() const { return weights_; }
  const Tensor& means() const { return means_; }
  const Tensor& covariances() const { return covariances_; }

  /// n exact samples, [n, d], in float32 unless dtype says otherwise.
  Tensor sample(int64_t n, Generator& gen, at::ScalarType dtype = at::kFloat) const;
  Tensor log_prob(const Tensor& x) const;  // [B]
  Tensor score(const Tensor& x) const;     // grad log p, [B, d]
  Tensor mean() const;                     // [d]
  Tensor covariance() const;               // [d, d]

  /// Exact velocity and score of the reference-flow marginal p_t (see the file comment);
  /// s holds alpha, beta, alpha', beta' as 0-dim tensors or [B].
  Tensor velocity(const Tensor& x, const ScheduleTensors& s) const;
  Tensor marginal_score(const Tensor& x, const ScheduleTensors& s) const;
  /// (dv/dx)^T a in closed form (no autograd), v(x) in *v_out if given; s as for velocity().
  Tensor velocity_vjp(const Tensor& x, const ScheduleTensors& s, const Tensor& a, Tensor* v_out = nullptr) const;

  /// p(x) exp(a.x) / Z: component N(mu + Sigma a, Sigma), weight ∝ w exp(a.mu + a.Sigma a / 2).
  /// If log_z is given it receives log Z = log E_p[exp(a.x)].
  GaussianMixture tilt_linear(const Tensor& a, double* log_z = nullptr) const;
  /// p(x) exp(-1/2 (x-c)^T A (x-c)) / Z for A symmetric positive semi-definite:
  /// Sigma' = (Sigma^-1 + A)^-1 = (I + Sigma A)^-1 Sigma, mu' = (I + Sigma A)^-1 (mu + Sigma A c),
  /// weight ∝ w |I + Sigma A|^{-1/2} exp(-1/2 (mu-c)^T A (I + Sigma A)^{-1} (mu-c))
  /// (= w N(mu; c, Sigma + A^-1) up to a constant when A is invertible; docs/equations.md, E76).
  GaussianMixture tilt_quadratic(const Tensor& c, const Tensor& A, double* log_z = nullptr) const;
  /// p(x) q(x) / Z: every pair of components multiplies into one Gaussian.
  GaussianMixture product(const GaussianMixture& q, double* log_z = nullptr) const;

 private:
  struct Parts;
  Parts evaluate(const Tensor& x, const Tensor& alpha, const Tensor& beta) const;

  Tensor weights_, means_, covariances_;   // float64
  Tensor eigenvalues_, eigenvectors_;      // Sigma_k = U_k diag(lambda_k) U_k^T
  Tensor cholesky_;                        // for sampling
  Tensor log_weights_;                     // log w_k, [K], double
  bool diagonal_ = false;                  // every Sigma_k diagonal: no rotations needed
};

/// The exact velocity field of a Gaussian-mixture data distribution: a base model that needs no
/// training (docs/equations.md, E73).
class GmmVelocity : public VelocityField {
 public:
  GmmVelocity(std::shared_ptr<const GaussianMixture> mixture, SchedulePtr schedule);
  std::string kind() const override { return "gmm"; }
  int64_t dim() const override { return mixture_->dim(); }
  using VelocityField::velocity;
  Tensor velocity(const Tensor& x, const Tensor& t) const override;
  /// Closed form (GaussianMixture::velocity_vjp): about 2x faster than autograd in the lean adjoint.
  Tensor vjp(const Tensor& x, double t, const Tensor& a, Tensor* v_out = nullptr) const override;
  bool vjp_needs_autograd() const override { return false; }
  /// The same field (the mixture is immutable and shared; there are no parameters).
  VelocityFieldPtr clone() const override;
  const GaussianMixture& mixture() const { return *mixture_; }

 private:
  std::shared_ptr<const GaussianMixture> mixture_;
};

/// The capability of a reward r whose tilt of a Gaussian mixture is a Gaussian mixture again
/// (LinearReward, QuadraticReward, GmmLogDensityReward): a reward class implements it besides Reward.
class MixtureTilt {
 public:
  virtual ~MixtureTilt() = default;
  /// p_base exp(lambda r) / Z when it is a Gaussian mixture again, with log Z in *log_z; nullopt
  /// when there is no closed form (e.g. for some lambda only).
  virtual std::optional<GaussianMixture> tilt(const GaussianMixture& base, double lambda,
                                              double* log_z = nullptr) const = 0;
};

/// The exact tilted target p_base exp(lambda r) / Z of a reward with the MixtureTilt capability (log Z
/// in *log_z); nullopt for every other reward.
std::optional<GaussianMixture> exact_tilt(const Reward& reward, const GaussianMixture& base, double lambda,
                                          double* log_z = nullptr);

}  // namespace tilt
