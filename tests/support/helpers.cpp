#include "helpers.h"

#include "tilt/eval/metrics.h"
#include "tilt/sde/gddim.h"
#include "tilt/sde/sde.h"
#include "tilt/sde/time_grid.h"

#include <torch/csrc/autograd/autograd.h>

#include <cmath>

namespace tilt::test {

std::shared_ptr<GaussianMixture> ring_mixture_2d() {
  const int64_t K = 7;
  std::vector<double> w, mu, cov;
  for (int64_t k = 0; k < 6; ++k) {
    const double angle = 2.0 * M_PI * static_cast<double>(k) / 6.0;
    w.push_back(1.0);
    mu.push_back(2.5 * std::cos(angle));
    mu.push_back(2.5 * std::sin(angle));
    cov.insert(cov.end(), {0.16, 0.0, 0.0, 0.16});
  }
  w.push_back(1.5);
  mu.insert(mu.end(), {0.0, 0.0});
  cov.insert(cov.end(), {0.3, 0.1, 0.1, 0.2});
  const auto opt = at::TensorOptions().dtype(at::kDouble);
  return std::make_shared<GaussianMixture>(at::tensor(w, opt), at::tensor(mu, opt).reshape({K, 2}),
                                           at::tensor(cov, opt).reshape({K, 2, 2}));
}

std::shared_ptr<GaussianMixture> random_mixture(int64_t d, int64_t components, uint64_t seed) {
  Generator gen = make_generator(seed);
  const auto opt = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor w = at::rand({components}, gen, opt) + 0.5;
  const at::Tensor mu = 2.0 * at::randn({components, d}, gen, opt);
  const at::Tensor L = 0.3 * at::randn({components, d, d}, gen, opt);
  const at::Tensor cov = at::matmul(L, L.transpose(1, 2)) + 0.2 * at::eye(d, opt);
  return std::make_shared<GaussianMixture>(w, mu, cov);
}

std::shared_ptr<GaussianMixture> isotropic_gaussian(const std::vector<double>& mu, double s) {
  const int64_t d = static_cast<int64_t>(mu.size());
  const auto opt = at::TensorOptions().dtype(at::kDouble);
  return std::make_shared<GaussianMixture>(at::ones({1}, opt), at::tensor(mu, opt).reshape({1, d}),
                                           (s * s * at::eye(d, opt)).unsqueeze(0));
}

at::Tensor fd_jacobian(const std::function<at::Tensor(const at::Tensor&)>& f, const at::Tensor& x, double eps) {
  const int64_t B = x.size(0), d = x.size(1);
  at::Tensor J = at::zeros({B, d, d}, x.options());
  for (int64_t j = 0; j < d; ++j) {
    at::Tensor e = at::zeros_like(x);
    e.select(1, j).fill_(eps);
    J.select(2, j).copy_((f(x + e) - f(x - e)) / (2 * eps));
  }
  return J;
}

at::Tensor autograd_jacobian(const std::function<at::Tensor(const at::Tensor&)>& f, const at::Tensor& x) {
  const int64_t B = x.size(0), d = x.size(1);
  at::Tensor J = at::zeros({B, d, d}, x.options());
  for (int64_t i = 0; i < d; ++i) {
    const at::Tensor xg = x.detach().requires_grad_(true);
    const at::Tensor y = f(xg);
    at::Tensor e = at::zeros_like(y);
    e.select(1, i).fill_(1.0);
    J.select(1, i).copy_(torch::autograd::grad({y}, {xg}, {e})[0]);
  }
  return J;
}

std::pair<at::Tensor, at::Tensor> chain_law(const GmmVelocity& field, double gamma, int64_t K, bool exact) {
  const auto kDouble = at::TensorOptions().dtype(at::kDouble);
  const int64_t d = field.dim();
  const auto noise = make_scaled_memoryless_noise(gamma, 1.0 / static_cast<double>(K));
  GenerativeSDE sde(std::make_shared<GmmVelocity>(field), noise);
  const TimeGrid grid = TimeGrid::uniform(K);
  at::Tensor m = at::zeros({1, d}, kDouble), V = at::eye(d, kDouble);
  const at::Tensor points = at::cat({at::zeros({1, d}, kDouble), at::eye(d, kDouble)});  // 0, e_1, ..., e_d
  for (int64_t k = 0; k < K; ++k) {
    const double t = grid[k], s = grid[k + 1];
    auto step_mean = [&](const at::Tensor& x) {
      if (exact) {
        const ExponentialStep e = exponential_step(*field.schedule(), t, s, gamma);
        return e.c_x * x + e.c_v * field.velocity(x, t);
      }
      return x + (s - t) * sde.drift(x, t);
    };
    const at::Tensor y = step_mean(at::cat({points, m}));  // one evaluation: 0, e_1, ..., e_d, m
    const at::Tensor J = (y.slice(0, 1, d + 1) - y.slice(0, 0, 1)).t();  // column j: image of e_j
    m = y.slice(0, d + 1);
    const double var = exact ? std::pow(exponential_step(*field.schedule(), t, s, gamma).std, 2)
                             : (s - t) * std::pow(sde.sigma(t), 2);
    V = at::matmul(at::matmul(J, V), J.t()) + var * at::eye(d, kDouble);
  }
  return {m.squeeze(0), V};
}

double fitted_order(const std::vector<double>& h, const std::vector<double>& err) {
  const size_t n = h.size();
  double sx = 0, sy = 0, sxx = 0, sxy = 0;
  for (size_t i = 0; i < n; ++i) {
    const double lx = std::log(h[i]), ly = std::log(err[i]);
    sx += lx;
    sy += ly;
    sxx += lx * lx;
    sxy += lx * ly;
  }
  return (n * sxy - sx * sy) / (n * sxx - sx * sx);
}

double energy_noise_floor(const GaussianMixture& p, int64_t n, int pairs, uint64_t seed) {
  Generator gen = make_generator(seed);
  double total = 0.0;
  for (int i = 0; i < pairs; ++i) total += energy_distance(p.sample(n, gen), p.sample(n, gen));
  return total / pairs;
}

UNetOptions tiny_unet(int64_t channels, int64_t height, int64_t width, int64_t condition_dim) {
  UNetOptions o;
  o.channels = channels;
  o.height = height;
  o.width = width;
  o.base_channels = 8;
  o.channel_mult = {1, 2};
  o.blocks = 1;
  o.groups = 4;
  o.attention = true;
  o.time_features = 8;
  o.condition_dim = condition_dim;
  return o;
}

}  // namespace tilt::test
