// Pool::Check: the operator's scrub and the tests' oracle after crashes.
#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "blockstore/pool.h"
#include "blockstore/pool_internal.h"
#include "blockstore/util.h"

namespace blockstore {

// What the check walks: a copy of the pool's state as of a commit, so that
// the walk runs without the lock (under a read ticket, which keeps every
// block that commit reaches from being reused meanwhile).
struct Pool::CheckState {
  Catalog catalog;
  std::vector<uint64_t> catalog_nodes;
  CheckReport report;
  std::vector<uint32_t> refs;                         // computed counts
  std::unordered_map<uint64_t, Digest> node_digest;   // visited nodes
  std::unordered_map<uint64_t, Digest> chunk_digest;  // data chunk -> digest
  void Problem(std::string s) {
    if (report.problems.size() < 1000) report.problems.push_back(std::move(s));
  }
};

std::optional<Digest> Pool::CheckTree(CheckState& st, uint64_t id, int level,
                                      uint64_t base, uint64_t chunk_count,
                                      uint64_t parent_birth,
                                      const std::string& where) {
  if (!ValidNodeId(id)) {
    st.Problem(absl::StrCat(where, ": node id ", id, " out of range"));
    return std::nullopt;
  }
  if (st.refs[id - shape_.meta_start]++ > 0) {
    auto it = st.node_digest.find(id);
    if (it == st.node_digest.end()) return std::nullopt;  // reported already
    return it->second;
  }
  ++st.report.nodes_checked;
  AlignedBuffer buf(kNodeSize);
  if (absl::Status s = io_.ReadAt(id * kNodeSize, buf.span()); !s.ok()) {
    st.Problem(absl::StrCat(where, ": ", s.message()));
    return std::nullopt;
  }
  std::span<const std::byte, kNodeSize> raw(buf.data(), kNodeSize);
  absl::StatusOr<NodeHeader> h = OpenNode(raw, id);
  if (!h.ok()) {
    st.Problem(absl::StrCat(where, ": ", h.status().message()));
    return std::nullopt;
  }
  if (h->kind != NodeKind::kTree || h->level != level) {
    st.Problem(absl::StrCat(where, ": metadata node ", id,
                            " is not a tree node at level ", level));
    return std::nullopt;
  }
  if (h->birth != parent_birth) {
    st.Problem(absl::StrCat(where, ": metadata node ", id, " born in ",
                            h->birth, " but its parent says ", parent_birth));
  }
  std::array<Entry, kFanout> entries;
  DecodeEntries(raw, entries);
  std::array<Digest, kFanout> digests;
  const uint64_t span = Span(level);
  for (int i = 0; i < kFanout; ++i) {
    const Entry& e = entries[i];
    uint64_t cb = base + i * span;
    std::string at = absl::StrCat(where, " node ", id, " entry ", i);
    if (e.birth > h->birth) {
      st.Problem(absl::StrCat(at, ": birth ", e.birth,
                              " is newer than its node (", h->birth, ")"));
    }
    if (level == 0) {
      if (IsDataPtr(e.ptr)) {
        if (e.ptr < shape_.data_start ||
            e.ptr >= shape_.data_start + shape_.data_count) {
          st.Problem(absl::StrCat(at, ": data chunk ", e.ptr, " out of range"));
        } else {
          ++st.refs[shape_.meta_count + (e.ptr - shape_.data_start)];
          auto [it, fresh] = st.chunk_digest.emplace(e.ptr, e.digest);
          if (!fresh && it->second != e.digest) {
            st.Problem(
                absl::StrCat(at, ": data chunk ", e.ptr,
                             " is referenced with two different digests"));
          }
        }
        if (cb >= chunk_count) {
          st.Problem(absl::StrCat(at, ": chunk ", cb,
                                  " past the volume end is mapped"));
        }
      } else if (e.digest != NullEntryDigest(0)) {
        st.Problem(absl::StrCat(at, ": unmapped chunk ", cb,
                                " has a non-zero digest"));
      }
      digests[i] = e.digest;
    } else if (e.ptr == 0) {
      if (e.digest != NullEntryDigest(level)) {
        st.Problem(absl::StrCat(at, ": empty subtree has a wrong digest"));
      }
      digests[i] = NullEntryDigest(level);
    } else {
      if (cb >= chunk_count) {
        st.Problem(absl::StrCat(at, ": subtree past the volume end"));
      }
      std::optional<Digest> d =
          CheckTree(st, e.ptr, level - 1, cb, chunk_count, e.birth, where);
      if (d.has_value() && *d != e.digest) {
        st.Problem(absl::StrCat(at, ": Merkle digest of node ", e.ptr,
                                " does not match its parent's entry"));
      }
      digests[i] = e.digest;
    }
  }
  Digest d = Hash128Digests(digests);
  st.node_digest.emplace(id, d);
  return d;
}

void Pool::CheckAllTrees(CheckState& st) {
  for (uint64_t id : st.catalog_nodes) {
    if (st.refs[id - shape_.meta_start]++ > 0) {
      st.Problem(absl::StrCat("catalog node ", id, " is linked twice"));
    }
  }
  for (const auto& [name, v] : st.catalog.volumes) {
    CheckRoot(st, v.root, v.size_bytes, absl::StrCat("volume ", name));
    for (const SnapshotRec& s : v.snapshots) {
      CheckRoot(st, s.root, s.size_bytes,
                absl::StrCat("snapshot ", name, "@", s.name));
    }
  }
}

void Pool::CheckRoot(CheckState& st, const Entry& root, uint64_t size_bytes,
                     const std::string& where) {
  if (root.ptr == 0) return;
  int depth = Depth(ChunkCount(size_bytes));
  std::optional<Digest> d = CheckTree(
      st, root.ptr, depth - 1, 0, ChunkCount(size_bytes), root.birth, where);
  if (d.has_value() && *d != root.digest) {
    st.Problem(absl::StrCat(where, ": root digest does not match its tree"));
  }
}

absl::Status Pool::RebuildCounts() {
  CheckState st;
  st.catalog = catalog_;
  st.catalog_nodes = catalog_nodes_;
  st.refs.assign(space_.counts().size(), 0);
  CheckAllTrees(st);
  if (!st.report.problems.empty()) {
    return absl::DataLossError(absl::StrCat(
        "the trees they would be rebuilt from are damaged too (",
        st.report.problems.size(),
        " problem(s), the first: ", st.report.problems.front(), ")"));
  }
  space_.SetCounts(st.refs);
  return absl::OkStatus();
}

absl::StatusOr<Pool::Repaired> Pool::Repair(Io& io) {
  return RepairPool(
      std::unique_ptr<Pool>(new Pool(io, nullptr, OpenMode::kReadWrite)));
}

absl::StatusOr<Pool::Repaired> Pool::Repair(std::unique_ptr<Io> io) {
  Io& ref = *io;
  return RepairPool(std::unique_ptr<Pool>(
      new Pool(ref, std::move(io), OpenMode::kReadWrite)));
}

absl::StatusOr<Pool::Repaired> Pool::RepairPool(std::unique_ptr<Pool> pool) {
  std::string what;
  {
    MutexLock lock(pool->mu_);
    if (absl::Status s = pool->LoadLocked(/*repair=*/true); !s.ok()) return s;
    if (!pool->count_damage_.empty()) {
      // Both copies of the table, whole: the next commit writes the other
      // copy, the one after it the damaged one.
      pool->full_table_writes_ = 2;
      for (int i = 0; i < 2; ++i) {
        pool->changed_ = true;
        if (absl::Status s = pool->Fail(pool->CommitLocked(CommitLock::kHold));
            !s.ok()) {
          return s;
        }
      }
      what = absl::StrCat(pool->count_damage_,
                          ": rebuilt from the trees and written back");
      pool->count_damage_.clear();
    }
  }
  return Repaired{std::move(pool), std::move(what)};
}

absl::StatusOr<Pool::CheckReport> Pool::Check(bool verify_data) {
  MutexLock lock(mu_);
  if (!failed_.ok()) return failed_;
  // The check reads what is on disk: commit first, and take a copy of that
  // commit's catalog, counts and superblock; the walk then runs without the
  // lock while the pool goes on serving. Not in the middle of another
  // caller's group, nor of another commit (the lock is held from here on).
  while (open_group_ != 0 || committing_) cv_.wait(mu_);
  if (absl::Status s = Fail(CommitLocked(CommitLock::kHold)); !s.ok()) {
    return s;
  }
  if (absl::Status s = EnsureCountsLocked(); !s.ok()) return s;
  const std::vector<uint32_t> counts(space_.counts().begin(),
                                     space_.counts().end());
  const Superblock sb = sb_;
  const std::string count_damage = count_damage_;
  CheckState st;
  st.catalog = catalog_;
  st.catalog_nodes = catalog_nodes_;
  st.refs.assign(counts.size(), 0);
  ReadTicket ticket(*this);
  mu_.unlock();
  Walk(st, sb, counts, count_damage, verify_data);
  mu_.lock();
  return std::move(st.report);
}

void Pool::Walk(CheckState& st, const Superblock& sb,
                const std::vector<uint32_t>& counts,
                const std::string& count_damage, bool verify_data) {
  // Superblocks: the older one may be torn by a crash (or be mid-write by
  // a commit now); that is expected.
  AlignedBuffer sbs(2 * kSuperblockSize);
  if (absl::Status s = io_.ReadAt(0, sbs.span()); !s.ok()) {
    st.Problem(absl::StrCat("reading the superblocks: ", s.message()));
  }
  for (int i = 0; i < 2; ++i) {
    Superblock other;
    std::string why;
    SuperblockState state =
        DecodeSuperblock(std::span<const std::byte, kSuperblockSize>(
                             sbs.data() + i * kSuperblockSize, kSuperblockSize),
                         i * kSuperblockSize, io_.size_bytes(), &other, &why);
    if (state != SuperblockState::kValid) {
      st.report.notes.push_back(
          absl::StrCat("superblock ", i == 0 ? "A" : "B", ": ", why,
                       " (the other one is in use; normal after a crash)"));
    } else if (other.pool_guid != sb.pool_guid) {
      st.Problem(absl::StrCat("superblock ", i == 0 ? "A" : "B",
                              " belongs to another pool"));
    }
  }

  if (!count_damage.empty()) {
    st.Problem(absl::StrCat(
        count_damage,
        ": the counts were rebuilt from the trees to read; write them back "
        "with 'tandem pool check --repair'"));
  }
  CheckAllTrees(st);

  uint64_t used_nodes = 0;
  uint64_t used_chunks = 0;
  for (uint64_t i = 0; i < counts.size(); ++i) {
    bool is_node = i < shape_.meta_count;
    if (counts[i] != 0) ++(is_node ? used_nodes : used_chunks);
    if (counts[i] == st.refs[i]) continue;
    std::string what =
        is_node ? absl::StrCat("metadata node ", shape_.meta_start + i)
                : absl::StrCat("data chunk ",
                               shape_.data_start + i - shape_.meta_count);
    if (st.refs[i] == 0) {
      st.Problem(absl::StrCat(what, ": leaked (reference count ", counts[i],
                              ", no references)"));
    } else {
      st.Problem(absl::StrCat(what, ": reference count ", counts[i], ", but ",
                              st.refs[i], " references"));
    }
  }
  if (used_nodes != sb.used_nodes || used_chunks != sb.used_chunks) {
    st.Problem(absl::StrCat("free-space accounting: superblock says ",
                            sb.used_nodes, " nodes and ", sb.used_chunks,
                            " chunks in use, the table says ", used_nodes,
                            " and ", used_chunks));
  }

  if (verify_data) {
    std::vector<std::pair<uint64_t, Digest>> chunks(st.chunk_digest.begin(),
                                                    st.chunk_digest.end());
    std::sort(chunks.begin(), chunks.end(),
              [](const auto& a, const auto& b) { return a.first < b.first; });
    const uint64_t c_size = shape_.chunk_size;
    constexpr size_t kBatch = 256;
    AlignedBuffer buf(kBatch * c_size);
    for (size_t at = 0; at < chunks.size(); at += kBatch) {
      size_t n = std::min(kBatch, chunks.size() - at);
      std::vector<ReadOp> ops;
      for (size_t k = 0; k < n; ++k) {
        ops.push_back(
            {chunks[at + k].first * c_size, {buf.data() + k * c_size, c_size}});
      }
      if (absl::Status s = io_.Read(ops); !s.ok()) {
        st.Problem(absl::StrCat("reading data: ", s.message()));
        continue;
      }
      for (size_t k = 0; k < n; ++k) {
        ++st.report.chunks_checked;
        if (Hash128({buf.data() + k * c_size, c_size}) !=
            chunks[at + k].second) {
          st.Problem(absl::StrCat("data chunk ", chunks[at + k].first,
                                  ": content does not match its digest"));
        }
      }
    }
  }
}

}  // namespace blockstore
