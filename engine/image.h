// Raw images as delta targets: a regular file (created, grown and shrunk as
// the delta says, to any byte size) or a block device (at least the volume's
// size), and the record kept beside an image that says which snapshot it
// holds, so that an incremental apply costs what the delta changed, not what
// the volume holds, and an interrupted apply can be run again.
#ifndef TANDEM_ENGINE_IMAGE_H_
#define TANDEM_ENGINE_IMAGE_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "blockstore/io.h"
#include "engine/delta_format.h"
#include "engine/delta_receive.h"
#include "engine/stream.h"

namespace engine {

// Who an image file is at one moment: any write, truncate or replacement
// changes it (a block device's node does not see writes: see docs).
struct ImageIdentity {
  uint64_t device = 0, inode = 0, size_bytes = 0;
  int64_t change_time_ns = 0;
  bool operator==(const ImageIdentity&) const = default;
};

// A raw image, exactly size_bytes() long. Offsets are multiples of 4 KiB and
// buffers aligned (blockstore::kIoAlign); lengths are anything up to the end.
class RawImage {
 public:
  virtual ~RawImage() = default;
  virtual uint64_t size_bytes() const = 0;
  // A regular file: Resize works and the image's size is the volume's.
  virtual bool resizable() const = 0;
  virtual absl::Status Read(std::span<const blockstore::ReadOp> ops) = 0;
  virtual absl::Status Write(std::span<const blockstore::WriteOp> ops) = 0;
  // [offset, offset + length) reads as zeros after (any offset and length).
  virtual absl::Status Zero(uint64_t offset, uint64_t length) = 0;
  virtual absl::Status Resize(uint64_t size_bytes) = 0;
  virtual absl::Status Flush() = 0;
  virtual std::string name() const = 0;
  // nullopt where the image has none (memory).
  virtual std::optional<ImageIdentity> Identity() const = 0;
};

// Opens a regular file or block device as an image, locked against other
// writers; a missing file is created at `create_size_bytes` (0: NotFound).
absl::StatusOr<std::unique_ptr<RawImage>> OpenImage(absl::string_view path,
                                                    uint64_t create_size_bytes);
// An image over `io` (which must outlive it), of io's size, not resizable:
// a stand-in for a block device in tests.
std::unique_ptr<RawImage> ImageOnIo(blockstore::Io& io);

// What the record beside an image says.
struct ImageRecord {
  enum class State : uint32_t {
    kHolds = 1,     // the image holds `snapshot` (and was `identity` then)
    kApplying = 2,  // a delta to `snapshot` is being applied
  };
  State state = State::kHolds;
  uint32_t chunk_size = 0;
  Guid volume_guid{};
  Guid snapshot_guid{};  // kApplying: the delta's target
  Digest root_digest;
  uint64_t size_bytes = 0;  // the snapshot's volume size
  // kHolds: the image when the record was written.
  ImageIdentity identity;
  // kApplying: the stream (DeltaReader::Checkpoint().header_checksum), and
  // how many of its segments are durably on the image.
  uint64_t header_checksum = 0;
  uint64_t segments_done = 0;
  // kHolds: the digest of every chunk of the snapshot.
  std::vector<Digest> chunk_digests;
};

// The record in a file of its own (`path`), replaced atomically.
absl::StatusOr<std::optional<ImageRecord>> LoadImageRecord(
    const std::string& path);
absl::Status StoreImageRecord(const std::string& path, const ImageRecord& r);
absl::Status RemoveImageRecord(const std::string& path);

struct ImageApplyOptions {
  // Where the image's record lives; empty: none (every incremental reads
  // the whole image before and after, an interrupted apply cannot resume).
  std::string record_path;
  // Read the whole image to check the base before and the target after,
  // whatever the record says.
  bool verify = false;
  // Without a record, check the base by reading the image (false: trust the
  // user that it holds the base).
  bool verify_base = true;
  // A resume point after the first segment ending this many stream bytes
  // past the last one (0: none).
  uint64_t checkpoint_bytes = 64 << 20;
  std::function<void(uint64_t done, uint64_t total)> progress;
};

struct ImageApplyStats {
  ApplyStats apply;
  bool already_held = false;  // the image held the target: nothing written
  bool resumed = false;       // went on from an interrupted apply
  uint64_t bytes_read = 0;    // of the image, checking it
};

// Applies the stream `reader` yields (its header read, nothing else) onto
// `image`. A regular file takes the target's size exactly; a device too
// small for the target is refused before anything is written. Records are
// absolute, so an apply that was cut short is completed by running the same
// delta again (the record says which delta it was). FailedPrecondition if
// the image holds neither the base nor the target (a full delta: no check).
absl::StatusOr<ImageApplyStats> ApplyDeltaToImage(
    DeltaReader& reader, RawImage& image,
    const ImageApplyOptions& options = {});

// The same, reading the header from `in` first.
absl::StatusOr<ImageApplyStats> ApplyDeltaToImage(
    RawImage& image, ByteSource& in, const ImageApplyOptions& options = {});

// Root digest of the first `size_bytes` of `image` as a volume of
// `chunk_size` chunks (bytes past the image end read as zeros), and the
// digest of each chunk in `chunks` if given.
absl::StatusOr<Digest> ImageDigest(RawImage& image, uint64_t size_bytes,
                                   uint32_t chunk_size,
                                   std::vector<Digest>* chunks = nullptr);

}  // namespace engine

#endif  // TANDEM_ENGINE_IMAGE_H_
