// What a replication relationship is and what it says about itself: its
// endpoints, states and operations, the persisted record (JSON, kept in a
// pool property on both sides), and the loss preview an overwriting step
// shows before it asks. Plain values; thread-compatible.
#ifndef TANDEM_ENGINE_RECORD_H_
#define TANDEM_ENGINE_RECORD_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace engine {

enum class MirrorState { kUninitialized, kMirrored, kBroken };
enum class TransferStatus { kIdle, kTransferring };
enum class Operation {
  kNone,
  kInitialize,
  kUpdate,
  kBreak,
  kResync,
  kReverseResync,
  kReestablish,
  kRelease,
};
// How an overwriting step (resync, reverse resync) brings the overwritten
// side back: roll back to the common snapshot and take the other side's
// changes since; with no common snapshot, replace the chunks whose SHA-256
// differs; or, the volume being gone, a full baseline into a new one.
enum class Method { kNone, kRollback, kHashDiff, kNewVolume };

const char* ToString(MirrorState s);
const char* ToString(TransferStatus s);
const char* ToString(Operation op);  // "reverse-resync", as the CLI spells it
const char* ToString(Method m);
std::optional<Operation> ParseOperation(absl::string_view text);

// One side of a relationship: a volume in a pool of a site. Without a
// daemon `site` is empty and `pool` a path; through daemons `site` and
// `pool` are the names their configs give. Written "POOL:VOLUME" or
// "SITE/POOL:VOLUME".
struct Endpoint {
  std::string pool;
  std::string volume;
  std::string site{};
  std::string ToString() const;
  // The pool alone ("SITE/POOL" or the path): what Sites are named.
  std::string PoolName() const;
  bool operator==(const Endpoint&) const = default;
};

// The persisted record, the same in both pools (the higher epoch wins).
struct RelationshipRecord {
  std::string id;  // GUID
  uint64_t epoch = 0;
  Endpoint source, destination;
  Endpoint origin;  // the source it was created with (reestablish's aim)
  int64_t schedule_seconds = 0;  // 0: no schedule
  uint64_t max_rate_bytes = 0;   // bytes/s on the wire; 0: unlimited
  MirrorState mirror_state = MirrorState::kUninitialized;
  TransferStatus status = TransferStatus::kIdle;
  Operation operation = Operation::kNone;  // what runs while Transferring
  std::string driver;  // the site whose daemon runs it (empty: a CLI)
  // An overwriting operation's plan, fixed when it was confirmed, so that
  // one cut short goes on without asking again.
  Method method = Method::kNone;
  std::string safety_snapshot;
  Operation pending = Operation::kNone;  // kReestablish between its steps
  // Released while the other side was unreachable: this copy waits to
  // finish the release there.
  bool released = false;
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
  // No operation runs any more: Idle, and what described the running one
  // (operation, driver, plan) cleared.
  void EndOperation();
  std::string ToJson() const;
  // DataLoss naming what is malformed; Unimplemented for a newer version.
  static absl::StatusOr<RelationshipRecord> FromJson(const std::string& json);
};

// What an overwriting (or mode-changing) step is about to do, shown before
// it asks.
struct LossPreview {
  Operation operation = Operation::kNone;
  Endpoint overwritten;         // break: the destination that becomes writable
  std::string common_snapshot;  // empty: none shared
  Method method = Method::kNone;
  uint64_t bytes = 0;  // written on `overwritten` since the common snapshot
  uint64_t chunks = 0;
  std::string safety_snapshot;  // kept on `overwritten`; empty if none needed
  std::vector<std::string> kept_snapshots;  // newer than the common one
  std::string Describe() const;             // a few lines for people
};

// What one relationship operation moved.
struct TransferStats {
  uint64_t stream_bytes = 0;  // on the wire
  uint64_t data_bytes = 0;    // chunk bytes written on the receiver
  uint64_t snapshots = 0;     // snapshots received
  uint64_t resumed = 0;       // deltas that went on from a resume point
  uint64_t retries = 0;       // attempts after a lost connection
  double seconds = 0;
};

}  // namespace engine

#endif  // TANDEM_ENGINE_RECORD_H_
