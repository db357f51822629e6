#include "tools/relationship_cli.h"

#include <sys/stat.h>
#include <unistd.h>

#include <climits>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <optional>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "blockstore/util.h"
#include "tools/open_pool.h"
#include "tools/progress.h"

namespace tools {

using blockstore::MutexLock;
using engine::Endpoint;
using engine::Operation;
using engine::Replication;
using engine::TransferStats;

absl::StatusOr<engine::Site*> FileSites::Get(const Endpoint& e) {
  MutexLock lock(mu_);
  auto it = pools_.find(e.pool);
  if (it == pools_.end()) {
    absl::StatusOr<std::unique_ptr<blockstore::Pool>> pool =
        OpenPool(e.pool, mode_);
    if (!pool.ok()) {
      it = pools_.emplace(e.pool, pool.status()).first;
    } else {
      Entry made;
      made.site = std::make_unique<engine::LocalSite>(e.pool, **pool);
      made.pool = std::move(*pool);
      it = pools_.emplace(e.pool, std::move(made)).first;
    }
  }
  if (!it->second.ok()) return it->second.status();
  return it->second->site.get();
}

absl::StatusOr<blockstore::Pool*> FileSites::Pool(const std::string& path) {
  absl::StatusOr<engine::Site*> site = Get(Endpoint{path, ""});
  if (!site.ok()) return site.status();
  return &static_cast<engine::LocalSite*>(*site)->pool();
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

bool Asker::operator()(const ordered_json& preview) {
  std::printf("%s\n", preview.value("describe", "").c_str());
  std::fflush(stdout);
  if (yes) return true;
  if (!isatty(0)) {
    refused_without_terminal = true;
    return false;
  }
  std::fprintf(stderr, "Type yes to go on: ");
  std::string line;
  std::getline(std::cin, line);
  return absl::AsciiStrToLower(absl::StripAsciiWhitespace(line)) == "yes";
}

absl::Status Asker::Explain(absl::Status s, const std::string& op) const {
  if (absl::IsCancelled(s) && refused_without_terminal) {
    return absl::CancelledError(absl::StrCat(
        op,
        op == "break" ? " makes the destination writable" : " overwrites data",
        " and there is no terminal to confirm on: rerun with --yes (nothing "
        "was changed)"));
  }
  return s;
}

namespace {

class Local final : public RelationshipBackend {
 public:
  absl::StatusOr<ordered_json> Create(const std::string& source,
                                      const std::string& destination,
                                      int64_t schedule_seconds,
                                      uint64_t max_rate_bytes) override {
    absl::StatusOr<Endpoint> s = ParseEndpoint(source);
    if (!s.ok()) return s.status();
    absl::StatusOr<Endpoint> d = ParseEndpoint(destination);
    if (!d.ok()) return d.status();
    FileSites sites(blockstore::OpenMode::kReadWrite);
    Replication rep(sites);
    absl::StatusOr<engine::RelationshipRecord> r =
        rep.Create(*s, *d, schedule_seconds, max_rate_bytes);
    if (!r.ok()) return r.status();
    return RecordJson(*r);
  }

  absl::StatusOr<ordered_json> Run(Operation op, const std::string& text,
                                   Asker& asker) override {
    absl::StatusOr<Endpoint> e = ParseEndpoint(text);
    if (!e.ok()) return e.status();
    FileSites sites(blockstore::OpenMode::kReadWrite);
    Replication rep(sites);
    Progress progress("transferring");
    rep.set_progress([&](const engine::RelationshipRecord& r) {
      progress.Update(r.progress_bytes, r.progress_total_bytes);
    });
    engine::Confirm confirm = [&](const engine::LossPreview& p) {
      return asker(PreviewJson(p));
    };
    absl::StatusOr<ordered_json> out = RunOperation(rep, op, *e, confirm);
    progress.Clear();
    return out;
  }

  absl::StatusOr<ordered_json> Status(const std::string& endpoint,
                                      const std::string& pool) override {
    FileSites sites(blockstore::OpenMode::kReadOnly);
    Replication rep(sites);
    ordered_json j = ordered_json::array();
    if (!endpoint.empty()) {
      absl::StatusOr<Endpoint> e = ParseEndpoint(endpoint);
      if (!e.ok()) return e.status();
      absl::StatusOr<engine::RelationshipReport> r = rep.Report(*e);
      if (!r.ok()) return r.status();
      j.push_back(ReportJson(*r));
      return j;
    }
    char resolved[PATH_MAX];
    if (realpath(pool.c_str(), resolved) == nullptr) {
      return blockstore::ErrnoError(errno, pool);
    }
    absl::StatusOr<std::vector<engine::RelationshipReport>> r =
        rep.ReportPool(Endpoint{resolved, ""});
    if (!r.ok()) return r.status();
    for (const auto& one : *r) j.push_back(ReportJson(one));
    return j;
  }
};

}  // namespace

absl::StatusOr<ordered_json> RunOperation(Replication& rep, Operation op,
                                          const Endpoint& e,
                                          const engine::Confirm& confirm) {
  ordered_json out = {{"operation", ToString(op)}, {"endpoint", e.ToString()}};
  absl::StatusOr<TransferStats> stats = TransferStats{};
  switch (op) {
    case Operation::kInitialize:
      stats = rep.Initialize(e);
      break;
    case Operation::kUpdate:
      stats = rep.Update(e);
      break;
    case Operation::kResync:
      stats = rep.Resync(e, confirm);
      break;
    case Operation::kReverseResync:
      stats = rep.ReverseResync(e, confirm);
      break;
    case Operation::kReestablish:
      stats = rep.Reestablish(e, confirm);
      break;
    case Operation::kBreak:
      if (absl::Status s = rep.Break(e, confirm); !s.ok()) return s;
      break;
    case Operation::kRelease: {
      absl::StatusOr<engine::ReleaseReport> r = rep.Release(e);
      if (!r.ok()) return r.status();
      out["release"] = ReleaseJson(*r);
      return out;
    }
    default:
      return absl::InvalidArgumentError("no such relationship operation");
  }
  if (!stats.ok()) return stats.status();
  out["stats"] = StatsJson(*stats);
  absl::StatusOr<engine::RelationshipReport> r = rep.Report(e);
  if (r.ok()) out["relationship"] = ReportJson(*r);
  return out;
}

std::unique_ptr<RelationshipBackend> LocalRelationships() {
  return std::make_unique<Local>();
}

void AddRelationshipCommands(
    CLI::App& app, RelationshipArgs& args,
    std::function<absl::StatusOr<std::unique_ptr<RelationshipBackend>>()>
        backend,
    std::function<void(absl::Status)> act) {
  CLI::App* rel = app.add_subcommand(
      "relationship", "mirror a volume to another pool and run its DR steps");
  rel->require_subcommand(1);

  CLI::App* create = rel->add_subcommand(
      "create", "join a source volume and a new destination volume");
  create->add_option("--source", args.source, "[SITE/]POOL:VOLUME (must exist)")
      ->required();
  create
      ->add_option("--destination", args.destination,
                   "[SITE/]POOL:VOLUME (created by initialize)")
      ->required();
  create->add_option("--schedule", args.schedule,
                     "10m, hourly, daily or a duration: the destination's "
                     "daemon updates this often");
  create->add_option("--max-rate", args.max_rate,
                     "bytes a second on the wire, e.g. 8M (default none)");
  create->callback([a = &args, act, backend] {
    int64_t every = 0;
    if (a->schedule != "none") {
      absl::StatusOr<int64_t> p = ParseSchedule(a->schedule);
      if (!p.ok()) return act(p.status());
      every = *p;
    }
    absl::StatusOr<uint64_t> rate = ParseRate(a->max_rate);
    if (!rate.ok()) return act(rate.status());
    absl::StatusOr<std::unique_ptr<RelationshipBackend>> b = backend();
    if (!b.ok()) return act(b.status());
    absl::StatusOr<ordered_json> r =
        (*b)->Create(a->source, a->destination, every, *rate);
    if (!r.ok()) return act(r.status());
    std::printf("created %s -> %s (schedule %s); %s\n",
                (*r)["source"].get<std::string>().c_str(),
                (*r)["destination"].get<std::string>().c_str(),
                FormatSchedule(every).c_str(), StateLine(*r).c_str());
  });

  struct OpSpec {
    Operation op;
    const char* help;
    bool asks;
  };
  for (const OpSpec& spec :
       {OpSpec{Operation::kInitialize,
               "baseline transfer (creates the destination)", false},
        OpSpec{Operation::kUpdate, "snapshot the source and ship what changed",
               false},
        OpSpec{Operation::kBreak,
               "stop mirroring; the destination becomes writable", true},
        OpSpec{Operation::kResync,
               "after a break: the destination returns to the source", true},
        OpSpec{Operation::kReverseResync,
               "after a break: the source takes the destination's data and "
               "the direction flips",
               true},
        OpSpec{Operation::kReestablish,
               "after a reverse resync: back to the original direction", true},
        OpSpec{Operation::kRelease,
               "remove the relationship and its replication snapshots",
               false}}) {
    const std::string name = ToString(spec.op);
    CLI::App* cmd = rel->add_subcommand(name, spec.help);
    cmd->add_option("ENDPOINT", args.endpoint,
                    "[SITE/]POOL:VOLUME, either side")
        ->required();
    if (spec.asks) {
      cmd->add_flag("--yes", args.yes, "do not ask before going ahead");
    }
    const Operation op = spec.op;
    cmd->callback([a = &args, act, backend, op, name] {
      absl::StatusOr<std::unique_ptr<RelationshipBackend>> b = backend();
      if (!b.ok()) return act(b.status());
      Asker asker{a->yes};
      absl::StatusOr<ordered_json> r = (*b)->Run(op, a->endpoint, asker);
      if (!r.ok()) return act(asker.Explain(r.status(), name));
      PrintResult(*r);
    });
  }

  CLI::App* status = app.add_subcommand(
      "status", "relationships: states, health, lag, transfers");
  status->add_option("ENDPOINT", args.endpoint,
                     "one relationship ([SITE/]POOL:VOLUME)");
  status
      ->add_option("--pool", args.status_pool,
                   "every relationship in a pool (a path, or a daemon's "
                   "pool name)")
      ->envname("TANDEM_POOL");
  status->add_flag("--json", args.as_json, "one JSON object per relationship");
  status->add_flag("--exports", args.exports,
                   "the daemon's NBD exports instead: mode, size, connections");
  status->callback([a = &args, act, backend] {
    if (a->exports) {
      absl::StatusOr<std::unique_ptr<RelationshipBackend>> b = backend();
      if (!b.ok()) return act(b.status());
      absl::StatusOr<ordered_json> e = (*b)->Exports();
      if (!e.ok()) return act(e.status());
      if (a->as_json) {
        std::cout << e->dump(2) << "\n";
        return;
      }
      if (e->empty())
        std::printf("no NBD exports (nbd is not set, or no volumes)\n");
      for (const auto& x : *e) {
        std::printf(
            "%s  %s  %s  %zu connection(s)\n",
            x["name"].get<std::string>().c_str(),
            x["mode"].get<std::string>().c_str(),
            blockstore::FormatBytes(x["size_bytes"].get<uint64_t>()).c_str(),
            x["connections"].size());
        for (const auto& c : x["connections"]) {
          std::printf(
              "    from %s  %s  %llu requests, %llu errors\n",
              c["peer"].get<std::string>().c_str(),
              c["mode"].get<std::string>().c_str(),
              static_cast<unsigned long long>(c["requests"].get<uint64_t>()),
              static_cast<unsigned long long>(c["errors"].get<uint64_t>()));
        }
      }
      return;
    }
    if (a->endpoint.empty() && a->status_pool.empty()) {
      return act(absl::InvalidArgumentError(
          "name a relationship ([SITE/]POOL:VOLUME) or a pool (--pool or "
          "TANDEM_POOL)"));
    }
    absl::StatusOr<std::unique_ptr<RelationshipBackend>> b = backend();
    if (!b.ok()) return act(b.status());
    absl::StatusOr<ordered_json> reports =
        (*b)->Status(a->endpoint, a->status_pool);
    if (!reports.ok()) return act(reports.status());
    if (a->as_json) {
      std::cout << reports->dump(2) << "\n";
      return;
    }
    if (reports->empty()) std::printf("no relationships\n");
    for (const auto& r : *reports) PrintReport(r);
  });
}

}  // namespace tools
