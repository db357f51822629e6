#include "transport/nbd_exports.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace transport {
namespace {

using nbd::Extent;

class VolumeExport final : public NbdExport {
 public:
  VolumeExport(blockstore::Pool& pool, std::string volume, std::string snapshot,
               uint64_t size)
      : pool_(pool),
        volume_(std::move(volume)),
        snapshot_(std::move(snapshot)),
        size_(size) {}

  uint64_t size() const override { return size_; }
  bool read_only() const override {
    if (!snapshot_.empty()) return true;
    absl::StatusOr<blockstore::VolumeInfo> v = pool_.GetVolume(volume_);
    return !v.ok() || v->read_only;
  }
  uint32_t preferred_block() const override { return pool_.chunk_size(); }

  absl::Status Read(uint64_t offset, std::span<std::byte> out) override {
    return pool_.Read(volume_, snapshot_, offset, out);
  }
  absl::Status Write(uint64_t offset,
                     std::span<const std::byte> data) override {
    if (!snapshot_.empty()) return ReadOnly();
    return pool_.Write(volume_, offset, data);
  }
  absl::Status Trim(uint64_t offset, uint64_t length) override {
    if (!snapshot_.empty()) return ReadOnly();
    return pool_.Trim(volume_, offset, length);
  }
  // A trimmed range reads as zeros and takes no space: zeros written are
  // a trim here (whole chunks become holes, parts of chunks are zeroed).
  absl::Status WriteZeroes(uint64_t offset, uint64_t length) override {
    return Trim(offset, length);
  }
  absl::Status Flush() override { return pool_.Flush(); }

  absl::StatusOr<std::vector<Extent>> BlockStatus(uint64_t offset,
                                                  uint32_t length) override {
    const uint64_t c = pool_.chunk_size();
    const uint64_t end = std::min(size_, offset + length);
    if (offset >= end) return std::vector<Extent>{};
    const uint64_t first = offset / c, last = (end - 1) / c + 1;
    absl::StatusOr<blockstore::DiffBatch> batch =
        pool_.Diff(volume_, "", snapshot_, first, last - first);
    if (!batch.ok()) return batch.status();
    // Chunks the walk covered: to the end asked for, or where it stopped.
    const uint64_t covered =
        batch->done ? last : std::min(last, batch->next_chunk);
    std::vector<Extent> out;
    uint64_t at = offset;  // bytes described so far end here
    auto add = [&](uint64_t to, uint32_t flags) {
      to = std::min(to, end);
      if (to <= at) return;
      if (!out.empty() && out.back().flags == flags) {
        out.back().length += static_cast<uint32_t>(to - at);
      } else {
        out.push_back({static_cast<uint32_t>(to - at), flags});
      }
      at = to;
    };
    constexpr uint32_t kHole = nbd::kStateHole | nbd::kStateZero;
    for (const blockstore::ChangedRun& r : batch->runs) {
      if (r.first_chunk >= covered) break;
      add(r.first_chunk * c, kHole);
      add((r.first_chunk + r.count_chunks) * c,
          r.kind == blockstore::ChangedRun::Kind::kData ? 0 : kHole);
    }
    add(covered * c, kHole);
    // A walk that stopped before its first chunk: "allocated" is never wrong.
    if (out.empty()) add(std::min(end, (first + 1) * c), 0);
    return out;
  }

 private:
  absl::Status ReadOnly() const {
    return absl::FailedPreconditionError(
        absl::StrCat("snapshot ", volume_, "@", snapshot_, " is read-only"));
  }

  blockstore::Pool& pool_;
  const std::string volume_, snapshot_;
  const uint64_t size_;
};

}  // namespace

std::vector<NbdExports::Listed> PoolExports::List() {
  std::vector<Listed> out;
  for (const auto& [name, pool] : pools_) {
    absl::StatusOr<std::vector<blockstore::VolumeInfo>> volumes =
        pool->ListVolumes();
    if (!volumes.ok()) continue;
    for (const blockstore::VolumeInfo& v : *volumes) {
      if (v.name.starts_with('.')) continue;
      out.push_back(
          {absl::StrCat(name, "/", v.name),
           absl::StrCat("volume, ", v.read_only ? "read-only" : "read-write")});
      absl::StatusOr<std::vector<blockstore::SnapshotInfo>> snaps =
          pool->ListSnapshots(v.name);
      if (!snaps.ok()) continue;
      for (const blockstore::SnapshotInfo& s : *snaps) {
        out.push_back({absl::StrCat(name, "/", v.name, "@", s.name),
                       "snapshot, read-only"});
      }
    }
  }
  return out;
}

absl::StatusOr<std::shared_ptr<NbdExport>> PoolExports::Open(
    const std::string& name) {
  const size_t slash = name.find('/');
  if (slash == std::string::npos) {
    return absl::NotFoundError(absl::StrCat(
        "'", name, "' is not POOL/VOLUME or POOL/VOLUME@SNAPSHOT"));
  }
  auto it = pools_.find(name.substr(0, slash));
  if (it == pools_.end()) {
    return absl::NotFoundError(
        absl::StrCat("no pool '", name.substr(0, slash), "'"));
  }
  std::string volume = name.substr(slash + 1), snapshot;
  if (size_t at = volume.find('@'); at != std::string::npos) {
    snapshot = volume.substr(at + 1);
    volume.resize(at);
    if (snapshot.empty()) return absl::NotFoundError("empty snapshot name");
  }
  if (volume.empty() || volume.starts_with('.')) {
    return absl::NotFoundError(absl::StrCat("no volume '", volume, "'"));
  }
  blockstore::Pool& pool = *it->second;
  uint64_t size = 0;
  if (snapshot.empty()) {
    absl::StatusOr<blockstore::VolumeInfo> v = pool.GetVolume(volume);
    if (!v.ok()) return v.status();
    size = v->size_bytes;
  } else {
    absl::StatusOr<blockstore::SnapshotInfo> s =
        pool.GetSnapshot(volume, snapshot);
    if (!s.ok()) return s.status();
    size = s->size_bytes;
  }
  return std::make_shared<VolumeExport>(pool, std::move(volume),
                                        std::move(snapshot), size);
}

}  // namespace transport
