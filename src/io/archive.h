// (Private to src/io.) Files holding named tensors and a JSON header, as one pickled dict that
// Python's torch.load reads as well: "__tilt_meta__" is a uint8 tensor holding the JSON.
#pragma once

#include "tilt/core/tensor.h"
#include "tilt/io/config.h"

#include <map>
#include <string>

namespace tilt::archive {

using TensorMap = std::map<std::string, Tensor>;

/// Writes atomically; meta must hold "format" and "version".
void write(const std::string& path, const Json& meta, const TensorMap& tensors);

struct Contents {
  Json meta;
  TensorMap tensors;
};
/// Reads a file written by write() and checks its format and version. `what` names the kind of
/// file in messages ("classifier file"). Throws tilt::Error for a missing, foreign or corrupt file.
Contents read(const std::string& path, const std::string& what, const std::string& format, int version);

/// The named tensor, or an error naming the file.
Tensor take(const Contents& c, const std::string& path, const std::string& name);

}  // namespace tilt::archive
