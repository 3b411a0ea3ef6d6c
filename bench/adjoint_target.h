// Adjoint Matching's regression target at the optimum, by continuations of the exact tilted SDE (shared by
// tilt_ode_gap --adjoint-stats and tilt_target_variance; docs/equations.md, E106 and E118).
#pragma once

#include "tilt/schedule/noise_schedule.h"
#include "tilt/sde/sampler.h"
#include "tilt/sde/sde.h"
#include "tilt/sde/time_grid.h"
#include "tilt/train/adjoint_matching.h"

#include <ATen/ATen.h>

#include <cmath>
#include <vector>

namespace tilt_bench {

// From the rows of x [n, d] at t_k of the uniform K-step grid, one continuation each to t = 1 by the memoryless
// SDE of the exact tilted field v* (offset 1/K, as Adjoint Matching simulates), and on it the lean adjoint a~_k
// through the base's Jacobians. Returns the velocity-space target D = -eta_{t_k} a~_k [n, d] (eta of the exact
// memoryless schedule, the coefficient Adjoint Matching regresses with: docs/equations.md, E25), whose mean given
// X_k = x is v*(x) - v_base(x) (E105). Rows that repeat one state give that state's continuations.
inline tilt::Tensor adjoint_targets(const tilt::VelocityFieldPtr& exact, const tilt::VelocityFieldPtr& base,
                                    const tilt::Schedule& schedule, const tilt::Reward& reward, double lambda,
                                    int64_t K, int64_t k, const tilt::Tensor& x, tilt::Generator& gen) {
  using namespace tilt;
  at::NoGradGuard no_grad;
  const TimeGrid grid = TimeGrid::uniform(K);
  const NoiseSchedulePtr noise = make_memoryless_noise(1.0 / static_cast<double>(K));
  const NoiseSchedulePtr exact_noise = noise->with_offset(0.0);
  const double t = grid[k];
  const double eta = std::pow(exact_noise->sigma(schedule, t), 2) / exact_noise->drift(schedule, t).c_v;
  std::vector<double> times;
  for (int64_t j = k; j <= K; ++j) times.push_back(grid[j]);
  const TimeGrid rest(times);
  SampleOptions record;
  record.record = true;
  const GenerativeSDE tilted(exact, noise), base_sde(base, noise);
  const std::vector<Tensor> path = simulate(tilted, x, rest, gen, record).x;
  return -eta * lean_adjoint(base_sde, path, rest, reward, lambda, false).a[0];
}

}  // namespace tilt_bench
