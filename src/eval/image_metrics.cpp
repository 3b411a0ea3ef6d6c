#include "tilt/eval/image_metrics.h"

#include "tilt/core/error.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <cmath>

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
  return mean_term + A.trace().item<double>() + B.trace().item<double>() - 2.0 * cross;
}

double frechet_distance(const Tensor& f1, const Tensor& f2) {
  if (f1.dim() != 2 || f2.dim() != 2 || f1.size(1) != f2.size(1)) {
    throw Error("frechet distance: feature sets must be [n, f] with the same f");
  }
  if (f1.size(0) < 2 || f2.size(0) < 2) throw Error("frechet distance: needs at least 2 samples in each set");
  const Tensor a = f1.to(at::kDouble), b = f2.to(at::kDouble);
  return frechet_distance_gaussians(a.mean(0), covariance(a), b.mean(0), covariance(b));
}

double mean_pairwise_distance(const Tensor& x) {
  const int64_t n = x.size(0);
  if (n < 2) return 0.0;
  const Tensor xd = x.to(at::kDouble);
  const double total = at::cdist(xd, xd).sum().item<double>();  // the diagonal is 0
  return total / static_cast<double>(n * (n - 1));
}

ClassSampleMetrics class_sample_metrics(const Tensor& x, const MlpClassifier& classifier, int64_t target_class,
                                        const Tensor& real_of_class, const Tensor& weights) {
  at::NoGradGuard no_grad;
  if (x.dim() != 2 || x.size(1) != classifier.options().dim) {
    throw Error("image metrics: samples must be [n, " + std::to_string(classifier.options().dim) + "]");
  }
  if (target_class < 0 || target_class >= classifier.options().classes) {
    throw Error("image metrics: class " + std::to_string(target_class) + " does not exist");
  }
  const int64_t n = x.size(0);
  Tensor w = weights.defined() ? weights.to(at::kDouble).reshape({-1}) : at::ones({n}, at::kDouble);
  if (w.size(0) != n) throw Error("image metrics: " + std::to_string(w.size(0)) + " weights for " + std::to_string(n) + " samples");
  if (!(w.min().item<double>() >= 0.0) || !(w.sum().item<double>() > 0.0)) {
    throw Error("image metrics: weights must be non-negative and not all zero");
  }
  w = w / w.sum();
  ClassSampleMetrics m;
  m.n = weights.defined() ? static_cast<int64_t>(1.0 / w.pow(2).sum().item<double>() + 1e-9) : n;
  const Tensor xf = x.to(at::kFloat);
  const Tensor log_p = classifier.log_probs(xf);
  const Tensor r = log_p.select(1, target_class).to(at::kDouble);
  m.mean_reward = (w * r).sum().item<double>();
  const double var = (w * (r - m.mean_reward).pow(2)).sum().item<double>();
  m.reward_se = m.n > 1 ? std::sqrt(var / static_cast<double>(m.n)) : 0.0;
  const Tensor in_class = log_p.argmax(1) == target_class;
  m.in_class = in_class.sum().item<int64_t>();
  m.class_share = (w * in_class.to(at::kDouble)).sum().item<double>();
  // Diversity: the (weighted) mean distance over pairs i != j of samples assigned to c.
  const Tensor idx = at::nonzero(in_class).squeeze(1);
  if (idx.size(0) >= 2) {
    const Tensor xc = xf.index_select(0, idx).to(at::kDouble), wc = w.index_select(0, idx);
    const Tensor ww = wc.unsqueeze(1) * wc.unsqueeze(0);
    const double pair_weight = ww.sum().item<double>() - wc.pow(2).sum().item<double>();  // the diagonal has d = 0
    if (pair_weight > 0) m.diversity = (ww * at::cdist(xc, xc)).sum().item<double>() / pair_weight;
  }
  // Frechet distance with the weighted feature mean and covariance (unbiased for equal weights).
  const Tensor f = classifier.features(xf).to(at::kDouble), fr = classifier.features(real_of_class.to(at::kFloat)).to(at::kDouble);
  if (fr.size(0) < 2) throw Error("image metrics: needs at least 2 real images of the class");
  const Tensor mu = (w.unsqueeze(1) * f).sum(0);
  const Tensor c = f - mu;
  const Tensor S = (w.unsqueeze(1) * c).t().matmul(c) / (1.0 - w.pow(2).sum());
  const Tensor cr = fr - fr.mean(0, true);
  m.frechet = frechet_distance_gaussians(mu, S, fr.mean(0), cr.t().matmul(cr) / static_cast<double>(fr.size(0) - 1));
  return m;
}

ClassSampleMetrics tilted_target_metrics(const Tensor& base_samples, const MlpClassifier& classifier,
                                         int64_t target_class, double lambda, const Tensor& real_of_class,
                                         ClassifierForm form) {
  at::NoGradGuard no_grad;
  const Tensor r = classifier_reward_values(classifier.log_probs(base_samples.to(at::kFloat)), target_class, form);
  const Tensor log_w = lambda * r.to(at::kDouble);
  return class_sample_metrics(base_samples, classifier, target_class, real_of_class, at::softmax(log_w, 0));
}

}  // namespace tilt
