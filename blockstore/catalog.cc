#include "blockstore/catalog.h"

#include "absl/strings/str_cat.h"
#include "blockstore/byte_codec.h"

namespace blockstore {
namespace {

constexpr uint32_t kCatalogMagic = 0x54414354;  // "TCAT"
// Version 2 added a flags word per volume (bit 0: read-only) and the pool's
// properties after the volumes; version 3 a snapshot's owner. Older
// catalogs are read as such.
constexpr uint32_t kCatalogVersion = 3;
constexpr uint32_t kVolumeReadOnly = 1;

void PutEntry(ByteWriter& w, const Entry& e) {
  w.U64(e.ptr);
  w.U64(e.birth);
  w.Bytes(e.digest.bytes);
}

Entry GetEntry(ByteReader& r) {
  Entry e;
  e.ptr = r.U64();
  e.birth = r.U64();
  r.Bytes(e.digest.bytes);
  return e;
}

}  // namespace

std::string SerializeCatalog(const Catalog& catalog) {
  ByteWriter w;
  w.U32(kCatalogMagic);
  w.U32(kCatalogVersion);
  w.U32(static_cast<uint32_t>(catalog.volumes.size()));
  for (const auto& [name, v] : catalog.volumes) {
    w.Str(v.name);
    w.Bytes(v.guid);
    w.U64(static_cast<uint64_t>(v.create_time_ns));
    w.U64(v.size_bytes);
    PutEntry(w, v.root);
    w.U32(static_cast<uint32_t>(v.snapshots.size()));
    for (const CatalogSnapshot& s : v.snapshots) {
      w.Str(s.name);
      w.Bytes(s.guid);
      w.U64(static_cast<uint64_t>(s.create_time_ns));
      w.U64(s.generation);
      w.U64(s.size_bytes);
      PutEntry(w, s.root);
      w.Str(s.owner);
    }
    w.U32(v.read_only ? kVolumeReadOnly : 0);
  }
  w.U32(static_cast<uint32_t>(catalog.properties.size()));
  for (const auto& [key, value] : catalog.properties) {
    w.Str(key);
    w.Str(value);
  }
  return w.Take();
}

absl::Status ParseCatalog(absl::string_view bytes,
                          const std::function<bool(const Entry&)>& root_ok,
                          uint64_t max_volume_bytes, Catalog& out) {
  auto bad = [&](absl::string_view what) {
    return absl::DataLossError(absl::StrCat("malformed (", what, ")"));
  };
  if (bytes.empty()) return absl::OkStatus();
  ByteReader r(bytes);
  if (r.U32() != kCatalogMagic) return bad("magic");
  const uint32_t version = r.U32();
  if (version < 1 || version > kCatalogVersion) return bad("version");
  uint32_t nvol = r.U32();
  for (uint32_t i = 0; i < nvol && r.ok(); ++i) {
    CatalogVolume v;
    v.name = r.Str();
    r.Bytes(v.guid);
    v.create_time_ns = static_cast<int64_t>(r.U64());
    v.size_bytes = r.U64();
    v.root = GetEntry(r);
    uint32_t nsnap = r.U32();
    if (!r.ok() || nsnap > bytes.size()) return bad("volume record");
    if (v.size_bytes > max_volume_bytes || !root_ok(v.root)) {
      return bad(absl::StrCat("volume ", v.name, " size or root"));
    }
    for (uint32_t j = 0; j < nsnap && r.ok(); ++j) {
      CatalogSnapshot s;
      s.name = r.Str();
      r.Bytes(s.guid);
      s.create_time_ns = static_cast<int64_t>(r.U64());
      s.generation = r.U64();
      s.size_bytes = r.U64();
      s.root = GetEntry(r);
      if (version >= 3) s.owner = r.Str();
      if (s.size_bytes > max_volume_bytes || !root_ok(s.root) ||
          s.owner.size() > kMaxSnapshotOwnerBytes) {
        return bad(absl::StrCat("snapshot ", v.name, "@", s.name));
      }
      v.snapshots.push_back(std::move(s));
    }
    if (version >= 2) {
      uint32_t flags = r.U32();
      if (flags & ~kVolumeReadOnly) return bad("volume flags");
      v.read_only = (flags & kVolumeReadOnly) != 0;
    }
    if (!r.ok()) return bad("truncated");
    std::string name = v.name;
    out.volumes.emplace(std::move(name), std::move(v));
  }
  if (version >= 2) {
    uint32_t nprop = r.U32();
    if (!r.ok() || nprop > bytes.size()) return bad("property count");
    for (uint32_t i = 0; i < nprop && r.ok(); ++i) {
      std::string key = r.Str();
      out.properties[std::move(key)] = r.Str();
    }
  }
  if (!r.ok() || !r.done()) return bad("length");
  return absl::OkStatus();
}

}  // namespace blockstore
