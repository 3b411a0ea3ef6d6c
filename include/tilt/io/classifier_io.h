// Classifier files: the network's structure and weights, and what it was trained on, as one
// pickled dict of tensors (readable by Python's torch.load as well).
#pragma once

#include "tilt/io/config.h"
#include "tilt/model/classifier.h"

#include <memory>
#include <string>

namespace tilt {

/// Writes atomically; `info` is stored as is (data set, accuracy).
void save_classifier(const MlpClassifier& classifier, const std::string& path, const Json& info = Json::object());

struct LoadedClassifier {
  std::shared_ptr<MlpClassifier> classifier;  ///< frozen (parameters do not require gradients)
  Json info;
};
/// Throws tilt::Error naming the file if it is missing, not a classifier file, or corrupt.
LoadedClassifier load_classifier(const std::string& path);

}  // namespace tilt
