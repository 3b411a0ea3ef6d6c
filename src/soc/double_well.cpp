// The double-well problem and its ground truth: a 1-D backward PDE per coordinate, by finite differences.
#include "tilt/soc/problems.h"

#include "tilt/core/check.h"
#include "tilt/core/error.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <utility>

namespace tilt::soc {

namespace {

const auto kDouble = at::TensorOptions().dtype(at::kDouble);

// Solves the tridiagonal system lower_j y_{j-1} + diag_j y_j + upper_j y_{j+1} = rhs_j (Thomas
// algorithm; the matrices here are strictly diagonally dominant, so no pivoting is needed).
std::vector<double> solve_tridiagonal(const std::vector<double>& lower, const std::vector<double>& diag,
                                      const std::vector<double>& upper, std::vector<double> rhs) {
  const size_t n = diag.size();
  std::vector<double> c(n), d = diag;
  for (size_t j = 1; j < n; ++j) {
    const double m = lower[j] / d[j - 1];
    d[j] -= m * upper[j - 1];
    rhs[j] -= m * rhs[j - 1];
  }
  std::vector<double> y(n);
  y[n - 1] = rhs[n - 1] / d[n - 1];
  for (size_t j = n - 1; j-- > 0;) y[j] = (rhs[j] - upper[j] * y[j + 1]) / d[j];
  return y;
}

// V = -log psi and dV/dx on the x grid at stored_times + 1 times t_n = n T / stored_times, for one
// coordinate with potential U = kappa (x^2 - 1)^2 and terminal cost nu (x^2 - 1)^2 (see problems.h).
std::pair<std::vector<std::vector<double>>, std::vector<std::vector<double>>> solve_coordinate(
    double kappa, double nu, double T, const DoubleWellGrid& grid, int64_t nodes, const std::string& problem) {
  const double L = grid.half_width, dx = grid.dx;
  std::vector<double> x(nodes), U(nodes);
  for (int64_t j = 0; j < nodes; ++j) {
    x[j] = -L + static_cast<double>(j) * dx;
    U[j] = kappa * std::pow(x[j] * x[j] - 1.0, 2);
  }
  // Generator rates (square-root approximation with beta = 2 / sigma^2 = 2, D = sigma^2 / 2 = 1/2):
  // up_j = D / dx^2 exp(-(beta / 2)(U_{j+1} - U_j)), down_j likewise; none beyond the ends (Neumann).
  std::vector<double> up(nodes, 0.0), down(nodes, 0.0);
  for (int64_t j = 0; j < nodes; ++j) {
    if (j + 1 < nodes) up[j] = 0.5 / (dx * dx) * std::exp(-(U[j + 1] - U[j]));
    if (j > 0) down[j] = 0.5 / (dx * dx) * std::exp(-(U[j - 1] - U[j]));
  }
  // One theta-step backwards in time (s = T - t forwards): (I - theta ds G) psi' = (I + (1 - theta) ds G) psi.
  const auto step = [&](const std::vector<double>& psi, double ds, double theta) {
    std::vector<double> lower(nodes), diag(nodes), upper(nodes), rhs(nodes);
    for (int64_t j = 0; j < nodes; ++j) {
      const double Gpsi = up[j] * ((j + 1 < nodes ? psi[j + 1] : 0.0) - psi[j]) +
                          down[j] * ((j > 0 ? psi[j - 1] : 0.0) - psi[j]);
      rhs[j] = psi[j] + (1.0 - theta) * ds * Gpsi;
      lower[j] = -theta * ds * down[j];
      upper[j] = -theta * ds * up[j];
      diag[j] = 1.0 + theta * ds * (up[j] + down[j]);
    }
    return solve_tridiagonal(lower, diag, upper, std::move(rhs));
  };
  const auto log_table = [&](const std::vector<double>& psi, std::vector<double>& V, std::vector<double>& dV) {
    V.resize(nodes);
    dV.resize(nodes);
    for (int64_t j = 0; j < nodes; ++j) {
      if (!(psi[j] > 0) || !std::isfinite(psi[j])) {
        throw Error("SOC problem '" + problem + "': the double-well PDE solution is not positive at x = " +
                    std::to_string(x[j]) + " (try a smaller interval or time step)");
      }
      V[j] = -std::log(psi[j]);
    }
    for (int64_t j = 0; j < nodes; ++j) {
      if (j == 0) {
        dV[j] = (V[1] - V[0]) / dx;
      } else if (j == nodes - 1) {
        dV[j] = (V[j] - V[j - 1]) / dx;
      } else {
        dV[j] = (V[j + 1] - V[j - 1]) / (2 * dx);
      }
    }
  };
  const int64_t N = grid.time_steps, every = grid.time_steps / grid.stored_times;
  const double ds = T / static_cast<double>(N);
  std::vector<std::vector<double>> V(grid.stored_times + 1), dV(grid.stored_times + 1);
  std::vector<double> psi(nodes);
  for (int64_t j = 0; j < nodes; ++j) psi[j] = std::exp(-nu * std::pow(x[j] * x[j] - 1.0, 2));
  log_table(psi, V[grid.stored_times], dV[grid.stored_times]);  // t = T
  for (int64_t n = 1; n <= N; ++n) {
    if (n == 1) {
      psi = step(step(psi, 0.5 * ds, 1.0), 0.5 * ds, 1.0);  // Rannacher start: two implicit half steps
    } else {
      psi = step(psi, ds, 0.5);  // Crank-Nicolson
    }
    if (n % every == 0) {
      const int64_t stored = grid.stored_times - n / every;  // t = T - n ds
      log_table(psi, V[stored], dV[stored]);
    }
  }
  return {V, dV};
}

Tensor to_tensor(const std::vector<std::vector<double>>& rows) {
  std::vector<Tensor> r;
  for (const auto& row : rows) r.push_back(at::tensor(at::ArrayRef<double>(row), kDouble));
  return at::stack(r);
}

}  // namespace

DoubleWell::DoubleWell(std::string name, std::vector<double> kappa, std::vector<double> nu, Tensor x0, double T,
                       int64_t steps, const DoubleWellGrid& grid)
    : name_(std::move(name)), kappa_(std::move(kappa)), nu_(std::move(nu)), T_(T), steps_(steps), grid_(grid) {
  const std::string what = "SOC problem '" + name_ + "': ";
  const int64_t d = static_cast<int64_t>(kappa_.size());
  if (d < 1 || nu_.size() != kappa_.size()) throw Error(what + "kappa and nu must be non-empty and of equal length");
  for (int64_t i = 0; i < d; ++i) {
    if (!(kappa_[i] >= 0) || !(nu_[i] >= 0)) throw Error(what + "kappa and nu must be >= 0");
  }
  if (!x0.defined() || x0.dim() != 1 || x0.size(0) != d) {
    throw Error(what + "x0 must be a vector of length " + std::to_string(d));
  }
  if (!(T > 0) || steps < 1) throw Error(what + "needs T > 0 and steps >= 1");
  if (!(grid.half_width > 0) || !(grid.dx > 0) || grid.stored_times < 1 || grid.time_steps < 2 ||
      grid.time_steps % grid.stored_times != 0) {
    throw Error(what + "the PDE grid needs half_width > 0, dx > 0, time_steps >= 2 a multiple of stored_times >= 1");
  }
  const double cells = 2 * grid.half_width / grid.dx;
  if (std::abs(cells - std::round(cells)) > 1e-9 * cells || cells < 4) {
    throw Error(what + "dx must divide [-half_width, half_width] into at least 4 cells");
  }
  nodes_ = static_cast<int64_t>(std::round(cells)) + 1;
  x0_ = x0.to(at::kDouble);
  kappa_t_ = at::tensor(at::ArrayRef<double>(kappa_), kDouble);
  nu_t_ = at::tensor(at::ArrayRef<double>(nu_), kDouble);

  // One PDE per distinct (kappa_i, nu_i).
  std::map<std::pair<double, double>, int64_t> table_index;
  std::vector<Tensor> V, dV;
  std::vector<int64_t> table_of(d);
  for (int64_t i = 0; i < d; ++i) {
    const auto key = std::make_pair(kappa_[i], nu_[i]);
    auto it = table_index.find(key);
    if (it == table_index.end()) {
      auto [Vi, dVi] = solve_coordinate(kappa_[i], nu_[i], T_, grid_, nodes_, name_);
      V.push_back(to_tensor(Vi));
      dV.push_back(to_tensor(dVi));
      it = table_index.emplace(key, static_cast<int64_t>(V.size()) - 1).first;
    }
    table_of[i] = it->second;
  }
  V_ = at::stack(V);
  dV_ = at::stack(dV);
  table_of_ = at::tensor(at::ArrayRef<int64_t>(table_of), at::kLong);
}

Tensor DoubleWell::drift(const Tensor& x, double) const {
  const Tensor xd = x.to(at::kDouble);
  return -4.0 * kappa_t_ * xd * (xd.pow(2) - 1.0);  // -d/dx kappa (x^2 - 1)^2
}

Tensor DoubleWell::drift_vjp(const Tensor& x, double, const Tensor& a) const {
  const Tensor xd = x.to(at::kDouble);
  return -4.0 * kappa_t_ * (3.0 * xd.pow(2) - 1.0) * a.to(at::kDouble);  // the Jacobian is diagonal
}

Tensor DoubleWell::sigma(double) const { return at::eye(dim(), kDouble); }
Tensor DoubleWell::state_cost(const Tensor& x, double) const { return at::zeros({x.size(0)}, kDouble); }
Tensor DoubleWell::state_cost_grad(const Tensor& x, double) const { return at::zeros({x.size(0), dim()}, kDouble); }

Tensor DoubleWell::terminal_cost(const Tensor& x) const {
  return (nu_t_ * (x.to(at::kDouble).pow(2) - 1.0).pow(2)).sum(1);
}

Tensor DoubleWell::terminal_cost_grad(const Tensor& x) const {
  const Tensor xd = x.to(at::kDouble);
  return 4.0 * nu_t_ * xd * (xd.pow(2) - 1.0);
}

Tensor DoubleWell::initial_state(int64_t batch, Generator&) const {
  return x0_.unsqueeze(0).expand({batch, dim()}).clone();
}

Tensor DoubleWell::lookup(const Tensor& x, double t, bool derivative) const {
  check_batch(x, dim(), "state");
  const Tensor& table = derivative ? dV_ : V_;
  // Linear in t between stored times ...
  const int64_t S = grid_.stored_times;
  const double s = std::clamp(t / T_, 0.0, 1.0) * static_cast<double>(S);
  const int64_t n = std::min<int64_t>(static_cast<int64_t>(std::floor(s)), S - 1);
  const double wt = s - static_cast<double>(n);
  const Tensor at_t = ((1.0 - wt) * table.select(1, n) + wt * table.select(1, n + 1)).index_select(0, table_of_);  // [d, nodes]
  // ... and linear in x between nodes, x clamped to [-L, L].
  const double L = grid_.half_width;
  const Tensor pos = (x.detach().to(at::kDouble).clamp(-L, L) + L) / grid_.dx;
  const Tensor j = pos.floor().clamp(0, static_cast<double>(nodes_ - 2)).to(at::kLong);
  const Tensor wx = pos - j.to(at::kDouble);
  const Tensor flat = j + nodes_ * at::arange(dim(), at::kLong).unsqueeze(0);  // row i of at_t: coordinate i
  return (1.0 - wx) * at::take(at_t, flat) + wx * at::take(at_t, flat + 1);
}

Tensor DoubleWell::optimal_control(const Tensor& x, double t) const {
  return -lookup(x, t, /*derivative=*/true);  // u* = -sigma^T grad V, sigma = I
}

Tensor DoubleWell::value(const Tensor& x, double t) const { return lookup(x, t, /*derivative=*/false).sum(1); }

std::shared_ptr<DoubleWell> double_well(int64_t d, const DoubleWellGrid& grid) {
  if (d < 1) throw Error("SOC problem 'double_well': the dimension must be >= 1");
  std::vector<double> kappa(d, 1.0), nu(d, 1.0);
  for (int64_t i = 0; i < std::min<int64_t>(d, 3); ++i) {
    kappa[i] = 5.0;
    nu[i] = 3.0;
  }
  return std::make_shared<DoubleWell>("double_well", kappa, nu, at::zeros({d}, kDouble), 1.0, 200, grid);
}

}  // namespace tilt::soc
