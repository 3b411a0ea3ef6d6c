// TorchScript interop (tilt/model/torchscript.h): scripted base models and rewards from PyTorch,
// and the export of tilt's velocity fields as TorchScript modules.
#include "tilt/model/torchscript.h"

#include "tilt/core/check.h"
#include "tilt/core/error.h"

#include "../core/checksum.h"
#include "tilt/model/finetuned.h"
#include "tilt/model/gmm.h"
#include "tilt/model/mlp.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/jit/api/compilation_unit.h>
#include <torch/csrc/jit/api/module.h>
#include <torch/csrc/jit/serialization/import.h>

#include <cctype>
#include <cmath>
#include <cstdio>
#include <map>
#include <mutex>
#include <sstream>

namespace tilt {

struct TorchScriptVelocity::Impl {
  torch::jit::Module module;
  at::ScalarType dtype = at::kFloat;  // of the module's parameters: inputs are cast to it
  std::string origin;                 // the file, for error messages
};

namespace {

// The first line of a LibTorch message (the rest is a TorchScript traceback).
std::string first_line(const std::string& message) {
  const size_t end = message.find('\n');
  return end == std::string::npos ? message : message.substr(0, end);
}

// Whether `line` opens an exception report, "Type: message" (RuntimeError, builtins.ValueError, ...).
bool is_exception_line(const std::string& line) {
  const size_t colon = line.find(": ");
  if (colon == std::string::npos || colon == 0) return false;
  const std::string type = line.substr(0, colon);
  if (type.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.") != std::string::npos) {
    return false;
  }
  for (const char* suffix : {"Error", "Exception", "Interrupt", "Exit"}) {
    const std::string s(suffix);
    if (type.size() >= s.size() && type.compare(type.size() - s.size(), s.size(), s) == 0) return true;
  }
  return false;
}

// What the module raised, without the TorchScript traceback. The interpreter reports an exception
// as "The following operation failed in the TorchScript interpreter.", then the traceback (file
// lines and source lines, indented or not), then "Type: message" (RuntimeError: ..., or
// builtins.ValueError: ... for a Python raise) to the end. Other errors: their first line.
std::string describe_error(const std::exception& e) {
  auto c10 = dynamic_cast<const c10::Error*>(&e);
  const std::string message = c10 ? c10->what_without_backtrace() : std::string(e.what());
  const size_t traceback = message.rfind("Traceback of TorchScript");
  if (traceback == std::string::npos) return first_line(message);
  // The first line that opens an exception report after the traceback's last frame (its last
  // "<--- HERE" marker; a few source lines of context follow the marker).
  const size_t here = message.rfind("<--- HERE");
  for (size_t pos = message.find('\n', here != std::string::npos && here > traceback ? here : traceback);
       pos != std::string::npos; pos = message.find('\n', pos + 1)) {
    const size_t start = pos + 1, end = message.find('\n', start);
    if (!is_exception_line(message.substr(start, end == std::string::npos ? std::string::npos : end - start))) continue;
    std::string report = message.substr(start);
    while (!report.empty() && std::isspace(static_cast<unsigned char>(report.back()))) report.pop_back();
    if (report.rfind("builtins.", 0) == 0) report.erase(0, 9);  // builtins.ValueError -> ValueError
    constexpr size_t kMax = 2000;
    if (report.size() > kMax) report = report.substr(0, kMax) + " [...]";
    return report;
  }
  return first_line(message);
}

torch::jit::Module load_module(const std::string& bytes, const std::string& origin, const std::string& what) {
  const std::string damage = zip_damage(bytes);
  if (!damage.empty()) {
    throw Error("cannot read TorchScript " + what + " " + origin + ": not a TorchScript archive (torch.jit.save), or corrupt (" +
                damage + ")");
  }
  std::istringstream in(bytes);
  torch::jit::Module module;
  try {
    module = torch::jit::load(in);
  } catch (const std::exception& e) {
    throw Error("cannot read TorchScript " + what + " " + origin +
                ": not a TorchScript archive (torch.jit.save), or corrupt: " + describe_error(e));
  }
  module.eval();  // dropout off, batch norm frozen: tilt calls the model, it does not train it as such
  return module;
}

// forward must take exactly `names` as tensors (after self).
void check_signature(const torch::jit::Module& module, const std::vector<std::string>& names,
                     const std::string& origin, const std::string& what) {
  const std::string wanted = "forward(" + [&] {
    std::string s;
    for (const auto& n : names) s += (s.empty() ? "" : ", ") + n;
    return s;
  }() + ")";
  auto method = module.find_method("forward");
  if (!method) throw Error("TorchScript " + what + " " + origin + " has no forward method; it must have " + wanted);
  const c10::FunctionSchema& schema = method->function().getSchema();
  bool ok = schema.arguments().size() == names.size() + 1;
  for (size_t i = 1; ok && i < schema.arguments().size(); ++i) {
    ok = schema.arguments()[i].type()->isSubtypeOf(*c10::TensorType::get());
  }
  if (!ok) {
    std::ostringstream os;
    os << schema;
    throw Error("TorchScript " + what + " " + origin + " must have " + wanted + " taking tensors, but its signature is " +
                os.str());
  }
}

// The floating dtype of the module's parameters, else of its buffers, else float32.
at::ScalarType parameter_dtype(const torch::jit::Module& module) {
  for (const auto& p : module.parameters()) {
    if (at::isFloatingType(p.scalar_type())) return p.scalar_type();
  }
  for (const auto& b : module.buffers()) {
    if (at::isFloatingType(b.scalar_type())) return b.scalar_type();
  }
  return at::kFloat;
}

Tensor call_tensor(torch::jit::Module& module, std::vector<c10::IValue> inputs, const std::string& origin,
                   const std::string& what) {
  c10::IValue out;
  try {
    out = module.forward(std::move(inputs));
  } catch (const std::exception& e) {
    throw Error("TorchScript " + what + " " + origin + ": forward failed: " + describe_error(e));
  }
  if (!out.isTensor()) {
    throw Error("TorchScript " + what + " " + origin + ": forward must return a tensor, got " + out.tagKind());
  }
  return out.toTensor();
}

// Every floating parameter and buffer must be finite: a NaN weight gives NaN samples.
void check_finite_tensors(const torch::jit::Module& module, const std::string& origin, const std::string& what) {
  const auto check = [&](const std::string& kind, const std::string& name, const Tensor& t) {
    if (at::isFloatingType(t.scalar_type()) && !t.isfinite().all().item<bool>()) {
      throw Error("TorchScript " + what + " " + origin + ": " + kind + " '" + name +
                  "' holds non-finite values (NaN or Inf): the file is damaged, or was saved from a run that diverged");
    }
  };
  for (const auto& p : module.named_parameters()) check("parameter", p.name, p.value);
  for (const auto& b : module.named_buffers()) check("buffer", b.name, b.value);
}

// A tiny deterministic batch of 2 points, for the checks on load.
Tensor probe_points(int64_t dim, at::ScalarType dtype) {
  return at::linspace(-1.0, 1.0, 2 * dim, at::TensorOptions().dtype(dtype)).reshape({2, dim});
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Base models

Prediction parse_prediction(const std::string& name) {
  if (name == "velocity") return Prediction::velocity;
  if (name == "epsilon") return Prediction::epsilon;
  if (name == "score") return Prediction::score;
  throw Error("unknown prediction '" + name + "' (valid: velocity, epsilon, score)");
}

std::string to_string(Prediction prediction) {
  switch (prediction) {
    case Prediction::velocity: return "velocity";
    case Prediction::epsilon: return "epsilon";
    case Prediction::score: return "score";
  }
  return "?";
}

TorchScriptVelocity::TorchScriptVelocity(std::unique_ptr<Impl> impl, SchedulePtr schedule,
                                         const TorchScriptOptions& options)
    : VelocityField(std::move(schedule)), impl_(std::move(impl)), options_(options) {}

TorchScriptVelocity::~TorchScriptVelocity() = default;

std::shared_ptr<TorchScriptVelocity> TorchScriptVelocity::load(const std::string& path, SchedulePtr schedule,
                                                               const TorchScriptOptions& options) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) throw Error("cannot read TorchScript model '" + path + "': no such file");
  std::string bytes;
  char buffer[1 << 16];
  size_t n = 0;
  while ((n = std::fread(buffer, 1, sizeof buffer, f)) > 0) bytes.append(buffer, n);
  std::fclose(f);
  return from_bytes(bytes, "'" + path + "'", std::move(schedule), options);
}

std::shared_ptr<TorchScriptVelocity> TorchScriptVelocity::from_bytes(const std::string& bytes,
                                                                     const std::string& origin, SchedulePtr schedule,
                                                                     const TorchScriptOptions& options_in) {
  if (!schedule) throw Error("TorchScript model " + origin + ": no schedule given");
  TorchScriptOptions options = options_in;
  if (!(options.t_min >= 0.0 && options.t_min < 0.5)) {
    throw Error("TorchScript model " + origin + ": t_min must be in [0, 0.5), got " + std::to_string(options.t_min));
  }
  auto impl = std::make_unique<Impl>();
  impl->origin = origin;
  impl->module = load_module(bytes, origin, "model");
  check_signature(impl->module, {"x", "t"}, origin, "model");
  impl->dtype = parameter_dtype(impl->module);
  // The dimension: given, or the module's integer attribute `dim`.
  const bool has_dim = impl->module.hasattr("dim") && impl->module.attr("dim").isInt();
  if (options.dim == 0) {
    if (!has_dim) {
      throw Error("TorchScript model " + origin +
                  ": the data dimension is unknown; give it ([base] dim = d), or give the module an integer "
                  "attribute `dim` (self.dim = d in a scripted module)");
    }
    options.dim = impl->module.attr("dim").toInt();
  } else if (has_dim && impl->module.attr("dim").toInt() != options.dim) {
    throw Error("TorchScript model " + origin + " has dim = " + std::to_string(impl->module.attr("dim").toInt()) +
                " but dimension " + std::to_string(options.dim) + " was given");
  }
  if (options.dim < 1) throw Error("TorchScript model " + origin + ": dim must be >= 1");
  check_finite_tensors(impl->module, origin, "model");
  for (auto p : impl->module.parameters()) p.set_requires_grad(false);
  std::shared_ptr<TorchScriptVelocity> field(new TorchScriptVelocity(std::move(impl), std::move(schedule), options));
  // One tiny forward: the module must map [2, d] and [2] to [2, d].
  at::NoGradGuard no_grad;
  const Tensor x = probe_points(options.dim, field->impl_->dtype);
  const Tensor t = at::tensor({0.25, 0.75}, at::TensorOptions().dtype(field->impl_->dtype));
  const Tensor y = call_tensor(field->impl_->module, {x, t}, origin, "model");
  if (!y.sizes().equals({2, options.dim})) {
    throw Error("TorchScript model " + origin + ": forward(x [2, " + std::to_string(options.dim) +
                "], t [2]) must return [2, " + std::to_string(options.dim) + "] (the " + to_string(options.prediction) +
                "), got " + shape_string(y) + "; is the dimension right?");
  }
  if (!y.isfinite().all().item<bool>()) {
    throw Error("TorchScript model " + origin + " produces non-finite values (NaN or Inf) on a probe forward(x [2, " +
                std::to_string(options.dim) + "], t = [0.25, 0.75]): its weights are damaged, or too large");
  }
  return field;
}

Tensor TorchScriptVelocity::velocity(const Tensor& x, const Tensor& t) const {
  check_batch(x, options_.dim, "x");
  const int64_t batch = x.size(0);
  check_time(t, batch, "t");
  const Tensor x_in = x.to(impl_->dtype);
  Tensor t_in = (t.dim() == 0 ? t.expand({batch}) : t).to(impl_->dtype);
  if (options_.prediction != Prediction::velocity) t_in = t_in.clamp(options_.t_min, 1.0 - options_.t_min);
  const Tensor y = call_tensor(impl_->module, {x_in, t_in}, impl_->origin, "model");
  if (!y.sizes().equals(x.sizes())) {
    throw Error("TorchScript model " + impl_->origin + ": forward(x " + shape_string(x) + ", t) returned " +
                shape_string(y));
  }
  if (options_.prediction == Prediction::velocity) return y.to(x.scalar_type());
  // docs/equations.md, E7: v = kappa_t x + eta_t s. For a noise prediction, Tweedie's formula for
  // Xbar_t = beta_t X0 + alpha_t X1 gives s = -E[X0 | x] / beta_t = -eps / beta_t, and since
  // eta_t / beta_t = kappa_t beta_t - beta'_t, v = kappa_t x + (beta'_t - kappa_t beta_t) eps.
  // In float64, then in x's precision: near t = 0 both terms are ~1/t and cancel.
  const ScheduleTensors s = schedule()->at(t_in.to(at::kDouble));
  const Tensor kappa = s.d_alpha / s.alpha;
  const Tensor coef = options_.prediction == Prediction::score ? s.beta * (kappa * s.beta - s.d_beta)
                                                               : s.d_beta - kappa * s.beta;
  return (kappa.unsqueeze(1) * x.to(at::kDouble) + coef.unsqueeze(1) * y.to(at::kDouble)).to(x.scalar_type());
}

std::vector<Tensor> TorchScriptVelocity::parameters() const {
  std::vector<Tensor> out;
  for (const auto& p : impl_->module.parameters()) {
    if (p.requires_grad()) out.push_back(p);
  }
  return out;
}

void TorchScriptVelocity::set_trainable(bool trainable) {
  for (auto p : impl_->module.parameters()) p.set_requires_grad(trainable);
}

VelocityFieldPtr TorchScriptVelocity::clone() const {
  auto impl = std::make_unique<Impl>();
  {
    // Without gradient recording the copies are leaves, not outputs of clone() with a history.
    at::NoGradGuard no_grad;
    impl->module = impl_->module.deepcopy();
  }
  impl->dtype = impl_->dtype;
  impl->origin = impl_->origin;
  for (auto p : impl->module.parameters()) p.set_requires_grad(false);
  return std::shared_ptr<TorchScriptVelocity>(new TorchScriptVelocity(std::move(impl), schedule(), options_));
}

std::string TorchScriptVelocity::archive() const {
  std::ostringstream out;
  impl_->module.save(out);
  return out.str();
}

// ---------------------------------------------------------------------------------------------
// Rewards

struct TorchScriptReward::Impl {
  torch::jit::Module module;
  at::ScalarType dtype = at::kFloat;
  std::string origin;
};

TorchScriptReward::TorchScriptReward(const std::string& path, int64_t dim) : impl_(std::make_unique<Impl>()), dim_(dim) {
  impl_->origin = "'" + path + "'";
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) throw Error("cannot read TorchScript reward '" + path + "': no such file");
  std::string bytes;
  char buffer[1 << 16];
  size_t n = 0;
  while ((n = std::fread(buffer, 1, sizeof buffer, f)) > 0) bytes.append(buffer, n);
  std::fclose(f);
  impl_->module = load_module(bytes, impl_->origin, "reward");
  check_signature(impl_->module, {"x"}, impl_->origin, "reward");
  impl_->dtype = parameter_dtype(impl_->module);
  check_finite_tensors(impl_->module, impl_->origin, "reward");
  for (auto p : impl_->module.parameters()) p.set_requires_grad(false);
  at::NoGradGuard no_grad;
  const Tensor r = call_tensor(impl_->module, {probe_points(dim, impl_->dtype)}, impl_->origin, "reward");
  if (!r.sizes().equals({2})) {
    throw Error("TorchScript reward " + impl_->origin + ": forward(x [2, " + std::to_string(dim) +
                "]) must return r of shape [2], got " + shape_string(r));
  }
  if (!r.isfinite().all().item<bool>()) {
    throw Error("TorchScript reward " + impl_->origin + " produces non-finite values (NaN or Inf) on a probe forward(x [2, " +
                std::to_string(dim) + "]): its weights are damaged, or too large");
  }
  // Fine-tuning follows grad_x r, taken by autograd through the module (README, "Using models from
  // PyTorch"): a reward that detaches x or returns a constant has none, and would otherwise fail
  // later inside autograd.
  grad(probe_points(dim, impl_->dtype));
}

TorchScriptReward::~TorchScriptReward() = default;

Tensor TorchScriptReward::value(const Tensor& x) const {
  check_batch(x, dim_, "x");
  const Tensor r = call_tensor(impl_->module, {x.to(impl_->dtype)}, impl_->origin, "reward");
  if (!r.sizes().equals({x.size(0)})) {
    throw Error("TorchScript reward " + impl_->origin + ": forward(x " + shape_string(x) + ") returned " +
                shape_string(r));
  }
  return r.to(x.scalar_type());
}

Tensor TorchScriptReward::grad(const Tensor& x) const {
  check_batch(x, dim_, "x");
  at::AutoGradMode enable_grad(true);
  const Tensor xg = x.detach().to(impl_->dtype).requires_grad_(true);
  const Tensor r = value(xg);
  const std::string not_differentiable =
      "TorchScript reward " + impl_->origin +
      ": its output has no gradient with respect to x (does forward detach x, go through .item() or "
      "numpy, or return a constant?); the reward must be differentiable in x, since fine-tuning follows "
      "its gradient";
  if (!r.requires_grad()) throw Error(not_differentiable);
  std::vector<Tensor> g;
  try {
    g = torch::autograd::grad({r.sum()}, {xg}, /*grad_outputs=*/{}, /*retain_graph=*/false,
                              /*create_graph=*/false, /*allow_unused=*/true);
  } catch (const std::exception& e) {
    throw Error("TorchScript reward " + impl_->origin + ": its gradient with respect to x failed: " +
                describe_error(e));
  }
  if (g.empty() || !g[0].defined()) throw Error(not_differentiable);
  return g[0].to(x.scalar_type());
}

// ---------------------------------------------------------------------------------------------
// Export

namespace {

constexpr double kPi = 3.14159265358979323846;

std::string num(double v) {
  char buf[40];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  std::string s(buf);
  if (s.find_first_of(".eEn") == std::string::npos) s += ".0";  // a float literal, not an int
  return s;
}

// A dtype in TorchScript source compiled without Python: ScalarType's integer code (the names
// torch.float32, ... need Python's resolver).
std::string dtype_code(at::ScalarType t) {
  if (!at::isFloatingType(t)) {
    throw Error("export: TorchScript base with parameters of unsupported dtype " + std::string(c10::toString(t)));
  }
  return std::to_string(static_cast<int>(t));
}

// TorchScript lines that set alpha, beta, d_alpha, d_beta from a float64 tensor `s_t`: the
// formulas of src/schedule/schedule.cpp.
std::string schedule_source(const Schedule& schedule) {
  const std::string name = schedule.name();
  if (name == "linear") {
    return "    alpha = s_t\n"
           "    beta = 1.0 - s_t\n"
           "    d_alpha = torch.ones_like(s_t)\n"
           "    d_beta = -torch.ones_like(s_t)\n";
  }
  if (name == "cosine") {
    return "    theta = s_t * " + num(kPi / 2.0) + "\n" +
           "    alpha = torch.sin(theta)\n"
           "    beta = torch.cos(theta)\n"
           "    d_alpha = torch.cos(theta) * " + num(kPi / 2.0) + "\n" +
           "    d_beta = torch.sin(theta) * " + num(-kPi / 2.0) + "\n";
  }
  if (name == "vp") {
    double beta_min = 0.1, beta_max = 20.0;
    for (const auto& [k, v] : schedule.parameters()) (k == "beta_min" ? beta_min : beta_max) = v;
    return "    u = 1.0 - s_t\n"
           "    abar = torch.exp((u * " + num(beta_min) + " + u * u * " + num(0.5 * (beta_max - beta_min)) +
           ") * -1.0)\n" +
           "    d_abar = abar * (u * " + num(beta_max - beta_min) + " + " + num(beta_min) + ")\n" +
           "    alpha = torch.sqrt(abar)\n"
           "    beta = torch.sqrt(1.0 - abar)\n"
           "    d_alpha = d_abar / (alpha * 2.0)\n"
           "    d_beta = d_abar / (beta * -2.0)\n";
  }
  throw Error("export: no TorchScript form of the '" + name + "' schedule");
}

// The exporters of users' kinds (register_torchscript_export).
struct UserExporters {
  std::mutex mutex;
  std::map<std::string, std::function<std::string(const VelocityField&)>> kinds;
};

UserExporters& user_exporters() {
  static UserExporters r;
  return r;
}

bool is_builtin_kind(const std::string& kind) {
  return kind == "gmm" || kind == "mlp" || kind == "torchscript" || kind == "finetuned";
}

// The field as its kind's own class: a field that calls itself "mlp" must be tilt's MlpVelocity.
template <class T>
const T& as(const VelocityField& field) {
  const auto* typed = dynamic_cast<const T*>(&field);
  if (!typed) throw Error("export: the velocity field of kind '" + field.kind() + "' is not tilt's own '" +
                          field.kind() + "' (a user's field needs a kind of its own)");
  return *typed;
}

class Exporter {
 public:
  // The module of one field, by its kind: tilt's own kinds here, users' kinds by their exporters.
  torch::jit::Module module_of(const VelocityField& field) {
    using Method = torch::jit::Module (Exporter::*)(const VelocityField&);
    static const std::map<std::string, Method> builtin{{"mlp", &Exporter::mlp_module},
                                                       {"torchscript", &Exporter::torchscript_module},
                                                       {"finetuned", &Exporter::finetuned_module},
                                                       {"gmm", &Exporter::gmm_module}};
    const std::string kind = field.kind();
    if (const auto it = builtin.find(kind); it != builtin.end()) return (this->*(it->second))(field);
    std::function<std::string(const VelocityField&)> exporter;
    {
      UserExporters& r = user_exporters();
      std::lock_guard<std::mutex> lock(r.mutex);
      if (const auto it = r.kinds.find(kind); it != r.kinds.end()) exporter = it->second;
    }
    if (!exporter) {
      throw Error("export: cannot export a velocity field of kind '" + kind +
                  "' (no TorchScript exporter is registered for it: register_torchscript_export)");
    }
    return user_module(kind, exporter(field));
  }

  // The outer module: accepts a 0-dim t as well as t [B].
  torch::jit::Module top(const VelocityField& field) {
    torch::jit::Module m = make("Velocity");
    m.register_module("field", module_of(field));
    m.register_attribute("dim", c10::IntType::get(), field.dim());
    m.register_attribute("schedule", c10::StringType::get(), field.schedule()->name());
    m.define(
        "def forward(self, x, t):\n"
        "    return self.field.forward(x, t.reshape(-1).expand(x.size(0)))\n");
    return m;
  }

 private:
  torch::jit::Module make(const std::string& name) {
    return torch::jit::Module(c10::QualifiedName("__torch__.tilt." + name), cu_, /*shouldMangle=*/true);
  }

  torch::jit::Module finetuned_module(const VelocityField& field) {
    const FineTunedVelocity& ft = as<FineTunedVelocity>(field);
    if (ft.mode() == FineTuneMode::copy) return module_of(*ft.trainable());
    torch::jit::Module m = make("FineTunedVelocity");
    m.register_module("base", module_of(*ft.base()));
    m.register_module("residual", module_of(*ft.trainable()));
    m.define(
        "def forward(self, x, t):\n"
        "    return self.base.forward(x, t) + self.residual.forward(x, t)\n");
    return m;
  }

  torch::jit::Module gmm_module(const VelocityField&) {
    throw Error("export: the exact Gaussian-mixture velocity has no TorchScript form in tilt (not supported); "
                "export a model whose base is a network (tilt pretrain) or a TorchScript module");
  }

  // A user's exported archive, loaded back to become a submodule.
  torch::jit::Module user_module(const std::string& kind, const std::string& bytes) {
    try {
      std::istringstream in(bytes);
      return torch::jit::load(in);
    } catch (const c10::Error& e) {
      throw Error("export: the TorchScript exporter of kind '" + kind + "' returned no valid archive: " +
                  first_line(e.what_without_backtrace()));
    }
  }

  // src/model/mlp.cpp as TorchScript: input [x, t, sin(pi f t), cos(pi f t) for f = 1..n/2],
  // Linear layers with SiLU between.
  torch::jit::Module mlp_module(const VelocityField& field) {
    const MlpVelocity& mlp = as<MlpVelocity>(field);
    torch::jit::Module m = make("Mlp");
    const NamedTensors params = mlp.named_parameters();  // "0.weight", "0.bias", "2.weight", ...
    const int64_t n = mlp.options().time_features;
    std::string src =
        "def forward(self, x, t):\n"
        "    tt = t.to(x.dtype).reshape(-1, 1).expand(x.size(0), 1)\n";
    if (n > 0) {
      src += "    f = torch.arange(1, " + std::to_string(n / 2 + 1) + ", dtype=x.dtype) * " + num(kPi) + "\n" +
             "    arg = tt * f.unsqueeze(0)\n"
             "    h = torch.cat([x, tt, torch.sin(arg), torch.cos(arg)], 1)\n";
    } else {
      src += "    h = torch.cat([x, tt], 1)\n";
    }
    const size_t layers = params.size() / 2;
    for (size_t i = 0; i < layers; ++i) {
      const std::string w = "layer" + std::to_string(i) + "_weight", b = "layer" + std::to_string(i) + "_bias";
      m.register_parameter(w, params[2 * i].second.detach().clone().requires_grad_(true), false);
      m.register_parameter(b, params[2 * i + 1].second.detach().clone().requires_grad_(true), false);
      src += "    h = torch.linear(h, self." + w + ", self." + b + ")\n";
      if (i + 1 < layers) src += "    h = torch.silu(h)\n";
    }
    src += "    return h\n";
    m.define(src);
    return m;
  }

  // The scripted module as a submodule, with the same casts, clamp and conversion as
  // TorchScriptVelocity::velocity.
  torch::jit::Module torchscript_module(const VelocityField& field) {
    const TorchScriptVelocity& ts = as<TorchScriptVelocity>(field);
    torch::jit::Module m = make("ConvertedVelocity");
    torch::jit::Module inner;
    {
      at::NoGradGuard no_grad;
      inner = ts.impl().module.deepcopy();
    }
    for (auto p : inner.parameters()) p.set_requires_grad(true);
    m.register_module("model", inner);
    const std::string dt = dtype_code(ts.impl().dtype);
    const Prediction pred = ts.options().prediction;
    std::string src =
        "def forward(self, x, t):\n"
        "    t_in = t.to(" + dt + ")\n";
    if (pred != Prediction::velocity) {
      src += "    t_in = torch.clamp(t_in, " + num(ts.options().t_min) + ", " + num(1.0 - ts.options().t_min) + ")\n";
    }
    src += "    y = self.model.forward(x.to(" + dt + "), t_in)\n";
    if (pred == Prediction::velocity) {
      src += "    return y.to(x.dtype)\n";
    } else {
      // docs/equations.md, E7: v = kappa x + eta s; epsilon: v = kappa x + (beta' - kappa beta) eps; in float64.
      const std::string f64 = dtype_code(at::kDouble);
      src += "    s_t = t_in.to(" + f64 + ")\n" + schedule_source(*ts.schedule()) + "    kappa = d_alpha / alpha\n";
      src += pred == Prediction::score ? "    coef = beta * (kappa * beta - d_beta)\n"
                                       : "    coef = d_beta - kappa * beta\n";
      src += "    v = kappa.unsqueeze(1) * x.to(" + f64 + ") + coef.unsqueeze(1) * y.to(" + f64 + ")\n";
      src += "    return v.to(x.dtype)\n";
    }
    m.define(src);
    return m;
  }

  std::shared_ptr<torch::jit::CompilationUnit> cu_ = std::make_shared<torch::jit::CompilationUnit>();
};

}  // namespace

void register_torchscript_export(const std::string& kind, std::function<std::string(const VelocityField&)> exporter) {
  if (kind.empty() || !exporter) throw Error("register_torchscript_export: needs a kind and an exporter");
  if (is_builtin_kind(kind)) throw Error("register_torchscript_export: '" + kind + "' is one of tilt's own model kinds");
  UserExporters& r = user_exporters();
  std::lock_guard<std::mutex> lock(r.mutex);
  r.kinds[kind] = std::move(exporter);
}

std::string export_torchscript(const VelocityField& field) {
  Exporter exporter;
  torch::jit::Module m = exporter.top(field);
  std::ostringstream out;
  m.save(out);
  std::string bytes = out.str();
  // Self-check: the archive, loaded back, gives tilt's velocity at a few points.
  std::istringstream in(bytes);
  torch::jit::Module loaded = torch::jit::load(in);
  at::NoGradGuard no_grad;
  Generator gen = make_generator(12345);
  const Tensor x = at::randn({16, field.dim()}, gen, at::TensorOptions().dtype(at::kFloat));
  const Tensor t = at::linspace(0.0, 0.99, 16, at::TensorOptions().dtype(at::kFloat));
  const Tensor expected = field.velocity(x, t);
  const Tensor got = loaded.forward({x, t}).toTensor();
  const double err = (got - expected).abs().max().item<double>();
  const double scale = 1.0 + expected.abs().max().item<double>();
  if (!(err <= 1e-4 * scale)) {
    throw Error("export: the TorchScript module disagrees with tilt's velocity (max difference " + std::to_string(err) +
                "); please report this");
  }
  return bytes;
}

}  // namespace tilt
