// Configuration files (TOML or JSON) with command-line overrides, read strictly: an unknown key,
// a value of the wrong type or a missing required key ends with a message that names the key and
// the file. Every value read (defaults included) is recorded, so a run can save exactly the
// configuration it used.
#pragma once

#include <nlohmann/json.hpp>

#include <functional>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace tilt {

using Json = nlohmann::json;

/// Reads a .toml or .json file into JSON (TOML tables become objects). Throws tilt::Error with
/// the file name and, for syntax errors, the line.
Json load_config_file(const std::string& path);

/// Applies "a.b.c=value" overrides. The value is parsed as JSON when it is valid JSON (numbers,
/// true/false, arrays, quoted strings), otherwise taken as a string.
void apply_override(Json& config, const std::string& assignment);

/// A view of one table of the configuration. Accessors mark keys as used; finish() rejects
/// any key that was never read.
class ConfigSection {
 public:
  /// `origin` names the source in messages (e.g. "configs/demo.toml").
  ConfigSection(const Json& node, std::string path, std::string origin, std::shared_ptr<Json> resolved);

  bool has(const std::string& key) const;
  double number(const std::string& key, std::optional<double> fallback = std::nullopt);
  int64_t integer(const std::string& key, std::optional<int64_t> fallback = std::nullopt);
  bool boolean(const std::string& key, std::optional<bool> fallback = std::nullopt);
  std::string string(const std::string& key, std::optional<std::string> fallback = std::nullopt);
  /// One of the allowed strings.
  std::string choice(const std::string& key, const std::vector<std::string>& allowed,
                     std::optional<std::string> fallback = std::nullopt);
  std::vector<double> numbers(const std::string& key, std::optional<std::vector<double>> fallback = std::nullopt);
  std::vector<int64_t> integers(const std::string& key, std::optional<std::vector<int64_t>> fallback = std::nullopt);
  /// The raw JSON value (marked used; recorded as is).
  Json value(const std::string& key);
  /// A nested table; it is an error if it is missing unless optional, in which case it is empty.
  ConfigSection section(const std::string& key, bool optional = false);

  /// Marks keys as known without reading them (tables that another command uses).
  void allow(const std::vector<std::string>& keys) const;
  /// Throws tilt::Error for the first key that was present but never read, with a suggestion.
  void finish() const;

  /// Keys that moved here from `old` (the table they sat in before, e.g. [finetune] for
  /// [finetune.ddpo]): a key missing here but present in `old` is read from there, named there in
  /// messages, and reported once through `note`, which is told the new place; a key in both is an
  /// error. `old` must outlive this section.
  void accept_moved_keys(ConfigSection& old, std::function<void(const std::string& message)> note);

  /// Fallbacks that take the place of the readers' own for the keys this table (and the table of
  /// accept_moved_keys) does not give: a preset. A key found here is read, checked and recorded as if
  /// given, but has() stays false for it. A later call adds to them (a key in both takes the later value).
  /// A table among them is the defaults of section(key).
  void set_defaults(Json defaults);

  /// The value a reader of `key` would see (given, moved, or a default), or nullptr, without reading it: neither
  /// marked used nor recorded. For a default that depends on other keys, before they are read.
  const Json* peek(const std::string& key) const;

  /// Records `value` for a key already read, in place of what was read: the setting a choice such as "auto"
  /// resolved to, so that the resolved config says what was used.
  void resolve(const std::string& key, const Json& value);

  /// A table read in this one's name: `node` (keys gathered from this table) read as if it were this table, its
  /// messages naming this table's keys and its values recorded under it (defaults included).
  ConfigSection view_of(const Json& node) const { return ConfigSection(node, path_, origin_, resolved_); }

  /// "finetune.lr" for key "lr" of section "finetune".
  std::string where(const std::string& key) const;
  const std::string& origin() const { return origin_; }
  [[noreturn]] void fail(const std::string& key, const std::string& message) const;

 private:
  const Json* find(const std::string& key) const;
  void record(const std::string& key, const Json& value);
  Json node_;
  std::string path_, origin_;
  std::shared_ptr<Json> resolved_;
  mutable std::set<std::string> used_;
  ConfigSection* old_ = nullptr;  ///< accept_moved_keys
  std::function<void(const std::string&)> note_;
  mutable std::set<std::string> from_old_;
  Json defaults_ = Json::object();  ///< set_defaults
};

/// The whole configuration: the file, the overrides, and the resolved record.
class Config {
 public:
  /// Loads the file (if path is not empty) and applies the overrides.
  Config(const std::string& path, const std::vector<std::string>& overrides);
  /// From JSON already in memory (tests).
  Config(Json root, std::string origin);

  ConfigSection root();
  /// Everything that was read, with defaults filled in.
  const Json& resolved() const { return *resolved_; }
  const Json& raw() const { return root_; }

 private:
  Json root_;
  std::string origin_;
  std::shared_ptr<Json> resolved_;
};

}  // namespace tilt
