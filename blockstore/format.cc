#include "blockstore/format.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "blockstore/util.h"

namespace blockstore {
namespace {

constexpr char kSuperMagic[8] = {'T', 'A', 'N', 'D', 'E', 'M', 'P', 'L'};
constexpr uint32_t kNodeMagic = 0x444f4e54;  // "TNOD"
constexpr uint64_t kNodeChecksumAt = 56;

}  // namespace

bool IsValidName(absl::string_view name) {
  if (name.empty() || name.size() > 200 || name[0] == '.' || name[0] == '-') {
    return false;
  }
  for (char c : name) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
              (c >= '0' && c <= '9') || c == '.' || c == '_' || c == ':' ||
              c == '-';
    if (!ok) return false;
  }
  return true;
}

absl::Status CheckChunkSize(uint64_t chunk_size) {
  if (!IsPowerOfTwo(chunk_size) || chunk_size < 4096 ||
      chunk_size > (1u << 20)) {
    return absl::InvalidArgumentError(
        absl::StrCat("bad chunk size ", chunk_size,
                     ": must be a power of two from 4K to 1M"));
  }
  return absl::OkStatus();
}

absl::StatusOr<Superblock> LayOut(uint64_t device_bytes, uint32_t chunk_size) {
  if (absl::Status s = CheckChunkSize(chunk_size); !s.ok()) return s;
  Superblock sb;
  sb.chunk_size = chunk_size;
  sb.device_bytes = device_bytes;
  // Metadata gets 1/16 of the device (at least 256 nodes): room for about
  // 30 fully diverged copies of every tree at 64 KiB chunks.
  sb.meta_count = std::max<uint64_t>(256, device_bytes / 16 / kNodeSize);
  uint64_t max_chunks = device_bytes / chunk_size;
  sb.refcount_pages = DivRoundUp(sb.meta_count + max_chunks, kCountsPerPage);
  sb.refcount_start_bytes = 2 * kSuperblockSize;
  uint64_t meta_start_bytes = RoundUp(
      sb.refcount_start_bytes + 2 * sb.refcount_pages * 4096, kNodeSize);
  sb.meta_start = meta_start_bytes / kNodeSize;
  uint64_t data_start_bytes =
      RoundUp(meta_start_bytes + sb.meta_count * kNodeSize, chunk_size);
  if (data_start_bytes + 16ull * chunk_size > device_bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(device_bytes, " bytes is too small for a pool with ",
                     chunk_size, "-byte chunks: it needs at least ",
                     data_start_bytes + 16ull * chunk_size, " bytes"));
  }
  sb.data_start = data_start_bytes / chunk_size;
  sb.data_count = (device_bytes - data_start_bytes) / chunk_size;
  return sb;
}

void EncodeSuperblock(const Superblock& sb, uint64_t slot_offset,
                      std::span<std::byte, kSuperblockSize> out) {
  std::memset(out.data(), 0, out.size());
  std::byte* p = out.data();
  std::memcpy(p, kSuperMagic, 8);
  PutLe32(p + 8, sb.version);
  PutLe32(p + 12, 0);
  PutLe64(p + 16, sb.generation);
  std::memcpy(p + 24, sb.pool_guid.data(), 16);
  PutLe32(p + 40, sb.chunk_size);
  PutLe64(p + 48, sb.device_bytes);
  PutLe64(p + 56, sb.refcount_start_bytes);
  PutLe64(p + 64, sb.refcount_pages);
  PutLe64(p + 72, sb.meta_start);
  PutLe64(p + 80, sb.meta_count);
  PutLe64(p + 88, sb.data_start);
  PutLe64(p + 96, sb.data_count);
  PutLe64(p + 104, sb.catalog_head);
  PutLe64(p + 112, sb.catalog_bytes);
  PutLe64(p + 120, sb.used_nodes);
  PutLe64(p + 128, sb.used_chunks);
  PutLe64(p + 136, static_cast<uint64_t>(sb.create_time_ns));
  PutLe64(p + 4088, Hash64(out.first(4088), slot_offset));
}

SuperblockState DecodeSuperblock(std::span<const std::byte, kSuperblockSize> in,
                                 uint64_t slot_offset, uint64_t device_bytes,
                                 Superblock* sb, std::string* why) {
  const std::byte* p = in.data();
  if (std::memcmp(p, kSuperMagic, 8) != 0) {
    *why = "no superblock magic";
    return SuperblockState::kNoMagic;
  }
  if (GetLe64(p + 4088) != Hash64(in.first(4088), slot_offset)) {
    *why = "superblock checksum mismatch";
    return SuperblockState::kDamaged;
  }
  sb->version = GetLe32(p + 8);
  if (sb->version != kFormatVersion || GetLe32(p + 12) != 0) {
    *why = absl::StrCat("unsupported format version ", sb->version,
                        " (this build reads version ", kFormatVersion, ")");
    return SuperblockState::kDamaged;
  }
  sb->generation = GetLe64(p + 16);
  std::memcpy(sb->pool_guid.data(), p + 24, 16);
  sb->chunk_size = GetLe32(p + 40);
  sb->device_bytes = GetLe64(p + 48);
  sb->refcount_start_bytes = GetLe64(p + 56);
  sb->refcount_pages = GetLe64(p + 64);
  sb->meta_start = GetLe64(p + 72);
  sb->meta_count = GetLe64(p + 80);
  sb->data_start = GetLe64(p + 88);
  sb->data_count = GetLe64(p + 96);
  sb->catalog_head = GetLe64(p + 104);
  sb->catalog_bytes = GetLe64(p + 112);
  sb->used_nodes = GetLe64(p + 120);
  sb->used_chunks = GetLe64(p + 128);
  sb->create_time_ns = static_cast<int64_t>(GetLe64(p + 136));
  // The layout must be exactly what LayOut makes for these sizes, and fit.
  absl::StatusOr<Superblock> expect = LayOut(sb->device_bytes, sb->chunk_size);
  if (!expect.ok() || expect->meta_count != sb->meta_count ||
      expect->meta_start != sb->meta_start ||
      expect->data_start != sb->data_start ||
      expect->data_count != sb->data_count ||
      expect->refcount_pages != sb->refcount_pages ||
      expect->refcount_start_bytes != sb->refcount_start_bytes) {
    *why = "superblock layout fields are inconsistent";
    return SuperblockState::kDamaged;
  }
  if (sb->device_bytes > device_bytes) {
    *why = absl::StrCat("pool needs ", sb->device_bytes,
                        " bytes but the device has only ", device_bytes);
    return SuperblockState::kTooSmall;
  }
  return SuperblockState::kValid;
}

void SealNode(const NodeHeader& h, std::span<std::byte, kNodeSize> out) {
  std::byte* p = out.data();
  std::memset(p, 0, kNodeHeaderSize);
  PutLe32(p, kNodeMagic);
  p[4] = static_cast<std::byte>(h.kind);
  p[5] = static_cast<std::byte>(h.level);
  PutLe32(p + 8, h.payload_bytes);
  PutLe64(p + 16, h.id);
  PutLe64(p + 24, h.birth);
  PutLe64(p + 32, h.next);
  PutLe64(p + kNodeChecksumAt, Hash64(out, h.id));
}

absl::StatusOr<NodeHeader> OpenNode(std::span<const std::byte, kNodeSize> in,
                                    uint64_t expected_id) {
  const std::byte* p = in.data();
  if (GetLe32(p) != kNodeMagic) {
    return absl::DataLossError(
        absl::StrCat("metadata node ", expected_id, ": bad magic"));
  }
  uint64_t stored = GetLe64(p + kNodeChecksumAt);
  std::array<std::byte, kNodeSize> copy;
  std::memcpy(copy.data(), p, kNodeSize);
  PutLe64(copy.data() + kNodeChecksumAt, 0);
  if (Hash64(copy, expected_id) != stored) {
    return absl::DataLossError(
        absl::StrCat("metadata node ", expected_id, ": checksum mismatch"));
  }
  NodeHeader h;
  h.kind = static_cast<NodeKind>(p[4]);
  h.level = static_cast<uint8_t>(p[5]);
  h.payload_bytes = GetLe32(p + 8);
  h.id = GetLe64(p + 16);
  h.birth = GetLe64(p + 24);
  h.next = GetLe64(p + 32);
  if (h.id != expected_id) {
    return absl::DataLossError(absl::StrCat("metadata node ", expected_id,
                                            ": holds node ", h.id,
                                            " (misdirected write)"));
  }
  if (h.kind != NodeKind::kTree && h.kind != NodeKind::kCatalog) {
    return absl::DataLossError(absl::StrCat("metadata node ", expected_id,
                                            ": unknown kind ", int(p[4])));
  }
  if (h.payload_bytes > kCatalogPayload) {
    return absl::DataLossError(absl::StrCat("metadata node ", expected_id,
                                            ": payload length ",
                                            h.payload_bytes, " too large"));
  }
  return h;
}

void EncodeEntries(std::span<const Entry, kFanout> entries,
                   std::span<std::byte, kNodeSize> node) {
  std::byte* p = node.data() + kNodeHeaderSize;
  for (const Entry& e : entries) {
    PutLe64(p, e.ptr);
    PutLe64(p + 8, e.birth);
    std::memcpy(p + 16, e.digest.bytes.data(), 16);
    p += kEntrySize;
  }
}

void DecodeEntries(std::span<const std::byte, kNodeSize> node,
                   std::span<Entry, kFanout> entries) {
  const std::byte* p = node.data() + kNodeHeaderSize;
  for (Entry& e : entries) {
    e.ptr = GetLe64(p);
    e.birth = GetLe64(p + 8);
    std::memcpy(e.digest.bytes.data(), p + 16, 16);
    p += kEntrySize;
  }
}

void SealRefcountPage(uint64_t page_index, std::span<std::byte, 4096> page) {
  PutLe32(page.data() + 8, static_cast<uint32_t>(page_index));
  PutLe32(page.data() + 12, 0);
  PutLe64(page.data(), Hash64(page.subspan(8), page_index));
}

bool RefcountPageValid(uint64_t page_index,
                       std::span<const std::byte, 4096> page) {
  return GetLe32(page.data() + 8) == static_cast<uint32_t>(page_index) &&
         GetLe64(page.data()) == Hash64(page.subspan(8), page_index);
}

}  // namespace blockstore
