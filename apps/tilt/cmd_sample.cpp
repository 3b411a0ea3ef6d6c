// tilt sample, tilt eval, tilt plot: draw samples, measure them against the exact target, draw them
// (the library's tilt/io/sample_sets.h).
#include "commands.h"

#include "tilt/io/sample_sets.h"

#include <cstdio>

namespace tilt::cli {
namespace {

const bool registered_sample = add_command(
    {"sample", "Draw samples from a model file, or exact samples of a config's base or target", 40, [](CLI::App& app) {
       auto args = std::make_shared<std::pair<ConfigArgs, DrawOptions>>();
       auto& [config, o] = *args;
       app.add_option("-m,--model", o.model, "Model file (model.pt of a run)");
       app.add_option("--exact", o.exact, "Exact samples instead: 'base' or 'target' (needs --config; takes no sampler options)");
       add_config(app, config, false);
       app.add_option("-n,--n", o.n, "Number of samples")->capture_default_str();
       app.add_option("--noise", o.noise,
                      "Noise schedule: memoryless[:h], constant:<sigma>, scaled_memoryless:<s>, ode "
                      "(default: the one the model was fine-tuned with)");
       app.add_option("--steps", o.steps, "Time steps (default 100)");
       app.add_option("--integrator", o.integrator,
                      "euler, heun (ODE only), exact (the gDDIM step; noise memoryless, scaled_memoryless:<gamma> or ode), "
                      "or auto")->capture_default_str();
       app.add_option("--precision", o.precision,
                      "float32, or bfloat16: the model's evaluations under bfloat16 autocast (faster where the device has "
                      "bfloat16 units; docs/devices.md)")->capture_default_str();
       CLI::Option* condition =
           app.add_option("--condition", o.condition, "A conditional model or config: the condition, comma-separated numbers");
       CLI::Option* conditions =
           app.add_option("--conditions", o.conditions, "... or a CSV file of conditions, one per line (-n samples at each)");
       app.add_option("--guidance", o.guidance, "Classifier-free guidance weight w: (1 + w) v(x, t | c) - w v(x, t | null)")
           ->capture_default_str();
       add_seed_threads(app, config);
       app.add_option("-o,--out", o.out, "File: the samples (CSV; a conditional model's with columns c0, c1, ...)")->required();
       app.add_option("--png", o.png, "Also draw the samples (first two coordinates) to this PNG");
       app.add_option("--batch", o.batch,
                      "Draw a model's samples this many at a time (0: all at once): bounds the memory; the samples then "
                      "depend on it as on the seed")->capture_default_str();
       app.add_flag_function("-q,--quiet", [args](int64_t) { args->second.progress = false; }, "No progress bar");
       return [args, condition, conditions] {
         auto& [config, o] = *args;
         // Given empty (a shell variable that was not set), they would read as not given: every training condition.
         if (condition->count() > 0 && o.condition.empty()) throw Error("--condition is empty: give its numbers, e.g. 1,0");
         if (conditions->count() > 0 && o.conditions.empty()) throw Error("--conditions is empty: give a CSV file");
         o.config = config.config;
         o.set = config.set;
         o.seed = config.seed.value_or(0);
         o.threads = static_cast<int>(config.threads.value_or(0));
         const DrawnSamples d = write_samples(o);
         info("wrote " + std::to_string(d.x.size(0)) + " " + d.what + " to " + o.out);
         if (!o.png.empty()) info("wrote " + o.png);
         report({{"samples", o.out}, {"n", d.x.size(0)}, {"png", o.png.empty() ? Json() : Json(o.png)}});
         return 0;
       };
     }});

const bool registered_eval = add_command(
    {"eval", "Measure sample sets against the exact target p* of a config", 60, [](CLI::App& app) {
       auto args = std::make_shared<std::pair<ConfigArgs, EvalOptions>>();
       auto& [config, o] = *args;
       add_config(app, config, true);
       app.add_option("-s,--samples", o.samples, "Samples file(s) to evaluate (repeatable)")->required();
       app.add_option("--reference", o.reference, "Reference samples, when the config has no exact target");
       app.add_option("--replicates", o.replicates, "Fresh target sets per distance")->capture_default_str();
       app.add_option("--max-n", o.max_n,
                      "Score each file on at most N of its rows, drawn at random (seeded); the noise floor is then for N");
       app.add_option("--condition", o.condition, "A conditional config: the condition of files without columns c0, ...");
       app.add_flag_function("-q,--quiet", [args](int64_t) { args->second.progress = false; }, "No progress bar");
       add_seed_threads(app, config);
       return [args] {
         auto& [config, o] = *args;
         check_eval_options(o);  // before the config is read, as the flags come first
         Config file(config.config, config.set);
         const Json result = evaluate_sample_files(file, o);
         if (common_options().json) report(result);
         else std::printf("%s", evaluation_text(result, o).c_str());
         return 0;
       };
     }});

const bool registered_plot = add_command(
    {"plot", "Draw sample sets side by side (first two coordinates) to a PNG", 90, [](CLI::App& app) {
       auto o = std::make_shared<PlotOptions>();
       app.add_option("panels", o->panels, "Samples files, each FILE or FILE:TITLE")->required();
       app.add_option("-o,--out", o->out, "File: the PNG")->required();
       app.add_option("--title", o->title, "Figure title");
       app.add_option("--columns", o->columns, "Panels per row (0: one row)");
       app.add_option("--size", o->size, "Panel size in pixels")->capture_default_str();
       app.add_option("--images", o->images, "Draw each sample as an image of HxW pixels (e.g. 8x8) instead of a point");
       app.add_option("--max-images", o->max_images, "Images per panel with --images")->capture_default_str();
       app.add_option("--by-condition", o->by_condition,
                      "K: with --images, one row per condition (the c0, c1, ... columns of a conditional model's samples, "
                      "e.g. one row per digit), K images each, the conditions in the order they first appear "
                      "(not automatic: without it the images are drawn in file order)");
       return [o] {
         plot_sample_files(*o);
         info("wrote " + o->out);
         report({{"png", o->out}});
         return 0;
       };
     }});

}  // namespace
}  // namespace tilt::cli
