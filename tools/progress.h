// A one-line progress bar on stderr, only when stderr is a terminal.
#ifndef TANDEM_TOOLS_PROGRESS_H_
#define TANDEM_TOOLS_PROGRESS_H_

#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "blockstore/util.h"

namespace tools {

class Progress {
 public:
  using Clock = std::chrono::steady_clock;

  explicit Progress(const char* verb)
      : verb_(verb), enabled_(isatty(2)), start_(Clock::now()) {}
  ~Progress() { Clear(); }

  void Update(uint64_t done, uint64_t total) {
    if (!enabled_) return;
    auto now = Clock::now();
    if (now - last_ < std::chrono::milliseconds(100)) return;
    last_ = now;
    double secs = std::chrono::duration<double>(now - start_).count();
    double rate = secs > 0 ? done / secs : 0;
    using blockstore::FormatBytes;
    std::string line = absl::StrCat(verb_, " ", FormatBytes(done));
    if (total > 0) {
      absl::StrAppend(&line, " / ", FormatBytes(total),
                      absl::StrFormat(" (%.0f%%)", 100.0 * done / total));
    }
    absl::StrAppend(&line, "  ", FormatBytes(static_cast<uint64_t>(rate)),
                    "/s");
    if (total > done && rate > 0) {
      absl::StrAppend(&line,
                      absl::StrFormat("  ETA %.0fs", (total - done) / rate));
    }
    std::fprintf(stderr, "\r%-78s", line.c_str());
    shown_ = true;
  }

  void Clear() {
    if (shown_) std::fprintf(stderr, "\r%-78s\r", "");
    shown_ = false;
  }

 private:
  const char* verb_;
  const bool enabled_;
  const Clock::time_point start_;
  Clock::time_point last_{};
  bool shown_ = false;
};

}  // namespace tools

#endif  // TANDEM_TOOLS_PROGRESS_H_
