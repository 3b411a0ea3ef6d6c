// What tilt sample, eval, plot, logz and soc do, called from C++ as the CLI calls it
// (tilt/io/sample_sets.h, logz.h, soc_benchmark.h): the same options, results and messages.
#include "tilt/core/fs.h"
#include "tilt/io/logz.h"
#include "tilt/io/sample_sets.h"
#include "tilt/io/samples.h"
#include "tilt/io/soc_benchmark.h"

#include "../support/checks.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>

namespace tilt {
namespace {

using test::error_of;
using test::TempDir;

// The CLI tests' tiny problem: a ring of 4 Gaussians, its exact velocity, a quadratic reward.
Json tiny(int64_t seed) {
  return Json{{"seed", seed},
              {"threads", 2},  // as tests/unit/main.cpp sets them
              {"data", {{"type", "ring"}, {"components", 4}, {"radius", 2.0}, {"std", 0.5}}},
              {"base", {{"type", "exact"}}},
              {"reward", {{"type", "quadratic"}, {"center", {2.0, 0.0}}, {"precision", 0.5}}}};
}

std::string write_config(const TempDir& dir, int64_t seed) {
  const std::string path = dir.file("tiny.json");
  std::ofstream(path) << tiny(seed).dump();
  return path;
}

TEST(CommandsApi, LogZOfTheOptimalControlHitsTheExactValueAndFollowsTheConfigsSeed) {
  LogzOptions o;
  o.control = "optimal";
  o.method = "noising";
  o.n = 2000;
  o.steps = 20;
  o.quiet = true;
  Config a(tiny(1), "test"), b(tiny(1), "test"), c(tiny(2), "test");
  const Json r = estimate_log_z(a, o);
  EXPECT_EQ(r["proposal"], "exact optimal control u*");
  EXPECT_LT(std::abs(r["log_z"].get<double>() - r["exact_log_z"].get<double>()),
            4 * r["log_z_standard_error"].get<double>());
  EXPECT_EQ(estimate_log_z(b, o), r);  // the config's seed draws the paths
  EXPECT_NE(estimate_log_z(c, o)["log_z"], r["log_z"]);
  EXPECT_NE(log_z_text(r).find("exact log Z"), std::string::npos);
  o.method = "ais";
  Config d(tiny(1), "test");
  EXPECT_NE(error_of([&] { estimate_log_z(d, o); }).find("--method must be girsanov, noising or jarzynski"),
            std::string::npos);
}

TEST(CommandsApi, ExactTargetSamplesAreWithinTheNoiseFloorOfTheTarget) {
  TempDir dir;
  DrawOptions d;
  d.exact = "target";
  d.config = write_config(dir, 1);
  d.n = 400;
  d.out = dir.file("target.csv");
  const DrawnSamples s = write_samples(d);
  EXPECT_EQ(s.what, "exact target samples");
  EXPECT_TRUE(at::allclose(read_samples_csv(d.out), s.x.to(at::kFloat), 1e-5, 1e-6));  // the CSV file holds them
  d.set = {"seed=2"};  // the config's seed draws them
  EXPECT_FALSE(at::equal(draw_samples(d).x, s.x));

  EvalOptions e;
  e.samples = {d.out};
  e.replicates = 2;
  Config config(d.config, {});
  const Json r = evaluate_sample_files(config, e);
  EXPECT_EQ(r["target"]["kind"], "exact");
  EXPECT_LT(r["samples"][d.out]["energy_distance_ratio"].get<double>(), 3.0);
  EXPECT_TRUE(r["samples"][d.out].contains("mean_reward"));
  EXPECT_NE(evaluation_text(r, e).find("target: exact p*"), std::string::npos);

  PlotOptions p;
  p.panels = {d.out + ":target"};
  p.out = dir.file("fig.png");
  plot_sample_files(p);
  EXPECT_TRUE(file_exists(p.out));
  p.out = d.out;  // never over an input
  EXPECT_NE(error_of([&] { plot_sample_files(p); }).find("--out"), std::string::npos);
}

TEST(CommandsApi, SocBenchmarkWritesItsFilesAndNamesTheConfigKeyOfABadValue) {
  TempDir dir;
  SocBenchmarkOptions o;
  Config config(Json{{"seed", 2}, {"soc", {{"problem", "linear_ou"}, {"losses", {"adjoint_matching"}},
                                          {"iterations", 2}, {"batch", 8}, {"eval_batch", 8}, {"eval_every", 1},
                                          {"hidden", {4}}}}},
                "'soc.toml'");
  ConfigSection root = config.root();
  read_soc_benchmark(root, o, [](const std::string& flag) { return flag == "--iterations"; });
  EXPECT_EQ(o.problem, "linear_ou");
  EXPECT_EQ(o.seed, 2);
  EXPECT_EQ(o.iterations, 1000);  // given as a flag: the file's value is not read
  o.iterations = 2;
  o.quiet = true;
  o.threads = 2;  // as tests/unit/main.cpp sets them
  o.out = dir.file("soc");
  const SocBenchmarkResult r = run_soc_benchmark(o);
  EXPECT_TRUE(r.writer);
  EXPECT_TRUE(r.summary["losses"]["adjoint_matching"].contains("control_l2_error"));
  EXPECT_NE(r.markdown.find("| adjoint_matching |"), std::string::npos);
  for (const char* f : {"summary.json", "summary.md", "curves.png", "adjoint_matching.eval.jsonl", "soc.resolved.json"}) {
    EXPECT_TRUE(file_exists(o.out + "/" + f)) << f;
  }
  EXPECT_NE(error_of([&] { run_soc_benchmark(o); }).find("already holds an SOC run"), std::string::npos);

  SocBenchmarkOptions bad;
  Config zero(Json{{"soc", {{"losses", {"moment"}}, {"batch", 0}}}}, "'soc.toml'");
  ConfigSection zero_root = zero.root();
  read_soc_benchmark(zero_root, bad, [](const std::string&) { return false; });
  EXPECT_NE(error_of([&] { check_soc_benchmark(bad); }).find("'soc.batch' must be in 1.."), std::string::npos);
}

TEST(CommandsApi, MsPerIterationIsTheMedianSoAPausedIterationDoesNotCount) {
  TempDir dir;
  const std::string path = dir.file("adjoint_matching.jsonl");
  // Four iterations of 0.1, 0.3, 0.2 and 0.25 s, the second stopped for 100 s more; lines without numeric
  // seconds (an evaluation, a cut-off write) are skipped. The mean would be 25.2 s.
  atomic_write(path,
               "{\"iteration\":0,\"seconds\":0.1}\n{\"iteration\":1,\"seconds\":100.3}\n"
               "{\"iteration\":1,\"control_l2_error\":0.5}\n{\"iteration\":2,\"seconds\":0.2}\n"
               "{\"iteration\":3,\"seconds\":\"0.4\"}\n{\"iteration\":3,\"seconds\":0.25}\n{\"itera");
  EXPECT_NEAR(ms_per_iteration(path), 225.0, 1e-9);  // (0.2 + 0.25) / 2 s
  atomic_write(path, "{\"iteration\":0,\"seconds\":0.1}\n{\"iteration\":1,\"seconds\":7}\n{\"iteration\":2,\"seconds\":0.3}\n");
  EXPECT_NEAR(ms_per_iteration(path), 300.0, 1e-9);
  atomic_write(path, "{\"iteration\":0}\n");
  EXPECT_TRUE(std::isnan(ms_per_iteration(path)));
  EXPECT_NE(error_of([&] { ms_per_iteration(dir.file("missing.jsonl")); }).find("missing.jsonl"), std::string::npos);
}

}  // namespace
}  // namespace tilt
