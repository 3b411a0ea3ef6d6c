#include "tilt/model/random_problem.h"

#include "tilt/core/error.h"
#include "tilt/core/tensor.h"

#include <ATen/ATen.h>

#include <vector>

namespace tilt {

namespace {

// Q diag(values) Q^T with Q a random rotation (the Q of a Gaussian matrix's QR).
Tensor rotated_diagonal(const Tensor& values, Generator& gen) {
  const int64_t d = values.size(0);
  const Tensor Q = std::get<0>(at::linalg_qr(at::randn({d, d}, gen, values.options())));
  return at::matmul(Q * values.unsqueeze(0), Q.t());
}

}  // namespace

RandomTiltProblem random_tilt_problem(int64_t d, uint64_t seed) {
  if (d < 1) throw Error("random tilt problem: needs d >= 1, got " + std::to_string(d));
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  Generator gen = make_generator(mix_seed(seed, 0x74696c74));  // "tilt"
  const int64_t K = 2 + at::randint(3, {1}, gen, at::TensorOptions().dtype(at::kLong)).item<int64_t>();
  const Tensor means = 1.5 * at::randn({K, d}, gen, f64);
  std::vector<Tensor> covs;
  for (int64_t k = 0; k < K; ++k) {
    const Tensor s = 0.25 + 0.75 * at::rand({d}, gen, f64);
    covs.push_back(rotated_diagonal(s * s, gen));
  }
  const Tensor weights = 0.5 + at::rand({K}, gen, f64);
  RandomTiltProblem p;
  p.base = std::make_shared<GaussianMixture>(weights / weights.sum(), means, at::stack(covs));
  if (seed % 2 == 0) {
    const Tensor center = 1.5 * at::randn({d}, gen, f64);
    p.reward = std::make_shared<QuadraticReward>(center, rotated_diagonal(0.15 + 0.45 * at::rand({d}, gen, f64), gen));
  } else {
    const Tensor a = at::randn({d}, gen, f64);
    const double length = 0.5 + at::rand({1}, gen, f64).item<double>();
    p.reward = std::make_shared<LinearReward>(a / a.norm() * length);
  }
  return p;
}

}  // namespace tilt
