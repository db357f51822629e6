// The relationship commands of `tandem` (relationship ..., status): pools
// opened by path in this process, or a daemon reached over its control
// socket (--daemon); endpoints, confirmation prompts and output.
#ifndef TANDEM_TOOLS_RELATIONSHIP_CLI_H_
#define TANDEM_TOOLS_RELATIONSHIP_CLI_H_

#include <functional>
#include <map>
#include <memory>
#include <string>

#include "CLI/CLI.hpp"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "blockstore/io.h"
#include "blockstore/mutex.h"
#include "blockstore/pool.h"
#include "engine/local_site.h"
#include "engine/relationship.h"
#include "tools/relationship_json.h"

namespace tools {

// Pools by path, opened on first use and kept open (and locked) until the
// provider goes away. A pool that fails to open keeps failing with the same
// error for this provider's life.
class FileSites : public engine::SiteProvider {
 public:
  explicit FileSites(blockstore::OpenMode mode) : mode_(mode) {}
  absl::StatusOr<engine::Site*> Get(const engine::Endpoint& e) override;
  // The pool itself, for the demo's checks.
  absl::StatusOr<blockstore::Pool*> Pool(const std::string& path);

 private:
  struct Entry {
    std::unique_ptr<blockstore::Pool> pool;
    std::unique_ptr<engine::LocalSite> site;
  };
  const blockstore::OpenMode mode_;
  blockstore::Mutex mu_;
  std::map<std::string, absl::StatusOr<Entry>> pools_ ABSL_GUARDED_BY(mu_);
};

// "POOL:VOLUME": POOL is the shortest prefix before a ':' that names an
// existing file or device (volume names may hold ':'), made absolute so that
// either side finds the relationship by the same name.
absl::StatusOr<engine::Endpoint> ParseEndpoint(const std::string& text);

// Asks on the terminal before an overwrite or a break; with no terminal
// (and no --yes) refuses.
struct Asker {
  bool yes = false;
  bool refused_without_terminal = false;
  // Shows `preview` (PreviewJson) and returns the answer.
  bool operator()(const ordered_json& preview);
  // The error to report for a refused `op`, from the engine's `s`.
  absl::Status Explain(absl::Status s, const std::string& op) const;
};

// What the relationship commands run against.
class RelationshipBackend {
 public:
  virtual ~RelationshipBackend() = default;
  virtual absl::StatusOr<ordered_json> Create(const std::string& source,
                                              const std::string& destination,
                                              int64_t schedule_seconds,
                                              uint64_t max_rate_bytes) = 0;
  // {"operation", "endpoint", "relationship", "stats" | "release"}.
  virtual absl::StatusOr<ordered_json> Run(engine::Operation op,
                                           const std::string& endpoint,
                                           Asker& asker) = 0;
  // ReportJson objects: of one relationship, or of every one in `pool`.
  virtual absl::StatusOr<ordered_json> Status(const std::string& endpoint,
                                              const std::string& pool) = 0;
  // The daemon's NBD exports (GET /v1/exports); only through a daemon.
  virtual absl::StatusOr<ordered_json> Exports() {
    return absl::FailedPreconditionError(
        "NBD exports are a daemon's: give --daemon SOCKET (or TANDEM_DAEMON)");
  }
};

// The engine in this process, on pool files and devices.
std::unique_ptr<RelationshipBackend> LocalRelationships();

// Runs `op` on `rep` and says what happened, as RelationshipBackend::Run
// does (the CLI without a daemon and the daemon's control API share it).
absl::StatusOr<ordered_json> RunOperation(engine::Replication& rep,
                                          engine::Operation op,
                                          const engine::Endpoint& e,
                                          const engine::Confirm& confirm);

// Where the parsed command line lands; must outlive the parse.
struct RelationshipArgs {
  std::string source, destination, schedule = "none", max_rate = "none",
                                   endpoint, status_pool;
  bool yes = false;
  bool as_json = false;
  bool exports = false;
};

// Registers `relationship ...` and `status` on `app`; each runs against
// what `backend()` returns when it runs; failures go to `act`.
void AddRelationshipCommands(
    CLI::App& app, RelationshipArgs& args,
    std::function<absl::StatusOr<std::unique_ptr<RelationshipBackend>>()>
        backend,
    std::function<void(absl::Status)> act);

}  // namespace tools

#endif  // TANDEM_TOOLS_RELATIONSHIP_CLI_H_
