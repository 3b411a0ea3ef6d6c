// Model files: a velocity field (closed-form mixture, network, or fine-tuned pair) with its
// schedule, saved as one pickled dict of tensors that Python's torch.load reads as well:
//   "__tilt_meta__"  uint8 tensor holding JSON: format, version, schedule, the model's structure
//   "<prefix>.<name>" the tensors (mixture parameters, network weights; for a TorchScript model,
//                     "<prefix>.archive": the bytes of its TorchScript archive as a uint8 tensor)
#pragma once

#include "tilt/io/config.h"
#include "tilt/model/velocity.h"

#include <string>

namespace tilt {

/// Writes the model atomically. `extra` is stored in the metadata under "info" (e.g. how the
/// model was fine-tuned: lambda, noise schedule), for `tilt sample` and humans.
void save_velocity(const VelocityField& field, const std::string& path, const Json& extra = Json::object());

struct LoadedModel {
  VelocityFieldPtr field;
  Json info;  ///< what save_velocity stored as `extra`
};

/// Throws tilt::Error naming the file if it is missing, is not a tilt model, or is corrupt.
LoadedModel load_velocity(const std::string& path);

}  // namespace tilt
