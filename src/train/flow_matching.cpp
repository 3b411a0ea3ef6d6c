#include "tilt/train/flow_matching.h"

#include "tilt/core/check.h"
#include "tilt/core/error.h"

#include <ATen/ATen.h>

namespace tilt {

namespace {

void check_data_set(const Tensor& data) {
  if (!data.defined() || data.dim() != 2 || data.size(0) < 1) {
    throw Error("data set must be [N, d] with N >= 1, got " + shape_string(data));
  }
}

Tensor draw_rows(int64_t available, int64_t n, Generator& gen) {
  return at::randint(available, {n}, gen, at::TensorOptions().dtype(at::kLong));
}

}  // namespace

DataSampler dataset_sampler(Tensor data) {
  check_data_set(data);
  return [data](int64_t n, Generator& gen) { return data.index_select(0, draw_rows(data.size(0), n, gen)); };
}

ConditionalDataSampler dataset_sampler(Tensor data, Tensor conditions) {
  check_data_set(data);
  if (!conditions.defined() || conditions.dim() != 2 || conditions.size(0) != data.size(0) || conditions.size(1) < 1) {
    throw Error("data set conditions must be [" + std::to_string(data.size(0)) + ", dc] with dc >= 1 (one per row), got " +
                shape_string(conditions));
  }
  return [data, conditions](int64_t n, Generator& gen) {
    const Tensor idx = draw_rows(data.size(0), n, gen);
    return DataBatch{data.index_select(0, idx), conditions.index_select(0, idx)};
  };
}

ConditionalDataSampler conditional_mixture_sampler(std::shared_ptr<const GaussianMixture> mixture, Tensor shift,
                                                   ConditionSetPtr conditions) {
  if (!mixture || !conditions) throw Error("conditional mixture data: needs a mixture and a set of conditions");
  if (!shift.defined() || shift.dim() != 2 || shift.size(0) != mixture->dim() || shift.size(1) != conditions->dim()) {
    throw Error("conditional mixture data: the shift M must be [" + std::to_string(mixture->dim()) + ", " +
                std::to_string(conditions->dim()) + "] (data dimension, condition size), got " + shape_string(shift));
  }
  const Tensor M_t = shift.to(at::kFloat).t().contiguous();  // [dc, d]
  return [mixture, M_t, conditions](int64_t n, Generator& gen) {
    const Tensor c = conditions->draw(n, gen);  // first the conditions, then p_0's samples (E98)
    const Tensor y = mixture->sample(n, gen);
    return DataBatch{y + at::matmul(c, M_t), c};
  };
}

FlowMatching::FlowMatching(VelocityFieldPtr model, DataSampler data, const FlowMatchingOptions& options)
    : model_(std::move(model)), data_(std::move(data)), options_(options) {
  if (!model_) throw Error("flow matching: no model");
  if (!data_) throw Error("flow matching: no data");
  if (model_->condition_dim() > 0) {
    throw Error("flow matching: the model is conditional (a condition of size " + std::to_string(model_->condition_dim()) +
                "), but the data carry no conditions");
  }
  set_batch_size(options_.batch_size);
}

FlowMatching::FlowMatching(VelocityFieldPtr model, ConditionalDataSampler data, const FlowMatchingOptions& options)
    : model_(std::move(model)), conditional_data_(std::move(data)), options_(options) {
  if (!model_) throw Error("flow matching: no model");
  if (!conditional_data_) throw Error("flow matching: no data");
  if (model_->condition_dim() == 0) throw Error("flow matching: data with conditions need a conditional model");
  if (!(options_.condition_dropout >= 0.0 && options_.condition_dropout < 1.0)) {
    throw Error("flow matching: condition_dropout must be in [0, 1), got " + std::to_string(options_.condition_dropout));
  }
  set_batch_size(options_.batch_size);
}

void FlowMatching::set_batch_size(int64_t n) {
  if (n < 1) throw Error("flow matching: batch_size must be >= 1, got " + std::to_string(n));
  options_.batch_size = n;
}

LossOutput FlowMatching::compute(Generator& gen) {
  const int64_t B = options_.batch_size;
  Tensor x1, c;
  if (data_) {
    x1 = data_(B, gen).to(model_->device(), at::kFloat);
  } else {
    DataBatch batch = conditional_data_(B, gen);
    x1 = batch.x.to(model_->device(), at::kFloat);
    if (!batch.c.defined()) throw Error("flow matching: the data sampler gave no conditions");
    c = condition_rows(batch.c, B, model_->condition_dim(), "flow matching data").to(model_->device(), at::kFloat);
  }
  check_batch(x1, model_->dim(), "data batch");
  const Tensor x0 = normal_draws(x1.sizes(), gen, x1.options());
  const Tensor t = uniform_draws({B}, gen, x1.options());
  const ScheduleTensors s = model_->schedule()->at(t);
  const auto col = [](const Tensor& v) { return v.unsqueeze(1); };
  const Tensor xt = col(s.alpha) * x1 + col(s.beta) * x0;
  const Tensor target = col(s.d_alpha) * x1 + col(s.d_beta) * x0;
  LossOutput out;
  if (!c.defined()) {
    out.loss = (model_->velocity(xt, t) - target).pow(2).sum(1).mean();
    return out;
  }
  // E100: the rows whose uniform falls below p regress the null condition's field, the others v(. | c), in one
  // call (VelocityField::conditional_velocity_masked: one pass of fixed shape for tilt's networks).
  const double p = options_.condition_dropout;
  const Tensor dropped = p > 0.0 ? uniform_draws({B}, gen, x1.options()) < p : at::zeros({B}, x1.options().dtype(at::kBool));
  const Tensor v = model_->conditional_velocity_masked(xt, t, c, at::logical_not(dropped));
  out.loss = (v - target).pow(2).sum() / static_cast<double>(B);
  out.metrics.push_back({"dropped", dropped.sum().item<double>() / static_cast<double>(B)});
  return out;
}

}  // namespace tilt
