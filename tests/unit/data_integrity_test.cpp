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
