#include "tilt/train/trainer.h"

#include "tilt/core/error.h"
#include "tilt/core/fs.h"
#include "tilt/core/progress.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>  // at::NoGradGuard; not pulled in by ATen.h since LibTorch 2.0
#include <torch/optim/adam.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <sstream>

namespace tilt {

namespace {
constexpr int64_t kCheckpointVersion = 1;

std::string sci(double x) {
  if (std::isnan(x)) return "nan";  // printf's sign of a NaN ("-nan") means nothing to a user
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.4g", x);
  return buf;
}
}  // namespace

struct Trainer::Impl {
  Loss& loss;
  TrainerOptions options;
  std::vector<Tensor> params;
  std::unique_ptr<torch::optim::Adam> optimizer;
  int64_t iteration = 0;

  std::vector<double> group_lr;  // each parameter group's base learning rate

  Impl(Loss& l, const TrainerOptions& o) : loss(l), options(o) {
    const std::vector<ParameterGroup> groups = l.parameter_groups();
    for (const auto& g : groups) {
      if (g.lr < 0 || !std::isfinite(g.lr)) throw Error("trainer: a parameter group of the " + loss.name() + " loss has lr < 0");
      params.insert(params.end(), g.params.begin(), g.params.end());
    }
    if (params.empty()) throw Error("trainer: the " + loss.name() + " loss has no trainable parameters");
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
  }
};

Trainer::Trainer(Loss& loss, const TrainerOptions& options) : impl_(std::make_unique<Impl>(loss, options)) {}
Trainer::~Trainer() = default;

int64_t Trainer::iteration() const { return impl_->iteration; }

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
  Generator gen = make_generator(mix_seed(m.options.seed, static_cast<uint64_t>(m.iteration)));
  StepResult r;
  r.iteration = m.iteration + 1;
  r.output = m.loss.compute(gen);
  r.loss = r.output.loss.item<double>();
  if (!std::isfinite(r.loss)) {
    throw NonFiniteError("iteration " + std::to_string(r.iteration) + ": the " + m.loss.name() +
                         " loss is " + sci(r.loss) + "; stopped before updating the parameters");
  }
  m.optimizer->zero_grad();
  r.output.loss.backward();
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

void Trainer::run(const std::function<void(const StepResult&)>& on_step) {
  Impl& m = *impl_;
  std::ofstream metrics;
  if (!m.options.metrics_path.empty()) {
    // Keep the lines up to the current iteration (a resumed run rewrites what came after).
    std::ostringstream kept;
    if (m.iteration > 0 && file_exists(m.options.metrics_path)) {
      std::istringstream in(read_file(m.options.metrics_path, "metrics file"));
      std::string line;
      while (std::getline(in, line)) {
        const auto j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
        if (j.is_object() && j.contains("iteration") && j["iteration"].is_number_integer() &&
            j["iteration"].get<int64_t>() <= m.iteration) {
          kept << line << '\n';
        }
      }
    }
    atomic_write(m.options.metrics_path, kept.str());
    metrics.open(m.options.metrics_path, std::ios::app);
    if (!metrics) throw Error("cannot write metrics file '" + m.options.metrics_path + "'");
  }
  ProgressBar bar(m.options.label, m.options.iterations, m.iteration, m.options.progress);
  while (m.iteration < m.options.iterations) {
    const StepResult r = step();
    if (metrics.is_open()) {
      nlohmann::json j;
      j["iteration"] = r.iteration;
      j["loss"] = r.loss;
      j["grad_norm"] = r.grad_norm;
      j["lr"] = r.lr;
      j["seconds"] = r.seconds;
      for (const auto& [key, value] : r.output.metrics) j[key] = value;
      metrics << j.dump() << '\n';
      metrics.flush();
    }
    std::string status = "loss " + sci(r.loss);
    for (const auto& [key, value] : r.output.metrics) {
      if (key == "reward") status += "  reward " + sci(value);
    }
    bar.update(m.iteration, status);
    if (on_step) on_step(r);
    const bool last = m.iteration == m.options.iterations;
    if (!m.options.checkpoint_path.empty() &&
        (last || (m.options.checkpoint_every > 0 && m.iteration % m.options.checkpoint_every == 0))) {
      save_checkpoint(m.options.checkpoint_path);
    }
  }
  bar.finish();
}

void Trainer::save_checkpoint(const std::string& path) const {
  const Impl& m = *impl_;
  atomic_write_with(path, [&](const std::string& tmp) {
    torch::serialize::OutputArchive archive;
    archive.write("tilt_checkpoint_version", at::scalar_tensor(kCheckpointVersion, at::kLong));
    archive.write("loss", c10::IValue(m.loss.name()));
    archive.write("iteration", at::scalar_tensor(m.iteration, at::kLong));
    archive.write("num_params", at::scalar_tensor(static_cast<int64_t>(m.params.size()), at::kLong));
    for (size_t i = 0; i < m.params.size(); ++i) {
      archive.write("param_" + std::to_string(i), m.params[i].detach());
    }
    torch::serialize::OutputArchive opt_archive;
    m.optimizer->save(opt_archive);
    archive.write("optimizer", opt_archive);
    archive.save_to(tmp);
  });
}

void Trainer::load_checkpoint(const std::string& path) {
  Impl& m = *impl_;
  if (!file_exists(path)) throw Error("cannot read checkpoint '" + path + "': no such file");
  torch::serialize::InputArchive archive;
  try {
    archive.load_from(path);
  } catch (const c10::Error& e) {
    throw Error("cannot read checkpoint '" + path + "': not a tilt checkpoint or corrupt (" +
                std::string(e.what_without_backtrace()) + ")");
  }
  try {
    Tensor version, iteration, num_params;
    archive.read("tilt_checkpoint_version", version);
    if (version.item<int64_t>() != kCheckpointVersion) {
      throw Error("checkpoint '" + path + "' has version " + std::to_string(version.item<int64_t>()) +
                  ", this tilt reads version " + std::to_string(kCheckpointVersion));
    }
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
    m.optimizer->load(opt_archive);
    at::NoGradGuard no_grad;
    for (size_t i = 0; i < m.params.size(); ++i) m.params[i].copy_(values[i]);
    m.iteration = iteration.item<int64_t>();
  } catch (const c10::Error& e) {
    throw Error("cannot read checkpoint '" + path + "': " + std::string(e.what_without_backtrace()));
  }
}

}  // namespace tilt
