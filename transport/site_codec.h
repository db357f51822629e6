// JSON for what crosses between daemons in Site calls (site.h): snapshot
// and volume facts, stats, resume points and errors. Decoders are strict
// (a peer is authenticated but its messages are still checked): DataLoss
// naming the field that is missing or malformed.
#ifndef TANDEM_TRANSPORT_SITE_CODEC_H_
#define TANDEM_TRANSPORT_SITE_CODEC_H_

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/site.h"
#include "nlohmann/json.hpp"

namespace transport {

using nlohmann::json;

json ToJson(const blockstore::SnapshotInfo& s);
json ToJson(const blockstore::VolumeInfo& v);
json ToJson(const engine::SendStats& s);
json ToJson(const engine::ApplyStats& s);
json ToJson(const engine::ResumeToken& t);
json ToJson(const engine::Activity& a);
json StatusJson(const absl::Status& s);  // {"ok": ..., "code", "message"}

absl::StatusOr<blockstore::SnapshotInfo> SnapshotFrom(const json& j);
absl::StatusOr<blockstore::VolumeInfo> VolumeFrom(const json& j);
absl::StatusOr<engine::SendStats> SendStatsFrom(const json& j);
absl::StatusOr<engine::ApplyStats> ApplyStatsFrom(const json& j);
absl::StatusOr<engine::ResumeToken> TokenFrom(const json& j);
absl::StatusOr<engine::Activity> ActivityFrom(const json& j);
// The status a response carries (OK for {"ok": true}).
absl::Status StatusFrom(const json& j);

// Field accessors that never throw (nlohmann's value() does, on a field of
// the wrong type: a peer's message must not be able to end the process).
uint64_t U64Or(const json& j, const char* key, uint64_t fallback);
bool BoolOr(const json& j, const char* key, bool fallback);
// Field accessors that fail instead of throwing.
absl::StatusOr<std::string> GetString(const json& j, const char* key);
absl::StatusOr<uint64_t> GetU64(const json& j, const char* key);
absl::StatusOr<bool> GetBool(const json& j, const char* key);

}  // namespace transport

#endif  // TANDEM_TRANSPORT_SITE_CODEC_H_
