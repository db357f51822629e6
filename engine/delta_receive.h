// Reading a delta stream: check it, inspect it, apply it to a pool volume
// (atomically; raw images: engine/image.h).
#ifndef TANDEM_ENGINE_DELTA_RECEIVE_H_
#define TANDEM_ENGINE_DELTA_RECEIVE_H_

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "blockstore/io.h"
#include "blockstore/pool.h"
#include "blockstore/util.h"
#include "engine/delta_format.h"
#include "engine/stream.h"

namespace engine {

// Reads one stream front to back, checking everything before handing it
// out: the header, each segment (checksum, chain, sequence, decompressed
// size), each record (type, range, order) and each WRITE chunk's digest,
// and at the end the counts, the chain and the digest. Memory: one segment
// (about 2 MiB). Not thread-safe.
class DeltaReader {
 public:
  struct Record {
    RecordHeader header;
    // WRITE: count_chunks x (digest[16], chunk bytes), digests verified.
    std::span<const std::byte> payload;
    uint64_t segment = 0;
  };

  // `in` must outlive the reader. Reads and checks the header. With
  // `resume`, the stream is the rest of one whose first segments were read
  // before (the token says where that stopped): its header must be the same
  // (FailedPrecondition if not) and its first segment the token's.
  static absl::StatusOr<std::unique_ptr<DeltaReader>> Open(
      ByteSource& in, const ResumeToken* resume = nullptr);
  ~DeltaReader();

  const DeltaHeader& header() const { return header_; }
  // The next record, or nullopt after a valid end (and nothing after it).
  absl::StatusOr<std::optional<Record>> Next();
  // Valid once Next() returned nullopt.
  const DeltaEnd& end() const { return end_; }
  uint64_t stream_offset() const { return offset_; }
  uint64_t record_bytes_read() const { return record_bytes_; }
  // True once the record Next() returned last was its segment's last: a
  // point to resume from (Checkpoint).
  bool at_segment_end() const { return records_left_ == 0 && !ended_; }
  // Where this stream stands now; meaningful at a segment end.
  ResumeToken Checkpoint() const;

 private:
  explicit DeltaReader(ByteSource& in) : in_(in) {}
  absl::Status ReadSegment();
  absl::Status FinishStream(std::span<const std::byte> first4);

  ByteSource& in_;
  DeltaHeader header_;
  uint64_t offset_ = 0;
  uint64_t header_checksum_ = 0;
  uint64_t chain_ = 0;
  uint64_t next_segment_ = 0;
  // A segment as stored and its records, each as large as the largest
  // segment allows, made on the first segment and never zero-filled: every
  // byte used is read or decoded into first. A raw segment's buffer is
  // swapped in as the records.
  blockstore::AlignedBuffer stored_buf_, records_buf_;
  std::array<std::byte, 4> lead_;       // a segment's or the end's first 4
  std::span<const std::byte> records_;  // the current segment's records
  size_t record_pos_ = 0;
  uint32_t records_left_ = 0;
  uint64_t record_index_ = 0;
  RecordOrder order_;
  bool ended_ = false;
  DeltaEnd end_;
  // Totals checked against the end.
  uint64_t record_total_ = 0, chunks_written_ = 0, chunks_cleared_ = 0;
  uint64_t record_bytes_ = 0, stored_bytes_ = 0;
  void* dctx_ = nullptr;  // ZSTD_DCtx
};

struct ApplyStats {
  uint64_t checkpoints = 0;  // resume points committed
  uint64_t records = 0;
  uint64_t chunks_written = 0;
  uint64_t chunks_cleared = 0;
  uint64_t stream_bytes = 0;          // read by this call
  blockstore::SnapshotInfo snapshot;  // the received target (pool apply)
};

struct ApplyOptions {
  // Apply even if `volume`'s newest snapshot is not the delta's base, or
  // it changed since: the volume's live content is replaced by the base's
  // first. Snapshots newer than the base are kept.
  bool rollback = false;
  // SnapshotInfo::owner of the received target snapshot (empty: a user's).
  std::string target_owner;
  // Commit a resume point (staging content and a ResumeToken, in one
  // commit) after the first segment that ends at least this many stream
  // bytes after the last one; 0: never. With resume points, a failed apply
  // keeps its staging volume and last resume point (ResumePoint), unless
  // what it received turned out wrong (the end digest): DropReceive or a
  // fresh apply clears them.
  uint64_t checkpoint_bytes = 0;
  // Go on from this resume point (ResumePoint's, unchanged): the stream is
  // the rest of the one that was interrupted. FailedPrecondition if the
  // pool no longer holds it.
  std::optional<ResumeToken> resume;
  // What a refused base should tell the user to do (default: the
  // `tandem-delta apply` flag).
  std::string rollback_advice = "pass --rollback";
  std::function<void(uint64_t done, uint64_t total)> progress;
};

// Applies the stream to `volume` of `pool`, atomically: the records land in
// a staging volume cloned from the base snapshot, and only a valid end whose
// digest matches commits it as the target snapshot (same GUID, name and
// creation time) and the live content. Any error or crash before that leaves
// `volume` exactly as it was. A full delta creates `volume` (which must not
// exist). FailedPrecondition when the base does not match (the message
// names both snapshots).
absl::StatusOr<ApplyStats> ApplyDelta(blockstore::Pool& pool,
                                      absl::string_view volume, ByteSource& in,
                                      const ApplyOptions& options = {});

// The resume point an interrupted apply into `volume` left, if any.
absl::StatusOr<std::optional<ResumeToken>> ResumePoint(
    blockstore::Pool& pool, absl::string_view volume);
// Drops what an interrupted apply into `volume` left (staging volume and
// resume point), committed on return; OK if there is none.
absl::Status DropReceive(blockstore::Pool& pool, absl::string_view volume);
// The hidden volume an apply into `volume` stages in.
std::string StagingVolume(absl::string_view volume);

}  // namespace engine

#endif  // TANDEM_ENGINE_DELTA_RECEIVE_H_
