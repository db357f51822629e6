// `tandem demo`: the main job. Until replication lands it walks through the
// block store on a pool file in a temporary directory, checking every
// promise it shows. Returns the process exit code.
#ifndef TANDEM_TOOLS_DEMO_H_
#define TANDEM_TOOLS_DEMO_H_

#include <string>

namespace tools {

// Uses `dir` (created if missing, kept) or a fresh temporary directory that
// is removed afterwards when empty.
int RunDemo(const std::string& dir);

}  // namespace tools

#endif  // TANDEM_TOOLS_DEMO_H_
