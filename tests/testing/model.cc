#include "tests/testing/model.h"

#include <algorithm>
#include <cstring>
#include <random>

#include "absl/strings/str_cat.h"
#include "blockstore/format.h"
#include "blockstore/util.h"

namespace testing_util {

using blockstore::Digest;
using blockstore::kFanout;

void PoolModel::Write(const std::string& volume, uint64_t offset,
                      std::span<const std::byte> data) {
  VolumeModel& v = volumes.at(volume);
  for (uint64_t done = 0; done < data.size();) {
    uint64_t pos = offset + done;
    uint64_t c = pos / chunk_size_;
    uint64_t in = pos % chunk_size_;
    uint64_t n = std::min<uint64_t>(chunk_size_ - in, data.size() - done);
    auto& chunk = v.chunks[c];
    if (chunk.empty()) chunk.assign(chunk_size_, std::byte{0});
    std::memcpy(chunk.data() + in, data.data() + done, n);
    if (blockstore::IsAllZero(chunk)) v.chunks.erase(c);
    done += n;
  }
}

void PoolModel::ZeroRange(VolumeModel& v, uint64_t offset, uint64_t length) {
  uint64_t end = offset + length;
  for (auto it = v.chunks.lower_bound(offset / chunk_size_);
       it != v.chunks.end() && it->first * chunk_size_ < end;) {
    uint64_t cb = it->first * chunk_size_;
    uint64_t from = std::max(cb, offset) - cb;
    uint64_t to = std::min(cb + chunk_size_, end) - cb;
    std::memset(it->second.data() + from, 0, to - from);
    if (blockstore::IsAllZero(it->second)) {
      it = v.chunks.erase(it);
    } else {
      ++it;
    }
  }
}

void PoolModel::Trim(const std::string& volume, uint64_t offset,
                     uint64_t length) {
  ZeroRange(volumes.at(volume), offset, length);
}

void PoolModel::Resize(const std::string& volume, uint64_t size_bytes) {
  VolumeModel& v = volumes.at(volume);
  if (size_bytes < v.size_bytes) {
    ZeroRange(v, size_bytes, v.size_bytes - size_bytes);
  }
  v.size_bytes = size_bytes;
}

void PoolModel::Snapshot(const std::string& volume, const std::string& name) {
  VolumeModel& v = volumes.at(volume);
  VolumeModel copy;
  copy.size_bytes = v.size_bytes;
  copy.chunks = v.chunks;
  v.snapshots[name] = std::move(copy);
}

void PoolModel::Rollback(const std::string& volume, const std::string& name) {
  VolumeModel& v = volumes.at(volume);
  const VolumeModel& s = v.snapshots.at(name);
  v.size_bytes = s.size_bytes;
  v.chunks = s.chunks;
}

std::vector<std::byte> PoolModel::Read(const VolumeModel& v, uint64_t offset,
                                       uint64_t length) const {
  std::vector<std::byte> out(length);
  uint64_t end = offset + length;
  for (auto it = v.chunks.lower_bound(offset / chunk_size_);
       it != v.chunks.end() && it->first * chunk_size_ < end; ++it) {
    uint64_t cb = it->first * chunk_size_;
    uint64_t from = std::max(cb, offset);
    uint64_t to = std::min(cb + chunk_size_, end);
    std::memcpy(out.data() + (from - offset), it->second.data() + (from - cb),
                to - from);
  }
  return out;
}

// The digest definition, written out again from format.h on purpose.
Digest PoolModel::Subtree(const VolumeModel& v, int level,
                          uint64_t base) const {
  const uint64_t span = blockstore::Span(level);
  auto first = v.chunks.lower_bound(base);
  bool empty = first == v.chunks.end() || first->first >= base + span * kFanout;
  std::array<Digest, kFanout> parts;
  if (empty) {
    // All zeros: the digest of F zero chunks, then of F such nodes, and so on.
    std::vector<std::byte> zero(chunk_size_);
    Digest d = blockstore::Hash128(zero);
    for (int l = 0; l <= level; ++l) {
      parts.fill(d);
      d = blockstore::Hash128Digests(parts);
    }
    return d;
  }
  for (int i = 0; i < kFanout; ++i) {
    uint64_t cb = base + i * span;
    if (level > 0) {
      parts[i] = Subtree(v, level - 1, cb);
    } else if (auto it = v.chunks.find(cb); it != v.chunks.end()) {
      parts[i] = blockstore::Hash128(it->second);
    } else {
      std::vector<std::byte> zero(chunk_size_);
      parts[i] = blockstore::Hash128(zero);
    }
  }
  return blockstore::Hash128Digests(parts);
}

Digest PoolModel::RootDigest(const VolumeModel& v) const {
  uint64_t chunks = (v.size_bytes + chunk_size_ - 1) / chunk_size_;
  int depth = 1;
  while (blockstore::Span(depth) < chunks) ++depth;
  Digest sub = Subtree(v, depth - 1, 0);
  std::byte buf[28];
  std::memcpy(buf, sub.bytes.data(), 16);
  blockstore::PutLe64(buf + 16, v.size_bytes);
  blockstore::PutLe32(buf + 24, chunk_size_);
  return blockstore::Hash128(buf);
}

namespace {

std::string DiffOne(blockstore::Pool& pool, const PoolModel& model,
                    const std::string& volume, const std::string& snapshot,
                    const VolumeModel& want) {
  std::string what = snapshot.empty() ? volume : volume + "@" + snapshot;
  uint64_t size = 0;
  if (snapshot.empty()) {
    absl::StatusOr<blockstore::VolumeInfo> v = pool.GetVolume(volume);
    if (!v.ok()) return std::string(v.status().message());
    size = v->size_bytes;
  } else {
    absl::StatusOr<blockstore::SnapshotInfo> s =
        pool.GetSnapshot(volume, snapshot);
    if (!s.ok()) return std::string(s.status().message());
    size = s->size_bytes;
  }
  if (size != want.size_bytes) {
    return absl::StrCat(what, ": size ", size, ", model ", want.size_bytes);
  }
  constexpr uint64_t kPiece = 1 << 20;
  std::vector<std::byte> got;
  for (uint64_t at = 0; at < size; at += kPiece) {
    uint64_t n = std::min(kPiece, size - at);
    got.resize(n);
    if (absl::Status s = pool.Read(volume, snapshot, at, got); !s.ok()) {
      return absl::StrCat(what, ": read at ", at, ": ", s.message());
    }
    std::vector<std::byte> expect = model.Read(want, at, n);
    if (std::memcmp(got.data(), expect.data(), n) != 0) {
      size_t i = std::mismatch(got.begin(), got.end(), expect.begin()).first -
                 got.begin();
      return absl::StrCat(what, ": byte ", at + i, " differs from the model");
    }
  }
  absl::StatusOr<Digest> d = pool.RootDigest(volume, snapshot);
  if (!d.ok()) return absl::StrCat(what, ": digest: ", d.status().message());
  if (*d != model.RootDigest(want)) {
    return absl::StrCat(what, ": root digest ", d->ToHex(), ", model ",
                        model.RootDigest(want).ToHex());
  }
  return "";
}

}  // namespace

std::string DiffVolume(blockstore::Pool& pool, const PoolModel& model,
                       const std::string& volume) {
  const VolumeModel& v = model.volumes.at(volume);
  if (std::string d = DiffOne(pool, model, volume, "", v); !d.empty()) return d;
  absl::StatusOr<std::vector<blockstore::SnapshotInfo>> snaps =
      pool.ListSnapshots(volume);
  if (!snaps.ok()) return std::string(snaps.status().message());
  if (snaps->size() != v.snapshots.size()) {
    return absl::StrCat(volume, ": ", snaps->size(), " snapshots, model ",
                        v.snapshots.size());
  }
  for (const auto& [name, s] : v.snapshots) {
    if (std::string d = DiffOne(pool, model, volume, name, s); !d.empty()) {
      return d;
    }
  }
  return "";
}

std::string DiffPool(blockstore::Pool& pool, const PoolModel& model) {
  absl::StatusOr<std::vector<blockstore::VolumeInfo>> vols = pool.ListVolumes();
  if (!vols.ok()) return std::string(vols.status().message());
  if (vols->size() != model.volumes.size()) {
    return absl::StrCat(vols->size(), " volumes, model ", model.volumes.size());
  }
  for (const auto& [name, v] : model.volumes) {
    if (std::string d = DiffVolume(pool, model, name); !d.empty()) return d;
  }
  return "";
}

std::vector<std::byte> TestData(uint64_t length, uint64_t seed) {
  std::vector<std::byte> out(length);
  std::mt19937_64 rng(seed);
  switch (seed % 4) {
    case 0:  // zeros (exercises zero detection)
      break;
    case 1: {  // a short repeating pattern
      for (uint64_t i = 0; i < length; ++i) {
        out[i] = static_cast<std::byte>((i * 7 + seed) % 251);
      }
      break;
    }
    default:
      for (std::byte& b : out) b = static_cast<std::byte>(rng());
  }
  return out;
}

}  // namespace testing_util
