#include "tilt/train/buffered_adjoint_matching.h"
#include "weight_metrics.h"

#include "tilt/core/error.h"
#include "tilt/sde/engine.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <cmath>

namespace tilt {

namespace {

const char* kWhat = "buffered adjoint matching";

// A list of tensors of one shape as one [n, ...] tensor on the CPU (a checkpoint entry), or an empty one.
Tensor stack_cpu(const std::vector<Tensor>& list) {
  if (list.empty()) return at::empty({0});
  for (const Tensor& t : list) {
    if (!t.defined()) throw Error(std::string(kWhat) + ": a deterministic step in the buffer's rollout (sigma = 0)");
  }
  return at::stack(list).cpu();
}

std::vector<Tensor> unstack(const Tensor& stacked, const at::Device& device) {
  std::vector<Tensor> out;
  if (!stacked.defined() || stacked.numel() == 0) return out;
  for (int64_t i = 0; i < stacked.size(0); ++i) out.push_back(stacked[i].to(device));
  return out;
}

Tensor cpu_or_empty(const Tensor& t) { return t.defined() ? t.cpu() : at::empty({0}); }
Tensor defined_or_none(const Tensor& t, const at::Device& device) {
  return t.defined() && t.numel() > 0 ? t.to(device) : Tensor();
}

}  // namespace

BufferedAdjointMatching::BufferedAdjointMatching(std::shared_ptr<FineTunedVelocity> model, RewardPtr reward,
                                                 NoiseSchedulePtr noise, const AdjointMatchingOptions& am,
                                                 const BufferOptions& buffer)
    : am_(std::move(model), std::move(reward), std::move(noise), am), options_(buffer), batch_(am.batch_size) {
  if (options_.size < batch_ || options_.size % batch_ != 0) {
    throw Error(std::string(kWhat) + ": the buffer's size must be a positive multiple of batch_size = " +
                std::to_string(batch_) + ", got " + std::to_string(options_.size));
  }
  if (options_.passes < 1) throw Error(std::string(kWhat) + ": passes must be >= 1, got " + std::to_string(options_.passes));
  if (options_.weights != "future" && options_.weights != "none") {
    throw Error(std::string(kWhat) + ": weights must be 'future' or 'none', got '" + options_.weights + "'");
  }
  refill_every_ = options_.size / batch_ * options_.passes;
}

void BufferedAdjointMatching::refill(Generator& gen) {
  am_.set_batch_size(options_.size);
  try {
    buffer_ = am_.simulate(gen, options_.weights == "future");
  } catch (...) {
    am_.set_batch_size(batch_);
    throw;
  }
  am_.set_batch_size(batch_);
  std::vector<Tensor> passes;
  for (int64_t p = 0; p < options_.passes; ++p) {
    passes.push_back(at::randperm(options_.size, gen, at::TensorOptions().dtype(at::kLong)));
  }
  order_ = at::cat(passes);
  filled_ = true;
}

// The current model's velocity at the buffer's X_k, as the rollout that filled it evaluates it (guided, at its c).
// Unconditional: v_base(X_k) is in the buffer, so only the trainable network runs (residual mode: v_base + r_theta).
Tensor BufferedAdjointMatching::current_velocity(const AdjointBatch& rows, int64_t k) const {
  at::NoGradGuard no_grad;
  if (rows.c.defined()) return am_.policy_velocity(rows.x[k], k, rows.c);
  const Tensor& v_base = rows.adjoint.v_base[k];
  const FineTunedVelocity& model = am_.model();
  return v_base + model.delta(rows.x[k], at::full({rows.rows()}, am_.grid()[k], rows.x[k].options()), v_base);
}

// Per step k >= first_step: B softmax(log w_k), log w_k = log dQ_theta/dQ_old of the path after t_k (the header;
// docs/equations.md, E126). The ESS fraction of the weights at first_step goes to *ess.
std::vector<Tensor> BufferedAdjointMatching::future_weights(const AdjointBatch& rows, int64_t first_step, double* ess) {
  at::NoGradGuard no_grad;
  const int64_t B = rows.rows();
  const std::vector<StepKernel> kernels = am_.chain_kernels();
  std::vector<Tensor> weights(rows.x.size());
  PathWeight future(B);  // accumulated from the last noisy step back to step k
  for (int64_t k = static_cast<int64_t>(rows.x.size()) - 1; k >= first_step; --k) {
    if (k < static_cast<int64_t>(rows.xi.size()) && rows.xi[k].defined()) {
      const Tensor shift = kernels[k].c_v * (rows.v[k] - current_velocity(rows, k));
      future.add_step(shift, rows.xi[k], kernels[k].std);
    }
    weights[k] = static_cast<double>(B) * at::softmax(future.log_weight(), 0);
  }
  const Tensor w = weights[first_step];
  *ess = (w.sum().pow(2) / (static_cast<double>(B) * w.pow(2).sum())).item<double>();
  return weights;
}

LossOutput BufferedAdjointMatching::compute(Generator& gen) {
  const int64_t j = iteration_ % refill_every_;
  if (j == 0) {
    refill(gen);
  } else if (!filled_) {
    throw Error(std::string(kWhat) + ": iteration " + std::to_string(iteration_) + " continues the buffer filled at "
                "iteration " + std::to_string(iteration_ - j) + ", which is not there (a checkpoint without the loss's "
                "state?)");
  }
  last_rows_ = order_.narrow(0, j * batch_, batch_);
  const AdjointBatch rows = buffer_.rows(last_rows_);
  const std::vector<int64_t> steps = am_.loss_steps(gen);
  double weight_ess = 1.0;
  if (options_.weights == "future") {
    last_weights_ = future_weights(rows, steps.front(), &weight_ess);
  } else {
    last_weights_.clear();
  }
  LossOutput out = am_.regression(rows, steps, last_weights_);
  if (buffer_.log_w.defined()) detail::add_weight_metrics(out, buffer_.log_w);
  out.metrics.emplace_back("buffer_age", static_cast<double>(j));
  if (options_.weights == "future") out.metrics.emplace_back("weight_ess", weight_ess);
  ++iteration_;
  return out;
}

// Before the first refill every entry is empty (the buffer's vectors are, its tensors and order_ undefined), so that a
// checkpoint always has the same keys.
std::vector<std::pair<std::string, Tensor>> BufferedAdjointMatching::state() const {
  const AdjointBatch& b = buffer_;
  return {{"buffer_x", stack_cpu(b.x)},
          {"buffer_a", stack_cpu(b.adjoint.a)},
          {"buffer_v_base", stack_cpu(b.adjoint.v_base)},
          {"buffer_x1", cpu_or_empty(b.adjoint.x1)},
          {"buffer_c", cpu_or_empty(b.c)},
          {"buffer_xi", stack_cpu(b.xi)},
          {"buffer_v", stack_cpu(b.v)},
          {"buffer_reward", cpu_or_empty(b.reward)},
          {"buffer_log_w", cpu_or_empty(b.log_w)},
          {"buffer_order", cpu_or_empty(order_)}};
}

void BufferedAdjointMatching::load_state(const std::vector<std::pair<std::string, Tensor>>& state) {
  AdjointBatch b;
  Tensor order;
  const at::Device device = am_.finetuned_sde().velocity().device();
  for (const auto& [key, value] : state) {
    if (key == "buffer_x") b.x = unstack(value, device);
    else if (key == "buffer_a") b.adjoint.a = unstack(value, device);
    else if (key == "buffer_v_base") b.adjoint.v_base = unstack(value, device);
    else if (key == "buffer_x1") b.adjoint.x1 = defined_or_none(value, device);
    else if (key == "buffer_c") b.c = defined_or_none(value, device);
    else if (key == "buffer_xi") b.xi = unstack(value, device);
    else if (key == "buffer_v") b.v = unstack(value, device);
    else if (key == "buffer_reward") b.reward = defined_or_none(value, device);
    else if (key == "buffer_log_w") b.log_w = defined_or_none(value, device);
    else if (key == "buffer_order") order = defined_or_none(value, at::kCPU);
  }
  if (b.x.empty()) {  // saved before the first refill
    filled_ = false;
    return;
  }
  const int64_t K = am_.grid().steps();
  const bool complete = static_cast<int64_t>(b.adjoint.a.size()) == K + 1 && b.adjoint.x1.defined() &&
                        b.reward.defined() && order.defined() && order.numel() == options_.size * options_.passes &&
                        b.x.front().size(0) == options_.size &&
                        (options_.weights == "none" || (!b.xi.empty() && b.v.size() == b.xi.size()));
  if (!complete) {
    throw Error(std::string(kWhat) + ": the checkpoint's buffer does not match this run's (buffer size " +
                std::to_string(options_.size) + ", passes " + std::to_string(options_.passes) + ", weights '" +
                options_.weights + "', " + std::to_string(K) + " steps)");
  }
  buffer_ = std::move(b);
  order_ = order.to(at::kLong);
  filled_ = true;
}

}  // namespace tilt
