// Sample sets as `tilt sample`, `tilt eval` and `tilt plot` make and use them: samples drawn from a
// model file or exactly from a config's base or target, their distances to the exact target p* (or to
// reference samples) against the noise floor, and pictures of them. A C++ program gets the same
// numbers from the same options; messages name the options by their flags.
#pragma once

#include "tilt/core/tensor.h"
#include "tilt/io/config.h"

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace tilt {

/// The options of tilt sample, with its defaults.
struct DrawOptions {
  std::string model;   ///< a model file; or exact samples of the config's base or target:
  std::string exact;   ///< "base" | "target" (needs a config)
  std::string config;  ///< for exact: the config file, and
  std::vector<std::string> set;  ///< its overrides (key=value)
  int64_t n = 2000;
  std::string noise;   ///< noise schedule spec; empty: the one the model was fine-tuned with
  std::optional<int64_t> steps;  ///< not given: 100
  std::string integrator = "auto";  ///< auto: heun for the ODE, else euler
  /// A model's velocity evaluations in "float32" or under "bfloat16" autocast on the run's device (the sampler's
  /// state stays float32; TrainerOptions::precision, docs/devices.md).
  std::string precision = "float32";
  int64_t seed = 0;    ///< for a model file (--exact takes the config's top-level seed)
  int threads = 0;     ///< for a model file (--exact takes the config's); 0: all cores
  std::string out;     ///< write_samples: the CSV file
  std::string png;     ///< write_samples: also a scatter plot of the first two coordinates (optional)
  /// A conditional model or config (docs/conditions.md): one condition, comma-separated numbers, or a CSV
  /// file of conditions (one per line); n samples are drawn at each, condition i from mix_seed(stream, i).
  std::string condition, conditions;
  double guidance = 0.0;  ///< classifier-free guidance weight w (docs/equations.md, E97); 0: none
  /// A model's samples are drawn `batch` at a time (0: all n at once), each batch's from the generator where the
  /// last left off: a smaller batch bounds the memory (the field's activations for batch rows) and changes which
  /// random numbers each sample gets.
  int64_t batch = 0;
  /// A progress bar (stderr) for a model's samples that take over two seconds.
  bool progress = true;
};
struct DrawnSamples {
  Tensor x;          ///< [n, d] (n per condition), every value finite
  Tensor c;          ///< [n, dc]: each sample's condition; undefined for an unconditional model
  std::string what;  ///< "samples of <model> with <noise>, <steps> steps" or "exact <base|target> samples"
};
/// Draws with the generator mix_seed(seed, 17). The config is read for exact samples only, and then
/// gives the seed and the threads. A model's samples may hold non-finite values (see write_samples).
DrawnSamples draw_samples(const DrawOptions& options);
/// tilt sample: checks that out and png overwrite no input, draws, refuses samples with NaN or Inf values
/// (naming the model file: a model can be non-finite away from the points it was checked at), then writes
/// out and png.
DrawnSamples write_samples(const DrawOptions& options);

/// The options of tilt eval, with its defaults.
struct EvalOptions {
  std::vector<std::string> samples;  ///< CSV files to evaluate
  std::string reference;  ///< compare with these samples when the config has no exact target
  int64_t replicates = 8;  ///< fresh target sets per distance
  /// Given: a file of more rows is scored on max_n of them, drawn without replacement (generator
  /// mix_seed(seed, 31), the same for every file), and its noise floor is that of max_n samples.
  std::optional<int64_t> max_n;
  /// A conditional config: the condition of every sample of files without condition columns (comma-separated
  /// numbers); files with columns c0, c1, ... carry their own.
  std::string condition;
  bool progress = true;  ///< a progress bar for files of many samples (tilt eval -q: none)
};
/// Throws tilt::Error naming the flag of an option out of bounds (checked first by evaluate_sample_files).
void check_eval_options(const EvalOptions& options);
/// Energy distance and MMD of each samples file to the config's exact target p* (else to `reference`),
/// each averaged over `replicates` fresh target sets (drawn once per sample size and shared by the files of
/// that size), with the noise floor (the expected distance between two target sets of the same size,
/// estimated from those sets' own pairs: docs/equations.md, E78 and E108) and the mean reward; generator
/// mix_seed(seed, 29) from the config's top-level seed. Returns target.{kind, log_z, lambda, mean_reward |
/// path}, base.mean_reward, mmd_bandwidths, max_n (if given) and samples.<path>.{n (the rows scored),
/// file_rows, energy_distance(_noise_floor, _ratio), mmd(...), mean_reward, mean_reward_se}.
Json evaluate_sample_files(Config& config, const EvalOptions& options);
/// The result as tilt eval prints it: one line per samples file.
std::string evaluation_text(const Json& result, const EvalOptions& options);

/// The options of tilt plot.
struct PlotOptions {
  std::vector<std::string> panels;  ///< samples files, each FILE or FILE:TITLE
  std::string out;                  ///< the PNG
  std::string title;
  int columns = 0;   ///< panels per row; 0: one row
  int size = 300;    ///< panel size in pixels
  std::string images;  ///< "HxW": draw each sample as an image of H x W pixels instead of a point
  int max_images = 100;
  /// K > 0 (with images): one row per condition (the columns c0, c1, ... of a conditional model's samples),
  /// the conditions in the order they first appear over all files, the first K samples of each, blank
  /// where a file has fewer; max_images is then unused. 0: the samples in file order.
  int by_condition = 0;
};
/// Draws the samples files side by side (first two coordinates, or images) to options.out.
void plot_sample_files(const PlotOptions& options);

}  // namespace tilt
