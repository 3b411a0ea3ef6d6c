// PNG plots: written atomically, the documented size, and the data drawn where it belongs.
#include "tilt/core/error.h"
#include "tilt/core/fs.h"
#include "tilt/io/plot.h"
#include "tilt/io/sample_sets.h"
#include "tilt/io/samples.h"

#include <ATen/ATen.h>

#include <gtest/gtest.h>
#include <unistd.h>

#define STB_IMAGE_STATIC
#define STB_IMAGE_IMPLEMENTATION
#include <stb/stb_image.h>

#include <cmath>
#include <filesystem>
#include <memory>
#include <random>

namespace tilt {
namespace {

namespace fs = std::filesystem;

// A fresh directory under the system temporary directory, removed with its contents at the end.
class TempDir {
 public:
  TempDir() {
    static int counter = 0;
    path_ = fs::temp_directory_path() / ("tilt_plot_test_" + std::to_string(getpid()) + "_" + std::to_string(counter++));
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  size_t entries() const { return size_t(std::distance(fs::directory_iterator(path_), fs::directory_iterator())); }

 private:
  fs::path path_;
};

// An RGB image read back from a PNG file.
struct Image {
  int width = 0, height = 0;
  std::unique_ptr<unsigned char, void (*)(void*)> data{nullptr, stbi_image_free};
  const unsigned char* at(int x, int y) const { return data.get() + (size_t(y) * width + x) * 3; }
  int brightness(int x, int y) const { return at(x, y)[0] + at(x, y)[1] + at(x, y)[2]; }
  bool white(int x, int y) const { return brightness(x, y) == 3 * 255; }
  // A colour that is neither white nor a shade of grey (frame, grid and text are grey or black).
  bool coloured(int x, int y) const {
    const unsigned char* p = at(x, y);
    return std::max({p[0], p[1], p[2]}) - std::min({p[0], p[1], p[2]}) > 40;
  }
};

Image load(const std::string& path) {
  Image im;
  int channels = 0;
  im.data.reset(stbi_load(path.c_str(), &im.width, &im.height, &channels, 3));
  EXPECT_NE(im.data, nullptr) << "cannot decode " << path << ": " << stbi_failure_reason();
  return im;
}

// n samples of a round Gaussian blob.
std::vector<plot::Point> blob(int n, float cx, float cy, float sd, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, sd);
  std::vector<plot::Point> points;
  for (int i = 0; i < n; ++i) points.push_back({cx + normal(rng), cy + normal(rng)});
  return points;
}

TEST(Plot, ScatterHasDocumentedSizeAndDrawsPointsWhereTheyAre) {
  TempDir dir;
  const std::string path = dir.file("scatter.png");
  plot::ScatterOptions options;
  options.panel_size = 200;
  options.title = "two panels";
  options.x_min = -2, options.x_max = 2, options.y_min = -2, options.y_max = 2;
  // Many points in one panel, few in the other: both must show up.
  const std::vector<plot::Panel> panels = {{"dense", blob(20000, 1.0f, 1.0f, 0.1f, 1)}, {"sparse", blob(500, 1.0f, 1.0f, 0.1f, 2)}};
  plot::write_scatter_png(path, panels, options);

  const Image im = load(path);
  ASSERT_NE(im.data.get(), nullptr);
  EXPECT_EQ(im.width, 2 * (200 + plot::kScatterExtraWidth));
  EXPECT_EQ(im.height, 200 + plot::kScatterExtraHeight + plot::kScatterTitleHeight);
  EXPECT_TRUE(im.white(im.width - 1, im.height - 1));
  for (int k = 0; k < 2; ++k) {
    const int x0 = k * (200 + plot::kScatterExtraWidth) + plot::kScatterPanelLeft, y0 = plot::kScatterTitleHeight + plot::kScatterPanelTop;
    // (1, 1) in [-2, 2]^2 is at 3/4 of the width and 1/4 of the height (y grows upwards).
    const int cx = x0 + 150, cy = y0 + 50;
    int darkest = 3 * 255;
    for (int dy = -3; dy <= 3; ++dy)
      for (int dx = -3; dx <= 3; ++dx) darkest = std::min(darkest, im.brightness(cx + dx, cy + dy));
    EXPECT_LT(darkest, 3 * 160) << "panel " << k;
    // The opposite corner of the plotting area is empty.
    for (int dy = 0; dy < 20; ++dy)
      for (int dx = 0; dx < 20; ++dx) ASSERT_TRUE(im.white(x0 + 5 + dx, y0 + 175 + dy)) << "panel " << k;
  }
}

TEST(Plot, ScatterAutomaticRangeCentresTheData) {
  TempDir dir;
  const std::string path = dir.file("auto.png");
  plot::ScatterOptions options;
  options.panel_size = 120;
  options.columns = 1;
  // An elongated blob far from the origin, plus a few far outliers that must not squash it.
  std::vector<plot::Point> points = blob(3000, 50.0f, -20.0f, 1.0f, 3);
  for (auto& p : points) p.x = 50.0f + (p.x - 50.0f) * 3.0f;
  points.push_back({1e6f, 1e6f});
  points.push_back({NAN, 0.0f});
  plot::write_scatter_png(path, {{"a", points}, {"b", blob(100, 50.0f, -20.0f, 1.0f, 4)}}, options);

  const Image im = load(path);
  ASSERT_NE(im.data.get(), nullptr);
  EXPECT_EQ(im.width, 120 + plot::kScatterExtraWidth);
  EXPECT_EQ(im.height, 2 * (120 + plot::kScatterExtraHeight));
  const int x0 = plot::kScatterPanelLeft, y0 = plot::kScatterPanelTop;
  EXPECT_LT(im.brightness(x0 + 60, y0 + 60), 3 * 160);
  // Same span on both axes: the blob is three times wider than high, so the top and bottom are empty.
  EXPECT_TRUE(im.white(x0 + 60, y0 + 3));
  EXPECT_TRUE(im.white(x0 + 60, y0 + 116));
  EXPECT_FALSE(im.white(x0 + 30, y0 + 60));
}

TEST(Plot, LinePlotHasRequestedSizeAndDrawsTheSeries) {
  TempDir dir;
  const std::string path = dir.file("lines.png");
  plot::Series flat{"", {}, {}}, rising{"rising", {}, {}};
  for (int i = 0; i <= 100; ++i) {
    flat.x.push_back(i), flat.y.push_back(5.0);
    rising.x.push_back(i), rising.y.push_back(100.0 + i);  // far above: flat stays in the lower part
  }
  plot::LineOptions options;
  options.width = 500, options.height = 300;
  options.x_label = "step";
  options.y_label = "value";
  plot::write_line_png(path, {flat}, options);

  Image im = load(path);
  ASSERT_NE(im.data.get(), nullptr);
  EXPECT_EQ(im.width, 500);
  EXPECT_EQ(im.height, 300);
  EXPECT_TRUE(im.white(0, 0));
  EXPECT_TRUE(im.white(im.width - 1, 0));
  // The constant series is a horizontal coloured line a few pixels thick across the middle.
  std::vector<int> rows;
  for (int y = 0; y < im.height; ++y)
    if (im.coloured(im.width / 2, y)) rows.push_back(y);
  ASSERT_FALSE(rows.empty());
  EXPECT_LE(rows.size(), 5u);
  EXPECT_GT(rows.front(), im.height / 4);
  EXPECT_LT(rows.back(), im.height * 3 / 4);

  // Two series on a log axis, with values that must be skipped.
  flat.y[10] = 0.0, flat.y[11] = -1.0, flat.y[12] = NAN, rising.x[3] = INFINITY;
  options.log_y = true;
  options.title = "log";
  plot::write_line_png(path, {flat, rising}, options);
  im = load(path);
  ASSERT_NE(im.data.get(), nullptr);
  EXPECT_EQ(im.width, 500);
  EXPECT_EQ(im.height, 300);
  int coloured = 0;
  for (int y = 0; y < im.height; ++y) coloured += im.coloured(im.width / 2, y);
  EXPECT_GE(coloured, 2);  // both lines cross the middle column
}

// The last x tick label is centred on the plot's right edge when the data end on a round number (60000 iterations):
// it stays inside the image, whose right-most columns are white.
TEST(Plot, LinePlotKeepsTheLastTickLabelInsideTheImage) {
  TempDir dir;
  const std::string path = dir.file("long_run.png");
  for (const double end : {1000.0, 60000.0, 1e7}) {
    plot::Series curve{"error", {}, {}};
    for (int i = 0; i <= 120; ++i) curve.x.push_back(end * i / 120), curve.y.push_back(1.0 / (1 + i));
    plot::LineOptions options;
    options.width = 800, options.height = 480;
    options.log_y = true;
    options.x_label = "iteration";
    plot::write_line_png(path, {curve}, options);
    Image im = load(path);
    ASSERT_NE(im.data.get(), nullptr);
    int dark = 0;
    for (int y = 0; y < im.height; ++y) {
      for (int x = im.width - 3; x < im.width; ++x) dark += !im.white(x, y);
    }
    EXPECT_EQ(dark, 0) << "x up to " << end;
  }
}

// The legend goes to a corner the lines leave free: top right for a falling line, top left for a rising one (which
// passes through the top right). Its text is the only near-black inside the plot area.
TEST(Plot, LinePlotPutsTheLegendWhereTheLinesAreNot) {
  TempDir dir;
  const std::string path = dir.file("legend.png");
  for (const bool rising : {false, true}) {
    plot::Series line{rising ? "rising" : "falling", {}, {}};
    for (int i = 0; i <= 100; ++i) line.x.push_back(i), line.y.push_back(rising ? i : 100 - i);
    plot::LineOptions options;
    options.width = 600, options.height = 400;
    plot::write_line_png(path, {line}, options);
    Image im = load(path);
    ASSERT_NE(im.data.get(), nullptr);
    auto text_in = [&](int x0, int x1) {  // near-black pixels in columns [x0, x1) of the upper half
      int n = 0;
      for (int y = 0; y < im.height / 2; ++y)
        for (int x = x0; x < x1; ++x) n += im.brightness(x, y) < 3 * 60;
      return n;
    };
    const int left_side = text_in(im.width / 5, im.width / 2), right_side = text_in(im.width / 2, im.width - 4);
    EXPECT_EQ(left_side > 0, rising) << line.label;
    EXPECT_EQ(right_side > 0, !rising) << line.label;
  }
}

// When every corner would hide part of a line (an X with a line along the top and the bottom), the legend goes beside
// the plot on the right: below the legend, the right-most columns then hold no line. An image too narrow to keep
// half its width for the plot keeps the legend in a corner, and the lines reach those columns.
TEST(Plot, LinePlotPutsTheLegendBesideThePlotWhenEveryCornerHidesALine) {
  TempDir dir;
  const std::string path = dir.file("beside.png");
  std::vector<plot::Series> lines = {{"rising", {}, {}}, {"falling", {}, {}}, {"top", {}, {}}, {"bottom", {}, {}}};
  for (int i = 0; i <= 100; ++i) {
    const double y[4] = {double(i), 100.0 - i, 100.0, 0.0};
    for (int k = 0; k < 4; ++k) lines[k].x.push_back(i), lines[k].y.push_back(y[k]);
  }
  for (const int width : {800, 300}) {
    plot::LineOptions options;
    options.width = width, options.height = 400;
    plot::write_line_png(path, lines, options);
    Image im = load(path);
    ASSERT_NE(im.data.get(), nullptr);
    EXPECT_EQ(im.width, width);
    int coloured = 0;  // in the lower half, in the columns of a legend beside the plot
    for (int y = im.height / 2; y < im.height; ++y)
      for (int x = im.width - 80; x < im.width; ++x) coloured += im.coloured(x, y);
    EXPECT_EQ(coloured == 0, width == 800) << width << " px wide: " << coloured << " coloured pixels";
  }
}

// The font has printable ASCII only: a UTF-8 title was drawn with one '?' per byte ("λ = 5" as "?? = 5").
TEST(Plot, TitlesAreSpelledInAsciiOneCharacterAtATime) {
  EXPECT_EQ(plot::printable("\xCE\xBB = 5, \xCF\x83(t), 2 \xC3\x97 10\xC2\xB3"), "lambda = 5, sigma(t), 2 x 10^3");
  EXPECT_EQ(plot::printable("\xCE\x94t \xE2\x89\xA4 0.1 \xE2\x86\x92 \xE2\x88\x9E"), "Deltat <= 0.1 -> inf");
  EXPECT_EQ(plot::printable("caf\xC3\xA9 \xE4\xB8\xAD \xF0\x9F\x98\x80!"), "caf? ? ?!");  // one '?' a character
  EXPECT_EQ(plot::printable("a\tb\xFF\xC3"), "a?b??");  // a control, a byte that is not UTF-8, a cut sequence
  EXPECT_EQ(plot::printable("\xE2\x82"), "??");
  EXPECT_EQ(plot::printable("plain ASCII ~"), "plain ASCII ~");
}

TEST(Plot, BadInputThrowsAndWritesNothing) {
  TempDir dir;
  const std::string path = dir.file("bad.png");
  const std::vector<plot::Panel> panels = {{"p", blob(10, 0, 0, 1, 5)}};
  EXPECT_THROW(plot::write_scatter_png(path, {}), Error);
  EXPECT_THROW(plot::write_scatter_png("", panels), Error);
  plot::ScatterOptions small;
  small.panel_size = 10;
  EXPECT_THROW(plot::write_scatter_png(path, panels, small), Error);
  plot::ScatterOptions negative;
  negative.columns = -1;
  EXPECT_THROW(plot::write_scatter_png(path, panels, negative), Error);

  const plot::Series good{"ok", {0, 1}, {1, 2}}, mismatched{"bad", {0, 1, 2}, {1, 2}};
  EXPECT_THROW(plot::write_line_png(path, {}), Error);
  EXPECT_THROW(plot::write_line_png("", {good}), Error);
  EXPECT_THROW(plot::write_line_png(path, {good, mismatched}), Error);
  plot::LineOptions tiny;
  tiny.width = 10;
  EXPECT_THROW(plot::write_line_png(path, {good}, tiny), Error);
  try {
    plot::write_line_png(path, {mismatched});
    ADD_FAILURE() << "mismatched sizes did not throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("bad"), std::string::npos) << e.what();
  }
  EXPECT_EQ(dir.entries(), 0u);
}

TEST(Plot, WritingOverAnExistingFileReplacesIt) {
  TempDir dir;
  const std::string path = dir.file("out.png");
  atomic_write(path, "not a png");
  plot::write_scatter_png(path, {{"p", blob(100, 0, 0, 1, 6)}});
  Image im = load(path);
  ASSERT_NE(im.data.get(), nullptr);
  EXPECT_EQ(im.width, 300 + plot::kScatterExtraWidth);

  plot::write_line_png(path, {{"s", {0, 1, 2}, {3, 1, 2}}});
  im = load(path);
  ASSERT_NE(im.data.get(), nullptr);
  EXPECT_EQ(im.width, 640);
  EXPECT_EQ(im.height, 400);
  EXPECT_EQ(dir.entries(), 1u);  // no temporary file left behind
}

// tilt plot --images --by-condition K: one row per condition in the order the conditions first appear over
// all files, the first K samples of each, blank (white) where a file has fewer: the rows of every panel
// are the same conditions.
TEST(Plot, ImagesByConditionLayOutOneRowPerCondition) {
  TempDir dir;
  // 2 x 2 images: condition A = (1, 0) all ink (+1, black), B = (0, 1) half ink (0, grey).
  const Tensor a = at::tensor({1.0, 0.0}, at::kDouble), b = at::tensor({0.0, 1.0}, at::kDouble);
  const auto file = [&](const std::string& name, const std::vector<Tensor>& conditions) {
    std::vector<Tensor> x;
    for (const Tensor& c : conditions) x.push_back(at::full({4}, c[0].item<double>() > 0 ? 1.0f : 0.0f));
    write_samples_csv(dir.file(name), at::stack(x), at::stack(conditions));
    return dir.file(name);
  };
  PlotOptions o;
  o.panels = {file("ab.csv", {a, b, a, a, a, b, a}) + ":ab", file("b.csv", {b, b, b, b}) + ":b"};
  o.out = dir.file("grid.png");
  o.images = "2x2";
  o.by_condition = 3;
  plot_sample_files(o);
  const Image im = load(o.out);
  ASSERT_NE(im.data.get(), nullptr);
  // Each panel: 3 images of 2 x 2 pixels at scale 4 with 1-pixel gaps (28 wide), margins of 16; 2 rows (19 high)
  // under a title band of 36 and above a margin of 16.
  EXPECT_EQ(im.width, 2 * (3 * 9 + 1 + 32));
  EXPECT_EQ(im.height, 2 * 9 + 1 + 36 + 16);
  const auto centre = [&](int panel, int row, int column) {
    return im.brightness(panel * 60 + 16 + 1 + column * 9 + 4, 36 + 1 + row * 9 + 4) / 3;
  };
  for (int column = 0; column < 3; ++column) {
    EXPECT_EQ(centre(0, 0, column), 0) << column;                      // A: its first three
    EXPECT_EQ(centre(0, 1, column), column < 2 ? 128 : 255) << column;  // B: two, then a blank
    EXPECT_EQ(centre(1, 0, column), 255) << column;                    // no A in the second file
    EXPECT_EQ(centre(1, 1, column), 128) << column;
  }
  o.panels.push_back(dir.file("plain.csv"));
  write_samples_csv(o.panels.back(), at::zeros({2, 4}));
  try {
    plot_sample_files(o);
    ADD_FAILURE() << "a file without condition columns did not throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'" + o.panels.back() + "' has no condition columns"), std::string::npos) << e.what();
  }
  o.panels.pop_back();
  o.images.clear();
  EXPECT_THROW(plot_sample_files(o), Error);  // --by-condition without --images
}

}  // namespace
}  // namespace tilt
