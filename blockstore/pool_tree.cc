// The copy-on-write trees of a Pool: their shape, references through their
// pointers, node loading (in the cache, or outside the lock), copy-on-write,
// trim, resize and digests. Every function here runs with the pool's lock
// held; LoadMissing alone drops it while it reads.
#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "blockstore/pool.h"
#include "blockstore/util.h"

namespace blockstore {
namespace {

// Bytes handled per I/O batch in Read/Write (bounds the bounce buffers).
constexpr uint64_t kBatchBytes = 16 << 20;

}  // namespace

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

void Pool::InitDigests() {
  AlignedBuffer zero_chunk(shape_.chunk_size);
  empty_digests_.push_back(Hash128(zero_chunk.span()));
  for (int l = 0; l <= kMaxDepth; ++l) {
    std::vector<Digest> parts(kFanout, empty_digests_.back());
    empty_digests_.push_back(Hash128Digests(parts));
  }
}

// ---------------------------------------------------------------------------
// References

absl::StatusOr<uint64_t> Pool::AllocNode() {
  std::optional<uint64_t> id = space_.AllocNode();
  if (!id) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "pool ", io_.name(), " has no free metadata space (",
        space_.used_nodes(), " nodes in use); delete snapshots or volumes"));
  }
  return *id;
}

absl::Status Pool::EnsureSpace(uint64_t chunks, uint64_t nodes) {
  if (!failed_.ok()) return failed_;
  // The catalog is rewritten at every commit: keep room for it.
  // (A transaction adds at most a few records to it; 4 KiB of slack.)
  nodes += DivRoundUp(sb_.catalog_bytes + 4096, kCatalogPayload) + 1;
  auto short_of_space = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return space_.free_chunks() < chunks || space_.free_nodes() < nodes;
  };
  if (short_of_space() && space_.has_held()) {
    // Space freed by the open transaction becomes usable once it commits
    // (and once reads that began before have ended).
    if (absl::Status s = CommitLocked(CommitLock::kHold); !s.ok()) return s;
  }
  // Freed and durable, but reads from before still run: they end soon (no
  // caller here holds a read ticket of its own, so none waits for itself).
  while (short_of_space() && space_.has_deferred()) cv_.wait(mu_);
  if (space_.free_chunks() < chunks) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "pool ", io_.name(), " is out of space: need ", chunks, " chunks, ",
        space_.free_chunks(), " free; delete snapshots or volumes"));
  }
  if (space_.free_nodes() < nodes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "pool ", io_.name(), " is out of metadata space: need ", nodes,
        " nodes, ", space_.free_nodes(), " free; delete snapshots or volumes"));
  }
  return absl::OkStatus();
}

void Pool::IncRef(uint64_t ptr, int level) {
  if (level == 0) {
    if (IsDataPtr(ptr)) space_.AddChunkRef(ptr);
  } else if (ptr != 0) {
    space_.AddNodeRef(ptr);
  }
}

absl::Status Pool::DecRef(uint64_t ptr, int level, Loaded* loaded) {
  if (level == 0) return DropChunk(ptr, SpaceMap::Freed::kGiveBack);
  if (ptr == 0) return absl::OkStatus();
  return DecRefNode(ptr, level - 1, loaded);
}

absl::Status Pool::DropChunk(uint64_t ptr, SpaceMap::Freed why) {
  if (!IsDataPtr(ptr)) return absl::OkStatus();
  if (space_.ChunkRefs(ptr) == 0) {
    return absl::DataLossError(
        absl::StrCat("data chunk ", ptr, " freed twice (refcount 0)"));
  }
  space_.DropChunkRef(ptr, why);
  return absl::OkStatus();
}

absl::Status Pool::DecRefNode(uint64_t id, int level, Loaded* loaded) {
  if (space_.NodeRefs(id) == 0) {
    return absl::DataLossError(
        absl::StrCat("metadata node ", id, " freed twice (refcount 0)"));
  }
  if (space_.NodeRefs(id) > 1) {
    space_.DropNodeRef(id);
    return absl::OkStatus();
  }
  absl::StatusOr<Node*> node = Load(id, level, loaded);
  if (!node.ok()) return node.status();
  for (const Entry& e : (*node)->e) {
    if (absl::Status s = DecRef(e.ptr, level, loaded); !s.ok()) return s;
  }
  cache_.Erase(id);
  space_.DropNodeRef(id);
  if (loaded != nullptr) loaded->erase(id);
  return absl::OkStatus();
}

absl::Status Pool::PrefetchExclusive(const Entry& root, int depth,
                                     Loaded& loaded) {
  std::vector<Missing> frontier;
  if (root.ptr != 0 && ValidNodeId(root.ptr) &&
      space_.NodeRefs(root.ptr) == 1) {
    frontier.push_back({root.ptr, depth - 1});
  }
  size_t fetched = 0;
  while (!frontier.empty() && fetched < kMaxPrefetchNodes) {
    std::vector<Missing> missing = frontier;
    fetched += missing.size();
    if (absl::Status s = LoadMissing(missing, loaded); !s.ok()) return s;
    std::vector<Missing> next;
    for (const Missing& m : frontier) {
      if (m.level == 0) continue;  // its children are data chunks
      const Node* n = InMemory(m.id, &loaded);
      if (n == nullptr) continue;
      for (const Entry& e : n->e) {
        if (e.ptr != 0 && ValidNodeId(e.ptr) && space_.NodeRefs(e.ptr) == 1) {
          next.push_back({e.ptr, m.level - 1});
        }
      }
    }
    frontier = std::move(next);
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------
// Loading nodes

const Node* Pool::InMemory(uint64_t id, const Loaded* loaded) {
  if (const Node* n = cache_.Find(id)) return n;
  if (loaded == nullptr) return nullptr;
  auto it = loaded->find(id);
  return it == loaded->end() ? nullptr : it->second.get();
}

absl::StatusOr<Node*> Pool::Load(uint64_t id, int level, Loaded* loaded) {
  if (Node* n = cache_.Find(id)) {
    if (n->level != level) {
      return absl::DataLossError(absl::StrCat(
          "metadata node ", id, " is level ", n->level, ", expected ", level));
    }
    return n;
  }
  if (!ValidNodeId(id)) {
    return absl::DataLossError(
        absl::StrCat("metadata node id ", id, " out of range"));
  }
  if (loaded != nullptr) {
    if (auto it = loaded->find(id);
        it != loaded->end() && it->second->level == level) {
      return cache_.Insert(it->second);
    }
  }
  AlignedBuffer buf(kNodeSize);
  if (absl::Status s = io_.ReadAt(id * kNodeSize, buf.span()); !s.ok()) {
    return s;
  }
  absl::StatusOr<NodeRef> node = DecodeTreeNode(
      shape_, id, level,
      std::span<const std::byte, kNodeSize>(buf.data(), kNodeSize));
  if (!node.ok()) return node.status();
  ++stats_.nodes_loaded;
  return cache_.Insert(std::move(*node));
}

absl::Status Pool::LoadMissing(std::vector<Missing>& missing, Loaded& loaded) {
  std::sort(missing.begin(), missing.end(),
            [](const Missing& a, const Missing& b) { return a.id < b.id; });
  std::vector<Missing> want;
  for (const Missing& m : missing) {
    if (!want.empty() && want.back().id == m.id) continue;
    if (!ValidNodeId(m.id)) {
      return absl::DataLossError(
          absl::StrCat("metadata node id ", m.id, " out of range"));
    }
    if (!cache_.Contains(m.id) && !loaded.contains(m.id)) want.push_back(m);
  }
  missing.clear();
  if (want.empty()) return absl::OkStatus();
  AlignedBuffer buf = AlignedBuffer::Uninitialized(want.size() * kNodeSize);
  std::vector<ReadOp> ops;
  for (size_t i = 0; i < want.size(); ++i) {
    std::span<std::byte> out(buf.data() + i * kNodeSize, kNodeSize);
    if (!ops.empty() && want[i - 1].id + 1 == want[i].id) {
      ops.back().out = {ops.back().out.data(),
                        ops.back().out.size() + kNodeSize};
    } else {
      ops.push_back({want[i].id * kNodeSize, out});
    }
  }
  // Outside the lock: the read, and the checksum and decoding of each node.
  // The nodes are committed (what is not is always cached) and the caller's
  // read ticket keeps their ids from being reused meanwhile.
  std::vector<absl::StatusOr<NodeRef>> nodes;
  mu_.unlock();
  absl::Status read = io_.Read(ops);
  if (read.ok()) {
    nodes.reserve(want.size());
    for (size_t i = 0; i < want.size(); ++i) {
      nodes.push_back(
          DecodeTreeNode(shape_, want[i].id, want[i].level,
                         std::span<const std::byte, kNodeSize>(
                             buf.data() + i * kNodeSize, kNodeSize)));
    }
  }
  mu_.lock();
  if (!read.ok()) return read;
  for (absl::StatusOr<NodeRef>& node : nodes) {
    if (!node.ok()) return node.status();
    ++stats_.nodes_loaded;
    const uint64_t id = (*node)->id;
    // Shared with others only if still in use: a node freed while the lock
    // was out stays this walk's (its id is not reused before the walk ends,
    // but may be after). A read-only pool frees nothing, and may not have
    // loaded its counts.
    if (!cache_.Contains(id) && (!counts_loaded_ || space_.NodeRefs(id) > 0)) {
      cache_.Insert(*node);
    }
    loaded.emplace(id, std::move(*node));
  }
  return absl::OkStatus();
}

absl::StatusOr<bool> Pool::WalkCached(const Entry& root, uint64_t size_bytes,
                                      std::span<const uint64_t> chunks,
                                      Loaded& loaded, std::vector<Entry>& out,
                                      std::vector<Missing>& missing) {
  const uint64_t chunk_count = ChunkCount(size_bytes);
  const int depth = Depth(chunk_count);
  out.resize(chunks.size());
  bool complete = true;
  for (size_t k = 0; k < chunks.size(); ++k) {
    const uint64_t c = chunks[k];
    Entry e = root;
    if (c >= chunk_count) e.ptr = 0;  // past the end: reads as zeros
    bool found = true;
    for (int level = depth - 1; level >= 0; --level) {
      if (e.ptr == 0) {
        e = {kPhysUnmapped, e.birth, NullEntryDigest(0)};
        break;
      }
      const Node* n = InMemory(e.ptr, &loaded);
      if (n == nullptr) {
        missing.push_back({e.ptr, level});
        found = false;
        break;
      }
      if (n->level != level) {
        return absl::DataLossError(absl::StrCat("metadata node ", n->id,
                                                " is level ", n->level,
                                                ", expected ", level));
      }
      e = n->e[(c / Span(level)) % kFanout];
    }
    if (found) {
      out[k] = e;
    } else {
      complete = false;
    }
  }
  return complete;
}

absl::Status Pool::Prefetch(std::vector<uint64_t>& ids, int level,
                            Loaded* loaded) {
  std::vector<Missing> missing;
  for (uint64_t id : ids) {
    if (ValidNodeId(id)) missing.push_back({id, level});
  }
  if (loaded != nullptr) {
    // Outside the lock. A bad node is left for Load to report when (if) it
    // is really needed.
    Loaded fetched;
    absl::Status s = LoadMissing(missing, fetched);
    if (absl::IsDataLoss(s)) return absl::OkStatus();
    for (auto& [id, node] : fetched) loaded->emplace(id, std::move(node));
    return s;
  }
  std::sort(missing.begin(), missing.end(),
            [](const Missing& a, const Missing& b) { return a.id < b.id; });
  std::vector<uint64_t> want;
  for (const Missing& m : missing) {
    if ((want.empty() || want.back() != m.id) && !cache_.Contains(m.id)) {
      want.push_back(m.id);
    }
  }
  if (want.empty()) return absl::OkStatus();
  AlignedBuffer buf(want.size() * kNodeSize);
  std::vector<ReadOp> ops;
  for (size_t i = 0; i < want.size(); ++i) {
    ops.push_back(
        {want[i] * kNodeSize, {buf.data() + i * kNodeSize, kNodeSize}});
  }
  if (absl::Status s = io_.Read(ops); !s.ok()) return s;
  for (size_t i = 0; i < want.size(); ++i) {
    absl::StatusOr<NodeRef> node =
        DecodeTreeNode(shape_, want[i], level,
                       std::span<const std::byte, kNodeSize>(
                           buf.data() + i * kNodeSize, kNodeSize));
    if (node.ok()) {
      ++stats_.nodes_loaded;
      cache_.Insert(std::move(*node));
    }
  }
  return absl::OkStatus();
}

void Pool::TrimCache() { cache_.Trim(tuning_.max_cached_nodes); }

// ---------------------------------------------------------------------------
// Copy-on-write

absl::StatusOr<NodeRef> Pool::NewNode(int level) {
  absl::StatusOr<uint64_t> id = AllocNode();
  if (!id.ok()) return id.status();
  NodeRef node = AllocateNode();
  node->id = *id;
  node->birth = gen_;
  node->level = level;
  node->dirty = node->stale = true;
  return node;
}

absl::StatusOr<Node*> Pool::Cow(Entry& ref, int level, Loaded* loaded) {
  if (ref.ptr == 0) {
    // Materialize an empty subtree. Its entries inherit the birth of the
    // empty pointer, so a later diff still sees when the range was emptied.
    absl::StatusOr<NodeRef> node = NewNode(level);
    if (!node.ok()) return node.status();
    for (Entry& e : (*node)->e) e = {0, ref.birth, NullEntryDigest(level)};
    ref = {(*node)->id, gen_, ref.digest};
    return cache_.Insert(std::move(*node));
  }
  absl::StatusOr<Node*> old = Load(ref.ptr, level, loaded);
  if (!old.ok()) return old.status();
  if ((*old)->dirty && space_.NodeRefs(ref.ptr) == 1) {
    (*old)->stale = true;
    ref.birth = gen_;
    return *old;
  }
  absl::StatusOr<NodeRef> node = NewNode(level);
  if (!node.ok()) return node.status();
  (*node)->e = (*old)->e;
  for (const Entry& e : (*node)->e) IncRef(e.ptr, level);
  uint64_t old_id = ref.ptr;
  ref.ptr = (*node)->id;
  ref.birth = gen_;
  Node* out = cache_.Insert(std::move(*node));
  if (absl::Status s = DecRefNode(old_id, level); !s.ok()) return s;
  return out;
}

absl::StatusOr<Entry*> Pool::LeafEntryForWrite(VolumeRec& v, uint64_t chunk,
                                               Loaded* loaded) {
  Entry* ref = &v.root;
  for (int level = Depth(ChunkCount(v.size_bytes)) - 1;; --level) {
    absl::StatusOr<Node*> n = Cow(*ref, level, loaded);
    if (!n.ok()) return n.status();
    ref = &(*n)->e[(chunk / Span(level)) % kFanout];
    if (level == 0) return ref;
  }
}

absl::Status Pool::TrimChunks(Entry& ref, int level, uint64_t base,
                              uint64_t first, uint64_t end) {
  if (ref.ptr == 0) return absl::OkStatus();
  absl::StatusOr<Node*> node = Cow(ref, level, nullptr);
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

absl::Status Pool::ResizeLocked(VolumeRec& v, uint64_t size_bytes) {
  uint64_t old_size = v.size_bytes;
  int depth = Depth(ChunkCount(old_size));
  int new_depth = Depth(ChunkCount(size_bytes));
  if (size_bytes < old_size) {
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
      absl::StatusOr<NodeRef> node = NewNode(depth);
      if (!node.ok()) return node.status();
      (*node)->e[0] = v.root;
      for (int i = 1; i < kFanout; ++i) {
        (*node)->e[i] = {0, gen_, NullEntryDigest(depth)};
      }
      v.root = {(*node)->id, gen_, {}};
      cache_.Insert(std::move(*node));
    }
  }
  v.size_bytes = size_bytes;
  changed_ = true;
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------
// Digests

absl::Status Pool::UpdateDigests(Entry& ref, int level) {
  if (ref.ptr == 0) {
    ref.digest = EmptyDigest(level);
    return absl::OkStatus();
  }
  Node* found = cache_.Find(ref.ptr);
  if (found == nullptr || !found->stale) return absl::OkStatus();
  Node& node = *found;
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
  if (empty && node.dirty && space_.NodeRefs(node.id) == 1) {
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
  for (auto& [name, v] : catalog_.volumes) {
    if (absl::Status s =
            UpdateDigests(v.root, Depth(ChunkCount(v.size_bytes)) - 1);
        !s.ok()) {
      return s;
    }
  }
  return absl::OkStatus();
}

}  // namespace blockstore
