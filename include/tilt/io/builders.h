// Library objects from configuration tables. Every default lives here, once; docs/config.md
// documents each key.
#pragma once

#include "tilt/io/config.h"
#include "tilt/io/limits.h"
#include "tilt/model/condition.h"
#include "tilt/model/gmm.h"
#include "tilt/model/mlp.h"
#include "tilt/model/unet.h"
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
/// lambda, the reward multiplier, returned in *lambda. A linear reward with a_shift, or a quadratic one
/// with center_shift (N: d rows of dc numbers), moves with the condition c (docs/conditions.md).
RewardPtr read_reward(ConfigSection section, int64_t dim, double* lambda);

/// A table of data-space numbers under `key`: `rows` rows (0: any number >= 1) of `cols` numbers (0: any
/// number >= 1, the same in every row), [rows, cols] in float64; the message names the key.
Tensor read_table(ConfigSection& section, const std::string& key, int64_t rows, int64_t cols);

/// [conditions] (docs/conditions.md): the training conditions (train = a table, classes = n for the
/// one-hot rows of n classes, file = a CSV of one condition per line, or uniform = [[lo..], [hi..]], the
/// uniform law on a box) and, for evaluation only,
/// held_out and outside (tables). dim: the model's condition size (every table must have it).
struct ConditionsPlan {
  ConditionSetPtr train;
  Tensor held_out, outside;  ///< [N, dc] float64; undefined when not given
};
ConditionsPlan read_conditions(ConfigSection section, int64_t dim);

/// An integer key in lo..hi, or a number in [lo, hi]; the message names the key and gives the range.
int64_t read_integer_in(ConfigSection& section, const std::string& key, int64_t default_value, int64_t lo, int64_t hi);
double read_number_in(ConfigSection& section, const std::string& key, double default_value, double lo, double hi);

/// A noise spec with the memoryless offset filled in: "memoryless" without one becomes "memoryless:<1/steps>", one
/// step of the grid (the paper's choice); any other spec is returned as given. Throws tilt::Error naming `steps_flag`
/// for fewer than 2 steps, where h = 1 is no offset in (0, 1).
std::string with_step_offset(const std::string& spec, int64_t steps, const std::string& steps_flag);

/// Layer widths (at least one, each in 1..limits::kWidth) under `key`.
std::vector<int64_t> read_widths(ConfigSection& section, const std::string& key, std::vector<int64_t> default_widths);
/// A U-Net for images of height x width (one channel): channels (the first level's), channel_mult, blocks, groups,
/// attention, time_features (docs/config.md, [pretrain]). Throws tilt::Error naming the key that is out of range.
UNetOptions read_unet(ConfigSection& section, int64_t height, int64_t width);

/// A network: hidden (widths), time_features.
MlpOptions read_mlp(ConfigSection& section, int64_t dim, std::vector<int64_t> default_hidden);

/// num_steps (2..limits::kSteps) and batch_size (1..limits::kBatch, with their product bounded);
/// the values passed in are the defaults.
void read_steps_and_batch(ConfigSection& section, int64_t& num_steps, int64_t& batch_size);

/// The Adjoint Matching keys of [finetune.adjoint_matching] (loss_early_steps, loss_late_steps,
/// clip_factor, loss_weighting, final_noiseless_step, tape_activations), checked against o.num_steps.
void read_adjoint_matching_keys(ConfigSection& section, AdjointMatchingOptions& o);

/// num_steps, batch_size and the Adjoint Matching keys from one table.
AdjointMatchingOptions read_adjoint_matching(ConfigSection& section);

/// The ODE Adjoint Matching keys (adjoint_steps, truncated_control, loss_steps), with
/// num_steps, batch_size and lambda taken from the Adjoint Matching options already read.
OdeAdjointMatchingOptions read_ode_adjoint_matching(ConfigSection& section, const AdjointMatchingOptions& am);

/// regulariser = "quadratic" | "clipped" (reg_clip) | "pnorm" (reg_power); reg_weight, reg_weight_start.
RegulariserPtr read_regulariser(ConfigSection& section);

/// iterations, lr, beta1, beta2, eps, weight_decay, grad_clip, lr_schedule, lr_final_factor,
/// checkpoint_every, shards (0, the default: one per process); defaults are the Adjoint Matching
/// paper's unless given.
TrainerOptions read_trainer(ConfigSection& section, const TrainerOptions& defaults);

}  // namespace tilt
