// tilt eval for conditional problems (docs/conditions.md): per-condition rows against the exact
// p*(. | c). Private to the io layer: tilt/io/sample_sets.h's evaluate_sample_files calls it.
#pragma once

#include "tilt/core/tensor.h"
#include "tilt/io/config.h"

#include <string>
#include <vector>

namespace tilt {

/// Whether the config's data or reward moves with a condition ([data] shift, [reward] center_shift or a_shift).
bool config_is_conditional(const Config& config);
/// samples.<path>.{n, conditions: [{condition, set, n, energy_distance(_noise_floor, _ratio), mean_reward(_se)}],
/// sets.<train|held_out|outside|other>.{conditions, median_ratio, worst_ratio}}, target.{kind, lambda}.
/// condition ([dc]; undefined: none): the condition of the rows of files that have no condition columns.
Json evaluate_conditional_sample_files(Config& config, const std::vector<std::string>& samples, int64_t replicates,
                                       const Tensor& condition = Tensor());
std::string conditional_evaluation_text(const Json& result, const std::vector<std::string>& samples, int64_t replicates);

}  // namespace tilt
