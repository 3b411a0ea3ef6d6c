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

namespace {

// [data] type = "digits" or "fashion_mnist"; with [conditions] (classes = the data's number of classes) each image's
// condition is the one-hot row of its label.
void read_images(ConfigSection& root, PretrainPlan& p) {
  const std::string type = root.section("data").string("type");
  const ImageDataset images = *read_image_data(root);
  p.dim = images.dim();
  p.image_height = images.height;
  p.image_width = images.width;
  p.data_note = std::to_string(images.size()) + (type == "digits" ? " digit" : " Fashion-MNIST") + " images of " + std::to_string(images.height) + " x " +
                std::to_string(images.width) + " pixels";
  if (!root.has("conditions")) {
    p.data = dataset_sampler(images.images);
    return;
  }
  ConfigSection s = root.section("conditions");
  const std::string classes = std::to_string(images.classes);
  if (!s.has("classes")) {
    s.fail(s.has("train") ? "train" : s.has("file") ? "file" : "classes",
           type + " images are conditioned on their labels: give classes = " + classes + " (each image's one-hot label)");
  }
  if (s.integer("classes") != images.classes) {
    s.fail("classes", "must be " + classes + ", the number of classes of the images in [data], got " +
                          std::to_string(s.integer("classes")));
  }
  p.conditions = read_conditions(s, images.classes).train;
  p.conditional_data = dataset_sampler(images.images, at::one_hot(images.labels, images.classes).to(at::kFloat));
  p.data_note += ", conditioned on their labels (" + classes + " classes)";
}

// A Gaussian mixture; with [data] shift and [conditions] the conditional mixture p_0(x - M c) over the
// training conditions (docs/equations.md, E98).
void read_mixture_data(ConfigSection& root, PretrainPlan& p) {
  Tensor shift;
  std::shared_ptr<const GaussianMixture> mixture = read_data_mixture(root, &shift);
  p.dim = mixture->dim();
  if (!shift.defined()) {
    if (root.has("conditions")) {
      throw Error("[conditions] is given, but [data] does not depend on a condition: give [data] shift (the means move "
                  "by M c) to pretrain a conditional model");
    }
    p.data = [mixture](int64_t n, Generator& gen) { return mixture->sample(n, gen); };
    return;
  }
  if (!root.has("conditions")) {
    root.section("data").fail("shift", "makes the data conditional: pretraining needs [conditions] (train, classes or "
                                       "file) to draw each sample's condition from");
  }
  p.conditions = read_conditions(root.section("conditions"), shift.size(1)).train;
  p.conditional_data = conditional_mixture_sampler(mixture, shift, p.conditions);
  p.data_note = "a Gaussian mixture moved by M c, c drawn from " + std::to_string(p.conditions->size()) +
                " training conditions";
}

}  // namespace

PretrainPlan read_pretrain(ConfigSection& root) {
  PretrainPlan p;
  p.schedule = read_schedule(root.section("schedule", /*optional=*/true));
  ConfigSection data = root.section("data");
  if (data.has("type") && is_image_data_type(data.string("type"))) {
    read_images(root, p);
  } else if (data.has("type") && data.string("type") == "csv") {
    if (root.has("conditions")) {
      throw Error("[conditions] for pretraining needs data with conditions: [data] with shift, or type = \"digits\" or \"fashion_mnist\" "
                  "(a \"csv\" data file has none)");
    }
    const std::string path = data.string("path");
    data.finish();
    const Tensor x = read_samples_csv(path);
    p.dim = x.size(1);
    p.data = dataset_sampler(x);
    p.data_note = std::to_string(x.size(0)) + " samples of dimension " + std::to_string(p.dim) + " from " + path;
  } else {
    read_mixture_data(root, p);
  }
  ConfigSection section = root.section("pretrain", /*optional=*/true);  // every key has a default
  p.network = section.choice("network", {"mlp", "unet"}, "mlp");
  if (p.network == "unet") {
    if (p.image_height == 0) section.fail("network", "is \"unet\", which needs images: [data] type = \"digits\" or \"fashion_mnist\"");
    for (const char* key : {"hidden"}) {
      if (section.has(key)) section.fail(key, "is for network = \"mlp\"");
    }
    p.unet = read_unet(section, p.image_height, p.image_width);
  } else {
    for (const char* key : {"channels", "channel_mult", "blocks", "groups", "attention"}) {
      if (section.has(key)) section.fail(key, "is for network = \"unet\"");
    }
    p.mlp = read_mlp(section, p.dim, {256, 256, 256});
  }
  if (p.conditions) {
    p.mlp.condition_dim = p.conditions->dim();
    p.unet.condition_dim = p.conditions->dim();
    p.flow_matching.condition_dropout = section.number("condition_dropout", p.flow_matching.condition_dropout);
    const double q = p.flow_matching.condition_dropout;
    if (!(q >= 0.0 && q < 1.0)) section.fail("condition_dropout", "must be in [0, 1) (the probability of the null condition)");
  } else if (section.has("condition_dropout")) {
    section.fail("condition_dropout", "is for a conditional model, which needs [conditions] (docs/conditions.md)");
  }
  p.flow_matching.batch_size = read_integer_in(section, "batch_size", 256, 1, limits::kBatch);
  p.trainer = read_trainer(section, cosine_defaults(5000));
  if (p.trainer.shards > p.flow_matching.batch_size) {
    section.fail("shards", "must be at most batch_size = " + std::to_string(p.flow_matching.batch_size));
  }
  section.finish();
  return p;
}

std::shared_ptr<VelocityField> PretrainPlan::make_model(uint64_t seed) const {
  if (network == "unet") return std::make_shared<UNetVelocity>(unet, schedule, seed);
  return std::make_shared<MlpVelocity>(mlp, schedule, seed);
}

std::unique_ptr<FlowMatching> make_flow_matching(const PretrainPlan& plan, VelocityFieldPtr model) {
  if (plan.conditions) return std::make_unique<FlowMatching>(std::move(model), plan.conditional_data, plan.flow_matching);
  return std::make_unique<FlowMatching>(std::move(model), plan.data, plan.flow_matching);
}

ClassifierPlan read_classifier(ConfigSection& root) {
  ClassifierPlan p;
  auto data = read_image_data(root, &p.holdout);
  if (!data) throw Error("tilt classifier needs labelled images: 'data.type' must be \"digits\" or \"fashion_mnist\"");
  p.data = std::move(*data);
  ConfigSection section = root.section("classifier", /*optional=*/true);
  p.classifier.dim = p.data.dim();
  p.classifier.classes = p.data.classes;
  p.classifier.architecture = section.choice("architecture", {"mlp", "cnn"}, "mlp");
  if (p.classifier.architecture == "cnn") {
    p.classifier.height = p.data.height;
    p.classifier.width = p.data.width;
    p.classifier.channels = read_widths(section, "channels", p.classifier.channels);
    p.classifier.hidden = {128};
  } else if (section.has("channels")) {
    section.fail("channels", "is for architecture = \"cnn\" (the convolutions' output channels)");
  }
  p.classifier.hidden = read_widths(section, "hidden", p.classifier.hidden);
  p.classifier.activation = section.choice("activation", {"silu", "relu", "tanh"}, "silu");
  p.training.batch_size = read_integer_in(section, "batch_size", p.training.batch_size, 1, limits::kBatch);
  p.training.input_noise = read_number_in(section, "input_noise", p.training.input_noise, 0, limits::kMagnitude);
  p.trainer = read_trainer(section, cosine_defaults(3000));
  section.finish();
  try {
    classifier_parameter_shapes(p.classifier);
  } catch (const Error& e) {
    section.fail(p.classifier.architecture == "cnn" ? "channels" : "hidden", e.what());
  }
  return p;
}

}  // namespace tilt
