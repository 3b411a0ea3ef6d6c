// Configuration files, model files and sample files: round trips and the errors users meet.
#include "tilt/core/error.h"
#include "tilt/core/fs.h"
#include "tilt/io/builders.h"
#include "tilt/io/config.h"
#include "tilt/io/model_io.h"
#include "tilt/io/samples.h"
#include "tilt/model/condition.h"
#include "tilt/model/conditional_gmm.h"
#include "tilt/model/finetuned.h"
#include "tilt/model/gmm.h"

#include "../support/checks.h"
#include "../support/helpers.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>  // at::NoGradGuard; not pulled in by ATen.h since LibTorch 2.0
#include <gtest/gtest.h>

#include <filesystem>

namespace tilt {
namespace {

using test::TempDir;
using test::error_of;
using test::expect_contains;

TEST(Config, ReadsTomlAndRecordsDefaults) {
  TempDir dir;
  atomic_write(dir.file("c.toml"), "seed = 3\n[finetune]\nlr = 1e-3\nhidden = [64, 64]\n");
  Config config(dir.file("c.toml"), {});
  ConfigSection root = config.root();
  EXPECT_EQ(root.integer("seed", 0), 3);
  ConfigSection ft = root.section("finetune");
  EXPECT_DOUBLE_EQ(ft.number("lr", 2e-5), 1e-3);
  EXPECT_EQ(ft.integers("hidden", std::vector<int64_t>{}), (std::vector<int64_t>{64, 64}));
  EXPECT_EQ(ft.integer("batch_size", 40), 40);
  ft.finish();
  root.finish();
  EXPECT_EQ(config.resolved()["finetune"]["batch_size"], 40);
  EXPECT_EQ(config.resolved()["seed"], 3);
}

TEST(Config, UnknownKeyIsNamedWithASuggestion) {
  Config config(Json{{"finetune", {{"lrr", 1e-3}}}}, "test.toml");
  ConfigSection root = config.root();
  ConfigSection ft = root.section("finetune");
  ft.number("lr", 2e-5);
  const std::string msg = error_of([&] { ft.finish(); });
  expect_contains(msg, "unknown key 'finetune.lrr'");
  expect_contains(msg, "did you mean 'finetune.lr'");
  expect_contains(msg, "test.toml");
}

TEST(Config, WrongTypeAndMissingKeysAreNamed) {
  Config config(Json{{"finetune", {{"lr", "fast"}}}}, "test.toml");
  ConfigSection ft = config.root().section("finetune");
  const std::string msg = error_of([&] { ft.number("lr", 1.0); });
  expect_contains(msg, "'finetune.lr' must be a number, got a string \"fast\"");
  expect_contains(error_of([&] { ft.string("path"); }), "'finetune.path' is required but missing");
  expect_contains(error_of([&] { config.root().section("reward"); }), "'reward' is required but missing");
  Config c2(Json{{"n", 2.5}}, "x");
  expect_contains(error_of([&] { c2.root().integer("n"); }), "must be an integer");
}

TEST(Config, OverridesParseJsonValues) {
  Json root = Json::object();
  apply_override(root, "finetune.lr=1e-3");
  apply_override(root, "finetune.noise=constant:0.2");
  apply_override(root, "finetune.hidden=[32,32]");
  apply_override(root, "finetune.flag=true");
  EXPECT_DOUBLE_EQ(root["finetune"]["lr"].get<double>(), 1e-3);
  EXPECT_EQ(root["finetune"]["noise"], "constant:0.2");
  EXPECT_EQ(root["finetune"]["hidden"], Json::array({32, 32}));
  EXPECT_EQ(root["finetune"]["flag"], true);
  EXPECT_THROW(apply_override(root, "novalue"), Error);
}

TEST(Config, SyntaxErrorsNameTheFileAndLine) {
  TempDir dir;
  atomic_write(dir.file("bad.toml"), "seed = 1\n[finetune\nlr = 2\n");
  const std::string msg = error_of([&] { load_config_file(dir.file("bad.toml")); });
  expect_contains(msg, "bad.toml");
  expect_contains(msg, "line 2");
  atomic_write(dir.file("bad.json"), "{\"seed\": }");
  expect_contains(error_of([&] { load_config_file(dir.file("bad.json")); }), "not valid JSON");
  expect_contains(error_of([&] { load_config_file(dir.file("missing.toml")); }), "cannot read config file");
}

TEST(Builders, MixturesAndRewards) {
  Config config(Json{{"data", {{"type", "ring"}, {"components", 4}, {"radius", 2.0}, {"std", 0.5}}},
                     {"reward", {{"type", "quadratic"}, {"center", {1.0, 0.0}}, {"precision", {1.0, 0.5}}, {"lambda", 2.0}}}},
              "test");
  ConfigSection root = config.root();
  auto mixture = read_mixture(root.section("data"));
  EXPECT_EQ(mixture->components(), 4);
  EXPECT_NEAR(mixture->means()[1][1].item<double>(), 2.0, 1e-12);
  EXPECT_NEAR(mixture->covariances()[2][0][0].item<double>(), 0.25, 1e-12);
  double lambda = 0;
  auto reward = read_reward(root.section("reward"), 2, &lambda);
  EXPECT_EQ(lambda, 2.0);
  auto quad = std::dynamic_pointer_cast<const QuadraticReward>(reward);
  ASSERT_TRUE(quad);
  EXPECT_NEAR(quad->matrix()[1][1].item<double>(), 0.5, 1e-12);
  // The reward's dimension must match the data's.
  Config bad(Json{{"reward", {{"type", "linear"}, {"a", {1.0, 2.0, 3.0}}}}}, "test");
  expect_contains(error_of([&] { read_reward(bad.root().section("reward"), 2, &lambda); }), "'reward.a' must have 2 entries");
  Config gmm(Json{{"data", {{"type", "gmm"}, {"means", {{0.0, 0.0}, {1.0}}}}}}, "test");
  expect_contains(error_of([&] { read_mixture(gmm.root().section("data")); }), "data.means");
}

TEST(ModelIo, RoundTripsEveryKind) {
  TempDir dir;
  const auto schedule = make_vp_schedule(0.2, 15.0);
  auto gmm = std::make_shared<GmmVelocity>(test::random_mixture(3, 2, 1), schedule);
  MlpOptions o;
  o.dim = 3;
  o.hidden = {16, 8};
  auto mlp = std::make_shared<MlpVelocity>(o, schedule, 5);
  auto ft_gmm = make_finetuned(gmm, FineTuneMode::residual, {8, 8}, 4, 6);
  auto ft_mlp = make_finetuned(mlp, FineTuneMode::copy, {}, 0, 7);
  {  // make the fine-tuned nets differ from their initialisation
    at::NoGradGuard g;
    for (auto& p : ft_gmm->parameters()) p.add_(0.1);
    for (auto& p : ft_mlp->parameters()) p.add_(0.1);
  }
  Generator gen = make_generator(1);
  const at::Tensor x = at::randn({5, 3}, gen), t = at::rand({5}, gen);
  for (VelocityFieldPtr field : std::vector<VelocityFieldPtr>{gmm, mlp, ft_gmm, ft_mlp}) {
    const std::string path = dir.file(field->kind() + ".pt");
    save_velocity(*field, path, Json{{"lambda", 2.5}});
    const LoadedModel loaded = load_velocity(path);
    EXPECT_EQ(loaded.field->kind(), field->kind());
    EXPECT_EQ(loaded.field->schedule()->name(), "vp");
    EXPECT_EQ(loaded.field->schedule()->parameters()[1].second, 15.0);
    EXPECT_EQ(loaded.info["lambda"], 2.5);
    at::NoGradGuard g;
    EXPECT_TRUE(at::allclose(loaded.field->velocity(x, t), field->velocity(x, t), 1e-6, 1e-6)) << field->kind();
  }
}

// A conditional mixture with a null condition (the average over training conditions, E98) keeps it through a
// model file, inside a fine-tuned model too, so that guidance works on what was saved; one without stays without.
TEST(ModelIo, ConditionalMixtureKeepsItsNullCondition) {
  TempDir dir;
  const auto p0 = test::random_mixture(2, 2, 3);
  const at::Tensor M = at::tensor({1.0, -0.5}, at::kDouble).reshape({2, 1});
  const ConditionalGmmVelocity plain(p0, M, make_linear_schedule());
  const ConditionSet train(at::tensor({-1.0, 0.0, 1.0}, at::kDouble).reshape({3, 1}));
  const auto with_null = std::make_shared<ConditionalGmmVelocity>(
      p0, M, make_linear_schedule(), std::make_shared<GaussianMixture>(plain.marginal(train)));
  const auto ft = make_finetuned(with_null, FineTuneMode::residual, {8}, 4, 2);
  Generator gen = make_generator(4);
  const at::Tensor x = at::randn({6, 2}, gen), t = at::rand({6}, gen), c = at::full({1, 1}, 0.5);
  save_velocity(*ft, dir.file("ft.pt"));
  const VelocityFieldPtr back = load_velocity(dir.file("ft.pt")).field;
  at::NoGradGuard g;
  for (const double w : {0.0, 2.0}) {
    EXPECT_TRUE(at::allclose(bind_condition(back, c, w)->velocity(x, t), bind_condition(ft, c, w)->velocity(x, t), 1e-6,
                             1e-6)) << "guidance " << w;
  }
  save_velocity(plain, dir.file("plain.pt"));
  expect_contains(error_of([&] { bind_condition(load_velocity(dir.file("plain.pt")).field, c, 1.0)->velocity(x, t); }),
                  "no null condition");
  EXPECT_THROW(plain.marginal(ConditionSet::uniform(at::full({1}, -1.0), at::full({1}, 1.0))), Error);
}

TEST(ModelIo, MissingCorruptAndForeignFilesAreErrors) {
  TempDir dir;
  expect_contains(error_of([&] { load_velocity(dir.file("none.pt")); }), "no such file");
  atomic_write(dir.file("garbage.pt"), "this is not a model");
  expect_contains(error_of([&] { load_velocity(dir.file("garbage.pt")); }), "not a tilt model file, or corrupt");
  // A truncated model file.
  auto gmm = std::make_shared<GmmVelocity>(test::ring_mixture_2d(), make_linear_schedule());
  save_velocity(*gmm, dir.file("good.pt"));
  const std::string bytes = read_file(dir.file("good.pt"));
  atomic_write(dir.file("cut.pt"), bytes.substr(0, bytes.size() / 2));
  EXPECT_THROW(load_velocity(dir.file("cut.pt")), Error);
}

TEST(Samples, CsvRoundTripAndErrors) {
  TempDir dir;
  Generator gen = make_generator(2);
  const at::Tensor x = at::randn({50, 3}, gen);
  write_samples_csv(dir.file("s.csv"), x);
  EXPECT_TRUE(at::allclose(read_samples_csv(dir.file("s.csv")), x, 1e-5, 1e-6));
  atomic_write(dir.file("ragged.csv"), "1,2\n3,4\n5\n");
  expect_contains(error_of([&] { read_samples_csv(dir.file("ragged.csv")); }), "line 3: 1 values, but the first row has 2");
  atomic_write(dir.file("nan.csv"), "1,2\n3,nan\n");
  expect_contains(error_of([&] { read_samples_csv(dir.file("nan.csv")); }), "'nan' is not a finite number");
  // Spaces around a number are read on either side, as a hand-written "1.5, 2" has them; hexadecimal is no sample
  // value (strtod read 0x10 as 16); a binary field is shown printable, and a conditions file named as one.
  atomic_write(dir.file("spaces.csv"), "x0,x1\n 1.5 ,2\t\n3, 4\n");
  EXPECT_TRUE(at::equal(read_samples_csv(dir.file("spaces.csv")), at::tensor({1.5f, 2.0f, 3.0f, 4.0f}).reshape({2, 2})));
  atomic_write(dir.file("hex.csv"), "1,0x10\n");
  expect_contains(error_of([&] { read_samples_csv(dir.file("hex.csv")); }), "column 2: '0x10' is not a finite number");
  atomic_write(dir.file("binary.csv"), std::string("1,\x01\x02zz\x7f\n"));
  expect_contains(error_of([&] { read_samples_csv(dir.file("binary.csv")); }), "'??zz?' is not a finite number");
  expect_contains(error_of([&] { read_samples_csv(dir.file("hex.csv"), nullptr, "conditions file"); }),
                  "conditions file '" + dir.file("hex.csv") + "', line 1");
}

}  // namespace
}  // namespace tilt
