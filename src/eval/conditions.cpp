#include "tilt/eval/conditions.h"

#include "tilt/core/check.h"
#include "tilt/core/error.h"
#include "tilt/eval/metrics.h"
#include "tilt/model/condition.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>

namespace tilt {

std::vector<ConditionScore> score_conditions(const GenerativeSDE& sde, const Tensor& conditions,
                                             const std::function<GaussianMixture(const Tensor& c)>& exact,
                                             const ConditionScoreOptions& options) {
  if (!conditions.defined() || conditions.dim() != 2 || conditions.size(0) < 1) {
    throw Error("score_conditions: conditions must be a table [N, dc], got " + shape_string(conditions));
  }
  if (options.samples < 2 || options.floor_pairs < 1 || options.steps < 1) {
    throw Error("score_conditions: needs samples >= 2, floor_pairs >= 1 and steps >= 1");
  }
  at::NoGradGuard no_grad;
  const TimeGrid grid = TimeGrid::uniform(options.steps);
  SampleOptions sampling;
  sampling.integrator = options.integrator;
  std::vector<ConditionScore> out;
  for (int64_t i = 0; i < conditions.size(0); ++i) {
    const Tensor c = conditions.narrow(0, i, 1).to(at::kFloat);
    Generator gen = make_generator(mix_seed(options.seed, static_cast<uint64_t>(i)));
    const GaussianMixture target = exact(conditions[i]);
    const GenerativeSDE at_c(bind_condition(sde.velocity_ptr(), c), sde.noise_ptr());
    const Tensor x = sample(at_c, options.samples, grid, gen, sampling);
    ConditionScore score;
    const Tensor cd = conditions[i].to(at::kDouble).contiguous();
    score.condition.assign(cd.data_ptr<double>(), cd.data_ptr<double>() + cd.numel());
    score.energy = energy_distance(x, target.sample(options.samples, gen));
    for (int64_t p = 0; p < options.floor_pairs; ++p) {
      score.floor += energy_distance(target.sample(options.samples, gen), target.sample(options.samples, gen));
    }
    score.floor /= static_cast<double>(options.floor_pairs);
    score.ratio = score.energy / score.floor;
    out.push_back(score);
  }
  return out;
}

ScoreSummary summarise(const std::vector<ConditionScore>& scores) {
  std::vector<double> r;
  for (const auto& s : scores) r.push_back(s.ratio);
  return summarise_ratios(std::move(r));
}

ScoreSummary summarise_ratios(std::vector<double> r) {
  if (r.empty()) throw Error("summarise: no scores");
  std::sort(r.begin(), r.end());
  const size_t n = r.size();
  ScoreSummary out;
  out.median = n % 2 ? r[n / 2] : 0.5 * (r[n / 2 - 1] + r[n / 2]);
  out.worst = r.back();
  return out;
}

}  // namespace tilt
