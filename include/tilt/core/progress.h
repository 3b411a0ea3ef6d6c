// A progress bar for long work: done/total, rate, ETA and a status text (e.g. the current loss).
// On a terminal it redraws one line; otherwise it prints a line every ~10% or 30 s, so logs
// of CI and batch jobs stay readable.
#pragma once

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>

namespace tilt {

class ProgressBar {
 public:
  /// `start` is where a resumed run begins; the rate counts only work done since then.
  ProgressBar(std::string label, int64_t total, int64_t start = 0, bool enabled = true,
              std::FILE* out = stderr);
  ~ProgressBar();
  void update(int64_t done, const std::string& status = "");
  /// Draws nothing until `seconds` have passed (and, if the work ends before, nothing at all): for work that is
  /// usually quick but can be long.
  void set_delay(double seconds) { delay_ = seconds; }
  /// Prints the final state and a newline (also done by the destructor).
  void finish();

  static std::string format_duration(double seconds);

 private:
  void draw(bool final);
  std::string label_;
  int64_t total_, start_, done_;
  bool enabled_, tty_, finished_ = false;
  std::FILE* out_;
  std::string status_;
  std::chrono::steady_clock::time_point t0_, last_draw_;
  int64_t last_printed_done_ = -1;
  double delay_ = 0;
  bool drawn_ = false;
};

}  // namespace tilt
