#include "tilt/io/classifier_io.h"

#include "archive.h"
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
#include <string>
#include <utility>
#include <vector>

namespace tilt {
namespace {
constexpr const char* kFormat = "tilt-classifier";
constexpr int kVersion = 1;
}  // namespace

void save_classifier(const MlpClassifier& classifier, const std::string& path, const Json& info) {
  const ClassifierOptions& o = classifier.options();
  Json meta{{"format", kFormat}, {"version", kVersion}, {"dim", o.dim}, {"hidden", o.hidden}, {"classes", o.classes},
            {"info", info}};
  archive::TensorMap tensors;
  for (const auto& [name, value] : classifier.named_parameters()) tensors[name] = value;
  archive::write(path, meta, tensors);
}

LoadedClassifier load_classifier(const std::string& path) {
  const archive::Contents c = archive::read(path, "classifier file", kFormat, kVersion);
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
    if (o.dim < 1) throw Error("classifier: dim must be >= 1, got " + std::to_string(o.dim));
    if (o.classes < 2) throw Error("classifier: needs at least 2 classes, got " + std::to_string(o.classes));
    if (o.hidden.empty()) throw Error("classifier: needs at least one hidden layer ('hidden' is empty)");
    for (int64_t w : o.hidden) {
      if (w < 1) throw Error("classifier: hidden widths must be >= 1, got " + std::to_string(w));
    }
    // The tensors' shapes follow from the metadata (src/model/classifier.cpp: body.<2i> = Linear,
    // SiLU between, then head); checked before the network is built, so that a width of 10^12 in
    // the metadata allocates nothing. Every floating tensor must be finite.
    std::vector<std::pair<std::string, std::vector<int64_t>>> shapes;
    int64_t in = o.dim;
    for (size_t i = 0; i < o.hidden.size(); ++i) {
      shapes.push_back({"body." + std::to_string(2 * i) + ".weight", {o.hidden[i], in}});
      shapes.push_back({"body." + std::to_string(2 * i) + ".bias", {o.hidden[i]}});
      in = o.hidden[i];
    }
    shapes.push_back({"head.weight", {o.classes, in}});
    shapes.push_back({"head.bias", {o.classes}});
    for (const auto& [name, shape] : shapes) {
      const Tensor t = archive::take(c, path, name);
      if (!t.sizes().equals(shape)) {
        std::string want;
        for (int64_t n : shape) want += (want.empty() ? "" : ", ") + std::to_string(n);
        throw Error("tensor '" + name + "' must be [" + want + "], got " + shape_string(t) +
                    " (the metadata's dim, hidden widths and classes do not fit the tensors)");
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
  if (!data) throw Error("tilt eval-images needs 'data.type' = \"digits\" (the real images of the target class)");
  e.data = std::move(*data);
  ConfigSection reward = root.section("reward");
  if (!reward.has("type") || reward.string("type") != "classifier") {
    throw Error("tilt eval-images needs 'reward.type' = \"classifier\" (path, class)");
  }
  e.classifier_path = reward.string("path");
  e.target_class = reward.integer("class");
  if (e.target_class < 0 || e.target_class >= e.data.classes) {
    reward.fail("class", "must be in 0.." + std::to_string(e.data.classes - 1) + " (the data set's classes)");
  }
  e.lambda = reward.number("lambda", 1.0);
  if (!(std::abs(e.lambda) <= limits::kLambda)) {
    reward.fail("lambda", "must be in [" + number_string(-limits::kLambda) + ", " + number_string(limits::kLambda) + "]");
  }
  reward.finish();
  return e;
}

namespace {

Json metrics_json(const ClassSampleMetrics& m) {
  return Json{{"n", m.n},           {"mean_reward", m.mean_reward}, {"mean_reward_se", m.reward_se},
              {"class_share", m.class_share}, {"in_class", m.in_class}, {"diversity", m.diversity},
              {"frechet", m.frechet}};
}

Tensor read_images(const std::string& file, const std::string& what, int64_t dim) {
  const Tensor x = read_samples_csv(file);
  if (x.size(1) != dim) {
    throw Error(what + " '" + file + "' has dimension " + std::to_string(x.size(1)) + ", the images have " +
                std::to_string(dim) + " pixels");
  }
  return x;
}

std::string metrics_row(const std::string& name, const Json& s) {
  char line[256];
  std::snprintf(line, sizeof line, "%-44s %6lld %8.3f±%-7.3f %8.1f%% %10.3f %9.3f\n", name.c_str(),
                static_cast<long long>(s["n"].get<int64_t>()), s["mean_reward"].get<double>(),
                s["mean_reward_se"].get<double>(), 100.0 * s["class_share"].get<double>(), s["diversity"].get<double>(),
                s["frechet"].get<double>());
  return line;
}

}  // namespace

Json evaluate_images(const ImageEvaluation& setup, const std::vector<std::string>& sample_files,
                     const std::string& base_samples_file) {
  if (sample_files.empty()) throw Error("give at least one --samples FILE");
  const LoadedClassifier loaded = load_classifier(setup.classifier_path);
  const Tensor real = select_class(setup.data, setup.target_class).images;
  Json out;
  out["class"] = setup.target_class;
  out["classifier"] = setup.classifier_path;
  out["real"] = metrics_json(class_sample_metrics(real, *loaded.classifier, setup.target_class, real));
  if (!base_samples_file.empty()) {
    const Tensor xb = read_images(base_samples_file, "--base file", setup.data.dim());
    out["target"] = metrics_json(tilted_target_metrics(xb, *loaded.classifier, setup.target_class, setup.lambda, real));
    out["target"]["lambda"] = setup.lambda;
    out["target"]["from"] = base_samples_file;
  }
  for (const std::string& file : sample_files) {
    const Tensor x = read_images(file, "samples file", setup.data.dim());
    out["samples"][file] = metrics_json(class_sample_metrics(x, *loaded.classifier, setup.target_class, real));
  }
  return out;
}

std::string image_evaluation_text(const Json& out, const std::vector<std::string>& sample_files) {
  char head[512];
  std::snprintf(head, sizeof head,
                "target class %lld (classifier %s); real images of the class: n = %lld, diversity %.3f\n"
                "%-44s %6s %16s %9s %10s %9s\n",
                static_cast<long long>(out["class"].get<int64_t>()), out["classifier"].get<std::string>().c_str(),
                static_cast<long long>(out["real"]["n"].get<int64_t>()), out["real"]["diversity"].get<double>(),
                "samples", "n", "log p(c|x)", "class %", "diversity", "Frechet");
  std::string text = head;
  for (const std::string& file : sample_files) text += metrics_row(file, out["samples"][file]);
  if (out.contains("target")) text += metrics_row("target p* (reweighted base samples)", out["target"]);
  text += std::string("(class %: samples the classifier assigns to the class; diversity: mean pairwise distance among "
                      "those; Frechet: all samples vs the real images of the class, in the classifier's last hidden layer") +
          (out.contains("target") ? "; target p*: base samples weighted by p(c | x)^lambda, n = effective sample size" : "") +
          ")\n";
  return text;
}

}  // namespace tilt
