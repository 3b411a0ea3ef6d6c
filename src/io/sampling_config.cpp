#include "tilt/io/sampling_config.h"

#include "tilt/core/error.h"
#include "tilt/io/builders.h"
#include "tilt/model/gmm.h"

#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace tilt::sampling {

EnergyPtr read_energy(ConfigSection s, double* tau) {
  const std::string type = s.choice("type", {"gaussian", "gmm", "ring", "double_well", "dw4"});
  const double temperature = s.number("temperature", 1.0);
  if (!(temperature > 0)) s.fail("temperature", "must be > 0");
  if (tau) *tau = temperature;
  EnergyPtr e;
  try {
    if (type == "gaussian") {
      const std::vector<double> mean = s.numbers("mean");
      if (mean.empty()) s.fail("mean", "must have at least one coordinate");
      const double std = s.number("std", 1.0);
      if (!(std > 0)) s.fail("std", "must be > 0");
      s.finish();
      e = std::make_shared<GaussianEnergy>(mean, std);
    } else if (type == "gmm" || type == "ring") {
      if (temperature != 1.0) s.fail("temperature", "must be 1 for a mixture (its E = -log p is normalised at tau = 1)");
      e = std::make_shared<MixtureEnergy>(read_mixture(s));  // reads and finishes the mixture keys
    } else if (type == "double_well") {
      DoubleWellOptions o;
      o.dim = s.integer("dim", o.dim);
      o.wells = s.integer("wells", o.wells);
      o.a = s.number("a", o.a);
      o.b = s.number("b", o.b);
      o.c = s.number("c", o.c);
      if (o.dim < 1) s.fail("dim", "must be >= 1");
      if (o.wells < 1 || o.wells > o.dim) s.fail("wells", "must be in [1, dim]");
      if (!(o.a > 0)) s.fail("a", "must be > 0");
      s.finish();
      e = std::make_shared<DoubleWellEnergy>(o);
    } else {
      MultiDoubleWellOptions o;
      o.particles = s.integer("particles", o.particles);
      o.spatial_dim = s.integer("spatial_dim", o.spatial_dim);
      o.a = s.number("a", o.a);
      o.b = s.number("b", o.b);
      o.offset = s.number("offset", o.offset);
      if (o.particles < 2) s.fail("particles", "must be >= 2");
      // a (d - offset)^4 bounds the energy below only for a > 0: else exp(-E) has no finite integral.
      if (!(o.a > 0)) s.fail("a", "must be > 0 (with a <= 0 the energy has no lower bound)");
      if (o.spatial_dim < 1) s.fail("spatial_dim", "must be >= 1");
      s.finish();
      e = std::make_shared<MultiDoubleWellEnergy>(o);
    }
  } catch (const Error& err) {
    const std::string msg = err.what();
    if (msg.rfind("in ", 0) == 0) throw;
    throw Error("in " + s.origin() + ", [energy]: " + msg);
  }
  return e;
}

BrownianOptions read_brownian(ConfigSection s) {
  BrownianOptions o;
  o.noise = parse_brownian_noise(s.choice("noise", {"geometric", "linear", "constant"}, "geometric"));
  if (o.noise == BrownianNoise::constant) {
    o.sigma = s.number("sigma", o.sigma);
    if (!(o.sigma > 0)) s.fail("sigma", "must be > 0");
  } else {
    o.sigma_max = s.number("sigma_max", o.sigma_max);
    o.sigma_min = s.number("sigma_min", o.sigma_min);
    if (!(o.sigma_max > 0)) s.fail("sigma_max", "must be > 0");
    if (o.noise == BrownianNoise::geometric && !(o.sigma_min > 0 && o.sigma_min < o.sigma_max)) {
      s.fail("sigma_min", "must be in (0, sigma_max) for the geometric schedule");
    }
    if (!(o.sigma_min >= 0)) s.fail("sigma_min", "must be >= 0");
  }
  s.finish();
  return o;
}

AdjointSamplingOptions read_adjoint_sampling(ConfigSection& s) {
  AdjointSamplingOptions o;
  o.batch_size = s.integer("batch_size", o.batch_size);
  o.steps = s.integer("steps", o.steps);
  o.initial_samples = s.integer("initial_samples", o.initial_samples);
  o.samples_per_refresh = s.integer("samples_per_refresh", o.samples_per_refresh);
  o.refresh_every = s.integer("refresh_every", o.refresh_every);
  o.buffer_size = s.integer("buffer_size", o.buffer_size);
  o.max_adjoint_norm = s.number("max_adjoint_norm", o.max_adjoint_norm);
  o.grid = parse_sampler_grid(s.choice("grid", {"nu", "uniform"}, "nu"));
  o.time_sampling = parse_sampler_grid(s.choice("time_sampling", {"uniform", "nu"}, "uniform"));
  // The values read above, defaults included (reading a key again without its default made every
  // documented default a required key). The bounds are docs/config.md's Limits.
  const std::pair<const char*, std::pair<int64_t, int64_t>> sizes[] = {
      {"batch_size", {o.batch_size, limits::kBatch}},
      {"steps", {o.steps, limits::kSteps}},
      {"initial_samples", {o.initial_samples, limits::kSamples}},
      {"samples_per_refresh", {o.samples_per_refresh, limits::kSamples}},
      {"refresh_every", {o.refresh_every, std::numeric_limits<int64_t>::max()}},
      {"buffer_size", {o.buffer_size, limits::kSamples}}};
  for (const auto& [key, value_max] : sizes) {
    const auto [value, max] = value_max;
    if (value < 1) s.fail(key, "must be >= 1");
    if (value > max) s.fail(key, "must be in 1.." + std::to_string(max) + ", got " + std::to_string(value));
  }
  if (!(o.max_adjoint_norm >= 0)) s.fail("max_adjoint_norm", "must be >= 0 (0: no clipping)");
  return o;
}

MalaOptions read_mala(ConfigSection s) {
  MalaOptions o;
  o.chains = s.integer("chains", o.chains);
  o.steps = s.integer("steps", o.steps);
  o.burn_in = s.integer("burn_in", o.burn_in);
  o.thin = s.integer("thin", o.thin);
  o.step_size = s.number("step_size", o.step_size);
  o.temperatures = s.numbers("temperatures", std::vector<double>{1.0});
  o.init_std = s.number("init_std", o.init_std);
  if (o.chains < 1 || o.chains > limits::kBatch) {
    s.fail("chains", "must be in 1.." + std::to_string(limits::kBatch) + ", got " + std::to_string(o.chains));
  }
  if (o.steps < 1) s.fail("steps", "must be >= 1");
  if (o.burn_in < 0) s.fail("burn_in", "must be >= 0");
  if (o.thin < 1) s.fail("thin", "must be >= 1");
  if (o.thin > o.steps) {
    s.fail("thin", "must be at most steps = " + std::to_string(o.steps) + " (each chain keeps every thin-th of its steps: " +
                       std::to_string(o.thin) + " keeps none)");
  }
  // The samples kept, chains x (steps / thin), are held in memory (docs/config.md, Limits).
  if (o.steps / o.thin > limits::kSamples / o.chains) {
    s.fail("steps", "with chains = " + std::to_string(o.chains) + " and thin = " + std::to_string(o.thin) +
                        ": chains x (steps / thin) samples kept would exceed the limit of " + std::to_string(limits::kSamples));
  }
  if (!(o.step_size > 0)) s.fail("step_size", "must be > 0");
  if (!(o.init_std > 0)) s.fail("init_std", "must be > 0");
  if (o.temperatures.empty() || o.temperatures[0] != 1.0) s.fail("temperatures", "must start with 1 (the target)");
  for (size_t i = 1; i < o.temperatures.size(); ++i) {
    if (!(o.temperatures[i] > o.temperatures[i - 1])) s.fail("temperatures", "must increase");
  }
  s.finish();
  return o;
}

}  // namespace tilt::sampling
