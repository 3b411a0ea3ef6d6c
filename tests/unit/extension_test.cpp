// Open model types: a user's own velocity field (clone, model files, TorchScript export, Adjoint
// Matching without the taped fast path) and rewards from a value alone (autograd gradient).
#include "tilt/core/error.h"
#include "tilt/core/log.h"
#include "tilt/eval/metrics.h"
#include "tilt/io/model_io.h"
#include "tilt/model/finetuned.h"
#include "tilt/model/gmm.h"
#include "tilt/model/mlp.h"
#include "tilt/model/reward.h"
#include "tilt/model/torchscript.h"
#include "tilt/sde/sampler.h"
#include "tilt/soc/problems.h"
#include "tilt/soc/simulate.h"
#include "tilt/train/adjoint_matching.h"

#include "../support/checks.h"
#include "../support/helpers.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/linear.h>

#include <cmath>
#include <filesystem>

namespace tilt {
namespace {

using test::error_of;
using test::expect_contains;
using test::TempDir;

// A user's field: a torch::nn MLP on [x, t], v = W2 tanh(W1 [x, t] + b1) + b2.
class TinyNet : public VelocityField {
 public:
  TinyNet(int64_t d, int64_t width, SchedulePtr schedule)
      : VelocityField(std::move(schedule)), d_(d), width_(width),
        net_(torch::nn::Linear(d + 1, width), torch::nn::Tanh(), torch::nn::Linear(width, d)) {}
  std::string kind() const override { return "tiny"; }
  int64_t dim() const override { return d_; }
  int64_t width() const { return width_; }
  using VelocityField::velocity;
  Tensor velocity(const Tensor& x, const Tensor& t) const override {
    const Tensor tt = t.to(x.scalar_type()).reshape({-1, 1}).expand({x.size(0), 1});
    return net_->forward(at::cat({x, tt}, 1));
  }
  std::vector<Tensor> parameters() const override {
    std::vector<Tensor> out;
    for (const auto& p : net_->parameters()) {
      if (p.requires_grad()) out.push_back(p);
    }
    return out;
  }
  void set_trainable(bool on) override {
    for (auto& p : net_->parameters()) p.set_requires_grad(on);
  }
  NamedTensors named_parameters() const override {
    NamedTensors out;
    for (const auto& item : net_->named_parameters()) out.emplace_back(item.key(), item.value());
    return out;
  }
  VelocityFieldPtr clone() const override {
    auto copy = std::make_shared<TinyNet>(d_, width_, schedule());
    at::NoGradGuard no_grad;
    const NamedTensors mine = named_parameters(), theirs = copy->named_parameters();
    for (size_t i = 0; i < mine.size(); ++i) theirs[i].second.copy_(mine[i].second);
    return copy;
  }

 private:
  int64_t d_, width_;
  mutable torch::nn::Sequential net_;  // forward() is not const
};

// A user's field without clone() or a serialiser: v = -x.
class Shrink : public VelocityField {
 public:
  explicit Shrink(SchedulePtr schedule) : VelocityField(std::move(schedule)) {}
  std::string kind() const override { return "shrink"; }
  int64_t dim() const override { return 2; }
  using VelocityField::velocity;
  Tensor velocity(const Tensor& x, const Tensor&) const override { return -x; }
};

void register_tiny() {
  register_model_kind(
      "tiny", [](const VelocityField& f) { return Json{{"dim", f.dim()}, {"width", dynamic_cast<const TinyNet&>(f).width()}}; },
      [](const Json& meta, SchedulePtr s) {
        return std::make_shared<TinyNet>(meta.at("dim").get<int64_t>(), meta.at("width").get<int64_t>(), s);
      });
}

std::shared_ptr<TinyNet> tiny(int64_t d = 2) {
  at::manual_seed(3);
  return std::make_shared<TinyNet>(d, 8, make_linear_schedule());
}

double max_difference(const VelocityField& a, const VelocityField& b) {
  at::NoGradGuard no_grad;
  Generator gen = make_generator(5);
  const Tensor x = at::randn({6, a.dim()}, gen);
  const Tensor t = at::linspace(0.0, 0.95, 6);
  return (a.velocity(x, t) - b.velocity(x, t)).abs().max().item<double>();
}

// A reward of the user's that implements value() only.
class Bump : public Reward {
 public:
  std::string kind() const override { return "bump"; }
  int64_t dim() const override { return 3; }
  Tensor value(const Tensor& x) const override { return at::exp(-(x - 0.5).pow(2).sum(1)) + at::sin(x.select(1, 0)); }
};

TEST(Rewards, DefaultGradientEqualsFiniteDifferences) {
  Bump reward;
  FunctionReward lambda_reward(3, [](const Tensor& x) { return at::exp(-(x - 0.5).pow(2).sum(1)) + at::sin(x.select(1, 0)); });
  Generator gen = make_generator(1);
  const Tensor x = at::randn({5, 3}, gen, at::TensorOptions().dtype(at::kDouble));
  Tensor fd = at::zeros_like(x);
  const double eps = 1e-6;
  for (int64_t j = 0; j < 3; ++j) {
    Tensor e = at::zeros_like(x);
    e.select(1, j).fill_(eps);
    fd.select(1, j).copy_((reward.value(x + e) - reward.value(x - e)) / (2 * eps));
  }
  at::NoGradGuard no_grad;  // the gradient is taken even where gradients are off
  EXPECT_LT((reward.grad(x) - fd).abs().max().item<double>(), 1e-8);
  EXPECT_LT((lambda_reward.grad(x) - fd).abs().max().item<double>(), 1e-8);
  EXPECT_FALSE(reward.grad(x).requires_grad());
}

TEST(Rewards, FunctionRewardChecksItsShapesAndHasNoClosedFormTilt) {
  FunctionReward constant(2, [](const Tensor& x) { return at::ones({x.size(0)}, x.options()); }, "constant");
  EXPECT_EQ(constant.kind(), "constant");
  EXPECT_TRUE(constant.grad(at::ones({4, 2})).eq(0).all().item<bool>());
  FunctionReward wrong(2, [](const Tensor& x) { return x; });
  expect_contains(error_of([&] { wrong.value(at::ones({4, 2})); }), "one value per row");
  expect_contains(error_of([&] { FunctionReward(0, [](const Tensor& x) { return x; }); }), "dim must be >= 1");
  EXPECT_FALSE(exact_tilt(constant, *test::ring_mixture_2d(), 1.0).has_value());
  // The closed-form rewards keep their tilt, through the capability.
  LinearReward linear(at::tensor({0.5, -1.0}, at::kDouble));
  double log_z = 0, log_z_direct = 0;
  const auto tilted = exact_tilt(linear, *test::ring_mixture_2d(), 2.0, &log_z);
  const auto direct = linear.tilt(*test::ring_mixture_2d(), 2.0, &log_z_direct);
  ASSERT_TRUE(tilted.has_value());
  EXPECT_TRUE(tilted->means().equal(direct->means()));
  EXPECT_EQ(log_z, log_z_direct);
}

TEST(OpenModels, CloneIsADeepCopy) {
  auto net = tiny();
  const VelocityFieldPtr copy = net->clone();
  EXPECT_EQ(max_difference(*net, *copy), 0.0);
  {
    at::NoGradGuard no_grad;
    for (auto& p : copy->parameters()) p.add_(1.0);
  }
  EXPECT_GT(max_difference(*net, *copy), 0.1);
  MlpOptions o;
  o.dim = 2;
  o.hidden = {8};
  auto mlp = std::make_shared<MlpVelocity>(o, make_linear_schedule(), 4);
  mlp->set_trainable(false);
  const VelocityFieldPtr mlp_copy = mlp->clone();
  EXPECT_EQ(max_difference(*mlp, *mlp_copy), 0.0);
  EXPECT_TRUE(mlp_copy->parameters().empty());  // frozen like the original
  mlp_copy->set_trainable(true);
  {
    at::NoGradGuard no_grad;
    for (auto& p : mlp_copy->parameters()) p.add_(1.0);
  }
  EXPECT_GT(max_difference(*mlp, *mlp_copy), 0.1);
}

TEST(OpenModels, CopyModeClonesAUserField) {
  auto net = tiny();
  auto model = make_finetuned(net, FineTuneMode::copy, {}, 0, 0);
  EXPECT_EQ(model->trainable()->kind(), "tiny");
  EXPECT_NE(model->trainable(), model->base());
  EXPECT_EQ(model->parameters().size(), 4u);
  EXPECT_TRUE(net->parameters().empty());  // the base is frozen
  auto shrink = std::make_shared<Shrink>(make_linear_schedule());
  const std::string message = error_of([&] { make_finetuned(shrink, FineTuneMode::copy, {}, 0, 0); });
  expect_contains(message, "kind 'shrink'");
  expect_contains(message, "clone()");
  auto gmm = std::make_shared<GmmVelocity>(test::ring_mixture_2d(), make_linear_schedule());
  expect_contains(error_of([&] { make_finetuned(gmm, FineTuneMode::copy, {}, 0, 0); }),
                  "needs a network base, but the base is 'gmm'");
}

TEST(OpenModels, UserKindRoundTripsThroughModelFiles) {
  register_tiny();
  TempDir dir;
  auto net = tiny();
  save_velocity(*net, dir.file("tiny.pt"));
  const VelocityFieldPtr loaded = load_velocity(dir.file("tiny.pt")).field;
  EXPECT_EQ(loaded->kind(), "tiny");
  EXPECT_EQ(max_difference(*net, *loaded), 0.0);
  // Nested in a fine-tuned model, in both modes.
  for (const FineTuneMode mode : {FineTuneMode::copy, FineTuneMode::residual}) {
    auto model = make_finetuned(tiny(), mode, {8}, 2, 1);
    {
      at::NoGradGuard no_grad;
      for (auto& p : model->parameters()) p.add_(0.3);
    }
    save_velocity(*model, dir.file("ft.pt"));
    const VelocityFieldPtr back = load_velocity(dir.file("ft.pt")).field;
    EXPECT_EQ(max_difference(*model, *back), 0.0) << to_string(mode);
    EXPECT_EQ(back->parameters().size(), model->parameters().size());
  }
  const auto kinds = registered_model_kinds();
  EXPECT_NE(std::find(kinds.begin(), kinds.end(), "tiny"), kinds.end());
}

TEST(OpenModels, ModelFileErrorsNameTheKindAndTheTensor) {
  register_tiny();
  TempDir dir;
  auto shrink = std::make_shared<Shrink>(make_linear_schedule());
  expect_contains(error_of([&] { save_velocity(*shrink, dir.file("s.pt")); }), "kind 'shrink'");
  // Metadata that does not fit the tensors: save a width-8 net, then register a factory that makes width 4.
  save_velocity(*tiny(), dir.file("tiny.pt"));
  register_model_kind(
      "tiny", [](const VelocityField& f) { return Json{{"dim", f.dim()}}; },
      [](const Json& meta, SchedulePtr s) { return std::make_shared<TinyNet>(meta.at("dim").get<int64_t>(), 4, s); });
  const std::string message = error_of([&] { load_velocity(dir.file("tiny.pt")); });
  expect_contains(message, dir.file("tiny.pt"));
  expect_contains(message, "tensor '0.weight' must be [4, 3]");
  register_tiny();
  expect_contains(error_of([&] { register_model_kind("mlp", [](const VelocityField&) { return Json::object(); },
                                                     [](const Json&, SchedulePtr) { return VelocityFieldPtr(); }); }),
                  "register_model_kind: 'mlp' is one of tilt's own model kinds");
  // A built-in name is said to be one before missing functions are (it reported the missing ones).
  expect_contains(error_of([&] { register_model_kind("unet", nullptr, nullptr); }), "'unet' is one of tilt's own");
  // A field needs its schedule (a null one was a segmentation fault in the first velocity()).
  const auto mixture = std::make_shared<const GaussianMixture>(at::ones({1}, at::kDouble), at::zeros({1, 2}, at::kDouble),
                                                                at::eye(2, at::kDouble).unsqueeze(0));
  expect_contains(error_of([&] { GmmVelocity(mixture, nullptr); }), "needs its schedule");
  // An integer batch is refused (the mixture's formulas gave NaN in integer arithmetic).
  const GmmVelocity g(mixture, make_linear_schedule());
  expect_contains(error_of([&] { g.velocity(at::ones({2, 2}, at::kLong), 0.3); }), "x must hold floating-point numbers");
  // A diverged model is refused by save as well as by load (it was written, then could not be read back).
  auto diverged = tiny();
  {
    at::NoGradGuard no_grad;
    diverged->parameters()[0].view({-1})[0] = std::nan("");
  }
  expect_contains(error_of([&] { save_velocity(*diverged, dir.file("nan.pt")); }), "holds non-finite values");
  EXPECT_FALSE(std::filesystem::exists(dir.file("nan.pt")));
}

// A user's kind that wraps a tilt MLP, exported through the MLP's own export.
class Wrapped : public VelocityField {
 public:
  explicit Wrapped(std::shared_ptr<MlpVelocity> inner) : VelocityField(inner->schedule()), inner_(std::move(inner)) {}
  std::string kind() const override { return "wrapped"; }
  int64_t dim() const override { return inner_->dim(); }
  using VelocityField::velocity;
  Tensor velocity(const Tensor& x, const Tensor& t) const override { return inner_->velocity(x, t); }
  const MlpVelocity& inner() const { return *inner_; }

 private:
  std::shared_ptr<MlpVelocity> inner_;
};

TEST(OpenModels, UserKindExportsToTorchScript) {
  MlpOptions o;
  o.dim = 2;
  o.hidden = {8};
  o.time_features = 2;
  auto wrapped = std::make_shared<Wrapped>(std::make_shared<MlpVelocity>(o, make_linear_schedule(), 2));
  expect_contains(error_of([&] { export_torchscript(*wrapped); }), "kind 'wrapped'");
  register_torchscript_export("wrapped", [](const VelocityField& f) {
    return export_torchscript(dynamic_cast<const Wrapped&>(f).inner());
  });
  EXPECT_FALSE(export_torchscript(*wrapped).empty());
  // As the base of a fine-tuned model (the export checks itself against the velocity).
  auto model = make_finetuned(wrapped, FineTuneMode::residual, {8}, 2, 1);
  {
    at::NoGradGuard no_grad;
    for (auto& p : model->parameters()) p.add_(0.3);
  }
  EXPECT_FALSE(export_torchscript(*model).empty());
  expect_contains(error_of([&] { register_torchscript_export("mlp", [](const VelocityField&) { return std::string(); }); }),
                  "tilt's own");
}

TEST(OpenModels, TapedNetworkIsAskedForNotCast) {
  MlpOptions o;
  o.dim = 2;
  o.hidden = {8};
  MlpVelocity mlp(o, make_linear_schedule(), 1);
  ASSERT_NE(mlp.taped_network(), nullptr);
  EXPECT_FALSE(mlp.vjp_needs_autograd());
  EXPECT_EQ(tiny()->taped_network(), nullptr);
  EXPECT_TRUE(tiny()->vjp_needs_autograd());
  // A tape of another network is an error, not a crash.
  struct OtherTape : Tape {};
  OtherTape other;
  expect_contains(error_of([&] { mlp.taped_network()->forward_taped(at::zeros({3, 2}), 0.5, &other); }), "tape");
}

// With a user's base (no tape, VJP by autograd) and an MLP residual, the taped path runs on one block
// and gives the autograd path's loss and gradients; with a user's trainable network there is no taped path.
TEST(OpenModels, AdjointMatchingWithAUserBase) {
  auto model = make_finetuned(tiny(), FineTuneMode::residual, {12}, 2, 9);
  {
    at::NoGradGuard no_grad;
    Generator g = make_generator(4);
    for (auto& p : model->parameters()) p.add_(0.2 * at::randn(p.sizes(), g, p.options()));
  }
  AdjointMatchingOptions o;
  o.num_steps = 10;
  o.batch_size = 40;
  o.loss_early_steps = 2;
  o.loss_late_steps = 3;
  AdjointMatchingOptions slow_o = o;
  slow_o.tape_activations = false;
  auto reward = std::make_shared<FunctionReward>(2, [](const Tensor& x) { return -(x - 1.0).pow(2).sum(1); });
  AdjointMatching fast(model, reward, make_memoryless_noise(0.1), o);
  AdjointMatching slow(model, reward, make_memoryless_noise(0.1), slow_o);
  ASSERT_TRUE(fast.taped());
  Generator g1 = make_generator(11), g2 = make_generator(11);
  const LossOutput a = fast.compute(g1);
  EXPECT_EQ(fast.taped_blocks(), 1);
  const LossOutput b = slow.compute(g2);
  EXPECT_NEAR(a.loss.item<double>(), b.loss.item<double>(), 1e-5 * std::abs(b.loss.item<double>()));
  const auto params = model->parameters();
  const auto ga = torch::autograd::grad({a.loss}, params), gb = torch::autograd::grad({b.loss}, params);
  for (size_t p = 0; p < params.size(); ++p) {
    EXPECT_LT((ga[p] - gb[p]).norm().item<double>(), 1e-4 * (1e-6 + gb[p].norm().item<double>())) << "parameter " << p;
  }
  AdjointMatching user_trainable(make_finetuned(tiny(), FineTuneMode::copy, {}, 0, 0), reward,
                                 make_memoryless_noise(0.1), o);
  EXPECT_FALSE(user_trainable.taped());
}

// The library called as a C++ user might, wrongly: each misuse is a tilt::Error naming it (they were
// segmentation faults, LibTorch's own errors or NaN results).
TEST(LibraryUse, MisusesAreErrorsNamingThem) {
  const auto mixture = std::make_shared<const GaussianMixture>(at::ones({1}, at::kDouble), at::zeros({1, 2}, at::kDouble),
                                                                at::eye(2, at::kDouble).unsqueeze(0));
  Generator gen = make_generator(0);
  EXPECT_EQ(mixture->sample(0, gen).size(0), 0);
  expect_contains(error_of([&] { mixture->sample(-1, gen); }), "cannot draw -1 samples");
  const GenerativeSDE ode(std::make_shared<GmmVelocity>(mixture, make_linear_schedule()), make_zero_noise());
  expect_contains(error_of([&] { sample(ode, -5, TimeGrid::uniform(4), gen); }), "sample: cannot draw -5 samples");
  expect_contains(error_of([&] { sample(ode, 3, TimeGrid::uniform(4), gen, {}, at::kLong); }), "floating-point");
  expect_contains(error_of([] { TimeGrid({0.0, 0.5, 2.0}); }), "times must lie in [0, 1]");
  // The memoryless schedule without an offset is infinite at t = 0: its first step is refused, not NaN.
  const GenerativeSDE unregularised(ode.velocity_ptr(), make_memoryless_noise(0.0));
  expect_contains(error_of([&] { sample(unregularised, 3, TimeGrid::uniform(4), gen); }), "is not finite under the noise");
  EXPECT_TRUE(sample(GenerativeSDE(ode.velocity_ptr(), make_memoryless_noise(0.25)), 3, TimeGrid::uniform(4), gen)
                  .isfinite().all().item<bool>());
  expect_contains(error_of([] { soc::optimal_control_of(nullptr); }), "no problem given");
  expect_contains(error_of([] { soc::quadratic_ou_easy(0); }), "the dimension must be >= 1, got 0");
  const auto problem = soc::quadratic_ou_easy(2);
  expect_contains(error_of([&] { soc::simulate(*problem, soc::Control(), 4, 4, gen); }), "no control given");
  expect_contains(error_of([&] { exact_tilt(LinearReward(at::ones({2}, at::kDouble)), *mixture, std::nan("")); }),
                  "lambda must be finite");
  // Metrics: a NaN sample or an empty batch gave NaN.
  Tensor with_nan = at::zeros({4, 2}, at::kDouble);
  with_nan[1][0] = std::nan("");
  expect_contains(error_of([&] { energy_distance(with_nan, at::zeros({4, 2}, at::kDouble)); }), "must be finite");
  expect_contains(error_of([&] { reward_stats(LinearReward(at::ones({2}, at::kDouble)), at::zeros({0, 2})); }),
                  "needs at least one sample");
  // A reward function returning integers has no gradient for the adjoint.
  const FunctionReward counts(2, [](const Tensor& x) { return (x.select(1, 0) > 0).to(at::kLong); }, "count");
  expect_contains(error_of([&] { counts.value(at::ones({3, 2})); }), "reward 'count': the function must return floating-point");
}

// An MLP computes in its weights' dtype whatever x's is, and answers in x's, as the U-Net does (a float64 x gave
// LibTorch's own dtype error): with and without gradients, on a float32 and a float64 network.
TEST(LibraryUse, AnMlpTakesAnyFloatingPointInput) {
  MlpOptions o;
  o.dim = 3;
  o.hidden = {16, 16};
  o.zero_output = false;
  const auto net = std::make_shared<MlpVelocity>(o, make_linear_schedule(), 4);
  const Tensor x = at::randn({5, 3}), t = at::full({5}, 0.3);
  for (bool grad : {false, true}) {
    at::AutoGradMode mode(grad);
    const Tensor v = net->velocity(x, t);
    const Tensor v64 = net->velocity(x.to(at::kDouble), t.to(at::kDouble));
    EXPECT_EQ(v64.scalar_type(), at::kDouble);
    EXPECT_TRUE(at::allclose(v64.to(at::kFloat), v, 1e-6, 1e-6)) << "grad " << grad;
    const Tensor v16 = net->velocity(x.to(at::kBFloat16), t);
    EXPECT_EQ(v16.scalar_type(), at::kBFloat16);
    EXPECT_LT((v16.to(at::kFloat) - v).abs().max().item<double>(), 0.05 * (1.0 + v.abs().max().item<double>()));
  }
  for (auto& p : net->named_parameters()) p.second.set_data(p.second.to(at::kDouble));
  const Tensor v = net->velocity(x.to(at::kDouble), t.to(at::kDouble));
  const Tensor v32 = net->velocity(x, t);
  EXPECT_EQ(v32.scalar_type(), at::kFloat);
  EXPECT_TRUE(at::allclose(v32, v.to(at::kFloat), 1e-6, 1e-6));
}

TEST(LibraryUse, MessagesGoToAHandlerWhenOneIsSet) {
  std::vector<std::pair<bool, std::string>> seen;
  set_message_handler([&](bool is_warning, const std::string& message) { seen.emplace_back(is_warning, message); });
  warning("w1");
  note("n1");
  set_message_handler(nullptr);
  warning("to stderr again");
  ASSERT_EQ(seen.size(), 2u);
  EXPECT_TRUE(seen[0].first);
  EXPECT_EQ(seen[0].second, "w1");
  EXPECT_FALSE(seen[1].first);
  EXPECT_EQ(seen[1].second, "n1");
}

}  // namespace
}  // namespace tilt
