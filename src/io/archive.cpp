#include "archive.h"

#include "tilt/core/error.h"
#include "tilt/core/fs.h"

#include <ATen/ATen.h>
#include <ATen/core/Dict.h>
#include <torch/csrc/jit/serialization/pickle.h>

namespace tilt::archive {
namespace {
constexpr const char* kMetaKey = "__tilt_meta__";
}

void write(const std::string& path, const Json& meta, const TensorMap& tensors) {
  const std::string text = meta.dump();
  c10::Dict<std::string, Tensor> dict;
  dict.insert(kMetaKey, at::from_blob(const_cast<char*>(text.data()), {static_cast<int64_t>(text.size())}, at::kByte).clone());
  for (const auto& [name, value] : tensors) dict.insert(name, value.detach().contiguous());
  const std::vector<char> bytes = torch::jit::pickle_save(c10::IValue(dict));
  atomic_write(path, std::string(bytes.begin(), bytes.end()));
}

Contents read(const std::string& path, const std::string& what, const std::string& format, int version) {
  if (!file_exists(path)) throw Error("cannot read " + what + " '" + path + "': no such file");
  const std::string bytes = read_file(path, what);
  c10::IValue value;
  try {
    value = torch::jit::pickle_load(std::vector<char>(bytes.begin(), bytes.end()));
  } catch (const std::exception&) {
    throw Error("cannot read " + what + " '" + path + "': not a tilt " + what + ", or corrupt");
  }
  if (!value.isGenericDict()) throw Error(what + " '" + path + "' does not hold a dict of tensors");
  Contents out;
  std::string meta_text;
  for (const auto& item : value.toGenericDict()) {
    if (!item.key().isString() || !item.value().isTensor()) {
      throw Error(what + " '" + path + "' holds an entry that is not a named tensor");
    }
    const std::string name = item.key().toStringRef();
    const Tensor t = item.value().toTensor();
    if (name == kMetaKey) {
      meta_text.assign(static_cast<const char*>(t.contiguous().data_ptr()), static_cast<size_t>(t.numel()));
    } else {
      out.tensors[name] = t;
    }
  }
  if (meta_text.empty()) throw Error(what + " '" + path + "' has no tilt metadata");
  out.meta = Json::parse(meta_text, nullptr, false);
  if (out.meta.is_discarded() || !out.meta.is_object()) throw Error(what + " '" + path + "' has unreadable metadata");
  const std::string found = out.meta.value("format", "");
  if (found != format) {
    throw Error("'" + path + "' is not a " + what + (found.empty() ? "" : " (it is a " + found + " file)"));
  }
  if (out.meta.value("version", 0) != version) {
    throw Error(what + " '" + path + "' has format version " + std::to_string(out.meta.value("version", 0)) +
                "; this tilt reads version " + std::to_string(version));
  }
  return out;
}

Tensor take(const Contents& c, const std::string& path, const std::string& name) {
  auto it = c.tensors.find(name);
  if (it == c.tensors.end()) throw Error("'" + path + "' is missing tensor '" + name + "'");
  return it->second;
}

}  // namespace tilt::archive
