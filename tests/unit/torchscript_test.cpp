// TorchScript interop: scripted bases (velocity, and epsilon / score converted against the exact
// mixture velocity), scripted rewards, fine-tuning copies, model files and the export. The modules
// are written here in TorchScript source (no Python needed); tests/cli/torchscript_test.sh does the
// round trip with Python's torch.jit.
#include "tilt/core/error.h"
#include "tilt/core/fs.h"
#include "tilt/io/model_io.h"
#include "tilt/model/condition.h"
#include "tilt/model/conditional_gmm.h"
#include "tilt/model/finetuned.h"
#include "tilt/model/gmm.h"
#include "tilt/model/mlp.h"
#include "tilt/model/reward.h"
#include "tilt/model/torchscript.h"

#include "../support/checks.h"
#include "../support/helpers.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/jit/api/module.h>
#include <torch/csrc/jit/serialization/import.h>

#include <filesystem>
#include <sstream>

namespace tilt {
namespace {

namespace fs = std::filesystem;
const auto kDouble = at::TensorOptions().dtype(at::kDouble);

using test::TempDir;
using test::error_of;
using test::expect_contains;

torch::jit::Module make_module(const std::string& source, int64_t dim = 0) {
  torch::jit::Module m("__torch__.TestModule");
  if (dim > 0) m.register_attribute("dim", c10::IntType::get(), dim);
  m.define(source);
  return m;
}

std::string save(torch::jit::Module& m, const std::string& path) {
  m.save(path);
  return path;
}

// alpha, beta of each schedule written out independently of src/ (docs/equations.md, E2-E4), as TorchScript.
std::string schedule_lines(const std::string& name) {
  if (name == "linear") return "        alpha = t\n        beta = 1.0 - t\n";
  if (name == "cosine") return "        alpha = torch.sin(t * 1.5707963267948966)\n        beta = torch.cos(t * 1.5707963267948966)\n";
  // vp with beta_min = 0.1, beta_max = 20: abar = exp(-(0.1 s + 9.95 s^2)), s = 1 - t.
  return "        s = 1.0 - t\n        abar = torch.exp(-(0.1 * s + 9.95 * s * s))\n"
         "        alpha = torch.sqrt(abar)\n        beta = torch.sqrt(1.0 - abar)\n";
}

// A module computing the exact score (or noise prediction eps = -beta s) of the reference-flow
// marginal of an isotropic Gaussian mixture: p_t = sum_k w_k N(alpha mu_k, (alpha^2 s_k^2 + beta^2) I).
torch::jit::Module exact_mixture_module(const GaussianMixture& q, const std::string& schedule, bool epsilon) {
  torch::jit::Module m("__torch__.ExactMixture");
  m.register_attribute("dim", c10::IntType::get(), q.dim());
  m.register_buffer("log_w", q.weights().log());
  m.register_buffer("mu", q.means());
  m.register_buffer("var", q.covariances().diagonal(0, 1, 2).select(1, 0).contiguous());  // s_k^2
  m.define("def forward(self, x, t):\n"
           "        t = t.unsqueeze(1)\n" +
           schedule_lines(schedule) +
           "        c = alpha * alpha * self.var.unsqueeze(0) + beta * beta\n"   // [B, K]
           "        diff = x.unsqueeze(1) - alpha.unsqueeze(2) * self.mu.unsqueeze(0)\n"  // [B, K, d]
           "        d = x.size(1)\n"
           "        logp = self.log_w.unsqueeze(0) - 0.5 * (diff * diff).sum(2) / c - 0.5 * d * torch.log(c)\n"
           "        gamma = torch.softmax(logp, 1)\n"
           "        score = -(gamma.unsqueeze(2) * diff / c.unsqueeze(2)).sum(1)\n" +
           (epsilon ? "        return -beta * score\n" : "        return score\n"));
  return m;
}

std::shared_ptr<GaussianMixture> isotropic_mixture() {
  return std::make_shared<GaussianMixture>(at::tensor({1.0, 2.0, 1.5}, kDouble),
                                           at::tensor({2.0, 0.0, -1.0, 1.5, 0.5, -2.0}, kDouble).reshape({3, 2}),
                                           at::tensor({0.25, 0.64, 0.36}, kDouble).reshape({3, 1, 1}) *
                                               at::eye(2, kDouble).unsqueeze(0));
}

TEST(TorchScript, LoadsVelocityModuleAndChecksIt) {
  TempDir dir;
  auto m = make_module("def forward(self, x, t):\n    return x * (1.0 - t.unsqueeze(1)) + 2.0\n", 3);
  const std::string path = save(m, dir.file("v.ts"));
  auto field = TorchScriptVelocity::load(path, make_linear_schedule());
  EXPECT_EQ(field->dim(), 3);
  EXPECT_EQ(field->kind(), "torchscript");
  Generator gen = make_generator(0);
  const Tensor x = at::randn({5, 3}, gen);
  const Tensor t = at::rand({5}, gen);
  EXPECT_TRUE(field->velocity(x, t).allclose(x * (1 - t.unsqueeze(1)) + 2.0));
  // A 0-dim time and a float64 x (cast to the module's float32 and back).
  EXPECT_TRUE(field->velocity(x.to(at::kDouble), 0.5).allclose((x * 0.5 + 2.0).to(at::kDouble), 1e-6, 1e-6));
  EXPECT_EQ(field->velocity(x.to(at::kDouble), 0.5).scalar_type(), at::kDouble);
  // Gradients flow through the module (autograd VJP = the exact (1 - t) a).
  const Tensor a = at::randn({5, 3}, gen);
  EXPECT_TRUE(field->vjp(x, 0.25, a).allclose(0.75 * a, 1e-6, 1e-6));
  // dim given and agreeing; disagreeing.
  TorchScriptOptions o;
  o.dim = 3;
  EXPECT_EQ(TorchScriptVelocity::load(path, make_linear_schedule(), o)->dim(), 3);
  o.dim = 4;
  expect_contains(error_of([&] { TorchScriptVelocity::load(path, make_linear_schedule(), o); }),
                  "has dim = 3 but dimension 4 was given");
}

TEST(TorchScript, LoadErrorsNameTheFileAndTheProblem) {
  TempDir dir;
  const auto load = [&](const std::string& path, int64_t dim = 0) {
    TorchScriptOptions o;
    o.dim = dim;
    return error_of([&] { TorchScriptVelocity::load(path, make_linear_schedule(), o); });
  };
  expect_contains(load(dir.file("absent.ts")), "cannot read TorchScript model '" + dir.file("absent.ts") + "': no such file");
  atomic_write(dir.file("junk.ts"), "not a zip archive");
  expect_contains(load(dir.file("junk.ts")), "cannot read TorchScript model '" + dir.file("junk.ts") + "': not a TorchScript archive");
  auto one_arg = make_module("def forward(self, x):\n    return x\n", 2);
  expect_contains(load(save(one_arg, dir.file("one.ts"))), "must have forward(x, t) taking tensors, but its signature is forward(");
  auto int_t = make_module("def forward(self, x, t: int):\n    return x\n", 2);
  expect_contains(load(save(int_t, dir.file("int.ts"))), "must have forward(x, t) taking tensors");
  auto no_dim = make_module("def forward(self, x, t):\n    return x\n");
  expect_contains(load(save(no_dim, dir.file("nodim.ts"))), "the data dimension is unknown; give it ([base] dim = d)");
  EXPECT_EQ(TorchScriptVelocity::load(dir.file("nodim.ts"), make_linear_schedule(), {Prediction::velocity, 2})->dim(), 2);
  auto wrong = make_module("def forward(self, x, t):\n    return x[:, :1]\n", 2);
  expect_contains(load(save(wrong, dir.file("wrong.ts"))),
                  "'" + dir.file("wrong.ts") + "': forward(x [2, 2], t [2]) must return [2, 2] (the velocity), got [2, 1]");
  auto tuple = make_module("def forward(self, x, t):\n    return (x, t)\n", 2);
  expect_contains(load(save(tuple, dir.file("tuple.ts"))), "forward must return a tensor, got Tuple");
  // x @ x works for [2, 2] but fails for [2, 3]: the probe forward names the failure. With d = 2 the probe
  // works on 2 rows and fails on row 0 alone ([1, 2] x [1, 2]): a module that mixes rows, refused as one.
  auto mm = make_module("def forward(self, x, t):\n    return torch.mm(x, x)\n");
  save(mm, dir.file("mm.ts"));
  expect_contains(load(dir.file("mm.ts"), 3), "'" + dir.file("mm.ts") + "': forward failed");
  expect_contains(load(dir.file("mm.ts"), 2), "forward failed on row 0 alone after working on 2 rows");
  // One that runs on any batch but mixes rows (a mean over the batch) is refused by the same probe.
  auto centred = make_module("def forward(self, x, t):\n    return x - x.mean(0, keepdim=True)\n", 2);
  expect_contains(load(save(centred, dir.file("centred.ts"))),
                  "row 0 of forward(x [2, 2], t [2]) differs from the same call on row 0 alone");
}

TEST(TorchScript, EpsilonAndScoreConvertToTheExactMixtureVelocity) {
  // A module computing the exact score / noise of a mixture's marginal p_t, converted by tilt
  // (v = kappa x + eta s, eps = -beta s), against the closed-form mixture velocity of gmm.cpp.
  auto q = isotropic_mixture();
  TempDir dir;
  for (const std::string schedule_name : {"linear", "cosine", "vp"}) {
    const SchedulePtr schedule = make_schedule(schedule_name);
    const GmmVelocity exact(q, schedule);
    for (const bool epsilon : {true, false}) {
      auto m = exact_mixture_module(*q, schedule_name, epsilon);
      TorchScriptOptions o;
      o.prediction = epsilon ? Prediction::epsilon : Prediction::score;
      auto field = TorchScriptVelocity::load(save(m, dir.file("m.ts")), schedule, o);
      Generator gen = make_generator(3);
      const Tensor x = 2.0 * at::randn({64, 2}, gen, kDouble);
      for (double t : {0.01, 0.1, 0.4, 0.7, 0.95}) {
        const Tensor v = field->velocity(x, t);
        const Tensor v_exact = exact.velocity(x, t);
        EXPECT_LT((v - v_exact).abs().max().item<double>(), 1e-8 * (1.0 + v_exact.abs().max().item<double>()))
            << schedule_name << (epsilon ? " epsilon" : " score") << " t=" << t;
      }
      // t = 0, where kappa is infinite for linear and cosine, gives the (finite) value at t_min.
      const Tensor v0 = field->velocity(x, 0.0);
      EXPECT_TRUE(v0.isfinite().all().item<bool>()) << schedule_name;
      EXPECT_LT((v0 - exact.velocity(x, 1e-3)).abs().max().item<double>(), 1e-8) << schedule_name;
    }
  }
}

TEST(TorchScript, RewardValueAndAutogradGradient) {
  TempDir dir;
  auto m = make_module("def forward(self, x):\n    d = x - torch.tensor([1.0, -0.5])\n    return -0.5 * (d * d * torch.tensor([1.0, 3.0])).sum(1)\n");
  const std::string path = save(m, dir.file("r.ts"));
  TorchScriptReward reward(path, 2);
  QuadraticReward exact(at::tensor({1.0, -0.5}, kDouble), at::diag(at::tensor({1.0, 3.0}, kDouble)));
  Generator gen = make_generator(4);
  const Tensor x = at::randn({7, 2}, gen);
  EXPECT_TRUE(reward.value(x).allclose(exact.value(x.to(at::kDouble)).to(at::kFloat), 1e-5, 1e-5));
  EXPECT_TRUE(reward.grad(x).allclose(exact.grad(x.to(at::kDouble)).to(at::kFloat), 1e-5, 1e-5));
  {
    at::NoGradGuard no_grad;  // the gradient is taken even where gradients are off
    EXPECT_TRUE(reward.grad(x).allclose(exact.grad(x.to(at::kDouble)).to(at::kFloat), 1e-5, 1e-5));
  }
  EXPECT_FALSE(exact_tilt(reward, *isotropic_mixture(), 1.0).has_value());
  auto column = make_module("def forward(self, x):\n    return x.sum(1, keepdim=True)\n");
  expect_contains(error_of([&] { TorchScriptReward(save(column, dir.file("c.ts")), 2); }),
                  "forward(x [2, 2]) must return r of shape [2], got [2, 1]");
  expect_contains(error_of([&] { TorchScriptReward(dir.file("absent.ts"), 2); }), "cannot read TorchScript reward");
  auto two_args = make_module("def forward(self, x, t):\n    return x.sum(1)\n");
  expect_contains(error_of([&] { TorchScriptReward(save(two_args, dir.file("t.ts")), 2); }), "must have forward(x)");
}

// A small scripted network v(x, t) = W2 silu(W1 [x, t] + b1) + b2 with trainable parameters.
torch::jit::Module scripted_network(int64_t dim, uint64_t seed) {
  Generator gen = make_generator(seed);
  torch::jit::Module m("__torch__.Net");
  m.register_attribute("dim", c10::IntType::get(), dim);
  m.register_parameter("w1", 0.5 * at::randn({16, dim + 1}, gen), false);
  m.register_parameter("b1", 0.1 * at::randn({16}, gen), false);
  m.register_parameter("w2", 0.5 * at::randn({dim, 16}, gen), false);
  m.register_parameter("b2", at::zeros({dim}), false);
  m.define("def forward(self, x, t):\n"
           "    h = torch.silu(torch.linear(torch.cat([x, t.unsqueeze(1)], 1), self.w1, self.b1))\n"
           "    return torch.linear(h, self.w2, self.b2)\n");
  return m;
}

TEST(TorchScript, CopyModeTrainsADeepCopyAndLeavesTheBase) {
  TempDir dir;
  auto net = scripted_network(2, 5);
  auto base = TorchScriptVelocity::load(save(net, dir.file("n.ts")), make_linear_schedule());
  EXPECT_TRUE(base->parameters().empty());  // loaded frozen
  auto ft = make_finetuned(base, FineTuneMode::copy, {8}, 4, 0);
  const auto params = ft->parameters();
  ASSERT_EQ(params.size(), 4u);
  Generator gen = make_generator(6);
  const Tensor x = at::randn({9, 2}, gen);
  const Tensor t = at::rand({9}, gen);
  const Tensor before = base->velocity(x, t).detach();
  EXPECT_TRUE(ft->velocity(x, t).allclose(before));
  // One gradient step on the copy: every parameter is a leaf that gets a gradient.
  const Tensor loss = ft->velocity(x, t).pow(2).sum();
  const auto grads = torch::autograd::grad({loss}, params);
  {
    at::NoGradGuard no_grad;
    for (size_t i = 0; i < params.size(); ++i) {
      EXPECT_TRUE(params[i].is_leaf());
      ASSERT_TRUE(grads[i].defined());
      params[i].sub_(0.1 * grads[i]);
    }
  }
  EXPECT_GT((ft->velocity(x, t) - before).abs().max().item<double>(), 1e-3);
  EXPECT_TRUE(base->velocity(x, t).equal(before));  // the base did not move
  EXPECT_TRUE(ft->delta(x, t, before).allclose(ft->velocity(x, t) - before));
}

TEST(TorchScript, ModelFilesEmbedTheArchiveAndLoadBack) {
  TempDir dir;
  auto q = isotropic_mixture();
  auto m = exact_mixture_module(*q, "cosine", /*epsilon=*/true);
  TorchScriptOptions o;
  o.prediction = Prediction::epsilon;
  o.t_min = 0.01;
  auto base = TorchScriptVelocity::load(save(m, dir.file("eps.ts")), make_cosine_schedule(), o);
  Generator gen = make_generator(8);
  const Tensor x = at::randn({6, 2}, gen, kDouble);
  const Tensor t = at::rand({6}, gen, kDouble);
  auto net = scripted_network(2, 9);
  auto net_field = TorchScriptVelocity::load(save(net, dir.file("n.ts")), make_cosine_schedule());
  for (FineTuneMode mode : {FineTuneMode::residual, FineTuneMode::copy}) {
    // residual: over the epsilon-predicting base; copy: of the scripted network.
    const VelocityFieldPtr net_base = mode == FineTuneMode::residual ? VelocityFieldPtr(base) : VelocityFieldPtr(net_field);
    auto ft = make_finetuned(net_base, mode, {8, 8}, 4, 1);
    {
      at::NoGradGuard no_grad;
      for (auto& p : ft->parameters()) p.add_(0.05 * at::randn(p.sizes(), gen));  // "trained"
    }
    const Tensor xf = x.to(at::kFloat), tf = t.to(at::kFloat);
    const Tensor v = ft->velocity(xf, tf).detach();
    EXPECT_GT((v - net_base->velocity(xf, tf)).abs().max().item<double>(), 1e-3);
    save_velocity(*ft, dir.file("ft.pt"));
    // The original .ts file is not needed any more.
    fs::remove(dir.file("eps.ts"));
    fs::remove(dir.file("n.ts"));
    const LoadedModel loaded = load_velocity(dir.file("ft.pt"));
    EXPECT_EQ(loaded.field->schedule()->name(), "cosine");
    EXPECT_TRUE(loaded.field->velocity(xf, tf).allclose(v, 1e-6, 1e-6)) << to_string(mode);
    auto lft = std::dynamic_pointer_cast<FineTunedVelocity>(loaded.field);
    ASSERT_TRUE(lft);
    EXPECT_EQ(lft->base()->kind(), "torchscript");
    EXPECT_TRUE(lft->base()->parameters().empty());
    EXPECT_EQ(lft->parameters().size(), ft->parameters().size());
    if (mode == FineTuneMode::residual) {
      auto b = std::dynamic_pointer_cast<TorchScriptVelocity>(lft->base());
      EXPECT_EQ(b->options().prediction, Prediction::epsilon);
      EXPECT_DOUBLE_EQ(b->options().t_min, 0.01);
    }
  }
}

// Runs the exported archive in LibTorch's TorchScript interpreter (Python does the same in
// tests/cli/torchscript_test.sh).
Tensor run_export(const VelocityField& field, const Tensor& x, const Tensor& t) {
  std::istringstream in(export_torchscript(field));
  torch::jit::Module m = torch::jit::load(in);
  EXPECT_EQ(m.attr("dim").toInt(), field.dim());
  at::NoGradGuard no_grad;
  return m.forward({x, t}).toTensor();
}

TEST(TorchScript, ExportReproducesTheVelocity) {
  Generator gen = make_generator(10);
  const Tensor x = at::randn({12, 3}, gen);
  const Tensor t = at::rand({12}, gen);
  MlpOptions mo;
  mo.dim = 3;
  mo.hidden = {16, 8};
  mo.time_features = 6;
  for (const auto& schedule : {make_linear_schedule(), make_vp_schedule(0.2, 15.0)}) {
    auto mlp = std::make_shared<MlpVelocity>(mo, schedule, 11);
    EXPECT_TRUE(run_export(*mlp, x, t).allclose(mlp->velocity(x, t), 1e-6, 1e-6));
    mo.time_features = 0;
    auto mlp0 = std::make_shared<MlpVelocity>(mo, schedule, 12);
    EXPECT_TRUE(run_export(*mlp0, x, t).allclose(mlp0->velocity(x, t), 1e-6, 1e-6));
    mo.time_features = 6;
    // A fine-tuned pretrained network, residual (with a non-zero residual) and copy.
    for (FineTuneMode mode : {FineTuneMode::residual, FineTuneMode::copy}) {
      auto ft = make_finetuned(mlp, mode, {8}, 4, 13);
      {
        at::NoGradGuard no_grad;
        for (auto& p : ft->parameters()) p.add_(0.1 * at::randn(p.sizes(), gen));
      }
      const Tensor v = ft->velocity(x, t).detach();
      EXPECT_TRUE(run_export(*ft, x, t).allclose(v, 1e-5, 1e-5)) << to_string(mode);
      EXPECT_TRUE(run_export(*ft, x, at::scalar_tensor(0.3)).allclose(ft->velocity(x, 0.3).detach(), 1e-5, 1e-5));
    }
  }
  // Scripted bases with each prediction and schedule, fine-tuned with a residual.
  TempDir dir;
  auto q = isotropic_mixture();
  const Tensor x2 = at::randn({12, 2}, gen);
  const Tensor t2 = at::cat({at::zeros({1}), at::rand({11}, gen)});  // t = 0 (the clamp) included
  for (const std::string schedule_name : {"linear", "cosine", "vp"}) {
    for (const Prediction p : {Prediction::epsilon, Prediction::score}) {
      auto m = exact_mixture_module(*q, schedule_name, p == Prediction::epsilon);
      TorchScriptOptions o;
      o.prediction = p;
      auto base = TorchScriptVelocity::load(save(m, dir.file("m.ts")), make_schedule(schedule_name), o);
      auto ft = make_finetuned(base, FineTuneMode::residual, {8}, 4, 14);
      {
        at::NoGradGuard no_grad;
        for (auto& param : ft->parameters()) param.add_(0.1 * at::randn(param.sizes(), gen));
      }
      const Tensor v = ft->velocity(x2, t2).detach();
      const Tensor got = run_export(*ft, x2, t2);
      EXPECT_LT((got - v).abs().max().item<double>(), 1e-5 * (1 + v.abs().max().item<double>()))
          << schedule_name << " " << to_string(p);
    }
  }
  // The exact mixture velocity is refused with a clear message.
  GmmVelocity gmm(q, make_linear_schedule());
  expect_contains(error_of([&] { export_torchscript(gmm); }),
                  "export: the exact Gaussian-mixture velocity has no TorchScript form in tilt (not supported)");
}


// ---------------------------------------------------------------------------------------------
// Conditional modules: forward(x, t, c) and forward(x, c)

// v(x, t | c) = tanh(x) (1 - t) (1 + sum c) + c A, and for c = None tanh(x) (1 - t), with A [dc, d].
// `optional`: c is Optional[Tensor] (a null condition); otherwise a plain Tensor (none).
torch::jit::Module conditional_module(const Tensor& A, bool optional, bool with_attribute = true) {
  torch::jit::Module m("__torch__.Conditional");
  m.register_attribute("dim", c10::IntType::get(), A.size(1));
  if (with_attribute) m.register_attribute("condition_dim", c10::IntType::get(), A.size(0));
  m.register_parameter("A", A, false);  // a parameter: copy mode can train it
  m.define(std::string("def forward(self, x, t, c") + (optional ? ": Optional[Tensor]" : "") + "):\n" +
           "    base = torch.tanh(x) * (1.0 - t.unsqueeze(1))\n" +
           (optional ? "    if c is None:\n        return base\n" : "") +
           "    return base * (1.0 + c.sum(1, keepdim=True)) + torch.mm(c, self.A)\n");
  return m;
}

Tensor conditional_closed_form(const Tensor& x, const Tensor& t, const Tensor& c, const Tensor& A) {
  const Tensor base = at::tanh(x) * (1.0 - t.unsqueeze(1));
  if (!c.defined()) return base;
  return base * (1.0 + c.sum(1, true)) + at::mm(c, A);
}

TEST(TorchScript, ConditionalBaseIsForwardXTC) {
  TempDir dir;
  Generator gen = make_generator(20);
  const Tensor A = at::randn({2, 3}, gen);
  auto m = conditional_module(A, /*optional=*/true);
  auto field = TorchScriptVelocity::load(save(m, dir.file("c.ts")), make_linear_schedule());
  EXPECT_EQ(field->dim(), 3);
  EXPECT_EQ(field->condition_dim(), 2);
  EXPECT_TRUE(field->has_null_condition());
  const Tensor x = at::randn({6, 3}, gen), t = at::rand({6}, gen), c = at::randn({6, 2}, gen);
  EXPECT_TRUE(field->conditional_velocity(x, t, c).allclose(conditional_closed_form(x, t, c, A), 1e-6, 1e-6));
  // One condition for the batch ([1, dc]) is every row's.
  const Tensor c1 = c.narrow(0, 0, 1);
  EXPECT_TRUE(field->conditional_velocity(x, t, c1).allclose(conditional_closed_form(x, t, c1.expand({6, 2}), A), 1e-6, 1e-6));
  // The null condition: forward(x, t, None).
  EXPECT_TRUE(field->velocity(x, t).allclose(conditional_closed_form(x, t, Tensor(), A), 1e-6, 1e-6));
  // The VJP at c by autograd against the closed form (dv/dx)^T a = a (1 - tanh^2 x)(1 - t)(1 + sum c).
  const Tensor a = at::randn({6, 3}, gen);
  Tensor v_out;
  const Tensor g = field->conditional_vjp(x, 0.3, c, a, &v_out);
  EXPECT_TRUE(g.allclose(a * (1.0 - at::tanh(x).pow(2)) * 0.7 * (1.0 + c.sum(1, true)), 1e-5, 1e-5));
  EXPECT_TRUE(v_out.allclose(conditional_closed_form(x, at::full({6}, 0.3), c, A), 1e-6, 1e-6));
  // Guidance through bind_condition: (1 + w) v(c) - w v(null).
  const Tensor guided = bind_condition(field, c, 2.0)->velocity(x, t);
  EXPECT_TRUE(guided.allclose(3.0 * conditional_closed_form(x, t, c, A) - 2.0 * conditional_closed_form(x, t, Tensor(), A),
                              1e-5, 1e-5));
  // A deep copy (copy mode) keeps the condition.
  auto copy = std::dynamic_pointer_cast<TorchScriptVelocity>(field->clone());
  ASSERT_TRUE(copy);
  EXPECT_EQ(copy->condition_dim(), 2);
  EXPECT_TRUE(copy->has_null_condition());
  EXPECT_TRUE(copy->conditional_velocity(x, t, c).allclose(field->conditional_velocity(x, t, c)));
  auto ft = make_finetuned(field, FineTuneMode::copy, {8}, 4, 0);
  EXPECT_EQ(ft->condition_dim(), 2);
  EXPECT_TRUE(ft->conditional_velocity(x, t, c).allclose(field->conditional_velocity(x, t, c)));
  // Conditions of the wrong size name the file.
  const std::string msg = error_of([&] { field->conditional_velocity(x, t, at::zeros({6, 3})); });
  expect_contains(msg, "TorchScript model '" + dir.file("c.ts") + "': conditions must be [6, 2] or [1, 2], got [6, 3]");
}

TEST(TorchScript, ConditionalBaseWithoutANullConditionAndLoadErrors) {
  TempDir dir;
  Generator gen = make_generator(21);
  const Tensor A = at::randn({2, 3}, gen);
  auto plain = conditional_module(A, /*optional=*/false);
  const std::string path = save(plain, dir.file("plain.ts"));
  auto field = TorchScriptVelocity::load(path, make_linear_schedule());
  EXPECT_EQ(field->condition_dim(), 2);
  EXPECT_FALSE(field->has_null_condition());
  const Tensor x = at::randn({4, 3}, gen), t = at::rand({4}, gen), c = at::randn({4, 2}, gen);
  EXPECT_TRUE(field->conditional_velocity(x, t, c).allclose(conditional_closed_form(x, t, c, A), 1e-6, 1e-6));
  expect_contains(error_of([&] { field->velocity(x, t); }), "TorchScript model '" + path + "' has no null condition");
  expect_contains(error_of([&] { bind_condition(field, c, 1.0)->velocity(x, t); }), "has no null condition");
  // The size of c: the attribute, or given; neither is an error, and so is a disagreement.
  auto no_attr = conditional_module(A, true, /*with_attribute=*/false);
  const std::string no_attr_path = save(no_attr, dir.file("noattr.ts"));
  expect_contains(error_of([&] { TorchScriptVelocity::load(no_attr_path, make_linear_schedule()); }),
                  "its forward(x, t, c) takes a condition of unknown size; give the module an integer attribute `condition_dim`");
  TorchScriptOptions o;
  o.condition_dim = 2;
  EXPECT_EQ(TorchScriptVelocity::load(no_attr_path, make_linear_schedule(), o)->condition_dim(), 2);
  o.condition_dim = 3;
  expect_contains(error_of([&] { TorchScriptVelocity::load(path, make_linear_schedule(), o); }),
                  "has condition_dim = 2 but 3 was given");
  // An unconditional module: a size given for it, and conditions passed to it, are errors.
  auto uncond = make_module("def forward(self, x, t):\n    return x\n", 3);
  const std::string uncond_path = save(uncond, dir.file("u.ts"));
  expect_contains(error_of([&] { TorchScriptVelocity::load(uncond_path, make_linear_schedule(), o); }),
                  "condition_dim = 3 was given, but its forward takes no condition c");
  auto u = TorchScriptVelocity::load(uncond_path, make_linear_schedule());
  EXPECT_EQ(u->condition_dim(), 0);
  expect_contains(error_of([&] { u->conditional_velocity(x, t, c); }), "takes no condition");
  // forward(x, t, c: int) and four arguments are refused, naming the signature.
  auto bad = make_module("def forward(self, x, t, c: int):\n    return x\n", 3);
  expect_contains(error_of([&] { TorchScriptVelocity::load(save(bad, dir.file("b.ts")), make_linear_schedule()); }),
                  "must have forward(x, t) taking tensors, but its signature is forward(__torch__.TestModule self, "
                  "Tensor x, Tensor t, int c) -> Tensor (a conditional model's is forward(x, t, c), c a Tensor or "
                  "Optional[Tensor])");
  // A module whose Optional c fails on None is caught on load.
  auto none_fails = make_module("def forward(self, x, t, c: Optional[Tensor]):\n    assert c is not None\n    return x + c.sum(1, keepdim=True)\n", 3);
  none_fails.register_attribute("condition_dim", c10::IntType::get(), 2);
  expect_contains(error_of([&] { TorchScriptVelocity::load(save(none_fails, dir.file("n.ts")), make_linear_schedule()); }),
                  "(called with c = None, the null condition, since its c is Optional)");
}

TEST(TorchScript, ConditionalEpsilonModulesConvertWithTheCondition) {
  // A conditional noise prediction converts to the exact velocity of the conditional mixture, at c
  // per row and for the batch, with every schedule: eps(x, t | c) of the mixture whose means move by c
  // (M = I) is the unconditional exact module's at x - alpha_t c.
  auto q = isotropic_mixture();
  TempDir dir;
  for (const std::string schedule_name : {"linear", "cosine", "vp"}) {
    const SchedulePtr schedule = make_schedule(schedule_name);
    const ConditionalGmmVelocity exact(q, at::eye(2, kDouble), schedule);
    torch::jit::Module m("__torch__.ConditionalExact");
    m.register_attribute("dim", c10::IntType::get(), 2);
    m.register_attribute("condition_dim", c10::IntType::get(), 2);
    m.register_module("inner", exact_mixture_module(*q, schedule_name, /*epsilon=*/true));
    m.define("def forward(self, x, t, c):\n"
             "        t = t.unsqueeze(1)\n" +
             schedule_lines(schedule_name) +
             "        return self.inner.forward(x - alpha * c, t.squeeze(1))\n");
    TorchScriptOptions o;
    o.prediction = Prediction::epsilon;
    auto field = TorchScriptVelocity::load(save(m, dir.file("m.ts")), schedule, o);
    Generator gen = make_generator(22);
    const Tensor x = 2.0 * at::randn({32, 2}, gen, kDouble), c = at::randn({32, 2}, gen, kDouble);
    for (double t : {0.05, 0.5, 0.9}) {
      const Tensor tt = at::full({32}, t, kDouble);
      const Tensor v = field->conditional_velocity(x, tt, c);
      const Tensor v_exact = exact.conditional_velocity(x, tt, c);
      EXPECT_LT((v - v_exact).abs().max().item<double>(), 1e-8 * (1.0 + v_exact.abs().max().item<double>()))
          << schedule_name << " t=" << t;
      const Tensor c1 = c.narrow(0, 3, 1);
      EXPECT_LT((field->conditional_velocity(x, tt, c1) - exact.conditional_velocity(x, tt, c1)).abs().max().item<double>(),
                1e-8 * (1.0 + v_exact.abs().max().item<double>()));
    }
  }
}

TEST(TorchScript, ConditionalRewardIsForwardXC) {
  TempDir dir;
  // r(x, c) = -1/2 |x - c|^2 (c a plain Tensor: no null condition), grad = -(x - c).
  auto plain = make_module("def forward(self, x, c):\n    d = x - c\n    return -0.5 * (d * d).sum(1)\n");
  plain.register_attribute("condition_dim", c10::IntType::get(), 2);
  const std::string path = save(plain, dir.file("r.ts"));
  TorchScriptReward reward(path, 2);
  EXPECT_EQ(reward.condition_dim(), 2);
  Generator gen = make_generator(23);
  const Tensor x = at::randn({7, 2}, gen), c = at::randn({7, 2}, gen);
  EXPECT_TRUE(reward.conditional_value(x, c).allclose(-0.5 * (x - c).pow(2).sum(1), 1e-6, 1e-6));
  EXPECT_TRUE(reward.conditional_grad(x, c).allclose(-(x - c), 1e-6, 1e-6));
  {
    at::NoGradGuard no_grad;
    EXPECT_TRUE(reward.conditional_grad(x, c.narrow(0, 2, 1)).allclose(-(x - c.narrow(0, 2, 1)), 1e-6, 1e-6));
  }
  // Bound to conditions it is an ordinary reward.
  const RewardPtr shared = std::make_shared<TorchScriptReward>(path, 2);
  EXPECT_TRUE(bind_condition(shared, c)->grad(x).allclose(-(x - c), 1e-6, 1e-6));
  expect_contains(error_of([&] { reward.value(x); }), "TorchScript reward '" + path + "' has no null condition");
  // With an Optional c, None is the null condition.
  auto optional = make_module(
      "def forward(self, x, c: Optional[Tensor]):\n"
      "    if c is None:\n        return -0.5 * (x * x).sum(1)\n"
      "    d = x - c\n    return -0.5 * (d * d).sum(1)\n");
  optional.register_attribute("condition_dim", c10::IntType::get(), 2);
  TorchScriptReward nullable(save(optional, dir.file("o.ts")), 2);
  EXPECT_TRUE(nullable.value(x).allclose(-0.5 * x.pow(2).sum(1), 1e-6, 1e-6));
  EXPECT_TRUE(nullable.grad(x).allclose(-x, 1e-6, 1e-6));
  EXPECT_TRUE(nullable.conditional_grad(x, c).allclose(-(x - c), 1e-6, 1e-6));
  // Without a condition size, forward(x, c) reads as a base's forward(x, t) given as the reward.
  auto no_attr = make_module("def forward(self, x, c):\n    return (x * c).sum(1)\n");
  const std::string no_attr_path = save(no_attr, dir.file("n.ts"));
  expect_contains(error_of([&] { TorchScriptReward(no_attr_path, 2); }), "must have forward(x) taking tensors");
  EXPECT_EQ(TorchScriptReward(no_attr_path, 2, 2).condition_dim(), 2);
  expect_contains(error_of([&] { TorchScriptReward(path, 2, 3); }), "has condition_dim = 2 but 3 was given");
  // A reward that ignores x where c is given has no gradient: refused on load.
  auto constant = make_module("def forward(self, x, c):\n    return c.sum(1)\n");
  constant.register_attribute("condition_dim", c10::IntType::get(), 2);
  expect_contains(error_of([&] { TorchScriptReward(save(constant, dir.file("k.ts")), 2); }),
                  "its output has no gradient with respect to x");
}

// The exported module of a conditional field, run at c (undefined: None, the null condition).
Tensor run_conditional_export(const std::string& bytes, const Tensor& x, const Tensor& t, const Tensor& c) {
  std::istringstream in(bytes);
  torch::jit::Module m = torch::jit::load(in);
  at::NoGradGuard no_grad;
  if (!c.defined()) return m.forward({x, t}).toTensor();  // c defaults to None
  return m.forward({x, t, c}).toTensor();
}

TEST(TorchScript, ExportOfConditionalModelsTakesC) {
  Generator gen = make_generator(24);
  const Tensor x = at::randn({10, 3}, gen), t = at::rand({10}, gen), c = at::randn({10, 2}, gen);
  const Tensor c1 = c.narrow(0, 4, 1);
  MlpOptions mo;
  mo.dim = 3;
  mo.hidden = {16, 8};
  mo.time_features = 6;
  mo.condition_dim = 2;
  auto mlp = std::make_shared<MlpVelocity>(mo, make_linear_schedule(), 25);
  // A conditional MLP, and fine-tuned over it (residual and copy, moved off the base).
  std::vector<VelocityFieldPtr> fields{mlp};
  for (FineTuneMode mode : {FineTuneMode::residual, FineTuneMode::copy}) {
    auto ft = make_finetuned(mlp, mode, {8}, 4, 26);
    {
      at::NoGradGuard no_grad;
      for (auto& p : ft->parameters()) p.add_(0.1 * at::randn(p.sizes(), gen));
    }
    fields.push_back(ft);
  }
  for (const auto& field : fields) {
    const std::string bytes = export_torchscript(*field);
    std::istringstream in(bytes);
    torch::jit::Module m = torch::jit::load(in);
    EXPECT_EQ(m.attr("condition_dim").toInt(), 2);
    EXPECT_EQ(m.attr("dim").toInt(), 3);
    const Tensor v = field->conditional_velocity(x, t, c).detach();
    EXPECT_TRUE(run_conditional_export(bytes, x, t, c).allclose(v, 1e-5, 1e-5)) << field->kind();
    EXPECT_TRUE(run_conditional_export(bytes, x, t, c1).allclose(field->conditional_velocity(x, t, c1).detach(), 1e-5, 1e-5));
    EXPECT_TRUE(run_conditional_export(bytes, x, t, Tensor()).allclose(field->velocity(x, t).detach(), 1e-5, 1e-5));
    EXPECT_FALSE(run_conditional_export(bytes, x, t, Tensor()).allclose(v, 1e-3, 1e-3));  // c matters
    // A 0-dim t.
    EXPECT_TRUE(run_conditional_export(bytes, x, at::scalar_tensor(0.4), c)
                    .allclose(field->conditional_velocity(x, at::full({10}, 0.4), c).detach(), 1e-5, 1e-5));
  }
  // Scripted conditional bases under a residual: with a null condition, and without (None raises).
  TempDir dir;
  const Tensor A = at::randn({2, 3}, gen);
  for (const bool optional : {true, false}) {
    auto m = conditional_module(A, optional);
    auto base = TorchScriptVelocity::load(save(m, dir.file("c.ts")), make_cosine_schedule());
    auto ft = make_finetuned(base, FineTuneMode::residual, {8}, 4, 27);
    {
      at::NoGradGuard no_grad;
      for (auto& p : ft->parameters()) p.add_(0.1 * at::randn(p.sizes(), gen));
    }
    const std::string bytes = export_torchscript(*ft);
    EXPECT_TRUE(run_conditional_export(bytes, x, t, c).allclose(ft->conditional_velocity(x, t, c).detach(), 1e-5, 1e-5));
    if (optional) {
      EXPECT_TRUE(run_conditional_export(bytes, x, t, Tensor()).allclose(ft->velocity(x, t).detach(), 1e-5, 1e-5));
    } else {
      EXPECT_THROW(run_conditional_export(bytes, x, t, Tensor()), std::exception);
    }
  }
}

TEST(TorchScript, ConditionalModulesInModelFiles) {
  // Residual over a scripted conditional base, saved with its training conditions: the archive, the
  // condition size (given, the module has no attribute) and the null condition (or its absence) come back.
  TempDir dir;
  Generator gen = make_generator(28);
  const Tensor A = at::randn({2, 3}, gen);
  const Tensor x = at::randn({5, 3}, gen), t = at::rand({5}, gen), c = at::randn({5, 2}, gen);
  const Tensor conditions = at::eye(2, kDouble);
  for (const bool optional : {true, false}) {
    auto m = conditional_module(A, optional, /*with_attribute=*/false);
    TorchScriptOptions o;
    o.condition_dim = 2;
    auto base = TorchScriptVelocity::load(save(m, dir.file("c.ts")), make_linear_schedule(), o);
    auto ft = make_finetuned(base, FineTuneMode::residual, {8}, 4, 29);
    {
      at::NoGradGuard no_grad;
      for (auto& p : ft->parameters()) p.add_(0.1 * at::randn(p.sizes(), gen));
    }
    save_velocity(*ft, dir.file("ft.pt"), Json::object(), conditions);
    fs::remove(dir.file("c.ts"));
    const LoadedModel loaded = load_velocity(dir.file("ft.pt"));
    EXPECT_EQ(loaded.field->condition_dim(), 2);
    EXPECT_TRUE(loaded.conditions.equal(conditions));
    EXPECT_TRUE(loaded.field->conditional_velocity(x, t, c).allclose(ft->conditional_velocity(x, t, c), 1e-6, 1e-6));
    auto lft = std::dynamic_pointer_cast<FineTunedVelocity>(loaded.field);
    ASSERT_TRUE(lft);
    auto lbase = std::dynamic_pointer_cast<TorchScriptVelocity>(lft->base());
    ASSERT_TRUE(lbase);
    EXPECT_EQ(lbase->has_null_condition(), optional);
    if (optional) EXPECT_TRUE(loaded.field->velocity(x, t).allclose(ft->velocity(x, t), 1e-6, 1e-6));
  }
}

// A user's conditional kind: v(x, t | c) = x (1 + sum c), and x at the null condition.
class UserConditional : public VelocityField {
 public:
  explicit UserConditional(std::string kind) : VelocityField(make_linear_schedule()), kind_(std::move(kind)) {}
  std::string kind() const override { return kind_; }
  int64_t dim() const override { return 2; }
  int64_t condition_dim() const override { return 2; }
  using VelocityField::velocity;
  Tensor velocity(const Tensor& x, const Tensor&) const override { return x; }
  Tensor conditional_velocity(const Tensor& x, const Tensor& t, const Tensor& c) const override {
    if (!c.defined()) return velocity(x, t);
    return x * (1.0 + condition_rows(c, x.size(0), 2, kind_).sum(1, true));
  }

 private:
  std::string kind_;
};

std::string archive_of(torch::jit::Module m) {
  std::ostringstream out;
  m.save(out);
  return out.str();
}

TEST(TorchScript, ExportOfAConditionalUserKindNeedsForwardXTC) {
  register_torchscript_export("test_user_conditional", [](const VelocityField&) {
    return archive_of(make_module("def forward(self, x, t, c: Optional[Tensor]):\n"
                                  "    if c is None:\n        return x\n"
                                  "    return x * (1.0 + c.sum(1, keepdim=True))\n"));
  });
  const UserConditional field("test_user_conditional");
  Generator gen = make_generator(30);
  const Tensor x = at::randn({6, 2}, gen), t = at::rand({6}, gen), c = at::randn({6, 2}, gen);
  const std::string bytes = export_torchscript(field);
  EXPECT_TRUE(run_conditional_export(bytes, x, t, c).allclose(field.conditional_velocity(x, t, c), 1e-6, 1e-6));
  EXPECT_TRUE(run_conditional_export(bytes, x, t, Tensor()).allclose(x, 1e-6, 1e-6));
  // An exporter that returns forward(x, t) for a conditional field, or one that gets c wrong.
  register_torchscript_export("test_user_unconditional_module", [](const VelocityField&) {
    return archive_of(make_module("def forward(self, x, t):\n    return x\n"));
  });
  expect_contains(error_of([&] { export_torchscript(UserConditional("test_user_unconditional_module")); }),
                  "must have forward(x, t, c: Optional[Tensor]), as the field is conditional, but its signature is");
  register_torchscript_export("test_user_wrong_c", [](const VelocityField&) {
    return archive_of(make_module("def forward(self, x, t, c: Optional[Tensor]):\n"
                                  "    if c is None:\n        return x\n"
                                  "    return x * (1.0 - c.sum(1, keepdim=True))\n"));
  });
  expect_contains(error_of([&] { export_torchscript(UserConditional("test_user_wrong_c")); }),
                  "export: the TorchScript module disagrees with tilt's velocity at conditions c");
}

}  // namespace
}  // namespace tilt
