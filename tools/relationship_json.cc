#include "tools/relationship_json.h"

#include <cstdio>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/time.h"
#include "blockstore/util.h"

namespace tools {

using blockstore::FormatBytes;
using engine::RelationshipRecord;
using engine::RelationshipReport;

namespace {

std::string Text(const ordered_json& j, const char* key) {
  return j.is_object() && j.contains(key) && j[key].is_string()
             ? j[key].get<std::string>()
             : std::string();
}

uint64_t Number(const ordered_json& j, const char* key) {
  return j.is_object() && j.contains(key) && j[key].is_number_unsigned()
             ? j[key].get<uint64_t>()
             : 0;
}

// The object at `key`, or null (operator[] of a const json must not be
// asked for a key it lacks).
const ordered_json& Child(const ordered_json& j, const char* key) {
  static const ordered_json kNone;
  return j.is_object() && j.contains(key) ? j[key] : kNone;
}

}  // namespace

ordered_json RecordJson(const RelationshipRecord& r) {
  return {
      {"id", r.id},
      {"source", r.source.ToString()},
      {"destination", r.destination.ToString()},
      {"mirror_state", ToString(r.mirror_state)},
      {"relationship_status", ToString(r.status)},
      {"operation", ToString(r.operation)},
      {"driver", r.driver},
      {"schedule_seconds", r.schedule_seconds},
      {"max_rate_bytes", r.max_rate_bytes},
      {"last_transfer_bytes", r.last_transfer_bytes},
      {"last_transfer_data_bytes", r.last_transfer_data_bytes},
      {"last_transfer_seconds", r.last_transfer_seconds},
      {"last_transfer_end_ns", r.last_transfer_end_ns},
      {"last_transfer_error", r.last_transfer_error},
      {"progress_bytes", r.progress_bytes},
      {"progress_total_bytes", r.progress_total_bytes},
      {"total_transfer_bytes", r.total_transfer_bytes},
      {"released", r.released},
  };
}

ordered_json ReportJson(const RelationshipReport& rep) {
  ordered_json j = RecordJson(rep.record);
  j["healthy"] = rep.healthy;
  j["unhealthy_reason"] = rep.unhealthy_reason;
  j["lag_seconds"] = rep.lag_seconds < 0 ? ordered_json(nullptr)
                                         : ordered_json(rep.lag_seconds);
  j["last_common_snapshot"] = rep.last_common_snapshot;
  j["notes"] = rep.notes;
  return j;
}

ordered_json StatsJson(const engine::TransferStats& s) {
  return {{"stream_bytes", s.stream_bytes}, {"data_bytes", s.data_bytes},
          {"snapshots", s.snapshots},       {"resumed", s.resumed},
          {"retries", s.retries},           {"seconds", s.seconds}};
}

ordered_json PreviewJson(const engine::LossPreview& p) {
  return {{"operation", ToString(p.operation)},
          {"overwritten", p.overwritten.ToString()},
          {"common_snapshot", p.common_snapshot},
          {"method", ToString(p.method)},
          {"bytes", p.bytes},
          {"chunks", p.chunks},
          {"safety_snapshot", p.safety_snapshot},
          {"kept_snapshots", p.kept_snapshots},
          {"describe", p.Describe()}};
}

ordered_json ReleaseJson(const engine::ReleaseReport& r) {
  return {{"complete", r.complete},
          {"waiting", r.complete ? "" : r.waiting.ToString()},
          {"why", r.why}};
}

std::string StateLine(const ordered_json& r) {
  return absl::StrCat(Text(r, "mirror_state"), ", ",
                      Text(r, "relationship_status"));
}

void PrintReport(const ordered_json& rep) {
  auto row = [](const char* k, const std::string& v) {
    std::printf("  %-22s %s\n", k, v.c_str());
  };
  std::printf("%s -> %s\n", Text(rep, "source").c_str(),
              Text(rep, "destination").c_str());
  row("mirror state", Text(rep, "mirror_state"));
  const std::string status = Text(rep, "relationship_status");
  const std::string driver = Text(rep, "driver");
  row("relationship status",
      status == "Transferring"
          ? absl::StrCat(
                "Transferring (", Text(rep, "operation"),
                driver.empty() ? "" : absl::StrCat(", by site ", driver), ")")
          : status);
  const ordered_json& healthy = Child(rep, "healthy");
  row("healthy", healthy.is_boolean() && healthy.get<bool>()
                     ? "yes"
                     : "no: " + Text(rep, "unhealthy_reason"));
  const int64_t schedule =
      static_cast<int64_t>(Number(rep, "schedule_seconds"));
  const ordered_json& lag = Child(rep, "lag_seconds");
  row("lag", !lag.is_number_integer()
                 ? "unknown"
                 : absl::StrCat(lag.get<int64_t>(), " s (schedule ",
                                FormatSchedule(schedule), ")"));
  const uint64_t rate = Number(rep, "max_rate_bytes");
  if (rate > 0) row("max rate", FormatBytes(rate) + "/s");
  const std::string common = Text(rep, "last_common_snapshot");
  const ordered_json& notes = Child(rep, "notes");
  const bool noted = notes.is_array() && !notes.empty();
  row("last common snapshot", !common.empty() ? common
                              : noted ? "unknown (a pool cannot be reached)"
                                      : "none");
  const int64_t end_ns =
      static_cast<int64_t>(Number(rep, "last_transfer_end_ns"));
  if (end_ns != 0) {
    row("last transfer",
        absl::StrFormat(
            "%s on the wire, %s of data, %.2f s, ended %s",
            FormatBytes(Number(rep, "last_transfer_bytes")),
            FormatBytes(Number(rep, "last_transfer_data_bytes")),
            Child(rep, "last_transfer_seconds").is_number()
                ? Child(rep, "last_transfer_seconds").get<double>()
                : 0.0,
            absl::FormatTime("%Y-%m-%dT%H:%M:%SZ", absl::FromUnixNanos(end_ns),
                             absl::UTCTimeZone())));
  } else {
    row("last transfer", "none yet");
  }
  const std::string error = Text(rep, "last_transfer_error");
  row("last transfer error", error.empty() ? "none" : error);
  row("progress",
      absl::StrCat(FormatBytes(Number(rep, "progress_bytes")), " / ",
                   FormatBytes(Number(rep, "progress_total_bytes"))));
  row("total transferred", FormatBytes(Number(rep, "total_transfer_bytes")));
  if (noted) {
    for (const auto& n : notes) {
      if (n.is_string()) row("note", n.get<std::string>());
    }
  }
}

void PrintResult(const ordered_json& result) {
  const std::string op = Text(result, "operation");
  const ordered_json& rel = Child(result, "relationship");
  const std::string dir =
      rel.is_object()
          ? absl::StrCat(Text(rel, "source"), " -> ", Text(rel, "destination"))
          : Text(result, "endpoint");
  const std::string state = rel.is_object() ? StateLine(rel) : "?";
  if (op == "release") {
    const ordered_json& r = Child(result, "release");
    const ordered_json& complete = Child(r, "complete");
    if (!complete.is_boolean() || complete.get<bool>()) {
      std::printf("released %s: volumes keep their data\n",
                  Text(result, "endpoint").c_str());
    } else {
      std::printf(
          "released %s on the reachable side; %s could not be reached (%s): "
          "its record and read-only flag are cleared when it is (the next "
          "command or status that reaches both sides, or its daemon, "
          "finishes it)\n",
          Text(result, "endpoint").c_str(), Text(r, "waiting").c_str(),
          Text(r, "why").c_str());
    }
    return;
  }
  if (op == "break") {
    std::printf("break %s: %s; %s is read-write\n",
                Text(result, "endpoint").c_str(), state.c_str(),
                rel.is_object() ? Text(rel, "destination").c_str() : "");
    return;
  }
  const ordered_json& s = Child(result, "stats");
  if (Number(s, "snapshots") == 0 && Number(s, "stream_bytes") == 0) {
    std::printf("%s %s: nothing to do; %s\n", op.c_str(), dir.c_str(),
                state.c_str());
    return;
  }
  std::string extra;
  if (Number(s, "resumed") > 0) {
    extra = absl::StrCat(", ", Number(s, "resumed"),
                         " delta(s) resumed from a checkpoint");
  }
  std::printf(
      "%s %s: %s sent (%s of data, %llu snapshot(s)%s) in %.2f s; %s\n",
      op.c_str(), dir.c_str(), FormatBytes(Number(s, "stream_bytes")).c_str(),
      FormatBytes(Number(s, "data_bytes")).c_str(),
      static_cast<unsigned long long>(Number(s, "snapshots")), extra.c_str(),
      Child(s, "seconds").is_number() ? Child(s, "seconds").get<double>() : 0.0,
      state.c_str());
}

absl::StatusOr<int64_t> ParseSchedule(const std::string& text) {
  std::string t = absl::AsciiStrToLower(text);
  if (t == "hourly") return 3600;
  if (t == "daily") return 86400;
  int64_t days = 0;
  if (t.size() > 1 && t.back() == 'd' &&
      absl::SimpleAtoi(t.substr(0, t.size() - 1), &days) && days > 0) {
    return days * 86400;
  }
  absl::Duration d;
  if (absl::ParseDuration(t, &d) && d >= absl::Seconds(1)) {
    return absl::ToInt64Seconds(d);
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "bad schedule '", text,
      "': use 10m, hourly, daily or a duration such as 90s, 15m, 2h, 1d"));
}

std::string FormatSchedule(int64_t s) {
  if (s == 0) return "none";
  if (s % 86400 == 0) return absl::StrCat(s / 86400, "d");
  if (s % 3600 == 0) return absl::StrCat(s / 3600, "h");
  if (s % 60 == 0) return absl::StrCat(s / 60, "m");
  return absl::StrCat(s, "s");
}

absl::StatusOr<uint64_t> ParseRate(const std::string& text) {
  std::string t = absl::AsciiStrToLower(text);
  if (t == "none" || t == "0") return 0;
  if (absl::EndsWith(t, "/s")) t = t.substr(0, t.size() - 2);
  absl::StatusOr<uint64_t> r = blockstore::ParseSize(t, "max rate");
  if (!r.ok() || *r == 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "bad --max-rate '", text,
        "': give bytes a second such as 8M, 500K or 1G (or none)"));
  }
  return *r;
}

}  // namespace tools
