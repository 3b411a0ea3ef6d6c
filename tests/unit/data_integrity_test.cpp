// Damaged files and files holding bad values: truncated or corrupt gzip data, idx image files
// (Fashion-MNIST) with bad headers or data, CSV values outside
// float32's range, model and classifier files with non-finite, overflowing or mis-shaped tensors,
// TorchScript modules whose forward raises, and TorchScript rewards without a gradient. Each must be a
// tilt::Error that names the file (include/tilt/core/error.h), never a NaN result with success.
#include "tilt/core/error.h"
#include "tilt/core/fs.h"
#include "tilt/io/classifier_io.h"
#include "tilt/io/datasets.h"
#include "tilt/io/model_io.h"
#include "tilt/io/samples.h"
#include "tilt/model/classifier.h"
#include "tilt/model/finetuned.h"
#include "tilt/model/gmm.h"
#include "tilt/model/mlp.h"
#include "tilt/model/reward.h"
#include "tilt/model/torchscript.h"
#include "tilt/model/unet.h"

#include "tilt/io/config.h"
#include "tilt/io/run.h"
#include "tilt/io/training.h"

#include "io/archive.h"  // writes model files with chosen metadata and tensors

#include "../support/checks.h"
#include "../support/helpers.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <gtest/gtest.h>
#include <torch/csrc/jit/api/module.h>
#include <zlib.h>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <string>
#include <vector>

namespace tilt {
namespace {

using test::TempDir;
using test::error_of;
using test::expect_contains;

// These tests write damaged files on purpose, NaN weights among them, which archive::write refuses by default.
void write_damaged(const std::string& path, const Json& meta, const archive::TensorMap& tensors) {
  archive::write(path, meta, tensors, /*refuse_non_finite=*/false);
}

const auto kDouble = at::TensorOptions().dtype(at::kDouble);

std::string digits_path() { return std::string(TILT_SOURCE_DIR) + "/data/digits/digits.csv.gz"; }

std::string gunzip(const std::string& bytes) {
  z_stream z{};
  EXPECT_EQ(inflateInit2(&z, 16 + MAX_WBITS), Z_OK);
  z.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(bytes.data()));
  z.avail_in = static_cast<uInt>(bytes.size());
  std::string out;
  char buf[1 << 15];
  int rc = Z_OK;
  do {
    z.next_out = reinterpret_cast<Bytef*>(buf);
    z.avail_out = sizeof buf;
    rc = inflate(&z, Z_NO_FLUSH);
    out.append(buf, sizeof buf - z.avail_out);
  } while (rc == Z_OK);
  EXPECT_EQ(rc, Z_STREAM_END);
  inflateEnd(&z);
  return out;
}

// gzip of `text`; with finish = false the stream is flushed to a byte boundary but never ended (no
// last block, no CRC and length trailer): what a writer that was stopped half-way leaves.
std::string gzip(const std::string& text, bool finish) {
  z_stream z{};
  EXPECT_EQ(deflateInit2(&z, 6, Z_DEFLATED, 16 + MAX_WBITS, 8, Z_DEFAULT_STRATEGY), Z_OK);
  z.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(text.data()));
  z.avail_in = static_cast<uInt>(text.size());
  std::string out;
  char buf[1 << 15];
  int rc = Z_OK;
  do {
    z.next_out = reinterpret_cast<Bytef*>(buf);
    z.avail_out = sizeof buf;
    rc = deflate(&z, finish ? Z_FINISH : Z_SYNC_FLUSH);
    out.append(buf, sizeof buf - z.avail_out);
  } while (finish ? rc != Z_STREAM_END : z.avail_out == 0);
  deflateEnd(&z);
  return out;
}

// The first `lines` lines of `text`, each with its newline.
std::string first_lines(const std::string& text, int lines) {
  size_t pos = 0;
  for (int i = 0; i < lines; ++i) pos = text.find('\n', pos) + 1;
  return text.substr(0, pos);
}

TEST(GzipData, TruncatedCopiesAreErrorsNamingTheFile) {
  TempDir dir;
  const std::string bytes = read_file(digits_path(), "data file");
  ASSERT_GT(bytes.size(), 1000u);
  const size_t size = bytes.size();
  for (size_t cut : {size_t{11}, size_t{100}, size / 3, size / 2, size - 9, size - 8, size - 4, size - 1}) {
    const std::string path = dir.file("cut" + std::to_string(cut) + ".csv.gz");
    atomic_write(path, bytes.substr(0, cut));
    const std::string msg = error_of([&] { load_digits(path); });
    expect_contains(msg, "data file '" + path + "'");
    expect_contains(msg, "is truncated");
  }
  // Cut at a line boundary of the decompressed text: 1000 whole lines, but no end of the stream.
  const std::string text = gunzip(bytes);
  const std::string prefix = first_lines(text, 1000);
  const std::string open = dir.file("open.csv.gz");
  atomic_write(open, gzip(prefix, /*finish=*/false));
  expect_contains(error_of([&] { load_digits(open); }), "data file '" + open + "' is truncated");
  // A finished stream without its 8-byte trailer (CRC-32 and length).
  const std::string finished = gzip(prefix, /*finish=*/true);
  const std::string no_trailer = dir.file("notrailer.csv.gz");
  atomic_write(no_trailer, finished.substr(0, finished.size() - 8));
  expect_contains(error_of([&] { load_digits(no_trailer); }), "data file '" + no_trailer + "' is truncated");
  // The same 1000 lines, properly ended, load.
  const std::string whole = dir.file("whole.csv.gz");
  atomic_write(whole, finished);
  EXPECT_EQ(load_digits(whole).size(), 1000);
}

TEST(GzipData, AFlippedByteIsAnErrorNamingTheFile) {
  TempDir dir;
  const std::string bytes = read_file(digits_path(), "data file");
  const size_t size = bytes.size();
  // In the compressed data, in the CRC-32 and in the length of the trailer.
  for (size_t at : {size / 4, size / 2, size - 6, size - 2}) {
    std::string flipped = bytes;
    flipped[at] = static_cast<char>(flipped[at] ^ 0x5a);
    const std::string path = dir.file("flip" + std::to_string(at) + ".csv.gz");
    atomic_write(path, flipped);
    const std::string msg = error_of([&] { load_digits(path); });
    expect_contains(msg, "data file '" + path + "' is corrupt");
  }
  EXPECT_EQ(load_digits(digits_path()).size(), 1797);
}

TEST(CsvValues, OutsideFloat32AreErrorsNamingTheFileLineAndColumn) {
  TempDir dir;
  const std::string path = dir.file("s.csv");
  atomic_write(path, "x0,x1\n1.5,2\n3,1e39\n");
  const std::string msg = error_of([&] { read_samples_csv(path); });
  expect_contains(msg, "samples file '" + path + "', line 3, column 2: '1e39'");
  expect_contains(msg, "float32");
  atomic_write(path, "x0,x1\n-1e39,2\n");
  expect_contains(error_of([&] { read_samples_csv(path); }), "samples file '" + path + "', line 2, column 1: '-1e39'");
  atomic_write(path, "x0,x1\n1,nan\n");
  expect_contains(error_of([&] { read_samples_csv(path); }),
                  "samples file '" + path + "', line 2, column 2: 'nan' is not a finite number");
  // The largest float32 (3.4028235e38) is a value; numbers below float32's smallest are zero.
  atomic_write(path, "x0,x1\n3.4e38,-3.4e38\n1e-50,0\n");
  const Tensor x = read_samples_csv(path);
  EXPECT_TRUE(x.isfinite().all().item<bool>());
  EXPECT_EQ(x[1][0].item<float>(), 0.0f);

  // The digits loader reads integers: a float or an integer beyond any pixel value is named.
  const std::string text = first_lines(gunzip(read_file(digits_path(), "data file")), 3);
  const std::string digits = dir.file("d.csv");
  atomic_write(digits, text + "1e39" + text.substr(text.find(',')));
  std::string m = error_of([&] { load_digits(digits); });
  expect_contains(m, "data file '" + digits + "', line 4");
  expect_contains(m, "column 1");
  atomic_write(digits, text + "99999999999999999999999" + text.substr(text.find(',')));
  m = error_of([&] { load_digits(digits); });
  expect_contains(m, "data file '" + digits + "', line 4");
  expect_contains(m, "column 1");
}

// ---------------------------------------------------------------------------------------------
// Model files

Json model_meta(const Json& model) {
  return {{"format", "tilt-velocity"}, {"version", 1}, {"model", model}, {"schedule", {{"type", "linear"}}},
          {"info", Json::object()}};
}

MlpOptions small_mlp() {
  MlpOptions o;
  o.dim = 2;
  o.hidden = {8, 8};
  o.time_features = 4;
  return o;
}

archive::TensorMap deep_copy(const archive::TensorMap& tensors) {
  archive::TensorMap out;
  for (const auto& [name, value] : tensors) out[name] = value.clone();
  return out;
}

archive::TensorMap mlp_tensors(const MlpVelocity& mlp, const std::string& prefix = "") {
  archive::TensorMap t;
  for (const auto& [name, value] : mlp.named_parameters()) t[prefix + name] = value.detach().clone();
  return t;
}

Json mlp_node(const MlpOptions& o) {
  return {{"kind", "mlp"}, {"dim", o.dim}, {"hidden", o.hidden}, {"time_features", o.time_features}};
}

TEST(ModelFiles, NonFiniteTensorsAreRefusedNamingTheFileAndTheTensor) {
  TempDir dir;
  const MlpVelocity mlp(small_mlp(), make_linear_schedule(), 1);
  const std::string good = dir.file("good.pt");
  save_velocity(mlp, good);
  EXPECT_EQ(load_velocity(good).field->dim(), 2);
  for (const double bad : {std::nan(""), HUGE_VAL, -HUGE_VAL}) {
    archive::TensorMap t = mlp_tensors(mlp);
    t["2.weight"][3][1] = bad;
    const std::string path = dir.file("bad.pt");
    write_damaged(path, model_meta(mlp_node(small_mlp())), t);
    const std::string msg = error_of([&] { load_velocity(path); });
    expect_contains(msg, "model file '" + path + "'");
    expect_contains(msg, "tensor '2.weight'");
    expect_contains(msg, "non-finite");
  }
  // Inside a fine-tuned model, and in a mixture.
  auto mixture = test::isotropic_gaussian({0.0, 1.0}, 0.5);
  archive::TensorMap t = mlp_tensors(mlp, "trainable.");
  t["trainable.0.bias"][0] = std::nan("");
  t["base.weights"] = mixture->weights();
  t["base.means"] = mixture->means();
  t["base.covariances"] = mixture->covariances();
  const std::string ft = dir.file("ft.pt");
  write_damaged(ft, model_meta({{"kind", "finetuned"}, {"mode", "residual"}, {"base", {{"kind", "gmm"}}},
                                 {"trainable", mlp_node(small_mlp())}}),
                 t);
  expect_contains(error_of([&] { load_velocity(ft); }), "model file '" + ft + "': tensor 'trainable.0.bias'");
  const std::string gmm = dir.file("gmm.pt");
  write_damaged(gmm, model_meta({{"kind", "gmm"}}),
                 {{"weights", mixture->weights()},
                  {"means", at::full({1, 2}, std::nan(""), kDouble)},
                  {"covariances", mixture->covariances()}});
  expect_contains(error_of([&] { load_velocity(gmm); }), "model file '" + gmm + "': tensor 'means'");
}

// A U-Net's metadata is checked against its tensors before the network is built (a channel count of 10^12 must not
// allocate first), and its adapters' too.
TEST(ModelFiles, UNetMetadataThatDoesNotFitItsTensorsIsRefusedNamingTheFile) {
  TempDir dir;
  UNetOptions o;
  o.channels = 1;
  o.height = o.width = 4;
  o.base_channels = 4;
  o.channel_mult = {1, 2};
  o.blocks = 1;
  o.groups = 2;
  o.time_features = 4;
  const UNetVelocity unet(o, make_linear_schedule(), 1);
  const auto lora = unet.with_lora(LoraOptions{2, 2.0}, 1);
  const std::string path = dir.file("unet.pt");
  save_velocity(*lora, path);
  EXPECT_TRUE(load_velocity(path).field->parameters().size() > 0);
  archive::TensorMap t;
  for (const auto& [name, value] : lora->named_parameters()) t[name] = value.detach().clone();
  const Json good = {{"kind", "unet"}, {"channels", 1}, {"height", 4}, {"width", 4}, {"base_channels", 4},
                     {"channel_mult", {1, 2}}, {"blocks", 1}, {"groups", 2}, {"attention", false},
                     {"time_features", 4}, {"condition_dim", 0}, {"lora", {{"rank", 2}, {"alpha", 2.0}}}};
  const auto expect_refused = [&](const Json& model, const archive::TensorMap& tensors, const std::string& why) {
    write_damaged(path, model_meta(model), tensors);
    const std::string msg = error_of([&] { load_velocity(path); });
    expect_contains(msg, "model file '" + path + "'");
    expect_contains(msg, why);
  };
  write_damaged(path, model_meta(good), t);
  EXPECT_EQ(load_velocity(path).field->dim(), 16);
  Json node = good;
  node["base_channels"] = 4000000000000LL;
  expect_refused(node, t, "base_channels must be in 1..4096");
  node = good;
  node["base_channels"] = 8;  // the tensors are those of 4 channels
  expect_refused(node, t, "tensor 'time.0.weight' must be [32, 4], got [16, 4]");
  node = good;
  node["groups"] = 3;
  expect_refused(node, t, "groups = 3 must divide");
  node = good;
  node["attention"] = 1;
  expect_refused(node, t, "'attention' must be true or false");
  node = good;
  node["lora"]["rank"] = 3;
  expect_refused(node, t, "lora_a' must be [3,");
  node = good;
  node.erase("lora");  // adapters in the file that the metadata does not announce
  expect_refused(node, t, "unexpected tensor");
  archive::TensorMap missing = t;
  missing.erase("output.conv.lora_b");
  expect_refused(good, missing, "missing tensor 'output.conv.lora_b'");
}

TEST(ModelFiles, StructurallyBadValuesAreRefusedNamingTheFile) {
  TempDir dir;
  const MlpVelocity mlp(small_mlp(), make_linear_schedule(), 1);
  const std::string path = dir.file("m.pt");
  const auto expect_refused = [&](const Json& model, const archive::TensorMap& tensors, const std::string& why) {
    write_damaged(path, model_meta(model), tensors);
    const std::string msg = error_of([&] { load_velocity(path); });
    expect_contains(msg, "model file '" + path + "'");
    expect_contains(msg, why);
  };
  const archive::TensorMap t = mlp_tensors(mlp);
  MlpOptions o = small_mlp();
  Json node = mlp_node(o);
  node["dim"] = 0;
  expect_refused(node, t, "dim must be >= 1");
  node["dim"] = -2;
  expect_refused(node, t, "dim must be >= 1");
  node["dim"] = 3;  // the tensors are those of dimension 2
  expect_refused(node, t, "tensor '0.weight' must be [8, 8], got [8, 7]");
  node = mlp_node(o);
  node["hidden"] = {8, 0};
  expect_refused(node, t, "hidden widths must be >= 1");
  node["hidden"] = {8, -8};
  expect_refused(node, t, "hidden widths must be >= 1");
  node["hidden"] = Json::array();
  expect_refused(node, t, "at least one hidden layer");
  // A width the tensors do not have is caught before anything that size is allocated.
  node["hidden"] = {8, 4000000000000LL};
  expect_refused(node, t, "tensor '2.weight' must be [4000000000000, 8], got [8, 8]");
  node = mlp_node(o);
  node["time_features"] = 3;
  expect_refused(node, t, "time_features");
  node["dim"] = 2.5;
  expect_refused(node, t, "'dim' must be a whole number");
  archive::TensorMap extra = t;
  extra["6.weight"] = at::zeros({2, 2});
  expect_refused(mlp_node(o), extra, "unexpected tensor '6.weight'");
  archive::TensorMap reserved = t;  // names starting with "__" are the archive's own, not weights
  reserved["__extra__"] = at::zeros({4}, at::kByte);
  write_damaged(path, model_meta(mlp_node(o)), reserved);
  EXPECT_EQ(load_velocity(path).field->dim(), 2);
  archive::TensorMap missing = t;
  missing.erase("2.bias");
  expect_refused(mlp_node(o), missing, "missing tensor '2.bias'");

  // Mixtures: negative weights, covariances that are not positive definite, ragged shapes, d = 0.
  auto q = test::isotropic_gaussian({0.0, 1.0}, 0.5);
  const Tensor w2 = at::tensor({0.5, 0.5}, kDouble), mu2 = at::zeros({2, 2}, kDouble);
  const Tensor cov2 = at::eye(2, kDouble).unsqueeze(0).repeat({2, 1, 1});
  const Json gmm{{"kind", "gmm"}};
  expect_refused(gmm, {{"weights", at::tensor({0.5, -0.5}, kDouble)}, {"means", mu2}, {"covariances", cov2}},
                 "weights must be finite and positive");
  Tensor singular = cov2.clone();
  singular[1][1][1] = -1.0;
  expect_refused(gmm, {{"weights", w2}, {"means", mu2}, {"covariances", singular}}, "positive definite");
  expect_refused(gmm, {{"weights", w2}, {"means", mu2}, {"covariances", at::eye(3, kDouble).unsqueeze(0)}},
                 "covariances must be [K, d, d]");
  expect_refused(gmm, {{"weights", w2}, {"means", at::zeros({2, 0}, kDouble)}, {"covariances", at::zeros({2, 0, 0}, kDouble)}},
                 "dimension must be >= 1");
  // A fine-tuned pair whose parts disagree on the dimension, an unknown mode.
  archive::TensorMap pair = mlp_tensors(mlp, "trainable.");
  pair["base.weights"] = q->weights();
  pair["base.means"] = at::zeros({1, 3}, kDouble);
  pair["base.covariances"] = at::eye(3, kDouble).unsqueeze(0);
  expect_refused({{"kind", "finetuned"}, {"mode", "residual"}, {"base", gmm}, {"trainable", mlp_node(o)}}, pair,
                 "trainable network has dim 2 but the base has dim 3");
}

TEST(ModelFiles, WeightsThatOverflowFloat32AreRefusedByAProbe) {
  TempDir dir;
  MlpVelocity mlp(small_mlp(), make_linear_schedule(), 1);
  {
    at::NoGradGuard no_grad;
    for (auto& [name, p] : mlp.named_parameters()) p.fill_(1e38);
  }
  const std::string path = dir.file("huge.pt");
  save_velocity(mlp, path);
  const std::string msg = error_of([&] { load_velocity(path); });
  expect_contains(msg, "model file '" + path + "' produces non-finite velocities");
}

// ---------------------------------------------------------------------------------------------
// idx files (Fashion-MNIST)

uint32_t be(uint32_t v) { return ((v >> 24) & 0xff) | ((v >> 8) & 0xff00) | ((v << 8) & 0xff0000) | (v << 24); }

// An idx file: the magic number, the dimensions (big-endian), then `data`, gzip-compressed.
void write_idx(const std::string& path, uint32_t magic, const std::vector<uint32_t>& dims, const std::string& data) {
  std::string bytes;
  std::vector<uint32_t> header{magic};
  header.insert(header.end(), dims.begin(), dims.end());
  for (uint32_t v : header) {
    const uint32_t big = be(v);
    bytes.append(reinterpret_cast<const char*>(&big), 4);
  }
  bytes += data;
  gzFile f = gzopen(path.c_str(), "wb");
  ASSERT_NE(f, nullptr);
  ASSERT_EQ(gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size())), static_cast<int>(bytes.size()));
  ASSERT_EQ(gzclose(f), Z_OK);
}

std::string bytes_of(const std::vector<int>& values) {
  std::string s;
  for (int v : values) s.push_back(static_cast<char>(v));
  return s;
}

// Three 2x3 images and their labels, read back exactly (p / 127.5 - 1, row-major); `limit` keeps the first.
TEST(IdxData, TinyFilesReadBackExactly) {
  TempDir dir;
  const std::vector<int> pixels{0, 255, 1, 2, 3, 4, 10, 20, 30, 40, 50, 60, 128, 127, 200, 100, 99, 254};
  const std::string images = dir.file("images.gz"), labels = dir.file("labels.gz");
  write_idx(images, 0x803, {3, 2, 3}, bytes_of(pixels));
  write_idx(labels, 0x801, {3}, bytes_of({0, 9, 4}));
  const ImageDataset d = load_idx(images, labels, 10);
  EXPECT_EQ(d.size(), 3);
  EXPECT_EQ(d.height, 2);
  EXPECT_EQ(d.width, 3);
  EXPECT_EQ(d.classes, 10);
  ASSERT_EQ(d.images.sizes(), (std::vector<int64_t>{3, 6}));
  EXPECT_EQ(d.images.scalar_type(), at::kFloat);
  for (int64_t i = 0; i < 18; ++i) {
    EXPECT_EQ(d.images.view(-1)[i].item<float>(), static_cast<float>(pixels[i] / 127.5 - 1.0)) << i;
  }
  EXPECT_EQ(d.images.min().item<float>(), -1.0f);
  EXPECT_EQ(d.images.max().item<float>(), 1.0f);
  EXPECT_EQ(d.labels.scalar_type(), at::kLong);
  EXPECT_EQ(d.labels[0].item<int64_t>(), 0);
  EXPECT_EQ(d.labels[1].item<int64_t>(), 9);
  EXPECT_EQ(d.labels[2].item<int64_t>(), 4);
  const ImageDataset first = load_idx(images, labels, 10, 2);
  EXPECT_EQ(first.size(), 2);
  EXPECT_TRUE(at::equal(first.images, d.images.narrow(0, 0, 2)));
  EXPECT_TRUE(at::equal(load_idx(images, labels, 10, 7).images, d.images));  // a limit beyond the count keeps all
}

TEST(IdxData, DamagedFilesAreErrorsNamingTheFile) {
  TempDir dir;
  const std::string images = dir.file("images.gz"), labels = dir.file("labels.gz");
  const std::string good_pixels(3 * 4 * 4, '\x10');
  write_idx(labels, 0x801, {3}, bytes_of({1, 2, 3}));
  const auto expect_image_error = [&](uint32_t magic, const std::vector<uint32_t>& dims, const std::string& data,
                                      const std::string& why) {
    write_idx(images, magic, dims, data);
    const std::string msg = error_of([&] { load_idx(images, labels, 10); });
    expect_contains(msg, "data file '" + images + "'");
    expect_contains(msg, why);
  };
  expect_image_error(0x801, {3, 4, 4}, good_pixels, "bad magic number 0x00000801, expected 0x00000803");
  expect_image_error(0x803, {3, 0, 4}, "", "dimension 1 is 0");
  expect_image_error(0x803, {3, 4, 4}, good_pixels.substr(1), "truncated");
  expect_image_error(0x803, {3, 4}, "", "truncated: the header needs 16 bytes");
  expect_image_error(0x803, {3, 4, 4}, good_pixels + "x", "1 bytes follow");
  write_idx(images, 0x803, {3, 4, 4}, good_pixels);
  EXPECT_EQ(load_idx(images, labels, 10).size(), 3);
  // The labels: a count that differs from the images', a label out of range, a truncated file, a missing one.
  write_idx(labels, 0x801, {2}, bytes_of({1, 2}));
  expect_contains(error_of([&] { load_idx(images, labels, 10); }),
                  "data file '" + labels + "' holds 2 labels, but '" + images + "' holds 3 images");
  write_idx(labels, 0x801, {3}, bytes_of({1, 10, 3}));
  expect_contains(error_of([&] { load_idx(images, labels, 10); }), "data file '" + labels + "': label 1 is 10, outside 0..9");
  write_idx(labels, 0x801, {3}, bytes_of({1, 2}));
  expect_contains(error_of([&] { load_idx(images, labels, 10); }), "data file '" + labels + "' (labels): truncated");
  expect_contains(error_of([&] { load_idx(images, dir.file("none.gz"), 10); }),
                  "cannot read data file '" + dir.file("none.gz") + "': no such file");
  // A directory of 4x4 images is not Fashion-MNIST; a missing directory says how to install it.
  write_idx(labels, 0x801, {3}, bytes_of({1, 2, 3}));
  std::filesystem::rename(images, dir.file("train-images-idx3-ubyte.gz"));
  std::filesystem::rename(labels, dir.file("train-labels-idx1-ubyte.gz"));
  expect_contains(error_of([&] { load_fashion_mnist(dir.file("")); }), "holds 4 x 4 images; Fashion-MNIST's are 28 x 28");
  expect_contains(error_of([&] { load_fashion_mnist(dir.file("missing")); }), "run scripts/setup.sh");
  Config config(Json{{"data", {{"type", "fashion_mnist"}, {"path", dir.file("missing")}}}}, "test");
  ConfigSection root = config.root();
  expect_contains(error_of([&] { read_image_data(root); }), "install the Debian package dataset-fashion-mnist");
}

// The real files (scripts/setup.sh installs them): 60000 training images, 6000 of each class, pixels in [-1, 1];
// [data] type = "fashion_mnist" reads them (limit: the first n) and [classifier] architecture = "cnn" takes
// their 28 x 28 shape.
TEST(IdxData, TheRealFashionMnistTrainingSet) {
  if (!file_exists(kFashionMnistDir)) GTEST_SKIP() << kFashionMnistDir << " is missing: run scripts/setup.sh";
  const ImageDataset d = load_fashion_mnist();
  EXPECT_EQ(d.size(), 60000);
  EXPECT_EQ(d.dim(), 784);
  EXPECT_EQ(d.classes, 10);
  const Tensor counts = at::bincount(d.labels, {}, 10);
  for (int64_t k = 0; k < 10; ++k) EXPECT_EQ(counts[k].item<int64_t>(), 6000) << "class " << k;
  EXPECT_EQ(d.images.min().item<float>(), -1.0f);
  EXPECT_EQ(d.images.max().item<float>(), 1.0f);
  EXPECT_EQ(load_fashion_mnist(kFashionMnistDir, "t10k").size(), 10000);
  Config config(Json{{"data", {{"type", "fashion_mnist"}, {"limit", 500}}},
                     {"classifier", {{"architecture", "cnn"}, {"channels", {8, 16}}}}}, "test");
  ConfigSection root = config.root();
  const ClassifierPlan plan = read_classifier(root);
  EXPECT_EQ(plan.data.size(), 500);
  EXPECT_TRUE(at::equal(plan.data.images, d.images.narrow(0, 0, 500)));
  EXPECT_EQ(plan.holdout, 0.1);
  EXPECT_EQ(plan.classifier.architecture, "cnn");
  EXPECT_EQ(plan.classifier.height, 28);
  EXPECT_EQ(plan.classifier.width, 28);
  EXPECT_EQ(plan.classifier.channels, (std::vector<int64_t>{8, 16}));
  EXPECT_EQ(plan.classifier.hidden, (std::vector<int64_t>{128}));
}

// ---------------------------------------------------------------------------------------------
// Classifier files

Json classifier_meta(const ClassifierOptions& o) {
  return {{"format", "tilt-classifier"}, {"version", 1}, {"dim", o.dim}, {"hidden", o.hidden},
          {"classes", o.classes}, {"info", Json::object()}};
}

TEST(ClassifierFiles, BadValuesAreRefusedNamingTheFile) {
  TempDir dir;
  ClassifierOptions o;
  o.dim = 4;
  o.hidden = {6};
  o.classes = 3;
  MlpClassifier c(o, 2);
  archive::TensorMap t;
  for (const auto& [name, value] : c.named_parameters()) t[name] = value.detach().clone();
  const std::string path = dir.file("c.pt");
  write_damaged(path, classifier_meta(o), t);
  EXPECT_EQ(load_classifier(path).classifier->options().classes, 3);
  const auto expect_refused = [&](const Json& meta, const archive::TensorMap& tensors, const std::string& why) {
    write_damaged(path, meta, tensors);
    const std::string msg = error_of([&] { load_classifier(path); });
    expect_contains(msg, "classifier file '" + path + "'");
    expect_contains(msg, why);
  };
  archive::TensorMap bad = deep_copy(t);
  bad["head.weight"][0][0] = std::nan("");
  expect_refused(classifier_meta(o), bad, "tensor 'head.weight' holds non-finite values");
  Json meta = classifier_meta(o);
  meta["hidden"] = {0};
  expect_refused(meta, t, "hidden widths must be >= 1");
  meta = classifier_meta(o);
  meta["hidden"] = {3000000000000LL};
  expect_refused(meta, t, "tensor 'body.0.weight' must be [3000000000000, 4], got [6, 4]");
  meta = classifier_meta(o);
  meta["dim"] = -4;
  expect_refused(meta, t, "dim must be >= 1");
  archive::TensorMap huge = deep_copy(t);
  for (auto& [name, value] : huge) value.fill_(1e38);
  expect_refused(classifier_meta(o), huge, "produces non-finite logits");
}

// [classifier] activation: another architecture with the same parameter names. A SiLU classifier is still
// written as version 1 (what an older tilt reads); any other activation as version 2, which records it, so that
// an older tilt refuses the file instead of running it with SiLU.
TEST(ClassifierFiles, TheActivationRoundTripsAndChangesTheNetwork) {
  TempDir dir;
  ClassifierOptions o;
  o.dim = 4;
  o.hidden = {6, 5};
  o.classes = 3;
  const Tensor x = at::randn({7, 4}, make_generator(3));
  const MlpClassifier silu(o, 2);
  std::map<std::string, Tensor> logits;
  for (const std::string act : {"silu", "relu", "tanh"}) {
    o.activation = act;
    MlpClassifier c(o, 2);  // the same seed: the same weights
    const std::string path = dir.file(act + ".pt");
    save_classifier(c, path);
    const archive::Contents contents = archive::read(path, "classifier file", "tilt-classifier", 2, 1);
    EXPECT_EQ(contents.meta["version"], act == "silu" ? 1 : 2) << act;
    EXPECT_EQ(contents.meta.contains("activation"), act != "silu") << act;
    const LoadedClassifier loaded = load_classifier(path);
    EXPECT_EQ(loaded.classifier->options().activation, act);
    EXPECT_TRUE(at::equal(loaded.classifier->logits(x), c.logits(x))) << act;
    logits[act] = c.logits(x);
  }
  EXPECT_TRUE(at::equal(logits["silu"], silu.logits(x)));
  EXPECT_FALSE(at::allclose(logits["relu"], logits["silu"], 1e-3, 1e-3));
  EXPECT_FALSE(at::allclose(logits["tanh"], logits["silu"], 1e-3, 1e-3));
  o.activation = "gelu";
  expect_contains(error_of([&] { MlpClassifier bad(o, 0); }), "activation must be");
  // A version 2 file with an activation this tilt does not know, or none, is refused naming the file.
  o.activation = "relu";
  MlpClassifier relu(o, 2);
  archive::TensorMap t;
  for (const auto& [name, value] : relu.named_parameters()) t[name] = value.detach().clone();
  Json meta = classifier_meta(o);
  meta["version"] = 2;
  meta["activation"] = "gelu";
  const std::string path = dir.file("bad.pt");
  write_damaged(path, meta, t);
  expect_contains(error_of([&] { load_classifier(path); }), "classifier file '" + path + "': unknown activation \"gelu\"");
  meta.erase("activation");
  write_damaged(path, meta, t);
  expect_contains(error_of([&] { load_classifier(path); }), "classifier file '" + path + "'");
  meta["version"] = 4;
  write_damaged(path, meta, t);
  expect_contains(error_of([&] { load_classifier(path); }), "this tilt reads versions 1 to 3");
}

// ---------------------------------------------------------------------------------------------
// TorchScript modules

torch::jit::Module make_module(const std::string& source, int64_t dim = 0) {
  torch::jit::Module m("__torch__.TestModule");
  if (dim > 0) m.register_attribute("dim", c10::IntType::get(), dim);
  m.define(source);
  return m;
}

// A cnn classifier is written as version 3 (the architecture, image shape and channels) and loads with the
// same logits; version 1 files (an MLP, no architecture) still load; metadata that does not fit is refused.
TEST(ClassifierFiles, ACnnRoundTripsAndMismatchesAreRefused) {
  TempDir dir;
  ClassifierOptions o;
  o.architecture = "cnn";
  o.dim = 48;
  o.height = 8;
  o.width = 6;
  o.channels = {3, 4};
  o.hidden = {5};
  o.classes = 3;
  const MlpClassifier c(o, 4);
  const std::string path = dir.file("cnn.pt");
  save_classifier(c, path);
  const archive::Contents contents = archive::read(path, "classifier file", "tilt-classifier", 3, 1);
  EXPECT_EQ(contents.meta["version"], 3);
  EXPECT_EQ(contents.meta["architecture"], "cnn");
  EXPECT_EQ(contents.meta["channels"], Json({3, 4}));
  const LoadedClassifier loaded = load_classifier(path);
  EXPECT_EQ(loaded.classifier->options().architecture, "cnn");
  EXPECT_EQ(loaded.classifier->options().height, 8);
  const Tensor x = at::rand({5, 48}, make_generator(1)) * 2 - 1;
  EXPECT_TRUE(at::equal(loaded.classifier->logits(x), c.logits(x)));
  EXPECT_TRUE(at::equal(loaded.classifier->features(x), c.features(x)));
  EXPECT_EQ(c.features(x).size(1), 5);
  archive::TensorMap t;
  for (const auto& [name, value] : c.named_parameters()) t[name] = value.detach().clone();
  EXPECT_EQ(t.at("conv.0.weight").sizes(), (std::vector<int64_t>{3, 1, 3, 3}));
  EXPECT_EQ(t.at("body.0.weight").sizes(), (std::vector<int64_t>{5, 4 * 2 * 1}));
  const auto expect_refused = [&](const Json& meta, const std::string& why) {
    write_damaged(path, meta, t);
    const std::string msg = error_of([&] { load_classifier(path); });
    expect_contains(msg, "classifier file '" + path + "'");
    expect_contains(msg, why);
  };
  Json meta = contents.meta;
  meta["channels"] = {3, 7};
  expect_refused(meta, "tensor 'conv.3.weight' must be [7, 3, 3, 3], got [4, 3, 3, 3]");
  meta = contents.meta;
  meta["height"] = 12;  // 12 x 4 pools to 3 x 1, 8 x 6 to 2 x 1
  meta["width"] = 4;
  expect_refused(meta, "tensor 'body.0.weight' must be [5, 12], got [5, 8]");
  meta = contents.meta;
  meta["height"] = 7;
  expect_refused(meta, "a cnn needs height * width = dim (48), got height 7 and width 6");
  meta = contents.meta;
  meta["architecture"] = "resnet";
  expect_refused(meta, "unknown architecture \"resnet\"");
  meta = contents.meta;
  meta.erase("channels");
  expect_refused(meta, "malformed metadata");
  // The same tensors as an old MLP file: refused by the shapes, never run as an MLP.
  expect_refused(classifier_meta(o), "tensor 'body.0.weight' must be [5, 48]");
  // A version 1 file (written before architectures) is an MLP.
  ClassifierOptions m;
  m.dim = 4;
  m.hidden = {6};
  m.classes = 3;
  const MlpClassifier mlp(m, 2);
  archive::TensorMap mt;
  for (const auto& [name, value] : mlp.named_parameters()) mt[name] = value.detach().clone();
  write_damaged(path, classifier_meta(m), mt);
  const LoadedClassifier old = load_classifier(path);
  EXPECT_EQ(old.classifier->options().architecture, "mlp");
  const Tensor y = at::randn({3, 4}, make_generator(2));
  EXPECT_TRUE(at::equal(old.classifier->logits(y), mlp.logits(y)));
  // Options that do not fit are refused when the network is built.
  o.height = 7;
  expect_contains(error_of([&] { MlpClassifier bad(o, 0); }), "height * width = dim");
  o.height = 8;
  o.channels = {3, 4, 5, 6};
  expect_contains(error_of([&] { MlpClassifier bad(o, 0); }), "below 1 pixel");
  o.architecture = "vit";
  expect_contains(error_of([&] { MlpClassifier bad(o, 0); }), "architecture must be \"mlp\" or \"cnn\"");
}

TEST(TorchScriptFiles, AForwardThatRaisesKeepsTheModulesMessageAndNamesTheFile) {
  TempDir dir;
  auto m = make_module(
      "def forward(self, x, t):\n"
      "    assert bool(t.max() <= 0.5), 'this model needs t <= 0.5'\n"
      "    return x\n",
      2);
  const std::string path = dir.file("raises.ts");
  m.save(path);
  const std::string msg = error_of([&] { TorchScriptVelocity::load(path, make_linear_schedule()); });
  expect_contains(msg, "TorchScript model '" + path + "'");
  expect_contains(msg, "this model needs t <= 0.5");
  EXPECT_EQ(msg.find("Traceback"), std::string::npos) << msg;
  // A message of several lines is kept whole, even where a later line looks like "Type: text".
  auto two = make_module(
      "def forward(self, x, t):\n"
      "    assert bool(t.max() <= 0.5), 'needs t <= 0.5\\nValueError: see the model card'\n"
      "    return x\n",
      2);
  two.save(path);
  const std::string lines = error_of([&] { TorchScriptVelocity::load(path, make_linear_schedule()); });
  expect_contains(lines, "needs t <= 0.5\nValueError: see the model card");

  auto r = make_module(
      "def forward(self, x):\n"
      "    assert bool(x.abs().max() == 0.0), 'reward undefined away from 0'\n"
      "    return x.sum(1)\n");
  const std::string reward = dir.file("raises_reward.ts");
  r.save(reward);
  const std::string rmsg = error_of([&] { TorchScriptReward(reward, 2); });
  expect_contains(rmsg, "TorchScript reward '" + reward + "'");
  expect_contains(rmsg, "reward undefined away from 0");
}

// LibTorch's zip records are followed by data descriptors (CRC-32 and sizes again) that its reader ignores; a byte
// flipped in one is still a damaged file, refused naming it (it was accepted while the record itself checked).
TEST(TorchScriptFiles, ADamagedDataDescriptorIsAnErrorNamingTheFile) {
  TempDir dir;
  torch::jit::Module m("__torch__.TestModule");
  m.register_attribute("dim", c10::IntType::get(), int64_t{2});
  m.register_parameter("w", at::ones({2}), false);
  m.define("def forward(self, x, t):\n    return x * self.w\n");
  const std::string good = dir.file("good.ts");
  m.save(good);
  std::ifstream in(good, std::ios::binary);
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_NO_THROW(TorchScriptVelocity::load(good, make_linear_schedule()));
  int descriptors = 0;
  for (size_t at = bytes.find("PK\x07\x08"); at != std::string::npos; at = bytes.find("PK\x07\x08", at + 4)) {
    for (const size_t field : {at + 4, at + 8, at + 12}) {  // its CRC-32, compressed and uncompressed sizes
      std::string bad = bytes;
      bad[field] = static_cast<char>(bad[field] ^ 0x01);
      const std::string path = dir.file("bad.ts");
      std::ofstream(path, std::ios::binary) << bad;
      const std::string msg = error_of([&] { TorchScriptVelocity::load(path, make_linear_schedule()); });
      expect_contains(msg, "'" + path + "'");
      expect_contains(msg, "data descriptor");
    }
    ++descriptors;
  }
  EXPECT_GT(descriptors, 0) << "LibTorch wrote no data descriptors: this test checks nothing";
}

TEST(TorchScriptFiles, ARewardWithoutAGradientIsAnErrorNamingTheFile) {
  TempDir dir;
  for (const std::string body : {"    return x.detach().sum(1)\n", "    return torch.zeros([x.size(0)])\n"}) {
    auto m = make_module("def forward(self, x):\n" + body);
    const std::string path = dir.file("flat.ts");
    m.save(path);
    const std::string msg = error_of([&] { TorchScriptReward(path, 2); });
    expect_contains(msg, "TorchScript reward '" + path + "'");
    expect_contains(msg, "differentiable");
  }
  // x * 0 has a gradient (zero): a valid, if useless, reward.
  auto zero = make_module("def forward(self, x):\n    return (x * 0.0).sum(1)\n");
  const std::string path = dir.file("zero.ts");
  zero.save(path);
  TorchScriptReward r(path, 2);
  EXPECT_EQ(r.grad(at::ones({3, 2})).abs().sum().item<double>(), 0.0);
}

// A module holding `value` as the parameter (or buffer) `name`, then `source`.
torch::jit::Module module_with(const std::string& name, const Tensor& value, bool buffer, const std::string& source,
                               int64_t dim = 0) {
  torch::jit::Module m("__torch__.TestModule");
  if (dim > 0) m.register_attribute("dim", c10::IntType::get(), dim);
  if (buffer) {
    m.register_buffer(name, value);
  } else {
    m.register_parameter(name, value, false);
  }
  m.define(source);
  return m;
}

TEST(TorchScriptFiles, NonFiniteWeightsAreRefusedNamingTheFileAndTheParameter) {
  TempDir dir;
  const std::string path = dir.file("nan.ts");
  auto m = module_with("scale", at::full({2}, std::nan("")), false, "def forward(self, x, t):\n    return x * self.scale\n", 2);
  m.save(path);
  expect_contains(error_of([&] { TorchScriptVelocity::load(path, make_linear_schedule()); }),
                  "TorchScript model '" + path + "': parameter 'scale' holds non-finite values");
  // Finite weights whose output overflows.
  auto big = module_with("scale", at::full({2}, 1e38f), false,
                         "def forward(self, x, t):\n    return (x + 1.0) * self.scale * self.scale\n", 2);
  big.save(path);
  expect_contains(error_of([&] { TorchScriptVelocity::load(path, make_linear_schedule()); }),
                  "TorchScript model '" + path + "' produces non-finite values");
  auto r = module_with("w", at::full({2}, -HUGE_VALF), true, "def forward(self, x):\n    return (x * self.w).sum(1)\n");
  r.save(path);
  expect_contains(error_of([&] { TorchScriptReward(path, 2); }),
                  "TorchScript reward '" + path + "': buffer 'w' holds non-finite values");
}

TEST(ModelFiles, ConditionalModelsRecordTheirConditionSizeAndTrainingConditions) {
  TempDir dir;
  MlpOptions o = small_mlp();
  o.condition_dim = 3;
  auto mlp = std::make_shared<MlpVelocity>(o, make_linear_schedule(), 2);
  Generator gen = make_generator(3);
  const Tensor conditions = at::randn({5, 3}, gen, kDouble);
  const Tensor x = at::randn({4, 2}, gen), t = at::rand({4}, gen), c = at::randn({4, 3}, gen);
  // An MLP, and a fine-tuned model over it (residual, copy): condition_dim and the conditions come back.
  std::vector<VelocityFieldPtr> fields{mlp};
  for (FineTuneMode mode : {FineTuneMode::residual, FineTuneMode::copy}) {
    auto ft = make_finetuned(mlp, mode, {8}, 4, 4);
    {
      at::NoGradGuard no_grad;
      for (auto& p : ft->parameters()) p.add_(0.1 * at::randn(p.sizes(), gen));
    }
    fields.push_back(ft);
  }
  for (const auto& field : fields) {
    const std::string path = dir.file("c.pt");
    save_velocity(*field, path, Json::object(), conditions);
    const LoadedModel loaded = load_velocity(path);
    EXPECT_EQ(loaded.field->condition_dim(), 3) << field->kind();
    EXPECT_TRUE(loaded.field->conditional_velocity(x, t, c).allclose(field->conditional_velocity(x, t, c), 1e-6, 1e-6));
    EXPECT_TRUE(loaded.field->velocity(x, t).allclose(field->velocity(x, t), 1e-6, 1e-6));
    ASSERT_TRUE(loaded.conditions.defined());
    EXPECT_TRUE(loaded.conditions.equal(conditions));
    save_velocity(*field, path);  // without conditions: none are reported
    EXPECT_FALSE(load_velocity(path).conditions.defined());
    EXPECT_EQ(load_velocity(path).field->condition_dim(), 3);
  }
  // An unconditional model's file is as before (no condition keys: what older files are), and loads.
  const MlpVelocity plain(small_mlp(), make_linear_schedule(), 1);
  save_velocity(plain, dir.file("u.pt"));
  const archive::Contents contents = archive::read(dir.file("u.pt"), "model file", "tilt-velocity", 1);
  EXPECT_FALSE(contents.meta.contains("condition_dim"));
  EXPECT_FALSE(contents.meta.at("model").contains("condition_dim"));
  EXPECT_EQ(load_velocity(dir.file("u.pt")).field->condition_dim(), 0);
  // The writer refuses conditions that do not fit the model.
  expect_contains(error_of([&] { save_velocity(plain, dir.file("x.pt"), Json::object(), conditions); }),
                  "cannot write model file '" + dir.file("x.pt") + "' with conditions: the model is unconditional");
  expect_contains(error_of([&] { save_velocity(*mlp, dir.file("x.pt"), Json::object(), at::zeros({5, 2})); }),
                  "cannot write model file '" + dir.file("x.pt") + "': the conditions have size 2 but the model takes 3");
  Tensor nan = conditions.clone();
  nan[1][1] = std::nan("");
  expect_contains(error_of([&] { save_velocity(*mlp, dir.file("x.pt"), Json::object(), nan); }), "must be finite");
  EXPECT_FALSE(std::filesystem::exists(dir.file("x.pt")));
}

TEST(ModelFiles, MismatchedConditionsAreRefusedNamingTheFile) {
  TempDir dir;
  MlpOptions o = small_mlp();
  o.condition_dim = 3;
  const MlpVelocity mlp(o, make_linear_schedule(), 2);
  const std::string path = dir.file("m.pt");
  Json node = mlp_node(o);
  node["condition_dim"] = 3;
  const auto expect_refused = [&](const Json& meta, const archive::TensorMap& tensors, const std::string& why) {
    write_damaged(path, meta, tensors);
    const std::string msg = error_of([&] { load_velocity(path); });
    expect_contains(msg, "model file '" + path + "'");
    expect_contains(msg, why);
  };
  const archive::TensorMap t = mlp_tensors(mlp);
  Json meta = model_meta(node);
  meta["condition_dim"] = 3;
  write_damaged(path, meta, t);
  EXPECT_EQ(load_velocity(path).field->condition_dim(), 3);
  // The network's metadata without its condition: its first layer is wider than it says.
  expect_refused(model_meta(mlp_node(o)), t, "tensor '0.weight' must be [8, 7], got [8, 11]");
  Json bad = node;
  bad["condition_dim"] = -1;
  expect_refused(model_meta(bad), t, "condition_dim must be >= 0");
  // The file's condition size against its model's.
  Json other = meta;
  other["condition_dim"] = 2;
  expect_refused(other, t, "its metadata records condition_dim = 2 but its model takes a condition of size 3");
  expect_refused(model_meta(node), t, "its metadata records condition_dim = 0 but its model takes a condition of size 3");
  // The conditions: recorded but missing, of the wrong shape or type, present but not recorded.
  Json with = meta;
  with["conditions"] = 4;
  expect_refused(with, t, "is missing tensor '__conditions__'");
  archive::TensorMap tc = t;
  tc["__conditions__"] = at::zeros({4, 2}, kDouble);
  expect_refused(with, tc, "its conditions ('__conditions__') must be [4, 3] floating-point numbers, got [4, 2]");
  tc["__conditions__"] = at::zeros({4, 3}, at::kLong);
  expect_refused(with, tc, "must be [4, 3] floating-point numbers");
  tc["__conditions__"] = at::zeros({4, 3}, kDouble);
  write_damaged(path, with, tc);
  EXPECT_TRUE(load_velocity(path).conditions.equal(at::zeros({4, 3}, kDouble)));
  expect_refused(meta, tc, "holds conditions ('__conditions__') that its metadata does not record");
  with["conditions"] = 2.5;
  expect_refused(with, tc, "'conditions' must be a whole number");
}

}  // namespace
}  // namespace tilt
