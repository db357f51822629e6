// Creating a delta stream from a pool: the changed chunks of one snapshot
// since another (or all of it), compressed in parallel, written in order.
#ifndef TANDEM_ENGINE_DELTA_SEND_H_
#define TANDEM_ENGINE_DELTA_SEND_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "blockstore/pool.h"
#include "engine/delta_format.h"
#include "engine/stream.h"

namespace engine {

// The changes between two snapshots, walked once and kept: a site that
// counts a delta's changes before sending it hands the walk to the send.
struct WalkedDiff {
  std::vector<blockstore::ChangedRun> runs;  // in chunk order, from `from`
  uint64_t from = 0;
  uint64_t next_chunk = 0;  // the walk stopped here (complete: the end)
  bool complete = false;
  uint64_t nodes_visited = 0;
};

// Runs kept at most (48 bytes each): a diff with more changed runs is kept
// in part, and its rest walked again by the send.
inline constexpr size_t kMaxWalkedRuns = 1 << 18;

absl::StatusOr<WalkedDiff> WalkDiff(blockstore::Pool& pool,
                                    absl::string_view volume,
                                    absl::string_view base,
                                    absl::string_view target, uint64_t from,
                                    size_t max_runs = kMaxWalkedRuns);

struct SendOptions {
  int zstd_level = 1;  // 0 stores every segment raw
  int threads = 0;     // compression workers; 0: one per core
  // Called from the writing thread with stream record bytes done and the
  // total: known before the first byte is sent when `diff` is given, else
  // 0 until the send's own walk of the diff (beside the first reads and
  // compression) has ended.
  std::function<void(uint64_t done, uint64_t total)> progress;
  // Send the rest of a stream the receiver holds part of (its ResumePoint):
  // the same header, then the segments from the token's on.
  // FailedPrecondition if the token is for another stream.
  std::optional<ResumeToken> resume;
  // SendDelta: the diff of the same base and target, walked already (from
  // chunk 0, or from the resume point). Null: the send walks it.
  std::shared_ptr<const WalkedDiff> diff;
};

struct SendStats {
  uint64_t segments = 0;
  uint64_t records = 0;
  uint64_t chunks_written = 0;
  uint64_t chunks_cleared = 0;  // ZERO and UNMAP
  uint64_t record_bytes = 0;    // before compression
  uint64_t stream_bytes = 0;    // sent by this call, header and end included
  uint64_t nodes_visited = 0;   // tree nodes the diff read
};

// Writes the delta of `volume@target` since `volume@base` (empty: a full
// delta) to `out`. `pool` must keep both snapshots for the duration (open
// it read-only, or hold them). NotFound for a missing volume or snapshot;
// any error from `out` or the pool is returned as is.
absl::StatusOr<SendStats> SendDelta(blockstore::Pool& pool,
                                    absl::string_view volume,
                                    absl::string_view base,
                                    absl::string_view target, ByteSink& out,
                                    const SendOptions& options = {});

// A stream from `base`, a snapshot the RECEIVER holds (this pool need not),
// to `volume@target` that carries only `chunks` (increasing, within the
// target), read from the target: hash-diff, once the chunks that differ are
// known. The receiver's apply then checks the result's digest as for any
// delta. InvalidArgument for a bad chunk list.
absl::StatusOr<SendStats> SendChunks(
    blockstore::Pool& pool, absl::string_view volume, absl::string_view target,
    const blockstore::SnapshotInfo& base, std::span<const uint64_t> chunks,
    ByteSink& out, const SendOptions& options = {});

}  // namespace engine

#endif  // TANDEM_ENGINE_DELTA_SEND_H_
