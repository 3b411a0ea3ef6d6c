// Configuration values that are syntactically fine but nonsense: too deeply nested, duplicated,
// non-finite, out of range or absurdly large. Each must stop while the config is read, with a
// message that names the key (or the file and line) and the limit (docs/config.md).
#include "tilt/core/error.h"
#include "tilt/core/fs.h"
#include "tilt/io/builders.h"
#include "tilt/io/config.h"
#include "tilt/io/sampling_config.h"
#include "tilt/sampling/adjoint_sampling.h"
#include "tilt/sampling/mcmc.h"
#include "tilt/schedule/noise_schedule.h"

#include "../support/checks.h"
#include "../support/helpers.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>

namespace tilt {
namespace {

using test::TempDir;
using test::error_of;
using test::expect_contains;

std::string brackets(size_t depth) { return std::string(depth, '[') + std::string(depth, ']'); }

// nlohmann's parser and destructor recurse; 100,000 nested arrays crashed the process.
TEST(ConfigValidation, DeeplyNestedJsonIsRefusedWithFileAndLine) {
  TempDir dir;
  atomic_write(dir.file("deep.json"), "{\n\"seed\": 1,\n\"x\": " + brackets(100000) + "\n}\n");
  const std::string msg = error_of([&] { load_config_file(dir.file("deep.json")); });
  expect_contains(msg, "deep.json");
  expect_contains(msg, "line 3");
  expect_contains(msg, "nested deeper than 256");
  // 256 levels are fine; brackets inside strings do not count.
  atomic_write(dir.file("ok.json"), "{\"x\": " + brackets(255) + ", \"s\": \"" + std::string(1000, '[') + "\\\"\"}");
  EXPECT_NO_THROW(load_config_file(dir.file("ok.json")));
}

TEST(ConfigValidation, DeeplyNestedTomlIsRefusedWithFileAndLine) {
  TempDir dir;
  atomic_write(dir.file("deep.toml"), "seed = 1\n# [[[[ a comment\nx = " + brackets(100000) + "\n");
  const std::string msg = error_of([&] { load_config_file(dir.file("deep.toml")); });
  expect_contains(msg, "deep.toml");
  expect_contains(msg, "line 3");
  expect_contains(msg, "nested deeper than 256");
  atomic_write(dir.file("ok.toml"), "s = '" + std::string(1000, '{') + "'\nt = \"\"\"\n" + std::string(1000, '[') +
                                        "\"\"\"\n[a]\nx = [[1], [2]]\n[[b]]\ny = {z = [1]}\n");
  EXPECT_NO_THROW(load_config_file(dir.file("ok.toml")));
}

TEST(ConfigValidation, DeeplyNestedOverridesAreRefused) {
  Json root = Json::object();
  expect_contains(error_of([&] { apply_override(root, "finetune.x=" + brackets(100000)); }),
                  "override 'finetune.x=[[[[");
  expect_contains(error_of([&] { apply_override(root, "finetune.x=" + brackets(100000)); }), "nested deeper than 256");
  std::string key = "a";
  for (int i = 0; i < 100000; ++i) key += ".a";
  expect_contains(error_of([&] { apply_override(root, key + "=1"); }), "nested deeper than 256");
  apply_override(root, "finetune.hidden=[[1,2],[3]]");
  EXPECT_EQ(root["finetune"]["hidden"][0][1], 2);
}

// TOML refuses a key given twice; JSON took the last value silently.
TEST(ConfigValidation, JsonDuplicateKeysAreErrors) {
  TempDir dir;
  atomic_write(dir.file("dup.json"), "{\"finetune\": {\"lr\": 1e-3, \"iterations\": 5, \"lr\": 2e-3}}");
  const std::string msg = error_of([&] { load_config_file(dir.file("dup.json")); });
  expect_contains(msg, "dup.json");
  expect_contains(msg, "'finetune.lr'");
  expect_contains(msg, "more than once");
  atomic_write(dir.file("ok.json"), "{\"a\": {\"lr\": 1}, \"b\": {\"lr\": 2}, \"c\": [{\"lr\": 1}, {\"lr\": 2}]}");
  EXPECT_EQ(load_config_file(dir.file("ok.json"))["b"]["lr"], 2);
}

// inf and nan (TOML literals, JSON 1e999) trained nothing or were written as null.
TEST(ConfigValidation, NonFiniteNumbersAreRefused) {
  TempDir dir;
  atomic_write(dir.file("c.toml"), "[finetune]\neps = inf\nlr = nan\nhidden = [1.0, -inf]\n");
  Config config(dir.file("c.toml"), {});
  ConfigSection ft = config.root().section("finetune");
  expect_contains(error_of([&] { ft.number("eps", 1e-8); }), "'finetune.eps' must be a finite number, got inf");
  expect_contains(error_of([&] { ft.number("lr", 1e-3); }), "'finetune.lr' must be a finite number, got nan");
  expect_contains(error_of([&] { ft.numbers("hidden"); }), "'finetune.hidden' must hold finite numbers, got -inf");
  expect_contains(error_of([&] { ft.integer("lr"); }), "'finetune.lr' must be an integer");

  // nlohmann refuses 1e999 while parsing (out_of_range, not parse_error): the file is named.
  atomic_write(dir.file("c.json"), "{\"finetune\": {\"lr\": 1e999}}");
  const std::string msg = error_of([&] { Config json(dir.file("c.json"), {}); });
  expect_contains(msg, "c.json");
  expect_contains(msg, "1e999");

  // Integers beyond int64 (as floats or unsigned) are errors, not undefined conversions.
  Config big(Json{{"a", 1e300}, {"b", std::numeric_limits<uint64_t>::max()}, {"c", Json::array({1, 1e300})}}, "test");
  ConfigSection root = big.root();
  expect_contains(error_of([&] { root.integer("a"); }), "'a' must be an integer");
  expect_contains(error_of([&] { root.integer("b"); }), "'b' must be an integer");
  expect_contains(error_of([&] { root.integers("c"); }), "'c' must be an array of integers");
}

TEST(ConfigValidation, NonFiniteMatricesAndMixturesAreRefused) {
  const double inf = std::numeric_limits<double>::infinity(), nan = std::nan("");
  double lambda = 0;
  Config precision(Json{{"reward", {{"type", "quadratic"}, {"center", {0.0, 0.0}}, {"precision", inf}}}}, "test");
  expect_contains(error_of([&] { read_reward(precision.root().section("reward"), 2, &lambda); }),
                  "'reward.precision' must be a finite number");
  Config diag(Json{{"reward", {{"type", "quadratic"}, {"center", {0.0, 0.0}}, {"precision", {1.0, nan}}}}}, "test");
  expect_contains(error_of([&] { read_reward(diag.root().section("reward"), 2, &lambda); }),
                  "'reward.precision' must hold finite numbers");
  Config center(Json{{"reward", {{"type", "quadratic"}, {"center", {nan, 0.0}}}}}, "test");
  expect_contains(error_of([&] { read_reward(center.root().section("reward"), 2, &lambda); }), "'reward.center'");
  Config covs(Json{{"data", {{"type", "gmm"}, {"means", {{0.0, 0.0}}}, {"covariances", {{{1.0, 0.0}, {0.0, inf}}}}}}},
              "test");
  expect_contains(error_of([&] { read_mixture(covs.root().section("data")); }), "'data.covariances' must hold finite numbers");
  Config means(Json{{"data", {{"type", "gmm"}, {"means", {{0.0, nan}}}}}}, "test");
  expect_contains(error_of([&] { read_mixture(means.root().section("data")); }), "'data.means' must hold finite numbers");
  Config stds(Json{{"data", {{"type", "gmm"}, {"means", {{0.0, 0.0}, {1.0, 1.0}}}, {"std", {1.0, inf}}}}}, "test");
  expect_contains(error_of([&] { read_mixture(stds.root().section("data")); }), "'data.std'");
}

// Nonsense that only the NaN guard of training stopped, refused while reading.
TEST(ConfigValidation, OutOfRangeValuesNameTheKeyAndTheLimit) {
  double lambda = 0;
  Config l(Json{{"reward", {{"type", "linear"}, {"a", {1.0, 0.0}}, {"lambda", 1e300}}}}, "test");
  expect_contains(error_of([&] { read_reward(l.root().section("reward"), 2, &lambda); }),
                  "'reward.lambda' must be in [-10000, 10000]");
  Config a(Json{{"reward", {{"type", "linear"}, {"a", {1e300, 0.0}}}}}, "test");
  expect_contains(error_of([&] { read_reward(a.root().section("reward"), 2, &lambda); }), "'reward.a'");
  Config w(Json{{"data", {{"type", "ring"}, {"components", 2}, {"weights", {1.0, -1.0}}}}}, "test");
  expect_contains(error_of([&] { read_mixture(w.root().section("data")); }), "'data.weights'");
  Config w0(Json{{"data", {{"type", "ring"}, {"components", 2}, {"weights", {0.0, 0.0}}}}}, "test");
  expect_contains(error_of([&] { read_mixture(w0.root().section("data")); }), "'data.weights'");
  Config k(Json{{"data", {{"type", "ring"}, {"components", 1000000000000}}}}, "test");
  expect_contains(error_of([&] { read_mixture(k.root().section("data")); }), "'data.components' must be in 1..");
  Config vp(Json{{"schedule", {{"type", "vp"}, {"beta_max", 1e300}}}}, "test");
  expect_contains(error_of([&] { read_schedule(vp.root().section("schedule")); }), "'schedule.beta_max'");

  auto trainer_error = [](const Json& finetune) {
    Config c(Json{{"finetune", finetune}}, "test");
    ConfigSection s = c.root().section("finetune");
    return error_of([&] { read_trainer(s, TrainerOptions{}); });
  };
  expect_contains(trainer_error({{"lr", 1e300}}), "'finetune.lr' must be in [1e-12, 1]");
  expect_contains(trainer_error({{"lr", 0.0}}), "'finetune.lr' must be in [1e-12, 1]");
  expect_contains(trainer_error({{"eps", 1e300}}), "'finetune.eps' must be in [1e-30, 1]");
  expect_contains(trainer_error({{"weight_decay", 1e300}}), "'finetune.weight_decay' must be in [0, 1]");
  expect_contains(trainer_error({{"grad_clip", -1.0}}), "'finetune.grad_clip' must be >= 0");

  auto am_error = [](const Json& finetune) {
    Config c(Json{{"finetune", finetune}}, "test");
    ConfigSection s = c.root().section("finetune");
    return error_of([&] { read_adjoint_matching(s); });
  };
  expect_contains(am_error({{"clip_factor", -1.0}}), "'finetune.clip_factor' must be >= 0");
  // 10^12 steps or trajectories reached std::bad_alloc after half a minute.
  expect_contains(am_error({{"num_steps", 1000000000000}}), "'finetune.num_steps' must be in 2..100000");
  expect_contains(am_error({{"batch_size", 1000000000000}}), "'finetune.batch_size' must be in 1..1000000");
  expect_contains(am_error({{"num_steps", 100000}, {"batch_size", 1000000}}), "num_steps x batch_size");

  Config mlp(Json{{"finetune", {{"hidden", {1000000000}}}}}, "test");
  ConfigSection ms = mlp.root().section("finetune");
  expect_contains(error_of([&] { read_mlp(ms, 2, {8}); }), "'finetune.hidden' widths must be in 1..16384");
  Config tf(Json{{"finetune", {{"time_features", 1000000000}}}}, "test");
  ConfigSection ts = tf.root().section("finetune");
  expect_contains(error_of([&] { read_mlp(ts, 2, {8}); }), "'finetune.time_features'");
}

// The regulariser of ODE Adjoint Matching: mu = 1e300 made grad psi*(a) = a / mu vanish in float32.
TEST(ConfigValidation, RegulariserParametersAreBounded) {
  auto regulariser_error = [](const Json& finetune) {
    Config c(Json{{"finetune", finetune}}, "test");
    ConfigSection s = c.root().section("finetune");
    return error_of([&] { read_regulariser(s); });
  };
  expect_contains(regulariser_error({{"reg_weight", 1e300}}), "'finetune.reg_weight' must be in (0, 1e+06]");
  expect_contains(regulariser_error({{"reg_weight_start", 1e300}}), "'finetune.reg_weight_start' must be in (0, 1e+06]");
  expect_contains(regulariser_error({{"regulariser", "clipped"}, {"reg_clip", 1e300}}), "'finetune.reg_clip' must be in (0, 1e+06]");
  expect_contains(regulariser_error({{"regulariser", "pnorm"}, {"reg_power", 1e300}}), "'finetune.reg_power' must be in (1, 100]");
}

// Sizes of tilt adjoint-sampling and tilt mcmc: 10^12 reached std::bad_alloc like the others.
TEST(ConfigValidation, SamplerSizesAreBounded) {
  auto as_error = [](const Json& table) {
    Config c(Json{{"adjoint_sampling", table}}, "test");
    ConfigSection s = c.root().section("adjoint_sampling");
    return error_of([&] { sampling::read_adjoint_sampling(s); });
  };
  // Every key has a documented default (docs/adjoint_sampling.md); an empty table must be enough.
  Config empty(Json{{"adjoint_sampling", Json::object()}}, "test");
  ConfigSection es = empty.root().section("adjoint_sampling");
  EXPECT_NO_THROW(sampling::read_adjoint_sampling(es));
  expect_contains(as_error({{"batch_size", 1000000000000}}), "'adjoint_sampling.batch_size' must be in 1..1000000");
  expect_contains(as_error({{"steps", 1000000000000}}), "'adjoint_sampling.steps' must be in 1..100000");
  expect_contains(as_error({{"buffer_size", 1000000000000}}), "'adjoint_sampling.buffer_size' must be in 1..10000000");
  Config chains(Json{{"mcmc", {{"chains", 1000000000000}}}}, "test");
  expect_contains(error_of([&] { sampling::read_mala(chains.root().section("mcmc")); }), "'mcmc.chains' must be in 1..1000000");
  Config kept(Json{{"mcmc", {{"chains", 1000}, {"steps", 1000000000}, {"thin", 1}}}}, "test");
  expect_contains(error_of([&] { sampling::read_mala(kept.root().section("mcmc")); }), "samples kept");
}

// memoryless:5 was accepted and landed 115x the noise floor from p*.
TEST(ConfigValidation, NoiseScheduleParametersAreBounded) {
  expect_contains(error_of([&] { parse_noise_schedule("memoryless:5"); }), "offset h must be in (0, 1)");
  expect_contains(error_of([&] { parse_noise_schedule("memoryless:1"); }), "offset h must be in (0, 1)");
  expect_contains(error_of([&] { parse_noise_schedule("memoryless:0"); }), "offset h must be in (0, 1)");
  expect_contains(error_of([&] { parse_noise_schedule("memoryless:nan"); }), "offset h must be in (0, 1)");
  EXPECT_NEAR(parse_noise_schedule("memoryless:0.5")->h(), 0.5, 0);
  expect_contains(error_of([&] { parse_noise_schedule("constant:inf"); }), "sigma");
  expect_contains(error_of([&] { parse_noise_schedule("constant:1e300"); }), "sigma must be in [0, 1000]");
  expect_contains(error_of([&] { parse_noise_schedule("scaled_memoryless:1e300"); }), "scale must be in [0, 1000]");
  expect_contains(error_of([&] { parse_noise_schedule("scaled_memoryless:-1"); }), "scale");
}

// Defaults (a preset, a resumed run's): read as if given but not has(); a table of them is the defaults of its
// section, below the keys the file gives; peek sees what a reader would, without marking the key used or recording it.
TEST(ConfigValidation, DefaultsAndPeek) {
  Config config(Json{{"t", {{"a", 1}, {"inner", {{"x", 5}}}}}}, "test");
  ConfigSection root = config.root();
  ConfigSection t = root.section("t");
  t.set_defaults({{"b", 2}, {"inner", {{"x", 7}, {"y", 8}}}, {"other", {{"z", 9}}}});
  EXPECT_EQ(t.peek("a")->get<int>(), 1);
  EXPECT_EQ(t.peek("b")->get<int>(), 2);
  EXPECT_EQ(t.peek("c"), nullptr);
  EXPECT_FALSE(t.has("b"));
  EXPECT_FALSE(config.resolved().contains("t")) << "peek records nothing";
  ConfigSection inner = t.section("inner");
  EXPECT_EQ(inner.integer("x"), 5) << "the file's value wins";
  EXPECT_EQ(inner.integer("y"), 8);
  EXPECT_FALSE(inner.has("y"));
  ConfigSection other = t.section("other", /*optional=*/true);
  EXPECT_FALSE(other.has("z"));
  EXPECT_EQ(other.integer("z"), 9);
  EXPECT_EQ(t.integer("a"), 1);
  EXPECT_EQ(t.integer("b"), 2);
  EXPECT_EQ(config.resolved().at("t").at("b"), 2);
  EXPECT_EQ(config.resolved().at("t").at("other").at("z"), 9);
  t.finish();
}

}  // namespace
}  // namespace tilt
