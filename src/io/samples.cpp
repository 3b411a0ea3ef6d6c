#include "tilt/io/samples.h"

#include "tilt/core/check.h"
#include "tilt/core/error.h"
#include "tilt/core/fs.h"
#include "tilt/io/limits.h"

#include <ATen/ATen.h>

#include <cctype>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <sstream>
#include <vector>

namespace tilt {

void write_samples_csv(const std::string& path, const Tensor& x_in, const Tensor& conditions) {
  if (!x_in.defined() || x_in.dim() != 2) throw Error("samples must be [n, d], got " + shape_string(x_in));
  if (conditions.defined() && (conditions.dim() != 2 || conditions.size(0) != x_in.size(0))) {
    throw Error("conditions must be [n, dc] for samples " + shape_string(x_in) + ", got " + shape_string(conditions));
  }
  const int64_t d = x_in.size(1), dc = conditions.defined() ? conditions.size(1) : 0;
  const Tensor x = (dc > 0 ? at::cat({x_in.detach().to(at::kDouble), conditions.to(at::kDouble)}, 1)
                           : x_in.detach().to(at::kDouble)).contiguous();
  const int64_t n = x.size(0), w = d + dc;
  const double* p = x.data_ptr<double>();
  std::string out;
  out.reserve(static_cast<size_t>(n * w * 14 + 32));
  for (int64_t j = 0; j < d; ++j) out += (j ? ",x" : "x") + std::to_string(j);
  for (int64_t j = 0; j < dc; ++j) out += ",c" + std::to_string(j);
  out += '\n';
  char buf[32];
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < w; ++j) {
      std::snprintf(buf, sizeof buf, "%s%.7g", j ? "," : "", p[i * w + j]);
      out += buf;
    }
    out += '\n';
  }
  atomic_write(path, out);
}

namespace {

// The number of columns the header names c0, c1, ... (at its end); 0 without them.
int64_t condition_columns(const std::string& header) {
  std::istringstream fields(header);
  std::string field;
  int64_t count = 0;
  while (std::getline(fields, field, ',')) {
    if (field == "c" + std::to_string(count)) ++count;
    else if (count > 0) return 0;  // conditions are the last columns, or none
  }
  return count;
}

// What strtod left of a field: nothing, or spaces ("1.5 " as a hand-written CSV may have it).
bool only_spaces_after(const char* end) {
  while (*end == ' ' || *end == '\t') ++end;
  return *end == '\0';
}

// A field for a message: quoted, at most 40 characters, anything unprintable (a binary file read as CSV) as '?'.
std::string shown(const std::string& field) {
  std::string out = field.substr(0, 40);
  for (char& ch : out) {
    if (!std::isprint(static_cast<unsigned char>(ch))) ch = '?';
  }
  return "'" + out + (field.size() > 40 ? "...'" : "'");
}

}  // namespace

Tensor read_samples_csv(const std::string& path, Tensor* conditions, const std::string& what) {
  std::istringstream in(read_file(path, what));
  std::string line;
  std::vector<float> values;
  int64_t d = -1, n = 0, line_no = 0, dc = 0, header_columns = 0;
  while (std::getline(in, line)) {
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty() || line[0] == '#') continue;
    if (line.find('\0') != std::string::npos) {
      throw Error(what + " '" + path + "', line " + std::to_string(line_no) + ": holds NUL bytes (a damaged file?)");
    }
    if (line_no == 1 && (std::isalpha(static_cast<unsigned char>(line[0])) || line[0] == '"')) {  // header
      dc = condition_columns(line);
      header_columns = static_cast<int64_t>(std::count(line.begin(), line.end(), ',')) + 1;
      continue;
    }
    if (line.back() == ',') {
      throw Error(what + " '" + path + "', line " + std::to_string(line_no) + ": ends with a comma (an empty value)");
    }
    std::istringstream fields(line);
    std::string field;
    int64_t count = 0;
    while (std::getline(fields, field, ',')) {
      char* end = nullptr;
      const double v = std::strtod(field.c_str(), &end);
      const std::string where =
          what + " '" + path + "', line " + std::to_string(line_no) + ", column " + std::to_string(count + 1);
      // strtod also reads hexadecimal ("0x10" is 16): not a number a CSV of samples holds.
      if (field.empty() || end == field.c_str() || !only_spaces_after(end) ||
          field.find_first_of("xX") != std::string::npos || !std::isfinite(v)) {
        throw Error(where + ": " + shown(field) + " is not a finite number");
      }
      // Samples are float32 tensors: a larger double would become inf there (and NaN downstream).
      if (std::abs(v) > static_cast<double>(std::numeric_limits<float>::max())) {
        throw Error(where + ": " + shown(field) + " is outside the range of float32 (largest magnitude 3.4028235e38)");
      }
      values.push_back(static_cast<float>(v));
      ++count;
    }
    if (d < 0) d = count;
    if (count != d) {
      throw Error(what + " '" + path + "', line " + std::to_string(line_no) + ": " + std::to_string(count) +
                  " values, but the first row has " + std::to_string(d));
    }
    ++n;
  }
  if (n == 0) throw Error(what + " '" + path + "' holds no rows of numbers");
  if (header_columns > 0 && header_columns != d) {  // a header from another file, or a damaged one
    throw Error(what + " '" + path + "': its header has " + std::to_string(header_columns) + " field(s), but its rows have " +
                std::to_string(d) + " value(s)");
  }
  if (dc >= d) dc = 0;  // every column named c0, c1, ...: a table of conditions itself (tilt sample --conditions)
  const Tensor all = at::from_blob(values.data(), {n, d}, at::kFloat);
  if (conditions) *conditions = dc > 0 ? all.narrow(1, d - dc, dc).to(at::kDouble) : Tensor();
  return all.narrow(1, 0, d - dc).clone();
}

Tensor parse_condition(const std::string& text, const std::string& flag) {
  std::vector<double> c;
  std::string field;
  std::istringstream fields(text);
  while (std::getline(fields, field, ',')) {
    char* end = nullptr;
    const double v = std::strtod(field.c_str(), &end);
    if (field.empty() || *end != '\0' || !std::isfinite(v)) {
      throw Error(flag + " must be comma-separated finite numbers, got '" + text + "'");
    }
    c.push_back(v);
  }
  if (c.empty() || text.back() == ',') throw Error(flag + " must be comma-separated finite numbers, got '" + text + "'");
  return check_conditions(at::tensor(c, at::TensorOptions().dtype(at::kDouble)), flag);
}

Tensor check_conditions(const Tensor& c, const std::string& what) {
  // The bound of the config's [conditions] tables (docs/config.md, "Limits"): a condition of 1e300 reached
  // the network as Inf and was reported as damaged weights.
  if (!c.defined() || c.numel() == 0) return c;
  const Tensor bad = ~(at::isfinite(c) & (c.abs() <= limits::kMagnitude));
  if (bad.any().item<bool>()) {
    const double x = at::masked_select(c, bad)[0].item<double>();
    throw Error(what + " must hold finite numbers of magnitude at most " + number_string(limits::kMagnitude) +
                " (as [conditions] does), got " + number_string(x));
  }
  return c;
}

}  // namespace tilt
