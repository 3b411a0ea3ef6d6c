// tilt eval-images by condition: the rows of each samples file grouped by their one-hot condition, each
// group scored at its own class by class_sample_metrics (tilt/eval/image_metrics.h) against the real
// images of that class, and summarised by the mean over the classes and the worst class's share.
#include "conditional_images.h"

#include "tilt/core/error.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <cstdio>
#include <utility>

namespace tilt {

Json metrics_json(const ClassSampleMetrics& m) {
  return Json{{"n", m.n},           {"mean_reward", m.mean_reward}, {"mean_reward_se", m.reward_se},
              {"class_share", m.class_share}, {"in_class", m.in_class}, {"diversity", m.diversity},
              {"feature_diversity", m.feature_diversity}, {"frechet", m.frechet}};
}

Json unseen_json(const ClassScores& m) {
  return Json{{"class_share", m.class_share}, {"mean_reward", m.mean_reward}, {"mean_reward_se", m.reward_se}};
}

Tensor evenly_spaced_rows(const Tensor& x, int64_t n) {
  const int64_t N = x.size(0);
  if (n >= N) return x;
  // Row floor(i N / n) for i < n: distinct, in order, and spread over the whole of x.
  const Tensor idx = at::floor(at::arange(n, at::kDouble) * (static_cast<double>(N) / static_cast<double>(n)));
  return x.index_select(0, idx.to(at::kLong).to(x.device()));
}

Tensor condition_classes(const ImageSamples& s, int64_t classes) {
  const std::string name = s.what + " '" + s.path + "'";
  if (!s.conditions.defined()) {
    throw Error(name + " has no condition columns (c0, c1, ...): each sample is scored at its own class, as [reward] "
                "class = \"condition\" or another samples file with condition columns asks; sample a conditional model "
                "(tilt sample -m MODEL writes x0,...,c0,... for each of its classes)");
  }
  if (s.conditions.size(1) != classes) {
    throw Error(name + " has conditions of " + std::to_string(s.conditions.size(1)) + " numbers; the data has " +
                std::to_string(classes) + " classes (a condition must be a class's one-hot row)");
  }
  const Tensor c = s.conditions;
  const Tensor one_hot = ((c == 0) | (c == 1)).all(1) & (c.sum(1) == 1);
  if (!one_hot.all().item<bool>()) {
    const int64_t row = at::nonzero(one_hot.logical_not())[0][0].item<int64_t>();
    throw Error(name + ": the condition of sample " + std::to_string(row + 1) +
                " is not the one-hot row of one of the data's " + std::to_string(classes) + " classes");
  }
  return c.argmax(1);
}

namespace {

// The mean over the classes (rows) of each metric, and the worst class's share.
Json summarise(const Json& rows) {
  Json s{{"classes", rows.size()}};
  const auto mean = [&](const char* group, const char* key) {
    double sum = 0;
    for (const Json& row : rows) sum += (group ? row[group][key] : row[key]).get<double>();
    return sum / static_cast<double>(rows.size());
  };
  int64_t n = 0;
  for (const Json& row : rows) n += row["n"].get<int64_t>();
  s["n"] = n;
  for (const char* key : {"mean_reward", "class_share", "diversity", "feature_diversity", "frechet"}) {
    s[key] = mean(nullptr, key);
  }
  const auto worst = std::min_element(rows.begin(), rows.end(), [](const Json& a, const Json& b) {
    return a["class_share"].get<double>() < b["class_share"].get<double>();
  });
  s["worst_class_share"] = (*worst)["class_share"];
  s["worst_class"] = (*worst)["class"];
  if (rows[0].contains("unseen")) {
    s["unseen"] = {{"class_share", mean("unseen", "class_share")}, {"mean_reward", mean("unseen", "mean_reward")}};
  }
  return s;
}

// One object per class present among the labels, and their summary. With lambda, x are base samples
// and each class's metrics are those of the tilted target (tilted_target_metrics).
Json class_rows(const ImageSamples& s, const Tensor& labels, const std::vector<RealClassStats>& real,
                const MlpClassifier& classifier, const MlpClassifier* unseen, const double* lambda) {
  Json rows = Json::array();
  for (int64_t k = 0; k < static_cast<int64_t>(real.size()); ++k) {
    const Tensor idx = at::nonzero(labels == k).squeeze(1);
    if (idx.size(0) == 0) continue;
    if (idx.size(0) < 2) {
      throw Error(s.what + " '" + s.path + "' has 1 sample of class " + std::to_string(k) +
                  ": give at least 2 per class (the Frechet distance fits a covariance)");
    }
    const Tensor xk = s.x.index_select(0, idx);
    Json row = metrics_json(lambda ? tilted_target_metrics(xk, classifier, k, *lambda, real[k])
                                   : class_sample_metrics(xk, classifier, k, real[k]));
    row["class"] = k;
    if (unseen && !lambda) row["unseen"] = unseen_json(class_scores(xk, *unseen, k));
    rows.push_back(std::move(row));
  }
  return Json{{"classes", rows}, {"summary", summarise(rows)}};
}

}  // namespace

Json evaluate_images_by_condition(const ImageDataset& data, const std::vector<ImageSamples>& files,
                                  const ImageSamples* base, double lambda, const MlpClassifier& classifier,
                                  const MlpClassifier* unseen) {
  at::NoGradGuard no_grad;
  std::vector<RealClassStats> real;  // each class's real features, computed once for every file
  for (int64_t k = 0; k < data.classes; ++k) real.push_back(real_class_stats(classifier, select_class(data, k).images));
  std::vector<Tensor> labels;
  for (const ImageSamples& f : files) labels.push_back(condition_classes(f, data.classes));  // every file checked first
  Json out{{"by_condition", true}};
  out["real"] = class_rows({"the data", "data", data.images, Tensor()}, data.labels, real, classifier, unseen, nullptr);
  if (base) {
    out["target"] = class_rows(*base, condition_classes(*base, data.classes), real, classifier, nullptr, &lambda);
    out["target"]["lambda"] = lambda;
    out["target"]["from"] = base->path;
  }
  for (size_t i = 0; i < files.size(); ++i) {
    out["samples"][files[i].path] = class_rows(files[i], labels[i], real, classifier, unseen, nullptr);
  }
  if (!files.empty()) {  // the floor: each class's real images at the first file's count of the class
    std::vector<Tensor> xs, ks;
    for (int64_t k = 0; k < data.classes; ++k) {
      const int64_t n = (labels[0] == k).sum().item<int64_t>();
      if (n == 0) continue;
      xs.push_back(evenly_spaced_rows(select_class(data, k).images, n));
      ks.push_back(at::full({xs.back().size(0)}, k, at::kLong));
    }
    out["floor"] = class_rows({"real images", "data", at::cat(xs), Tensor()}, at::cat(ks), real, classifier, unseen,
                              nullptr);
    out["floor"]["counts_of"] = files[0].path;
  }
  return out;
}

namespace {

std::string summary_row(const std::string& name, int width, const Json& s) {
  char line[512];
  int n = std::snprintf(line, sizeof line, "%-*s %7lld %7lld %10.3f %8.1f%% %8.1f%% (%lld) %9.3f %10.3f %9.3f", width,
                        name.c_str(), static_cast<long long>(s["classes"].get<int64_t>()),
                        static_cast<long long>(s["n"].get<int64_t>()), s["mean_reward"].get<double>(),
                        100.0 * s["class_share"].get<double>(), 100.0 * s["worst_class_share"].get<double>(),
                        static_cast<long long>(s["worst_class"].get<int64_t>()), s["diversity"].get<double>(),
                        s.value("feature_diversity", 0.0), s["frechet"].get<double>());
  if (s.contains("unseen") && n > 0 && n < static_cast<int>(sizeof line)) {
    std::snprintf(line + n, sizeof line - n, " %8.1f%% %12.3f", 100.0 * s["unseen"]["class_share"].get<double>(),
                  s["unseen"]["mean_reward"].get<double>());
  }
  return std::string(line) + "\n";
}

std::string class_table(const std::string& name, const Json& rows, bool unseen) {
  std::string text = "\n" + name + ", per class:\n";
  char line[512];
  std::snprintf(line, sizeof line, "%5s %7s %16s %9s %10s %10s %9s%s\n", "class", "n", "log p(c|x)", "class %",
                "diversity", "feat. div.", "Frechet", unseen ? "  unseen %  unseen log p" : "");
  text += line;
  for (const Json& r : rows) {
    int n = std::snprintf(line, sizeof line, "%5lld %7lld %8.3f±%-7.3f %8.1f%% %10.3f %10.3f %9.3f",
                          static_cast<long long>(r["class"].get<int64_t>()), static_cast<long long>(r["n"].get<int64_t>()),
                          r["mean_reward"].get<double>(), r["mean_reward_se"].get<double>(),
                          100.0 * r["class_share"].get<double>(), r["diversity"].get<double>(),
                          r.value("feature_diversity", 0.0), r["frechet"].get<double>());
    if (r.contains("unseen") && n > 0 && n < static_cast<int>(sizeof line)) {
      std::snprintf(line + n, sizeof line - n, " %8.1f%% %12.3f", 100.0 * r["unseen"]["class_share"].get<double>(),
                    r["unseen"]["mean_reward"].get<double>());
    }
    text += std::string(line) + "\n";
  }
  return text;
}

}  // namespace

std::string image_evaluation_by_condition_text(const Json& out, const std::vector<std::string>& sample_files) {
  const bool unseen = out.contains("unseen_classifier");
  const std::string target_name = "target p* (reweighted base samples)";
  const std::string floor_name = "floor: real images, the first file's n";
  int width = static_cast<int>(std::max(target_name.size(), floor_name.size()));
  for (const std::string& f : sample_files) width = std::max(width, static_cast<int>(f.size()));
  std::string text = "each sample scored at its own class, its condition (classifier " +
                     out["classifier"].get<std::string>() +
                     (unseen ? "; unseen classifier " + out["unseen_classifier"].get<std::string>() : "") +
                     "); the mean over the classes:\n";
  char line[512];
  std::snprintf(line, sizeof line, "%-*s %7s %7s %10s %9s %15s %9s %10s %9s%s\n", width, "samples", "classes", "n",
                "log p(c|x)", "class %", "worst class %", "diversity", "feat. div.", "Frechet",
                unseen ? "  unseen %  unseen log p" : "");
  text += line;
  for (const std::string& f : sample_files) text += summary_row(f, width, out["samples"][f]["summary"]);
  text += summary_row("real images of the classes", width, out["real"]["summary"]);
  if (out.contains("floor")) text += summary_row(floor_name, width, out["floor"]["summary"]);
  if (out.contains("target")) text += summary_row(target_name, width, out["target"]["summary"]);
  text += "(class %: samples the classifier assigns to their own class, worst: the lowest class's (which); diversity: "
          "mean pairwise distance among those, per class, feat. div.: the same in the classifier's last hidden layer; Frechet: each class's samples vs its real images, in the "
          "classifier's last hidden layer; real images: all of the data, the classifier's training images among them; "
          "floor: as many real images of each class as the first file has, spread through the data: what samples of "
          "the data's own law score at that n (the Frechet distance of a few samples lies above 0)";
  if (out.contains("target")) text += "; target p*: base samples weighted by p(c | x)^lambda within each class, n = effective sample size";
  if (unseen) text += "; unseen: the share and log p(c|x) under the second classifier, never used in training";
  text += ")\n";
  for (const std::string& f : sample_files) text += class_table(f, out["samples"][f]["classes"], unseen);
  if (out.contains("target")) text += class_table(target_name, out["target"]["classes"], false);
  return text;
}

}  // namespace tilt
