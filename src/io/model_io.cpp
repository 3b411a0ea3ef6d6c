#include "tilt/io/model_io.h"

#include "archive.h"

#include "tilt/core/error.h"
#include "tilt/core/fs.h"
#include "tilt/model/finetuned.h"
#include "tilt/model/gmm.h"
#include "tilt/model/mlp.h"
#include "tilt/model/torchscript.h"

#include <ATen/ATen.h>
#include <ATen/core/Dict.h>

#include <cstring>
#include <map>

namespace tilt {
namespace {

constexpr const char* kFormat = "tilt-velocity";
constexpr int kVersion = 1;

using TensorMap = archive::TensorMap;

Json describe(const VelocityField& field, const std::string& prefix, TensorMap& tensors) {
  if (auto gmm = dynamic_cast<const GmmVelocity*>(&field)) {
    tensors[prefix + "weights"] = gmm->mixture().weights();
    tensors[prefix + "means"] = gmm->mixture().means();
    tensors[prefix + "covariances"] = gmm->mixture().covariances();
    return {{"kind", "gmm"}};
  }
  if (auto mlp = dynamic_cast<const MlpVelocity*>(&field)) {
    for (const auto& [name, value] : mlp->named_parameters()) tensors[prefix + name] = value.detach();
    const MlpOptions& o = mlp->options();
    return {{"kind", "mlp"}, {"dim", o.dim}, {"hidden", o.hidden}, {"time_features", o.time_features}};
  }
  if (auto ts = dynamic_cast<const TorchScriptVelocity*>(&field)) {
    // The TorchScript archive's bytes, so that the model file is self-contained. In Python:
    // torch.jit.load(io.BytesIO(torch.load(path)["base.archive"].numpy().tobytes())).
    const std::string bytes = ts->archive();
    tensors[prefix + "archive"] =
        at::from_blob(const_cast<char*>(bytes.data()), {static_cast<int64_t>(bytes.size())}, at::kByte).clone();
    const TorchScriptOptions& o = ts->options();
    return {{"kind", "torchscript"}, {"dim", o.dim}, {"prediction", to_string(o.prediction)}, {"t_min", o.t_min}};
  }
  if (auto ft = dynamic_cast<const FineTunedVelocity*>(&field)) {
    return {{"kind", "finetuned"},
            {"mode", to_string(ft->mode())},
            {"base", describe(*ft->base(), prefix + "base.", tensors)},
            {"trainable", describe(*ft->trainable(), prefix + "trainable.", tensors)}};
  }
  throw Error("cannot save a velocity field of kind '" + field.kind() + "'");
}

struct Reader {
  const std::string& path;
  TensorMap& tensors;
  SchedulePtr schedule;

  Tensor take(const std::string& name) const {
    auto it = tensors.find(name);
    if (it == tensors.end()) throw Error("model file '" + path + "' is missing tensor '" + name + "'");
    return it->second;
  }

  VelocityFieldPtr build(const Json& node, const std::string& prefix) const {
    const std::string kind = node.value("kind", "");
    if (kind == "gmm") {
      auto mixture = std::make_shared<GaussianMixture>(take(prefix + "weights"), take(prefix + "means"),
                                                       take(prefix + "covariances"));
      return std::make_shared<GmmVelocity>(mixture, schedule);
    }
    if (kind == "mlp") {
      MlpOptions o;
      o.dim = node.at("dim").get<int64_t>();
      o.hidden = node.at("hidden").get<std::vector<int64_t>>();
      o.time_features = node.at("time_features").get<int64_t>();
      auto mlp = std::make_shared<MlpVelocity>(o, schedule, 0);
      NamedTensors values;
      for (const auto& [name, value] : mlp->named_parameters()) values.emplace_back(name, take(prefix + name));
      mlp->load_parameters(values);
      return mlp;
    }
    if (kind == "torchscript") {
      const Tensor archive = take(prefix + "archive").contiguous();
      TorchScriptOptions o;
      o.dim = node.at("dim").get<int64_t>();
      o.prediction = parse_prediction(node.at("prediction").get<std::string>());
      o.t_min = node.at("t_min").get<double>();
      return TorchScriptVelocity::from_bytes(
          std::string(static_cast<const char*>(archive.data_ptr()), static_cast<size_t>(archive.numel())),
          "in model file '" + path + "' (" + prefix + "archive)", schedule, o);
    }
    if (kind == "finetuned") {
      auto base = build(node.at("base"), prefix + "base.");
      auto trainable = build(node.at("trainable"), prefix + "trainable.");
      trainable->set_trainable(true);  // a TorchScript module is loaded frozen
      return std::make_shared<FineTunedVelocity>(base, trainable, parse_finetune_mode(node.at("mode").get<std::string>()));
    }
    throw Error("model file '" + path + "' has a model of unknown kind '" + kind + "'");
  }
};

}  // namespace

void save_velocity(const VelocityField& field, const std::string& path, const Json& extra) {
  TensorMap tensors;
  Json meta;
  meta["format"] = kFormat;
  meta["version"] = kVersion;
  meta["model"] = describe(field, "", tensors);
  meta["schedule"]["type"] = field.schedule()->name();
  for (const auto& [k, v] : field.schedule()->parameters()) meta["schedule"][k] = v;
  meta["info"] = extra;
  archive::write(path, meta, tensors);
}

LoadedModel load_velocity(const std::string& path) {
  archive::Contents contents = archive::read(path, "model file", kFormat, kVersion);
  const Json& meta = contents.meta;
  TensorMap& tensors = contents.tensors;
  try {
    std::vector<std::pair<std::string, double>> params;
    for (auto it = meta.at("schedule").begin(); it != meta.at("schedule").end(); ++it) {
      if (it.key() != "type") params.emplace_back(it.key(), it.value().get<double>());
    }
    Reader reader{path, tensors, make_schedule(meta.at("schedule").at("type").get<std::string>(), params)};
    LoadedModel out;
    out.field = reader.build(meta.at("model"), "");
    out.info = meta.value("info", Json::object());
    return out;
  } catch (const Json::exception& e) {
    throw Error("model file '" + path + "' has malformed metadata: " + e.what());
  } catch (const c10::Error& e) {
    throw Error("model file '" + path + "' is corrupt: " + e.what_without_backtrace());
  }
}

}  // namespace tilt
