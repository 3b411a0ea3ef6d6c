// tilt export: a model file as a TorchScript module for PyTorch.
#include "commands.h"

#include "tilt/core/error.h"
#include "tilt/core/fs.h"
#include "tilt/io/model_io.h"
#include "tilt/model/torchscript.h"

namespace tilt::cli {

int run_export(const ExportArgs& args) {
  refuse_output_over_input("--out", args.out, {{"--model", args.model}});
  if (!args.reference.empty()) {
    refuse_output_over_input(args.reference_flag, args.reference, {{"--model", args.model}, {"--out", args.out}});
  }
  check_flag("--points", args.points, 1, 1000000);
  if (args.seed < 0) throw Error("--seed must be >= 0");
  set_threads(args.threads);
  const LoadedModel m = load_velocity(args.model);
  std::string module;
  try {
    module = export_torchscript(*m.field);
  } catch (const Error& e) {
    throw Error("model file '" + args.model + "': " + e.what());
  }
  atomic_write(args.out, module);
  const int64_t dc = m.field->condition_dim();
  info("wrote " + args.out + " (TorchScript: forward(x [B, " + std::to_string(m.field->dim()) + "], t [B]" +
       (dc > 0 ? ", c [B, " + std::to_string(dc) + "] or None" : std::string()) + ") -> velocity, schedule " +
       m.field->schedule()->name() + ")");
  if (!args.reference.empty()) {
    write_velocity_check_file(*m.field, args.reference, args.points, static_cast<uint64_t>(args.seed));
    info("wrote " + args.reference + " (x, t" + (dc > 0 ? std::string(", c") : std::string()) +
         " and tilt's velocity v at " + std::to_string(args.points) + " points)");
  }
  report({{"module", args.out}, {"check_file", args.reference.empty() ? Json() : Json(args.reference)}});
  return 0;
}

namespace {
const bool registered = add_command(
    {"export", "Write a model file as a TorchScript module that PyTorch's torch.jit.load runs", 50, [](CLI::App& app) {
       auto args = std::make_shared<ExportArgs>();
       app.add_option("-m,--model", args->model, "Model file (model.pt of a run)")->required();
       app.add_option("-o,--out", args->out,
                      "File: the TorchScript module (forward(x [B, d], t [B]) -> velocity [B, d]; a conditional "
                      "model's forward(x, t, c [B, dc] or None))")
           ->required();
       app.add_option("--check-file", args->reference,
                      "Also write points x, times t and tilt's velocity v there to this file (a dict torch.load reads), "
                      "to check the module against in Python");
       app.add_option("--reference", args->old_reference, "Deprecated spelling of --check-file")->group("");
       app.add_option("--points", args->points, "Number of points in --check-file")->capture_default_str();
       add_seed_threads(app, args->flags, "draws the points of --check-file", false);
       return [args] {
         args->seed = args->flags.seed.value_or(0);
         args->threads = static_cast<int>(args->flags.threads.value_or(0));
         if (!args->old_reference.empty()) {
           warn("export --reference is deprecated (eval's --reference is an input): write --check-file");
           if (!args->reference.empty()) throw Error("give --check-file or its old spelling --reference, not both");
           args->reference = args->old_reference;
           args->reference_flag = "--reference";
         }
         return run_export(*args);
       };
     }});
}  // namespace

}  // namespace tilt::cli
