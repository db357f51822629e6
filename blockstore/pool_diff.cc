// Pool::Diff, ReadChunks and the receive side (BeginReceive/FinishReceive).
#include <algorithm>
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "blockstore/pool.h"
#include "blockstore/pool_internal.h"
#include "blockstore/util.h"

namespace blockstore {

using internal::IsStaging;
using internal::kMaxVolumeBytes;
using internal::NowNs;
using internal::RandomGuid;
using internal::ValidName;

struct Pool::DiffState {
  uint64_t from = 0;  // first chunk to report
  uint64_t end = 0;   // target chunk count
  size_t max_data = 0;
  size_t data = 0;
  bool stop = false;
  uint64_t stopped_at = 0;
  DiffBatch batch;
  // True if chunks [base, base + span) lie outside [from, end).
  bool Outside(uint64_t base, uint64_t span) const {
    return base + span <= from || base >= end;
  }
  // Nodes read outside the lock (a diff between snapshots, whose trees do
  // not change); null when the target is the live volume, whose dirty
  // nodes may change whenever the lock is out, so that walk keeps it.
  Loaded* loaded = nullptr;

  void Emit(ChangedRun::Kind kind, uint64_t first, uint64_t count,
            uint64_t phys = 0, const Digest& digest = {}) {
    first = std::max(first, from);
    uint64_t last = std::min(first + count, end);
    if (first >= last) return;
    count = last - first;
    std::vector<ChangedRun>& runs = batch.runs;
    if (kind != ChangedRun::Kind::kData && !runs.empty() &&
        runs.back().kind == kind &&
        runs.back().first_chunk + runs.back().count_chunks == first) {
      runs.back().count_chunks += count;
    } else {
      runs.push_back({kind, first, count, phys, digest});
    }
    if (kind == ChangedRun::Kind::kData && ++data >= max_data) {
      stop = true;
      stopped_at = first + 1;
    }
  }
};

std::array<Pool::WalkRef, kFanout> Pool::ChildrenOf(const WalkRef& ref,
                                                    int level,
                                                    const Node* node) {
  std::array<WalkRef, kFanout> out;
  if (ref.above_root) {
    // Only child 0 exists: the real root, or another level above it.
    for (WalkRef& c : out) c = WalkRef{{0, 0, {}}};
    if (level - 1 == ref.root_level) {
      out[0] = WalkRef{ref.e};
    } else {
      out[0] = ref;
    }
    return out;
  }
  if (node == nullptr) {
    for (WalkRef& c : out) c = WalkRef{{0, ref.e.birth, {}}};
    return out;
  }
  for (int i = 0; i < kFanout; ++i) out[i] = WalkRef{node->e[i]};
  return out;
}

absl::StatusOr<std::array<Pool::WalkRef, kFanout>> Pool::Children(
    const WalkRef& ref, int level, DiffState& st) {
  if (!ref.HasNode()) return ChildrenOf(ref, level, nullptr);
  absl::StatusOr<Node*> node = Load(ref.e.ptr, level, st.loaded);
  if (!node.ok()) return node.status();
  ++st.batch.nodes_visited;
  return ChildrenOf(ref, level, *node);
}

absl::Status Pool::PrefetchDiff(DiffState& st, const WalkRef& b,
                                const WalkRef& t, int top) {
  struct Pair {
    WalkRef b, t;
    uint64_t base;  // first chunk
  };
  // A walk that stops after max_data chunks needs few of them: at most two
  // leaves a chunk (the base's and the target's), or the paths to them.
  size_t budget = std::min(kMaxPrefetchNodes, 2 * st.max_data + 2 * (top + 1));
  std::vector<Pair> pairs = {{b, t, 0}};
  for (int level = top; level >= 0 && !pairs.empty(); --level) {
    // This level's nodes, in one batch: the first pairs (in chunk order)
    // within the budget; the walk reads the rest as it meets them.
    std::vector<uint64_t> ids;
    size_t taken = 0;
    for (; taken < pairs.size(); ++taken) {
      const size_t before = ids.size();
      for (const WalkRef* r : {&pairs[taken].b, &pairs[taken].t}) {
        if (r->HasNode()) ids.push_back(r->e.ptr);
      }
      if (ids.size() > budget) {
        ids.resize(before);
        break;
      }
    }
    pairs.resize(taken);
    budget -= ids.size();
    if (absl::Status s = Prefetch(ids, level, st.loaded); !s.ok()) return s;
    if (level == 0) break;  // the children of leaves are chunks
    // The child pairs DiffWalk will descend into, from the nodes in memory.
    const uint64_t child_span = Span(level);
    std::vector<Pair> next;
    for (const Pair& p : pairs) {
      const Node* bn = p.b.HasNode() ? InMemory(p.b.e.ptr, st.loaded) : nullptr;
      const Node* tn = p.t.HasNode() ? InMemory(p.t.e.ptr, st.loaded) : nullptr;
      // Not read (a bad node): the walk reports it.
      if ((bn == nullptr && p.b.HasNode()) ||
          (tn == nullptr && p.t.HasNode())) {
        continue;
      }
      const std::array<WalkRef, kFanout> bc = ChildrenOf(p.b, level, bn);
      const std::array<WalkRef, kFanout> tc = ChildrenOf(p.t, level, tn);
      for (int i = 0; i < kFanout; ++i) {
        const uint64_t cb = p.base + i * child_span;
        if (st.Outside(cb, child_span) || bc[i].SameAs(tc[i])) continue;
        if (!tc[i].above_root && tc[i].e.ptr == 0) continue;  // unmapped
        next.push_back({bc[i], tc[i], cb});
      }
    }
    pairs = std::move(next);
  }
  return absl::OkStatus();
}

// Compares the subtrees `b` (base) and `t` (target) whose nodes are at
// `level` (-1: leaf entries, i.e. single chunks) starting at chunk `base`.
absl::Status Pool::DiffWalk(DiffState& st, const WalkRef& b, const WalkRef& t,
                            int level, uint64_t base) {
  const uint64_t span = level < 0 ? 1 : Span(level + 1);
  if (st.stop || st.Outside(base, span) || b.SameAs(t)) {
    return absl::OkStatus();
  }
  using Kind = ChangedRun::Kind;
  if (level < 0) {
    bool t_data = IsDataPtr(t.e.ptr), b_data = IsDataPtr(b.e.ptr);
    if (t_data) {
      st.Emit(Kind::kData, base, 1, t.e.ptr, t.e.digest);
    } else if (b_data) {
      // Between ZERO and UNMAP nothing changes: both read as zeros and use
      // no space, and their digests are equal.
      st.Emit(t.e.ptr == kPhysZero ? Kind::kZero : Kind::kUnmap, base, 1);
    }
    return absl::OkStatus();
  }
  if (!t.above_root && t.e.ptr == 0) {
    if (!b.above_root && b.e.ptr == 0) return absl::OkStatus();
    st.Emit(Kind::kUnmap, base, span);
    return absl::OkStatus();
  }
  absl::StatusOr<std::array<WalkRef, kFanout>> bc = Children(b, level, st);
  if (!bc.ok()) return bc.status();
  absl::StatusOr<std::array<WalkRef, kFanout>> tc = Children(t, level, st);
  if (!tc.ok()) return tc.status();
  const uint64_t child_span = level == 0 ? 1 : Span(level);
  if (level > 0) {
    // Every child subtree that differs will be read: read them together.
    std::vector<uint64_t> ids;
    for (int i = 0; i < kFanout; ++i) {
      const WalkRef& bi = (*bc)[i];
      const WalkRef& ti = (*tc)[i];
      uint64_t cb = base + i * child_span;
      if (st.Outside(cb, child_span) || bi.SameAs(ti)) continue;
      if (bi.HasNode()) ids.push_back(bi.e.ptr);
      if (ti.HasNode()) ids.push_back(ti.e.ptr);
    }
    if (absl::Status s = Prefetch(ids, level - 1, st.loaded); !s.ok()) {
      return s;
    }
  }
  for (int i = 0; i < kFanout && !st.stop; ++i) {
    if (absl::Status s =
            DiffWalk(st, (*bc)[i], (*tc)[i], level - 1, base + i * child_span);
        !s.ok()) {
      return s;
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<DiffBatch> Pool::Diff(absl::string_view volume,
                                     absl::string_view base,
                                     absl::string_view target,
                                     uint64_t from_chunk,
                                     size_t max_data_chunks) {
  MutexLock lock(mu_);
  if (!failed_.ok()) return failed_;
  absl::StatusOr<VolumeRec*> v = FindVolume(volume);
  if (!v.ok()) return v.status();
  Entry target_root = (*v)->root;
  uint64_t target_size = (*v)->size_bytes;
  if (!target.empty()) {
    absl::StatusOr<const SnapshotRec*> t = FindSnapshot(**v, target);
    if (!t.ok()) return t.status();
    target_root = (*t)->root;
    target_size = (*t)->size_bytes;
  }
  Entry base_root{0, 0, {}};
  uint64_t base_size = 0;
  if (!base.empty()) {
    // "OTHER@SNAPSHOT": a snapshot of another volume ('@' is in no name).
    VolumeRec* base_volume = *v;
    if (size_t at = base.find('@'); at != absl::string_view::npos) {
      absl::StatusOr<VolumeRec*> other = FindVolume(base.substr(0, at));
      if (!other.ok()) return other.status();
      base_volume = *other;
      base = base.substr(at + 1);
    }
    absl::StatusOr<const SnapshotRec*> b = FindSnapshot(*base_volume, base);
    if (!b.ok()) return b.status();
    base_root = (*b)->root;
    base_size = (*b)->size_bytes;
  }
  ReadTicket ticket(*this);
  Loaded loaded;
  DiffState st;
  if (!target.empty()) st.loaded = &loaded;
  st.from = from_chunk;
  st.end = ChunkCount(target_size);
  st.max_data = std::max<size_t>(1, max_data_chunks);
  int dt = Depth(st.end);
  int db = base.empty() ? 1 : Depth(ChunkCount(base_size));
  int top = std::max(dt, db) - 1;
  auto ref = [&](const Entry& root, int depth) {
    WalkRef r{root};
    if (depth - 1 < top) {
      r.above_root = true;
      r.root_level = depth - 1;
    }
    return r;
  };
  // The nodes the walk will read, a level at a time, one device batch a
  // level: as many round trips as the tree has levels, not one a node.
  absl::Status s =
      PrefetchDiff(st, ref(base_root, db), ref(target_root, dt), top);
  if (s.ok())
    s = DiffWalk(st, ref(base_root, db), ref(target_root, dt), top, 0);
  diff_nodes_visited_.fetch_add(st.batch.nodes_visited,
                                std::memory_order_relaxed);
  TrimCache();
  if (!s.ok()) return s;
  st.batch.done = !st.stop;
  st.batch.next_chunk = st.stop ? st.stopped_at : st.end;
  return std::move(st.batch);
}

absl::Status Pool::ReadChunks(std::span<const ChangedRun> runs,
                              std::span<std::byte> out) {
  const uint64_t c_size = shape_.chunk_size;
  if (out.size() < runs.size() * c_size ||
      reinterpret_cast<uintptr_t>(out.data()) % kIoAlign != 0) {
    return absl::InvalidArgumentError(
        "ReadChunks needs an aligned buffer of one chunk per run");
  }
  std::vector<ReadOp> ops;
  for (size_t i = 0; i < runs.size(); ++i) {
    const ChangedRun& r = runs[i];
    if (r.kind != ChangedRun::Kind::kData || r.phys < shape_.data_start ||
        r.phys >= shape_.data_start + shape_.data_count) {
      return absl::InvalidArgumentError(
          absl::StrCat("chunk ", r.first_chunk, " is not a data chunk"));
    }
    std::byte* dst = out.data() + i * c_size;
    if (i > 0 && runs[i - 1].phys + 1 == r.phys) {
      ops.back().out = {ops.back().out.data(), ops.back().out.size() + c_size};
    } else {
      ops.push_back({r.phys * c_size, {dst, c_size}});
    }
  }
  MutexLock lock(mu_);
  if (!failed_.ok()) return failed_;
  ReadTicket ticket(*this);
  // Outside the lock: the chunks belong to a snapshot, which the caller
  // keeps (and the ticket covers one deleted meanwhile).
  mu_.unlock();
  absl::Status s = io_.Read(ops);
  for (size_t i = 0; i < runs.size() && s.ok(); ++i) {
    if (Hash128({out.data() + i * c_size, c_size}) != runs[i].digest) {
      s = absl::DataLossError(
          absl::StrCat("chunk ", runs[i].first_chunk, " (pool chunk ",
                       runs[i].phys, "): data does not match its digest"));
    }
  }
  mu_.lock();
  return s;
}

absl::StatusOr<bool> Pool::ChangedSince(absl::string_view volume,
                                        absl::string_view snapshot) {
  MutexLock lock(mu_);
  absl::StatusOr<VolumeRec*> v = FindVolume(volume);
  if (!v.ok()) return v.status();
  absl::StatusOr<const SnapshotRec*> s = FindSnapshot(**v, snapshot);
  if (!s.ok()) return s.status();
  return (*v)->size_bytes != (*s)->size_bytes ||
         (*v)->root.ptr != (*s)->root.ptr ||
         (*v)->root.birth != (*s)->root.birth;
}

absl::Status Pool::BeginReceive(absl::string_view staging,
                                absl::string_view volume,
                                absl::string_view base_snapshot,
                                uint64_t size_bytes) {
  MutexLock lock(mu_);
  if (absl::Status s = CheckWritable(); !s.ok()) return s;
  if (!IsStaging(staging)) {
    return absl::InvalidArgumentError("staging volume names start with '.'");
  }
  WriteGuard guard(*this, staging, 0, internal::kWholeVolume);
  auto& volumes = catalog_.volumes;
  // A staging volume left by an interrupted receive is garbage: drop it.
  if (auto old = volumes.find(staging); old != volumes.end()) {
    if (absl::Status s = DecRef(old->second.root.ptr,
                                Depth(ChunkCount(old->second.size_bytes)));
        !s.ok()) {
      return Fail(s);
    }
    volumes.erase(old);
    changed_ = true;
  }
  VolumeRec v;
  v.name = std::string(staging);
  v.guid = RandomGuid();
  v.create_time_ns = NowNs();
  if (base_snapshot.empty()) {
    if (size_bytes == 0 || size_bytes > kMaxVolumeBytes) {
      return absl::InvalidArgumentError(
          absl::StrCat("bad volume size ", size_bytes));
    }
    v.size_bytes = size_bytes;
    v.root = {0, gen_, {}};
  } else {
    absl::StatusOr<VolumeRec*> src = FindVolume(volume);
    if (!src.ok()) return src.status();
    absl::StatusOr<const SnapshotRec*> snap =
        FindSnapshot(**src, base_snapshot);
    if (!snap.ok()) return snap.status();
    v.size_bytes = (*snap)->size_bytes;
    v.root = (*snap)->root;
    IncRef(v.root.ptr, Depth(ChunkCount(v.size_bytes)));
  }
  volumes.emplace(v.name, std::move(v));
  changed_ = true;
  // No commit of its own: the staging volume reaches the disk with the data
  // (automatic commits) or with FinishReceive; a crash before loses nothing.
  return absl::OkStatus();
}

absl::StatusOr<SnapshotInfo> Pool::FinishReceive(
    absl::string_view staging, absl::string_view volume,
    const Guid& volume_guid, const SnapshotIdentity& identity,
    const Digest& expected, const Group* group) {
  MutexLock lock(mu_);
  if (absl::Status s = CheckWritable(); !s.ok()) return s;
  if (absl::Status s = ValidName(identity.name, "snapshot"); !s.ok()) return s;
  constexpr uint64_t kAll = internal::kWholeVolume;
  WriteGuard staging_guard(*this, staging, 0, kAll);
  WriteGuard volume_guard(*this, volume, 0, kAll);
  // Before any change: EnsureSpace may commit, and a refused receive must
  // leave nothing behind (no empty volume that blocks the retry).
  if (absl::Status s = EnsureSpace(0, 1); !s.ok()) return s;
  auto& volumes = catalog_.volumes;
  absl::StatusOr<VolumeRec*> st = FindVolume(staging);
  if (!st.ok()) return st.status();
  VolumeRec& stage = **st;
  int depth = Depth(ChunkCount(stage.size_bytes));
  if (absl::Status s = UpdateDigests(stage.root, depth - 1); !s.ok()) {
    return Fail(s);
  }
  Digest got = VolumeDigest(stage.root, stage.size_bytes);
  if (got != expected) {
    return absl::DataLossError(
        absl::StrCat("received content of '", volume, "@", identity.name,
                     "' has root digest ", got.ToHex(), ", the sender's is ",
                     expected.ToHex(), "; nothing was changed"));
  }
  auto it = volumes.find(volume);
  if (it != volumes.end()) {
    for (const SnapshotRec& s : it->second.snapshots) {
      if (s.name == identity.name || s.guid == identity.guid) {
        return absl::AlreadyExistsError(absl::StrCat(
            "volume '", volume, "' already has snapshot '", s.name, "'"));
      }
    }
  } else if (absl::Status s = ValidName(volume, "volume"); !s.ok()) {
    return s;
  }
  if (it == volumes.end()) {
    VolumeRec v;
    v.name = std::string(volume);
    v.guid = volume_guid;
    v.create_time_ns = NowNs();
    v.root = {0, gen_, {}};
    v.size_bytes = stage.size_bytes;
    it = volumes.emplace(v.name, std::move(v)).first;
  }
  VolumeRec& dest = it->second;
  // The staging tree becomes the live volume (its reference moves along);
  // the old live tree is released.
  if (absl::Status s =
          DecRef(dest.root.ptr, Depth(ChunkCount(dest.size_bytes)));
      !s.ok()) {
    return Fail(s);
  }
  dest.root = stage.root;
  dest.size_bytes = stage.size_bytes;
  SnapshotRec rec;
  rec.name = identity.name;
  rec.guid = identity.guid;
  rec.create_time_ns = identity.create_time_ns;
  rec.generation = gen_;
  rec.size_bytes = dest.size_bytes;
  rec.root = dest.root;
  rec.owner = identity.owner;
  IncRef(rec.root.ptr, depth);
  dest.snapshots.push_back(rec);
  volumes.erase(volumes.find(staging));
  changed_ = true;
  SnapshotInfo info = InfoOf(dest, rec);
  volume_guard.Release();
  staging_guard.Release();
  if (absl::Status s = Fail(CommitLocked(CommitLock::kRelease, group));
      !s.ok()) {
    return s;
  }
  return info;
}

}  // namespace blockstore
