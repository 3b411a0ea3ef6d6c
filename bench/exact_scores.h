// Scores against an exact target shared by the studies that fine-tune on a mixture problem with a closed-form
// p* (tilt_soc_finetune, tilt_ess_study, tilt_ode_gap): the energy distance's noise floor, and the distance of a
// model's memoryless-SDE and ODE samples to p* over it (one set, or the mean over independent sets); and the
// trainer options they fine-tune with. Fixed seeds, so that every model is scored alike.
#pragma once

#include "tilt/eval/metrics.h"
#include "tilt/io/methods.h"
#include "tilt/model/gmm.h"
#include "tilt/schedule/noise_schedule.h"
#include "tilt/sde/sampler.h"
#include "tilt/train/trainer.h"

#include <ATen/ATen.h>

#include <cmath>
#include <utility>
#include <vector>

namespace tilt_bench {

/// The plan's trainer for a study: `iterations` of them, training seed 7, no progress bar, checkpoints or metrics
/// file (the study records what it needs from each step).
inline tilt::TrainerOptions study_trainer(const tilt::FinetunePlan& plan, int64_t iterations) {
  tilt::TrainerOptions t = plan.trainer;
  t.iterations = iterations;
  t.seed = 7;
  t.progress = false;
  t.checkpoint_path.clear();
  t.metrics_path.clear();
  return t;
}

/// Mean energy distance between two independent sets of n exact samples, over 5 pairs.
inline double exact_noise_floor(const tilt::GaussianMixture& target, int64_t n) {
  double sum = 0;
  for (int i = 0; i < 5; ++i) {
    tilt::Generator a = tilt::make_generator(100 + i), b = tilt::make_generator(200 + i);
    sum += tilt::energy_distance(target.sample(n, a, at::kDouble), target.sample(n, b, at::kDouble));
  }
  return sum / 5;
}

/// n samples of v by {the memoryless SDE (Euler, or the exact gDDIM step), the ODE (Heun)} on `steps` uniform steps,
/// from the generators seeded sde_seed and ode_seed, in `dtype`.
inline std::pair<tilt::Tensor, tilt::Tensor> sde_ode_samples(const tilt::VelocityFieldPtr& v, int64_t n, int64_t steps,
                                                             uint64_t sde_seed, uint64_t ode_seed,
                                                             at::ScalarType dtype = at::kFloat,
                                                             tilt::Integrator sde_integrator = tilt::Integrator::euler) {
  const tilt::TimeGrid grid = tilt::TimeGrid::uniform(steps);
  tilt::Generator g1 = tilt::make_generator(sde_seed), g2 = tilt::make_generator(ode_seed);
  tilt::SampleOptions sde_options;
  sde_options.integrator = sde_integrator;
  const tilt::Tensor sde = tilt::sample(tilt::GenerativeSDE(v, tilt::make_memoryless_noise(1.0 / static_cast<double>(steps))),
                                        n, grid, g1, sde_options, dtype);
  tilt::SampleOptions heun;
  heun.integrator = tilt::Integrator::heun;
  const tilt::Tensor ode = tilt::sample(tilt::GenerativeSDE(v, tilt::make_zero_noise()), n, grid, g2, heun, dtype);
  return {sde, ode};
}

/// Energy distance of n samples of v to n exact samples, over `floor`: {memoryless SDE (Euler), ODE (Heun)} on
/// `steps` uniform steps.
inline std::pair<double, double> sde_ode_ratios(const tilt::GaussianMixture& target, const tilt::VelocityFieldPtr& v,
                                                int64_t n, int64_t steps, double floor) {
  tilt::Generator g3 = tilt::make_generator(13);
  const tilt::Tensor exact = target.sample(n, g3, at::kDouble);
  const auto [sde, ode] = sde_ode_samples(v, n, steps, 11, 12);
  return {tilt::energy_distance(sde.to(at::kDouble), exact) / floor,
          tilt::energy_distance(ode.to(at::kDouble), exact) / floor};
}

/// A distance ratio averaged over independent replicates, with its standard error. One replicate at n = 2000 is
/// too noisy to rank models on a multimodal p*: its energy distance is dominated by the sampling error of the
/// modes' weights, a chi-square variable with few degrees of freedom (exact samples give ratios of 3-4 one time
/// in twenty).
struct ReplicatedRatio {
  double mean = 0, standard_error = 0;
};

/// The noise floor at size n, without bias, from the pairs of one set of m exact samples (E108).
inline double precise_noise_floor(const tilt::GaussianMixture& target, int64_t n, int64_t m = 20000) {
  tilt::Generator g = tilt::make_generator(99);
  return tilt::noise_floor(tilt::sample_self_terms(target.sample(m, g, at::kDouble), {}), n).energy;
}

/// {memoryless SDE (Euler), ODE (Heun)} samples of v on `steps` uniform steps, `replicates` times n samples, each
/// scored against n fresh exact samples over `floor` (precise_noise_floor); `dtype` the sampler's.
inline std::pair<ReplicatedRatio, ReplicatedRatio> replicated_ratios(const tilt::GaussianMixture& target,
                                                                     const tilt::VelocityFieldPtr& v, int64_t n,
                                                                     int64_t steps, double floor, int64_t replicates,
                                                                     at::ScalarType dtype = at::kFloat,
                                                                     tilt::Integrator sde_integrator = tilt::Integrator::euler) {
  std::vector<double> a, b;
  for (int64_t r = 0; r < replicates; ++r) {
    tilt::Generator g3 = tilt::make_generator(3000 + r);
    const tilt::Tensor exact = target.sample(n, g3, at::kDouble);
    const auto [sde, ode] = sde_ode_samples(v, n, steps, 1000 + r, 2000 + r, dtype, sde_integrator);
    a.push_back(tilt::energy_distance(sde.to(at::kDouble), exact) / floor);
    b.push_back(tilt::energy_distance(ode.to(at::kDouble), exact) / floor);
  }
  auto summary = [](const std::vector<double>& x) {
    double mean = 0, sq = 0;
    for (double v : x) mean += v / static_cast<double>(x.size());
    for (double v : x) sq += (v - mean) * (v - mean);
    const double k = static_cast<double>(x.size());
    return ReplicatedRatio{mean, k > 1 ? std::sqrt(sq / (k - 1) / k) : 0.0};
  };
  return {summary(a), summary(b)};
}

}  // namespace tilt_bench
