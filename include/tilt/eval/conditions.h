// Per-condition scores (docs/conditions.md): at each condition c, the energy distance between the model's
// samples at c and exact samples of p*(. | c), relative to the noise floor of that distance at this sample
// size; and the median and worst ratio over a set of conditions (training, held-out, outside).
#pragma once

#include "tilt/model/gmm.h"
#include "tilt/sde/sampler.h"
#include "tilt/sde/sde.h"

#include <functional>
#include <vector>

namespace tilt {

struct ConditionScoreOptions {
  int64_t samples = 2000;          ///< model and exact samples per condition
  int64_t steps = 100;             ///< sampler steps
  Integrator integrator = Integrator::euler;
  int64_t floor_pairs = 4;         ///< pairs of exact sets whose mean distance is the noise floor
  uint64_t seed = 0;
};

struct ConditionScore {
  std::vector<double> condition;
  double energy = 0;  ///< energy distance of the model's samples to the exact ones
  double floor = 0;   ///< the mean energy distance between two exact sets of the same size
  double ratio = 0;   ///< energy / floor: 1 is as good as exact sampling
};

/// Scores the sampler `sde` (a conditional model under a noise schedule) at each row of conditions
/// [N, dc] against exact(c), the exact law p*(. | c). Every condition draws from its own generator
/// (mix_seed(seed, row)), so a condition's score does not depend on the others.
std::vector<ConditionScore> score_conditions(const GenerativeSDE& sde, const Tensor& conditions,
                                             const std::function<GaussianMixture(const Tensor& c)>& exact,
                                             const ConditionScoreOptions& options = {});

struct ScoreSummary {
  double median = 0, worst = 0;
};
/// The median and the largest ratio (throws tilt::Error for no scores).
ScoreSummary summarise(const std::vector<ConditionScore>& scores);
/// The same of plain ratios.
ScoreSummary summarise_ratios(std::vector<double> ratios);

}  // namespace tilt
