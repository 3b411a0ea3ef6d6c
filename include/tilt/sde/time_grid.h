// Time grids t_0 < t_1 < ... < t_K on [0, 1].
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace tilt {

class TimeGrid {
 public:
  /// K uniform steps t_k = t0 + k (t1 - t0) / K.
  static TimeGrid uniform(int64_t steps, double t0 = 0.0, double t1 = 1.0);
  /// Any strictly increasing sequence of at least two times in [0, 1]; tilt::Error otherwise.
  explicit TimeGrid(std::vector<double> times);

  int64_t steps() const { return static_cast<int64_t>(t_.size()) - 1; }
  double operator[](int64_t k) const { return t_[static_cast<size_t>(k)]; }
  /// h_k = t_{k+1} - t_k.
  double step(int64_t k) const { return t_[k + 1] - t_[k]; }
  const std::vector<double>& times() const { return t_; }

 private:
  std::vector<double> t_;
};

}  // namespace tilt
