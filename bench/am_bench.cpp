// Where the time of one Adjoint Matching iteration goes (Algorithm 1 of Domingo-Enrich et al., ICLR 2025):
//   rollout     K Euler-Maruyama steps of the fine-tuned SDE, no gradients
//   adjoint     K vector-Jacobian products of the frozen base drift (the lean adjoint)
//   iteration   rollout + adjoint + the regression loss, its backward pass and the Adam step
// and the single steps inside them. Each benchmark runs for two problems:
//   0  the 2-D demo (configs/demo_2d.toml): exact Gaussian-mixture base, residual MLP 3x128, K = 60, batch 256
//   1  a 64-D MLP base (3x256, untrained: only its cost matters), residual MLP 3x256, K = 40, batch 256
// Threads: 2, or TILT_THREADS. Run: build/bench/tilt_bench (see scripts/bench.sh).
// tilt_bench --tilt_trace=P,N[,LR] runs no benchmark: it prints the metrics of N Trainer steps of problem P
// (BM_Iteration's iteration, Adam lr LR, default 2e-5) as JSON lines, so that the PyTorch reference
// (bench/reference/am_reference.py --check) can be compared with it number by number.
#include "tilt/model/finetuned.h"
#include "tilt/model/gmm.h"
#include "tilt/model/mlp.h"
#include "tilt/model/reward.h"
#include "tilt/schedule/schedule.h"
#include "tilt/sde/sampler.h"
#include "tilt/train/adjoint_matching.h"
#include "tilt/train/trainer.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <benchmark/benchmark.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>

namespace tilt {
namespace {

const auto kDouble = at::TensorOptions().dtype(at::kDouble);

struct Setup {
  std::shared_ptr<FineTunedVelocity> model;
  std::unique_ptr<AdjointMatching> loss;
  int64_t batch;
};

Setup make_setup(int problem) {
  const auto schedule = make_linear_schedule();
  VelocityFieldPtr base;
  RewardPtr reward;
  AdjointMatchingOptions am;
  am.batch_size = 256;
  am.clip_factor = 0;
  am.loss_weighting = "velocity";
  std::vector<int64_t> hidden;
  if (problem == 0) {
    std::vector<double> mu;
    for (int k = 0; k < 8; ++k) {
      mu.push_back(3.0 * std::cos(2 * M_PI * k / 8));
      mu.push_back(3.0 * std::sin(2 * M_PI * k / 8));
    }
    auto gmm = std::make_shared<GaussianMixture>(at::ones({8}, kDouble), at::tensor(mu, kDouble).reshape({8, 2}),
                                                 0.25 * at::eye(2, kDouble).expand({8, 2, 2}).clone());
    base = std::make_shared<GmmVelocity>(gmm, schedule);
    reward = std::make_shared<QuadraticReward>(at::tensor({2.5, 0.0}, kDouble), 0.25 * at::eye(2, kDouble));
    am.num_steps = 60;
    am.loss_early_steps = 20;
    am.loss_late_steps = 10;
    hidden = {128, 128, 128};
  } else {
    const int64_t d = 64;
    MlpOptions mo;
    mo.dim = d;
    mo.hidden = {256, 256, 256};
    base = std::make_shared<MlpVelocity>(mo, schedule, 1);
    reward = std::make_shared<QuadraticReward>(at::ones({d}, kDouble), 0.25 * at::eye(d, kDouble));
    am.num_steps = 40;
    am.loss_early_steps = 10;
    am.loss_late_steps = 10;
    hidden = {256, 256, 256};
  }
  Setup s;
  s.model = make_finetuned(base, FineTuneMode::residual, hidden, 16, 2);
  s.loss = std::make_unique<AdjointMatching>(s.model, reward, make_memoryless_noise(1.0 / am.num_steps), am);
  s.batch = am.batch_size;
  return s;
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
  state.SetLabel(state.range(0) == 0 ? "2-D demo, K=60" : "64-D MLP, K=40");
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

// One step of the lean adjoint: a vector-Jacobian product through the frozen base drift.
void BM_AdjointStep(benchmark::State& state) {
  set_threads();
  Setup s = make_setup(static_cast<int>(state.range(0)));
  Generator gen = make_generator(1);
  const Tensor x = at::randn({s.batch, s.model->dim()}, gen);
  const Tensor a = at::randn({s.batch, s.model->dim()}, gen);
  for (auto _ : state) benchmark::DoNotOptimize(s.loss->base_sde().drift_vjp(x, 0.5, a));
  label(state, s);
}

void BM_Rollout(benchmark::State& state) {
  set_threads();
  Setup s = make_setup(static_cast<int>(state.range(0)));
  Generator gen = make_generator(1);
  for (auto _ : state) benchmark::DoNotOptimize(s.loss->rollout(gen).x.back());
  label(state, s);
}

void BM_LeanAdjoint(benchmark::State& state) {
  set_threads();
  Setup s = make_setup(static_cast<int>(state.range(0)));
  Generator gen = make_generator(1);
  const Trajectory traj = s.loss->rollout(gen);
  const AdjointMatchingOptions& o = s.loss->options();
  for (auto _ : state) {
    benchmark::DoNotOptimize(
        lean_adjoint(s.loss->base_sde(), traj.x, s.loss->grid(), *s.loss->reward(), o.lambda, o.final_noiseless_step).a[0]);
  }
  label(state, s);
}

// A whole training iteration: rollout, lean adjoint, loss, backward, Adam.
void BM_Iteration(benchmark::State& state) {
  set_threads();
  Setup s = make_setup(static_cast<int>(state.range(0)));
  TrainerOptions to;
  to.iterations = 1 << 30;
  to.progress = false;
  to.grad_clip = 0;
  Trainer trainer(*s.loss, to);
  for (auto _ : state) benchmark::DoNotOptimize(trainer.step().loss);
  label(state, s);
}

// --tilt_trace=P,N[,LR]: see the file comment.
int trace(const char* spec) {
  int problem = -1;
  long iterations = 0;
  double lr = 2e-5;
  if (std::sscanf(spec, "%d,%ld,%lf", &problem, &iterations, &lr) < 2 || (problem != 0 && problem != 1) ||
      iterations < 1 || !(lr > 0)) {
    std::fprintf(stderr, "--tilt_trace=P,N[,LR]: problem P 0 or 1, N >= 1 iterations, lr > 0; got '%s'\n", spec);
    return 2;
  }
  set_threads();
  Setup s = make_setup(problem);
  TrainerOptions to;
  to.iterations = iterations;
  to.progress = false;
  to.grad_clip = 0;
  to.adam.lr = lr;
  Trainer trainer(*s.loss, to);
  for (long i = 0; i < iterations; ++i) {
    const StepResult r = trainer.step();
    std::printf("{\"iteration\": %ld, \"loss\": %.17g, \"grad_norm\": %.17g", static_cast<long>(r.iteration),
                r.loss, r.grad_norm);
    for (const auto& [key, value] : r.output.metrics) std::printf(", \"%s\": %.17g", key.c_str(), value);
    std::printf("}\n");
  }
  return 0;
}

BENCHMARK(BM_SamplerStep)->Arg(0)->Arg(1)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_AdjointStep)->Arg(0)->Arg(1)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_Rollout)->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_LeanAdjoint)->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_Iteration)->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace tilt

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--tilt_trace=", 13) == 0) return tilt::trace(argv[i] + 13);
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
