#include "tilt/io/run.h"
#include "tilt/model/conditional_gmm.h"

#include "tilt/core/log.h"

#include "tilt/core/check.h"
#include "tilt/core/error.h"
#include "tilt/core/fs.h"
#include "tilt/io/builders.h"
#include "tilt/io/methods.h"
#include "tilt/io/datasets.h"
#include "tilt/io/model_io.h"
#include "tilt/io/plot.h"
#include "tilt/model/mlp.h"
#include "tilt/model/torchscript.h"
#include "../core/checksum.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <sstream>
#include <thread>

namespace tilt {

void set_threads(int threads) {
  // read_run_settings has already named the config key; the other callers pass --threads.
  if (threads < 0 || threads > kMaxThreads) {
    throw Error("--threads must be in 0.." + std::to_string(kMaxThreads) + " (0: all cores), got " + std::to_string(threads));
  }
  int n = threads;
  if (n <= 0) {
    n = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    // Several processes on one machine share its cores (torchrun sets LOCAL_WORLD_SIZE).
    if (const char* local = std::getenv("LOCAL_WORLD_SIZE")) {
      const int processes = std::atoi(local);
      if (processes > 1) n = std::max(1, n / processes);
    }
  }
  at::set_num_threads(n);
  keep_cpu_memory();  // a TILT_MALLOC that is neither unset nor "system" stops here, before anything is written
  matrix_library();  // and so does a TILT_GEMM that cannot be honoured
}

void check_in_range(const std::string& name, int64_t value, int64_t lo, int64_t hi) {
  if (value < lo || value > hi) {
    throw Error(name + " must be in " + std::to_string(lo) + ".." + std::to_string(hi) + ", got " + std::to_string(value));
  }
}

void check_number_in_range(const std::string& name, double value, double lo, double hi) {
  if (!(value >= lo && value <= hi)) {
    throw Error(name + " must be in [" + number_string(lo) + ", " + number_string(hi) + "], got " + number_string(value));
  }
}

void finish_config_root(ConfigSection& root) {
  root.allow({"seed", "threads", "device", "schedule", "data", "base", "reward", "pretrain", "finetune", "classifier", "soc", "conditions"});
  root.finish();
}

ProcessGroupPtr join_group(double timeout_seconds) {
  std::optional<DistributedOptions> options = distributed_options_from_env();
  if (!options) return nullptr;
  options->timeout_seconds = timeout_seconds;
  ProcessGroupPtr group = ProcessGroup::connect(*options);
  set_messages_silent(group->rank() != 0);
  note("distributed: " + std::to_string(group->world_size()) + " processes (Gloo), rendezvous at " +
       options->master_addr + ":" + std::to_string(options->master_port) + "; rank 0 writes the files");
  return group;
}

bool is_writer(const ProcessGroupPtr& group) { return !group || group->rank() == 0; }

int64_t effective_shards(int64_t shards, const ProcessGroupPtr& group) {
  return shards > 0 ? shards : (group ? group->world_size() : 1);
}

namespace {
// The process's device (--device, or the config's device): like the threads, the machine's business.
at::Device g_device(at::kCPU);
bool g_device_from_flag = false;
}  // namespace

RunSettings read_run_settings(ConfigSection& root) {
  RunSettings s;
  const int64_t seed = root.integer("seed", 0);
  if (seed < 0) root.fail("seed", "must be >= 0");
  s.seed = static_cast<uint64_t>(seed);
  // Checked before the narrowing to int, which read 2^32 + 1 as 1.
  const int64_t threads = root.integer("threads", 0);
  if (threads < 0 || threads > kMaxThreads) {
    root.fail("threads", "must be in 0.." + std::to_string(kMaxThreads) + " (0: all cores), got " + std::to_string(threads));
  }
  s.threads = static_cast<int>(threads);
  set_threads(s.threads);
  if (root.has("device")) {
    const std::string name = root.string("device");
    if (!g_device_from_flag) {
      try {
        g_device = parse_device(name, "device");
      } catch (const Error& e) {
        const std::string message = e.what();  // "device ...": fail() names the key itself
        root.fail("device", message.rfind("device ", 0) == 0 ? message.substr(7) : message);
      }
    }
  }
  s.device = g_device;
  return s;
}

void set_run_device(const at::Device& device, bool from_flag) {
  g_device = device;
  g_device_from_flag = g_device_from_flag || from_flag;
}

at::Device run_device() { return g_device; }

std::shared_ptr<GaussianMixture> read_data_mixture(ConfigSection& root, Tensor* shift) {
  ConfigSection data = root.section("data");
  if (data.has("type") && (data.string("type") == "csv" || is_image_data_type(data.string("type")))) {
    data.allow({"path", "holdout", "limit"});
    return nullptr;
  }
  Tensor M;
  if (data.has("shift")) {
    if (!shift) data.fail("shift", "makes the data conditional, which only [base] type = \"exact\", tilt finetune and tilt eval use");
    M = read_table(data, "shift", 0, 0);
  }
  auto mixture = read_mixture(data);
  if (M.defined() && M.size(0) != mixture->dim()) {
    data.fail("shift", "must have " + std::to_string(mixture->dim()) + " rows (the data dimension), got " + std::to_string(M.size(0)));
  }
  if (shift) *shift = M;
  return mixture;
}

bool is_image_data_type(const std::string& type) { return type == "digits" || type == "fashion_mnist"; }

std::optional<ImageDataset> read_image_data(ConfigSection& root, double* holdout) {
  if (!root.has("data")) return std::nullopt;
  ConfigSection data = root.section("data");
  if (!data.has("type") || !is_image_data_type(data.string("type"))) return std::nullopt;
  const bool fashion = data.string("type") == "fashion_mnist";
  const std::string path = data.string("path", fashion ? kFashionMnistDir : "data/digits/digits.csv.gz");
  if (path.empty()) data.fail("path", fashion ? "must name the Fashion-MNIST directory" : "must name a data file");
  const double h = data.number("holdout", fashion ? 0.1 : 0.2);
  if (!(h > 0.0 && h < 1.0)) data.fail("holdout", "must be in (0, 1)");
  if (holdout) *holdout = h;
  const int64_t limit = data.integer("limit", 0);
  if (limit < 0) data.fail("limit", "must be >= 0 (0: every image; n: the first n)");
  data.finish();
  ImageDataset d = fashion ? load_fashion_mnist(path, "train", limit) : load_digits(path);
  if (!fashion && limit > 0 && limit < d.size()) {
    d.images = d.images.narrow(0, 0, limit).clone();
    d.labels = d.labels.narrow(0, 0, limit).clone();
  }
  return d;
}

VelocityFieldPtr read_base(ConfigSection& root) {
  ConfigSection base = root.section("base");
  const std::string type = base.choice("type", {"exact", "model", "torchscript"});
  if (type == "torchscript") {
    // A module exported from PyTorch; it was trained with the reference flow of [schedule].
    TorchScriptOptions o;
    const std::string path = base.string("path");
    if (path.empty()) base.fail("path", "must name a TorchScript file");
    o.prediction = parse_prediction(base.choice("prediction", {"velocity", "epsilon", "score"}, "velocity"));
    o.dim = base.integer("dim", 0);
    if (o.dim < 0) base.fail("dim", "must be >= 1 (or 0: the module's attribute dim)");
    o.t_min = base.number("t_min", o.t_min);
    if (!(o.t_min >= 0 && o.t_min < 0.5)) base.fail("t_min", "must be in [0, 0.5)");
    base.finish();
    const SchedulePtr schedule = read_schedule(root.section("schedule", /*optional=*/true));
    std::shared_ptr<TorchScriptVelocity> field;
    try {
      field = TorchScriptVelocity::load(path, schedule, o);
    } catch (const Error& e) {  // the module's dimension against base.dim
      const std::string msg = e.what();
      if (msg.find("dim") == std::string::npos) throw;
      throw Error("in " + base.origin() + ": '" + base.where("dim") + "'" +
                  (o.dim > 0 ? " = " + std::to_string(o.dim) : std::string(" is not given")) + ": " + msg);
    }
    field->set_trainable(false);
    return field;
  }
  if (type == "model") {
    const std::string path = base.string("path");
    if (path.empty()) base.fail("path", "must name a model file");
    base.finish();
    LoadedModel loaded = load_velocity(path);
    if (root.has("schedule")) {
      const SchedulePtr schedule = read_schedule(root.section("schedule"));
      if (schedule->name() != loaded.field->schedule()->name()) {
        throw Error("the base model '" + path + "' uses the " + loaded.field->schedule()->name() +
                    " schedule but the config's 'schedule.type' says " + schedule->name() + " (remove [schedule] or fix it)");
      }
    }
    return loaded.field;
  }
  // The exact base's null condition (for guidance): none, or the average of p_base(. | c) over the training
  // conditions, what a network pretrained with condition dropout learns (docs/equations.md, E98, E100).
  const std::string null = base.choice("null", {"none", "average"}, "none");
  base.finish();
  const SchedulePtr schedule = read_schedule(root.section("schedule", /*optional=*/true));
  Tensor shift;
  auto mixture = read_data_mixture(root, &shift);
  if (!mixture) throw Error("[base] type = \"exact\" needs [data] to be a Gaussian mixture (type gmm or ring)");
  if (!shift.defined()) {
    if (null != "none") base.fail("null", "needs a conditional base ([data] shift): an unconditional one has no condition");
    return std::make_shared<GmmVelocity>(mixture, schedule);
  }
  const auto field = std::make_shared<ConditionalGmmVelocity>(mixture, shift, schedule);
  if (null == "none") return field;
  if (!root.has("conditions")) base.fail("null", "= \"average\" needs [conditions] (the training conditions to average over)");
  const ConditionSetPtr train = read_conditions(root.section("conditions"), shift.size(1)).train;
  if (train->is_box()) base.fail("null", "= \"average\" needs a finite set of training conditions, not a uniform box");
  return std::make_shared<ConditionalGmmVelocity>(mixture, shift, schedule,
                                                  std::make_shared<GaussianMixture>(field->marginal(*train)));
}

ConditionSetPtr read_training_conditions(ConfigSection& root, const VelocityField& base) {
  const int64_t dc = base.condition_dim();
  if (dc == 0 && !root.has("conditions")) return nullptr;
  if (dc == 0) throw Error("[conditions] is given, but the base model of [base] is unconditional (it takes no condition)");
  if (!root.has("conditions")) {
    throw Error("the base model of [base] is conditional (a condition of " + std::to_string(dc) +
                " numbers): fine-tuning needs [conditions] with train, classes or file (docs/conditions.md)");
  }
  return read_conditions(root.section("conditions"), dc).train;
}

std::optional<ConditionalExactProblem> read_conditional_exact_problem(ConfigSection& root, std::string* why) {
  ConditionalExactProblem p;
  p.mixture = read_data_mixture(root, &p.shift);
  if (!p.mixture) {
    if (why) *why = "[data] is not a Gaussian mixture";
    return std::nullopt;
  }
  p.reward = read_reward(root.section("reward"), p.mixture->dim(), &p.lambda);
  if (p.shift.defined() && p.reward->condition_dim() > 0 && p.reward->condition_dim() != p.shift.size(1)) {
    throw Error("[data] shift moves the data with a condition of " + std::to_string(p.shift.size(1)) +
                " numbers, but [reward] takes " + std::to_string(p.reward->condition_dim()));
  }
  return p;
}

std::optional<GaussianMixture> exact_target(const Reward& reward, const GaussianMixture& base, double lambda,
                                            double* log_z) {
  try {
    return exact_tilt(reward, base, lambda, log_z);
  } catch (const Error& e) {
    throw Error("[reward] (" + reward.kind() + ", lambda = " + number_string(lambda) + "): the target p* of p_base " +
                "exp(lambda r) cannot be formed: " + e.what());
  }
}

int64_t ConditionalExactProblem::condition_dim() const {
  return shift.defined() ? shift.size(1) : reward->condition_dim();
}

std::optional<ExactProblem> ConditionalExactProblem::bound_at(const Tensor& condition, std::string* why) const {
  ExactProblem p;
  p.base = mixture;
  p.reward = reward;
  p.lambda = lambda;
  const int64_t dc = condition_dim();
  if (dc > 0 && !condition.defined()) {
    if (why) *why = "the problem is conditional: its target p*(. | c) needs a condition (--condition)";
    return std::nullopt;
  }
  if (condition.defined()) {
    if (dc == 0) throw Error("a condition was given, but the config's data and reward take none");
    if (condition.numel() != dc) {
      throw Error("the condition has " + std::to_string(condition.numel()) + " numbers, but the config's problem takes " +
                  std::to_string(dc));
    }
    const Tensor c = condition.to(at::kDouble).reshape({1, dc});
    if (shift.defined()) p.base = std::make_shared<GaussianMixture>(moved_mixture(*mixture, shift, c));  // E98
    if (const auto* moving = dynamic_cast<const ConditionalMixtureTilt*>(reward.get())) p.reward = moving->at(c);
    else if (reward->condition_dim() > 0) p.reward = bind_condition(reward, c);
  }
  return p;
}

std::optional<ExactProblem> ConditionalExactProblem::at(const Tensor& condition, std::string* why) const {
  std::optional<ExactProblem> bound = bound_at(condition, why);
  if (!bound) return std::nullopt;
  ExactProblem& p = *bound;
  auto tilted = exact_target(*p.reward, *p.base, p.lambda, &p.log_z);
  if (!tilted) {
    if (why) *why = "the " + p.reward->kind() + " reward with lambda = " + std::to_string(p.lambda) + " has no closed-form tilt";
    return std::nullopt;
  }
  p.target = std::make_shared<GaussianMixture>(*tilted);
  return p;
}

std::optional<ExactProblem> read_exact_problem(ConfigSection& root, std::string* why, const Tensor& condition) {
  const auto problem = read_conditional_exact_problem(root, why);
  if (!problem) return std::nullopt;
  return problem->at(condition, why);
}

namespace {

// The files a training run writes in its directory (plots aside).
const char* const kRunOutputs[] = {"config.resolved.json", "inputs.json", "checkpoint.pt", "model.pt", "metrics.jsonl",
                                   "samples.csv", "eval.json", "eval.txt"};

// What a file holds, cheaply told apart: its size and CRC-32.
Json file_fingerprint(const std::string& path) {
  const std::string bytes = read_file(path, "input file");
  return Json{{"bytes", bytes.size()}, {"crc32", crc32_bytes(bytes)}};
}

// The files a run's config names (the values of its `path` and `file` keys: a base model, a reward's module or
// classifier, a data file, a conditions file), each with its fingerprint. A directory is fingerprinted by the files its
// reader reads (Fashion-MNIST's training images and labels), not by whatever else lies in it; a pipe is not read twice.
// Written to inputs.json when the run starts, compared on --resume.
Json input_fingerprints(const Json& resolved) {
  Json out = Json::object();
  for (const auto& [key, path] : config_files(resolved)) {
    const std::string last = key.substr(key.rfind('.') + 1);
    if (last != "path" && last != "file") continue;
    std::error_code ec;
    const std::filesystem::file_status status = std::filesystem::status(path, ec);
    if (std::filesystem::is_regular_file(status)) {
      out[key] = file_fingerprint(path);
    } else if (std::filesystem::is_directory(status) && key == "data.path" &&
               resolved["data"].value("type", std::string()) == "fashion_mnist") {
      Json files = Json::object();
      for (const std::string& file : fashion_mnist_files(path)) {
        files[std::filesystem::path(file).filename().string()] = file_fingerprint(file);
      }
      out[key] = Json{{"directory", files}};
    }
  }
  return out;
}

// A resumed run must read what it began with: an input file replaced since (another base, classifier or data set
// behind the same path) would continue the run on another problem, unnoticed by the config's text. A run started
// before inputs.json existed is not checked. `now`: input_fingerprints of the config as resumed.
void check_same_inputs(const RunDirectory& run, const Json& resolved, const Json& now) {
  const std::string path = run.path("inputs.json");
  if (!file_exists(path)) return;
  const Json before = Json::parse(read_file(path, "inputs record"), nullptr, false);
  const auto well_formed = [](const Json& entry) {
    return entry.is_object() && (!entry.contains("directory") || entry["directory"].is_object());
  };
  if (before.is_discarded() || !before.is_object() ||
      !std::all_of(before.begin(), before.end(), well_formed)) {
    throw Error("--resume: '" + path + "' is corrupt (remove it to resume without checking the inputs)");
  }
  for (auto it = before.begin(); it != before.end(); ++it) {
    const std::string& key = it.key();
    if (now.contains(key) && now[key] == it.value()) continue;
    const Json* value = &resolved;  // the path the config gives now, for the message
    std::istringstream parts(key);
    for (std::string part; value && std::getline(parts, part, '.');) {
      value = value->is_object() && value->contains(part) ? &(*value)[part] : nullptr;
    }
    const std::string file = value ? value->dump() : std::string("(not given)");
    std::string what = "is missing now";
    if (now.contains(key)) {
      what = "has changed since the run started";
      if (it.value().contains("directory") && now[key].contains("directory")) {
        const Json &a = it.value()["directory"], &b = now[key]["directory"];
        for (auto f = a.begin(); f != a.end(); ++f) {
          if (!b.contains(f.key()) || b[f.key()] != f.value()) {
            what = "has changed since the run started: its file '" + f.key() + "' is " +
                   (b.contains(f.key()) ? "different" : "gone");
            break;
          }
        }
      }
    }
    throw Error("--resume: the input '" + key + "' = " + file + " " + what +
                " (inputs.json of '" + run.dir + "' records what the run began with); resuming would continue the run on "
                "other inputs: restore it, or start a new run in another --out (or, if the change does not matter, remove "
                "inputs.json to resume unchecked)");
  }
}

void add_config_files(const Json& node, const std::string& key, std::vector<std::pair<std::string, std::string>>& out) {
  if (node.is_object()) {
    for (auto it = node.begin(); it != node.end(); ++it) {
      add_config_files(it.value(), key.empty() ? it.key() : key + "." + it.key(), out);
    }
  } else if (node.is_string() && file_exists(node.get<std::string>())) {
    out.emplace_back(key, node.get<std::string>());
  }
}

// A file the configuration reads (a base model, a reward module, a data set) must not be one the
// run will overwrite: `-o` pointed at the directory of its own base would destroy the base.
void refuse_inputs_among_outputs(const RunDirectory& run, const Json& resolved) {
  for (const auto& [key, path] : config_files(resolved)) {
    for (const char* name : kRunOutputs) {
      if (same_file(path, run.path(name))) {
        throw Error("'" + key + "' = '" + path + "' is a file this run writes in '" + run.dir +
                    "': it would be overwritten; copy it elsewhere or choose another --out");
      }
    }
  }
}

// Whether the directory holds a run that got as far as a checkpoint or a model. A run that stopped
// before its first checkpoint (a NaN at iteration 3, a bad value) holds nothing worth keeping.
bool holds_trained_run(const RunDirectory& run) {
  return file_exists(run.path("checkpoint.pt")) || file_exists(run.path("model.pt"));
}

void add_differing_keys(const Json& a, const Json& b, const std::string& prefix, std::vector<std::string>& out) {
  if (!a.is_object() || !b.is_object()) {
    if (a != b) out.push_back(prefix.empty() ? std::string("<root>") : prefix);
    return;
  }
  for (auto it = b.begin(); it != b.end(); ++it) {
    const std::string key = prefix.empty() ? it.key() : prefix + "." + it.key();
    if (!a.contains(it.key())) out.push_back(key);
    else add_differing_keys(a[it.key()], it.value(), key, out);
  }
  for (auto it = a.begin(); it != a.end(); ++it) {
    if (!b.contains(it.key())) out.push_back(prefix.empty() ? it.key() : prefix + "." + it.key());
  }
}

// The keys of the method's table as [finetune.<method>] holds them. A run started before the per-method tables
// has them all in [finetune] (config.resolved.json records every key read, default or given); the same config
// read now puts the defaults in the table. Moving them makes the two compare equal.
Json with_method_table(Json j) {
  if (!j.contains("finetune") || !j["finetune"].is_object()) return j;
  Json& f = j["finetune"];
  if (!f.contains("method") || !f["method"].is_string()) return j;
  const std::string method = f["method"].get<std::string>();
  if (f.contains(method) && !f[method].is_object()) return j;  // damaged: it will differ, and be named
  for (const FinetuneMethod& m : finetune_methods()) {
    if (m.name != method) continue;
    for (const std::string& key : m.keys) {
      if (f.contains(key) && !f[key].is_object()) {
        f[method][key] = f[key];
        f.erase(key);
      }
    }
  }
  return j;
}

// The tables whose optimisation settings may change on resume: the training sections and their method tables.
std::vector<std::string> mutable_tables(const Json& j) {
  std::vector<std::string> tables;
  for (const char* section : {"finetune", "pretrain", "adjoint_sampling"}) {
    if (!j.contains(section) || !j[section].is_object()) continue;
    tables.push_back(section);
    for (auto it = j[section].begin(); it != j[section].end(); ++it) {
      if (it.value().is_object()) tables.push_back(std::string(section) + "/" + it.key());
    }
  }
  return tables;
}

// Optimisation settings may change on resume (e.g. a lower lr after a NaN, more iterations);
// everything that defines the model and the problem must stay as it was.
void check_same_problem(const RunDirectory& run, const Json& resolved) {
  const std::string config_path = run.path("config.resolved.json");
  Json before = Json::parse(read_file(config_path, "resolved config"), nullptr, false);
  if (before.is_discarded() || !before.is_object()) throw Error("--resume: '" + config_path + "' is corrupt");
  static const char* kMutable[] = {"iterations", "lr", "beta1", "beta2", "eps", "weight_decay", "grad_clip",
                                   "lr_schedule", "lr_final_factor", "checkpoint_every", "clip_factor",
                                   "shards", "early_stop", "early_stop_window", "early_stop_tolerance",
                                   "early_stop_min_iterations", "precision"};
  Json a = with_method_table(before), b = with_method_table(resolved);
  // Keys that came later, with the value that reads as a run started before them did: such a run resumes.
  static const std::pair<const char*, const char*> kAddedLater[] = {
      {"/data/std", "1.0"}, {"/energy/std", "1.0"}, {"/reward/std", "1.0"},  // a mixture's default std
      {"/classifier/activation", "\"silu\""},
      {"/finetune/preset", "\"paper\""},
      {"/finetune/adjoint_matching/dsm_until", "0.0"},
      {"/finetune/adjoint_matching/dsm_rollout", "\"euler\""},
      {"/finetune/adjoint_matching/dsm_rollout_steps", "0"},
      {"/finetune/adjoint_matching/buffer_size", "0"},
      {"/finetune/adjoint_matching/buffer_passes", "10"},
      {"/finetune/adjoint_matching/buffer_weights", "\"future\""},
      {"/finetune/adjoint_matching/integrator", "\"euler\""},
      {"/finetune/adjoint_matching/target", "\"continuous\""},
      {"/reward/mixture", "\"gmm\""}, {"/reward/radius", "3.0"}};  // a mixture reward's defaults, recorded since 2026-12-08
  for (const auto& [key, then] : kAddedLater) {
    const Json::json_pointer at(key);
    if (!a.contains(at) && b.contains(at) && b[at] == Json::parse(then)) b[at.parent_pointer()].erase(at.back());
  }
  const Json::json_pointer weights("/reward/weights");  // and its equal weights, one per component
  if (!a.contains(weights) && b.contains(weights) && b[weights].is_array() &&
      std::all_of(b[weights].begin(), b[weights].end(), [](const Json& w) { return w == Json(1.0); })) {
    b["reward"].erase("weights");
  }
  std::string changed;
  // The threads of this process (--threads, or the config's) are the machine's business, not the run's.
  if (a.contains("threads") && b.contains("threads") && a["threads"] != b["threads"]) {
    changed = "threads " + a["threads"].dump() + " -> " + b["threads"].dump();
  }
  a.erase("threads");
  b.erase("threads");
  // So is the device: a run started on a GPU may resume on the CPU, and the other way.
  a.erase("device");
  b.erase("device");
  for (const std::string& table : mutable_tables(b)) {
    const Json::json_pointer at("/" + table);
    if (!a.contains(at) || !a[at].is_object()) continue;
    Json &ta = a[at], &tb = b[at];
    std::string name = table;
    std::replace(name.begin(), name.end(), '/', '.');
    for (const char* key : kMutable) {
      if (ta.contains(key) && tb.contains(key) && ta[key] != tb[key]) {
        changed += (changed.empty() ? "" : ", ") + name + "." + key + " " + ta[key].dump() + " -> " + tb[key].dump();
      }
      ta.erase(key);
      tb.erase(key);
    }
  }
  if (a != b) {
    std::string keys;
    for (const std::string& key : differing_keys(a, b)) keys += (keys.empty() ? "" : ", ") + key;
    throw Error("--resume: the configuration differs from the one '" + run.dir + "' was started with (in: " + keys +
                "); only optimisation settings may change. Compare with " + config_path);
  }
  if (!changed.empty()) note("resuming with changed settings: " + changed);
}

}  // namespace

std::vector<std::pair<std::string, std::string>> config_files(const Json& resolved) {
  std::vector<std::pair<std::string, std::string>> out;
  add_config_files(resolved, "", out);
  return out;
}

std::vector<std::string> differing_keys(const Json& a, const Json& b) {
  std::vector<std::string> out;
  add_differing_keys(a, b, "", out);
  return out;
}

RunDirectory prepare_run_directory(const std::string& dir, const Json& resolved, bool resume) {
  if (dir.empty()) throw Error("--out is required: the directory for this run's files");
  RunDirectory run{dir, nullptr, ""};
  const std::string config_path = run.path("config.resolved.json");
  if (file_exists(dir) && !std::filesystem::is_directory(dir)) {
    throw Error("--out '" + dir + "' is a file, not a directory");
  }
  refuse_inputs_among_outputs(run, resolved);
  // Checked once before anything is written (so that a refused command creates nothing) and again
  // under the lock (so that two processes cannot both pass).
  const auto check = [&] {
    if (resume && !file_exists(config_path)) {
      throw Error("--resume: '" + dir + "' holds no run to resume (no config.resolved.json)");
    }
    // A run writes checkpoint.pt before model.pt, so a model without its checkpoint was finished and its
    // checkpoint removed since: training it again from iteration 0 would replace the finished model.
    if (resume && file_exists(run.path("model.pt")) && !file_exists(run.path("checkpoint.pt"))) {
      throw Error("--resume: '" + dir + "' holds model.pt but no checkpoint.pt to continue from; rerunning it " +
                  "from the start would replace that model. Choose another --out, or remove model.pt to retrain");
    }
    if (!resume && holds_trained_run(run)) {
      throw Error("'" + dir + "' already holds a run; use --resume to continue it, or choose another --out");
    }
  };
  check();
  const Json inputs = input_fingerprints(resolved);  // read before the lock: an unreadable input creates nothing
  run.lock = std::make_shared<DirectoryLock>(dir);  // a second writer is refused, naming this process
  check();
  remove_stale_temporaries_in(dir);  // left by a process killed while writing
  const std::string text = resolved.dump(2) + "\n";
  if (resume && holds_trained_run(run)) {
    check_same_problem(run, resolved);
    check_same_inputs(run, resolved, inputs);
    // Written once the checkpoint has been read (resume_if_asked): a failed resume changes nothing.
    run.pending_config = text;
    return run;
  }
  if (file_exists(config_path)) {
    note("'" + dir + "' holds a run that stopped before its first checkpoint; starting it afresh");
  }
  std::error_code ec;
  if (!inputs.empty()) atomic_write(run.path("inputs.json"), inputs.dump(2) + "\n");
  else std::filesystem::remove(run.path("inputs.json"), ec);  // none: nothing to check (an earlier start's goes)
  atomic_write(config_path, text);
  return run;
}

void attach_to_run(TrainerOptions& topt, const RunDirectory& run, const RunSettings& settings, bool quiet,
                   const std::string& label, const ProcessGroupPtr& group) {
  topt.seed = mix_seed(settings.seed, 2);
  topt.checkpoint_path = run.path("checkpoint.pt");
  topt.metrics_path = run.path("metrics.jsonl");
  topt.progress = !quiet;
  topt.label = label;
  topt.group = group;
}

void resume_if_asked(Trainer& trainer, const TrainerOptions& topt, const RunDirectory& run, bool resume) {
  if (resume && trainer.resume(topt.checkpoint_path)) {
    note("resumed " + run.dir + " at iteration " + std::to_string(trainer.iteration()));
  }
  if (!run.pending_config.empty()) atomic_write(run.path("config.resolved.json"), run.pending_config);
}

void plot_training_curves(const std::string& metrics_path, const std::vector<std::string>& keys, const std::string& out,
                          const std::string& title) {
  std::istringstream in(read_file(metrics_path, "metrics file"));
  std::vector<plot::Series> series(keys.size());
  for (size_t i = 0; i < keys.size(); ++i) series[i].label = keys[i];
  std::string line;
  while (std::getline(in, line)) {
    const Json j = Json::parse(line, nullptr, false);
    if (!j.is_object()) continue;
    for (size_t i = 0; i < keys.size(); ++i) {
      if (j.contains(keys[i]) && j[keys[i]].is_number()) {
        series[i].x.push_back(j["iteration"].get<double>());
        series[i].y.push_back(j[keys[i]].get<double>());
      }
    }
  }
  for (size_t i = 0; i < keys.size(); ++i) {
    plot::LineOptions o;
    o.title = title + ": " + keys[i];
    o.x_label = "iteration";
    o.y_label = keys[i];
    o.log_y = keys[i] == "loss" || keys[i] == "loss_median";
    const std::string path = keys.size() == 1 ? out : out.substr(0, out.size() - 4) + "_" + keys[i] + ".png";
    plot::write_line_png(path, {series[i]}, o);
  }
}

}  // namespace tilt
