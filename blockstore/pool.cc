#include "blockstore/pool.h"

#include <sys/random.h>

#include <algorithm>
#include <chrono>
#include <cstring>

#include "absl/strings/ascii.h"
#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "blockstore/byte_codec.h"
#include "blockstore/pool_internal.h"
#include "blockstore/util.h"

namespace blockstore {

using internal::IsStaging;
using internal::kMaxVolumeBytes;
using internal::NowNs;
using internal::RandomGuid;
using internal::ValidName;

namespace {

// Bytes handled per I/O batch in Read/Write (bounds the bounce buffers).
constexpr uint64_t kBatchBytes = 16 << 20;
void PutEntry(ByteWriter& w, const Entry& e) {
  w.U64(e.ptr);
  w.U64(e.birth);
  w.Bytes(e.digest.bytes);
}

Entry GetEntry(ByteReader& r) {
  Entry e;
  e.ptr = r.U64();
  e.birth = r.U64();
  r.Bytes(e.digest.bytes);
  return e;
}

constexpr uint32_t kCatalogMagic = 0x54414354;  // "TCAT"
// Version 2 added a flags word per volume (bit 0: read-only) and the pool's
// properties after the volumes. Version 1 catalogs are read as such.
constexpr uint32_t kCatalogVersion = 3;
constexpr uint32_t kVolumeReadOnly = 1;
constexpr size_t kMaxPropertyKeyBytes = 200;
constexpr size_t kMaxSnapshotOwnerBytes = 64;
constexpr size_t kMaxPropertyValueBytes = 60000;

}  // namespace

namespace internal {

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

Guid RandomGuid() {
  Guid g;
  size_t got = 0;
  while (got < g.size()) {
    ssize_t n = getrandom(g.data() + got, g.size() - got, 0);
    if (n > 0) got += n;
  }
  // RFC 4122 version 4, variant 1.
  g[6] = (g[6] & std::byte{0x0f}) | std::byte{0x40};
  g[8] = (g[8] & std::byte{0x3f}) | std::byte{0x80};
  return g;
}

absl::Status ValidName(absl::string_view name, absl::string_view what) {
  if (!IsValidName(name)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "bad ", what, " name '", name,
        "': use 1-200 characters of A-Z a-z 0-9 . _ : - (not starting with . "
        "or -)"));
  }
  return absl::OkStatus();
}

}  // namespace internal

std::string GuidToString(const Guid& g) {
  std::string h = Hex(g);
  return absl::StrCat(h.substr(0, 8), "-", h.substr(8, 4), "-", h.substr(12, 4),
                      "-", h.substr(16, 4), "-", h.substr(20));
}

namespace {

// Marks every error of the device with a payload, so that a device that
// ran out of space (ENOSPC from a full filesystem under a sparse pool file)
// is told apart from the pool running out of chunks: the first leaves the
// in-memory state ahead of the disk and must stop the handle, the second is
// refused before anything changes.
constexpr char kDeviceErrorPayload[] = "tandem.blockstore/device-error";

class TagDeviceErrors final : public IoWrapper {
 public:
  using IoWrapper::IoWrapper;
  absl::Status Read(std::span<const ReadOp> ops) override {
    return Tag(IoWrapper::Read(ops));
  }
  absl::Status Write(std::span<const WriteOp> ops) override {
    return Tag(IoWrapper::Write(ops));
  }
  absl::Status Flush() override { return Tag(IoWrapper::Flush()); }

 private:
  static absl::Status Tag(absl::Status s) {
    if (!s.ok()) s.SetPayload(kDeviceErrorPayload, absl::Cord("1"));
    return s;
  }
};

}  // namespace

Pool::Pool(Io& io, std::unique_ptr<Io> owned, OpenMode mode)
    : owned_io_(std::move(owned)),
      device_(io),
      tagged_(std::make_unique<TagDeviceErrors>(io)),
      io_(*tagged_),
      mode_(mode) {}

Pool::~Pool() = default;

absl::StatusOr<std::unique_ptr<Pool>> Pool::Create(
    Io& io, const CreatePoolOptions& options) {
  std::unique_ptr<Pool> pool(new Pool(io, nullptr, OpenMode::kReadWrite));
  MutexLock lock(pool->mu_);
  if (absl::Status s = pool->FormatLocked(options); !s.ok()) return s;
  return pool;
}

absl::StatusOr<std::unique_ptr<Pool>> Pool::Create(
    std::unique_ptr<Io> io, const CreatePoolOptions& options) {
  Io& ref = *io;
  std::unique_ptr<Pool> pool(
      new Pool(ref, std::move(io), OpenMode::kReadWrite));
  MutexLock lock(pool->mu_);
  if (absl::Status s = pool->FormatLocked(options); !s.ok()) return s;
  return pool;
}

absl::StatusOr<std::unique_ptr<Pool>> Pool::Open(Io& io, OpenMode mode) {
  std::unique_ptr<Pool> pool(new Pool(io, nullptr, mode));
  MutexLock lock(pool->mu_);
  if (absl::Status s = pool->LoadLocked(); !s.ok()) return s;
  return pool;
}

absl::StatusOr<std::unique_ptr<Pool>> Pool::Open(std::unique_ptr<Io> io,
                                                 OpenMode mode) {
  Io& ref = *io;
  std::unique_ptr<Pool> pool(new Pool(ref, std::move(io), mode));
  MutexLock lock(pool->mu_);
  if (absl::Status s = pool->LoadLocked(); !s.ok()) return s;
  return pool;
}

// ---------------------------------------------------------------------------
// Shape and digests

uint64_t Pool::BatchChunks() const {
  return std::max<uint64_t>(1, kBatchBytes / shape_.chunk_size);
}

uint64_t Pool::ChunkCount(uint64_t size_bytes) const {
  return DivRoundUp(size_bytes, shape_.chunk_size);
}

int Pool::Depth(uint64_t chunk_count) {
  int depth = 1;
  while (depth < kMaxDepth && Span(depth) < chunk_count) ++depth;
  return depth;
}

Digest Pool::EmptyDigest(int level) const { return empty_digests_[level + 1]; }

Digest Pool::NullEntryDigest(int node_level) const {
  return empty_digests_[node_level];  // level 0: the zero chunk
}

Digest Pool::VolumeDigest(const Entry& root, uint64_t size_bytes) const {
  int depth = Depth(ChunkCount(size_bytes));
  Digest sub = root.ptr == 0 ? EmptyDigest(depth - 1) : root.digest;
  std::byte buf[16 + 8 + 4];
  std::memcpy(buf, sub.bytes.data(), 16);
  PutLe64(buf + 16, size_bytes);
  PutLe32(buf + 24, shape_.chunk_size);
  return Hash128(buf);
}

// ---------------------------------------------------------------------------
// Open and format

absl::Status Pool::FormatLocked(const CreatePoolOptions& options) {
  absl::StatusOr<Superblock> sb =
      LayOut(io_.size_bytes(), options.chunk_size_bytes);
  if (!sb.ok()) return sb.status();
  sb_ = *sb;
  shape_ = *sb;
  sb_.pool_guid = RandomGuid();
  sb_.create_time_ns = NowNs();
  sb_.generation = 0;
  // Whatever superblocks were there before (an old pool) must not win.
  AlignedBuffer zeros(2 * kSuperblockSize);
  if (absl::Status s = io_.WriteAt(0, zeros.span()); !s.ok()) return s;
  if (absl::Status s = io_.Flush(); !s.ok()) return s;

  AlignedBuffer zero_chunk(sb_.chunk_size);
  empty_digests_.push_back(Hash128(zero_chunk.span()));
  for (int l = 0; l <= kMaxDepth; ++l) {
    std::vector<Digest> parts(kFanout, empty_digests_.back());
    empty_digests_.push_back(Hash128Digests(parts));
  }
  uint64_t total = sb_.meta_count + sb_.data_count;
  counts_.assign(total, 0);
  held_.assign(total, false);
  free_nodes_ = sb_.meta_count;
  free_chunks_ = sb_.data_count;
  gen_ = 1;
  changed_ = true;
  full_table_writes_ = 2;
  return CommitLocked();
}

absl::Status Pool::LoadLocked(bool repair) {
  AlignedBuffer sbs(2 * kSuperblockSize);
  if (absl::Status s = io_.ReadAt(0, sbs.span()); !s.ok()) {
    if (absl::IsOutOfRange(s)) {
      return absl::DataLossError(absl::StrCat(
          io_.name(), " is not a tandem pool (too small to hold one)"));
    }
    return s;
  }
  Superblock cand[2];
  std::string why[2];
  SuperblockState state[2];
  for (int i = 0; i < 2; ++i) {
    state[i] = DecodeSuperblock(
        std::span<const std::byte, kSuperblockSize>(
            sbs.data() + i * kSuperblockSize, kSuperblockSize),
        i * kSuperblockSize, io_.size_bytes(), &cand[i], &why[i]);
  }
  int best = -1;
  for (int i = 0; i < 2; ++i) {
    if (state[i] != SuperblockState::kValid) continue;
    if (best < 0 || cand[i].generation > cand[best].generation) best = i;
  }
  if (best < 0) {
    if (state[0] == SuperblockState::kNoMagic &&
        state[1] == SuperblockState::kNoMagic) {
      return absl::DataLossError(absl::StrCat(
          io_.name(),
          " is not a tandem pool (no pool superblock found); create one with "
          "'tandem pool create'"));
    }
    for (int i = 0; i < 2; ++i) {
      if (state[i] != SuperblockState::kTooSmall) continue;
      return absl::DataLossError(absl::StrCat(
          io_.name(), " is ", io_.size_bytes(), " bytes but its pool is ",
          cand[i].device_bytes,
          ": the file was truncated or the device shrank; give it back its "
          "size (a file: truncate -s ",
          cand[i].device_bytes, ") and open it again"));
    }
    return absl::DataLossError(absl::StrCat(
        io_.name(), ": both pool superblocks are damaged (A: ", why[0],
        "; B: ", why[1], ")"));
  }
  sb_ = cand[best];
  shape_ = sb_;

  AlignedBuffer zero_chunk(sb_.chunk_size);
  empty_digests_.push_back(Hash128(zero_chunk.span()));
  for (int l = 0; l <= kMaxDepth; ++l) {
    std::vector<Digest> parts(kFanout, empty_digests_.back());
    empty_digests_.push_back(Hash128Digests(parts));
  }

  // Reference counts of this commit.
  uint64_t total = sb_.meta_count + sb_.data_count;
  // Both table copies in one device batch: this commit's, and the other
  // one, compared below.
  AlignedBuffer table(sb_.refcount_pages * 4096);
  AlignedBuffer other(sb_.refcount_pages * 4096);
  const ReadOp table_reads[] = {
      {sb_.refcount_copy_offset(sb_.generation), table.span()},
      {sb_.refcount_copy_offset(sb_.generation + 1), other.span()}};
  if (absl::Status s = io_.Read(table_reads); !s.ok()) return s;
  counts_.assign(total, 0);
  held_.assign(total, false);
  std::vector<uint64_t> damaged;  // pages; rebuilt below from the trees
  for (uint64_t p = 0; p < sb_.refcount_pages; ++p) {
    std::span<const std::byte, 4096> page(table.data() + p * 4096, 4096);
    if (!RefcountPageValid(p, page)) {
      damaged.push_back(p);
      continue;
    }
    for (uint64_t i = 0; i < kCountsPerPage; ++i) {
      uint64_t index = p * kCountsPerPage + i;
      if (index >= total) break;
      counts_[index] = GetLe32(page.data() + 16 + 4 * i);
    }
  }

  // The catalog: a chain of nodes holding volume and snapshot records.
  // Without it no volume can be found: said so, with what is left to do.
  auto catalog_damaged = [&](absl::string_view what) {
    return absl::DataLossError(
        absl::StrCat(io_.name(),
                     ": the catalog (its list of volumes and snapshots) is "
                     "damaged: ",
                     what,
                     "; restore the pool from a copy, or replicate its "
                     "volumes again"));
  };
  std::string catalog;
  uint64_t id = sb_.catalog_head;
  AlignedBuffer node(kNodeSize);
  while (id != 0) {
    if (id < sb_.meta_start || id >= sb_.meta_start + sb_.meta_count ||
        catalog_nodes_.size() > sb_.meta_count) {
      return catalog_damaged(absl::StrCat("node id ", id, " out of range"));
    }
    if (absl::Status s = io_.ReadAt(id * kNodeSize, node.span()); !s.ok()) {
      return s;
    }
    absl::StatusOr<NodeHeader> h = OpenNode(
        std::span<const std::byte, kNodeSize>(node.data(), kNodeSize), id);
    if (!h.ok()) return catalog_damaged(h.status().message());
    if (h->kind != NodeKind::kCatalog) {
      return catalog_damaged(
          absl::StrCat("metadata node ", id, " is not a catalog node"));
    }
    catalog.append(reinterpret_cast<const char*>(node.data() + kNodeHeaderSize),
                   h->payload_bytes);
    catalog_nodes_.push_back(id);
    id = h->next;
  }
  if (catalog.size() != sb_.catalog_bytes) {
    return catalog_damaged(absl::StrCat("it holds ", catalog.size(),
                                        " bytes, the superblock says ",
                                        sb_.catalog_bytes));
  }
  if (absl::Status s = ParseCatalog(catalog); !s.ok()) {
    return catalog_damaged(s.message());
  }
  committed_catalog_ = std::move(catalog);
  gen_ = sb_.generation + 1;
  if (!damaged.empty()) {
    count_damage_ = absl::StrCat(
        "reference count page", damaged.size() > 1 ? "s " : " ",
        absl::StrJoin(damaged, ", "), " of generation ", sb_.generation,
        damaged.size() > 1 ? " are" : " is", " damaged (checksum mismatch)");
    if (mode_ == OpenMode::kReadWrite && !repair) {
      return absl::DataLossError(absl::StrCat(
          io_.name(), ": ", count_damage_,
          "; the volumes are intact and open read-only; rebuild the counts "
          "with 'tandem pool check --repair ",
          io_.name(), "'"));
    }
    // Counts are not needed to read: rebuilt from the trees, the pool
    // serves everything they reach.
    if (absl::Status s = RebuildCounts(); !s.ok()) {
      return absl::DataLossError(
          absl::StrCat(io_.name(), ": ", count_damage_, " and ", s.message()));
    }
  }
  CountSpace();
  // The next commit writes the other table copy, which must then equal this
  // one wherever that commit changes nothing. It may be older, or torn by a
  // crash: compare it page by page and have the first commit rewrite the
  // pages that differ (after a clean shutdown: usually none).
  for (uint64_t p = 0; p < sb_.refcount_pages; ++p) {
    if (std::memcmp(table.data() + p * 4096, other.data() + p * 4096, 4096) !=
        0) {
      prev_dirty_pages_.insert(p);
    }
  }
  full_table_writes_ = 0;
  return absl::OkStatus();
}

void Pool::CountSpace() {
  free_nodes_ = free_chunks_ = used_nodes_ = used_chunks_ = 0;
  for (uint64_t i = 0; i < counts_.size(); ++i) {
    bool is_node = i < sb_.meta_count;
    if (counts_[i] == 0) {
      ++(is_node ? free_nodes_ : free_chunks_);
    } else {
      ++(is_node ? used_nodes_ : used_chunks_);
    }
  }
}

std::string Pool::SerializeCatalog() const {
  ByteWriter w;
  w.U32(kCatalogMagic);
  w.U32(kCatalogVersion);
  w.U32(static_cast<uint32_t>(volumes_.size()));
  for (const auto& [name, v] : volumes_) {
    w.Str(v.name);
    w.Bytes(v.guid);
    w.U64(static_cast<uint64_t>(v.create_time_ns));
    w.U64(v.size_bytes);
    PutEntry(w, v.root);
    w.U32(static_cast<uint32_t>(v.snapshots.size()));
    for (const SnapshotRec& s : v.snapshots) {
      w.Str(s.name);
      w.Bytes(s.guid);
      w.U64(static_cast<uint64_t>(s.create_time_ns));
      w.U64(s.generation);
      w.U64(s.size_bytes);
      PutEntry(w, s.root);
      w.Str(s.owner);
    }
    w.U32(v.read_only ? kVolumeReadOnly : 0);
  }
  w.U32(static_cast<uint32_t>(properties_.size()));
  for (const auto& [key, value] : properties_) {
    w.Str(key);
    w.Str(value);
  }
  return w.Take();
}

absl::Status Pool::ParseCatalog(absl::string_view bytes) {
  auto bad = [&](absl::string_view what) {
    return absl::DataLossError(absl::StrCat("malformed (", what, ")"));
  };
  if (bytes.empty()) return absl::OkStatus();
  ByteReader r(bytes);
  if (r.U32() != kCatalogMagic) return bad("magic");
  const uint32_t version = r.U32();
  if (version < 1 || version > kCatalogVersion) return bad("version");
  auto root_ok = [&](const Entry& e) {
    return e.ptr == 0 || (e.ptr >= shape_.meta_start &&
                          e.ptr < shape_.meta_start + shape_.meta_count);
  };
  uint32_t nvol = r.U32();
  for (uint32_t i = 0; i < nvol && r.ok(); ++i) {
    VolumeRec v;
    v.name = r.Str();
    r.Bytes(v.guid);
    v.create_time_ns = static_cast<int64_t>(r.U64());
    v.size_bytes = r.U64();
    v.root = GetEntry(r);
    uint32_t nsnap = r.U32();
    if (!r.ok() || nsnap > bytes.size()) return bad("volume record");
    if (v.size_bytes > kMaxVolumeBytes || !root_ok(v.root)) {
      return bad(absl::StrCat("volume ", v.name, " size or root"));
    }
    for (uint32_t j = 0; j < nsnap && r.ok(); ++j) {
      SnapshotRec s;
      s.name = r.Str();
      r.Bytes(s.guid);
      s.create_time_ns = static_cast<int64_t>(r.U64());
      s.generation = r.U64();
      s.size_bytes = r.U64();
      s.root = GetEntry(r);
      if (version >= 3) s.owner = r.Str();
      if (s.size_bytes > kMaxVolumeBytes || !root_ok(s.root) ||
          s.owner.size() > kMaxSnapshotOwnerBytes) {
        return bad(absl::StrCat("snapshot ", v.name, "@", s.name));
      }
      v.snapshots.push_back(std::move(s));
    }
    if (version >= 2) {
      uint32_t flags = r.U32();
      if (flags & ~kVolumeReadOnly) return bad("volume flags");
      v.read_only = (flags & kVolumeReadOnly) != 0;
    }
    if (!r.ok()) return bad("truncated");
    std::string name = v.name;
    volumes_.emplace(std::move(name), std::move(v));
  }
  if (version >= 2) {
    uint32_t nprop = r.U32();
    if (!r.ok() || nprop > bytes.size()) return bad("property count");
    for (uint32_t i = 0; i < nprop && r.ok(); ++i) {
      std::string key = r.Str();
      properties_[std::move(key)] = r.Str();
    }
  }
  if (!r.ok() || !r.done()) return bad("length");
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------
// Reference counts and allocation

void Pool::SetCount(uint64_t index, uint32_t count) {
  uint32_t old = counts_[index];
  counts_[index] = count;
  bool is_node = index < sb_.meta_count;
  if (old == 0 && count != 0) ++(is_node ? used_nodes_ : used_chunks_);
  if (old != 0 && count == 0) --(is_node ? used_nodes_ : used_chunks_);
  dirty_pages_.insert(index / kCountsPerPage);
}

void Pool::Hold(uint64_t index) {
  held_[index] = true;
  held_list_.push_back(index);
}

absl::StatusOr<uint64_t> Pool::AllocNode() {
  if (free_nodes_ == 0) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "pool ", io_.name(), " has no free metadata space (", sb_.meta_count,
        " nodes in use); delete snapshots or volumes"));
  }
  for (uint64_t n = 0; n < sb_.meta_count; ++n) {
    uint64_t i = (node_cursor_ + n) % sb_.meta_count;
    if (counts_[i] == 0 && !held_[i]) {
      node_cursor_ = i + 1;
      SetCount(i, 1);
      --free_nodes_;
      return sb_.meta_start + i;
    }
  }
  return absl::InternalError("free node count is wrong");
}

absl::StatusOr<uint64_t> Pool::AllocChunk() {
  if (free_chunks_ == 0) {
    return absl::ResourceExhaustedError(
        absl::StrCat("pool ", io_.name(), " is full"));
  }
  for (uint64_t n = 0; n < sb_.data_count; ++n) {
    uint64_t c = (chunk_cursor_ + n) % sb_.data_count;
    uint64_t i = sb_.meta_count + c;
    if (counts_[i] == 0 && !held_[i]) {
      chunk_cursor_ = c + 1;
      SetCount(i, 1);
      --free_chunks_;
      return sb_.data_start + c;
    }
  }
  return absl::InternalError("free chunk count is wrong");
}

absl::Status Pool::EnsureSpace(uint64_t chunks, uint64_t nodes) {
  // The catalog is rewritten at every commit: keep room for it.
  // (A transaction adds at most a few records to it; 4 KiB of slack.)
  nodes += DivRoundUp(sb_.catalog_bytes + 4096, kCatalogPayload) + 1;
  if ((free_chunks_ < chunks || free_nodes_ < nodes) && !held_list_.empty()) {
    // Space freed by the open transaction becomes usable once it commits.
    if (absl::Status s = CommitLocked(); !s.ok()) return s;
  }
  if (free_chunks_ < chunks) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "pool ", io_.name(), " is out of space: need ", chunks, " chunks, ",
        free_chunks_, " free; delete snapshots or volumes"));
  }
  if (free_nodes_ < nodes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "pool ", io_.name(), " is out of metadata space: need ", nodes,
        " nodes, ", free_nodes_, " free; delete snapshots or volumes"));
  }
  return absl::OkStatus();
}

void Pool::IncRef(uint64_t ptr, int level) {
  if (level == 0) {
    if (IsDataPtr(ptr)) {
      uint64_t i = ChunkIndex(ptr);
      SetCount(i, counts_[i] + 1);
    }
  } else if (ptr != 0) {
    uint64_t i = NodeIndex(ptr);
    SetCount(i, counts_[i] + 1);
  }
}

absl::Status Pool::DecRef(uint64_t ptr, int level) {
  if (level == 0) {
    if (!IsDataPtr(ptr)) return absl::OkStatus();
    uint64_t i = ChunkIndex(ptr);
    if (counts_[i] == 0) {
      return absl::DataLossError(
          absl::StrCat("data chunk ", ptr, " freed twice (refcount 0)"));
    }
    SetCount(i, counts_[i] - 1);
    if (counts_[i] == 0) Hold(i);
    return absl::OkStatus();
  }
  if (ptr == 0) return absl::OkStatus();
  return DecRefNode(ptr, level - 1);
}

absl::Status Pool::DecRefNode(uint64_t id, int level) {
  uint64_t i = NodeIndex(id);
  if (counts_[i] == 0) {
    return absl::DataLossError(
        absl::StrCat("metadata node ", id, " freed twice (refcount 0)"));
  }
  if (counts_[i] > 1) {
    SetCount(i, counts_[i] - 1);
    return absl::OkStatus();
  }
  absl::StatusOr<Node*> node = Load(id, level);
  if (!node.ok()) return node.status();
  for (const Entry& e : (*node)->e) {
    if (absl::Status s = DecRef(e.ptr, level); !s.ok()) return s;
  }
  if ((*node)->dirty) --dirty_nodes_;
  cache_.erase(id);
  SetCount(i, 0);
  Hold(i);
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------
// Tree access

absl::StatusOr<std::unique_ptr<Pool::Node>> Pool::DecodeNode(
    uint64_t id, int level, std::span<const std::byte, kNodeSize> raw) {
  absl::StatusOr<NodeHeader> h = OpenNode(raw, id);
  if (!h.ok()) return h.status();
  if (h->kind != NodeKind::kTree || h->level != level) {
    return absl::DataLossError(absl::StrCat(
        "metadata node ", id, ": expected a tree node at level ", level));
  }
  auto node = std::make_unique<Node>();
  node->id = id;
  node->birth = h->birth;
  node->level = level;
  DecodeEntries(raw, node->e);
  for (const Entry& e : node->e) {
    bool ok =
        level == 0
            ? (!IsDataPtr(e.ptr) || (e.ptr >= sb_.data_start &&
                                     e.ptr < sb_.data_start + sb_.data_count))
            : (e.ptr == 0 || (e.ptr >= sb_.meta_start &&
                              e.ptr < sb_.meta_start + sb_.meta_count));
    if (!ok) {
      return absl::DataLossError(absl::StrCat(
          "metadata node ", id, ": pointer ", e.ptr, " out of range"));
    }
  }
  ++stats_.nodes_loaded;
  return node;
}

absl::StatusOr<Pool::Node*> Pool::Load(uint64_t id, int level) {
  if (auto it = cache_.find(id); it != cache_.end()) {
    if (it->second->level != level) {
      return absl::DataLossError(absl::StrCat("metadata node ", id,
                                              " is level ", it->second->level,
                                              ", expected ", level));
    }
    return it->second.get();
  }
  if (id < sb_.meta_start || id >= sb_.meta_start + sb_.meta_count) {
    return absl::DataLossError(
        absl::StrCat("metadata node id ", id, " out of range"));
  }
  AlignedBuffer buf(kNodeSize);
  if (absl::Status s = io_.ReadAt(id * kNodeSize, buf.span()); !s.ok()) {
    return s;
  }
  absl::StatusOr<std::unique_ptr<Node>> node = DecodeNode(
      id, level, std::span<const std::byte, kNodeSize>(buf.data(), kNodeSize));
  if (!node.ok()) return node.status();
  Node* out = node->get();
  cache_.emplace(id, std::move(*node));
  return out;
}

absl::Status Pool::Prefetch(std::vector<uint64_t>& ids, int level) {
  std::sort(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  size_t kept = 0;
  for (uint64_t id : ids) {
    if (id >= sb_.meta_start && id < sb_.meta_start + sb_.meta_count &&
        !cache_.contains(id)) {
      ids[kept++] = id;
    }
  }
  ids.resize(kept);
  if (ids.empty()) return absl::OkStatus();
  AlignedBuffer buf(ids.size() * kNodeSize);
  std::vector<ReadOp> ops;
  for (size_t i = 0; i < ids.size(); ++i) {
    ops.push_back(
        {ids[i] * kNodeSize, {buf.data() + i * kNodeSize, kNodeSize}});
  }
  if (absl::Status s = io_.Read(ops); !s.ok()) return s;
  for (size_t i = 0; i < ids.size(); ++i) {
    absl::StatusOr<std::unique_ptr<Node>> node =
        DecodeNode(ids[i], level,
                   std::span<const std::byte, kNodeSize>(
                       buf.data() + i * kNodeSize, kNodeSize));
    // A bad node is left for Load to report when (if) it is really needed.
    if (node.ok()) cache_.emplace(ids[i], std::move(*node));
  }
  return absl::OkStatus();
}

void Pool::TrimCache() {
  if (cache_.size() <= tuning_.max_cached_nodes) return;
  for (auto it = cache_.begin(); it != cache_.end();) {
    if (!it->second->dirty) {
      it = cache_.erase(it);
    } else {
      ++it;
    }
  }
}

absl::StatusOr<Pool::Node*> Pool::Cow(Entry& ref, int level) {
  if (ref.ptr == 0) {
    // Materialize an empty subtree. Its entries inherit the birth of the
    // empty pointer, so a later diff still sees when the range was emptied.
    absl::StatusOr<uint64_t> id = AllocNode();
    if (!id.ok()) return id.status();
    auto node = std::make_unique<Node>();
    node->id = *id;
    node->birth = gen_;
    node->level = level;
    node->dirty = node->stale = true;
    for (Entry& e : node->e) e = {0, ref.birth, NullEntryDigest(level)};
    ++dirty_nodes_;
    ref.ptr = *id;
    ref.birth = gen_;
    Node* out = node.get();
    cache_.emplace(*id, std::move(node));
    return out;
  }
  absl::StatusOr<Node*> old = Load(ref.ptr, level);
  if (!old.ok()) return old.status();
  if ((*old)->dirty && counts_[NodeIndex(ref.ptr)] == 1) {
    (*old)->stale = true;
    ref.birth = gen_;
    return *old;
  }
  absl::StatusOr<uint64_t> id = AllocNode();
  if (!id.ok()) return id.status();
  auto node = std::make_unique<Node>(**old);
  node->id = *id;
  node->birth = gen_;
  node->dirty = node->stale = true;
  for (const Entry& e : node->e) IncRef(e.ptr, level);
  ++dirty_nodes_;
  uint64_t old_id = ref.ptr;
  ref.ptr = *id;
  ref.birth = gen_;
  Node* out = node.get();
  cache_.emplace(*id, std::move(node));
  if (absl::Status s = DecRefNode(old_id, level); !s.ok()) return s;
  return out;
}

absl::StatusOr<Entry*> Pool::LeafEntryForWrite(VolumeRec& v, uint64_t chunk) {
  Entry* ref = &v.root;
  for (int level = Depth(ChunkCount(v.size_bytes)) - 1;; --level) {
    absl::StatusOr<Node*> n = Cow(*ref, level);
    if (!n.ok()) return n.status();
    ref = &(*n)->e[(chunk / Span(level)) % kFanout];
    if (level == 0) return ref;
  }
}

absl::StatusOr<Entry> Pool::LookupChunk(const Entry& root, int depth,
                                        uint64_t chunk) {
  Entry e = root;
  for (int level = depth - 1; level >= 0; --level) {
    if (e.ptr == 0) return Entry{kPhysUnmapped, e.birth, NullEntryDigest(0)};
    absl::StatusOr<Node*> n = Load(e.ptr, level);
    if (!n.ok()) return n.status();
    e = (*n)->e[(chunk / Span(level)) % kFanout];
  }
  return e;
}

// ---------------------------------------------------------------------------
// Public API

absl::Status Pool::CheckWritable() const {
  if (!failed_.ok()) return failed_;
  if (mode_ != OpenMode::kReadWrite) {
    return absl::FailedPreconditionError(
        absl::StrCat("pool ", io_.name(), " is open read-only"));
  }
  return absl::OkStatus();
}

absl::Status Pool::Fail(absl::Status s) {
  bool pool_full = absl::IsResourceExhausted(s) &&
                   !s.GetPayload(kDeviceErrorPayload).has_value();
  if (!s.ok() && failed_.ok() && !pool_full) {
    failed_ = absl::Status(
        s.code(), absl::StrCat(s.message(),
                               " (pool handle stopped; reopen the pool to "
                               "continue from its last commit)"));
  }
  return s;
}

absl::StatusOr<Pool::VolumeRec*> Pool::FindVolume(absl::string_view name) {
  auto it = volumes_.find(name);
  if (it == volumes_.end()) {
    return absl::NotFoundError(
        absl::StrCat("no volume '", name, "' in pool ", io_.name()));
  }
  return &it->second;
}

absl::StatusOr<Pool::VolumeRec*> Pool::FindWritableVolume(
    absl::string_view name) {
  absl::StatusOr<VolumeRec*> v = FindVolume(name);
  if (v.ok() && (*v)->read_only) {
    return absl::FailedPreconditionError(absl::StrCat(
        "volume '", name, "' in pool ", io_.name(),
        " is read-only (a replication destination while Mirrored); break "
        "the relationship to write to it"));
  }
  return v;
}

absl::StatusOr<const Pool::SnapshotRec*> Pool::FindSnapshot(
    const VolumeRec& v, absl::string_view name) {
  for (const SnapshotRec& s : v.snapshots) {
    if (s.name == name) return &s;
  }
  return absl::NotFoundError(absl::StrCat("no snapshot '", v.name, "@", name,
                                          "' in pool ", io_.name()));
}

PoolInfo Pool::Info() {
  MutexLock lock(mu_);
  PoolInfo info;
  info.device = io_.name();
  info.io = DescribeFileIo(device_);
  info.pool_guid = sb_.pool_guid;
  info.chunk_size_bytes = sb_.chunk_size;
  info.capacity_bytes = sb_.data_count * sb_.chunk_size;
  info.used_bytes = used_chunks_ * sb_.chunk_size;
  info.free_bytes = info.capacity_bytes - info.used_bytes;
  info.metadata_capacity_bytes = sb_.meta_count * kNodeSize;
  info.metadata_used_bytes = used_nodes_ * kNodeSize;
  info.generation = sb_.generation;
  info.volume_count = volumes_.size();
  for (const auto& [name, v] : volumes_) {
    info.snapshot_count += v.snapshots.size();
  }
  return info;
}

void Pool::SetTuning(const PoolTuning& tuning) {
  MutexLock lock(mu_);
  tuning_ = tuning;
}

Pool::Stats Pool::stats() {
  MutexLock lock(mu_);
  Stats s = stats_;
  s.cached_nodes = cache_.size();
  return s;
}

absl::Status Pool::CreateVolume(absl::string_view name, uint64_t size_bytes) {
  MutexLock lock(mu_);
  if (absl::Status s = CheckWritable(); !s.ok()) return s;
  if (absl::Status s = ValidName(name, "volume"); !s.ok()) return s;
  if (volumes_.contains(name)) {
    return absl::AlreadyExistsError(absl::StrCat(
        "volume '", name, "' already exists in pool ", io_.name()));
  }
  if (size_bytes == 0 || size_bytes > kMaxVolumeBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("bad size ", size_bytes, " for volume '", name,
                     "': must be from 1 byte to 1 EiB"));
  }
  if (absl::Status s = EnsureSpace(0, 1); !s.ok()) return s;
  VolumeRec v;
  v.name = std::string(name);
  v.guid = RandomGuid();
  v.create_time_ns = NowNs();
  v.size_bytes = size_bytes;
  v.root = {0, gen_, {}};
  volumes_.emplace(v.name, std::move(v));
  changed_ = true;
  return Fail(CommitLocked());
}

absl::StatusOr<std::vector<VolumeInfo>> Pool::ListVolumes() {
  MutexLock lock(mu_);
  std::vector<VolumeInfo> out;
  for (const auto& [name, v] : volumes_) {
    if (IsStaging(name)) continue;
    out.push_back({v.name, v.guid, v.create_time_ns, v.size_bytes,
                   v.snapshots.size(), v.read_only});
  }
  return out;
}

absl::StatusOr<VolumeInfo> Pool::GetVolume(absl::string_view name) {
  MutexLock lock(mu_);
  absl::StatusOr<VolumeRec*> v = FindVolume(name);
  if (!v.ok()) return v.status();
  return VolumeInfo{(*v)->name,
                    (*v)->guid,
                    (*v)->create_time_ns,
                    (*v)->size_bytes,
                    (*v)->snapshots.size(),
                    (*v)->read_only};
}

absl::Status Pool::SetVolumeReadOnly(absl::string_view name, bool read_only) {
  MutexLock lock(mu_);
  if (absl::Status s = CheckWritable(); !s.ok()) return s;
  absl::StatusOr<VolumeRec*> v = FindVolume(name);
  if (!v.ok()) return v.status();
  if ((*v)->read_only == read_only) return absl::OkStatus();
  if (absl::Status s = EnsureSpace(0, 0); !s.ok()) return s;
  (*v)->read_only = read_only;
  changed_ = true;
  return Fail(CommitUnlessGrouped());
}

absl::Status Pool::SetProperty(absl::string_view key, absl::string_view value) {
  MutexLock lock(mu_);
  if (absl::Status s = CheckWritable(); !s.ok()) return s;
  if (key.empty() || key.size() > kMaxPropertyKeyBytes ||
      value.size() > kMaxPropertyValueBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("pool property '", key.substr(0, 40),
                     "': the key must be 1-", kMaxPropertyKeyBytes,
                     " bytes and the value at most ", kMaxPropertyValueBytes));
  }
  auto it = properties_.find(key);
  if (value.empty() ? it == properties_.end()
                    : it != properties_.end() && it->second == value) {
    return absl::OkStatus();
  }
  // Before the change: EnsureSpace may commit, and a refused call must
  // commit nothing of its own.
  if (absl::Status s = EnsureSpace(0, 0); !s.ok()) return s;
  if (value.empty()) {
    properties_.erase(it);
  } else {
    properties_[std::string(key)] = std::string(value);
  }
  changed_ = true;
  return Fail(CommitUnlessGrouped());
}

std::map<std::string, std::string> Pool::Properties() {
  MutexLock lock(mu_);
  return {properties_.begin(), properties_.end()};
}

absl::Status Pool::ResizeVolume(absl::string_view name, uint64_t size_bytes) {
  MutexLock lock(mu_);
  if (absl::Status s = CheckWritable(); !s.ok()) return s;
  absl::StatusOr<VolumeRec*> v = FindWritableVolume(name);
  if (!v.ok()) return v.status();
  if (size_bytes == 0 || size_bytes > kMaxVolumeBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("bad size ", size_bytes, " for volume '", name,
                     "': must be from 1 byte to 1 EiB"));
  }
  if (absl::Status s = ResizeLocked(**v, size_bytes); !s.ok()) return Fail(s);
  // A receive's staging volume reaches the disk with its data (automatic
  // commits) or with FinishReceive, like its writes: a refused receive then
  // leaves nothing to undo.
  if (IsStaging(name)) return Fail(MaybeCommit());
  return Fail(CommitLocked());
}

absl::Status Pool::ResizeLocked(VolumeRec& v, uint64_t size_bytes) {
  uint64_t old_size = v.size_bytes;
  if (size_bytes == old_size) return absl::OkStatus();
  int depth = Depth(ChunkCount(old_size));
  int new_depth = Depth(ChunkCount(size_bytes));
  if (absl::Status s = EnsureSpace(1, kMaxDepth * 2 + 2); !s.ok()) return s;
  if (size_bytes < old_size) {
    // Everything past the new end must read as zeros should the volume grow
    // again (and the digest stays canonical): trim it first.
    if (absl::Status s = TrimLocked(v, size_bytes, old_size - size_bytes);
        !s.ok()) {
      return s;
    }
    for (; depth > new_depth; --depth) {
      if (v.root.ptr == 0) continue;
      absl::StatusOr<Node*> root = Load(v.root.ptr, depth - 1);
      if (!root.ok()) return root.status();
      Entry child = (*root)->e[0];
      IncRef(child.ptr, depth - 1);
      if (absl::Status s = DecRefNode(v.root.ptr, depth - 1); !s.ok()) return s;
      v.root = child;
    }
  } else {
    for (; depth < new_depth; ++depth) {
      if (v.root.ptr == 0) continue;
      absl::StatusOr<uint64_t> id = AllocNode();
      if (!id.ok()) return id.status();
      auto node = std::make_unique<Node>();
      node->id = *id;
      node->birth = gen_;
      node->level = depth;
      node->dirty = node->stale = true;
      node->e[0] = v.root;
      for (int i = 1; i < kFanout; ++i) {
        node->e[i] = {0, gen_, NullEntryDigest(depth)};
      }
      ++dirty_nodes_;
      cache_.emplace(*id, std::move(node));
      v.root = {*id, gen_, {}};
    }
  }
  v.size_bytes = size_bytes;
  changed_ = true;
  return absl::OkStatus();
}

absl::Status Pool::DeleteVolume(absl::string_view name, bool with_snapshots) {
  MutexLock lock(mu_);
  if (absl::Status s = CheckWritable(); !s.ok()) return s;
  absl::StatusOr<VolumeRec*> v = FindWritableVolume(name);
  if (!v.ok()) return v.status();
  if (!(*v)->snapshots.empty() && !with_snapshots) {
    std::vector<std::string> names;
    for (const SnapshotRec& s : (*v)->snapshots) names.push_back(s.name);
    return absl::FailedPreconditionError(
        absl::StrCat("volume '", name, "' has ", names.size(), " snapshot(s) (",
                     absl::StrJoin(names, ", "),
                     "): delete them first or delete recursively"));
  }
  for (const SnapshotRec& s : (*v)->snapshots) {
    if (absl::Status st = DecRef(s.root.ptr, Depth(ChunkCount(s.size_bytes)));
        !st.ok()) {
      return Fail(st);
    }
  }
  if (absl::Status st =
          DecRef((*v)->root.ptr, Depth(ChunkCount((*v)->size_bytes)));
      !st.ok()) {
    return Fail(st);
  }
  volumes_.erase(volumes_.find(name));
  changed_ = true;
  return Fail(CommitLocked());
}

absl::Status Pool::Write(absl::string_view volume, uint64_t offset_bytes,
                         std::span<const std::byte> data) {
  MutexLock lock(mu_);
  if (absl::Status s = CheckWritable(); !s.ok()) return s;
  absl::StatusOr<VolumeRec*> v = FindWritableVolume(volume);
  if (!v.ok()) return v.status();
  if (offset_bytes > (*v)->size_bytes ||
      data.size() > (*v)->size_bytes - offset_bytes) {
    return absl::OutOfRangeError(
        absl::StrCat("write of ", data.size(), " bytes at offset ",
                     offset_bytes, " is past the end of volume '", volume,
                     "' (", (*v)->size_bytes, " bytes)"));
  }
  absl::Status s = WriteLocked(**v, offset_bytes, data);
  if (s.ok()) s = MaybeCommit();
  TrimCache();
  return Fail(s);
}

// Points chunk `c` of `v` at the content `src` (one whole chunk): a zero
// entry for zeros, else the chunk itself if this transaction wrote it and
// nobody shares it, else a newly allocated one; appends the device write to
// `ops`, merged with the previous one when adjacent on disk and in memory.
absl::Status Pool::PlaceChunk(VolumeRec& v, uint64_t c,
                              std::span<const std::byte> src,
                              std::vector<WriteOp>& ops) {
  const uint64_t c_size = sb_.chunk_size;
  bool zero = IsAllZero(src);
  Digest digest = zero ? NullEntryDigest(0) : Hash128(src);
  absl::StatusOr<Entry*> e = LeafEntryForWrite(v, c);
  if (!e.ok()) return e.status();
  Entry& entry = **e;
  if (zero) {
    if (absl::Status s = DecRef(entry.ptr, 0); !s.ok()) return s;
    entry.ptr = kPhysZero;
  } else {
    bool in_place = IsDataPtr(entry.ptr) && entry.birth == gen_ &&
                    counts_[ChunkIndex(entry.ptr)] == 1;
    if (!in_place) {
      absl::StatusOr<uint64_t> phys = AllocChunk();
      if (!phys.ok()) return phys.status();
      if (absl::Status s = DecRef(entry.ptr, 0); !s.ok()) return s;
      entry.ptr = *phys;
    }
    if (!ops.empty() &&
        ops.back().offset_bytes + ops.back().data.size() ==
            entry.ptr * c_size &&
        ops.back().data.data() + ops.back().data.size() == src.data()) {
      ops.back().data = {ops.back().data.data(),
                         ops.back().data.size() + c_size};
    } else {
      ops.push_back({entry.ptr * c_size, src});
    }
    stats_.data_bytes_written += c_size;
  }
  entry.birth = gen_;
  entry.digest = digest;
  changed_ = true;
  return absl::OkStatus();
}

absl::Status Pool::WriteChunks(absl::string_view volume,
                               std::span<const ChunkWrite> writes) {
  MutexLock lock(mu_);
  if (absl::Status s = CheckWritable(); !s.ok()) return s;
  absl::StatusOr<VolumeRec*> found = FindWritableVolume(volume);
  if (!found.ok()) return found.status();
  VolumeRec& v = **found;
  const uint64_t c_size = sb_.chunk_size;
  const uint64_t chunks = ChunkCount(v.size_bytes);
  for (const ChunkWrite& w : writes) {
    if (w.chunk >= chunks) {
      return absl::OutOfRangeError(
          absl::StrCat("chunk ", w.chunk, " is past the end of volume '",
                       volume, "' (", chunks, " chunks)"));
    }
    if (w.data.size() != c_size ||
        reinterpret_cast<uintptr_t>(w.data.data()) % kIoAlign != 0) {
      return absl::InvalidArgumentError(
          "WriteChunks takes whole, aligned chunks");
    }
    // The volume's bytes past its end must stay zero.
    uint64_t tail = (w.chunk + 1) * c_size;
    if (tail > v.size_bytes &&
        !IsAllZero(w.data.subspan(c_size - (tail - v.size_bytes)))) {
      return absl::InvalidArgumentError(
          absl::StrCat("chunk ", w.chunk, " has data past the end of volume '",
                       volume, "'"));
    }
  }
  const int depth = Depth(chunks);
  if (absl::Status s =
          EnsureSpace(writes.size(), depth * (writes.size() / kFanout + 2));
      !s.ok()) {
    return s;
  }
  // Read every node on the way to these chunks, one batch per level.
  std::vector<uint64_t> level_ids;
  if (v.root.ptr != 0) level_ids.push_back(v.root.ptr);
  for (int level = depth - 1; level >= 0 && !level_ids.empty(); --level) {
    if (absl::Status s = Prefetch(level_ids, level); !s.ok()) return Fail(s);
    if (level == 0) break;
    std::vector<uint64_t> next;
    for (const ChunkWrite& w : writes) {
      // Walk down to `level` through cached nodes only.
      Entry e = v.root;
      for (int l = depth - 1; l >= level && e.ptr != 0; --l) {
        auto it = cache_.find(e.ptr);
        if (it == cache_.end()) {
          e.ptr = 0;
          break;
        }
        e = it->second->e[(w.chunk / Span(l)) % kFanout];
      }
      if (e.ptr != 0) next.push_back(e.ptr);
    }
    level_ids = std::move(next);
  }
  std::vector<WriteOp> ops;
  for (const ChunkWrite& w : writes) {
    if (absl::Status s = PlaceChunk(v, w.chunk, w.data, ops); !s.ok()) {
      return Fail(s);
    }
  }
  absl::Status s = io_.Write(ops);
  if (s.ok()) s = MaybeCommit();
  TrimCache();
  return Fail(s);
}

absl::Status Pool::WriteLocked(VolumeRec& v, uint64_t offset_bytes,
                               std::span<const std::byte> data) {
  const uint64_t c_size = sb_.chunk_size;
  const int depth = Depth(ChunkCount(v.size_bytes));
  const uint64_t size_bytes = v.size_bytes;
  const uint64_t end = offset_bytes + data.size();
  AlignedBuffer& buf = write_scratch_;
  std::vector<WriteOp> ops;
  for (uint64_t pos = offset_bytes; pos < end;) {
    uint64_t first = pos / c_size;
    uint64_t last = std::min((end - 1) / c_size, first + BatchChunks() - 1);
    uint64_t n = last - first + 1;
    uint64_t batch_end = std::min(end, (last + 1) * c_size);
    if (absl::Status s = EnsureSpace(n, depth * (n / kFanout + 2)); !s.ok()) {
      return s;
    }
    if (buf.size() < n * c_size) buf = AlignedBuffer(n * c_size);
    ops.clear();
    for (uint64_t c = first; c <= last; ++c) {
      const uint64_t cb = c * c_size;
      const uint64_t ce = std::min(cb + c_size, size_bytes);  // volume end
      std::span<const std::byte> src;
      const std::byte* user = data.data() + (std::max(cb, pos) - offset_bytes);
      if (pos <= cb && cb + c_size <= batch_end &&
          reinterpret_cast<uintptr_t>(user) % kIoAlign == 0) {
        // The caller's buffer covers the chunk and is aligned: write it as
        // it is, without a copy.
        src = {user, c_size};
      } else {
        std::span<std::byte> slot(buf.data() + (c - first) * c_size, c_size);
        if (pos > cb || batch_end < ce) {
          // Partial chunk: read-modify-write. Bytes past the volume end
          // stay zero.
          std::memset(slot.data(), 0, c_size);
          if (absl::Status s = ReadLocked(v.root, size_bytes, v.name, cb,
                                          slot.first(ce - cb));
              !s.ok()) {
            return s;
          }
        } else if (ce < cb + c_size) {
          std::memset(slot.data() + (ce - cb), 0, cb + c_size - ce);
        }
        uint64_t from = std::max(cb, pos);
        uint64_t to = std::min(cb + c_size, batch_end);
        std::memcpy(slot.data() + (from - cb), user, to - from);
        src = slot;
      }
      if (absl::Status s = PlaceChunk(v, c, src, ops); !s.ok()) return s;
    }
    changed_ = true;
    if (absl::Status s = io_.Write(ops); !s.ok()) return s;
    pos = batch_end;
  }
  return absl::OkStatus();
}

absl::Status Pool::Read(absl::string_view volume, absl::string_view snapshot,
                        uint64_t offset_bytes, std::span<std::byte> out) {
  MutexLock lock(mu_);
  if (!failed_.ok()) return failed_;
  absl::StatusOr<VolumeRec*> v = FindVolume(volume);
  if (!v.ok()) return v.status();
  Entry root = (*v)->root;
  uint64_t size = (*v)->size_bytes;
  std::string what = (*v)->name;
  if (!snapshot.empty()) {
    absl::StatusOr<const SnapshotRec*> s = FindSnapshot(**v, snapshot);
    if (!s.ok()) return s.status();
    root = (*s)->root;
    size = (*s)->size_bytes;
    what = absl::StrCat(what, "@", snapshot);
  }
  if (offset_bytes > size || out.size() > size - offset_bytes) {
    return absl::OutOfRangeError(
        absl::StrCat("read of ", out.size(), " bytes at offset ", offset_bytes,
                     " is past the end of '", what, "' (", size, " bytes)"));
  }
  absl::Status s = ReadLocked(root, size, what, offset_bytes, out);
  TrimCache();
  return s;
}

absl::Status Pool::ReadLocked(const Entry& root, uint64_t size_bytes,
                              absl::string_view what, uint64_t offset_bytes,
                              std::span<std::byte> out) {
  const uint64_t c_size = sb_.chunk_size;
  const int depth = Depth(ChunkCount(size_bytes));
  const uint64_t end = offset_bytes + out.size();
  AlignedBuffer& buf = read_scratch_;
  std::vector<ReadOp> ops;
  struct Mapped {
    uint64_t chunk;
    Entry entry;
    std::byte* dst;
  };
  std::vector<Mapped> mapped;
  for (uint64_t pos = offset_bytes; pos < end;) {
    uint64_t first = pos / c_size;
    uint64_t last = std::min((end - 1) / c_size, first + BatchChunks() - 1);
    uint64_t n = last - first + 1;
    uint64_t batch_end = std::min(end, (last + 1) * c_size);
    if (buf.size() < n * c_size) buf = AlignedBuffer(n * c_size);
    ops.clear();
    mapped.clear();
    uint64_t prev_phys = 0;
    for (uint64_t c = first; c <= last; ++c) {
      const uint64_t cb = c * c_size;
      std::byte* user = out.data() + (std::max(cb, pos) - offset_bytes);
      // Whole chunks land straight in an aligned caller buffer; the rest go
      // through the bounce buffer.
      bool direct = pos <= cb && cb + c_size <= batch_end &&
                    reinterpret_cast<uintptr_t>(user) % kIoAlign == 0;
      std::byte* dst = direct ? user : buf.data() + (c - first) * c_size;
      absl::StatusOr<Entry> e = LookupChunk(root, depth, c);
      if (!e.ok()) return e.status();
      if (!IsDataPtr(e->ptr)) {
        std::memset(dst, 0, c_size);
      } else {
        mapped.push_back({c, *e, dst});
        if (!ops.empty() && e->ptr == prev_phys + 1 &&
            ops.back().out.data() + ops.back().out.size() == dst) {
          ops.back().out = {ops.back().out.data(),
                            ops.back().out.size() + c_size};
        } else {
          ops.push_back({e->ptr * c_size, {dst, c_size}});
        }
        prev_phys = e->ptr;
      }
    }
    if (absl::Status s = io_.Read(ops); !s.ok()) return s;
    for (const Mapped& m : mapped) {
      if (Hash128({m.dst, c_size}) != m.entry.digest) {
        return absl::DataLossError(
            absl::StrCat("'", what, "' chunk ", m.chunk, " (pool chunk ",
                         m.entry.ptr, "): data does not match its digest"));
      }
    }
    for (uint64_t c = first; c <= last; ++c) {
      const uint64_t cb = c * c_size;
      uint64_t from = std::max(cb, pos);
      uint64_t to = std::min(cb + c_size, batch_end);
      std::byte* user = out.data() + (from - offset_bytes);
      const std::byte* slot = buf.data() + (c - first) * c_size + (from - cb);
      bool direct = from == cb && to == cb + c_size &&
                    reinterpret_cast<uintptr_t>(user) % kIoAlign == 0;
      if (!direct) std::memcpy(user, slot, to - from);
    }
    pos = batch_end;
  }
  return absl::OkStatus();
}

absl::Status Pool::Trim(absl::string_view volume, uint64_t offset_bytes,
                        uint64_t length_bytes) {
  MutexLock lock(mu_);
  if (absl::Status s = CheckWritable(); !s.ok()) return s;
  absl::StatusOr<VolumeRec*> v = FindWritableVolume(volume);
  if (!v.ok()) return v.status();
  if (offset_bytes > (*v)->size_bytes ||
      length_bytes > (*v)->size_bytes - offset_bytes) {
    return absl::OutOfRangeError(
        absl::StrCat("trim of ", length_bytes, " bytes at offset ",
                     offset_bytes, " is past the end of volume '", volume,
                     "' (", (*v)->size_bytes, " bytes)"));
  }
  absl::Status s = TrimLocked(**v, offset_bytes, length_bytes);
  if (s.ok()) s = MaybeCommit();
  TrimCache();
  return Fail(s);
}

absl::Status Pool::TrimLocked(VolumeRec& v, uint64_t offset_bytes,
                              uint64_t length_bytes) {
  if (length_bytes == 0) return absl::OkStatus();
  const uint64_t c_size = sb_.chunk_size;
  uint64_t end = offset_bytes + length_bytes;
  uint64_t first_full = DivRoundUp(offset_bytes, c_size);
  // A range reaching the volume end covers its last partial chunk whole.
  uint64_t end_full =
      end == v.size_bytes ? ChunkCount(v.size_bytes) : end / c_size;
  if (first_full >= end_full) {
    AlignedBuffer zeros(length_bytes);
    return WriteLocked(v, offset_bytes, zeros.span());
  }
  if (offset_bytes < first_full * c_size) {
    AlignedBuffer zeros(first_full * c_size - offset_bytes);
    if (absl::Status s = WriteLocked(v, offset_bytes, zeros.span()); !s.ok()) {
      return s;
    }
  }
  if (end_full * c_size < end && end != v.size_bytes) {
    AlignedBuffer zeros(end - end_full * c_size);
    if (absl::Status s = WriteLocked(v, end_full * c_size, zeros.span());
        !s.ok()) {
      return s;
    }
  }
  int depth = Depth(ChunkCount(v.size_bytes));
  if (absl::Status s = EnsureSpace(0, 2 * depth + 2); !s.ok()) return s;
  changed_ = true;
  return TrimChunks(v.root, depth - 1, 0, first_full, end_full);
}

absl::Status Pool::TrimChunks(Entry& ref, int level, uint64_t base,
                              uint64_t first, uint64_t end) {
  if (ref.ptr == 0) return absl::OkStatus();
  absl::StatusOr<Node*> node = Cow(ref, level);
  if (!node.ok()) return node.status();
  const uint64_t span = Span(level);
  for (int i = 0; i < kFanout; ++i) {
    uint64_t cb = base + i * span;
    uint64_t ce = cb + span;
    if (ce <= first || cb >= end) continue;
    Entry& e = (*node)->e[i];
    if (first <= cb && ce <= end) {
      if (e.ptr == 0) continue;
      if (absl::Status s = DecRef(e.ptr, level); !s.ok()) return s;
      e = {0, gen_, NullEntryDigest(level)};
    } else if (absl::Status s = TrimChunks(e, level - 1, cb, first, end);
               !s.ok()) {
      return s;
    }
  }
  return absl::OkStatus();
}

absl::Status Pool::Flush() {
  MutexLock lock(mu_);
  if (absl::Status s = CheckWritable(); !s.ok()) return s;
  return Fail(CommitLocked());
}

absl::StatusOr<SnapshotInfo> Pool::CreateSnapshot(absl::string_view volume,
                                                  absl::string_view name,
                                                  absl::string_view owner) {
  MutexLock lock(mu_);
  if (absl::Status s = CheckWritable(); !s.ok()) return s;
  if (absl::Status s = ValidName(name, "snapshot"); !s.ok()) return s;
  if (owner.size() > kMaxSnapshotOwnerBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("snapshot owner is ", owner.size(), " bytes; at most ",
                     kMaxSnapshotOwnerBytes));
  }
  absl::StatusOr<VolumeRec*> v = FindWritableVolume(volume);
  if (!v.ok()) return v.status();
  if (FindSnapshot(**v, name).ok()) {
    return absl::AlreadyExistsError(
        absl::StrCat("snapshot '", volume, "@", name, "' already exists"));
  }
  if (absl::Status s = EnsureSpace(0, 1); !s.ok()) return s;
  int depth = Depth(ChunkCount((*v)->size_bytes));
  if (absl::Status s = UpdateDigests((*v)->root, depth - 1); !s.ok()) {
    return Fail(s);
  }
  SnapshotRec rec;
  rec.name = std::string(name);
  rec.guid = RandomGuid();
  rec.create_time_ns = NowNs();
  rec.generation = gen_;
  rec.size_bytes = (*v)->size_bytes;
  rec.root = (*v)->root;
  rec.owner = std::string(owner);
  IncRef(rec.root.ptr, depth);
  (*v)->snapshots.push_back(rec);
  changed_ = true;
  if (absl::Status s = Fail(CommitLocked()); !s.ok()) return s;
  return InfoOf(**v, rec);
}

SnapshotInfo Pool::InfoOf(const VolumeRec& v, const SnapshotRec& s) const {
  return SnapshotInfo{v.name,
                      s.name,
                      s.guid,
                      s.create_time_ns,
                      s.size_bytes,
                      s.generation,
                      VolumeDigest(s.root, s.size_bytes),
                      s.owner};
}

absl::StatusOr<std::vector<SnapshotInfo>> Pool::ListSnapshots(
    absl::string_view volume) {
  MutexLock lock(mu_);
  absl::StatusOr<VolumeRec*> v = FindVolume(volume);
  if (!v.ok()) return v.status();
  std::vector<SnapshotInfo> out;
  for (const SnapshotRec& s : (*v)->snapshots) out.push_back(InfoOf(**v, s));
  return out;
}

absl::StatusOr<SnapshotInfo> Pool::GetSnapshot(absl::string_view volume,
                                               absl::string_view name) {
  MutexLock lock(mu_);
  absl::StatusOr<VolumeRec*> v = FindVolume(volume);
  if (!v.ok()) return v.status();
  absl::StatusOr<const SnapshotRec*> s = FindSnapshot(**v, name);
  if (!s.ok()) return s.status();
  return InfoOf(**v, **s);
}

absl::Status Pool::DeleteSnapshot(absl::string_view volume,
                                  absl::string_view name) {
  MutexLock lock(mu_);
  if (absl::Status s = CheckWritable(); !s.ok()) return s;
  absl::StatusOr<VolumeRec*> v = FindVolume(volume);
  if (!v.ok()) return v.status();
  auto& snaps = (*v)->snapshots;
  auto it = std::find_if(snaps.begin(), snaps.end(),
                         [&](const SnapshotRec& s) { return s.name == name; });
  if (it == snaps.end()) return FindSnapshot(**v, name).status();
  if (absl::Status s = EnsureSpace(0, 0); !s.ok()) return s;
  if (absl::Status s = DecRef(it->root.ptr, Depth(ChunkCount(it->size_bytes)));
      !s.ok()) {
    return Fail(s);
  }
  snaps.erase(it);
  changed_ = true;
  absl::Status s = Fail(CommitUnlessGrouped());
  TrimCache();
  return s;
}

absl::Status Pool::Rollback(absl::string_view volume,
                            absl::string_view snapshot) {
  MutexLock lock(mu_);
  if (absl::Status s = CheckWritable(); !s.ok()) return s;
  absl::StatusOr<VolumeRec*> v = FindWritableVolume(volume);
  if (!v.ok()) return v.status();
  absl::StatusOr<const SnapshotRec*> snap = FindSnapshot(**v, snapshot);
  if (!snap.ok()) return snap.status();
  if (absl::Status s = EnsureSpace(0, 0); !s.ok()) return s;
  Entry root = (*snap)->root;
  uint64_t size = (*snap)->size_bytes;
  IncRef(root.ptr, Depth(ChunkCount(size)));
  if (absl::Status s =
          DecRef((*v)->root.ptr, Depth(ChunkCount((*v)->size_bytes)));
      !s.ok()) {
    return Fail(s);
  }
  (*v)->root = root;
  (*v)->size_bytes = size;
  changed_ = true;
  return Fail(CommitLocked());
}

absl::StatusOr<Digest> Pool::RootDigest(absl::string_view volume,
                                        absl::string_view snapshot) {
  MutexLock lock(mu_);
  if (!failed_.ok()) return failed_;
  absl::StatusOr<VolumeRec*> v = FindVolume(volume);
  if (!v.ok()) return v.status();
  if (!snapshot.empty()) {
    absl::StatusOr<const SnapshotRec*> s = FindSnapshot(**v, snapshot);
    if (!s.ok()) return s.status();
    return VolumeDigest((*s)->root, (*s)->size_bytes);
  }
  if (absl::Status s =
          UpdateDigests((*v)->root, Depth(ChunkCount((*v)->size_bytes)) - 1);
      !s.ok()) {
    return Fail(s);
  }
  return VolumeDigest((*v)->root, (*v)->size_bytes);
}

// ---------------------------------------------------------------------------
// Commit

absl::Status Pool::UpdateDigests(Entry& ref, int level) {
  if (ref.ptr == 0) {
    ref.digest = EmptyDigest(level);
    return absl::OkStatus();
  }
  auto it = cache_.find(ref.ptr);
  if (it == cache_.end() || !it->second->stale) return absl::OkStatus();
  Node& node = *it->second;
  std::array<Digest, kFanout> digests;
  bool empty = true;
  for (int i = 0; i < kFanout; ++i) {
    Entry& e = node.e[i];
    if (level > 0 && e.ptr != 0) {
      if (absl::Status s = UpdateDigests(e, level - 1); !s.ok()) return s;
    }
    if (level > 0 ? e.ptr == 0 : !IsDataPtr(e.ptr)) {
      e.digest = NullEntryDigest(level);
    }
    if (e.ptr != 0) empty = false;
    digests[i] = e.digest;
  }
  if (empty && node.dirty && counts_[NodeIndex(node.id)] == 1) {
    // Nothing below: fold the node into an empty pointer, so trimmed ranges
    // cost no metadata.
    if (absl::Status s = DecRefNode(node.id, level); !s.ok()) return s;
    ref = {0, gen_, EmptyDigest(level)};
    return absl::OkStatus();
  }
  ref.digest = Hash128Digests(digests);
  node.stale = false;
  return absl::OkStatus();
}

absl::Status Pool::UpdateAllDigests() {
  for (auto& [name, v] : volumes_) {
    if (absl::Status s =
            UpdateDigests(v.root, Depth(ChunkCount(v.size_bytes)) - 1);
        !s.ok()) {
      return s;
    }
  }
  return absl::OkStatus();
}

void Pool::BeginGroup() {
  MutexLock lock(mu_);
  grouped_ = true;
}

absl::Status Pool::EndGroup() {
  MutexLock lock(mu_);
  grouped_ = false;
  if (absl::Status s = CheckWritable(); !s.ok()) return s;
  return Fail(CommitLocked());
}

absl::Status Pool::CommitUnlessGrouped() {
  return grouped_ ? absl::OkStatus() : CommitLocked();
}

absl::Status Pool::MaybeCommit() {
  if (dirty_nodes_ < tuning_.auto_commit_dirty_nodes) return absl::OkStatus();
  return CommitLocked();
}

// Commit protocol: (1) write every dirty node, the new catalog and the
// changed reference-count pages (into the table copy of this generation),
// then flush; (2) write the superblock slot of this generation, then flush.
// Until (2) is durable the previous superblock, table copy and every node it
// reaches are untouched, because space freed since then is held back until
// the commit is durable.
void Pool::ReleaseHeld() {
  std::vector<uint64_t> freed;  // indices into counts_
  for (uint64_t i : held_list_) {
    held_[i] = false;
    if (counts_[i] != 0) continue;
    if (i < sb_.meta_count) {
      ++free_nodes_;
    } else {
      ++free_chunks_;
      freed.push_back(i);
    }
  }
  held_list_.clear();
  DiscardFreeRuns(freed);
}

void Pool::DiscardFreeRuns(std::vector<uint64_t>& freed) {
  // Nothing references these chunks on disk any more: their space goes back
  // to the file system or device, but only in runs of free chunks of at
  // least kDiscardMinBytes (with their free neighbours). A lone chunk freed
  // among live ones (an update's pruned snapshot) stays: punching it costs
  // a metadata operation of the file system each and fragments the file,
  // and it is soon reused; once its neighbours are free too, the run goes.
  // Best effort: a disk that cannot, or fails to, keeps the space.
  const uint64_t run = std::max<uint64_t>(1, kDiscardMinBytes / sb_.chunk_size);
  const uint64_t first = sb_.meta_count, end = counts_.size();
  std::sort(freed.begin(), freed.end());
  std::vector<Extent> extents;
  uint64_t covered = first;  // indices below this are in `extents`
  uint64_t bytes = 0;
  for (uint64_t i : freed) {
    if (i < covered) continue;
    uint64_t lo = i, hi = i + 1;
    while (lo > std::max(first, covered) && i - lo < run && ChunkFree(lo - 1)) {
      --lo;
    }
    while (hi < end && hi - i < run && ChunkFree(hi)) ++hi;
    if (hi - lo < run) continue;
    const uint64_t at = (sb_.data_start + (lo - first)) * sb_.chunk_size;
    const uint64_t len = (hi - lo) * sb_.chunk_size;
    if (!extents.empty() &&
        extents.back().offset_bytes + extents.back().length_bytes == at) {
      extents.back().length_bytes += len;
    } else {
      extents.push_back({at, len});
    }
    bytes += len;
    covered = hi;
  }
  if (!extents.empty() && io_.Discard(extents).ok()) {
    stats_.data_bytes_discarded += bytes;
  }
}

absl::Status Pool::CommitLocked() {
  if (!changed_ && dirty_nodes_ == 0) return absl::OkStatus();
  if (absl::Status s = UpdateAllDigests(); !s.ok()) return s;
  std::string catalog = SerializeCatalog();
  if (dirty_nodes_ == 0 && full_table_writes_ == 0 &&
      catalog == committed_catalog_) {
    // Back where the last commit left it: every tree is the committed one
    // (roots and sizes are in the catalog, committed nodes are never
    // changed in place), so every reference count is too, and what this
    // transaction freed was free on disk already.
    ReleaseHeld();
    changed_ = false;
    return absl::OkStatus();
  }

  // Replace the catalog.
  for (uint64_t id : catalog_nodes_) {
    SetCount(NodeIndex(id), 0);
    Hold(NodeIndex(id));
  }
  catalog_nodes_.clear();
  uint64_t catalog_count = DivRoundUp(catalog.size(), kCatalogPayload);
  for (uint64_t i = 0; i < catalog_count; ++i) {
    absl::StatusOr<uint64_t> id = AllocNode();
    if (!id.ok()) return id.status();
    catalog_nodes_.push_back(*id);
  }

  // Every node to write, in id order so adjacent ones go out as one write.
  std::vector<std::pair<uint64_t, Node*>> nodes;
  for (auto& [id, node] : cache_) {
    if (node->dirty) nodes.emplace_back(id, node.get());
  }
  for (uint64_t id : catalog_nodes_) nodes.emplace_back(id, nullptr);
  std::sort(nodes.begin(), nodes.end());
  AlignedBuffer node_buf(nodes.size() * kNodeSize);
  std::vector<WriteOp> ops;
  for (size_t i = 0; i < nodes.size(); ++i) {
    auto [id, node] = nodes[i];
    std::span<std::byte, kNodeSize> out(node_buf.data() + i * kNodeSize,
                                        kNodeSize);
    NodeHeader h;
    h.id = id;
    if (node != nullptr) {
      h.kind = NodeKind::kTree;
      h.level = static_cast<uint8_t>(node->level);
      h.birth = node->birth;
      EncodeEntries(node->e, out);
    } else {
      size_t k = std::find(catalog_nodes_.begin(), catalog_nodes_.end(), id) -
                 catalog_nodes_.begin();
      size_t from = k * kCatalogPayload;
      size_t len = std::min<size_t>(kCatalogPayload, catalog.size() - from);
      std::memset(out.data() + kNodeHeaderSize, 0, kCatalogPayload);
      std::memcpy(out.data() + kNodeHeaderSize, catalog.data() + from, len);
      h.kind = NodeKind::kCatalog;
      h.birth = gen_;
      h.payload_bytes = static_cast<uint32_t>(len);
      h.next = k + 1 < catalog_nodes_.size() ? catalog_nodes_[k + 1] : 0;
    }
    SealNode(h, out);
    if (!ops.empty() && i > 0 && nodes[i - 1].first + 1 == id) {
      ops.back().data = {ops.back().data.data(),
                         ops.back().data.size() + kNodeSize};
    } else {
      ops.push_back({id * kNodeSize, out});
    }
  }

  // Reference-count pages. This generation's copy was last complete two
  // commits ago, so it needs the pages changed in this and the previous one.
  std::vector<uint64_t> pages;
  if (full_table_writes_ > 0) {
    for (uint64_t p = 0; p < sb_.refcount_pages; ++p) pages.push_back(p);
  } else {
    pages.assign(dirty_pages_.begin(), dirty_pages_.end());
    pages.insert(pages.end(), prev_dirty_pages_.begin(),
                 prev_dirty_pages_.end());
    std::sort(pages.begin(), pages.end());
    pages.erase(std::unique(pages.begin(), pages.end()), pages.end());
  }
  AlignedBuffer page_buf(pages.size() * 4096);
  const uint64_t table_at = sb_.refcount_copy_offset(gen_);
  const uint64_t total = counts_.size();
  for (size_t i = 0; i < pages.size(); ++i) {
    std::span<std::byte, 4096> page(page_buf.data() + i * 4096, 4096);
    for (uint64_t k = 0; k < kCountsPerPage; ++k) {
      uint64_t index = pages[i] * kCountsPerPage + k;
      PutLe32(page.data() + 16 + 4 * k, index < total ? counts_[index] : 0);
    }
    SealRefcountPage(pages[i], page);
    if (!ops.empty() && i > 0 && pages[i - 1] + 1 == pages[i]) {
      ops.back().data = {ops.back().data.data(), ops.back().data.size() + 4096};
    } else {
      ops.push_back({table_at + pages[i] * 4096, page});
    }
  }

  Superblock next = sb_;
  next.generation = gen_;
  next.catalog_head = catalog_nodes_.empty() ? 0 : catalog_nodes_.front();
  next.catalog_bytes = catalog.size();
  next.used_nodes = used_nodes_;
  next.used_chunks = used_chunks_;
  const uint64_t slot = (gen_ % 2) * kSuperblockSize;
  AlignedBuffer sb_buf(kSuperblockSize);
  EncodeSuperblock(
      next, slot,
      std::span<std::byte, kSuperblockSize>(sb_buf.data(), kSuperblockSize));

  if (absl::Status s = io_.Write(ops); !s.ok()) return s;
  if (absl::Status s = io_.Flush(); !s.ok()) return s;
  if (absl::Status s = io_.WriteAt(slot, sb_buf.span()); !s.ok()) return s;
  if (absl::Status s = io_.Flush(); !s.ok()) return s;

  // Durable. Held space becomes free; the next transaction begins.
  sb_ = next;
  for (auto& [id, node] : nodes) {
    if (node != nullptr) node->dirty = false;
  }
  dirty_nodes_ = 0;
  prev_dirty_pages_ = std::move(dirty_pages_);
  dirty_pages_.clear();
  if (full_table_writes_ > 0) --full_table_writes_;
  ReleaseHeld();
  committed_catalog_ = std::move(catalog);
  ++gen_;
  changed_ = false;
  ++stats_.commits;
  stats_.metadata_bytes_written +=
      node_buf.size() + page_buf.size() + kSuperblockSize;
  TrimCache();
  return absl::OkStatus();
}

}  // namespace blockstore
