// tilt's side of the conditional TorchScript round trip in tests/cli/torchscript_test.sh (the Python
// side is tests/cli/torchscript_check.py). Until the command line takes conditions, this small program
// writes the conditional model files that `tilt export` reads, and loads what Python wrote:
//
//   models DIR               DIR/cond_mlp.pt (a conditional MLP, d = 2, dc = 3) and DIR/cond_ft.pt (a
//                            residual fine-tune of it, moved off zero), both with training conditions
//   base MODULE.ts REF.pt    a scripted forward(x, t, c) against Python's values: v(x, t | c), the null
//                            condition forward(x, t, None), and the VJP (dv/dx)^T a at t0 by autograd
//   reward MODULE.ts REF.pt  a scripted forward(x, c) against Python's r(x, c) and grad_x r
//   back MODEL.pt MODULE.ts  the module Python re-scripted from tilt's export, loaded back as a
//                            TorchScript base, against the model file's conditional velocity
//
// Prints "ok ..." lines; exits 1 with "FAIL ..." on a mismatch.
#include "tilt/core/error.h"
#include "tilt/io/model_io.h"
#include "tilt/model/finetuned.h"
#include "tilt/model/mlp.h"
#include "tilt/model/torchscript.h"

#include <ATen/ATen.h>
#include <ATen/core/Dict.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/jit/serialization/pickle.h>

#include <cstdio>
#include <fstream>
#include <iterator>
#include <map>
#include <string>

namespace {

using tilt::Tensor;

// A dict of tensors written by Python's torch.save.
std::map<std::string, Tensor> read_dict(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw tilt::Error("cannot read '" + path + "'");
  const std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::map<std::string, Tensor> out;
  for (const auto& item : torch::jit::pickle_load(bytes).toGenericDict()) {
    out[item.key().toStringRef()] = item.value().toTensor();
  }
  return out;
}

bool check(const std::string& what, const Tensor& got, const Tensor& want, double tol) {
  const double err = (got.to(at::kDouble) - want.to(at::kDouble)).abs().max().item<double>();
  const double scale = 1.0 + want.abs().max().item<double>();
  const bool ok = got.sizes().equals(want.sizes()) && err <= tol * scale;
  std::printf("%s %s (max difference %.2e)\n", ok ? "ok  " : "FAIL", what.c_str(), err);
  return ok;
}

int models(const std::string& dir) {
  tilt::MlpOptions o;
  o.dim = 2;
  o.hidden = {16, 16};
  o.time_features = 4;
  o.condition_dim = 3;
  auto mlp = std::make_shared<tilt::MlpVelocity>(o, tilt::make_linear_schedule(), 7);
  const Tensor conditions = at::eye(3, at::kDouble);
  tilt::save_velocity(*mlp, dir + "/cond_mlp.pt", tilt::Json::object(), conditions);
  auto ft = tilt::make_finetuned(mlp, tilt::FineTuneMode::residual, {8}, 4, 8);
  tilt::Generator gen = tilt::make_generator(9);
  {
    at::NoGradGuard no_grad;
    for (auto& p : ft->parameters()) p.add_(0.1 * at::randn(p.sizes(), gen));
  }
  tilt::save_velocity(*ft, dir + "/cond_ft.pt", tilt::Json::object(), conditions);
  std::printf("ok   wrote %s/cond_mlp.pt and %s/cond_ft.pt\n", dir.c_str(), dir.c_str());
  return 0;
}

int base(const std::string& module, const std::string& ref_path) {
  auto field = tilt::TorchScriptVelocity::load(module, tilt::make_linear_schedule());
  auto ref = read_dict(ref_path);
  bool ok = field->condition_dim() == ref["c"].size(1) && field->has_null_condition();
  std::printf("%s condition_dim %lld from the module's attribute, null condition: %s\n", ok ? "ok  " : "FAIL",
              static_cast<long long>(field->condition_dim()), field->has_null_condition() ? "yes" : "no");
  ok &= check("v(x, t | c) = Python's forward(x, t, c)", field->conditional_velocity(ref["x"], ref["t"], ref["c"]),
              ref["v"], 1e-6);
  ok &= check("v(x, t | null) = Python's forward(x, t, None)", field->velocity(ref["x"], ref["t"]), ref["v_null"], 1e-6);
  const double t0 = ref["t0"].item<double>();
  ok &= check("(dv/dx)^T a at c = Python's autograd", field->conditional_vjp(ref["x"], t0, ref["c"], ref["a"]), ref["g"],
              1e-5);
  return ok ? 0 : 1;
}

int reward(const std::string& module, const std::string& ref_path) {
  auto ref = read_dict(ref_path);
  const tilt::TorchScriptReward r(module, ref["x"].size(1));
  bool ok = r.condition_dim() == ref["c"].size(1);
  std::printf("%s reward condition_dim %lld\n", ok ? "ok  " : "FAIL", static_cast<long long>(r.condition_dim()));
  ok &= check("r(x, c) = Python's forward(x, c)", r.conditional_value(ref["x"], ref["c"]), ref["r"], 1e-6);
  ok &= check("grad_x r(x, c) = Python's autograd", r.conditional_grad(ref["x"], ref["c"]), ref["r_grad"], 1e-5);
  return ok ? 0 : 1;
}

int back(const std::string& model, const std::string& module) {
  const tilt::LoadedModel m = tilt::load_velocity(model);
  auto field = tilt::TorchScriptVelocity::load(module, m.field->schedule());
  bool ok = field->condition_dim() == m.field->condition_dim() && field->has_null_condition();
  std::printf("%s loaded back: condition_dim %lld, null condition %s\n", ok ? "ok  " : "FAIL",
              static_cast<long long>(field->condition_dim()), field->has_null_condition() ? "yes" : "no");
  tilt::Generator gen = tilt::make_generator(10);
  const Tensor x = 1.5 * at::randn({64, field->dim()}, gen), t = at::rand({64}, gen);
  const Tensor c = at::randn({64, field->condition_dim()}, gen);
  at::NoGradGuard no_grad;
  ok &= check("back in tilt: v(x, t | c) = the model file's", field->conditional_velocity(x, t, c),
              m.field->conditional_velocity(x, t, c), 1e-5);
  ok &= check("back in tilt: v(x, t | null) = the model file's", field->velocity(x, t), m.field->velocity(x, t), 1e-5);
  return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string cmd = argc > 1 ? argv[1] : "";
  try {
    if (cmd == "models" && argc == 3) return models(argv[2]);
    if (cmd == "base" && argc == 4) return base(argv[2], argv[3]);
    if (cmd == "reward" && argc == 4) return reward(argv[2], argv[3]);
    if (cmd == "back" && argc == 4) return back(argv[2], argv[3]);
  } catch (const std::exception& e) {
    std::printf("FAIL %s: %s\n", cmd.c_str(), e.what());
    return 1;
  }
  std::printf("usage: %s models DIR | base MODULE.ts REF.pt | reward MODULE.ts REF.pt | back MODEL.pt MODULE.ts\n",
              argv[0]);
  return 2;
}
