#include "tilt/train/trainer.h"

#include "autocast.h"

#include "tilt/core/error.h"
#include "tilt/core/fs.h"
#include "tilt/core/log.h"
#include "tilt/core/progress.h"
#include "tilt/train/distributed.h"

#include "../core/checksum.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>  // at::NoGradGuard; not pulled in by ATen.h since LibTorch 2.0
#include <torch/optim/adam.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <deque>
#include <sstream>

#include <fcntl.h>
#include <unistd.h>

namespace tilt {

namespace {
// Version 2: a frame around LibTorch's archive, checked before LibTorch parses a byte of it (a
// damaged zip can crash LibTorch's reader): the line "tilt-checkpoint 2 <bytes> <crc32>\n", then the
// archive. Version 1 files (the bare archive, which starts "PK") are still read, unchecked.
constexpr int64_t kCheckpointVersion = 2;
const std::string kCheckpointMagic = "tilt-checkpoint";

// The first line of an exception's message (TorchScript's carry a source excerpt after it).
std::string first_line(const std::string& text) {
  const size_t start = std::min(text.size(), text.find_first_not_of(" \n"));
  return text.substr(start, text.find('\n', start) - start);
}

std::string sci(double x) {
  if (std::isnan(x)) return "nan";  // printf's sign of a NaN ("-nan") means nothing to a user
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.4g", x);
  return buf;
}
// The metrics stream (one JSON line per iteration). Every write is checked: a line that cannot be
// written whole (a full disk) is cut off again, so the file never holds half a record, and the
// run stops with an error naming the file.
class MetricsFile {
 public:
  explicit MetricsFile(std::string path) : path_(std::move(path)) {
    fd_ = ::open(path_.c_str(), O_WRONLY | O_APPEND | O_CLOEXEC);
    if (fd_ < 0) fail(errno);
    const off_t end = ::lseek(fd_, 0, SEEK_END);
    if (end < 0) fail(errno);
    size_ = end;
  }
  ~MetricsFile() {
    if (fd_ >= 0) ::close(fd_);
  }
  MetricsFile(const MetricsFile&) = delete;
  MetricsFile& operator=(const MetricsFile&) = delete;

  void append(const std::string& line) {
    if (const int err = write_all(fd_, line.data(), line.size())) {
      if (::ftruncate(fd_, size_) != 0) {
        // The partial line stays; a resumed run keeps only whole records (Trainer::run).
      }
      fail(err);
    }
    size_ += static_cast<off_t>(line.size());
  }

 private:
  [[noreturn]] void fail(int err) const {
    throw Error("cannot write metrics file '" + path_ + "': " + std::strerror(err));
  }
  std::string path_;
  int fd_ = -1;
  off_t size_ = 0;
};

}  // namespace

struct Trainer::Impl {
  Loss& loss;
  TrainerOptions options;
  std::vector<Tensor> params;
  std::unique_ptr<torch::optim::Adam> optimizer;
  int64_t iteration = 0;

  std::vector<double> group_lr;  // each parameter group's base learning rate

  int64_t batch = 0;                  // the loss's whole batch (shards > 1)
  std::vector<int64_t> shard_batch;   // samples in each shard
  std::vector<int64_t> my_shards;     // the shards this process computes
  bool synchronised = false;          // parameters broadcast from rank 0 (distributed)
  std::string stop_reason;            // why run() stopped early (TrainerOptions::early_stop)

  int rank() const { return options.group ? options.group->rank() : 0; }
  int world() const { return options.group ? options.group->world_size() : 1; }

  Impl(Loss& l, const TrainerOptions& o) : loss(l), options(o) {
    const std::vector<ParameterGroup> groups = l.parameter_groups();
    for (const auto& g : groups) {
      if (g.lr < 0 || !std::isfinite(g.lr)) throw Error("trainer: a parameter group of the " + loss.name() + " loss has lr < 0");
      params.insert(params.end(), g.params.begin(), g.params.end());
    }
    if (params.empty()) throw Error("trainer: the " + loss.name() + " loss has no trainable parameters");
    if (options.precision == Precision::bfloat16) {
      for (const Tensor& p : params) {
        if (p.scalar_type() != at::kFloat) {
          throw Error("trainer: precision = \"bfloat16\" autocasts float32 models; the " + loss.name() +
                      " loss's parameters are " + std::string(c10::toString(p.scalar_type())));
        }
      }
      AutocastScope check(params.front().device(), true);  // refuses a device type autocast does not serve
    }
    const AdamOptions& a = options.adam;
    if (!(a.lr > 0) || !(a.beta1 >= 0 && a.beta1 < 1) || !(a.beta2 >= 0 && a.beta2 < 1) || !(a.eps > 0) ||
        !(a.weight_decay >= 0)) {
      throw Error("trainer: Adam needs lr > 0, 0 <= beta1, beta2 < 1, eps > 0, weight_decay >= 0");
    }
    if (options.iterations < 0) throw Error("trainer: iterations must be >= 0");
    if (!(options.lr_final_factor > 0) || options.lr_final_factor > 1) {
      throw Error("trainer: lr_final_factor must be in (0, 1]");
    }
    const auto adam = torch::optim::AdamOptions(a.lr).betas({a.beta1, a.beta2}).eps(a.eps).weight_decay(a.weight_decay);
    std::vector<torch::optim::OptimizerParamGroup> param_groups;
    for (const auto& g : groups) {
      if (g.params.empty()) continue;
      group_lr.push_back(g.lr > 0 ? g.lr : a.lr);
      auto options_g = std::make_unique<torch::optim::AdamOptions>(adam);
      options_g->lr(group_lr.back());
      param_groups.emplace_back(g.params, std::move(options_g));
    }
    optimizer = std::make_unique<torch::optim::Adam>(param_groups, adam);
    plan_shards();
  }

  void plan_shards() {
    if (options.shards == 0) options.shards = world();
    const int64_t S = options.shards, W = world();
    if (S < 1) throw Error("trainer: shards must be >= 1 (or 0: one per process), got " + std::to_string(S));
    if (S < W) {
      throw Error("trainer: " + std::to_string(S) + " shard(s) of the batch for " + std::to_string(W) +
                  " processes: every process needs at least one shard (set shards to a multiple of " +
                  std::to_string(W) + ")");
    }
    for (int64_t s = rank(); s < S; s += W) my_shards.push_back(s);
    if (S == 1) return;
    batch = loss.batch_size();
    if (batch < 1) throw Error("trainer: the " + loss.name() + " loss has no batch to split into shards");
    if (S > batch) {
      throw Error("trainer: " + std::to_string(S) + " shards of a batch of " + std::to_string(batch) +
                  ": each shard needs at least one sample");
    }
    for (int64_t s = 0; s < S; ++s) shard_batch.push_back(batch / S + (s < batch % S ? 1 : 0));
    // Let the loss refuse a shard size now (a variance needs two samples), not at the first step;
    // it keeps its whole batch either way.
    try {
      for (int64_t s : my_shards) loss.set_batch_size(shard_batch[s]);
    } catch (...) {
      loss.set_batch_size(batch);
      throw;
    }
    loss.set_batch_size(batch);
  }

  // The loss of shard s under the precision's autocast (the backward pass is the caller's, outside it).
  LossOutput compute_shard(uint64_t stream, int64_t s) {
    AutocastScope autocast(params.front().device(), options.precision == Precision::bfloat16);
    return compute_shard_as_is(stream, s);
  }

  // Draws shard s of the batch with its own generator; the loss's batch is restored afterwards.
  LossOutput compute_shard_as_is(uint64_t stream, int64_t s) {
    if (options.shards == 1) {
      Generator gen = make_generator(stream);
      return loss.compute(gen);
    }
    Generator gen = make_generator(s == 0 ? stream : mix_seed(stream, static_cast<uint64_t>(s)));
    struct Restore {
      Loss& loss;
      int64_t batch;
      ~Restore() {
        try {
          loss.set_batch_size(batch);
        } catch (...) {  // the whole batch was accepted when the trainer was built
        }
      }
    } restore{loss, batch};
    loss.set_batch_size(shard_batch[s]);
    return loss.compute(gen);
  }

  // Sums the gradients over the ranks, one flat buffer per dtype. A parameter's gradient stays
  // undefined (Adam skips it) only if it is undefined on every rank, as with accumulation in one process.
  void all_reduce_gradients(int64_t it) {
    const std::string what = "summing the gradients of iteration " + std::to_string(it);
    std::vector<Tensor> defined{at::zeros({static_cast<int64_t>(params.size())}, at::kLong)};
    std::vector<at::ScalarType> dtypes;
    for (size_t i = 0; i < params.size(); ++i) {
      if (params[i].grad().defined()) defined[0][static_cast<int64_t>(i)] = 1;
      if (std::find(dtypes.begin(), dtypes.end(), params[i].scalar_type()) == dtypes.end()) {
        dtypes.push_back(params[i].scalar_type());
      }
    }
    options.group->all_reduce_sum(defined, what);
    at::NoGradGuard no_grad;
    for (at::ScalarType dtype : dtypes) {
      std::vector<size_t> index;
      std::vector<Tensor> pieces;
      for (size_t i = 0; i < params.size(); ++i) {
        if (params[i].scalar_type() != dtype) continue;
        index.push_back(i);
        const Tensor& g = params[i].grad();
        pieces.push_back(g.defined() ? g.reshape({-1}) : at::zeros({params[i].numel()}, params[i].options()));
      }
      std::vector<Tensor> flat{at::cat(pieces)};
      options.group->all_reduce_sum(flat, what);
      int64_t offset = 0;
      for (size_t i : index) {
        const int64_t n = params[i].numel();
        if (defined[0][static_cast<int64_t>(i)].item<int64_t>() > 0) {
          const Tensor sum = flat[0].narrow(0, offset, n).view(params[i].sizes());
          if (params[i].grad().defined()) {
            params[i].mutable_grad().copy_(sum);
          } else {
            params[i].mutable_grad() = sum.clone();
          }
        }
        offset += n;
      }
    }
  }

  std::string agree(const std::string& stop);

  // The first step of a distributed run starts every rank from rank 0's parameters.
  void synchronise() {
    if (synchronised || world() == 1) return;
    at::NoGradGuard no_grad;
    std::vector<Tensor> values;
    for (const Tensor& p : params) values.push_back(p.detach());
    options.group->broadcast(values, 0, "sending rank 0's initial parameters");
    synchronised = true;
  }
};

Trainer::Trainer(Loss& loss, const TrainerOptions& options) : impl_(std::make_unique<Impl>(loss, options)) {}
Trainer::~Trainer() = default;

int64_t Trainer::iteration() const { return impl_->iteration; }

Precision parse_precision(const std::string& name) {
  if (name == "float32") return Precision::float32;
  if (name == "bfloat16") return Precision::bfloat16;
  throw Error("unknown precision '" + name + "' (valid: float32, bfloat16)");
}

LrSchedule parse_lr_schedule(const std::string& name) {
  if (name == "constant") return LrSchedule::constant;
  if (name == "cosine") return LrSchedule::cosine;
  throw Error("unknown lr_schedule '" + name + "' (valid: constant, cosine)");
}

double Trainer::learning_rate(int64_t i) const {
  const TrainerOptions& o = impl_->options;
  if (o.lr_schedule == LrSchedule::constant || o.iterations <= 1) return o.adam.lr;
  const double progress = std::min(1.0, static_cast<double>(i) / static_cast<double>(o.iterations - 1));
  const double floor = o.adam.lr * o.lr_final_factor;
  return floor + (o.adam.lr - floor) * 0.5 * (1.0 + std::cos(M_PI * progress));
}

StepResult Trainer::step() {
  Impl& m = *impl_;
  const auto t0 = std::chrono::steady_clock::now();
  m.synchronise();
  const uint64_t stream = mix_seed(m.options.seed, static_cast<uint64_t>(m.iteration));
  StepResult r;
  r.iteration = m.iteration + 1;
  m.optimizer->zero_grad();
  m.loss.begin_iteration(m.iteration);
  if (m.options.shards == 1 && m.world() == 1) {
    r.output = m.compute_shard(stream, 0);
    r.loss = r.output.loss.item<double>();
    if (std::isfinite(r.loss)) r.output.loss.backward();
  } else {
    // Each shard's loss and gradient, weighted by its share of the batch; the gradients accumulate in
    // .grad(). The loss and the metrics are weighted alike, then everything is summed over the ranks.
    std::vector<double> sums;  // loss, then each metric
    std::vector<std::string> names;
    at::ScalarType loss_dtype = at::kFloat;
    for (int64_t s : m.my_shards) {
      LossOutput out = m.compute_shard(stream, s);
      const double w = static_cast<double>(m.shard_batch[s]) / static_cast<double>(m.batch);
      if (sums.empty()) {
        sums.assign(1 + out.metrics.size(), 0.0);
        for (const auto& kv : out.metrics) names.push_back(kv.first);
        loss_dtype = out.loss.scalar_type();
      }
      if (out.metrics.size() + 1 != sums.size()) {
        throw Error("trainer: the " + m.loss.name() + " loss returned different metrics for different shards");
      }
      const double value = out.loss.item<double>();
      sums[0] += w * value;
      for (size_t k = 0; k < out.metrics.size(); ++k) sums[k + 1] += w * out.metrics[k].second;
      if (std::isfinite(value)) (out.loss * w).backward();
    }
    if (m.world() > 1) {
      std::vector<Tensor> stats{at::tensor(sums, at::kDouble)};
      m.options.group->all_reduce_sum(stats, "summing the losses of iteration " + std::to_string(r.iteration));
      for (size_t k = 0; k < sums.size(); ++k) sums[k] = stats[0][static_cast<int64_t>(k)].item<double>();
      // Summed even where the loss is not finite, so that every rank stops at the same iteration.
      m.all_reduce_gradients(r.iteration);
    }
    r.loss = sums[0];
    r.output.loss = at::scalar_tensor(r.loss, loss_dtype);
    for (size_t k = 0; k < names.size(); ++k) r.output.metrics.emplace_back(names[k], sums[k + 1]);
  }
  if (!std::isfinite(r.loss)) {
    throw NonFiniteError("iteration " + std::to_string(r.iteration) + ": the " + m.loss.name() +
                         " loss is " + sci(r.loss) + "; stopped before updating the parameters");
  }
  double norm2 = 0.0;
  for (const Tensor& p : m.params) {
    if (p.grad().defined()) norm2 += p.grad().pow(2).sum().item<double>();
  }
  r.grad_norm = std::sqrt(norm2);
  if (!std::isfinite(r.grad_norm)) {
    throw NonFiniteError("iteration " + std::to_string(r.iteration) + ": a gradient of the " + m.loss.name() +
                         " loss is not finite; stopped before updating the parameters");
  }
  if (m.options.grad_clip > 0 && r.grad_norm > m.options.grad_clip) {
    const double scale = m.options.grad_clip / (r.grad_norm + 1e-12);
    at::NoGradGuard no_grad;
    for (const Tensor& p : m.params) {
      if (p.grad().defined()) p.grad().mul_(scale);
    }
  }
  r.lr = learning_rate(m.iteration);
  // Every group follows the schedule, scaled to its own base learning rate.
  auto& groups = m.optimizer->param_groups();
  for (size_t g = 0; g < groups.size(); ++g) {
    static_cast<torch::optim::AdamOptions&>(groups[g].options()).lr(m.group_lr[g] == m.options.adam.lr ? r.lr : r.lr * m.group_lr[g] / m.options.adam.lr);
  }
  m.optimizer->step();
  r.output.loss = r.output.loss.detach();
  ++m.iteration;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

double quantile(std::vector<double> values, double q) {
  if (values.empty()) throw Error("quantile: no values");
  if (!(q >= 0.0 && q <= 1.0)) throw Error("quantile: q must be in [0, 1], got " + std::to_string(q));
  std::sort(values.begin(), values.end());
  const double pos = q * static_cast<double>(values.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(pos));
  const size_t hi = std::min(lo + 1, values.size() - 1);
  return values[lo] + (pos - static_cast<double>(lo)) * (values[hi] - values[lo]);
}

PlateauDetector::PlateauDetector(const EarlyStopOptions& options) : options_(options) {
  if (options_.window < 1) throw Error("early stop: the window must be >= 1, got " + std::to_string(options_.window));
  if (!(options_.tolerance >= 0) || !std::isfinite(options_.tolerance)) {
    throw Error("early stop: the tolerance must be finite and >= 0, got " + sci(options_.tolerance));
  }
  if (options_.min_iterations < 0) throw Error("early stop: min_iterations must be >= 0");
}

void PlateauDetector::add(double value) {
  if (!std::isfinite(value)) return;
  values_.push_back(value);
  if (static_cast<int64_t>(values_.size()) > 2 * options_.window) values_.pop_front();
  ++count_;
}

double PlateauDetector::previous_median() const {
  const size_t W = static_cast<size_t>(options_.window);
  if (values_.size() < 2 * W) return NAN;
  return quantile(std::vector<double>(values_.begin(), values_.begin() + static_cast<std::ptrdiff_t>(W)), 0.5);
}

double PlateauDetector::recent_median() const {
  const size_t W = static_cast<size_t>(options_.window);
  if (values_.size() < 2 * W) return NAN;
  return quantile(std::vector<double>(values_.end() - static_cast<std::ptrdiff_t>(W), values_.end()), 0.5);
}

bool PlateauDetector::plateau() const {
  if (static_cast<int64_t>(values_.size()) < 2 * options_.window || count_ < options_.min_iterations) return false;
  const double before = previous_median();
  return recent_median() - before <= options_.tolerance * std::abs(before);
}

std::string PlateauDetector::describe() const {
  const double before = previous_median(), now = recent_median();
  const std::string W = std::to_string(options_.window);
  char change[64];
  std::snprintf(change, sizeof change, "%+.3g%%, tolerance %.3g%%", 100.0 * (now - before) / std::abs(before),
                100.0 * options_.tolerance);
  return "median " + (options_.metric.empty() ? std::string("value") : options_.metric) + " " + sci(now) +
         " over the last " + W + " iterations against " + sci(before) + " over the " + W + " before (" + change + ")";
}

namespace {

// The loss over the last `size` iterations (TrainerOptions::loss_window).
class LossWindow {
 public:
  explicit LossWindow(int64_t size) : size_(static_cast<size_t>(std::max<int64_t>(size, 0))) {}
  bool on() const { return size_ > 0; }
  void add(double loss) {
    if (!on() || !std::isfinite(loss)) return;  // a NaN stops the run; it must not reach the sort
    values_.push_back(loss);
    if (values_.size() > size_) values_.pop_front();
  }
  // metrics.jsonl's loss_median, loss_q10, loss_q90.
  void write(nlohmann::json& j) const {
    if (values_.empty()) return;
    const std::vector<double> v(values_.begin(), values_.end());
    j["loss_median"] = quantile(v, 0.5);
    j["loss_q10"] = quantile(v, 0.1);
    j["loss_q90"] = quantile(v, 0.9);
  }
  double median() const {
    return values_.empty() ? NAN : quantile(std::vector<double>(values_.begin(), values_.end()), 0.5);
  }

 private:
  size_t size_;
  std::deque<double> values_;
};

// The progress bar's status: the loss (and with a window its median), the reward and the ESS when reported.
std::string progress_status(const StepResult& r, const LossWindow& window) {
  std::string status = "loss " + sci(r.loss);
  if (window.on()) status += " (median " + sci(window.median()) + ")";
  for (const auto& [key, value] : r.output.metrics) {
    if (key == "reward") status += "  reward " + sci(value);
  }
  if (window.on()) {
    for (const auto& [key, value] : r.output.metrics) {
      if (key == "ess") status += "  ess " + sci(value);
    }
  }
  return status;
}

// TrainerOptions::early_stop over the run: the detector, and the metric's value in a step's output.
class EarlyStop {
 public:
  explicit EarlyStop(const EarlyStopOptions& o) : on_(!o.metric.empty()), detector_(o), metric_(o.metric) {}
  bool on() const { return on_; }
  // A kept line of the metrics file (resume).
  void replay(const nlohmann::json& j) {
    if (on_ && j.contains(metric_) && j[metric_].is_number()) detector_.add(j[metric_].get<double>());
  }
  // Step r's value of the metric.
  void add(const StepResult& r, const std::string& loss_name) {
    if (!on_) return;
    const auto it = std::find_if(r.output.metrics.begin(), r.output.metrics.end(),
                                 [&](const auto& kv) { return kv.first == metric_; });
    if (it == r.output.metrics.end()) {
      throw Error("trainer: early_stop = \"" + metric_ + "\", but the " + loss_name + " loss reports no metric '" +
                  metric_ + "'");
    }
    detector_.add(it->second);
  }
  // Why a run at `iteration` stops (the detector's plateau), or "".
  std::string reason(int64_t iteration) const {
    if (!on_ || !detector_.plateau()) return "";
    return "stopped early at iteration " + std::to_string(iteration) + ": the " + metric_ + " has plateaued, " +
           detector_.describe();
  }

 private:
  bool on_;
  PlateauDetector detector_;
  std::string metric_;
};

// Keeps the lines of the metrics file up to `iteration` (a resumed run rewrites what came after), replaying them
// into the loss window and the early stop; then opens it for appending.
std::unique_ptr<MetricsFile> open_metrics(const std::string& path, int64_t iteration, LossWindow& window,
                                          EarlyStop& stop) {
  std::ostringstream kept;
  if (iteration > 0 && file_exists(path)) {
    std::istringstream in(read_file(path, "metrics file"));
    std::string line;
    while (std::getline(in, line)) {
      const auto j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
      if (j.is_object() && j.contains("iteration") && j["iteration"].is_number_integer() &&
          j["iteration"].get<int64_t>() <= iteration) {
        kept << line << '\n';
        if (j.contains("loss") && j["loss"].is_number()) window.add(j["loss"].get<double>());
        stop.replay(j);
      }
    }
  }
  atomic_write(path, kept.str());
  return std::make_unique<MetricsFile>(path);
}

nlohmann::json metrics_line(const StepResult& r, const LossWindow& window, const std::string& warning,
                            const std::string& stop) {
  nlohmann::json j;
  j["iteration"] = r.iteration;
  j["loss"] = r.loss;
  j["grad_norm"] = r.grad_norm;
  j["lr"] = r.lr;
  j["seconds"] = r.seconds;
  for (const auto& [key, value] : r.output.metrics) j[key] = value;
  if (window.on()) window.write(j);
  if (!warning.empty()) j["warning"] = warning;
  if (!stop.empty()) j["early_stop"] = stop;
  return j;
}

}  // namespace

// In a group every rank must stop at the same iteration: rank 0's decision (it alone replays the metrics file).
std::string Trainer::Impl::agree(const std::string& stop) {
  if (world() == 1 || options.early_stop.metric.empty()) return stop;
  return options.group->broadcast_bytes(stop, "agreeing on an early stop");
}

void Trainer::run(const std::function<void(const StepResult&)>& on_step) {
  Impl& m = *impl_;
  const bool writer = m.rank() == 0;  // in a group, only rank 0 writes files and shows progress
  std::unique_ptr<MetricsFile> metrics;
  LossWindow window(m.options.loss_window);
  EarlyStop early(m.options.early_stop);
  if (writer && !m.options.metrics_path.empty()) {
    metrics = open_metrics(m.options.metrics_path, m.iteration, window, early);
  }
  // A resumed run that had stopped early (its metric still on a plateau) stops again before stepping.
  m.stop_reason = m.iteration < m.options.iterations ? m.agree(early.reason(m.iteration)) : "";
  if (!m.stop_reason.empty() && writer) {
    note("the run " + m.stop_reason + "; nothing to resume (set early_stop = \"off\", or loosen it, to train on)");
  }
  const int64_t first = m.iteration;
  ProgressBar bar(m.options.label, m.options.iterations, m.iteration, writer && m.options.progress);
  while (m.stop_reason.empty() && m.iteration < m.options.iterations) {
    const StepResult r = step();
    window.add(r.loss);
    const std::string warning = m.options.monitor ? m.options.monitor(r) : "";
    early.add(r, m.loss.name());
    // The last iteration ends the run anyway: not an early stop.
    if (m.iteration < m.options.iterations) m.stop_reason = m.agree(early.reason(m.iteration));
    if (metrics) metrics->append(metrics_line(r, window, warning, m.stop_reason).dump() + '\n');
    if (writer && !warning.empty()) tilt::warning(warning);
    bar.update(m.iteration, progress_status(r, window));
    if (on_step) on_step(r);
    const bool last = m.iteration == m.options.iterations || !m.stop_reason.empty();
    if (writer && !m.options.checkpoint_path.empty() &&
        (last || (m.options.checkpoint_every > 0 && m.iteration % m.options.checkpoint_every == 0))) {
      save_checkpoint(m.options.checkpoint_path);
    }
  }
  bar.finish();
  if (writer && !m.stop_reason.empty() && m.iteration > first) note(m.stop_reason);
}

const std::string& Trainer::early_stop_reason() const { return impl_->stop_reason; }

void Trainer::save_checkpoint(const std::string& path) const {
  const Impl& m = *impl_;
  // Serialised in memory, then written by atomic_write, which checks every write: LibTorch's zip
  // writer, given a file, reports a full disk by throwing from a destructor (an abort).
  std::string payload;
  {
    torch::serialize::OutputArchive archive;
    archive.write("tilt_checkpoint_version", at::scalar_tensor(kCheckpointVersion, at::kLong));
    archive.write("loss", c10::IValue(m.loss.name()));
    archive.write("iteration", at::scalar_tensor(m.iteration, at::kLong));
    archive.write("num_params", at::scalar_tensor(static_cast<int64_t>(m.params.size()), at::kLong));
    for (size_t i = 0; i < m.params.size(); ++i) {
      archive.write("param_" + std::to_string(i), m.params[i].detach().cpu());
    }
    torch::serialize::OutputArchive opt_archive;
    m.optimizer->save(opt_archive);
    archive.write("optimizer", opt_archive);
    // The loss's own state (e.g. a replay buffer), for losses that keep one.
    const auto state = m.loss.state();
    if (!state.empty()) {
      torch::serialize::OutputArchive state_archive;
      for (const auto& [key, value] : state) state_archive.write(key, value);
      archive.write("loss_state", state_archive);
    }
    std::ostringstream bytes;
    archive.save_to(bytes);
    payload = bytes.str();
  }
  const std::string frame = kCheckpointMagic + " " + std::to_string(kCheckpointVersion) + " " +
                            std::to_string(payload.size()) + " " + std::to_string(crc32_bytes(payload)) + "\n";
  atomic_write(path, frame + payload);
}

namespace {
// The bytes of a checkpoint file; throws naming the file if it is missing.
std::string read_checkpoint_bytes(const std::string& path) {
  if (!file_exists(path)) throw Error("cannot read checkpoint '" + path + "': no such file");
  return read_file(path, "checkpoint");
}

// Where the archive starts within a checkpoint's bytes: after the header line of a version-2 file, whose size and
// CRC-32 it checks; at 0 for a version-1 file (a bare archive). Throws naming the file if damaged or foreign.
size_t archive_start(const std::string& bytes, const std::string& path) {
  const std::string damaged = "checkpoint '" + path + "' is damaged: its checksum does not match its contents; it "
                              "cannot be resumed from (restore a copy, or remove it to start the run over)";
  size_t start = 0;
  if (bytes.compare(0, kCheckpointMagic.size(), kCheckpointMagic) == 0) {
    const size_t eol = bytes.find('\n');
    if (eol == std::string::npos || eol > 100) throw Error(damaged);
    std::istringstream header(bytes.substr(0, eol));
    std::string magic, extra;
    int64_t version = 0;
    unsigned long long size = 0, crc = 0;
    if (!(header >> magic >> version >> size >> crc) || (header >> extra) || magic != kCheckpointMagic) throw Error(damaged);
    if (version != kCheckpointVersion) {
      throw Error("checkpoint '" + path + "' has version " + std::to_string(version) + ", this tilt reads versions 1 and " +
                  std::to_string(kCheckpointVersion));
    }
    start = eol + 1;
    const size_t length = bytes.size() - start;
    if (size != length || crc != crc32_bytes(bytes.data() + start, length)) throw Error(damaged);
  } else if (bytes.compare(0, 2, "PK") != 0) {
    throw Error("cannot read checkpoint '" + path + "': not a tilt checkpoint");
  } else if (bytes.find("__tilt_meta__") != std::string::npos) {  // the key of a model file's record (io/archive.cpp)
    throw Error("cannot read checkpoint '" + path + "': it is a model file (model.pt or classifier.pt), not a "
                "checkpoint; --resume continues from the run's checkpoint.pt");
  }
  return start;
}
}  // namespace

int64_t checkpoint_iteration(const std::string& path) {
  const std::string bytes = read_checkpoint_bytes(path);
  const size_t start = archive_start(bytes, path);
  torch::serialize::InputArchive archive;
  Tensor iteration;
  try {
    archive.load_from(bytes.data() + start, bytes.size() - start, at::Device(at::kCPU));
    archive.read("iteration", iteration);
  } catch (const std::exception& e) {
    throw Error("cannot read checkpoint '" + path + "': not a tilt checkpoint or corrupt (" + first_line(e.what()) + ")");
  }
  return iteration.item<int64_t>();
}

void Trainer::load_checkpoint(const std::string& path) {
  Impl& m = *impl_;
  std::string bytes;
  if (m.world() == 1) {
    bytes = read_checkpoint_bytes(path);
  } else {
    // Rank 0 reads the file (the others need no copy of it) and sends it to every rank.
    run_on_rank0(m.options.group.get(), [&] { bytes = read_checkpoint_bytes(path); });
    bytes = m.options.group->broadcast_bytes(bytes, "sending the checkpoint '" + path + "'");
  }
  const size_t start = archive_start(bytes, path);
  const size_t length = bytes.size() - start;
  torch::serialize::InputArchive archive;
  try {
    // Onto the parameters' device: a checkpoint written on a GPU resumes on the CPU, and the other way.
    const c10::optional<at::Device> device =
        m.params.empty() ? c10::optional<at::Device>() : c10::optional<at::Device>(m.params.front().device());
    archive.load_from(bytes.data() + start, length, device);
  } catch (const c10::Error& e) {
    throw Error("cannot read checkpoint '" + path + "': not a tilt checkpoint or corrupt (" +
                std::string(e.what_without_backtrace()) + ")");
  } catch (const std::exception& e) {  // e.g. TorchScript's parser, on a damaged version 1 file
    throw Error("cannot read checkpoint '" + path + "': not a tilt checkpoint or corrupt (" + first_line(e.what()) + ")");
  }
  try {
    Tensor iteration, num_params;
    c10::IValue loss_name;
    archive.read("loss", loss_name);
    if (!loss_name.isString() || loss_name.toStringRef() != m.loss.name()) {
      throw Error("checkpoint '" + path + "' was written by the " +
                  (loss_name.isString() ? loss_name.toStringRef() : std::string("?")) + " loss, not " +
                  m.loss.name());
    }
    archive.read("num_params", num_params);
    if (num_params.item<int64_t>() != static_cast<int64_t>(m.params.size())) {
      throw Error("checkpoint '" + path + "' holds " + std::to_string(num_params.item<int64_t>()) +
                  " parameter tensors, the model has " + std::to_string(m.params.size()) +
                  " (was the model configured differently?)");
    }
    std::vector<Tensor> values(m.params.size());
    for (size_t i = 0; i < m.params.size(); ++i) {
      archive.read("param_" + std::to_string(i), values[i]);
      if (!values[i].sizes().equals(m.params[i].sizes())) {
        throw Error("checkpoint '" + path + "': parameter " + std::to_string(i) +
                    " has a different shape than the model's (was the model configured differently?)");
      }
    }
    archive.read("iteration", iteration);
    torch::serialize::InputArchive opt_archive;
    archive.read("optimizer", opt_archive);
    std::vector<std::pair<std::string, Tensor>> state = m.loss.state();
    if (!state.empty()) {
      torch::serialize::InputArchive state_archive;
      archive.read("loss_state", state_archive);
      for (auto& [key, value] : state) {
        value = Tensor();  // read a fresh tensor, not into the loss's own (which state() may alias)
        state_archive.read(key, value);
      }
    }
    m.optimizer->load(opt_archive);
    if (!state.empty()) m.loss.load_state(state);
    at::NoGradGuard no_grad;
    for (size_t i = 0; i < m.params.size(); ++i) m.params[i].copy_(values[i]);
    m.iteration = iteration.item<int64_t>();
  } catch (const Error&) {
    throw;
  } catch (const c10::Error& e) {
    throw Error("cannot read checkpoint '" + path + "': " + std::string(e.what_without_backtrace()));
  } catch (const std::exception& e) {
    throw Error("cannot read checkpoint '" + path + "': " + first_line(e.what()));
  }
}

bool Trainer::resume(const std::string& path) {
  Impl& m = *impl_;
  bool present = file_exists(path);
  if (m.world() > 1) {
    present = !m.options.group->broadcast_bytes(present ? "1" : "", "asking rank 0 for a checkpoint").empty();
  }
  if (present) load_checkpoint(path);
  if (present && m.iteration > m.options.iterations) {
    throw Error("checkpoint '" + path + "' is at iteration " + std::to_string(m.iteration) + ", past the " +
                std::to_string(m.options.iterations) + " iterations asked for: resume with at least " +
                std::to_string(m.iteration) + " iterations, or start a new run");
  }
  return present;
}

}  // namespace tilt
