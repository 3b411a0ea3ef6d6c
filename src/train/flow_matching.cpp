#include "tilt/train/flow_matching.h"

#include "tilt/core/check.h"
#include "tilt/core/error.h"

#include <ATen/ATen.h>

namespace tilt {

DataSampler dataset_sampler(Tensor data) {
  if (!data.defined() || data.dim() != 2 || data.size(0) < 1) {
    throw Error("data set must be [N, d] with N >= 1, got " + shape_string(data));
  }
  return [data](int64_t n, Generator& gen) {
    const Tensor idx = at::randint(data.size(0), {n}, gen, at::TensorOptions().dtype(at::kLong));
    return data.index_select(0, idx);
  };
}

FlowMatching::FlowMatching(std::shared_ptr<MlpVelocity> model, DataSampler data,
                           const FlowMatchingOptions& options)
    : model_(std::move(model)), data_(std::move(data)), options_(options) {
  if (!model_) throw Error("flow matching: no model");
  if (!data_) throw Error("flow matching: no data");
  if (options_.batch_size < 1) throw Error("flow matching: batch_size must be >= 1");
}

void FlowMatching::set_batch_size(int64_t n) {
  if (n < 1) throw Error("flow matching: batch_size must be >= 1, got " + std::to_string(n));
  options_.batch_size = n;
}

LossOutput FlowMatching::compute(Generator& gen) {
  const int64_t B = options_.batch_size;
  const Tensor x1 = data_(B, gen).to(at::kFloat);
  check_batch(x1, model_->dim(), "data batch");
  const Tensor x0 = at::randn(x1.sizes(), gen, x1.options());
  const Tensor t = at::rand({B}, gen, x1.options());
  const ScheduleTensors s = model_->schedule()->at(t);
  const auto col = [](const Tensor& v) { return v.unsqueeze(1); };
  const Tensor xt = col(s.alpha) * x1 + col(s.beta) * x0;
  const Tensor target = col(s.d_alpha) * x1 + col(s.d_beta) * x0;
  LossOutput out;
  out.loss = (model_->velocity(xt, t) - target).pow(2).sum(1).mean();
  return out;
}

}  // namespace tilt
