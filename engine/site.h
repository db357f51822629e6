// A Site is one side of a relationship: one pool, in this process
// (LocalSite) or behind another site's daemon (transport's RemoteSite). The
// relationship engine reaches both sides only through this interface, so
// its state machine, guards, previews and crash recovery are one piece of
// code whether the other side is local or across a WAN. Calls are coarse
// (snapshot lists, a record, a whole delta as a stream, digests in batches)
// so that one step is a few round trips, never one per chunk.
//
// Threads: every method may be called from any thread; implementations
// serialize what they must. Errors: as the block store's (NotFound,
// FailedPrecondition, ...), plus Unavailable when a remote site cannot be
// reached or its connection was lost (worth a retry).
#ifndef TANDEM_ENGINE_SITE_H_
#define TANDEM_ENGINE_SITE_H_

#include <array>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "blockstore/pool.h"
#include "engine/delta_format.h"
#include "engine/delta_receive.h"
#include "engine/delta_send.h"
#include "engine/record.h"
#include "engine/stream.h"

namespace engine {

using Sha256 = std::array<uint8_t, 32>;

struct SiteInfo {
  blockstore::Guid pool_guid{};
  uint32_t chunk_size_bytes = 0;
};

// Chunks that differ between two snapshots: data chunks, and all kinds.
struct ChangeCount {
  uint64_t data_chunks = 0;
  uint64_t all_chunks = 0;
};

// What runs for a relationship at a site now, and how far it is.
struct Activity {
  Operation operation = Operation::kNone;
  std::string driver;  // who runs it (a site name; empty: a CLI process)
  uint64_t progress_bytes = 0;
  uint64_t progress_total_bytes = 0;
};

// The right to run an operation of one relationship, at one site, until
// the Claim is destroyed. Held by the process that runs it; a remote claim
// lives with its connection, so a driver that dies releases it.
class Claim {
 public:
  virtual ~Claim() = default;
  // Publishes progress (data bytes) for status at that site.
  virtual void Progress(uint64_t done, uint64_t total) = 0;
  // Makes sure the claim is still held, taking it again after a lost
  // connection; FailedPrecondition if someone else took it meanwhile.
  virtual absl::Status Renew() = 0;
};

// A delta to send: `volume@base..target` (base empty: full), or, with
// `onto`, only `chunks` of `target`, relative to the receiver's snapshot
// `onto` (hash-diff). From `resume` on if given (the receiver's point).
struct SendRequest {
  std::string volume, base, target;
  std::optional<blockstore::SnapshotInfo> onto;
  std::vector<uint64_t> chunks;
  std::optional<ResumeToken> resume;
  // Record bytes done and in total (a local sender only).
  std::function<void(uint64_t, uint64_t)> progress;
};

struct ReceiveRequest {
  std::string volume;
  bool rollback = false;     // ApplyOptions::rollback
  std::string target_owner;  // SnapshotInfo::owner of the result
  std::optional<ResumeToken> resume;
  std::string rollback_advice;  // ApplyOptions::rollback_advice
  // Record bytes done (a local receiver only).
  std::function<void(uint64_t, uint64_t)> progress;
};

// Snapshots of `owner` older than the one with GUID `keep_from` go.
struct Prune {
  std::string owner;
  blockstore::Guid keep_from{};
};

class Site {
 public:
  virtual ~Site() = default;

  // "SITE/POOL" through daemons, the pool's path without.
  virtual const std::string& name() const = 0;
  virtual absl::StatusOr<SiteInfo> Info() = 0;

  virtual absl::StatusOr<blockstore::VolumeInfo> GetVolume(
      const std::string& volume) = 0;
  virtual absl::StatusOr<std::vector<blockstore::SnapshotInfo>> ListSnapshots(
      const std::string& volume) = 0;
  virtual absl::StatusOr<blockstore::SnapshotInfo> CreateSnapshot(
      const std::string& volume, const std::string& name,
      const std::string& owner) = 0;
  // All of them in one commit (NotFound for one missing changes nothing).
  virtual absl::Status DeleteSnapshots(
      const std::string& volume, const std::vector<std::string>& names) = 0;
  virtual absl::Status SetReadOnly(const std::string& volume,
                                   bool read_only) = 0;
  // Written, trimmed or resized since `snapshot`.
  virtual absl::StatusOr<bool> ChangedSince(const std::string& volume,
                                            const std::string& snapshot) = 0;
  // Between two snapshots (target empty: the live volume).
  virtual absl::StatusOr<ChangeCount> CountChanges(
      const std::string& volume, const std::string& base,
      const std::string& target) = 0;
  // SHA-256 of chunks [first, first + count) of `volume@snapshot` (empty:
  // live); chunks past its end count as zeros. Hash-diff decides what NOT
  // to send from these, so they are cryptographic (volume data may be
  // adversarial; XXH3 equality proves nothing). At most kMaxDigestBatch.
  static constexpr uint64_t kMaxDigestBatch = 16384;
  virtual absl::StatusOr<std::vector<Sha256>> ChunkDigests(
      const std::string& volume, const std::string& snapshot,
      uint64_t first_chunk, uint64_t count) = 0;

  // Relationship records: volume -> record text.
  virtual absl::StatusOr<std::map<std::string, std::string>> Records() = 0;
  // Sets (empty `text`: removes) the record of `volume`, with `prune`
  // applied in the same commit.
  virtual absl::Status SaveRecord(const std::string& volume,
                                  const std::string& text,
                                  const std::optional<Prune>& prune) = 0;

  // Writes the delta to `out` (this site is the sender).
  virtual absl::StatusOr<SendStats> Send(const SendRequest& request,
                                         ByteSink& out) = 0;
  // Applies a delta from `in` atomically (this site is the receiver),
  // committing resume points as its configuration says.
  virtual absl::StatusOr<ApplyStats> Receive(const ReceiveRequest& request,
                                             ByteSource& in) = 0;
  // What an interrupted receive into `volume` left to go on from.
  virtual absl::StatusOr<std::optional<ResumeToken>> ResumePoint(
      const std::string& volume) = 0;
  virtual absl::Status DropReceive(const std::string& volume) = 0;

  // FailedPrecondition naming what runs if relationship `id` is claimed.
  virtual absl::StatusOr<std::unique_ptr<Claim>> TakeClaim(
      const std::string& id, const Activity& what) = 0;
  virtual absl::StatusOr<std::optional<Activity>> Running(
      const std::string& id) = 0;
};

// Finds the site of an endpoint's pool. A pool that cannot be reached (a
// lost site) is an error whose message says why.
class SiteProvider {
 public:
  virtual ~SiteProvider() = default;
  virtual absl::StatusOr<Site*> Get(const Endpoint& endpoint) = 0;
};

}  // namespace engine

#endif  // TANDEM_ENGINE_SITE_H_
