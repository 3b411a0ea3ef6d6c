// The sampling layer's objects from configuration tables: [energy], [brownian], [adjoint_sampling]
// and [mcmc]. Config reading belongs to the io layer, above sampling; docs/config.md documents each key.
#pragma once

#include "tilt/io/config.h"
#include "tilt/sampling/adjoint_sampling.h"
#include "tilt/sampling/brownian.h"
#include "tilt/sampling/energy.h"
#include "tilt/sampling/mcmc.h"

namespace tilt::sampling {

/// [energy]: type = "gaussian" (mean, std) | "gmm" / "ring" (a mixture, see read_mixture) |
/// "double_well" (dim, wells, a, b, c) | "dw4" (particles, spatial_dim, a, b, offset); temperature
/// (tau, default 1) in *tau.
EnergyPtr read_energy(ConfigSection section, double* tau);

/// [brownian]: noise = "geometric" | "linear" | "constant", sigma_max, sigma_min, sigma.
BrownianOptions read_brownian(ConfigSection section);

/// [adjoint_sampling] keys of AdjointSamplingOptions (tau comes from [energy]).
AdjointSamplingOptions read_adjoint_sampling(ConfigSection& section);

/// [mcmc]: chains, steps, burn_in, thin, step_size, temperatures, init_std.
MalaOptions read_mala(ConfigSection section);

}  // namespace tilt::sampling
