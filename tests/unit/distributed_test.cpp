// Shards of the batch in one process (what each rank of a data-parallel run computes), and the
// environment a group is described by. The runs over several processes are in tests/dist.
#include "tilt/core/error.h"
#include "tilt/core/fs.h"
#include "tilt/model/finetuned.h"
#include "tilt/model/gmm.h"
#include "tilt/model/reward.h"
#include "tilt/soc/losses.h"
#include "tilt/soc/problems.h"
#include "tilt/train/adjoint_matching.h"
#include "tilt/train/distributed.h"
#include "tilt/train/trainer.h"

#include "../support/helpers.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <map>

namespace tilt {
namespace {

std::function<const char*(const char*)> fake_env(const std::map<std::string, std::string>& vars) {
  return [vars](const char* name) -> const char* {
    const auto it = vars.find(name);
    return it == vars.end() ? nullptr : it->second.c_str();
  };
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(DistributedEnv, ReadsTheVariablesTorchrunSets) {
  EXPECT_FALSE(distributed_options_from_env(fake_env({})));
  EXPECT_FALSE(distributed_options_from_env(fake_env({{"WORLD_SIZE", "1"}, {"RANK", "0"}})));
  const auto o = distributed_options_from_env(fake_env({{"WORLD_SIZE", "4"},
                                                        {"RANK", "3"},
                                                        {"LOCAL_RANK", "1"},
                                                        {"MASTER_ADDR", "10.0.0.2"},
                                                        {"MASTER_PORT", "29400"},
                                                        {"GLOO_SOCKET_IFNAME", "eth1"}}));
  ASSERT_TRUE(o);
  EXPECT_EQ(o->world_size, 4);
  EXPECT_EQ(o->rank, 3);
  EXPECT_EQ(o->master_addr, "10.0.0.2");
  EXPECT_EQ(o->master_port, 29400);
  EXPECT_EQ(o->interface, "eth1");
  EXPECT_FALSE(o->agent_store);
  // Under torchrun its agent serves the store; the workers are clients under a per-restart prefix.
  const auto t = distributed_options_from_env(fake_env({{"WORLD_SIZE", "2"},
                                                        {"RANK", "0"},
                                                        {"MASTER_ADDR", "127.0.0.1"},
                                                        {"MASTER_PORT", "29400"},
                                                        {"TORCHELASTIC_USE_AGENT_STORE", "True"},
                                                        {"TORCHELASTIC_RESTART_COUNT", "2"}}));
  ASSERT_TRUE(t);
  EXPECT_TRUE(t->agent_store);
  EXPECT_EQ(t->restart_count, 2);
}

TEST(DistributedEnv, MissingOrMalformedVariablesAreNamed) {
  const std::map<std::string, std::string> good{
      {"WORLD_SIZE", "2"}, {"RANK", "1"}, {"MASTER_ADDR", "127.0.0.1"}, {"MASTER_PORT", "29500"}};
  for (const char* name : {"RANK", "MASTER_ADDR", "MASTER_PORT"}) {
    auto vars = good;
    vars.erase(name);
    EXPECT_NE(error_of([&] { distributed_options_from_env(fake_env(vars)); }).find(std::string(name) + " is not set"),
              std::string::npos)
        << name;
  }
  auto vars = good;
  vars["RANK"] = "2";
  EXPECT_NE(error_of([&] { distributed_options_from_env(fake_env(vars)); }).find("RANK=2 is out of range [0, 1]"),
            std::string::npos);
  vars = good;
  vars["MASTER_PORT"] = "http";
  EXPECT_NE(error_of([&] { distributed_options_from_env(fake_env(vars)); }).find("MASTER_PORT='http' is not a whole number"),
            std::string::npos);
  vars = good;
  vars["WORLD_SIZE"] = "-2";
  EXPECT_NE(error_of([&] { distributed_options_from_env(fake_env(vars)); }).find("WORLD_SIZE='-2'"), std::string::npos);
}

// A small Adjoint Matching problem, the same initial network every time it is built.
struct Rig {
  std::shared_ptr<FineTunedVelocity> model;
  std::unique_ptr<AdjointMatching> loss;
  explicit Rig(int64_t batch = 16) {
    auto base = std::make_shared<GmmVelocity>(test::ring_mixture_2d(), make_linear_schedule());
    model = make_finetuned(base, FineTuneMode::residual, {16, 16}, 4, 3);
    AdjointMatchingOptions o;
    o.num_steps = 8;
    o.batch_size = batch;
    o.loss_early_steps = 3;
    o.loss_late_steps = 2;
    o.clip_factor = 0;
    loss = std::make_unique<AdjointMatching>(model, std::make_shared<QuadraticReward>(at::zeros({2}), at::eye(2)),
                                             make_memoryless_noise(), o);
  }
};

TrainerOptions sharded(int64_t shards, int64_t iterations = 1) {
  TrainerOptions o;
  o.iterations = iterations;
  o.adam.lr = 1e-2;
  o.seed = 11;
  o.progress = false;
  o.shards = shards;
  o.grad_clip = 0;
  return o;
}

// The contract that makes N processes compute what one process computes: shard s of iteration i
// draws shard_batch[s] samples from mix_seed(mix_seed(seed, i), s) (shard 0 from mix_seed(seed, i)),
// and the step follows sum_s (shard_batch[s] / batch) * loss_s. Here the loss and the gradient are
// rebuilt shard by shard outside the trainer and compared with its first step.
TEST(Shards, TheStepFollowsTheBatchShareWeightedShardsWithTheirOwnSeeds) {
  Rig trained(16);
  Trainer trainer(*trained.loss, sharded(3));
  const StepResult r = trainer.step();
  EXPECT_EQ(trained.loss->batch_size(), 16);  // restored after the shards

  Rig by_hand(16);
  const uint64_t stream = mix_seed(11, 0);
  const int64_t sizes[3] = {6, 5, 5};  // 16 = 6 + 5 + 5: the first 16 % 3 shards get one more
  at::Tensor total = at::zeros({}, at::kDouble);
  for (int64_t s = 0; s < 3; ++s) {
    Generator gen = make_generator(s == 0 ? stream : mix_seed(stream, static_cast<uint64_t>(s)));
    by_hand.loss->set_batch_size(sizes[s]);
    total = total + by_hand.loss->compute(gen).loss.to(at::kDouble) * (static_cast<double>(sizes[s]) / 16.0);
  }
  total.backward();
  double norm2 = 0;
  for (const auto& p : by_hand.model->parameters()) {
    if (p.grad().defined()) norm2 += p.grad().pow(2).sum().item<double>();
  }
  EXPECT_NEAR(r.loss, total.item<double>(), 1e-6 * std::abs(total.item<double>()));
  EXPECT_NEAR(r.grad_norm, std::sqrt(norm2), 1e-5 * std::sqrt(norm2));

  // One shard is the whole batch from mix_seed(seed, i): the trainer's behaviour without shards.
  Rig plain(16), one(16);
  Generator gen = make_generator(stream);
  const double direct = plain.loss->compute(gen).loss.item<double>();
  Trainer single(*one.loss, sharded(1));
  EXPECT_EQ(single.step().loss, direct);
  EXPECT_GT(std::abs(direct - r.loss), 1e-3 * std::abs(direct));  // shards do change the draws
}

TEST(Shards, ResumingAShardedRunIsExact) {
  const std::string dir = (std::filesystem::temp_directory_path() / ("tilt_shards_" + std::to_string(::getpid()))).string();
  make_directories(dir);
  Rig straight;
  Trainer(*straight.loss, sharded(2, 4)).run();
  Rig first;
  TrainerOptions o2 = sharded(2, 2);
  o2.checkpoint_path = dir + "/ckpt.pt";
  Trainer(*first.loss, o2).run();
  Rig second;
  TrainerOptions o4 = sharded(2, 4);
  Trainer resumed(*second.loss, o4);
  ASSERT_TRUE(resumed.resume(dir + "/ckpt.pt"));
  EXPECT_EQ(resumed.iteration(), 2);
  resumed.run();
  const auto a = straight.model->parameters(), b = second.model->parameters();
  for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(at::equal(a[i], b[i])) << "parameter " << i;
  Rig third;
  Trainer fresh(*third.loss, o4);
  EXPECT_FALSE(fresh.resume(dir + "/absent.pt"));
  std::filesystem::remove_all(dir);
}

// A loss with no batch it can split.
class Scalar : public Loss {
 public:
  std::string name() const override { return "scalar"; }
  std::vector<Tensor> parameters() const override { return {w}; }
  LossOutput compute(Generator&) override { return {w.pow(2).sum(), {}}; }
  Tensor w = at::ones({2}).requires_grad_(true);
};

TEST(Shards, ImpossibleShardingsAreClearErrors) {
  Rig rig(4);
  EXPECT_NE(error_of([&] { Trainer(*rig.loss, sharded(5)); }).find("5 shards of a batch of 4"), std::string::npos);
  Scalar scalar;
  EXPECT_NE(error_of([&] { Trainer(scalar, sharded(2)); }).find("the scalar loss has no batch to split"), std::string::npos);
  EXPECT_NO_THROW(Trainer(scalar, sharded(1)).step());  // without shards a loss needs no batch

  // A batch variance needs two paths in every shard: refused when the trainer is built.
  const auto problem = soc::make_problem("linear_ou", 0);
  auto control = std::make_shared<soc::ControlNetwork>(problem->dim(), problem->horizon(), std::vector<int64_t>{8}, 1);
  soc::SocLossOptions so;
  so.batch_size = 5;
  auto lv = soc::make_soc_loss("log_variance", problem, control, so);
  EXPECT_NE(error_of([&] { Trainer(*lv, sharded(3)); }).find("1 path(s) per batch (or per shard of it) are too few"),
            std::string::npos);
  EXPECT_NO_THROW(Trainer(*lv, sharded(2)));
  EXPECT_EQ(lv->batch_size(), 5);
}

}  // namespace
}  // namespace tilt
