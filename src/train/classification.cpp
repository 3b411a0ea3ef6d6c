#include "tilt/train/classification.h"

#include "tilt/core/error.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>

namespace tilt {

ClassifierTraining::ClassifierTraining(std::shared_ptr<MlpClassifier> classifier, ImageDataset train,
                                       const ClassifierTrainingOptions& options)
    : classifier_(std::move(classifier)), train_(std::move(train)), options_(options) {
  if (!classifier_) throw Error("classifier training: no classifier");
  if (train_.size() == 0) throw Error("classifier training: no training images");
  if (train_.dim() != classifier_->options().dim) {
    throw Error("classifier training: images have " + std::to_string(train_.dim()) + " pixels but the classifier takes " +
                std::to_string(classifier_->options().dim));
  }
  if (train_.classes > classifier_->options().classes) {
    throw Error("classifier training: the data has " + std::to_string(train_.classes) + " classes, the classifier " +
                std::to_string(classifier_->options().classes));
  }
  if (options_.batch_size < 1) throw Error("classifier training: batch_size must be >= 1");
  if (options_.input_noise < 0) throw Error("classifier training: input_noise must be >= 0");
}

void ClassifierTraining::set_batch_size(int64_t n) {
  if (n < 1) throw Error("classifier training: batch_size must be >= 1, got " + std::to_string(n));
  options_.batch_size = n;
}

LossOutput ClassifierTraining::compute(Generator& gen) {
  const Tensor idx = at::randint(train_.size(), {options_.batch_size}, gen, at::TensorOptions().dtype(at::kLong));
  Tensor x = train_.images.index_select(0, idx);
  const Tensor y = train_.labels.index_select(0, idx);
  if (options_.input_noise > 0) x = x + options_.input_noise * at::randn(x.sizes(), gen);
  const Tensor logits = classifier_->logits(x);
  LossOutput out;
  out.loss = at::nll_loss(at::log_softmax(logits, 1), y);
  at::NoGradGuard no_grad;
  out.metrics.emplace_back("accuracy", (logits.argmax(1) == y).to(at::kDouble).mean().item<double>());
  return out;
}

double classifier_accuracy(const MlpClassifier& classifier, const Tensor& images, const Tensor& labels) {
  at::NoGradGuard no_grad;
  if (images.size(0) == 0) return 0.0;
  // In chunks: a cnn's first feature maps of 54000 Fashion-MNIST images at once would take 5 GB.
  constexpr int64_t kChunk = 1000;
  int64_t correct = 0;
  for (int64_t at = 0; at < images.size(0); at += kChunk) {
    const int64_t n = std::min(kChunk, images.size(0) - at);
    correct += (classifier.logits(images.narrow(0, at, n)).argmax(1) == labels.narrow(0, at, n)).sum().item<int64_t>();
  }
  return static_cast<double>(correct) / static_cast<double>(images.size(0));
}

}  // namespace tilt
