#include "tools/pool_ops.h"

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "blockstore/util.h"
#include "engine/relationship.h"
#include "tools/open_pool.h"

namespace tools {

using blockstore::Pool;

namespace {

constexpr size_t kStreamPiece = 4 << 20;

std::string Time(int64_t ns) {
  return absl::FormatTime("%Y-%m-%dT%H:%M:%SZ", absl::FromUnixNanos(ns),
                          absl::UTCTimeZone());
}

// FailedPrecondition if `volume` is in a replication relationship: `what`
// would break it.
absl::Status InRelationship(Pool& pool, const std::string& volume,
                            const std::string& what) {
  if (engine::Replication::InRelationship(pool, volume)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "volume '", volume, "' is in a replication relationship; ", what,
        " would break it: run `tandem relationship release` first"));
  }
  return absl::OkStatus();
}

class Local final : public PoolOps {
 public:
  explicit Local(Pool& pool) : pool_(pool) {}
  Local(std::unique_ptr<Pool> owned)
      : owned_(std::move(owned)), pool_(*owned_) {}

  absl::StatusOr<ordered_json> Info() override {
    return PoolInfoJson(pool_.Info());
  }

  absl::StatusOr<ordered_json> Check(bool data) override {
    absl::StatusOr<Pool::CheckReport> r = pool_.Check(data);
    if (!r.ok()) return r.status();
    return ordered_json{{"notes", r->notes},
                        {"problems", r->problems},
                        {"nodes_checked", r->nodes_checked},
                        {"chunks_checked", r->chunks_checked}};
  }

  absl::StatusOr<ordered_json> ListVolumes() override {
    absl::StatusOr<std::vector<blockstore::VolumeInfo>> vols =
        pool_.ListVolumes();
    if (!vols.ok()) return vols.status();
    ordered_json j = ordered_json::array();
    for (const auto& v : *vols) j.push_back(VolumeJson(v));
    return j;
  }

  absl::Status CreateVolume(const std::string& name, uint64_t size) override {
    return pool_.CreateVolume(name, size);
  }
  absl::Status ResizeVolume(const std::string& name, uint64_t size) override {
    return pool_.ResizeVolume(name, size);
  }
  absl::Status DeleteVolume(const std::string& name, bool recursive) override {
    if (absl::Status s = InRelationship(pool_, name, "deleting it"); !s.ok()) {
      return s;
    }
    return pool_.DeleteVolume(name, recursive);
  }

  absl::StatusOr<ordered_json> CreateSnapshot(
      const std::string& volume, const std::string& name) override {
    absl::StatusOr<blockstore::SnapshotInfo> s =
        pool_.CreateSnapshot(volume, name);
    if (!s.ok()) return s.status();
    return SnapshotJson(*s);
  }

  absl::StatusOr<ordered_json> ListSnapshots(
      const std::string& volume) override {
    absl::StatusOr<std::vector<blockstore::SnapshotInfo>> snaps =
        pool_.ListSnapshots(volume);
    if (!snaps.ok()) return snaps.status();
    ordered_json j = ordered_json::array();
    for (const auto& s : *snaps) j.push_back(SnapshotJson(s));
    return j;
  }

  absl::Status DeleteSnapshot(const std::string& volume,
                              const std::string& name) override {
    absl::StatusOr<blockstore::SnapshotInfo> info =
        pool_.GetSnapshot(volume, name);
    if (info.ok() && engine::Replication::IsReplicationSnapshot(*info)) {
      if (absl::Status s = InRelationship(pool_, volume,
                                          "deleting its replication snapshots");
          !s.ok()) {
        return s;
      }
    }
    return pool_.DeleteSnapshot(volume, name);
  }

  absl::Status Rollback(const std::string& volume,
                        const std::string& snapshot) override {
    return pool_.Rollback(volume, snapshot);
  }

  absl::StatusOr<std::string> Digest(const std::string& volume,
                                     const std::string& snapshot) override {
    absl::StatusOr<blockstore::Digest> d = pool_.RootDigest(volume, snapshot);
    if (!d.ok()) return d.status();
    return d->ToHex();
  }

  absl::Status Trim(const std::string& volume, uint64_t offset,
                    uint64_t length) override {
    absl::Status s = pool_.Trim(volume, offset, length);
    return s.ok() ? pool_.Flush() : s;
  }

  absl::Status Write(const std::string& volume, uint64_t offset,
                     uint64_t size_hint, engine::ByteSource& in) override {
    absl::StatusOr<blockstore::VolumeInfo> vol = pool_.GetVolume(volume);
    if (!vol.ok()) return vol.status();
    // Refused even with nothing to write (the pool's message says why).
    if (vol->read_only) return pool_.Write(volume, 0, {});
    if (size_hint > 0 &&
        (offset > vol->size_bytes || size_hint > vol->size_bytes - offset)) {
      return absl::OutOfRangeError(
          absl::StrCat("writing ", size_hint, " bytes at offset ", offset,
                       " would pass the end of volume '", volume, "' (",
                       vol->size_bytes, " bytes)"));
    }
    // Aligned, so whole chunks go to disk without a copy.
    blockstore::AlignedBuffer aligned(kStreamPiece);
    std::span<std::byte> buf = aligned.span();
    uint64_t at = offset;
    for (;;) {
      size_t got = 0;
      while (got < buf.size()) {
        absl::StatusOr<size_t> n = in.Read(buf.subspan(got));
        if (!n.ok()) return n.status();
        if (*n == 0) break;
        got += *n;
      }
      if (got == 0) break;
      // On error nothing is committed: the transaction is dropped unflushed.
      if (absl::Status s = pool_.Write(volume, at, buf.first(got)); !s.ok()) {
        return s;
      }
      at += got;
      if (got < buf.size()) break;
    }
    return pool_.Flush();
  }

  absl::StatusOr<uint64_t> ReadLength(const std::string& volume,
                                      const std::string& snapshot,
                                      uint64_t offset,
                                      std::optional<uint64_t> length) override {
    uint64_t size = 0;
    const std::string ref =
        snapshot.empty() ? volume : absl::StrCat(volume, "@", snapshot);
    if (snapshot.empty()) {
      absl::StatusOr<blockstore::VolumeInfo> v = pool_.GetVolume(volume);
      if (!v.ok()) return v.status();
      size = v->size_bytes;
    } else {
      absl::StatusOr<blockstore::SnapshotInfo> s =
          pool_.GetSnapshot(volume, snapshot);
      if (!s.ok()) return s.status();
      size = s->size_bytes;
    }
    if (offset > size) {
      return absl::OutOfRangeError(absl::StrCat("offset ", offset,
                                                " is past the end of '", ref,
                                                "' (", size, " bytes)"));
    }
    const uint64_t n = length.value_or(size - offset);
    if (n > size - offset) {
      return absl::OutOfRangeError(
          absl::StrCat("read of ", n, " bytes at offset ", offset,
                       " is past the end of '", ref, "' (", size, " bytes)"));
    }
    return n;
  }

  absl::Status Read(const std::string& volume, const std::string& snapshot,
                    uint64_t offset, std::optional<uint64_t> length,
                    engine::ByteSink& out) override {
    absl::StatusOr<uint64_t> n = ReadLength(volume, snapshot, offset, length);
    if (!n.ok()) return n.status();
    blockstore::AlignedBuffer aligned(kStreamPiece);
    std::span<std::byte> buf = aligned.span();
    for (uint64_t done = 0; done < *n;) {
      size_t piece = std::min<uint64_t>(buf.size(), *n - done);
      if (absl::Status s =
              pool_.Read(volume, snapshot, offset + done, buf.first(piece));
          !s.ok()) {
        return s;
      }
      if (absl::Status s = out.Write(buf.first(piece)); !s.ok()) return s;
      done += piece;
    }
    return absl::OkStatus();
  }

 private:
  std::unique_ptr<Pool> owned_;
  Pool& pool_;
};

}  // namespace

ordered_json VolumeJson(const blockstore::VolumeInfo& v) {
  return {{"name", v.name},
          {"guid", blockstore::GuidToString(v.guid)},
          {"size_bytes", v.size_bytes},
          {"snapshots", v.snapshot_count},
          {"read_only", v.read_only},
          {"created", Time(v.create_time_ns)}};
}

ordered_json SnapshotJson(const blockstore::SnapshotInfo& s) {
  return {{"volume", s.volume},
          {"name", s.name},
          {"guid", blockstore::GuidToString(s.guid)},
          {"size_bytes", s.size_bytes},
          {"created", Time(s.create_time_ns)},
          {"created_ns", s.create_time_ns},
          {"generation", s.generation},
          {"root_digest", s.root_digest.ToHex()},
          {"replication", !s.owner.empty()}};
}

ordered_json PoolInfoJson(const blockstore::PoolInfo& i) {
  return {{"path", i.device},
          {"io", i.io},
          {"guid", blockstore::GuidToString(i.pool_guid)},
          {"chunk_size_bytes", i.chunk_size_bytes},
          {"capacity_bytes", i.capacity_bytes},
          {"used_bytes", i.used_bytes},
          {"free_bytes", i.free_bytes},
          {"metadata_capacity_bytes", i.metadata_capacity_bytes},
          {"metadata_used_bytes", i.metadata_used_bytes},
          {"generation", i.generation},
          {"volumes", i.volume_count},
          {"snapshots", i.snapshot_count}};
}

std::unique_ptr<PoolOps> PoolOpsOver(Pool& pool) {
  return std::make_unique<Local>(pool);
}

absl::StatusOr<std::unique_ptr<PoolOps>> OpenPoolOps(
    const std::string& path, blockstore::OpenMode mode) {
  absl::StatusOr<std::unique_ptr<Pool>> pool = OpenPool(path, mode);
  if (!pool.ok()) return pool.status();
  return std::unique_ptr<PoolOps>(new Local(std::move(*pool)));
}

absl::StatusOr<RepairedPool> RepairPoolFile(const std::string& path) {
  absl::StatusOr<std::unique_ptr<blockstore::Io>> io =
      OpenPoolIo(path, blockstore::OpenMode::kReadWrite);
  if (!io.ok()) return io.status();
  absl::StatusOr<Pool::Repaired> r = Pool::Repair(std::move(*io));
  if (!r.ok()) return r.status();
  return RepairedPool{std::move(r->what),
                      std::unique_ptr<PoolOps>(new Local(std::move(r->pool)))};
}

}  // namespace tools
