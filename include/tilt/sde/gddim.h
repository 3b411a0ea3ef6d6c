// The exact Gaussian step of the marginal-preserving SDE family of tunable stochasticity gamma
// (gDDIM: Zhang, Tao, Chen, arXiv 2206.05564; flow form: Sheng et al., arXiv 2510.10767; docs/equations.md, E16-E17):
//
//   dX = [v + gamma^2 eta_t s_t(X)] dt + gamma sqrt(2 eta_t) dB,   s_t = (v - kappa_t x) / eta_t,
//
// i.e. sigma(t) = gamma sqrt(2 eta_t): gamma = 0 is the flow ODE (DDIM), gamma = 1 the memoryless SDE
// (DDPM; Adjoint Matching's schedule), and every gamma >= 0 has the marginals of the reference flow.
// (Sheng et al. call gamma "lambda"; tilt keeps lambda for the reward multiplier.)
//
// Freezing the network's data estimate x1^ over a step (the "Dirac approximation") makes the SDE
// linear, and its exact solution from t to s > t is the Gaussian
//
//   X_s = alpha_s x1^ + beta_s rho eps^ + beta_s sqrt(1 - rho^2) z,   rho = (SNR_t / SNR_s)^{gamma^2 / 2},
//
// with SNR = alpha^2 / beta^2, x1^ = (beta_t v - beta'_t x) / W_t, eps^ = (alpha'_t x - alpha_t v) / W_t
// and W_t = alpha'_t beta_t - alpha_t beta'_t (the two solve x = alpha x1^ + beta eps^,
// v = alpha' x1^ + beta' eps^). Derivation: with e = (X - alpha_t x1^) / beta_t and tau = log SNR_t the
// family reads de = -(gamma^2 / 2) e dtau + gamma dB_tau, an Ornstein-Uhlenbeck process with unit
// stationary variance, whose correlation over a step is exp(-(gamma^2/2) (tau_s - tau_t)) = rho.
// (Equivalently the step's variance: sig^2 = beta_s^2 [1 - (SNR_t/SNR_s)^{gamma^2}].)
//
// Unlike Euler-Maruyama the step is exact for point-mass data, stable for any gamma (gamma -> inf
// re-noises x1^ completely), and needs no offset h at t = 0: at alpha_t = 0 (and gamma > 0) rho = 0.
// It integrates the exact schedule sigma = gamma sqrt(2 eta_t), so a noise schedule's offset h is
// ignored. The last step to s = 1 (beta_s = 0) is deterministic: X_1 = x1^.
#pragma once

#include "tilt/model/velocity.h"
#include "tilt/schedule/noise_schedule.h"

namespace tilt {

/// One step t -> s as a Gaussian: mean = c_x x + c_v v(x, t), standard deviation std (per coordinate).
/// For gamma = 0 and the linear schedule this is Euler's step x + (s - t) v.
struct ExponentialStep {
  double c_x, c_v, std;
  /// rho = (SNR_t / SNR_s)^{gamma^2/2}: the weight the step keeps on the noise estimate eps^.
  double rho;
};

/// The coefficients of the exact gDDIM step from t to s (0 <= t < s <= 1) at stochasticity gamma >= 0.
/// Throws tilt::Error naming the offending argument.
ExponentialStep exponential_step(const Schedule& schedule, double t, double s, double gamma);

/// gamma for a noise schedule of the family sigma = gamma sqrt(2 eta): 1 for memoryless, the scale
/// for scaled_memoryless, 0 for zero (the ODE). Throws tilt::Error naming the schedule otherwise
/// (e.g. constant sigma is not of this family).
double stochasticity_of(const NoiseSchedule& noise);

/// Estimates of the data point and of the noise from a velocity: x = alpha x1^ + beta eps^ and
/// v = alpha' x1^ + beta' eps^ solved at time t.
Tensor data_estimate(const Schedule& schedule, const Tensor& x, const Tensor& v, double t);
Tensor noise_estimate(const Schedule& schedule, const Tensor& x, const Tensor& v, double t);

}  // namespace tilt
