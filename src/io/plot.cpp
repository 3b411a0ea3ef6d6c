// PNG plots drawn on a small RGB canvas; text comes from stb_easy_font (quads scaled up by an
// integer factor), encoding from stb_image_write.
#include "tilt/io/plot.h"

#include "tilt/core/error.h"
#include "tilt/core/fs.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>

// Both headers are used only here; STATIC keeps their symbols private to this translation unit.
#define STB_IMAGE_WRITE_STATIC
#define STB_IMAGE_WRITE_IMPLEMENTATION
#include <stb/stb_image_write.h>
#include <stb/stb_easy_font.h>  // header-only, all functions static

namespace tilt::plot {

namespace {

// ASCII spellings of the symbols a plot title most often holds (lambda = 5, sigma(t), 2 x 10^3).
const char* ascii_spelling(uint32_t cp) {
  static const char* const greek[] = {"alpha", "beta",  "gamma",   "delta", "epsilon", "zeta", "eta",   "theta",
                                      "iota",  "kappa", "lambda",  "mu",    "nu",      "xi",   "omicron", "pi",
                                      "rho",   "sigma", "sigma",   "tau",   "upsilon", "phi",  "chi",   "psi", "omega"};
  if (cp >= 0x3B1 && cp <= 0x3C9) return greek[cp - 0x3B1];
  if (cp >= 0x391 && cp <= 0x3A9 && cp != 0x3A2) {
    static const char* const upper[] = {"Alpha", "Beta", "Gamma", "Delta", "Epsilon", "Zeta", "Eta", "Theta", "Iota",
                                        "Kappa", "Lambda", "Mu", "Nu", "Xi", "Omicron", "Pi", "Rho", "?", "Sigma",
                                        "Tau", "Upsilon", "Phi", "Chi", "Psi", "Omega"};
    return upper[cp - 0x391];
  }
  switch (cp) {
    case 0xB5: return "mu";
    case 0xD7: return "x";
    case 0xB7: case 0x22C5: return ".";
    case 0xB1: return "+/-";
    case 0xB2: return "^2";
    case 0xB3: return "^3";
    case 0x2212: case 0x2013: case 0x2014: return "-";
    case 0x2018: case 0x2019: return "'";
    case 0x201C: case 0x201D: return "\"";
    case 0x2264: return "<=";
    case 0x2265: return ">=";
    case 0x2248: return "~";
    case 0x2192: return "->";
    case 0x221E: return "inf";
    case 0x221A: return "sqrt";
    case 0xA0: return " ";
    default: return nullptr;
  }
}

}  // namespace

std::string printable(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size();) {
    const auto b = static_cast<unsigned char>(s[i]);
    if (b < 0x80) {
      out += (b >= 32 && b <= 126) ? static_cast<char>(b) : '?';
      ++i;
      continue;
    }
    // One UTF-8 sequence: its length from the lead byte, then continuation bytes 10xxxxxx.
    const int len = b >= 0xF8 ? 0 : b >= 0xF0 ? 4 : b >= 0xE0 ? 3 : b >= 0xC2 ? 2 : 0;
    uint32_t cp = len == 4 ? b & 0x07u : len == 3 ? b & 0x0Fu : b & 0x1Fu;
    bool ok = len > 0 && i + len <= s.size();
    for (int k = 1; ok && k < len; ++k) {
      const auto c = static_cast<unsigned char>(s[i + k]);
      ok = (c & 0xC0) == 0x80;
      cp = (cp << 6) | (c & 0x3Fu);
    }
    if (!ok) {  // not UTF-8 (a Latin-1 byte, a cut sequence): one '?' for the byte
      out += '?';
      ++i;
      continue;
    }
    const char* spelled = ascii_spelling(cp);
    out += spelled ? spelled : "?";
    i += static_cast<size_t>(len);
  }
  return out;
}

namespace {

struct Rgb {
  uint8_t r, g, b;
};
constexpr Rgb kWhite{255, 255, 255}, kBlack{20, 20, 20}, kFrame{90, 90, 90}, kGrid{228, 228, 228};
constexpr int kFontHeight = 7;  // cap height of stb_easy_font glyphs, in font units

enum class Align { Left, Center, Right };

class Canvas {
 public:
  Canvas(int width, int height) : w_(width), h_(height), rgb_(size_t(width) * height * 3, 255) { reset_clip(); }
  int width() const { return w_; }
  int height() const { return h_; }

  // Drawing is restricted to [x0, x1) x [y0, y1).
  void clip(int x0, int y0, int x1, int y1) { cx0_ = std::max(0, x0), cy0_ = std::max(0, y0), cx1_ = std::min(w_, x1), cy1_ = std::min(h_, y1); }
  void reset_clip() { clip(0, 0, w_, h_); }

  void set(int x, int y, Rgb c) {
    if (x < cx0_ || y < cy0_ || x >= cx1_ || y >= cy1_) return;
    uint8_t* p = &rgb_[(size_t(y) * w_ + x) * 3];
    p[0] = c.r, p[1] = c.g, p[2] = c.b;
  }
  void blend(int x, int y, Rgb c, float alpha) {
    if (x < cx0_ || y < cy0_ || x >= cx1_ || y >= cy1_ || !(alpha > 0)) return;
    alpha = std::min(alpha, 1.0f);
    uint8_t* p = &rgb_[(size_t(y) * w_ + x) * 3];
    const uint8_t src[3] = {c.r, c.g, c.b};
    for (int k = 0; k < 3; ++k) p[k] = uint8_t(std::lround(p[k] + (src[k] - p[k]) * alpha));
  }
  void fill_rect(int x0, int y0, int x1, int y1, Rgb c) {  // [x0, x1) x [y0, y1)
    for (int y = std::max(y0, cy0_); y < std::min(y1, cy1_); ++y)
      for (int x = std::max(x0, cx0_); x < std::min(x1, cx1_); ++x) set(x, y, c);
  }
  void frame(int x0, int y0, int x1, int y1, Rgb c) {  // 1-pixel outline of [x0, x1] x [y0, y1]
    fill_rect(x0, y0, x1 + 1, y0 + 1, c), fill_rect(x0, y1, x1 + 1, y1 + 1, c);
    fill_rect(x0, y0, x0 + 1, y1 + 1, c), fill_rect(x1, y0, x1 + 1, y1 + 1, c);
  }

  // Anti-aliased polyline of the given width (pixel centres at integer coordinates). The coverage
  // of all segments is combined with max() before blending, so joints are not drawn twice. A
  // single point becomes a dot.
  void polyline(const std::vector<std::pair<float, float>>& pts, Rgb c, float width) {
    const float r = 0.5f * width;
    float lo_x = 1e30f, lo_y = 1e30f, hi_x = -1e30f, hi_y = -1e30f;
    for (const auto& [x, y] : pts) lo_x = std::min(lo_x, x), lo_y = std::min(lo_y, y), hi_x = std::max(hi_x, x), hi_y = std::max(hi_y, y);
    // Coverage buffer over the bounding box of the line, clipped.
    const int bx0 = std::max(cx0_, int(std::max(-1e9f, std::floor(lo_x - r - 1)))), bx1 = std::min(cx1_, int(std::min(1e9f, std::ceil(hi_x + r + 2))));
    const int by0 = std::max(cy0_, int(std::max(-1e9f, std::floor(lo_y - r - 1)))), by1 = std::min(cy1_, int(std::min(1e9f, std::ceil(hi_y + r + 2))));
    if (pts.empty() || bx0 >= bx1 || by0 >= by1) return;
    const int bw = bx1 - bx0;
    std::vector<float> cover(size_t(bw) * (by1 - by0), 0.0f);
    for (size_t i = 0; i + 1 < std::max<size_t>(pts.size(), 2); ++i) {
      const auto [ax, ay] = pts[i];
      const auto [ex, ey] = pts[std::min(i + 1, pts.size() - 1)];
      const float dx = ex - ax, dy = ey - ay, len2 = dx * dx + dy * dy;
      const int x0 = std::max(bx0, int(std::floor(std::min(ax, ex) - r - 1))), x1 = std::min(bx1 - 1, int(std::ceil(std::max(ax, ex) + r + 1)));
      const int y0 = std::max(by0, int(std::floor(std::min(ay, ey) - r - 1))), y1 = std::min(by1 - 1, int(std::ceil(std::max(ay, ey) + r + 1)));
      for (int y = y0; y <= y1; ++y) {
        for (int x = x0; x <= x1; ++x) {
          const float t = len2 > 0 ? std::clamp(((x - ax) * dx + (y - ay) * dy) / len2, 0.0f, 1.0f) : 0.0f;
          const float d = std::hypot(x - (ax + t * dx), y - (ay + t * dy));
          float& cv = cover[size_t(y - by0) * bw + (x - bx0)];
          cv = std::max(cv, std::clamp(r + 0.5f - d, 0.0f, 1.0f));
        }
      }
    }
    for (int y = by0; y < by1; ++y)
      for (int x = bx0; x < bx1; ++x) blend(x, y, c, cover[size_t(y - by0) * bw + (x - bx0)]);
  }

  static int text_width(const std::string& s, int scale) {
    std::string t = printable(s);
    return t.empty() ? 0 : stb_easy_font_width(t.data()) * scale;
  }
  // Draws one line of text with its top-left corner at (x, y). If vertical, the text is rotated a
  // quarter turn counter-clockwise (reads bottom to top) and (x, y) is its bottom-left corner.
  void text(int x, int y, const std::string& s, int scale, Rgb c, bool vertical = false) {
    std::string t = printable(s);
    std::vector<char> quads(t.size() * 2048 + 64);  // 64 bytes a quad, well under 32 quads a glyph
    const int n = stb_easy_font_print(0, 0, t.data(), nullptr, quads.data(), int(quads.size()));
    for (int q = 0; q < n; ++q) {
      float v0[2], v2[2];  // vertex 0 is the top-left corner, vertex 2 the bottom-right one
      std::memcpy(v0, &quads[size_t(q) * 64], sizeof v0);
      std::memcpy(v2, &quads[size_t(q) * 64 + 32], sizeof v2);
      const int a = int(v0[0]) * scale, b = int(v2[0]) * scale, top = int(v0[1]) * scale, bot = int(v2[1]) * scale;
      if (vertical) fill_rect(x + top, y - b, x + bot, y - a, c);
      else fill_rect(x + a, y + top, x + b, y + bot, c);
    }
  }
  void text_aligned(int x, int y, const std::string& s, int scale, Rgb c, Align align) {
    const int tw = text_width(s, scale);
    text(align == Align::Left ? x : align == Align::Center ? x - tw / 2 : x - tw, y, s, scale, c);
  }

  std::string encode_png() const {
    std::string out;
    auto append = [](void* ctx, void* data, int size) { static_cast<std::string*>(ctx)->append(static_cast<const char*>(data), size_t(size)); };
    if (!stbi_write_png_to_func(append, &out, w_, h_, 3, rgb_.data(), w_ * 3)) throw Error("plot: PNG encoding failed");
    return out;
  }

 private:
  int w_, h_, cx0_ = 0, cy0_ = 0, cx1_ = 0, cy1_ = 0;
  std::vector<uint8_t> rgb_;
};

// Largest scale (preferred down to 2; 1 is hard to read) at which s fits in max_width; at scale 2,
// shortened with ".." if it still does not fit.
std::pair<std::string, int> fit_text(std::string s, int max_width, int preferred) {
  for (int scale = preferred; scale >= 2; --scale)
    if (Canvas::text_width(s, scale) <= max_width) return {s, scale};
  while (s.size() > 1 && Canvas::text_width(s + "..", 2) > max_width) s.pop_back();
  return {s + "..", 2};
}

// ---- Axis ticks ----

struct Tick {
  double pos;  // in axis units (log10 of the value on a log axis)
  std::string label;
};

std::string format(const char* fmt, double v, int precision = 0) {
  char buf[64];
  std::snprintf(buf, sizeof buf, fmt, precision, v);
  return buf;
}

// About `target` round values (1, 2 or 5 times a power of ten apart) in [lo, hi].
std::vector<Tick> linear_ticks(double lo, double hi, int target) {
  if (!(hi > lo) || !std::isfinite(hi - lo)) return {};
  const double raw = (hi - lo) / std::max(target, 1), mag = std::pow(10.0, std::floor(std::log10(raw))), f = raw / mag;
  const double step = (f < 1.5 ? 1 : f < 3.5 ? 2 : f < 7.5 ? 5 : 10) * mag;
  const bool sci = step < 1e-4 || std::max(std::abs(lo), std::abs(hi)) >= 1e6;
  const int decimals = std::clamp(int(-std::floor(std::log10(step) + 1e-9)), 0, 9);
  std::vector<Tick> ticks;
  for (double k = std::ceil(lo / step - 1e-9); k * step <= hi + 1e-9 * step && ticks.size() < 50; ++k) {
    const double v = std::abs(k) < 0.5 ? 0.0 : k * step;  // no "-0"
    ticks.push_back({v, sci ? format("%.*g", v, 3) : format("%.*f", v, decimals)});
  }
  return ticks;
}

// Ticks for a log10 axis spanning [lo, hi] (in log10 units): decades when at least three fit,
// otherwise 1-2-5 or 1..9 mantissas, otherwise round values on the linear scale.
std::vector<Tick> log_ticks(double lo, double hi, int target) {
  const int a = int(std::ceil(lo - 1e-9)), b = int(std::floor(hi + 1e-9));
  std::vector<Tick> ticks;
  if (b > a) {
    const int stride = std::max(1, (b - a + target) / target);
    for (int k = int(std::ceil(double(a) / stride)) * stride; k <= b; k += stride)
      ticks.push_back({double(k), k >= -3 && k <= 4 ? format("%.*g", std::pow(10.0, k), 6) : "1e" + std::to_string(k)});
    if (ticks.size() >= 3) return ticks;
  }
  for (const std::vector<int>& mantissas : {std::vector<int>{1, 2, 5}, std::vector<int>{1, 2, 3, 4, 5, 6, 7, 8, 9}}) {
    ticks.clear();
    for (int k = int(std::floor(lo)); k <= int(std::ceil(hi)); ++k)
      for (int m : mantissas) {
        const double v = m * std::pow(10.0, k), p = std::log10(v);
        if (p >= lo - 1e-9 && p <= hi + 1e-9) ticks.push_back({p, format("%.*g", v, 3)});
      }
    if (ticks.size() >= 3) return ticks;
  }
  ticks.clear();
  for (const Tick& t : linear_ticks(std::pow(10.0, lo), std::pow(10.0, hi), target))
    if (t.pos > 0) ticks.push_back({std::log10(t.pos), t.label});
  return ticks;
}

// ---- Scatter ----

// Sequential ramp (after ColorBrewer "Blues", extended to a dark navy): t = 0 white, 1 darkest.
Rgb ramp(float t) {
  static const float stops[][4] = {{0.0f, 255, 255, 255}, {0.15f, 222, 235, 247}, {0.35f, 158, 202, 225},
                                   {0.6f, 66, 146, 198},  {0.8f, 8, 81, 156},     {1.0f, 8, 29, 70}};
  t = std::clamp(t, 0.0f, 1.0f);
  int i = 0;
  while (i < 4 && t > stops[i + 1][0]) ++i;
  const float u = (t - stops[i][0]) / (stops[i + 1][0] - stops[i][0]);
  auto mix = [&](int k) { return uint8_t(std::lround(stops[i][k] + u * (stops[i + 1][k] - stops[i][k]))); };
  return {mix(1), mix(2), mix(3)};
}

float quantile(std::vector<float> v, double q) {  // v non-empty
  const size_t k = std::min(v.size() - 1, size_t(q * double(v.size() - 1) + 0.5));
  std::nth_element(v.begin(), v.begin() + std::ptrdiff_t(k), v.end());
  return v[k];
}

struct Range {
  double x0, x1, y0, y1;
};

// The range from the options where given; otherwise robust bounds of all points with the same span
// on both axes (a range given on one axis only sets the span of the other).
Range scatter_range(const std::vector<Panel>& panels, const ScatterOptions& o) {
  std::vector<float> xs, ys;
  for (const Panel& p : panels)
    for (const Point& pt : p.points)
      if (std::isfinite(pt.x) && std::isfinite(pt.y)) xs.push_back(pt.x), ys.push_back(pt.y);
  double cx = 0, cy = 0, half = 1;
  if (!xs.empty()) {
    const double xl = quantile(xs, 0.01), xh = quantile(xs, 0.99), yl = quantile(ys, 0.01), yh = quantile(ys, 0.99);
    cx = 0.5 * (xl + xh), cy = 0.5 * (yl + yh);
    half = 0.5 * std::max(xh - xl, yh - yl) * 1.25;  // 25% margin: the 1% tails mostly stay inside
    if (!(half > 1e-6 * std::max({1.0, std::abs(cx), std::abs(cy)}))) half = std::max({1.0, 0.1 * std::abs(cx), 0.1 * std::abs(cy)});
  }
  const bool has_x = o.x_min < o.x_max && std::isfinite(o.x_min) && std::isfinite(o.x_max);
  const bool has_y = o.y_min < o.y_max && std::isfinite(o.y_min) && std::isfinite(o.y_max);
  const double xhalf = has_y ? 0.5 * (double(o.y_max) - o.y_min) : half, yhalf = has_x ? 0.5 * (double(o.x_max) - o.x_min) : half;
  return {has_x ? o.x_min : cx - xhalf, has_x ? o.x_max : cx + xhalf, has_y ? o.y_min : cy - yhalf, has_y ? o.y_max : cy + yhalf};
}

// Splats the points into an S x S density (bilinear, then a 3x3 binomial blur so a lone point is a
// visible dot) and maps it through the ramp, normalised by the 99th percentile of the non-empty cells.
void draw_density(Canvas& cv, int px0, int py0, int S, const std::vector<Point>& points, const Range& r) {
  std::vector<float> acc(size_t(S) * S, 0.0f), dens(acc.size(), 0.0f);
  for (const Point& p : points) {
    if (!std::isfinite(p.x) || !std::isfinite(p.y)) continue;
    const double u = (p.x - r.x0) / (r.x1 - r.x0) * S - 0.5, v = (r.y1 - p.y) / (r.y1 - r.y0) * S - 0.5;
    if (!(u > -1 && v > -1 && u < S && v < S)) continue;
    const int i = int(std::floor(u)), j = int(std::floor(v));
    const float fu = float(u - i), fv = float(v - j);
    for (int dj = 0; dj < 2; ++dj)
      for (int di = 0; di < 2; ++di)
        if (i + di >= 0 && i + di < S && j + dj >= 0 && j + dj < S)
          acc[size_t(j + dj) * S + i + di] += (di ? fu : 1 - fu) * (dj ? fv : 1 - fv);
  }
  std::vector<float> nonzero;
  for (int y = 0; y < S; ++y)
    for (int x = 0; x < S; ++x) {
      float s = 0;
      for (int dy = -1; dy <= 1; ++dy)
        for (int dx = -1; dx <= 1; ++dx)
          if (x + dx >= 0 && x + dx < S && y + dy >= 0 && y + dy < S) s += acc[size_t(y + dy) * S + x + dx] * float((2 - std::abs(dx)) * (2 - std::abs(dy)));
      dens[size_t(y) * S + x] = s / 16;
      if (s > 0) nonzero.push_back(s / 16);
    }
  if (nonzero.empty()) return;
  const float norm = quantile(nonzero, 0.99);
  for (int y = 0; y < S; ++y)
    for (int x = 0; x < S; ++x)
      if (const float d = dens[size_t(y) * S + x]; d > 0)
        cv.set(px0 + x, py0 + y, ramp(std::pow(std::min(d / norm, 1.0f), 0.6f)));  // gamma < 1 lifts sparse tails
}

// ---- Line plot ----

// Distinct colours for series (after the Tableau 10 palette).
const Rgb kPalette[] = {{31, 119, 180}, {255, 127, 14}, {44, 160, 44}, {214, 39, 40},   {148, 103, 189},
                        {140, 86, 75},  {227, 119, 194}, {127, 127, 127}, {188, 189, 34}, {23, 190, 207}};

// [lo, hi] of the values, padded by `pad` of the span; a degenerate span is widened.
void padded_bounds(const std::vector<double>& v, double pad, double& lo, double& hi) {
  if (v.empty()) { lo = 0, hi = 1; return; }
  const auto [a, b] = std::minmax_element(v.begin(), v.end());
  lo = *a, hi = *b;
  const double span = hi - lo;
  if (span <= 1e-12 * std::max(1.0, std::abs(lo))) {
    const double w = lo != 0 ? 0.1 * std::abs(lo) : 1.0;
    lo -= w, hi += w;
  } else {
    lo -= pad * span, hi += pad * span;
  }
}

void check_path(const std::string& path) {
  if (path.empty()) throw Error("plot: empty output path");
}

}  // namespace

void write_scatter_png(const std::string& path, const std::vector<Panel>& panels, const ScatterOptions& o) {
  check_path(path);
  if (panels.empty()) throw Error("plot: write_scatter_png needs at least one panel ('" + path + "')");
  if (o.panel_size < 64 || o.panel_size > 4096) throw Error("plot: panel_size must be in [64, 4096], got " + std::to_string(o.panel_size));
  if (o.columns < 0) throw Error("plot: columns must be >= 0, got " + std::to_string(o.columns));
  const int n = int(panels.size()), S = o.panel_size;
  const int cols = o.columns == 0 ? n : std::min(o.columns, n), rows = (n + cols - 1) / cols;
  const int head = o.title.empty() ? 0 : kScatterTitleHeight, cell_w = S + kScatterExtraWidth, cell_h = S + kScatterExtraHeight;
  if (double(cols) * cell_w * (double(rows) * cell_h + head) > 1e8) throw Error("plot: scatter image too large");
  Canvas cv(cols * cell_w, rows * cell_h + head);
  if (!o.title.empty()) {
    const auto [text, scale] = fit_text(o.title, cv.width() - 16, 3);
    cv.text_aligned(cv.width() / 2, (head - kFontHeight * scale) / 2, text, scale, kBlack, Align::Center);
  }
  const Range r = scatter_range(panels, o);
  const int target = std::max(2, S / 80);
  const std::vector<Tick> xt = linear_ticks(r.x0, r.x1, target), yt = linear_ticks(r.y0, r.y1, target);
  for (int k = 0; k < n; ++k) {
    // A cell: y tick labels, the panel, a gap (horizontally); the title, the panel, x tick labels (vertically).
    const int px0 = (k % cols) * cell_w + kScatterPanelLeft, py0 = head + (k / cols) * cell_h + kScatterPanelTop;
    draw_density(cv, px0, py0, S, panels[size_t(k)].points, r);
    cv.frame(px0 - 1, py0 - 1, px0 + S, py0 + S, kFrame);
    for (const Tick& t : xt) {
      const int x = std::clamp(int(std::lround(px0 + (t.pos - r.x0) / (r.x1 - r.x0) * S - 0.5)), px0, px0 + S - 1);
      cv.fill_rect(x, py0 + S + 1, x + 1, py0 + S + 5, kFrame);
      cv.text_aligned(x + 1, py0 + S + 10, t.label, 2, kBlack, Align::Center);
    }
    for (const Tick& t : yt) {
      const int y = std::clamp(int(std::lround(py0 + (r.y1 - t.pos) / (r.y1 - r.y0) * S - 0.5)), py0, py0 + S - 1);
      cv.fill_rect(px0 - 5, y, px0 - 1, y + 1, kFrame);
      cv.text_aligned(px0 - 9, y - kFontHeight, t.label, 2, kBlack, Align::Right);
    }
    const auto [text, scale] = fit_text(panels[size_t(k)].title, S + 40, 2);
    cv.text_aligned(px0 + S / 2, py0 - 10 - kFontHeight * scale, text, scale, kBlack, Align::Center);
  }
  atomic_write(path, cv.encode_png());
}

namespace {
using Points = std::vector<std::pair<float, float>>;

// The legend's box: the labelled series and its size in pixels.
struct LegendBox {
  std::vector<size_t> listed;
  int w = 0, h = 0;
};

LegendBox legend_box(const std::vector<Series>& series) {
  LegendBox b;
  int text_w = 0;
  for (size_t k = 0; k < series.size(); ++k)
    if (!series[k].label.empty()) b.listed.push_back(k), text_w = std::max(text_w, Canvas::text_width(series[k].label, 2));
  if (!b.listed.empty()) b.w = text_w + 52, b.h = int(b.listed.size()) * 22 + 10;
  return b;
}

// The corner of the plot area (left..right, top..bottom) where the legend covers the fewest of the lines' points
// (`drawn`: pixels along every segment); of equals, the first of top right, top left, bottom right, bottom left.
struct LegendPlace {
  size_t covered = SIZE_MAX;  // points of the lines under the box
  int x = 0, y = 0;           // the box's top left
};

LegendPlace best_corner(const LegendBox& b, int left, int top, int right, int bottom, const Points& drawn) {
  const int corners[4][2] = {{right - 8 - b.w, top + 8}, {left + 8, top + 8}, {right - 8 - b.w, bottom - 8 - b.h},
                             {left + 8, bottom - 8 - b.h}};
  LegendPlace best;
  for (const auto& corner : corners) {
    size_t covered = 0;
    for (const auto& [x, y] : drawn)
      covered += x >= corner[0] && x <= corner[0] + b.w && y >= corner[1] && y <= corner[1] + b.h;
    if (covered < best.covered) best = {covered, corner[0], corner[1]};
  }
  return best;
}

void draw_legend(Canvas& cv, const std::vector<Series>& series, const LegendBox& b, int lx, int ly) {
  cv.fill_rect(lx, ly, lx + b.w, ly + b.h, kWhite);
  cv.frame(lx, ly, lx + b.w, ly + b.h, kFrame);
  for (size_t e = 0; e < b.listed.size(); ++e) {
    const int cy = ly + 16 + int(e) * 22;
    cv.polyline({{float(lx + 8), float(cy)}, {float(lx + 36), float(cy)}}, kPalette[b.listed[e] % 10], 3.0f);
    cv.text(lx + 44, cy - kFontHeight, series[b.listed[e]].label, 2, kBlack);
  }
}
}  // namespace

void write_line_png(const std::string& path, const std::vector<Series>& series, const LineOptions& o) {
  check_path(path);
  if (series.empty()) throw Error("plot: write_line_png needs at least one series ('" + path + "')");
  if (o.width < 240 || o.height < 160 || o.width > 10000 || o.height > 10000)
    throw Error("plot: line plot size must be in [240, 10000] x [160, 10000], got " + std::to_string(o.width) + "x" + std::to_string(o.height));
  for (const Series& s : series)
    if (s.x.size() != s.y.size())
      throw Error("plot: series '" + s.label + "' has " + std::to_string(s.x.size()) + " x values but " + std::to_string(s.y.size()) + " y values");

  // Usable points, in axis units (log10 of y if log_y); a skipped point breaks the line.
  auto usable = [&](double x, double y) { return std::isfinite(x) && std::isfinite(y) && (!o.log_y || y > 0); };
  auto fy = [&](double y) { return o.log_y ? std::log10(y) : y; };
  std::vector<double> xs, ys;
  for (const Series& s : series)
    for (size_t i = 0; i < s.x.size(); ++i)
      if (usable(s.x[i], s.y[i])) xs.push_back(s.x[i]), ys.push_back(fy(s.y[i]));
  double x0, x1, y0, y1;
  padded_bounds(xs, 0.0, x0, x1);
  padded_bounds(ys, 0.05, y0, y1);

  // Layout: the y tick labels decide the left margin, so the plot height comes first.
  const int top = o.title.empty() ? 16 : 44, bottom = o.height - 34 - (o.x_label.empty() ? 0 : 24);
  const std::vector<Tick> yt = o.log_y ? log_ticks(y0, y1, std::max(2, (bottom - top) / 60)) : linear_ticks(y0, y1, std::max(2, (bottom - top) / 60));
  int label_w = 0;
  for (const Tick& t : yt) label_w = std::max(label_w, Canvas::text_width(t.label, 2));
  const int left = 8 + (o.y_label.empty() ? 0 : 24) + label_w + 10;
  // The plot's right end and x ticks when the image's free space ends at column `edge`. Each x tick label is centred
  // on its tick, and the last tick may be the plot's right edge: room for half a label (a run of 60000 iterations
  // lost the last digit of its "60000").
  auto fit_x = [&](int edge, int& right, std::vector<Tick>& xt) {
    right = edge - 20;
    xt = linear_ticks(x0, x1, std::max(2, (right - left) / 90));
    int half_label = 0;
    for (const Tick& t : xt) half_label = std::max(half_label, Canvas::text_width(t.label, 2) / 2 + 4);
    if (edge - right < half_label) {
      right = edge - half_label;
      xt = linear_ticks(x0, x1, std::max(2, (right - left) / 90));
    }
  };
  // Pixel coordinates: x depends on where the plot ends on the right, which the legend may move.
  auto X = [&](double x, int right) { return float(left + (x - x0) / (x1 - x0) * (right - left)); };
  auto Y = [&](double y) { return float(bottom - (y - y0) / (y1 - y0) * (bottom - top)); };
  // Each series' unbroken runs in pixels for a plot ending at `right`, and points every few pixels along them (where
  // the legend must not go).
  auto trace = [&](int right, std::vector<std::vector<Points>>& runs, Points& drawn) {
    runs.assign(series.size(), {});
    drawn.clear();
    for (size_t k = 0; k < series.size(); ++k) {
      const Series& s = series[k];
      Points run;
      for (size_t i = 0; i <= s.x.size(); ++i) {
        if (i < s.x.size() && usable(s.x[i], s.y[i])) {
          run.emplace_back(X(s.x[i], right), Y(fy(s.y[i])));
          continue;
        }
        for (size_t j = 0; j < run.size(); ++j) {
          drawn.push_back(run[j]);
          if (j + 1 == run.size()) break;
          const float dx = run[j + 1].first - run[j].first, dy = run[j + 1].second - run[j].second;
          const int pieces = std::min(1000, int(std::hypot(dx, dy) / 4.0f));
          for (int p = 1; p < pieces; ++p) drawn.emplace_back(run[j].first + dx * p / pieces, run[j].second + dy * p / pieces);
        }
        if (!run.empty()) runs[k].push_back(std::move(run)), run.clear();
      }
    }
  };

  int right;
  std::vector<Tick> xt;
  std::vector<std::vector<Points>> runs;
  Points drawn;
  fit_x(o.width, right, xt);
  trace(right, runs, drawn);
  // The legend goes in the corner that hides the fewest points of the lines; when every corner hides some, beside
  // the plot on the right if the plot keeps at least half the image's width there (the SOC comparison's ten curves
  // lost five behind a corner legend).
  const LegendBox legend = legend_box(series);
  LegendPlace place = best_corner(legend, left, top, right, bottom, drawn);
  const int beside_edge = o.width - legend.w - 16;
  if (!legend.listed.empty() && place.covered > 0 && legend.h <= bottom - top && beside_edge - 20 - left >= o.width / 2) {
    fit_x(beside_edge, right, xt);
    trace(right, runs, drawn);
    place.x = o.width - 8 - legend.w, place.y = top;
  }
  if (right - left < 80 || bottom - top < 60) throw Error("plot: line plot too small for its labels");

  Canvas cv(o.width, o.height);
  for (const Tick& t : xt) {
    const int x = int(std::lround(X(t.pos, right)));
    cv.fill_rect(x, top + 1, x + 1, bottom, kGrid), cv.fill_rect(x, bottom + 1, x + 1, bottom + 5, kFrame);
    cv.text_aligned(x + 1, bottom + 10, t.label, 2, kBlack, Align::Center);
  }
  for (const Tick& t : yt) {
    const int y = int(std::lround(Y(t.pos)));
    cv.fill_rect(left + 1, y, right, y + 1, kGrid), cv.fill_rect(left - 4, y, left, y + 1, kFrame);
    cv.text_aligned(left - 8, y - kFontHeight, t.label, 2, kBlack, Align::Right);
  }
  cv.clip(left + 1, top + 1, right, bottom);
  for (size_t k = 0; k < series.size(); ++k)
    for (const Points& run : runs[k]) cv.polyline(run, kPalette[k % 10], run.size() == 1 ? 5.0f : 2.5f);
  cv.reset_clip();
  cv.frame(left, top, right, bottom, kFrame);

  if (!legend.listed.empty()) draw_legend(cv, series, legend, place.x, place.y);
  if (!o.title.empty()) {
    const auto [text, scale] = fit_text(o.title, o.width - 16, 3);
    cv.text_aligned(o.width / 2, (top - kFontHeight * scale) / 2, text, scale, kBlack, Align::Center);
  }
  if (!o.x_label.empty()) cv.text_aligned((left + right) / 2, o.height - 26, o.x_label, 2, kBlack, Align::Center);
  if (!o.y_label.empty()) {
    const int tw = Canvas::text_width(o.y_label, 2);
    cv.text(8, (top + bottom) / 2 + tw / 2, o.y_label, 2, kBlack, /*vertical=*/true);
  }
  atomic_write(path, cv.encode_png());
}

}  // namespace tilt::plot

namespace tilt::plot {

void write_image_grid_png(const std::string& path, const std::vector<ImagePanel>& panels, const ImageGridOptions& o) {
  check_path(path);
  if (panels.empty()) throw Error("plot: write_image_grid_png needs at least one panel ('" + path + "')");
  if (o.height < 1 || o.width < 1) throw Error("plot: image height and width must be >= 1");
  if (o.columns < 1 || o.max_images < 1) throw Error("plot: columns and max_images must be >= 1");
  if (o.scale < 1 || o.scale > 32) throw Error("plot: scale must be in [1, 32], got " + std::to_string(o.scale));
  if (!(o.hi > o.lo)) throw Error("plot: the value range needs hi > lo");
  if (o.panel_columns < 0) throw Error("plot: panel_columns must be >= 0");
  const size_t image_size = size_t(o.height) * size_t(o.width);
  int most = 0;
  for (const ImagePanel& p : panels) {
    if (p.pixels.size() % image_size != 0) {
      throw Error("plot: panel '" + p.title + "' has " + std::to_string(p.pixels.size()) + " values, not a multiple of " +
                  std::to_string(o.height) + " x " + std::to_string(o.width));
    }
    most = std::max(most, std::min(o.max_images, int(p.pixels.size() / image_size)));
  }
  const int cols = std::min(o.columns, std::max(1, most)), rows = std::max(1, (most + cols - 1) / cols);
  const int iw = o.width * o.scale + 1, ih = o.height * o.scale + 1;  // an image and its gap
  const int grid_w = cols * iw + 1, grid_h = rows * ih + 1;
  const int title_h = 36, margin = 16;
  const int n = int(panels.size());
  const int pcols = o.panel_columns == 0 ? n : std::min(o.panel_columns, n), prows = (n + pcols - 1) / pcols;
  const int cell_w = grid_w + 2 * margin, cell_h = grid_h + title_h + margin;
  const int head = o.title.empty() ? 0 : kScatterTitleHeight;
  if (double(pcols) * cell_w * (double(prows) * cell_h + head) > 1e8) throw Error("plot: image grid too large");
  Canvas cv(pcols * cell_w, prows * cell_h + head);
  if (!o.title.empty()) {
    const auto [text, scale] = fit_text(o.title, cv.width() - 16, 3);
    cv.text_aligned(cv.width() / 2, (head - kFontHeight * scale) / 2, text, scale, kBlack, Align::Center);
  }
  for (int k = 0; k < n; ++k) {
    const ImagePanel& p = panels[size_t(k)];
    const int x0 = (k % pcols) * cell_w + margin, y0 = head + (k / pcols) * cell_h + title_h;
    const auto [text, scale] = fit_text(p.title, grid_w + margin, 2);
    cv.text_aligned(x0 + grid_w / 2, y0 - 8 - kFontHeight * scale, text, scale, kBlack, Align::Center);
    cv.fill_rect(x0, y0, x0 + grid_w, y0 + grid_h, Rgb{200, 200, 200});  // the gaps
    const int count = std::min(o.max_images, int(p.pixels.size() / image_size));
    for (int m = 0; m < count; ++m) {
      const int ix = x0 + 1 + (m % cols) * iw, iy = y0 + 1 + (m / cols) * ih;
      for (int r = 0; r < o.height; ++r) {
        for (int c = 0; c < o.width; ++c) {
          const float v = p.pixels[size_t(m) * image_size + size_t(r) * size_t(o.width) + size_t(c)];
          Rgb colour{220, 30, 30};
          if (std::isfinite(v)) {
            const float u = std::clamp((v - o.lo) / (o.hi - o.lo), 0.0f, 1.0f);
            const auto g = uint8_t(std::lround(255.0f * (1.0f - u)));
            colour = {g, g, g};
          }
          cv.fill_rect(ix + c * o.scale, iy + r * o.scale, ix + (c + 1) * o.scale, iy + (r + 1) * o.scale, colour);
        }
      }
    }
  }
  atomic_write(path, cv.encode_png());
}

}  // namespace tilt::plot
