// The training loop: exact resume, the NaN guard, checkpoint errors, flow-matching pretraining.
#include "tilt/core/error.h"
#include "tilt/core/fs.h"
#include "tilt/model/finetuned.h"
#include "tilt/model/gmm.h"
#include "tilt/model/reward.h"
#include "tilt/train/adjoint_matching.h"
#include "tilt/train/flow_matching.h"
#include "tilt/train/trainer.h"

#include "../support/helpers.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>  // at::NoGradGuard; not pulled in by ATen.h since LibTorch 2.0
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

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
