// tilt classifier and tilt eval-images: the classifier behind the classifier reward, and metrics
// of generated images against it (target-class share, diversity, Frechet distance).
#include "commands.h"

#include "tilt/core/error.h"
#include "tilt/core/fs.h"
#include "tilt/io/classifier_io.h"
#include "tilt/io/training.h"
#include "tilt/train/classification.h"
#include "tilt/train/trainer.h"

#include <cstdio>
#include <cstdlib>

namespace tilt::cli {

int run_classifier(const TrainArgs& args) {
  // Not data-parallel: under WORLD_SIZE > 1 each process would train alone, and race for the run directory.
  if (const char* world = std::getenv("WORLD_SIZE"); world && *world && std::string(world) != "1") {
    throw Error("tilt classifier trains in one process, but WORLD_SIZE = " + std::string(world) +
                " asks for several (pretrain and finetune train in a group); run it once, without WORLD_SIZE");
  }
  Config config(args.config.config, args.config.set);
  ConfigSection root = config.root();
  const RunSettings settings = read_run_settings(root);
  ClassifierPlan plan = read_classifier(root);
  finish_root(root);

  const DatasetSplit split = split_dataset(plan.data, plan.holdout, mix_seed(settings.seed, 5));
  info("data: " + std::to_string(split.train.size()) + " training and " + std::to_string(split.test.size()) +
       " held-out images");
  const RunDirectory run = prepare_run_directory(args.out, config.resolved(), args.resume);
  auto classifier = std::make_shared<MlpClassifier>(plan.classifier, mix_seed(settings.seed, 1));
  ClassifierTraining loss(classifier, split.train, plan.training);
  attach_to_run(plan.trainer, run, settings, args.quiet, "classifier");
  Trainer trainer(loss, plan.trainer);
  resume_if_asked(trainer, plan.trainer, run, args.resume);
  trainer.run();
  const double train_acc = classifier_accuracy(*classifier, split.train.images, split.train.labels);
  const double test_acc = classifier_accuracy(*classifier, split.test.images, split.test.labels);
  info("accuracy: " + std::to_string(train_acc) + " on training images, " + std::to_string(test_acc) +
       " on held-out images");
  save_classifier(*classifier, run.path("classifier.pt"),
                  Json{{"trained_by", "tilt classifier"}, {"train_accuracy", train_acc}, {"test_accuracy", test_acc},
                       {"iterations", trainer.iteration()}, {"input_noise", plan.training.input_noise}});
  info("wrote " + run.path("classifier.pt"));
  report({{"classifier", run.path("classifier.pt")}, {"train_accuracy", train_acc}, {"test_accuracy", test_acc}});
  return 0;
}

int run_eval_images(const EvalImagesArgs& args) {
  if (args.samples.empty()) throw Error("give at least one --samples FILE");
  Config config(args.config.config, args.config.set);
  ConfigSection root = config.root();
  read_run_settings(root);
  const ImageEvaluation setup = read_image_evaluation(root);
  finish_root(root);
  if (!args.json_file.empty()) {  // refused before the evaluation, which can take minutes
    std::vector<std::pair<std::string, std::string>> inputs{
        {"--config", args.config.config}, {"--base", args.base}, {"--unseen", args.unseen}};
    for (const std::string& s : args.samples) inputs.emplace_back("--samples", s);
    for (const auto& [key, path] : config_files(config.resolved())) inputs.emplace_back("'" + key + "'", path);
    refuse_output_over_input("--json-file", args.json_file, inputs);
  }
  const Json out = evaluate_images(setup, args.samples, args.base, args.unseen);
  if (!args.json_file.empty()) atomic_write(args.json_file, out.dump() + "\n");
  if (common_options().json) {
    report(out);
  } else {
    std::printf("%s", image_evaluation_text(out, args.samples).c_str());
  }
  return 0;
}

namespace {
const bool registered_classifier = add_command({"classifier", "Train an image classifier on [data] (for [reward] type = \"classifier\")",
                                                30, train_setup(run_classifier, "classifier.pt, checkpoint.pt, metrics.jsonl, config.resolved.json, inputs.json, run.lock", false)});
const bool registered_eval_images = add_command(
    {"eval-images",
     "Measure generated images against the classifier of [reward]: class share, diversity, Frechet distance (per class "
     "for a class-conditional model's samples)",
     70,
     [](CLI::App& app) {
       auto args = std::make_shared<EvalImagesArgs>();
       add_config(app, args->config, true);
       add_seed_threads(app, args->config);
       app.add_option("-s,--samples", args->samples, "Samples file(s) to evaluate (repeatable)")->required();
       app.add_option("--base", args->base,
                      "Samples of the base model: also estimate the target p* ∝ p_base exp(lambda r) by reweighting them");
       app.add_option("--unseen", args->unseen,
                      "A second classifier file (tilt classifier), never used in training: also report each file's class "
                      "share and mean log p(c|x) under it");
       app.add_option("--json-file", args->json_file,
                      "Also write the result as JSON (what --json prints) to this file, atomically, beside the table");
       return [args] { return run_eval_images(*args); };
     }});
}  // namespace

}  // namespace tilt::cli
