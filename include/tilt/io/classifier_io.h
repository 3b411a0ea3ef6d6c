// Classifier files: the network's structure and weights, and what it was trained on, as one
// pickled dict of tensors (readable by Python's torch.load as well).
#pragma once

#include "tilt/io/config.h"
#include "tilt/model/classifier.h"
#include "tilt/train/dataset.h"

#include <memory>
#include <string>
#include <vector>

namespace tilt {

/// Writes atomically; `info` is stored as is (data set, accuracy).
void save_classifier(const MlpClassifier& classifier, const std::string& path, const Json& info = Json::object());

struct LoadedClassifier {
  std::shared_ptr<MlpClassifier> classifier;  ///< frozen (parameters do not require gradients)
  Json info;
};
/// Throws tilt::Error naming the file if it is missing, not a classifier file, or corrupt.
LoadedClassifier load_classifier(const std::string& path);

/// What `tilt eval-images` measures generated images against: the real images of the target class of
/// a classifier reward ([data] type "digits" or "fashion_mnist"; [reward] type "classifier": path, class, lambda).
/// class = "condition" (by_condition): each sample is scored at its own class, the one-hot condition of
/// its row (the columns c0, c1, ... of a conditional model's samples; docs/conditions.md).
struct ImageEvaluation {
  ImageDataset data;
  std::string classifier_path;
  int64_t target_class = 0;   ///< unused when by_condition
  bool by_condition = false;  ///< class = "condition"
  double lambda = 1.0;
  ClassifierForm form = ClassifierForm::log_prob;  ///< [reward] form: the target p*'s reward (log p, or the indicator)
};
/// [data] and [reward], each finished.
ImageEvaluation read_image_evaluation(ConfigSection& root);

/// The metrics of the real images of the class ("real"), of each samples file ("samples": {file: ...}),
/// and, given samples of the base model, of the tilted target p* by reweighting them ("target"); the
/// keys of each are those of ClassSampleMetrics (n, mean_reward, mean_reward_se, class_share, in_class,
/// diversity, frechet). With `unseen_classifier` (a second classifier file, never used in training),
/// each samples file also gets "unseen": {class_share, mean_reward, mean_reward_se} under it.
///
/// By condition (setup.by_condition, or samples files with condition columns; then every file needs
/// them, each row the one-hot row of one of the data's classes), the rows of a file are grouped by their
/// class and "real", each file and "target" (base samples with condition columns) are
/// {"classes": [one object per class present: class, the metrics, unseen], "summary": {classes, n, the
/// mean over the classes of mean_reward, class_share, diversity, frechet (and of the unseen ones),
/// worst_class_share, worst_class}}; the result has "by_condition": true.
/// Throws tilt::Error naming a file whose samples are not images of the data set, or whose conditions
/// are missing or not one-hot rows of its classes.
Json evaluate_images(const ImageEvaluation& setup, const std::vector<std::string>& sample_files,
                     const std::string& base_samples_file = "", const std::string& unseen_classifier = "");
/// evaluate_images's result as a table, one row per samples file (in the order given); by condition,
/// a summary row per file (the means over classes) and then a table per file, one row per class.
std::string image_evaluation_text(const Json& result, const std::vector<std::string>& sample_files);

}  // namespace tilt
