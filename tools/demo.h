// `tandem demo`: the main job. The operator's disaster-recovery procedure
// (../shared/seed) on two pool files: mirror a volume, update it, break it
// when site A goes down, reverse resync when it comes back, re-establish the
// original direction; states, digests and byte checks after every step.
// Returns the process exit code (non-zero if any check failed).
#ifndef TANDEM_TOOLS_DEMO_H_
#define TANDEM_TOOLS_DEMO_H_

#include <cstdint>
#include <string>

namespace tools {

// In one process holding both pools (--local). Uses `dir` (created if
// missing, kept) or a fresh temporary directory that is removed afterwards.
// The source volume holds `volume_bytes`.
int RunDemo(const std::string& dir, uint64_t volume_bytes);

// The same drill through two tandemd daemons on loopback (site a and site
// b, TLS with certificates the demo makes), driven as an operator would:
// `tandem` (this binary, `self`) with --daemon.
int RunDaemonDemo(const std::string& dir, uint64_t volume_bytes,
                  const char* self);

}  // namespace tools

#endif  // TANDEM_TOOLS_DEMO_H_
