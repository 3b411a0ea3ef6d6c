#include "tilt/eval/image_metrics.h"

#include "tilt/core/error.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace tilt {
namespace {

// V diag(sqrt(max(lambda, 0))) V^T of a symmetric matrix.
Tensor psd_sqrt(const Tensor& S) {
  const auto [lambda, V] = at::linalg_eigh(0.5 * (S + S.t()));
  return V.matmul(at::diag(at::sqrt(at::clamp_min(lambda, 0.0)))).matmul(V.t());
}

Tensor covariance(const Tensor& f) {
  const Tensor c = f - f.mean(0, true);
  return c.t().matmul(c) / static_cast<double>(f.size(0) - 1);
}

constexpr int64_t kChunk = 1024;

struct Classified {
  Tensor log_probs;  // [n, classes]
  Tensor features;   // [n, hidden.back()]
};

// The classifier's log p(. | x) and last hidden layer for x [n, d], kChunk rows at a time: the activations of a CNN
// over the 6000 real images of a Fashion-MNIST class would otherwise take about 600 MB at once.
Classified classify(const MlpClassifier& classifier, const Tensor& x) {
  std::vector<Tensor> lp, f;
  for (int64_t i = 0; i < x.size(0); i += kChunk) {
    const Tensor xi = x.narrow(0, i, std::min(kChunk, x.size(0) - i));
    f.push_back(classifier.features(xi));
    lp.push_back(classifier.log_probs_of_features(f.back()));
  }
  if (lp.empty()) throw Error("image metrics: no samples");
  return {at::cat(lp), at::cat(f)};
}

}  // namespace

double frechet_distance_gaussians(const Tensor& mu1, const Tensor& S1, const Tensor& mu2, const Tensor& S2) {
  const auto d = mu1.numel();
  if (mu2.numel() != d || S1.dim() != 2 || S2.dim() != 2 || S1.size(0) != d || S1.size(1) != d || S2.size(0) != d ||
      S2.size(1) != d) {
    throw Error("frechet distance: means and covariances of different sizes");
  }
  const Tensor m1 = mu1.to(at::kDouble).reshape({-1}), m2 = mu2.to(at::kDouble).reshape({-1});
  const Tensor A = S1.to(at::kDouble), B = S2.to(at::kDouble);
  const Tensor rA = psd_sqrt(A);
  // tr((A^{1/2} B A^{1/2})^{1/2}) = sum of the square roots of its (non-negative) eigenvalues.
  const Tensor M = rA.matmul(B).matmul(rA);
  const Tensor ev = at::linalg_eigvalsh(0.5 * (M + M.t()));
  const double cross = at::sqrt(at::clamp_min(ev, 0.0)).sum().item<double>();
  const double mean_term = (m1 - m2).pow(2).sum().item<double>();
  // A distance: rounding in the eigenvalues takes two equal sets a hair below 0 (printed -0.000), so it stops at 0.
  return std::max(0.0, mean_term + A.trace().item<double>() + B.trace().item<double>() - 2.0 * cross);
}

double frechet_distance(const Tensor& f1, const Tensor& f2) {
  if (f1.dim() != 2 || f2.dim() != 2 || f1.size(1) != f2.size(1)) {
    throw Error("frechet distance: feature sets must be [n, f] with the same f");
  }
  if (f1.size(0) < 2 || f2.size(0) < 2) throw Error("frechet distance: needs at least 2 samples in each set");
  const Tensor a = f1.to(at::kDouble), b = f2.to(at::kDouble);
  return frechet_distance_gaussians(a.mean(0), covariance(a), b.mean(0), covariance(b));
}

double mean_pairwise_distance(const Tensor& x, const Tensor& weights) {
  const int64_t n = x.size(0);
  if (n < 2) return 0.0;
  const Tensor xd = x.to(at::kDouble).reshape({n, -1});
  const Tensor w = weights.defined() ? weights.to(at::kDouble).reshape({-1}) : at::ones({n}, at::kDouble);
  if (w.size(0) != n) throw Error("mean pairwise distance: " + std::to_string(w.size(0)) + " weights for " + std::to_string(n) + " rows");
  double total = 0.0;  // sum_{i, j} w_i w_j d_ij; the diagonal has d = 0
  for (int64_t i = 0; i < n; i += kChunk) {
    const int64_t m = std::min(kChunk, n - i);
    total += (w.narrow(0, i, m).unsqueeze(1) * at::cdist(xd.narrow(0, i, m), xd)).matmul(w).sum().item<double>();
  }
  const double pair_weight = w.sum().item<double>() * w.sum().item<double>() - w.pow(2).sum().item<double>();
  return pair_weight > 0 ? total / pair_weight : 0.0;
}

RealClassStats real_class_stats(const MlpClassifier& classifier, const Tensor& real_of_class) {
  at::NoGradGuard no_grad;
  if (real_of_class.size(0) < 2) throw Error("image metrics: needs at least 2 real images of the class");
  const Tensor f = classify(classifier, real_of_class.to(at::kFloat)).features.to(at::kDouble);
  RealClassStats s;
  s.mean = f.mean(0);
  s.covariance = covariance(f);
  s.n = f.size(0);
  return s;
}

namespace {

// The checks shared by class_scores and class_sample_metrics; the weights normalised to sum 1 (uniform when undefined).
Tensor checked_weights(const Tensor& x, const MlpClassifier& classifier, int64_t target_class, const Tensor& weights) {
  if (x.dim() != 2 || x.size(1) != classifier.options().dim) {
    throw Error("image metrics: samples must be [n, " + std::to_string(classifier.options().dim) + "]");
  }
  if (target_class < 0 || target_class >= classifier.options().classes) {
    throw Error("image metrics: class " + std::to_string(target_class) + " does not exist");
  }
  const int64_t n = x.size(0);
  const Tensor w = weights.defined() ? weights.to(at::kDouble).reshape({-1}) : at::ones({n}, at::kDouble);
  if (w.size(0) != n) throw Error("image metrics: " + std::to_string(w.size(0)) + " weights for " + std::to_string(n) + " samples");
  if (!(w.min().item<double>() >= 0.0) || !(w.sum().item<double>() > 0.0)) {
    throw Error("image metrics: weights must be non-negative and not all zero");
  }
  return w / w.sum();
}

// The scores from the classifier's log p(. | x) [n, classes] and the normalised weights w.
ClassScores scores_of(const Tensor& log_probs, int64_t target_class, const Tensor& w, bool weighted) {
  ClassScores m;
  m.n = weighted ? static_cast<int64_t>(1.0 / w.pow(2).sum().item<double>() + 1e-9) : w.size(0);
  const Tensor r = log_probs.select(1, target_class).to(at::kDouble);
  m.mean_reward = (w * r).sum().item<double>();
  const double var = (w * (r - m.mean_reward).pow(2)).sum().item<double>();
  m.reward_se = m.n > 1 ? std::sqrt(var / static_cast<double>(m.n)) : 0.0;
  const Tensor in_class = log_probs.argmax(1) == target_class;
  m.in_class = in_class.sum().item<int64_t>();
  m.class_share = (w * in_class.to(at::kDouble)).sum().item<double>();
  return m;
}

}  // namespace

ClassScores class_scores(const Tensor& x, const MlpClassifier& classifier, int64_t target_class, const Tensor& weights) {
  at::NoGradGuard no_grad;
  const Tensor w = checked_weights(x, classifier, target_class, weights);
  return scores_of(classify(classifier, x.to(at::kFloat)).log_probs, target_class, w, weights.defined());
}

namespace {

// class_sample_metrics of xf (float) once the classifier has seen it (out).
ClassSampleMetrics metrics_of(const Tensor& xf, const Classified& out, const MlpClassifier& classifier,
                              int64_t target_class, const RealClassStats& real, const Tensor& weights) {
  if (!real.mean.defined() || !real.covariance.defined()) {
    throw Error("image metrics: no statistics of real images (real_class_stats) to measure the Frechet distance "
                "against; class_scores scores without them");
  }
  const Tensor w = checked_weights(xf, classifier, target_class, weights);
  ClassSampleMetrics m;
  static_cast<ClassScores&>(m) = scores_of(out.log_probs, target_class, w, weights.defined());
  const Tensor in_class = out.log_probs.argmax(1) == target_class;
  // Diversity: the (weighted) mean distance over pairs i != j of samples assigned to c, in pixels and in features.
  const Tensor f = out.features.to(at::kDouble);
  const Tensor idx = at::nonzero(in_class).squeeze(1);
  if (idx.size(0) >= 2) {
    const Tensor wc = w.index_select(0, idx);
    m.diversity = mean_pairwise_distance(xf.index_select(0, idx), wc);
    m.feature_diversity = mean_pairwise_distance(f.index_select(0, idx), wc);
  }
  // Frechet distance with the weighted feature mean and covariance (unbiased for equal weights).
  const Tensor mu = (w.unsqueeze(1) * f).sum(0);
  const Tensor c = f - mu;
  const Tensor S = (w.unsqueeze(1) * c).t().matmul(c) / (1.0 - w.pow(2).sum());
  m.frechet = frechet_distance_gaussians(mu, S, real.mean, real.covariance);
  return m;
}

}  // namespace

ClassSampleMetrics class_sample_metrics(const Tensor& x, const MlpClassifier& classifier, int64_t target_class,
                                        const RealClassStats& real, const Tensor& weights) {
  at::NoGradGuard no_grad;
  checked_weights(x, classifier, target_class, weights);  // the shape checks before the classifier runs
  const Tensor xf = x.to(at::kFloat);
  return metrics_of(xf, classify(classifier, xf), classifier, target_class, real, weights);
}

ClassSampleMetrics tilted_target_metrics(const Tensor& base_samples, const MlpClassifier& classifier,
                                         int64_t target_class, double lambda, const RealClassStats& real,
                                         ClassifierForm form) {
  at::NoGradGuard no_grad;
  checked_weights(base_samples, classifier, target_class, Tensor());
  // One pass of the classifier gives the weights and the metrics.
  const Tensor xf = base_samples.to(at::kFloat);
  const Classified out = classify(classifier, xf);
  const Tensor log_w = lambda * classifier_reward_values(out.log_probs, target_class, form).to(at::kDouble);
  return metrics_of(xf, out, classifier, target_class, real, at::softmax(log_w, 0));
}

}  // namespace tilt
