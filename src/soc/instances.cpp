// The benchmark problems from a ProblemSpec: tilt's or SOC-matching's instance, and parameters given by
// name (docs/soc.md, "Instances"; docs/equations.md, E46).
#include "tilt/soc/problems.h"

#include "tilt/core/error.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <optional>

namespace tilt::soc {

namespace {

const auto kDouble = at::TensorOptions().dtype(at::kDouble);

std::string list(const std::vector<std::string>& names) {
  std::string out;
  for (const auto& n : names) out += (out.empty() ? "" : ", ") + n;
  return out;
}

// Reads the parameters of one spec, each at most once, and names the parameter in every message.
class Params {
 public:
  explicit Params(const ProblemSpec& spec) : spec_(spec) {
    const auto& known = problem_param_names(spec.name);
    for (const auto& [key, value] : spec.params) {
      if (std::find(known.begin(), known.end(), key) == known.end()) {
        fail(key, "is not a parameter of this problem (valid: " + list(known) + ")");
      }
      for (double v : value.data) {
        if (!std::isfinite(v)) fail(key, "must be finite");
      }
    }
  }

  bool has(const std::string& key) const { return spec_.params.count(key) > 0; }

  [[noreturn]] void fail(const std::string& key, const std::string& message) const {
    throw Error("SOC problem '" + spec_.name + "': '" + key + "' " + message);
  }

  // A positive integer given as a number (dim), else the fallback.
  int64_t dim(int64_t fallback) const {
    if (!has("dim")) return fallback;
    const ProblemParam& p = spec_.params.at("dim");
    const double v = p.shape.empty() ? p.data.at(0) : -1;
    if (!(v >= 1 && v <= 100000) || v != std::floor(v)) fail("dim", "must be an integer in [1, 100000]");
    return static_cast<int64_t>(v);
  }

  // A number (T): > 0 when `positive`, else >= 0.
  double number(const std::string& key, double fallback, bool positive) const {
    if (!has(key)) return fallback;
    const ProblemParam& p = spec_.params.at(key);
    if (!p.shape.empty()) fail(key, "must be a number");
    const double v = p.data.at(0);
    if (positive ? !(v > 0) : !(v >= 0)) fail(key, positive ? "must be > 0" : "must be >= 0");
    return v;
  }

  // A vector of length d (a number s: s in every entry), or nullopt when not given.
  std::optional<Tensor> vector(const std::string& key, int64_t d) const {
    if (!has(key)) return std::nullopt;
    const ProblemParam& p = spec_.params.at(key);
    if (p.shape.empty()) return at::full({d}, p.data.at(0), kDouble);
    if (p.shape.size() != 1 || p.shape[0] != d) {
      fail(key, "must be a number or a vector of " + std::to_string(d) + " numbers (dim = " + std::to_string(d) + ")");
    }
    return at::tensor(at::ArrayRef<double>(p.data), kDouble);
  }

  // A d x d matrix (a number s: s I), or nullopt when not given.
  std::optional<Tensor> matrix(const std::string& key, int64_t d) const {
    if (!has(key)) return std::nullopt;
    const ProblemParam& p = spec_.params.at(key);
    if (p.shape.empty()) return p.data.at(0) * at::eye(d, kDouble);
    if (p.shape.size() != 2 || p.shape[0] != d || p.shape[1] != d) {
      fail(key, "must be a number (a multiple of I) or a " + std::to_string(d) + " x " + std::to_string(d) +
                    " matrix (an array of " + std::to_string(d) + " rows; dim = " + std::to_string(d) + ")");
    }
    return at::tensor(at::ArrayRef<double>(p.data), kDouble).reshape({d, d});
  }

  void check_symmetric(const std::string& key, const Tensor& M) const {
    if (!at::allclose(M, M.t(), 0, 1e-12)) fail(key, "must be symmetric");
  }

  void check_invertible(const std::string& key, const Tensor& M) const {
    if (at::linalg_matrix_rank(M).item<int64_t>() < M.size(0)) fail(key, "must be invertible");
  }

 private:
  const ProblemSpec& spec_;
};

bool is_socm(const ProblemSpec& spec) { return spec.instance == "socm"; }

// x0 of the quadratic problems: given, else SOC-matching's draw (float32, [0.4, 0.6] in 2-D), else tilt's.
Tensor quadratic_x0(const ProblemSpec& spec, const Params& params, int64_t d) {
  if (auto x0 = params.vector("x0", d)) return *x0;
  Generator gen = make_generator(spec.seed);
  if (!is_socm(spec)) return 0.5 * at::randn({d}, gen, kDouble);
  if (d == 2) return at::tensor({0.4, 0.6}, at::kFloat).to(at::kDouble);  // SOCM's 2-D x0, in float32
  return (0.5 * at::randn({d}, gen, at::kFloat)).to(at::kDouble);
}

ProblemPtr make_quadratic(const ProblemSpec& spec, const Params& params) {
  const bool hard = spec.name == "quadratic_ou_hard";
  const int64_t d = params.dim(20);
  const Tensor x0 = quadratic_x0(spec, params, d);  // the first draw after seeding, as in SOCM
  const Tensor I = at::eye(d, kDouble);
  // (SOCM forms 0.2 I etc. in float32; tilt takes the exact numbers, 1.5e-8 apart, for both instances.)
  const auto scaled = [&](double s) { return s * I; };
  const Tensor A = params.matrix("A", d).value_or(scaled(hard ? 1.0 : 0.2));
  const Tensor P = params.matrix("P", d).value_or(scaled(hard ? 1.0 : 0.2));
  const Tensor Q = params.matrix("Q", d).value_or(scaled(hard ? 0.5 : 0.1));
  const Tensor sigma = params.matrix("sigma", d).value_or(I);
  params.check_symmetric("P", P);
  params.check_symmetric("Q", Q);
  params.check_invertible("sigma", sigma);
  return std::make_shared<QuadraticOU>(spec.name, A, P, Q, sigma, x0, params.number("T", 1.0, true), 50);
}

ProblemPtr make_linear(const ProblemSpec& spec, const Params& params) {
  const int64_t d = params.dim(10);
  Tensor A, sigma;
  if (!params.has("A") || !params.has("sigma")) {  // xi is the first draw after seeding, as in SOCM
    Generator gen = make_generator(spec.seed);
    if (is_socm(spec)) {
      const Tensor xi = 0.1 * at::randn({d, d}, gen, at::kFloat), I = at::eye(d, at::kFloat);
      A = (-I + xi).to(at::kDouble);
      sigma = (I + xi).to(at::kDouble);
    } else {
      const Tensor xi = 0.1 * at::randn({d, d}, gen, kDouble), I = at::eye(d, kDouble);
      A = -I + xi;
      sigma = I + xi;
    }
  }
  A = params.matrix("A", d).value_or(A);
  sigma = params.matrix("sigma", d).value_or(sigma);
  params.check_invertible("sigma", sigma);
  const Tensor omega = params.vector("omega", d).value_or(at::ones({d}, kDouble));
  const Tensor x0 = params.vector("x0", d).value_or(at::zeros({d}, kDouble));
  return std::make_shared<LinearOU>(spec.name, A, sigma, omega, params.number("T", 1.0, true), 100, x0);
}

ProblemPtr make_double_well(const ProblemSpec& spec, const Params& params) {
  const int64_t d = params.dim(10);
  std::vector<double> kappa(d, 1.0), nu(d, 1.0);  // double_well(d)'s: 5 and 3 on the first three coordinates
  for (int64_t i = 0; i < std::min<int64_t>(d, 3); ++i) kappa[i] = 5.0, nu[i] = 3.0;
  const auto take = [&](const std::string& key, std::vector<double>& into) {
    if (auto v = params.vector(key, d)) {
      into.assign(v->data_ptr<double>(), v->data_ptr<double>() + d);
      for (double x : into) {
        if (!(x >= 0)) params.fail(key, "must be >= 0");
      }
    }
  };
  take("kappa", kappa);
  take("nu", nu);
  const DoubleWellGrid grid;
  const Tensor x0 = params.vector("x0", d).value_or(at::zeros({d}, kDouble));
  if (at::abs(x0).max().item<double>() > grid.half_width) {
    params.fail("x0", "must lie in [-2.75, 2.75] in every coordinate (the ground truth's grid)");
  }
  return std::make_shared<DoubleWell>(spec.name, kappa, nu, x0, params.number("T", 1.0, true), 200, grid);
}

ProblemPtr make_molecular(const ProblemSpec&, const Params& params) {
  double x0 = -1.0;
  if (auto v = params.vector("x0", 1)) x0 = v->item<double>();
  if (!(x0 <= 0)) params.fail("x0", "must be <= 0 (the process stops at once where x > 0)");
  return std::make_shared<MolecularDynamics>(params.number("kappa", 1.0, false), x0, params.number("T", 1.0, true), 150);
}

}  // namespace

const std::vector<std::string>& instance_names() {
  static const std::vector<std::string> names{"tilt", "socm"};
  return names;
}

const std::vector<std::string>& problem_param_names(const std::string& problem) {
  static const std::vector<std::string> quadratic{"dim", "x0", "A", "P", "Q", "sigma", "T"};
  static const std::vector<std::string> linear{"dim", "x0", "A", "sigma", "omega", "T"};
  static const std::vector<std::string> well{"dim", "x0", "kappa", "nu", "T"};
  static const std::vector<std::string> molecular{"x0", "kappa", "T"};
  if (problem == "quadratic_ou_easy" || problem == "quadratic_ou_hard") return quadratic;
  if (problem == "linear_ou") return linear;
  if (problem == "double_well") return well;
  if (problem == "molecular_dynamics") return molecular;
  throw Error("unknown SOC problem '" + problem + "' (valid: " + list(problem_names()) + ")");
}

ProblemPtr make_problem(const ProblemSpec& spec) {
  if (std::find(instance_names().begin(), instance_names().end(), spec.instance) == instance_names().end()) {
    throw Error("unknown SOC instance '" + spec.instance + "' (valid: " + list(instance_names()) + ")");
  }
  const Params params(spec);  // checks the problem's name and the parameters' names
  if (spec.name == "quadratic_ou_easy" || spec.name == "quadratic_ou_hard") return make_quadratic(spec, params);
  if (spec.name == "linear_ou") return make_linear(spec, params);
  if (spec.name == "double_well") return make_double_well(spec, params);
  return make_molecular(spec, params);
}

}  // namespace tilt::soc
