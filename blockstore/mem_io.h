// MemIo keeps a "disk" in memory and tracks what is durable, so tests can
// simulate power loss: Crash() forgets every write not covered by a later
// Flush(), or keeps a prefix of them, or tears the first lost one.
// Thread-safe (one mutex).
#ifndef TANDEM_BLOCKSTORE_MEM_IO_H_
#define TANDEM_BLOCKSTORE_MEM_IO_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "blockstore/io.h"
#include "blockstore/mutex.h"

namespace blockstore {

class MemIo final : public Io {
 public:
  explicit MemIo(uint64_t size_bytes);

  uint64_t size_bytes() const override { return size_; }
  absl::Status Read(std::span<const ReadOp> ops) override;
  absl::Status Write(std::span<const WriteOp> ops) override;
  absl::Status Flush() override;
  // At once and durably: the pages go (they read as zeros, and hold no
  // memory), as a file's punched hole.
  absl::Status Discard(std::span<const Extent> extents) override;
  std::string name() const override { return "memory"; }

  // Number of writes (ops, not batches) since the last Flush.
  size_t pending_writes() const;

  // Power loss. The first `keep_writes` unflushed writes (in issue order)
  // survive; if `tear_bytes` > 0 the next one survives only in its first
  // `tear_bytes` bytes (rounded down to 512, a sector); the rest are lost.
  void Crash(size_t keep_writes = 0, size_t tear_bytes = 0);
  // The general form: `kept(i, len)` says how many leading bytes of the i-th
  // unflushed write survive (0 lost, len whole, else torn; rounded down to a
  // 512-byte sector).
  void CrashKeeping(const std::function<size_t(size_t, size_t)>& kept);

  // An independent copy of the current state, pending writes included.
  std::unique_ptr<MemIo> Clone() const;

  // Test hooks on the current contents, bypassing durability tracking.
  void FlipBit(uint64_t offset_bytes, int bit);
  std::vector<std::byte> Peek(uint64_t offset_bytes, size_t len) const;

  // Bytes held by the current image (sparse: untouched 4 KiB pages are free).
  uint64_t resident_bytes() const;

 private:
  using Page = std::vector<std::byte>;  // kIoAlign bytes
  struct Pending {
    uint64_t offset;
    std::vector<std::byte> data;
  };
  static void Apply(std::map<uint64_t, Page>& image, uint64_t offset,
                    std::span<const std::byte> data);
  static void CopyOut(const std::map<uint64_t, Page>& image, uint64_t offset,
                      std::span<std::byte> out);

  const uint64_t size_;
  mutable Mutex mu_;
  std::map<uint64_t, Page> current_ ABSL_GUARDED_BY(mu_);
  std::map<uint64_t, Page> durable_ ABSL_GUARDED_BY(mu_);
  std::vector<Pending> pending_ ABSL_GUARDED_BY(mu_);
};

}  // namespace blockstore

#endif  // TANDEM_BLOCKSTORE_MEM_IO_H_
