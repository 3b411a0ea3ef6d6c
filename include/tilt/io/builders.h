// Library objects from configuration tables. Every default lives here, once; docs/config.md
// documents each key.
#pragma once

#include "tilt/io/config.h"
#include "tilt/model/gmm.h"
#include "tilt/model/mlp.h"
#include "tilt/model/reward.h"
#include "tilt/schedule/schedule.h"
#include "tilt/train/adjoint_matching.h"
#include "tilt/train/flow_matching.h"
#include "tilt/train/ode_adjoint_matching.h"
#include "tilt/train/regulariser.h"
#include "tilt/train/trainer.h"

#include <memory>

namespace tilt {

/// [schedule]: type = "linear" | "cosine" | "vp" (beta_min, beta_max).
SchedulePtr read_schedule(ConfigSection section);

/// A Gaussian mixture: type = "gmm" (weights, means, std | covariances) or "ring" (components,
/// radius, std, weights).
std::shared_ptr<GaussianMixture> read_mixture(ConfigSection section);

/// [reward]: type = "linear" (a) | "quadratic" (center, precision) | "gmm" (a mixture) |
/// "torchscript" (path: a module from PyTorch, forward(x) -> r [B]); and
/// lambda, the reward multiplier, returned in *lambda.
RewardPtr read_reward(ConfigSection section, int64_t dim, double* lambda);

/// A network: hidden (widths), time_features.
MlpOptions read_mlp(ConfigSection& section, int64_t dim, std::vector<int64_t> default_hidden);

/// The Adjoint Matching keys of [finetune].
AdjointMatchingOptions read_adjoint_matching(ConfigSection& section);

/// The ODE Adjoint Matching keys of [finetune] (adjoint_steps, truncated_control, loss_steps), with
/// num_steps, batch_size and lambda taken from the Adjoint Matching options already read.
OdeAdjointMatchingOptions read_ode_adjoint_matching(ConfigSection& section, const AdjointMatchingOptions& am);

/// regulariser = "quadratic" | "clipped" (reg_clip) | "pnorm" (reg_power); reg_weight, reg_weight_start.
RegulariserPtr read_regulariser(ConfigSection& section);

/// iterations, lr, beta1, beta2, eps, weight_decay, grad_clip, lr_schedule, lr_final_factor,
/// checkpoint_every, shards (0, the default: one per process); defaults are the Adjoint Matching
/// paper's unless given.
TrainerOptions read_trainer(ConfigSection& section, const TrainerOptions& defaults);

}  // namespace tilt
