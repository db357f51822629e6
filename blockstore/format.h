// The on-disk format of a pool. One file or block device:
//
//   [superblock A | superblock B | refcount table copy 0 | copy 1 |
//    metadata nodes ... | data chunks ...]
//
// All integers are little-endian, fixed width. Every block written carries
// an XXH3-64 checksum seeded with its own address, so a misdirected or torn
// write is detected, never read as valid.
//
// Superblock (4 KiB, at 0 and at 4096; commit N writes slot N % 2):
//   0  magic "TANDEMPL"        8  u32 version      12 u32 features (0)
//   16 u64 generation (commit sequence; open takes the valid highest)
//   24 guid[16] pool GUID      40 u32 chunk_size   44 u32 reserved
//   48 u64 device_bytes        56 u64 refcount_start_bytes
//   64 u64 refcount_pages (per copy; copy N%2 belongs to commit N)
//   72 u64 meta_start (node id = byte offset / 4096)  80 u64 meta_count
//   88 u64 data_start (chunk number = byte offset / chunk_size)
//   96 u64 data_count          104 u64 catalog_head (node id, 0 = none)
//   112 u64 catalog_bytes      120 u64 used_nodes   128 u64 used_chunks
//   136 u64 create_time_ns
//   4088 u64 checksum over [0, 4088), seed = slot offset
//
// Metadata node (4 KiB):
//   0 u32 magic "TNOD"  4 u8 kind (1 tree, 2 catalog)  5 u8 level
//   8 u32 payload_bytes (catalog)  16 u64 id  24 u64 birth generation
//   32 u64 next (catalog chain)    56 u64 checksum over the node with this
//   field zero, seed = id.  64: payload.
// Tree payload: kFanout entries of 32 bytes: u64 ptr, u64 birth, digest[16].
//   Leaf (level 0): ptr = data chunk number, kPhysUnmapped or kPhysZero;
//   digest = XXH3-128 of the chunk. Interior: ptr = child node id (0 = an
//   empty subtree); birth = the generation the child was written in, which
//   bounds every birth below it; digest = the child's digest.
//   A node's digest = XXH3-128 of its kFanout entry digests in order.
//
// Catalog (the payload of the catalog node chain, catalog_bytes long):
//   u32 magic "TCAT", u32 version (3; 1 and 2 are read), u32 volume count,
//   then per volume: str name, guid, u64 create_time_ns, u64 size, root
//   entry, u32 snapshot count, per snapshot (str name, guid, u64
//   create_time_ns, u64 generation, u64 size, root entry, and from version 3
//   str owner), and from version 2 u32 flags (bit 0: read-only). From
//   version 2 there follow u32 property count and (str key, str value)
//   pairs. str = u16 length + bytes.
//
// Refcount page (4 KiB): 0 u64 checksum over [8, 4096) seeded with the page
//   index, 8 u32 page index, 16: kCountsPerPage u32 counts. Counts are
//   indexed [metadata nodes..., data chunks...].
#ifndef TANDEM_BLOCKSTORE_FORMAT_H_
#define TANDEM_BLOCKSTORE_FORMAT_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "blockstore/hash.h"

namespace blockstore {

inline constexpr uint32_t kFormatVersion = 1;
inline constexpr uint64_t kSuperblockSize = 4096;
inline constexpr uint64_t kNodeSize = 4096;
inline constexpr uint64_t kNodeHeaderSize = 64;
inline constexpr uint64_t kEntrySize = 32;
inline constexpr int kFanout = (kNodeSize - kNodeHeaderSize) / kEntrySize;
static_assert(kFanout == 126);
inline constexpr uint64_t kCatalogPayload = kNodeSize - kNodeHeaderSize;
inline constexpr uint64_t kCountsPerPage = (4096 - 16) / 4;
inline constexpr int kMaxDepth = 10;

inline constexpr uint64_t kPhysUnmapped = 0;         // never written/trimmed
inline constexpr uint64_t kPhysZero = ~uint64_t{0};  // written as zeros
inline bool IsDataPtr(uint64_t ptr) {
  return ptr != kPhysUnmapped && ptr != kPhysZero;
}

// Chunks covered by one entry of a tree node at `level` (kFanout^level).
inline uint64_t Span(int level) {
  uint64_t v = 1;
  for (int i = 0; i < level; ++i) v *= kFanout;
  return v;
}

enum class NodeKind : uint8_t { kTree = 1, kCatalog = 2 };

using Guid = std::array<std::byte, 16>;

struct Entry {
  uint64_t ptr = 0;
  uint64_t birth = 0;
  Digest digest;
};

struct Superblock {
  uint32_t version = kFormatVersion;
  uint64_t generation = 0;
  Guid pool_guid{};
  uint32_t chunk_size = 0;
  uint64_t device_bytes = 0;
  uint64_t refcount_start_bytes = 0;
  uint64_t refcount_pages = 0;
  uint64_t meta_start = 0;
  uint64_t meta_count = 0;
  uint64_t data_start = 0;
  uint64_t data_count = 0;
  uint64_t catalog_head = 0;
  uint64_t catalog_bytes = 0;
  uint64_t used_nodes = 0;
  uint64_t used_chunks = 0;
  int64_t create_time_ns = 0;

  uint64_t refcount_copy_offset(uint64_t generation_of_commit) const {
    return refcount_start_bytes +
           (generation_of_commit % 2) * refcount_pages * 4096;
  }
};

// The naming rule for volumes and snapshots, kept in the catalog and carried
// in delta headers: 1-200 bytes of [A-Za-z0-9._:-], not starting with '.'
// or '-' (names starting with '.' are the pool's own, e.g. staging volumes).
bool IsValidName(absl::string_view name);

// InvalidArgument unless `chunk_size` is a power of two in [4 KiB, 1 MiB].
absl::Status CheckChunkSize(uint64_t chunk_size);

// Lays out a new pool of `device_bytes` with `chunk_size`. InvalidArgument if
// the chunk size is not a power of two in [4 KiB, 1 MiB] or the device is too
// small to hold metadata and at least 16 chunks.
absl::StatusOr<Superblock> LayOut(uint64_t device_bytes, uint32_t chunk_size);

void EncodeSuperblock(const Superblock& sb, uint64_t slot_offset,
                      std::span<std::byte, kSuperblockSize> out);

enum class SuperblockState { kValid, kNoMagic, kDamaged, kTooSmall };
// kNoMagic: not a pool superblock at all. kDamaged: magic present but the
// checksum or a field is wrong (`why` says which). kTooSmall: a sound
// superblock of a pool larger than the device (a truncated file).
SuperblockState DecodeSuperblock(std::span<const std::byte, kSuperblockSize> in,
                                 uint64_t slot_offset, uint64_t device_bytes,
                                 Superblock* sb, std::string* why);

struct NodeHeader {
  NodeKind kind = NodeKind::kTree;
  uint8_t level = 0;
  uint32_t payload_bytes = 0;
  uint64_t id = 0;
  uint64_t birth = 0;
  uint64_t next = 0;
};

// Writes header + checksum around an already filled payload (out[64..]).
void SealNode(const NodeHeader& h, std::span<std::byte, kNodeSize> out);
// DataLoss naming the node id if magic, checksum or id do not match.
absl::StatusOr<NodeHeader> OpenNode(std::span<const std::byte, kNodeSize> in,
                                    uint64_t expected_id);

void EncodeEntries(std::span<const Entry, kFanout> entries,
                   std::span<std::byte, kNodeSize> node);
void DecodeEntries(std::span<const std::byte, kNodeSize> node,
                   std::span<Entry, kFanout> entries);

void SealRefcountPage(uint64_t page_index, std::span<std::byte, 4096> page);
bool RefcountPageValid(uint64_t page_index,
                       std::span<const std::byte, 4096> page);

}  // namespace blockstore

#endif  // TANDEM_BLOCKSTORE_FORMAT_H_
