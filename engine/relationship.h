// Replication relationships: the disaster-recovery procedure of a mirrored
// volume pair (initialize, update, break, resync, reverse resync,
// re-establish, release) with the states and guards of the operator
// procedure: Mirror state Uninitialized / Mirrored / Broken, Relationship
// status Idle / Transferring, and health.
//
// A relationship joins a source volume and a destination volume, each in its
// own pool. Its record lives in BOTH pools (pool property
// "relationship:VOLUME"), with an epoch that grows at every change: the copy
// with the higher epoch wins, and the other is brought up to date when its
// pool is reachable. Which snapshot the two sides share is never stored: it
// is found from snapshot GUIDs (a received snapshot keeps the sender's), so
// no crash between a data commit and a record commit can make the record
// lie about it.
//
// Crash safety: every operation first records what it is doing (status
// Transferring, `operation`), then changes data in steps that are each one
// commit of one pool, then records the result. An operation found
// Transferring in a pool that this process holds (and so nobody else runs)
// was interrupted: it is finished from the data if its transfer completed,
// else rolled back to the state it started from, and the command then runs.
// So running the same command again completes it.
#ifndef TANDEM_ENGINE_RELATIONSHIP_H_
#define TANDEM_ENGINE_RELATIONSHIP_H_

#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "blockstore/pool.h"

namespace engine {

enum class MirrorState { kUninitialized, kMirrored, kBroken };
enum class TransferStatus { kIdle, kTransferring };
const char* ToString(MirrorState s);
const char* ToString(TransferStatus s);

// One side of a relationship: a volume in the pool at `pool` (a path).
struct Endpoint {
  std::string pool;
  std::string volume;
  std::string ToString() const { return pool + ":" + volume; }
  bool operator==(const Endpoint&) const = default;
};

// Opens pools by path. The CLI opens files and devices (read-write, locked);
// tests hand out in-memory pools. A pool that cannot be reached (a lost
// site) is an error whose message says why.
class PoolProvider {
 public:
  virtual ~PoolProvider() = default;
  virtual absl::StatusOr<blockstore::Pool*> Get(const std::string& path) = 0;
};

// The persisted record (JSON in the pool property).
struct RelationshipRecord {
  std::string id;  // GUID
  uint64_t epoch = 0;
  Endpoint source, destination;
  Endpoint origin;  // the source it was created with (reestablish's aim)
  int64_t schedule_seconds = 0;  // 0: no schedule
  MirrorState mirror_state = MirrorState::kUninitialized;
  TransferStatus status = TransferStatus::kIdle;
  std::string operation;  // what runs while Transferring
  std::string pending;    // "reestablish" between its steps
  uint64_t next_snapshot = 1;
  // Metrics of the last transfer (stream bytes on the wire) and in total.
  int64_t last_transfer_end_ns = 0;
  uint64_t last_transfer_bytes = 0;
  uint64_t last_transfer_data_bytes = 0;  // chunk bytes carried
  double last_transfer_seconds = 0;
  std::string last_transfer_error;
  uint64_t total_transfer_bytes = 0;
  // The running (or last) transfer: data bytes done of a total known before
  // it started.
  uint64_t progress_bytes = 0;
  uint64_t progress_total_bytes = 0;

  std::string Direction() const;  // "SOURCE -> DESTINATION"
  std::string ToJson() const;
  static absl::StatusOr<RelationshipRecord> FromJson(const std::string& json);
};

// What `tandem status` shows for one relationship.
struct RelationshipReport {
  RelationshipRecord record;
  bool healthy = false;
  std::string unhealthy_reason;
  int64_t lag_seconds = -1;  // -1: unknown (no snapshot on the destination)
  std::string last_common_snapshot;
  std::vector<std::string> notes;  // e.g. a pool that could not be opened
};

// What an overwriting operation is about to lose, shown before it asks.
struct LossPreview {
  std::string operation;  // "resync", "reverse-resync", "reestablish"
  Endpoint overwritten;
  std::string common_snapshot;  // empty: none shared
  // "rollback": back to the common snapshot, then the other side's changes;
  // "hash-diff": no common snapshot, chunks that differ (SHA-256) replaced;
  // "new-volume": the volume is gone, a full baseline recreates it.
  std::string method;
  uint64_t bytes = 0;  // written on `overwritten` since the common snapshot
  uint64_t chunks = 0;
  std::string safety_snapshot;  // kept on `overwritten`; empty if none needed
  std::vector<std::string> kept_snapshots;  // newer than the common one
  std::string Describe() const;             // a few lines for people
};
// Returns true to go ahead.
using Confirm = std::function<bool(const LossPreview&)>;

// What one relationship operation moved.
struct TransferStats {
  uint64_t stream_bytes = 0;  // on the wire
  uint64_t data_bytes = 0;    // chunk bytes written on the receiver
  uint64_t snapshots = 0;     // snapshots received
  double seconds = 0;
};

class Replication {
 public:
  explicit Replication(PoolProvider& pools) : pools_(pools) {}

  // Joins two volumes: the source must exist, the destination must not (it
  // is created, read-only, by initialize). Both pools must differ and have
  // the same chunk size; neither volume may be in another relationship.
  absl::StatusOr<RelationshipRecord> Create(const Endpoint& source,
                                            const Endpoint& destination,
                                            int64_t schedule_seconds);

  // Each takes either endpoint of the relationship. Run again after it
  // completed, an operation finds nothing to do and succeeds (so a command
  // cut off by a crash can simply be repeated).
  absl::StatusOr<TransferStats> Initialize(const Endpoint& either);
  absl::StatusOr<TransferStats> Update(const Endpoint& either);
  absl::Status Break(const Endpoint& either);
  absl::StatusOr<TransferStats> Resync(const Endpoint& either,
                                       const Confirm& confirm);
  absl::StatusOr<TransferStats> ReverseResync(const Endpoint& either,
                                              const Confirm& confirm);
  absl::StatusOr<TransferStats> Reestablish(const Endpoint& either,
                                            const Confirm& confirm);
  absl::Status Release(const Endpoint& either);

  // The relationship of `either`.
  absl::StatusOr<RelationshipReport> Report(const Endpoint& either);
  // Every relationship with a record in the pool at `pool`.
  absl::StatusOr<std::vector<RelationshipReport>> ReportPool(
      const std::string& pool);

  // The last snapshot both sides hold (by GUID), if any.
  static std::optional<blockstore::SnapshotInfo> CommonSnapshot(
      blockstore::Pool& a, const std::string& volume_a, blockstore::Pool& b,
      const std::string& volume_b);
  static bool IsReplicationSnapshot(const std::string& name);
  // True if `volume` of `pool` has a relationship record.
  static bool InRelationship(blockstore::Pool& pool, const std::string& volume);

  // Called during transfers with the record as it goes (progress fields).
  void set_progress(std::function<void(const RelationshipRecord&)> f) {
    progress_ = std::move(f);
  }
  // Test hook: called with the operation name once a transfer has started
  // (status Transferring recorded), from the transferring thread.
  void set_transfer_started(std::function<void(const std::string&)> f) {
    transfer_started_ = std::move(f);
  }
  // For tests: a clock other than the wall clock (nanoseconds since 1970).
  void set_clock(std::function<int64_t()> now) { now_ = std::move(now); }

 private:
  struct Loaded;
  absl::StatusOr<Loaded> Load(const Endpoint& either);
  absl::Status Save(Loaded& rel, bool require_both, bool prune = false);
  // The operation it finished, or empty (none, or rolled back).
  absl::StatusOr<std::string> Recover(Loaded& rel);
  absl::Status Begin(Loaded& rel, const std::string& operation, bool persist);
  absl::Status CheckNotActive(const Loaded& rel);
  absl::StatusOr<TransferStats> Transfer(Loaded& rel, blockstore::Pool& from,
                                         const std::string& from_volume,
                                         blockstore::Pool& to,
                                         const std::string& to_volume,
                                         const std::vector<std::string>& chain,
                                         bool rollback_first);
  absl::StatusOr<TransferStats> HashDiffTransfer(
      Loaded& rel, blockstore::Pool& from, const std::string& from_volume,
      const std::string& snapshot, blockstore::Pool& to,
      const std::string& to_volume, const std::string& to_base);
  absl::StatusOr<LossPreview> Preview(Loaded& rel, const std::string& operation,
                                      bool reverse);
  absl::StatusOr<TransferStats> Overwrite(Loaded& rel,
                                          const std::string& operation,
                                          bool reverse, const Confirm& confirm);
  absl::Status Finish(Loaded& rel, const TransferStats& stats);
  absl::Status Fail(Loaded& rel, const absl::Status& error);
  static absl::Status PruneSnapshots(blockstore::Pool& pool,
                                     const std::string& volume,
                                     const std::string& id,
                                     const blockstore::SnapshotInfo& common);
  absl::StatusOr<std::string> TakeReplicationSnapshot(
      Loaded& rel, blockstore::Pool& pool, const std::string& volume);
  int64_t Now() const;
  void Inactive(const std::string& id);
  // The operation this process runs on relationship `id` now, if any.
  std::optional<std::string> Running(const std::string& id);

  PoolProvider& pools_;
  std::function<void(const RelationshipRecord&)> progress_;
  std::function<void(const std::string&)> transfer_started_;
  std::function<int64_t()> now_;
  std::mutex mu_;
  // Relationship id -> the operation transferring it now, in this process.
  std::map<std::string, std::string> active_;  // guarded by mu_
};

}  // namespace engine

#endif  // TANDEM_ENGINE_RELATIONSHIP_H_
