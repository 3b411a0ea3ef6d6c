// tilt's public API in one header: every header of include/tilt, layer by layer, lowest first
// (README.md, "Layout"). Like each of them, it needs only <ATen/core/Tensor.h> from LibTorch, not
// <torch/torch.h>. An outside project links tilt::tilt (find_package(tilt)) and includes <tilt/tilt.h>.
#pragma once

// core
#include "tilt/core/check.h"
#include "tilt/core/error.h"
#include "tilt/core/fs.h"
#include "tilt/core/log.h"
#include "tilt/core/progress.h"
#include "tilt/core/tensor.h"

// schedule
#include "tilt/schedule/noise_schedule.h"
#include "tilt/schedule/schedule.h"

// model
#include "tilt/model/classifier.h"
#include "tilt/model/condition.h"
#include "tilt/model/conditional_gmm.h"
#include "tilt/model/random_problem.h"
#include "tilt/model/finetuned.h"
#include "tilt/model/gmm.h"
#include "tilt/model/mlp.h"
#include "tilt/model/unet.h"
#include "tilt/model/reward.h"
#include "tilt/model/taped.h"
#include "tilt/model/torchscript.h"
#include "tilt/model/velocity.h"

// sde
#include "tilt/sde/engine.h"
#include "tilt/sde/gddim.h"
#include "tilt/sde/importance.h"
#include "tilt/sde/sampler.h"
#include "tilt/sde/sde.h"
#include "tilt/sde/time_grid.h"

// soc
#include "tilt/soc/control.h"
#include "tilt/soc/finetuning.h"
#include "tilt/soc/loss.h"
#include "tilt/soc/losses.h"
#include "tilt/soc/problem.h"
#include "tilt/soc/problems.h"
#include "tilt/soc/separable_control.h"
#include "tilt/soc/simulate.h"

// train
#include "tilt/train/adjoint_matching.h"
#include "tilt/train/buffered_adjoint_matching.h"
#include "tilt/train/classification.h"
#include "tilt/train/dataset.h"
#include "tilt/train/distributed.h"
#include "tilt/train/flow_matching.h"
#include "tilt/train/ode_adjoint_matching.h"
#include "tilt/train/policy_gradient.h"
#include "tilt/train/efficient_adjoint_matching.h"
#include "tilt/train/noised_endpoint_options.h"
#include "tilt/train/reinforce_adjoint_matching.h"
#include "tilt/train/regulariser.h"
#include "tilt/train/reward_baselines.h"
#include "tilt/train/trainer.h"
#include "tilt/train/unified_losses.h"

// sampling
#include "tilt/sampling/adjoint_sampling.h"
#include "tilt/sampling/brownian.h"
#include "tilt/sampling/brownian_problem.h"
#include "tilt/sampling/energy.h"
#include "tilt/sampling/mcmc.h"
#include "tilt/sampling/replay_buffer.h"
#include "tilt/sampling/sample_metrics.h"

// eval
#include "tilt/eval/conditions.h"
#include "tilt/eval/image_metrics.h"
#include "tilt/eval/metrics.h"

// io
#include "tilt/io/builders.h"
#include "tilt/io/classifier_io.h"
#include "tilt/io/config.h"
#include "tilt/io/datasets.h"
#include "tilt/io/limits.h"
#include "tilt/io/logz.h"
#include "tilt/io/methods.h"
#include "tilt/io/model_io.h"
#include "tilt/io/plot.h"
#include "tilt/io/run.h"
#include "tilt/io/sample_sets.h"
#include "tilt/io/samples.h"
#include "tilt/io/sampling_config.h"
#include "tilt/io/sampling_run.h"
#include "tilt/io/soc_benchmark.h"
#include "tilt/io/training.h"
