// Pool: the facade (validation, locking, the sticky failure) and the data
// paths. The trees are in pool_tree.cc, opening and committing in
// pool_commit.cc, Diff and the receive side in pool_diff.cc, the check in
// pool_check.cc.
#include "blockstore/pool.h"

#include <sys/random.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <limits>

#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "blockstore/pool_internal.h"
#include "blockstore/util.h"

namespace blockstore {

using internal::IsStaging;
using internal::kMaxVolumeBytes;
using internal::NowNs;
using internal::RandomGuid;
using internal::ValidName;

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

// ---------------------------------------------------------------------------
// Validation and the sticky failure

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
  auto it = catalog_.volumes.find(name);
  if (it == catalog_.volumes.end()) {
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

// ---------------------------------------------------------------------------
// The pool

PoolInfo Pool::Info() {
  MutexLock lock(mu_);
  PoolInfo info;
  info.device = io_.name();
  info.io = DescribeFileIo(device_);
  info.pool_guid = sb_.pool_guid;
  info.chunk_size_bytes = shape_.chunk_size;
  info.capacity_bytes = shape_.data_count * shape_.chunk_size;
  // Read-only with the table not loaded: the totals the last commit wrote
  // in its superblock, exact while nothing can change them.
  const uint64_t used_chunks =
      counts_loaded_ ? space_.used_chunks() : sb_.used_chunks;
  const uint64_t used_nodes =
      counts_loaded_ ? space_.used_nodes() : sb_.used_nodes;
  info.used_bytes = used_chunks * shape_.chunk_size;
  info.free_bytes = info.capacity_bytes - info.used_bytes;
  info.metadata_capacity_bytes = shape_.meta_count * kNodeSize;
  info.metadata_used_bytes = used_nodes * kNodeSize;
  info.generation = sb_.generation;
  info.volume_count = catalog_.volumes.size();
  for (const auto& [name, v] : catalog_.volumes) {
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
  s.reads_in_flight = space_.readers();
  return s;
}

absl::Status Pool::Flush() {
  MutexLock lock(mu_);
  if (absl::Status s = CheckWritable(); !s.ok()) return s;
  return Fail(CommitLocked());
}

absl::Status Pool::SyncAhead() {
  {
    MutexLock lock(mu_);
    if (absl::Status s = CheckWritable(); !s.ok()) return s;
  }
  if (!io_.in_file_system()) return absl::OkStatus();
  absl::Status s = io_.Flush();  // outside the lock: writes go on meanwhile
  if (s.ok()) return s;
  MutexLock lock(mu_);
  return Fail(std::move(s));
}

absl::Status Pool::SetProperty(absl::string_view key, absl::string_view value,
                               const Group* group) {
  MutexLock lock(mu_);
  if (absl::Status s = CheckWritable(); !s.ok()) return s;
  if (key.empty() || key.size() > kMaxPropertyKeyBytes ||
      value.size() > kMaxPropertyValueBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("pool property '", key.substr(0, 40),
                     "': the key must be 1-", kMaxPropertyKeyBytes,
                     " bytes and the value at most ", kMaxPropertyValueBytes));
  }
  auto& properties = catalog_.properties;
  auto unchanged = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    auto it = properties.find(key);
    return value.empty() ? it == properties.end()
                         : it != properties.end() && it->second == value;
  };
  if (unchanged()) return absl::OkStatus();
  // Before the change: EnsureSpace may commit, and a refused call must
  // commit nothing of its own.
  if (absl::Status s = EnsureSpace(0, 0); !s.ok()) return s;
  if (unchanged()) return absl::OkStatus();
  auto it = properties.find(key);
  if (value.empty()) {
    properties.erase(it);
  } else {
    properties[std::string(key)] = std::string(value);
  }
  changed_ = true;
  if (InGroup(group)) return absl::OkStatus();
  return Fail(CommitLocked(CommitLock::kRelease, group));
}

std::map<std::string, std::string> Pool::Properties() {
  MutexLock lock(mu_);
  return {catalog_.properties.begin(), catalog_.properties.end()};
}

// ---------------------------------------------------------------------------
// Volumes

absl::Status Pool::CreateVolume(absl::string_view name, uint64_t size_bytes) {
  MutexLock lock(mu_);
  if (absl::Status s = CheckWritable(); !s.ok()) return s;
  if (absl::Status s = ValidName(name, "volume"); !s.ok()) return s;
  auto exists = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return catalog_.volumes.contains(name)
               ? absl::AlreadyExistsError(absl::StrCat(
                     "volume '", name, "' already exists in pool ", io_.name()))
               : absl::OkStatus();
  };
  if (absl::Status s = exists(); !s.ok()) return s;
  if (size_bytes == 0 || size_bytes > kMaxVolumeBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("bad size ", size_bytes, " for volume '", name,
                     "': must be from 1 byte to 1 EiB"));
  }
  if (absl::Status s = EnsureSpace(0, 1); !s.ok()) return s;
  if (absl::Status s = exists(); !s.ok()) return s;
  VolumeRec v;
  v.name = std::string(name);
  v.guid = RandomGuid();
  v.create_time_ns = NowNs();
  v.size_bytes = size_bytes;
  v.root = {0, gen_, {}};
  catalog_.volumes.emplace(v.name, std::move(v));
  changed_ = true;
  return Fail(CommitLocked());
}

absl::StatusOr<std::vector<VolumeInfo>> Pool::ListVolumes() {
  MutexLock lock(mu_);
  std::vector<VolumeInfo> out;
  for (const auto& [name, v] : catalog_.volumes) {
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

absl::Status Pool::SetVolumeReadOnly(absl::string_view name, bool read_only,
                                     const Group* group) {
  MutexLock lock(mu_);
  if (absl::Status s = CheckWritable(); !s.ok()) return s;
  // No write in flight may land after the volume turned read-only.
  WriteGuard guard(*this, name, 0, internal::kWholeVolume);
  absl::StatusOr<VolumeRec*> v = FindVolume(name);
  if (!v.ok()) return v.status();
  if ((*v)->read_only == read_only) return absl::OkStatus();
  if (absl::Status s = EnsureSpace(0, 0); !s.ok()) return s;
  v = FindVolume(name);
  if (!v.ok()) return v.status();
  (*v)->read_only = read_only;
  changed_ = true;
  guard.Release();
  if (InGroup(group)) return absl::OkStatus();
  return Fail(CommitLocked(CommitLock::kRelease, group));
}

absl::Status Pool::ResizeVolume(absl::string_view name, uint64_t size_bytes) {
  MutexLock lock(mu_);
  if (absl::Status s = CheckWritable(); !s.ok()) return s;
  if (size_bytes == 0 || size_bytes > kMaxVolumeBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("bad size ", size_bytes, " for volume '", name,
                     "': must be from 1 byte to 1 EiB"));
  }
  absl::Status s;
  {
    WriteGuard guard(*this, name, 0, internal::kWholeVolume);
    absl::StatusOr<VolumeRec*> v = FindWritableVolume(name);
    if (!v.ok()) return v.status();
    const uint64_t old_size = (*v)->size_bytes;
    if (size_bytes == old_size) return absl::OkStatus();
    if (s = EnsureSpace(1, kMaxDepth * 2 + 2); !s.ok()) return s;
    // Everything past the new end must read as zeros should the volume grow
    // again (and the digest stays canonical): trim it first.
    if (size_bytes < old_size) {
      s = TrimLocked(name, size_bytes, old_size - size_bytes);
    }
    if (s.ok()) {
      absl::StatusOr<VolumeRec*> found = FindVolume(name);
      s = found.ok() ? ResizeLocked(**found, size_bytes) : found.status();
    }
  }
  if (!s.ok()) return Fail(s);
  // A receive's staging volume reaches the disk with its data (automatic
  // commits) or with FinishReceive, like its writes: a refused receive then
  // leaves nothing to undo.
  if (IsStaging(name)) return Fail(MaybeCommit());
  return Fail(CommitLocked());
}

absl::Status Pool::DeleteVolume(absl::string_view name, bool with_snapshots,
                                const Group* group) {
  MutexLock lock(mu_);
  if (absl::Status s = CheckWritable(); !s.ok()) return s;
  WriteGuard guard(*this, name, 0, internal::kWholeVolume);
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
  catalog_.volumes.erase(catalog_.volumes.find(name));
  changed_ = true;
  guard.Release();
  return Fail(CommitLocked(CommitLock::kRelease, group));
}

// ---------------------------------------------------------------------------
// Reads

absl::Status Pool::ResolveLocked(absl::string_view volume, const Entry* root,
                                 uint64_t size_bytes,
                                 std::span<const uint64_t> chunks,
                                 Loaded& loaded, std::vector<Entry>& out) {
  std::vector<Missing> missing;
  for (;;) {
    Entry now;
    uint64_t size = size_bytes;
    if (root != nullptr) {
      now = *root;
    } else {
      // The live volume: its tree may have changed while the lock was out.
      absl::StatusOr<VolumeRec*> v = FindVolume(volume);
      if (!v.ok()) return v.status();
      now = (*v)->root;
      size = (*v)->size_bytes;
    }
    absl::StatusOr<bool> complete =
        WalkCached(now, size, chunks, loaded, out, missing);
    if (!complete.ok()) return complete.status();
    if (*complete) return absl::OkStatus();
    if (absl::Status s = LoadMissing(missing, loaded); !s.ok()) return s;
  }
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
  // A read-only volume changes only when a receive replaces its tree (a
  // mirror's update): every batch of the read walks the tree it began in,
  // so a read spanning batches never mixes two updates. The ticket, taken
  // under this same lock, keeps that tree's nodes and chunks from reuse.
  // A writable volume's batches walk its tree as it is then (its open
  // transaction's nodes change in place).
  const bool pinned = !snapshot.empty() || (*v)->read_only;
  absl::Status s;
  {
    ReadTicket ticket(*this);
    s = ReadLocked(volume, pinned ? &root : nullptr, size, what, offset_bytes,
                   out);
  }
  TrimCache();
  return s;
}

absl::Status Pool::ReadLocked(absl::string_view volume, const Entry* root,
                              uint64_t size_bytes, absl::string_view what,
                              uint64_t offset_bytes, std::span<std::byte> out) {
  const uint64_t c_size = shape_.chunk_size;
  const uint64_t end = offset_bytes + out.size();
  Loaded loaded;
  std::vector<uint64_t> chunks;
  std::vector<Entry> entries;
  std::vector<ReadOp> ops;
  AlignedBuffer bounce;  // for chunks the caller's buffer cannot take whole
  for (uint64_t pos = offset_bytes; pos < end;) {
    const uint64_t first = pos / c_size;
    const uint64_t last =
        std::min((end - 1) / c_size, first + BatchChunks() - 1);
    const uint64_t n = last - first + 1;
    const uint64_t batch_end = std::min(end, (last + 1) * c_size);
    chunks.clear();
    for (uint64_t c = first; c <= last; ++c) chunks.push_back(c);
    if (absl::Status s =
            ResolveLocked(volume, root, size_bytes, chunks, loaded, entries);
        !s.ok()) {
      return s;
    }
    // Whole chunks land straight in an aligned caller buffer; the rest go
    // through the bounce buffer.
    auto direct = [&](uint64_t c) {
      const uint64_t cb = c * c_size;
      const std::byte* user = out.data() + (std::max(cb, pos) - offset_bytes);
      return pos <= cb && cb + c_size <= batch_end &&
             reinterpret_cast<uintptr_t>(user) % kIoAlign == 0;
    };
    bool any_bounced = false;
    for (uint64_t c = first; c <= last; ++c) any_bounced |= !direct(c);
    if (any_bounced && bounce.size() < n * c_size) {
      bounce = AlignedBuffer::Uninitialized(n * c_size);
    }
    auto dst_of = [&](uint64_t c) {
      return direct(c) ? out.data() + (c * c_size - offset_bytes)
                       : bounce.data() + (c - first) * c_size;
    };

    // Outside the lock: the device read, the digest check, the copies.
    // What the entries point at stays until the read ticket is given back.
    mu_.unlock();
    absl::Status s;
    ops.clear();
    uint64_t prev_phys = 0;
    for (uint64_t c = first; c <= last; ++c) {
      const Entry& e = entries[c - first];
      std::byte* dst = dst_of(c);
      if (!IsDataPtr(e.ptr)) {
        std::memset(dst, 0, c_size);
        continue;
      }
      if (!ops.empty() && e.ptr == prev_phys + 1 &&
          ops.back().out.data() + ops.back().out.size() == dst) {
        ops.back().out = {ops.back().out.data(),
                          ops.back().out.size() + c_size};
      } else {
        ops.push_back({e.ptr * c_size, {dst, c_size}});
      }
      prev_phys = e.ptr;
    }
    s = io_.Read(ops);
    for (uint64_t c = first; c <= last && s.ok(); ++c) {
      const Entry& e = entries[c - first];
      if (IsDataPtr(e.ptr) && Hash128({dst_of(c), c_size}) != e.digest) {
        s = absl::DataLossError(
            absl::StrCat("'", what, "' chunk ", c, " (pool chunk ", e.ptr,
                         "): data does not match its digest"));
      }
    }
    for (uint64_t c = first; c <= last && s.ok(); ++c) {
      if (direct(c)) continue;
      const uint64_t cb = c * c_size;
      const uint64_t from = std::max(cb, pos);
      const uint64_t to = std::min(cb + c_size, batch_end);
      std::memcpy(out.data() + (from - offset_bytes), dst_of(c) + (from - cb),
                  to - from);
    }
    mu_.lock();
    if (!s.ok()) return s;
    pos = batch_end;
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------
// Writes

absl::Status Pool::PlaceLocked(absl::string_view volume,
                               std::vector<Placement>& places) {
  const uint64_t c_size = shape_.chunk_size;
  // 1. Outside the lock: which chunks are zeros, and the others' digests.
  mu_.unlock();
  for (Placement& p : places) {
    p.zero = IsAllZero(p.data);
    if (p.zero) {
      p.digest = NullEntryDigest(0);
    } else if (!p.hashed) {
      p.digest = Hash128(p.data);
    }
  }
  mu_.lock();

  // 2. Room, and a reserved chunk for each that is not zeros.
  uint64_t data_chunks = 0;
  for (const Placement& p : places) data_chunks += p.zero ? 0 : 1;
  {
    absl::StatusOr<VolumeRec*> v = FindVolume(volume);
    if (!v.ok()) return v.status();
    const int depth = Depth(ChunkCount((*v)->size_bytes));
    if (absl::Status s =
            EnsureSpace(data_chunks, depth * (places.size() / kFanout + 2));
        !s.ok()) {
      return s;
    }
  }
  size_t reserved = 0;
  auto unreserve = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    for (size_t i = 0; i < places.size(); ++i) {
      if (!places[i].zero && places[i].phys != 0) {
        space_.Unreserve(places[i].phys);
        places[i].phys = 0;
      }
    }
  };
  for (Placement& p : places) {
    if (p.zero) continue;
    std::optional<uint64_t> phys = space_.ReserveChunk();
    if (!phys) {
      unreserve();
      return absl::ResourceExhaustedError(
          absl::StrCat("pool ", io_.name(), " is full"));
    }
    p.phys = *phys;
    ++reserved;
  }

  // 3. Outside the lock: the data goes to its new chunks. Nothing points
  // at them yet, so no reader sees them half written.
  std::vector<WriteOp> ops;
  for (const Placement& p : places) {
    if (p.zero) continue;
    if (!ops.empty() &&
        ops.back().offset_bytes + ops.back().data.size() == p.phys * c_size &&
        ops.back().data.data() + ops.back().data.size() == p.data.data()) {
      ops.back().data = {ops.back().data.data(),
                         ops.back().data.size() + c_size};
    } else {
      ops.push_back({p.phys * c_size, p.data});
    }
  }
  mu_.unlock();
  absl::Status written = io_.Write(ops);
  mu_.lock();
  if (!written.ok()) {
    unreserve();
    return written;
  }
  stats_.data_bytes_written += reserved * c_size;

  // 4. The tree: read the nodes on the way (outside the lock, a batch per
  // level), then copy-on-write the paths and install the entries.
  std::vector<uint64_t> chunks;
  for (const Placement& p : places) chunks.push_back(p.chunk);
  ReadTicket ticket(*this);  // the walk reads nodes outside the lock
  Loaded loaded;
  std::vector<Entry> old;
  std::vector<Missing> missing;
  absl::StatusOr<VolumeRec*> v = FindVolume(volume);
  for (;;) {
    if (!v.ok()) break;
    absl::StatusOr<bool> complete =
        WalkCached((*v)->root, (*v)->size_bytes, chunks, loaded, old, missing);
    if (!complete.ok()) {
      v = complete.status();
      break;
    }
    if (*complete) break;
    if (absl::Status s = LoadMissing(missing, loaded); !s.ok()) {
      v = s;
      break;
    }
    v = FindVolume(volume);
  }
  if (!v.ok()) {
    unreserve();
    return v.status();
  }
  for (size_t i = 0; i < places.size(); ++i) {
    Placement& p = places[i];
    absl::StatusOr<Entry*> e = LeafEntryForWrite(**v, p.chunk, &loaded);
    // Zeros give the old chunk's space back; new bytes need it again.
    absl::Status s =
        e.ok() ? DropChunk((*e)->ptr, p.zero ? SpaceMap::Freed::kGiveBack
                                             : SpaceMap::Freed::kReuse)
               : e.status();
    if (!s.ok()) {
      unreserve();
      return s;
    }
    Entry& entry = **e;
    if (p.zero) {
      entry.ptr = kPhysZero;
    } else {
      space_.Install(p.phys);
      entry.ptr = p.phys;
      p.phys = 0;  // installed: no longer this call's to give back
    }
    entry.birth = gen_;
    entry.digest = p.digest;
  }
  changed_ = true;
  return absl::OkStatus();
}

absl::Status Pool::WriteLocked(absl::string_view volume, uint64_t offset_bytes,
                               std::span<const std::byte> data) {
  WritePathReads own_reads;  // the tree it rewrites, partial chunks' rest
  const uint64_t c_size = shape_.chunk_size;
  const uint64_t end = offset_bytes + data.size();
  std::vector<Placement> places;
  AlignedBuffer bounce;  // partial or unaligned chunks
  for (uint64_t pos = offset_bytes; pos < end;) {
    absl::StatusOr<VolumeRec*> v = FindVolume(volume);
    if (!v.ok()) return v.status();
    const uint64_t size_bytes = (*v)->size_bytes;
    const uint64_t first = pos / c_size;
    const uint64_t last =
        std::min((end - 1) / c_size, first + BatchChunks() - 1);
    const uint64_t n = last - first + 1;
    const uint64_t batch_end = std::min(end, (last + 1) * c_size);
    places.clear();
    for (uint64_t c = first; c <= last; ++c) {
      const uint64_t cb = c * c_size;
      const uint64_t ce = std::min(cb + c_size, size_bytes);  // volume end
      const std::byte* user = data.data() + (std::max(cb, pos) - offset_bytes);
      if (pos <= cb && cb + c_size <= batch_end &&
          reinterpret_cast<uintptr_t>(user) % kIoAlign == 0) {
        // The caller's buffer covers the chunk and is aligned: write it as
        // it is, without a copy.
        places.push_back({c, {user, c_size}});
        continue;
      }
      // Only chunks the caller's buffer cannot give whole take memory here.
      if (bounce.size() < n * c_size) {
        bounce = AlignedBuffer::Uninitialized(n * c_size);
      }
      std::span<std::byte> slot(bounce.data() + (c - first) * c_size, c_size);
      std::memset(slot.data(), 0, c_size);
      if (pos > cb || batch_end < ce) {
        // Partial chunk: read-modify-write (this call owns the chunk: no
        // other write changes it meanwhile). Bytes past the volume end stay
        // zero.
        ReadTicket ticket(*this);
        if (absl::Status s = ReadLocked(volume, nullptr, size_bytes, volume, cb,
                                        slot.first(ce - cb));
            !s.ok()) {
          return s;
        }
      }
      const uint64_t from = std::max(cb, pos);
      const uint64_t to = std::min(cb + c_size, batch_end);
      std::memcpy(slot.data() + (from - cb), user, to - from);
      places.push_back({c, slot});
    }
    if (absl::Status s = PlaceLocked(volume, places); !s.ok()) return s;
    pos = batch_end;
  }
  return absl::OkStatus();
}

absl::Status Pool::Write(absl::string_view volume, uint64_t offset_bytes,
                         std::span<const std::byte> data) {
  MutexLock lock(mu_);
  if (absl::Status s = CheckWritable(); !s.ok()) return s;
  const uint64_t c_size = shape_.chunk_size;
  absl::Status s;
  {
    WriteGuard guard(
        *this, volume, offset_bytes / c_size,
        (offset_bytes + std::max<uint64_t>(data.size(), 1) - 1) / c_size);
    if (s = CheckWritable(); !s.ok()) return s;
    absl::StatusOr<VolumeRec*> v = FindWritableVolume(volume);
    if (!v.ok()) return v.status();
    if (offset_bytes > (*v)->size_bytes ||
        data.size() > (*v)->size_bytes - offset_bytes) {
      return absl::OutOfRangeError(
          absl::StrCat("write of ", data.size(), " bytes at offset ",
                       offset_bytes, " is past the end of volume '", volume,
                       "' (", (*v)->size_bytes, " bytes)"));
    }
    s = WriteLocked(volume, offset_bytes, data);
  }
  if (s.ok()) s = MaybeCommit();
  TrimCache();
  return Fail(s);
}

absl::Status Pool::WriteChunks(absl::string_view volume,
                               std::span<const ChunkWrite> writes) {
  WritePathReads own_reads;  // the tree nodes it rewrites
  MutexLock lock(mu_);
  if (absl::Status s = CheckWritable(); !s.ok()) return s;
  if (writes.empty()) return absl::OkStatus();
  uint64_t lo = writes.front().chunk, hi = writes.front().chunk;
  for (const ChunkWrite& w : writes) {
    lo = std::min(lo, w.chunk);
    hi = std::max(hi, w.chunk);
  }
  const uint64_t c_size = shape_.chunk_size;
  absl::Status s;
  {
    WriteGuard guard(*this, volume, lo, hi);
    if (s = CheckWritable(); !s.ok()) return s;
    absl::StatusOr<VolumeRec*> found = FindWritableVolume(volume);
    if (!found.ok()) return found.status();
    const uint64_t size_bytes = (*found)->size_bytes;
    const uint64_t chunks = ChunkCount(size_bytes);
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
      if (tail > size_bytes &&
          !IsAllZero(w.data.subspan(c_size - (tail - size_bytes)))) {
        return absl::InvalidArgumentError(
            absl::StrCat("chunk ", w.chunk,
                         " has data past the end of volume '", volume, "'"));
      }
    }
    std::vector<Placement> places;
    places.reserve(writes.size());
    for (const ChunkWrite& w : writes) {
      Placement p{w.chunk, w.data};
      if (w.digest != nullptr) {
        p.digest = *w.digest;
        p.hashed = true;
      }
      places.push_back(p);
    }
    s = PlaceLocked(volume, places);
  }
  if (s.ok()) s = MaybeCommit();
  TrimCache();
  return Fail(s);
}

absl::Status Pool::Trim(absl::string_view volume, uint64_t offset_bytes,
                        uint64_t length_bytes) {
  MutexLock lock(mu_);
  if (absl::Status s = CheckWritable(); !s.ok()) return s;
  const uint64_t c_size = shape_.chunk_size;
  absl::Status s;
  {
    WriteGuard guard(
        *this, volume, offset_bytes / c_size,
        (offset_bytes + std::max<uint64_t>(length_bytes, 1) - 1) / c_size);
    if (s = CheckWritable(); !s.ok()) return s;
    absl::StatusOr<VolumeRec*> v = FindWritableVolume(volume);
    if (!v.ok()) return v.status();
    if (offset_bytes > (*v)->size_bytes ||
        length_bytes > (*v)->size_bytes - offset_bytes) {
      return absl::OutOfRangeError(
          absl::StrCat("trim of ", length_bytes, " bytes at offset ",
                       offset_bytes, " is past the end of volume '", volume,
                       "' (", (*v)->size_bytes, " bytes)"));
    }
    s = TrimLocked(volume, offset_bytes, length_bytes);
  }
  if (s.ok()) s = MaybeCommit();
  TrimCache();
  return Fail(s);
}

absl::Status Pool::TrimLocked(absl::string_view volume, uint64_t offset_bytes,
                              uint64_t length_bytes) {
  if (length_bytes == 0) return absl::OkStatus();
  WritePathReads own_reads;  // the tree nodes it rewrites
  absl::StatusOr<VolumeRec*> v = FindVolume(volume);
  if (!v.ok()) return v.status();
  const uint64_t c_size = shape_.chunk_size;
  const uint64_t size_bytes = (*v)->size_bytes;
  uint64_t end = offset_bytes + length_bytes;
  uint64_t first_full = DivRoundUp(offset_bytes, c_size);
  // A range reaching the volume end covers its last partial chunk whole.
  uint64_t end_full = end == size_bytes ? ChunkCount(size_bytes) : end / c_size;
  if (first_full >= end_full) {
    AlignedBuffer zeros(length_bytes);
    return WriteLocked(volume, offset_bytes, zeros.span());
  }
  if (offset_bytes < first_full * c_size) {
    AlignedBuffer zeros(first_full * c_size - offset_bytes);
    if (absl::Status s = WriteLocked(volume, offset_bytes, zeros.span());
        !s.ok()) {
      return s;
    }
  }
  if (end_full * c_size < end && end != size_bytes) {
    AlignedBuffer zeros(end - end_full * c_size);
    if (absl::Status s = WriteLocked(volume, end_full * c_size, zeros.span());
        !s.ok()) {
      return s;
    }
  }
  int depth = Depth(ChunkCount(size_bytes));
  if (absl::Status s = EnsureSpace(0, 2 * depth + 2); !s.ok()) return s;
  v = FindVolume(volume);
  if (!v.ok()) return v.status();
  changed_ = true;
  return TrimChunks((*v)->root, depth - 1, 0, first_full, end_full);
}

// ---------------------------------------------------------------------------
// Snapshots

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
  auto find =
      [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) -> absl::StatusOr<VolumeRec*> {
    absl::StatusOr<VolumeRec*> v = FindWritableVolume(volume);
    if (v.ok() && FindSnapshot(**v, name).ok()) {
      return absl::AlreadyExistsError(
          absl::StrCat("snapshot '", volume, "@", name, "' already exists"));
    }
    return v;
  };
  if (absl::Status s = find().status(); !s.ok()) return s;
  if (absl::Status s = EnsureSpace(0, 1); !s.ok()) return s;
  absl::StatusOr<VolumeRec*> v = find();
  if (!v.ok()) return v.status();
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
  SnapshotInfo info = InfoOf(**v, rec);
  if (absl::Status s = Fail(CommitLocked()); !s.ok()) return s;
  return info;
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
                                  absl::string_view name, const Group* group) {
  MutexLock lock(mu_);
  if (absl::Status s = CheckWritable(); !s.ok()) return s;
  auto find = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    absl::StatusOr<VolumeRec*> v = FindVolume(volume);
    if (!v.ok()) return v.status();
    return FindSnapshot(**v, name).status();
  };
  if (absl::Status s = find(); !s.ok()) return s;
  if (absl::Status s = EnsureSpace(0, 0); !s.ok()) return s;
  {
    // What only this snapshot holds is freed: its nodes are read first,
    // outside the lock.
    ReadTicket ticket(*this);
    Loaded loaded;
    absl::StatusOr<VolumeRec*> v = FindVolume(volume);
    if (!v.ok()) return v.status();
    absl::StatusOr<const SnapshotRec*> snap = FindSnapshot(**v, name);
    if (!snap.ok()) return snap.status();
    const Entry root = (*snap)->root;
    const int depth = Depth(ChunkCount((*snap)->size_bytes));
    if (absl::Status s = PrefetchExclusive(root, depth, loaded); !s.ok()) {
      return s;
    }
    // Looked up again: the lock was out.
    v = FindVolume(volume);
    if (!v.ok()) return v.status();
    auto& snaps = (*v)->snapshots;
    auto it =
        std::find_if(snaps.begin(), snaps.end(),
                     [&](const SnapshotRec& s) { return s.name == name; });
    if (it == snaps.end()) return FindSnapshot(**v, name).status();
    if (absl::Status s =
            DecRef(it->root.ptr, Depth(ChunkCount(it->size_bytes)), &loaded);
        !s.ok()) {
      return Fail(s);
    }
    snaps.erase(it);
    changed_ = true;
  }
  absl::Status s = InGroup(group)
                       ? absl::OkStatus()
                       : Fail(CommitLocked(CommitLock::kRelease, group));
  TrimCache();
  return s;
}

absl::Status Pool::Rollback(absl::string_view volume,
                            absl::string_view snapshot) {
  MutexLock lock(mu_);
  if (absl::Status s = CheckWritable(); !s.ok()) return s;
  {
    WriteGuard guard(*this, volume, 0, internal::kWholeVolume);
    absl::StatusOr<VolumeRec*> v = FindWritableVolume(volume);
    if (!v.ok()) return v.status();
    if (absl::Status s = FindSnapshot(**v, snapshot).status(); !s.ok()) {
      return s;
    }
    if (absl::Status s = EnsureSpace(0, 0); !s.ok()) return s;
    v = FindWritableVolume(volume);
    if (!v.ok()) return v.status();
    absl::StatusOr<const SnapshotRec*> snap = FindSnapshot(**v, snapshot);
    if (!snap.ok()) return snap.status();
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
  }
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

}  // namespace blockstore
