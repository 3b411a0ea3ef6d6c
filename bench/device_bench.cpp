// Seconds per training iteration on the CPU and on a GPU, interleaved in one run (docs/devices.md): Adjoint
// Matching with a U-Net base on 1 x 28 x 28 images (the default U-Net, untrained: only the cost matters) in
// the three fine-tuning modes, at the batch of the CPU study and at a GPU-sized batch; flow-matching
// pretraining of the same U-Net; and the 2-D demo's MLP (a taped network). Each case runs `--repeats`
// timed Trainer steps (Adam, clipping: what `tilt finetune` runs) after one warm-up, on each device in
// turn; a step ends with the loss read back (.item()), which waits for the GPU. Needs no Google Benchmark.
//
//   tilt_device_bench [--device cuda] [--threads N] [--repeats R] [--quick] [--only TEXT] [--out FILE.jsonl]
// (--only: the cases whose name contains TEXT.)
//
// One JSON line per case and device: {"case", "device", "seconds_per_iteration" (the median), "min", "max"}.
#include "tilt/core/error.h"
#include "tilt/model/finetuned.h"
#include "tilt/model/mlp.h"
#include "tilt/model/reward.h"
#include "tilt/model/unet.h"
#include "tilt/schedule/noise_schedule.h"
#include "tilt/schedule/schedule.h"
#include "tilt/train/adjoint_matching.h"
#include "tilt/train/flow_matching.h"
#include "tilt/train/trainer.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/cuda.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace tilt {
namespace {

struct Case {
  std::string name;
  // Builds the loss on `device` (its model moved there before the trainer takes the parameters).
  std::function<std::unique_ptr<Loss>(const at::Device&)> make;
  Precision precision = Precision::float32;  // TrainerOptions::precision
};

std::unique_ptr<Loss> unet_am(const at::Device& device, FineTuneMode mode, int64_t B, int64_t K) {
  auto base = std::make_shared<UNetVelocity>(UNetOptions{}, make_linear_schedule(), 1);
  const int64_t d = base->dim();
  auto reward = std::make_shared<QuadraticReward>(at::zeros({d}, at::kDouble), 0.1 * at::eye(d, at::kDouble));
  auto model = make_finetuned(base, mode, {}, 0, 2, LoraOptions{4, 4.0});
  model->to(device);
  AdjointMatchingOptions o;
  o.batch_size = B;
  o.num_steps = K;
  o.loss_early_steps = K / 4;
  o.loss_late_steps = K / 4;
  return std::make_unique<AdjointMatching>(model, reward, make_memoryless_noise(1.0 / static_cast<double>(K)), o);
}

std::unique_ptr<Loss> unet_pretrain(const at::Device& device, int64_t B, double dropout) {
  UNetOptions uo;
  uo.condition_dim = 10;
  auto net = std::make_shared<UNetVelocity>(uo, make_linear_schedule(), 1);
  net->to(device);
  // Stand-in data (the cost does not depend on it): random images and classes, drawn on the CPU.
  auto data = [d = net->dim()](int64_t n, Generator& gen) {
    const Tensor labels = at::randint(10, {n}, gen, at::TensorOptions().dtype(at::kLong));
    return DataBatch{at::rand({n, d}, gen, at::kFloat), at::one_hot(labels, 10).to(at::kFloat)};
  };
  FlowMatchingOptions fo;
  fo.batch_size = B;
  fo.condition_dropout = dropout;
  return std::make_unique<FlowMatching>(net, ConditionalDataSampler(data), fo);
}

std::unique_ptr<Loss> mlp_am(const at::Device& device, int64_t B) {
  auto base = std::make_shared<MlpVelocity>(MlpOptions{2, {256, 256, 256}, 16, false, 0}, make_linear_schedule(), 1);
  auto model = make_finetuned(base, FineTuneMode::residual, {256, 256, 256}, 16, 2);
  model->to(device);
  auto reward = std::make_shared<QuadraticReward>(at::zeros({2}, at::kDouble), 0.5 * at::eye(2, at::kDouble));
  AdjointMatchingOptions o;
  o.batch_size = B;
  return std::make_unique<AdjointMatching>(model, reward, make_memoryless_noise(1.0 / static_cast<double>(o.num_steps)), o);
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

int run(int argc, char** argv) {
  std::string device_name = "cuda", out_path, only;
  int threads = 0, repeats = 5;
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw Error(a + " needs a value");
      return argv[++i];
    };
    if (a == "--device") device_name = value();
    else if (a == "--threads") threads = std::atoi(value().c_str());
    else if (a == "--repeats") repeats = std::atoi(value().c_str());
    else if (a == "--out") out_path = value();
    else if (a == "--quick") quick = true;
    else if (a == "--only") only = value();
    else throw Error("unknown argument '" + a + "' (--device D, --threads N, --repeats R, --quick, --only TEXT, --out FILE)");
  }
  if (repeats < 1) throw Error("--repeats must be >= 1");
  const at::Device device = parse_device(device_name, "--device");
  if (threads > 0) at::set_num_threads(threads);
  std::vector<Case> cases;
  for (const auto mode : {FineTuneMode::residual, FineTuneMode::copy, FineTuneMode::lora}) {
    cases.push_back({"U-Net 28x28 AM " + to_string(mode) + ", B=8 K=10",
                     [mode](const at::Device& d) { return unet_am(d, mode, 8, 10); }});
  }
  if (!quick) {
    cases.push_back({"U-Net 28x28 AM lora, B=64 K=20", [](const at::Device& d) { return unet_am(d, FineTuneMode::lora, 64, 20); }});
    // precision = "bfloat16" (docs/devices.md): the same iterations under bfloat16 autocast.
    cases.push_back({"U-Net 28x28 AM lora, B=8 K=10, bfloat16",
                     [](const at::Device& d) { return unet_am(d, FineTuneMode::lora, 8, 10); }, Precision::bfloat16});
    cases.push_back({"U-Net 28x28 AM lora, B=64 K=20, bfloat16",
                     [](const at::Device& d) { return unet_am(d, FineTuneMode::lora, 64, 20); }, Precision::bfloat16});
    // Condition dropout splits each batch in two of random sizes (E100): new shapes every iteration.
    cases.push_back({"U-Net 28x28 flow matching, B=128, dropout 0.1",
                     [](const at::Device& d) { return unet_pretrain(d, 128, 0.1); }});
    cases.push_back({"U-Net 28x28 flow matching, B=128, no dropout",
                     [](const at::Device& d) { return unet_pretrain(d, 128, 0.0); }});
    cases.push_back({"MLP 2-D AM residual, B=256 K=40", [](const at::Device& d) { return mlp_am(d, 256); }});
  }
  std::FILE* out = out_path.empty() ? nullptr : std::fopen(out_path.c_str(), "w");
  if (!out_path.empty() && !out) throw Error("cannot write '" + out_path + "'");
  std::fprintf(stderr, "tilt_device_bench: %d CPU threads, device %s, %d timed steps per case\n", at::get_num_threads(),
               device.str().c_str(), repeats);
  std::vector<at::Device> devices{at::Device(at::kCPU)};
  if (!device.is_cpu()) devices.push_back(device);
  for (const Case& c : cases) {
    if (c.name.find(only) == std::string::npos) continue;
    for (const at::Device& d : devices) {
      std::unique_ptr<Loss> loss = c.make(d);
      TrainerOptions to;
      to.iterations = repeats + 1;
      to.progress = false;
      to.precision = c.precision;
      Trainer trainer(*loss, to);
      trainer.step();  // warm-up: allocations, kernels chosen
      if (!d.is_cpu()) torch::cuda::synchronize();
      std::vector<double> seconds;
      for (int r = 0; r < repeats; ++r) {
        const auto start = std::chrono::steady_clock::now();
        trainer.step();
        if (!d.is_cpu()) torch::cuda::synchronize();
        seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
      }
      char line[512];
      std::snprintf(line, sizeof line,
                    "{\"case\": \"%s\", \"device\": \"%s\", \"seconds_per_iteration\": %.6g, \"min\": %.6g, \"max\": %.6g}\n",
                    c.name.c_str(), d.str().c_str(), median(seconds), *std::min_element(seconds.begin(), seconds.end()),
                    *std::max_element(seconds.begin(), seconds.end()));
      std::fputs(line, stdout);
      std::fflush(stdout);
      if (out) std::fputs(line, out);
    }
  }
  if (out) std::fclose(out);
  return 0;
}

}  // namespace
}  // namespace tilt

int main(int argc, char** argv) {
  try {
    return tilt::run(argc, argv);
  } catch (const tilt::Error& e) {
    std::fprintf(stderr, "tilt_device_bench: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "tilt_device_bench: %s\n", e.what());
    return 2;
  }
}
