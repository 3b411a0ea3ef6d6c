// Model files: a velocity field (closed-form mixture, network, or fine-tuned pair) with its
// schedule, saved as one pickled dict of tensors that Python's torch.load reads as well:
//   "__tilt_meta__"  uint8 tensor holding JSON: format, version, schedule, the model's structure
//   "<prefix>.<name>" the tensors (mixture parameters, network weights; for a TorchScript model,
//                     "<prefix>.archive": the bytes of its TorchScript archive as a uint8 tensor)
//
// Each kind of field (VelocityField::kind()) is written and read by the serialiser registered for
// it: tilt's own kinds ("gmm", "mlp", "torchscript", "finetuned") are built in, and a user's own
// field registers its kind with register_model_kind (docs/extending.md). The same file format holds
// an Adjoint Sampling control (kind "adjoint_sampling_control", tilt/io/sampling_run.h), which is not a
// velocity: load_velocity refuses it with a message that says what it is.
#pragma once

#include "tilt/core/error.h"
#include "tilt/io/config.h"
#include "tilt/model/velocity.h"

#include <functional>
#include <map>
#include <string>
#include <vector>

namespace tilt {

/// Writes atomically, creating missing parent directories. `extra` is stored in the metadata under "info" (e.g. how the
/// model was fine-tuned: lambda, noise schedule), for `tilt sample` and humans. A conditional field's
/// file records its condition_dim, and `conditions` (if given: the training conditions [N, dc], e.g.
/// ConditionSet::values()) as the float64 tensor "__conditions__". Throws tilt::Error for a field whose
/// kind has no registered serialiser, for conditions that are not [N >= 1, condition_dim()] and
/// finite (or given for an unconditional field), and for parameters holding NaN or Inf (load_velocity
/// refuses such a file), writing nothing.
void save_velocity(const VelocityField& field, const std::string& path, const Json& extra = Json::object(),
                   const Tensor& conditions = Tensor());

struct LoadedModel {
  VelocityFieldPtr field;
  Json info;  ///< what save_velocity stored as `extra`
  /// The training conditions [N, condition_dim] (float64) the file records; undefined if it records none
  /// (an unconditional model, or none were given).
  Tensor conditions;
};

/// Throws tilt::Error naming the file if it is missing, is not a tilt model, or is corrupt, or if its
/// recorded condition_dim or conditions do not fit its model.
LoadedModel load_velocity(const std::string& path);

/// Where one field's tensors go while a model file is written: under the field's prefix ("" for the
/// top-level field, "base." for a fine-tuned model's base, ...). Made by save_velocity.
class ModelWriter {
 public:
  ModelWriter(std::map<std::string, Tensor>& tensors, std::string prefix);
  /// Stores the tensor (detached) as "<prefix><name>".
  void put(const std::string& name, const Tensor& value);
  /// Writes a nested field (e.g. a fine-tuned model's base) under "<prefix><name>." with its own
  /// kind's serialiser, and returns its metadata node (to be stored in the parent's metadata).
  Json nested(const std::string& name, const VelocityField& field);

 private:
  std::map<std::string, Tensor>& tensors_;
  std::string prefix_;
};

/// One field's view of a model file being read: its tensors under its prefix, the file's schedule.
/// Made by load_velocity.
class ModelReader {
 public:
  ModelReader(const std::string& path, const std::map<std::string, Tensor>& tensors, SchedulePtr schedule,
              std::string prefix);
  const std::string& path() const { return path_; }
  const SchedulePtr& schedule() const { return schedule_; }
  /// The tensor "<prefix><name>"; throws tilt::Error naming the file and the tensor if it is missing.
  Tensor take(const std::string& name) const;
  /// The names (without the prefix) of every tensor under the prefix, archive entries excluded.
  std::vector<std::string> names() const;
  /// A whole number in the metadata; throws tilt::Error naming `key` otherwise (2.5 is not 2).
  int64_t whole(const Json& value, const std::string& key) const;
  /// Reads the nested field whose metadata node is `node` and whose tensors are under "<prefix><name>.".
  VelocityFieldPtr nested(const Json& node, const std::string& name) const;
  /// An error about this file: "model file '<path>': <why>".
  Error fail(const std::string& why) const;
  /// "<prefix><name>", the tensor's name in the file (for messages).
  std::string full_name(const std::string& name) const { return prefix_ + name; }

 private:
  const std::string& path_;
  const std::map<std::string, Tensor>& tensors_;
  SchedulePtr schedule_;
  std::string prefix_;
};

/// How one kind of field is written to and read from model files.
struct ModelSerialiser {
  /// Stores the field's tensors and returns its metadata (save_velocity adds "kind").
  std::function<Json(const VelocityField& field, ModelWriter& out)> save;
  /// Rebuilds the field from its metadata node and tensors.
  std::function<VelocityFieldPtr(const Json& meta, const ModelReader& in)> load;
};

/// Registers (or replaces) the serialiser of a kind. Throws tilt::Error for an empty kind, a
/// serialiser without save or load, or one of tilt's own kinds.
void register_model_serialiser(const std::string& kind, ModelSerialiser serialiser);

/// Registers a user's kind the short way: `describe` returns the metadata that rebuilds the field (its
/// sizes, options), `create` builds a field from that metadata and the file's schedule; the tensors are
/// the field's named_parameters(), stored by name and copied into the created field's own on load
/// (names and shapes must match, or load_velocity throws naming the file and the tensor).
void register_model_kind(const std::string& kind, std::function<Json(const VelocityField& field)> describe,
                         std::function<VelocityFieldPtr(const Json& meta, SchedulePtr schedule)> create);

/// The kinds that model files can hold, sorted.
std::vector<std::string> registered_model_kinds();

/// A file to check an exported module against in Python (`tilt export --check-file`): a dict of
/// `points` points x (spread over the data scale, seeded), times t on the sampler's uniform grid
/// (t = 0 included) and the field's velocity v there, pickled so that torch.load reads it; for a
/// conditional field also conditions c [points, dc] (seeded) and v = v(x, t | c). Atomic.
void write_velocity_check_file(const VelocityField& field, const std::string& path, int64_t points, uint64_t seed);

}  // namespace tilt
