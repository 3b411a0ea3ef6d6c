// Controls with trainable parameters, for the SOC losses. u_theta(x, t) is returned in double and is
// differentiable in parameters() (and in x, where a loss needs it).
#pragma once

#include "tilt/model/mlp.h"
#include "tilt/soc/simulate.h"

#include <memory>
#include <vector>

namespace tilt::soc {

class ParametricControl {
 public:
  virtual ~ParametricControl() = default;
  virtual int64_t dim() const = 0;
  /// u_theta(x, t) at one time per row: x [B, d], t [B] -> [B, d] (double).
  virtual Tensor evaluate(const Tensor& x, const Tensor& t) const = 0;
  virtual std::vector<Tensor> parameters() const = 0;
  /// u_theta(x, t) at one time for the whole batch.
  Tensor operator()(const Tensor& x, double t) const;
  /// A Control that evaluates this one (the object must outlive it).
  Control as_control() const;
};

using ParametricControlPtr = std::shared_ptr<ParametricControl>;

/// An MLP of (x, t / T) (the same MLP and time embedding as the velocity networks), evaluated in
/// float32.
class ControlNetwork : public ParametricControl {
 public:
  /// hidden: widths of the hidden layers; zero_output: start at u = 0 (the last layer zeroed).
  ControlNetwork(int64_t dim, double horizon, std::vector<int64_t> hidden, uint64_t seed, bool zero_output = true);
  /// Around an existing network (e.g. one read back from a file), held, not copied.
  ControlNetwork(std::shared_ptr<MlpVelocity> mlp, double horizon);

  int64_t dim() const override { return mlp_->dim(); }
  Tensor evaluate(const Tensor& x, const Tensor& t) const override;
  std::vector<Tensor> parameters() const override { return mlp_->parameters(); }
  const MlpVelocity& mlp() const { return *mlp_; }
  double horizon() const { return horizon_; }

 private:
  std::shared_ptr<MlpVelocity> mlp_;
  double horizon_;
};

}  // namespace tilt::soc
