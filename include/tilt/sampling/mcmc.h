// Reference samples of pi ∝ exp(-E / tau) by MALA (Metropolis-adjusted Langevin; Roberts and Tweedie
// 1996) with optional parallel tempering (swaps between neighbouring temperatures; Geyer 1991), many
// chains at once. The references against which Adjoint Sampling is measured where no exact samples
// exist (DW-4; docs/equations.md, E65-E67).
//
// At temperature T the proposal is y = x - h grad E(x) / T + sqrt(2 h) xi, accepted with probability
//   min(1, exp(-(E(y) - E(x)) / T) q(x | y) / q(y | x)),   q(y | x) = N(y; x - h grad E(x) / T, 2 h I).
// During burn-in each temperature's step h adapts towards acceptance 0.574 (Robbins-Monro on log h);
// afterwards h is fixed, so the chain is a time-homogeneous Markov chain that keeps pi. A swap of the
// states of temperatures T_i < T_j is accepted with probability min(1, exp((E_i - E_j)(1/T_i - 1/T_j))).
// For particle systems the noise is projected and the states re-centred: MALA on the centre-of-mass-
// free subspace (the energy does not depend on the centre of mass).
#pragma once

#include "tilt/sampling/energy.h"

#include <functional>
#include <vector>

namespace tilt::sampling {

struct MalaOptions {
  int64_t chains = 64;              ///< independent chains (per temperature)
  int64_t steps = 20000;            ///< after burn-in
  int64_t burn_in = 2000;
  int64_t thin = 10;                ///< keep every thin-th state of each chain at temperature tau
  double step_size = 1e-2;          ///< initial h
  std::vector<double> temperatures; ///< ladder as multiples of tau, first 1 (empty: {1}, plain MALA)
  double init_std = 1.0;            ///< chains start at N(0, init_std^2 I) (re-centred)
};

struct MalaResult {
  Tensor samples;                   ///< [chains * (steps / thin), d] double, at temperature tau
  std::vector<double> acceptance;   ///< after burn-in, per temperature
  std::vector<double> step_sizes;   ///< adapted h per temperature
  std::vector<double> swap_rates;   ///< accepted swaps between temperature i and i + 1
};

/// Runs the chains; progress(done, total) every so often. Throws tilt::Error on bad options.
MalaResult run_mala(const Energy& energy, double tau, const MalaOptions& options, Generator& gen,
                    const std::function<void(int64_t, int64_t)>& progress = {});

}  // namespace tilt::sampling
