// A Pool is one file or block device holding volumes: arrays of fixed-size
// chunks with O(1) copy-on-write snapshots. Metadata is a copy-on-write radix
// tree per volume (format.h); changes accumulate in memory and commit as a
// transaction group on Flush(), on every snapshot/volume operation, and when
// enough metadata is dirty. A crash at any point leaves the pool exactly as of
// the last commit.
//
// Threads: every method may be called from any thread, and calls run
// concurrently: a pool-wide mutex guards the bookkeeping (catalog, trees,
// space map, node cache), never device I/O or the hashing of data. Reads
// resolve their chunks under it and read and verify them outside it;
// writes hash and write their data outside it and install the new entries
// under it; a commit freezes the transaction under it and writes it outside
// it while new writes fill the next one. Writes overlapping the same chunk
// are applied one after the other, in the order they took the lock. The Io
// passed in must outlive the Pool.
//
// The parts: the space map (space_map.h: reference counts, holds,
// allocation), the node cache (node_cache.h), the catalog codec
// (catalog.h); the trees, the commit and the data paths are here, in
// pool.cc (facade, data paths), pool_tree.cc (copy-on-write tree),
// pool_commit.cc (open and commit), pool_diff.cc and pool_check.cc.
//
// Errors: NotFound (no such volume/snapshot), AlreadyExists, InvalidArgument
// (bad name, size or offset), OutOfRange (I/O past the end of a volume),
// ResourceExhausted (pool full), FailedPrecondition (read-only pool, volume
// has snapshots), DataLoss (checksum or digest mismatch, device error). After
// a device error in a mutating call the Pool refuses further calls with that
// error; reopening it returns to the last commit.
#ifndef TANDEM_BLOCKSTORE_POOL_H_
#define TANDEM_BLOCKSTORE_POOL_H_

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "blockstore/catalog.h"
#include "blockstore/format.h"
#include "blockstore/hash.h"
#include "blockstore/io.h"
#include "blockstore/mutex.h"
#include "blockstore/node_cache.h"
#include "blockstore/space_map.h"
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
  class Group;  // below: changes of several calls committed as one

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
  // Waits for the volume's writes in flight: none is pending on return.
  absl::Status SetVolumeReadOnly(absl::string_view name, bool read_only,
                                 const Group* group = nullptr);
  // Shrinking discards data past the new end; snapshots keep theirs.
  absl::Status ResizeVolume(absl::string_view name, uint64_t size_bytes);
  // FailedPrecondition if the volume has snapshots, unless `with_snapshots`.
  absl::Status DeleteVolume(absl::string_view name, bool with_snapshots,
                            const Group* group = nullptr);

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
    // The data's XXH3-128 where the caller has it checked already (a
    // received chunk): not computed again. Null: computed here.
    const Digest* digest = nullptr;
  };
  absl::Status WriteChunks(absl::string_view volume,
                           std::span<const ChunkWrite> writes);

  // Reads the live volume, or `snapshot` of it when non-empty. Every data
  // chunk is checked against its digest (DataLoss on mismatch). A read of a
  // snapshot or of a read-only volume (a mirror destination, which a
  // receive may replace meanwhile) returns one tree's content, however
  // large.
  absl::Status Read(absl::string_view volume, absl::string_view snapshot,
                    uint64_t offset_bytes, std::span<std::byte> out);
  // Trimmed bytes read as zeros; whole chunks in the range free their space.
  absl::Status Trim(absl::string_view volume, uint64_t offset_bytes,
                    uint64_t length_bytes);
  // Commits the open transaction (no-op when nothing changed).
  absl::Status Flush();
  // On a pool in a file (Io::in_file_system), flushes the data written so
  // far without committing anything, so that the file system's allocations
  // for it are made durable while the writer waits for more (a receive
  // paced by its stream): the commit's own flush then has little left to
  // do. A hint, never needed for safety; nothing on a block device or in
  // memory. A failure stops the pool handle, as a failed commit does (an
  // error a flush reported may not be reported again).
  absl::Status SyncAhead() ABSL_LOCKS_EXCLUDED(mu_);

  // Snapshots: O(1) in the volume size; committed on return. `owner` (at
  // most 64 bytes) is kept with it (SnapshotInfo::owner).
  absl::StatusOr<SnapshotInfo> CreateSnapshot(absl::string_view volume,
                                              absl::string_view name,
                                              absl::string_view owner = {});
  absl::StatusOr<std::vector<SnapshotInfo>> ListSnapshots(
      absl::string_view volume);
  absl::StatusOr<SnapshotInfo> GetSnapshot(absl::string_view volume,
                                           absl::string_view name);
  absl::Status DeleteSnapshot(absl::string_view volume, absl::string_view name,
                              const Group* group = nullptr);
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

  // Tree nodes every Diff of this pool has read so far (a diff's cost).
  uint64_t diff_nodes_visited() const {
    return diff_nodes_visited_.load(std::memory_order_relaxed);
  }

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
                                             const Digest& expected,
                                             const Group* group = nullptr);

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
  // Commits pending changes first and checks that commit, without holding
  // the pool's lock while it reads: other calls go on meanwhile.
  struct CheckReport {
    std::vector<std::string> problems;  // empty = consistent
    std::vector<std::string> notes;     // expected after a crash, not errors
    uint64_t nodes_checked = 0;
    uint64_t chunks_checked = 0;  // data chunks re-hashed
  };
  absl::StatusOr<CheckReport> Check(bool verify_data);

  // Pool properties: small named strings kept in the catalog, for the layers
  // above (replication keeps its relationship records here). An empty value
  // removes the key. Committed on return (unless `group`, see Group).
  absl::Status SetProperty(absl::string_view key, absl::string_view value,
                           const Group* group = nullptr);
  std::map<std::string, std::string> Properties();

  // Changes of several calls committed together, atomically and once. One
  // caller owns it: DeleteSnapshot, SetProperty and SetVolumeReadOnly given
  // the group do not commit one by one, Commit() commits them; DeleteVolume
  // and FinishReceive given it commit as usual, taking the group's changes
  // with them. While a group is open, every other caller's commit (and
  // Check) waits for it to end (a commit forced by a full pool excepted), so
  // nothing of the group reaches the disk half done; a second BeginGroup
  // waits too (so a caller never opens two at once). Ending without Commit
  // (destruction) leaves its changes to the next commit.
  class Group {
   public:
    Group(Group&& other) noexcept
        : pool_(std::exchange(other.pool_, nullptr)), id_(other.id_) {}
    Group& operator=(Group&&) = delete;
    Group(const Group&) = delete;
    ~Group();
    absl::Status Commit();

   private:
    friend class Pool;
    Group(Pool* pool, uint64_t id) : pool_(pool), id_(id) {}
    Pool* pool_;
    uint64_t id_;
  };
  Group BeginGroup();

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
    uint64_t reads_in_flight = 0;  // holding a read ticket now
  };
  Stats stats();

 private:
  using VolumeRec = CatalogVolume;
  using SnapshotRec = CatalogSnapshot;

  // Nodes an operation read from disk outside the lock, by id: used where
  // the shared cache no longer holds them (it may have evicted them since).
  // Valid while the operation holds its read ticket: ids it reached are not
  // reused before it ends, and a node on disk never changes in place (the
  // cache, where it still holds one, holds the same: NodeRef).
  using Loaded = std::unordered_map<uint64_t, NodeRef>;
  // A node the walk needs that is in neither the cache nor `Loaded`.
  struct Missing {
    uint64_t id;
    int level;
  };
  // A read ticket (SpaceMap::BeginRead) held by one operation.
  class ReadTicket;
  // Chunks of a volume that a write in flight owns (see WriteGuard).
  struct InFlightWrite {
    std::string volume;
    uint64_t first = 0;
    uint64_t last = 0;
  };
  class WriteGuard;
  // How a commit treats the lock while it writes.
  enum class CommitLock {
    kRelease,  // written outside the lock; the caller looks everything up
               // again afterwards
    kHold,     // written with the lock held throughout (the check, a
               // commit forced by a full pool in the middle of a call)
  };

  Pool(Io& io, std::unique_ptr<Io> owned, OpenMode mode);

  // `repair`: open read-write even with damaged counts (see Repair).
  absl::Status LoadLocked(bool repair = false)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The reference-count table, into space_ (LoadLocked's second part).
  absl::Status LoadCountsLocked(bool repair) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Loads it if a read-only open has not yet.
  absl::Status EnsureCountsLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  static absl::StatusOr<Repaired> RepairPool(std::unique_ptr<Pool> pool);
  absl::Status FormatLocked(const CreatePoolOptions& options)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void InitDigests();
  absl::Status CheckWritable() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status Fail(absl::Status s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<VolumeRec*> FindVolume(absl::string_view name)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // FindVolume, and FailedPrecondition if the volume is read-only.
  absl::StatusOr<VolumeRec*> FindWritableVolume(absl::string_view name)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<const SnapshotRec*> FindSnapshot(const VolumeRec& v,
                                                  absl::string_view name)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  SnapshotInfo InfoOf(const VolumeRec& v, const SnapshotRec& s) const;
  // A group other than `group` is open.
  bool OtherGroupOpen(const Group* group) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return open_group_ != 0 && (group == nullptr || group->id_ != open_group_);
  }
  bool InGroup(const Group* group) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return group != nullptr && group->id_ == open_group_;
  }
  void EndGroup(uint64_t id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Tree shape.
  uint64_t ChunkCount(uint64_t size_bytes) const;
  uint64_t BatchChunks() const;
  static int Depth(uint64_t chunk_count);
  Digest EmptyDigest(int level) const;  // an empty subtree at `level`
  Digest NullEntryDigest(int node_level) const;
  Digest VolumeDigest(const Entry& root, uint64_t size_bytes) const;
  bool ValidNodeId(uint64_t id) const {
    return id >= shape_.meta_start &&
           id < shape_.meta_start + shape_.meta_count;
  }

  // References (the space map, through tree pointers).
  absl::StatusOr<uint64_t> AllocNode() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void IncRef(uint64_t ptr, int level) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // `level` is the level of the node holding the pointer: 0 = data chunk.
  // A node it frees is looked for in `loaded` (PrefetchExclusive) before
  // it is read with the lock held.
  absl::Status DecRef(uint64_t ptr, int level, Loaded* loaded = nullptr)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Drops a data chunk's reference; `why` says what the chunk becomes once
  // free: reused first (an overwrite's) or given back (space_map.h).
  absl::Status DropChunk(uint64_t ptr, SpaceMap::Freed why)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status DecRefNode(uint64_t id, int level, Loaded* loaded = nullptr)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Reads, outside the lock and a batch per level, the nodes that dropping
  // one reference to the tree `root` (of `depth` levels) would free (those
  // only it holds), up to kMaxPrefetchNodes, into `loaded`. Best effort:
  // what changes meanwhile is read under the lock by DecRef. The caller
  // holds a read ticket.
  static constexpr size_t kMaxPrefetchNodes = 4096;
  absl::Status PrefetchExclusive(const Entry& root, int depth, Loaded& loaded)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Room for `chunks` new chunks and `nodes` new nodes, committing (lock
  // held) first if space the open transaction freed would make it, and
  // waiting for reads that hold freed space back. The caller holds no read
  // ticket.
  absl::Status EnsureSpace(uint64_t chunks, uint64_t nodes)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Free runs of data chunks of at least this many bytes go back to the disk
  // (Io::Discard) once freed.
  static constexpr uint64_t kDiscardMinBytes = 1 << 20;
  // Discards free runs around the chunks freed since the last call; the
  // lock is dropped while the disk works.
  void DiscardFreed(CommitLock lock) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void TrimCache() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Nodes (pool_tree.cc).
  // The node `id` if it is in memory: the cache, else `loaded` (may be
  // null); null if in neither.
  const Node* InMemory(uint64_t id, const Loaded* loaded)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The node `id` at `level`: from the cache, else from `loaded` (moved
  // into the cache), else read from disk with the lock held (a path the
  // data paths avoid by walking first).
  absl::StatusOr<Node*> Load(uint64_t id, int level, Loaded* loaded = nullptr)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Reads `missing` from disk with the lock dropped, decoding and checking
  // them outside it too, into `loaded`. The caller holds a read ticket.
  absl::Status LoadMissing(std::vector<Missing>& missing, Loaded& loaded)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Leaf entries of `chunks` of the tree `root` of a volume of `size_bytes`
  // (chunks past its end read as unmapped), through the cache and `loaded`
  // only: what is in neither is added to `missing`, its entries left unset.
  // True if nothing was missing.
  absl::StatusOr<bool> WalkCached(const Entry& root, uint64_t size_bytes,
                                  std::span<const uint64_t> chunks,
                                  Loaded& loaded, std::vector<Entry>& out,
                                  std::vector<Missing>& missing)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Reads the nodes `ids` (all at `level`) that are not cached in one batch:
  // into `loaded` with the lock dropped, or, without `loaded`, into the
  // cache with the lock held (a walk over nodes that may change meanwhile).
  absl::Status Prefetch(std::vector<uint64_t>& ids, int level, Loaded* loaded)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A new dirty node at `level`, born in the open transaction, its id
  // allocated (count 1), its entries for the caller to fill.
  absl::StatusOr<NodeRef> NewNode(int level) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Makes the node `ref` points at (at `level`) writable, copying it if it
  // is shared or already on disk, materializing it if empty; updates `ref`.
  absl::StatusOr<Node*> Cow(Entry& ref, int level, Loaded* loaded)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<Entry*> LeafEntryForWrite(VolumeRec& v, uint64_t chunk,
                                           Loaded* loaded)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status TrimChunks(Entry& ref, int level, uint64_t base, uint64_t first,
                          uint64_t end) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status ResizeLocked(VolumeRec& v, uint64_t size_bytes)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Recomputes digests below `ref` and folds empty dirty nodes into empty
  // pointers.
  absl::Status UpdateDigests(Entry& ref, int level)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status UpdateAllDigests() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Data paths (pool.cc). The lock is held on entry and exit and dropped
  // inside for device I/O and hashing.
  // Resolves `chunks` of `volume` (live, or the snapshot whose root and
  // size are given) to their leaf entries, walking the tree in rounds: each
  // round walks from the root under the lock, and reads what it lacked
  // outside it. The caller holds a read ticket.
  absl::Status ResolveLocked(absl::string_view volume, const Entry* root,
                             uint64_t size_bytes,
                             std::span<const uint64_t> chunks, Loaded& loaded,
                             std::vector<Entry>& out)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status ReadLocked(absl::string_view volume, const Entry* root,
                          uint64_t size_bytes, absl::string_view what,
                          uint64_t offset_bytes, std::span<std::byte> out)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Writes `data` at `offset_bytes` of `volume`, whose chunks in the range
  // the caller's WriteGuard owns.
  absl::Status WriteLocked(absl::string_view volume, uint64_t offset_bytes,
                           std::span<const std::byte> data)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // One chunk to place: its new content, hashed outside the lock.
  struct Placement {
    uint64_t chunk = 0;
    std::span<const std::byte> data;  // one whole chunk
    bool zero = false;
    Digest digest = {};
    bool hashed = false;  // `digest` given by the caller
    uint64_t phys = 0;    // reserved chunk (not zero)
  };
  // Hashes `p` (outside the lock), reserves chunks, writes them (outside),
  // walks and installs the entries: the write path's common part.
  absl::Status PlaceLocked(absl::string_view volume, std::vector<Placement>& p)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status TrimLocked(absl::string_view volume, uint64_t offset_bytes,
                          uint64_t length_bytes)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Commit (pool_commit.cc). Waits for a commit in flight, and unless `by`
  // is the open group or `lock` is kHold for a group to end, then commits
  // the open transaction (no-op when nothing changed).
  absl::Status CommitLocked(CommitLock lock = CommitLock::kRelease,
                            const Group* by = nullptr)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status MaybeCommit() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  struct DiffState;
  struct WalkRef {
    Entry e;
    bool above_root = false;  // a level above the real root (depths differ)
    int root_level = 0;       // the real root's level when above_root

    // A node on disk to read (not an empty subtree, not above the root).
    bool HasNode() const { return !above_root && e.ptr != 0; }
    // The very same subtree: the same pointer and birth (node ids are
    // reused only after a free, and a rewrite always carries a newer birth).
    bool SameAs(const WalkRef& o) const {
      return !above_root && !o.above_root && e.ptr == o.e.ptr &&
             e.birth == o.e.birth;
    }
  };
  absl::Status DiffWalk(DiffState& st, const WalkRef& b, const WalkRef& t,
                        int level, uint64_t base)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<std::array<WalkRef, kFanout>> Children(const WalkRef& ref,
                                                        int level,
                                                        DiffState& st)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The children of `ref` at `level` given its node (null: none, or above
  // the root).
  static std::array<WalkRef, kFanout> ChildrenOf(const WalkRef& ref, int level,
                                                 const Node* node);
  // Reads, a level at a time, the nodes DiffWalk(st, b, t, top, 0) will
  // visit (bounded by kMaxPrefetchNodes and st.max_data).
  absl::Status PrefetchDiff(DiffState& st, const WalkRef& b, const WalkRef& t,
                            int top) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  struct CheckState;
  // Walks the catalog and every tree of `st` (a copy, as of a commit) from
  // disk into `st` (computed counts, problems). Needs no lock: the caller
  // holds a read ticket from that commit on.
  void CheckAllTrees(CheckState& st);
  void CheckRoot(CheckState& st, const Entry& root, uint64_t size_bytes,
                 const std::string& where);
  // The check's walk, without the lock: superblocks, trees, counts against
  // `counts`, and with `verify_data` every chunk's digest.
  void Walk(CheckState& st, const Superblock& sb,
            const std::vector<uint32_t>& counts,
            const std::string& count_damage, bool verify_data);
  // Replaces the loaded counts by those of a walk of every tree.
  absl::Status RebuildCounts() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::optional<Digest> CheckTree(CheckState& st, uint64_t id, int level,
                                  uint64_t base, uint64_t chunk_count,
                                  uint64_t parent_birth,
                                  const std::string& where);

  std::unique_ptr<Io> owned_io_;
  Io& device_;                  // the Io the pool was opened on
  std::unique_ptr<Io> tagged_;  // device_, marking each error as the device's
  Io& io_;                      // *tagged_: all pool I/O goes through it
  const OpenMode mode_;

  // Checked by clang's -Wthread-safety (blockstore/mutex.h).
  mutable Mutex mu_;
  std::atomic<uint64_t> diff_nodes_visited_{0};
  // Signalled when a commit ends, a group ends or a write in flight ends.
  CondVar cv_;
  // The layout (chunk size, where metadata and data lie): fixed when the
  // pool is formatted or opened, before anyone else sees it, so read
  // without the lock. sb_ is the rest of the last commit's superblock.
  Superblock shape_;
  std::vector<Digest> empty_digests_;  // [0] = zero chunk, [1+l] = level l
  absl::Status failed_ ABSL_GUARDED_BY(mu_);
  Superblock sb_ ABSL_GUARDED_BY(mu_);
  uint64_t gen_ ABSL_GUARDED_BY(mu_) = 0;  // open transaction
  bool changed_ ABSL_GUARDED_BY(mu_) = false;
  Catalog catalog_ ABSL_GUARDED_BY(mu_);
  std::vector<uint64_t> catalog_nodes_ ABSL_GUARDED_BY(mu_);
  // The catalog as of the last commit (none before the first): a
  // transaction that ends where it began (a refused receive dropping its
  // staging volume, say) commits nothing.
  std::optional<std::string> committed_catalog_ ABSL_GUARDED_BY(mu_);
  // What LoadLocked found damaged in the reference-count table (the counts
  // were rebuilt from the trees); empty when none was.
  std::string count_damage_ ABSL_GUARDED_BY(mu_);
  uint64_t open_group_ ABSL_GUARDED_BY(mu_) = 0;  // its id; 0 = none
  uint64_t next_group_ ABSL_GUARDED_BY(mu_) = 1;
  bool committing_ ABSL_GUARDED_BY(mu_) = false;  // a commit is writing
  std::vector<InFlightWrite> writes_ ABSL_GUARDED_BY(mu_);

  SpaceMap space_ ABSL_GUARDED_BY(mu_);
  // False until the table is in space_: a read-only pool loads it only for
  // Info and Check (reads and diffs never use it).
  bool counts_loaded_ ABSL_GUARDED_BY(mu_) = false;
  // Pages the last commit changed: the next one, writing the other table
  // copy, writes them too.
  std::vector<uint64_t> prev_dirty_pages_ ABSL_GUARDED_BY(mu_);
  // Commits that must still write the whole table: 2 after format (both
  // copies start blank). After open, the pages where the two copies differ
  // start in prev_dirty_pages_ instead.
  int full_table_writes_ ABSL_GUARDED_BY(mu_) = 0;

  NodeCache cache_ ABSL_GUARDED_BY(mu_);
  Stats stats_ ABSL_GUARDED_BY(mu_);
  PoolTuning tuning_ ABSL_GUARDED_BY(mu_);
};

}  // namespace blockstore

#endif  // TANDEM_BLOCKSTORE_POOL_H_
