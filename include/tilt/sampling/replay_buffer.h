// A FIFO replay buffer of terminal samples X_1 and their adjoints grad g(X_1) (Adjoint Sampling,
// docs/equations.md, E62): new items push out the oldest once `capacity` is reached; batches are
// drawn uniformly with replacement.
#pragma once

#include "tilt/core/tensor.h"

namespace tilt::sampling {

class ReplayBuffer {
 public:
  ReplayBuffer(int64_t capacity, int64_t dim);

  int64_t size() const;
  int64_t capacity() const { return capacity_; }
  /// Appends rows (x1 [n, d], adjoint [n, d]); the oldest rows go once capacity is exceeded.
  void push(const Tensor& x1, const Tensor& adjoint);
  /// n rows drawn uniformly with replacement: {x1, adjoint}.
  std::pair<Tensor, Tensor> sample(int64_t n, Generator& gen) const;

  const Tensor& x1() const { return x1_; }
  const Tensor& adjoint() const { return adjoint_; }
  /// Replaces the contents (checkpoints); throws tilt::Error on mismatched shapes.
  void restore(const Tensor& x1, const Tensor& adjoint);

 private:
  int64_t capacity_, dim_;
  Tensor x1_, adjoint_;  // [size, d] double, oldest first
};

}  // namespace tilt::sampling
