// Where is the fine-tuned field wrong, and why does the ODE see it when the memoryless SDE does not?
// Fine-tunes the model `tilt finetune` builds from a config ([finetune]; the problem from [data] and [reward], or a
// random one with --random SEED --dim D: random_tilt_problem), then measures against the exact tilt p*:
//   - the energy distance of memoryless-SDE and ODE samples to exact p*, over the noise floor, averaged over
//     --replicates independent sets (one set's ratio is too noisy: exact_scores.h);
//   - per time t, the fine-tuned velocity's squared error against the exact tilted velocity v* (the flow of p*:
//     docs/equations.md, E105) on x_t ~ p*_t, relative to the size of the tilt |v* - v_base|^2;
//   - hybrid fields, exact before t0 and fine-tuned after (and the reverse), sampled with the SDE and the ODE:
//     which times' errors each sampler pays for.
// One JSON line per run on stdout and in PREFIX.json. Diagnostics of the training target:
//   --metrics PATH       the trainer's metrics.jsonl (loss_top_share, ess, ...);
//   --target exact       regress onto the exact v* at the rollouts' states instead of the method's target: what
//                        the network and the optimiser reach without the target's noise;
//   --adjoint-stats N    train nothing; the statistics of Adjoint Matching's target at the optimum over N
//                        continuations of 16 states per time: bias, variance, tail (docs/equations.md, E106);
//   --grad-variance M    after training, M independent minibatch gradients of the method's loss at the final
//                        parameters: the trace of their covariance, the squared norm of their mean and the ratio.
//
//   tilt_ode_gap CONFIG [--random SEED --dim D] [--iterations N] [--samples N] [--replicates R]
//                [--score-steps K] [--hybrids 0|1] [--metrics PATH] [--target am|exact] [--adjoint-stats N]
//                [--grad-variance M] [--train-seed S] [--out PREFIX] [--set KEY=VALUE]...
#include "adjoint_target.h"
#include "exact_scores.h"
#include "tilted_mixture.h"

#include "tilt/core/error.h"
#include "tilt/core/fs.h"
#include "tilt/io/builders.h"
#include "tilt/io/config.h"
#include "tilt/io/methods.h"
#include "tilt/model/gmm.h"
#include "tilt/model/random_problem.h"
#include "tilt/schedule/noise_schedule.h"
#include "tilt/sde/sampler.h"
#include "tilt/sde/sde.h"
#include "tilt/sde/time_grid.h"
#include "tilt/train/adjoint_matching.h"
#include "tilt/train/trainer.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

using namespace tilt;

namespace {

struct Study : tilt_bench::TiltedMixture {
  FinetunePlan plan;
  int64_t iterations = 0, samples = 2000, replicates = 10, score_steps = 0;  // 0: the fine-tuning grid's K
  bool hybrids = true;
};

Study read_study(const std::string& path, const std::vector<std::string>& sets, int64_t seed, int64_t dim) {
  Config config(path, sets);
  ConfigSection root = config.root();
  root.allow({"seed", "threads", "base", "pretrain", "sample", "eval", "data", "reward"});
  Study s;
  static_cast<tilt_bench::TiltedMixture&>(s) = tilt_bench::read_tilted_mixture(root, path, seed, dim);
  ConfigSection ft = root.section("finetune");
  s.plan = read_finetune(ft, *s.base, s.reward, s.lambda);
  s.iterations = s.plan.trainer.iterations;
  return s;
}

// v_early before t0, v_late from t0 on (the sampler's t is one time per step).
class SwitchedField : public VelocityField {
 public:
  SwitchedField(VelocityFieldPtr early, VelocityFieldPtr late, double t0)
      : VelocityField(late->schedule()), early_(std::move(early)), late_(std::move(late)), t0_(t0) {}
  std::string kind() const override { return "switched"; }
  int64_t dim() const override { return late_->dim(); }
  using VelocityField::velocity;
  Tensor velocity(const Tensor& x, const Tensor& t) const override {
    const Tensor early = (t < t0_).to(x.scalar_type());
    return early * early_->velocity(x, t) + (1 - early) * late_->velocity(x, t);
  }

 private:
  VelocityFieldPtr early_, late_;
  double t0_;
};

// A diagnostic loss: regresses the fine-tuned velocity onto the EXACT tilted velocity v* (E105) at the states of
// the current model's memoryless rollouts (the steps AM's loss would use: `steps` of the K drawn at random). It
// separates the two reasons AM can be slow: noisy regression targets (this loss has none) and the optimisation or the
// network (this loss has them too).
class ExactTargetLoss : public Loss {
 public:
  ExactTargetLoss(std::shared_ptr<FineTunedVelocity> model, VelocityFieldPtr exact, int64_t batch, int64_t K,
                  int64_t steps)
      : model_(std::move(model)), exact_(std::move(exact)), batch_(batch), K_(K), steps_(steps) {}
  std::string name() const override { return "exact_target"; }
  std::vector<Tensor> parameters() const override { return model_->parameters(); }
  LossOutput compute(Generator& gen) override {
    const TimeGrid grid = TimeGrid::uniform(K_);
    std::vector<Tensor> xs;
    {
      at::NoGradGuard no_grad;
      const Tensor x0 = at::randn({batch_, model_->dim()}, gen, at::kFloat);
      SampleOptions record;
      record.record = true;
      xs = simulate(GenerativeSDE(model_, make_memoryless_noise(1.0 / static_cast<double>(K_))), x0, grid, gen, record).x;
    }
    const Tensor perm = at::randperm(K_, gen, at::TensorOptions().dtype(at::kLong));
    Tensor loss = at::zeros({}, at::kFloat);
    for (int64_t i = 0; i < steps_; ++i) {
      const int64_t k = perm[i].item<int64_t>();
      const Tensor t = at::full({batch_}, grid[k], at::kFloat);
      Tensor target;
      {
        at::NoGradGuard no_grad;
        target = exact_->velocity(xs[k], t);
      }
      loss = loss + (model_->velocity(xs[k], t) - target).pow(2).sum(1).mean();
    }
    return {loss / static_cast<double>(steps_), {}};
  }

 private:
  std::shared_ptr<FineTunedVelocity> model_;
  VelocityFieldPtr exact_;
  int64_t batch_, K_, steps_;
};

// The statistics of Adjoint Matching's regression target at the optimum. States X_k of the exact tilted chain
// (memoryless SDE of v*), and from each, `paths` continuations to t = 1 under v*; on each, the lean adjoint a~_k
// through the base's Jacobians, and the velocity-space target D = -rho_k a~_k (rho_k = eta_{t_k}: the model's
// residual v_theta - v_base is regressed onto D). At the optimum E[D | X_k] = v* - v_base (the lean adjoint's
// identity, docs/equations.md), so per state: the bias |mean D - (v* - v_base)|^2 (Monte Carlo error included:
// compare with variance / paths), the variance E|D - mean D|^2, both over |v* - v_base|^2, and the share of
// sum |D - (v* - v_base)|^2 carried by its largest 1% of terms (0.01 for equal terms) and Hill's tail index (the
// median over the states; null where the target is deterministic).
Json adjoint_target_stats(const Study& s, int64_t states, int64_t paths, uint64_t seed) {
  at::NoGradGuard no_grad;
  const int64_t K = s.plan.num_steps, d = s.base_mixture->dim();
  const TimeGrid grid = TimeGrid::uniform(K);
  const GenerativeSDE tilted(s.exact, make_memoryless_noise(1.0 / static_cast<double>(K)));
  Generator gen = make_generator(seed);
  SampleOptions record;
  record.record = true;
  const std::vector<Tensor> xs = simulate(tilted, at::randn({states, d}, gen, at::kFloat), grid, gen, record).x;
  Json rows = Json::array();
  for (const double t_want : {0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9}) {
    const int64_t k = std::max<int64_t>(1, static_cast<int64_t>(std::lround(t_want * static_cast<double>(K))));
    const double t = grid[k];
    double bias = 0, variance = 0, size = 0, top = 0;
    std::vector<double> hill;  // per state
    for (int64_t i = 0; i < states; ++i) {
      const Tensor x = xs[static_cast<size_t>(k)].narrow(0, i, 1).expand({paths, d}).contiguous();
      const Tensor tt = at::full({1}, t, at::kFloat);
      const Tensor want = (s.exact->velocity(x.narrow(0, 0, 1), tt) - s.base->velocity(x.narrow(0, 0, 1), tt)).squeeze(0);
      const Tensor D = tilt_bench::adjoint_targets(s.exact, s.base, *s.schedule, *s.reward, s.lambda, K, k, x, gen);
      const Tensor mean = D.mean(0);
      const Tensor err = (D - want).pow(2).sum(1).to(at::kDouble);
      const int64_t n_top = std::max<int64_t>(1, paths / 100);
      bias += (mean - want).pow(2).sum().item<double>();
      variance += (D - mean).pow(2).sum(1).mean().item<double>();
      size += want.pow(2).sum().item<double>();
      top += std::get<0>(err.topk(n_top)).sum().item<double>() / std::max(err.sum().item<double>(), 1e-300);
      // Hill's estimate of the tail index of |D - (v* - v_base)| from its largest 1% (and one more): the law's
      // variance is infinite below 2 and its mean below 1.
      const Tensor largest = std::get<0>(err.sqrt().topk(n_top + 1));
      const double h = 1.0 / (largest.narrow(0, 0, n_top) / largest[n_top]).log().mean().item<double>();
      if (std::isfinite(h)) hill.push_back(h);
    }
    rows.push_back({{"t", t}, {"bias", bias / size}, {"variance", variance / size},
                    {"mc_error", variance / size / static_cast<double>(paths)}, {"top_share", top / states},
                    {"tail_index", hill.empty() ? Json() : Json(quantile(hill, 0.5))},
                    {"tilt_size", size / states}});
  }
  return rows;
}

// Mean over x_t ~ p*_t of |v(x_t) - v*(x_t)|^2 and of |v*(x_t) - v_base(x_t)|^2 (the tilt's own size).
std::pair<double, double> velocity_error(const Study& s, const VelocityField& v, double t) {
  at::NoGradGuard no_grad;
  Generator g1 = make_generator(31), g0 = make_generator(32);
  const int64_t n = 4000;
  const Tensor x1 = s.target->sample(n, g1, at::kFloat);
  const Tensor x0 = at::randn({n, x1.size(1)}, g0, at::kFloat);
  const ScheduleValues ab = s.schedule->at(t);
  const Tensor xt = ab.alpha * x1 + ab.beta * x0;
  const Tensor tt = at::full({n}, t, at::kFloat);
  const Tensor vs = s.exact->velocity(xt, tt);
  const double err = (v.velocity(xt, tt) - vs).pow(2).sum(1).mean().item<double>();
  const double size = (vs - s.base->velocity(xt, tt)).pow(2).sum(1).mean().item<double>();
  return {err, size};
}

Json ratio_json(const tilt_bench::ReplicatedRatio& r) { return {r.mean, r.standard_error}; }

// SDE and ODE ratios of a field as {"sde": [mean, se], "ode": [mean, se]}; the SDE by Euler-Maruyama unless told.
Json scores(const Study& s, const VelocityFieldPtr& v, double floor, at::ScalarType dtype = at::kFloat,
            Integrator sde_integrator = Integrator::euler) {
  const int64_t K = s.score_steps > 0 ? s.score_steps : s.plan.num_steps;
  const auto [sde, ode] =
      tilt_bench::replicated_ratios(*s.target, v, s.samples, K, floor, s.replicates, dtype, sde_integrator);
  return {{"sde", ratio_json(sde)}, {"ode", ratio_json(ode)}};
}

Json measure(const Study& s, const VelocityFieldPtr& model, double floor) {
  Json out;
  out["model"] = scores(s, model, floor);
  out["exact_field"] = scores(s, s.exact, floor);  // the samplers' own error (float32)
  out["exact_field_double"] = scores(s, s.exact, floor, at::kDouble);
  // The memoryless SDE by the exact gDDIM step instead of Euler: does the sampler or the field miss p*?
  out["model_exact_step_sde"] = scores(s, model, floor, at::kFloat, Integrator::exact)["sde"];
  out["exact_field_exact_step_sde"] = scores(s, s.exact, floor, at::kFloat, Integrator::exact)["sde"];
  Json errors = Json::array();
  for (double t : {0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98}) {
    const auto [err, size] = velocity_error(s, *model, t);
    errors.push_back({{"t", t}, {"error", err}, {"tilt_size", size}, {"relative", err / size}});
  }
  out["velocity_error"] = errors;
  Json hybrids = Json::array();
  if (s.hybrids)
  for (double t0 : {0.1, 0.25, 0.5, 0.75, 0.9}) {
    hybrids.push_back({{"t0", t0},
                       {"exact_then_model", scores(s, std::make_shared<SwitchedField>(s.exact, model, t0), floor)},
                       {"model_then_exact", scores(s, std::make_shared<SwitchedField>(model, s.exact, t0), floor)}});
  }
  out["hybrids"] = hybrids;
  return out;
}

// The variance of the method's minibatch gradient at the final parameters: M gradients of loss.compute() (the
// trainer's batch, the iteration after the last), each from its own generator, flattened over parameters(). Returns
// the trace of their covariance (unbiased over the M), the squared norm of their mean, and the ratio of the two (the
// noise-to-signal ratio: > 1 means a minibatch gradient is mostly noise).
Json gradient_variance(Loss& loss, int64_t iteration, int64_t M, uint64_t seed) {
  std::vector<Tensor> grads;
  const std::vector<Tensor> params = loss.parameters();
  loss.begin_iteration(iteration);
  for (int64_t m = 0; m < M; ++m) {
    for (const Tensor& p : params) {
      if (p.grad().defined()) p.mutable_grad().zero_();
    }
    Generator gen = make_generator(mix_seed(seed, static_cast<uint64_t>(m)));
    loss.compute(gen).loss.backward();
    std::vector<Tensor> flat;
    for (const Tensor& p : params) {
      flat.push_back(p.grad().defined() ? p.grad().detach().to(at::kDouble).flatten() : at::zeros({p.numel()}, at::kDouble));
    }
    grads.push_back(at::cat(flat));
  }
  for (const Tensor& p : params) {
    if (p.grad().defined()) p.mutable_grad().zero_();
  }
  const Tensor G = at::stack(grads);  // [M, P]
  const Tensor mean = G.mean(0);
  const double trace = (G - mean).pow(2).sum().item<double>() / static_cast<double>(M - 1);
  const double mean2 = mean.pow(2).sum().item<double>();
  return {{"minibatches", M}, {"trace_covariance", trace}, {"mean_gradient_norm2", mean2},
          {"noise_to_signal", trace / mean2}};
}

}  // namespace

int main(int argc, char** argv) try {
  if (argc < 2) {
    throw Error("usage: tilt_ode_gap CONFIG [--random SEED --dim D] [--iterations N] [--samples N] [--out PREFIX] "
                "[--replicates R] [--score-steps K] [--hybrids 0|1] [--metrics PATH] [--target am|exact] "
                "[--adjoint-stats PATHS] [--grad-variance M] [--set KEY=VALUE]...");
  }
  at::set_num_threads(1);
  std::vector<std::string> sets;
  int64_t seed = -1, dim = 3, iterations = -1, samples = 2000, replicates = 10, score_steps = 0, stats = 0, grad_var = 0;
  int64_t train_seed = 0;
  bool hybrids = true;
  std::string out = "ode_gap", metrics, target = "am";
  for (int i = 2; i + 1 < argc; i += 2) {
    const std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--random") seed = std::stoll(value);
    else if (flag == "--dim") dim = std::stoll(value);
    else if (flag == "--iterations") iterations = std::stoll(value);
    else if (flag == "--samples") samples = std::stoll(value);
    else if (flag == "--replicates") replicates = std::stoll(value);
    else if (flag == "--score-steps") score_steps = std::stoll(value);
    else if (flag == "--hybrids") hybrids = value != "0";
    else if (flag == "--out") out = value;
    else if (flag == "--set") sets.push_back(value);
    else if (flag == "--metrics") metrics = value;
    else if (flag == "--target") target = value;
    else if (flag == "--adjoint-stats") stats = std::stoll(value);
    else if (flag == "--grad-variance") grad_var = std::stoll(value);
    else if (flag == "--train-seed") train_seed = std::stoll(value);
    else throw Error("unknown option '" + flag + "'");
  }
  Study s = read_study(argv[1], sets, seed, dim);
  if (iterations >= 0) s.iterations = iterations;
  s.samples = samples, s.replicates = replicates, s.score_steps = score_steps, s.hybrids = hybrids;
  if (samples < 2 || replicates < 2 || score_steps < 0) throw Error("--samples and --replicates must be >= 2, --score-steps >= 0");
  const double floor = tilt_bench::precise_noise_floor(*s.target, s.samples);
  // --train-seed S > 0: another network initialisation and another stream of training draws (0: the studies' own).
  auto model = s.plan.make_model(s.base, train_seed == 0 ? 1 : mix_seed(1, static_cast<uint64_t>(train_seed)));
  if (stats > 0) {
    const Json j = {{"problem", s.problem}, {"paths", stats}, {"adjoint_target", adjoint_target_stats(s, 16, stats, 1)}};
    std::cout << j.dump() << std::endl;
    atomic_write(out + ".json", j.dump(1) + "\n");
    return 0;
  }
  if (grad_var == 1 || grad_var < 0) throw Error("--grad-variance must be 0 or >= 2, got " + std::to_string(grad_var));
  if (target != "am" && target != "exact") throw Error("--target must be am or exact, got '" + target + "'");
  const std::unique_ptr<Loss> loss =
      target == "exact" ? std::make_unique<ExactTargetLoss>(model, s.exact, s.plan.batch_size, s.plan.num_steps, 30)
                        : s.plan.make_loss(model);
  TrainerOptions t = tilt_bench::study_trainer(s.plan, s.iterations);
  if (train_seed != 0) t.seed = mix_seed(t.seed, static_cast<uint64_t>(train_seed));
  t.metrics_path = metrics;
  const auto start = std::chrono::steady_clock::now();
  if (s.iterations > 0) Trainer(*loss, t).run();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  // Before measure(), which does not touch the loss: the gradients at the final parameters.
  const Json gv = grad_var > 0 ? gradient_variance(*loss, s.iterations, grad_var, mix_seed(t.seed, 0x67726164)) : Json();
  Json j = measure(s, model, floor);
  if (grad_var > 0) j["gradient_variance"] = gv;
  j["problem"] = s.problem, j["iterations"] = s.iterations, j["train_seconds"] = seconds, j["sets"] = sets;
  j["replicates"] = s.replicates, j["samples"] = s.samples, j["target"] = target, j["train_seed"] = train_seed;
  j["score_steps"] = s.score_steps > 0 ? s.score_steps : s.plan.num_steps;  // the samplers' steps
  std::cout << j.dump() << std::endl;
  atomic_write(out + ".json", j.dump(1) + "\n");
  return 0;
} catch (const std::exception& e) {
  std::cerr << "tilt_ode_gap: error: " << e.what() << "\n";
  return 1;
}
