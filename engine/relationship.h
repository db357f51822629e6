// Replication relationships: the disaster-recovery procedure of a mirrored
// volume pair (initialize, update, break, resync, reverse resync,
// re-establish, release) with the states and guards of the operator
// procedure: Mirror state Uninitialized / Mirrored / Broken, Relationship
// status Idle / Transferring, and health. This is the state machine; it
// reaches the two sides only through Sites (site.h), local or remote, and
// moves data with transfer.h.
//
// A relationship joins a source volume and a destination volume, each in its
// own pool. Its record (record.h) lives in BOTH pools, with an epoch that
// grows at every change: the copy with the higher epoch wins, and the other
// is brought up to date when its pool is reachable. Which snapshot the two
// sides share is never stored: it is found from snapshot GUIDs (a received
// snapshot keeps the sender's), so no crash between a data commit and a
// record commit can make the record lie about it. Replication snapshots are
// told apart by owner (the relationship id), never by name.
//
// Concurrency: an operation claims the relationship at both sites (in one
// order, the same from either end, so two drivers never both lose) and
// holds the claims to its end; another operation meanwhile is refused as
// Transferring. Crash safety: every long operation first records what it
// is doing (status Transferring, operation, plan), then changes data in
// steps that are each one commit of one pool, then records the result. An
// operation found Transferring with nobody holding its claims was
// interrupted: the same operation run again goes on with it (data from the
// receiver's resume point, no new confirmation); another one first puts
// back the state it started from (or finishes it, if its data arrived).
//
// Threads: every method may be called from any thread.
#ifndef TANDEM_ENGINE_RELATIONSHIP_H_
#define TANDEM_ENGINE_RELATIONSHIP_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "blockstore/pool.h"
#include "engine/record.h"
#include "engine/site.h"
#include "engine/transfer.h"

namespace engine {

// What `tandem status` shows for one relationship.
struct RelationshipReport {
  RelationshipRecord record;
  bool healthy = false;
  std::string unhealthy_reason;
  int64_t lag_seconds = -1;  // -1: unknown (no snapshot on the destination)
  std::string last_common_snapshot;
  std::vector<std::string> notes;  // e.g. a pool that could not be reached
};

// Returns true to go ahead.
using Confirm = std::function<bool(const LossPreview&)>;

// What a release did: everything, or its half on the reachable side (the
// other finishes when it is reachable again: any command or status that
// reaches both, or its daemon, does it).
struct ReleaseReport {
  bool complete = true;
  Endpoint waiting;  // !complete: the side still holding its record
  std::string why;   // why that side could not be reached
};

struct ReplicationOptions {
  // The site this process runs as (a daemon); recorded as the driver of
  // what it runs. Empty: a command-line process.
  std::string driver;
  // How long a transfer keeps retrying a lost connection that made no
  // progress (zero: fails at once).
  absl::Duration retry_window = absl::ZeroDuration();
  // Set when the process is stopping: transfers end at once (the receiver
  // keeps its last resume point) and records are left as a crash would
  // leave them, so that the next start goes on where this one stopped.
  std::shared_ptr<std::atomic<bool>> stopping;
};

class Replication {
 public:
  explicit Replication(SiteProvider& sites, ReplicationOptions options = {});
  ~Replication();

  // Joins two volumes: the source must exist, the destination must not (it
  // is created, read-only, by initialize) and have a valid volume name.
  // Both pools must be reachable and differ and have the same chunk size;
  // neither volume may be in another relationship. `max_rate_bytes` (0:
  // none) limits every transfer's bytes a second.
  absl::StatusOr<RelationshipRecord> Create(const Endpoint& source,
                                            const Endpoint& destination,
                                            int64_t schedule_seconds,
                                            uint64_t max_rate_bytes = 0);

  // Each takes either endpoint of the relationship. Run again after it
  // completed, an operation finds nothing to do and succeeds (so a command
  // cut off by a crash can simply be repeated).
  absl::StatusOr<TransferStats> Initialize(const Endpoint& either);
  absl::StatusOr<TransferStats> Update(const Endpoint& either);
  // Asks `confirm` (a mode change, not a loss) unless already Broken.
  absl::Status Break(const Endpoint& either, const Confirm& confirm);
  absl::StatusOr<TransferStats> Resync(const Endpoint& either,
                                       const Confirm& confirm);
  absl::StatusOr<TransferStats> ReverseResync(const Endpoint& either,
                                              const Confirm& confirm);
  absl::StatusOr<TransferStats> Reestablish(const Endpoint& either,
                                            const Confirm& confirm);
  absl::StatusOr<ReleaseReport> Release(const Endpoint& either);
  // Goes on with what was interrupted here: an operation recorded as
  // Transferring that nobody runs, a pending re-establish (asking nothing:
  // it was confirmed when it started), or a receive into this side that
  // left a resume point. Nothing to do: OK with nothing moved.
  absl::StatusOr<TransferStats> Continue(const Endpoint& either);

  // The relationship of `either`.
  absl::StatusOr<RelationshipReport> Report(const Endpoint& either);
  // Every relationship with a record in the pool of `pool` (its volume is
  // ignored).
  absl::StatusOr<std::vector<RelationshipReport>> ReportPool(
      const Endpoint& pool);

  // The last snapshot both lists hold (by GUID), if any.
  static std::optional<blockstore::SnapshotInfo> CommonSnapshot(
      const std::vector<blockstore::SnapshotInfo>& a,
      const std::vector<blockstore::SnapshotInfo>& b);
  // Taken by a relationship (this one or another), not by a user.
  static bool IsReplicationSnapshot(const blockstore::SnapshotInfo& s) {
    return !s.owner.empty();
  }
  // True if `volume` of `pool` has a relationship record.
  static bool InRelationship(blockstore::Pool& pool, const std::string& volume);

  // Called during transfers with the record as it goes (progress fields).
  void set_progress(std::function<void(const RelationshipRecord&)> f) {
    progress_ = std::move(f);
  }
  // Test hook: called with the operation once a transfer has started
  // (status Transferring recorded), from the transferring thread.
  void set_transfer_started(std::function<void(Operation)> f) {
    transfer_started_ = std::move(f);
  }
  // For tests: a clock other than the wall clock (nanoseconds since 1970).
  void set_clock(std::function<int64_t()> now) { now_ = std::move(now); }

 private:
  struct Loaded;
  using Claims = std::vector<std::unique_ptr<Claim>>;
  absl::StatusOr<Loaded> Load(const Endpoint& either);
  // Load, claim both (reachable) sites for `op`, and recover what was
  // interrupted; `continuing` says whether `op` goes on with it.
  absl::StatusOr<Loaded> Start(const Endpoint& either, Operation op,
                               Claims& claims, bool* continuing);
  absl::Status TakeClaims(Loaded& rel, Operation op, Claims& claims);
  absl::Status Save(Loaded& rel, bool require_both, bool prune = false);
  // The operation it finished, kNone (none, or rolled back), or `op` itself
  // when `op` goes on with it.
  absl::StatusOr<Operation> Recover(Loaded& rel, Operation op);
  absl::Status Begin(Loaded& rel, Operation op, bool persist);
  absl::Status Finish(Loaded& rel, const TransferStats& stats);
  absl::Status Fail(Loaded& rel, const absl::Status& error);
  absl::StatusOr<TransferStats> DoUpdate(Loaded& rel);
  absl::Status DoBreak(Loaded& rel, const Confirm& confirm);
  absl::StatusOr<TransferStats> Overwrite(Loaded& rel, Operation op,
                                          bool reverse, const Confirm& confirm,
                                          bool continuing);
  absl::StatusOr<LossPreview> Preview(Loaded& rel, Operation op, bool reverse);
  // Fills `ctx` for a transfer of `rel` (`limiter` holds its rate limit).
  void Context(Loaded& rel, std::optional<RateLimiter>& limiter,
               TransferContext& ctx);
  absl::StatusOr<TransferStats> Move(
      Loaded& rel, Site& from, const std::string& from_volume, Site& to,
      const std::string& to_volume,
      const std::vector<blockstore::SnapshotInfo>& chain, bool rollback_first);
  absl::StatusOr<blockstore::SnapshotInfo> TakeReplicationSnapshot(
      Loaded& rel, Site& site, const std::string& volume);
  absl::StatusOr<ReleaseReport> FinishRelease(Loaded& rel);
  int64_t Now() const;

  SiteProvider& sites_;
  const ReplicationOptions options_;
  std::function<void(const RelationshipRecord&)> progress_;
  std::function<void(Operation)> transfer_started_;
  std::function<int64_t()> now_;
};

}  // namespace engine

#endif  // TANDEM_ENGINE_RELATIONSHIP_H_
