#include "archive.h"

#include "tilt/core/error.h"
#include "tilt/core/fs.h"

#include "../core/checksum.h"

#include <ATen/ATen.h>
#include <ATen/core/Dict.h>
#include <torch/csrc/jit/serialization/pickle.h>

namespace tilt::archive {
namespace {
constexpr const char* kMetaKey = "__tilt_meta__";
constexpr const char* kChecksumKey = "__tilt_checksum__";

// Whether a differs from b in exactly one character (what one flipped bit does to a name).
bool one_flip_from(const std::string& a, const std::string& b) {
  if (a.size() != b.size()) return false;
  size_t differ = 0;
  for (size_t i = 0; i < a.size(); ++i) differ += a[i] != b[i];
  return differ == 1;
}

// CRC-32 over the metadata's text and every tensor (name, type, shape and bytes), in name order.
uint32_t checksum(const std::string& meta_text, const TensorMap& tensors) {
  uint32_t crc = crc32_bytes(meta_text);
  for (const auto& [name, value] : tensors) {
    const Tensor t = value.detach().contiguous().cpu();
    std::string header = name + "|" + std::string(c10::toString(t.scalar_type()));
    for (const int64_t s : t.sizes()) header += "|" + std::to_string(s);
    crc = crc32_bytes(header, crc);
    crc = crc32_bytes(t.data_ptr(), static_cast<size_t>(t.numel()) * t.element_size(), crc);
  }
  return crc;
}

// The name of the first floating tensor holding NaN or Inf, or nullptr: what write() and read() both refuse.
const std::string* first_non_finite(const TensorMap& tensors) {
  for (const auto& [name, t] : tensors) {
    if (at::isFloatingType(t.scalar_type()) && !t.isfinite().all().item<bool>()) return &name;
  }
  return nullptr;
}
}  // namespace

void write(const std::string& path, const Json& meta, const TensorMap& tensors, bool refuse_non_finite) {
  // read() refuses a non-finite tensor in any file: writing one made a file that could not be read back.
  if (const std::string* name = refuse_non_finite ? first_non_finite(tensors) : nullptr) {
    throw Error("cannot write '" + path + "': tensor '" + *name + "' holds non-finite values (NaN or Inf), which no "
                "reader accepts (a model that diverged?); nothing was written");
  }
  const std::string text = meta.dump();
  c10::Dict<std::string, Tensor> dict;
  dict.insert(kMetaKey, at::from_blob(const_cast<char*>(text.data()), {static_cast<int64_t>(text.size())}, at::kByte).clone());
  for (const auto& [name, value] : tensors) dict.insert(name, value.detach().contiguous().cpu());  // readable without a GPU
  dict.insert(kChecksumKey, at::scalar_tensor(static_cast<int64_t>(checksum(text, tensors)), at::kLong));
  const std::vector<char> bytes = torch::jit::pickle_save(c10::IValue(dict));
  atomic_write(path, std::string(bytes.begin(), bytes.end()));
}

Contents read(const std::string& path, const std::string& what, const std::string& format, int version,
              int oldest_version) {
  if (!file_exists(path)) throw Error("cannot read " + what + " '" + path + "': no such file");
  const std::string bytes = read_file(path, what);
  if (bytes.rfind("tilt-checkpoint", 0) == 0) {  // the header Trainer::save_checkpoint writes
    throw Error("cannot read " + what + " '" + path + "': it is a training checkpoint (checkpoint.pt), which resumes a " +
                "run; the run's " + what + " is beside it (model.pt, or classifier.pt)");
  }
  const std::string damage = zip_damage(bytes);
  if (!damage.empty()) throw Error("cannot read " + what + " '" + path + "': not a tilt " + what + ", or corrupt (" + damage + ")");
  c10::IValue value;
  try {
    value = torch::jit::pickle_load(std::vector<char>(bytes.begin(), bytes.end()));
  } catch (const std::exception&) {
    throw Error("cannot read " + what + " '" + path + "': not a tilt " + what + ", or corrupt");
  }
  if (!value.isGenericDict()) throw Error(what + " '" + path + "' does not hold a dict of tensors");
  Contents out;
  std::string meta_text;
  Tensor stored_checksum;
  for (const auto& item : value.toGenericDict()) {
    if (!item.key().isString() || !item.value().isTensor()) {
      throw Error(what + " '" + path + "' holds an entry that is not a named tensor");
    }
    const std::string name = item.key().toStringRef();
    const Tensor t = item.value().toTensor();
    if (name == kMetaKey) {
      if (t.scalar_type() != at::kByte || t.dim() != 1) throw Error(what + " '" + path + "' has unreadable metadata");
      meta_text.assign(static_cast<const char*>(t.contiguous().data_ptr()), static_cast<size_t>(t.numel()));
    } else if (name == kChecksumKey) {
      stored_checksum = t;
    } else if (name.rfind("__tilt_", 0) == 0 || one_flip_from(name, kChecksumKey) || one_flip_from(name, kMetaKey)) {
      // A flipped bit in the name of tilt's own entries must not pass for a missing checksum.
      throw Error(what + " '" + path + "' is damaged: it holds an unknown entry '" + name + "'");
    } else {
      out.tensors[name] = t;
    }
  }
  if (meta_text.empty()) throw Error(what + " '" + path + "' has no tilt metadata");
  // Files written before checksums existed have none, nor have files edited on purpose in Python
  // (which must drop the entry, as docs/config.md says); any other file must match its checksum.
  if (stored_checksum.defined() &&
      (stored_checksum.numel() != 1 || stored_checksum.scalar_type() != at::kLong ||
       stored_checksum.item<int64_t>() != static_cast<int64_t>(checksum(meta_text, out.tensors)))) {
    throw Error(what + " '" + path + "' is damaged: its checksum does not match its contents (a corrupt file; one edited on purpose, e.g. in Python, must drop its '__tilt_checksum__' entry)");
  }
  // A NaN weight samples NaN rows: every floating tensor must be finite, for every kind of file.
  if (const std::string* name = first_non_finite(out.tensors)) {
    throw Error(what + " '" + path + "': tensor '" + *name + "' holds non-finite values (NaN or Inf): the file is "
                "damaged, or was saved from a run that diverged");
  }
  out.meta = Json::parse(meta_text, nullptr, false);
  if (out.meta.is_discarded() || !out.meta.is_object()) throw Error(what + " '" + path + "' has unreadable metadata");
  const std::string found = out.meta.value("format", "");
  if (found != format) {
    throw Error("'" + path + "' is not a " + what + (found.empty() ? "" : " (it is a " + found + " file)"));
  }
  const int found_version = out.meta.value("version", 0), oldest = oldest_version > 0 ? oldest_version : version;
  if (found_version < oldest || found_version > version) {
    throw Error(what + " '" + path + "' has format version " + std::to_string(found_version) + "; this tilt reads version" +
                (oldest == version ? " " + std::to_string(version)
                                   : "s " + std::to_string(oldest) + " to " + std::to_string(version)));
  }
  return out;
}

Tensor take(const Contents& c, const std::string& path, const std::string& name) {
  auto it = c.tensors.find(name);
  if (it == c.tensors.end()) throw Error("'" + path + "' is missing tensor '" + name + "'");
  return it->second;
}

}  // namespace tilt::archive
