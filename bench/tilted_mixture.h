// The problem of the studies that need an exact tilt (tilt_ode_gap, tilt_target_variance): a Gaussian-mixture base,
// a reward whose tilt of it is a mixture in closed form (docs/equations.md, E72-E77), and both exact velocity fields.
#pragma once

#include "tilt/core/error.h"
#include "tilt/io/builders.h"
#include "tilt/io/config.h"
#include "tilt/model/gmm.h"
#include "tilt/model/random_problem.h"
#include "tilt/model/reward.h"

#include <memory>
#include <string>

namespace tilt_bench {

struct TiltedMixture {
  tilt::SchedulePtr schedule;
  std::shared_ptr<tilt::GaussianMixture> base_mixture, target;  // p_base and p* ∝ p_base exp(lambda r)
  tilt::VelocityFieldPtr base, exact;                           // v_base and v* (the flow of p*, E105)
  tilt::RewardPtr reward;
  double lambda = 1.0;
  tilt::Json problem;  // {random_seed, dim, reward} or {config, dim}
};

/// The schedule from root's [schedule]; the base and the reward from random_tilt_problem(dim, seed) when seed >= 0,
/// else from [data] and [reward]. Throws tilt::Error (naming `path`) when the reward has no closed-form tilt.
inline TiltedMixture read_tilted_mixture(tilt::ConfigSection& root, const std::string& path, int64_t seed, int64_t dim) {
  using namespace tilt;
  TiltedMixture m;
  m.schedule = read_schedule(root.section("schedule"));
  if (seed >= 0) {
    RandomTiltProblem p = random_tilt_problem(dim, static_cast<uint64_t>(seed));
    m.base_mixture = p.base, m.reward = p.reward, m.lambda = p.lambda;
    m.problem = {{"random_seed", seed}, {"dim", dim}, {"reward", m.reward->kind()}};
  } else {
    m.base_mixture = read_mixture(root.section("data"));
    m.reward = read_reward(root.section("reward"), m.base_mixture->dim(), &m.lambda);
    m.problem = {{"config", path}, {"dim", m.base_mixture->dim()}};
  }
  const auto target = exact_tilt(*m.reward, *m.base_mixture, m.lambda);
  if (!target) throw Error(path + ": the reward has no closed-form tilt of the mixture; the study needs the exact p*");
  m.target = std::make_shared<GaussianMixture>(*target);
  m.base = std::make_shared<GmmVelocity>(m.base_mixture, m.schedule);
  m.exact = std::make_shared<GmmVelocity>(m.target, m.schedule);
  return m;
}

}  // namespace tilt_bench
