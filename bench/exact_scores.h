// Scores against an exact target shared by the studies that fine-tune on a mixture problem with a closed-form
// p* (tilt_soc_finetune, tilt_ess_study): the energy distance's noise floor, and the distance of a model's
// memoryless-SDE and ODE samples to p* over it. Fixed seeds, so that every model is scored alike.
#pragma once

#include "tilt/eval/metrics.h"
#include "tilt/model/gmm.h"
#include "tilt/schedule/noise_schedule.h"
#include "tilt/sde/sampler.h"

#include <ATen/ATen.h>

#include <utility>

namespace tilt_bench {

/// Mean energy distance between two independent sets of n exact samples, over 5 pairs.
inline double exact_noise_floor(const tilt::GaussianMixture& target, int64_t n) {
  double sum = 0;
  for (int i = 0; i < 5; ++i) {
    tilt::Generator a = tilt::make_generator(100 + i), b = tilt::make_generator(200 + i);
    sum += tilt::energy_distance(target.sample(n, a, at::kDouble), target.sample(n, b, at::kDouble));
  }
  return sum / 5;
}

/// Energy distance of n samples of v to n exact samples, over `floor`: {memoryless SDE (Euler), ODE (Heun)} on
/// `steps` uniform steps.
inline std::pair<double, double> sde_ode_ratios(const tilt::GaussianMixture& target, const tilt::VelocityFieldPtr& v,
                                                int64_t n, int64_t steps, double floor) {
  const tilt::TimeGrid grid = tilt::TimeGrid::uniform(steps);
  tilt::Generator g1 = tilt::make_generator(11), g2 = tilt::make_generator(12), g3 = tilt::make_generator(13);
  const tilt::Tensor exact = target.sample(n, g3, at::kDouble);
  const tilt::Tensor sde = tilt::sample(tilt::GenerativeSDE(v, tilt::make_memoryless_noise(1.0 / static_cast<double>(steps))),
                                        n, grid, g1, tilt::SampleOptions(), at::kFloat);
  tilt::SampleOptions heun;
  heun.integrator = tilt::Integrator::heun;
  const tilt::Tensor ode = tilt::sample(tilt::GenerativeSDE(v, tilt::make_zero_noise()), n, grid, g2, heun, at::kFloat);
  return {tilt::energy_distance(sde.to(at::kDouble), exact) / floor,
          tilt::energy_distance(ode.to(at::kDouble), exact) / floor};
}

}  // namespace tilt_bench
