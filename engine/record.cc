#include "engine/record.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "blockstore/util.h"
#include "nlohmann/json.hpp"

namespace engine {

using json = nlohmann::json;

namespace {

constexpr int kRecordVersion = 2;  // 1 is read (no site, rate or plan)

constexpr std::pair<Operation, const char*> kOperations[] = {
    {Operation::kNone, ""},
    {Operation::kInitialize, "initialize"},
    {Operation::kUpdate, "update"},
    {Operation::kBreak, "break"},
    {Operation::kResync, "resync"},
    {Operation::kReverseResync, "reverse-resync"},
    {Operation::kReestablish, "reestablish"},
    {Operation::kRelease, "release"},
};

constexpr std::pair<Method, const char*> kMethods[] = {
    {Method::kNone, ""},
    {Method::kRollback, "rollback"},
    {Method::kHashDiff, "hash-diff"},
    {Method::kNewVolume, "new-volume"},
};

json EndpointJson(const Endpoint& e) {
  return {{"site", e.site}, {"pool", e.pool}, {"volume", e.volume}};
}

Endpoint EndpointFrom(const json& j) {
  return {j.at("pool").get<std::string>(), j.at("volume").get<std::string>(),
          j.value("site", "")};
}

}  // namespace

const char* ToString(MirrorState s) {
  switch (s) {
    case MirrorState::kUninitialized:
      return "Uninitialized";
    case MirrorState::kMirrored:
      return "Mirrored";
    case MirrorState::kBroken:
      return "Broken";
  }
  return "?";
}

const char* ToString(TransferStatus s) {
  return s == TransferStatus::kIdle ? "Idle" : "Transferring";
}

const char* ToString(Operation op) {
  for (const auto& [o, name] : kOperations) {
    if (o == op) return name;
  }
  return "?";
}

const char* ToString(Method m) {
  for (const auto& [o, name] : kMethods) {
    if (o == m) return name;
  }
  return "?";
}

std::optional<Operation> ParseOperation(absl::string_view text) {
  for (const auto& [o, name] : kOperations) {
    if (text == name) return o;
  }
  return std::nullopt;
}

std::string Endpoint::ToString() const {
  return absl::StrCat(PoolName(), ":", volume);
}

std::string Endpoint::PoolName() const {
  return site.empty() ? pool : absl::StrCat(site, "/", pool);
}

std::string RelationshipRecord::Direction() const {
  return absl::StrCat(source.ToString(), " -> ", destination.ToString());
}

void RelationshipRecord::EndOperation() {
  status = TransferStatus::kIdle;
  operation = Operation::kNone;
  driver.clear();
  method = Method::kNone;
  safety_snapshot.clear();
}

std::string RelationshipRecord::ToJson() const {
  json j = {
      {"version", kRecordVersion},
      {"id", id},
      {"epoch", epoch},
      {"source", EndpointJson(source)},
      {"destination", EndpointJson(destination)},
      {"origin", EndpointJson(origin)},
      {"schedule_seconds", schedule_seconds},
      {"max_rate_bytes", max_rate_bytes},
      {"mirror_state", ToString(mirror_state)},
      {"relationship_status", ToString(status)},
      {"operation", ToString(operation)},
      {"driver", driver},
      {"method", ToString(method)},
      {"safety_snapshot", safety_snapshot},
      {"pending", ToString(pending)},
      {"released", released},
      {"next_snapshot", next_snapshot},
      {"last_transfer_end_ns", last_transfer_end_ns},
      {"last_transfer_bytes", last_transfer_bytes},
      {"last_transfer_data_bytes", last_transfer_data_bytes},
      {"last_transfer_seconds", last_transfer_seconds},
      {"last_transfer_error", last_transfer_error},
      {"total_transfer_bytes", total_transfer_bytes},
      {"progress_bytes", progress_bytes},
      {"progress_total_bytes", progress_total_bytes},
  };
  return j.dump();
}

absl::StatusOr<RelationshipRecord> RelationshipRecord::FromJson(
    const std::string& text) {
  RelationshipRecord r;
  auto bad = [](absl::string_view field, const std::string& value) {
    return absl::DataLossError(
        absl::StrCat("relationship record: bad ", field, " '", value, "'"));
  };
  try {
    json j = json::parse(text);
    const int version = j.at("version").get<int>();
    if (version > kRecordVersion || version < 1) {
      return absl::UnimplementedError(
          absl::StrCat("relationship record version ", j.at("version").dump(),
                       " is newer than this tandem; upgrade it"));
    }
    r.id = j.at("id").get<std::string>();
    r.epoch = j.at("epoch").get<uint64_t>();
    r.source = EndpointFrom(j.at("source"));
    r.destination = EndpointFrom(j.at("destination"));
    r.origin = EndpointFrom(j.at("origin"));
    r.schedule_seconds = j.at("schedule_seconds").get<int64_t>();
    r.max_rate_bytes = j.value("max_rate_bytes", uint64_t{0});
    const std::string m = j.at("mirror_state").get<std::string>();
    if (m == "Uninitialized") {
      r.mirror_state = MirrorState::kUninitialized;
    } else if (m == "Mirrored") {
      r.mirror_state = MirrorState::kMirrored;
    } else if (m == "Broken") {
      r.mirror_state = MirrorState::kBroken;
    } else {
      return bad("mirror_state", m);
    }
    const std::string st = j.at("relationship_status").get<std::string>();
    if (st != "Idle" && st != "Transferring") {
      return bad("relationship_status", st);
    }
    r.status =
        st == "Idle" ? TransferStatus::kIdle : TransferStatus::kTransferring;
    const std::string op = j.at("operation").get<std::string>();
    std::optional<Operation> parsed = ParseOperation(op);
    if (!parsed) return bad("operation", op);
    r.operation = *parsed;
    const std::string pending = j.at("pending").get<std::string>();
    parsed = ParseOperation(pending);
    if (!parsed ||
        (*parsed != Operation::kNone && *parsed != Operation::kReestablish)) {
      return bad("pending", pending);
    }
    r.pending = *parsed;
    r.driver = j.value("driver", "");
    const std::string method = j.value("method", "");
    bool known = false;
    for (const auto& [value, name] : kMethods) {
      if (method == name) {
        r.method = value;
        known = true;
      }
    }
    if (!known) return bad("method", method);
    r.safety_snapshot = j.value("safety_snapshot", "");
    r.released = j.value("released", false);
    r.next_snapshot = j.at("next_snapshot").get<uint64_t>();
    r.last_transfer_end_ns = j.at("last_transfer_end_ns").get<int64_t>();
    r.last_transfer_bytes = j.at("last_transfer_bytes").get<uint64_t>();
    r.last_transfer_data_bytes =
        j.at("last_transfer_data_bytes").get<uint64_t>();
    r.last_transfer_seconds = j.at("last_transfer_seconds").get<double>();
    r.last_transfer_error = j.at("last_transfer_error").get<std::string>();
    r.total_transfer_bytes = j.at("total_transfer_bytes").get<uint64_t>();
    r.progress_bytes = j.at("progress_bytes").get<uint64_t>();
    r.progress_total_bytes = j.at("progress_total_bytes").get<uint64_t>();
  } catch (const json::exception& e) {
    return absl::DataLossError(
        absl::StrCat("relationship record is malformed: ", e.what()));
  }
  return r;
}

std::string LossPreview::Describe() const {
  const std::string op = ToString(operation);
  if (operation == Operation::kBreak) {
    return absl::StrCat(
        "break: ", overwritten.ToString(),
        " becomes read-write, with its content as of the last update",
        common_snapshot.empty() ? std::string()
                                : absl::StrCat(" ('", common_snapshot, "')"),
        "; updates stop until you resync (it goes back to the source, "
        "losing what is written on it) or reverse-resync (the source takes "
        "its data).");
  }
  if (operation == Operation::kReestablish) {
    return absl::StrCat(
        "reestablish: ", overwritten.ToString(),
        " goes back to being the destination. Its writes since the last "
        "update are sent over first, then it is made equal to the other "
        "side: nothing written on it is lost.");
  }
  if (method == Method::kNewVolume) {
    return absl::StrCat(op, ": volume ", overwritten.ToString(),
                        " is gone; a full baseline recreates it. Nothing "
                        "is overwritten.");
  }
  std::string s;
  if (method == Method::kHashDiff) {
    absl::StrAppend(&s, op, ": ", overwritten.ToString(),
                    " shares no snapshot with the other side; ",
                    blockstore::FormatBytes(bytes), " (", bytes, " bytes in ",
                    chunks,
                    " chunks) differ by SHA-256 and will be overwritten.");
  } else {
    absl::StrAppend(&s, op, ": ", overwritten.ToString(),
                    " rolls back to the common snapshot '", common_snapshot,
                    "'; ", blockstore::FormatBytes(bytes), " (", bytes,
                    " bytes in ", chunks,
                    " chunks) written there since will be overwritten.");
  }
  if (!kept_snapshots.empty()) {
    absl::StrAppend(&s, "\n  Its snapshots newer than that are kept: ",
                    absl::StrJoin(kept_snapshots, ", "), ".");
  }
  if (!safety_snapshot.empty()) {
    absl::StrAppend(&s, "\n  Its current content is kept in snapshot '",
                    overwritten.volume, "@", safety_snapshot,
                    "' until you delete it.");
  }
  return s;
}

}  // namespace engine
