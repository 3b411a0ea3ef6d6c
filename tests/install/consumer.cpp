// An outside program built against the installed tilt package (tests/install/install_test.sh): it
// includes nothing but <tilt/tilt.h>, builds the exact velocity of a Gaussian mixture, samples it
// with the exact integrator and checks the sample's mean and covariance against the mixture's.
#include <tilt/tilt.h>

#include <cmath>
#include <cstdio>
#include <memory>
#include <vector>

namespace {

constexpr int64_t kSamples = 4000, kSteps = 200;
constexpr double kTolerance = 4.0;  // standard errors

// |estimate - truth| within kTolerance standard errors of the mean of `terms` (one per sample).
bool check(const char* what, const std::vector<double>& terms, double truth) {
  double mean = 0, var = 0;
  for (double v : terms) mean += v;
  mean /= static_cast<double>(terms.size());
  for (double v : terms) var += (v - mean) * (v - mean);
  const double se = std::sqrt(var / static_cast<double>(terms.size() - 1) / static_cast<double>(terms.size()));
  const bool ok = std::abs(mean - truth) <= kTolerance * se;
  std::printf("%-12s %9.4f, exact %9.4f, standard error %.4f%s\n", what, mean, truth, se, ok ? "" : "  FAILED");
  return ok;
}

}  // namespace

int main() {
  try {
    tilt::Config config(tilt::Json::parse(R"({"data": {"type": "gmm", "weights": [0.3, 0.7],
        "means": [[-2.0, 0.5], [1.5, -1.0]], "std": [0.5, 0.8]}})"),
                        "consumer");
    const auto mixture = tilt::read_mixture(config.root().section("data"));
    const auto velocity = std::make_shared<tilt::GmmVelocity>(mixture, tilt::make_linear_schedule());
    const tilt::GenerativeSDE sde(velocity, tilt::make_memoryless_noise());
    tilt::Generator gen = tilt::make_generator(2024);
    tilt::SampleOptions options;
    options.integrator = tilt::Integrator::exact;
    const tilt::Tensor x =
        tilt::sample(sde, kSamples, tilt::TimeGrid::uniform(kSteps), gen, options, at::kDouble).contiguous();
    const tilt::Tensor mean = mixture->mean().contiguous(), cov = mixture->covariance().contiguous();
    const double* xs = x.data_ptr<double>();
    const double* mu = mean.data_ptr<double>();
    const double* sigma = cov.data_ptr<double>();

    bool ok = x.size(0) == kSamples && x.size(1) == 2;
    const char* names[2][2] = {{"cov[0][0]", "cov[0][1]"}, {"cov[1][0]", "cov[1][1]"}};
    for (int i = 0; i < 2; ++i) {
      std::vector<double> terms;
      for (int64_t n = 0; n < kSamples; ++n) terms.push_back(xs[2 * n + i]);
      ok = check(i == 0 ? "mean[0]" : "mean[1]", terms, mu[i]) && ok;
    }
    for (int i = 0; i < 2; ++i) {
      for (int j = i; j < 2; ++j) {
        std::vector<double> terms;  // centred at the exact mean: E[(x_i - mu_i)(x_j - mu_j)] = Sigma_ij
        for (int64_t n = 0; n < kSamples; ++n) terms.push_back((xs[2 * n + i] - mu[i]) * (xs[2 * n + j] - mu[j]));
        ok = check(names[i][j], terms, sigma[2 * i + j]) && ok;
      }
    }
    std::printf("%s\n", ok ? "consumer: the installed tilt samples the mixture" : "consumer: FAILED");
    return ok ? 0 : 1;
  } catch (const tilt::Error& e) {
    std::fprintf(stderr, "consumer: error: %s\n", e.what());
    return 1;
  }
}
