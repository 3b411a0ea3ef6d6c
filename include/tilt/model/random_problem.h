// A family of random fine-tuning problems with an exact answer, for testing defaults on problems nobody tuned
// for (tilt_ode_gap, scripts/random_family.sh): a Gaussian-mixture base with anisotropic covariances and a linear
// or quadratic reward, whose tilt p* ∝ p_base exp(lambda r) is a Gaussian mixture again (exact_tilt).
#pragma once

#include "tilt/model/gmm.h"
#include "tilt/model/reward.h"

#include <cstdint>
#include <memory>

namespace tilt {

struct RandomTiltProblem {
  std::shared_ptr<GaussianMixture> base;
  RewardPtr reward;
  double lambda = 1.0;
};

/// The problem of one seed in d dimensions: 2-4 components (weights in [0.5, 1.5] before normalising) with
/// means 1.5 N(0, I) and covariances R diag(s^2) R^T (R a random rotation, s in [0.25, 1]); an even seed gets a
/// quadratic reward -1/2 (x - c)^T A (x - c) with c ~ 1.5 N(0, I) and A = Q diag(a) Q^T, a in [0.15, 0.6]
/// (a linear plus a quadratic part), an odd seed a linear reward a.x with a ~ N(0, I / d) scaled to length
/// in [0.5, 1.5]; lambda = 1. Throws tilt::Error unless d >= 1.
RandomTiltProblem random_tilt_problem(int64_t d, uint64_t seed);

}  // namespace tilt
