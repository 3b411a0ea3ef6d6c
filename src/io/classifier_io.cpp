#include "tilt/io/classifier_io.h"

#include "archive.h"
#include "tilt/core/error.h"

#include <c10/util/Exception.h>

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
    ClassifierOptions o;
    o.dim = c.meta.at("dim").get<int64_t>();
    o.hidden = c.meta.at("hidden").get<std::vector<int64_t>>();
    o.classes = c.meta.at("classes").get<int64_t>();
    auto classifier = std::make_shared<MlpClassifier>(o, 0);
    NamedTensors values;
    for (const auto& [name, value] : classifier->named_parameters()) values.emplace_back(name, archive::take(c, path, name));
    classifier->load_parameters(values);
    classifier->set_trainable(false);
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
