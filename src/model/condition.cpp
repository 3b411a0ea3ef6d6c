#include "tilt/model/condition.h"

#include "tilt/core/check.h"
#include "tilt/core/error.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/autograd.h>

#include <cmath>
#include <mutex>

namespace tilt {

Tensor condition_rows(const Tensor& c, int64_t batch, int64_t dim, const std::string& who) {
  if (!c.defined()) return c;
  if (dim == 0) throw Error(who + " takes no condition, but one was given (" + shape_string(c) + ")");
  if (c.dim() != 2 || c.size(1) != dim || (c.size(0) != batch && c.size(0) != 1)) {
    throw Error(who + ": conditions must be [" + std::to_string(batch) + ", " + std::to_string(dim) + "] or [1, " +
                std::to_string(dim) + "], got " + shape_string(c));
  }
  return c.size(0) == batch ? c : c.expand({batch, dim});
}

namespace {

// Rows [r0, r0 + n) of a per-row tensor of a batch of `rows` rows; a tensor for the whole batch ([1, ...] or a
// scalar) or an undefined one as it is.
Tensor rows_of(const Tensor& t, int64_t rows, int64_t r0, int64_t n) {
  return t.defined() && t.dim() > 0 && t.size(0) == rows && n != rows ? t.narrow(0, r0, n) : t;
}

// Whether a batch x of `field` is computed on blocks of its rows at once (by_row_blocks, at least 2 rows each).
bool split_rows(const VelocityFieldPtr& field, const Tensor& x) {
  if (!field) throw Error("velocity_by_rows: no velocity field");
  return field->parallel_rows() && x.device().is_cpu();
}

constexpr int64_t kMinBlockRows = 2;

// v(x, t) = (1 + w) v(x, t | c) - w v(x, t | null), or v(x, t | c) for w = 0.
//
// Where the field allows it (parallel_rows) the bound field computes a batch on blocks of its rows, one per thread
// at once, with the conditions (and per-row times) split with the rows: a caller that steps it as an ordinary
// field (the samplers, the evaluations, the rollouts of DDPO, EAM and RAM) gains what velocity_by_rows gives Adjoint
// Matching's rollout. Its velocity does so without gradients only: a graph built on blocks is backpropagated as
// small blocks one after the other, which cost more than they saved (EAM's U-Net iteration, whose regression runs
// the bound field under autograd, took 1.5x as long; bench/am_bench.cpp, BM_EamIteration/3/0). Its vjp, a forward
// and a backward pass per block on the block's thread, always does. Inside a block, or called from a block of
// velocity_by_rows, it runs the block as one call (by_row_blocks does not nest).
class BoundVelocity : public VelocityField {
 public:
  BoundVelocity(VelocityFieldPtr field, Tensor c, double w)
      : VelocityField(field->schedule()), field_(std::move(field)), c_(std::move(c)), w_(w) {}

  std::string kind() const override { return field_->kind(); }
  int64_t dim() const override { return field_->dim(); }
  using VelocityField::velocity;
  Tensor velocity(const Tensor& x, const Tensor& t) const override {
    const int64_t B = x.size(0);
    const bool split = split_rows(field_, x) && !at::GradMode::is_enabled();
    return by_row_blocks(B, split, kMinBlockRows, [&](int64_t r0, int64_t n) {
      return std::vector<Tensor>{guided(rows_of(x, B, r0, n), rows_of(t, B, r0, n), rows_of(c_, B, r0, n))};
    })[0];
  }
  Tensor vjp(const Tensor& x, double t, const Tensor& a, Tensor* v_out) const override {
    const int64_t B = x.size(0);
    const std::vector<Tensor> out = by_row_blocks(B, split_rows(field_, x), kMinBlockRows, [&](int64_t r0, int64_t n) {
      Tensor v;
      const Tensor g = guided_vjp(rows_of(x, B, r0, n), t, rows_of(c_, B, r0, n), rows_of(a, B, r0, n),
                                  v_out ? &v : nullptr);
      return std::vector<Tensor>{g, v};
    });
    if (v_out) *v_out = out[1];
    return out[0];
  }
  bool vjp_needs_autograd() const override { return c_.defined() || field_->vjp_needs_autograd(); }
  // One condition per row would have to be split with the rows: velocity_by_rows binds each block's own.
  bool parallel_rows() const override { return field_->parallel_rows() && (!c_.defined() || c_.size(0) == 1); }
  std::vector<Tensor> parameters() const override { return field_->parameters(); }
  void set_trainable(bool trainable) override { field_->set_trainable(trainable); }
  NamedTensors named_parameters() const override { return field_->named_parameters(); }
  VelocityFieldPtr clone() const override { return std::make_shared<BoundVelocity>(field_->clone(), c_, w_); }
  void to(const at::Device& device) override {
    field_->to(device);
    if (c_.defined()) c_ = c_.to(device);
  }
  at::Device device() const override { return field_->device(); }

 private:
  Tensor guided(const Tensor& x, const Tensor& t, const Tensor& c) const {
    const Tensor v = field_->conditional_velocity(x, t, c);
    if (w_ == 0.0) return v;
    return (1.0 + w_) * v - w_ * field_->conditional_velocity(x, t, Tensor());
  }
  Tensor guided_vjp(const Tensor& x, double t, const Tensor& c, const Tensor& a, Tensor* v_out) const {
    if (w_ == 0.0) return field_->conditional_vjp(x, t, c, a, v_out);
    Tensor v_c, v_null;
    const Tensor g_c = field_->conditional_vjp(x, t, c, a, v_out ? &v_c : nullptr);
    const Tensor g_null = field_->conditional_vjp(x, t, Tensor(), a, v_out ? &v_null : nullptr);
    if (v_out) *v_out = (1.0 + w_) * v_c - w_ * v_null;
    return (1.0 + w_) * g_c - w_ * g_null;
  }

  VelocityFieldPtr field_;
  Tensor c_;
  double w_;
};

class BoundReward : public Reward {
 public:
  BoundReward(RewardPtr reward, Tensor c) : reward_(std::move(reward)), c_(std::move(c)) {}
  std::string kind() const override { return reward_->kind(); }
  int64_t dim() const override { return reward_->dim(); }
  Tensor value(const Tensor& x) const override { return reward_->conditional_value(x, c_); }
  Tensor grad(const Tensor& x) const override { return reward_->conditional_grad(x, c_); }

 private:
  RewardPtr reward_;
  Tensor c_;
};

void check_bindable(int64_t condition_dim, const Tensor& c, const std::string& what) {
  if (!c.defined()) return;
  if (condition_dim == 0) throw Error(what + " takes no condition, but one was given (" + shape_string(c) + ")");
  if (c.dim() != 2 || c.size(1) != condition_dim) {
    throw Error(what + ": conditions must be [B, " + std::to_string(condition_dim) + "], got " + shape_string(c));
  }
}

}  // namespace

VelocityFieldPtr bind_condition(VelocityFieldPtr field, Tensor c, double guidance) {
  if (!field) throw Error("bind_condition: no velocity field");
  const std::string what = "the velocity field of kind '" + field->kind() + "'";
  check_bindable(field->condition_dim(), c, what);
  if (!std::isfinite(guidance)) throw Error("guidance weight must be finite, got " + number_string(guidance));
  if (guidance != 0.0 && !c.defined()) {
    throw Error("guidance needs a condition: " + what + " was given the null condition and w = " +
                format_number(guidance));
  }
  // A field that allows row blocks is wrapped even when there is nothing to bind, for the blocks.
  if (!c.defined() && guidance == 0.0 && field->condition_dim() == 0 && !field->parallel_rows()) return field;
  return std::make_shared<BoundVelocity>(std::move(field), std::move(c), guidance);
}

Tensor velocity_by_rows(const VelocityFieldPtr& field, const Tensor& c, double guidance, const Tensor& x, double t,
                        KeptForwards* kept) {
  const int64_t B = x.size(0);
  std::mutex kept_mutex;
  return by_row_blocks(B, split_rows(field, x), kMinBlockRows, [&](int64_t r0, int64_t n) {
    const VelocityFieldPtr bound = bind_condition(field, rows_of(c, B, r0, n), guidance);
    if (!kept) return std::vector<Tensor>{bound->velocity(rows_of(x, B, r0, n), t)};
    at::AutoGradMode enable_grad(true);
    KeptForward piece{r0, rows_of(x, B, r0, n).detach().requires_grad_(true), Tensor()};
    piece.v = bound->velocity(piece.x, t);
    const Tensor v = piece.v.detach();
    std::lock_guard<std::mutex> lock(kept_mutex);
    kept->push_back(std::move(piece));
    return std::vector<Tensor>{v};
  })[0];
}

Tensor vjp_by_rows(const VelocityFieldPtr& field, const Tensor& c, double guidance, const Tensor& x, double t,
                   const Tensor& a, Tensor* v_out, KeptForwards* kept) {
  const int64_t B = x.size(0);
  std::vector<Tensor> out = by_row_blocks(B, split_rows(field, x), kMinBlockRows, [&](int64_t r0, int64_t n) {
    const Tensor a_rows = rows_of(a, B, r0, n);
    if (kept) {  // the blocks only read *kept here; its graphs are freed by the backward passes and it is emptied after
      for (const KeptForward& piece : *kept) {
        if (piece.r0 != r0 || !piece.v.defined() || piece.x.size(0) != n) continue;
        const Tensor g = torch::autograd::grad({piece.v}, {piece.x}, {a_rows}, /*retain_graph=*/false)[0];
        return std::vector<Tensor>{g, v_out ? piece.v.detach() : Tensor()};
      }
    }
    Tensor v;
    Tensor g = bind_condition(field, rows_of(c, B, r0, n), guidance)
                   ->vjp(rows_of(x, B, r0, n), t, a_rows, v_out ? &v : nullptr);
    return std::vector<Tensor>{g, v};
  });
  if (kept) kept->clear();
  if (v_out) *v_out = out[1];
  return out[0];
}

RewardPtr bind_condition(RewardPtr reward, Tensor c) {
  if (!reward) throw Error("bind_condition: no reward");
  check_bindable(reward->condition_dim(), c, "the reward '" + reward->kind() + "'");
  if (!c.defined() && reward->condition_dim() == 0) return reward;
  return std::make_shared<BoundReward>(std::move(reward), std::move(c));
}

ConditionSet::ConditionSet(Tensor values) {
  if (!values.defined() || values.dim() != 2 || values.size(0) < 1 || values.size(1) < 1) {
    throw Error("conditions must be a non-empty table [N, dc] with dc >= 1, got " + shape_string(values));
  }
  values_ = values.to(at::kDouble).contiguous();
  if (!at::isfinite(values_).all().item<bool>()) throw Error("conditions must be finite numbers");
}

ConditionSet ConditionSet::classes(int64_t n) {
  if (n < 1) throw Error("conditions: the number of classes must be >= 1, got " + std::to_string(n));
  return ConditionSet(at::eye(n, at::kDouble));
}

ConditionSet ConditionSet::uniform(const Tensor& lo, const Tensor& hi) {
  if (!lo.defined() || !hi.defined() || lo.dim() != 1 || !lo.sizes().equals(hi.sizes())) {
    throw Error("conditions: a uniform box needs lo and hi of one size [dc], got " + shape_string(lo) + " and " +
                shape_string(hi));
  }
  ConditionSet box(at::stack({lo, hi}));
  if ((box.values_[0] > box.values_[1]).any().item<bool>()) throw Error("conditions: a uniform box needs lo <= hi");
  box.box_ = true;
  return box;
}

bool ConditionSet::contains(const Tensor& c) const {
  const Tensor v = c.to(at::kDouble).reshape({1, -1});
  if (v.size(1) != dim()) return false;
  const Tensor tol = 1e-6 * (1.0 + v.abs());
  if (box_) return ((v >= values_[0] - tol) & (v <= values_[1] + tol)).all().item<bool>();
  return ((values_ - v).abs() <= tol).all(1).any().item<bool>();
}

Tensor ConditionSet::draw(int64_t n, Generator& gen, at::ScalarType dtype) const {
  if (box_) {
    const Tensor u = at::rand({n, dim()}, gen, at::TensorOptions().dtype(at::kDouble));
    return (values_[0] + u * (values_[1] - values_[0])).to(dtype);
  }
  const Tensor index = at::randint(size(), {n}, gen, at::TensorOptions().dtype(at::kLong));
  return values_.index_select(0, index).to(dtype);
}

void check_conditions(const ConditionSetPtr& conditions, int64_t condition_dim, const std::string& who) {
  if (condition_dim == 0 && conditions) {
    throw Error(who + ": conditions were given, but the model is unconditional (it takes no condition)");
  }
  if (condition_dim > 0 && !conditions) {
    throw Error(who + ": the model is conditional (a condition of size " + std::to_string(condition_dim) +
                "), but no conditions to train on were given");
  }
  if (conditions && conditions->dim() != condition_dim) {
    throw Error(who + ": the conditions have size " + std::to_string(conditions->dim()) + " but the model takes " +
                std::to_string(condition_dim));
  }
}

void check_reward_condition(const Reward& reward, int64_t condition_dim, const std::string& who) {
  if (reward.condition_dim() != 0 && reward.condition_dim() != condition_dim) {
    throw Error(who + ": the reward takes a condition of size " + std::to_string(reward.condition_dim()) +
                " but the model takes " + std::to_string(condition_dim));
  }
}

}  // namespace tilt
