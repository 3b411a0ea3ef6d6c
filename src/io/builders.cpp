#include "tilt/io/builders.h"

#include "tilt/core/check.h"
#include "tilt/core/error.h"
#include "tilt/io/classifier_io.h"
#include "tilt/io/samples.h"
#include "tilt/model/conditional_gmm.h"
#include "tilt/model/classifier.h"
#include "tilt/model/torchscript.h"

#include <ATen/ATen.h>

#include <cmath>

namespace tilt {
namespace {

const auto kDouble = at::TensorOptions().dtype(at::kDouble);

// One entry of an array or matrix of data-space numbers: finite and of magnitude at most
// limits::kMagnitude (docs/config.md, "Limits"), so that squares and products stay far inside float32.
double entry(ConfigSection& s, const std::string& key, const Json& e) {
  if (!e.is_number()) s.fail(key, "must hold numbers only");
  const double x = e.get<double>();
  if (!std::isfinite(x)) s.fail(key, "must hold finite numbers, got " + number_string(x));
  if (std::abs(x) > limits::kMagnitude) {
    s.fail(key, "must hold numbers of magnitude at most " + number_string(limits::kMagnitude) + ", got " + number_string(x));
  }
  return x;
}

void check_entries(ConfigSection& s, const std::string& key, const std::vector<double>& xs) {
  for (double x : xs) entry(s, key, Json(x));
}

// A number read from the config in [lo, hi]; the message gives the range.
double in_range(ConfigSection& s, const std::string& key, double x, double lo, double hi) {
  if (!(x >= lo && x <= hi)) s.fail(key, "must be in [" + number_string(lo) + ", " + number_string(hi) + "], got " + number_string(x));
  return x;
}

int64_t in_range(ConfigSection& s, const std::string& key, int64_t x, int64_t lo, int64_t hi) {
  if (x < lo || x > hi) s.fail(key, "must be in " + std::to_string(lo) + ".." + std::to_string(hi) + ", got " + std::to_string(x));
  return x;
}

Tensor matrix_from(ConfigSection& s, const std::string& key, const Json& v, int64_t rows, int64_t cols) {
  if (!v.is_array() || static_cast<int64_t>(v.size()) != rows) {
    s.fail(key, "must be " + std::to_string(rows) + " rows of " + std::to_string(cols) + " numbers");
  }
  std::vector<double> flat;
  for (const auto& row : v) {
    if (!row.is_array() || static_cast<int64_t>(row.size()) != cols) {
      s.fail(key, "must be " + std::to_string(rows) + " rows of " + std::to_string(cols) + " numbers");
    }
    for (const auto& e : row) flat.push_back(entry(s, key, e));
  }
  return at::tensor(flat, kDouble).reshape({rows, cols});
}

}  // namespace

Tensor read_table(ConfigSection& s, const std::string& key, int64_t rows, int64_t cols) {
  const Json v = s.value(key);
  const std::string shape = (rows > 0 ? std::to_string(rows) : std::string("one or more")) + " rows of " +
                            (cols > 0 ? std::to_string(cols) : std::string("the same number of")) + " numbers";
  if (!v.is_array() || v.empty() || (rows > 0 && static_cast<int64_t>(v.size()) != rows)) s.fail(key, "must be " + shape);
  const int64_t n = static_cast<int64_t>(v.size());
  const int64_t width = cols > 0 ? cols : (v[0].is_array() ? static_cast<int64_t>(v[0].size()) : 0);
  if (width < 1) s.fail(key, "must be " + shape + " (a list of lists, e.g. [[0.5], [1.0]])");
  for (const auto& row : v) {
    if (!row.is_array() || static_cast<int64_t>(row.size()) != width) {
      s.fail(key, "must be " + shape + " (every row " + std::to_string(width) + " numbers)");
    }
  }
  return matrix_from(s, key, v, n, width);
}

ConditionsPlan read_conditions(ConfigSection s, int64_t dim) {
  ConditionsPlan plan;
  const int given = static_cast<int>(s.has("train")) + static_cast<int>(s.has("classes")) +
                    static_cast<int>(s.has("file")) + static_cast<int>(s.has("uniform"));
  if (given != 1) {
    s.fail("train", "give exactly one of train (a table), classes (a number), file (a CSV file) or uniform (a box)");
  }
  Tensor train;
  if (s.has("uniform")) {
    const Tensor box = read_table(s, "uniform", 2, dim);
    try {
      plan.train = std::make_shared<const ConditionSet>(ConditionSet::uniform(box[0], box[1]));
    } catch (const Error& e) {
      s.fail("uniform", std::string("must be [[lo, ...], [hi, ...]] with lo <= hi: ") + e.what());
    }
  } else if (s.has("classes")) {
    const int64_t n = in_range(s, "classes", s.integer("classes"), int64_t{1}, int64_t{100000});
    train = ConditionSet::classes(n).values();
  } else if (s.has("file")) {
    const std::string path = s.string("file");
    try {
      train = check_conditions(read_samples_csv(path).to(at::kDouble), "the file '" + path + "'");
    } catch (const Error& e) {
      s.fail("file", std::string("cannot be read as conditions (one per line, comma-separated): ") + e.what());
    }
  } else {
    train = read_table(s, "train", 0, dim);
  }
  const std::string key = s.has("train") ? "train" : s.has("classes") ? "classes" : "file";
  if (!plan.train && train.size(1) != dim) {
    s.fail(key, "gives conditions of size " + std::to_string(train.size(1)) + ", but the model takes " + std::to_string(dim));
  }
  try {
    if (!plan.train) plan.train = std::make_shared<const ConditionSet>(train);
  } catch (const Error& e) {
    s.fail(key, e.what());
  }
  if (s.has("held_out")) plan.held_out = read_table(s, "held_out", 0, dim);
  if (s.has("outside")) plan.outside = read_table(s, "outside", 0, dim);
  s.finish();
  return plan;
}

namespace {

// A d x d matrix given as a number (times I), a vector (diagonal) or a matrix.
Tensor square_matrix(ConfigSection& s, const std::string& key, int64_t d, std::optional<double> fallback) {
  if (!s.has(key)) {
    if (!fallback) s.fail(key, "is required but missing");
    s.number(key, fallback);
    return *fallback * at::eye(d, kDouble);
  }
  const Json v = s.value(key);
  if (v.is_number()) return entry(s, key, Json(s.number(key))) * at::eye(d, kDouble);
  if (v.is_array() && !v.empty() && v[0].is_number()) {
    if (static_cast<int64_t>(v.size()) != d) s.fail(key, "must have " + std::to_string(d) + " diagonal entries");
    std::vector<double> diag;
    for (const auto& e : v) diag.push_back(entry(s, key, e));
    return at::diag(at::tensor(diag, kDouble));
  }
  return matrix_from(s, key, v, d, d);
}

}  // namespace

SchedulePtr read_schedule(ConfigSection s) {
  const std::string type = s.choice("type", {"linear", "cosine", "vp"}, "linear");
  std::vector<std::pair<std::string, double>> params;
  if (type == "vp") {
    // alpha_0 = exp(-(beta_min + beta_max) / 4): beta_max <= 100 keeps it far from float32's underflow.
    const double beta_min = s.number("beta_min", 0.1), beta_max = s.number("beta_max", 20.0);
    if (!(beta_min > 0 && beta_min < 100)) s.fail("beta_min", "must be in (0, 100), got " + number_string(beta_min));
    if (!(beta_max > beta_min && beta_max <= 100)) {
      s.fail("beta_max", "must be in (beta_min, 100], got " + number_string(beta_max));
    }
    params = {{"beta_min", beta_min}, {"beta_max", beta_max}};
  }
  s.finish();
  return make_schedule(type, params);
}

std::shared_ptr<GaussianMixture> read_mixture(ConfigSection s) {
  const std::string type = s.choice("type", {"gmm", "ring"});
  Tensor weights, means, covs;
  int64_t K = 0, d = 0;
  if (type == "ring") {
    K = in_range(s, "components", s.integer("components"), int64_t{1}, limits::kComponents);
    const double radius = s.number("radius", 3.0);
    entry(s, "radius", Json(radius));
    if (!(radius > 0)) s.fail("radius", "must be > 0 (the components' distance from the origin), got " + number_string(radius));
    d = 2;
    std::vector<double> mu;
    for (int64_t k = 0; k < K; ++k) {
      const double a = 2.0 * M_PI * static_cast<double>(k) / static_cast<double>(K);
      mu.push_back(radius * std::cos(a));
      mu.push_back(radius * std::sin(a));
    }
    means = at::tensor(mu, kDouble).reshape({K, 2});
  } else {
    const Json m = s.value("means");
    if (!m.is_array() || m.empty() || !m[0].is_array() || m[0].empty()) {
      s.fail("means", "must be a non-empty array of points, e.g. [[0, 0], [1, 1]]");
    }
    K = static_cast<int64_t>(m.size());
    d = static_cast<int64_t>(m[0].size());
    means = matrix_from(s, "means", m, K, d);
  }
  const std::vector<double> w = s.numbers("weights", std::vector<double>(static_cast<size_t>(K), 1.0));
  if (static_cast<int64_t>(w.size()) != K) s.fail("weights", "must have one entry per component (" + std::to_string(K) + ")");
  for (double x : w) {
    if (!(x > 0)) s.fail("weights", "must all be > 0 (they are normalised), got " + number_string(x));
  }
  weights = at::tensor(w, kDouble);
  if (s.has("covariances")) {
    if (s.has("std")) s.fail("std", "and 'covariances' are exclusive; give one");
    const Json c = s.value("covariances");
    if (!c.is_array() || static_cast<int64_t>(c.size()) != K) s.fail("covariances", "must hold one d x d matrix per component");
    std::vector<Tensor> mats;
    for (const auto& m : c) mats.push_back(matrix_from(s, "covariances", m, d, d));
    covs = at::stack(mats);
  } else {
    const Json sd = s.has("std") ? s.value("std") : Json(s.number("std", 1.0));  // the default recorded too
    std::vector<double> stds;
    if (sd.is_number()) {
      stds.assign(static_cast<size_t>(K), entry(s, "std", sd));
    } else if (sd.is_array() && static_cast<int64_t>(sd.size()) == K &&
               std::all_of(sd.begin(), sd.end(), [](const Json& e) { return e.is_number(); })) {
      for (const auto& e : sd) stds.push_back(entry(s, "std", e));
    } else {
      s.fail("std", "must be a number or one number per component");
    }
    for (double v : stds) {
      if (!(v > 0)) s.fail("std", "must be positive");
    }
    const Tensor var = at::tensor(stds, kDouble).pow(2);
    covs = var.reshape({K, 1, 1}) * at::eye(d, kDouble).unsqueeze(0);
  }
  s.finish();
  try {
    return std::make_shared<GaussianMixture>(weights, means, covs);
  } catch (const Error& e) {
    const std::string msg = e.what();
    const char* key = msg.find("covariances") != std::string::npos ? "covariances"
                      : msg.find("means") != std::string::npos   ? "means"
                      : msg.find("weights") != std::string::npos ? "weights"
                                                                 : "";
    throw Error("in " + s.origin() + ", " + (*key ? "'" + s.where(key) + "'" : "[" + s.where("").substr(0, s.where("").size() - 1) + "]") +
                ": " + msg);
  }
}

RewardPtr read_reward(ConfigSection s, int64_t dim, double* lambda) {
  const std::string type = s.choice("type", {"linear", "quadratic", "gmm", "classifier", "ink", "torchscript"});
  const double l = in_range(s, "lambda", s.number("lambda", 1.0), -limits::kLambda, limits::kLambda);
  if (lambda) *lambda = l;
  RewardPtr reward;
  if (type == "linear") {
    const std::vector<double> a = s.numbers("a");
    if (static_cast<int64_t>(a.size()) != dim) s.fail("a", "must have " + std::to_string(dim) + " entries (the data dimension)");
    check_entries(s, "a", a);
    if (s.has("a_shift")) {
      reward = std::make_shared<ConditionalLinearReward>(at::tensor(a, kDouble), read_table(s, "a_shift", dim, 0));
    } else {
      reward = std::make_shared<LinearReward>(at::tensor(a, kDouble));
    }
  } else if (type == "quadratic") {
    const std::vector<double> c = s.numbers("center");
    if (static_cast<int64_t>(c.size()) != dim) s.fail("center", "must have " + std::to_string(dim) + " entries (the data dimension)");
    check_entries(s, "center", c);
    const Tensor A = square_matrix(s, "precision", dim, 1.0);
    const Tensor N = s.has("center_shift") ? read_table(s, "center_shift", dim, 0) : Tensor();
    try {
      if (N.defined()) {
        reward = std::make_shared<ConditionalQuadraticReward>(at::tensor(c, kDouble), N, A);
      } else {
        reward = std::make_shared<QuadraticReward>(at::tensor(c, kDouble), A);
      }
    } catch (const Error& e) {
      s.fail("precision", std::string("is invalid: ") + e.what());
    }
  } else if (type == "classifier") {
    const std::string path = s.string("path");
    // class = "condition": r(x, c) = log p(c | x) of each sample's own class, for a class-conditional model.
    const bool conditional = s.has("class") && s.value("class").is_string();
    if (conditional && s.string("class") != "condition") s.fail("class", "must be a class number or \"condition\"");
    const int64_t c = conditional ? -1 : s.integer("class");
    // form = "indicator": r = 1 if the classifier's argmax is the class, else 0; no gradient (docs/ram.md).
    const ClassifierForm form = parse_classifier_form(s.choice("form", {"log_prob", "indicator"}, "log_prob"));
    const LoadedClassifier loaded = load_classifier(path);
    if (loaded.classifier->options().dim != dim) {
      s.fail("path", "'" + path + "' classifies inputs of dimension " + std::to_string(loaded.classifier->options().dim) +
                         ", the data has dimension " + std::to_string(dim));
    }
    if (conditional) {
      s.finish();
      return std::make_shared<ConditionalClassifierReward>(loaded.classifier, form);
    }
    if (c < 0 || c >= loaded.classifier->options().classes) {
      s.fail("class", "must be in 0.." + std::to_string(loaded.classifier->options().classes - 1));
    }
    reward = std::make_shared<ClassifierReward>(loaded.classifier, c, form);
  } else if (type == "ink") {
    // r(x) = mean_i x_i: for images, how much ink (pixels in [-1, 1], ink = 1); with a threshold, the share of pixels
    // above it: a count, without a gradient (docs/ram.md).
    if (s.has("threshold")) {
      const double threshold = s.number("threshold");
      if (!std::isfinite(threshold) || std::abs(threshold) > 1e6) s.fail("threshold", "must be a finite number in [-1e6, 1e6]");
      reward = std::make_shared<InkCountReward>(dim, threshold);
    } else {
      reward = std::make_shared<LinearReward>(at::full({dim}, 1.0 / static_cast<double>(dim), kDouble));
    }
  } else if (type == "torchscript") {
    reward = std::make_shared<TorchScriptReward>(s.string("path"), dim);  // a module from PyTorch
  } else {
    // The mixture keys sit in the same table as type and lambda.
    Json copy = Json::object();
    for (const char* key : {"weights", "means", "std", "covariances", "components", "radius"}) {
      if (s.has(key)) copy[key] = s.value(key);
    }
    copy["type"] = s.choice("mixture", {"gmm", "ring"}, std::string("gmm"));
    // Read as [reward] itself, so that the resolved config records the mixture's defaults (radius, std, ...).
    auto q = read_mixture(s.view_of(copy));
    s.resolve("type", Json("gmm"));  // which the view recorded as the mixture's type
    if (q->dim() != dim) s.fail("means", "must have dimension " + std::to_string(dim));
    reward = std::make_shared<GmmLogDensityReward>(q);
  }
  s.finish();
  return reward;
}

int64_t read_integer_in(ConfigSection& s, const std::string& key, int64_t default_value, int64_t lo, int64_t hi) {
  return in_range(s, key, s.integer(key, default_value), lo, hi);
}
std::string with_step_offset(const std::string& spec, int64_t steps, const std::string& steps_flag) {
  if (spec != "memoryless") return spec;
  if (steps < 2) {
    throw Error(steps_flag + " " + std::to_string(steps) + ": the memoryless schedule's offset h = 1 / steps must be below "
                "1; give " + steps_flag + " 2 or more, or --noise memoryless:<h> with h in (0, 1)");
  }
  return spec + ":" + std::to_string(1.0 / static_cast<double>(steps));
}

double read_number_in(ConfigSection& s, const std::string& key, double default_value, double lo, double hi) {
  return in_range(s, key, s.number(key, default_value), lo, hi);
}

std::vector<int64_t> read_widths(ConfigSection& s, const std::string& key, std::vector<int64_t> default_widths) {
  std::vector<int64_t> widths = s.integers(key, std::move(default_widths));
  if (widths.empty()) s.fail(key, "must list at least one layer width");
  for (int64_t w : widths) {
    if (w < 1 || w > limits::kWidth) s.fail(key, "widths must be in 1.." + std::to_string(limits::kWidth) + ", got " + std::to_string(w));
  }
  return widths;
}

MlpOptions read_mlp(ConfigSection& s, int64_t dim, std::vector<int64_t> default_hidden) {
  MlpOptions o;
  o.dim = dim;
  o.hidden = read_widths(s, "hidden", std::move(default_hidden));
  o.time_features = s.integer("time_features", 16);
  if (o.time_features < 0 || o.time_features > limits::kTimeFeatures || o.time_features % 2) {
    s.fail("time_features", "must be an even number in 0.." + std::to_string(limits::kTimeFeatures));
  }
  return o;
}

UNetOptions read_unet(ConfigSection& s, int64_t height, int64_t width) {
  UNetOptions o;
  o.height = height;
  o.width = width;
  o.base_channels = s.integer("channels", o.base_channels);
  o.channel_mult = s.integers("channel_mult", o.channel_mult);
  o.blocks = s.integer("blocks", o.blocks);
  o.groups = s.integer("groups", o.groups);
  o.attention = s.boolean("attention", o.attention);
  o.time_features = s.integer("time_features", o.time_features);
  if (const auto problem = o.problem()) {
    // The key of the option at fault: base_channels is `channels`; the image's size is the data's, so a size the
    // levels cannot halve is channel_mult's to change.
    std::string key = problem->first, message = problem->second;
    if (key == "base_channels") {
      key = "channels";
      message = "channels" + message.substr(key.size() + 5);  // the message names the option, "base_channels ..."
    }
    if (key == "height") key = "channel_mult";
    s.fail(key, message);
  }
  return o;
}

void read_steps_and_batch(ConfigSection& s, int64_t& num_steps, int64_t& batch_size) {
  num_steps = in_range(s, "num_steps", s.integer("num_steps", num_steps), int64_t{2}, limits::kSteps);
  batch_size = in_range(s, "batch_size", s.integer("batch_size", batch_size), int64_t{1}, limits::kBatch);
  if (num_steps * batch_size > limits::kStepsTimesBatch) {
    s.fail("batch_size", "with num_steps = " + std::to_string(num_steps) + ": num_steps x batch_size = " +
                             std::to_string(num_steps * batch_size) + " states per simulated batch, over the limit of " +
                             std::to_string(limits::kStepsTimesBatch));
  }
}

void read_adjoint_matching_keys(ConfigSection& s, AdjointMatchingOptions& o) {
  o.loss_early_steps = s.integer("loss_early_steps", o.loss_early_steps);
  o.loss_late_steps = s.integer("loss_late_steps", o.loss_late_steps);
  if (o.loss_early_steps < 0) s.fail("loss_early_steps", "must be >= 0");
  if (o.loss_late_steps < 0) s.fail("loss_late_steps", "must be >= 0");
  // The step at t = 0 has no finite regression target (eta_t is infinite there for every schedule, alpha_0 = 0), so
  // the loss has num_steps - 1 steps to choose from; checked here, before a run directory exists.
  const int64_t trainable = o.num_steps - 1;
  if (o.loss_early_steps > trainable) {
    s.fail("loss_early_steps", "must be at most num_steps - 1 = " + std::to_string(trainable) +
                                   " (the step at t = 0 has no finite regression target)");
  }
  if (o.loss_late_steps > trainable - o.loss_early_steps) {
    s.fail("loss_late_steps", "must be at most num_steps - 1 - loss_early_steps = " +
                                  std::to_string(trainable - o.loss_early_steps) +
                                  " (the step at t = 0 has no finite regression target)");
  }
  if (o.loss_early_steps + o.loss_late_steps < 1) {
    s.fail("loss_late_steps", "loss_early_steps + loss_late_steps must be at least 1 (the steps the loss regresses on)");
  }
  o.clip_factor = s.number("clip_factor", o.clip_factor);
  if (!(o.clip_factor >= 0)) s.fail("clip_factor", "must be >= 0 (0: no clipping)");
  o.loss_weighting = s.choice("loss_weighting", {"control", "velocity"}, o.loss_weighting);
  o.final_noiseless_step = s.boolean("final_noiseless_step", o.final_noiseless_step);
  o.tape_activations = s.boolean("tape_activations", o.tape_activations);
  o.guidance = s.number("guidance", o.guidance);
  if (!(std::abs(o.guidance) <= limits::kMagnitude)) s.fail("guidance", "must be finite, of magnitude at most " + number_string(limits::kMagnitude) + " (0: no guidance in training)");
  o.guidance_adjoint = s.boolean("guidance_adjoint", o.guidance_adjoint);
  o.guidance_control = s.boolean("guidance_control", o.guidance_control);
  if (o.guidance == 0.0) {
    if (o.guidance_adjoint) s.fail("guidance_adjoint", "needs guidance != 0 (the weight of the guided base)");
    if (o.guidance_control) s.fail("guidance_control", "needs guidance != 0 (the weight of the guided difference)");
  }
}

AdjointMatchingOptions read_adjoint_matching(ConfigSection& s) {
  AdjointMatchingOptions o;
  read_steps_and_batch(s, o.num_steps, o.batch_size);
  read_adjoint_matching_keys(s, o);
  return o;
}

OdeAdjointMatchingOptions read_ode_adjoint_matching(ConfigSection& s, const AdjointMatchingOptions& am) {
  OdeAdjointMatchingOptions o;
  o.num_steps = am.num_steps;
  o.batch_size = am.batch_size;
  o.lambda = am.lambda;
  o.conditions = am.conditions;
  o.adjoint_steps = s.integer("adjoint_steps", o.adjoint_steps);
  if (o.adjoint_steps < 0 || o.adjoint_steps > o.num_steps) {
    s.fail("adjoint_steps", "must be in 0..num_steps = " + std::to_string(o.num_steps) + " (0: all steps)");
  }
  o.truncated_control = s.choice("truncated_control", {"keep", "zero"}, o.truncated_control);
  o.loss_steps = s.integer("loss_steps", o.loss_steps);
  if (o.loss_steps < 0) s.fail("loss_steps", "must be >= 0 (0: every trained step)");
  return o;
}

RegulariserPtr read_regulariser(ConfigSection& s) {
  const std::string name = s.choice("regulariser", {"quadratic", "clipped", "pnorm"}, "quadratic");
  // mu, mu_start and delta in (0, limits::kMagnitude], p in (1, 100] (docs/config.md): mu = 1e300 made
  // the regression target grad psi*(a) = a / mu vanish in float32, and |u|^p overflows for large p.
  auto positive = [&](const std::string& key, double x) {
    if (!(x > 0 && x <= limits::kMagnitude)) {
      s.fail(key, "must be in (0, " + number_string(limits::kMagnitude) + "], got " + number_string(x));
    }
    return x;
  };
  const double mu = positive("reg_weight", s.number("reg_weight", 1.0));
  const double mu_start = positive("reg_weight_start", s.number("reg_weight_start", mu));
  double delta = 0.0, p = 0.0;
  if (name == "clipped") {
    if (!s.has("reg_clip")) s.fail("reg_clip", "is required with regulariser = \"clipped\" (the largest control norm)");
    delta = positive("reg_clip", s.number("reg_clip"));
  }
  if (name == "pnorm") {
    if (!s.has("reg_power")) s.fail("reg_power", "is required with regulariser = \"pnorm\" (the power p > 1)");
    p = s.number("reg_power");
    if (!(p > 1 && p <= 100)) s.fail("reg_power", "must be in (1, 100], got " + number_string(p));
  }
  return make_regulariser(name, mu, mu_start, delta, p);
}

TrainerOptions read_trainer(ConfigSection& s, const TrainerOptions& defaults) {
  TrainerOptions o = defaults;
  o.iterations = s.integer("iterations", o.iterations);
  if (o.iterations < 0) s.fail("iterations", "must be >= 0");
  // Adam's settings reach float32 tensors; the bounds are far outside any useful value (docs/config.md).
  o.adam.lr = in_range(s, "lr", s.number("lr", o.adam.lr), limits::kLrMin, limits::kLrMax);
  o.adam.beta1 = s.number("beta1", o.adam.beta1);
  o.adam.beta2 = s.number("beta2", o.adam.beta2);
  if (!(o.adam.beta1 >= 0 && o.adam.beta1 < 1)) s.fail("beta1", "must be in [0, 1)");
  if (!(o.adam.beta2 >= 0 && o.adam.beta2 < 1)) s.fail("beta2", "must be in [0, 1)");
  o.adam.eps = in_range(s, "eps", s.number("eps", o.adam.eps), limits::kEpsMin, limits::kEpsMax);
  o.adam.weight_decay = in_range(s, "weight_decay", s.number("weight_decay", o.adam.weight_decay), 0.0, limits::kWeightDecayMax);
  o.grad_clip = s.number("grad_clip", o.grad_clip);
  if (!(o.grad_clip >= 0)) s.fail("grad_clip", "must be >= 0 (the largest gradient norm; 0: no clipping)");
  o.lr_schedule = parse_lr_schedule(s.choice("lr_schedule", {"constant", "cosine"},
                                             o.lr_schedule == LrSchedule::cosine ? "cosine" : "constant"));
  o.lr_final_factor = s.number("lr_final_factor", o.lr_final_factor);
  if (!(o.lr_final_factor > 0 && o.lr_final_factor <= 1)) s.fail("lr_final_factor", "must be in (0, 1]");
  o.checkpoint_every = s.integer("checkpoint_every", o.checkpoint_every);
  if (o.checkpoint_every < 0) s.fail("checkpoint_every", "must be >= 0");
  o.precision = parse_precision(s.choice("precision", {"float32", "bfloat16"},
                                         o.precision == Precision::bfloat16 ? "bfloat16" : "float32"));
  // 0: one shard per process (so one process draws its batch whole, as before shards existed).
  o.shards = s.integer("shards", 0);
  if (o.shards < 0) s.fail("shards", "must be >= 0 (0: one per process)");
  return o;
}

}  // namespace tilt
