// A multilayer perceptron velocity field v_theta(x, t) with a sinusoidal time embedding.
#pragma once

#include "tilt/model/velocity.h"

#include <memory>
#include <vector>

namespace tilt {

struct MlpOptions {
  int64_t dim = 2;                              ///< d, the data dimension
  std::vector<int64_t> hidden{256, 256, 256};   ///< widths of the hidden layers (SiLU between)
  int64_t time_features = 16;                   ///< t, then sin/cos(pi f t) for f = 1..time_features/2
  bool zero_output = false;                     ///< initialise the last layer to 0 (residual nets)
};

class MlpVelocity : public VelocityField {
 public:
  /// Initialises the weights from `seed` (PyTorch's default uniform(+-1/sqrt(fan_in)) law).
  MlpVelocity(const MlpOptions& options, SchedulePtr schedule, uint64_t seed);
  ~MlpVelocity() override;

  std::string kind() const override { return "mlp"; }
  int64_t dim() const override { return options_.dim; }
  using VelocityField::velocity;
  Tensor velocity(const Tensor& x, const Tensor& t) const override;
  std::vector<Tensor> parameters() const override;

  const MlpOptions& options() const { return options_; }
  NamedTensors named_parameters() const;
  /// Copies values in; throws tilt::Error naming a missing, unexpected or mis-shaped tensor.
  void load_parameters(const NamedTensors& values);
  void set_trainable(bool trainable) override;
  /// A deep copy with its own parameters.
  std::shared_ptr<MlpVelocity> clone() const;

 private:
  struct Impl;
  MlpOptions options_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace tilt
