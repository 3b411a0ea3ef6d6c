#include "tilt/io/training.h"

#include "tilt/core/error.h"
#include "tilt/io/builders.h"
#include "tilt/io/run.h"
#include "tilt/io/samples.h"

#include <ATen/ATen.h>

namespace tilt {

namespace {

TrainerOptions cosine_defaults(int64_t iterations) {
  TrainerOptions d;
  d.iterations = iterations;
  d.adam = {1e-3, 0.9, 0.999, 1e-8, 0.0};
  d.lr_schedule = LrSchedule::cosine;
  d.checkpoint_every = 500;
  return d;
}

}  // namespace

PretrainPlan read_pretrain(ConfigSection& root) {
  PretrainPlan p;
  p.schedule = read_schedule(root.section("schedule", /*optional=*/true));
  ConfigSection data = root.section("data");
  if (data.has("type") && data.string("type") == "digits") {
    const ImageDataset images = *read_image_data(root);
    p.dim = images.dim();
    p.data = dataset_sampler(images.images);
    p.data_note = std::to_string(images.size()) + " digit images of " + std::to_string(images.height) + " x " +
                  std::to_string(images.width) + " pixels";
  } else if (data.has("type") && data.string("type") == "csv") {
    const std::string path = data.string("path");
    data.finish();
    const Tensor x = read_samples_csv(path);
    p.dim = x.size(1);
    p.data = dataset_sampler(x);
    p.data_note = std::to_string(x.size(0)) + " samples of dimension " + std::to_string(p.dim) + " from " + path;
  } else {
    auto mixture = read_mixture(data);
    p.dim = mixture->dim();
    p.data = [mixture](int64_t n, Generator& gen) { return mixture->sample(n, gen); };
  }
  ConfigSection section = root.section("pretrain");
  p.mlp = read_mlp(section, p.dim, {256, 256, 256});
  p.flow_matching.batch_size = read_integer_in(section, "batch_size", 256, 1, limits::kBatch);
  p.trainer = read_trainer(section, cosine_defaults(5000));
  if (p.trainer.shards > p.flow_matching.batch_size) {
    section.fail("shards", "must be at most batch_size = " + std::to_string(p.flow_matching.batch_size));
  }
  section.finish();
  return p;
}

ClassifierPlan read_classifier(ConfigSection& root) {
  ClassifierPlan p;
  auto data = read_image_data(root, &p.holdout);
  if (!data) throw Error("tilt classifier needs labelled images: 'data.type' must be \"digits\"");
  p.data = std::move(*data);
  ConfigSection section = root.section("classifier");
  p.classifier.dim = p.data.dim();
  p.classifier.classes = p.data.classes;
  p.classifier.hidden = read_widths(section, "hidden", p.classifier.hidden);
  p.training.batch_size = read_integer_in(section, "batch_size", p.training.batch_size, 1, limits::kBatch);
  p.training.input_noise = read_number_in(section, "input_noise", p.training.input_noise, 0, limits::kMagnitude);
  p.trainer = read_trainer(section, cosine_defaults(3000));
  section.finish();
  return p;
}

}  // namespace tilt
