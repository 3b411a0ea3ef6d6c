// Draws the control-L2-error curves of several `tilt soc` runs in one figure with tilt's plot code
// (scripts/socm_curves.sh): each argument LABEL=FILE names a <loss>.eval.jsonl, whose lines give
// iteration and control_l2_error (control_objective where the problem has no L2 error).
// Other JSON lines: --x KEY and --y KEY name the fields (and --x-label, --y-label the axes; log y with --log-y 1).
// Usage: tilt_soc_curves -o OUT.png [--title T] [--x KEY --y KEY --x-label L --y-label L --log-y 0|1] LABEL=FILE ...
#include "tilt/core/error.h"
#include "tilt/core/fs.h"
#include "tilt/io/config.h"
#include "tilt/io/plot.h"

#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

namespace {

// The fields of each line: x_key and y_key when given, else iteration and control_l2_error (control_objective).
tilt::plot::Series read_series(const std::string& label, const std::string& path, bool& l2, const std::string& x_key,
                               const std::string& y_key) {
  std::istringstream lines(tilt::read_file(path));
  tilt::plot::Series s{label, {}, {}};
  std::string line;
  while (std::getline(lines, line)) {
    if (line.empty()) continue;
    const tilt::Json j = tilt::Json::parse(line);
    l2 = j.contains("control_l2_error");
    s.x.push_back(j.at(x_key.empty() ? "iteration" : x_key).get<double>());
    s.y.push_back(j.at(!y_key.empty() ? y_key : l2 ? "control_l2_error" : "control_objective").get<double>());
  }
  if (s.x.empty()) throw tilt::Error("'" + path + "' has no evaluations");
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    std::string out, title, x_key, y_key, x_label, y_label, log_y;
    std::vector<tilt::plot::Series> series;
    bool l2 = true;
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      std::string* flag = a == "-o" ? &out : a == "--title" ? &title : a == "--x" ? &x_key : a == "--y" ? &y_key
                        : a == "--x-label" ? &x_label : a == "--y-label" ? &y_label : a == "--log-y" ? &log_y : nullptr;
      if (flag && i + 1 < argc) {
        *flag = argv[++i];
        continue;
      }
      const auto eq = a.find('=');
      if (eq == std::string::npos) throw tilt::Error("expected LABEL=FILE, got '" + a + "'");
      series.push_back(read_series(a.substr(0, eq), a.substr(eq + 1), l2, x_key, y_key));
    }
    if (out.empty() || series.empty()) throw tilt::Error("usage: tilt_soc_curves -o OUT.png [--title T] LABEL=FILE ...");
    tilt::plot::LineOptions po;
    po.width = 800;
    po.height = 500;
    po.title = title;
    po.x_label = x_label.empty() ? "iteration" : x_label;
    po.y_label = !y_label.empty() ? y_label : l2 ? "control L2 error" : "control objective";
    po.log_y = log_y.empty() ? l2 : log_y == "1";
    tilt::plot::write_line_png(out, series, po);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "tilt_soc_curves: %s\n", e.what());
    return 1;
  }
}
