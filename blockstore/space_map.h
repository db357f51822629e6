// The space map: who uses each metadata node and data chunk of a pool, and
// when a block nobody uses may be handed out again.
//
// Every block has a reference count (0 = unused). Between used and free a
// block passes through states that keep a crash or a concurrent reader safe:
//   held      freed by the open (or a committing) transaction: the last
//             durable commit may still point at it;
//   deferred  freed by a durable commit, but a read that began before may
//             still be reading it (readers work outside the pool's lock);
//   reserved  taken by a write in flight before its entry is installed (its
//             count stays 0, so a commit meanwhile records it as free and a
//             crash leaves it so), or by a discard in progress.
// Only blocks in none of these states are allocated; nothing a reader or the
// last commit may hold is ever reused.
//
// A data chunk freed by an overwrite (the write put the chunk's new bytes
// elsewhere) is needed again at once by the writes that follow, so it stays
// in the file: it is reused first and never discarded. A chunk freed any
// other way (a deleted snapshot or volume, a trim, zeros written, a
// rollback) is a candidate for a discard, so that deleting gives space back
// to the file system or device.
//
// Node ids and chunk numbers are the on-disk addresses (format.h): a node id
// is a 4 KiB block number, a chunk number a chunk_size block number. The map
// keeps one flat table [nodes..., chunks...] and its reference-count pages
// (format.h) mirror it.
//
// Not thread-safe: the pool's lock guards it. Needs no Io (tests build one
// from a Superblock alone).
#ifndef TANDEM_BLOCKSTORE_SPACE_MAP_H_
#define TANDEM_BLOCKSTORE_SPACE_MAP_H_

#include <cstdint>
#include <deque>
#include <map>
#include <optional>
#include <span>
#include <unordered_set>
#include <vector>

#include "blockstore/format.h"
#include "blockstore/util.h"

namespace blockstore {

class SpaceMap {
 public:
  // Every block free. `shape` gives where nodes and chunks lie.
  explicit SpaceMap(const Superblock& shape);
  SpaceMap() = default;
  // Every block free for `shape` again, keeping the read tickets handed out
  // (a read-only pool loads its table while reads are in flight). Only
  // with nothing held, deferred or reserved.
  void Reset(const Superblock& shape);

  // Loading a table: counts from page `page` (already checked with
  // RefcountPageValid), then Recount() once every page is in.
  void LoadPage(uint64_t page, std::span<const std::byte, 4096> raw);
  // Replaces every count (a rebuild from the trees); Recount() after.
  void SetCounts(std::span<const uint32_t> counts);
  // Used and free totals from the counts.
  void Recount();

  // Reference counts. A node id must lie in the metadata area and a chunk
  // number in the data area (callers check pointers read from disk first).
  uint32_t NodeRefs(uint64_t id) const { return counts_[NodeIndex(id)]; }
  uint32_t ChunkRefs(uint64_t phys) const { return counts_[ChunkIndex(phys)]; }
  void AddNodeRef(uint64_t id) { Add(NodeIndex(id)); }
  void AddChunkRef(uint64_t phys) { Add(ChunkIndex(phys)); }
  // Drops one reference (the count must be > 0) and returns how many are
  // left; at 0 the block becomes held. `why` says what a chunk freed so
  // becomes once it is free: reused first, or a candidate for a discard.
  enum class Freed { kGiveBack, kReuse };
  uint32_t DropNodeRef(uint64_t id) {
    return Drop(NodeIndex(id), Freed::kGiveBack);
  }
  uint32_t DropChunkRef(uint64_t phys, Freed why = Freed::kGiveBack) {
    return Drop(ChunkIndex(phys), why);
  }

  // A free node, its count set to 1; nullopt when none is free.
  std::optional<uint64_t> AllocNode();
  // A free chunk, reserved (count 0); nullopt when none is free. Chunks an
  // overwrite freed come first, oldest first; then the next free one after
  // the last taken. Install gives it its first reference; Unreserve gives
  // it back.
  std::optional<uint64_t> ReserveChunk();
  void Install(uint64_t phys);
  void Unreserve(uint64_t phys);

  uint64_t free_nodes() const { return free_nodes_; }    // allocatable now
  uint64_t free_chunks() const { return free_chunks_; }  // allocatable now
  uint64_t used_nodes() const { return used_nodes_; }
  uint64_t used_chunks() const { return used_chunks_; }
  uint64_t reserved_chunks() const { return reserved_chunks_; }
  // True if the open transaction freed something (a commit would make it
  // allocatable).
  bool has_held() const { return !held_.empty(); }
  uint64_t node_count() const { return shape_.meta_count; }
  uint64_t chunk_count() const { return shape_.data_count; }

  // Transactions. A commit takes the open transaction's frees when it
  // freezes it, and hands them back once it is durable: they become free as
  // soon as every read begun before that moment has ended.
  struct Frees {
    std::vector<uint64_t> index;  // flat table indices
  };
  Frees TakeHeld();
  void Release(Frees frees);

  // Readers: a read that resolves blocks under the pool's lock and reads
  // them outside it holds a ticket from before its first look-up until its
  // last device read has finished.
  uint64_t BeginRead();
  // True if space became free (it had waited for this reader).
  bool EndRead(uint64_t ticket);
  size_t readers() const { return reader_count_; }
  // Freed by a durable commit, waiting for older readers to end.
  bool has_deferred() const { return !deferred_.empty(); }
  // Blocks the open transaction freed (held until it commits).
  uint64_t held_count() const { return held_.size(); }

  // Data chunks freed since the last call that are candidates for a
  // discard (not those an overwrite freed).
  std::vector<uint64_t> TakeFreedChunks();
  // Runs of free chunks of at least `min_chunks` around `freed` (from
  // TakeFreedChunks), each as [first chunk number, end), leaving out chunks
  // kept for reuse: every chunk in them is reserved until EndDiscard, so
  // none is handed out while its space goes back to the disk.
  std::vector<std::pair<uint64_t, uint64_t>> BeginDiscard(
      std::vector<uint64_t> freed, uint64_t min_chunks);
  void EndDiscard(std::span<const std::pair<uint64_t, uint64_t>> runs);

  // Reference-count pages changed since the last call.
  std::vector<uint64_t> TakeDirtyPages();
  uint64_t page_count() const { return shape_.refcount_pages; }
  // Page `page` as of now, sealed (format.h).
  void EncodePage(uint64_t page, std::span<std::byte, 4096> out) const;
  // The flat table (the check compares it with what the trees say), and
  // where a node or chunk is in it.
  std::span<const uint32_t> counts() const { return counts_; }
  uint64_t NodeIndex(uint64_t id) const { return id - shape_.meta_start; }
  uint64_t ChunkIndex(uint64_t phys) const {
    return shape_.meta_count + (phys - shape_.data_start);
  }
  bool IsNodeIndex(uint64_t index) const { return index < shape_.meta_count; }
  uint64_t AddressOf(uint64_t index) const {
    return IsNodeIndex(index) ? shape_.meta_start + index
                              : shape_.data_start + (index - shape_.meta_count);
  }

 private:
  enum State : uint8_t { kInUseOrFree = 0, kHeld, kDeferred, kReserved };

  bool Free(uint64_t index) const {
    return counts_[index] == 0 && state_[index] == kInUseOrFree;
  }
  // Free and not kept for reuse: may be discarded.
  bool Discardable(uint64_t index) const {
    return Free(index) && !reuse_[index];
  }
  void Set(uint64_t index, uint32_t count);
  void Add(uint64_t index) { Set(index, counts_[index] + 1); }
  uint32_t Drop(uint64_t index, Freed why);
  // Takes a free chunk (flat index) for a write.
  uint64_t Reserve(uint64_t index);
  // A block whose state ends becomes allocatable (if still unused).
  void MakeFree(uint64_t index);
  // True if it freed anything.
  bool ReleaseDeferred();

  Superblock shape_;
  LargeVector<uint32_t> counts_;
  LargeVector<State> state_;
  std::vector<uint64_t> held_;  // indices, this transaction's frees
  struct Batch {
    uint64_t epoch;
    std::vector<uint64_t> index;
  };
  std::deque<Batch> deferred_;  // in epoch order
  uint64_t epoch_ = 1;
  std::map<uint64_t, uint64_t> readers_;  // ticket epoch -> readers
  size_t reader_count_ = 0;
  std::vector<uint64_t> freed_chunks_;  // chunk numbers
  // Set from an overwrite's drop until the chunk is taken again; the free
  // ones are queued in `reusable_` (indices, oldest first; an entry whose
  // chunk was taken since is skipped).
  std::vector<bool> reuse_;
  std::deque<uint64_t> reusable_;
  std::unordered_set<uint64_t> dirty_pages_;
  uint64_t free_nodes_ = 0;
  uint64_t free_chunks_ = 0;
  uint64_t used_nodes_ = 0;
  uint64_t used_chunks_ = 0;
  uint64_t reserved_chunks_ = 0;
  uint64_t node_cursor_ = 0;
  uint64_t chunk_cursor_ = 0;
};

}  // namespace blockstore

#endif  // TANDEM_BLOCKSTORE_SPACE_MAP_H_
