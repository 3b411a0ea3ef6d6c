#include "tilt/io/model_io.h"

#include "archive.h"

#include "tilt/core/check.h"
#include "tilt/core/error.h"
#include "tilt/core/fs.h"
#include "tilt/model/finetuned.h"
#include "tilt/model/gmm.h"
#include "tilt/model/mlp.h"
#include "tilt/model/torchscript.h"

#include <ATen/ATen.h>
#include <ATen/core/Dict.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <vector>

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

  // The named tensor (archive::read has checked that every floating tensor is finite).
  Tensor take(const std::string& name) const {
    auto it = tensors.find(name);
    if (it == tensors.end()) throw Error("model file '" + path + "' is missing tensor '" + name + "'");
    return it->second;
  }

  // A whole number in the metadata (nlohmann's get<int64_t> would truncate 2.5 to 2).
  int64_t whole(const Json& value, const std::string& key) const {
    if (!value.is_number_integer()) {
      throw Error("model file '" + path + "': '" + key + "' must be a whole number, got " + value.dump());
    }
    return value.get<int64_t>();
  }

  // The network's tensors must have the shapes its metadata implies, checked before the network is
  // built: a width of 10^12 in the metadata must not allocate 10^12 weights first. The layers are
  // those of src/model/mlp.cpp: Linear (in -> width) at even positions of the Sequential, SiLU
  // between, the last Linear back to dim; in = dim + 1 + time_features.
  void check_mlp(const MlpOptions& o, const std::string& prefix) const {
    const auto fail = [&](const std::string& why) { return Error("model file '" + path + "': " + why); };
    if (o.dim < 1) throw fail("the network's dim must be >= 1, got " + std::to_string(o.dim));
    if (o.hidden.empty()) throw fail("the network needs at least one hidden layer ('hidden' is empty)");
    for (int64_t w : o.hidden) {
      if (w < 1) throw fail("the network's hidden widths must be >= 1, got " + std::to_string(w));
    }
    if (o.time_features < 0 || o.time_features % 2 != 0) {
      throw fail("the network's time_features must be an even number >= 0, got " + std::to_string(o.time_features));
    }
    std::vector<int64_t> widths = o.hidden;
    widths.push_back(o.dim);
    int64_t in = o.dim + 1 + o.time_features;
    std::vector<std::string> expected;
    for (size_t i = 0; i < widths.size(); ++i) {
      const std::string layer = prefix + std::to_string(2 * i) + ".";
      const std::vector<std::pair<std::string, std::vector<int64_t>>> shapes{{layer + "weight", {widths[i], in}},
                                                                            {layer + "bias", {widths[i]}}};
      for (const auto& [name, shape] : shapes) {
        const Tensor t = take(name);
        if (!t.sizes().equals(shape)) {
          std::string want;
          for (int64_t n : shape) want += (want.empty() ? "" : ", ") + std::to_string(n);
          throw fail("tensor '" + name + "' must be [" + want + "], got " +
                     shape_string(t) + " (the network's metadata says dim " + std::to_string(o.dim) +
                     ", hidden widths and time_features that do not fit its tensors)");
        }
        expected.push_back(name);
      }
      in = widths[i];
    }
    for (const auto& [name, t] : tensors) {
      if (name.rfind("__", 0) == 0) continue;  // the archive's own entries (like "__tilt_meta__"), not weights
      if (name.rfind(prefix, 0) == 0 && std::find(expected.begin(), expected.end(), name) == expected.end()) {
        throw fail("unexpected tensor '" + name + "': the network's metadata has " + std::to_string(o.hidden.size()) +
                   " hidden layers");
      }
    }
  }

  VelocityFieldPtr build(const Json& node, const std::string& prefix) const {
    const std::string kind = node.value("kind", "");
    if (kind == "gmm") {
      const Tensor weights = take(prefix + "weights"), means = take(prefix + "means");
      const Tensor covariances = take(prefix + "covariances");
      if (means.dim() == 2 && means.size(1) < 1) {
        throw Error("model file '" + path + "': the mixture's dimension must be >= 1 (tensor '" + prefix +
                    "means' is " + shape_string(means) + ")");
      }
      // GaussianMixture checks the shapes, positive weights and positive definite covariances.
      auto mixture = std::make_shared<GaussianMixture>(weights, means, covariances);
      return std::make_shared<GmmVelocity>(mixture, schedule);
    }
    if (kind == "mlp") {
      MlpOptions o;
      o.dim = whole(node.at("dim"), "dim");
      o.hidden.clear();
      if (!node.at("hidden").is_array()) throw Error("model file '" + path + "': 'hidden' must be a list of widths");
      for (const Json& w : node.at("hidden")) o.hidden.push_back(whole(w, "hidden"));
      o.time_features = whole(node.at("time_features"), "time_features");
      check_mlp(o, prefix);
      auto mlp = std::make_shared<MlpVelocity>(o, schedule, 0);
      NamedTensors values;
      for (const auto& [name, value] : mlp->named_parameters()) values.emplace_back(name, take(prefix + name));
      mlp->load_parameters(values);
      return mlp;
    }
    if (kind == "torchscript") {
      const Tensor archive = take(prefix + "archive").contiguous();
      TorchScriptOptions o;
      o.dim = whole(node.at("dim"), "dim");
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

// Finite weights can still overflow float32 (weights of 1e38 give inf after one layer, then NaN):
// the velocity at a few fixed points, at the start, middle and end of the time interval, must be
// finite. The points: zeros, and two rows of magnitude up to 3 (where noise and data lie).
void check_velocity_is_finite(const VelocityField& field, const std::string& path) {
  at::NoGradGuard no_grad;
  const int64_t d = field.dim();
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const Tensor x = at::stack({at::zeros({d}, f32), at::linspace(-1.0, 1.0, d, f32), at::linspace(3.0, -3.0, d, f32)});
  for (const double t : {0.0, 0.5, 1.0 - 1e-3}) {
    const Tensor v = field.velocity(x, t);
    if (!v.isfinite().all().item<bool>()) {
      throw Error("model file '" + path + "' produces non-finite velocities (NaN or Inf at t = " + std::to_string(t) +
                  "): its weights are damaged, or too large for float32");
    }
  }
}

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
    check_velocity_is_finite(*out.field, path);
    return out;
  } catch (const Json::exception& e) {
    throw Error("model file '" + path + "' has malformed metadata: " + e.what());
  } catch (const c10::Error& e) {
    throw Error("model file '" + path + "' is corrupt: " + e.what_without_backtrace());
  } catch (const Error& e) {
    // The models' own checks (a mixture's weights and covariances, a fine-tuned pair's dimensions,
    // the schedule's parameters) do not know the file.
    const std::string message = e.what();
    if (message.find("'" + path + "'") != std::string::npos) throw;
    throw Error("model file '" + path + "': " + message);
  }
}

}  // namespace tilt
