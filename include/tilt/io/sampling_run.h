// An Adjoint Sampling run as `tilt adjoint-sampling` does it, for the CLI and for C++ programs alike:
// the whole configuration in one struct, the sampler it trains, the evaluation of that sampler
// (eval.json's keys, eval.txt's text), the file that holds the trained control, and `tilt mcmc`'s report.
//
// The control is not a velocity field: its file (a model file of kind "adjoint_sampling_control",
// with the Brownian base, the energy and tau in its metadata) is refused by load_velocity, so that
// `tilt sample -m` / `tilt export` cannot mistake it for one; load_adjoint_sampling_control reads it.
// docs/adjoint_sampling.md.
#pragma once

#include "tilt/io/config.h"
#include "tilt/io/run.h"
#include "tilt/sampling/adjoint_sampling.h"
#include "tilt/sampling/brownian.h"
#include "tilt/sampling/energy.h"
#include "tilt/sampling/mcmc.h"
#include "tilt/soc/control.h"
#include "tilt/train/trainer.h"

#include <memory>
#include <string>
#include <vector>

namespace tilt::sampling {

/// [evaluation]: fresh samples of the trained sampler, and what they are compared with.
struct SamplerEvaluationOptions {
  int64_t samples = 4000;
  int64_t steps = 100;                 ///< default: [adjoint_sampling] steps
  SamplerGrid grid = SamplerGrid::nu;
  std::string reference;               ///< reference samples (CSV, e.g. from tilt mcmc); empty: none
  int64_t batch = 4096;                ///< paths simulated at once
};

/// Everything a run reads from its configuration.
struct AdjointSamplingRunOptions {
  RunSettings settings;                ///< seed, threads
  EnergyPtr energy;                    ///< [energy]
  double tau = 1.0;                    ///< [energy] temperature
  BrownianOptions brownian;            ///< [brownian]
  AdjointSamplingOptions method;       ///< [adjoint_sampling] (method.tau = tau)
  std::vector<int64_t> hidden{128, 128, 128};  ///< [adjoint_sampling] hidden: the control network's widths
  TrainerOptions trainer;              ///< [adjoint_sampling]'s trainer keys (iterations 2000, lr 1e-3, ...)
  SamplerEvaluationOptions evaluation; ///< [evaluation]
};

/// Reads [energy], [brownian], [adjoint_sampling] and [evaluation] and the top-level seed and threads
/// (setting the thread count), and finishes the root ([mcmc] is allowed: the same file makes the
/// reference). Errors name the key; docs/config.md lists the keys and their defaults.
AdjointSamplingRunOptions read_adjoint_sampling_run(ConfigSection& root);

/// Refuses reference samples that do not exist (naming `tilt mcmc -c <config>`), that are one of the files the run in
/// `out` writes, or that read_reference_samples refuses: checked before training.
void check_reference_input(const std::string& reference, const Energy& energy, const std::string& config_path,
                           const std::string& out);
/// Reference samples of `energy` from a CSV file (tilt mcmc's): finite, of the energy's dimension, at least 4 rows.
Tensor read_reference_samples(const Energy& energy, const std::string& reference);

/// What a run trains: the control u(x, t) of the Brownian base (drift g(t)^2 u).
struct AdjointSampler {
  BrownianBasePtr base;
  std::shared_ptr<soc::ControlNetwork> control;
};
/// The base of the options and a control network that starts at u = 0 (seeded from the run's seed).
AdjointSampler make_adjoint_sampler(const AdjointSamplingRunOptions& run);

struct AdjointSamplingTraining {
  int64_t gradient_steps = 0, energy_evaluations = 0, iterations = 0;
  double seconds = 0;  ///< this session's
};
/// Trains the sampler by Reciprocal Adjoint Matching in the run directory (checkpoint.pt,
/// metrics.jsonl), continuing from its checkpoint if resume.
AdjointSamplingTraining train_adjoint_sampler(const AdjointSamplingRunOptions& run, const AdjointSampler& sampler,
                                              const RunDirectory& dir, bool resume, bool quiet);

struct SamplerEvaluation {
  Json result;    ///< eval.json: samples, log Z, ESS, mode weights, vs_exact, vs_reference, the training's counts
  Tensor samples; ///< [samples, d] double
  Tensor exact;   ///< exact samples of the target where the energy has them (undefined otherwise)
};
/// Fresh samples of the sampler with their importance weights, compared with exact samples and/or
/// the reference samples (docs/adjoint_sampling.md, "Evaluation"). Progress bar unless quiet.
SamplerEvaluation evaluate_adjoint_sampler(const AdjointSamplingRunOptions& run, const AdjointSampler& sampler,
                                           const AdjointSamplingTraining& training, bool quiet);
/// eval.txt: the evaluation in a few lines of text.
std::string evaluation_text(const Json& result);

/// `tilt mcmc`'s diagnostics (<out>.json): the chains' settings, acceptance, step sizes, swap rates, seed,
/// seconds, the samples' mean energy and mode weights.
Json mcmc_report(const Energy& energy, double tau, const MalaOptions& mala, const MalaResult& result, uint64_t seed,
                 double seconds);

/// The model kind of an Adjoint Sampling control's file.
inline constexpr const char* kAdjointSamplingControlKind = "adjoint_sampling_control";

/// Writes the control, its Brownian base and the energy's name, dimension and tau (atomically);
/// `info` as save_velocity's `extra`.
void save_adjoint_sampling_control(const AdjointSampler& sampler, const Energy& energy, double tau,
                                   const std::string& path, const Json& info = Json::object());
struct LoadedAdjointSampler {
  AdjointSampler sampler;
  std::string energy;  ///< the energy's name
  double tau = 1.0;
  Json info;
};
/// Whether the model file at `path` holds an Adjoint Sampling control (throws tilt::Error naming a missing or corrupt
/// file).
bool is_adjoint_sampling_control(const std::string& path);
/// Reads what save_adjoint_sampling_control wrote; throws tilt::Error naming the file otherwise (a
/// velocity's model file included).
LoadedAdjointSampler load_adjoint_sampling_control(const std::string& path);

}  // namespace tilt::sampling
