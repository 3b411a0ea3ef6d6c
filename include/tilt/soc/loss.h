// One interface for every training loss: a loss draws what it needs (data, trajectories) from the
// generator it is given and returns a scalar to minimise, plus metrics to log. It sits in the soc layer,
// below train: the SOC losses implement it, and the fine-tuning methods (train/) are SOC losses too.
#pragma once

#include "tilt/core/tensor.h"

#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace tilt {

struct LossOutput {
  Tensor loss;                                         ///< 0-dim, differentiable in parameters()
  std::vector<std::pair<std::string, double>> metrics; ///< logged with each iteration
};

/// Parameters the optimiser updates with their own learning rate.
struct ParameterGroup {
  std::vector<Tensor> params;
  double lr = 0;  ///< 0: the trainer's learning rate; else this one, scaled by the trainer's lr schedule alike
};

/// A loss is one training state (its buffers, its step's scratch tensors): call compute() from one thread at a
/// time. Two threads training at once each need a loss of their own (two compute() calls on one
/// AdjointMatching at once failed inside LibTorch).
class Loss {
 public:
  virtual ~Loss() = default;
  virtual std::string name() const = 0;
  /// The parameters the optimiser updates.
  virtual std::vector<Tensor> parameters() const = 0;
  /// parameters() in groups (concatenated in order, they must be parameters()); by default one group
  /// at the trainer's learning rate.
  virtual std::vector<ParameterGroup> parameter_groups() const { return {{parameters(), 0.0}}; }
  /// One stochastic estimate, with all randomness drawn from gen.
  virtual LossOutput compute(Generator& gen) = 0;
  /// Called by the trainer before the compute() calls of iteration `iteration` (0-based; after a
  /// resume, the checkpoint's), for losses whose work depends on it (an update schedule).
  virtual void begin_iteration(int64_t /*iteration*/) {}

  /// The number of samples (trajectories, paths, data points) compute() draws; 0 if the loss has
  /// no batch it can split.
  virtual int64_t batch_size() const { return 0; }
  /// Makes compute() draw n samples. The trainer uses it to compute a shard of the batch (gradient
  /// accumulation, data-parallel training) and restores batch_size() afterwards. Throws tilt::Error
  /// if the loss cannot work with n samples (a batch variance needs n >= 2) or has no batch.
  virtual void set_batch_size(int64_t n);

  /// State besides the parameters that a checkpoint must keep to resume exactly (a replay buffer,
  /// counters); empty for losses that keep none. The trainer saves it with each checkpoint and hands
  /// it back to load_state() on resume.
  virtual std::vector<std::pair<std::string, Tensor>> state() const { return {}; }
  virtual void load_state(const std::vector<std::pair<std::string, Tensor>>& /*state*/) {}
};

/// A weighted sum of losses over the same parameters, sum_i w_i L_i, each drawing its own batch (the parameters
/// and their groups are the first loss's; each term must train a subset of them). Metrics: the first loss's under
/// their names, the others' prefixed with "<name>_". batch_size() is the first's; set_batch_size() sets every term's.
class LossSum : public Loss {
 public:
  struct Term {
    std::unique_ptr<Loss> loss;
    double weight = 1.0;
  };
  /// Throws tilt::Error without terms, with a null loss, or with a weight that is not finite and >= 0.
  LossSum(std::string name, std::vector<Term> terms);
  std::string name() const override { return name_; }
  std::vector<Tensor> parameters() const override { return terms_.front().loss->parameters(); }
  std::vector<ParameterGroup> parameter_groups() const override { return terms_.front().loss->parameter_groups(); }
  LossOutput compute(Generator& gen) override;
  void begin_iteration(int64_t iteration) override;
  int64_t batch_size() const override { return terms_.front().loss->batch_size(); }
  void set_batch_size(int64_t n) override;
  std::vector<std::pair<std::string, Tensor>> state() const override;
  void load_state(const std::vector<std::pair<std::string, Tensor>>& state) override;
  const Loss& term(size_t i) const { return *terms_.at(i).loss; }

 private:
  std::string name_;
  std::vector<Term> terms_;
};

}  // namespace tilt
