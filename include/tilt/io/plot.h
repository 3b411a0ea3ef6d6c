// Small PNG plots (scatter/density panels and line charts) for reports and debugging. Independent
// of LibTorch: inputs are plain vectors. Text uses a built-in bitmap font (printable ASCII only;
// other characters are drawn as '?'). Every function throws tilt::Error on bad input and writes the
// file atomically (an existing file is replaced only once the new image is complete).
#pragma once

#include <string>
#include <vector>

namespace tilt::plot {

struct Point {
  float x, y;
};

struct Panel {
  std::string title;          // drawn above the panel
  std::vector<Point> points;  // samples, drawn as a density-like scatter; non-finite points are skipped
};

struct ScatterOptions {
  int panel_size = 300;  // pixels, square plotting area per panel (64..4096)
  int columns = 0;       // panels per row; 0 = all in one row
  std::string title;     // figure title on top (optional)
  // Common axis range for all panels; if min >= max it is chosen automatically from all points
  // (1st/99th percentile robust bounds plus a margin, same span on x and y so shapes are not
  // distorted). Points outside the range are not drawn.
  float x_min = 0, x_max = 0, y_min = 0, y_max = 0;
};

/// Renders panels in a grid, each with a thin frame, tick labels (a few round numbers), its title,
/// and the points accumulated into a density buffer mapped through a white -> blue -> dark colour
/// ramp. Brightness is normalised per panel by a high quantile of the non-empty cells, so that
/// 500 or 20000 points both look good.
///
/// Image size: width  = columns * (panel_size + kScatterExtraWidth),
///             height = rows * (panel_size + kScatterExtraHeight) + (title.empty() ? 0 : kScatterTitleHeight),
/// where columns = min(options.columns or panels.size(), panels.size()) and rows = ceil(panels / columns).
/// Panel k (row-major) has its panel_size x panel_size plotting area at
///   x = (k % columns) * (panel_size + kScatterExtraWidth) + kScatterPanelLeft,
///   y = (title.empty() ? 0 : kScatterTitleHeight) + (k / columns) * (panel_size + kScatterExtraHeight) + kScatterPanelTop;
/// x grows rightwards from x_min, y upwards from y_min (pixel row 0 of the area is y_max).
void write_scatter_png(const std::string& path, const std::vector<Panel>& panels, const ScatterOptions& options = {});

inline constexpr int kScatterExtraWidth = 96;   // left tick labels + gap to the next panel
inline constexpr int kScatterExtraHeight = 72;  // panel title above + tick labels below
inline constexpr int kScatterTitleHeight = 44;  // figure title band
inline constexpr int kScatterPanelLeft = 68;    // from the cell's left edge to the plotting area
inline constexpr int kScatterPanelTop = 36;     // from the cell's top edge to the plotting area

struct Series {
  std::string label;  // shown in the legend; series with an empty label are not listed
  std::vector<double> x, y;
};

struct LineOptions {
  int width = 640, height = 400;  // image size in pixels (at least 240 x 160)
  std::string title, x_label, y_label;
  bool log_y = false;
};

/// Line plot of several series (distinct colours) with a legend, axes, grid and tick labels
/// (decades if log_y). Non-finite values, and non-positive y values when log_y, are skipped: the
/// line is broken there. The image is exactly width x height pixels. The legend goes in the corner of the plot
/// that hides the fewest points of the lines, or, when every corner hides some, beside the plot on the right if
/// the plot keeps at least half the width there.
void write_line_png(const std::string& path, const std::vector<Series>& series, const LineOptions& options = {});

struct ImagePanel {
  std::string title;          // drawn above the panel
  std::vector<float> pixels;  // count images of height x width pixels each, row-major, one after another
};
struct ImageGridOptions {
  int height = 8, width = 8;  // pixels of one image
  int columns = 10;           // images per row within a panel
  int max_images = 100;       // images drawn per panel (the first ones)
  int scale = 4;              // screen pixels per image pixel (1..32)
  float lo = -1, hi = 1;      // value range: lo is drawn white, hi black (ink)
  int panel_columns = 0;      // panels per row; 0 = all in one row
  std::string title;          // figure title on top (optional)
};
/// Renders each panel's images as a grid of grey-level pictures (1-pixel gaps), panels side by side
/// with their titles. Values outside [lo, hi] are clamped; non-finite pixels are drawn red.
void write_image_grid_png(const std::string& path, const std::vector<ImagePanel>& panels, const ImageGridOptions& options = {});

/// The text as the plots draw it: their font has the printable ASCII characters only, so a UTF-8 title is
/// spelled in ASCII where it can be (Greek letters by name, so "λ = 5" is drawn "lambda = 5"; x for the
/// multiplication sign, ^2, <=, ->), and any other character, or a byte that is not UTF-8, becomes one '?'.
std::string printable(const std::string& text);

}  // namespace tilt::plot
