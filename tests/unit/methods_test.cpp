// The fine-tuning method registry (tilt/io/methods.h): one reader per method, the same defaults for
// the CLI and C++ callers, per-method tables with the old flat keys still read.
#include "tilt/core/error.h"
#include "tilt/core/fs.h"
#include "tilt/io/config.h"
#include "tilt/io/methods.h"
#include "tilt/model/conditional_gmm.h"
#include "tilt/model/gmm.h"
#include "tilt/schedule/schedule.h"
#include "tilt/soc/loss.h"
#include "tilt/train/adjoint_matching.h"
#include "tilt/train/buffered_adjoint_matching.h"
#include "tilt/train/efficient_adjoint_matching.h"
#include "tilt/train/reinforce_adjoint_matching.h"
#include "tilt/train/trainer.h"
#include "tilt/train/unified_losses.h"
#include "../support/checks.h"
#include "../support/helpers.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>

#include <unistd.h>

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
  for (int64_t K : {21, 25, 40, 64}) {  // the default loss steps, 10 + 10, need K >= 21 (t = 0 has no target)
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
    // nsm needs a Gaussian base (docs/equations.md, E113).
    const std::shared_ptr<GmmVelocity> base =
        name == "nsm" ? std::make_shared<GmmVelocity>(test::isotropic_gaussian({0.5, 0.0}, 1.0), make_linear_schedule()) : s.base;
    const FinetunePlan plan = make_finetune_plan(table, *base, s.reward, 1.0);
    ASSERT_TRUE(plan.make_loss) << name;
    auto loss = plan.make_loss(plan.make_model(base, 1));
    Generator gen = make_generator(3);
    const LossOutput out = loss->compute(gen);
    EXPECT_TRUE(std::isfinite(out.loss.item<double>())) << name;
    const bool ode = name == "draft" || name == "refl" || name == "ode_adjoint_matching" || name == "nets" || name == "ram" || name == "eam";
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

// The unified losses that need a particular base refuse others when the plan is read, naming the key.
TEST(Methods, NsmRefusesAMixtureBase) {
  const std::string e = error_of({{"method", "nsm"}});
  EXPECT_NE(e.find("'finetune.method'"), std::string::npos) << e;
  EXPECT_NE(e.find("Gaussian base"), std::string::npos) << e;
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
  const Json common{{"num_steps", 8}, {"batch_size", 4}, {"hidden", {8}}, {"method", "adjoint_matching"}, {"preset", "paper"}};
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

// [finetune] early_stop = "ess" and its keys reach the trainer; bad values and methods without an ESS are refused,
// naming the key; the default is off.
TEST(Methods, EarlyStopKeys) {
  Base2d s;
  const Json small{{"num_steps", 21}, {"batch_size", 4}};
  EXPECT_TRUE(make_finetune_plan(small, *s.base, s.reward, 1.0).trainer.early_stop.metric.empty());
  Json on = small;
  on["early_stop"] = "ess";
  on["early_stop_window"] = 30;
  on["early_stop_tolerance"] = 0.02;
  on["early_stop_min_iterations"] = 200;
  const FinetunePlan plan = make_finetune_plan(on, *s.base, s.reward, 1.0);
  EXPECT_TRUE(plan.reports_ess);
  EXPECT_EQ(plan.trainer.early_stop.metric, "ess");
  EXPECT_EQ(plan.trainer.early_stop.window, 30);
  EXPECT_DOUBLE_EQ(plan.trainer.early_stop.tolerance, 0.02);
  EXPECT_EQ(plan.trainer.early_stop.min_iterations, 200);
  EXPECT_FALSE(mentions(plan.warnings, "cannot stop this run"));
  Json never = on;
  never["iterations"] = 50;
  EXPECT_TRUE(mentions(make_finetune_plan(never, *s.base, s.reward, 1.0).warnings, "early_stop = \"ess\" cannot stop this run"));

  const auto refused = [&](const std::string& key, const Json& value, const std::string& text) {
    Json t = on;
    t[key] = value;
    const std::string e = error_of(t);
    EXPECT_NE(e.find("'finetune." + key + "'"), std::string::npos) << key << ": " << e;
    EXPECT_NE(e.find(text), std::string::npos) << key << ": " << e;
  };
  refused("early_stop", "loss", "is 'loss', which is not one of: off, ess");
  refused("early_stop_window", 0, "must be in 1..1000000");
  refused("early_stop_tolerance", -0.1, "must be in [0, 1]");
  refused("early_stop_min_iterations", -1, "must be >= 0");
  Json draft = on;
  draft["method"] = "draft";
  const std::string e = error_of(draft);
  EXPECT_NE(e.find("'finetune.early_stop'"), std::string::npos) << e;
  EXPECT_NE(e.find("method = \"draft\" reports no ESS"), std::string::npos) << e;
}

LossOutput signals(double clipped, double top) {
  LossOutput out;
  out.metrics = {{"clipped_fraction", clipped}, {"loss_top_share", top}};
  return out;
}

// dsm_until = tau: Adjoint Matching regresses the steps t_k >= tau only, and denoising score matching on the
// rollouts' path-weighted samples takes the times below (docs/equations.md, E106); one loss, both reported.
TEST(Methods, DsmUntilSplitsTheTimesBetweenTwoRegressions) {
  Base2d s;
  const Json am = {{"loss_early_steps", 4}, {"loss_late_steps", 2}, {"loss_weighting", "velocity"}, {"dsm_until", 0.5}};
  const FinetunePlan plan = make_finetune_plan({{"num_steps", 20}, {"batch_size", 8}, {"hidden", {8}}, {"adjoint_matching", am}},
                                               *s.base, s.reward, 1.0);
  auto loss = plan.make_loss(plan.make_model(s.base, 1));
  const auto* sum = dynamic_cast<const LossSum*>(loss.get());
  ASSERT_NE(sum, nullptr);
  const auto& adjoint = dynamic_cast<const AdjointMatching&>(sum->term(0));
  EXPECT_EQ(sum->term(1).name(), "dsm");
  Generator gen = make_generator(5);
  for (int i = 0; i < 20; ++i) {
    const std::vector<int64_t> steps = adjoint.loss_steps(gen);
    ASSERT_EQ(steps.size(), 6u);
    for (int64_t k : steps) EXPECT_GE(adjoint.grid()[k], 0.5) << "step " << k;
  }
  const LossOutput out = loss->compute(gen);
  EXPECT_TRUE(std::isfinite(out.loss.item<double>()));
  std::vector<std::string> keys;
  for (const auto& m : out.metrics) keys.push_back(m.first);
  EXPECT_TRUE(mentions(keys, "dsm_ess")) << "the second term's metrics are prefixed";
  EXPECT_TRUE(mentions(keys, "loss_top_share"));

  const auto with = [](const Json& extra) {
    Json am = {{"loss_early_steps", 4}, {"loss_late_steps", 2}, {"loss_weighting", "velocity"}};
    for (const auto& [k, v] : extra.items()) am[k] = v;
    return error_of({{"preset", "paper"}, {"num_steps", 20}, {"batch_size", 8}, {"adjoint_matching", am}});
  };
  const std::string key = "'finetune.adjoint_matching.dsm_until'";
  for (double bad : {-0.1, 0.01, 1.0, 2.0}) EXPECT_NE(with({{"dsm_until", bad}}).find(key), std::string::npos) << bad;
  EXPECT_NE(with({{"dsm_until", 0.5}, {"loss_weighting", "control"}}).find(key), std::string::npos);
  EXPECT_EQ(with({{"dsm_until", 0.0}}), "");
  // Too few steps left above tau for the loss steps: the error says why.
  const std::string few = with({{"dsm_until", 0.9}, {"loss_early_steps", 4}, {"loss_late_steps", 2}});
  EXPECT_NE(few.find("loss_t_min = 0.9"), std::string::npos) << few;

  // The weighted samples' rollouts: their integrator and number of steps reach the DSM term (E115).
  const auto dsm_options = [&](const Json& extra) {
    Json table = am;
    for (const auto& [k, v] : extra.items()) table[k] = v;
    const FinetunePlan p = make_finetune_plan({{"preset", "paper"}, {"num_steps", 20}, {"batch_size", 8}, {"hidden", {8}}, {"adjoint_matching", table}},
                                              *s.base, s.reward, 1.0);
    auto l = p.make_loss(p.make_model(s.base, 1));
    return dynamic_cast<const TiltScoreMatching&>(dynamic_cast<const LossSum&>(*l).term(1)).options();
  };
  EXPECT_EQ(dsm_options(Json::object()).num_steps, 20);
  EXPECT_EQ(dsm_options(Json::object()).rollout_integrator, Integrator::euler);
  EXPECT_EQ(dsm_options({{"dsm_rollout_steps", 40}, {"dsm_rollout", "exact"}}).num_steps, 40);
  EXPECT_EQ(dsm_options({{"dsm_rollout", "exact"}}).rollout_integrator, Integrator::exact);
  const std::string steps_key = "'finetune.adjoint_matching.dsm_rollout_steps'";
  for (int64_t bad : {-1, 1, 1000001}) EXPECT_NE(with({{"dsm_until", 0.5}, {"dsm_rollout_steps", bad}}).find(steps_key), std::string::npos) << bad;
  EXPECT_NE(with({{"dsm_until", 0.5}, {"dsm_rollout", "rk4"}}).find("'finetune.adjoint_matching.dsm_rollout'"), std::string::npos);
  EXPECT_TRUE(mentions(make_finetune_plan({{"preset", "paper"}, {"num_steps", 21}, {"adjoint_matching", {{"dsm_rollout_steps", 40}}}}, *s.base, s.reward, 1.0).notes,
                       "dsm_rollout_steps is ignored"));
}

// The [finetune] table as read (defaults filled in) from `finetune` given, and the plan.
std::pair<Json, FinetunePlan> resolved_finetune(const Json& finetune, const VelocityField& base, RewardPtr reward,
                                                ConditionSetPtr conditions = nullptr) {
  Config config(Json{{"finetune", finetune}}, "test");
  ConfigSection root = config.root();
  ConfigSection s = root.section("finetune");
  FinetunePlan plan = read_finetune(s, base, std::move(reward), 1.0, std::move(conditions));
  return {config.resolved().at("finetune"), std::move(plan)};
}

// preset = "small" is the configuration the random problem family passed (README, "Problems nobody tuned for"):
// configs/random_family.toml with num_steps = 20, loss steps 6 + 3, integrator = "exact", dsm_until = 0.5,
// dsm_rollout = "exact" and dsm_rollout_steps = 120, key for key. Keys given win over the preset; where dsm_until
// cannot apply (a conditional base, guidance, the control weighting, too few late steps) it stays off, and the
// defaults of the other methods' tables are theirs.
TEST(Methods, SmallPresetIsTheRandomFamilysConfiguration) {
  Base2d s;
  Json family = load_config_file(std::string(TILT_SOURCE_DIR) + "/configs/random_family.toml").at("finetune");
  family["num_steps"] = 20;
  family["adjoint_matching"]["loss_early_steps"] = 6;
  family["adjoint_matching"]["loss_late_steps"] = 3;
  family["adjoint_matching"]["integrator"] = "exact";
  family["adjoint_matching"]["dsm_until"] = 0.5;
  family["adjoint_matching"]["dsm_rollout"] = "exact";
  family["adjoint_matching"]["dsm_rollout_steps"] = 120;
  Json by_preset = resolved_finetune({{"preset", "small"}}, *s.base, s.reward).first;
  EXPECT_EQ(by_preset.at("preset"), "small");
  by_preset.erase("preset");
  Json by_hand = resolved_finetune(family, *s.base, s.reward).first;
  EXPECT_EQ(by_hand.at("preset"), "paper");
  by_hand.erase("preset");
  EXPECT_EQ(by_preset, by_hand) << "preset:\n" << by_preset.dump(1) << "\nconfigs/random_family.toml:\n" << by_hand.dump(1);

  // The preset's plan: a sum of the AM and DSM regressions, the demo's Adam settings.
  const FinetunePlan plan = resolved_finetune({{"preset", "small"}, {"hidden", {8}}}, *s.base, s.reward).second;
  EXPECT_EQ(plan.num_steps, 20);
  EXPECT_EQ(plan.batch_size, 256);
  EXPECT_DOUBLE_EQ(plan.trainer.adam.lr, 4e-3);
  EXPECT_NE(dynamic_cast<const LossSum*>(plan.make_loss(plan.make_model(s.base, 1)).get()), nullptr);

  // Given keys win, in [finetune] and in the method's table; the loss steps follow K (a third drawn, a sixth last).
  const auto [given, given_plan] = resolved_finetune(
      {{"preset", "small"}, {"lr", 1e-3}, {"num_steps", 12}, {"adjoint_matching", {{"clip_factor", 2.0}}}}, *s.base, s.reward);
  EXPECT_DOUBLE_EQ(given_plan.trainer.adam.lr, 1e-3);
  EXPECT_EQ(given.at("adjoint_matching").at("clip_factor"), 2.0);
  EXPECT_EQ(given.at("adjoint_matching").at("loss_early_steps"), 4);
  EXPECT_EQ(given.at("adjoint_matching").at("loss_late_steps"), 2);
  EXPECT_EQ(given.at("adjoint_matching").at("dsm_until"), 0.5);
  EXPECT_EQ(given.at("adjoint_matching").at("dsm_rollout_steps"), 120) << "120 steps, or 2 num_steps if more";
  EXPECT_EQ(given.at("adjoint_matching").at("integrator"), "exact") << "a given num_steps keeps the exact step";
  EXPECT_EQ(given.at("batch_size"), 256);
  EXPECT_EQ(resolved_finetune({{"preset", "small"}, {"num_steps", 100}}, *s.base, s.reward)
                .first.at("adjoint_matching").at("dsm_rollout_steps"), 200);
  // Where the exact step or the DSM term cannot serve the plan, the K = 60 Euler chain (E135: the exact step
  // integrates the memoryless family to a noiseless last step; K = 20 without DSM misses the family's hard problems).
  const auto chain_of = [&](const Json& finetune) {
    const Json f = resolved_finetune(finetune, *s.base, s.reward).first;
    return std::to_string(f.at("num_steps").get<int64_t>()) + " " + f.at("adjoint_matching").at("integrator").get<std::string>();
  };
  const Json small{{"preset", "small"}};
  const auto with = [&](const Json& extra) {
    Json f = small;
    f.update(extra);
    return f;
  };
  EXPECT_EQ(chain_of(small), "20 exact");
  EXPECT_EQ(chain_of(with({{"noise", "scaled_memoryless:0.5"}})), "20 exact");
  EXPECT_EQ(chain_of(with({{"noise", "memoryless:0.02"}})), "20 exact");
  EXPECT_EQ(chain_of(with({{"noise", "constant:0.5"}})), "60 euler");
  EXPECT_EQ(chain_of(with({{"adjoint_matching", {{"integrator", "euler"}}}})), "60 euler");
  EXPECT_EQ(chain_of(with({{"adjoint_matching", {{"final_noiseless_step", false}}}})), "60 euler");
  EXPECT_EQ(chain_of(with({{"adjoint_matching", {{"dsm_until", 0.0}}}})), "60 euler");
  EXPECT_EQ(chain_of(with({{"adjoint_matching", {{"dsm_until", 0.3}}}})), "20 exact");
  EXPECT_EQ(chain_of(with({{"adjoint_matching", {{"guidance", 1.0}}}})), "60 euler");
  EXPECT_EQ(chain_of(with({{"adjoint_matching", {{"loss_weighting", "control"}}}})), "60 euler");
  EXPECT_EQ(chain_of(with({{"adjoint_matching", {{"buffer_size", 512}}}})), "20 exact");
  EXPECT_NE(dynamic_cast<const LossSum*>(
                resolved_finetune(with({{"hidden", {8}}, {"adjoint_matching", {{"buffer_size", 512}}}}), *s.base, s.reward)
                    .second.make_loss(plan.make_model(s.base, 1)).get()),
            nullptr);
  // Any K from 2 up gives a valid plan; dsm_until only where the steps at t >= 0.5 hold the loss's.
  for (int64_t K = 2; K <= 13; ++K) {
    const Json am = resolved_finetune({{"preset", "small"}, {"num_steps", K}, {"hidden", {8}}}, *s.base, s.reward)
                        .first.at("adjoint_matching");
    const int64_t early = am.at("loss_early_steps"), late = am.at("loss_late_steps");
    EXPECT_GE(early + late, 1) << K;
    EXPECT_LE(early + late, K - 1) << K;
    EXPECT_EQ(am.at("dsm_until") == 0.5, early + late <= K - (K + 1) / 2) << K;
  }
  // dsm_until stays off with the control weighting or guidance, and a given dsm_until wins.
  const auto am_of = [&](const Json& am) {
    return resolved_finetune({{"preset", "small"}, {"adjoint_matching", am}}, *s.base, s.reward).first.at("adjoint_matching");
  };
  EXPECT_EQ(am_of({{"loss_weighting", "control"}}).at("dsm_until"), 0.0);
  EXPECT_EQ(am_of({{"dsm_until", 0.3}}).at("dsm_until"), 0.3);
  EXPECT_EQ(am_of({{"dsm_until", 0.0}}).at("dsm_until"), 0.0);
  EXPECT_EQ(am_of({{"dsm_rollout", "euler"}}).at("dsm_rollout"), "euler");
  EXPECT_EQ(resolved_finetune({{"preset", "paper"}}, *s.base, s.reward).first.at("adjoint_matching").at("dsm_rollout"), "euler")
      << "without the preset, the Euler rollout of the measured dsm_until tables";
  const ConditionalProblem c = random_conditional_problem(2, 2, 3, make_linear_schedule(), 4);
  const Json conditional = resolved_finetune({{"preset", "small"}, {"hidden", {8}}}, *c.base, c.reward,
                                             std::make_shared<const ConditionSet>(c.train)).first;
  EXPECT_EQ(conditional.at("adjoint_matching").at("dsm_until"), 0.0);
  EXPECT_EQ(conditional.at("lr"), 4e-3);
  EXPECT_EQ(conditional.at("num_steps"), 60);
  EXPECT_EQ(conditional.at("adjoint_matching").at("integrator"), "euler");
  EXPECT_EQ(am_of({{"guidance", 1.0}}).at("dsm_until"), 0.0);
  // Another method takes the preset's [finetune] keys and its own table's defaults.
  const Json draft = resolved_finetune({{"preset", "small"}, {"method", "draft"}}, *s.base, s.reward).first;
  EXPECT_EQ(draft.at("lr"), 4e-3);
  EXPECT_EQ(draft.at("num_steps"), 60);
  EXPECT_EQ(draft.at("draft"), resolved_finetune({{"method", "draft"}}, *s.base, s.reward).first.at("draft"));
  // An unknown preset is refused, naming the key and the choices.
  const std::string bad = error_of({{"preset", "large"}});
  EXPECT_NE(bad.find("'finetune.preset'"), std::string::npos) << bad;
  EXPECT_NE(bad.find("small"), std::string::npos) << bad;
  // A given preset = "paper" comes without a note (AutoPresetIsSmallWhereItWasValidated has the note).
  EXPECT_FALSE(mentions(resolved_finetune({{"preset", "paper"}}, *s.base, s.reward).second.notes, "preset"));
}

// preset = "auto", the default, is "small" for Adjoint Matching on a vector base of at most 16 dimensions (where
// "small" was validated) and "paper" elsewhere; the resolved config records which, and the paper's defaults on a
// vector base come with a note naming "small".
TEST(Methods, AutoPresetIsSmallWhereItWasValidated) {
  Base2d s;
  const auto [by_default, default_plan] = resolved_finetune(Json::object(), *s.base, s.reward);
  EXPECT_EQ(by_default, resolved_finetune({{"preset", "small"}}, *s.base, s.reward).first);
  EXPECT_EQ(resolved_finetune({{"preset", "auto"}}, *s.base, s.reward).first.at("preset"), "small");
  EXPECT_EQ(default_plan.preset, "small");
  EXPECT_FALSE(mentions(default_plan.notes, "preset"));
  // Another method: the paper's defaults, with the note.
  const auto [draft, draft_plan] = resolved_finetune({{"method", "draft"}}, *s.base, s.reward);
  EXPECT_EQ(draft.at("preset"), "paper");
  EXPECT_DOUBLE_EQ(draft_plan.trainer.adam.lr, 2e-5);
  EXPECT_TRUE(mentions(draft_plan.notes, "preset = \"small\""));
  EXPECT_FALSE(mentions(resolved_finetune({{"method", "draft"}, {"lr", 1e-3}}, *s.base, s.reward).second.notes, "preset"));
  // Dimensions 16 and 17: the edge of what was validated.
  for (int64_t d : {16, 17}) {
    auto base = std::make_shared<GmmVelocity>(test::isotropic_gaussian(std::vector<double>(d, 0.0), 1.0), make_linear_schedule());
    RewardPtr reward = std::make_shared<LinearReward>(at::ones({d}, at::kDouble));
    const auto [table, plan] = resolved_finetune({{"hidden", {8}}}, *base, reward);
    EXPECT_EQ(table.at("preset"), d <= 16 ? "small" : "paper") << d;
    EXPECT_EQ(mentions(plan.notes, "preset = \"small\""), d > 16) << d;
  }
  // A conditional mixture base is a vector base too (dsm_until stays off: the preset's rule).
  const ConditionalProblem c = random_conditional_problem(2, 2, 3, make_linear_schedule(), 4);
  const Json conditional = resolved_finetune({{"hidden", {8}}}, *c.base, c.reward, std::make_shared<const ConditionSet>(c.train)).first;
  EXPECT_EQ(conditional.at("preset"), "small");
  EXPECT_EQ(conditional.at("lr"), 4e-3);
}

// A resumed run keeps the preset it was started with when [finetune] gives none: its record's, "paper" for a run
// older than the key; a given preset, or a directory without a readable record, leaves the default alone.
TEST(Methods, ResumedRunKeepsItsPreset) {
  Base2d s;
  test::TempDir dir;
  const auto preset_on_resume = [&](const Json& finetune) {
    Config config(Json{{"finetune", finetune}}, "test");
    ConfigSection root = config.root();
    ConfigSection section = root.section("finetune");
    keep_preset_of_run(section, dir.file(""));
    return read_finetune(section, *s.base, s.reward, 1.0).preset;
  };
  const auto record = [&](const std::string& text) { atomic_write(dir.file("config.resolved.json"), text); };
  EXPECT_EQ(preset_on_resume(Json::object()), "small") << "no record";
  record(R"({"finetune": {"lr": 2e-5}})");
  EXPECT_EQ(preset_on_resume(Json::object()), "paper") << "a run started before the key";
  EXPECT_EQ(preset_on_resume({{"preset", "small"}}), "small") << "given";
  record(R"({"finetune": {"preset": "small"}})");
  EXPECT_EQ(preset_on_resume({{"method", "draft"}}), "small");
  record(R"({"finetune": {"preset": "paper"}})");
  EXPECT_EQ(preset_on_resume(Json::object()), "paper");
  // "small" before its exact chain: K = 60 Euler steps, kept on resume (the record says "euler", or nothing); a run
  // on the exact chain keeps it; a given preset other than the record's is left to the resume's check.
  const auto chain_on_resume = [&](const Json& finetune) {
    Config config(Json{{"finetune", finetune}}, "test");
    ConfigSection root = config.root();
    ConfigSection section = root.section("finetune");
    keep_preset_of_run(section, dir.file(""));
    const FinetunePlan plan = read_finetune(section, *s.base, s.reward, 1.0);
    const Json f = config.resolved().at("finetune");
    return plan.preset + " " + std::to_string(plan.num_steps) + " " + f.at("adjoint_matching").at("integrator").get<std::string>();
  };
  record(R"({"finetune": {"preset": "small", "method": "adjoint_matching", "num_steps": 60,
             "adjoint_matching": {"integrator": "euler"}}})");
  EXPECT_EQ(chain_on_resume(Json::object()), "small 60 euler");
  EXPECT_EQ(chain_on_resume({{"preset", "small"}}), "small 60 euler");
  EXPECT_EQ(chain_on_resume({{"preset", "auto"}}), "small 60 euler");
  EXPECT_EQ(chain_on_resume({{"preset", "small"}, {"adjoint_matching", {{"integrator", "exact"}}}}), "small 20 exact");
  EXPECT_EQ(chain_on_resume({{"preset", "paper"}, {"num_steps", 20}, {"adjoint_matching", {{"loss_early_steps", 4}}}}),
            "paper 20 euler");
  record(R"({"finetune": {"preset": "small", "method": "adjoint_matching", "adjoint_matching": {}}})");
  EXPECT_EQ(chain_on_resume(Json::object()), "small 60 euler") << "older than the integrator key";
  record(R"({"finetune": {"preset": "small", "method": "adjoint_matching", "num_steps": 20,
             "adjoint_matching": {"integrator": "exact"}}})");
  EXPECT_EQ(chain_on_resume(Json::object()), "small 20 exact");
  for (const char* damaged : {"{\"finetune\": {\"preset\": 7}}", "{\"finetune\": 3}", "not json"}) {
    record(damaged);
    EXPECT_EQ(preset_on_resume(Json::object()), "small") << damaged;
  }
}

// buffer_size = N > 0 turns Adjoint Matching into its buffered form (E126): N trajectories for N * passes / batch
// iterations; bad values are refused naming the key.
TEST(Methods, BufferSizeMakesBufferedAdjointMatching) {
  Base2d s;
  const Json am = {{"loss_early_steps", 4}, {"loss_late_steps", 2}, {"buffer_size", 24}, {"buffer_passes", 5}};
  const FinetunePlan plan = make_finetune_plan({{"preset", "paper"}, {"num_steps", 20}, {"batch_size", 8}, {"hidden", {8}}, {"adjoint_matching", am}},
                                               *s.base, s.reward, 1.0);
  EXPECT_TRUE(plan.reports_ess);
  auto loss = plan.make_loss(plan.make_model(s.base, 1));
  const auto* buffered = dynamic_cast<const BufferedAdjointMatching*>(loss.get());
  ASSERT_NE(buffered, nullptr);
  EXPECT_EQ(buffered->iterations_per_refill(), 15);
  Generator gen = make_generator(5);
  const LossOutput out = loss->compute(gen);
  EXPECT_TRUE(std::isfinite(out.loss.item<double>()));
  std::vector<std::string> keys;
  for (const auto& m : out.metrics) keys.push_back(m.first);
  for (const char* key : {"ess", "weight_ess", "buffer_age", "reward"}) EXPECT_TRUE(mentions(keys, key)) << key;

  const auto with = [](const Json& extra) {
    Json am = {{"loss_early_steps", 4}, {"loss_late_steps", 2}};
    for (const auto& [k, v] : extra.items()) am[k] = v;
    return error_of({{"preset", "paper"}, {"num_steps", 20}, {"batch_size", 8}, {"adjoint_matching", am}});
  };
  for (int64_t bad : {-8, 12, 4}) {
    EXPECT_NE(with({{"buffer_size", bad}}).find("'finetune.adjoint_matching.buffer_size'"), std::string::npos) << bad;
  }
  EXPECT_NE(with({{"buffer_size", 16}, {"buffer_passes", 0}}).find("'finetune.adjoint_matching.buffer_passes'"), std::string::npos);
  EXPECT_NE(with({{"buffer_size", 16}, {"buffer_weights", "path"}}).find("'finetune.adjoint_matching.buffer_weights'"),
            std::string::npos);
  EXPECT_EQ(with({{"buffer_size", 16}, {"buffer_weights", "none"}}), "");
  // The training chain's step and target (E135): named in their errors; the exact step needs a gamma-family schedule
  // and the noiseless final step.
  EXPECT_NE(with({{"integrator", "heun"}}).find("'finetune.adjoint_matching.integrator'"), std::string::npos);
  EXPECT_NE(with({{"target", "exact"}}).find("'finetune.adjoint_matching.target'"), std::string::npos);
  EXPECT_NE(with({{"integrator", "exact"}, {"final_noiseless_step", false}}).find("'finetune.adjoint_matching.integrator'"),
            std::string::npos);
  const std::string constant = error_of({{"preset", "paper"}, {"num_steps", 20}, {"batch_size", 8}, {"noise", "constant:1"},
                                         {"adjoint_matching", {{"loss_early_steps", 4}, {"loss_late_steps", 2},
                                                               {"integrator", "exact"}}}});
  EXPECT_NE(constant.find("'finetune.adjoint_matching.integrator'"), std::string::npos) << constant;
  EXPECT_EQ(with({{"integrator", "exact"}, {"target", "chain"}}), "");
  const std::string sharded = error_of({{"num_steps", 20}, {"batch_size", 8}, {"shards", 2},
                                        {"adjoint_matching", {{"loss_early_steps", 4}, {"loss_late_steps", 2}, {"buffer_size", 16}}}});
  EXPECT_NE(sharded.find("'finetune.shards'"), std::string::npos) << sharded;
}

// buffer_size with dsm_until (E106, E126): the buffer's regression keeps the times t >= dsm_until, a DSM term on the
// model's weighted rollouts takes the earlier ones; a run killed in the middle of a buffer resumes bit for bit (the
// buffer is the sum's first term's state in the checkpoint).
TEST(Methods, BufferWithDsmUntilKeepsTheLateTimesAndResumesExactly) {
  Base2d s;
  const Json am = {{"loss_early_steps", 4}, {"loss_late_steps", 2}, {"loss_weighting", "velocity"}, {"dsm_until", 0.5},
                   {"buffer_size", 16}, {"buffer_passes", 2}};
  const FinetunePlan plan = make_finetune_plan({{"num_steps", 20}, {"batch_size", 8}, {"hidden", {8}}, {"adjoint_matching", am}},
                                               *s.base, s.reward, 1.0);
  EXPECT_FALSE(plan.shardable);
  auto loss = plan.make_loss(plan.make_model(s.base, 1));
  const auto* sum = dynamic_cast<const LossSum*>(loss.get());
  ASSERT_NE(sum, nullptr);
  const auto* buffered = dynamic_cast<const BufferedAdjointMatching*>(&sum->term(0));
  ASSERT_NE(buffered, nullptr);
  EXPECT_EQ(buffered->iterations_per_refill(), 4);
  EXPECT_EQ(sum->term(1).name(), "dsm");
  Generator gen = make_generator(5);
  for (int i = 0; i < 20; ++i) {
    for (int64_t k : buffered->adjoint_matching().loss_steps(gen)) EXPECT_GE(buffered->adjoint_matching().grid()[k], 0.5);
  }
  const LossOutput out = loss->compute(gen);
  EXPECT_TRUE(std::isfinite(out.loss.item<double>()));
  std::vector<std::string> keys;
  for (const auto& m : out.metrics) keys.push_back(m.first);
  for (const char* key : {"buffer_age", "weight_ess", "dsm_ess"}) EXPECT_TRUE(mentions(keys, key)) << key;

  // 7 iterations straight, against killed at 7 (checkpoint after 6: two iterations into the second buffer) and resumed.
  const std::string ckpt = (std::filesystem::temp_directory_path() /
                            ("tilt_methods_buffer_dsm_" + std::to_string(::getpid()) + ".pt")).string();
  std::filesystem::remove(ckpt);
  auto train = [&](bool kill, bool resume) {
    auto model = plan.make_model(s.base, 1);
    auto l = plan.make_loss(model);
    TrainerOptions o;
    o.iterations = 7;
    o.adam.lr = 1e-2;
    o.seed = 11;
    o.progress = false;
    if (kill || resume) {
      o.checkpoint_path = ckpt;
      o.checkpoint_every = 1;
    }
    Trainer trainer(*l, o);
    if (resume) {
      trainer.load_checkpoint(ckpt);
      EXPECT_EQ(trainer.iteration(), 6);
    }
    struct Killed {};
    try {
      trainer.run([&](const StepResult& r) {
        if (kill && r.iteration == 7) throw Killed{};
      });
    } catch (const Killed&) {
    }
    return model->parameters();
  };
  const std::vector<Tensor> straight = train(false, false);
  train(true, false);
  const std::vector<Tensor> resumed = train(false, true);
  ASSERT_EQ(straight.size(), resumed.size());
  for (size_t i = 0; i < straight.size(); ++i) EXPECT_TRUE(at::equal(straight[i], resumed[i])) << "parameter " << i;
  std::filesystem::remove(ckpt);
}

// method = "ram" (E128): its keys with their checks, the warning that it reaches p* to first order only.
TEST(Methods, RamKeys) {
  Base2d s;
  const FinetunePlan plan = make_finetune_plan({{"method", "ram"}, {"num_steps", 10}, {"batch_size", 8}, {"hidden", {8}},
                                                {"ram", {{"noise_draws", 3}, {"t_max", 0.9}}}},
                                               *s.base, s.reward, 1.0);
  EXPECT_TRUE(mentions(plan.warnings, "first order in lambda"));
  auto loss = plan.make_loss(plan.make_model(s.base, 1));
  const auto* ram = dynamic_cast<const ReinforceAdjointMatching*>(loss.get());
  ASSERT_NE(ram, nullptr);
  EXPECT_EQ(ram->options().noise_draws, 3);
  EXPECT_EQ(ram->options().num_steps, 10);
  EXPECT_DOUBLE_EQ(ram->options().t_max, 0.9);
  EXPECT_EQ(ram->options().critic_hidden, (std::vector<int64_t>{64, 64}));
  EXPECT_EQ(ram->group_size(), 8);
  const auto with = [](const Json& ram) { return error_of({{"method", "ram"}, {"batch_size", 8}, {"ram", ram}}); };
  EXPECT_NE(with({{"noise_draws", 0}}).find("'finetune.ram.noise_draws'"), std::string::npos);
  EXPECT_NE(with({{"group_size", -1}}).find("'finetune.ram.group_size'"), std::string::npos);
  EXPECT_NE(with({{"group_size", 1}}).find("'finetune.ram.group_size'"), std::string::npos);
  EXPECT_NE(with({{"critic_hidden", {16, 0}}}).find("'finetune.ram.critic_hidden'"), std::string::npos);
  EXPECT_EQ(with({{"critic_hidden", Json::array()}}), "");
  EXPECT_NE(with({{"group_size", 3}}).find("must divide batch_size = 8"), std::string::npos);
  EXPECT_NE(with({{"t_min", 0.5}, {"t_max", 0.5}}).find("'finetune.ram.t_max'"), std::string::npos);
  EXPECT_NE(with({{"t_min", -0.1}}).find("'finetune.ram.t_min'"), std::string::npos);
  EXPECT_EQ(with({{"group_size", 4}}), "");
}

// [finetune.eam]: its keys reach the loss; on a mixture base the score is exact unless score_time is set (then a note
// says which blurred base it targets), and out-of-range values fail naming the key.
TEST(Methods, EamKeys) {
  Base2d s;
  const FinetunePlan plan = make_finetune_plan({{"method", "eam"}, {"num_steps", 10}, {"batch_size", 8}, {"hidden", {8}},
                                                {"eam", {{"noise_draws", 3}, {"t_min", 0.1}, {"score_time", 0.9}}}},
                                               *s.base, s.reward, 1.0);
  EXPECT_TRUE(mentions(plan.notes, "blurred by N(0, s^2 I), s = 0.111")) << "score_time set: the velocity's score";
  EXPECT_FALSE(mentions(make_finetune_plan({{"method", "eam"}, {"batch_size", 8}}, *s.base, s.reward, 1.0).notes, "blurred"));
  auto loss = plan.make_loss(plan.make_model(s.base, 1));
  const auto* eam = dynamic_cast<const EfficientAdjointMatching*>(loss.get());
  ASSERT_NE(eam, nullptr);
  EXPECT_EQ(eam->options().noise_draws, 3);
  EXPECT_EQ(eam->options().num_steps, 10);
  EXPECT_DOUBLE_EQ(eam->options().t_min, 0.1);
  Generator gen = make_generator(2);
  EXPECT_TRUE(std::isfinite(loss->compute(gen).loss.item<double>()));
  const auto with = [](const Json& eam) { return error_of({{"method", "eam"}, {"batch_size", 8}, {"eam", eam}}); };
  EXPECT_NE(with({{"noise_draws", 0}}).find("'finetune.eam.noise_draws'"), std::string::npos);
  EXPECT_NE(with({{"score_time", 1.0}}).find("'finetune.eam.score_time'"), std::string::npos);
  EXPECT_NE(with({{"score_time", 0.0}}).find("'finetune.eam.score_time'"), std::string::npos);
  EXPECT_NE(with({{"t_min", 0.5}, {"t_max", 0.4}}).find("'finetune.eam.t_max'"), std::string::npos);
  EXPECT_NE(with({{"critic_hidden", {8}}}).find("critic_hidden"), std::string::npos);
  // path_weights rolls out [finetune] noise, so it is used (no "ignored" note) and must be stochastic.
  const FinetunePlan weighted = make_finetune_plan(
      {{"method", "eam"}, {"batch_size", 8}, {"noise", "scaled_memoryless:0.5"}, {"eam", {{"path_weights", true}}}}, *s.base,
      s.reward, 1.0);
  EXPECT_FALSE(mentions(weighted.notes, "noise is ignored")) << "path weights roll out [finetune] noise";
  EXPECT_TRUE(mentions(make_finetune_plan({{"method", "eam"}, {"batch_size", 8}, {"noise", "memoryless"}}, *s.base, s.reward, 1.0).notes,
                       "noise is ignored"));
  EXPECT_NE(error_of({{"method", "eam"}, {"noise", "ode"}, {"eam", {{"path_weights", true}}}}).find("'finetune.noise'"),
            std::string::npos);
}

// A reward without a gradient (a step function here; a classifier's indicator in the CLI) is refused by every method
// that needs grad r, naming [finetune] method and the ones that take it; ram, ddpo and grpo fine-tune with it.
TEST(Methods, RewardsWithoutAGradientOnlyGoToValueMethods) {
  class Step : public Reward {
   public:
    std::string kind() const override { return "step"; }
    int64_t dim() const override { return 2; }
    Tensor value(const Tensor& x) const override { return x.select(1, 0).gt(0).to(x.scalar_type()); }
    Tensor grad(const Tensor&) const override { throw Error("step: no gradient"); }
    bool differentiable() const override { return false; }
  };
  Base2d s;
  const RewardPtr step = std::make_shared<Step>();
  // The library's own count: the share of coordinates above a threshold, by hand, and no gradient.
  const InkCountReward count(3, 0.25);
  EXPECT_FALSE(count.differentiable());
  const Tensor r = count.value(at::tensor({0.3, 0.2, 1.0, -1.0, 0.25, 0.26}).reshape({2, 3}));
  EXPECT_TRUE(at::allclose(r, at::tensor({2.0 / 3.0, 1.0 / 3.0}))) << r;
  EXPECT_THROW(count.grad(at::zeros({1, 3})), Error);
  EXPECT_THROW(InkCountReward(3, std::nan("")), Error);
  for (const auto& name : finetune_method_names()) {
    if (name.rfind("test_", 0) == 0) continue;
    Json table{{"method", name}, {"num_steps", 6}, {"batch_size", 4}, {"hidden", {8}}};
    if (name == "grpo") table["grpo"] = {{"group_size", 2}};
    const bool values_only = name == "ram" || name == "ddpo" || name == "grpo";
    try {
      const FinetunePlan plan = make_finetune_plan(table, *s.base, step, 1.0);
      EXPECT_TRUE(values_only) << name << " took a reward without a gradient";
      auto loss = plan.make_loss(plan.make_model(s.base, 1));
      Generator gen = make_generator(3);
      EXPECT_TRUE(std::isfinite(loss->compute(gen).loss.item<double>())) << name;
    } catch (const Error& e) {
      const std::string what = e.what();
      EXPECT_FALSE(values_only) << name << ": " << what;
      EXPECT_NE(what.find("'finetune.method'"), std::string::npos) << what;
      EXPECT_NE(what.find("ddpo, grpo, ram"), std::string::npos) << what;
    }
  }
}

// Adjoint Matching's monitor (handed to the trainer): a warning once over half of the terms have been clipped in each
// of the last 20 iterations (not if one of them clipped less), and once the largest 1% of the terms carried over 0.9
// of the loss in most of them; each at most once.
TEST(Methods, MonitorWarnsOnSustainedClippingAndDomination) {
  Base2d s;
  const FinetunePlan plan = make_finetune_plan({{"preset", "paper"}, {"num_steps", 21}, {"batch_size", 4}}, *s.base, s.reward, 1.0);
  ASSERT_TRUE(plan.trainer.monitor);
  auto monitor = make_finetune_plan({{"preset", "paper"}, {"num_steps", 21}, {"batch_size", 4}}, *s.base, s.reward, 1.0).monitor;
  for (int i = 0; i < 19; ++i) EXPECT_EQ(monitor(signals(i == 5 ? 0.4 : 0.9, 0.02)), "") << i;
  for (int i = 0; i < 6; ++i) EXPECT_EQ(monitor(signals(0.9, 0.02)), "") << i;  // the 0.4 is still in the window
  std::string w = monitor(signals(0.9, 0.02));
  EXPECT_NE(w.find("over half of the loss terms are clipped in each of the last 20 iterations"), std::string::npos) << w;
  for (int i = 0; i < 30; ++i) EXPECT_EQ(monitor(signals(0.9, 0.02)), "") << "warned twice";

  auto top = make_finetune_plan({{"preset", "paper"}, {"num_steps", 21}, {"batch_size", 4}}, *s.base, s.reward, 1.0).monitor;
  for (int i = 0; i < 20; ++i) EXPECT_EQ(top(signals(0.0, i % 2 ? 0.95 : 0.3)), "") << i;  // median 0.625
  w = top(signals(0.0, 0.95));  // 11 of the last 20 above 0.9: so is the median
  EXPECT_NE(w.find("the loss is dominated by a few rows"), std::string::npos) << w;
  EXPECT_NE(w.find("loss_weighting = \"velocity\""), std::string::npos) << w;  // the default weighting is "control"
  EXPECT_EQ(top(signals(0.0, 0.95)), "");
  // A run that already weights by velocity is not told to.
  auto velocity = make_finetune_plan({{"preset", "paper"}, {"num_steps", 21}, {"batch_size", 4},
                                      {"adjoint_matching", {{"loss_weighting", "velocity"}}}}, *s.base, s.reward, 1.0).monitor;
  for (int i = 0; i < 19; ++i) EXPECT_EQ(velocity(signals(0.0, 0.95)), "") << i;
  w = velocity(signals(0.0, 0.95));  // the 20th: the window is full
  EXPECT_NE(w.find("the loss is dominated by a few rows"), std::string::npos) << w;
  EXPECT_EQ(w.find("loss_weighting"), std::string::npos) << w;
  EXPECT_NE(w.find("dsm_until = 0.5"), std::string::npos) << w;
  // A run that already splits the times is told to move the split.
  auto split = make_finetune_plan({{"preset", "paper"}, {"num_steps", 20}, {"batch_size", 4},
                                   {"adjoint_matching", {{"loss_weighting", "velocity"}, {"dsm_until", 0.3},
                                                         {"loss_early_steps", 4}, {"loss_late_steps", 4}}}},
                                  *s.base, s.reward, 1.0).monitor;
  for (int i = 0; i < 19; ++i) EXPECT_EQ(split(signals(0.0, 0.95)), "") << i;
  w = split(signals(0.0, 0.95));
  EXPECT_NE(w.find("a larger finetune.adjoint_matching.dsm_until (now 0.3)"), std::string::npos) << w;

  auto calm = make_finetune_plan({{"preset", "paper"}, {"num_steps", 21}, {"batch_size", 4}}, *s.base, s.reward, 1.0).monitor;
  for (int i = 0; i < 100; ++i) EXPECT_EQ(calm(signals(i % 2 ? 0.9 : 0.1, i % 3 ? 0.7 : 0.99)), "") << i;
}

}  // namespace
}  // namespace tilt
