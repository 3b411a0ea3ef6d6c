// TorchScript interop (tilt/model/torchscript.h): scripted base models and rewards from PyTorch,
// and the export of tilt's velocity fields as TorchScript modules.
#include "tilt/model/torchscript.h"

#include "tilt/core/fs.h"
#include "tilt/core/check.h"
#include "tilt/core/error.h"

#include "../core/checksum.h"
#include "tilt/model/condition.h"
#include "tilt/model/finetuned.h"
#include "tilt/model/gmm.h"
#include "tilt/model/mlp.h"
#include "tilt/model/unet.h"

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
  bool nullable = false;              // a conditional forward whose c is Optional[Tensor]: None is the null condition
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

// What forward takes after self: its number of arguments, each a tensor, and whether the last one is
// Optional[Tensor] (a condition that may be None). Throws tilt::Error saying `wanted` otherwise.
struct ForwardArguments {
  size_t count = 0;
  bool optional_last = false;
};

// `wanted` may end with a note in parentheses, which goes after the signature.
Error signature_error(const torch::jit::Module& module, const std::string& wanted, const std::string& origin,
                      const std::string& what) {
  std::ostringstream os;
  os << module.get_method("forward").function().getSchema();
  const size_t note = wanted.find(" (");
  return Error("TorchScript " + what + " " + origin + " must have " + wanted.substr(0, note) + ", but its signature is " +
               os.str() + (note == std::string::npos ? "" : wanted.substr(note)));
}

ForwardArguments forward_arguments(const torch::jit::Module& module, const std::string& wanted,
                                   const std::string& origin, const std::string& what) {
  auto method = module.find_method("forward");
  if (!method) {
    throw Error("TorchScript " + what + " " + origin + " has no forward method; it must have " +
                wanted.substr(0, wanted.find(" (")));
  }
  const auto& args = method->function().getSchema().arguments();
  ForwardArguments out;
  out.count = args.empty() ? 0 : args.size() - 1;
  for (size_t i = 1; i < args.size(); ++i) {
    const c10::TypePtr& type = args[i].type();
    if (type->isSubtypeOf(*c10::TensorType::get())) continue;
    const auto optional = type->cast<c10::OptionalType>();
    if (i + 1 == args.size() && optional && optional->getElementType()->isSubtypeOf(*c10::TensorType::get())) {
      out.optional_last = true;
      continue;
    }
    throw signature_error(module, wanted, origin, what);
  }
  if (out.count == 0) throw signature_error(module, wanted, origin, what);
  return out;
}

// The size of the condition a module takes: 0 if forward takes none (then neither a given size nor an
// attribute `condition_dim` > 0 may say otherwise), else the given size or the module's integer
// attribute `condition_dim`. Throws tilt::Error naming the file; `unknown` when neither says.
int64_t resolve_condition_dim(const torch::jit::Module& module, bool takes_condition, int64_t given,
                              const std::string& origin, const std::string& what, const Error& unknown) {
  const bool has_attr = module.hasattr("condition_dim") && module.attr("condition_dim").isInt();
  const int64_t attr = has_attr ? module.attr("condition_dim").toInt() : 0;
  const std::string head = "TorchScript " + what + " " + origin;
  if (given < 0) throw Error(head + ": condition_dim must be >= 0, got " + std::to_string(given));
  if (!takes_condition) {
    if (given > 0 || attr != 0) {
      throw Error(head + (given > 0 ? ": condition_dim = " + std::to_string(given) + " was given"
                                    : " has condition_dim = " + std::to_string(attr)) +
                  ", but its forward takes no condition c");
    }
    return 0;
  }
  if (given == 0 && !has_attr) throw unknown;
  if (given > 0 && has_attr && attr != given) {
    throw Error(head + " has condition_dim = " + std::to_string(attr) + " but " + std::to_string(given) + " was given");
  }
  const int64_t dc = given > 0 ? given : attr;
  if (dc < 1) throw Error(head + ": condition_dim must be >= 1 for a forward that takes c, got " + std::to_string(dc));
  return dc;
}

// The condition argument of forward for a batch of `batch` rows: c as [batch, dc] rows in `dtype`, or None
// for the null condition (an undefined c), which only an Optional[Tensor] c can take.
c10::IValue condition_argument(const Tensor& c, int64_t batch, int64_t dc, bool nullable, at::ScalarType dtype,
                               const std::string& origin, const std::string& what) {
  const Tensor rows = condition_rows(c, batch, dc, "TorchScript " + what + " " + origin);
  if (rows.defined()) return rows.to(dtype).contiguous();
  if (!nullable) {
    throw Error("TorchScript " + what + " " + origin +
                " has no null condition: its forward takes c as a Tensor, so it cannot be called without one "
                "(unconditionally, or for classifier-free guidance); declare c: Optional[torch.Tensor] and "
                "handle c = None to give it one");
  }
  return c10::IValue();
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

// tilt treats a model or reward as a function of each row alone (a sampler's batch is a choice of speed): row 0
// of `batched`, forward on the probe batch, must be forward on row 0 alone (`first`, the inputs' first rows). A
// module mixing rows (x - x.mean(0), batch statistics) gives samples that depend on the batch size; it was accepted
// and its results were wrong. One that fails on a single row after working on two (torch.mm(x, x)) is said as one.
void check_rows_independent(torch::jit::Module& module, const Tensor& batched, const std::vector<c10::IValue>& first,
                            const std::string& origin, const std::string& what, const std::string& call) {
  const std::string head = "TorchScript " + what + " " + origin;
  Tensor single;
  try {
    single = call_tensor(module, first, origin, what);
  } catch (const Error& e) {
    throw Error(std::string(e.what()) + " (forward failed on row 0 alone after working on 2 rows: it mixes the rows "
                "of its batch or needs a batch of 2; tilt needs a function of each row alone)");
  }
  const at::ScalarType type = batched.scalar_type();
  const double eps = type == at::kDouble ? 1e-10 : type == at::kFloat ? 1e-4 : 1e-2;  // half, bfloat16: 1e-2
  const double scale = 1.0 + batched.abs().max().item<double>();
  const double gap = (batched.narrow(0, 0, 1) - single.reshape_as(batched.narrow(0, 0, 1))).abs().max().item<double>();
  if (!(gap <= eps * scale)) {
    throw Error(head + ": row 0 of " + call + " differs from the same call on row 0 alone (by " + number_string(gap) +
                "): its output depends on the other rows of the batch (a mean over the batch, batch statistics?); "
                "tilt needs a function of each row alone");
  }
}

// A failed probe call with conditions most often means a condition of the wrong size: say which was given.
Tensor call_with_condition_hint(torch::jit::Module& module, const std::vector<c10::IValue>& inputs, int64_t dc,
                                const std::string& origin, const std::string& what) {
  try {
    return call_tensor(module, inputs, origin, what);
  } catch (const Error& e) {
    if (dc < 1) throw;
    throw Error(std::string(e.what()) + " (called with c of " + std::to_string(dc) + " numbers a row: is condition_dim = " +
                std::to_string(dc) + " right?)");
  }
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
  refuse_unreadable_kind(path, "TorchScript model");
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) throw Error("cannot read TorchScript model '" + path + "': no such file");
  std::string bytes;
  char buffer[1 << 16];
  size_t n = 0;
  while ((n = std::fread(buffer, 1, sizeof buffer, f)) > 0) bytes.append(buffer, n);
  std::fclose(f);
  return from_bytes(bytes, "'" + path + "'", std::move(schedule), options);
}

namespace {

// One tiny forward on load: the module must map x [2, d], t [2] (and c [2, dc], and None for a nullable
// c) to [2, d], finite.
void probe_velocity(torch::jit::Module& module, const TorchScriptOptions& o, at::ScalarType dtype, bool nullable,
                    const std::string& origin) {
  at::NoGradGuard no_grad;
  const Tensor x = probe_points(o.dim, dtype);
  const Tensor t = at::tensor({0.25, 0.75}, at::TensorOptions().dtype(dtype));
  const std::string d = std::to_string(o.dim), dc = std::to_string(o.condition_dim);
  std::vector<std::pair<c10::IValue, std::string>> conditions;
  if (o.condition_dim == 0) conditions.emplace_back(c10::IValue(), "");
  if (o.condition_dim > 0) conditions.emplace_back(probe_points(o.condition_dim, dtype), ", c [2, " + dc + "]");
  if (o.condition_dim > 0 && nullable) conditions.emplace_back(c10::IValue(), ", c = None");
  for (const auto& [c, label] : conditions) {
    std::vector<c10::IValue> inputs{x, t};
    if (o.condition_dim > 0) inputs.push_back(c);
    const bool null = label == ", c = None";
    Tensor y;
    try {
      y = call_with_condition_hint(module, inputs, null ? 0 : o.condition_dim, origin, "model");
    } catch (const Error& e) {
      if (!null) throw;
      throw Error(std::string(e.what()) + " (called with c = None, the null condition, since its c is Optional)");
    }
    const std::string call = "forward(x [2, " + d + "], t [2]" + label + ")";
    if (!y.sizes().equals({2, o.dim})) {
      throw Error("TorchScript model " + origin + ": " + call + " must return [2, " + d + "] (the " +
                  to_string(o.prediction) + "), got " + shape_string(y) + "; is the dimension right?");
    }
    if (!y.isfinite().all().item<bool>()) {
      throw Error("TorchScript model " + origin + " produces non-finite values (NaN or Inf) on a probe forward(x [2, " +
                  d + "], t = [0.25, 0.75]" + label + "): its weights are damaged, or too large");
    }
    std::vector<c10::IValue> first{x.narrow(0, 0, 1), t.narrow(0, 0, 1)};
    if (o.condition_dim > 0) first.push_back(null ? c10::IValue() : c10::IValue(c.toTensor().narrow(0, 0, 1)));
    check_rows_independent(module, y, first, origin, "model", call);
  }
}

}  // namespace

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
  const std::string wanted = "forward(x, t) taking tensors (a conditional model's is forward(x, t, c), c a Tensor "
                             "or Optional[Tensor])";
  const ForwardArguments args = forward_arguments(impl->module, wanted, origin, "model");
  if (args.count < 2 || args.count > 3 || (args.count == 2 && args.optional_last)) {
    throw signature_error(impl->module, wanted, origin, "model");
  }
  impl->nullable = args.count == 3 && args.optional_last;
  options.condition_dim = resolve_condition_dim(
      impl->module, args.count == 3, options.condition_dim, origin, "model",
      Error("TorchScript model " + origin + ": its forward(x, t, c) takes a condition of unknown size; give the "
            "module an integer attribute `condition_dim` (self.condition_dim = dc in a scripted module)"));
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
  probe_velocity(impl->module, options, impl->dtype, impl->nullable, origin);
  return std::shared_ptr<TorchScriptVelocity>(new TorchScriptVelocity(std::move(impl), std::move(schedule), options));
}

Tensor TorchScriptVelocity::velocity(const Tensor& x, const Tensor& t) const {
  return conditional_velocity(x, t, Tensor());
}

bool TorchScriptVelocity::has_null_condition() const { return impl_->nullable; }

Tensor TorchScriptVelocity::conditional_velocity(const Tensor& x, const Tensor& t, const Tensor& c) const {
  if (options_.condition_dim == 0 && c.defined()) return VelocityField::conditional_velocity(x, t, c);  // the error
  check_batch(x, options_.dim, "x");
  const int64_t batch = x.size(0);
  check_time(t, batch, "t");
  const Tensor x_in = x.to(impl_->dtype);
  Tensor t_in = (t.dim() == 0 ? t.expand({batch}) : t).to(impl_->dtype);
  if (options_.prediction != Prediction::velocity) t_in = t_in.clamp(options_.t_min, 1.0 - options_.t_min);
  std::vector<c10::IValue> inputs{x_in, t_in};
  if (options_.condition_dim > 0) {
    inputs.push_back(condition_argument(c, batch, options_.condition_dim, impl_->nullable, impl_->dtype, impl_->origin,
                                        "model"));
  }
  const Tensor y = call_tensor(impl_->module, std::move(inputs), impl_->origin, "model");
  if (!y.sizes().equals(x.sizes())) {
    throw Error("TorchScript model " + impl_->origin + ": forward(x " + shape_string(x) + ", t" +
                (options_.condition_dim > 0 ? ", c" : "") + ") returned " + shape_string(y));
  }
  if (options_.prediction == Prediction::velocity) return y.to(x.scalar_type());
  // docs/equations.md, E7: v = kappa_t x + eta_t s. For a noise prediction, Tweedie's formula for
  // Xbar_t = beta_t X0 + alpha_t X1 gives s = -E[X0 | x] / beta_t = -eps / beta_t, and since
  // eta_t / beta_t = kappa_t beta_t - beta'_t, v = kappa_t x + (beta'_t - kappa_t beta_t) eps.
  // In float64, then in x's precision: near t = 0 both terms are ~1/t and cancel. A condition changes
  // only the prediction, not the conversion.
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
  impl->nullable = impl_->nullable;
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

void TorchScriptVelocity::to(const at::Device& device) {
  require_device(device, "moving the TorchScript velocity to " + device.str());
  impl_->module.to(device);
}

at::Device TorchScriptVelocity::device() const {
  for (const auto& p : impl_->module.parameters()) return p.device();
  for (const auto& b : impl_->module.buffers()) return b.device();
  return at::Device(at::kCPU);
}

struct TorchScriptReward::Impl {
  torch::jit::Module module;
  at::ScalarType dtype = at::kFloat;
  std::string origin;
  bool nullable = false;  // forward(x, c) with c Optional[Tensor]: None is the null condition
};

TorchScriptReward::TorchScriptReward(const std::string& path, int64_t dim, int64_t condition_dim)
    : impl_(std::make_unique<Impl>()), dim_(dim) {
  impl_->origin = "'" + path + "'";
  refuse_unreadable_kind(path, "TorchScript reward");
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) throw Error("cannot read TorchScript reward '" + path + "': no such file");
  std::string bytes;
  char buffer[1 << 16];
  size_t n = 0;
  while ((n = std::fread(buffer, 1, sizeof buffer, f)) > 0) bytes.append(buffer, n);
  std::fclose(f);
  impl_->module = load_module(bytes, impl_->origin, "reward");
  // forward(x), or forward(x, c) of a conditional reward: a second argument is a condition only where a
  // condition size says so (a base's forward(x, t) given as the reward is refused here).
  const std::string wanted = "forward(x) taking tensors (a conditional reward's is forward(x, c), with an integer "
                             "attribute `condition_dim`)";
  const ForwardArguments args = forward_arguments(impl_->module, wanted, impl_->origin, "reward");
  if (args.count > 2 || (args.count == 1 && args.optional_last)) {
    throw signature_error(impl_->module, wanted, impl_->origin, "reward");
  }
  impl_->nullable = args.count == 2 && args.optional_last;
  condition_dim_ = resolve_condition_dim(impl_->module, args.count == 2, condition_dim, impl_->origin, "reward",
                                         signature_error(impl_->module, wanted, impl_->origin, "reward"));
  impl_->dtype = parameter_dtype(impl_->module);
  check_finite_tensors(impl_->module, impl_->origin, "reward");
  for (auto p : impl_->module.parameters()) p.set_requires_grad(false);
  probe();
}

// One forward on x [2, d] (with c [2, dc] for a conditional reward, and None for a nullable one) must
// give r [2], finite, with a gradient in x.
void TorchScriptReward::probe() const {
  const Tensor x = probe_points(dim_, impl_->dtype);
  std::vector<std::pair<Tensor, std::string>> conditions;
  if (condition_dim_ == 0 || impl_->nullable) conditions.emplace_back(Tensor(), condition_dim_ > 0 ? ", c = None" : "");
  if (condition_dim_ > 0) {
    conditions.emplace_back(probe_points(condition_dim_, impl_->dtype), ", c [2, " + std::to_string(condition_dim_) + "]");
  }
  for (const auto& [c, label] : conditions) {
    at::NoGradGuard no_grad;
    std::vector<c10::IValue> inputs{x};
    if (condition_dim_ > 0) inputs.push_back(c.defined() ? c10::IValue(c) : c10::IValue());
    const Tensor r = call_with_condition_hint(impl_->module, inputs, c.defined() ? condition_dim_ : 0, impl_->origin, "reward");
    const std::string call = "forward(x [2, " + std::to_string(dim_) + "]" + label + ")";
    if (!r.sizes().equals({2})) {
      throw Error("TorchScript reward " + impl_->origin + ": " + call + " must return r of shape [2], got " +
                  shape_string(r));
    }
    if (!r.isfinite().all().item<bool>()) {
      throw Error("TorchScript reward " + impl_->origin + " produces non-finite values (NaN or Inf) on a probe " +
                  call + ": its weights are damaged, or too large");
    }
    std::vector<c10::IValue> first{x.narrow(0, 0, 1)};
    if (condition_dim_ > 0) first.push_back(c.defined() ? c10::IValue(c.narrow(0, 0, 1)) : c10::IValue());
    check_rows_independent(impl_->module, r, first, impl_->origin, "reward", call);
    // Fine-tuning follows grad_x r, taken by autograd through the module (README, "Using models from
    // PyTorch"): a reward that detaches x or returns a constant has none, and would otherwise fail
    // later inside autograd.
    conditional_grad(x, c);
  }
}

TorchScriptReward::~TorchScriptReward() = default;

Tensor TorchScriptReward::value(const Tensor& x) const { return conditional_value(x, Tensor()); }

Tensor TorchScriptReward::grad(const Tensor& x) const { return conditional_grad(x, Tensor()); }

Tensor TorchScriptReward::conditional_value(const Tensor& x, const Tensor& c) const {
  if (condition_dim_ == 0 && c.defined()) return Reward::conditional_value(x, c);  // the error naming the kind
  check_batch(x, dim_, "x");
  std::vector<c10::IValue> inputs{x.to(impl_->dtype)};
  if (condition_dim_ > 0) {
    inputs.push_back(condition_argument(c, x.size(0), condition_dim_, impl_->nullable, impl_->dtype, impl_->origin,
                                        "reward"));
  }
  const Tensor r = call_tensor(impl_->module, std::move(inputs), impl_->origin, "reward");
  if (!r.sizes().equals({x.size(0)})) {
    throw Error("TorchScript reward " + impl_->origin + ": forward(x " + shape_string(x) +
                (condition_dim_ > 0 ? ", c" : "") + ") returned " + shape_string(r));
  }
  return r.to(x.scalar_type());
}

Tensor TorchScriptReward::conditional_grad(const Tensor& x, const Tensor& c) const {
  check_batch(x, dim_, "x");
  at::AutoGradMode enable_grad(true);
  const Tensor xg = x.detach().to(impl_->dtype).requires_grad_(true);
  const Tensor r = conditional_value(xg, c.defined() ? c.detach() : c);
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
  return kind == "gmm" || kind == "mlp" || kind == "unet" || kind == "torchscript" || kind == "finetuned";
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
                                                       {"unet", &Exporter::unet_module},
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
    return user_module(field, exporter(field));
  }

  // The outer module: accepts a 0-dim t as well as t [B]; for a conditional field c [B, dc] or [1, dc]
  // (expanded to B rows), or None (the default: the null condition).
  torch::jit::Module top(const VelocityField& field) {
    torch::jit::Module m = make("Velocity");
    m.register_module("field", module_of(field));
    m.register_attribute("dim", c10::IntType::get(), field.dim());
    m.register_attribute("schedule", c10::StringType::get(), field.schedule()->name());
    if (field.condition_dim() == 0) {
      m.define(
          "def forward(self, x, t):\n"
          "    return self.field.forward(x, t.reshape(-1).expand(x.size(0)))\n");
      return m;
    }
    m.register_attribute("condition_dim", c10::IntType::get(), field.condition_dim());
    m.define(
        "def forward(self, x, t, c: Optional[Tensor] = None):\n"
        "    tt = t.reshape(-1).expand(x.size(0))\n"
        "    if c is None:\n"
        "        return self.field.forward(x, tt, None)\n"
        "    return self.field.forward(x, tt, c.expand(x.size(0), self.condition_dim))\n");
    return m;
  }

 private:
  torch::jit::Module make(const std::string& name) {
    return torch::jit::Module(c10::QualifiedName("__torch__.tilt." + name), cu_, /*shouldMangle=*/true);
  }

  torch::jit::Module finetuned_module(const VelocityField& field) {
    const FineTunedVelocity& ft = as<FineTunedVelocity>(field);
    if (ft.mode() != FineTuneMode::residual) return module_of(*ft.trainable());
    torch::jit::Module m = make("FineTunedVelocity");
    m.register_module("base", module_of(*ft.base()));
    m.register_module("residual", module_of(*ft.trainable()));
    m.define(ft.condition_dim() == 0
                 ? "def forward(self, x, t):\n"
                   "    return self.base.forward(x, t) + self.residual.forward(x, t)\n"
                 : "def forward(self, x, t, c: Optional[Tensor]):\n"
                   "    return self.base.forward(x, t, c) + self.residual.forward(x, t, c)\n");
    return m;
  }

  torch::jit::Module gmm_module(const VelocityField&) {
    throw Error("export: the exact Gaussian-mixture velocity has no TorchScript form in tilt (not supported); "
                "export a model whose base is a network (tilt pretrain) or a TorchScript module");
  }

  // A user's exported archive, loaded back to become a submodule; a conditional field's must take
  // (x, t, c: Optional[Tensor]), as its parent calls it.
  torch::jit::Module user_module(const VelocityField& field, const std::string& bytes) {
    const std::string kind = field.kind();
    torch::jit::Module m;
    try {
      std::istringstream in(bytes);
      m = torch::jit::load(in);
    } catch (const c10::Error& e) {
      throw Error("export: the TorchScript exporter of kind '" + kind + "' returned no valid archive: " +
                  first_line(e.what_without_backtrace()));
    }
    const bool conditional = field.condition_dim() > 0;
    const std::string wanted = conditional ? "forward(x, t, c: Optional[Tensor]), as the field is conditional"
                                           : "forward(x, t) taking tensors";
    const std::string origin = "exported for kind '" + kind + "'";
    const ForwardArguments args = forward_arguments(m, wanted, origin, "module");
    if (args.count != (conditional ? 3u : 2u) || args.optional_last != conditional) {
      throw signature_error(m, wanted, origin, "module");
    }
    return m;
  }

  // src/model/mlp.cpp as TorchScript: input [x, t, sin(pi f t), cos(pi f t) for f = 1..n/2], and
  // for a conditional network c and a flag (1; c = 0 and flag 0 for the null condition c = None),
  // Linear layers with SiLU between.
  torch::jit::Module mlp_module(const VelocityField& field) {
    const MlpVelocity& mlp = as<MlpVelocity>(field);
    torch::jit::Module m = make("Mlp");
    const NamedTensors params = mlp.named_parameters();  // "0.weight", "0.bias", "2.weight", ...
    const int64_t n = mlp.options().time_features, dc = mlp.options().condition_dim;
    std::string src = dc == 0 ? "def forward(self, x, t):\n" : "def forward(self, x, t, c: Optional[Tensor]):\n";
    src += "    tt = t.to(x.dtype).reshape(-1, 1).expand(x.size(0), 1)\n";
    std::string inputs = "x, tt";
    if (n > 0) {
      src += "    f = torch.arange(1, " + std::to_string(n / 2 + 1) + ", dtype=x.dtype, device=x.device) * " + num(kPi) + "\n" +
             "    arg = tt * f.unsqueeze(0)\n";
      inputs += ", torch.sin(arg), torch.cos(arg)";
    }
    if (dc > 0) {
      src += "    if c is None:\n"
             "        cc = torch.zeros(x.size(0), " + std::to_string(dc) + ", dtype=x.dtype, device=x.device)\n"
             "        flag = torch.zeros(x.size(0), 1, dtype=x.dtype, device=x.device)\n"
             "    else:\n"
             "        cc = c.to(x.dtype).expand(x.size(0), " + std::to_string(dc) + ")\n"
             "        flag = torch.ones(x.size(0), 1, dtype=x.dtype, device=x.device)\n";
      inputs += ", cc, flag";
    }
    src += "    h = torch.cat([" + inputs + "], 1)\n";
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

  // src/model/unet.cpp's forward pass as TorchScript (UNetVelocity::script_form), LoRA adapters merged in.
  torch::jit::Module unet_module(const VelocityField& field) {
    const UNetVelocity::ScriptForm form = as<UNetVelocity>(field).script_form();
    torch::jit::Module m = make("UNet");
    for (const auto& [name, value] : form.tensors) m.register_parameter(name, value.requires_grad_(true), false);
    m.define(form.source);
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
    const bool conditional = ts.condition_dim() > 0;
    std::string src = conditional ? "def forward(self, x, t, c: Optional[Tensor]):\n" : "def forward(self, x, t):\n";
    src += "    t_in = t.to(" + dt + ")\n";
    if (pred != Prediction::velocity) {
      src += "    t_in = torch.clamp(t_in, " + num(ts.options().t_min) + ", " + num(1.0 - ts.options().t_min) + ")\n";
    }
    if (!conditional) {
      src += "    y = self.model.forward(x.to(" + dt + "), t_in)\n";
    } else {
      // The null condition is the module's forward(x, t, None), where its c is Optional[Tensor]; where it
      // is a plain Tensor, c = None fails as it does in tilt.
      if (ts.has_null_condition()) {
        src += "    if c is None:\n"
               "        y = self.model.forward(x.to(" + dt + "), t_in, None)\n"
               "    else:\n"
               "        y = self.model.forward(x.to(" + dt + "), t_in, c.to(" + dt + "))\n";
      } else {
        src += "    assert c is not None, \"the TorchScript base takes c as a Tensor: it has no null condition (c = None)\"\n"
               "    y = self.model.forward(x.to(" + dt + "), t_in, c.to(" + dt + "))\n";
      }
    }
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

namespace {

// The exported module's velocity against tilt's, at c (undefined: the null condition); throws if they differ.
void check_export(torch::jit::Module& loaded, const VelocityField& field, const Tensor& x, const Tensor& t,
                  const Tensor& c) {
  std::vector<c10::IValue> inputs{x, t};
  if (field.condition_dim() > 0) inputs.push_back(c.defined() ? c10::IValue(c) : c10::IValue());
  const Tensor expected = c.defined() ? field.conditional_velocity(x, t, c) : field.velocity(x, t);
  Tensor got;
  try {
    got = loaded.forward(inputs).toTensor();
  } catch (const std::exception& e) {
    throw Error("export: the TorchScript module fails where tilt's velocity does not" +
                std::string(c.defined() ? " (at conditions c)" : field.condition_dim() > 0 ? " (at c = None)" : "") +
                ": " + describe_error(e));
  }
  const double err = (got - expected).abs().max().item<double>();
  const double scale = 1.0 + expected.abs().max().item<double>();
  if (!(err <= 1e-4 * scale)) {
    throw Error("export: the TorchScript module disagrees with tilt's velocity" +
                std::string(c.defined() ? " at conditions c" : field.condition_dim() > 0 ? " at the null condition" : "") +
                " (max difference " + std::to_string(err) + "); please report this");
  }
}

// Whether a conditional field has a null condition (a TorchScript base whose c is a plain Tensor has none).
bool has_null_condition(const VelocityField& field) {
  if (const auto* ts = dynamic_cast<const TorchScriptVelocity*>(&field)) return ts->has_null_condition();
  if (const auto* ft = dynamic_cast<const FineTunedVelocity*>(&field)) {
    return has_null_condition(*ft->trainable()) && (ft->mode() != FineTuneMode::residual || has_null_condition(*ft->base()));
  }
  return true;
}

}  // namespace

std::string export_torchscript(const VelocityField& field) {
  Exporter exporter;
  torch::jit::Module m = exporter.top(field);
  std::ostringstream out;
  m.save(out);
  std::string bytes = out.str();
  // Self-check: the archive, loaded back, gives tilt's velocity at a few points (a conditional field's
  // at conditions one per row and one for the batch, and at the null condition where it has one).
  std::istringstream in(bytes);
  torch::jit::Module loaded = torch::jit::load(in);
  at::NoGradGuard no_grad;
  Generator gen = make_generator(12345);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const Tensor x = at::randn({16, field.dim()}, gen, f32);
  const Tensor t = at::linspace(0.0, 0.99, 16, f32);
  const int64_t dc = field.condition_dim();
  if (dc == 0 || has_null_condition(field)) check_export(loaded, field, x, t, Tensor());
  if (dc > 0) {
    const Tensor c = at::randn({16, dc}, gen, f32);
    check_export(loaded, field, x, t, c);
    check_export(loaded, field, x, t, c.narrow(0, 0, 1));
  }
  return bytes;
}

void TorchScriptReward::to(const at::Device& device) const {
  require_device(device, "moving the TorchScript reward to " + device.str());
  impl_->module.to(device);
}

}  // namespace tilt
