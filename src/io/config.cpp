#include "tilt/io/config.h"

#include "tilt/core/check.h"
#include "tilt/core/error.h"
#include "tilt/core/fs.h"

#include <toml++/toml.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <set>
#include <sstream>

namespace tilt {
namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

Json from_toml(const toml::node& node) {
  if (auto t = node.as_table()) {
    Json out = Json::object();
    for (const auto& [k, v] : *t) out[std::string(k.str())] = from_toml(v);
    return out;
  }
  if (auto a = node.as_array()) {
    Json out = Json::array();
    for (const auto& v : *a) out.push_back(from_toml(v));
    return out;
  }
  if (auto v = node.as_string()) return v->get();
  if (auto v = node.as_integer()) return v->get();
  if (auto v = node.as_floating_point()) return v->get();
  if (auto v = node.as_boolean()) return v->get();
  return Json();  // dates and times: tilt has no use for them; a reader reports the type
}

const char* type_name(const Json& v) {
  switch (v.type()) {
    case Json::value_t::null: return "null";
    case Json::value_t::boolean: return "a boolean";
    case Json::value_t::number_integer:
    case Json::value_t::number_unsigned: return "an integer";
    case Json::value_t::number_float: return "a number";
    case Json::value_t::string: return "a string";
    case Json::value_t::array: return "an array";
    case Json::value_t::object: return "a table";
    default: return "something else";
  }
}

std::string show(const Json& v) {
  std::string s = v.dump();
  return s.size() > 60 ? s.substr(0, 57) + "..." : s;
}

// The deepest nesting of arrays and tables a configuration may have (docs/config.md). nlohmann's
// parser, copies and destructor recurse, so 100,000 nested arrays crashed the process; the
// configurations tilt reads nest 4 levels at most.
constexpr size_t kMaxNesting = 256;

std::string nesting_message() {
  return "values are nested deeper than " + std::to_string(kMaxNesting) + " levels (arrays and tables)";
}

// The line on which brackets first nest deeper than kMaxNesting, outside strings (and, in TOML,
// outside comments); 0 if they never do. Run before parsing, so that nothing deep is ever built.
// A text the parser will refuse anyway (an unterminated string) may be scanned loosely.
size_t too_deep_line(const std::string& text, bool toml) {
  size_t depth = 0, line = 1;
  const size_t n = text.size();
  for (size_t i = 0; i < n; ++i) {
    const char c = text[i];
    if (c == '\n') {
      ++line;
    } else if (c == '"' || (toml && c == '\'')) {
      const bool triple = toml && text.compare(i, 3, std::string(3, c)) == 0;
      const bool escapes = c == '"';  // TOML's '...' literal strings have none
      for (i += triple ? 3 : 1; i < n; ++i) {
        if (text[i] == '\n') {
          ++line;
          if (!triple) break;  // a one-line string cannot span lines: the parser reports it
        } else if (escapes && text[i] == '\\') {
          if (++i < n && text[i] == '\n') ++line;
        } else if (triple ? text.compare(i, 3, std::string(3, c)) == 0 : text[i] == c) {
          if (triple) i += 2;
          break;
        }
      }
    } else if (toml && c == '#') {
      while (i + 1 < n && text[i + 1] != '\n') ++i;
    } else if (c == '[' || c == '{') {
      if (++depth > kMaxNesting) return line;
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    }
  }
  return 0;
}

// Parses JSON, refusing a key given twice in one object (TOML refuses it too; nlohmann would keep
// the last value). `where` names the source in the message.
Json parse_json_strictly(const std::string& text, const std::string& where) {
  std::vector<std::pair<std::set<std::string>, std::string>> objects;  // per open object: keys seen, current key
  const Json::parser_callback_t check = [&](int, Json::parse_event_t event, Json& parsed) {
    switch (event) {
      case Json::parse_event_t::object_start:
        objects.emplace_back();
        break;
      case Json::parse_event_t::object_end:
        objects.pop_back();
        break;
      case Json::parse_event_t::key: {
        const std::string key = parsed.get<std::string>();
        if (!objects.back().first.insert(key).second) {
          std::string path;
          for (size_t i = 0; i + 1 < objects.size(); ++i) path += objects[i].second + ".";
          throw Error(where + ": the key '" + path + key + "' is given more than once");
        }
        objects.back().second = key;
        break;
      }
      default:
        break;
    }
    return true;
  };
  return Json::parse(text, check);
}

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
    }
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

}  // namespace

Json load_config_file(const std::string& path) {
  const std::string text = read_file(path, "config file");
  const bool json = ends_with(path, ".json");
  if (const size_t line = too_deep_line(text, !json)) {
    throw Error("config file '" + path + "' (line " + std::to_string(line) + "): " + nesting_message());
  }
  if (json) {
    try {
      return parse_json_strictly(text, "config file '" + path + "'");
    } catch (const Json::parse_error& e) {
      throw Error("config file '" + path + "' is not valid JSON: " + e.what());
    } catch (const Json::exception& e) {  // e.g. 1e999: "number overflow" (out_of_range)
      throw Error("config file '" + path + "' is not valid JSON: " + e.what() + " (numbers must be finite)");
    }
  }
  try {
    const toml::table table = toml::parse(text, path);
    return from_toml(table);
  } catch (const toml::parse_error& e) {
    std::ostringstream os;
    os << "config file '" << path << "' is not valid TOML (line " << e.source().begin.line << ", column "
       << e.source().begin.column << "): " << e.description();
    throw Error(os.str());
  }
}

void apply_override(Json& config, const std::string& assignment) {
  const auto eq = assignment.find('=');
  if (eq == std::string::npos || eq == 0) {
    throw Error("override '" + assignment + "' must look like key=value, e.g. finetune.lr=1e-3");
  }
  const std::string key = assignment.substr(0, eq), text = assignment.substr(eq + 1);
  const std::string shown = assignment.size() > 40 ? assignment.substr(0, 37) + "..." : assignment;
  if (too_deep_line(text, false)) throw Error("override '" + shown + "': " + nesting_message());
  Json value;
  try {
    value = parse_json_strictly(text, "override '" + shown + "'");
  } catch (const Json::exception&) {
    value = text;  // not JSON: a string
  }
  Json* node = &config;
  std::istringstream parts(key);
  std::string part;
  std::vector<std::string> names;
  while (std::getline(parts, part, '.')) names.push_back(part);
  // Each key part is one level of tables (a.a.a...=1 nests as deep as [[[...]]]).
  if (names.size() > kMaxNesting) {
    throw Error("override '" + shown + "': " + nesting_message());
  }
  for (size_t i = 0; i < names.size(); ++i) {
    if (names[i].empty()) throw Error("override '" + assignment + "': empty key part");
    if (!node->is_object()) {  // the file, or an earlier --set, gave it a value
      std::string held = node->dump();
      if (held.size() > 40) held = held.substr(0, 37) + "...";
      throw Error("override '" + shown + "': '" + names[i - 1] + "' is not a table: the config file or an earlier --set " +
                  "gives it the value " + held);
    }
    if (i + 1 == names.size()) {
      (*node)[names[i]] = value;
    } else {
      node = &(*node)[names[i]];
      if (node->is_null()) *node = Json::object();
    }
  }
}

ConfigSection::ConfigSection(const Json& node, std::string path, std::string origin, std::shared_ptr<Json> resolved)
    : node_(node.is_null() ? Json::object() : node), path_(std::move(path)), origin_(std::move(origin)),
      resolved_(std::move(resolved)) {
  if (!node_.is_object()) {
    throw Error("in " + origin_ + ": '" + (path_.empty() ? std::string("<root>") : path_) + "' must be a table, got " +
                type_name(node_));
  }
}

std::string ConfigSection::where(const std::string& key) const {
  if (from_old_.count(key)) return old_->where(key);
  // A file in the old layout (keys read from the parent, none given here): a key it lacks is named
  // where that file would give it.
  if (!from_old_.empty() && node_.empty() && !node_.contains(key)) return old_->where(key);
  return path_.empty() ? key : path_ + "." + key;
}

void ConfigSection::fail(const std::string& key, const std::string& message) const {
  throw Error("in " + origin_ + ": '" + where(key) + "' " + message);
}

bool ConfigSection::has(const std::string& key) const { return node_.contains(key) || (old_ && old_->has(key)); }

const Json* ConfigSection::find(const std::string& key) const {
  used_.insert(key);
  if (old_ && old_->node_.contains(key)) {
    if (node_.contains(key)) {
      throw Error("in " + origin_ + ": '" + old_->where(key) + "' and '" + where(key) + "' are both given; keep '" +
                  where(key) + "'");
    }
    if (from_old_.insert(key).second && note_) {
      note_("'" + old_->where(key) + "' belongs in [" + path_ + "] now (as " + key + "); the old place still works");
    }
    return old_->find(key);  // marks it used there
  }
  return peek(key);
}

const Json* ConfigSection::peek(const std::string& key) const {
  if (const auto it = node_.find(key); it != node_.end()) return &*it;
  if (old_) {
    if (const auto it = old_->node_.find(key); it != old_->node_.end()) return &*it;
  }
  const auto preset = defaults_.find(key);
  return preset == defaults_.end() ? nullptr : &*preset;
}

void ConfigSection::set_defaults(Json defaults) {
  if (!defaults.is_object()) throw Error("ConfigSection::set_defaults: the defaults must be a table");
  defaults_.update(defaults);
}

void ConfigSection::resolve(const std::string& key, const Json& value) {
  if (!used_.count(key)) throw Error("ConfigSection::resolve: '" + where(key) + "' has not been read");
  record(key, value);
}

void ConfigSection::accept_moved_keys(ConfigSection& old, std::function<void(const std::string&)> note) {
  old_ = &old;
  note_ = std::move(note);
}

void ConfigSection::record(const std::string& key, const Json& value) {
  if (from_old_.count(key)) return old_->record(key, value);
  if (!resolved_) return;
  Json* node = resolved_.get();
  std::istringstream parts(path_);
  std::string part;
  while (std::getline(parts, part, '.')) {
    if (!part.empty()) node = &(*node)[part];
  }
  (*node)[key] = value;
}

#define TILT_CONFIG_GET(check, expected, convert)                                        \
  const Json* v = find(key);                                                             \
  if (!v) {                                                                              \
    if (!fallback) fail(key, "is required but missing");                                 \
    record(key, *fallback);                                                              \
    return *fallback;                                                                    \
  }                                                                                      \
  if (!(check)) fail(key, std::string("must be ") + expected + ", got " + type_name(*v) + " " + show(*v)); \
  auto result = convert;                                                                 \
  record(key, result);                                                                   \
  return result;

// TOML's inf and nan, and JSON numbers that overflow, are no settings: every number a
// configuration gives must be finite (docs/config.md). nlohmann would also write them as null.
double ConfigSection::number(const std::string& key, std::optional<double> fallback) {
  if (const Json* w = find(key); w && w->is_number() && !std::isfinite(w->get<double>())) {
    fail(key, "must be a finite number, got " + number_string(w->get<double>()));
  }
  TILT_CONFIG_GET(v->is_number(), "a number", v->get<double>())
}

// An integer that int64_t holds exactly: JSON's unsigned numbers above 2^63 - 1 and floats such as
// 1e300 are not (converting them would be undefined).
static std::optional<int64_t> as_int64(const Json& v) {
  if (v.is_number_unsigned()) {
    const uint64_t u = v.get<uint64_t>();
    if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return std::nullopt;
    return static_cast<int64_t>(u);
  }
  if (v.is_number_integer()) return v.get<int64_t>();
  if (v.is_number_float()) {
    const double d = v.get<double>();
    if (std::isfinite(d) && d >= -0x1p63 && d < 0x1p63 && d == std::trunc(d)) return static_cast<int64_t>(d);
  }
  return std::nullopt;
}

int64_t ConfigSection::integer(const std::string& key, std::optional<int64_t> fallback) {
  if (const Json* w = find(key); w && w->is_number_unsigned() && !as_int64(*w)) {
    fail(key, "must be an integer of at most 64 bits (up to 9223372036854775807), got " + show(*w));
  }
  TILT_CONFIG_GET(as_int64(*v).has_value(), "an integer", *as_int64(*v))
}

bool ConfigSection::boolean(const std::string& key, std::optional<bool> fallback) {
  TILT_CONFIG_GET(v->is_boolean(), "true or false", v->get<bool>())
}

std::string ConfigSection::string(const std::string& key, std::optional<std::string> fallback) {
  TILT_CONFIG_GET(v->is_string(), "a string", v->get<std::string>())
}

std::vector<double> ConfigSection::numbers(const std::string& key, std::optional<std::vector<double>> fallback) {
  if (const Json* w = find(key); w && w->is_array()) {
    for (const Json& e : *w) {
      if (e.is_number() && !std::isfinite(e.get<double>())) {
        fail(key, "must hold finite numbers, got " + number_string(e.get<double>()));
      }
    }
  }
  TILT_CONFIG_GET(v->is_array() && std::all_of(v->begin(), v->end(), [](const Json& e) { return e.is_number(); }),
                  "an array of numbers", v->get<std::vector<double>>())
}

std::vector<int64_t> ConfigSection::integers(const std::string& key, std::optional<std::vector<int64_t>> fallback) {
  TILT_CONFIG_GET(v->is_array() && std::all_of(v->begin(), v->end(), [](const Json& e) {
                    return e.is_number_integer() && as_int64(e).has_value();
                  }),
                  "an array of integers", v->get<std::vector<int64_t>>())
}

#undef TILT_CONFIG_GET

std::string ConfigSection::choice(const std::string& key, const std::vector<std::string>& allowed,
                                  std::optional<std::string> fallback) {
  const std::string s = string(key, std::move(fallback));
  if (std::find(allowed.begin(), allowed.end(), s) == allowed.end()) {
    std::string list;
    for (const auto& a : allowed) list += (list.empty() ? "" : ", ") + a;
    fail(key, "is '" + s + "', which is not one of: " + list);
  }
  return s;
}

Json ConfigSection::value(const std::string& key) {
  const Json* v = find(key);
  if (!v) fail(key, "is required but missing");
  record(key, *v);
  return *v;
}

ConfigSection ConfigSection::section(const std::string& key, bool optional) {
  const bool given = has(key);
  const Json* v = find(key);
  if (!v && !optional) fail(key, "is required but missing (a table [" + where(key) + "])");
  if (v && !v->is_object()) fail(key, std::string("must be a table, got ") + type_name(*v));
  // A table of defaults is the nested table's defaults, not a given table.
  ConfigSection nested(given ? *v : Json::object(), where(key), origin_, resolved_);
  const auto preset = defaults_.find(key);
  if (preset != defaults_.end() && preset->is_object()) nested.defaults_ = *preset;
  return nested;
}

void ConfigSection::allow(const std::vector<std::string>& keys) const {
  for (const auto& k : keys) used_.insert(k);
}

void ConfigSection::finish() const {
  for (auto it = node_.begin(); it != node_.end(); ++it) {
    if (used_.count(it.key())) continue;
    std::string best;
    size_t best_d = 3;
    for (const auto& u : used_) {
      const size_t d = edit_distance(it.key(), u);
      if (d < best_d) best_d = d, best = u;
    }
    std::string known;
    for (const auto& u : used_) known += (known.empty() ? "" : ", ") + u;
    throw Error("in " + origin_ + ": unknown key '" + where(it.key()) + "'" +
                (best.empty() ? "" : " (did you mean '" + where(best) + "'?)") +
                (known.empty() ? "" : "; known keys here: " + known));
  }
}

Config::Config(const std::string& path, const std::vector<std::string>& overrides)
    : root_(path.empty() ? Json::object() : load_config_file(path)),
      origin_(path.empty() ? std::string("the command line") : "'" + path + "'"),
      resolved_(std::make_shared<Json>(Json::object())) {
  if (!root_.is_object()) throw Error("config file '" + path + "' must hold a table at the top level");
  for (const auto& o : overrides) apply_override(root_, o);
  if (!overrides.empty()) origin_ += " (with the command line's --set, --seed or --threads)";
}

Config::Config(Json root, std::string origin)
    : root_(std::move(root)), origin_(std::move(origin)), resolved_(std::make_shared<Json>(Json::object())) {}

ConfigSection Config::root() { return ConfigSection(root_, "", origin_, resolved_); }

}  // namespace tilt
