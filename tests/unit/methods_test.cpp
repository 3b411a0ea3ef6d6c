// The fine-tuning method registry (tilt/io/methods.h): one reader per method, the same defaults for
// the CLI and C++ callers, per-method tables with the old flat keys still read.
#include "tilt/core/error.h"
#include "tilt/io/methods.h"
#include "tilt/model/gmm.h"
#include "tilt/schedule/schedule.h"
#include "../support/helpers.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <algorithm>

namespace tilt {
namespace {

struct Base2d {
  std::shared_ptr<GmmVelocity> base = std::make_shared<GmmVelocity>(test::ring_mixture_2d(), make_linear_schedule());
  RewardPtr reward = std::make_shared<LinearReward>(at::tensor({1.0, 0.0}, at::kDouble));
};

std::string error_of(const Json& finetune) {
  Base2d s;
  try {
    make_finetune_plan(finetune, *s.base, s.reward, 1.0);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

bool mentions(const std::vector<std::string>& lines, const std::string& text) {
  return std::any_of(lines.begin(), lines.end(), [&](const std::string& l) { return l.find(text) != std::string::npos; });
}

// The library's memoryless offset is one step, h = 1/K, whatever K is (the CLI's rule, now the library's).
TEST(Methods, MemorylessOffsetIsOneStep) {
  Base2d s;
  for (int64_t K : {20, 25, 40, 64}) {  // the default loss steps, 10 + 10, need K >= 20
    const FinetunePlan plan = make_finetune_plan({{"num_steps", K}, {"batch_size", 4}}, *s.base, s.reward, 1.0);
    ASSERT_TRUE(plan.noise_schedule->is_memoryless());
    EXPECT_DOUBLE_EQ(plan.noise_schedule->h(), 1.0 / static_cast<double>(K)) << "K = " << K;
    EXPECT_EQ(plan.method, "adjoint_matching");
    EXPECT_EQ(plan.model_info()["noise"], "memoryless");
  }
}

// Every method builds a loss that computes a finite value on a small problem.
TEST(Methods, EveryMethodBuildsALoss) {
  Base2d s;
  for (const auto& name : finetune_method_names()) {
    if (name.rfind("test_", 0) == 0) continue;  // UsersRegisterTheirOwn's
    Json table{{"method", name}, {"num_steps", 6}, {"batch_size", 4}, {"hidden", {8}}};
    table["adjoint_matching"] = {{"loss_early_steps", 2}, {"loss_late_steps", 2}};  // a note for the others
    if (name == "grpo") table["grpo"] = {{"group_size", 2}};
    const FinetunePlan plan = make_finetune_plan(table, *s.base, s.reward, 1.0);
    ASSERT_TRUE(plan.make_loss) << name;
    auto loss = plan.make_loss(plan.make_model(s.base, 1));
    Generator gen = make_generator(3);
    const LossOutput out = loss->compute(gen);
    EXPECT_TRUE(std::isfinite(out.loss.item<double>())) << name;
    const bool ode = name == "draft" || name == "refl" || name == "ode_adjoint_matching";
    EXPECT_EQ(plan.model_info()["noise"], ode ? "ode" : "memoryless") << name;
  }
}

// Each key a method lists is one it reads: a value of the wrong type is refused, naming the key in
// its table. (A listed key never read would be accepted silently.)
TEST(Methods, ListedKeysAreRead) {
  for (const auto& m : finetune_methods()) {
    for (const auto& key : m.keys) {
      Json table{{key, Json::object({{"x", 1}})}};
      if (key == "reg_clip") table["regulariser"] = "clipped";
      if (key == "reg_power") table["regulariser"] = "pnorm";
      const std::string e = error_of({{"method", m.name}, {"batch_size", 8}, {m.name, table}});
      EXPECT_NE(e.find("'finetune." + m.name + "." + key + "'"), std::string::npos) << m.name << "." << key << ": " << e;
    }
  }
}

TEST(Methods, UnknownKeysInMethodTablesNameKeyAndTable) {
  EXPECT_NE(error_of({{"method", "draft"}, {"draft", {{"draft_kk", 2}}}}).find("unknown key 'finetune.draft.draft_kk'"),
            std::string::npos);
  // The table of a method not chosen: checked by name too.
  const std::string e = error_of({{"ddpo", {{"inner_epoch", 2}}}});
  EXPECT_NE(e.find("'finetune.ddpo.inner_epoch' in [finetune.ddpo]"), std::string::npos) << e;
  EXPECT_NE(error_of({{"draft", 3}}).find("'finetune.draft' must be a table"), std::string::npos);
}

// Old files: a method key flat in [finetune] is read there (and named there), with a note naming the table.
TEST(Methods, FlatKeysStillWork) {
  Base2d s;
  const FinetunePlan plan =
      make_finetune_plan({{"method", "draft"}, {"num_steps", 6}, {"draft_k", 3}}, *s.base, s.reward, 1.0);
  EXPECT_TRUE(mentions(plan.notes, "'finetune.draft_k' belongs in [finetune.draft]")) << plan.notes.size();
  EXPECT_NE(error_of({{"method", "draft"}, {"num_steps", 6}, {"draft_k", 7}}).find("'finetune.draft_k' must be in 1..num_steps"),
            std::string::npos);
  EXPECT_NE(error_of({{"method", "draft"}, {"num_steps", 6}, {"draft", {{"draft_k", 7}}}})
                .find("'finetune.draft.draft_k' must be in 1..num_steps"),
            std::string::npos);
  EXPECT_NE(error_of({{"method", "draft"}, {"draft_k", 2}, {"draft", {{"draft_k", 2}}}}).find("are both given"),
            std::string::npos);
  // Adjoint Matching keys left flat are ignored by the other methods, with a note; other methods' flat keys are unknown.
  const FinetunePlan refl = make_finetune_plan({{"method", "refl"}, {"clip_factor", 0.0}}, *s.base, s.reward, 1.0);
  EXPECT_TRUE(mentions(refl.notes, "finetune.clip_factor is ignored by method = \"refl\""));
  EXPECT_NE(error_of({{"draft_k", 2}}).find("unknown key 'finetune.draft_k'"), std::string::npos);
}

// The same settings give the same loss from the flat key and from the table: same first loss value.
TEST(Methods, FlatAndTableKeysAgree) {
  Base2d s;
  auto first_loss = [&](const Json& table) {
    const FinetunePlan plan = make_finetune_plan(table, *s.base, s.reward, 1.0);
    auto loss = plan.make_loss(plan.make_model(s.base, 1));
    Generator gen = make_generator(5);
    return loss->compute(gen).loss.item<double>();
  };
  const Json common{{"num_steps", 8}, {"batch_size", 4}, {"hidden", {8}}, {"method", "adjoint_matching"}};
  Json flat = common, table = common, other = common;
  flat["loss_early_steps"] = 2, flat["loss_late_steps"] = 1, flat["loss_weighting"] = "velocity";
  table["adjoint_matching"] = {{"loss_early_steps", 2}, {"loss_late_steps", 1}, {"loss_weighting", "velocity"}};
  other["adjoint_matching"] = {{"loss_early_steps", 2}, {"loss_late_steps", 1}};
  EXPECT_EQ(first_loss(flat), first_loss(table));
  EXPECT_NE(first_loss(flat), first_loss(other));  // loss_weighting reached the loss
}

TEST(Methods, UsersRegisterTheirOwn) {
  FinetuneMethod m;
  m.name = "test_constant";
  m.keys = {"value"};
  m.uses_noise = false;
  m.read = [](ConfigSection& table, MethodContext& ctx) {
    const double v = table.number("value", 2.0);
    ctx.plan.make_loss = [v](std::shared_ptr<FineTunedVelocity>) -> std::unique_ptr<Loss> {
      throw Error("not for running: " + std::to_string(v));
    };
  };
  register_finetune_method(m);
  EXPECT_THROW(register_finetune_method(m), Error);
  Base2d s;
  const FinetunePlan plan = make_finetune_plan({{"method", "test_constant"}, {"test_constant", {{"value", 3.0}}}}, *s.base,
                                               s.reward, 1.0);
  EXPECT_EQ(plan.model_info()["noise"], "ode");
  EXPECT_NE(error_of({{"method", "test_constant"}, {"test_constant", {{"valu", 3.0}}}}).find("finetune.test_constant.valu"),
            std::string::npos);
}

}  // namespace
}  // namespace tilt
