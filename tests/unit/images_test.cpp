// Real images: the digits data, the classifier and its reward, the image metrics, and the reward
// fine-tuning baselines (DRaFT-K, ReFL, discrete adjoint), each against ground truth.
#include "tilt/core/error.h"
#include "tilt/core/fs.h"
#include "tilt/eval/image_metrics.h"
#include "tilt/io/classifier_io.h"
#include "tilt/io/datasets.h"
#include "tilt/io/plot.h"
#include "tilt/model/classifier.h"
#include "tilt/model/finetuned.h"
#include "tilt/model/gmm.h"
#include "tilt/model/mlp.h"
#include "tilt/train/classification.h"
#include "tilt/train/reward_baselines.h"

#include "../support/helpers.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>

namespace tilt {
namespace {

const auto kDouble = at::TensorOptions().dtype(at::kDouble);
const std::string kDigits = std::string(TILT_SOURCE_DIR) + "/data/digits/digits.csv.gz";

std::string temp_path(const std::string& name) { return ::testing::TempDir() + "/tilt_images_" + name; }

TEST(Digits, LoadsAllImagesWithLabelsAndScaledPixels) {
  const ImageDataset d = load_digits(kDigits);
  EXPECT_EQ(d.size(), 1797);
  EXPECT_EQ(d.dim(), 64);
  EXPECT_EQ(d.classes, 10);
  EXPECT_GE(d.images.min().item<float>(), -1.0f);
  EXPECT_LE(d.images.max().item<float>(), 1.0f);
  EXPECT_EQ(d.images.max().item<float>(), 1.0f);  // some pixel is fully inked (16)
  // Every class holds about 180 images (174..183 in this file).
  const Tensor counts = at::bincount(d.labels, {}, 10);
  EXPECT_GE(counts.min().item<int64_t>(), 174);
  EXPECT_LE(counts.max().item<int64_t>(), 183);
  // The first image of the file is a 0 whose top-left pixel is blank and third pixel is 5 / 8 - 1.
  EXPECT_EQ(d.labels[0].item<int64_t>(), 0);
  EXPECT_FLOAT_EQ(d.images[0][2].item<float>(), 5.0f / 8.0f - 1.0f);
}

TEST(Digits, BadFilesAreErrorsThatNameTheLine) {
  EXPECT_THROW(load_digits(temp_path("missing.csv")), Error);
  const std::string path = temp_path("bad.csv");
  std::string line;
  for (int i = 0; i < 64; ++i) line += "3,";
  {
    std::ofstream(path) << line << "7\n" << line << "12\n";  // label 12 on line 2
  }
  try {
    load_digits(path);
    FAIL() << "a label out of range was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("line 2"), std::string::npos) << e.what();
  }
  {
    std::ofstream(path) << "1,2,3\n";
  }
  EXPECT_THROW(load_digits(path), Error);
}

TEST(Digits, SplitHoldsOutEveryClassDisjointlyAndReproducibly) {
  const ImageDataset d = load_digits(kDigits);
  const DatasetSplit a = split_dataset(d, 0.2, 7), b = split_dataset(d, 0.2, 7), c = split_dataset(d, 0.2, 8);
  EXPECT_EQ(a.train.size() + a.test.size(), d.size());
  EXPECT_TRUE(at::equal(a.test.images, b.test.images));
  EXPECT_FALSE(at::equal(a.test.images, c.test.images));
  for (int64_t k = 0; k < 10; ++k) {
    const double n = static_cast<double>(select_class(d, k).size());
    EXPECT_NEAR(static_cast<double>(select_class(a.test, k).size()), 0.2 * n, 1.0);
  }
  // No held-out image is a training image (as rows; the file has no exact duplicates across the split).
  const Tensor dist = at::cdist(a.test.images, a.train.images);
  EXPECT_GT(dist.min().item<float>(), 0.0f);
}

// Tiny classes: one image of a class is kept for training (the classifier must see it), two split one and one, and a
// share that rounds to the whole class still keeps one.
TEST(Digits, SplitKeepsATrainingImageOfEveryClass) {
  const ImageDataset d = load_digits(kDigits);
  std::vector<Tensor> rows;
  const int64_t per_class[] = {1, 2, 3, 10};
  for (int64_t k = 0; k < 4; ++k) rows.push_back(at::nonzero(d.labels == k).squeeze(1).slice(0, 0, per_class[k]));
  ImageDataset tiny = d;
  const Tensor idx = at::cat(rows);
  tiny.images = d.images.index_select(0, idx);
  tiny.labels = d.labels.index_select(0, idx);
  for (const double share : {0.1, 0.9}) {
    const DatasetSplit s = split_dataset(tiny, share, 3);
    for (int64_t k = 0; k < 4; ++k) {
      const int64_t n = per_class[k], test = select_class(s.test, k).size();
      EXPECT_EQ(select_class(s.train, k).size() + test, n);
      EXPECT_GE(select_class(s.train, k).size(), 1) << "class " << k << ", share " << share;
      EXPECT_EQ(test, n == 1 ? 0 : std::min<int64_t>(n - 1, std::max<int64_t>(1, std::llround(share * n))));
    }
  }
}

TEST(Classifier, RewardGradientMatchesFiniteDifferences) {
  ClassifierOptions o;
  o.dim = 5;
  o.hidden = {12, 7};
  o.classes = 3;
  auto classifier = std::make_shared<MlpClassifier>(o, 3);
  const ClassifierReward reward(classifier, 2);
  Generator gen = make_generator(1);
  const Tensor x = at::randn({4, 5}, gen);
  const Tensor g = reward.grad(x);
  const double eps = 1e-2;
  for (int64_t j = 0; j < 5; ++j) {
    Tensor e = at::zeros({4, 5});
    e.select(1, j).fill_(eps);
    const Tensor fd = (reward.value(x + e) - reward.value(x - e)) / (2 * eps);
    EXPECT_LT((fd - g.select(1, j)).abs().max().item<float>(), 2e-3) << "coordinate " << j;
  }
  // log p sums to one over the classes.
  EXPECT_LT((classifier->log_probs(x).exp().sum(1) - 1).abs().max().item<float>(), 1e-5);
  EXPECT_THROW(ClassifierReward(classifier, 3), Error);
}

// form = indicator: r = 1 exactly where the class is the classifier's argmax, 0 elsewhere, and no gradient (a clear
// error naming the methods that take such a reward).
TEST(Classifier, IndicatorRewardIsTheArgmaxAndHasNoGradient) {
  ClassifierOptions o;
  o.dim = 5;
  o.hidden = {12};
  o.classes = 3;
  auto classifier = std::make_shared<MlpClassifier>(o, 4);
  Generator gen = make_generator(6);
  const Tensor x = at::randn({200, 5}, gen) * 3;
  const Tensor argmax = classifier->log_probs(x).argmax(1);
  int64_t seen = 0;
  for (int64_t k = 0; k < 3; ++k) {
    const ClassifierReward reward(classifier, k, ClassifierForm::indicator);
    EXPECT_FALSE(reward.differentiable());
    EXPECT_EQ(reward.kind(), "classifier_indicator");
    const Tensor r = reward.value(x);
    EXPECT_TRUE(r.eq(argmax.eq(k).to(at::kFloat)).all().item<bool>()) << "class " << k;
    seen += r.sum().item<float>() > 0;
    try {
      reward.grad(x);
      ADD_FAILURE() << "the indicator has no gradient";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("ram, ddpo, grpo"), std::string::npos) << e.what();
    }
  }
  EXPECT_GE(seen, 2) << "the draws should reach several classes";
  // The indicator's tilted target is closed form in the base's share s0: s0 e^lambda / (s0 e^lambda + 1 - s0).
  const double s0 = argmax.eq(1).to(at::kDouble).mean().item<double>(), lambda = 2.0;
  const ClassSampleMetrics target = tilted_target_metrics(x, *classifier, 1, lambda,
                                                          real_class_stats(*classifier, x.narrow(0, 0, 20)),
                                                          ClassifierForm::indicator);
  EXPECT_NEAR(target.class_share, s0 * std::exp(lambda) / (s0 * std::exp(lambda) + 1 - s0), 1e-9);
  EXPECT_TRUE(ClassifierReward(classifier, 0).differentiable());
  EXPECT_THROW(parse_classifier_form("argmax"), Error);
}

// The cnn's reward gradient (what fine-tuning uses) against central differences in float64, at every
// pixel of a non-square image (a wrong reshape or pooling in the backward pass would show).
TEST(Classifier, CnnRewardGradientMatchesFiniteDifferencesInFloat64) {
  ClassifierOptions o;
  o.architecture = "cnn";
  o.height = 8;
  o.width = 6;
  o.dim = 48;
  o.channels = {4, 5};
  o.hidden = {7};
  o.classes = 3;
  auto classifier = std::make_shared<MlpClassifier>(o, 3);
  classifier->to_float64();
  const ClassifierReward reward(classifier, 1);
  Generator gen = make_generator(2);
  const Tensor x = at::rand({3, 48}, gen, kDouble) * 2 - 1;
  const Tensor g = reward.grad(x);
  ASSERT_EQ(g.scalar_type(), at::kDouble);
  const double scale = g.abs().max().item<double>();
  EXPECT_GT(scale, 1e-5);  // not vacuous
  const double eps = 1e-5;
  double worst = 0;
  for (int64_t j = 0; j < 48; ++j) {
    Tensor e = at::zeros({3, 48}, kDouble);
    e.select(1, j).fill_(eps);
    const Tensor fd = (reward.value(x + e) - reward.value(x - e)) / (2 * eps);
    worst = std::max(worst, (fd - g.select(1, j)).abs().max().item<double>());
  }
  EXPECT_LT(worst, 1e-6 * scale);
  EXPECT_LT((classifier->log_probs(x).exp().sum(1) - 1).abs().max().item<double>(), 1e-12);
}

TEST(Classifier, LearnsTheDigitsAndRoundTripsThroughItsFile) {
  const ImageDataset d = load_digits(kDigits);
  const DatasetSplit split = split_dataset(d, 0.2, 0);
  ClassifierOptions o;
  o.hidden = {64};
  auto classifier = std::make_shared<MlpClassifier>(o, 0);
  ClassifierTraining loss(classifier, split.train, {});
  // A few hundred plain Adam steps reach well above chance (10%) on held-out digits.
  std::vector<Tensor> params = classifier->parameters();
  for (int i = 0; i < 300; ++i) {
    Generator gen = make_generator(mix_seed(0, static_cast<uint64_t>(i)));
    for (auto& p : params) p.mutable_grad() = Tensor();
    loss.compute(gen).loss.backward();
    at::NoGradGuard no_grad;
    for (auto& p : params) p.add_(p.grad(), -0.05);  // SGD
  }
  const double acc = classifier_accuracy(*classifier, split.test.images, split.test.labels);
  EXPECT_GT(acc, 0.85);
  const std::string path = temp_path("classifier.pt");
  save_classifier(*classifier, path, Json{{"note", "test"}});
  const LoadedClassifier loaded = load_classifier(path);
  EXPECT_EQ(loaded.info["note"], "test");
  EXPECT_TRUE(at::equal(loaded.classifier->logits(split.test.images), classifier->logits(split.test.images)));
  // A file of another kind, and a corrupt one, are errors naming the file.
  atomic_write(path, "not a pickle");
  try {
    load_classifier(path);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos);
  }
}

TEST(ImageMetrics, FrechetDistanceOfGaussiansIsClosedForm) {
  // Commuting (diagonal) covariances: |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
  const Tensor mu1 = at::tensor({0.0, 1.0, -2.0}, kDouble), mu2 = at::tensor({1.0, 1.0, 0.0}, kDouble);
  const Tensor a = at::tensor({1.0, 4.0, 0.25}, kDouble), b = at::tensor({9.0, 1.0, 0.25}, kDouble);
  const double expected = 1.0 + 4.0 + std::pow(1.0 - 3.0, 2) + std::pow(2.0 - 1.0, 2);
  EXPECT_NEAR(frechet_distance_gaussians(mu1, at::diag(a), mu2, at::diag(b)), expected, 1e-10);
  // Rotating both covariances by one orthogonal matrix leaves it unchanged (non-diagonal case).
  const Tensor Q = std::get<0>(at::linalg_qr(at::randn({3, 3}, make_generator(2), kDouble)));
  const double rotated =
      frechet_distance_gaussians(Q.matmul(mu1), Q.matmul(at::diag(a)).matmul(Q.t()), Q.matmul(mu2),
                                 Q.matmul(at::diag(b)).matmul(Q.t()));
  EXPECT_NEAR(rotated, expected, 1e-9);
  // Non-commuting covariances, 1 x 1 blocks aside: against tr(A + B - 2 (A^1/2 B A^1/2)^1/2) from a
  // 2-D closed form: for 2x2 SPD M, sqrt(M) has trace sqrt(tr M + 2 sqrt(det M)).
  const Tensor A = at::tensor({2.0, 0.5, 0.5, 1.0}, kDouble).reshape({2, 2});
  const Tensor B = at::tensor({1.0, -0.3, -0.3, 3.0}, kDouble).reshape({2, 2});
  const Tensor z = at::zeros({2}, kDouble);
  // tr((A^1/2 B A^1/2)^1/2) = sqrt(tr(AB) + 2 sqrt(det A det B)).
  const double tr_ab = A.matmul(B).trace().item<double>();
  const double dets = std::sqrt(at::det(A).item<double>() * at::det(B).item<double>());
  const double closed = A.trace().item<double>() + B.trace().item<double>() - 2 * std::sqrt(tr_ab + 2 * dets);
  EXPECT_NEAR(frechet_distance_gaussians(z, A, z, B), closed, 1e-10);
  // From samples: two large samples of one law are close; of laws a unit apart, about 1 apart.
  Generator gen = make_generator(4);
  const Tensor f1 = at::randn({20000, 3}, gen, kDouble), f2 = at::randn({20000, 3}, gen, kDouble);
  EXPECT_LT(frechet_distance(f1, f2), 0.01);
  // Each coordinate's mean difference has sd sqrt(2 / 20000) = 0.01, so the sum of squares about 0.035.
  EXPECT_NEAR(frechet_distance(f1, f2 + 1.0), 3.0, 0.12);
  // A set against itself is at distance 0, not a rounding below it (the real images' own row printed -0.000).
  for (int64_t features : {16, 64, 128}) {
    const Tensor f = at::randn({300, features}, gen, kDouble);
    const double self = frechet_distance(f, f);
    EXPECT_GE(self, 0.0) << features << " features";
    EXPECT_LT(self, 1e-8) << features << " features";
  }
}

TEST(ImageMetrics, MeanPairwiseDistanceAndClassMetrics) {
  const Tensor x = at::tensor({0.0, 0.0, 3.0, 4.0, 0.0, 4.0}, kDouble).reshape({3, 2});
  // Distances 5, 4, 3: mean (5 + 4 + 3) / 3.
  EXPECT_NEAR(mean_pairwise_distance(x), 4.0, 1e-12);
  EXPECT_EQ(mean_pairwise_distance(x.slice(0, 0, 1)), 0.0);

  ClassifierOptions o;
  o.dim = 2;
  o.hidden = {8};
  o.classes = 2;
  auto classifier = std::make_shared<MlpClassifier>(o, 0);
  Generator gen = make_generator(5);
  const Tensor samples = at::randn({50, 2}, gen);
  const RealClassStats real = real_class_stats(*classifier, at::randn({40, 2}, gen));
  const Tensor pred = classifier->logits(samples).argmax(1);
  const int64_t c = (pred == 1).sum().item<int64_t>() >= 25 ? 1 : 0;  // the more frequent class
  const ClassSampleMetrics m = class_sample_metrics(samples, *classifier, c, real);
  EXPECT_EQ(m.in_class, (pred == c).sum().item<int64_t>());
  EXPECT_NEAR(m.class_share, static_cast<double>(m.in_class) / 50.0, 1e-12);
  EXPECT_NEAR(m.mean_reward, classifier->log_probs(samples).select(1, c).mean().item<double>(), 1e-6);

  // Weights that select a subset give that subset's metrics, every one of them.
  const Tensor subset = at::arange(0, 50, 2);
  Tensor w = at::zeros({50}, kDouble);
  w.index_fill_(0, subset, 3.0);
  const ClassSampleMetrics a = class_sample_metrics(samples, *classifier, c, real, w);
  const ClassSampleMetrics b = class_sample_metrics(samples.index_select(0, subset), *classifier, c, real);
  ASSERT_GT(b.diversity, 0.0);
  EXPECT_EQ(a.n, 25);
  EXPECT_NEAR(a.mean_reward, b.mean_reward, 1e-6);
  EXPECT_NEAR(a.class_share, b.class_share, 1e-12);
  EXPECT_NEAR(a.diversity, b.diversity, 1e-9);
  ASSERT_GT(b.feature_diversity, 0.0);
  EXPECT_NEAR(a.feature_diversity, b.feature_diversity, 1e-9);
  EXPECT_NEAR(a.frechet, b.frechet, 1e-6 * (1 + b.frechet));
  // The tilted target with lambda = 0 is the base itself.
  const ClassSampleMetrics t0 = tilted_target_metrics(samples, *classifier, c, 0.0, real);
  EXPECT_NEAR(t0.class_share, m.class_share, 1e-12);
  EXPECT_NEAR(t0.frechet, m.frechet, 1e-6 * (1 + m.frechet));
  EXPECT_THROW(class_sample_metrics(samples, *classifier, c, real, -w), Error);
  EXPECT_THROW(real_class_stats(*classifier, at::randn({1, 2}, gen)), Error);
}

// More rows than one block of the classifier (1024) and of the pairwise sums: every metric equals its one-piece
// formula, computed here from the whole feature matrix and distance matrix at once.
TEST(ImageMetrics, BlockedMetricsEqualTheOnePieceFormulas) {
  ClassifierOptions o;
  o.dim = 6;
  o.hidden = {16, 5};
  o.classes = 3;
  auto classifier = std::make_shared<MlpClassifier>(o, 1);
  Generator gen = make_generator(8);
  const Tensor x = at::randn({2500, 6}, gen), real = at::randn({1300, 6}, gen) + 0.3;
  const Tensor w = at::rand({2500}, gen, kDouble);
  // Weighted pairwise distances: sum_{i != j} w_i w_j d_ij / sum_{i != j} w_i w_j over all pairs at once.
  const Tensor d = at::cdist(x.to(kDouble), x.to(kDouble));
  const Tensor ww = w.unsqueeze(1) * w.unsqueeze(0);
  const double pair_weight = ww.sum().item<double>() - w.pow(2).sum().item<double>();
  EXPECT_NEAR(mean_pairwise_distance(x, w), (ww * d).sum().item<double>() / pair_weight, 1e-9);
  EXPECT_NEAR(mean_pairwise_distance(x), d.sum().item<double>() / (2500.0 * 2499.0), 1e-9);
  EXPECT_EQ(mean_pairwise_distance(x, at::zeros({2500}, kDouble)), 0.0);

  const Tensor lp = classifier->log_probs(x);
  const int64_t c = std::get<0>(lp.argmax(1).mode()).item<int64_t>();  // the most frequent class
  const RealClassStats stats = real_class_stats(*classifier, real);
  EXPECT_EQ(stats.n, 1300);
  const ClassSampleMetrics m = class_sample_metrics(x, *classifier, c, stats);
  const Tensor f = classifier->features(x).to(kDouble);
  EXPECT_NEAR(m.frechet, frechet_distance(f, classifier->features(real).to(kDouble)), 1e-6 * (1 + m.frechet));
  EXPECT_NEAR(m.mean_reward, lp.select(1, c).mean().item<double>(), 1e-6);
  const Tensor idx = at::nonzero(lp.argmax(1) == c).squeeze(1);
  ASSERT_GT(idx.size(0), 1024);
  const Tensor fc = f.index_select(0, idx);
  const double n_c = static_cast<double>(idx.size(0));
  EXPECT_NEAR(m.feature_diversity, at::cdist(fc, fc).sum().item<double>() / (n_c * (n_c - 1)), 1e-9);
  // The scores alone (an unseen classifier's, which has no real statistics) are those of the full metrics, with and
  // without weights; the full metrics refuse to run without real statistics.
  for (const Tensor& weights : {Tensor(), w}) {
    const ClassSampleMetrics full = class_sample_metrics(x, *classifier, c, stats, weights);
    const ClassScores u = class_scores(x, *classifier, c, weights);
    EXPECT_EQ(u.n, full.n);
    EXPECT_EQ(u.in_class, full.in_class);
    EXPECT_NEAR(u.class_share, full.class_share, 1e-12);
    EXPECT_NEAR(u.mean_reward, full.mean_reward, 1e-9);
    EXPECT_NEAR(u.reward_se, full.reward_se, 1e-9);
  }
  EXPECT_THROW(class_sample_metrics(x, *classifier, c, RealClassStats{}), Error);
}

TEST(ImageGrid, WritesAPngOfTheExpectedSize) {
  const std::string path = temp_path("grid.png");
  std::vector<float> pixels(12 * 64, 0.0f);
  plot::ImageGridOptions o;
  o.columns = 5;
  plot::write_image_grid_png(path, {{"a", pixels}, {"b", std::vector<float>(3 * 64, 1.0f)}}, o);
  const std::string png = read_file(path, "png");
  ASSERT_GT(png.size(), 24u);
  EXPECT_EQ(png.substr(1, 3), "PNG");
  auto be32 = [&](size_t at) {
    return (uint32_t(uint8_t(png[at])) << 24) | (uint32_t(uint8_t(png[at + 1])) << 16) |
           (uint32_t(uint8_t(png[at + 2])) << 8) | uint32_t(uint8_t(png[at + 3]));
  };
  // 5 columns of 8 x 4 + 1 pixels, plus a border pixel and 2 x 16 margin; two panels side by side.
  EXPECT_EQ(be32(16), 2u * (5u * 33u + 1u + 32u));
  EXPECT_THROW(plot::write_image_grid_png(path, {{"odd", std::vector<float>(65, 0.0f)}}, o), Error);
}

// ---- Baselines -------------------------------------------------------------------------------

struct BaselineSetup {
  std::shared_ptr<FineTunedVelocity> model;
  RewardPtr reward;
};

// A random MLP base in 3-D, a residual on top with random (not zero) weights, a quadratic reward.
BaselineSetup baseline_setup() {
  MlpOptions o;
  o.dim = 3;
  o.hidden = {16, 16};
  o.time_features = 4;
  auto base = std::make_shared<MlpVelocity>(o, make_linear_schedule(), 11);
  auto model = make_finetuned(base, FineTuneMode::residual, {16}, 4, 12);
  Generator gen = make_generator(13);
  at::NoGradGuard no_grad;
  for (auto& p : model->parameters()) p.add_(0.3 * at::randn(p.sizes(), gen));
  auto reward = std::make_shared<QuadraticReward>(at::tensor({1.0, -0.5, 0.3}, kDouble), 0.7 * at::eye(3, kDouble));
  return {model, reward};
}

// <grad loss, D> against the central difference of the metric `objective` along D, with the
// same random draws (the generator reseeded).
void expect_gradient_matches_fd(Loss& loss, const std::vector<Tensor>& params,
                                const std::function<double(const LossOutput&)>& objective, const std::string& what) {
  Generator dgen = make_generator(21);
  std::vector<Tensor> D;
  for (const auto& p : params) D.push_back(at::randn(p.sizes(), dgen));
  for (auto& p : params) p.mutable_grad() = Tensor();
  Generator gen = make_generator(99);
  loss.compute(gen).loss.backward();
  double directional = 0.0;
  for (size_t i = 0; i < params.size(); ++i) directional += (params[i].grad() * D[i]).sum().item<double>();
  const double eps = 2e-3;
  auto shifted = [&](double s) {
    {
      at::NoGradGuard no_grad;
      for (size_t i = 0; i < params.size(); ++i) params[i].add_(s * D[i]);
    }
    Generator g = make_generator(99);
    const double value = objective(loss.compute(g));
    at::NoGradGuard no_grad;
    for (size_t i = 0; i < params.size(); ++i) params[i].sub_(s * D[i]);
    return value;
  };
  const double fd = (shifted(eps) - shifted(-eps)) / (2 * eps);
  EXPECT_NEAR(directional, fd, 2e-2 * std::abs(fd) + 2e-3) << what;
  EXPECT_GT(std::abs(fd), 1e-2) << what << ": the check must not be vacuous";
}

double metric(const LossOutput& out, const std::string& key) {
  for (const auto& [k, v] : out.metrics) {
    if (k == key) return v;
  }
  ADD_FAILURE() << "no metric " << key;
  return NAN;
}

TEST(RewardBaselines, DraftGradientIsTheRewardGradientThroughTheLastKSteps) {
  for (int64_t k : {int64_t{8}, int64_t{1}}) {
    BaselineSetup s = baseline_setup();
    RewardBaselineOptions o;
    o.num_steps = 8;
    o.batch_size = 32;
    o.lambda = 1.5;
    o.draft_k = k;
    DraftK loss(s.model, s.reward, o);
    if (k == o.num_steps) {
      // Full backpropagation: exactly the gradient of -lambda mean r(X_1).
      expect_gradient_matches_fd(loss, loss.parameters(), [&](const LossOutput& out) { return -o.lambda * metric(out, "reward"); },
                                 "DRaFT-K, K = num_steps");
    } else {
      // Truncated: the gradient of -lambda mean r(X_1) when only the last step's velocity moves.
      // Compare with the full gradient: they differ (the truncation is real) ...
      auto grad_of = [&](int64_t kk) {
        RewardBaselineOptions oo = o;
        oo.draft_k = kk;
        DraftK l(s.model, s.reward, oo);
        for (auto& p : l.parameters()) p.mutable_grad() = Tensor();
        Generator gen = make_generator(99);
        l.compute(gen).loss.backward();
        std::vector<Tensor> g;
        for (auto& p : l.parameters()) g.push_back(p.grad().clone());
        return g;
      };
      const auto g1 = grad_of(1), g8 = grad_of(8);
      double diff = 0, norm = 0;
      for (size_t i = 0; i < g1.size(); ++i) {
        diff += (g1[i] - g8[i]).pow(2).sum().item<double>();
        norm += g8[i].pow(2).sum().item<double>();
      }
      EXPECT_GT(diff, 1e-4 * norm);
      // ... and equal the gradient through one Euler step from the (fixed) state X_{K-1}.
      Generator gen = make_generator(99);
      Tensor x = at::randn({32, 3}, gen);
      {
        at::NoGradGuard no_grad;
        for (int64_t j = 0; j < 7; ++j) x = x + (1.0 / 8) * s.model->velocity(x, j / 8.0);
      }
      const Tensor x1 = x + (1.0 / 8) * s.model->velocity(x, 7.0 / 8);
      const Tensor J = -o.lambda * s.reward->value(x1).mean();
      const auto ref = torch::autograd::grad({J}, s.model->parameters());
      for (size_t i = 0; i < g1.size(); ++i) {
        EXPECT_LT((ref[i] - g1[i]).abs().max().item<double>(), 1e-4 * (1 + ref[i].abs().max().item<double>()));
      }
    }
  }
}

TEST(RewardBaselines, ReflPredictsThePosteriorMeanAndFollowsItsGradient) {
  // Exact Gaussian base N(m, s^2 I), linear schedule: E[X1 | X_t = x] = m + alpha s^2 (x - alpha m) / (alpha^2 s^2 + beta^2).
  const double s = 0.6;
  auto base = std::make_shared<GmmVelocity>(test::isotropic_gaussian({0.5, -1.0}, s), make_linear_schedule());
  auto model = make_finetuned(base, FineTuneMode::residual, {8}, 4, 1);
  auto reward = std::make_shared<QuadraticReward>(at::tensor({1.0, 0.0}, kDouble), at::eye(2, kDouble));
  RewardBaselineOptions o;
  o.num_steps = 10;
  const Refl refl(model, reward, o);
  Generator gen = make_generator(3);
  const Tensor x = at::randn({6, 2}, gen, kDouble);
  const Tensor m = at::tensor({0.5, -1.0}, kDouble);
  for (double t : {0.3, 0.7, 0.95}) {
    const Tensor expected = m + t * s * s * (x - t * m) / (t * t * s * s + (1 - t) * (1 - t));
    const Tensor got = refl.predict_x1(x, t, base->velocity(x, t));
    EXPECT_LT((got - expected).abs().max().item<double>(), 1e-10) << "t = " << t;
  }
  BaselineSetup st = baseline_setup();
  RewardBaselineOptions o2;
  o2.num_steps = 10;
  o2.batch_size = 32;
  o2.lambda = 0.8;
  Refl loss(st.model, st.reward, o2);
  // ReFL's gradient treats the trajectory up to X_k as fixed (it is sampled without gradients), so
  // the reference is the gradient of -lambda mean r(X^_1(X_k, t_k)) at that fixed X_k.
  Generator gen1 = make_generator(99);
  const LossOutput out = loss.compute(gen1);
  out.loss.backward();
  const double t_k = metric(out, "t");
  const auto k = static_cast<int64_t>(std::lround(t_k * 10));
  Generator gen2 = make_generator(99);
  Tensor xk = at::randn({32, 3}, gen2);
  {
    at::NoGradGuard no_grad;
    for (int64_t j = 0; j < k; ++j) xk = xk + 0.1 * st.model->velocity(xk, j / 10.0);
  }
  const Tensor x1_hat = xk + (1 - t_k) * st.model->velocity(xk, t_k);
  EXPECT_NEAR(-o2.lambda * st.reward->value(x1_hat).mean().item<double>(), -o2.lambda * metric(out, "reward_prediction"), 1e-6);
  const auto ref = torch::autograd::grad({-o2.lambda * st.reward->value(x1_hat).mean()}, st.model->parameters());
  const auto params = loss.parameters();
  for (size_t i = 0; i < ref.size(); ++i) {
    EXPECT_LT((ref[i] - params[i].grad()).abs().max().item<double>(), 1e-4 * (1 + ref[i].abs().max().item<double>()));
  }
  EXPECT_GT(ref.back().abs().max().item<double>(), 1e-3);
}

TEST(RewardBaselines, DiscreteAdjointGradientIsTheGradientOfTheControlObjective) {
  BaselineSetup s = baseline_setup();
  RewardBaselineOptions o;
  o.num_steps = 10;
  o.batch_size = 32;
  o.lambda = 1.2;
  DiscreteAdjoint loss(s.model, s.reward, make_memoryless_noise(0.1), o);
  expect_gradient_matches_fd(loss, loss.parameters(), [](const LossOutput& out) { return metric(out, "objective"); },
                             "discrete adjoint");
  // sigma = 0 has no control: refused with a message.
  EXPECT_THROW(DiscreteAdjoint(s.model, s.reward, make_zero_noise(), o), Error);
}

}  // namespace
}  // namespace tilt
