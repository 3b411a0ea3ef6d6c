#include "tilt/io/classifier_io.h"

#include "archive.h"
#include "tilt/core/check.h"
#include "tilt/core/error.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <c10/util/Exception.h>

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
