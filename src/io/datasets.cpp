#include "tilt/io/datasets.h"

#include "tilt/core/error.h"
#include "tilt/core/fs.h"

#include <ATen/ATen.h>
#include <zlib.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace tilt {
namespace {

// zlib's gzread ignores bytes after the last gzip member that are not another member: such a file
// was damaged (or two files were glued), so it is an error. Walks the members with inflate.
void check_nothing_after_gzip(const std::string& path) {
  const std::string raw = read_file(path, "data file");
  if (raw.size() < 2 || static_cast<unsigned char>(raw[0]) != 0x1f || static_cast<unsigned char>(raw[1]) != 0x8b) return;
  size_t at = 0;
  std::vector<unsigned char> sink(1 << 15);
  while (at < raw.size()) {
    if (raw.size() - at < 2 || static_cast<unsigned char>(raw[at]) != 0x1f || static_cast<unsigned char>(raw[at + 1]) != 0x8b) {
      throw Error("data file '" + path + "' is corrupt: " + std::to_string(raw.size() - at) +
                  " bytes follow its gzip data; download or copy it again");
    }
    z_stream z{};
    if (inflateInit2(&z, 16 + MAX_WBITS) != Z_OK) throw Error("data file '" + path + "': zlib failed to start");
    z.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(raw.data() + at));
    z.avail_in = static_cast<uInt>(raw.size() - at);
    int rc = Z_OK;
    while (rc == Z_OK) {
      z.next_out = sink.data();
      z.avail_out = static_cast<uInt>(sink.size());
      rc = inflate(&z, Z_NO_FLUSH);
    }
    const size_t used = raw.size() - at - z.avail_in;
    inflateEnd(&z);
    if (rc != Z_STREAM_END) return;  // truncated or corrupt: read_maybe_gzip says which
    at += used;
  }
}

// The whole file, decompressed if it is gzip (zlib reads plain files unchanged).
std::string read_maybe_gzip(const std::string& path) {
  if (!file_exists(path)) throw Error("cannot read data file '" + path + "': no such file");
  refuse_unreadable_kind(path, "data file");
  gzFile f = gzopen(path.c_str(), "rb");
  if (!f) throw Error("cannot open data file '" + path + "'");
  std::string out;
  char buf[1 << 15];
  int n = 0;
  while ((n = gzread(f, buf, sizeof buf)) > 0) out.append(buf, static_cast<size_t>(n));
  // At the end gzread returns 0, and gzerror tells a whole stream (Z_OK) from a file that ends in
  // the middle of one (Z_BUF_ERROR, "unexpected end of file": zlib.h, gzread). A truncated copy,
  // even one cut at a line boundary, would otherwise pass for a shorter data set.
  int err = Z_OK;
  const char* message = gzerror(f, &err);
  const std::string why = message && *message ? message : "error " + std::to_string(err);
  const int closed = gzclose(f);
  if (err == Z_BUF_ERROR || (n >= 0 && closed == Z_BUF_ERROR)) {
    throw Error("data file '" + path + "' is truncated: its gzip stream ends early (" + why +
                "); download or copy it again");
  }
  if (n < 0 || err != Z_OK || closed != Z_OK) {
    throw Error("data file '" + path + "' is corrupt: gzip reports " + why + "; download or copy it again");
  }
  check_nothing_after_gzip(path);
  return out;
}

}  // namespace

ImageDataset load_digits(const std::string& path) {
  constexpr int64_t kSide = 8, kPixels = kSide * kSide, kClasses = 10;
  const std::string text = read_maybe_gzip(path);
  std::vector<float> pixels;
  std::vector<int64_t> labels;
  size_t pos = 0;
  int64_t line_no = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string::npos) end = text.size();
    std::string line = text.substr(pos, end - pos);
    pos = end + 1;
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty()) continue;
    const auto fail = [&](const std::string& why) -> Error {
      return Error("data file '" + path + "', line " + std::to_string(line_no) + ": " + why);
    };
    std::vector<long> values;
    const char* p = line.c_str();
    while (true) {
      char* next = nullptr;
      const long v = std::strtol(p, &next, 10);
      if (next == p) throw fail("expected an integer at column " + std::to_string(values.size() + 1));
      values.push_back(v);
      p = next;
      while (*p == ' ') ++p;
      if (*p == '\0') break;
      if (*p != ',') throw fail("expected ',' after column " + std::to_string(values.size()));
      ++p;
    }
    if (static_cast<int64_t>(values.size()) != kPixels + 1) {
      throw fail("expected 65 values (64 pixels and a label), got " + std::to_string(values.size()));
    }
    for (int64_t j = 0; j < kPixels; ++j) {
      if (values[j] < 0 || values[j] > 16) {
        throw fail("pixel " + std::to_string(j) + " (column " + std::to_string(j + 1) + ") is outside 0..16");
      }
      pixels.push_back(static_cast<float>(values[j]) / 8.0f - 1.0f);
    }
    if (values[kPixels] < 0 || values[kPixels] >= kClasses) throw fail("the label (column 65) is outside 0..9");
    labels.push_back(values[kPixels]);
  }
  if (labels.empty()) throw Error("data file '" + path + "' holds no images");
  ImageDataset d;
  const auto n = static_cast<int64_t>(labels.size());
  d.images = at::from_blob(pixels.data(), {n, kPixels}, at::kFloat).clone();
  d.labels = at::from_blob(labels.data(), {n}, at::kLong).clone();
  d.height = d.width = kSide;
  d.classes = kClasses;
  return d;
}

namespace {

uint32_t big_endian_u32(const std::string& bytes, size_t at) {
  uint32_t v = 0;
  for (size_t i = 0; i < 4; ++i) v = (v << 8) | static_cast<unsigned char>(bytes[at + i]);
  return v;
}

// The header of an idx file (magic, then one count per dimension) and its payload's size checked
// against it; returns the dimensions.
std::vector<int64_t> read_idx_header(const std::string& bytes, const std::string& path, uint32_t magic,
                                     const std::string& what) {
  const size_t dims = magic & 0xff;
  const size_t header = 4 * (1 + dims);
  const auto fail = [&](const std::string& why) { return Error("data file '" + path + "' (" + what + "): " + why); };
  if (bytes.size() < 4) throw fail("too short for an idx header (" + std::to_string(bytes.size()) + " bytes)");
  const uint32_t got = big_endian_u32(bytes, 0);
  if (got != magic) {
    char buf[96];
    std::snprintf(buf, sizeof buf, "bad magic number 0x%08x, expected 0x%08x", got, magic);
    throw fail(std::string(buf) + " (not an idx " + what + " file)");
  }
  if (bytes.size() < header) throw fail("truncated: the header needs " + std::to_string(header) + " bytes");
  std::vector<int64_t> shape;
  uint64_t payload = 1;
  for (size_t i = 0; i < dims; ++i) {
    const uint32_t n = big_endian_u32(bytes, 4 * (1 + i));
    if (n == 0 || n > (1u << 28)) throw fail("dimension " + std::to_string(i) + " is " + std::to_string(n));
    shape.push_back(n);
    payload *= n;
  }
  if (bytes.size() - header < payload) {
    throw fail("truncated: the header announces " + std::to_string(payload) + " bytes of data, the file holds " +
               std::to_string(bytes.size() - header));
  }
  if (bytes.size() - header > payload) {
    throw fail(std::to_string(bytes.size() - header - payload) + " bytes follow the " + std::to_string(payload) +
               " bytes of data its header announces");
  }
  return shape;
}

}  // namespace

ImageDataset load_idx(const std::string& images_path, const std::string& labels_path, int64_t classes, int64_t limit) {
  if (classes < 2) throw Error("load_idx: classes must be >= 2");
  if (limit < 0) throw Error("load_idx: limit must be >= 0");
  const std::string img = read_maybe_gzip(images_path);
  const std::string lab = read_maybe_gzip(labels_path);
  const std::vector<int64_t> shape = read_idx_header(img, images_path, 0x803, "images");
  const std::vector<int64_t> count = read_idx_header(lab, labels_path, 0x801, "labels");
  if (count[0] != shape[0]) {
    throw Error("data file '" + labels_path + "' holds " + std::to_string(count[0]) + " labels, but '" + images_path +
                "' holds " + std::to_string(shape[0]) + " images");
  }
  const int64_t n = limit > 0 ? std::min(limit, shape[0]) : shape[0];
  const int64_t pixels = shape[1] * shape[2];
  std::vector<int64_t> labels(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    labels[i] = static_cast<unsigned char>(lab[8 + i]);
    if (labels[i] >= classes) {
      throw Error("data file '" + labels_path + "': label " + std::to_string(i) + " is " + std::to_string(labels[i]) +
                  ", outside 0.." + std::to_string(classes - 1));
    }
  }
  // Each byte's value, p / 127.5 - 1 rounded once to float32.
  float scaled[256];
  for (int v = 0; v < 256; ++v) scaled[v] = static_cast<float>(v / 127.5 - 1.0);
  ImageDataset d;
  d.images = at::empty({n, pixels}, at::kFloat);
  float* out = d.images.data_ptr<float>();
  const auto* in = reinterpret_cast<const unsigned char*>(img.data() + 16);
  for (int64_t i = 0; i < n * pixels; ++i) out[i] = scaled[in[i]];
  d.labels = at::from_blob(labels.data(), {n}, at::kLong).clone();
  d.height = shape[1];
  d.width = shape[2];
  d.classes = classes;
  return d;
}

std::vector<std::string> fashion_mnist_files(const std::string& dir, const std::string& split) {
  if (split != "train" && split != "t10k") throw Error("Fashion-MNIST: split must be \"train\" or \"t10k\", got \"" + split + "\"");
  return {dir + "/" + split + "-images-idx3-ubyte.gz", dir + "/" + split + "-labels-idx1-ubyte.gz"};
}

ImageDataset load_fashion_mnist(const std::string& dir, const std::string& split, int64_t limit) {
  const std::vector<std::string> files = fashion_mnist_files(dir, split);
  if (!file_exists(dir)) {
    throw Error("Fashion-MNIST directory '" + dir + "' does not exist: run scripts/setup.sh (or install the Debian "
                "package dataset-fashion-mnist), or give [data] path");
  }
  const std::string& images = files[0];
  const std::string& labels = files[1];
  ImageDataset d = load_idx(images, labels, 10, limit);
  if (d.height != 28 || d.width != 28) {
    throw Error("data file '" + images + "' holds " + std::to_string(d.height) + " x " + std::to_string(d.width) +
                " images; Fashion-MNIST's are 28 x 28");
  }
  return d;
}

}  // namespace tilt
