// The label-free convergence signals of a rollout's log weights (internal to the library; Adjoint Matching's and the
// unified view's losses report them alike): log w = lambda r(X_K) + log dP_base/dQ_model (docs/equations.md, E104).
#pragma once

#include "tilt/soc/loss.h"

#include <ATen/ATen.h>

#include <cmath>

namespace tilt::detail {

/// Appends ess = (sum w)^2 / (B sum w^2) in (0, 1] and log_z = log mean w, the estimate of log Z, of log_w [B].
inline void add_weight_metrics(LossOutput& out, const Tensor& log_w) {
  const Tensor lw = log_w.detach().to(at::kDouble);
  const double n = static_cast<double>(lw.size(0));
  const double lse = at::logsumexp(lw, 0).item<double>();
  const double lse2 = at::logsumexp(2.0 * lw, 0).item<double>();
  out.metrics.emplace_back("ess", std::exp(2.0 * lse - lse2) / n);
  out.metrics.emplace_back("log_z", lse - std::log(n));
}

}  // namespace tilt::detail
