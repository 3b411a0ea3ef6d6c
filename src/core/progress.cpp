#include "tilt/core/progress.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>

namespace tilt {

ProgressBar::ProgressBar(std::string label, int64_t total, int64_t start, bool enabled, std::FILE* out)
    : label_(std::move(label)),
      total_(std::max<int64_t>(total, 1)),
      start_(start),
      done_(start),
      enabled_(enabled),
      tty_(isatty(fileno(out)) != 0),
      out_(out),
      t0_(std::chrono::steady_clock::now()),
      last_draw_(t0_) {}

ProgressBar::~ProgressBar() { finish(); }

std::string ProgressBar::format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const long s = std::lround(seconds);
  char buf[32];
  if (s >= 3600) {
    std::snprintf(buf, sizeof buf, "%ld:%02ld:%02ld", s / 3600, (s / 60) % 60, s % 60);
  } else {
    std::snprintf(buf, sizeof buf, "%ld:%02ld", s / 60, s % 60);
  }
  return buf;
}

void ProgressBar::update(int64_t done, const std::string& status) {
  done_ = done;
  status_ = status;
  if (!enabled_) return;
  const auto now = std::chrono::steady_clock::now();
  const double since = std::chrono::duration<double>(now - last_draw_).count();
  if (!drawn_ && std::chrono::duration<double>(now - t0_).count() < delay_) return;
  if (tty_) {
    if (since < 0.1 && done_ < total_) return;
  } else {
    const int64_t step = std::max<int64_t>(total_ / 10, 1);
    const bool crossed = last_printed_done_ < 0 || done_ / step != last_printed_done_ / step;
    if (!crossed && since < 30.0 && done_ < total_) return;
  }
  draw(false);
  last_draw_ = now;
}

void ProgressBar::draw(bool final) {
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
  const double rate = elapsed > 0 ? static_cast<double>(done_ - start_) / elapsed : 0.0;
  const double eta = rate > 0 ? static_cast<double>(total_ - done_) / rate : NAN;
  const int width = 24;
  const int filled = static_cast<int>(width * std::min<double>(1.0, static_cast<double>(done_) / total_));
  std::string bar(static_cast<size_t>(filled), '#');
  bar.append(static_cast<size_t>(width - filled), '.');
  char rate_text[32];
  if (rate >= 1.0 || rate == 0.0) {
    std::snprintf(rate_text, sizeof rate_text, "%.1f it/s", rate);
  } else {
    std::snprintf(rate_text, sizeof rate_text, "%.2f s/it", 1.0 / rate);
  }
  const std::string timing = final ? "elapsed " + format_duration(elapsed) : "ETA " + format_duration(eta);
  std::fprintf(out_, "%s%s [%s] %lld/%lld %3d%% %s %s%s%s%s", tty_ ? "\r\033[K" : "", label_.c_str(),
               bar.c_str(), static_cast<long long>(done_), static_cast<long long>(total_),
               static_cast<int>(100.0 * done_ / total_), rate_text, timing.c_str(),
               status_.empty() ? "" : "  ", status_.c_str(), tty_ ? "" : "\n");
  std::fflush(out_);
  last_printed_done_ = done_;
  drawn_ = true;
}

void ProgressBar::finish() {
  if (finished_) return;
  finished_ = true;
  if (!enabled_ || (delay_ > 0 && !drawn_)) return;
  draw(true);
  if (tty_) std::fputc('\n', out_);
  std::fflush(out_);
}

}  // namespace tilt
