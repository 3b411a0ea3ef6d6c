// One interface for every training loss: a loss draws what it needs (data, trajectories) from the
// generator it is given and returns a scalar to minimise, plus metrics to log.
#pragma once

#include "tilt/core/tensor.h"

#include <string>
#include <utility>
#include <vector>

namespace tilt {

struct LossOutput {
  Tensor loss;                                         ///< 0-dim, differentiable in parameters()
  std::vector<std::pair<std::string, double>> metrics; ///< logged with each iteration
};

class Loss {
 public:
  virtual ~Loss() = default;
  virtual std::string name() const = 0;
  /// The parameters the optimiser updates.
  virtual std::vector<Tensor> parameters() const = 0;
  /// One stochastic estimate, with all randomness drawn from gen.
  virtual LossOutput compute(Generator& gen) = 0;
};

}  // namespace tilt
