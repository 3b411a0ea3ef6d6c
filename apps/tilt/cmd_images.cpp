// tilt classifier and tilt eval-images: the classifier behind the classifier reward, and metrics
// of generated images against it (target-class share, diversity, Frechet distance).
#include "commands.h"

#include "tilt/core/error.h"
#include "tilt/core/fs.h"
#include "tilt/eval/image_metrics.h"
#include "tilt/io/builders.h"
#include "tilt/io/classifier_io.h"
#include "tilt/io/samples.h"
#include "tilt/train/classification.h"
#include "tilt/train/trainer.h"

#include <ATen/ATen.h>

#include <cmath>
#include <cstdio>
#include <iostream>

namespace tilt::cli {

int run_classifier(const TrainArgs& args) {
  Config config(args.config.config, args.config.set);
  ConfigSection root = config.root();
  const RunSettings settings = read_run_settings(root);
  double holdout = 0.2;
  const auto data = read_image_data(root, &holdout);
  if (!data) throw Error("tilt classifier needs labelled images: 'data.type' must be \"digits\"");
  ConfigSection section = root.section("classifier");
  ClassifierOptions copt;
  copt.dim = data->dim();
  copt.classes = data->classes;
  copt.hidden = section.integers("hidden", copt.hidden);
  if (copt.hidden.empty()) section.fail("hidden", "must list at least one layer width");
  for (int64_t w : copt.hidden) {
    if (w < 1 || w > limits::kWidth) section.fail("hidden", "widths must be in 1.." + std::to_string(limits::kWidth) + ", got " + std::to_string(w));
  }
  ClassifierTrainingOptions topt_loss;
  topt_loss.batch_size = section.integer("batch_size", topt_loss.batch_size);
  if (topt_loss.batch_size < 1 || topt_loss.batch_size > limits::kBatch) {
    section.fail("batch_size", "must be in 1.." + std::to_string(limits::kBatch) + ", got " + std::to_string(topt_loss.batch_size));
  }
  topt_loss.input_noise = section.number("input_noise", topt_loss.input_noise);
  if (!(topt_loss.input_noise >= 0 && topt_loss.input_noise <= limits::kMagnitude)) {
    section.fail("input_noise", "must be in [0, " + number_string(limits::kMagnitude) + "]");
  }
  TrainerOptions defaults;
  defaults.iterations = 3000;
  defaults.adam = {1e-3, 0.9, 0.999, 1e-8, 0.0};
  defaults.lr_schedule = LrSchedule::cosine;
  defaults.checkpoint_every = 500;
  TrainerOptions topt = read_trainer(section, defaults);
  section.finish();
  finish_root(root);

  const DatasetSplit split = split_dataset(*data, holdout, mix_seed(settings.seed, 5));
  info("data: " + std::to_string(split.train.size()) + " training and " + std::to_string(split.test.size()) +
       " held-out images");
  const RunDirectory run = prepare_run_directory(args.out, config.resolved(), args.resume);
  auto classifier = std::make_shared<MlpClassifier>(copt, mix_seed(settings.seed, 1));
  ClassifierTraining loss(classifier, split.train, topt_loss);
  attach_to_run(topt, run, settings, args.quiet, "classifier");
  Trainer trainer(loss, topt);
  resume_if_asked(trainer, topt, run, args.resume);
  trainer.run();
  const double train_acc = classifier_accuracy(*classifier, split.train.images, split.train.labels);
  const double test_acc = classifier_accuracy(*classifier, split.test.images, split.test.labels);
  info("accuracy: " + std::to_string(train_acc) + " on training images, " + std::to_string(test_acc) +
       " on held-out images");
  save_classifier(*classifier, run.path("classifier.pt"),
                  Json{{"trained_by", "tilt classifier"}, {"train_accuracy", train_acc}, {"test_accuracy", test_acc},
                       {"iterations", trainer.iteration()}, {"input_noise", topt_loss.input_noise}});
  info("wrote " + run.path("classifier.pt"));
  report({{"classifier", run.path("classifier.pt")}, {"train_accuracy", train_acc}, {"test_accuracy", test_acc}});
  return 0;
}

int run_eval_images(const EvalImagesArgs& args) {
  if (args.samples.empty()) throw Error("give at least one --samples FILE");
  Config config(args.config.config, args.config.set);
  ConfigSection root = config.root();
  const RunSettings settings = read_run_settings(root);
  (void)settings;
  const auto data = read_image_data(root);
  if (!data) throw Error("tilt eval-images needs 'data.type' = \"digits\" (the real images of the target class)");
  ConfigSection reward = root.section("reward");
  if (!reward.has("type") || reward.string("type") != "classifier") {
    throw Error("tilt eval-images needs 'reward.type' = \"classifier\" (path, class)");
  }
  const std::string path = reward.string("path");
  const int64_t target = reward.integer("class");
  if (target < 0 || target >= data->classes) {
    reward.fail("class", "must be in 0.." + std::to_string(data->classes - 1) + " (the data set's classes)");
  }
  const double lambda = reward.number("lambda", 1.0);
  if (!(std::abs(lambda) <= limits::kLambda)) {
    reward.fail("lambda", "must be in [" + number_string(-limits::kLambda) + ", " + number_string(limits::kLambda) + "]");
  }
  reward.finish();
  finish_root(root);
  const LoadedClassifier loaded = load_classifier(path);
  const Tensor real = select_class(*data, target).images;

  Json out;
  out["class"] = target;
  out["classifier"] = path;
  const ClassSampleMetrics real_m = class_sample_metrics(real, *loaded.classifier, target, real);
  auto to_json = [](const ClassSampleMetrics& m) {
    return Json{{"n", m.n},           {"mean_reward", m.mean_reward}, {"mean_reward_se", m.reward_se},
                {"class_share", m.class_share}, {"in_class", m.in_class}, {"diversity", m.diversity},
                {"frechet", m.frechet}};
  };
  out["real"] = to_json(real_m);
  if (!args.base.empty()) {
    const Tensor xb = read_samples_csv(args.base);
    if (xb.size(1) != data->dim()) throw Error("--base file '" + args.base + "' does not hold images of this data set");
    out["target"] = to_json(tilted_target_metrics(xb, *loaded.classifier, target, lambda, real));
    out["target"]["lambda"] = lambda;
    out["target"]["from"] = args.base;
  }
  for (const std::string& file : args.samples) {
    const Tensor x = read_samples_csv(file);
    if (x.size(1) != data->dim()) {
      throw Error("samples file '" + file + "' has dimension " + std::to_string(x.size(1)) + ", the images have " +
                  std::to_string(data->dim()) + " pixels");
    }
    out["samples"][file] = to_json(class_sample_metrics(x, *loaded.classifier, target, real));
  }
  if (common_options().json) {
    report(out);
    return 0;
  }
  std::printf("target class %lld (classifier %s); real images of the class: n = %lld, diversity %.3f\n",
              static_cast<long long>(target), path.c_str(), static_cast<long long>(real_m.n), real_m.diversity);
  std::printf("%-44s %6s %16s %9s %10s %9s\n", "samples", "n", "log p(c|x)", "class %", "diversity", "Frechet");
  for (const std::string& file : args.samples) {
    const Json& s = out["samples"][file];
    std::printf("%-44s %6lld %8.3f±%-7.3f %8.1f%% %10.3f %9.3f\n", file.c_str(),
                static_cast<long long>(s["n"].get<int64_t>()), s["mean_reward"].get<double>(),
                s["mean_reward_se"].get<double>(), 100.0 * s["class_share"].get<double>(), s["diversity"].get<double>(),
                s["frechet"].get<double>());
  }
  if (out.contains("target")) {
    const Json& s = out["target"];
    std::printf("%-44s %6lld %8.3f±%-7.3f %8.1f%% %10.3f %9.3f\n", "target p* (reweighted base samples)",
                static_cast<long long>(s["n"].get<int64_t>()), s["mean_reward"].get<double>(),
                s["mean_reward_se"].get<double>(), 100.0 * s["class_share"].get<double>(), s["diversity"].get<double>(),
                s["frechet"].get<double>());
  }
  std::printf("(class %%: samples the classifier assigns to the class; diversity: mean pairwise distance among "
              "those; Frechet: all samples vs the real images of the class, in the classifier's last hidden layer%s)\n",
              out.contains("target") ? "; target p*: base samples weighted by p(c | x)^lambda, n = effective sample size" : "");
  return 0;
}

namespace {
const bool registered_classifier = add_command({"classifier", "Train an image classifier on [data] (for [reward] type = \"classifier\")",
                                                30, train_setup(run_classifier)});
const bool registered_eval_images = add_command(
    {"eval-images", "Measure generated images against the classifier of [reward]: class share, diversity, Frechet distance", 70,
     [](CLI::App& app) {
       auto args = std::make_shared<EvalImagesArgs>();
       add_config(app, args->config, true);
       add_seed_threads(app, args->config);
       app.add_option("-s,--samples", args->samples, "Samples file(s) to evaluate (repeatable)")->required();
       app.add_option("--base", args->base,
                      "Samples of the base model: also estimate the target p* ∝ p_base exp(lambda r) by reweighting them");
       return [args] { return run_eval_images(*args); };
     }});
}  // namespace

}  // namespace tilt::cli
