// Opening, formatting and committing a Pool, and transaction groups.
//
// Commit protocol: (1) write every dirty node, the new catalog and the
// changed reference-count pages (into the table copy of this generation),
// then flush; (2) write the superblock slot of this generation, then flush.
// Until (2) is durable the previous superblock, table copy and every node it
// reaches are untouched, because space freed since then is held back until
// the commit is durable (and until every read that began before has ended).
//
// A commit freezes the open transaction under the lock (digests, the
// encoded nodes, catalog, pages and superblock), then writes it with the
// lock released while new calls fill the next transaction: a frozen node is
// no longer dirty, so the next transaction copies it rather than changing
// it in place, and stays in the cache (unwritten) until it is on disk.
// Commits run one at a time.
#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "blockstore/pool.h"
#include "blockstore/pool_internal.h"
#include "blockstore/util.h"

namespace blockstore {

using internal::kMaxVolumeBytes;
using internal::NowNs;
using internal::RandomGuid;

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
  InitDigests();
  space_.Reset(shape_);
  counts_loaded_ = true;
  gen_ = 1;
  changed_ = true;
  full_table_writes_ = 2;
  return CommitLocked(CommitLock::kHold);
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
  InitDigests();

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
    if (!ValidNodeId(id) || catalog_nodes_.size() > sb_.meta_count) {
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
  auto root_ok = [this](const Entry& e) {
    return e.ptr == 0 || ValidNodeId(e.ptr);
  };
  if (absl::Status s =
          ParseCatalog(catalog, root_ok, kMaxVolumeBytes, catalog_);
      !s.ok()) {
    return catalog_damaged(s.message());
  }
  committed_catalog_ = std::move(catalog);
  gen_ = sb_.generation + 1;
  // Reads and diffs never look at the reference counts: a read-only open
  // loads them when something asks (Info, Check), a read-write one now.
  if (mode_ == OpenMode::kReadOnly && !repair) return absl::OkStatus();
  return LoadCountsLocked(repair);
}

absl::Status Pool::EnsureCountsLocked() {
  if (counts_loaded_) return absl::OkStatus();
  return LoadCountsLocked(/*repair=*/false);
}

absl::Status Pool::LoadCountsLocked(bool repair) {
  // Reference counts of this commit. Read-write, both table copies in one
  // device batch: this commit's, and the other one, compared below (the
  // next commit writes it).
  // One buffer for both (a 24 GiB pool's copy is 3 MiB: two apart took
  // 8 MiB of fresh huge pages, one takes 6).
  const bool writable = mode_ == OpenMode::kReadWrite;
  const size_t copy_bytes = sb_.refcount_pages * 4096;
  AlignedBuffer tables =
      AlignedBuffer::Uninitialized((writable ? 2 : 1) * copy_bytes);
  const std::span<std::byte> table = tables.span().first(copy_bytes);
  const std::span<std::byte> other =
      tables.span().subspan(writable ? copy_bytes : 0, copy_bytes);
  const ReadOp table_reads[] = {
      {sb_.refcount_copy_offset(sb_.generation), table},
      {sb_.refcount_copy_offset(sb_.generation + 1), other}};
  if (absl::Status s =
          io_.Read(std::span<const ReadOp>(table_reads, writable ? 2 : 1));
      !s.ok()) {
    return s;
  }
  // Reads may be in flight (a read-only pool loading its table for Check):
  // their tickets stay valid.
  space_.Reset(shape_);
  std::vector<uint64_t> damaged;  // pages; rebuilt below from the trees
  for (uint64_t p = 0; p < sb_.refcount_pages; ++p) {
    std::span<const std::byte, 4096> page(table.data() + p * 4096, 4096);
    if (!RefcountPageValid(p, page)) {
      damaged.push_back(p);
      continue;
    }
    space_.LoadPage(p, page);
  }

  if (!damaged.empty()) {
    count_damage_ = absl::StrCat(
        "reference count page", damaged.size() > 1 ? "s " : " ",
        absl::StrJoin(damaged, ", "), " of generation ", sb_.generation,
        damaged.size() > 1 ? " are" : " is", " damaged (checksum mismatch)");
    if (writable && !repair) {
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
  space_.Recount();
  space_.TakeDirtyPages();
  // The next commit writes the other table copy, which must then equal this
  // one wherever that commit changes nothing. It may be older, or torn by a
  // crash: compare it page by page and have the first commit rewrite the
  // pages that differ (after a clean shutdown: usually none).
  for (uint64_t p = 0; writable && p < sb_.refcount_pages; ++p) {
    if (std::memcmp(table.data() + p * 4096, other.data() + p * 4096, 4096) !=
        0) {
      prev_dirty_pages_.push_back(p);
    }
  }
  full_table_writes_ = 0;
  counts_loaded_ = true;
  return absl::OkStatus();
}

absl::Status Pool::MaybeCommit() {
  // Enough dirty metadata, or enough space freed (overwrites) that it
  // should become reusable.
  if (cache_.dirty_count() < tuning_.auto_commit_dirty_nodes &&
      space_.held_count() <
          std::max<uint64_t>(1024, space_.free_chunks() / 4)) {
    return absl::OkStatus();
  }
  // Another caller's group is open: its commit takes this work along. A
  // commit in flight: the next write after it commits (a writer does not
  // wait for the disk on behalf of others).
  if (open_group_ != 0 || committing_) return absl::OkStatus();
  return CommitLocked();
}

void Pool::DiscardFreed(CommitLock lock) {
  // Free runs of at least kDiscardMinBytes go back to the file system or
  // device; their chunks are reserved meanwhile, so nothing written there
  // is discarded. Best effort: a disk that cannot, or fails to, keeps the
  // space.
  std::vector<uint64_t> freed = space_.TakeFreedChunks();
  if (freed.empty()) return;
  const uint64_t c_size = shape_.chunk_size;
  std::vector<std::pair<uint64_t, uint64_t>> runs = space_.BeginDiscard(
      std::move(freed), std::max<uint64_t>(1, kDiscardMinBytes / c_size));
  if (runs.empty()) return;
  std::vector<Extent> extents;
  uint64_t bytes = 0;
  for (const auto& [first, end] : runs) {
    extents.push_back({first * c_size, (end - first) * c_size});
    bytes += (end - first) * c_size;
  }
  absl::Status s;
  if (lock == CommitLock::kRelease) {
    mu_.unlock();
    s = io_.Discard(extents);
    mu_.lock();
  } else {
    s = io_.Discard(extents);
  }
  space_.EndDiscard(runs);
  if (s.ok()) stats_.data_bytes_discarded += bytes;
}

absl::Status Pool::CommitLocked(CommitLock lock, const Group* by) {
  // One commit at a time; and none, but the group's own or a forced one,
  // while a group is open.
  while (committing_ || (lock == CommitLock::kRelease && OtherGroupOpen(by))) {
    cv_.wait(mu_);
  }
  if (!failed_.ok()) return failed_;
  if (!changed_ && cache_.dirty_count() == 0) return absl::OkStatus();
  if (absl::Status s = UpdateAllDigests(); !s.ok()) return s;
  std::string catalog = SerializeCatalog(catalog_);
  if (cache_.dirty_count() == 0 && full_table_writes_ == 0 &&
      catalog == committed_catalog_) {
    // Back where the last commit left it: every tree is the committed one
    // (roots and sizes are in the catalog, committed nodes are never
    // changed in place), so every reference count is too, and what this
    // transaction freed was free on disk already.
    space_.Release(space_.TakeHeld());
    changed_ = false;
    DiscardFreed(lock);
    return absl::OkStatus();
  }

  // Replace the catalog.
  for (uint64_t id : catalog_nodes_) space_.DropNodeRef(id);
  catalog_nodes_.clear();
  uint64_t catalog_count = DivRoundUp(catalog.size(), kCatalogPayload);
  for (uint64_t i = 0; i < catalog_count; ++i) {
    absl::StatusOr<uint64_t> id = AllocNode();
    if (!id.ok()) return id.status();
    catalog_nodes_.push_back(*id);
  }

  // Every node to write, in id order so adjacent ones go out as one write.
  std::vector<std::pair<uint64_t, Node*>> nodes;
  for (Node* node : cache_.Dirty()) nodes.emplace_back(node->id, node);
  for (uint64_t id : catalog_nodes_) nodes.emplace_back(id, nullptr);
  std::sort(nodes.begin(), nodes.end());
  // This buffer and the pages' are written whole (SealNode, EncodePage): not
  // zeroed first, and on huge pages from 256 KiB, a fault each instead of one
  // per 4 KiB (a 1% update's receive commits hundreds of each).
  constexpr size_t kHugeFrom = 256 << 10;
  AlignedBuffer node_buf =
      AlignedBuffer::Uninitialized(nodes.size() * kNodeSize, kHugeFrom);
  std::vector<WriteOp> ops;
  std::vector<uint64_t> frozen;  // tree node ids
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
      cache_.Freeze(*node);
      frozen.push_back(id);
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
  std::vector<uint64_t> dirty_pages = space_.TakeDirtyPages();
  std::vector<uint64_t> pages;
  if (full_table_writes_ > 0) {
    for (uint64_t p = 0; p < sb_.refcount_pages; ++p) pages.push_back(p);
  } else {
    pages = dirty_pages;
    pages.insert(pages.end(), prev_dirty_pages_.begin(),
                 prev_dirty_pages_.end());
    std::sort(pages.begin(), pages.end());
    pages.erase(std::unique(pages.begin(), pages.end()), pages.end());
  }
  AlignedBuffer page_buf =
      AlignedBuffer::Uninitialized(pages.size() * 4096, kHugeFrom);
  const uint64_t table_at = sb_.refcount_copy_offset(gen_);
  for (size_t i = 0; i < pages.size(); ++i) {
    std::span<std::byte, 4096> page(page_buf.data() + i * 4096, 4096);
    space_.EncodePage(pages[i], page);
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
  next.used_nodes = space_.used_nodes();
  next.used_chunks = space_.used_chunks();
  const uint64_t slot = (gen_ % 2) * kSuperblockSize;
  AlignedBuffer sb_buf(kSuperblockSize);
  EncodeSuperblock(
      next, slot,
      std::span<std::byte, kSuperblockSize>(sb_buf.data(), kSuperblockSize));

  // Frozen: the next transaction begins now.
  SpaceMap::Frees frees = space_.TakeHeld();
  prev_dirty_pages_ = std::move(dirty_pages);
  if (full_table_writes_ > 0) --full_table_writes_;
  committed_catalog_ = std::move(catalog);
  ++gen_;
  changed_ = false;
  committing_ = true;

  auto write = [&]() {
    if (absl::Status s = io_.Write(ops); !s.ok()) return s;
    if (absl::Status s = io_.Flush(); !s.ok()) return s;
    if (absl::Status s = io_.WriteAt(slot, sb_buf.span()); !s.ok()) return s;
    return io_.Flush();
  };
  absl::Status written;
  if (lock == CommitLock::kRelease) {
    mu_.unlock();
    written = write();
    mu_.lock();
  } else {
    written = write();
  }
  committing_ = false;
  cv_.notify_all();
  if (!written.ok()) return Fail(written);

  // Durable. Held space becomes free (once older reads are done).
  sb_ = next;
  for (uint64_t id : frozen) {
    // Gone if the next transaction freed it already.
    Node* node = cache_.Find(id);
    if (node != nullptr && node->unwritten) cache_.Written(*node);
  }
  space_.Release(std::move(frees));
  ++stats_.commits;
  stats_.metadata_bytes_written +=
      node_buf.size() + page_buf.size() + kSuperblockSize;
  DiscardFreed(lock);
  TrimCache();
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------
// Groups

Pool::Group Pool::BeginGroup() {
  MutexLock lock(mu_);
  while (open_group_ != 0) cv_.wait(mu_);
  open_group_ = next_group_++;
  return Group(this, open_group_);
}

void Pool::EndGroup(uint64_t id) {
  if (open_group_ != id) return;
  open_group_ = 0;
  cv_.notify_all();
}

absl::Status Pool::Group::Commit() {
  if (pool_ == nullptr) return absl::OkStatus();
  Pool& pool = *pool_;
  MutexLock lock(pool.mu_);
  absl::Status s = pool.CheckWritable();
  if (s.ok()) s = pool.Fail(pool.CommitLocked(CommitLock::kRelease, this));
  pool.EndGroup(id_);
  pool_ = nullptr;
  return s;
}

Pool::Group::~Group() {
  if (pool_ == nullptr) return;
  MutexLock lock(pool_->mu_);
  pool_->EndGroup(id_);
}

}  // namespace blockstore
