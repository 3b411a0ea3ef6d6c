#include "tilt/model/classifier.h"
#include "tilt/model/condition.h"

#include "tilt/core/check.h"
#include "tilt/core/error.h"

#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/pooling.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/linear.h>
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/autograd.h>

#include <cmath>
#include <map>

namespace tilt {

std::vector<std::pair<std::string, std::vector<int64_t>>> classifier_parameter_shapes(const ClassifierOptions& o) {
  if (o.architecture != "mlp" && o.architecture != "cnn") {
    throw Error("classifier: architecture must be \"mlp\" or \"cnn\", got \"" + o.architecture + "\"");
  }
  if (o.dim < 1) throw Error("classifier: dim must be >= 1, got " + std::to_string(o.dim));
  if (o.classes < 2) throw Error("classifier: needs at least 2 classes, got " + std::to_string(o.classes));
  if (o.hidden.empty()) throw Error("classifier: needs at least one hidden layer ('hidden' is empty)");
  for (int64_t w : o.hidden) {
    if (w < 1) throw Error("classifier: hidden widths must be >= 1, got " + std::to_string(w));
  }
  const std::string& act = o.activation;
  if (act != "silu" && act != "relu" && act != "tanh") {
    throw Error("classifier: activation must be \"silu\", \"relu\" or \"tanh\", got \"" + act + "\"");
  }
  std::vector<std::pair<std::string, std::vector<int64_t>>> shapes;
  int64_t in = o.dim;
  if (o.architecture == "cnn") {
    if (o.height < 1 || o.width < 1 || o.height * o.width != o.dim) {
      throw Error("classifier: a cnn needs height * width = dim (" + std::to_string(o.dim) + "), got height " +
                  std::to_string(o.height) + " and width " + std::to_string(o.width));
    }
    if (o.channels.empty()) throw Error("classifier: a cnn needs at least one convolution ('channels' is empty)");
    int64_t c = 1, h = o.height, w = o.width;
    for (size_t i = 0; i < o.channels.size(); ++i) {
      if (o.channels[i] < 1) throw Error("classifier: channels must be >= 1, got " + std::to_string(o.channels[i]));
      if (h < 2 || w < 2) {
        throw Error("classifier: " + std::to_string(o.channels.size()) + " convolution blocks halve the " +
                    std::to_string(o.height) + " x " + std::to_string(o.width) + " image below 1 pixel");
      }
      shapes.push_back({"conv." + std::to_string(3 * i) + ".weight", {o.channels[i], c, 3, 3}});
      shapes.push_back({"conv." + std::to_string(3 * i) + ".bias", {o.channels[i]}});
      c = o.channels[i];
      h /= 2;
      w /= 2;
    }
    in = c * h * w;
  }
  for (size_t i = 0; i < o.hidden.size(); ++i) {
    shapes.push_back({"body." + std::to_string(2 * i) + ".weight", {o.hidden[i], in}});
    shapes.push_back({"body." + std::to_string(2 * i) + ".bias", {o.hidden[i]}});
    in = o.hidden[i];
  }
  shapes.push_back({"head.weight", {o.classes, in}});
  shapes.push_back({"head.bias", {o.classes}});
  return shapes;
}

struct Classifier::Impl {
  torch::nn::Sequential conv;  // "cnn": [B, 1, H, W] -> the last block's pooled maps
  torch::nn::Sequential body;  // flat input -> last hidden activations
  torch::nn::Linear head{nullptr};
};

namespace {

torch::nn::AnyModule activation_module(const std::string& act) {
  // Parameter-free modules: the parameter names are the same for every activation.
  if (act == "relu") return torch::nn::AnyModule(torch::nn::ReLU());
  if (act == "tanh") return torch::nn::AnyModule(torch::nn::Tanh());
  return torch::nn::AnyModule(torch::nn::SiLU());
}

}  // namespace

Classifier::Classifier(const ClassifierOptions& options, uint64_t seed)
    : options_(options), impl_(std::make_unique<Impl>()) {
  if (options_.architecture == "mlp") {  // the image shape and channels mean nothing to an MLP
    options_.height = options_.width = 0;
    options_.channels.clear();
  }
  classifier_parameter_shapes(options_);  // checks the options
  const std::string& act = options_.activation;
  Generator gen = make_generator(seed);
  at::NoGradGuard no_grad;
  auto init = [&](Tensor& weight, Tensor& bias, int64_t fan_in) {
    const double bound = 1.0 / std::sqrt(static_cast<double>(fan_in));
    weight.uniform_(-bound, bound, gen);
    bias.uniform_(-bound, bound, gen);
  };
  int64_t in = options_.dim;
  if (options_.architecture == "cnn") {
    int64_t c = 1, h = options_.height, w = options_.width;
    for (int64_t out : options_.channels) {
      torch::nn::Conv2d conv(torch::nn::Conv2dOptions(c, out, 3).padding(1));
      init(conv->weight, conv->bias, c * 9);
      impl_->conv->push_back(conv);
      impl_->conv->push_back(activation_module(act));
      impl_->conv->push_back(torch::nn::AvgPool2d(torch::nn::AvgPool2dOptions(2)));
      c = out;
      h /= 2;
      w /= 2;
    }
    in = c * h * w;
  }
  for (int64_t w : options_.hidden) {
    torch::nn::Linear layer(in, w);
    init(layer->weight, layer->bias, in);
    impl_->body->push_back(layer);
    impl_->body->push_back(activation_module(act));
    in = w;
  }
  impl_->head = torch::nn::Linear(in, options_.classes);
  init(impl_->head->weight, impl_->head->bias, in);
}

Classifier::~Classifier() = default;

Tensor Classifier::features(const Tensor& x) const {
  check_batch(x, options_.dim, "x");
  if (options_.architecture != "cnn") return impl_->body->forward(x);
  const Tensor maps = impl_->conv->forward(x.reshape({x.size(0), 1, options_.height, options_.width}));
  return impl_->body->forward(maps.flatten(1));
}

void Classifier::to_float64() {
  impl_->conv->to(at::kDouble);
  impl_->body->to(at::kDouble);
  impl_->head->to(at::kDouble);
}

void Classifier::to(const at::Device& device) const { move_tensors(tensors_of(named_parameters()), device); }

at::Device Classifier::device() const { return named_parameters().front().second.device(); }

Tensor Classifier::logits(const Tensor& x) const { return impl_->head->forward(features(x)); }

Tensor Classifier::log_probs(const Tensor& x) const { return log_probs_of_features(features(x)); }

Tensor Classifier::log_probs_of_features(const Tensor& features) const {
  return at::log_softmax(impl_->head->forward(features), 1);
}

std::vector<Tensor> Classifier::parameters() const {
  std::vector<Tensor> out;
  for (const auto& [name, p] : named_parameters()) {
    if (p.requires_grad()) out.push_back(p);
  }
  return out;
}

NamedTensors Classifier::named_parameters() const {
  NamedTensors out;
  for (const auto& item : impl_->conv->named_parameters()) out.emplace_back("conv." + item.key(), item.value());
  for (const auto& item : impl_->body->named_parameters()) out.emplace_back("body." + item.key(), item.value());
  for (const auto& item : impl_->head->named_parameters()) out.emplace_back("head." + item.key(), item.value());
  return out;
}

void Classifier::load_parameters(const NamedTensors& values) {
  std::map<std::string, Tensor> given(values.begin(), values.end());
  at::NoGradGuard no_grad;
  for (auto& [name, p] : named_parameters()) {
    auto it = given.find(name);
    if (it == given.end()) throw Error("classifier: parameter '" + name + "' is missing");
    if (!it->second.sizes().equals(p.sizes())) {
      throw Error("classifier: parameter '" + name + "' must be " + shape_string(p) + ", got " +
                  shape_string(it->second));
    }
    p.copy_(it->second);
    given.erase(it);
  }
  if (!given.empty()) throw Error("classifier: unexpected parameter '" + given.begin()->first + "'");
}

void Classifier::set_trainable(bool trainable) {
  for (auto& [name, p] : named_parameters()) p.set_requires_grad(trainable);
}

ClassifierForm parse_classifier_form(const std::string& name) {
  if (name == "log_prob") return ClassifierForm::log_prob;
  if (name == "indicator") return ClassifierForm::indicator;
  throw Error("unknown classifier reward form '" + name + "' (valid: log_prob, indicator)");
}

namespace {

// 1 where row i's argmax is class[i] (a [B] long tensor), else 0, in log_p's dtype.
Tensor argmax_indicator(const Tensor& log_p, const Tensor& cls) {
  return log_p.argmax(1).eq(cls).to(log_p.scalar_type());
}

[[noreturn]] void no_gradient() {
  throw Error("the classifier reward with form = \"indicator\" has no gradient: fine-tune with a method that needs "
              "reward values only (ram, ddpo, grpo)");
}

}  // namespace

ClassifierReward::ClassifierReward(ClassifierPtr classifier, int64_t target_class, ClassifierForm form)
    : classifier_(std::move(classifier)), class_(target_class), form_(form) {
  if (!classifier_) throw Error("classifier reward: no classifier");
  if (class_ < 0 || class_ >= classifier_->options().classes) {
    throw Error("classifier reward: class " + std::to_string(class_) + " does not exist (the classifier has classes 0.." +
                std::to_string(classifier_->options().classes - 1) + ")");
  }
}

Tensor classifier_reward_values(const Tensor& log_p, int64_t target_class, ClassifierForm form) {
  if (form == ClassifierForm::indicator) {
    return argmax_indicator(log_p, at::full({log_p.size(0)}, target_class, log_p.options().dtype(at::kLong)));
  }
  return log_p.select(1, target_class);
}

Tensor ClassifierReward::value(const Tensor& x) const {
  return classifier_reward_values(classifier_->log_probs(x), class_, form_);
}

Tensor ClassifierReward::grad(const Tensor& x) const {
  if (form_ == ClassifierForm::indicator) no_gradient();
  at::AutoGradMode enable(true);
  const Tensor xd = x.detach().requires_grad_(true);
  const Tensor r = value(xd).sum();
  return torch::autograd::grad({r}, {xd})[0].detach();
}

ConditionalClassifierReward::ConditionalClassifierReward(ClassifierPtr classifier, ClassifierForm form)
    : classifier_(std::move(classifier)), form_(form) {
  if (!classifier_) throw Error("classifier reward: no classifier");
}

Tensor ConditionalClassifierReward::value(const Tensor& x) const { return conditional_value(x, Tensor()); }

Tensor ConditionalClassifierReward::conditional_value(const Tensor& x, const Tensor& c) const {
  const Tensor rows = condition_rows(c, x.size(0), condition_dim(), "classifier reward");
  if (!rows.defined()) throw Error("classifier reward: r(x, c) = log p(c | x) needs a condition (the class's one-hot row)");
  const Tensor log_p = classifier_->log_probs(x);
  if (form_ == ClassifierForm::indicator) return argmax_indicator(log_p, rows.argmax(1));
  return (rows.to(log_p.scalar_type()) * log_p).sum(1);
}

Tensor ConditionalClassifierReward::conditional_grad(const Tensor& x, const Tensor& c) const {
  if (form_ == ClassifierForm::indicator) no_gradient();
  return Reward::conditional_grad(x, c);
}

}  // namespace tilt
