// Flow-matching pretraining of a velocity network on data samples (docs/equations.md, E5):
// regress v_theta(Xbar_t, t) onto alpha'_t X1 + beta'_t X0 with Xbar_t = alpha_t X1 + beta_t X0,
// X0 ~ N(0, I), X1 ~ data, t ~ U[0, 1]  (Lipman et al., "Flow Matching for Generative Modeling",
// arXiv 2210.02747, Eq. 22 with the affine paths of arXiv 2412.06264).
//
// With conditions (docs/conditions.md; E100) the data come in pairs (X1, c), and each row's c is replaced
// by the null condition with probability condition_dropout, so that one network learns v(x, t | c) and
// the unconditional v(x, t | null) that classifier-free guidance subtracts (Ho & Salimans, "Classifier-Free
// Diffusion Guidance", arXiv 2207.12598, Algorithm 1).
#pragma once

#include "tilt/model/condition.h"
#include "tilt/model/gmm.h"
#include "tilt/model/mlp.h"
#include "tilt/model/velocity.h"
#include "tilt/soc/loss.h"

#include <functional>
#include <memory>

namespace tilt {

/// Draws n data samples [n, d] from gen.
using DataSampler = std::function<Tensor(int64_t n, Generator& gen)>;

/// n data samples x [n, d] with the condition of each, c [n, dc].
struct DataBatch {
  Tensor x;
  Tensor c;
};
/// Draws n (x, c) pairs from gen.
using ConditionalDataSampler = std::function<DataBatch(int64_t n, Generator& gen)>;

/// Uniform minibatches (with replacement) from a fixed data set [N, d].
DataSampler dataset_sampler(Tensor data);

/// Uniform minibatches (with replacement) from a fixed data set [N, d] whose row i has the condition
/// conditions[i] ([N, dc]): the digits with their one-hot labels. Draws what dataset_sampler(data) draws.
/// Throws tilt::Error for mismatched shapes.
ConditionalDataSampler dataset_sampler(Tensor data, Tensor conditions);

/// The conditional mixture p_0(x - M c) over a set of conditions (E98): each sample draws its c uniformly
/// from `conditions` (all n first), then x = Y + M c with Y ~ p_0. shift M [d, dc]. Throws tilt::Error for
/// mismatched sizes.
ConditionalDataSampler conditional_mixture_sampler(std::shared_ptr<const GaussianMixture> mixture, Tensor shift,
                                                   ConditionSetPtr conditions);

struct FlowMatchingOptions {
  int64_t batch_size = 256;
  /// A conditional model only: the probability p in [0, 1) that a row's condition is replaced by the null
  /// condition (E100). 0.1 is the low end of the 0.1-0.2 of the classifier-free guidance paper: the null
  /// model only needs to be good enough to be subtracted, and the conditional one gets 90% of the batch.
  double condition_dropout = 0.1;
};

class FlowMatching : public Loss {
 public:
  /// An unconditional model on unconditional data.
  FlowMatching(VelocityFieldPtr model, DataSampler data, const FlowMatchingOptions& options);
  /// A conditional model (condition_dim() > 0) on (x, c) pairs whose c has its condition size.
  FlowMatching(VelocityFieldPtr model, ConditionalDataSampler data, const FlowMatchingOptions& options);
  std::string name() const override { return "flow_matching"; }
  std::vector<Tensor> parameters() const override { return model_->parameters(); }
  /// Draws, in this order: the data (and their conditions), X0, t, and for a conditional model with
  /// condition_dropout > 0 one uniform per row (dropped where < p). An unconditional run draws as before.
  LossOutput compute(Generator& gen) override;
  int64_t batch_size() const override { return options_.batch_size; }
  void set_batch_size(int64_t n) override;

 private:
  VelocityFieldPtr model_;
  DataSampler data_;
  ConditionalDataSampler conditional_data_;
  FlowMatchingOptions options_;
};

}  // namespace tilt
