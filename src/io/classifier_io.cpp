#include "tilt/io/classifier_io.h"

#include "archive.h"
#include "conditional_images.h"
#include "tilt/core/check.h"
#include "tilt/core/error.h"
#include "tilt/eval/image_metrics.h"
#include "tilt/io/builders.h"
#include "tilt/io/run.h"
#include "tilt/io/samples.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace tilt {
namespace {
constexpr const char* kFormat = "tilt-classifier";
// Version 2 records the activation; a SiLU classifier is still written as version 1 (which has none), so that
// files an older tilt reads stay readable there, and one it would misread (another activation) is refused.
// Version 3 records the architecture ("cnn": also height, width, channels); an MLP is still written as
// version 1 or 2.
constexpr int kVersion = 3;
}  // namespace

void save_classifier(const MlpClassifier& classifier, const std::string& path, const Json& info) {
  const ClassifierOptions& o = classifier.options();
  Json meta{{"format", kFormat}, {"version", 1}, {"dim", o.dim}, {"hidden", o.hidden}, {"classes", o.classes},
            {"info", info}};
  if (o.activation != "silu") {
    meta["version"] = 2;
    meta["activation"] = o.activation;
  }
  if (o.architecture != "mlp") {
    meta["version"] = kVersion;
    meta["activation"] = o.activation;
    meta["architecture"] = o.architecture;
    meta["height"] = o.height;
    meta["width"] = o.width;
    meta["channels"] = o.channels;
  }
  archive::TensorMap tensors;
  for (const auto& [name, value] : classifier.named_parameters()) tensors[name] = value;
  archive::write(path, meta, tensors);
}

LoadedClassifier load_classifier(const std::string& path) {
  const archive::Contents c = archive::read(path, "classifier file", kFormat, kVersion, 1);
  try {
    // Errors thrown here get "classifier file '<path>': " in front (below).
    const auto whole = [](const Json& value, const std::string& key) {
      if (!value.is_number_integer()) throw Error("'" + key + "' must be a whole number, got " + value.dump());
      return value.get<int64_t>();
    };
    ClassifierOptions o;
    o.dim = whole(c.meta.at("dim"), "dim");
    o.hidden.clear();
    if (!c.meta.at("hidden").is_array()) throw Error("'hidden' must be a list of widths");
    for (const Json& w : c.meta.at("hidden")) o.hidden.push_back(whole(w, "hidden"));
    o.classes = whole(c.meta.at("classes"), "classes");
    const int version = c.meta.at("version").get<int>();
    if (version >= 2) {
      if (!c.meta.at("activation").is_string()) throw Error("'activation' must be a string");
      o.activation = c.meta.at("activation").get<std::string>();
      if (o.activation != "silu" && o.activation != "relu" && o.activation != "tanh") {
        throw Error("unknown activation \"" + o.activation + "\" (silu, relu, tanh)");
      }
    }
    if (version >= 3) {
      if (!c.meta.at("architecture").is_string()) throw Error("'architecture' must be a string");
      o.architecture = c.meta.at("architecture").get<std::string>();
      if (o.architecture != "mlp" && o.architecture != "cnn") {
        throw Error("unknown architecture \"" + o.architecture + "\" (mlp, cnn)");
      }
      if (o.architecture == "cnn") {
        o.height = whole(c.meta.at("height"), "height");
        o.width = whole(c.meta.at("width"), "width");
        o.channels.clear();
        if (!c.meta.at("channels").is_array()) throw Error("'channels' must be a list of channel counts");
        for (const Json& w : c.meta.at("channels")) o.channels.push_back(whole(w, "channels"));
      }
    }
    // The tensors' shapes follow from the metadata (classifier_parameter_shapes, which also checks it);
    // checked before the network is built, so that a width of 10^12 in the metadata allocates nothing.
    // Every floating tensor must be finite.
    for (const auto& [name, shape] : classifier_parameter_shapes(o)) {
      const Tensor t = archive::take(c, path, name);
      if (!t.sizes().equals(shape)) {
        std::string want;
        for (int64_t n : shape) want += (want.empty() ? "" : ", ") + std::to_string(n);
        throw Error("tensor '" + name + "' must be [" + want + "], got " + shape_string(t) +
                    " (the metadata's architecture, dim, hidden widths and classes do not fit the tensors)");
      }
    }
    auto classifier = std::make_shared<MlpClassifier>(o, 0);
    NamedTensors values;
    for (const auto& [name, value] : classifier->named_parameters()) values.emplace_back(name, archive::take(c, path, name));
    classifier->load_parameters(values);
    classifier->set_trainable(false);
    // Finite weights can still overflow float32 (1e38 gives inf after one layer): the logits at a
    // few fixed inputs (zeros, and rows in the pixel range [-1, 1] and beyond) must be finite.
    {
      at::NoGradGuard no_grad;
      const auto f32 = at::TensorOptions().dtype(at::kFloat);
      const Tensor x = at::stack({at::zeros({o.dim}, f32), at::linspace(-1.0, 1.0, o.dim, f32),
                                  at::linspace(3.0, -3.0, o.dim, f32)});
      if (!classifier->logits(x).isfinite().all().item<bool>()) {
        throw Error("the network produces non-finite logits (NaN or Inf): its weights are damaged, or too large for "
                    "float32");
      }
    }
    return {classifier, c.meta.value("info", Json::object())};
  } catch (const Json::exception& e) {
    throw Error("classifier file '" + path + "' has malformed metadata: " + e.what());
  } catch (const c10::Error& e) {
    throw Error("classifier file '" + path + "' is corrupt: " + e.what_without_backtrace());
  } catch (const Error& e) {
    throw Error("classifier file '" + path + "': " + e.what());
  }
}

}  // namespace tilt

// ---- evaluating images against a classifier ----
namespace tilt {

ImageEvaluation read_image_evaluation(ConfigSection& root) {
  ImageEvaluation e;
  auto data = read_image_data(root);
  if (!data) {
    throw Error("tilt eval-images needs an image data set, 'data.type' = \"digits\" or \"fashion_mnist\" (the real images "
                "of the target class)");
  }
  e.data = std::move(*data);
  ConfigSection reward = root.section("reward");
  if (!reward.has("type") || reward.string("type") != "classifier") {
    throw Error("tilt eval-images needs 'reward.type' = \"classifier\" (path, class)");
  }
  e.classifier_path = reward.string("path");
  e.by_condition = reward.has("class") && reward.value("class").is_string();
  if (e.by_condition && reward.string("class") != "condition") {
    reward.fail("class", "must be a class number or \"condition\" (each sample's own class, from its condition columns)");
  }
  e.target_class = e.by_condition ? 0 : reward.integer("class");
  if (e.target_class < 0 || e.target_class >= e.data.classes) {
    reward.fail("class", "must be in 0.." + std::to_string(e.data.classes - 1) + " (the data set's classes)");
  }
  e.lambda = reward.number("lambda", 1.0);
  if (!(std::abs(e.lambda) <= limits::kLambda)) {
    reward.fail("lambda", "must be in [" + number_string(-limits::kLambda) + ", " + number_string(limits::kLambda) + "]");
  }
  e.form = parse_classifier_form(reward.choice("form", {"log_prob", "indicator"}, "log_prob"));
  if (e.by_condition && e.form == ClassifierForm::indicator) {
    reward.fail("form", "\"indicator\" is evaluated for one class only (not class = \"condition\")");
  }
  reward.finish();
  return e;
}

namespace {

ImageSamples read_images(const std::string& file, const std::string& what, int64_t dim) {
  ImageSamples s{file, what, Tensor(), Tensor()};
  s.x = read_samples_csv(file, &s.conditions);
  if (s.x.size(1) != dim) {
    throw Error(what + " '" + file + "' has dimension " + std::to_string(s.x.size(1)) + ", the images have " +
                std::to_string(dim) + " pixels");
  }
  return s;
}

// The unseen classifier: one of the same images and classes as the data.
std::shared_ptr<MlpClassifier> load_unseen(const std::string& path, const ImageDataset& data) {
  if (path.empty()) return nullptr;
  const LoadedClassifier loaded = load_classifier(path);
  const ClassifierOptions& o = loaded.classifier->options();
  if (o.dim != data.dim() || o.classes != data.classes) {
    throw Error("--unseen classifier file '" + path + "' takes " + std::to_string(o.dim) + " pixels and " +
                std::to_string(o.classes) + " classes; the data has " + std::to_string(data.dim()) + " and " +
                std::to_string(data.classes));
  }
  return loaded.classifier;
}


std::string metrics_row(const std::string& name, const Json& s) {
  char line[320];
  int n = std::snprintf(line, sizeof line, "%-44s %6lld %8.3f±%-7.3f %8.1f%% %10.3f %10.3f %9.3f", name.c_str(),
                        static_cast<long long>(s["n"].get<int64_t>()), s["mean_reward"].get<double>(),
                        s["mean_reward_se"].get<double>(), 100.0 * s["class_share"].get<double>(),
                        s["diversity"].get<double>(), s.value("feature_diversity", 0.0), s["frechet"].get<double>());
  if (s.contains("unseen") && n > 0 && n < static_cast<int>(sizeof line)) {
    std::snprintf(line + n, sizeof line - n, " %8.1f%% %12.3f", 100.0 * s["unseen"]["class_share"].get<double>(),
                  s["unseen"]["mean_reward"].get<double>());
  }
  return std::string(line) + "\n";
}

}  // namespace

Json evaluate_images(const ImageEvaluation& setup, const std::vector<std::string>& sample_files,
                     const std::string& base_samples_file, const std::string& unseen_classifier) {
  if (sample_files.empty()) throw Error("give at least one --samples FILE");
  const LoadedClassifier loaded = load_classifier(setup.classifier_path);
  const std::shared_ptr<MlpClassifier> unseen = load_unseen(unseen_classifier, setup.data);
  std::optional<ImageSamples> base;
  if (!base_samples_file.empty()) base = read_images(base_samples_file, "--base file", setup.data.dim());
  std::vector<ImageSamples> files;
  bool by_condition = setup.by_condition;
  for (const std::string& file : sample_files) {
    files.push_back(read_images(file, "samples file", setup.data.dim()));
    by_condition = by_condition || files.back().conditions.defined();
  }
  if (by_condition) {
    Json out = evaluate_images_by_condition(setup.data, files, base ? &*base : nullptr, setup.lambda, *loaded.classifier,
                                            unseen.get());
    out["classifier"] = setup.classifier_path;
    if (unseen) out["unseen_classifier"] = unseen_classifier;
    return out;
  }
  const Tensor real_images = select_class(setup.data, setup.target_class).images;
  const RealClassStats real = real_class_stats(*loaded.classifier, real_images);
  Json out;
  out["class"] = setup.target_class;
  out["classifier"] = setup.classifier_path;
  if (unseen) out["unseen_classifier"] = unseen_classifier;
  out["real"] = metrics_json(class_sample_metrics(real_images, *loaded.classifier, setup.target_class, real));
  if (base) {
    out["target"] = metrics_json(
        tilted_target_metrics(base->x, *loaded.classifier, setup.target_class, setup.lambda, real, setup.form));
    out["target"]["lambda"] = setup.lambda;
    out["target"]["form"] = setup.form == ClassifierForm::indicator ? "indicator" : "log_prob";
    out["target"]["from"] = base_samples_file;
  }
  for (const ImageSamples& file : files) {
    Json& row = out["samples"][file.path] = metrics_json(class_sample_metrics(file.x, *loaded.classifier, setup.target_class, real));
    if (unseen) row["unseen"] = unseen_json(class_scores(file.x, *unseen, setup.target_class));
  }
  // The floor: the class's real images at the first file's n, scored as samples are.
  const Tensor floor_images = evenly_spaced_rows(real_images, files[0].x.size(0));
  out["floor"] = metrics_json(class_sample_metrics(floor_images, *loaded.classifier, setup.target_class, real));
  if (unseen) out["floor"]["unseen"] = unseen_json(class_scores(floor_images, *unseen, setup.target_class));
  out["floor"]["counts_of"] = files[0].path;
  return out;
}

std::string image_evaluation_text(const Json& out, const std::vector<std::string>& sample_files) {
  if (out.value("by_condition", false)) return image_evaluation_by_condition_text(out, sample_files);
  const bool unseen = out.contains("unseen_classifier");
  char head[1024];
  std::snprintf(head, sizeof head,
                "target class %lld (classifier %s%s%s); real images of the class: n = %lld, diversity %.3f\n"
                "%-44s %6s %16s %9s %10s %10s %9s%s\n",
                static_cast<long long>(out["class"].get<int64_t>()), out["classifier"].get<std::string>().c_str(),
                unseen ? "; unseen classifier " : "", unseen ? out["unseen_classifier"].get<std::string>().c_str() : "",
                static_cast<long long>(out["real"]["n"].get<int64_t>()), out["real"]["diversity"].get<double>(),
                "samples", "n", "log p(c|x)", "class %", "diversity", "feat. div.", "Frechet",
                unseen ? "  unseen %  unseen log p" : "");
  std::string text = head;
  for (const std::string& file : sample_files) text += metrics_row(file, out["samples"][file]);
  if (out.contains("floor")) text += metrics_row("floor: real images, the first file's n", out["floor"]);
  if (out.contains("target")) text += metrics_row("target p* (reweighted base samples)", out["target"]);
  text += std::string("(class %: samples the classifier assigns to the class; diversity: mean pairwise distance among "
                      "those, feat. div.: the same in the classifier's last hidden layer; Frechet: all samples vs the real images of the class, in the classifier's last hidden layer; "
                      "floor: as many real images of the class as the first file has, spread through the data: what samples of the data's own law score at that n") +
          (!out.contains("target") ? ""
           : out["target"].value("form", "log_prob") == "indicator"
               ? "; target p*: base samples weighted by exp(lambda) where the classifier's argmax is the class, n = effective sample size"
               : "; target p*: base samples weighted by p(c | x)^lambda, n = effective sample size") +
          (unseen ? "; unseen: the class share and log p(c|x) under the second classifier, never used in training" : "") +
          ")\n";
  return text;
}

}  // namespace tilt
