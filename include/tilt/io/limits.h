// The bounds every configuration key and flag is checked against, in one place.
#pragma once

#include <cstdint>

namespace tilt {

/// Bounds on what a configuration or a flag may ask for (docs/config.md, "Limits"). They stop
/// typos (10^12 steps, lr = 1e300) with a message before anything runs; they are not a memory check.
namespace limits {
constexpr double kMagnitude = 1e6;        ///< |x| of data-space numbers: means, std, covariances, a, center, precision
constexpr double kLambda = 1e4;           ///< |lambda|, the reward multiplier
constexpr double kLrMin = 1e-12, kLrMax = 1.0;  ///< Adam's lr
constexpr double kEpsMin = 1e-30, kEpsMax = 1.0;  ///< Adam's eps (float32 keeps 1e-30 a normal number)
constexpr double kWeightDecayMax = 1.0;   ///< Adam's (L2) weight decay
constexpr int64_t kSteps = 100000;        ///< time steps of a simulation (num_steps, --steps)
constexpr int64_t kBatch = 1000000;       ///< trajectories or samples per batch (batch_size, --batch)
constexpr int64_t kStepsTimesBatch = 100000000;  ///< num_steps x batch_size: states of one simulated batch
constexpr int64_t kSamples = 10000000;    ///< samples or paths a command draws (-n, evaluation samples)
constexpr int64_t kWidth = 16384;         ///< a hidden layer's width
constexpr int64_t kTimeFeatures = 1024;   ///< sinusoidal time features
constexpr int64_t kComponents = 10000;    ///< mixture components
}  // namespace limits

}  // namespace tilt
