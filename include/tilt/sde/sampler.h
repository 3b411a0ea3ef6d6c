// Euler-Maruyama for the generative SDE on a time grid, with any noise schedule; Heun for the ODE;
// the exact gDDIM step (tilt/sde/gddim.h) for the family sigma = gamma sqrt(2 eta).
#pragma once

#include "tilt/sde/sde.h"
#include "tilt/sde/time_grid.h"

#include <functional>
#include <string>
#include <vector>

namespace tilt {

enum class Integrator {
  euler,  ///< Euler-Maruyama: X_{k+1} = X_k + h_k b(X_k, t_k) + sqrt(h_k) sigma(t_k) eps_k (strong order 1/2, weak 1)
  heun,   ///< Heun's method (order 2); only for the ODE (zero noise schedule)
  exact,  ///< the exact gDDIM step of sigma = gamma sqrt(2 eta) with v frozen over the step (gddim.h):
          ///< memoryless, scaled_memoryless:<gamma> or the ODE; the schedule's offset h is not used
};

Integrator parse_integrator(const std::string& name);  // "euler" | "heun" | "exact"

struct SampleOptions {
  Integrator integrator = Integrator::euler;
  /// Keep every state X_{t_k} (needed by the adjoint); otherwise only X_0 and X_K.
  bool record = false;
  /// Called once per step, after its network evaluations, with the number of steps evaluated (progress bars);
  /// optional.
  std::function<void(int64_t)> on_step;
};

/// States on the grid: x[k] is X_{t[k]} (all of them if recorded, else the first and last).
struct Trajectory {
  std::vector<double> t;
  std::vector<Tensor> x;
  const Tensor& final() const { return x.back(); }
};

/// Integrates from x0 ([B, d]) over the grid. Draws the Brownian increments from gen. Gradients
/// flow through the states unless the caller disables them (the discrete adjoint needs them).
Trajectory simulate(const GenerativeSDE& sde, const Tensor& x0, const TimeGrid& grid, Generator& gen,
                    const SampleOptions& options = {});

/// n samples X_1: X_0 ~ N(0, I) from gen, then simulate. Runs without gradients.
Tensor sample(const GenerativeSDE& sde, int64_t n, const TimeGrid& grid, Generator& gen,
              const SampleOptions& options = {}, at::ScalarType dtype = at::kFloat);

}  // namespace tilt
