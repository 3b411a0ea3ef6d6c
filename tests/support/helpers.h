// Shared problems and numerical helpers for the tests.
#pragma once

#include "tilt/model/gmm.h"
#include "tilt/model/unet.h"
#include "tilt/model/velocity.h"

#include <ATen/ATen.h>

#include <atomic>
#include <functional>
#include <memory>
#include <utility>
#include <vector>

namespace tilt::test {

/// The 2-D demo mixture: six components on a ring of radius 2.5, plus one at the centre.
std::shared_ptr<GaussianMixture> ring_mixture_2d();
/// A random d-dimensional mixture with `components` anisotropic components (fixed seed).
std::shared_ptr<GaussianMixture> random_mixture(int64_t d, int64_t components, uint64_t seed);
/// One isotropic Gaussian N(mu, s^2 I).
std::shared_ptr<GaussianMixture> isotropic_gaussian(const std::vector<double>& mu, double s);

/// A U-Net small enough for float64 finite differences in a second: channels x height x width images, 8 base
/// channels x {1, 2}, one block per level, 4 groups, attention, 8 time features.
UNetOptions tiny_unet(int64_t channels, int64_t height, int64_t width, int64_t condition_dim);

/// Jacobian of f: R^d -> R^d at each row of x ([B, d] -> [B, d, d]) by central differences.
at::Tensor fd_jacobian(const std::function<at::Tensor(const at::Tensor&)>& f, const at::Tensor& x,
                       double eps = 1e-6);
/// Jacobian by reverse-mode autograd (one VJP per output coordinate).
at::Tensor autograd_jacobian(const std::function<at::Tensor(const at::Tensor&)>& f, const at::Tensor& x);

/// The exact law N(m_K, V_K) of the sampler's chain from X_0 ~ N(0, I) for Gaussian data (affine
/// velocity), on K uniform steps with sigma = gamma sqrt(2 eta): the exact gDDIM step (exact = true)
/// or Euler-Maruyama with offset h = 1/K. m_K: [d], V_K: [d, d].
std::pair<at::Tensor, at::Tensor> chain_law(const GmmVelocity& field, double gamma, int64_t K, bool exact);

/// Counts the calls of a velocity field (velocity and vjp separately).
class CountingVelocity : public VelocityField {
 public:
  explicit CountingVelocity(VelocityFieldPtr inner) : VelocityField(inner->schedule()), inner_(std::move(inner)) {}
  std::string kind() const override { return "counting"; }
  int64_t dim() const override { return inner_->dim(); }
  using VelocityField::velocity;
  at::Tensor velocity(const at::Tensor& x, const at::Tensor& t) const override {
    ++velocities;
    return inner_->velocity(x, t);
  }
  at::Tensor vjp(const at::Tensor& x, double t, const at::Tensor& a, at::Tensor* v_out) const override {
    ++vjps;
    return inner_->vjp(x, t, a, v_out);
  }
  mutable std::atomic<int64_t> velocities{0}, vjps{0};

 private:
  VelocityFieldPtr inner_;
};

/// Least-squares slope of log(err) against log(h).
double fitted_order(const std::vector<double>& h, const std::vector<double>& err);

/// Mean energy distance between `pairs` pairs of independent exact sample sets of size n:
/// the noise floor that a perfect sampler reaches at this n.
double energy_noise_floor(const GaussianMixture& p, int64_t n, int pairs, uint64_t seed);

}  // namespace tilt::test
