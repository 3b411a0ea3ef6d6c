// What Reinforce and Efficient Adjoint Matching share (docs/equations.md, E128 and E132), private to src/train: the
// checks of their common options, and the noisings of clean endpoints as in pretraining.
#pragma once

#include "tilt/core/check.h"
#include "tilt/core/error.h"
#include "tilt/model/condition.h"
#include "tilt/model/finetuned.h"
#include "tilt/model/reward.h"
#include "tilt/schedule/schedule.h"
#include "tilt/train/noised_endpoint_options.h"

#include <ATen/ATen.h>

#include <cmath>
#include <string>

namespace tilt {
namespace detail {

/// Throws tilt::Error naming `who` for a missing model or reward, mismatched dimensions or conditions, or
/// num_steps, noise_draws, lambda, t_min, t_max out of range.
inline void check_noised_endpoints(const std::string& who, const FineTunedVelocity* model, const Reward* reward,
                                   const NoisedEndpointOptions& o) {
  if (!model) throw Error(who + ": no model");
  if (!reward) throw Error(who + ": no reward");
  if (reward->dim() != model->dim()) {
    throw Error(who + ": the reward has dimension " + std::to_string(reward->dim()) + " but the model has dimension " +
                std::to_string(model->dim()));
  }
  check_conditions(o.conditions, model->condition_dim(), who);
  check_reward_condition(*reward, model->condition_dim(), who);
  if (o.num_steps < 1) throw Error(who + ": num_steps must be >= 1, got " + std::to_string(o.num_steps));
  if (o.noise_draws < 1) throw Error(who + ": noise_draws must be >= 1, got " + std::to_string(o.noise_draws));
  if (!std::isfinite(o.lambda)) throw Error(who + ": lambda must be finite");
  if (!(o.t_min >= 0.0 && o.t_min < o.t_max && o.t_max <= 1.0)) {
    throw Error(who + ": need 0 <= t_min < t_max <= 1, got t_min = " + number_string(o.t_min) +
                ", t_max = " + number_string(o.t_max));
  }
}

/// One noising per row of x1 [N, d] as in pretraining (E5), drawn in this order: t ~ U[t_min, t_max] [N], then
/// X_0 ~ N(0, I) [N, d]; x_t = alpha_t x1 + beta_t X_0.
struct Noisings {
  Tensor t, x0, xt;
};
inline Noisings draw_noisings(const Schedule& schedule, const Tensor& x1, double t_min, double t_max, Generator& gen) {
  Noisings n;
  n.t = t_min + (t_max - t_min) * uniform_draws({x1.size(0)}, gen, x1.options());
  n.x0 = normal_draws(x1.sizes(), gen, x1.options());
  const ScheduleTensors s = schedule.at(n.t);
  n.xt = s.alpha.reshape({-1, 1}) * x1 + s.beta.reshape({-1, 1}) * n.x0;
  return n;
}

}  // namespace detail
}  // namespace tilt
