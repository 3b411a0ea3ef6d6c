// Draws the control-L2-error curves of several `tilt soc` runs in one figure with tilt's plot code
// (scripts/socm_curves.sh): each argument LABEL=FILE names a <loss>.eval.jsonl, whose lines give
// iteration and control_l2_error (control_objective where the problem has no L2 error).
// Usage: tilt_soc_curves -o OUT.png [--title T] LABEL=FILE ...
#include "tilt/core/error.h"
#include "tilt/core/fs.h"
#include "tilt/io/config.h"
#include "tilt/io/plot.h"

#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

namespace {

tilt::plot::Series read_series(const std::string& label, const std::string& path, bool& l2) {
  std::istringstream lines(tilt::read_file(path));
  tilt::plot::Series s{label, {}, {}};
  std::string line;
  while (std::getline(lines, line)) {
    if (line.empty()) continue;
    const tilt::Json j = tilt::Json::parse(line);
    l2 = j.contains("control_l2_error");
    s.x.push_back(j.at("iteration").get<double>());
    s.y.push_back(j.at(l2 ? "control_l2_error" : "control_objective").get<double>());
  }
  if (s.x.empty()) throw tilt::Error("'" + path + "' has no evaluations");
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    std::string out, title;
    std::vector<tilt::plot::Series> series;
    bool l2 = true;
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      if ((a == "-o" || a == "--title") && i + 1 < argc) {
        (a == "-o" ? out : title) = argv[++i];
        continue;
      }
      const auto eq = a.find('=');
      if (eq == std::string::npos) throw tilt::Error("expected LABEL=FILE, got '" + a + "'");
      series.push_back(read_series(a.substr(0, eq), a.substr(eq + 1), l2));
    }
    if (out.empty() || series.empty()) throw tilt::Error("usage: tilt_soc_curves -o OUT.png [--title T] LABEL=FILE ...");
    tilt::plot::LineOptions po;
    po.width = 800;
    po.height = 500;
    po.title = title;
    po.x_label = "iteration";
    po.y_label = l2 ? "control L2 error" : "control objective";
    po.log_y = l2;
    tilt::plot::write_line_png(out, series, po);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "tilt_soc_curves: %s\n", e.what());
    return 1;
  }
}
