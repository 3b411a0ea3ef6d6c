// Runs on a GPU (docs/devices.md): the same seed gives the same draws on every device, so each piece run on
// the device must match the CPU run up to float rounding: draws, the exact field, models moved with their
// shared weights, sampling, an Adjoint Matching iteration (taped MLP path and autograd U-Net + LoRA path,
// conditional and guided), flow matching, and checkpoints and model files carried between devices.
// Without a CUDA device (CI) only the CPU-side checks run; the rest say why they skip. Tolerances: float32, and
// on recent GPUs cuDNN's convolutions run in TF32 by PyTorch's default (about 1e-3 relative).
// TILT_TEST_DEVICE=cuda:N picks the device.
#include "tilt/core/error.h"
#include "tilt/io/model_io.h"
#include "tilt/model/condition.h"
#include "tilt/model/finetuned.h"
#include "tilt/model/gmm.h"
#include "tilt/model/mlp.h"
#include "tilt/model/reward.h"
#include "tilt/model/unet.h"
#include "tilt/schedule/noise_schedule.h"
#include "tilt/schedule/schedule.h"
#include "tilt/sde/sampler.h"
#include "tilt/sde/sde.h"
#include "tilt/sde/time_grid.h"
#include "tilt/train/adjoint_matching.h"
#include "tilt/train/flow_matching.h"
#include "tilt/train/trainer.h"

#include "../support/helpers.h"

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/grad_mode.h>
#include <gtest/gtest.h>
#include <torch/cuda.h>

#include <cstdlib>
#include <functional>
#include <optional>
#include <string>

namespace tilt {
namespace {

const auto kDouble = at::TensorOptions().dtype(at::kDouble);

std::optional<at::Device> device_under_test() {
  const char* env = std::getenv("TILT_TEST_DEVICE");
  if (env && *env) return parse_device(env, "TILT_TEST_DEVICE");
  if (torch::cuda::is_available()) return at::Device(at::kCUDA, 0);
  return std::nullopt;
}

#define TILT_NEED_DEVICE(dev)                                                                      \
  const std::optional<at::Device> dev##_opt = device_under_test();                                  \
  if (!dev##_opt) GTEST_SKIP() << "no CUDA device here (these checks run on a GPU machine)";         \
  const at::Device dev = *dev##_opt

// max |a - b| / (max |b| + tiny), both brought to the CPU in float64.
double rel_diff(const Tensor& a, const Tensor& b) {
  const Tensor x = a.detach().cpu().to(at::kDouble), y = b.detach().cpu().to(at::kDouble);
  return (x - y).abs().max().item<double>() / (y.abs().max().item<double>() + 1e-30);
}

std::shared_ptr<QuadraticReward> quadratic(int64_t d, double precision) {
  return std::make_shared<QuadraticReward>(0.5 * at::ones({d}, kDouble), precision * at::eye(d, kDouble));
}

UNetOptions small_unet(int64_t condition_dim) { return test::tiny_unet(1, 8, 8, condition_dim); }

AdjointMatchingOptions am_options(int64_t K, int64_t B, int64_t early_and_late) {
  AdjointMatchingOptions o;
  o.num_steps = K;
  o.batch_size = B;
  o.loss_early_steps = early_and_late;
  o.loss_late_steps = early_and_late;
  return o;
}

// One Adjoint Matching loss and its gradients from generator seed `seed`.
std::pair<double, std::vector<Tensor>> am_loss_and_grads(const std::shared_ptr<FineTunedVelocity>& model,
                                                         const RewardPtr& reward, const AdjointMatchingOptions& o,
                                                         uint64_t seed) {
  AdjointMatching loss(model, reward, make_memoryless_noise(1.0 / static_cast<double>(o.num_steps)), o);
  for (Tensor p : model->parameters()) p.mutable_grad() = Tensor();
  Generator gen = make_generator(seed);
  const LossOutput out = loss.compute(gen);
  out.loss.backward();
  std::vector<Tensor> grads;
  for (const Tensor& p : model->parameters()) grads.push_back(p.grad().defined() ? p.grad().cpu() : at::zeros_like(p).cpu());
  return {out.loss.item<double>(), grads};
}

void expect_same_iteration(const std::shared_ptr<FineTunedVelocity>& cpu_model, const RewardPtr& reward,
                           const AdjointMatchingOptions& o, const at::Device& dev, double tol) {
  auto dev_model = std::dynamic_pointer_cast<FineTunedVelocity>(cpu_model->clone());
  ASSERT_TRUE(dev_model);
  dev_model->set_trainable(true);
  dev_model->to(dev);
  EXPECT_EQ(dev_model->device(), dev);
  EXPECT_EQ(dev_model->base()->device().type(), dev.type());
  const auto [loss_cpu, grads_cpu] = am_loss_and_grads(cpu_model, reward, o, 5);
  const auto [loss_dev, grads_dev] = am_loss_and_grads(dev_model, reward, o, 5);
  EXPECT_NEAR(loss_dev, loss_cpu, tol * (std::abs(loss_cpu) + 1e-12));
  ASSERT_EQ(grads_cpu.size(), grads_dev.size());
  for (size_t i = 0; i < grads_cpu.size(); ++i) EXPECT_LT(rel_diff(grads_dev[i], grads_cpu[i]), 20 * tol) << "parameter " << i;
}

TEST(Device, ParseDeviceNamesTheFlagAndRefusesWhatIsNotThere) {
  EXPECT_EQ(parse_device("cpu", "--device"), at::Device(at::kCPU));
  for (const char* bad : {"gpu", "cuda:", "cuda:x", "cuda:-1", "CUDA", "cpu:0", "", "cuda:200", "cuda:999"}) {
    try {
      parse_device(bad, "--device");
      ADD_FAILURE() << "accepted '" << bad << "'";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("--device"), std::string::npos) << e.what();
    }
  }
  if (!torch::cuda::is_available()) {
    try {
      parse_device("cuda", "device");
      ADD_FAILURE() << "cuda accepted without a CUDA device";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("no CUDA device"), std::string::npos) << e.what();
    }
  } else {
    EXPECT_THROW(parse_device("cuda:" + std::to_string(torch::cuda::device_count()), "--device"), Error);
  }
  // A C++ user's model->to(...) says the same, where LibTorch's own error came from deep in a copy.
  auto model = make_finetuned(std::make_shared<UNetVelocity>(small_unet(3), make_linear_schedule(), 1),
                              FineTuneMode::lora, {}, 0, 2, LoraOptions{2, 4.0});
  const at::Device missing(at::kCUDA, static_cast<at::DeviceIndex>(torch::cuda::device_count()));
  try {
    model->to(missing);
    ADD_FAILURE() << "moved to " << missing;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("moving a model to cuda:"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(model->device().is_cpu());
}

TEST(Device, MovingToTheCpuKeepsTheValuesAndTheTensorsThemselves) {
  // On the CPU the move is the identity; the handles a trainer holds stay the parameters (in-place move).
  auto base = std::make_shared<UNetVelocity>(small_unet(3), make_linear_schedule(), 1);
  auto model = make_finetuned(base, FineTuneMode::lora, {}, 0, 2, LoraOptions{2, 4.0});
  const std::vector<Tensor> held = model->parameters();
  const Tensor before = held.front().clone();
  model->to(at::kCPU);
  EXPECT_TRUE(held.front().is_same(model->parameters().front()));
  EXPECT_TRUE(at::equal(before, held.front()));
  EXPECT_EQ(model->device(), at::Device(at::kCPU));
}

TEST(Device, DrawsAreTheSameNumbersOnEveryDevice) {
  TILT_NEED_DEVICE(dev);
  Generator a = make_generator(3), b = make_generator(3);
  const Tensor cpu = normal_draws({64, 5}, a, at::TensorOptions());
  const Tensor gpu = normal_draws({64, 5}, b, at::TensorOptions().device(dev));
  EXPECT_EQ(gpu.device(), dev);
  EXPECT_TRUE(at::equal(cpu, gpu.cpu()));
  EXPECT_TRUE(at::equal(uniform_draws({7}, a, kDouble), uniform_draws({7}, b, kDouble.device(dev)).cpu()));
}

TEST(Device, ClosedFormFieldsAndRewardsComputeOnTheirInputsDevice) {
  TILT_NEED_DEVICE(dev);
  auto mixture = test::random_mixture(3, 4, 11);
  GmmVelocity field(mixture, make_linear_schedule());
  Generator gen = make_generator(1);
  const Tensor x = at::randn({32, 3}, gen, at::kFloat), t = at::rand({32}, gen, at::kFloat);
  const Tensor v_dev = field.velocity(x.to(dev), t.to(dev));
  EXPECT_EQ(v_dev.device(), dev);
  EXPECT_LT(rel_diff(v_dev, field.velocity(x, t)), 1e-5);
  const Tensor a = at::randn({32, 3}, gen, at::kFloat);
  Tensor v_out;
  const Tensor g_dev = field.vjp(x.to(dev), 0.3, a.to(dev), &v_out);
  EXPECT_EQ(v_out.device(), dev);
  EXPECT_LT(rel_diff(g_dev, field.vjp(x, 0.3, a)), 1e-5);
  const auto reward = quadratic(3, 0.7);
  EXPECT_LT(rel_diff(reward->value(x.to(dev)), reward->value(x)), 1e-6);
  EXPECT_LT(rel_diff(reward->grad(x.to(dev)), reward->grad(x)), 1e-6);
  GmmLogDensityReward log_q(mixture);
  EXPECT_LT(rel_diff(log_q.grad(x.to(dev)), log_q.grad(x)), 1e-5);
}

TEST(Device, SamplingOnTheDeviceDrawsTheCpuPaths) {
  TILT_NEED_DEVICE(dev);
  const auto schedule = make_linear_schedule();
  auto net = std::make_shared<MlpVelocity>(MlpOptions{3, {32, 32}, 8, false, 0}, schedule, 4);
  auto moved = std::dynamic_pointer_cast<MlpVelocity>(net->clone());
  moved->to(dev);
  for (const auto& noise : {make_memoryless_noise(0.05), make_zero_noise()}) {
    Generator a = make_generator(8), b = make_generator(8);
    SampleOptions so;
    const Tensor cpu = sample(GenerativeSDE(net, noise), 256, TimeGrid::uniform(20), a, so, at::kFloat);
    const Tensor gpu = sample(GenerativeSDE(moved, noise), 256, TimeGrid::uniform(20), b, so, at::kFloat);
    EXPECT_EQ(gpu.device(), dev);
    EXPECT_LT(rel_diff(gpu, cpu), 1e-4) << noise->describe();
  }
}

TEST(Device, GuidedSamplingOfAConditionalFineTunedModelRunsOnItsDevice) {
  // tilt sample: a fine-tuned model file bound to a condition (and guided); the bound field must report the
  // model's device, where the sampler draws X_0 (found on a GPU: it reported the CPU).
  TILT_NEED_DEVICE(dev);
  auto base = std::make_shared<UNetVelocity>(small_unet(3), make_linear_schedule(), 1);
  auto cpu_model = make_finetuned(base, FineTuneMode::lora, {}, 0, 2, LoraOptions{2, 4.0});
  auto dev_model = std::dynamic_pointer_cast<FineTunedVelocity>(cpu_model->clone());
  dev_model->to(dev);
  const Tensor c = at::one_hot(at::full({1}, 2, at::TensorOptions().dtype(at::kLong)), 3).to(at::kFloat);
  for (const double w : {0.0, 2.0}) {
    const VelocityFieldPtr on_dev = bind_condition(dev_model, c.to(dev), w), on_cpu = bind_condition(cpu_model, c, w);
    EXPECT_EQ(on_dev->device(), dev);
    Generator a = make_generator(3), b = make_generator(3);
    const Tensor x_dev = sample(GenerativeSDE(on_dev, make_zero_noise()), 16, TimeGrid::uniform(10), b, SampleOptions{}, at::kFloat);
    const Tensor x_cpu = sample(GenerativeSDE(on_cpu, make_zero_noise()), 16, TimeGrid::uniform(10), a, SampleOptions{}, at::kFloat);
    EXPECT_EQ(x_dev.device(), dev);
    EXPECT_LT(rel_diff(x_dev, x_cpu), 1e-2) << "guidance " << w;
  }
}

TEST(Device, AdjointMatchingIterationOfATapedMlpMatchesTheCpu) {
  TILT_NEED_DEVICE(dev);
  const auto schedule = make_linear_schedule();
  auto base = std::make_shared<MlpVelocity>(MlpOptions{4, {32, 32}, 8, false, 0}, schedule, 1);
  AdjointMatchingOptions o = am_options(20, 64, 6);
  for (const bool taped : {true, false}) {
    o.tape_activations = taped;
    for (const auto mode : {FineTuneMode::residual, FineTuneMode::copy}) {
      SCOPED_TRACE(std::string(taped ? "taped " : "autograd ") + to_string(mode));
      expect_same_iteration(make_finetuned(base, mode, {32, 32}, 8, 2), quadratic(4, 0.5), o, dev, 1e-4);
    }
  }
}

TEST(Device, AdjointMatchingIterationOfAConditionalUNetWithLoraMatchesTheCpu) {
  TILT_NEED_DEVICE(dev);
  auto base = std::make_shared<UNetVelocity>(small_unet(3), make_linear_schedule(), 1);
  AdjointMatchingOptions o = am_options(10, 12, 3);
  o.conditions = std::make_shared<ConditionSet>(ConditionSet::classes(3));
  for (const double w : {0.0, 1.5}) {
    o.guidance = w;
    SCOPED_TRACE("guidance " + std::to_string(w));
    expect_same_iteration(make_finetuned(base, FineTuneMode::lora, {}, 0, 2, LoraOptions{2, 4.0}), quadratic(64, 0.2), o,
                          dev, 5e-4);
  }
  o.guidance = 0.0;
  expect_same_iteration(make_finetuned(base, FineTuneMode::residual, {}, 0, 2), quadratic(64, 0.2), o, dev, 5e-4);
}

TEST(Device, FineTunedModelsBuiltOnABaseAlreadyOnTheDeviceEqualTheCpuOnes) {
  // What tilt finetune --device does: the base is moved first, then the fine-tuned model is made from it
  // (LoRA draws its adapters, copy clones, residual builds a network) and moved.
  TILT_NEED_DEVICE(dev);
  auto cpu_base = std::make_shared<UNetVelocity>(small_unet(3), make_linear_schedule(), 1);
  auto dev_base = std::dynamic_pointer_cast<UNetVelocity>(cpu_base->clone());
  dev_base->to(dev);
  Generator gen = make_generator(4);
  const Tensor x = at::randn({6, 64}, gen, at::kFloat), t = at::rand({6}, gen, at::kFloat);
  const Tensor c = at::one_hot(at::arange(6, at::TensorOptions().dtype(at::kLong)).remainder(3), 3).to(at::kFloat);
  for (const auto mode : {FineTuneMode::lora, FineTuneMode::copy, FineTuneMode::residual}) {
    SCOPED_TRACE(to_string(mode));
    auto on_cpu = make_finetuned(cpu_base, mode, {}, 0, 7, LoraOptions{2, 4.0});
    auto on_dev = make_finetuned(dev_base, mode, {}, 0, 7, LoraOptions{2, 4.0});
    on_dev->to(dev);
    EXPECT_EQ(on_dev->device(), dev);
    ASSERT_EQ(on_cpu->parameters().size(), on_dev->parameters().size());
    for (size_t i = 0; i < on_cpu->parameters().size(); ++i) {
      EXPECT_TRUE(at::equal(on_cpu->parameters()[i], on_dev->parameters()[i].cpu())) << "parameter " << i;
    }
    EXPECT_LT(rel_diff(on_dev->conditional_velocity(x.to(dev), t.to(dev), c.to(dev)), on_cpu->conditional_velocity(x, t, c)),
              1e-2);
  }
}

TEST(Device, FlowMatchingOfAConditionalUNetMatchesTheCpu) {
  TILT_NEED_DEVICE(dev);
  Generator data_gen = make_generator(2);
  const Tensor data = at::randn({200, 64}, data_gen, at::kFloat);
  const Tensor labels = at::randint(3, {200}, data_gen, at::TensorOptions().dtype(at::kLong));
  auto sampler = [&](int64_t n, Generator& g) {
    const Tensor idx = at::randint(200, {n}, g, at::TensorOptions().dtype(at::kLong));
    return DataBatch{data.index_select(0, idx), at::one_hot(labels.index_select(0, idx), 3).to(at::kFloat)};
  };
  FlowMatchingOptions fo;
  fo.batch_size = 32;
  fo.condition_dropout = 0.25;
  auto cpu_net = std::make_shared<UNetVelocity>(small_unet(3), make_linear_schedule(), 3);
  auto dev_net = std::dynamic_pointer_cast<UNetVelocity>(cpu_net->clone());
  dev_net->to(dev);
  FlowMatching cpu_loss(cpu_net, ConditionalDataSampler(sampler), fo), dev_loss(dev_net, ConditionalDataSampler(sampler), fo);
  Generator a = make_generator(6), b = make_generator(6);
  const Tensor l_cpu = cpu_loss.compute(a).loss, l_dev = dev_loss.compute(b).loss;
  EXPECT_EQ(l_dev.device(), dev);
  EXPECT_NEAR(l_dev.item<double>(), l_cpu.item<double>(), 1e-4 * l_cpu.item<double>());
  l_cpu.backward();
  l_dev.backward();
  const auto pc = cpu_net->parameters(), pd = dev_net->parameters();
  for (size_t i = 0; i < pc.size(); ++i) EXPECT_LT(rel_diff(pd[i].grad(), pc[i].grad()), 1e-2) << "parameter " << i;
}

TEST(Device, CheckpointsAndModelFilesMoveBetweenDevices) {
  TILT_NEED_DEVICE(dev);
  const auto schedule = make_linear_schedule();
  auto base = std::make_shared<MlpVelocity>(MlpOptions{3, {16, 16}, 4, false, 0}, schedule, 1);
  const AdjointMatchingOptions o = am_options(10, 32, 3);
  const std::string ckpt = ::testing::TempDir() + "/tilt_device_checkpoint.pt";
  const std::string file = ::testing::TempDir() + "/tilt_device_model.pt";
  auto on_dev = make_finetuned(base->clone(), FineTuneMode::residual, {16}, 4, 2);
  on_dev->to(dev);
  AdjointMatching dev_loss(on_dev, quadratic(3, 0.5), make_memoryless_noise(0.1), o);
  TrainerOptions to;
  to.iterations = 4;
  to.progress = false;
  Trainer dev_trainer(dev_loss, to);
  for (int i = 0; i < 4; ++i) dev_trainer.step();
  dev_trainer.save_checkpoint(ckpt);
  save_velocity(*on_dev, file);

  // The checkpoint resumes on the CPU with the device's parameters, and steps on from there.
  auto on_cpu = make_finetuned(base->clone(), FineTuneMode::residual, {16}, 4, 2);
  AdjointMatching cpu_loss(on_cpu, quadratic(3, 0.5), make_memoryless_noise(0.1), o);
  Trainer cpu_trainer(cpu_loss, to);
  cpu_trainer.load_checkpoint(ckpt);
  EXPECT_EQ(cpu_trainer.iteration(), 4);
  const auto pd = on_dev->parameters(), pc = on_cpu->parameters();
  for (size_t i = 0; i < pc.size(); ++i) {
    EXPECT_EQ(pc[i].device(), at::Device(at::kCPU));
    EXPECT_TRUE(at::equal(pc[i], pd[i].cpu())) << "parameter " << i;
  }
  // ... and the device run resumes from its own checkpoint on the device.
  Trainer again(dev_loss, to);
  again.load_checkpoint(ckpt);
  EXPECT_EQ(on_dev->parameters().front().device(), dev);
  // The model file loads on a machine without a GPU: its tensors were written from the CPU.
  const LoadedModel m = load_velocity(file);
  Generator gen = make_generator(1);
  const Tensor x = at::randn({16, 3}, gen, at::kFloat);
  EXPECT_LT(rel_diff(m.field->velocity(x, 0.4), on_dev->velocity(x.to(dev), 0.4)), 1e-5);
}

// precision = "bfloat16" (TrainerOptions::precision): one Trainer step of Adjoint Matching on a U-Net with LoRA under
// bfloat16 autocast on `dev`, against the same step in float32 from the same parameters and draws. bfloat16 keeps 8
// bits of mantissa, so the loss and the gradients differ (autocast did act), by far less than 1e-2 relative for the
// loss and a few per cent for each gradient; the parameters and gradients stay float32, and autocast is off again
// after the step. Unclipped terms (clip_factor 0): clipped ones would hide the model.
void expect_bfloat16_step_near_float32(const at::Device& dev) {
  auto base = std::make_shared<UNetVelocity>(small_unet(0), make_linear_schedule(), 1);
  base->to(dev);
  auto f32 = make_finetuned(base, FineTuneMode::lora, {}, 0, 2, LoraOptions{2, 4.0});
  f32->to(dev);
  // Adapters away from zero, so that the rollout uses them.
  for (Tensor p : f32->parameters()) {
    at::NoGradGuard no_grad;
    p.add_(0.05 * at::randn(p.sizes(), make_generator(7), at::kFloat).to(dev));
  }
  auto bf16 = std::dynamic_pointer_cast<FineTunedVelocity>(f32->clone());
  ASSERT_TRUE(bf16);
  bf16->set_trainable(true);
  bf16->to(dev);
  AdjointMatchingOptions o = am_options(8, 16, 2);
  o.clip_factor = 0;  // unclipped terms: the loss depends on the model everywhere
  const auto reward = quadratic(64, 0.2);
  AdjointMatching loss32(f32, reward, make_memoryless_noise(0.125), o), loss16(bf16, reward, make_memoryless_noise(0.125), o);
  TrainerOptions to;
  to.iterations = 1;
  to.progress = false;
  to.grad_clip = 0;
  Trainer t32(loss32, to);
  to.precision = Precision::bfloat16;
  Trainer t16(loss16, to);
  const StepResult r32 = t32.step(), r16 = t16.step();
  EXPECT_FALSE(at::autocast::is_cpu_enabled());
  EXPECT_FALSE(at::autocast::is_enabled());
  EXPECT_NE(r16.loss, r32.loss);  // autocast acted
  EXPECT_NEAR(r16.loss, r32.loss, 1e-2 * std::abs(r32.loss));  // 6e-4 on the CPU
  EXPECT_NEAR(r16.grad_norm, r32.grad_norm, 1e-2 * r32.grad_norm);
  const auto p32 = f32->parameters(), p16 = bf16->parameters();
  ASSERT_EQ(p32.size(), p16.size());
  for (size_t i = 0; i < p32.size(); ++i) {
    EXPECT_EQ(p16[i].scalar_type(), at::kFloat);
    ASSERT_TRUE(p16[i].grad().defined() && p32[i].grad().defined());
    EXPECT_EQ(p16[i].grad().scalar_type(), at::kFloat);
    EXPECT_LT(rel_diff(p16[i].grad(), p32[i].grad()), 5e-2) << "parameter " << i;
  }
}

TEST(Precision, Bfloat16AutocastOnTheCpuStaysNearFloat32) { expect_bfloat16_step_near_float32(at::Device(at::kCPU)); }

TEST(Precision, Bfloat16AutocastOnTheDeviceStaysNearFloat32) {
  TILT_NEED_DEVICE(dev);
  expect_bfloat16_step_near_float32(dev);
}

TEST(Precision, Bfloat16RefusesAFloat64ModelAndAnUnknownName) {
  auto base = std::make_shared<UNetVelocity>(small_unet(0), make_linear_schedule(), 1);
  base->cast(kDouble);
  auto model = make_finetuned(base, FineTuneMode::copy, {}, 0, 2);
  AdjointMatching loss(model, quadratic(64, 0.5), make_memoryless_noise(0.125), am_options(8, 8, 2));
  TrainerOptions to;
  to.precision = Precision::bfloat16;
  const auto message = [](const std::function<void()>& f) {
    try {
      f();
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(message([&] { Trainer t(loss, to); }).find("precision = \"bfloat16\" autocasts float32 models; the "
                                                        "adjoint_matching loss's parameters are Double"),
            std::string::npos);
  EXPECT_EQ(message([] { parse_precision("fp16"); }), "unknown precision 'fp16' (valid: float32, bfloat16)");
}

}  // namespace
}  // namespace tilt
