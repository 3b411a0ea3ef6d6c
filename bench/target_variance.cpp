// The conditional variance of each velocity-space regression target of the unified view, per time t
// (docs/equations.md, E118): for Adjoint Matching (AM, the lean adjoint at the optimum, E25 and E106), target score
// matching (TSM, E111), denoising score matching (DSM, E112) and, for a one-component base, tilted novel score
// matching (NSM, E113), on a tilted Gaussian mixture whose p* is exact,
//   relative variance(t) = E_{x_t ~ p*_t} Var[D | x_t] / E_{x_t ~ p*_t} |v* - v_base|^2(x_t).
// TSM, DSM, NSM: D = D(X_1, X_0, t) with X_1 ~ p*(X_1 | X_t = x_t) (a Gaussian mixture in closed form) and
// X_0 = (x_t - alpha_t X_1) / beta_t. AM: D = -eta_t a~_t over continuations of the exact tilted SDE from x_t.
// Beside it, the trace of the covariance of each loss's per-sample stochastic gradient at the optimum (E122), for the
// parametrisation v = v* + W phi(x_t), phi = (1, x_t), at W = 0: 4 E[|phi(x_t)|^2 tr Var[D | x_t]], over the same draws.
// The fitted rates: slopes of log variance against log t over the three earliest times and against log(1 - t) over
// the three latest. --check: the Monte Carlo DSM variance and gradient variance against their closed forms for a
// Gaussian base and a linear reward (exit 1 when either differs by more than 4 standard errors).
//
//   tilt_target_variance CONFIG [--random SEED --dim D] [--states N] [--draws M] [--steps K] [--seed S]
//                        [--check 0|1] [--out PREFIX] [--plot PATH] [--set KEY=VALUE]...
#include "adjoint_target.h"
#include "tilted_mixture.h"

#include "tilt/core/error.h"
#include "tilt/core/fs.h"
#include "tilt/io/builders.h"
#include "tilt/io/config.h"
#include "tilt/io/methods.h"
#include "tilt/io/plot.h"
#include "tilt/model/gmm.h"
#include "tilt/model/random_problem.h"
#include "tilt/model/reward.h"
#include "tilt/schedule/noise_schedule.h"
#include "tilt/train/unified_losses.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

using namespace tilt;

namespace {

struct Problem : tilt_bench::TiltedMixture {
  std::shared_ptr<FineTunedVelocity> model;  // only carries v_base and the schedule into TiltScoreMatching
};

Problem read_problem(const std::string& path, const std::vector<std::string>& sets, int64_t seed, int64_t dim) {
  Config config(path, sets);
  ConfigSection root = config.root();
  root.allow({"seed", "threads", "base", "pretrain", "sample", "eval", "data", "reward", "finetune"});
  Problem p;
  static_cast<tilt_bench::TiltedMixture&>(p) = tilt_bench::read_tilted_mixture(root, path, seed, dim);
  if (seed < 0) p.problem["reward"] = p.reward->kind(), p.problem["sets"] = sets;
  p.problem["base_components"] = p.base_mixture->components();
  ConfigSection ft = root.section("finetune");
  p.model = read_finetune(ft, *p.base, p.reward, p.lambda).make_model(p.base, 1);
  return p;
}

// M draws of X_1 ~ q(X_1 | X_t = x) for each row of x [n, d], q = sum_k w_k N(m_k, S_k), X_t = alpha X_1 + beta X_0:
// component k has X_t ~ N(alpha m_k, C_k), C_k = alpha^2 S_k + beta^2 I, and X_1 | X_t = x ~ N(m_k + G_k (x - alpha m_k),
// S_k - alpha G_k S_k), G_k = alpha S_k C_k^{-1}, with posterior weight ∝ w_k N(x; alpha m_k, C_k) (E118).
// Returns [n, M, d] in double.
Tensor posterior_draws(const GaussianMixture& q, const Tensor& x, double alpha, double beta, int64_t M, Generator& gen) {
  const Tensor xd = x.to(at::kDouble);
  const int64_t n = xd.size(0), d = xd.size(1), K = q.components();
  const Tensor S = q.covariances(), m = q.means();                         // [K, d, d], [K, d]
  const Tensor I = at::eye(d, xd.options());
  const Tensor C = alpha * alpha * S + beta * beta * I;                    // [K, d, d]
  const Tensor Cinv = at::linalg_inv(C);
  const Tensor G = alpha * at::matmul(S, Cinv);                            // [K, d, d]
  Tensor P = S - alpha * at::matmul(G, S);
  P = 0.5 * (P + P.transpose(1, 2));
  const Tensor L = at::linalg_cholesky(P);                                 // [K, d, d]
  const Tensor r = xd.unsqueeze(1) - alpha * m.unsqueeze(0);               // [n, K, d]
  const Tensor quad = (r.unsqueeze(2) * Cinv.unsqueeze(0)).sum(3).mul(r).sum(2);  // r^T C^{-1} r, [n, K]
  const Tensor logdet = std::get<1>(at::linalg_slogdet(C));               // [K]
  const Tensor logw = q.weights().log().unsqueeze(0) - 0.5 * quad - 0.5 * logdet.unsqueeze(0);
  const Tensor resp = at::softmax(logw, 1);                                // [n, K]
  const Tensor comp = at::multinomial(resp, M, true, gen);                 // [n, M]
  const Tensor mean = m.unsqueeze(0) + at::matmul(G.unsqueeze(0), r.unsqueeze(3)).squeeze(3);  // [n, K, d]
  const Tensor rows = at::arange(n, at::TensorOptions().dtype(at::kLong)).unsqueeze(1).expand({n, M});
  const Tensor mu = mean.index({rows, comp});                              // [n, M, d]
  const Tensor eps = at::randn({n, M, d, 1}, gen, xd.options());
  return mu + at::matmul(L.index({comp}), eps).squeeze(3);
}

struct Estimate {
  double variance = 0, standard_error = 0;  // E Var[D | x_t] and its Monte Carlo standard error over the states
  double gradient = 0, gradient_error = 0;  // E122: tr Cov of the per-sample gradient and its standard error
};

// Per state the unbiased sample variance of its M targets D [n, M, d] (summed over coordinates), then the mean and
// standard error over the n states. With the states x [n, d], also E122's trace of the per-sample gradient covariance
// at the optimum of the parametrisation v = v* + W phi(x), phi(x) = (1, x): 4 E[|phi(x_t)|^2 tr Var[D | x_t]].
Estimate conditional_variance(const Tensor& D, const Tensor& x) {
  const int64_t n = D.size(0), M = D.size(1);
  const Tensor v = (D - D.mean(1, true)).pow(2).sum({1, 2}).to(at::kDouble) / static_cast<double>(M - 1);  // [n]
  const Tensor g = 4.0 * (1.0 + x.to(at::kDouble).pow(2).sum(1)) * v;                                        // [n]
  const double root_n = std::sqrt(static_cast<double>(n));
  return {v.mean().item<double>(), v.std().item<double>() / root_n, g.mean().item<double>(),
          g.std().item<double>() / root_n};
}

// States x_t ~ p*_t: alpha X_1 + beta X_0, X_1 ~ p*.
Tensor tilted_states(const Problem& p, double t, int64_t n, Generator& gen) {
  const ScheduleValues ab = p.schedule->at(t);
  const Tensor x1 = p.target->sample(n, gen, at::kDouble);
  return ab.alpha * x1 + ab.beta * at::randn(x1.sizes(), gen, x1.options());
}

// The score-matching target's draws [n, M, d] given the states x [n, d] at t.
Tensor score_targets(const Problem& p, ScoreTarget which, const Tensor& x, double t, int64_t M, Generator& gen) {
  UnifiedLossOptions options;
  options.lambda = p.lambda;
  const TiltScoreMatching loss(which, p.model, p.reward, make_memoryless_noise(0.0), options);
  const ScheduleValues ab = p.schedule->at(t);
  const int64_t n = x.size(0), d = x.size(1);
  const Tensor x1 = posterior_draws(*p.target, x, ab.alpha, ab.beta, M, gen).reshape({n * M, d});
  const Tensor xt = x.to(at::kDouble).unsqueeze(1).expand({n, M, d}).reshape({n * M, d});
  const Tensor x0 = (xt - ab.alpha * x1) / ab.beta;
  return loss.target_difference(x1, x0, at::full({n * M}, t, x1.options())).reshape({n, M, d});
}

// Least-squares slope of log y against log x.
Json slope(const std::vector<double>& x, const std::vector<double>& y) {
  double sx = 0, sy = 0, sxx = 0, sxy = 0;
  int n = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    if (!(y[i] > 0) || !std::isfinite(y[i])) return Json();
    const double lx = std::log(x[i]), ly = std::log(y[i]);
    sx += lx, sy += ly, sxx += lx * lx, sxy += lx * ly, ++n;
  }
  return (n * sxy - sx * sy) / (n * sxx - sx * sx);
}

// E118's check: a Gaussian base N(mu, Sigma) tilted by a linear reward a.x is N(mu + lambda Sigma a, Sigma), so
// X_1 | X_t = x has the covariance Sigma_post = (Sigma^{-1} + (alpha/beta)^2 I)^{-1}, and DSM's target
// D = alpha' X_1 + beta' X_0 - v_base with X_0 = (x - alpha X_1)/beta has Var[D | x] = (alpha' - beta' alpha/beta)^2
// tr Sigma_post, and E122's gradient variance is that times 4 E|phi(x_t)|^2. Returns false when a Monte Carlo estimate
// (256 states, 1024 draws each) misses either by more than 4 standard errors.
bool check_dsm(const SchedulePtr& schedule, Json* out) {
  const int64_t states = 256, draws = 1024;  // se ~0.2% of the variance: a 2% error fails
  Problem p;
  p.schedule = schedule;
  const Tensor Sigma = at::tensor({1.0, 0.3, 0.3, 0.5}, at::kDouble).reshape({2, 2});
  p.base_mixture = std::make_shared<GaussianMixture>(at::ones({1}, at::kDouble), at::tensor({0.5, -1.0}, at::kDouble).reshape({1, 2}),
                                                     Sigma.unsqueeze(0));
  p.reward = std::make_shared<LinearReward>(at::tensor({1.0, -0.5}, at::kDouble));
  p.lambda = 1.5;
  p.target = std::make_shared<GaussianMixture>(*exact_tilt(*p.reward, *p.base_mixture, p.lambda));
  p.base = std::make_shared<GmmVelocity>(p.base_mixture, p.schedule);
  p.model = std::make_shared<FineTunedVelocity>(p.base, std::make_shared<GmmVelocity>(p.base_mixture, p.schedule),
                                                FineTuneMode::copy);
  Generator gen = make_generator(7);
  bool ok = true;
  Json rows = Json::array();
  for (const double t : {0.05, 0.5, 0.95}) {
    const ScheduleValues ab = p.schedule->at(t);
    const double c = ab.d_alpha - ab.d_beta * ab.alpha / ab.beta;
    const Tensor post = at::linalg_inv(at::linalg_inv(Sigma) + std::pow(ab.alpha / ab.beta, 2) * at::eye(2, at::kDouble));
    const double exact = c * c * post.trace().item<double>();
    // E122: x_t ~ N(alpha mu*, alpha^2 Sigma + beta^2 I), so E|phi(x_t)|^2 = 1 + alpha^2 (|mu*|^2 + tr Sigma) + beta^2 d
    // and the gradient's trace is 4 E|phi|^2 times the (constant) conditional variance.
    const double mu2 = p.target->means().pow(2).sum().item<double>();
    const double phi2 = 1 + ab.alpha * ab.alpha * (mu2 + Sigma.trace().item<double>()) + 2 * ab.beta * ab.beta;  // d = 2
    const double exact_gradient = 4 * phi2 * exact;
    const Tensor x = tilted_states(p, t, states, gen);
    const Estimate e = conditional_variance(score_targets(p, ScoreTarget::denoising, x, t, draws, gen), x);
    // Var[D | x] does not depend on x here, so the per-state estimates are independent draws of one number and
    // their spread over the states is the estimate's standard error.
    const double se = e.standard_error;
    const bool pass = std::abs(e.variance - exact) <= 4 * se;
    // The gradient's per-state values vary with |x_t|^2, so their spread is its standard error.
    const bool gradient_pass = std::abs(e.gradient - exact_gradient) <= 4 * e.gradient_error;
    ok = ok && pass && gradient_pass;
    rows.push_back({{"t", t}, {"monte_carlo", e.variance}, {"standard_error", se}, {"closed_form", exact},
                    {"gradient_monte_carlo", e.gradient}, {"gradient_standard_error", e.gradient_error},
                    {"gradient_closed_form", exact_gradient}, {"pass", pass && gradient_pass}});
  }
  *out = rows;
  return ok;
}

}  // namespace

int main(int argc, char** argv) try {
  if (argc < 2) {
    throw Error("usage: tilt_target_variance CONFIG [--random SEED --dim D] [--states N] [--draws M] [--steps K] "
                "[--seed S] [--check 0|1] [--out PREFIX] [--plot PATH] [--set KEY=VALUE]...");
  }
  at::set_num_threads(1);
  std::vector<std::string> sets;
  int64_t seed = -1, dim = 3, states = 64, draws = 256, steps = 100, rng = 1;
  bool check = true;
  std::string out = "target_variance", plot_path;
  for (int i = 2; i + 1 < argc; i += 2) {
    const std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--random") seed = std::stoll(value);
    else if (flag == "--dim") dim = std::stoll(value);
    else if (flag == "--states") states = std::stoll(value);
    else if (flag == "--draws") draws = std::stoll(value);
    else if (flag == "--steps") steps = std::stoll(value);
    else if (flag == "--seed") rng = std::stoll(value);
    else if (flag == "--check") check = value != "0";
    else if (flag == "--out") out = value;
    else if (flag == "--plot") plot_path = value;
    else if (flag == "--set") sets.push_back(value);
    else throw Error("unknown option '" + flag + "'");
  }
  if (states < 2 || draws < 2) throw Error("--states and --draws must be >= 2");
  if (steps < 2) throw Error("--steps must be >= 2");
  const Problem p = read_problem(argv[1], sets, seed, dim);
  Json j = {{"problem", p.problem}, {"states", states}, {"draws", draws}, {"steps", steps}};
  bool ok = true;
  if (check) {
    Json rows;
    ok = check_dsm(p.schedule, &rows);
    j["dsm_check"] = rows;
    if (!ok) std::cerr << "tilt_target_variance: the DSM variance misses its closed form: " << rows.dump() << "\n";
  }

  std::vector<std::pair<std::string, ScoreTarget>> score_kinds = {{"tsm", ScoreTarget::target}, {"dsm", ScoreTarget::denoising}};
  if (p.base_mixture->components() == 1) score_kinds.push_back({"nsm", ScoreTarget::novel});
  std::vector<std::string> names = {"am"};
  for (const auto& [name, kind] : score_kinds) names.push_back(name);
  std::vector<double> ts;
  std::vector<std::vector<double>> rel(names.size()), grad(names.size());
  Json rows = Json::array();
  Generator gen = make_generator(static_cast<uint64_t>(rng));
  for (const double t_want : {0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98}) {
    const int64_t k = std::clamp<int64_t>(std::lround(t_want * static_cast<double>(steps)), 1, steps - 1);
    const double t = static_cast<double>(k) / static_cast<double>(steps);
    ts.push_back(t);
    // The tilt's size E|v* - v_base|^2 on many states (cheap), the variances on `states` of them.
    double size = 0;
    {
      at::NoGradGuard no_grad;
      const Tensor x = tilted_states(p, t, 4000, gen).to(at::kFloat);
      const Tensor tt = at::full({x.size(0)}, t, x.options());
      size = (p.exact->velocity(x, tt) - p.base->velocity(x, tt)).pow(2).sum(1).mean().item<double>();
    }
    const Tensor x = tilted_states(p, t, states, gen);
    const int64_t d = x.size(1);
    Json row = {{"t", t}, {"tilt_size", size}};
    {
      const Tensor xs = x.to(at::kFloat).unsqueeze(1).expand({states, draws, d}).reshape({states * draws, d});
      const Tensor D = tilt_bench::adjoint_targets(p.exact, p.base, *p.schedule, *p.reward, p.lambda, steps, k, xs, gen);
      const Estimate e = conditional_variance(D.reshape({states, draws, d}), x);
      row["am"] = {{"relative_variance", e.variance / size}, {"standard_error", e.standard_error / size},
                   {"gradient_variance", e.gradient}, {"gradient_standard_error", e.gradient_error}};
      rel[0].push_back(e.variance / size);
      grad[0].push_back(e.gradient / size);
    }
    for (size_t i = 0; i < score_kinds.size(); ++i) {
      const Estimate e = conditional_variance(score_targets(p, score_kinds[i].second, x, t, draws, gen), x);
      row[score_kinds[i].first] = {{"relative_variance", e.variance / size}, {"standard_error", e.standard_error / size},
                                   {"gradient_variance", e.gradient}, {"gradient_standard_error", e.gradient_error}};
      rel[i + 1].push_back(e.variance / size);
      grad[i + 1].push_back(e.gradient / size);
    }
    rows.push_back(row);
    std::cerr << row.dump() << "\n";
  }
  j["rows"] = rows;
  Json rates;
  const size_t n = ts.size();
  const std::vector<double> early(ts.begin(), ts.begin() + 3);
  std::vector<double> late;
  for (size_t i = n - 3; i < n; ++i) late.push_back(1 - ts[i]);
  std::vector<plot::Series> series;
  for (size_t i = 0; i < names.size(); ++i) {
    const Json a = slope(early, std::vector<double>(rel[i].begin(), rel[i].begin() + 3));
    const Json b = slope(late, std::vector<double>(rel[i].end() - 3, rel[i].end()));
    // E122: the gradient's rates (its trace over the tilt's size, so that it shares the plot's scale).
    const Json ga = slope(early, std::vector<double>(grad[i].begin(), grad[i].begin() + 3));
    const Json gb = slope(late, std::vector<double>(grad[i].end() - 3, grad[i].end()));
    rates[names[i]] = {{"slope_log_t", a}, {"slope_log_1_minus_t", b},
                       {"gradient_slope_log_t", ga}, {"gradient_slope_log_1_minus_t", gb}};
    std::cout << names[i] << ": d log var / d log t near 0 = " << a.dump() << ", d log var / d log(1 - t) near 1 = "
              << b.dump() << "; gradient: " << ga.dump() << ", " << gb.dump() << "\n";
    series.push_back({names[i], ts, rel[i]});
    series.push_back({names[i] + " grad", ts, grad[i]});
  }
  j["rates"] = rates;
  j["dsm_check_pass"] = ok;
  atomic_write(out + ".json", j.dump(1) + "\n");
  if (!plot_path.empty()) {
    plot::LineOptions o;
    o.width = 800;
    o.title = "E Var[D | x_t] and tr Cov[grad] (E122), over E|v* - v_base|^2";
    o.x_label = "t";
    o.y_label = "relative variance";
    o.log_y = true;
    plot::write_line_png(plot_path, series, o);
  }
  return ok ? 0 : 1;
} catch (const std::exception& e) {
  std::cerr << "tilt_target_variance: error: " << e.what() << "\n";
  return 1;
}
