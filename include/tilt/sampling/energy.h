// Unnormalised target densities pi(x) ∝ exp(-E(x) / tau) for sampling (Adjoint Sampling, MCMC): energies
// E with analytic gradients, and the ground truth each one has (exact log Z, exact samples, modes).
// docs/equations.md, E68-E71.
//
// - GaussianEnergy:     E = |x - m|^2 / (2 s^2); Z = (2 pi s^2 tau)^(d/2), exact samples at any tau.
// - MixtureEnergy:      E = -log p(x) for a Gaussian mixture p; at tau = 1, Z = 1 and exact samples;
//                       modes = the component of largest responsibility.
// - DoubleWellEnergy:   E = sum_{i < w} (a x_i^4 - b x_i^2 + c x_i) + sum_{i >= w} x_i^2 / 2 (the
//                       separable "many-well" form; a = 1, b = 6, c = 0.5 puts the wells near +-sqrt(3)
//                       with a barrier of ~10 at tau = 1). Z, exact samples and the weight of each well
//                       of x_0 by 1-D quadrature of exp(-f / tau) (product over the coordinates).
// - MultiDoubleWellEnergy (DW-n): n particles in D dimensions,
//                       E = sum_{i<j} a (d_ij - d0)^4 + b (d_ij - d0)^2, DW-4: n = 4, D = 2, a = 0.9,
//                       b = -4, d0 = 4 (bgflow's MultiDoubleWellPotential; adjoint_samplers
//                       energies/double_well_energy.py). Invariant to translations: the state space is
//                       the centre-of-mass-free subspace (particles() > 0). No exact ground truth: MCMC.
#pragma once

#include "tilt/core/tensor.h"

#include <cmath>
#include <memory>
#include <string>
#include <vector>

namespace tilt {
class GaussianMixture;
}  // namespace tilt

namespace tilt::sampling {

class Energy {
 public:
  virtual ~Energy() = default;
  virtual std::string name() const = 0;
  virtual int64_t dim() const = 0;
  /// E(x) for x [B, d] (any float dtype) -> [B] double.
  virtual Tensor energy(const Tensor& x) const = 0;
  /// grad E(x), [B, d] double, in closed form.
  virtual Tensor grad(const Tensor& x) const = 0;

  /// Particles of a translation-invariant system (states kept centre-of-mass free); 0 if none.
  virtual int64_t particles() const { return 0; }
  /// Dimension of one particle (dim() / particles()); 0 if no particles.
  int64_t spatial_dim() const { return particles() > 0 ? dim() / particles() : 0; }

  /// log Z = log int exp(-E / tau) dx where known in closed form (or by quadrature); NaN otherwise.
  virtual double exact_log_z(double /*tau*/) const { return NAN; }
  /// Whether sample_exact() works at this temperature.
  virtual bool has_exact_samples(double /*tau*/) const { return false; }
  /// n exact samples of pi at temperature tau, [n, d] double; throws tilt::Error if none.
  virtual Tensor sample_exact(int64_t n, double tau, Generator& gen) const;

  /// Number of modes that mode_of() tells apart; 0 if the target has no mode labels.
  virtual int64_t modes() const { return 0; }
  /// The mode of each row, [B] long in [0, modes()).
  virtual Tensor mode_of(const Tensor& x) const;
  /// The exact probability of each mode at temperature tau; empty where not known.
  virtual std::vector<double> exact_mode_weights(double /*tau*/) const { return {}; }
};

using EnergyPtr = std::shared_ptr<const Energy>;

class GaussianEnergy : public Energy {
 public:
  GaussianEnergy(std::vector<double> mean, double std);
  std::string name() const override { return "gaussian"; }
  int64_t dim() const override { return static_cast<int64_t>(mean_.size()); }
  Tensor energy(const Tensor& x) const override;
  Tensor grad(const Tensor& x) const override;
  double exact_log_z(double tau) const override;
  bool has_exact_samples(double) const override { return true; }
  Tensor sample_exact(int64_t n, double tau, Generator& gen) const override;
  const std::vector<double>& mean() const { return mean_; }
  double std() const { return std_; }

 private:
  std::vector<double> mean_;
  double std_;
};

class MixtureEnergy : public Energy {
 public:
  explicit MixtureEnergy(std::shared_ptr<const GaussianMixture> mixture);
  std::string name() const override { return "gmm"; }
  int64_t dim() const override;
  Tensor energy(const Tensor& x) const override;
  Tensor grad(const Tensor& x) const override;
  double exact_log_z(double tau) const override { return tau == 1.0 ? 0.0 : NAN; }
  bool has_exact_samples(double tau) const override { return tau == 1.0; }
  Tensor sample_exact(int64_t n, double tau, Generator& gen) const override;
  int64_t modes() const override;
  Tensor mode_of(const Tensor& x) const override;
  std::vector<double> exact_mode_weights(double tau) const override;

 private:
  std::shared_ptr<const GaussianMixture> mixture_;
};

struct DoubleWellOptions {
  int64_t dim = 2;
  int64_t wells = 1;  ///< coordinates 0..wells-1 are double wells, the rest standard Gaussians
  double a = 1.0, b = 6.0, c = 0.5;
};

class DoubleWellEnergy : public Energy {
 public:
  explicit DoubleWellEnergy(const DoubleWellOptions& options);
  std::string name() const override { return "double_well"; }
  int64_t dim() const override { return options_.dim; }
  Tensor energy(const Tensor& x) const override;
  Tensor grad(const Tensor& x) const override;
  double exact_log_z(double tau) const override;
  bool has_exact_samples(double) const override { return true; }
  Tensor sample_exact(int64_t n, double tau, Generator& gen) const override;
  /// Two modes: x_0 left (0) or right (1) of the barrier (the local maximum of f between the wells).
  int64_t modes() const override { return 2; }
  Tensor mode_of(const Tensor& x) const override;
  std::vector<double> exact_mode_weights(double tau) const override;
  /// The barrier's position (the local maximum of f(y) = a y^4 - b y^2 + c y).
  double barrier() const { return barrier_; }

 private:
  /// The 1-D well f on a fine grid: abscissae, exp(-f / tau) and its cumulative trapezoid integral.
  struct Quadrature {
    Tensor y, cdf;          // [G]; cdf of exp(-(f - f_min) / tau), cdf[G - 1] its integral
    double log_scale = 0;   // -f_min / tau
  };
  Quadrature quadrature(double tau) const;
  DoubleWellOptions options_;
  double barrier_;
};

struct MultiDoubleWellOptions {
  int64_t particles = 4;
  int64_t spatial_dim = 2;
  double a = 0.9, b = -4.0, offset = 4.0;
};

class MultiDoubleWellEnergy : public Energy {
 public:
  explicit MultiDoubleWellEnergy(const MultiDoubleWellOptions& options);
  std::string name() const override { return "dw" + std::to_string(options_.particles); }
  int64_t dim() const override { return options_.particles * options_.spatial_dim; }
  Tensor energy(const Tensor& x) const override;
  Tensor grad(const Tensor& x) const override;
  int64_t particles() const override { return options_.particles; }

 private:
  MultiDoubleWellOptions options_;
};

/// The pairwise distances d_ij, i < j, of each configuration: x [B, n D] -> [B, n (n - 1) / 2] double.
Tensor interparticle_distances(const Tensor& x, int64_t particles);

/// Removes each particle system's centre of mass: x [B, n D] -> the same with sum_i x_i = 0 (identity
/// when particles = 0).
Tensor remove_center_of_mass(const Tensor& x, int64_t particles);

}  // namespace tilt::sampling
