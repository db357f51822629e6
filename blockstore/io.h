// Io is the one seam between the block store and a disk: batched reads and
// writes of aligned extents of ONE backing file or block device, and a flush
// that makes earlier writes durable. Backends: io_uring (the default),
// pread/pwrite (where io_uring is refused, e.g. by a seccomp profile) and
// memory (tests, with crash simulation).
//
// Alignment: every offset, length and buffer address is a multiple of
// kIoAlign; backends return InvalidArgument otherwise. Every backend may be
// called from many threads at once: io_uring and pread/pwrite calls run in
// parallel (each io_uring call on a ring of its own), memory serializes.
#ifndef TANDEM_BLOCKSTORE_IO_H_
#define TANDEM_BLOCKSTORE_IO_H_

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace blockstore {

struct ReadOp {
  uint64_t offset_bytes;
  std::span<std::byte> out;
};
struct WriteOp {
  uint64_t offset_bytes;
  std::span<const std::byte> data;
};

struct Extent {
  uint64_t offset_bytes;
  uint64_t length_bytes;
};

class Io {
 public:
  virtual ~Io() = default;

  // Size of the backing file or device in bytes.
  virtual uint64_t size_bytes() const = 0;

  // Reads every op fully (reads past the end are OutOfRange). Ops may run in
  // any order and in parallel; on error the buffers' contents are undefined.
  virtual absl::Status Read(std::span<const ReadOp> ops) = 0;

  // Writes every op fully. Writes survive a crash only once a later Flush()
  // succeeds; until then any subset of them, or parts of them, may be lost.
  virtual absl::Status Write(std::span<const WriteOp> ops) = 0;

  virtual absl::Status Flush() = 0;
  // Gives the extents' space back to the file system (a hole punched in a
  // file) or the device (a discard): what they held is gone, they read as
  // zeros or as anything. Best effort: where the backend cannot, nothing
  // happens and the result is OK.
  virtual absl::Status Discard(std::span<const Extent> extents) {
    (void)extents;
    return absl::OkStatus();
  }

  // A name for messages (the path, or "memory").
  virtual std::string name() const = 0;

  // True for a regular file: its file system allocates blocks as they are
  // first written, and a Flush also commits those allocations to its
  // journal (bench/run_delta.sh times fio's writes with and without their
  // fsync: 1.83x in bench/RESULTS.md run W). A block device has none.
  virtual bool in_file_system() const { return false; }

  absl::Status ReadAt(uint64_t offset_bytes, std::span<std::byte> out) {
    ReadOp op{offset_bytes, out};
    return Read({&op, 1});
  }
  absl::Status WriteAt(uint64_t offset_bytes, std::span<const std::byte> data) {
    WriteOp op{offset_bytes, data};
    return Write({&op, 1});
  }
};

// Forwards every call to a target, which must outlive it. Fault-injecting
// test wrappers derive from it and override one thing.
class IoWrapper : public Io {
 public:
  explicit IoWrapper(Io& target) : target_(target) {}
  uint64_t size_bytes() const override { return target_.size_bytes(); }
  absl::Status Read(std::span<const ReadOp> ops) override {
    return target_.Read(ops);
  }
  absl::Status Write(std::span<const WriteOp> ops) override {
    return target_.Write(ops);
  }
  absl::Status Flush() override { return target_.Flush(); }
  absl::Status Discard(std::span<const Extent> extents) override {
    return target_.Discard(extents);
  }
  std::string name() const override { return target_.name(); }
  bool in_file_system() const override { return target_.in_file_system(); }

 protected:
  Io& target() { return target_; }

 private:
  Io& target_;
};

// While one lives on a thread, that thread's reads are a writer's own: the
// tree nodes a write rewrites, the rest of a partial chunk it fills in. A
// backend that makes writes yield to readers (io_uring: see file_io.cc) does
// not count them as readers, so a receive's own tree reads do not throttle
// its data writes (or those of its other batches) to a trickle. Nests.
class WritePathReads {
 public:
  WritePathReads() { ++depth_; }
  ~WritePathReads() { --depth_; }
  WritePathReads(const WritePathReads&) = delete;
  WritePathReads& operator=(const WritePathReads&) = delete;

  static bool active() { return depth_ > 0; }

 private:
  static inline thread_local int depth_ = 0;
};

// Checks alignment and bounds of `offset_bytes`/`len` for a backend of
// `size_bytes`; `buf` is the buffer address.
absl::Status CheckIoOp(absl::string_view what, absl::string_view name,
                       uint64_t offset_bytes, uint64_t len, const void* buf,
                       uint64_t size_bytes);

enum class OpenMode {
  kReadOnly,   // shared lock: many readers, no writer
  kReadWrite,  // exclusive lock: one process at a time
};

struct FileIoOptions {
  OpenMode mode = OpenMode::kReadWrite;
  // Create (or extend) a regular file of this size; 0 opens an existing
  // file or block device as it is.
  uint64_t create_size_bytes = 0;
  // io_uring unless false or unavailable (then pread/pwrite).
  bool use_uring = true;
  // O_DIRECT where the filesystem or device accepts it.
  bool direct = true;
};

// Opens `path` (a regular file or a block device) for pool I/O and takes an
// advisory lock on it (see OpenMode). FailedPrecondition naming the holder's
// process id if another process holds a conflicting lock; NotFound if
// `path` does not exist and no size was given.
absl::StatusOr<std::unique_ptr<Io>> OpenFileIo(absl::string_view path,
                                               const FileIoOptions& options);

// Sets the size of the regular file behind `io` (from OpenFileIo) to exactly
// `size_bytes` (ftruncate: growing adds zeros); io.size_bytes() becomes it
// rounded down to kIoAlign. No I/O may be in flight. FailedPrecondition for a
// block device.
absl::Status ResizeFileIo(Io& io, uint64_t size_bytes);

// Describes the backend OpenFileIo chose: "io_uring, O_DIRECT" etc.
std::string DescribeFileIo(const Io& io);

}  // namespace blockstore

#endif  // TANDEM_BLOCKSTORE_IO_H_
