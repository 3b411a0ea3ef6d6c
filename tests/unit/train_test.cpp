// The training loop: exact resume, the NaN guard, checkpoint errors, flow-matching pretraining.
#include "tilt/core/error.h"
#include "tilt/core/fs.h"
#include "tilt/model/finetuned.h"
#include "tilt/model/gmm.h"
#include "tilt/model/reward.h"
#include "tilt/train/adjoint_matching.h"
#include "tilt/train/buffered_adjoint_matching.h"
#include "tilt/train/flow_matching.h"
#include "tilt/train/trainer.h"

#include "../support/helpers.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>  // at::NoGradGuard; not pulled in by ATen.h since LibTorch 2.0
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>

namespace tilt {
namespace {

namespace fs = std::filesystem;

std::string temp_file(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / ("tilt_train_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  return (dir / name).string();
}

// A reward whose gradient turns NaN on demand.
class BreakableReward : public QuadraticReward {
 public:
  BreakableReward() : QuadraticReward(at::zeros({2}), at::eye(2)) {}
  Tensor grad(const Tensor& x) const override {
    Tensor g = QuadraticReward::grad(x);
    return broken ? g * NAN : g;
  }
  mutable bool broken = false;
};

struct Rig {
  std::shared_ptr<FineTunedVelocity> model;
  std::shared_ptr<BreakableReward> reward = std::make_shared<BreakableReward>();
  std::unique_ptr<AdjointMatching> loss;
  explicit Rig(std::vector<int64_t> hidden = {16, 16}) {
    auto base = std::make_shared<GmmVelocity>(test::ring_mixture_2d(), make_linear_schedule());
    model = make_finetuned(base, FineTuneMode::residual, hidden, 4, 3);
    AdjointMatchingOptions o;
    o.num_steps = 8;
    o.batch_size = 16;
    o.loss_early_steps = 3;
    o.loss_late_steps = 2;
    o.clip_factor = 0;
    loss = std::make_unique<AdjointMatching>(model, reward, make_memoryless_noise(), o);
  }
};

TrainerOptions options(int64_t iterations, const std::string& checkpoint = "") {
  TrainerOptions o;
  o.iterations = iterations;
  o.adam.lr = 1e-2;
  o.seed = 11;
  o.progress = false;
  o.checkpoint_path = checkpoint;
  o.checkpoint_every = checkpoint.empty() ? 0 : 1;
  o.lr_schedule = LrSchedule::cosine;
  return o;
}

TEST(Trainer, ResumingFromACheckpointIsExact) {
  Rig straight;
  Trainer(*straight.loss, options(6)).run();

  const std::string ckpt = temp_file("resume.pt");
  const std::string metrics = temp_file("resume.jsonl");
  Rig first;  // killed after iteration 3, as by Ctrl-C; checkpoints every iteration
  TrainerOptions o3 = options(6, ckpt);
  o3.metrics_path = metrics;
  struct Killed {};
  try {
    Trainer(*first.loss, o3).run([](const StepResult& r) {
      if (r.iteration == 3) throw Killed{};
    });
  } catch (const Killed&) {
  }

  Rig second;  // a fresh process would rebuild the model from the config, then load
  TrainerOptions o6 = options(6, ckpt);
  o6.metrics_path = metrics;
  Trainer resumed(*second.loss, o6);
  resumed.load_checkpoint(ckpt);
  EXPECT_EQ(resumed.iteration(), 2);  // the kill came before iteration 3 was checkpointed
  resumed.run();
  const auto a = straight.model->parameters(), b = second.model->parameters();
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(at::equal(a[i], b[i])) << "parameter " << i;
  // The metrics file holds iterations 1..6 once each.
  std::ifstream in(metrics);
  std::string line;
  int lines = 0;
  while (std::getline(in, line)) ++lines;
  EXPECT_EQ(lines, 6);
}

// A checkpoint past the iterations asked for is refused: resumed, the run would train nothing and end as a longer run
// than asked for (`tilt finetune --resume` with fewer iterations wrote the longer run's model as the shorter one's).
TEST(Trainer, ResumingPastTheIterationsAskedForIsRefused) {
  const std::string ckpt = temp_file("past.pt");
  Rig first;
  Trainer(*first.loss, options(4, ckpt)).run();
  Rig second;
  Trainer shorter(*second.loss, options(3, ckpt));
  std::string message;
  try {
    shorter.resume(ckpt);
  } catch (const Error& e) {
    message = e.what();
  }
  EXPECT_NE(message.find("checkpoint '" + ckpt + "' is at iteration 4, past the 3 iterations asked for"),
            std::string::npos)
      << message;
  Rig third;  // as many iterations as the checkpoint holds, or more: resumed
  Trainer same(*third.loss, options(4, ckpt));
  EXPECT_TRUE(same.resume(ckpt));
  EXPECT_EQ(same.iteration(), 4);
}

// Buffered Adjoint Matching keeps its trajectories in the checkpoint: a run killed in the middle of a buffer's
// passes resumes on the same buffer, bit for bit; without the loss's state it refuses to go on.
TEST(Trainer, ResumingBufferedAdjointMatchingMidBufferIsExact) {
  auto make = [](Rig& rig) {
    AdjointMatchingOptions o = rig.loss->options();
    return std::make_unique<BufferedAdjointMatching>(rig.model, rig.reward, make_memoryless_noise(), o,
                                                     BufferOptions{2 * o.batch_size, 2, "future"});
  };
  Rig straight_rig;
  auto straight = make(straight_rig);
  ASSERT_EQ(straight->iterations_per_refill(), 4);
  Trainer(*straight, options(7)).run();

  const std::string ckpt = temp_file("buffered.pt");
  Rig first_rig;
  auto first = make(first_rig);
  struct Killed {};
  try {
    Trainer(*first, options(7, ckpt)).run([](const StepResult& r) {
      if (r.iteration == 7) throw Killed{};  // checkpoint after 6: two iterations into the second buffer
    });
  } catch (const Killed&) {
  }
  Rig second_rig;
  auto second = make(second_rig);
  Trainer resumed(*second, options(7, ckpt));
  resumed.load_checkpoint(ckpt);
  EXPECT_EQ(resumed.iteration(), 6);
  resumed.run();
  const auto a = straight_rig.model->parameters(), b = second_rig.model->parameters();
  for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(at::equal(a[i], b[i])) << "parameter " << i;

  Rig third_rig;  // the same iteration without the buffer
  auto third = make(third_rig);
  third->begin_iteration(6);
  Generator gen = make_generator(1);
  try {
    third->compute(gen);
    ADD_FAILURE() << "continued a buffer it does not have";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("filled at iteration 4"), std::string::npos) << e.what();
  }
}

TEST(Trainer, NanStopsTrainingAndKeepsTheLastCheckpoint) {
  const std::string ckpt = temp_file("nan.pt");
  Rig s;
  Trainer trainer(*s.loss, options(10, ckpt));
  trainer.run();  // 10 good iterations, checkpoint at 10
  TrainerOptions more = options(20, ckpt);
  Rig t;
  Trainer again(*t.loss, more);
  again.load_checkpoint(ckpt);
  const auto before = t.model->parameters()[0].clone();
  t.reward->broken = true;
  try {
    again.run();
    FAIL() << "expected NonFiniteError";
  } catch (const NonFiniteError& e) {
    EXPECT_NE(std::string(e.what()).find("iteration 11"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(at::equal(before, t.model->parameters()[0]));  // not updated
  Rig u;
  Trainer check(*u.loss, options(20));
  check.load_checkpoint(ckpt);
  EXPECT_EQ(check.iteration(), 10);
}

TEST(Trainer, CorruptOrMismatchedCheckpointsAreErrors) {
  const std::string garbage = temp_file("garbage.pt");
  atomic_write(garbage, "not a checkpoint");
  Rig s;
  Trainer trainer(*s.loss, options(2));
  try {
    trainer.load_checkpoint(garbage);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("garbage.pt"), std::string::npos);
  }
  EXPECT_THROW(trainer.load_checkpoint(temp_file("absent.pt")), Error);
  const std::string ckpt = temp_file("small.pt");
  trainer.save_checkpoint(ckpt);
  Rig wider({32, 32});
  Trainer other(*wider.loss, options(2));
  try {
    other.load_checkpoint(ckpt);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("configured differently"), std::string::npos) << e.what();
  }
}

TEST(Trainer, CosineScheduleEndpoints) {
  Rig s;
  TrainerOptions o = options(101);
  o.adam.lr = 1e-3;
  o.lr_final_factor = 0.01;
  Trainer trainer(*s.loss, o);
  EXPECT_DOUBLE_EQ(trainer.learning_rate(0), 1e-3);
  EXPECT_NEAR(trainer.learning_rate(50), 0.5 * (1e-3 + 1e-5), 1e-12);
  EXPECT_NEAR(trainer.learning_rate(100), 1e-5, 1e-15);
}

TEST(Trainer, QuantileInterpolatesBetweenOrderStatistics) {
  EXPECT_DOUBLE_EQ(quantile({5, 1, 3}, 0.5), 3);
  EXPECT_DOUBLE_EQ(quantile({4, 1, 3, 2}, 0.5), 2.5);
  EXPECT_DOUBLE_EQ(quantile({10, 0}, 0.1), 1);
  EXPECT_DOUBLE_EQ(quantile({7}, 0.9), 7);
  EXPECT_THROW(quantile({}, 0.5), Error);
  EXPECT_THROW(quantile({1}, 1.5), Error);
}

std::vector<nlohmann::json> metric_lines(const std::string& path) {
  std::ifstream in(path);
  std::vector<nlohmann::json> out;
  for (std::string line; std::getline(in, line);) out.push_back(nlohmann::json::parse(line));
  return out;
}

// loss_window: each line's loss_median / loss_q10 / loss_q90 are those of the last (up to) 4 losses, also after
// a resume (which counts the kept lines); without it the lines have none. Adjoint Matching reports ess and log_z.
TEST(Trainer, LossWindowSummarisesTheTrailingLosses) {
  const std::string ckpt = temp_file("window.pt"), metrics = temp_file("window.jsonl");
  Rig first;
  TrainerOptions o = options(5, ckpt);
  o.metrics_path = metrics;
  o.loss_window = 4;
  Trainer(*first.loss, o).run();
  Rig second;
  TrainerOptions more = o;
  more.iterations = 9;
  Trainer resumed(*second.loss, more);
  resumed.load_checkpoint(ckpt);
  resumed.run();
  const auto lines = metric_lines(metrics);
  ASSERT_EQ(lines.size(), 9u);
  std::vector<double> losses;
  for (const auto& j : lines) {
    losses.push_back(j["loss"].get<double>());
    const std::vector<double> last(losses.end() - std::min<size_t>(losses.size(), 4), losses.end());
    EXPECT_DOUBLE_EQ(j["loss_median"].get<double>(), quantile(last, 0.5)) << j.dump();
    EXPECT_DOUBLE_EQ(j["loss_q10"].get<double>(), quantile(last, 0.1)) << j.dump();
    EXPECT_DOUBLE_EQ(j["loss_q90"].get<double>(), quantile(last, 0.9)) << j.dump();
    EXPECT_GT(j["ess"].get<double>(), 0.0);
    EXPECT_LE(j["ess"].get<double>(), 1.0 + 1e-12);
    EXPECT_TRUE(j.contains("log_z"));
  }
  EXPECT_NE(lines[8]["loss_median"].get<double>(), lines[8]["loss"].get<double>());

  const std::string plain = temp_file("plain.jsonl");
  Rig third;
  TrainerOptions p = options(2);
  p.metrics_path = plain;
  Trainer(*third.loss, p).run();
  for (const auto& j : metric_lines(plain)) EXPECT_FALSE(j.contains("loss_median")) << j.dump();
}

// The first count at which a PlateauDetector (W = 50, tolerance 0.5%) fires on `values`; 0 if it never does.
int64_t first_plateau(const std::vector<double>& values, int64_t min_iterations = 0) {
  EarlyStopOptions o;
  o.metric = "ess";
  o.window = 50;
  o.tolerance = 0.005;
  o.min_iterations = min_iterations;
  PlateauDetector d(o);
  for (double v : values) {
    d.add(v);
    if (d.plateau()) return d.count();
  }
  return 0;
}

// The early stop's plateau test on synthetic ESS sequences. It compares the medians of two consecutive windows of 50,
// so it fires on a flat sequence as soon as it has 100 values (or min_iterations), on a noisy flat one as soon too,
// never while the sequence rises (even with noise and wild single values: a single-value comparison would fire at
// each of the outliers), and on a rise that levels off at the first count where the window medians differ by at
// most 0.5%: 374 here (the older window's median is then 0.897 against 0.9; at 373 it is 0.895).
TEST(Trainer, PlateauDetectorFiresExactlyOnAPlateau) {
  std::vector<double> rising, flat(300, 0.9), noisy_flat, noisy_rising, rise_then_flat;
  for (int i = 0; i < 600; ++i) {
    const double noise = 0.05 * std::sin(i * 2.399);
    rising.push_back(0.2 + 0.0015 * i);
    noisy_flat.push_back(0.9 + noise);
    noisy_rising.push_back(i % 37 == 36 ? 0.0 : 0.2 + 0.0015 * i + noise);
    rise_then_flat.push_back(i < 300 ? 0.3 + 0.002 * i : 0.9);
  }
  EXPECT_EQ(first_plateau(rising), 0);
  EXPECT_EQ(first_plateau(flat), 100);
  EXPECT_EQ(first_plateau(flat, 150), 150);
  EXPECT_EQ(first_plateau(noisy_flat), 100);
  EXPECT_EQ(first_plateau(noisy_rising), 0);
  EXPECT_EQ(first_plateau(rise_then_flat), 374);
  // A fall is no improvement either.
  std::vector<double> falling;
  for (int i = 0; i < 100; ++i) falling.push_back(0.9 - 0.001 * i);
  EXPECT_EQ(first_plateau(falling), 100);

  EarlyStopOptions o;
  o.window = 3;
  PlateauDetector d(o);
  for (double v : std::vector<double>{0.1, 0.2, NAN, 0.3, 0.3, 0.3}) d.add(v);
  EXPECT_EQ(d.count(), 5);  // the NaN is skipped
  EXPECT_FALSE(d.plateau());
  d.add(0.3);
  EXPECT_DOUBLE_EQ(d.previous_median(), 0.2);
  EXPECT_DOUBLE_EQ(d.recent_median(), 0.3);
  EXPECT_NE(d.describe().find("0.3 over the last 3 iterations against 0.2 over the 3 before"), std::string::npos)
      << d.describe();
  o.window = 0;
  EXPECT_THROW(PlateauDetector{o}, Error);
  o.window = 3;
  o.tolerance = -0.1;
  EXPECT_THROW(PlateauDetector{o}, Error);
}

// An early stop ends the run after the iteration that found the plateau, as a last iteration would: its checkpoint
// is written, its metrics line says why. Resuming it stops again at once; with the early stop off it trains on.
// A loss that does not report the metric is refused at the first step, naming early_stop.
TEST(Trainer, EarlyStopEndsTheRunLikeItsLastIteration) {
  const std::string ckpt = temp_file("early.pt"), metrics = temp_file("early.jsonl");
  Rig first;
  TrainerOptions o = options(20, ckpt);
  o.checkpoint_every = 0;  // only at the end (here: the early stop)
  o.metrics_path = metrics;
  o.early_stop.metric = "ess";
  o.early_stop.window = 2;
  o.early_stop.tolerance = 1e9;  // any pair of windows is a plateau: the first check (iteration 4) stops
  o.early_stop.min_iterations = 3;
  Trainer trainer(*first.loss, o);
  trainer.run();
  EXPECT_EQ(trainer.iteration(), 4);
  EXPECT_NE(trainer.early_stop_reason().find("stopped early at iteration 4: the ess has plateaued, median ess "), std::string::npos)
      << trainer.early_stop_reason();
  auto lines = metric_lines(metrics);
  ASSERT_EQ(lines.size(), 4u);
  EXPECT_EQ(lines[3]["early_stop"].get<std::string>(), trainer.early_stop_reason());
  for (size_t i = 0; i < 3; ++i) EXPECT_FALSE(lines[i].contains("early_stop")) << lines[i].dump();

  Rig second;
  Trainer again(*second.loss, o);
  again.load_checkpoint(ckpt);
  EXPECT_EQ(again.iteration(), 4);
  again.run();
  EXPECT_EQ(again.iteration(), 4);
  EXPECT_FALSE(again.early_stop_reason().empty());
  EXPECT_EQ(metric_lines(metrics).size(), 4u);

  Rig third;
  TrainerOptions off = o;
  off.early_stop.metric.clear();
  Trainer on(*third.loss, off);
  on.load_checkpoint(ckpt);
  on.run();
  EXPECT_EQ(on.iteration(), 20);
  EXPECT_TRUE(on.early_stop_reason().empty());
  EXPECT_EQ(metric_lines(metrics).size(), 20u);

  // A plateau found at the last iteration is the run's ordinary end, not an early stop; resumed with more
  // iterations (the early stop still on) the run stops at once, its ESS being on that plateau.
  const std::string ended = temp_file("ended.jsonl");
  Rig fifth;
  TrainerOptions four = o;
  four.iterations = 4;
  four.metrics_path = ended;
  Trainer natural(*fifth.loss, four);
  natural.run();
  EXPECT_EQ(natural.iteration(), 4);
  EXPECT_TRUE(natural.early_stop_reason().empty()) << natural.early_stop_reason();
  for (const auto& j : metric_lines(ended)) EXPECT_FALSE(j.contains("early_stop")) << j.dump();
  Rig sixth;
  four.iterations = 20;
  Trainer extended(*sixth.loss, four);
  extended.load_checkpoint(ckpt);
  extended.run();
  EXPECT_EQ(extended.iteration(), 4);
  EXPECT_FALSE(extended.early_stop_reason().empty());

  Rig fourth;
  TrainerOptions absent = options(5);
  absent.early_stop.metric = "no_such_metric";
  try {
    Trainer(*fourth.loss, absent).run();
    FAIL() << "a metric the loss does not report was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("early_stop = \"no_such_metric\""), std::string::npos) << e.what();
  }
}

// TrainerOptions::monitor: a warning it returns is written to that iteration's metrics line.
TEST(Trainer, MonitorWarningsReachTheMetricsFile) {
  const std::string metrics = temp_file("monitor.jsonl");
  Rig s;
  TrainerOptions o = options(3);
  o.metrics_path = metrics;
  o.monitor = [](const StepResult& r) { return r.iteration == 2 ? std::string("watch out") : std::string(); };
  Trainer(*s.loss, o).run();
  const auto lines = metric_lines(metrics);
  ASSERT_EQ(lines.size(), 3u);
  EXPECT_FALSE(lines[0].contains("warning"));
  EXPECT_EQ(lines[1]["warning"].get<std::string>(), "watch out");
  EXPECT_FALSE(lines[2].contains("warning"));
}

TEST(FlowMatching, LearnsTheExactVelocityOfAGaussian) {
  const auto schedule = make_linear_schedule();
  auto data = test::isotropic_gaussian({1.0, -1.0}, 0.5);
  MlpOptions o;
  o.dim = 2;
  o.hidden = {64, 64};
  auto model = std::make_shared<MlpVelocity>(o, schedule, 1);
  FlowMatchingOptions fo;
  fo.batch_size = 256;
  FlowMatching loss(model, [data](int64_t n, Generator& g) { return data->sample(n, g); }, fo);
  TrainerOptions to = options(1500);
  to.adam.lr = 3e-3;
  to.adam.weight_decay = 0;
  Trainer(loss, to).run();
  GmmVelocity exact(data, schedule);
  Generator gen = make_generator(3);
  at::NoGradGuard g;
  double err = 0, norm = 0;
  for (double t : {0.1, 0.5, 0.9}) {
    const ScheduleValues s = schedule->at(t);
    const at::Tensor x = s.alpha * data->sample(2000, gen) + s.beta * at::randn({2000, 2}, gen);
    const at::Tensor v = exact.velocity(x, t);
    err += (model->velocity(x, t) - v).pow(2).sum(1).mean().item<double>();
    norm += v.pow(2).sum(1).mean().item<double>();
  }
  EXPECT_LT(err / norm, 0.01) << "relative squared error " << err / norm;
}

}  // namespace
}  // namespace tilt
