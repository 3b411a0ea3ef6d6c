// The options Reinforce and Efficient Adjoint Matching share (docs/equations.md, E128 and E132): B clean endpoints
// of the current model per iteration, each noised M times as in pretraining, and a regression on those B M rows.
#pragma once

#include "tilt/core/tensor.h"
#include "tilt/model/condition.h"

#include <functional>

namespace tilt {

struct NoisedEndpointOptions {
  int64_t batch_size = 64;  ///< B clean endpoints per iteration
  int64_t num_steps = 40;   ///< Euler steps of the model's flow ODE that draws them
  double lambda = 1.0;      ///< p* ∝ p_base exp(lambda r)
  int64_t noise_draws = 4;  ///< M noisings (t, X_0) per endpoint: B M regression rows
  double t_min = 0.0;       ///< t ~ U[t_min, t_max]
  double t_max = 1.0;
  /// The training prompts (docs/conditions.md). Null for an unconditional model, required for a conditional one.
  ConditionSetPtr conditions;
  /// Tests: exact draws of the current model's law, n -> [n, d], instead of its ODE (unconditional only).
  std::function<Tensor(int64_t n, Generator& gen)> endpoints;
};

}  // namespace tilt
