// tilt eval-images by condition (docs/conditions.md, "The class-conditional digits"): the samples of a
// class-conditional model grouped by their one-hot condition, each group scored at its own class.
// Private to the io layer: tilt/io/classifier_io.h's evaluate_images calls it.
#pragma once

#include "tilt/core/tensor.h"
#include "tilt/eval/image_metrics.h"
#include "tilt/io/config.h"
#include "tilt/train/dataset.h"

#include <string>
#include <vector>

namespace tilt {

/// A samples file as read: its images [n, d] and condition columns ([n, dc] or undefined).
struct ImageSamples {
  std::string path;
  std::string what;  ///< "samples file", "--base file": how errors name it
  Tensor x;
  Tensor conditions;
};

/// ClassSampleMetrics as JSON: n, mean_reward, mean_reward_se, class_share, in_class, diversity, frechet.
Json metrics_json(const ClassSampleMetrics& m);
/// The unseen classifier's part of them: class_share, mean_reward, mean_reward_se.
Json unseen_json(const ClassScores& m);

/// The class of each row, [n] int64: its condition must be the one-hot row of one of data.classes
/// classes. Throws tilt::Error naming the file otherwise, or if it has no condition columns.
Tensor condition_classes(const ImageSamples& samples, int64_t classes);

/// n rows of x [N, ...] evenly spaced through it (rows 0, N/n, 2N/n, ...; all of x when n >= N): the real images
/// of a class at the samples' own n, for the floor row of eval-images.
Tensor evenly_spaced_rows(const Tensor& x, int64_t n);

/// evaluate_images by condition (tilt/io/classifier_io.h): "by_condition", "real", "samples", "target"
/// (with base: samples of the base model with condition columns, reweighted by p(c | x)^lambda per class),
/// "floor" (each class's real images at the first file's count of that class, scored as samples are: what
/// samples of the data's own law score at that n; the Frechet distance of a few samples is biased upwards).
/// unseen may be null.
Json evaluate_images_by_condition(const ImageDataset& data, const std::vector<ImageSamples>& files,
                                  const ImageSamples* base, double lambda, const MlpClassifier& classifier,
                                  const MlpClassifier* unseen);
std::string image_evaluation_by_condition_text(const Json& result, const std::vector<std::string>& sample_files);

}  // namespace tilt
