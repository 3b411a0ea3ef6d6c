// tilt export: a model file as a TorchScript module for PyTorch.
#include "commands.h"

#include "tilt/core/error.h"
#include "tilt/core/fs.h"
#include "tilt/io/model_io.h"
#include "tilt/model/torchscript.h"

#include <ATen/ATen.h>
#include <ATen/core/Dict.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/jit/serialization/pickle.h>

namespace tilt::cli {

int run_export(const ExportArgs& args) {
  refuse_output_over_input("--out", args.out, {{"--model", args.model}});
  if (!args.reference.empty()) {
    refuse_output_over_input("--reference", args.reference, {{"--model", args.model}, {"--out", args.out}});
  }
  check_flag("--points", args.points, 1, 1000000);
  if (args.seed < 0) throw Error("--seed must be >= 0");
  set_threads(1);
  const LoadedModel m = load_velocity(args.model);
  std::string module;
  try {
    module = export_torchscript(*m.field);
  } catch (const Error& e) {
    throw Error("model file '" + args.model + "': " + e.what());
  }
  atomic_write(args.out, module);
  info("wrote " + args.out + " (TorchScript: forward(x [B, " + std::to_string(m.field->dim()) +
       "], t [B]) -> velocity, schedule " + m.field->schedule()->name() + ")");
  if (!args.reference.empty()) {
    // Points spread over the data scale and times on the sampler's uniform grid, t = 0 included.
    at::NoGradGuard no_grad;
    Generator gen = make_generator(mix_seed(static_cast<uint64_t>(args.seed), 23));
    const Tensor x = 1.5 * at::randn({args.points, m.field->dim()}, gen, at::TensorOptions().dtype(at::kFloat));
    const Tensor t = at::arange(args.points, at::TensorOptions().dtype(at::kFloat)) / static_cast<double>(args.points);
    c10::Dict<std::string, Tensor> dict;
    dict.insert("x", x);
    dict.insert("t", t);
    dict.insert("v", m.field->velocity(x, t).detach().contiguous());
    const std::vector<char> bytes = torch::jit::pickle_save(c10::IValue(dict));
    atomic_write(args.reference, std::string(bytes.begin(), bytes.end()));
    info("wrote " + args.reference + " (x, t and tilt's velocity v at " + std::to_string(args.points) + " points)");
  }
  return 0;
}

}  // namespace tilt::cli
