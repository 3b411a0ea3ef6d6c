// Damaged files and files holding bad values: truncated or corrupt gzip data, CSV values outside
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

#include "io/archive.h"  // writes model files with chosen metadata and tensors

#include "../support/checks.h"
#include "../support/helpers.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <gtest/gtest.h>
#include <torch/csrc/jit/api/module.h>
#include <zlib.h>

#include <cmath>
#include <limits>
#include <string>

namespace tilt {
namespace {

using test::TempDir;
using test::error_of;
using test::expect_contains;

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
// TorchScript modules

torch::jit::Module make_module(const std::string& source, int64_t dim = 0) {
  torch::jit::Module m("__torch__.TestModule");
  if (dim > 0) m.register_attribute("dim", c10::IntType::get(), dim);
  m.define(source);
  return m;
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

}  // namespace
}  // namespace tilt
