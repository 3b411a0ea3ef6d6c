#include "tilt/io/model_io.h"

#include "archive.h"
#include "model_file.h"

#include "tilt/core/check.h"
#include "tilt/core/error.h"
#include "tilt/core/fs.h"
#include "tilt/io/sampling_run.h"
#include "tilt/model/condition.h"
#include "tilt/model/conditional_gmm.h"
#include "tilt/model/finetuned.h"
#include "tilt/model/gmm.h"
#include "tilt/model/mlp.h"
#include "tilt/model/torchscript.h"
#include "tilt/model/unet.h"

#include <ATen/ATen.h>
#include <ATen/core/Dict.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/jit/serialization/pickle.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <map>
#include <mutex>
#include <optional>
#include <vector>

namespace tilt {
namespace {

constexpr const char* kFormat = model_file::kFormat;
// The training conditions [N, dc] a conditional model's file records (float64); "__" keeps the entry out
// of every field's tensors (ModelReader::names).
constexpr const char* kConditionsKey = "__conditions__";
constexpr int kVersion = model_file::kVersion;

using TensorMap = archive::TensorMap;

// The field as its kind's own class: a field that calls itself "mlp" must be tilt's MlpVelocity.
template <class T>
const T& as(const VelocityField& field) {
  const auto* typed = dynamic_cast<const T*>(&field);
  if (!typed) throw Error("cannot save a velocity field of kind '" + field.kind() + "': it is not tilt's own '" +
                          field.kind() + "' (a user's field needs a kind of its own)");
  return *typed;
}

Json save_gmm(const VelocityField& field, ModelWriter& out) {
  const GaussianMixture& mixture = as<GmmVelocity>(field).mixture();
  out.put("weights", mixture.weights());
  out.put("means", mixture.means());
  out.put("covariances", mixture.covariances());
  return Json::object();
}

VelocityFieldPtr load_gmm(const Json&, const ModelReader& in) {
  const Tensor weights = in.take("weights"), means = in.take("means"), covariances = in.take("covariances");
  if (means.dim() == 2 && means.size(1) < 1) {
    throw Error("model file '" + in.path() + "': the mixture's dimension must be >= 1 (tensor '" +
                in.full_name("means") + "' is " + shape_string(means) + ")");
  }
  // GaussianMixture checks the shapes, positive weights and positive definite covariances.
  auto mixture = std::make_shared<GaussianMixture>(weights, means, covariances);
  return std::make_shared<GmmVelocity>(mixture, in.schedule());
}

// A mixture whose means move with the condition (docs/equations.md, E98): p_0 and M, and the null condition's
// mixture if it has one (tensors null.weights, null.means, null.covariances).
Json save_conditional_gmm(const VelocityField& field, ModelWriter& out) {
  const auto& conditional = as<ConditionalGmmVelocity>(field);
  save_gmm(GmmVelocity(std::make_shared<GaussianMixture>(conditional.mixture()), conditional.schedule()), out);
  out.put("shift", conditional.shift());
  if (!conditional.has_null()) return Json::object();
  const GaussianMixture& null = conditional.null_mixture();
  out.put("null.weights", null.weights());
  out.put("null.means", null.means());
  out.put("null.covariances", null.covariances());
  return Json{{"null", true}};
}

VelocityFieldPtr load_conditional_gmm(const Json& meta, const ModelReader& in) {
  const auto plain = std::dynamic_pointer_cast<GmmVelocity>(load_gmm(meta, in));
  const Tensor shift = in.take("shift");
  if (shift.dim() != 2 || shift.size(0) != plain->dim() || shift.size(1) < 1) {
    throw Error("model file '" + in.path() + "': tensor '" + in.full_name("shift") + "' must be [" +
                std::to_string(plain->dim()) + ", dc], got " + shape_string(shift));
  }
  std::shared_ptr<GaussianMixture> null;
  if (meta.is_object() && meta.value("null", false)) {
    null = std::make_shared<GaussianMixture>(in.take("null.weights"), in.take("null.means"), in.take("null.covariances"));
    if (null->dim() != plain->dim()) {
      throw Error("model file '" + in.path() + "': the null condition's mixture has dimension " +
                  std::to_string(null->dim()) + ", the mixture " + std::to_string(plain->dim()));
    }
  }
  return std::make_shared<ConditionalGmmVelocity>(std::make_shared<GaussianMixture>(plain->mixture()), shift,
                                                  in.schedule(), null);
}

Json save_mlp(const VelocityField& field, ModelWriter& out) {
  const MlpVelocity& mlp = as<MlpVelocity>(field);
  for (const auto& [name, value] : mlp.named_parameters()) out.put(name, value);
  const MlpOptions& o = mlp.options();
  Json node = {{"dim", o.dim}, {"hidden", o.hidden}, {"time_features", o.time_features}};
  if (o.condition_dim > 0) node["condition_dim"] = o.condition_dim;  // absent: unconditional (and older files)
  return node;
}

using Shapes = std::vector<std::pair<std::string, std::vector<int64_t>>>;

// The tensors under the reader's prefix are exactly `shapes`, each of its shape; `why` ends a mismatch's message.
void check_shapes(const ModelReader& in, const Shapes& shapes, const std::string& why) {
  std::vector<std::string> expected;
  for (const auto& [name, shape] : shapes) {
    const Tensor t = in.take(name);
    if (!t.sizes().equals(shape)) {
      std::string want;
      for (int64_t n : shape) want += (want.empty() ? "" : ", ") + std::to_string(n);
      throw in.fail("tensor '" + in.full_name(name) + "' must be [" + want + "], got " + shape_string(t) + " (" + why + ")");
    }
    expected.push_back(name);
  }
  for (const std::string& name : in.names()) {
    if (std::find(expected.begin(), expected.end(), name) == expected.end()) {
      throw in.fail("unexpected tensor '" + in.full_name(name) + "' (" + why + ")");
    }
  }
}

// The network's tensors must have the shapes its metadata implies, checked before the network is
// built: a width of 10^12 in the metadata must not allocate 10^12 weights first. The layers are
// those of src/model/mlp.cpp: Linear (in -> width) at even positions of the Sequential, SiLU
// between, the last Linear back to dim; in = dim + 1 + time_features (+ condition_dim + 1, the
// condition and its flag, for a conditional network).
void check_mlp(const MlpOptions& o, const ModelReader& in) {
  if (o.dim < 1) throw in.fail("the network's dim must be >= 1, got " + std::to_string(o.dim));
  if (o.hidden.empty()) throw in.fail("the network needs at least one hidden layer ('hidden' is empty)");
  for (int64_t w : o.hidden) {
    if (w < 1) throw in.fail("the network's hidden widths must be >= 1, got " + std::to_string(w));
  }
  if (o.time_features < 0 || o.time_features % 2 != 0) {
    throw in.fail("the network's time_features must be an even number >= 0, got " + std::to_string(o.time_features));
  }
  if (o.condition_dim < 0) throw in.fail("the network's condition_dim must be >= 0, got " + std::to_string(o.condition_dim));
  std::vector<int64_t> widths = o.hidden;
  widths.push_back(o.dim);
  int64_t fan_in = o.dim + 1 + o.time_features + (o.condition_dim > 0 ? o.condition_dim + 1 : 0);
  Shapes shapes;
  for (size_t i = 0; i < widths.size(); ++i) {
    const std::string layer = std::to_string(2 * i) + ".";
    shapes.push_back({layer + "weight", {widths[i], fan_in}});
    shapes.push_back({layer + "bias", {widths[i]}});
    fan_in = widths[i];
  }
  check_shapes(in, shapes, "the network's metadata says dim " + std::to_string(o.dim) +
                               ", hidden widths, time_features and condition_dim that do not fit its tensors");
}

VelocityFieldPtr load_mlp(const Json& node, const ModelReader& in) {
  MlpOptions o;
  o.dim = in.whole(node.at("dim"), "dim");
  o.hidden.clear();
  if (!node.at("hidden").is_array()) throw in.fail("'hidden' must be a list of widths");
  for (const Json& w : node.at("hidden")) o.hidden.push_back(in.whole(w, "hidden"));
  o.time_features = in.whole(node.at("time_features"), "time_features");
  o.condition_dim = node.contains("condition_dim") ? in.whole(node.at("condition_dim"), "condition_dim") : 0;
  check_mlp(o, in);
  auto mlp = std::make_shared<MlpVelocity>(o, in.schedule(), 0);
  NamedTensors values;
  for (const auto& [name, value] : mlp->named_parameters()) values.emplace_back(name, in.take(name));
  mlp->load_parameters(values);
  return mlp;
}

// A U-Net (E124) and its adapters if it has them (E125): the options in the metadata, checked against the
// tensors before anything is allocated.
Json save_unet(const VelocityField& field, ModelWriter& out) {
  const UNetVelocity& unet = as<UNetVelocity>(field);
  for (const auto& [name, value] : unet.named_parameters()) out.put(name, value);
  const UNetOptions& o = unet.options();
  Json node = {{"channels", o.channels},       {"height", o.height},           {"width", o.width},
               {"base_channels", o.base_channels}, {"channel_mult", o.channel_mult}, {"blocks", o.blocks},
               {"groups", o.groups},           {"attention", o.attention},     {"time_features", o.time_features},
               {"condition_dim", o.condition_dim}};
  if (unet.has_lora()) node["lora"] = {{"rank", unet.lora().rank}, {"alpha", unet.lora().alpha}};
  return node;
}

VelocityFieldPtr load_unet(const Json& node, const ModelReader& in) {
  UNetOptions o;
  auto whole = [&](const char* key) { return in.whole(node.at(key), key); };
  o.channels = whole("channels");
  o.height = whole("height");
  o.width = whole("width");
  o.base_channels = whole("base_channels");
  o.blocks = whole("blocks");
  o.groups = whole("groups");
  o.time_features = whole("time_features");
  o.condition_dim = whole("condition_dim");
  if (!node.at("attention").is_boolean()) throw in.fail("'attention' must be true or false");
  o.attention = node.at("attention").get<bool>();
  if (!node.at("channel_mult").is_array()) throw in.fail("'channel_mult' must be a list of whole numbers");
  o.channel_mult.clear();
  for (const Json& m : node.at("channel_mult")) o.channel_mult.push_back(in.whole(m, "channel_mult"));
  std::optional<LoraOptions> lora;
  if (node.contains("lora")) {
    const Json& l = node.at("lora");
    lora = LoraOptions{in.whole(l.at("rank"), "lora.rank"), l.at("alpha").is_number() ? l.at("alpha").get<double>() : -1.0};
  }
  Shapes shapes;
  try {
    shapes = UNetVelocity::parameter_shapes(o, lora);
  } catch (const Error& e) {
    throw in.fail(e.what());
  }
  check_shapes(in, shapes, "the U-Net's metadata does not fit its tensors");
  auto unet = std::make_shared<UNetVelocity>(o, in.schedule(), 0);
  if (lora) unet = unet->with_lora(*lora, 0);
  NamedTensors values;
  for (const auto& [name, value] : unet->named_parameters()) values.emplace_back(name, in.take(name));
  unet->load_parameters(values);
  return unet;
}

Json save_torchscript(const VelocityField& field, ModelWriter& out) {
  const TorchScriptVelocity& ts = as<TorchScriptVelocity>(field);
  // The TorchScript archive's bytes, so that the model file is self-contained. In Python:
  // torch.jit.load(io.BytesIO(torch.load(path)["base.archive"].numpy().tobytes())).
  const std::string bytes = ts.archive();
  out.put("archive",
          at::from_blob(const_cast<char*>(bytes.data()), {static_cast<int64_t>(bytes.size())}, at::kByte).clone());
  const TorchScriptOptions& o = ts.options();
  Json node = {{"dim", o.dim}, {"prediction", to_string(o.prediction)}, {"t_min", o.t_min}};
  if (o.condition_dim > 0) node["condition_dim"] = o.condition_dim;  // checked against the module on load
  return node;
}

VelocityFieldPtr load_torchscript(const Json& node, const ModelReader& in) {
  const Tensor archive = in.take("archive").contiguous();
  TorchScriptOptions o;
  o.dim = in.whole(node.at("dim"), "dim");
  o.prediction = parse_prediction(node.at("prediction").get<std::string>());
  o.t_min = node.at("t_min").get<double>();
  o.condition_dim = node.contains("condition_dim") ? in.whole(node.at("condition_dim"), "condition_dim") : 0;
  if (o.condition_dim < 0) throw in.fail("'condition_dim' must be >= 0, got " + std::to_string(o.condition_dim));
  return TorchScriptVelocity::from_bytes(
      std::string(static_cast<const char*>(archive.data_ptr()), static_cast<size_t>(archive.numel())),
      "in model file '" + in.path() + "' (" + in.full_name("archive") + ")", in.schedule(), o);
}

// Whether `trainable` is `base` plus LoRA adapters: a U-Net with adapters whose network tensors are the base's
// (shared, as make_finetuned builds it, or equal in value).
bool is_base_plus_adapters(const VelocityField& base, const VelocityField& trainable) {
  const auto* b = dynamic_cast<const UNetVelocity*>(&base);
  const auto* t = dynamic_cast<const UNetVelocity*>(&trainable);
  if (!b || !t || b->has_lora() || !t->has_lora()) return false;
  const NamedTensors bw = b->named_parameters(), tw = t->named_parameters();
  if (tw.size() < bw.size()) return false;
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < bw.size(); ++i) {
    if (tw[i].first != bw[i].first) return false;
    if (!tw[i].second.is_same(bw[i].second) &&
        !(tw[i].second.sizes().equals(bw[i].second.sizes()) && at::equal(tw[i].second, bw[i].second))) {
      return false;
    }
  }
  return true;
}

// A LoRA model stores its base once: the trainable node holds only the adapters ("adapters_of_base", E125).
Json save_finetuned(const VelocityField& field, ModelWriter& out) {
  const FineTunedVelocity& ft = as<FineTunedVelocity>(field);
  Json node = {{"mode", to_string(ft.mode())}, {"base", out.nested("base", *ft.base())}};
  if (ft.mode() == FineTuneMode::lora && is_base_plus_adapters(*ft.base(), *ft.trainable())) {
    const auto& unet = static_cast<const UNetVelocity&>(*ft.trainable());
    const size_t network = ft.base()->named_parameters().size();
    const NamedTensors all = unet.named_parameters();
    for (size_t i = network; i < all.size(); ++i) out.put("trainable." + all[i].first, all[i].second);
    node["trainable"] = {{"kind", "unet"}, {"adapters_of_base", true},
                         {"lora", {{"rank", unet.lora().rank}, {"alpha", unet.lora().alpha}}}};
  } else {
    node["trainable"] = out.nested("trainable", *ft.trainable());
  }
  return node;
}

// The trainable node of a LoRA model written with its adapters only: the base with adapters, sharing its
// tensors, the adapters read and checked against the shapes the base's options give.
VelocityFieldPtr load_adapters(const Json& node, const VelocityFieldPtr& base, const ModelReader& in) {
  const auto unet = std::dynamic_pointer_cast<UNetVelocity>(base);
  if (!unet || unet->has_lora()) throw in.fail("'trainable' holds LoRA adapters, but the base is not a U-Net without them");
  if (!node.contains("lora") || !node.at("lora").is_object()) throw in.fail("'trainable' has no 'lora' rank and alpha");
  const Json& l = node.at("lora");
  const LoraOptions lora{in.whole(l.at("rank"), "lora.rank"), l.at("alpha").is_number() ? l.at("alpha").get<double>() : -1.0};
  std::shared_ptr<UNetVelocity> adapted;
  try {
    adapted = unet->with_lora(lora, 0);
  } catch (const Error& e) {
    throw in.fail(e.what());
  }
  const size_t network = unet->named_parameters().size();
  NamedTensors values = adapted->named_parameters();
  std::vector<std::string> expected;
  for (size_t i = network; i < values.size(); ++i) {
    const std::string name = "trainable." + values[i].first;
    const Tensor t = in.take(name);
    if (!t.sizes().equals(values[i].second.sizes())) {
      throw in.fail("tensor '" + in.full_name(name) + "' must be " + shape_string(values[i].second) + ", got " +
                    shape_string(t) + " (the adapters do not fit the base)");
    }
    values[i].second = t;
    expected.push_back(name);
  }
  for (const std::string& name : in.names()) {
    if (name.rfind("trainable.", 0) == 0 && std::find(expected.begin(), expected.end(), name) == expected.end()) {
      throw in.fail("unexpected tensor '" + in.full_name(name) + "' (a LoRA model's trainable part holds adapters only)");
    }
  }
  adapted->load_parameters(values);  // the network's own tensors are the base's, copied onto themselves
  return adapted;
}

VelocityFieldPtr load_finetuned(const Json& node, const ModelReader& in) {
  auto base = in.nested(node.at("base"), "base");
  const Json& tnode = node.at("trainable");
  auto trainable = tnode.is_object() && tnode.value("adapters_of_base", false) ? load_adapters(tnode, base, in)
                                                                                : in.nested(tnode, "trainable");
  trainable->set_trainable(true);  // a TorchScript module is loaded frozen
  return std::make_shared<FineTunedVelocity>(base, trainable, parse_finetune_mode(node.at("mode").get<std::string>()));
}

// An Adjoint Sampling control shares the model files' format but is no velocity field: it is written by
// sampling::save_adjoint_sampling_control and read by sampling::load_adjoint_sampling_control only.
Json save_control(const VelocityField& field, ModelWriter&) {
  throw Error("cannot save a velocity field of kind '" + field.kind() + "': the kind is tilt's Adjoint Sampling control's");
}

VelocityFieldPtr load_control(const Json&, const ModelReader& in) {
  const std::string dir = std::filesystem::path(in.path()).parent_path().string();
  throw in.fail("it is an Adjoint Sampling control u(x, t) of a Brownian base (made by tilt adjoint-sampling), "
                "not a velocity field: it cannot be exported, evaluated or fine-tuned as one. Its samples "
                "are in " + (dir.empty() ? std::string(".") : dir) + "/samples.csv; for more, `tilt sample -m " +
                in.path() + "`, or in C++ sampling::load_adjoint_sampling_control (tilt/io/sampling_run.h) and "
                "sampling::simulate");
}

const std::vector<std::string>& builtin_kinds() {
  static const std::vector<std::string> kinds{"gmm",       "conditional_gmm", "mlp", "unet", "torchscript",
                                              "finetuned", sampling::kAdjointSamplingControlKind};
  return kinds;
}

bool is_builtin(const std::string& kind) {
  const auto& kinds = builtin_kinds();
  return std::find(kinds.begin(), kinds.end(), kind) != kinds.end();
}

// The registering call named in the message (register_model_kind reported register_model_serialiser's name).
void refuse_builtin(const std::string& function, const std::string& kind) {
  if (!is_builtin(kind)) return;
  std::string list;
  for (const auto& k : builtin_kinds()) list += (list.empty() ? "" : ", ") + k;
  throw Error(function + ": '" + kind + "' is one of tilt's own model kinds (" + list + "); give yours another name");
}

struct Registry {
  std::mutex mutex;
  std::map<std::string, ModelSerialiser> kinds{{"gmm", {save_gmm, load_gmm}},
                                              {"conditional_gmm", {save_conditional_gmm, load_conditional_gmm}},
                                              {"mlp", {save_mlp, load_mlp}},
                                              {"unet", {save_unet, load_unet}},
                                              {"torchscript", {save_torchscript, load_torchscript}},
                                              {"finetuned", {save_finetuned, load_finetuned}},
                                              {sampling::kAdjointSamplingControlKind, {save_control, load_control}}};
};

Registry& registry() {
  static Registry r;
  return r;
}

// The serialiser of a kind, or nullopt.
std::optional<ModelSerialiser> find_serialiser(const std::string& kind) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  const auto it = r.kinds.find(kind);
  if (it == r.kinds.end()) return std::nullopt;
  return it->second;
}

// The field's metadata node, {"kind": ..., <what its serialiser returns>}, its tensors stored in `out`.
Json describe(const VelocityField& field, ModelWriter& out) {
  const std::string kind = field.kind();
  const auto serialiser = find_serialiser(kind);
  if (!serialiser) {
    throw Error("cannot save a velocity field of kind '" + kind +
                "': no serialiser is registered for it (register_model_kind, tilt/io/model_io.h)");
  }
  Json node = serialiser->save(field, out);
  if (node.is_null()) node = Json::object();
  if (!node.is_object()) throw Error("cannot save a velocity field of kind '" + kind + "': its metadata is not an object");
  node["kind"] = kind;
  return node;
}

VelocityFieldPtr build(const Json& node, const ModelReader& in) {
  const std::string kind = node.value("kind", "");
  const auto serialiser = find_serialiser(kind);
  if (!serialiser) throw Error("model file '" + in.path() + "' has a model of unknown kind '" + kind + "'");
  VelocityFieldPtr field = serialiser->load(node, in);
  if (!field) throw in.fail("the serialiser of kind '" + kind + "' built no model");
  return field;
}

// Generic loading for register_model_kind: the created field's named parameters, copied from the file.
void copy_parameters(const VelocityField& field, const ModelReader& in) {
  const NamedTensors params = field.named_parameters();
  Shapes shapes;
  for (const auto& [name, param] : params) shapes.push_back({name, param.sizes().vec()});
  check_shapes(in, shapes, "the metadata of the model of kind '" + field.kind() + "' does not fit its tensors");
  at::NoGradGuard no_grad;
  for (const auto& [name, param] : params) {
    Tensor target = param;
    target.copy_(in.take(name));
  }
}

}  // namespace

ModelWriter::ModelWriter(std::map<std::string, Tensor>& tensors, std::string prefix)
    : tensors_(tensors), prefix_(std::move(prefix)) {}

void ModelWriter::put(const std::string& name, const Tensor& value) { tensors_[prefix_ + name] = value.detach(); }

Json ModelWriter::nested(const std::string& name, const VelocityField& field) {
  ModelWriter child(tensors_, prefix_ + name + ".");
  return describe(field, child);
}

ModelReader::ModelReader(const std::string& path, const std::map<std::string, Tensor>& tensors, SchedulePtr schedule,
                         std::string prefix)
    : path_(path), tensors_(tensors), schedule_(std::move(schedule)), prefix_(std::move(prefix)) {}

// The named tensor (archive::read has checked that every floating tensor is finite).
Tensor ModelReader::take(const std::string& name) const {
  auto it = tensors_.find(prefix_ + name);
  if (it == tensors_.end()) throw Error("model file '" + path_ + "' is missing tensor '" + prefix_ + name + "'");
  return it->second;
}

std::vector<std::string> ModelReader::names() const {
  std::vector<std::string> out;
  for (const auto& [name, t] : tensors_) {
    if (name.rfind("__", 0) == 0) continue;  // the archive's own entries (like "__tilt_meta__"), not weights
    if (name.rfind(prefix_, 0) == 0) out.push_back(name.substr(prefix_.size()));
  }
  return out;
}

// A whole number in the metadata (nlohmann's get<int64_t> would truncate 2.5 to 2).
int64_t ModelReader::whole(const Json& value, const std::string& key) const {
  if (!value.is_number_integer()) {
    throw Error("model file '" + path_ + "': '" + key + "' must be a whole number, got " + value.dump());
  }
  return value.get<int64_t>();
}

VelocityFieldPtr ModelReader::nested(const Json& node, const std::string& name) const {
  return build(node, ModelReader(path_, tensors_, schedule_, prefix_ + name + "."));
}

Error ModelReader::fail(const std::string& why) const { return Error("model file '" + path_ + "': " + why); }

void register_model_serialiser(const std::string& kind, ModelSerialiser serialiser) {
  if (kind.empty()) throw Error("register_model_serialiser: the kind must not be empty");
  if (!serialiser.save || !serialiser.load) {
    throw Error("register_model_serialiser: kind '" + kind + "' needs both a save and a load function");
  }
  refuse_builtin("register_model_serialiser", kind);
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  r.kinds[kind] = std::move(serialiser);
}

void register_model_kind(const std::string& kind, std::function<Json(const VelocityField&)> describe_field,
                         std::function<VelocityFieldPtr(const Json&, SchedulePtr)> create) {
  if (kind.empty()) throw Error("register_model_kind: the kind must not be empty");
  refuse_builtin("register_model_kind", kind);
  if (!describe_field || !create) throw Error("register_model_kind: kind '" + kind + "' needs describe and create");
  ModelSerialiser serialiser;
  serialiser.save = [describe_field](const VelocityField& field, ModelWriter& out) {
    for (const auto& [name, value] : field.named_parameters()) out.put(name, value);
    return describe_field(field);
  };
  serialiser.load = [create, kind](const Json& meta, const ModelReader& in) {
    VelocityFieldPtr field = create(meta, in.schedule());
    if (!field) throw in.fail("creating the model of kind '" + kind + "' gave no model");
    copy_parameters(*field, in);
    return field;
  };
  register_model_serialiser(kind, std::move(serialiser));
}

std::vector<std::string> registered_model_kinds() {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  std::vector<std::string> out;
  for (const auto& [kind, serialiser] : r.kinds) out.push_back(kind);
  return out;
}

namespace {

// Finite weights can still overflow float32 (weights of 1e38 give inf after one layer, then NaN):
// the velocity at a few fixed points, at the start, middle and end of the time interval, must be
// finite. The points: zeros, and two rows of magnitude up to 3 (where noise and data lie); a
// conditional model's at the condition c = 0 (which every conditional model takes; not all have a null
// condition).
void check_velocity_is_finite(const VelocityField& field, const std::string& path) {
  at::NoGradGuard no_grad;
  const int64_t d = field.dim(), dc = field.condition_dim();
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const Tensor x = at::stack({at::zeros({d}, f32), at::linspace(-1.0, 1.0, d, f32), at::linspace(3.0, -3.0, d, f32)});
  for (const double t : {0.0, 0.5, 1.0 - 1e-3}) {
    const Tensor v = dc == 0 ? field.velocity(x, t)
                             : field.conditional_velocity(x, at::scalar_tensor(t, f32), at::zeros({1, dc}, f32));
    if (!v.isfinite().all().item<bool>()) {
      throw Error("model file '" + path + "' produces non-finite velocities (NaN or Inf at t = " + std::to_string(t) +
                  "): its weights are damaged, or too large for float32");
    }
  }
}

// The training conditions to record with a model: [N, dc] of the model's condition size, finite.
Tensor conditions_to_save(const Tensor& conditions, int64_t condition_dim, const std::string& path) {
  if (condition_dim == 0) {
    throw Error("cannot write model file '" + path + "' with conditions: the model is unconditional (it takes no condition)");
  }
  try {
    const ConditionSet set(conditions);  // [N, dc], N >= 1, finite; float64
    if (set.dim() != condition_dim) {
      throw Error("the conditions have size " + std::to_string(set.dim()) + " but the model takes " +
                  std::to_string(condition_dim));
    }
    return set.values();
  } catch (const Error& e) {
    throw Error("cannot write model file '" + path + "': " + e.what());
  }
}

// The training conditions a file records, checked against its metadata and its model; undefined if none.
Tensor read_conditions(const Json& meta, const TensorMap& tensors, const VelocityField& field, const std::string& path) {
  const auto whole = [&](const char* key) {
    if (!meta.contains(key)) return int64_t{0};
    if (!meta.at(key).is_number_integer()) {
      throw Error("model file '" + path + "': '" + key + "' must be a whole number, got " + meta.at(key).dump());
    }
    return meta.at(key).get<int64_t>();
  };
  const int64_t recorded = whole("condition_dim");
  if (recorded != field.condition_dim()) {
    throw Error("model file '" + path + "': its metadata records condition_dim = " + std::to_string(recorded) +
                " but its model takes a condition of size " + std::to_string(field.condition_dim()));
  }
  const auto it = tensors.find(kConditionsKey);
  if (!meta.contains("conditions")) {
    if (it != tensors.end()) {
      throw Error("model file '" + path + "' holds conditions ('" + std::string(kConditionsKey) +
                  "') that its metadata does not record");
    }
    return Tensor();
  }
  const int64_t count = whole("conditions");
  if (it == tensors.end()) throw Error("model file '" + path + "' is missing tensor '" + std::string(kConditionsKey) + "'");
  const Tensor& c = it->second;
  if (!at::isFloatingType(c.scalar_type()) || c.dim() != 2 || c.size(0) != count || count < 1 ||
      c.size(1) != recorded) {
    throw Error("model file '" + path + "': its conditions ('" + std::string(kConditionsKey) + "') must be [" +
                std::to_string(count) + ", " + std::to_string(recorded) + "] floating-point numbers, got " +
                shape_string(c) + " " + std::string(c10::toString(c.scalar_type())));
  }
  return c.to(at::kDouble).contiguous();
}

}  // namespace

void save_velocity(const VelocityField& field, const std::string& path, const Json& extra, const Tensor& conditions) {
  TensorMap tensors;
  Json meta;
  meta["format"] = kFormat;
  meta["version"] = kVersion;
  if (field.condition_dim() > 0) meta["condition_dim"] = field.condition_dim();
  if (conditions.defined()) {
    tensors[kConditionsKey] = conditions_to_save(conditions, field.condition_dim(), path);
    meta["conditions"] = conditions.size(0);
  }
  ModelWriter writer(tensors, "");
  meta["model"] = describe(field, writer);
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
    const ModelReader reader(path, tensors, make_schedule(meta.at("schedule").at("type").get<std::string>(), params), "");
    LoadedModel out;
    out.field = build(meta.at("model"), reader);
    out.info = meta.value("info", Json::object());
    out.conditions = read_conditions(meta, tensors, *out.field, path);
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

void write_velocity_check_file(const VelocityField& field, const std::string& path, int64_t points, uint64_t seed) {
  at::NoGradGuard no_grad;
  Generator gen = make_generator(mix_seed(seed, 23));
  const Tensor x = 1.5 * at::randn({points, field.dim()}, gen, at::TensorOptions().dtype(at::kFloat));
  const Tensor t = at::arange(points, at::TensorOptions().dtype(at::kFloat)) / static_cast<double>(points);
  c10::Dict<std::string, Tensor> dict;
  dict.insert("x", x);
  dict.insert("t", t);
  // A conditional field's velocity at conditions c drawn like x, one per point.
  const Tensor c = field.condition_dim() == 0
                       ? Tensor()
                       : at::randn({points, field.condition_dim()}, gen, at::TensorOptions().dtype(at::kFloat));
  if (c.defined()) dict.insert("c", c);
  // 256 points per call, so that memory stays that of 256 (a U-Net's activations of 10^5 images took 10 GB); the rows
  // are independent, so the values are those of one call (up to the float rounding of differently blocked products).
  constexpr int64_t kRowsPerCall = 256;
  std::vector<Tensor> v;
  for (int64_t i = 0; i < points; i += kRowsPerCall) {
    const int64_t n = std::min(kRowsPerCall, points - i);
    v.push_back(c.defined() ? field.conditional_velocity(x.narrow(0, i, n), t.narrow(0, i, n), c.narrow(0, i, n))
                            : field.velocity(x.narrow(0, i, n), t.narrow(0, i, n)));
  }
  dict.insert("v", at::cat(v).detach().contiguous());
  const std::vector<char> bytes = torch::jit::pickle_save(c10::IValue(dict));
  atomic_write(path, std::string(bytes.begin(), bytes.end()));
}

}  // namespace tilt
