// What the two drills of `tandem demo` share (demo.cc in one process,
// demo_daemons.cc through two daemons): checks that count failures, step
// headings, and the volume content they write.
#ifndef TANDEM_TOOLS_DRILL_H_
#define TANDEM_TOOLS_DRILL_H_

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <span>
#include <string>

#include "absl/status/status.h"

namespace tools::drill {

// Failed checks so far (the drill's exit code is non-zero if any).
inline int failures = 0;

inline void Check(bool ok, const std::string& what) {
  std::printf("  [%s] %s\n", ok ? " ok " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

inline bool Ok(const absl::Status& s, const std::string& what) {
  if (!s.ok()) {
    std::printf("  [FAIL] %s: %s\n", what.c_str(),
                std::string(s.message()).c_str());
    ++failures;
  }
  return s.ok();
}

inline void Step(const std::string& what) {
  std::printf("\n== %s\n", what.c_str());
}

// Half compressible text-like bytes, half random, like a real disk: chunk c
// (of `chunk` bytes) is random when c is even, text when odd.
inline std::string MixedData(uint64_t bytes, uint64_t seed, uint32_t chunk) {
  std::string out(bytes, '\0');
  std::mt19937_64 rng(seed);
  for (uint64_t c = 0; c < bytes / chunk; ++c) {
    char* p = out.data() + c * chunk;
    if (c % 2 == 0) {
      for (uint64_t i = 0; i < chunk; i += 8) {
        uint64_t v = rng();
        std::memcpy(p + i, &v, 8);
      }
    } else {
      for (uint64_t i = 0; i < chunk; ++i) {
        p[i] = "tandem block store "[(i + c) % 19];
      }
    }
  }
  return out;
}

inline std::span<const std::byte> Bytes(const std::string& s) {
  return {reinterpret_cast<const std::byte*>(s.data()), s.size()};
}

}  // namespace tools::drill

#endif  // TANDEM_TOOLS_DRILL_H_
