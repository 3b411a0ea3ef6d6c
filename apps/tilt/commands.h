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
/// The options of pretrain, finetune and classifier (a config, a run directory, --resume).
CommandSetup train_setup(int (*run)(const TrainArgs&));
int run_classifier(const TrainArgs& args);
int run_finetune(const TrainArgs& args);

struct SampleArgs {
  ConfigArgs config;
  std::string model;   ///< a model file; or exact samples of the config's base or target:
  std::string exact;   ///< "base" | "target"
  int64_t n = 2000;
  std::string noise;   ///< noise schedule spec; empty: the one the model was fine-tuned with
  std::optional<int64_t> steps;  ///< not given: 100
  std::string integrator = "auto";
  int64_t seed = 0;
  int threads = 0;
  std::string out;
  std::string png;
};
int run_sample(const SampleArgs& args);

struct ExportArgs {
  std::string model;      ///< a tilt model file
  std::string out;        ///< the TorchScript file to write
  std::string reference;  ///< --check-file: optionally, points x, times t and tilt's velocity v there (torch.load-able)
  std::string old_reference;  ///< --reference, the deprecated spelling of --check-file
  std::string reference_flag = "--check-file";  ///< the spelling given, for messages
  int64_t points = 64;
  int64_t seed = 0;
};
int run_export(const ExportArgs& args);

struct EvalArgs {
  ConfigArgs config;
  std::vector<std::string> samples;
  std::string reference;  ///< compare with these samples when the config has no exact target
  int64_t replicates = 8;
  int64_t seed = 0;
};
int run_eval(const EvalArgs& args);

struct EvalImagesArgs {
  ConfigArgs config;
  std::vector<std::string> samples;
  std::string base;  ///< base-model samples: the tilted target's metrics by importance weighting
};
int run_eval_images(const EvalImagesArgs& args);

struct LogzArgs {
  ConfigArgs config;
  std::string model;    ///< a proposal model file; or
  std::string control;  ///< "zero" | "optimal" | "optimal:<scale>" (needs the exact target)
  std::string method = "girsanov";  ///< girsanov | noising | jarzynski
  std::string noise;    ///< empty: memoryless (girsanov, noising), constant:1 (jarzynski)
  std::string integrator = "euler";
  int64_t steps = 100;
  int64_t n = 10000;
  int64_t batch = 4096;
  int64_t seed = -1;    ///< -1: the config's seed
  int threads = 0;
  bool quiet = false;
};
int run_logz(const LogzArgs& args);

struct PlotArgs {
  std::vector<std::string> panels;  ///< FILE or FILE:TITLE
  std::string out;
  std::string title;
  int columns = 0;
  int size = 300;
  std::string images;  ///< "HxW": draw the samples as images of H x W pixels instead of points
  int max_images = 100;
};
int run_plot(const PlotArgs& args);

struct SocArgs {
  ConfigArgs config;  ///< optional: top-level seed, threads and a [soc] table (flags given override it)
  std::map<std::string, std::string> from_config;  ///< flag -> where the config gave it, for messages
  std::string problem = "quadratic_ou_easy";
  std::vector<std::string> losses;
  int64_t iterations = 1000;
  int64_t batch = 128;
  int64_t steps = 0;  ///< 0: the problem's default
  double lr = 1e-3;
  std::vector<int64_t> hidden{128, 128};
  int64_t seed = 0;
  int threads = 0;
  int64_t shards = 0;  ///< 0: one per process
  double dist_timeout = 300;
  int64_t eval_every = 50;
  int64_t eval_batch = 1024;
  std::string out;
  bool quiet = false;
};
int run_soc(const SocArgs& args);
/// Fills `args` from its config: each setting whose flag was not `given`.
void read_soc_config(SocArgs& args, const std::function<bool(const std::string&)>& given);

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
  int64_t seed = -1;  ///< -1: derived from the config's seed
  bool quiet = false;
};
int run_mcmc(const McmcArgs& args);

}  // namespace tilt::cli
