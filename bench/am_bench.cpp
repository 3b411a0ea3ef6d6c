// Where the time of one Adjoint Matching iteration goes (Algorithm 1 of Domingo-Enrich et al., ICLR 2025):
//   rollout     K Euler-Maruyama steps of the fine-tuned SDE, no gradients
//   adjoint     K vector-Jacobian products of the frozen base drift (the lean adjoint)
//   iteration   rollout + adjoint + the regression loss, its backward pass and the Adam step
// and the single steps inside them. Problems:
//   0  the 2-D demo (configs/demo_2d.toml): exact Gaussian-mixture base, residual MLP 3x128, K = 60, batch 256
//   1  a 64-D MLP base (3x256, untrained: only its cost matters), residual MLP 3x256, K = 40, batch 256
//   2  the digits model (configs/digits.toml): 64-D MLP base 3x256, residual MLP 2x256, classifier reward
//      (MLP [256, 64], log p(3 | x)), K = 40, batch 64 (untrained weights: only the cost matters)
// BM_Iteration/P/T runs the taped path (T = 1, tape_activations = true: the default) or the autograd path
// (T = 0: the networks run again under autograd, as the PyTorch reference does); its counters: the phases
// (ms), the matrix work actually done (GFLOP/s) and the peak of live tensor memory during an iteration
// above what was live before the first one (peak_MB, counted by an allocator wrapper; it includes what
// is kept between iterations: the taped path's tapes, Adam's moments). BM_Scaling/d/B/K/T: the
// 64-D problem's family at other sizes. BM_PeakGemm/M/K/L: the machine's float32 matrix-multiply peak,
// through ATen (L = 0: OpenBLAS with Debian's LibTorch, as PyTorch) and through tilt's own products
// (L = 1: oneDNN where it loads; TILT_GEMM=aten makes them ATen's; the context line "tilt_gemm" says which).
// Threads: 2, or TILT_THREADS. Run: build/bench/tilt_bench (see scripts/bench.sh).
// tilt_bench --tilt_trace=P,N[,LR[,METHOD]] runs no benchmark: it prints the metrics of N Trainer steps of problem P
// (0-2 as above, 3 the U-Net with LoRA of BM_UNetIteration/2/8/10; BM_Iteration's iteration, or with METHOD ram, eam, eam_w, buf or buf_w BM_RamIteration's, BM_EamIteration's and
// BM_BufferedIteration's; Adam lr LR, default 2e-5) as JSON lines, so that the PyTorch reference
// (bench/reference/am_reference.py --check) can be compared with it number by number.
#include "tilt/core/error.h"
#include "tilt/model/classifier.h"
#include "tilt/model/condition.h"
#include "tilt/model/finetuned.h"
#include "tilt/model/gmm.h"
#include "tilt/model/mlp.h"
#include "tilt/model/random_problem.h"
#include "tilt/model/reward.h"
#include "tilt/model/unet.h"
#include "tilt/schedule/schedule.h"
#include "tilt/sde/sampler.h"
#include "tilt/train/adjoint_matching.h"
#include "tilt/train/buffered_adjoint_matching.h"
#include "tilt/train/efficient_adjoint_matching.h"
#include "tilt/train/reinforce_adjoint_matching.h"
#include "tilt/train/trainer.h"
#include "model/gemm.h"  // internal: tilt's matrix products

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/CPUAllocator.h>
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <string>

namespace tilt {
namespace {

const auto kDouble = at::TensorOptions().dtype(at::kDouble);

// Live and peak bytes of CPU tensor storage: every allocation goes through this wrapper of LibTorch's
// CPU allocator (installed once in main). The data pointer is its own context, as raw_allocate (which oneDNN's
// convolutions call) requires; what to free and how many bytes are kept in a table by pointer.
class CountingAllocator final : public c10::Allocator {
 public:
  explicit CountingAllocator(c10::Allocator* inner) : inner_(inner) { instance_ = this; }
  c10::DataPtr allocate(size_t n) const override {
    c10::DataPtr inner = inner_->allocate(n);
    void* data = inner.get();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks_.emplace(data, Block{std::move(inner), static_cast<int64_t>(n)});
    }
    const int64_t live = live_ += static_cast<int64_t>(n);
    int64_t peak = peak_.load();
    while (live > peak && !peak_.compare_exchange_weak(peak, live)) {
    }
    return {data, data, &CountingAllocator::release, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &CountingAllocator::release; }
  /// Starts a new peak from what is live now; returns the live bytes.
  int64_t reset_peak() const {
    peak_ = live_.load();
    return live_;
  }
  int64_t peak() const { return peak_; }

 private:
  struct Block {
    c10::DataPtr inner;
    int64_t bytes;
  };
  static void release(void* p) {
    if (!p) return;
    Block block;
    {
      std::lock_guard<std::mutex> lock(instance_->mutex_);
      auto it = instance_->blocks_.find(p);
      if (it == instance_->blocks_.end()) return;
      block = std::move(it->second);
      instance_->blocks_.erase(it);
    }
    instance_->live_ -= block.bytes;
  }  // block.inner frees the memory here
  static inline CountingAllocator* instance_ = nullptr;
  c10::Allocator* inner_;
  mutable std::mutex mutex_;
  mutable std::unordered_map<void*, Block> blocks_;
  mutable std::atomic<int64_t> live_{0}, peak_{0};
};

CountingAllocator* counting_allocator = nullptr;

// Matrix work (flops = 2 m n k per product) of the MLPs, per row.
struct MlpShape {
  int64_t d = 0, time_in = 0;  // data dimension, time-embedding inputs (1 + time_features)
  std::vector<int64_t> hidden;
  bool defined() const { return d > 0; }
  // Forward. The taped path folds the time embedding into one row per call (time_in columns saved).
  double forward(bool taped) const {
    double f = 0;
    int64_t in = d + (taped ? 0 : time_in);
    for (int64_t w : hidden) f += 2.0 * in * w, in = w;
    return f + 2.0 * in * d;
  }
  // Input VJP: the transposed chain; autograd's reaches the time-embedding inputs too.
  double vjp(bool taped) const { return forward(taped); }
  // Weight gradients of every layer, plus the input-side products of all layers but the first.
  double param_grads() const {
    double f = forward(false);
    int64_t in = hidden.front();
    for (size_t l = 1; l < hidden.size(); ++l) f += 2.0 * in * hidden[l], in = hidden[l];
    return f + 2.0 * in * d;
  }
};

struct Setup {
  std::shared_ptr<FineTunedVelocity> model;
  std::unique_ptr<AdjointMatching> loss;
  int64_t batch;
  std::string label;
  MlpShape base, residual;
  double reward_flops = 0;  // per row: one forward and one VJP of the classifier
};

AdjointMatchingOptions bench_options(int64_t batch, int64_t K, int64_t early, int64_t late, bool taped) {
  AdjointMatchingOptions am;
  am.batch_size = batch;
  am.clip_factor = 0;
  am.loss_weighting = "velocity";
  am.num_steps = K;
  am.loss_early_steps = early;
  am.loss_late_steps = late;
  am.tape_activations = taped;
  return am;
}

// The 64-D problem's family: MLP base 3x256 and residual 3x256 in dimension d, a quadratic reward.
Setup mlp_setup(int64_t d, int64_t batch, int64_t K, bool taped) {
  const auto schedule = make_linear_schedule();
  MlpOptions mo;
  mo.dim = d;
  mo.hidden = {256, 256, 256};
  auto base = std::make_shared<MlpVelocity>(mo, schedule, 1);
  auto reward = std::make_shared<QuadraticReward>(at::ones({d}, kDouble), 0.25 * at::eye(d, kDouble));
  const AdjointMatchingOptions am = bench_options(batch, K, std::min<int64_t>(10, K / 4), std::min<int64_t>(10, K / 4), taped);
  Setup s;
  s.model = make_finetuned(base, FineTuneMode::residual, {256, 256, 256}, 16, 2);
  s.loss = std::make_unique<AdjointMatching>(s.model, reward, make_memoryless_noise(1.0 / K), am);
  s.batch = batch;
  s.base = {d, 17, {256, 256, 256}};
  s.residual = {d, 17, {256, 256, 256}};
  return s;
}

Setup make_setup(int problem, bool taped = true) {
  const auto schedule = make_linear_schedule();
  if (problem == 1) {
    Setup s = mlp_setup(64, 256, 40, taped);
    s.label = "64-D MLP, K=40";
    return s;
  }
  Setup s;
  if (problem == 0) {
    std::vector<double> mu;
    for (int k = 0; k < 8; ++k) {
      mu.push_back(3.0 * std::cos(2 * M_PI * k / 8));
      mu.push_back(3.0 * std::sin(2 * M_PI * k / 8));
    }
    auto gmm = std::make_shared<GaussianMixture>(at::ones({8}, kDouble), at::tensor(mu, kDouble).reshape({8, 2}),
                                                 0.25 * at::eye(2, kDouble).expand({8, 2, 2}).clone());
    auto base = std::make_shared<GmmVelocity>(gmm, schedule);
    auto reward = std::make_shared<QuadraticReward>(at::tensor({2.5, 0.0}, kDouble), 0.25 * at::eye(2, kDouble));
    s.model = make_finetuned(base, FineTuneMode::residual, {128, 128, 128}, 16, 2);
    s.loss = std::make_unique<AdjointMatching>(s.model, reward, make_memoryless_noise(1.0 / 60),
                                               bench_options(256, 60, 20, 10, taped));
    s.batch = 256;
    s.label = "2-D demo, K=60";
    s.residual = {2, 17, {128, 128, 128}};
  } else {
    const int64_t d = 64;
    MlpOptions mo;
    mo.dim = d;
    mo.hidden = {256, 256, 256};
    auto base = std::make_shared<MlpVelocity>(mo, schedule, 1);
    ClassifierOptions co;
    co.dim = d;
    co.hidden = {256, 64};
    co.classes = 10;
    auto reward = std::make_shared<ClassifierReward>(std::make_shared<MlpClassifier>(co, 3), 3);
    s.model = make_finetuned(base, FineTuneMode::residual, {256, 256}, 16, 2);
    s.loss = std::make_unique<AdjointMatching>(s.model, reward, make_memoryless_noise(1.0 / 40),
                                               bench_options(64, 40, 10, 10, taped));
    s.batch = 64;
    s.label = "digits model, K=40";
    s.base = {d, 17, {256, 256, 256}};
    s.residual = {d, 17, {256, 256}};
    s.reward_flops = 2 * 2.0 * (64 * 256 + 256 * 64 + 64 * 10);
  }
  return s;
}

// The matrix work of one iteration of either path (see the file comment of src/train/adjoint_matching.cpp).
double iteration_flops(const Setup& s) {
  const AdjointMatchingOptions& o = s.loss->options();
  const bool taped = s.loss->taped();
  const double B = static_cast<double>(s.batch), K = static_cast<double>(o.num_steps);
  const double S = static_cast<double>(o.loss_early_steps + o.loss_late_steps);
  const double base_fwd = s.base.defined() ? s.base.forward(taped) : 0.0;
  const double base_vjp = s.base.defined() ? s.base.vjp(taped) : 0.0;
  const double res_fwd = s.residual.forward(taped);
  double rows = (K - 1) * (base_fwd + res_fwd);  // the rollout (the final noiseless step is not simulated)
  rows += K * (taped ? base_vjp : base_fwd + base_vjp) + (taped ? base_fwd : 0.0);  // the lean adjoint
  rows += S * ((taped ? 0.0 : res_fwd) + s.residual.param_grads());  // the regression
  if (taped && o.final_noiseless_step) rows += res_fwd;  // the last step's residual is not taped by the rollout
  rows += s.reward_flops;
  return B * rows;
}

void set_threads() {
  static const bool done = [] {
    const char* env = std::getenv("TILT_THREADS");
    at::set_num_threads(env ? std::atoi(env) : 2);
    return true;
  }();
  (void)done;
}

void label(benchmark::State& state, const Setup& s) {
  state.SetLabel(s.label);
  state.counters["batch"] = static_cast<double>(s.batch);
}

// One Euler-Maruyama step of the fine-tuned SDE (a forward pass of base + residual network).
void BM_SamplerStep(benchmark::State& state) {
  set_threads();
  Setup s = make_setup(static_cast<int>(state.range(0)));
  Generator gen = make_generator(1);
  const Tensor x0 = at::randn({s.batch, s.model->dim()}, gen);
  const TimeGrid one_step({0.5, 0.5 + 1.0 / s.loss->options().num_steps});
  for (auto _ : state) benchmark::DoNotOptimize(simulate(s.loss->finetuned_sde(), x0, one_step, gen).x.back());
  label(state, s);
}

// The Gaussian mixture's velocity and VJP at one time (a rollout's and a lean adjoint's step through a mixture base),
// on the random family's anisotropic mixtures (random_tilt_problem, seed 3) in d = range(0) dimensions, 256 rows in
// float32: range(1) = 1 the fused loop over the rows, 0 the tensor expressions (taken when x wants a graph), to
// choose where the fused loop's O(K d^2) rotations stop paying (kFusedRotationMaxDim in src/model/gmm.cpp).
void BM_MixtureVjp(benchmark::State& state) {
  set_threads();
  const int64_t d = state.range(0);
  const bool fused = state.range(1) == 1;
  const GmmVelocity field(random_tilt_problem(d, 3).base, make_linear_schedule());
  Generator gen = make_generator(1);
  Tensor x = at::randn({256, d}, gen);
  const Tensor a = at::randn({256, d}, gen);
  if (!fused) x.requires_grad_(true);
  for (auto _ : state) {
    Tensor v;
    benchmark::DoNotOptimize(field.vjp(x, 0.5, a, &v));
  }
  state.SetLabel(fused ? "fused loop" : "tensor expressions");
}

// One step of the lean adjoint: a vector-Jacobian product through the frozen base drift (autograd for an
// MLP base: VelocityField::vjp; the closed form for the mixture).
void BM_AdjointStep(benchmark::State& state) {
  set_threads();
  Setup s = make_setup(static_cast<int>(state.range(0)));
  Generator gen = make_generator(1);
  const Tensor x = at::randn({s.batch, s.model->dim()}, gen);
  const Tensor a = at::randn({s.batch, s.model->dim()}, gen);
  const VelocityField& base = *s.model->base();
  for (auto _ : state) benchmark::DoNotOptimize(base.VelocityField::vjp(x, 0.5, a));
  label(state, s);
}

// The same step by hand (MlpVelocity::vjp: one forward, the transposed chain), MLP bases only.
void BM_AdjointStepByHand(benchmark::State& state) {
  set_threads();
  Setup s = make_setup(static_cast<int>(state.range(0)));
  Generator gen = make_generator(1);
  const Tensor x = at::randn({s.batch, s.model->dim()}, gen);
  const Tensor a = at::randn({s.batch, s.model->dim()}, gen);
  for (auto _ : state) benchmark::DoNotOptimize(s.model->base()->vjp(x, 0.5, a));
  label(state, s);
}

// A whole training iteration: rollout, lean adjoint, loss, backward, Adam; range(1) = 1 for the taped path.
// The trainer of a benchmark: as many steps as asked for, no progress bar, no clipping.
TrainerOptions bench_trainer() {
  TrainerOptions to;
  to.iterations = 1 << 30;
  to.progress = false;
  to.grad_clip = 0;
  return to;
}

void run_iteration(benchmark::State& state, Setup& s, Precision precision = Precision::float32) {
  TrainerOptions to = bench_trainer();
  to.precision = precision;
  // Peak memory is counted from before the first iteration: the taped path keeps its tapes (and Adam
  // its moments) from one iteration to the next.
  const int64_t before = counting_allocator ? counting_allocator->reset_peak() : 0;
  Trainer trainer(*s.loss, to);
  for (int i = 0; i < 2; ++i) trainer.step();  // warm-up
  AdjointMatchingTimes times;
  s.loss->set_timer(&times);
  double peak_bytes = 0;
  for (auto _ : state) {
    if (counting_allocator) counting_allocator->reset_peak();
    benchmark::DoNotOptimize(trainer.step().loss);
    if (counting_allocator) peak_bytes = std::max(peak_bytes, static_cast<double>(counting_allocator->peak() - before));
  }
  s.loss->set_timer(nullptr);
  const double n = static_cast<double>(state.iterations());
  state.counters["rollout_ms"] = 1e3 * times.rollout_s / n;
  state.counters["adjoint_ms"] = 1e3 * times.adjoint_s / n;
  state.counters["regression_ms"] = 1e3 * times.regression_s / n;
  if (s.residual.defined()) {  // the MLP problems' matrix work, counted by hand
    state.counters["GFLOP/s"] = benchmark::Counter(iteration_flops(s) / 1e9, benchmark::Counter::kIsIterationInvariantRate);
    state.counters["GFLOP"] = iteration_flops(s) / 1e9;
  }
  state.counters["peak_MB"] = peak_bytes / 1e6;
  label(state, s);
}

void BM_Iteration(benchmark::State& state) {
  set_threads();
  Setup s = make_setup(static_cast<int>(state.range(0)), state.range(1) != 0);
  run_iteration(state, s);
  state.SetLabel(s.label + (s.loss->taped() ? ", taped" : ", autograd"));
}

// How time and memory grow: the 64-D problem's family at dimension d, batch B and K steps.
void BM_Scaling(benchmark::State& state) {
  set_threads();
  Setup s = mlp_setup(state.range(0), state.range(1), state.range(2), state.range(3) != 0);
  s.label = "d=" + std::to_string(state.range(0)) + " B=" + std::to_string(state.range(1)) +
            " K=" + std::to_string(state.range(2)) + (state.range(3) ? ", taped" : ", autograd");
  run_iteration(state, s);
}

// A U-Net base on 1 x 28 x 28 images (docs/equations.md, E124: the default 32 x {1, 2, 2} channels, 2 blocks per level,
// untrained: only the cost matters), fine-tuned in mode M (0 residual U-Net, 1 full copy, 2 LoRA rank 4) with batch B
// and K steps, towards a quadratic reward (negligible cost); autograd (a U-Net has no taped passes), but with
// tape_activations as by default: the residual mode keeps the base's forward graphs of the rollout for the lean adjoint
// (`keep_base` false: runs the base again, BM_UNetKeptBase/0). The loss steps are K/4 early and K/4 late.
Setup unet_setup(FineTuneMode mode, int64_t B, int64_t K, bool keep_base = true) {
  const auto schedule = make_linear_schedule();
  auto base = std::make_shared<UNetVelocity>(UNetOptions{}, schedule, 1);
  const int64_t d = base->dim();
  auto reward = std::make_shared<QuadraticReward>(at::zeros({d}, kDouble), 0.1 * at::eye(d, kDouble));
  Setup s;
  s.model = make_finetuned(base, mode, {}, 0, 2, LoraOptions{4, 4.0});
  s.loss = std::make_unique<AdjointMatching>(s.model, reward, make_memoryless_noise(1.0 / K),
                                             bench_options(B, K, K / 4, K / 4, keep_base));
  s.batch = B;
  s.label = "U-Net 28x28 " + to_string(mode) + ", B=" + std::to_string(B) + " K=" + std::to_string(K);
  if (s.loss->keeps_base_forward()) s.label += ", base graphs kept";
  return s;
}

void BM_UNetIteration(benchmark::State& state) {
  set_threads();
  Setup s = unet_setup(static_cast<FineTuneMode>(state.range(0)), state.range(1), state.range(2));
  int64_t trainable = 0;
  for (const Tensor& p : s.model->parameters()) trainable += p.numel();
  state.counters["trainable_params"] = static_cast<double>(trainable);
  run_iteration(state, s);
}

// The U-Net computed in one call per batch (parallel_rows false): how every sampler ran it before a bound field
// split its rows.
class OneCall : public VelocityField {
 public:
  explicit OneCall(VelocityFieldPtr field) : VelocityField(field->schedule()), field_(std::move(field)) {}
  std::string kind() const override { return field_->kind(); }
  int64_t dim() const override { return field_->dim(); }
  int64_t condition_dim() const override { return field_->condition_dim(); }
  using VelocityField::velocity;
  Tensor velocity(const Tensor& x, const Tensor& t) const override { return field_->velocity(x, t); }
  Tensor conditional_velocity(const Tensor& x, const Tensor& t, const Tensor& c) const override {
    return field_->conditional_velocity(x, t, c);
  }

 private:
  VelocityFieldPtr field_;
};

// Sampling the class-conditional U-Net (BM_UNetIteration's, with 10 classes: Fashion-MNIST's) by K = 10
// Euler-Maruyama steps of the memoryless SDE, batch B, a class per row, guidance weight W: in one call per step
// (S = 0) or on one block of rows per thread (S = 1, what bind_condition gives without gradients: `tilt sample`, the
// evaluations, and the rollouts that run without gradients; under autograd the bound field's velocity is one call).
void BM_UNetSampling(benchmark::State& state) {
  set_threads();
  UNetOptions o;
  o.condition_dim = 10;
  const auto schedule = make_linear_schedule();
  VelocityFieldPtr net = std::make_shared<UNetVelocity>(o, schedule, 1);
  if (state.range(0) == 0) net = std::make_shared<OneCall>(net);
  const int64_t B = state.range(1), K = 10;
  const double w = static_cast<double>(state.range(2));
  Generator gen = make_generator(2);
  const Tensor c = at::eye(10).index_select(0, at::arange(B, at::kLong).remainder(10));
  const GenerativeSDE sde(bind_condition(net, c, w), make_memoryless_noise(1.0 / K));
  const Tensor x0 = at::randn({B, net->dim()}, gen);
  const TimeGrid grid = TimeGrid::uniform(K);
  at::NoGradGuard no_grad;  // as tilt sample and the evaluations run it
  for (auto _ : state) benchmark::DoNotOptimize(simulate(sde, x0, grid, gen).x.back());
  state.SetLabel(std::string("U-Net 28x28, 10 classes, B=") + std::to_string(B) + " K=10 w=" +
                 std::to_string(state.range(2)) + (state.range(0) ? ", row blocks" : ", one call"));
}

// BM_UNetIteration's residual iteration at B = 8, K = 10 running the base again in the lean adjoint (0) or keeping
// its forward graphs from the rollout (1, the default): time and memory of the trade.
void BM_UNetKeptBase(benchmark::State& state) {
  set_threads();
  Setup s = unet_setup(FineTuneMode::residual, 8, 10, state.range(0) != 0);
  run_iteration(state, s);
}

// BM_UNetIteration's LoRA iteration at B = 8, K = 10 in float32 (0) and under bfloat16 autocast (1; TrainerOptions::
// precision): what the bfloat16 option costs or saves on this machine's CPU (on a GPU: bench/device_bench.cpp).
void BM_UNetPrecision(benchmark::State& state) {
  set_threads();
  Setup s = unet_setup(FineTuneMode::lora, 8, 10);
  s.label += state.range(0) ? ", bfloat16 autocast" : ", float32";
  run_iteration(state, s, state.range(0) ? Precision::bfloat16 : Precision::float32);
}

// Buffered Adjoint Matching (docs/equations.md, E126) on problem P (0-2 as above; 3: the U-Net with LoRA rank 4 of
// BM_UNetIteration at B = 8, K = 10): a refill of 4 batches serves 16 iterations
// (buffer_passes = 4), weights W = 1 "future" (K forward passes of the model per minibatch) or W = 0 "none". One
// benchmark iteration is a whole refill cycle; the counter ms_per_iteration is its time over 16, to set beside
// BM_Iteration/P/1 (the taped AM iteration; the buffer's regression on an MLP takes the tapes too, its refill the
// autograd rollout) or BM_UNetIteration/2/8/10.
std::unique_ptr<BufferedAdjointMatching> make_buffered(const Setup& s, bool weighted) {
  return std::make_unique<BufferedAdjointMatching>(s.model, s.loss->reward(), s.loss->finetuned_sde().noise_ptr(),
                                                   s.loss->options(),
                                                   BufferOptions{4 * s.batch, 4, weighted ? "future" : "none"});
}

void BM_BufferedIteration(benchmark::State& state) {
  set_threads();
  const int problem = static_cast<int>(state.range(0));
  Setup s = problem == 3 ? unet_setup(FineTuneMode::lora, 8, 10) : make_setup(problem);
  const bool weighted = state.range(1) != 0;
  const std::unique_ptr<BufferedAdjointMatching> buffered = make_buffered(s, weighted);
  BufferedAdjointMatching& loss = *buffered;
  const int64_t cycle = loss.iterations_per_refill();
  const int64_t before = counting_allocator ? counting_allocator->reset_peak() : 0;
  Trainer trainer(loss, bench_trainer());
  for (int64_t i = 0; i < cycle; ++i) trainer.step();  // warm-up: one whole cycle
  double peak_bytes = 0, seconds = 0;
  for (auto _ : state) {
    if (counting_allocator) counting_allocator->reset_peak();
    const auto start = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < cycle; ++i) benchmark::DoNotOptimize(trainer.step().loss);
    seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (counting_allocator) peak_bytes = std::max(peak_bytes, static_cast<double>(counting_allocator->peak() - before));
  }
  state.counters["ms_per_iteration"] = 1e3 * seconds / static_cast<double>(state.iterations() * cycle);
  state.counters["peak_MB"] = peak_bytes / 1e6;
  state.SetLabel(s.label + ", buffer 4 batches x 4 passes, weights " + (weighted ? "future" : "none"));
}

// Reinforce Adjoint Matching (docs/equations.md, E128) on problem P (0-2 as above; 3: the U-Net with LoRA rank 4 at
// B = 8, K = 10): B endpoints from the model's K-step ODE and the regression on 4 B noisings, with Adam; to set beside
// BM_Iteration/P/1 and BM_UNetIteration/2/8/10 (the same model, batch and K).
// One Trainer step of `loss` per benchmark iteration, with its peak memory.
void run_iterations(benchmark::State& state, Loss& loss, const std::string& label) {
  const int64_t before = counting_allocator ? counting_allocator->reset_peak() : 0;
  Trainer trainer(loss, bench_trainer());
  for (int i = 0; i < 2; ++i) trainer.step();  // warm-up
  double peak_bytes = 0;
  for (auto _ : state) {
    if (counting_allocator) counting_allocator->reset_peak();
    benchmark::DoNotOptimize(trainer.step().loss);
    if (counting_allocator) peak_bytes = std::max(peak_bytes, static_cast<double>(counting_allocator->peak() - before));
  }
  state.counters["peak_MB"] = peak_bytes / 1e6;
  state.SetLabel(label);
}

// RAM and EAM on setup s as BM_RamIteration and BM_EamIteration (and --tilt_trace) run them: the Adjoint Matching
// setup's model, reward, batch, K and lambda, every other option at its default.
std::unique_ptr<ReinforceAdjointMatching> make_ram(const Setup& s) {
  ReinforceAdjointMatchingOptions o;
  o.batch_size = s.batch;
  o.num_steps = s.loss->options().num_steps;
  o.lambda = s.loss->options().lambda;
  return std::make_unique<ReinforceAdjointMatching>(s.model, s.loss->reward(), o);
}

std::unique_ptr<EfficientAdjointMatching> make_eam(const Setup& s, bool path_weights) {
  EfficientAdjointMatchingOptions o;
  o.batch_size = s.batch;
  o.num_steps = s.loss->options().num_steps;
  o.lambda = s.loss->options().lambda;
  o.path_weights = path_weights;
  return std::make_unique<EfficientAdjointMatching>(s.model, s.loss->reward(), o);
}

void BM_RamIteration(benchmark::State& state) {
  set_threads();
  const int problem = static_cast<int>(state.range(0));
  Setup s = problem == 3 ? unet_setup(FineTuneMode::lora, 8, 10) : make_setup(problem);
  run_iterations(state, *make_ram(s), s.label + ", RAM with 4 noisings per endpoint");
}

// Efficient Adjoint Matching (docs/equations.md, E132) on problem P as above: B endpoints from the model's K-step ODE
// (W = 0) or its memoryless SDE with path weights (W = 1: K base evaluations more), B reward gradients and base
// scores, the regression on 4 B noisings, with Adam.
void BM_EamIteration(benchmark::State& state) {
  set_threads();
  const int problem = static_cast<int>(state.range(0));
  Setup s = problem == 3 ? unet_setup(FineTuneMode::lora, 8, 10) : make_setup(problem);
  const bool weighted = state.range(1) != 0;
  run_iterations(state, *make_eam(s, weighted),
                 s.label + (weighted ? ", EAM, weighted SDE endpoints" : ", EAM, ODE endpoints"));
}

// The machine's float32 matrix-multiply peak: a 2048^3 product, and the iteration's typical shape, with
// ATen's at::mm or with tilt's products (detail::gemm) on all threads.
void BM_PeakGemm(benchmark::State& state) {
  set_threads();
  const int64_t m = state.range(0), k = state.range(1);
  const bool tilt_gemm = state.range(2) != 0;
  Generator gen = make_generator(1);
  const Tensor a = at::randn({m, k}, gen, at::kFloat), b = at::randn({k, k}, gen, at::kFloat);
  const Tensor c = at::empty({m, k}, at::kFloat);
  for (auto _ : state) {
    if (tilt_gemm) {
      detail::gemm(c, a, false, b, false, 0.0);
      benchmark::DoNotOptimize(c.data_ptr());
    } else {
      benchmark::DoNotOptimize(at::mm(a, b));
    }
  }
  state.SetLabel(tilt_gemm ? "tilt: " + detail::gemm_library() : "ATen");
  state.counters["GFLOP/s"] = benchmark::Counter(2.0 * m * k * k / 1e9, benchmark::Counter::kIsIterationInvariantRate);
}

// --tilt_trace=P,N[,LR[,METHOD]]: see the file comment.
int trace(const char* spec) {
  int problem = -1;
  long iterations = 0;
  double lr = 2e-5;
  char method[16] = "am";
  if (std::sscanf(spec, "%d,%ld,%lf,%15s", &problem, &iterations, &lr, method) < 2 || problem < 0 || problem > 3 ||
      iterations < 1 || !(lr > 0)) {
    std::fprintf(stderr, "--tilt_trace=P,N[,LR[,METHOD]]: problem P 0-3, N >= 1 iterations, lr > 0; got '%s'\n", spec);
    return 2;
  }
  const std::string m = method;
  if (m != "am" && m != "ram" && m != "eam" && m != "eam_w" && m != "buf" && m != "buf_w") {
    std::fprintf(stderr, "--tilt_trace: METHOD must be am, ram, eam, eam_w, buf or buf_w, got '%s'\n", method);
    return 2;
  }
  set_threads();
  Setup s = problem == 3 ? unet_setup(FineTuneMode::lora, 8, 10) : make_setup(problem);
  std::unique_ptr<Loss> other;
  if (m == "ram") other = make_ram(s);
  if (m == "eam" || m == "eam_w") other = make_eam(s, m == "eam_w");
  if (m == "buf" || m == "buf_w") other = make_buffered(s, m == "buf_w");
  TrainerOptions to;
  to.iterations = iterations;
  to.progress = false;
  to.grad_clip = 0;
  to.adam.lr = lr;
  Trainer trainer(other ? *other : *s.loss, to);
  for (long i = 0; i < iterations; ++i) {
    const StepResult r = trainer.step();
    std::printf("{\"iteration\": %ld, \"loss\": %.17g, \"grad_norm\": %.17g", static_cast<long>(r.iteration),
                r.loss, r.grad_norm);
    for (const auto& [key, value] : r.output.metrics) std::printf(", \"%s\": %.17g", key.c_str(), value);
    std::printf("}\n");
  }
  return 0;
}

BENCHMARK(BM_UNetIteration)
    ->ArgsProduct({{0, 1, 2}, {8}, {10}})
    ->Args({2, 16, 10})
    ->Args({2, 8, 20})
    ->Iterations(3)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_UNetKeptBase)->Arg(0)->Arg(1)->Iterations(3)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_UNetPrecision)->Arg(0)->Arg(1)->Iterations(3)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_UNetSampling)
    ->ArgsProduct({{0, 1}, {8, 64}, {0}})
    ->Args({0, 64, 2})
    ->Args({1, 64, 2})
    ->Iterations(3)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_SamplerStep)->Arg(0)->Arg(1)->Arg(2)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_AdjointStep)->Arg(0)->Arg(1)->Arg(2)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_MixtureVjp)->ArgsProduct({{2, 10, 12, 16}, {0, 1}})->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_AdjointStepByHand)->Arg(1)->Arg(2)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_Iteration)->ArgsProduct({{0, 1, 2}, {0, 1}})->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_BufferedIteration)->ArgsProduct({{0, 2}, {0, 1}})->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_BufferedIteration)->ArgsProduct({{3}, {0, 1}})->Iterations(1)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_RamIteration)->Arg(0)->Arg(2)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_RamIteration)->Arg(3)->Iterations(3)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_EamIteration)->ArgsProduct({{0, 2}, {0, 1}})->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_EamIteration)->Args({3, 0})->Iterations(3)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_Scaling)
    ->Args({64, 64, 40, 0})->Args({64, 64, 40, 1})->Args({64, 1024, 40, 0})->Args({64, 1024, 40, 1})
    ->Args({16, 256, 40, 0})->Args({16, 256, 40, 1})->Args({256, 256, 40, 0})->Args({256, 256, 40, 1})
    ->Args({64, 256, 20, 0})->Args({64, 256, 20, 1})->Args({64, 256, 80, 0})->Args({64, 256, 80, 1})
    ->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_PeakGemm)
    ->Args({2048, 2048, 0})->Args({2048, 2048, 1})->Args({256, 256, 0})->Args({256, 256, 1})
    ->UseRealTime()->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace tilt

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--tilt_trace=", 13) == 0) return tilt::trace(argv[i] + 13);
  }
  static tilt::CountingAllocator counting(c10::GetCPUAllocator());
  c10::SetCPUAllocator(&counting, /*priority=*/1);
  tilt::counting_allocator = &counting;
  try {
    tilt::keep_cpu_memory();  // as the CLI does (set_threads); TILT_MALLOC=system measures without it
    benchmark::AddCustomContext("tilt_gemm", tilt::matrix_library());
  } catch (const tilt::Error& e) {
    std::fprintf(stderr, "tilt_bench: %s\n", e.what());
    return 2;
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
