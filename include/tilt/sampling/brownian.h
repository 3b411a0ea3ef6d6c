// The Brownian base process of Adjoint Sampling (Havens et al., ICML 2025; docs/equations.md, E59-E60):
//
//   dX_t = g(t)^2 u(X_t, t) dt + g(t) dW_t,   X_0 = 0,   t in [0, 1],
//
// with no base drift. Uncontrolled, X_t ~ N(0, nu_t I) with nu_t = int_0^t g(s)^2 ds; given X_1 the
// path is a Brownian bridge, X_t | X_1 ~ N((nu_t / nu_1) X_1, nu_t (nu_1 - nu_t) / nu_1 I).
// The control is written in the "VE" parametrisation of adjoint_samplers (drift g^2 u; the SOC
// control is g u), in which the optimal u stays bounded as t -> 1.
//
// Noise schedules g(t):
// - geometric (AS):  g(t) = s_min (s_max/s_min)^(1-t) sqrt(2 ln(s_max/s_min)),
//                    nu_t = s_max^2 (1 - (s_max/s_min)^(-2t)).
// - linear [D]:      g(t) = s_max + (s_min - s_max) t,
//                    nu_t = ((s_max + (s_min - s_max) t)^3 - s_max^3) / (3 (s_min - s_max)).
// - constant:        g(t) = sigma, nu_t = sigma^2 t.
//
// For particle systems (particles > 0) the noise and the states live on the centre-of-mass-free
// subspace: X_1 ~ N(0, nu_1 P) with P the projector, whose density on the subspace (dimension
// d - D) is what log_p1() returns.
#pragma once

#include "tilt/core/tensor.h"

#include <memory>
#include <string>

namespace tilt::sampling {

enum class BrownianNoise { geometric, linear, constant };
/// "geometric", "linear", "constant"; parse_brownian_noise throws tilt::Error naming an unknown one.
std::string to_string(BrownianNoise noise);
BrownianNoise parse_brownian_noise(const std::string& name);

struct BrownianOptions {
  BrownianNoise noise = BrownianNoise::geometric;
  double sigma_max = 2.0;   ///< geometric, linear: g's scale at t = 0
  double sigma_min = 1e-3;  ///< geometric, linear: at t = 1
  double sigma = 1.0;       ///< constant
};

class BrownianBase {
 public:
  /// particles: > 0 for a centre-of-mass-free system of `particles` particles in dim / particles
  /// dimensions each.
  BrownianBase(const BrownianOptions& options, int64_t dim, int64_t particles = 0);

  int64_t dim() const { return dim_; }
  int64_t particles() const { return particles_; }
  /// Dimension of the state space: dim, or dim - spatial dimension for a COM-free system.
  int64_t free_dim() const;
  const BrownianOptions& options() const { return options_; }
  std::string describe() const;

  double g(double t) const;
  double nu(double t) const;  ///< int_0^t g^2
  Tensor nu(const Tensor& t) const;  ///< elementwise, double
  double nu1() const { return nu(1.0); }

  /// Projects onto the state space (removes the centre of mass; identity without particles).
  Tensor project(const Tensor& x) const;
  /// Standard normal noise on the state space, [n, dim], in dtype.
  Tensor noise(int64_t n, Generator& gen, at::ScalarType dtype = at::kDouble) const;
  /// X_t given X_1 = x1 at times t [B] (a Brownian bridge from X_0 = 0), [B, dim] in x1's dtype.
  Tensor bridge(const Tensor& x1, const Tensor& t, Generator& gen) const;
  /// n draws of X_1 ~ p_1^base = N(0, nu_1 P).
  Tensor sample_p1(int64_t n, Generator& gen, at::ScalarType dtype = at::kDouble) const;
  /// log p_1^base(x) on the state space, [B] double.
  Tensor log_p1(const Tensor& x) const;
  /// grad_x log p_1^base = -x / nu_1 (on the state space), [B, dim] double.
  Tensor grad_log_p1(const Tensor& x) const;

 private:
  BrownianOptions options_;
  int64_t dim_, particles_;
};

using BrownianBasePtr = std::shared_ptr<const BrownianBase>;

}  // namespace tilt::sampling
