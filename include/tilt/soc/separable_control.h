// Controls for problems whose dynamics and costs separate by coordinate, and a drift curriculum.
#pragma once

#include "tilt/soc/control.h"
#include "tilt/soc/problem.h"

#include <cstdint>
#include <memory>
#include <vector>

namespace tilt::soc {

/// A separable control: u_i(x, t) = N_i(x_i, t / T), one small MLP per coordinate i (SiLU between the
/// layers; the time embedding [s, sin(pi f s), cos(pi f s), f = 1..time_features / 2] of the velocity
/// networks, s = t / T), evaluated in float32. Where b, f and g separate by coordinate, so does the
/// optimal control (u*_i depends on x_i and t only: docs/equations.md, E45); this family contains such
/// controls and nothing else, with far fewer inputs per network. The d networks are evaluated together
/// as batched matrix products (one [d, in, out] weight per layer).
class SeparableControl : public ParametricControl {
 public:
  /// hidden: widths of each coordinate's hidden layers; zero_output: start at u = 0.
  SeparableControl(int64_t dim, double horizon, std::vector<int64_t> hidden, uint64_t seed, bool zero_output = true,
                   int64_t time_features = 16);

  int64_t dim() const override { return dim_; }
  Tensor evaluate(const Tensor& x, const Tensor& t) const override;
  std::vector<Tensor> parameters() const override;
  /// Layer l's weights [d, in, out] and biases [d, 1, out] (row i: coordinate i's network).
  const std::vector<Tensor>& weights() const { return weights_; }
  const std::vector<Tensor>& biases() const { return biases_; }
  double horizon() const { return horizon_; }

 private:
  int64_t dim_, time_features_;
  double horizon_;
  std::vector<Tensor> weights_, biases_;
};

/// A problem whose drift is scaled by a settable factor c: b_c(x, t) = c b(x, t) (and its VJP likewise);
/// everything else is the base problem's. For the double well (E45) c scales every barrier kappa_i, so
/// raising c from small to 1 over a run is a curriculum in the barrier height (docs/equations.md, E120).
/// It has no ground truth of its own (the optimum depends on c); score against the base problem.
class DriftScaledProblem : public Problem {
 public:
  explicit DriftScaledProblem(ProblemPtr base, double scale = 1.0);

  void set_scale(double scale);
  double scale() const { return scale_; }
  const Problem& base() const { return *base_; }

  std::string name() const override { return base_->name(); }
  int64_t dim() const override { return base_->dim(); }
  double horizon() const override { return base_->horizon(); }
  int64_t default_steps() const override { return base_->default_steps(); }
  Tensor drift(const Tensor& x, double t) const override;
  Tensor drift_vjp(const Tensor& x, double t, const Tensor& a) const override;
  Tensor sigma(double t) const override { return base_->sigma(t); }
  bool constant_sigma() const override { return base_->constant_sigma(); }
  Tensor state_cost(const Tensor& x, double t) const override { return base_->state_cost(x, t); }
  Tensor state_cost_grad(const Tensor& x, double t) const override { return base_->state_cost_grad(x, t); }
  Tensor terminal_cost(const Tensor& x) const override { return base_->terminal_cost(x); }
  Tensor terminal_cost_grad(const Tensor& x) const override { return base_->terminal_cost_grad(x); }
  Tensor initial_state(int64_t batch, Generator& gen) const override { return base_->initial_state(batch, gen); }
  bool has_stopping_time() const override { return base_->has_stopping_time(); }
  Tensor stopped(const Tensor& x) const override { return base_->stopped(x); }

 private:
  ProblemPtr base_;
  double scale_;
};

/// The curriculum's drift scale at `iteration` (1-based) of `iterations` (docs/equations.md, E120):
/// c = start + (1 - start) min(1, (iteration - 1) / (fraction iterations)), so c rises linearly from
/// `start` at the first iteration to 1 at a `fraction` of the run and stays 1 after it.
double curriculum_scale(double start, double fraction, int64_t iteration, int64_t iterations);

}  // namespace tilt::soc
