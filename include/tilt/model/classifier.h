// An image classifier p(c | x) (a multilayer perceptron, or a small convolutional network; SiLU
// activations by default), and the reward
// built from it: r(x) = log p(c | x) for a chosen class c. With lambda = 1 the tilted target
// p_base(x) p(c | x)^lambda / Z is then the base model's class-conditional law p_base(x | c): reward
// fine-tuning as conditional sampling (issue 4; Adjoint Matching, Sec. 6 uses classifier-free
// rewards, the tilt is the same).
#pragma once

#include "tilt/model/reward.h"
#include "tilt/model/velocity.h"

#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace tilt {

struct ClassifierOptions {
  /// "mlp": fully connected layers of widths `hidden` on the flat input. "cnn": the input, a
  /// height x width single-channel image, goes through one block per entry of `channels` (a 3x3
  /// convolution with that many output channels, padding 1, the activation, a 2x2 average pool),
  /// then is flattened into the fully connected layers of widths `hidden`.
  std::string architecture = "mlp";
  int64_t dim = 64;                       ///< input dimension (height * width for "cnn")
  std::vector<int64_t> hidden{256, 256};  ///< widths of the fully connected hidden layers
  int64_t classes = 10;
  /// After each hidden layer and convolution: "silu", "relu" or "tanh" (another architecture, e.g.
  /// for an unseen reward that scores samples without having shaped them).
  std::string activation = "silu";
  int64_t height = 0, width = 0;          ///< "cnn": the image's shape (row-major pixels in x)
  std::vector<int64_t> channels{32, 64};  ///< "cnn": output channels of the convolution blocks
};

/// The parameters' names and shapes for `options` (conv.<3i> = the convolutions of "cnn",
/// body.<2i> = the hidden layers, head), computed without building the network; throws tilt::Error
/// naming the bad option when the options are inconsistent.
std::vector<std::pair<std::string, std::vector<int64_t>>> classifier_parameter_shapes(const ClassifierOptions& options);

class Classifier {
 public:
  /// Initialises the weights from `seed` (PyTorch's default uniform(+-1/sqrt(fan_in)) law).
  /// Throws tilt::Error for inconsistent options (e.g. a "cnn" whose height * width is not dim).
  Classifier(const ClassifierOptions& options, uint64_t seed);
  ~Classifier();

  /// Logits [B, classes] for x [B, dim]; differentiable in x and the parameters.
  Tensor logits(const Tensor& x) const;
  /// log p(c | x) for every class, [B, classes].
  Tensor log_probs(const Tensor& x) const;
  /// log p(c | x) from features(x) [B, hidden.back()] (the head and the softmax): log_probs without running the body
  /// twice when the features are needed too.
  Tensor log_probs_of_features(const Tensor& features) const;
  /// The last hidden layer's activations, [B, hidden.back()]: the feature space of the Frechet
  /// distance (eval/image_metrics.h).
  Tensor features(const Tensor& x) const;
  /// Casts the parameters to float64 (inputs must then be float64): for finite-difference checks.
  void to_float64();
  /// Moves the parameters to `device` in place (docs/devices.md): what the classifier holds is not
  /// changed in value, so a shared const classifier may be moved.
  void to(const at::Device& device) const;
  at::Device device() const;

  std::vector<Tensor> parameters() const;
  NamedTensors named_parameters() const;
  /// Copies values in; throws tilt::Error naming a missing, unexpected or mis-shaped tensor.
  void load_parameters(const NamedTensors& values);
  void set_trainable(bool trainable);
  const ClassifierOptions& options() const { return options_; }

 private:
  struct Impl;
  ClassifierOptions options_;
  std::unique_ptr<Impl> impl_;
};

/// The name the classifier had when it was only a multilayer perceptron.
using MlpClassifier = Classifier;

using ClassifierPtr = std::shared_ptr<const Classifier>;

/// What a classifier reward returns of p(. | x).
enum class ClassifierForm {
  log_prob,   ///< log p(c | x): differentiable
  indicator,  ///< 1 if argmax_k p(k | x) = c, else 0: no gradient (docs/ram.md)
};
ClassifierForm parse_classifier_form(const std::string& name);  // "log_prob" | "indicator"

/// r of each row for class c from the classifier's log p(. | x) [B, K]: log p(c | x), or 1 where c is the argmax and
/// 0 elsewhere (form); [B] in log_p's dtype. What ClassifierReward returns, and what eval-images weights the base by.
Tensor classifier_reward_values(const Tensor& log_p, int64_t target_class, ClassifierForm form);

/// r(x) = log p(c | x), or the indicator that c is the classifier's argmax (the classifier is frozen). No
/// closed-form tilt.
class ClassifierReward : public Reward {
 public:
  /// Throws tilt::Error if the class does not exist.
  ClassifierReward(ClassifierPtr classifier, int64_t target_class, ClassifierForm form = ClassifierForm::log_prob);
  std::string kind() const override { return form_ == ClassifierForm::indicator ? "classifier_indicator" : "classifier"; }
  int64_t dim() const override { return classifier_->options().dim; }
  Tensor value(const Tensor& x) const override;
  /// Throws tilt::Error for the indicator.
  Tensor grad(const Tensor& x) const override;
  bool differentiable() const override { return form_ == ClassifierForm::log_prob; }
  const MlpClassifier& classifier() const { return *classifier_; }
  int64_t target_class() const { return class_; }
  void to(const at::Device& device) const override { classifier_->to(device); }

 private:
  ClassifierPtr classifier_;
  int64_t class_;
  ClassifierForm form_;
};

/// r(x, c) = c . log p(. | x): for a class's one-hot c, log p(c | x), the prompt adherence of a
/// class-conditional model (docs/conditions.md; the analogue of CLIPScore). condition_dim() is the number of
/// classes; there is no null condition (value(x) throws).
class ConditionalClassifierReward : public Reward {
 public:
  explicit ConditionalClassifierReward(ClassifierPtr classifier, ClassifierForm form = ClassifierForm::log_prob);
  std::string kind() const override { return form_ == ClassifierForm::indicator ? "classifier_indicator" : "classifier"; }
  bool differentiable() const override { return form_ == ClassifierForm::log_prob; }
  /// Throws tilt::Error for the indicator (the default autograd path otherwise).
  Tensor conditional_grad(const Tensor& x, const Tensor& c) const override;
  int64_t dim() const override { return classifier_->options().dim; }
  int64_t condition_dim() const override { return classifier_->options().classes; }
  Tensor value(const Tensor& x) const override;
  Tensor conditional_value(const Tensor& x, const Tensor& c) const override;
  const MlpClassifier& classifier() const { return *classifier_; }
  void to(const at::Device& device) const override { classifier_->to(device); }

 private:
  ClassifierPtr classifier_;
  ClassifierForm form_;
};

}  // namespace tilt
