#include "tilt/model/classifier.h"
#include "tilt/model/condition.h"

#include "tilt/core/check.h"
#include "tilt/core/error.h"

#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/linear.h>
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/autograd.h>

#include <cmath>
#include <map>

namespace tilt {

struct MlpClassifier::Impl {
  torch::nn::Sequential body;  // input -> last hidden activations
  torch::nn::Linear head{nullptr};
};

MlpClassifier::MlpClassifier(const ClassifierOptions& options, uint64_t seed)
    : options_(options), impl_(std::make_unique<Impl>()) {
  if (options_.dim < 1) throw Error("classifier: dim must be >= 1");
  if (options_.classes < 2) throw Error("classifier: needs at least 2 classes");
  if (options_.hidden.empty()) throw Error("classifier: needs at least one hidden layer");
  for (int64_t w : options_.hidden) {
    if (w < 1) throw Error("classifier: hidden widths must be >= 1, got " + std::to_string(w));
  }
  const std::string& act = options_.activation;
  if (act != "silu" && act != "relu" && act != "tanh") {
    throw Error("classifier: activation must be \"silu\", \"relu\" or \"tanh\", got \"" + act + "\"");
  }
  Generator gen = make_generator(seed);
  at::NoGradGuard no_grad;
  auto init = [&](torch::nn::Linear& layer, int64_t in) {
    const double bound = 1.0 / std::sqrt(static_cast<double>(in));
    layer->weight.uniform_(-bound, bound, gen);
    layer->bias.uniform_(-bound, bound, gen);
  };
  int64_t in = options_.dim;
  for (int64_t w : options_.hidden) {
    torch::nn::Linear layer(in, w);
    init(layer, in);
    impl_->body->push_back(layer);
    // Parameter-free modules: the parameter names (body.<2i>.weight) are the same for every activation.
    if (act == "relu") impl_->body->push_back(torch::nn::ReLU());
    else if (act == "tanh") impl_->body->push_back(torch::nn::Tanh());
    else impl_->body->push_back(torch::nn::SiLU());
    in = w;
  }
  impl_->head = torch::nn::Linear(in, options_.classes);
  init(impl_->head, in);
}

MlpClassifier::~MlpClassifier() = default;

Tensor MlpClassifier::features(const Tensor& x) const {
  check_batch(x, options_.dim, "x");
  return impl_->body->forward(x);
}

Tensor MlpClassifier::logits(const Tensor& x) const { return impl_->head->forward(features(x)); }

Tensor MlpClassifier::log_probs(const Tensor& x) const { return at::log_softmax(logits(x), 1); }

std::vector<Tensor> MlpClassifier::parameters() const {
  std::vector<Tensor> out;
  for (const auto& [name, p] : named_parameters()) {
    if (p.requires_grad()) out.push_back(p);
  }
  return out;
}

NamedTensors MlpClassifier::named_parameters() const {
  NamedTensors out;
  for (const auto& item : impl_->body->named_parameters()) out.emplace_back("body." + item.key(), item.value());
  for (const auto& item : impl_->head->named_parameters()) out.emplace_back("head." + item.key(), item.value());
  return out;
}

void MlpClassifier::load_parameters(const NamedTensors& values) {
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

void MlpClassifier::set_trainable(bool trainable) {
  for (auto& [name, p] : named_parameters()) p.set_requires_grad(trainable);
}

ClassifierReward::ClassifierReward(ClassifierPtr classifier, int64_t target_class)
    : classifier_(std::move(classifier)), class_(target_class) {
  if (!classifier_) throw Error("classifier reward: no classifier");
  if (class_ < 0 || class_ >= classifier_->options().classes) {
    throw Error("classifier reward: class " + std::to_string(class_) + " does not exist (the classifier has classes 0.." +
                std::to_string(classifier_->options().classes - 1) + ")");
  }
}

Tensor ClassifierReward::value(const Tensor& x) const {
  return classifier_->log_probs(x).select(1, class_);
}

Tensor ClassifierReward::grad(const Tensor& x) const {
  at::AutoGradMode enable(true);
  const Tensor xd = x.detach().requires_grad_(true);
  const Tensor r = value(xd).sum();
  return torch::autograd::grad({r}, {xd})[0].detach();
}

ConditionalClassifierReward::ConditionalClassifierReward(ClassifierPtr classifier) : classifier_(std::move(classifier)) {
  if (!classifier_) throw Error("classifier reward: no classifier");
}

Tensor ConditionalClassifierReward::value(const Tensor& x) const { return conditional_value(x, Tensor()); }

Tensor ConditionalClassifierReward::conditional_value(const Tensor& x, const Tensor& c) const {
  const Tensor rows = condition_rows(c, x.size(0), condition_dim(), "classifier reward");
  if (!rows.defined()) throw Error("classifier reward: r(x, c) = log p(c | x) needs a condition (the class's one-hot row)");
  const Tensor log_p = classifier_->log_probs(x);
  return (rows.to(log_p.scalar_type()) * log_p).sum(1);
}

}  // namespace tilt
