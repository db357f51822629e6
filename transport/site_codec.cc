#include "transport/site_codec.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "blockstore/util.h"

namespace transport {

namespace {

absl::Status Missing(const char* key) {
  return absl::DataLossError(
      absl::StrCat("peer message: field '", key, "' missing or malformed"));
}

template <size_t N>
absl::Status GetBytes(const json& j, const char* key,
                      std::array<std::byte, N>& out) {
  absl::StatusOr<std::string> hex = GetString(j, key);
  if (!hex.ok()) return hex.status();
  absl::StatusOr<std::vector<std::byte>> raw = blockstore::Unhex(*hex);
  if (!raw.ok() || raw->size() != N) return Missing(key);
  std::memcpy(out.data(), raw->data(), N);
  return absl::OkStatus();
}

}  // namespace

uint64_t U64Or(const json& j, const char* key, uint64_t fallback) {
  absl::StatusOr<uint64_t> v = GetU64(j, key);
  return v.ok() ? *v : fallback;
}

bool BoolOr(const json& j, const char* key, bool fallback) {
  absl::StatusOr<bool> v = GetBool(j, key);
  return v.ok() ? *v : fallback;
}

absl::StatusOr<std::string> GetString(const json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end() || !it->is_string()) return Missing(key);
  return it->get<std::string>();
}

absl::StatusOr<uint64_t> GetU64(const json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end() || !it->is_number_unsigned()) {
    if (it != j.end() && it->is_number_integer() && it->get<int64_t>() >= 0) {
      return it->get<uint64_t>();
    }
    return Missing(key);
  }
  return it->get<uint64_t>();
}

absl::StatusOr<bool> GetBool(const json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end() || !it->is_boolean()) return Missing(key);
  return it->get<bool>();
}

json ToJson(const blockstore::SnapshotInfo& s) {
  return {{"volume", s.volume},
          {"name", s.name},
          {"guid", blockstore::Hex(s.guid)},
          {"create_time_ns", s.create_time_ns},
          {"size_bytes", s.size_bytes},
          {"generation", s.generation},
          {"root_digest", blockstore::Hex(s.root_digest.bytes)},
          {"owner", s.owner}};
}

absl::StatusOr<blockstore::SnapshotInfo> SnapshotFrom(const json& j) {
  blockstore::SnapshotInfo s;
  absl::StatusOr<std::string> volume = GetString(j, "volume");
  absl::StatusOr<std::string> name = GetString(j, "name");
  absl::StatusOr<std::string> owner = GetString(j, "owner");
  absl::StatusOr<uint64_t> size = GetU64(j, "size_bytes");
  absl::StatusOr<uint64_t> gen = GetU64(j, "generation");
  if (!volume.ok() || !name.ok() || !owner.ok() || !size.ok() || !gen.ok() ||
      !j.contains("create_time_ns") ||
      !j["create_time_ns"].is_number_integer()) {
    return Missing("snapshot");
  }
  s.volume = *volume;
  s.name = *name;
  s.owner = *owner;
  s.size_bytes = *size;
  s.generation = *gen;
  s.create_time_ns = j["create_time_ns"].get<int64_t>();
  if (absl::Status st = GetBytes(j, "guid", s.guid); !st.ok()) return st;
  if (absl::Status st = GetBytes(j, "root_digest", s.root_digest.bytes);
      !st.ok()) {
    return st;
  }
  return s;
}

json ToJson(const blockstore::VolumeInfo& v) {
  return {{"name", v.name},
          {"guid", blockstore::Hex(v.guid)},
          {"create_time_ns", v.create_time_ns},
          {"size_bytes", v.size_bytes},
          {"snapshot_count", v.snapshot_count},
          {"read_only", v.read_only}};
}

absl::StatusOr<blockstore::VolumeInfo> VolumeFrom(const json& j) {
  blockstore::VolumeInfo v;
  absl::StatusOr<std::string> name = GetString(j, "name");
  absl::StatusOr<uint64_t> size = GetU64(j, "size_bytes");
  absl::StatusOr<uint64_t> snaps = GetU64(j, "snapshot_count");
  absl::StatusOr<bool> ro = GetBool(j, "read_only");
  if (!name.ok() || !size.ok() || !snaps.ok() || !ro.ok() ||
      !j.contains("create_time_ns") ||
      !j["create_time_ns"].is_number_integer()) {
    return Missing("volume");
  }
  v.name = *name;
  v.size_bytes = *size;
  v.snapshot_count = *snaps;
  v.read_only = *ro;
  v.create_time_ns = j["create_time_ns"].get<int64_t>();
  if (absl::Status st = GetBytes(j, "guid", v.guid); !st.ok()) return st;
  return v;
}

json ToJson(const engine::SendStats& s) {
  return {{"segments", s.segments},
          {"records", s.records},
          {"chunks_written", s.chunks_written},
          {"chunks_cleared", s.chunks_cleared},
          {"record_bytes", s.record_bytes},
          {"stream_bytes", s.stream_bytes},
          {"nodes_visited", s.nodes_visited}};
}

absl::StatusOr<engine::SendStats> SendStatsFrom(const json& j) {
  engine::SendStats s;
  for (auto [key, field] :
       {std::pair{"segments", &s.segments}, std::pair{"records", &s.records},
        std::pair{"chunks_written", &s.chunks_written},
        std::pair{"chunks_cleared", &s.chunks_cleared},
        std::pair{"record_bytes", &s.record_bytes},
        std::pair{"stream_bytes", &s.stream_bytes},
        std::pair{"nodes_visited", &s.nodes_visited}}) {
    absl::StatusOr<uint64_t> v = GetU64(j, key);
    if (!v.ok()) return v.status();
    *field = *v;
  }
  return s;
}

json ToJson(const engine::ApplyStats& s) {
  return {{"checkpoints", s.checkpoints},
          {"records", s.records},
          {"chunks_written", s.chunks_written},
          {"chunks_cleared", s.chunks_cleared},
          {"stream_bytes", s.stream_bytes},
          {"snapshot", ToJson(s.snapshot)}};
}

absl::StatusOr<engine::ApplyStats> ApplyStatsFrom(const json& j) {
  engine::ApplyStats s;
  for (auto [key, field] : {std::pair{"checkpoints", &s.checkpoints},
                            std::pair{"records", &s.records},
                            std::pair{"chunks_written", &s.chunks_written},
                            std::pair{"chunks_cleared", &s.chunks_cleared},
                            std::pair{"stream_bytes", &s.stream_bytes}}) {
    absl::StatusOr<uint64_t> v = GetU64(j, key);
    if (!v.ok()) return v.status();
    *field = *v;
  }
  if (!j.contains("snapshot")) return Missing("snapshot");
  absl::StatusOr<blockstore::SnapshotInfo> snap = SnapshotFrom(j["snapshot"]);
  if (!snap.ok()) return snap.status();
  s.snapshot = *snap;
  return s;
}

json ToJson(const engine::ResumeToken& t) {
  std::string raw = engine::EncodeResumeToken(t);
  return blockstore::Hex(
      {reinterpret_cast<const std::byte*>(raw.data()), raw.size()});
}

absl::StatusOr<engine::ResumeToken> TokenFrom(const json& j) {
  if (!j.is_string()) return Missing("resume");
  absl::StatusOr<std::vector<std::byte>> raw =
      blockstore::Unhex(j.get<std::string>());
  if (!raw.ok()) return Missing("resume");
  return engine::DecodeResumeToken(*raw);
}

json ToJson(const engine::Activity& a) {
  return {{"operation", engine::ToString(a.operation)},
          {"driver", a.driver},
          {"progress_bytes", a.progress_bytes},
          {"progress_total_bytes", a.progress_total_bytes}};
}

absl::StatusOr<engine::Activity> ActivityFrom(const json& j) {
  engine::Activity a;
  absl::StatusOr<std::string> op = GetString(j, "operation");
  absl::StatusOr<std::string> driver = GetString(j, "driver");
  absl::StatusOr<uint64_t> done = GetU64(j, "progress_bytes");
  absl::StatusOr<uint64_t> total = GetU64(j, "progress_total_bytes");
  if (!op.ok() || !driver.ok() || !done.ok() || !total.ok()) {
    return Missing("activity");
  }
  std::optional<engine::Operation> parsed = engine::ParseOperation(*op);
  if (!parsed) return Missing("operation");
  a.operation = *parsed;
  a.driver = *driver;
  a.progress_bytes = *done;
  a.progress_total_bytes = *total;
  return a;
}

json StatusJson(const absl::Status& s) {
  if (s.ok()) return {{"ok", true}};
  return {{"ok", false},
          {"code", static_cast<int>(s.code())},
          {"message", std::string(s.message())}};
}

absl::Status StatusFrom(const json& j) {
  auto ok = j.find("ok");
  if (ok == j.end() || !ok->is_boolean()) return Missing("ok");
  if (ok->get<bool>()) return absl::OkStatus();
  absl::StatusOr<uint64_t> code = GetU64(j, "code");
  absl::StatusOr<std::string> message = GetString(j, "message");
  if (!code.ok() || !message.ok() || *code == 0 || *code > 16) {
    return Missing("code");
  }
  return absl::Status(static_cast<absl::StatusCode>(*code), *message);
}

}  // namespace transport
