// The relationship commands of `tandem` (relationship ..., status) and what
// the demo shares with them: pools opened by path, POOL:VOLUME endpoints,
// schedules, confirmation prompts and status output.
#ifndef TANDEM_TOOLS_RELATIONSHIP_CLI_H_
#define TANDEM_TOOLS_RELATIONSHIP_CLI_H_

#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "CLI/CLI.hpp"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "blockstore/io.h"
#include "blockstore/pool.h"
#include "engine/relationship.h"
#include "nlohmann/json.hpp"

namespace tools {

// Pools by path, opened on first use and kept open (and locked) until the
// provider goes away. A pool that fails to open keeps failing with the same
// error for this provider's life.
class FilePools : public engine::PoolProvider {
 public:
  explicit FilePools(blockstore::OpenMode mode) : mode_(mode) {}
  absl::StatusOr<blockstore::Pool*> Get(const std::string& path) override;

 private:
  const blockstore::OpenMode mode_;
  std::mutex mu_;
  std::map<std::string, absl::StatusOr<std::unique_ptr<blockstore::Pool>>>
      pools_;
};

// "POOL:VOLUME": POOL is the shortest prefix before a ':' that names an
// existing file or device (volume names may hold ':'), made absolute so that
// either side finds the relationship by the same name.
absl::StatusOr<engine::Endpoint> ParseEndpoint(const std::string& text);

// "10m", "hourly", "daily", or a duration such as 90s, 15m, 2h, 1d.
absl::StatusOr<int64_t> ParseSchedule(const std::string& text);
std::string FormatSchedule(int64_t seconds);

nlohmann::ordered_json ReportJson(const engine::RelationshipReport& r);
void PrintReport(const engine::RelationshipReport& r);
// "Mirrored, Idle, healthy" and the like, for one line.
std::string StateLine(const engine::RelationshipRecord& r);

// Where the parsed command line lands; must outlive the parse.
struct RelationshipArgs {
  std::string source, destination, schedule = "none", endpoint, status_pool;
  bool yes = false;
  bool as_json = false;
};

// Registers `relationship ...` and `status` on `app`; failures go to `act`.
void AddRelationshipCommands(CLI::App& app, RelationshipArgs& args,
                             std::function<void(absl::Status)> act);

}  // namespace tools

#endif  // TANDEM_TOOLS_RELATIONSHIP_CLI_H_
