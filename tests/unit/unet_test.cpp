// The U-Net velocity field and its LoRA adapters (docs/equations.md, E124, E125): shapes, conditions, the
// input VJP against central finite differences in float64, model files, and adapters that start as the
// base, train alone and compute exactly the merged weights W + (alpha / r) B A.
#include "tilt/core/error.h"
#include "tilt/io/config.h"
#include "tilt/io/methods.h"
#include "tilt/io/model_io.h"
#include "tilt/io/training.h"
#include "tilt/model/condition.h"
#include "tilt/model/finetuned.h"
#include "tilt/model/gmm.h"
#include "tilt/model/mlp.h"
#include "tilt/model/reward.h"
#include "tilt/model/torchscript.h"
#include "tilt/model/unet.h"
#include "tilt/schedule/schedule.h"
#include "tilt/train/adjoint_matching.h"
#include "tilt/train/flow_matching.h"
#include "tilt/train/trainer.h"

#include "../support/helpers.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/jit/api/module.h>
#include <torch/csrc/jit/serialization/import.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <mutex>
#include <set>
#include <sstream>
#include <thread>

#include <sys/resource.h>

namespace tilt {
namespace {

const auto kDouble = at::TensorOptions().dtype(at::kDouble);

// Small enough for float64 finite differences in a second: 8x8, two levels, attention and a condition.
UNetOptions tiny(int64_t condition_dim = 3) { return test::tiny_unet(2, 8, 4, condition_dim); }

std::string temp_path(const std::string& name) { return ::testing::TempDir() + "/tilt_unet_" + name; }

int64_t count(const std::vector<Tensor>& tensors) {
  int64_t n = 0;
  for (const Tensor& t : tensors) n += t.numel();
  return n;
}

// The autograd gradient of the tensor `name` of `tensors` (grads in their order) against central differences of
// loss() in float64, at its first, middle and last entries; the caller turns gradients off. Returns how many of the
// differences are not ~0.
int expect_gradient_matches_differences(const std::function<Tensor()>& loss, const NamedTensors& tensors,
                                        const std::vector<Tensor>& grads, const std::string& name) {
  size_t k = 0;
  while (k < tensors.size() && tensors[k].first != name) ++k;
  if (k == tensors.size()) {
    ADD_FAILURE() << "no tensor " << name;
    return 0;
  }
  Tensor p = tensors[k].second.view(-1);
  int nonzero = 0;
  for (int64_t i : {int64_t{0}, p.numel() / 2, p.numel() - 1}) {
    const double keep = p[i].item<double>(), h = 1e-6;
    p[i] = keep + h;
    const double up = loss().item<double>();
    p[i] = keep - h;
    const double down = loss().item<double>();
    p[i] = keep;
    const double fd = (up - down) / (2 * h);
    EXPECT_NEAR(grads[k].view(-1)[i].item<double>(), fd, 1e-6 * (1.0 + std::abs(fd))) << name << "[" << i << "]";
    nonzero += std::abs(fd) > 1e-8;
  }
  return nonzero;
}

TEST(UNet, ShapesAndTheDefaultSizeForTwentyEightPixelImages) {
  UNetOptions o;  // 1 x 28 x 28, 32 channels x {1, 2, 2}, 2 blocks per level
  UNetVelocity net(o, make_linear_schedule(), 0);
  EXPECT_EQ(net.dim(), 784);
  const int64_t n = count(net.parameters());
  EXPECT_GE(n, 1000000);  // the 1-3M parameters
  EXPECT_LE(n, 3000000);
  // parameter_shapes is named_parameters without allocating, in the same order.
  const auto shapes = UNetVelocity::parameter_shapes(o);
  const NamedTensors named = net.named_parameters();
  ASSERT_EQ(shapes.size(), named.size());
  for (size_t i = 0; i < shapes.size(); ++i) {
    EXPECT_EQ(shapes[i].first, named[i].first);
    EXPECT_EQ(at::IntArrayRef(shapes[i].second), named[i].second.sizes()) << shapes[i].first;
  }
  at::NoGradGuard no_grad;
  const Tensor x = at::randn({3, 784});
  const Tensor v = net.velocity(x, at::tensor({0.1, 0.5, 0.9}));
  EXPECT_EQ(v.sizes(), x.sizes());
  EXPECT_TRUE(at::isfinite(v).all().item<bool>());
}

TEST(UNet, TheTimeAndTheConditionChangeTheOutputAndOneConditionRowServesTheBatch) {
  UNetVelocity net(tiny(), make_linear_schedule(), 1);
  at::NoGradGuard no_grad;
  const Tensor x = at::randn({4, net.dim()});
  const Tensor c = at::tensor({0.0, 1.0, 0.0}).reshape({1, 3});
  const Tensor v_c = net.conditional_velocity(x, at::scalar_tensor(0.3), c);
  EXPECT_TRUE(at::allclose(v_c, net.conditional_velocity(x, at::scalar_tensor(0.3), c.expand({4, 3})), 0, 0));
  EXPECT_GT((v_c - net.velocity(x, 0.3)).abs().max().item<double>(), 1e-4);  // null != given condition
  EXPECT_GT((net.velocity(x, 0.3) - net.velocity(x, 0.7)).abs().max().item<double>(), 1e-4);
  // A per-row time equals one time for the batch, row by row.
  const Tensor t = at::tensor({0.1, 0.2, 0.3, 0.4});
  const Tensor rows = net.velocity(x, t);
  for (int64_t i = 0; i < 4; ++i) {
    EXPECT_TRUE(at::allclose(rows[i], net.velocity(x.slice(0, i, i + 1), t[i].item<double>())[0], 1e-5, 1e-6)) << i;
  }
  // Bad conditions and bad inputs are errors that name the kind.
  EXPECT_THROW(net.conditional_velocity(x, at::scalar_tensor(0.3), at::zeros({4, 2})), Error);
  EXPECT_THROW(net.velocity(at::zeros({4, 5}), 0.3), Error);
  UNetVelocity plain(tiny(0), make_linear_schedule(), 1);
  EXPECT_THROW(plain.conditional_velocity(x, at::scalar_tensor(0.3), c), Error);
}

// (dv/dx)^T a by autograd against central differences of a . v in float64, at random x, a and every
// kind of layer (conv, GroupNorm, attention, up- and downsampling, the embedding): issue 20's VJP test.
TEST(UNet, InputVjpMatchesFiniteDifferencesInFloat64) {
  for (const int64_t dc : {int64_t{0}, int64_t{3}}) {
    UNetVelocity net(tiny(dc), make_linear_schedule(), 7);
    net.cast(kDouble);
    Generator gen = make_generator(11);
    const Tensor x = at::randn({2, net.dim()}, gen, kDouble);
    const Tensor a = at::randn({2, net.dim()}, gen, kDouble);
    const Tensor c = dc > 0 ? at::eye(dc, kDouble).slice(0, 0, 2) : Tensor();
    const double t = 0.37;
    const Tensor vjp = dc > 0 ? net.conditional_vjp(x, t, c, a) : net.vjp(x, t, a);
    ASSERT_EQ(vjp.scalar_type(), at::kDouble);
    at::NoGradGuard no_grad;
    auto f = [&](const Tensor& y) { return (a * net.conditional_velocity(y, at::scalar_tensor(t, kDouble), c)).sum().item<double>(); };
    // Directional derivatives along random directions and along a few coordinates.
    std::vector<Tensor> directions;
    for (int k = 0; k < 4; ++k) directions.push_back(at::randn({2, net.dim()}, gen, kDouble));
    for (int64_t i : {int64_t{0}, int64_t{17}, net.dim() + 5}) {
      Tensor e = at::zeros({2 * net.dim()}, kDouble);
      e[i] = 1.0;
      directions.push_back(e.reshape({2, net.dim()}));
    }
    const double h = 1e-6;
    for (const Tensor& u : directions) {
      const double fd = (f(x + h * u) - f(x - h * u)) / (2 * h);
      const double ad = (vjp * u).sum().item<double>();
      EXPECT_NEAR(ad, fd, 1e-6 * (1.0 + std::abs(fd))) << "condition_dim " << dc;
    }
  }
}

// The parameter gradient that training uses, on a few entries of different layers.
TEST(UNet, ParameterGradientsMatchFiniteDifferencesInFloat64) {
  UNetVelocity net(tiny(), make_linear_schedule(), 3);
  net.cast(kDouble);
  Generator gen = make_generator(5);
  const Tensor x = at::randn({2, net.dim()}, gen, kDouble);
  const Tensor c = at::eye(3, kDouble).slice(0, 1, 3);
  auto loss = [&] { return net.conditional_velocity(x, at::tensor({0.2, 0.8}, kDouble), c).pow(2).sum(); };
  const NamedTensors params = net.named_parameters();
  std::vector<Tensor> tensors;
  for (const auto& p : params) tensors.push_back(p.second);
  const auto grads = torch::autograd::grad({loss()}, tensors);
  at::NoGradGuard no_grad;
  for (const std::string& name : {"time.0.weight", "condition.weight", "down.0.0.conv1.weight", "mid.attention.qkv.weight",
                                  "mid.0.norm1.weight", "up.1.upsample.weight", "output.conv.bias"}) {
    expect_gradient_matches_differences(loss, params, grads, name);
  }
}

// Flow matching's condition dropout in one pass (E100): the networks' masked pass against the reference of two
// separate sets of rows (VelocityField's default), values and the gradients of every parameter, in float64.
TEST(UNet, MaskedConditionsInOnePassEqualTheTwoSetsOfRows) {
  const auto schedule = make_linear_schedule();
  auto unet = std::make_shared<UNetVelocity>(tiny(3), schedule, 5);
  unet->cast(kDouble);
  auto mlp = std::make_shared<MlpVelocity>(MlpOptions{64, {16, 16}, 4, false, 3}, schedule, 6);
  for (Tensor p : mlp->parameters()) p.set_data(p.data().to(at::kDouble));
  Generator gen = make_generator(2);
  const int64_t B = 7;
  const Tensor x = at::randn({B, 64}, gen, kDouble), t = at::rand({B}, gen, kDouble);
  const Tensor c = at::randn({B, 3}, gen, kDouble);
  for (const VelocityFieldPtr& net : std::vector<VelocityFieldPtr>{unet, mlp}) {
    SCOPED_TRACE(net->kind());
    for (const std::vector<bool>& pattern : {std::vector<bool>{1, 0, 1, 1, 0, 0, 1}, std::vector<bool>(B, true),
                                             std::vector<bool>(B, false)}) {
      Tensor keep = at::zeros({B}, at::TensorOptions().dtype(at::kBool));
      for (int64_t i = 0; i < B; ++i) keep[i] = static_cast<bool>(pattern[static_cast<size_t>(i)]);
      const Tensor w = at::randn({B, 64}, gen, kDouble);
      auto grads = [&](const Tensor& v) {
        return torch::autograd::grad({(v * w).sum()}, net->parameters(), {}, /*retain_graph=*/false, /*create_graph=*/false,
                                     /*allow_unused=*/true);
      };
      const Tensor fast = net->conditional_velocity_masked(x, t, c, keep);
      const Tensor slow = net->VelocityField::conditional_velocity_masked(x, t, c, keep);
      EXPECT_LT((fast - slow).abs().max().item<double>(), 1e-12);
      const auto gf = grads(fast), gs = grads(net->VelocityField::conditional_velocity_masked(x, t, c, keep));
      for (size_t i = 0; i < gf.size(); ++i) {
        if (!gs[i].defined()) continue;  // the condition layer's weights are unused when every row is dropped
        ASSERT_TRUE(gf[i].defined());
        EXPECT_LT((gf[i] - gs[i]).abs().max().item<double>(), 1e-10) << "parameter " << i;
      }
    }
    EXPECT_THROW(net->conditional_velocity_masked(x, t, c, at::ones({B}, kDouble)), Error);
  }
}

TEST(UNet, BadOptionsAreErrorsThatNameTheOption) {
  auto message = [](UNetOptions o) {
    try {
      UNetVelocity(o, make_linear_schedule(), 0);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  UNetOptions o = tiny();
  o.groups = 3;  // does not divide 8
  EXPECT_NE(message(o).find("groups"), std::string::npos);
  o = tiny();
  o.height = 6;
  o.channel_mult = {1, 2, 2};  // 6 is not divisible by 4
  EXPECT_NE(message(o).find("divisible by 4"), std::string::npos);
  o = tiny();
  o.time_features = 3;
  EXPECT_NE(message(o).find("time_features"), std::string::npos);
  o = tiny();
  o.channel_mult = {};
  EXPECT_NE(message(o).find("channel_mult"), std::string::npos);
}

TEST(UNet, ModelFilesRoundTripAndRefuseTensorsThatDoNotFit) {
  auto net = std::make_shared<UNetVelocity>(tiny(), make_linear_schedule(), 4);
  const std::string path = temp_path("model.pt");
  save_velocity(*net, path);
  const LoadedModel loaded = load_velocity(path);
  ASSERT_EQ(loaded.field->kind(), "unet");
  at::NoGradGuard no_grad;
  const Tensor x = at::randn({3, net->dim()});
  EXPECT_TRUE(at::equal(net->velocity(x, 0.4), loaded.field->velocity(x, 0.4)));
  // A clone is the same field with its own tensors.
  const VelocityFieldPtr copy = net->clone();
  EXPECT_TRUE(at::equal(net->velocity(x, 0.4), copy->velocity(x, 0.4)));
  EXPECT_NE(copy->parameters()[0].data_ptr(), net->parameters()[0].data_ptr());
  std::remove(path.c_str());
}

// E125: zero adapters reproduce the base bit for bit; only the adapters get gradients; with nonzero B the
// field equals a plain U-Net whose weights are W + (alpha / r) B A (the slow reference of the merged weight).
TEST(UNetLora, StartsAsTheBaseTrainsOnlyTheAdaptersAndEqualsTheMergedWeights) {
  auto base = std::make_shared<UNetVelocity>(tiny(), make_linear_schedule(), 8);
  auto lora = base->with_lora(LoraOptions{2, 6.0}, 9);
  ASSERT_TRUE(lora->has_lora());
  Generator gen = make_generator(3);
  const Tensor x = at::randn({3, base->dim()}, gen);
  const Tensor c = at::eye(3).slice(0, 0, 3);
  {
    at::NoGradGuard no_grad;
    EXPECT_TRUE(at::equal(base->conditional_velocity(x, at::scalar_tensor(0.6), c), lora->conditional_velocity(x, at::scalar_tensor(0.6), c)));
  }
  // Gradients: on the adapters only (A's is zero while B = 0: d/dA of B A is B^T (.)).
  const std::vector<Tensor> trainable = lora->parameters();
  size_t dense_layers = 0;  // every convolution and linear layer has an adapter: its weight has >= 2 dimensions
  for (const auto& [name, shape] : UNetVelocity::parameter_shapes(tiny())) dense_layers += shape.size() >= 2;
  EXPECT_EQ(trainable.size(), 2 * dense_layers);
  for (const auto& [name, w] : base->named_parameters()) EXPECT_FALSE(w.requires_grad()) << name;
  const Tensor loss = lora->conditional_velocity(x, at::scalar_tensor(0.6), c).pow(2).sum();
  const auto grads = torch::autograd::grad({loss}, trainable);
  double b_norm = 0, a_norm = 0;
  for (size_t i = 0; i < grads.size(); ++i) (i % 2 ? b_norm : a_norm) += grads[i].pow(2).sum().item<double>();
  EXPECT_GT(b_norm, 0.0);
  EXPECT_EQ(a_norm, 0.0);
  EXPECT_LT(count(trainable), count(base->parameters()) / 2);
  // Random B: the field with adapters equals the plain network with merged weights.
  at::NoGradGuard no_grad;
  for (size_t i = 1; i < trainable.size(); i += 2) const_cast<Tensor&>(trainable[i]).normal_(0.0, 0.05, gen);
  UNetVelocity merged(tiny(), make_linear_schedule(), 0);
  NamedTensors values;
  const NamedTensors all = lora->named_parameters();
  auto find = [&](const std::string& name) -> Tensor {
    for (const auto& [n, t] : all) {
      if (n == name) return t;
    }
    return Tensor();
  };
  for (const auto& [name, w] : base->named_parameters()) {
    const std::string layer = name.substr(0, name.rfind('.'));
    const Tensor a = find(layer + ".lora_a");
    if (name.substr(name.rfind('.')) == ".weight" && a.defined()) {
      values.emplace_back(name, w + (6.0 / 2) * at::matmul(find(layer + ".lora_b"), a).view(w.sizes()));
    } else {
      values.emplace_back(name, w);
    }
  }
  merged.load_parameters(values);
  const Tensor v_lora = lora->conditional_velocity(x, at::scalar_tensor(0.6), c);
  EXPECT_GT((v_lora - base->conditional_velocity(x, at::scalar_tensor(0.6), c)).abs().max().item<double>(), 1e-3);
  EXPECT_TRUE(at::allclose(v_lora, merged.conditional_velocity(x, at::scalar_tensor(0.6), c), 1e-4, 1e-5));
}

// E125's gradients: the adapters' gradients (through the merged weight W + (alpha / r) B A) against central
// differences of the loss in float64, in convolutions, linear layers and the attention's, with B random so that A's
// gradients are not zero.
TEST(UNetLora, AdapterGradientsMatchFiniteDifferencesInFloat64) {
  auto base = std::make_shared<UNetVelocity>(tiny(), make_linear_schedule(), 8);
  base->cast(kDouble);
  auto lora = base->with_lora(LoraOptions{3, 5.0}, 9);
  Generator gen = make_generator(4);
  NamedTensors adapters;
  for (const auto& [name, t] : lora->named_parameters()) {
    if (name.find(".lora_") != std::string::npos) adapters.emplace_back(name, t);
  }
  ASSERT_EQ(adapters.size(), lora->parameters().size());
  {
    at::NoGradGuard no_grad;
    for (const auto& [name, t] : adapters) {
      ASSERT_EQ(t.scalar_type(), at::kDouble) << name;
      if (name.find("lora_b") != std::string::npos) const_cast<Tensor&>(t).normal_(0.0, 0.1, gen);
    }
  }
  const Tensor x = at::randn({2, lora->dim()}, gen, kDouble);
  const Tensor t = at::tensor({0.3, 0.7}, kDouble);
  const Tensor c = at::eye(3, kDouble).slice(0, 0, 2);
  const Tensor w = at::randn({2, lora->dim()}, gen, kDouble);
  auto loss = [&] {
    const Tensor v = lora->conditional_velocity(x, t, c);
    return (w * v).sum() + v.pow(2).sum() / 4;
  };
  const Tensor value = loss();
  ASSERT_TRUE(value.requires_grad());
  std::vector<Tensor> tensors;
  for (const auto& p : adapters) tensors.push_back(p.second);
  const auto grads = torch::autograd::grad({value}, tensors);
  at::NoGradGuard no_grad;
  int checked = 0;  // differences not ~0
  for (const std::string layer : {"down.0.0.conv1", "mid.attention.qkv", "time.0", "condition", "output.conv"}) {
    for (const std::string part : {".lora_a", ".lora_b"}) {
      checked += expect_gradient_matches_differences(loss, adapters, grads, layer + part);
    }
  }
  EXPECT_GT(checked, 20);  // the entries are not all zero: A's gradients too, with B random
}

TEST(UNetLora, IsAFineTuningModeThatSavesAndLoadsAndIsRefusedForOtherBases) {
  auto base = std::make_shared<UNetVelocity>(tiny(), make_linear_schedule(), 8);
  auto model = make_finetuned(base, FineTuneMode::lora, {}, 0, 12, LoraOptions{3, 3.0});
  EXPECT_EQ(model->mode(), FineTuneMode::lora);
  {
    at::NoGradGuard no_grad;
    for (const Tensor& p : model->parameters()) const_cast<Tensor&>(p).normal_(0.0, 0.05);
  }
  const std::string path = temp_path("lora.pt"), base_path = temp_path("lora_base.pt");
  save_velocity(*model, path);
  save_velocity(*base, base_path);
  const LoadedModel loaded = load_velocity(path);
  at::NoGradGuard no_grad;
  const Tensor x = at::randn({2, base->dim()});
  EXPECT_TRUE(at::equal(model->velocity(x, 0.5), loaded.field->velocity(x, 0.5)));
  // The base is stored once: the file is the base's plus the adapters (under 1.5x the base alone here), and the
  // loaded adapted network computes with the loaded base's tensors, not a copy of them.
  EXPECT_LT(std::filesystem::file_size(path), 3 * std::filesystem::file_size(base_path) / 2);
  const auto lft = std::dynamic_pointer_cast<FineTunedVelocity>(loaded.field);
  ASSERT_TRUE(lft);
  const NamedTensors lb = lft->base()->named_parameters(), lt = lft->trainable()->named_parameters();
  ASSERT_GT(lt.size(), lb.size());
  for (size_t i = 0; i < lb.size(); ++i) EXPECT_TRUE(lt[i].second.is_same(lb[i].second)) << lt[i].first;
  EXPECT_EQ(lft->parameters().size(), model->parameters().size());  // the adapters train, the base does not
  for (const auto& [name, w] : lb) EXPECT_FALSE(w.requires_grad()) << name;
  // Adapters on a network other than the file's base (not made by make_finetuned) are stored whole, and load so.
  auto other = std::make_shared<UNetVelocity>(tiny(), make_linear_schedule(), 9);
  const auto odd = std::make_shared<FineTunedVelocity>(other, model->trainable(), FineTuneMode::lora);
  save_velocity(*odd, path);
  EXPECT_GT(std::filesystem::file_size(path), 3 * std::filesystem::file_size(base_path) / 2);
  const LoadedModel odd_loaded = load_velocity(path);
  EXPECT_TRUE(at::equal(odd->velocity(x, 0.5), odd_loaded.field->velocity(x, 0.5)));
  std::remove(path.c_str());
  std::remove(base_path.c_str());
  // Residual mode on a U-Net base trains a U-Net that starts at zero.
  auto residual = make_finetuned(base, FineTuneMode::residual, {16}, 4, 13);
  EXPECT_EQ(residual->trainable()->kind(), "unet");
  EXPECT_TRUE(at::equal(residual->velocity(x, 0.5), base->velocity(x, 0.5)));
  EXPECT_NO_THROW(make_finetuned(base, FineTuneMode::copy, {}, 0, 1));
  // LoRA needs a U-Net, and a network with adapters takes no second set.
  MlpOptions mlp;
  mlp.dim = base->dim();
  mlp.hidden = {8};
  auto mlp_base = std::make_shared<MlpVelocity>(mlp, make_linear_schedule(), 1);
  try {
    make_finetuned(mlp_base, FineTuneMode::lora, {}, 0, 1);
    ADD_FAILURE() << "lora on an mlp base was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("U-Net"), std::string::npos) << e.what();
  }
  EXPECT_THROW(base->with_lora({}, 0)->with_lora({}, 0), Error);
  EXPECT_THROW(base->with_lora(LoraOptions{0, 1.0}, 0), Error);
}

// tilt export of a U-Net, run by LibTorch's TorchScript interpreter (what torch.jit.load does in PyTorch): the
// plain network (with attention and a condition, and without), a LoRA model with trained adapters (merged into
// the exported weights) and a residual U-Net on a U-Net base, at conditions, at the null condition and at
// every time, against tilt's own velocity.
TEST(UNet, ExportsToTorchScriptThatReproducesTheFieldWithAndWithoutAdapters) {
  Generator gen = make_generator(31);
  auto plain = std::make_shared<UNetVelocity>(tiny(0), make_linear_schedule(), 5);
  auto base = std::make_shared<UNetVelocity>(tiny(), make_linear_schedule(), 6);
  auto lora = make_finetuned(base, FineTuneMode::lora, {}, 0, 7, LoraOptions{2, 3.0});
  auto residual = make_finetuned(base, FineTuneMode::residual, {16}, 4, 8);
  {
    at::NoGradGuard no_grad;
    for (const auto& model : {lora, residual}) {
      for (const Tensor& p : model->parameters()) const_cast<Tensor&>(p).normal_(0.0, 0.05, gen);
    }
  }
  const Tensor x = at::randn({5, base->dim()}, gen), t = at::rand({5}, gen);
  const Tensor c = at::randn({5, 3}, gen);
  const std::vector<std::pair<std::string, VelocityFieldPtr>> fields{
      {"plain", plain}, {"base", base}, {"lora", lora}, {"residual", residual}};
  for (const auto& [name, field] : fields) {
    SCOPED_TRACE(name);
    std::istringstream in(export_torchscript(*field));
    torch::jit::Module m = torch::jit::load(in);
    at::NoGradGuard no_grad;
    if (field->condition_dim() == 0) {
      const Tensor v = field->velocity(x, t);
      EXPECT_LT((m.forward({x, t}).toTensor() - v).abs().max().item<double>(), 1e-5 * (1 + v.abs().max().item<double>()));
      continue;
    }
    const Tensor v = field->conditional_velocity(x, t, c), v0 = field->velocity(x, t);
    EXPECT_LT((m.forward({x, t, c}).toTensor() - v).abs().max().item<double>(), 1e-5 * (1 + v.abs().max().item<double>()));
    EXPECT_LT((m.forward({x, t, c10::IValue()}).toTensor() - v0).abs().max().item<double>(),
              1e-5 * (1 + v0.abs().max().item<double>()));
    // A 0-dim time and one condition row for the whole batch.
    const Tensor v1 = field->conditional_velocity(x, at::scalar_tensor(0.3), c.narrow(0, 0, 1));
    EXPECT_LT((m.forward({x, at::scalar_tensor(0.3), c.narrow(0, 0, 1)}).toTensor() - v1).abs().max().item<double>(),
              1e-5 * (1 + v1.abs().max().item<double>()));
  }
  // The adapters matter: the LoRA export is not the base's.
  at::NoGradGuard no_grad;
  EXPECT_GT((lora->conditional_velocity(x, t, c) - base->conditional_velocity(x, t, c)).abs().max().item<double>(), 1e-3);
}

// Flow matching trains the U-Net towards the exact velocity of a Gaussian law on 1 x 4 x 4 images with a
// spatial pattern in its mean and its pixel scales (closed form, E5): the whole pretraining path on an image
// network, against ground truth.
TEST(UNet, FlowMatchingLearnsTheExactFieldOfAGaussianImageLaw) {
  Generator gen = make_generator(21);
  const int64_t d = 16;
  const Tensor mean = at::linspace(-1.0, 1.0, d, kDouble).reshape({1, d}) * at::randn({1, d}, gen, kDouble).sign();
  const Tensor scale = 0.2 + 0.3 * at::rand({d}, gen, kDouble);
  auto law = std::make_shared<GaussianMixture>(at::ones({1}, kDouble), mean, at::diag(scale.pow(2)).unsqueeze(0));
  const GmmVelocity exact(law, make_linear_schedule());
  UNetOptions o = tiny(0);
  o.channels = 1;
  o.height = o.width = 4;
  o.attention = false;
  auto net = std::make_shared<UNetVelocity>(o, make_linear_schedule(), 2);
  auto relative_error = [&] {
    at::NoGradGuard no_grad;
    Generator g = make_generator(5);
    const Tensor x1 = law->sample(2000, g), x0 = at::randn({2000, d}, g, kDouble);
    const Tensor t = 0.05 + 0.9 * at::rand({2000}, g, kDouble);
    const Tensor xt = t.unsqueeze(1) * x1 + (1 - t.unsqueeze(1)) * x0;
    const Tensor v = exact.velocity(xt, t);
    return (net->velocity(xt.to(at::kFloat), t.to(at::kFloat)).to(at::kDouble) - v).pow(2).sum(1).mean().item<double>() /
           v.pow(2).sum(1).mean().item<double>();
  };
  const double before = relative_error();
  FlowMatchingOptions fo;
  fo.batch_size = 128;
  FlowMatching loss(net, [&](int64_t n, Generator& g) { return law->sample(n, g).to(at::kFloat); }, fo);
  TrainerOptions to;
  to.iterations = 400;
  to.adam.lr = 3e-3;
  to.lr_schedule = LrSchedule::cosine;
  to.seed = 3;
  to.progress = false;
  Trainer(loss, to).run();
  const double after = relative_error();
  std::printf("U-Net flow matching on a Gaussian image law: relative error %.3f -> %.4f\n", before, after);
  EXPECT_GT(before, 0.5);
  EXPECT_LT(after, 0.08);  // 0.043 here; 800 iterations reach 0.037
}

// [pretrain] network = "unet": the images' size and the conditions reach the network; keys of the other network
// and sizes the images cannot halve into are refused naming the key.
TEST(UNet, PretrainPlansFromTheConfigAndRefusesWhatDoesNotFit) {
  const std::string path = std::string(TILT_SOURCE_DIR) + "/data/digits/digits.csv.gz";
  const Json data = {{"type", "digits"}, {"path", path}};
  auto plan = [&](const Json& pretrain, bool conditional) {
    Json j = {{"data", data}, {"pretrain", pretrain}};
    if (conditional) j["conditions"] = {{"classes", 10}};
    Config config(j, "test");
    ConfigSection root = config.root();
    return read_pretrain(root);
  };
  const PretrainPlan p = plan({{"network", "unet"}, {"channels", 8}, {"channel_mult", {1, 2, 2}}, {"groups", 4}}, true);
  EXPECT_EQ(p.unet.height, 8);
  EXPECT_EQ(p.unet.width, 8);
  EXPECT_EQ(p.unet.condition_dim, 10);
  const auto model = p.make_model(1);
  EXPECT_EQ(model->kind(), "unet");
  EXPECT_EQ(model->condition_dim(), 10);
  EXPECT_EQ(plan({{"hidden", {8}}}, false).make_model(1)->kind(), "mlp");
  auto refused = [&](const Json& pretrain, const std::string& key) {
    try {
      plan(pretrain, false);
      ADD_FAILURE() << "accepted " << pretrain.dump();
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(key), std::string::npos) << e.what();
    }
  };
  refused({{"network", "unet"}, {"groups", 3}}, "pretrain.groups");
  refused({{"network", "unet"}, {"channel_mult", {1, 1, 1, 1, 1}}}, "pretrain.channel_mult");  // 8 = 2^3 < 2^4
  refused({{"network", "unet"}, {"hidden", {8}}}, "pretrain.hidden");
  refused({{"channels", 8}}, "pretrain.channels");
  refused({{"network", "transformer"}}, "pretrain.network");
  Config mixture(Json{{"data", {{"type", "ring"}, {"components", 4}}}, {"pretrain", {{"network", "unet"}}}}, "test");
  ConfigSection root = mixture.root();
  try {
    read_pretrain(root);
    ADD_FAILURE() << "a U-Net on a mixture was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("pretrain.network"), std::string::npos) << e.what();
  }
}

// [finetune] with a U-Net base: model = "lora" reads its adapters' keys; an MLP residual's keys are refused (the
// residual is a U-Net); the adapters' keys under another model are a note.
TEST(UNetLora, FinetunePlansFromTheConfig) {
  auto base = std::make_shared<UNetVelocity>(tiny(0), make_linear_schedule(), 8);
  auto reward = std::make_shared<LinearReward>(at::ones({base->dim()}, kDouble));
  const FinetunePlan lora = make_finetune_plan({{"model", "lora"}, {"lora_rank", 3}, {"lora_alpha", 1.5}}, *base, reward, 1.0);
  EXPECT_EQ(lora.mode, FineTuneMode::lora);
  EXPECT_EQ(lora.lora.rank, 3);
  EXPECT_EQ(lora.lora.alpha, 1.5);
  const auto model = lora.make_model(base, 1);
  EXPECT_TRUE(std::dynamic_pointer_cast<UNetVelocity>(model->trainable())->has_lora());
  EXPECT_EQ(std::dynamic_pointer_cast<UNetVelocity>(model->trainable())->lora().rank, 3);
  const FinetunePlan copy = make_finetune_plan({{"model", "copy"}, {"lora_rank", 3}}, *base, reward, 1.0);
  ASSERT_EQ(copy.notes.size(), 1u);
  EXPECT_NE(copy.notes[0].find("lora_rank"), std::string::npos);
  try {
    make_finetune_plan({{"hidden", {8}}}, *base, reward, 1.0);
    ADD_FAILURE() << "hidden with a U-Net base was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("finetune.hidden"), std::string::npos) << e.what();
  }
  EXPECT_THROW(make_finetune_plan({{"model", "lora"}, {"lora_rank", 0}}, *base, reward, 1.0), Error);
}

// A U-Net that records the rows and the thread of every call (and fails on demand), to see how velocity_by_rows
// splits a batch.
class RecordingField : public VelocityField {
 public:
  explicit RecordingField(std::shared_ptr<UNetVelocity> net, bool parallel)
      : VelocityField(net->schedule()), net_(std::move(net)), parallel_(parallel) {}
  std::string kind() const override { return "recording"; }
  int64_t dim() const override { return net_->dim(); }
  using VelocityField::velocity;
  Tensor velocity(const Tensor& x, const Tensor& t) const override { return conditional_velocity(x, t, Tensor()); }
  int64_t condition_dim() const override { return net_->condition_dim(); }
  Tensor conditional_velocity(const Tensor& x, const Tensor& t, const Tensor& c) const override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      rows_.push_back(x.size(0));
      threads_.insert(std::this_thread::get_id());
    }
    if (fail_) throw Error("recording field: asked to fail");
    return net_->conditional_velocity(x, t, c);
  }
  std::vector<Tensor> parameters() const override { return net_->parameters(); }
  bool parallel_rows() const override { return parallel_; }
  void reset() {
    rows_.clear();
    threads_.clear();
  }
  std::vector<int64_t> rows() const {
    std::vector<int64_t> r = rows_;
    std::sort(r.begin(), r.end());
    return r;
  }
  size_t threads() const { return threads_.size(); }
  bool fail_ = false;

 private:
  std::shared_ptr<UNetVelocity> net_;
  bool parallel_;
  mutable std::mutex mutex_;
  mutable std::vector<int64_t> rows_;
  mutable std::set<std::thread::id> threads_;
};

// Restores the number of threads when a test ends.
struct ThreadsForTest {
  explicit ThreadsForTest(int n) : before(at::get_num_threads()) { at::set_num_threads(n); }
  ~ThreadsForTest() { at::set_num_threads(before); }
  int before;
};

// velocity_by_rows / vjp_by_rows: a batch split into one block per thread, run on several threads at once, gives
// what one call gives (float64: the same to rounding), conditions per row split with the rows, the caller's grad
// mode reaches the blocks (parameter gradients through a graph built on other threads equal one call's), and an
// error in a block reaches the caller. One thread, or a field that does not allow it, makes one call.
TEST(UNet, RowBlocksOnSeveralThreadsGiveWhatOneCallGives) {
  ThreadsForTest threads(3);
  auto net = std::make_shared<UNetVelocity>(tiny(3), make_linear_schedule(), 5);
  net->cast(kDouble);
  auto field = std::make_shared<RecordingField>(net, true);
  Generator gen = make_generator(3);
  const Tensor x = at::randn({7, net->dim()}, gen, kDouble);
  const Tensor a = at::randn({7, net->dim()}, gen, kDouble);
  const Tensor c = at::eye(3, kDouble).index_select(0, at::tensor({0, 2, 1, 1, 0, 2, 2}, at::kLong));
  auto serial = std::make_shared<RecordingField>(net, false);  // the same network, computed in one call
  for (const double w : {0.0, 1.5}) {
    for (const Tensor& cond : {c, Tensor(c.narrow(0, 1, 1))}) {  // one per row, or one for the batch
      const VelocityFieldPtr bound = bind_condition(serial, cond, w);
      at::NoGradGuard no_grad;
      field->reset();
      const Tensor v = velocity_by_rows(field, cond, w, x, 0.4);
      EXPECT_EQ(field->rows(), (w == 0.0 ? std::vector<int64_t>{2, 2, 3} : std::vector<int64_t>{2, 2, 2, 2, 3, 3}));
      EXPECT_GT(field->threads(), 1u);
      EXPECT_FALSE(v.requires_grad());
      EXPECT_LT((v - bound->velocity(x, 0.4)).abs().max().item<double>(), 1e-12) << w;
      Tensor v_rows, v_one;
      const Tensor g = vjp_by_rows(field, cond, w, x, 0.4, a, &v_rows);
      const Tensor g_one = bound->vjp(x, 0.4, a, &v_one);
      EXPECT_LT((g - g_one).abs().max().item<double>(), 1e-12) << w;
      EXPECT_LT((v_rows - v_one).abs().max().item<double>(), 1e-12) << w;
      EXPECT_LT((vjp_by_rows(field, cond, w, x, 0.4, a) - g_one).abs().max().item<double>(), 1e-12) << w;
    }
  }
  // The graph of the blocks (built on their threads) gives one call's parameter gradients.
  const std::vector<Tensor> params = net->parameters();
  auto grads_of = [&](const Tensor& v) {
    return torch::autograd::grad({(v * a).sum()}, params, {}, /*retain_graph=*/false, /*create_graph=*/false, true);
  };
  const std::vector<Tensor> split = grads_of(velocity_by_rows(field, c, 0.0, x, 0.4));
  const std::vector<Tensor> one = grads_of(bind_condition(serial, c, 0.0)->velocity(x, 0.4));
  ASSERT_EQ(split.size(), one.size());
  for (size_t i = 0; i < one.size(); ++i) {
    ASSERT_EQ(split[i].defined(), one[i].defined()) << i;
    if (one[i].defined()) EXPECT_LT((split[i] - one[i]).abs().max().item<double>(), 1e-11) << i;
  }
  // A failing block is the caller's error.
  field->fail_ = true;
  EXPECT_THROW(velocity_by_rows(field, c, 0.0, x, 0.4), Error);
  field->fail_ = false;
  // One call: a field that does not allow it, one thread, or too few rows for two blocks of two.
  at::NoGradGuard no_grad;
  serial->reset();
  velocity_by_rows(serial, c, 0.0, x, 0.4);
  EXPECT_EQ(serial->rows(), std::vector<int64_t>{7});
  field->reset();
  velocity_by_rows(field, c.narrow(0, 0, 3), 0.0, x.narrow(0, 0, 3), 0.4);
  EXPECT_EQ(field->rows(), std::vector<int64_t>{3});
  at::set_num_threads(1);
  field->reset();
  velocity_by_rows(field, c, 0.0, x, 0.4);
  EXPECT_EQ(field->rows(), std::vector<int64_t>{7});
  // The fine-tuned field allows it where its networks do.
  EXPECT_TRUE(make_finetuned(net, FineTuneMode::lora, {}, 0, 1, LoraOptions{2, 2.0})->parallel_rows());
  EXPECT_FALSE(std::make_shared<FineTunedVelocity>(field, serial, FineTuneMode::copy)->parallel_rows());
}

// A field bound to its conditions splits its own rows where the field allows it, as velocity_by_rows does, with the
// conditions and a time per row split with the rows: what a sampler steps as an ordinary field. The same values and
// VJPs as one call (float64); under autograd its velocity is one call (the same parameter gradients); no blocks
// within blocks when velocity_by_rows runs the bound field.
TEST(UNet, BoundFieldSplitsItsRowsWithTheirConditionsAndTimes) {
  ThreadsForTest threads(3);
  auto net = std::make_shared<UNetVelocity>(tiny(3), make_linear_schedule(), 6);
  net->cast(kDouble);
  auto field = std::make_shared<RecordingField>(net, true);
  auto serial = std::make_shared<RecordingField>(net, false);
  Generator gen = make_generator(4);
  const int64_t B = 12;
  const Tensor x = at::randn({B, net->dim()}, gen, kDouble);
  const Tensor a = at::randn({B, net->dim()}, gen, kDouble);
  const Tensor t = at::rand({B}, gen, kDouble);
  const Tensor c = at::eye(3, kDouble).index_select(0, at::randint(3, {B}, gen, at::kLong));
  for (const double w : {0.0, 2.0}) {
    const VelocityFieldPtr bound = bind_condition(field, c, w), one = bind_condition(serial, c, w);
    EXPECT_FALSE(bound->parallel_rows());  // a caller cannot split the conditions it does not see
    at::NoGradGuard no_grad;
    field->reset();
    const Tensor v = bound->velocity(x, t);  // a time per row (EAM's regression)
    EXPECT_EQ(field->rows(), std::vector<int64_t>(w == 0.0 ? 3 : 6, 4)) << w;
    EXPECT_GT(field->threads(), 1u);
    EXPECT_LT((v - one->velocity(x, t)).abs().max().item<double>(), 1e-12) << w;
    EXPECT_LT((bound->velocity(x, 0.3) - one->velocity(x, 0.3)).abs().max().item<double>(), 1e-12) << w;
    Tensor v_split, v_one;
    const Tensor g = bound->vjp(x, 0.3, a, &v_split);
    EXPECT_LT((g - one->vjp(x, 0.3, a, &v_one)).abs().max().item<double>(), 1e-12) << w;
    EXPECT_LT((v_split - v_one).abs().max().item<double>(), 1e-12) << w;
  }
  // Under autograd: one call, the same parameter gradients.
  const std::vector<Tensor> params = net->parameters();
  auto grads_of = [&](const Tensor& v) {
    return torch::autograd::grad({(v * a).sum()}, params, {}, /*retain_graph=*/false, /*create_graph=*/false, true);
  };
  field->reset();
  const std::vector<Tensor> split = grads_of(bind_condition(field, c, 1.0)->velocity(x, t));
  EXPECT_EQ(field->rows(), std::vector<int64_t>(2, B));
  const std::vector<Tensor> whole = grads_of(bind_condition(serial, c, 1.0)->velocity(x, t));
  for (size_t i = 0; i < whole.size(); ++i) {
    ASSERT_EQ(split[i].defined(), whole[i].defined()) << i;
    if (whole[i].defined()) EXPECT_LT((split[i] - whole[i]).abs().max().item<double>(), 1e-11) << i;
  }
  // velocity_by_rows over a field bound to one condition: its blocks, not blocks within them.
  at::NoGradGuard no_grad;
  field->reset();
  velocity_by_rows(bind_condition(field, c.narrow(0, 0, 1)), Tensor(), 0.0, x, 0.3);
  EXPECT_EQ(field->rows(), std::vector<int64_t>(3, 4));
  field->fail_ = true;
  EXPECT_THROW(bind_condition(field, c)->velocity(x, 0.3), Error);
  // An unconditional field that allows blocks is wrapped for them; one that does not is returned as it is.
  auto net0 = std::make_shared<UNetVelocity>(tiny(0), make_linear_schedule(), 7);
  net0->cast(kDouble);
  auto field0 = std::make_shared<RecordingField>(net0, true), serial0 = std::make_shared<RecordingField>(net0, false);
  EXPECT_EQ(bind_condition(serial0, Tensor()), serial0);
  const Tensor x0 = at::randn({B, net0->dim()}, gen, kDouble);
  const Tensor v0 = bind_condition(field0, Tensor())->velocity(x0, t);
  EXPECT_EQ(field0->rows(), std::vector<int64_t>(3, 4));
  EXPECT_LT((v0 - serial0->velocity(x0, t)).abs().max().item<double>(), 1e-12);
}

// Residual mode over a U-Net: the rollout keeps the base's forward graphs and the lean adjoint's VJPs are backward
// passes through them (tape_activations); the iteration is the one that runs the base again (tape_activations =
// false): the same loss, metrics and gradients in float64, with and without conditions, on several threads.
TEST(UNet, ResidualIterationKeepingTheBaseGraphsIsTheOneRunningItAgain) {
  ThreadsForTest threads(3);
  for (const int64_t dc : {int64_t{0}, int64_t{3}}) {
    auto base = std::make_shared<UNetVelocity>(tiny(dc), make_linear_schedule(), 9);
    base->cast(kDouble);
    const auto model = make_finetuned(base, FineTuneMode::residual, {}, 0, 4);
    {  // a residual that is not zero, so that every part of the iteration counts
      at::NoGradGuard no_grad;
      Generator g = make_generator(5);
      for (const Tensor& p : model->parameters()) p.add_(0.05 * at::randn(p.sizes(), g, kDouble));
    }
    const int64_t d = base->dim();
    auto reward = std::make_shared<QuadraticReward>(0.3 * at::ones({d}, kDouble), 0.2 * at::eye(d, kDouble));
    const int64_t K = 4;
    auto run = [&](bool keep, std::vector<Tensor>* grads, bool* kept) {
      AdjointMatchingOptions o;
      o.num_steps = K;
      o.batch_size = 6;
      o.loss_early_steps = 1;
      o.loss_late_steps = 2;
      o.tape_activations = keep;
      o.clip_factor = 0.0;  // no clipped terms: every one has a gradient
      if (dc > 0) o.conditions = std::make_shared<ConditionSet>(ConditionSet::classes(dc));
      AdjointMatching am(model, reward, make_memoryless_noise(1.0 / K), o);
      *kept = am.keeps_base_forward();
      Generator gen = make_generator(21);
      LossOutput out = am.compute(gen);
      for (const Tensor& p : model->parameters()) p.mutable_grad() = Tensor();
      out.loss.backward();
      for (const Tensor& p : model->parameters()) grads->push_back(p.grad().clone());
      return out;
    };
    std::vector<Tensor> g_keep, g_again;
    bool kept = false, kept_again = true;
    const LossOutput keep = run(true, &g_keep, &kept), again = run(false, &g_again, &kept_again);
    EXPECT_TRUE(kept) << dc;
    EXPECT_FALSE(kept_again) << dc;
    EXPECT_NEAR(keep.loss.item<double>(), again.loss.item<double>(), 1e-10 * std::abs(again.loss.item<double>())) << dc;
    EXPECT_GT(again.loss.item<double>(), 0.0);
    ASSERT_EQ(keep.metrics.size(), again.metrics.size());
    for (size_t i = 0; i < keep.metrics.size(); ++i) {
      EXPECT_EQ(keep.metrics[i].first, again.metrics[i].first);
      EXPECT_NEAR(keep.metrics[i].second, again.metrics[i].second, 1e-9 * (1.0 + std::abs(again.metrics[i].second)))
          << keep.metrics[i].first << " dc " << dc;
    }
    ASSERT_EQ(g_keep.size(), g_again.size());
    double largest = 0.0;
    for (size_t i = 0; i < g_keep.size(); ++i) {
      largest = std::max(largest, g_again[i].abs().max().item<double>());
      EXPECT_LT((g_keep[i] - g_again[i]).abs().max().item<double>(), 1e-10 * (1.0 + g_again[i].abs().max().item<double>()))
          << i << " dc " << dc;
    }
    EXPECT_GT(largest, 0.0);
  }
}

// keep_cpu_memory: a convolution's input gradient, as the U-Net's lean adjoint takes it (8 x 96 x 28 x 28 out, 2.4
// MB), computed again and again, reuses freed memory instead of faulting fresh pages in each time (glibc; elsewhere
// it reports that it is not in force). Without it each call faulted ~1300 pages in on the 2-core VM and took 8x longer.
TEST(CpuMemory, FreedTensorsAreReusedWithoutFaultingPagesAgain) {
#if defined(__GLIBC__)
  const char* choice = std::getenv("TILT_MALLOC");
  if (choice && std::string(choice) == "system") GTEST_SKIP() << "TILT_MALLOC=system";
  ASSERT_TRUE(keep_cpu_memory());
  EXPECT_TRUE(keep_cpu_memory());  // once per process, the same answer
  setenv("TILT_MALLOC", "bogus", 1);  // a value it does not know is an error that names it
  try {
    keep_cpu_memory();
    ADD_FAILURE() << "TILT_MALLOC=bogus was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("TILT_MALLOC must be unset or 'system', got 'bogus'"), std::string::npos)
        << e.what();
  }
  unsetenv("TILT_MALLOC");
  auto faults = [] {
    rusage usage{};
    getrusage(RUSAGE_SELF, &usage);
    return usage.ru_minflt;
  };
  const Tensor g = at::randn({8, 32, 28, 28}), x = at::randn({8, 96, 28, 28}), w = at::randn({32, 96, 3, 3});
  auto input_grad = [&] {
    return std::get<0>(at::convolution_backward(g, x, w, c10::nullopt, {1, 1}, {1, 1}, {1, 1}, false, {0, 0}, 1,
                                                {true, false, false}));
  };
  for (int i = 0; i < 3; ++i) input_grad();
  const long before = faults();
  const int calls = 10;
  for (int i = 0; i < calls; ++i) ASSERT_EQ(input_grad().size(1), 96);
  const long pages = 8 * 96 * 28 * 28 * 4 / 4096;  // of one output
  EXPECT_LT(faults() - before, calls * pages / 4) << "the calls faulted their memory in again";
#else
  EXPECT_FALSE(keep_cpu_memory());
#endif
}

}  // namespace
}  // namespace tilt
