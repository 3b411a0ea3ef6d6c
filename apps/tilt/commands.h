// The sub-commands of the tilt tool. Each returns the process exit code.
#pragma once

#include "common.h"
#include "registry.h"

#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace tilt::cli {

struct TrainArgs {
  ConfigArgs config;
  std::string out;
  bool resume = false;
  bool quiet = false;
  double dist_timeout = 300;  ///< several processes: the longest wait for the others, seconds
};
int run_pretrain(const TrainArgs& args);
/// The options of pretrain, finetune and classifier (a config, a run directory, --resume); `out_files` names
/// what the run directory holds, and `distributed` adds --dist-timeout (classifier trains in one process).
CommandSetup train_setup(int (*run)(const TrainArgs&), const std::string& out_files, bool distributed);
int run_classifier(const TrainArgs& args);
int run_finetune(const TrainArgs& args);

struct ExportArgs {
  std::string model;      ///< a tilt model file
  std::string out;        ///< the TorchScript file to write
  std::string reference;  ///< --check-file: optionally, points x, times t and tilt's velocity v there (torch.load-able)
  std::string old_reference;  ///< --reference, the deprecated spelling of --check-file
  std::string reference_flag = "--check-file";  ///< the spelling given, for messages
  int64_t points = 64;
  int64_t seed = 0;
  int threads = 0;
  ConfigArgs flags;  ///< --seed and --threads (add_seed_threads; export reads no config)
};
int run_export(const ExportArgs& args);

struct EvalImagesArgs {
  ConfigArgs config;
  std::vector<std::string> samples;
  std::string base;  ///< base-model samples: the tilted target's metrics by importance weighting
  std::string unseen;  ///< a second classifier file, never used in training: its share and log p(c|x) too
  std::string json_file;  ///< also write the result as JSON here (atomically)
};
int run_eval_images(const EvalImagesArgs& args);

struct AdjointSamplingArgs {
  ConfigArgs config;
  std::string out;
  std::string reference;  ///< reference samples (CSV, e.g. from tilt mcmc); overrides [evaluation] reference
  bool resume = false;
  bool quiet = false;
};
int run_adjoint_sampling(const AdjointSamplingArgs& args);

struct McmcArgs {
  ConfigArgs config;
  std::string out;
  bool quiet = false;
};
int run_mcmc(const McmcArgs& args);

}  // namespace tilt::cli
