#include "tools/relationship_cli.h"

#include <sys/stat.h>
#include <unistd.h>

#include <climits>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <optional>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/time.h"
#include "blockstore/util.h"
#include "tools/open_pool.h"
#include "tools/progress.h"

namespace tools {

using blockstore::FormatBytes;
using engine::Endpoint;
using engine::MirrorState;
using engine::RelationshipRecord;
using engine::RelationshipReport;
using engine::Replication;
using engine::TransferStats;
using json = nlohmann::ordered_json;

absl::StatusOr<blockstore::Pool*> FilePools::Get(const std::string& path) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = pools_.find(path);
  if (it == pools_.end()) {
    it = pools_.emplace(path, OpenPool(path, mode_)).first;
  }
  if (!it->second.ok()) return it->second.status();
  return it->second->get();
}

absl::StatusOr<Endpoint> ParseEndpoint(const std::string& text) {
  for (size_t at = text.find(':'); at != std::string::npos;
       at = text.find(':', at + 1)) {
    std::string pool = text.substr(0, at);
    struct stat st {};
    if (pool.empty() || stat(pool.c_str(), &st) != 0) continue;
    if (at + 1 == text.size()) break;
    char resolved[PATH_MAX];
    if (realpath(pool.c_str(), resolved) == nullptr) {
      return blockstore::ErrnoError(errno, absl::StrCat("resolve ", pool));
    }
    return Endpoint{resolved, text.substr(at + 1)};
  }
  if (text.find(':') == std::string::npos || text.back() == ':') {
    return absl::InvalidArgumentError(
        absl::StrCat("'", text,
                     "' is not POOL:VOLUME (a pool file or device, a colon, a "
                     "volume name)"));
  }
  return absl::NotFoundError(absl::StrCat(
      "'", text, "': no pool file or device before any ':' in it exists"));
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

std::string StateLine(const RelationshipRecord& r) {
  return absl::StrCat(ToString(r.mirror_state), ", ", ToString(r.status));
}

json ReportJson(const RelationshipReport& rep) {
  const RelationshipRecord& r = rep.record;
  return {
      {"id", r.id},
      {"source", r.source.ToString()},
      {"destination", r.destination.ToString()},
      {"mirror_state", ToString(r.mirror_state)},
      {"relationship_status", ToString(r.status)},
      {"healthy", rep.healthy},
      {"unhealthy_reason", rep.unhealthy_reason},
      {"lag_seconds",
       rep.lag_seconds < 0 ? json(nullptr) : json(rep.lag_seconds)},
      {"schedule_seconds", r.schedule_seconds},
      {"last_transfer_bytes", r.last_transfer_bytes},
      {"last_transfer_data_bytes", r.last_transfer_data_bytes},
      {"last_transfer_seconds", r.last_transfer_seconds},
      {"last_transfer_error", r.last_transfer_error},
      {"progress_bytes", r.progress_bytes},
      {"progress_total_bytes", r.progress_total_bytes},
      {"total_transfer_bytes", r.total_transfer_bytes},
      {"last_common_snapshot", rep.last_common_snapshot},
      {"notes", rep.notes},
  };
}

void PrintReport(const RelationshipReport& rep) {
  const RelationshipRecord& r = rep.record;
  auto row = [](const char* k, const std::string& v) {
    std::printf("  %-22s %s\n", k, v.c_str());
  };
  std::printf("%s -> %s\n", r.source.ToString().c_str(),
              r.destination.ToString().c_str());
  row("mirror state", ToString(r.mirror_state));
  row("relationship status",
      r.status == engine::TransferStatus::kTransferring
          ? absl::StrCat("Transferring (", r.operation, ")")
          : "Idle");
  row("healthy", rep.healthy ? "yes" : "no: " + rep.unhealthy_reason);
  row("lag", rep.lag_seconds < 0
                 ? "unknown"
                 : absl::StrCat(rep.lag_seconds, " s (schedule ",
                                FormatSchedule(r.schedule_seconds), ")"));
  row("last common snapshot",
      !rep.last_common_snapshot.empty() ? rep.last_common_snapshot
      : rep.notes.empty()               ? "none"
                                        : "unknown (a pool cannot be opened)");
  if (r.last_transfer_end_ns != 0) {
    row("last transfer",
        absl::StrFormat(
            "%s on the wire, %s of data, %.2f s, ended %s",
            FormatBytes(r.last_transfer_bytes),
            FormatBytes(r.last_transfer_data_bytes), r.last_transfer_seconds,
            absl::FormatTime("%Y-%m-%dT%H:%M:%SZ",
                             absl::FromUnixNanos(r.last_transfer_end_ns),
                             absl::UTCTimeZone())));
  } else {
    row("last transfer", "none yet");
  }
  row("last transfer error",
      r.last_transfer_error.empty() ? "none" : r.last_transfer_error);
  row("progress", absl::StrCat(FormatBytes(r.progress_bytes), " / ",
                               FormatBytes(r.progress_total_bytes)));
  row("total transferred", FormatBytes(r.total_transfer_bytes));
  for (const std::string& n : rep.notes) row("note", n);
}

namespace {

// Asks on the terminal; with none (and no --yes) refuses.
struct Asker {
  bool yes = false;
  bool refused_without_terminal = false;

  bool operator()(const engine::LossPreview& p) {
    std::printf("%s\n", p.Describe().c_str());
    std::fflush(stdout);
    if (yes) return true;
    if (!isatty(0)) {
      refused_without_terminal = true;
      return false;
    }
    std::fprintf(stderr, "Type yes to go on: ");
    std::string line;
    std::getline(std::cin, line);
    return absl::StripAsciiWhitespace(line) == "yes";
  }
};

absl::Status Explain(absl::Status s, const std::string& op,
                     const Asker& asker) {
  if (absl::IsCancelled(s) && asker.refused_without_terminal) {
    return absl::CancelledError(
        absl::StrCat(op,
                     " overwrites data and there is no terminal to confirm on: "
                     "rerun with --yes (nothing was changed)"));
  }
  return s;
}

void PrintDone(const std::string& op, Replication& rep, const Endpoint& e,
               const TransferStats& stats) {
  absl::StatusOr<RelationshipReport> r = rep.Report(e);
  std::string state = r.ok() ? StateLine(r->record) : "?";
  std::string dir = r.ok() ? r->record.Direction() : e.ToString();
  if (stats.snapshots == 0 && stats.stream_bytes == 0) {
    std::printf("%s %s: nothing to do; %s\n", op.c_str(), dir.c_str(),
                state.c_str());
    return;
  }
  std::printf("%s %s: %s sent (%s of data, %llu snapshot(s)) in %.2f s; %s\n",
              op.c_str(), dir.c_str(), FormatBytes(stats.stream_bytes).c_str(),
              FormatBytes(stats.data_bytes).c_str(),
              static_cast<unsigned long long>(stats.snapshots), stats.seconds,
              state.c_str());
}

}  // namespace

void AddRelationshipCommands(CLI::App& app, RelationshipArgs& args,
                             std::function<void(absl::Status)> act) {
  CLI::App* rel = app.add_subcommand(
      "relationship", "mirror a volume to another pool and run its DR steps");
  rel->require_subcommand(1);

  CLI::App* create = rel->add_subcommand(
      "create", "join a source volume and a new destination volume");
  create->add_option("--source", args.source, "POOL:VOLUME (must exist)")
      ->required();
  create
      ->add_option("--destination", args.destination,
                   "POOL:VOLUME (created by initialize)")
      ->required();
  create->add_option("--schedule", args.schedule,
                     "10m, hourly, daily or a duration (for health)");
  create->callback([a = &args, act] {
    absl::StatusOr<Endpoint> s = ParseEndpoint(a->source);
    if (!s.ok()) return act(s.status());
    absl::StatusOr<Endpoint> d = ParseEndpoint(a->destination);
    if (!d.ok()) return act(d.status());
    int64_t every = 0;
    if (a->schedule != "none") {
      absl::StatusOr<int64_t> p = ParseSchedule(a->schedule);
      if (!p.ok()) return act(p.status());
      every = *p;
    }
    FilePools pools(blockstore::OpenMode::kReadWrite);
    Replication rep(pools);
    absl::StatusOr<RelationshipRecord> r = rep.Create(*s, *d, every);
    if (!r.ok()) return act(r.status());
    std::printf("created %s -> %s (schedule %s); %s\n",
                r->source.ToString().c_str(), r->destination.ToString().c_str(),
                FormatSchedule(every).c_str(), StateLine(*r).c_str());
  });

  struct OpSpec {
    const char* name;
    const char* help;
    bool asks;
  };
  for (const OpSpec& spec :
       {OpSpec{"initialize", "baseline transfer (creates the destination)",
               false},
        OpSpec{"update", "snapshot the source and ship what changed", false},
        OpSpec{"break", "stop mirroring; the destination becomes writable",
               false},
        OpSpec{"resync", "after a break: the destination returns to the source",
               true},
        OpSpec{"reverse-resync",
               "after a break: the source takes the destination's data and "
               "the direction flips",
               true},
        OpSpec{"reestablish",
               "after a reverse resync: back to the original direction", true},
        OpSpec{"release",
               "remove the relationship and its replication snapshots",
               false}}) {
    CLI::App* cmd = rel->add_subcommand(spec.name, spec.help);
    cmd->add_option("POOL:VOLUME", args.endpoint, "either side")->required();
    if (spec.asks) {
      cmd->add_flag("--yes", args.yes, "do not ask before overwriting data");
    }
    std::string op = spec.name;
    cmd->callback([a = &args, act, op] {
      absl::StatusOr<Endpoint> e = ParseEndpoint(a->endpoint);
      if (!e.ok()) return act(e.status());
      FilePools pools(blockstore::OpenMode::kReadWrite);
      Replication rep(pools);
      Progress progress("transferring");
      rep.set_progress([&](const RelationshipRecord& r) {
        progress.Update(r.progress_bytes, r.progress_total_bytes);
      });
      Asker asker{a->yes};
      engine::Confirm confirm = [&](const engine::LossPreview& p) {
        return asker(p);
      };
      absl::StatusOr<TransferStats> stats;
      if (op == "initialize") {
        stats = rep.Initialize(*e);
      } else if (op == "update") {
        stats = rep.Update(*e);
      } else if (op == "resync") {
        stats = rep.Resync(*e, confirm);
      } else if (op == "reverse-resync") {
        stats = rep.ReverseResync(*e, confirm);
      } else if (op == "reestablish") {
        stats = rep.Reestablish(*e, confirm);
      } else if (op == "break" || op == "release") {
        absl::Status s = op == "break" ? rep.Break(*e) : rep.Release(*e);
        if (!s.ok()) return act(s);
        if (op == "release") {
          std::printf("released %s: volumes keep their data\n",
                      e->ToString().c_str());
        } else {
          absl::StatusOr<RelationshipReport> r = rep.Report(*e);
          std::printf("break %s: %s; %s is read-write\n", e->ToString().c_str(),
                      r.ok() ? StateLine(r->record).c_str() : "?",
                      r.ok() ? r->record.destination.ToString().c_str() : "");
        }
        return;
      }
      progress.Clear();
      if (!stats.ok()) return act(Explain(stats.status(), op, asker));
      PrintDone(op, rep, *e, *stats);
    });
  }

  CLI::App* status = app.add_subcommand(
      "status", "relationships: states, health, lag, transfers");
  status->add_option("POOL:VOLUME", args.endpoint, "one relationship");
  status->add_option("--pool", args.status_pool, "every relationship in a pool")
      ->envname("TANDEM_POOL");
  status->add_flag("--json", args.as_json, "one JSON object per relationship");
  status->callback([a = &args, act] {
    FilePools pools(blockstore::OpenMode::kReadOnly);
    Replication rep(pools);
    std::vector<RelationshipReport> reports;
    if (!a->endpoint.empty()) {
      absl::StatusOr<Endpoint> e = ParseEndpoint(a->endpoint);
      if (!e.ok()) return act(e.status());
      absl::StatusOr<RelationshipReport> r = rep.Report(*e);
      if (!r.ok()) return act(r.status());
      reports.push_back(std::move(*r));
    } else if (!a->status_pool.empty()) {
      char resolved[PATH_MAX];
      if (realpath(a->status_pool.c_str(), resolved) == nullptr) {
        return act(blockstore::ErrnoError(errno, a->status_pool));
      }
      absl::StatusOr<std::vector<RelationshipReport>> r =
          rep.ReportPool(resolved);
      if (!r.ok()) return act(r.status());
      reports = std::move(*r);
    } else {
      return act(absl::InvalidArgumentError(
          "name a relationship (POOL:VOLUME) or a pool (--pool PATH or "
          "TANDEM_POOL)"));
    }
    if (a->as_json) {
      json j = json::array();
      for (const auto& r : reports) j.push_back(ReportJson(r));
      std::cout << j.dump(2) << "\n";
      return;
    }
    if (reports.empty()) std::printf("no relationships\n");
    for (const auto& r : reports) PrintReport(r);
  });
}

}  // namespace tools
