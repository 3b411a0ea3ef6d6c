// tilt eval on samples of a conditional model (docs/conditions.md): the rows of each file are grouped by
// their condition (columns c0, c1, ...), and each group is measured against the exact p*(. | c) of the
// config, relative to the noise floor at its size; conditions that [conditions] lists are labelled with
// their set (train, held_out, outside), whose median and worst ratios are summarised.
#include "conditional_eval.h"

#include "tilt/core/check.h"
#include "tilt/core/error.h"
#include "tilt/eval/conditions.h"
#include "tilt/eval/metrics.h"
#include "tilt/io/builders.h"
#include "tilt/io/run.h"
#include "tilt/io/samples.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdio>
#include <map>
#include <tuple>

namespace tilt {
namespace {

// The set of [conditions] a condition belongs to ("" for none): float32 columns against the config's
// float64 numbers, so equality is to float32's precision; inside a uniform training box is "train".
std::string set_of(const Tensor& c, const ConditionsPlan& plan) {
  if (plan.train && plan.train->contains(c)) return "train";
  for (const auto& [name, values] : {std::pair{"held_out", plan.held_out}, std::pair{"outside", plan.outside}}) {
    if (values.defined() && ConditionSet(values).contains(c)) return name;
  }
  return "";
}

Json score_group(const ExactProblem& exact, const Tensor& x, int64_t replicates, Generator& gen) {
  const int64_t n = x.size(0);
  double energy = 0, floor = 0;
  const SampleSelfTerms x_self = sample_self_terms(x, {});  // the group's own pairs, once for every replicate
  for (int64_t r = 0; r < replicates; ++r) {
    energy += sample_distances(x, exact.target->sample(n, gen), x_self).energy / static_cast<double>(replicates);
    for (int k = 0; k < 2; ++k) {
      floor += energy_distance(exact.target->sample(n, gen), exact.target->sample(n, gen)) / (2.0 * replicates);
    }
  }
  const RewardStats rs = reward_stats(*exact.reward, x);
  return {{"n", n}, {"energy_distance", energy}, {"energy_distance_noise_floor", floor},
          {"energy_distance_ratio", energy / floor}, {"mean_reward", rs.mean}, {"mean_reward_se", rs.standard_error}};
}

Json summarise_sets(const Json& rows) {
  std::map<std::string, std::vector<double>> ratios;
  for (const Json& row : rows) ratios[row["set"].get<std::string>()].push_back(row["energy_distance_ratio"].get<double>());
  Json out = Json::object();
  for (auto& [set, r] : ratios) {
    const size_t m = r.size();
    const ScoreSummary s = summarise_ratios(std::move(r));
    out[set.empty() ? "other" : set] = {{"conditions", m}, {"median_ratio", s.median}, {"worst_ratio", s.worst}};
  }
  return out;
}

Json evaluate_file(const ConditionalExactProblem& problem, const ConditionsPlan& sets, const std::string& path,
                   int64_t replicates, const Tensor& condition, Generator& gen) {
  Tensor c;
  const Tensor x = read_samples_csv(path, &c);
  if (c.defined() && condition.defined()) {
    throw Error("--condition: samples file '" + path + "' has condition columns of its own (c0, ...)");
  }
  if (!c.defined() && condition.defined()) c = condition.to(at::kDouble).reshape({1, -1}).expand({x.size(0), condition.numel()});
  if (!c.defined()) {
    throw Error("samples file '" + path + "' has no condition columns (a header x0,...,c0,...): the config's problem is "
                "conditional; draw the samples with tilt sample --condition or --conditions, or give eval --condition");
  }
  if (x.size(1) != problem.mixture->dim() || c.size(1) != problem.condition_dim()) {
    throw Error("samples file '" + path + "' has samples of dimension " + std::to_string(x.size(1)) + " with conditions of " +
                std::to_string(c.size(1)) + " numbers; the config's problem has " + std::to_string(problem.mixture->dim()) +
                " and " + std::to_string(problem.condition_dim()));
  }
  const auto [unique, inverse, counts] = at::unique_dim(c, 0, /*sorted=*/true, /*return_inverse=*/true, /*return_counts=*/true);
  Json rows = Json::array();
  for (int64_t g = 0; g < unique.size(0); ++g) {
    const Tensor rows_g = (inverse == g).nonzero().squeeze(1);
    if (rows_g.size(0) < 2) throw Error("samples file '" + path + "': a condition with a single sample cannot be measured");
    std::string why;
    const auto exact = problem.at(unique[g], &why);
    if (!exact) throw Error("no exact target at a condition of '" + path + "': " + why);
    Json row = score_group(*exact, x.index_select(0, rows_g), replicates, gen);
    const Tensor cg = unique[g].contiguous();
    row["condition"] = std::vector<double>(cg.data_ptr<double>(), cg.data_ptr<double>() + cg.numel());
    row["set"] = set_of(unique[g], sets);
    rows.push_back(row);
  }
  return {{"n", x.size(0)}, {"conditions", rows}, {"sets", summarise_sets(rows)}};
}

}  // namespace

bool config_is_conditional(const Config& config) {
  const Json& raw = config.raw();
  const auto has = [&](const char* table, const char* key) {
    return raw.contains(table) && raw[table].is_object() && raw[table].contains(key);
  };
  return has("data", "shift") || has("reward", "center_shift") || has("reward", "a_shift");
}

Json evaluate_conditional_sample_files(Config& config, const std::vector<std::string>& samples, int64_t replicates,
                                       const Tensor& condition) {
  ConfigSection root = config.root();
  const RunSettings settings = read_run_settings(root);
  std::string why;
  const auto problem = read_conditional_exact_problem(root, &why);
  if (!problem) throw Error("no exact target for this config: " + why);
  const ConditionsPlan sets = root.has("conditions") ? read_conditions(root.section("conditions"), problem->condition_dim())
                                                     : ConditionsPlan{};
  finish_config_root(root);
  Generator gen = make_generator(mix_seed(settings.seed, 29));
  Json out;
  out["target"] = {{"kind", "exact_conditional"}, {"lambda", problem->lambda}};
  for (const std::string& path : samples) {
    out["samples"][path] = evaluate_file(*problem, sets, path, replicates, condition, gen);
  }
  return out;
}

std::string conditional_evaluation_text(const Json& r, const std::vector<std::string>& samples, int64_t replicates) {
  std::string out = "target: exact p*(x | c) ∝ p_base(x | c) exp(lambda r(x, c)) at each condition (lambda = " +
                    format_number(r["target"]["lambda"].get<double>()) + ")\n";
  char line[512];
  for (const std::string& path : samples) {
    const Json& s = r["samples"][path];
    out += path + ":\n";
    std::snprintf(line, sizeof line, "  %-24s %-9s %7s %12s %12s %8s %12s\n", "condition", "set", "n", "energy dist",
                  "noise floor", "ratio", "mean reward");
    out += line;
    for (const Json& row : s["conditions"]) {
      std::string c;
      for (const Json& v : row["condition"]) c += (c.empty() ? "" : ",") + format_number(v.get<double>());
      std::snprintf(line, sizeof line, "  %-24s %-9s %7lld %12.3e %12.3e %8.2f %12.4f\n", c.c_str(),
                    row["set"].get<std::string>().c_str(), static_cast<long long>(row["n"].get<int64_t>()),
                    row["energy_distance"].get<double>(), row["energy_distance_noise_floor"].get<double>(),
                    row["energy_distance_ratio"].get<double>(), row["mean_reward"].get<double>());
      out += line;
    }
    for (const auto& [set, summary] : s["sets"].items()) {
      std::snprintf(line, sizeof line, "  %s: median ratio %.2f, worst %.2f over %lld conditions\n", set.c_str(),
                    summary["median_ratio"].get<double>(), summary["worst_ratio"].get<double>(),
                    static_cast<long long>(summary["conditions"].get<int64_t>()));
      out += line;
    }
  }
  std::snprintf(line, sizeof line,
                "(energy distance averaged over %lld fresh target sets per condition; the noise floor is the mean "
                "distance between two target sets of the same size, over twice as many pairs)\n",
                static_cast<long long>(replicates));
  return out + line;
}

}  // namespace tilt
