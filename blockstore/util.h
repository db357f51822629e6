// Small helpers every layer needs: errno to Status, byte sizes, hex, and
// aligned buffers for direct I/O. Thread-safe (all are pure or own their data).
#ifndef TANDEM_BLOCKSTORE_UTIL_H_
#define TANDEM_BLOCKSTORE_UTIL_H_

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace blockstore {

// Every offset, length and buffer address handed to an Io is a multiple of
// this, so the same code runs with O_DIRECT on files and block devices.
inline constexpr size_t kIoAlign = 4096;
inline constexpr size_t kHugeBufferBytes = size_t{1} << 20;

// The one place errno (or a negated io_uring result) becomes a Status.
// `context` says what was being done, e.g. "read pool.img at 8192".
absl::Status ErrnoError(int err, absl::string_view context);

// Parses "4096", "64K", "1.5G", "2T" (binary multiples, optional "iB"/"B").
// InvalidArgument naming `what` and the text on anything else or on overflow.
absl::StatusOr<uint64_t> ParseSize(absl::string_view text,
                                   absl::string_view what = "size");

// "1.50 GiB", "64 KiB", "12 B".
std::string FormatBytes(uint64_t bytes);

// Lowercase hex of `data`.
std::string Hex(std::span<const std::byte> data);
// The bytes of `hex` (either case). InvalidArgument if it is not hex.
absl::StatusOr<std::vector<std::byte>> Unhex(absl::string_view hex);

inline constexpr uint64_t RoundUp(uint64_t v, uint64_t align) {
  return (v + align - 1) / align * align;
}
inline constexpr uint64_t DivRoundUp(uint64_t v, uint64_t d) {
  return (v + d - 1) / d;
}
inline constexpr bool IsPowerOfTwo(uint64_t v) {
  return v != 0 && (v & (v - 1)) == 0;
}

// Uninitialized memory aligned to kIoAlign, from `huge_from` bytes on to a
// 2 MiB boundary on transparent huge pages (see AlignedBuffer). Never null
// (aborts when out of memory: nothing sane to do); std::free frees it.
std::byte* AllocateAligned(size_t size_bytes,
                           size_t huge_from = kHugeBufferBytes);

// For std::vectors as large as a pool's chunk count (its reference counts,
// the state of every block): AllocateAligned's memory, on huge pages from
// 256 KiB, so that filling one faults in 2 MiB pages (a 24 GiB pool's 760,000
// block states, filled at every read-write open, were 190 faults of 4 KiB).
template <typename T>
struct LargeArrayAllocator {
  using value_type = T;
  LargeArrayAllocator() = default;
  template <typename U>
  LargeArrayAllocator(const LargeArrayAllocator<U>&) {}
  T* allocate(size_t n) {
    return reinterpret_cast<T*>(AllocateAligned(n * sizeof(T), 256 << 10));
  }
  void deallocate(T* p, size_t) { std::free(p); }
  bool operator==(const LargeArrayAllocator&) const = default;
};
template <typename T>
using LargeVector = std::vector<T, LargeArrayAllocator<T>>;

// A zero-filled heap buffer aligned to kIoAlign. Move-only. One of at least
// kHugeBufferBytes is aligned to and rounded up to 2 MiB and asks for
// transparent huge pages (madvise; where the kernel has them on): memory is
// paid for on first touch, a fault per page, and the read-ahead and write
// buffers of a delta, 16 MiB each side, cost 4096 of those on 4 KiB pages,
// 8 on 2 MiB ones (bench/run_delta.sh records the update's faults).
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  explicit AlignedBuffer(size_t size_bytes);
  // Without zeroing: untouched pages cost nothing until written. On huge
  // pages from `huge_from` bytes (AllocateAligned), for a buffer about to be
  // written whole.
  static AlignedBuffer Uninitialized(size_t size_bytes,
                                     size_t huge_from = kHugeBufferBytes);
  // A moved-from buffer is empty (null, size 0).
  AlignedBuffer(AlignedBuffer&& other) noexcept
      : data_(std::move(other.data_)), size_(std::exchange(other.size_, 0)) {}
  AlignedBuffer& operator=(AlignedBuffer&& other) noexcept {
    data_ = std::move(other.data_);
    size_ = std::exchange(other.size_, 0);
    return *this;
  }

  std::byte* data() { return data_.get(); }
  const std::byte* data() const { return data_.get(); }
  size_t size() const { return size_; }
  std::span<std::byte> span() { return {data_.get(), size_}; }
  std::span<const std::byte> span() const { return {data_.get(), size_}; }

 private:
  struct Free {
    void operator()(std::byte* p) const;
  };
  std::unique_ptr<std::byte[], Free> data_;
  size_t size_ = 0;
};

// Buffers of one size, handed out again once given back. Memory a process
// touches for the first time costs a page fault and the kernel's zeroing of
// the page (on a VM, whose host may have to back the page too, `perf` of a
// 1% update's create had most of its CPU in clear_page): a delta's batches
// read into, and write from, the buffers of batches done with rather than
// new ones. Thread-safe.
class BufferRecycler {
 public:
  explicit BufferRecycler(size_t size_bytes) : size_(size_bytes) {}
  // One given back, else a new one (uninitialized).
  AlignedBuffer Take();
  void Give(AlignedBuffer buffer);

 private:
  const size_t size_;
  std::mutex mu_;
  std::vector<AlignedBuffer> free_;  // guarded by mu_
};

// Memory for objects of one size that come and go by the thousand (a pool's
// tree nodes, 4 KiB each), carved from 2 MiB blocks on transparent huge
// pages. From the heap, each such object touched a page of its own the first
// time, a fault per node (most of a 1% update's faults; run_delta.sh counts
// them, bench/RESULTS.md runs S-W), where one 2 MiB fault serves 500 nodes.
// A slot given back is
// handed out again; blocks go back to the system only with the arena, so it
// holds as many slots as were ever in use at once (a pool's cache is bounded:
// Pool::Tuning). Thread-safe.
class SlotArena {
 public:
  // Slots of `slot_bytes` (rounded up to alignof(std::max_align_t)), at most
  // a block's size.
  explicit SlotArena(size_t slot_bytes);
  SlotArena(const SlotArena&) = delete;
  SlotArena& operator=(const SlotArena&) = delete;
  // Frees the blocks: every slot must have been given back.
  ~SlotArena();

  // An uninitialized slot, aligned to alignof(std::max_align_t). Never null
  // (aborts when out of memory, as AllocateAligned).
  void* Take();
  // `slot` came from Take on this arena.
  void Give(void* slot);

  size_t slot_bytes() const { return slot_bytes_; }
  // Blocks taken from the system so far.
  size_t blocks() const;

 private:
  struct FreeSlot {
    FreeSlot* next;
  };
  const size_t slot_bytes_;
  mutable std::mutex mu_;
  FreeSlot* free_ = nullptr;    // given back; guarded by mu_
  std::byte* carve_ = nullptr;  // the newest block's rest; guarded by mu_
  std::byte* carve_end_ = nullptr;
  std::vector<std::byte*> blocks_;  // guarded by mu_
};

// A std allocator that takes single objects of T from one SlotArena per type
// (a std::allocate_shared rebinds it to its control block, which holds the
// object) and arrays from the heap.
template <typename T>
struct ArenaAllocator {
  using value_type = T;
  ArenaAllocator() = default;
  template <typename U>
  ArenaAllocator(const ArenaAllocator<U>&) {}
  T* allocate(size_t n) {
    if (n != 1) return std::allocator<T>().allocate(n);
    return static_cast<T*>(Arena().Take());
  }
  void deallocate(T* p, size_t n) {
    if (n != 1) return std::allocator<T>().deallocate(p, n);
    Arena().Give(p);
  }
  bool operator==(const ArenaAllocator&) const = default;

  // Never destroyed: objects may be freed during static destruction.
  static SlotArena& Arena() {
    static_assert(alignof(T) <= alignof(std::max_align_t));
    static SlotArena* const arena = new SlotArena(sizeof(T));
    return *arena;
  }
};

// True if every byte of `data` is zero.
bool IsAllZero(std::span<const std::byte> data);

// Little-endian fixed-width encoding into / out of byte arrays. Inline:
// decoding a node or a reference-count page calls them for every entry.
inline uint64_t LittleEndian(uint64_t v) {
  if constexpr (std::endian::native == std::endian::little) return v;
  return __builtin_bswap64(v);
}
inline uint32_t LittleEndian(uint32_t v) {
  if constexpr (std::endian::native == std::endian::little) return v;
  return __builtin_bswap32(v);
}
inline void PutLe64(std::byte* p, uint64_t v) {
  v = LittleEndian(v);
  std::memcpy(p, &v, 8);
}
inline void PutLe32(std::byte* p, uint32_t v) {
  v = LittleEndian(v);
  std::memcpy(p, &v, 4);
}
inline uint64_t GetLe64(const std::byte* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return LittleEndian(v);
}
inline uint32_t GetLe32(const std::byte* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return LittleEndian(v);
}

}  // namespace blockstore

#endif  // TANDEM_BLOCKSTORE_UTIL_H_
