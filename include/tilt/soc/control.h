// An explicit control network u_theta(x, t) for SOC problems: an MLP of (x, t / T) (the same MLP and
// time embedding as the velocity networks), evaluated in float32 and returned in double.
#pragma once

#include "tilt/model/mlp.h"
#include "tilt/soc/simulate.h"

#include <memory>
#include <vector>

namespace tilt::soc {

class ControlNetwork {
 public:
  /// hidden: widths of the hidden layers; zero_output: start at u = 0 (the last layer zeroed).
  ControlNetwork(int64_t dim, double horizon, std::vector<int64_t> hidden, uint64_t seed, bool zero_output = true);

  int64_t dim() const { return mlp_->dim(); }
  /// u_theta(x, t) [B, d] (double), differentiable in the parameters.
  Tensor operator()(const Tensor& x, double t) const;
  /// The same at one time per row: t [B].
  Tensor evaluate(const Tensor& x, const Tensor& t) const;
  std::vector<Tensor> parameters() const { return mlp_->parameters(); }
  /// A Control that evaluates the network (without gradients when called under a NoGradGuard).
  Control as_control() const;
  const MlpVelocity& mlp() const { return *mlp_; }

 private:
  std::shared_ptr<MlpVelocity> mlp_;
  double horizon_;
};

}  // namespace tilt::soc
