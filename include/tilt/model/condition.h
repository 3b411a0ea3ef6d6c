// Conditions: the c of v(x, t | c) and r(x, c), the stand-in for a prompt (docs/conditions.md).
//
// A condition is a vector of condition_dim() numbers: a class label is its one-hot row, an embedding
// is itself. Fields and rewards take one condition per row of x ([B, dc]) or one for the whole batch
// ([1, dc]); an undefined tensor is the null condition (unconditional, what guidance subtracts).
//
// Samplers, the engine and the fine-tuning methods run ordinary fields: a conditional field is bound to
// the batch's conditions (bind_condition) before it is stepped, so that nothing below needs to know.
#pragma once

#include "tilt/model/reward.h"
#include "tilt/model/velocity.h"

#include <memory>
#include <string>

namespace tilt {

/// c for a batch of `batch` rows: [batch, dim] as is, [1, dim] expanded, undefined stays undefined.
/// Throws tilt::Error naming `who` for any other shape, or for a defined c when dim is 0.
Tensor condition_rows(const Tensor& c, int64_t batch, int64_t dim, const std::string& who);

/// The field at fixed conditions c ([B, dc] for batches of B rows, or [1, dc] for any batch; undefined:
/// the null condition), an unconditional field, with classifier-free guidance of weight w:
///   v(x, t) = (1 + w) v(x, t | c) - w v(x, t | null)   (Adjoint Matching, Sec. 7; docs/equations.md, E97).
/// Its parameters are the field's own (training the bound field trains the field). w = 0 is plain
/// conditioning. Where the field allows it (VelocityField::parallel_rows) and x is on the CPU, the bound field
/// computes a batch on blocks of its rows, one per thread at once, its conditions (and a time per row) split with
/// the rows, as velocity_by_rows below: its vjp always, its velocity when gradients are off (a sampler's steps).
/// Throws tilt::Error if the field takes no condition but c is given, or if w != 0 for a null c.
VelocityFieldPtr bind_condition(VelocityFieldPtr field, Tensor c, double guidance = 0.0);

/// One block of rows' forward pass kept with its autograd graph by velocity_by_rows: rows [r0, r0 + x.size(0)) of
/// the batch, x requiring grad, v the bound field at x.
struct KeptForward {
  int64_t r0 = 0;
  Tensor x, v;
};
using KeptForwards = std::vector<KeptForward>;

/// bind_condition(field, c, guidance)->velocity(x, t), computed on blocks of the batch's rows, one per thread at
/// once, where the field allows it (VelocityField::parallel_rows) and x is on the CPU; a condition per row is split
/// with the rows (by_row_blocks in tilt/core/tensor.h). With `kept`, each block runs under autograd with its x
/// requiring grad and adds its graph to *kept, for vjp_by_rows at the same x (the returned velocity has no graph).
Tensor velocity_by_rows(const VelocityFieldPtr& field, const Tensor& c, double guidance, const Tensor& x, double t,
                        KeptForwards* kept = nullptr);
/// bind_condition(field, c, guidance)->vjp(x, t, a, v_out), by row blocks as velocity_by_rows. With `kept` (from
/// velocity_by_rows at the same x, field, c and guidance), a block whose forward pass was kept takes its VJP from
/// that graph, one backward pass instead of a forward and a backward; *kept is emptied (its graphs freed).
Tensor vjp_by_rows(const VelocityFieldPtr& field, const Tensor& c, double guidance, const Tensor& x, double t,
                   const Tensor& a, Tensor* v_out = nullptr, KeptForwards* kept = nullptr);

/// The reward at fixed conditions c: r(x) = r(x, c). Throws tilt::Error as bind_condition above.
RewardPtr bind_condition(RewardPtr reward, Tensor c);

/// Where a fine-tuning method draws each trajectory's condition from: a finite set, drawn uniformly
/// with replacement (the training prompts), or a distribution, the uniform law on a box [lo, hi]^dc.
class ConditionSet {
 public:
  /// values [N, dc], N >= 1, dc >= 1, finite. Throws tilt::Error naming the problem.
  explicit ConditionSet(Tensor values);
  /// The classes 0..n-1 as one-hot rows of size n.
  static ConditionSet classes(int64_t n);
  /// The uniform law on the box lo <= c <= hi (each [dc], finite, lo <= hi). values() is then [lo; hi].
  static ConditionSet uniform(const Tensor& lo, const Tensor& hi);

  int64_t dim() const { return values_.size(1); }
  int64_t size() const { return values_.size(0); }
  /// The set's rows (float64), or for a box its two corners [lo; hi].
  const Tensor& values() const { return values_; }
  bool is_box() const { return box_; }
  /// Whether c ([dc]) is one of the rows (to float32's precision), or inside the box.
  bool contains(const Tensor& c) const;
  /// n conditions drawn uniformly (with replacement, or in the box), [n, dc] in dtype.
  Tensor draw(int64_t n, Generator& gen, at::ScalarType dtype = at::kFloat) const;

 private:
  Tensor values_;
  bool box_ = false;
};

using ConditionSetPtr = std::shared_ptr<const ConditionSet>;

/// Throws tilt::Error naming `who` unless the conditions fit what takes them: a set for a conditional
/// model (its dimension the model's), none for an unconditional one.
void check_conditions(const ConditionSetPtr& conditions, int64_t condition_dim, const std::string& who);

/// Throws tilt::Error naming `who` unless the reward takes no condition or the model's (condition_dim).
void check_reward_condition(const Reward& reward, int64_t condition_dim, const std::string& who);

}  // namespace tilt
