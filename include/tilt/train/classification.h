// Training the image classifier behind the classifier reward (model/classifier.h): cross-entropy
// on minibatches of labelled images, with Gaussian noise added to the inputs so that the
// classifier, and the reward gradient grad_x log p(c | x) fine-tuning follows, stay smooth off the
// data (a classifier trained on clean images only has arbitrary gradients between them).
#pragma once

#include "tilt/model/classifier.h"
#include "tilt/soc/loss.h"
#include "tilt/train/dataset.h"

#include <memory>

namespace tilt {

struct ClassifierTrainingOptions {
  int64_t batch_size = 128;
  double input_noise = 0.2;  ///< std of the Gaussian noise added to training inputs (pixels in [-1, 1])
};

class ClassifierTraining : public Loss {
 public:
  ClassifierTraining(std::shared_ptr<MlpClassifier> classifier, ImageDataset train,
                     const ClassifierTrainingOptions& options);
  std::string name() const override { return "cross_entropy"; }
  std::vector<Tensor> parameters() const override { return classifier_->parameters(); }
  int64_t batch_size() const override { return options_.batch_size; }
  void set_batch_size(int64_t n) override;
  LossOutput compute(Generator& gen) override;

 private:
  std::shared_ptr<MlpClassifier> classifier_;
  ImageDataset train_;
  ClassifierTrainingOptions options_;
};

/// The share of images whose most likely class is their label.
double classifier_accuracy(const MlpClassifier& classifier, const Tensor& images, const Tensor& labels);

}  // namespace tilt
