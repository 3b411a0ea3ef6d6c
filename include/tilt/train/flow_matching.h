// Flow-matching pretraining of a velocity network on data samples (docs/equations.md, E5):
// regress v_theta(Xbar_t, t) onto alpha'_t X1 + beta'_t X0 with Xbar_t = alpha_t X1 + beta_t X0,
// X0 ~ N(0, I), X1 ~ data, t ~ U[0, 1]  (Lipman et al., "Flow Matching for Generative Modeling",
// arXiv 2210.02747, Eq. 22 with the affine paths of arXiv 2412.06264).
#pragma once

#include "tilt/model/mlp.h"
#include "tilt/soc/loss.h"

#include <functional>
#include <memory>

namespace tilt {

/// Draws n data samples [n, d] from gen.
using DataSampler = std::function<Tensor(int64_t n, Generator& gen)>;

/// Uniform minibatches (with replacement) from a fixed data set [N, d].
DataSampler dataset_sampler(Tensor data);

struct FlowMatchingOptions {
  int64_t batch_size = 256;
};

class FlowMatching : public Loss {
 public:
  FlowMatching(std::shared_ptr<MlpVelocity> model, DataSampler data, const FlowMatchingOptions& options);
  std::string name() const override { return "flow_matching"; }
  std::vector<Tensor> parameters() const override { return model_->parameters(); }
  LossOutput compute(Generator& gen) override;
  int64_t batch_size() const override { return options_.batch_size; }
  void set_batch_size(int64_t n) override;

 private:
  std::shared_ptr<MlpVelocity> model_;
  DataSampler data_;
  FlowMatchingOptions options_;
};

}  // namespace tilt
