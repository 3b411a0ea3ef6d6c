// Configuration values that are syntactically fine but nonsense: too deeply nested, duplicated,
// non-finite, out of range or absurdly large. Each must stop while the config is read, with a
// message that names the key (or the file and line) and the limit (docs/config.md).
#include "tilt/core/error.h"
#include "tilt/core/fs.h"
#include "tilt/io/builders.h"
#include "tilt/io/config.h"
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

}  // namespace
}  // namespace tilt
