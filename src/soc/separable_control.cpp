// The separable control network and the drift curriculum (docs/equations.md, E120).
#include "tilt/soc/separable_control.h"

#include "tilt/core/check.h"
#include "tilt/core/error.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>  // at::NoGradGuard

#include <algorithm>
#include <cmath>
#include <string>

namespace tilt::soc {

namespace {
constexpr double kPi = 3.14159265358979323846;
}  // namespace

SeparableControl::SeparableControl(int64_t dim, double horizon, std::vector<int64_t> hidden, uint64_t seed,
                                   bool zero_output, int64_t time_features)
    : dim_(dim), time_features_(time_features), horizon_(horizon) {
  if (dim < 1) throw Error("separable control: the dimension must be >= 1");
  if (!(horizon > 0)) throw Error("separable control: the horizon must be > 0");
  if (hidden.empty()) throw Error("separable control: needs at least one hidden layer");
  for (int64_t w : hidden) {
    if (w < 1) throw Error("separable control: hidden widths must be >= 1, got " + std::to_string(w));
  }
  if (time_features < 0 || time_features % 2 != 0) {
    throw Error("separable control: time_features must be an even number >= 0, got " + std::to_string(time_features));
  }
  Generator gen = make_generator(seed);
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  std::vector<int64_t> widths = hidden;
  widths.push_back(1);
  int64_t in = 2 + time_features;  // x_i, s and the time embedding
  at::NoGradGuard no_grad;
  for (size_t l = 0; l < widths.size(); ++l) {
    Tensor w = at::empty({dim, in, widths[l]}, opts), b = at::empty({dim, 1, widths[l]}, opts);
    if (l + 1 == widths.size() && zero_output) {
      w.zero_();
      b.zero_();
    } else {
      const double bound = 1.0 / std::sqrt(static_cast<double>(in));  // PyTorch's Linear law, per network
      w.uniform_(-bound, bound, gen);
      b.uniform_(-bound, bound, gen);
    }
    weights_.push_back(w.requires_grad_(true));
    biases_.push_back(b.requires_grad_(true));
    in = widths[l];
  }
}

Tensor SeparableControl::evaluate(const Tensor& x, const Tensor& t) const {
  check_batch(x, dim_, "state");
  const int64_t B = x.size(0);
  if (t.dim() != 1 || t.size(0) != B) throw Error("separable control: t must have one time per row of x");
  const Tensor s = (t.to(at::kDouble) / horizon_).to(at::kFloat).reshape({B, 1});
  std::vector<Tensor> e{s};
  if (time_features_ > 0) {
    const Tensor arg = s * (at::arange(1, time_features_ / 2 + 1, s.options()) * kPi).unsqueeze(0);
    e.push_back(at::sin(arg));
    e.push_back(at::cos(arg));
  }
  const Tensor emb = at::cat(e, 1);  // [B, 1 + time_features]
  // Row i of every layer is coordinate i's network: z [d, B, in] -> [d, B, out]. The first layer splits
  // W_1 [d, 2 + tf, h] into its x_i row and its time rows: the time part is one [B, 1 + tf] x [1 + tf, d h]
  // product for all coordinates (a batched product with 18 inputs is ~10x slower on CPU).
  const Tensor& W1 = weights_[0];
  const int64_t h1 = W1.size(2);
  const Tensor time_part = at::mm(emb, W1.narrow(1, 1, emb.size(1)).permute({1, 0, 2}).reshape({emb.size(1), dim_ * h1}))
                               .view({B, dim_, h1})
                               .permute({1, 0, 2});  // [d, B, h]
  Tensor z = time_part + x.to(at::kFloat).t().unsqueeze(2) * W1.narrow(1, 0, 1) + biases_[0];
  for (size_t l = 1; l < weights_.size(); ++l) z = at::baddbmm(biases_[l], at::silu(z), weights_[l]);
  return z.squeeze(2).t().to(at::kDouble);
}

std::vector<Tensor> SeparableControl::parameters() const {
  std::vector<Tensor> p;
  for (size_t l = 0; l < weights_.size(); ++l) {
    p.push_back(weights_[l]);
    p.push_back(biases_[l]);
  }
  return p;
}

DriftScaledProblem::DriftScaledProblem(ProblemPtr base, double scale) : base_(std::move(base)), scale_(1.0) {
  if (!base_) throw Error("drift-scaled problem: no base problem");
  set_scale(scale);
}

void DriftScaledProblem::set_scale(double scale) {
  if (!(scale >= 0) || !std::isfinite(scale)) {
    throw Error("drift-scaled problem: the scale must be finite and >= 0, got " + std::to_string(scale));
  }
  scale_ = scale;
}

Tensor DriftScaledProblem::drift(const Tensor& x, double t) const { return scale_ * base_->drift(x, t); }

Tensor DriftScaledProblem::drift_vjp(const Tensor& x, double t, const Tensor& a) const {
  return scale_ * base_->drift_vjp(x, t, a);  // (grad_x (c b))^T a = c (grad_x b)^T a
}

double curriculum_scale(double start, double fraction, int64_t iteration, int64_t iterations) {
  if (!(start > 0) || !(start <= 1)) throw Error("curriculum: the start scale must be in (0, 1]");
  if (!(fraction > 0) || !(fraction <= 1)) throw Error("curriculum: the fraction must be in (0, 1]");
  const double ramp = fraction * static_cast<double>(std::max<int64_t>(iterations, 1));
  const double progress = std::min(1.0, static_cast<double>(std::max<int64_t>(iteration - 1, 0)) / ramp);
  return start + (1.0 - start) * progress;
}

}  // namespace tilt::soc
