#include "tilt/model/mlp.h"

#include "tilt/core/check.h"
#include "tilt/core/error.h"

#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/linear.h>
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>  // at::NoGradGuard; not pulled in by ATen.h since LibTorch 2.0

#include <cmath>
#include <map>

namespace tilt {

struct MlpVelocity::Impl {
  torch::nn::Sequential net;
};

namespace {

constexpr double kPi = 3.14159265358979323846;

void validate(const MlpOptions& o) {
  if (o.dim < 1) throw Error("mlp: dim must be >= 1, got " + std::to_string(o.dim));
  if (o.hidden.empty()) throw Error("mlp: needs at least one hidden layer");
  for (int64_t w : o.hidden) {
    if (w < 1) throw Error("mlp: hidden widths must be >= 1, got " + std::to_string(w));
  }
  if (o.time_features < 0 || o.time_features % 2 != 0) {
    throw Error("mlp: time_features must be an even number >= 0, got " + std::to_string(o.time_features));
  }
}

// [t, sin(pi f t), cos(pi f t) for f = 1..n/2], shape [B, 1 + n].
Tensor embed_time(const Tensor& t, int64_t batch, int64_t n, const at::TensorOptions& opts) {
  Tensor tt = t.to(opts.dtype()).reshape({-1, 1}).expand({batch, 1});
  if (n == 0) return tt;
  const Tensor f = at::arange(1, n / 2 + 1, opts) * kPi;
  const Tensor arg = tt * f.unsqueeze(0);
  return at::cat({tt, at::sin(arg), at::cos(arg)}, 1);
}

}  // namespace

MlpVelocity::MlpVelocity(const MlpOptions& options, SchedulePtr schedule, uint64_t seed)
    : VelocityField(std::move(schedule)), options_(options), impl_(std::make_unique<Impl>()) {
  validate(options_);
  Generator gen = make_generator(seed);
  int64_t in = options_.dim + 1 + options_.time_features;
  std::vector<int64_t> widths = options_.hidden;
  widths.push_back(options_.dim);
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < widths.size(); ++i) {
    torch::nn::Linear layer(in, widths[i]);
    const double bound = 1.0 / std::sqrt(static_cast<double>(in));
    const bool last = i + 1 == widths.size();
    if (last && options_.zero_output) {
      layer->weight.zero_();
      layer->bias.zero_();
    } else {
      layer->weight.uniform_(-bound, bound, gen);
      layer->bias.uniform_(-bound, bound, gen);
    }
    impl_->net->push_back(layer);
    if (!last) impl_->net->push_back(torch::nn::SiLU());
    in = widths[i];
  }
}

MlpVelocity::~MlpVelocity() = default;

Tensor MlpVelocity::velocity(const Tensor& x, const Tensor& t) const {
  check_batch(x, options_.dim, "x");
  check_time(t, x.size(0), "t");
  const Tensor input = at::cat({x, embed_time(t, x.size(0), options_.time_features, x.options())}, 1);
  return impl_->net->forward(input);
}

std::vector<Tensor> MlpVelocity::parameters() const {
  std::vector<Tensor> out;
  for (const auto& p : impl_->net->parameters()) {
    if (p.requires_grad()) out.push_back(p);
  }
  return out;
}

NamedTensors MlpVelocity::named_parameters() const {
  NamedTensors out;
  for (const auto& item : impl_->net->named_parameters()) out.emplace_back(item.key(), item.value());
  return out;
}

void MlpVelocity::load_parameters(const NamedTensors& values) {
  std::map<std::string, Tensor> given(values.begin(), values.end());
  at::NoGradGuard no_grad;
  for (auto& item : impl_->net->named_parameters()) {
    auto it = given.find(item.key());
    if (it == given.end()) throw Error("mlp: parameter '" + item.key() + "' is missing");
    if (!it->second.sizes().equals(item.value().sizes())) {
      throw Error("mlp: parameter '" + item.key() + "' must be " + shape_string(item.value()) +
                  ", got " + shape_string(it->second));
    }
    item.value().copy_(it->second);
    given.erase(it);
  }
  if (!given.empty()) throw Error("mlp: unexpected parameter '" + given.begin()->first + "'");
}

void MlpVelocity::set_trainable(bool trainable) {
  for (auto& p : impl_->net->parameters()) p.set_requires_grad(trainable);
}

std::shared_ptr<MlpVelocity> MlpVelocity::clone() const {
  auto copy = std::make_shared<MlpVelocity>(options_, schedule(), 0);
  copy->load_parameters(named_parameters());
  return copy;
}

}  // namespace tilt
