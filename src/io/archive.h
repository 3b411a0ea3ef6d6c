// (Private to src/io.) Files holding named tensors and a JSON header, as one pickled dict that
// Python's torch.load reads as well: "__tilt_meta__" is a uint8 tensor holding the JSON, and
// "__tilt_checksum__" an int64 holding the CRC-32 of that JSON and of every tensor (name, type,
// shape, bytes), checked on read so that a flipped bit is an error, not a silently different model.
#pragma once

#include "tilt/core/tensor.h"
#include "tilt/io/config.h"

#include <map>
#include <string>

namespace tilt::archive {

using TensorMap = std::map<std::string, Tensor>;

/// Writes atomically; meta must hold "format" and "version". Throws tilt::Error, writing nothing, for a
/// floating tensor holding NaN or Inf (read() refuses one), unless refuse_non_finite is false (tests of
/// the readers, writing damaged files on purpose).
void write(const std::string& path, const Json& meta, const TensorMap& tensors, bool refuse_non_finite = true);

struct Contents {
  Json meta;
  TensorMap tensors;
};
/// Reads a file written by write() and checks its format and version. `what` names the kind of
/// file in messages ("classifier file"). Throws tilt::Error for a missing, foreign or corrupt file,
/// or one whose checksum does not match (files written before checksums, or edited in Python with
/// the "__tilt_checksum__" entry dropped, have none, and are read). Versions oldest_version..version
/// are read (oldest_version 0: version alone).
Contents read(const std::string& path, const std::string& what, const std::string& format, int version,
              int oldest_version = 0);

/// The named tensor, or an error naming the file.
Tensor take(const Contents& c, const std::string& path, const std::string& name);

}  // namespace tilt::archive
