// Metrics of generated images against a classifier: how often the target class comes out, how
// diverse the samples of that class are, and how close their classifier features are to real
// images of the class (a Frechet distance, as FID computes it in Inception features).
#pragma once

#include "tilt/core/tensor.h"
#include "tilt/model/classifier.h"

namespace tilt {

/// Frechet distance between N(mu1, S1) and N(mu2, S2):
///   |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^{1/2} S2 S1^{1/2})^{1/2})
/// (Dowson and Landau 1982; Heusel et al., "GANs trained by a two time-scale update rule", NeurIPS
/// 2017, the FID). Symmetric PSD square roots by eigendecomposition, in double precision.
double frechet_distance_gaussians(const Tensor& mu1, const Tensor& S1, const Tensor& mu2, const Tensor& S2);
/// The same between the Gaussians fitted (mean, unbiased covariance) to two sets of features [n, f].
double frechet_distance(const Tensor& features1, const Tensor& features2);

/// Mean Euclidean distance between two different rows of x [n, d]; 0 for n < 2. With `weights` w [n] (non-negative),
/// the weighted mean sum_{i != j} w_i w_j |x_i - x_j| / sum_{i != j} w_i w_j (0 when no pair has weight). Summed by
/// blocks of 1024 rows in float64: memory O(1024 n), not O(n^2).
double mean_pairwise_distance(const Tensor& x, const Tensor& weights = Tensor());

/// What a classifier alone says of samples for a class c.
struct ClassScores {
  int64_t n = 0;                ///< samples (with weights: the effective sample size)
  double mean_reward = 0;       ///< mean log p(c | x)
  double reward_se = 0;         ///< its standard error
  double class_share = 0;       ///< share of samples the classifier assigns to c (argmax)
  int64_t in_class = 0;         ///< how many that is
};

/// The scores of samples x [n, d] for class c (weights as in class_sample_metrics): what an unseen classifier,
/// which has no real images' statistics, reports. Equal to class_sample_metrics's fields of the same name.
ClassScores class_scores(const Tensor& x, const MlpClassifier& classifier, int64_t target_class,
                         const Tensor& weights = Tensor());

struct ClassSampleMetrics : ClassScores {
  double diversity = 0;         ///< mean pairwise (pixel) distance among the samples assigned to c
  double feature_diversity = 0; ///< the same in the classifier's features (the DreamSim-diversity analogue)
  double frechet = 0;           ///< Frechet distance in classifier features, all samples vs real images of c
};

/// The Gaussian fitted to the classifier features of the real images of one class (mean, unbiased
/// covariance): computed once per class and classifier, then shared by every samples file scored against it.
struct RealClassStats {
  Tensor mean;        ///< [f], float64
  Tensor covariance;  ///< [f, f], float64
  int64_t n = 0;      ///< real images
};
/// The features of `real_of_class` [n, d], n >= 2, computed 1024 rows at a time.
RealClassStats real_class_stats(const MlpClassifier& classifier, const Tensor& real_of_class);

/// Metrics of samples x [n, d] for the target class c against `real` (real_class_stats of the images of c; throws
/// tilt::Error without them).
/// With `weights` ([n], non-negative, not all zero) every statistic is the weighted one (weighted
/// means, weighted pairs, weighted feature mean and covariance), and n is the effective sample size
/// (sum w)^2 / sum w^2 rounded down. The classifier sees 1024 rows at a time, and the pairwise distances are
/// summed by blocks of rows, so that memory stays bounded for tens of thousands of images.
ClassSampleMetrics class_sample_metrics(const Tensor& x, const MlpClassifier& classifier, int64_t target_class,
                                        const RealClassStats& real, const Tensor& weights = Tensor());

/// The metrics of the tilted target p* ∝ p_base exp(lambda r), r = log p(c | x) (or, with the indicator form, 1 if c
/// is the classifier's argmax), estimated from samples of the base model by self-normalised importance weights
/// w_i ∝ exp(lambda r(x_i)): a ground truth for what fine-tuning should reach (consistent as the number of base
/// samples grows; its reliability is the effective sample size, ClassSampleMetrics::n).
ClassSampleMetrics tilted_target_metrics(const Tensor& base_samples, const MlpClassifier& classifier,
                                         int64_t target_class, double lambda, const RealClassStats& real,
                                         ClassifierForm form = ClassifierForm::log_prob);

}  // namespace tilt
