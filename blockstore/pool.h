// A Pool is one file or block device holding volumes: arrays of fixed-size
// chunks with O(1) copy-on-write snapshots. Metadata is a copy-on-write radix
// tree per volume (format.h); changes accumulate in memory and commit as a
// transaction group on Flush(), on every snapshot/volume operation, and when
// enough metadata is dirty. A crash at any point leaves the pool exactly as of
// the last commit.
//
// Threads: every method may be called from any thread; one pool-wide mutex
// serializes them. The Io passed in must outlive the Pool.
//
// Errors: NotFound (no such volume/snapshot), AlreadyExists, InvalidArgument
// (bad name, size or offset), OutOfRange (I/O past the end of a volume),
// ResourceExhausted (pool full), FailedPrecondition (read-only pool, volume
// has snapshots), DataLoss (checksum or digest mismatch, device error). After
// a device error in a mutating call the Pool refuses further calls with that
// error; reopening it returns to the last commit.
#ifndef TANDEM_BLOCKSTORE_POOL_H_
#define TANDEM_BLOCKSTORE_POOL_H_

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "blockstore/format.h"
#include "blockstore/hash.h"
#include "blockstore/io.h"
#include "blockstore/mutex.h"
#include "blockstore/util.h"

namespace blockstore {

std::string GuidToString(const Guid& guid);  // 8-4-4-4-12 hex

struct SnapshotInfo {
  std::string volume;
  std::string name;
  Guid guid{};
  int64_t create_time_ns = 0;
  uint64_t size_bytes = 0;
  uint64_t generation = 0;  // commit in which it was taken
  Digest root_digest;
  // Who took it: empty for a user's snapshot; the layer that made it
  // otherwise (replication: its relationship id). Set only through the API,
  // never derived from the name, so no name a user picks is mistaken for it.
  std::string owner;
};

struct VolumeInfo {
  std::string name;
  Guid guid{};
  int64_t create_time_ns = 0;
  uint64_t size_bytes = 0;
  uint64_t snapshot_count = 0;
  bool read_only = false;  // writes, trims, resizes, snapshots refused
};

struct PoolInfo {
  std::string device;  // path or "memory"
  std::string io;      // backend, e.g. "io_uring, O_DIRECT"
  Guid pool_guid{};
  uint32_t chunk_size_bytes = 0;
  uint64_t capacity_bytes = 0;  // data area
  uint64_t used_bytes = 0;      // data chunks in use
  uint64_t free_bytes = 0;      // includes space freed by the open transaction
  uint64_t metadata_capacity_bytes = 0;
  uint64_t metadata_used_bytes = 0;
  uint64_t generation = 0;  // last commit
  uint64_t volume_count = 0;
  uint64_t snapshot_count = 0;
};

// Memory and transaction-size knobs; the defaults suit production, tests
// shrink them to reach the paths large pools take.
struct PoolTuning {
  // Clean metadata nodes kept in memory between operations (4 KiB each).
  size_t max_cached_nodes = 16384;
  // A transaction commits by itself once this many nodes are dirty,
  // bounding its memory and the work one commit holds.
  uint64_t auto_commit_dirty_nodes = 8192;
};

// A run of chunks whose content differs between two snapshots (Diff).
struct ChangedRun {
  enum class Kind : uint8_t {
    kData,   // one chunk (count == 1) at `phys` with `digest`
    kZero,   // chunks written as zeros
    kUnmap,  // chunks never written or trimmed
  };
  Kind kind = Kind::kData;
  uint64_t first_chunk = 0;
  uint64_t count_chunks = 0;
  uint64_t phys = 0;  // kData: where the chunk lives (for ReadChunks)
  Digest digest;      // kData: XXH3-128 of the chunk
};

struct DiffBatch {
  std::vector<ChangedRun> runs;  // in increasing chunk order
  uint64_t next_chunk = 0;       // where the next batch starts
  bool done = false;
  uint64_t nodes_visited = 0;  // tree nodes read by this batch
};

// Who a received snapshot is: the sender's identity, kept as is.
struct SnapshotIdentity {
  std::string name;
  Guid guid{};
  int64_t create_time_ns = 0;
  std::string owner;  // on this side (SnapshotInfo::owner)
};

struct CreatePoolOptions {
  uint32_t chunk_size_bytes = 64 * 1024;
};

class Pool {
 public:
  // Formats `io` as an empty pool, committed and durable on return.
  static absl::StatusOr<std::unique_ptr<Pool>> Create(
      Io& io, const CreatePoolOptions& options);
  // Opens the pool on `io`, at its last commit. DataLoss if `io` is not a
  // pool or both superblocks are damaged (the message says which). Damaged
  // reference counts (a bad sector in the table) do not take the volumes
  // away: read-only, the pool opens with the counts rebuilt from the trees
  // in memory (Check reports the damage); read-write is refused, naming
  // Repair.
  static absl::StatusOr<std::unique_ptr<Pool>> Open(Io& io, OpenMode mode);
  // As above, owning `io`.
  static absl::StatusOr<std::unique_ptr<Pool>> Open(std::unique_ptr<Io> io,
                                                    OpenMode mode);
  static absl::StatusOr<std::unique_ptr<Pool>> Create(
      std::unique_ptr<Io> io, const CreatePoolOptions& options);
  // Opens `io` read-write even if its reference counts are damaged, rebuilds
  // them from a walk of every tree and commits them (both table copies).
  // Refused, changing nothing, if the walk finds the trees damaged too.
  // Says what it did ("" when there was nothing to repair).
  struct Repaired {
    std::unique_ptr<Pool> pool;
    std::string what;
  };
  static absl::StatusOr<Repaired> Repair(Io& io);
  static absl::StatusOr<Repaired> Repair(std::unique_ptr<Io> io);

  // Destroying a Pool does not commit: writes since the last commit are
  // dropped, exactly as in a crash. Call Flush() first.
  ~Pool();
  Pool(const Pool&) = delete;
  Pool& operator=(const Pool&) = delete;

  PoolInfo Info();

  // Volumes. Names are 1-200 bytes of [A-Za-z0-9._:-], not starting with '.'.
  absl::Status CreateVolume(absl::string_view name, uint64_t size_bytes);
  absl::StatusOr<std::vector<VolumeInfo>> ListVolumes();
  absl::StatusOr<VolumeInfo> GetVolume(absl::string_view name);
  // A read-only volume refuses Write, Trim, ResizeVolume, CreateSnapshot,
  // Rollback and DeleteVolume (FailedPrecondition); a receive may still
  // replace its content and snapshots may be deleted. Committed on return.
  absl::Status SetVolumeReadOnly(absl::string_view name, bool read_only);
  // Shrinking discards data past the new end; snapshots keep theirs.
  absl::Status ResizeVolume(absl::string_view name, uint64_t size_bytes);
  // FailedPrecondition if the volume has snapshots, unless `with_snapshots`.
  absl::Status DeleteVolume(absl::string_view name, bool with_snapshots);

  // I/O at any byte offset and length within the volume. Partial chunks are
  // read-modify-written. Durable after the next commit.
  absl::Status Write(absl::string_view volume, uint64_t offset_bytes,
                     std::span<const std::byte> data);
  // Writes whole chunks at scattered positions in one device batch (reading
  // the tree nodes on their way one batch per level first): what a receiver
  // does with a delta's records. Each `data` is chunk_size() bytes, 4 KiB
  // aligned, zero past the volume end.
  struct ChunkWrite {
    uint64_t chunk;
    std::span<const std::byte> data;
  };
  absl::Status WriteChunks(absl::string_view volume,
                           std::span<const ChunkWrite> writes);

  // Reads the live volume, or `snapshot` of it when non-empty. Every data
  // chunk is checked against its digest (DataLoss on mismatch).
  absl::Status Read(absl::string_view volume, absl::string_view snapshot,
                    uint64_t offset_bytes, std::span<std::byte> out);
  // Trimmed bytes read as zeros; whole chunks in the range free their space.
  absl::Status Trim(absl::string_view volume, uint64_t offset_bytes,
                    uint64_t length_bytes);
  // Commits the open transaction (no-op when nothing changed).
  absl::Status Flush();

  // Snapshots: O(1) in the volume size; committed on return. `owner` (at
  // most 64 bytes) is kept with it (SnapshotInfo::owner).
  absl::StatusOr<SnapshotInfo> CreateSnapshot(absl::string_view volume,
                                              absl::string_view name,
                                              absl::string_view owner = {});
  absl::StatusOr<std::vector<SnapshotInfo>> ListSnapshots(
      absl::string_view volume);
  absl::StatusOr<SnapshotInfo> GetSnapshot(absl::string_view volume,
                                           absl::string_view name);
  absl::Status DeleteSnapshot(absl::string_view volume, absl::string_view name);
  // The live volume becomes the snapshot's content and size (metadata only).
  absl::Status Rollback(absl::string_view volume, absl::string_view snapshot);

  // Chunks of `volume@target` that differ from `volume@base` (base empty: from
  // an empty volume), from chunk `from_chunk` on, stopping after about
  // `max_data_chunks` data chunks. The walk skips every subtree whose
  // pointer and birth are the same in both trees, so its cost follows the
  // change, not the volume size. Chunks past the target's size are left out
  // (the size itself is the caller's to carry). `base` names a snapshot of
  // `volume`, or, written "OTHER@SNAPSHOT", one of another volume (a clone's
  // origin: the walk skips what the two share). An empty `target` is the live
  // volume (its runs' `phys` are then not for ReadChunks: the chunks may move).
  absl::StatusOr<DiffBatch> Diff(absl::string_view volume,
                                 absl::string_view base,
                                 absl::string_view target, uint64_t from_chunk,
                                 size_t max_data_chunks);

  // Reads the data chunks `runs` (kData, from Diff) into `out`, one
  // chunk_size() slot each, verifying every digest (DataLoss on mismatch).
  // The snapshot they came from must still exist.
  absl::Status ReadChunks(std::span<const ChangedRun> runs,
                          std::span<std::byte> out);

  // Receiving (atomic apply). A staging volume is a hidden volume (its name
  // starts with '.') cloned from `base_snapshot` of `volume`, or empty of
  // `size_bytes` when base_snapshot is empty. Write into it with Write/Trim/
  // ResizeVolume, then FinishReceive. Until then the destination volume is
  // untouched; a crash leaves at most the staging volume, which the next
  // BeginReceive for the same volume deletes.
  absl::Status BeginReceive(absl::string_view staging, absl::string_view volume,
                            absl::string_view base_snapshot,
                            uint64_t size_bytes);
  // In one commit: checks the staging volume's root digest against
  // `expected` (DataLoss if different, nothing changes), makes it the live
  // content of `volume` (created with `volume_guid` if missing), adds
  // snapshot `identity` of it, and drops the staging volume.
  absl::StatusOr<SnapshotInfo> FinishReceive(absl::string_view staging,
                                             absl::string_view volume,
                                             const Guid& volume_guid,
                                             const SnapshotIdentity& identity,
                                             const Digest& expected);

  // True if the live volume differs from `snapshot` in size or tree root
  // (it was written, trimmed or resized since).
  absl::StatusOr<bool> ChangedSince(absl::string_view volume,
                                    absl::string_view snapshot);

  // Root digest of the live volume (commits first) or of a snapshot: equal
  // content + size + chunk size <=> equal digest (up to XXH3 collisions).
  absl::StatusOr<Digest> RootDigest(absl::string_view volume,
                                    absl::string_view snapshot);

  // The scrub: walks every tree from disk (not the cache), verifying node
  // checksums, Merkle digests, reference counts, free-space accounting and
  // canonical form; with `verify_data`, re-hashes every referenced chunk.
  // Commits pending changes first.
  struct CheckReport {
    std::vector<std::string> problems;  // empty = consistent
    std::vector<std::string> notes;     // expected after a crash, not errors
    uint64_t nodes_checked = 0;
    uint64_t chunks_checked = 0;  // data chunks re-hashed
  };
  absl::StatusOr<CheckReport> Check(bool verify_data);

  // Pool properties: small named strings kept in the catalog, for the layers
  // above (replication keeps its relationship records here). An empty value
  // removes the key. Committed on return.
  absl::Status SetProperty(absl::string_view key, absl::string_view value);
  std::map<std::string, std::string> Properties();

  // Between BeginGroup() and EndGroup(), DeleteSnapshot, SetProperty and
  // SetVolumeReadOnly do not commit one by one: EndGroup() commits them
  // together (atomically, and once). Any other mutating call commits as
  // usual, taking the group's changes with it. Not nested.
  void BeginGroup();
  absl::Status EndGroup();

  void SetTuning(const PoolTuning& tuning);

  uint32_t chunk_size() const { return shape_.chunk_size; }
  // As of the last commit.
  Superblock superblock() const {
    MutexLock lock(mu_);
    return sb_;
  }

  // Counters for tests and benchmarks.
  struct Stats {
    uint64_t commits = 0;
    uint64_t metadata_bytes_written = 0;  // nodes, refcount pages, superblocks
    uint64_t data_bytes_written = 0;
    uint64_t data_bytes_discarded = 0;  // freed chunks given back to the disk
    uint64_t nodes_loaded = 0;
    uint64_t cached_nodes = 0;
  };
  Stats stats();

 private:
  struct Node {
    uint64_t id = 0;
    uint64_t birth = 0;
    int level = 0;
    bool dirty = false;  // not yet written; modifiable in place if rc == 1
    bool stale = false;  // entry digests below may be out of date
    std::array<Entry, kFanout> e;
  };
  struct SnapshotRec {
    std::string name;
    Guid guid{};
    int64_t create_time_ns = 0;
    uint64_t generation = 0;
    uint64_t size_bytes = 0;
    Entry root;
    std::string owner;
  };
  struct VolumeRec {
    std::string name;
    Guid guid{};
    int64_t create_time_ns = 0;
    uint64_t size_bytes = 0;
    Entry root;                          // digest valid after a commit
    std::vector<SnapshotRec> snapshots;  // in creation order
    bool read_only = false;
  };

  Pool(Io& io, std::unique_ptr<Io> owned, OpenMode mode);

  // `repair`: open read-write even with damaged counts (see Repair).
  absl::Status LoadLocked(bool repair = false)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  static absl::StatusOr<Repaired> RepairPool(std::unique_ptr<Pool> pool);
  absl::Status FormatLocked(const CreatePoolOptions& options)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status CheckWritable() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status CommitUnlessGrouped() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status Fail(absl::Status s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<VolumeRec*> FindVolume(absl::string_view name)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // FindVolume, and FailedPrecondition if the volume is read-only.
  absl::StatusOr<VolumeRec*> FindWritableVolume(absl::string_view name)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<const SnapshotRec*> FindSnapshot(const VolumeRec& v,
                                                  absl::string_view name)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  SnapshotInfo InfoOf(const VolumeRec& v, const SnapshotRec& s) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Tree shape.
  uint64_t ChunkCount(uint64_t size_bytes) const;
  uint64_t BatchChunks() const;
  static int Depth(uint64_t chunk_count);
  Digest EmptyDigest(int level) const;  // an empty subtree at `level`
  Digest VolumeDigest(const Entry& root, uint64_t size_bytes) const;

  // Refcounts and allocation.
  uint64_t NodeIndex(uint64_t id) const { return id - shape_.meta_start; }
  uint64_t ChunkIndex(uint64_t chunk) const {
    return shape_.meta_count + (chunk - shape_.data_start);
  }
  bool ChunkFree(uint64_t index) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return counts_[index] == 0 && !held_[index];
  }
  void SetCount(uint64_t index, uint32_t count)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<uint64_t> AllocNode() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<uint64_t> AllocChunk() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void IncRef(uint64_t ptr, int level) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // `level` is the level of the node holding the pointer: 0 = data chunk.
  absl::Status DecRef(uint64_t ptr, int level)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status DecRefNode(uint64_t id, int level)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Hold(uint64_t index) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Space freed by the transaction that just became durable (or that ended
  // where it began) becomes free; large free runs go back to the file
  // system or device (Io::Discard) before anything can reuse them.
  void ReleaseHeld() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Free runs of data chunks (indices into counts_) of at least this many
  // bytes around `freed` go back to the disk.
  static constexpr uint64_t kDiscardMinBytes = 1 << 20;
  void DiscardFreeRuns(std::vector<uint64_t>& freed)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void TrimCache() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  Digest NullEntryDigest(int node_level) const;
  absl::Status EnsureSpace(uint64_t chunks, uint64_t nodes)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Nodes.
  absl::StatusOr<Node*> Load(uint64_t id, int level)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<std::unique_ptr<Node>> DecodeNode(
      uint64_t id, int level, std::span<const std::byte, kNodeSize> raw)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Reads the nodes `ids` (all at `level`) that are not cached in one batch,
  // so a walk pays one round trip per tree level rather than per node.
  absl::Status Prefetch(std::vector<uint64_t>& ids, int level)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Makes the node `ref` points at (at `level`) writable, copying it if it
  // is shared or already on disk, materializing it if empty; updates `ref`.
  absl::StatusOr<Node*> Cow(Entry& ref, int level)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<Entry*> LeafEntryForWrite(VolumeRec& v, uint64_t chunk)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<Entry> LookupChunk(const Entry& root, int depth,
                                    uint64_t chunk)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status TrimChunks(Entry& ref, int level, uint64_t base, uint64_t first,
                          uint64_t end) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status ReadLocked(const Entry& root, uint64_t size_bytes,
                          absl::string_view what, uint64_t offset_bytes,
                          std::span<std::byte> out)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status PlaceChunk(VolumeRec& v, uint64_t chunk,
                          std::span<const std::byte> src,
                          std::vector<WriteOp>& ops)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status WriteLocked(VolumeRec& v, uint64_t offset_bytes,
                           std::span<const std::byte> data)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status TrimLocked(VolumeRec& v, uint64_t offset_bytes,
                          uint64_t length_bytes)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status ResizeLocked(VolumeRec& v, uint64_t size_bytes)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Commit.
  // Recomputes digests below `ref` and folds empty dirty nodes into empty
  // pointers.
  absl::Status UpdateDigests(Entry& ref, int level)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status UpdateAllDigests() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status CommitLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status MaybeCommit() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  struct DiffState;
  struct WalkRef {
    Entry e;
    bool above_root = false;  // a level above the real root (depths differ)
    int root_level = 0;       // the real root's level when above_root
  };
  absl::Status DiffWalk(DiffState& st, const WalkRef& b, const WalkRef& t,
                        int level, uint64_t base)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<std::array<WalkRef, kFanout>> Children(const WalkRef& ref,
                                                        int level,
                                                        DiffState& st)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  struct CheckState;
  // Walks the catalog and every tree into `st` (computed counts, problems).
  void CheckAllTrees(CheckState& st) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void CheckRoot(CheckState& st, const Entry& root, uint64_t size_bytes,
                 const std::string& where) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Replaces the loaded counts by those of a walk of every tree.
  absl::Status RebuildCounts() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // free_/used_ nodes and chunks from counts_.
  void CountSpace() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::optional<Digest> CheckTree(CheckState& st, uint64_t id, int level,
                                  uint64_t base, uint64_t chunk_count,
                                  uint64_t parent_birth,
                                  const std::string& where)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::string SerializeCatalog() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status ParseCatalog(absl::string_view bytes)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  std::unique_ptr<Io> owned_io_;
  Io& device_;                  // the Io the pool was opened on
  std::unique_ptr<Io> tagged_;  // device_, marking each error as the device's
  Io& io_;                      // *tagged_: all pool I/O goes through it
  const OpenMode mode_;

  // Checked by clang's -Wthread-safety (blockstore/mutex.h).
  mutable Mutex mu_;
  // The layout (chunk size, where metadata and data lie): fixed when the
  // pool is formatted or opened, before anyone else sees it, so read
  // without the lock. sb_ is the rest of the last commit's superblock.
  Superblock shape_;
  absl::Status failed_ ABSL_GUARDED_BY(mu_);
  Superblock sb_ ABSL_GUARDED_BY(mu_);
  uint64_t gen_ ABSL_GUARDED_BY(mu_) = 0;  // open transaction
  bool changed_ ABSL_GUARDED_BY(mu_) = false;
  std::map<std::string, VolumeRec, std::less<>> volumes_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, std::string, std::less<>> properties_
      ABSL_GUARDED_BY(mu_);
  bool grouped_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<uint64_t> catalog_nodes_ ABSL_GUARDED_BY(mu_);
  // The catalog as of the last commit (none before the first): a
  // transaction that ends where it began (a refused receive dropping its
  // staging volume, say) commits nothing.
  std::optional<std::string> committed_catalog_ ABSL_GUARDED_BY(mu_);
  // What LoadLocked found damaged in the reference-count table (the counts
  // were rebuilt from the trees); empty when none was.
  std::string count_damage_ ABSL_GUARDED_BY(mu_);

  std::vector<uint32_t> counts_ ABSL_GUARDED_BY(mu_);
  std::vector<bool> held_ ABSL_GUARDED_BY(mu_);  // freed, not yet reusable
  std::vector<uint64_t> held_list_ ABSL_GUARDED_BY(mu_);
  uint64_t free_nodes_ ABSL_GUARDED_BY(mu_) = 0;   // allocatable now
  uint64_t free_chunks_ ABSL_GUARDED_BY(mu_) = 0;  // allocatable now
  uint64_t used_nodes_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t used_chunks_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t node_cursor_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t chunk_cursor_ ABSL_GUARDED_BY(mu_) = 0;
  std::unordered_set<uint64_t> dirty_pages_ ABSL_GUARDED_BY(mu_);
  std::unordered_set<uint64_t> prev_dirty_pages_ ABSL_GUARDED_BY(mu_);
  // Commits that must still write the whole table: 2 after format (both
  // copies start blank). After open, the pages where the two copies differ
  // start in prev_dirty_pages_ instead.
  int full_table_writes_ ABSL_GUARDED_BY(mu_) = 0;

  std::unordered_map<uint64_t, std::unique_ptr<Node>> cache_
      ABSL_GUARDED_BY(mu_);
  uint64_t dirty_nodes_ ABSL_GUARDED_BY(mu_) = 0;
  // Bounce buffers for Read/Write batches, reused so the hot path neither
  // maps nor zeroes fresh memory per call. The read one also serves the
  // read half of a write's read-modify-write.
  AlignedBuffer read_scratch_ ABSL_GUARDED_BY(mu_);
  AlignedBuffer write_scratch_ ABSL_GUARDED_BY(mu_);
  std::vector<Digest> empty_digests_;  // [0] = zero chunk, [1+l] = level l
  Stats stats_ ABSL_GUARDED_BY(mu_);
  PoolTuning tuning_ ABSL_GUARDED_BY(mu_);
};

}  // namespace blockstore

#endif  // TANDEM_BLOCKSTORE_POOL_H_
