// The configurations of the training runs other than fine-tuning (which is tilt/io/methods.h):
// [pretrain] (flow matching on [data]) and [classifier] (the classifier behind the classifier reward),
// read with every default and check in one place, for `tilt pretrain`, `tilt classifier` and C++
// callers alike (docs/config.md).
#pragma once

#include "tilt/io/config.h"
#include "tilt/model/classifier.h"
#include "tilt/model/mlp.h"
#include "tilt/model/unet.h"
#include "tilt/schedule/schedule.h"
#include "tilt/train/classification.h"
#include "tilt/train/dataset.h"
#include "tilt/train/flow_matching.h"
#include "tilt/train/trainer.h"

#include <memory>
#include <string>

namespace tilt {

/// A pretraining run: the network, the data and flow matching's settings. With [conditions] the model is
/// conditional (docs/conditions.md): `conditional_data` draws (x, c) pairs, `conditions` are the training
/// conditions (recorded in the model file) and mlp.condition_dim is their size; `data` is then empty.
struct PretrainPlan {
  SchedulePtr schedule;
  int64_t dim = 0;
  DataSampler data;             ///< draws training samples of [data] (an unconditional run)
  ConditionalDataSampler conditional_data;  ///< draws (x, c) pairs (a conditional run)
  ConditionSetPtr conditions;   ///< the training conditions; null: unconditional
  std::string data_note;        ///< what the data is ("1797 digit images of 8 x 8 pixels"); empty for a mixture
  MlpOptions mlp;               ///< [pretrain] hidden, time_features (default 3 x 256)
  std::string network = "mlp";  ///< [pretrain] network: "mlp" or "unet" (image data only)
  UNetOptions unet;             ///< network = "unet": [pretrain] channels, channel_mult, blocks, groups, attention
  int64_t image_height = 0, image_width = 0;  ///< the images' size (image data); 0 otherwise
  /// The network to pretrain, initialised from `seed`.
  std::shared_ptr<VelocityField> make_model(uint64_t seed) const;
  FlowMatchingOptions flow_matching;
  TrainerOptions trainer;       ///< 5000 iterations, lr 1e-3, cosine decay by default
};
/// [schedule], [data] (a mixture, "csv" samples, or "digits" or "fashion_mnist" images), [conditions] if given (a mixture
/// with shift and conditions train/file, or the digits with classes = their number of classes) and
/// [pretrain] (condition_dropout only with [conditions]), each finished.
PretrainPlan read_pretrain(ConfigSection& root);

/// The flow-matching loss of the plan on `model` (conditional with the plan's conditions or not).
std::unique_ptr<FlowMatching> make_flow_matching(const PretrainPlan& plan, VelocityFieldPtr model);

/// A classifier run: the labelled images, the share held out, the network and its training.
struct ClassifierPlan {
  ImageDataset data;
  double holdout = 0.2;
  ClassifierOptions classifier;
  ClassifierTrainingOptions training;
  TrainerOptions trainer;  ///< 3000 iterations, lr 1e-3, cosine decay by default
};
/// [data] (type "digits" or "fashion_mnist") and [classifier], each finished.
ClassifierPlan read_classifier(ConfigSection& root);

}  // namespace tilt
