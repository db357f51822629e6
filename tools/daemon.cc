#include "tools/daemon.h"

#include <chrono>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "blockstore/util.h"
#include "engine/pipe.h"
#include "httplib.h"
#include "tools/http_unix.h"
#include "tools/open_pool.h"
#include "tools/pool_ops.h"
#include "tools/relationship_cli.h"
#include "tools/relationship_json.h"

namespace tools {

using blockstore::MutexLock;
using engine::Endpoint;
using engine::Operation;

absl::StatusOr<Endpoint> ParseSiteEndpoint(const std::string& text) {
  size_t slash = text.find('/');
  size_t colon = slash == std::string::npos ? slash : text.find(':', slash);
  if (slash == std::string::npos || colon == std::string::npos || slash == 0 ||
      colon == slash + 1 || colon + 1 == text.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "'", text,
        "' is not SITE/POOL:VOLUME (site and pool names from the daemons' "
        "configs, e.g. a/p:vol)"));
  }
  return Endpoint{text.substr(slash + 1, colon - slash - 1),
                  text.substr(colon + 1), text.substr(0, slash)};
}

// Sites by endpoint: this daemon's pools, and its peers' through
// RemoteSites made on first use.
class Daemon::Sites final : public engine::SiteProvider {
 public:
  explicit Sites(Daemon& d) : d_(d) {}

  absl::StatusOr<engine::Site*> Get(const Endpoint& e) override {
    if (e.site.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("'", e.ToString(),
                       "': through a daemon name endpoints SITE/POOL:VOLUME"));
    }
    if (e.site == d_.config_.site) {
      auto it = d_.pools_.find(e.pool);
      if (it == d_.pools_.end()) {
        std::vector<std::string> names;
        for (const auto& [name, p] : d_.pools_) names.push_back(name);
        return absl::NotFoundError(
            absl::StrCat("site ", e.site, " has no pool '", e.pool,
                         "' (its pools: ", absl::StrJoin(names, ", "), ")"));
      }
      return it->second.site.get();
    }
    auto link = d_.links_.find(e.site);
    if (link == d_.links_.end()) {
      return absl::NotFoundError(absl::StrCat(
          "site '", e.site, "' is not a peer of site ", d_.config_.site,
          "; add it under [peers] in ", d_.config_.file));
    }
    MutexLock lock(mu_);
    std::unique_ptr<transport::RemoteSite>& r = remote_[e.PoolName()];
    if (!r) r = std::make_unique<transport::RemoteSite>(*link->second, e.pool);
    return r.get();
  }

 private:
  Daemon& d_;
  blockstore::Mutex mu_;
  std::map<std::string, std::unique_ptr<transport::RemoteSite>> remote_
      ABSL_GUARDED_BY(mu_);
};

Daemon::Daemon(const DaemonConfig& config, transport::Logger log)
    : config_(config),
      log_(std::move(log)),
      stopping_(std::make_shared<std::atomic<bool>>(false)) {}

Daemon::~Daemon() { Stop(); }

int Daemon::peer_port() const {
  return peer_server_ ? peer_server_->port() : 0;
}

absl::StatusOr<std::unique_ptr<Daemon>> Daemon::Start(
    const DaemonConfig& config, transport::Logger log) {
  std::unique_ptr<Daemon> d(new Daemon(config, std::move(log)));
  for (const auto& [name, path] : config.pools) {
    absl::StatusOr<std::unique_ptr<blockstore::Pool>> pool =
        OpenPool(path, blockstore::OpenMode::kReadWrite);
    if (!pool.ok()) {
      return absl::Status(pool.status().code(),
                          absl::StrCat("pool ", name, " (", path,
                                       "): ", pool.status().message()));
    }
    OwnPool& own = d->pools_[name];
    own.path = path;
    own.pool = std::move(*pool);
    own.site = std::make_unique<engine::LocalSite>(
        absl::StrCat(config.site, "/", name), *own.pool,
        engine::LocalSiteOptions{config.checkpoint_bytes});
  }
  absl::StatusOr<std::unique_ptr<transport::Security>> security =
      transport::Security::Create(config.security);
  if (!security.ok()) return security.status();
  d->security_ = std::move(*security);
  transport::PeerOptions peer;
  peer.site = config.site;
  peer.handshake_timeout = config.handshake_timeout;
  peer.connection.timeout = config.timeout;
  peer.connection.keepalive =
      std::min(std::chrono::milliseconds(3000), config.timeout / 4);
  for (const auto& [name, address] : config.peers) {
    d->clients_[name] = std::make_unique<transport::PeerClient>(
        name, address, *d->security_, peer);
    d->links_[name] =
        std::make_unique<transport::ConnectionPool>(*d->clients_[name]);
  }
  d->sites_ = std::make_unique<Sites>(*d);
  engine::ReplicationOptions options;
  options.driver = config.site;
  options.retry_window = absl::FromChrono(config.retry);
  options.stopping = d->stopping_;
  d->rep_ = std::make_unique<engine::Replication>(*d->sites_, options);
  std::set<std::string> peer_names;
  for (const auto& [name, address] : config.peers) peer_names.insert(name);
  absl::StatusOr<std::unique_ptr<transport::PeerServer>> server =
      transport::PeerServer::Start(
          config.listen, *d->security_, peer, peer_names,
          [daemon = d.get()](transport::Connection& conn) {
            transport::ServeSites(
                conn,
                [daemon](const std::string& pool)
                    -> absl::StatusOr<engine::LocalSite*> {
                  auto it = daemon->pools_.find(pool);
                  if (it == daemon->pools_.end()) {
                    return absl::NotFoundError(
                        absl::StrCat("site ", daemon->config_.site,
                                     " has no pool '", pool, "'"));
                  }
                  return it->second.site.get();
                },
                daemon->log_);
          },
          d->log_);
  if (!server.ok()) {
    return absl::Status(server.status().code(),
                        absl::StrCat("listen = ", config.listen.ToString(),
                                     ": ", server.status().message()));
  }
  d->peer_server_ = std::move(*server);
  if (absl::Status s = d->StartServing(); !s.ok()) return s;
  d->Log(absl::StrCat(
      "site ", config.site, " serving: peers on port ", d->peer_port(),
      ", control ", config.control,
      config.metrics ? absl::StrCat(", metrics on port ", d->metrics_port_)
                     : "",
      config.nbd ? absl::StrCat(", nbd on port ", d->nbd_port()) : "", ", ",
      config.pools.size(), " pool(s), security ",
      config.security.mode == transport::SecurityConfig::Mode::kPlaintext
          ? "NONE (insecure_plaintext)"
      : config.security.mode == transport::SecurityConfig::Mode::kPsk
          ? "TLS 1.3 pre-shared key"
          : "TLS 1.3 certificates"));
  d->scheduler_ = std::thread([daemon = d.get()] { daemon->Schedule(); });
  return d;
}

absl::Status Daemon::StartServing() {
  // NBD first: once the control socket answers, everything listens.
  if (config_.nbd) {
    std::map<std::string, blockstore::Pool*> pools;
    for (auto& [name, own] : pools_) pools[name] = own.pool.get();
    exports_ = std::make_unique<transport::PoolExports>(std::move(pools));
    transport::NbdServer::Config nbd;
    nbd.listen = *config_.nbd;
    nbd.allow = config_.nbd_allow;
    nbd.handshake_timeout = config_.handshake_timeout;
    absl::StatusOr<std::unique_ptr<transport::NbdServer>> server =
        transport::NbdServer::Start(nbd, *exports_, log_);
    if (!server.ok()) {
      return absl::Status(server.status().code(),
                          absl::StrCat("nbd = ", config_.nbd->ToString(), ": ",
                                       server.status().message()));
    }
    nbd_ = std::move(*server);
  }
  absl::StatusOr<transport::Fd> control =
      transport::ListenUnix(config_.control);
  if (!control.ok()) {
    return absl::Status(control.status().code(),
                        absl::StrCat("control = ", config_.control, ": ",
                                     control.status().message()));
  }
  control_ = std::make_unique<UnixHttpServer>();
  // Every request holds its thread until its operation ends (a baseline may
  // take hours): enough threads that status is still answered while many
  // transfers run.
  control_->new_task_queue = [] { return new httplib::ThreadPool(64); };
  RegisterControl(*control_);
  control_thread_ = std::thread([this, fd = std::move(*control)]() mutable {
    control_->ServeSocket(std::move(fd));
  });
  if (config_.metrics) {
    metrics_ = std::make_unique<httplib::Server>();
    RegisterMetrics(*metrics_);
    int port = config_.metrics->port;
    if (port == 0) {
      port = metrics_->bind_to_any_port(config_.metrics->host);
    } else if (!metrics_->bind_to_port(config_.metrics->host, port)) {
      port = -1;
    }
    if (port <= 0) {
      return absl::UnavailableError(absl::StrCat(
          "metrics = ", config_.metrics->ToString(), ": cannot listen there"));
    }
    metrics_port_ = port;
    metrics_thread_ = std::thread([this] { metrics_->listen_after_bind(); });
  }
  return absl::OkStatus();
}

void Daemon::Stop() {
  if (stopping_->exchange(true)) return;
  {
    MutexLock lock(mu_);
    stop_ = true;
  }
  wake_.notify_all();
  auto start = std::chrono::steady_clock::now();
  // Peers first: transfers with them end (the receivers keep their resume
  // points); then the servers, whose handlers finish as their transfers do.
  if (peer_server_) peer_server_->Stop();
  if (nbd_) nbd_->Stop();
  if (control_) control_->stop();
  if (metrics_) metrics_->stop();
  if (scheduler_.joinable()) scheduler_.join();
  std::list<std::thread> workers;
  {
    MutexLock lock(mu_);
    workers.swap(workers_);
  }
  for (std::thread& t : workers) t.join();
  if (control_thread_.joinable()) control_thread_.join();
  if (metrics_thread_.joinable()) metrics_thread_.join();
  rep_.reset();
  sites_.reset();
  links_.clear();
  clients_.clear();
  for (auto& [name, own] : pools_) {
    if (own.pool) own.pool->Flush().IgnoreError();
  }
  Log(absl::StrFormat(
      "site %s stopped in %.2f s", config_.site,
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
          .count()));
}

// --- Operations
// ---------------------------------------------------------------

absl::StatusOr<ordered_json> Daemon::Run(Operation op, const Endpoint& e,
                                         const engine::Confirm& confirm,
                                         const char* trigger) {
  auto start = std::chrono::steady_clock::now();
  absl::StatusOr<ordered_json> r = RunOperation(*rep_, op, e, confirm);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
          .count();
  std::string relationship = e.ToString();
  uint64_t bytes = 0, resumed = 0, retries = 0;
  if (r.ok()) {
    if (r->contains("relationship")) {
      relationship =
          absl::StrCat((*r)["relationship"]["source"].get<std::string>(), "->",
                       (*r)["relationship"]["destination"].get<std::string>());
    }
    if (r->contains("stats")) {
      bytes = (*r)["stats"].value("stream_bytes", uint64_t{0});
      resumed = (*r)["stats"].value("resumed", uint64_t{0});
      retries = (*r)["stats"].value("retries", uint64_t{0});
    }
  }
  Log(absl::StrFormat(
      "relationship=%s operation=%s trigger=%s outcome=%s bytes=%d "
      "seconds=%.3f resumed=%d retries=%d",
      relationship, engine::ToString(op), trigger,
      r.ok() ? "ok" : absl::StrCat("error: \"", r.status().message(), "\""),
      bytes, seconds, resumed, retries));
  // A break or a resync changes volumes' modes: connections to them are
  // closed now (their clients reconnect to the new mode), not at the
  // server's next round.
  if (nbd_) nbd_->Reconcile();
  return r;
}

ordered_json Daemon::ExportsJson() {
  ordered_json j = ordered_json::array();
  if (!exports_) return j;
  std::vector<transport::NbdServer::ConnectionInfo> conns = nbd_->Connections();
  for (const transport::NbdExports::Listed& l : exports_->List()) {
    absl::StatusOr<std::shared_ptr<transport::NbdExport>> e =
        exports_->Open(l.name);
    if (!e.ok()) continue;
    ordered_json c = ordered_json::array();
    for (const auto& conn : conns) {
      if (conn.export_name != l.name) continue;
      c.push_back({{"peer", conn.peer},
                   {"mode", conn.read_only ? "read-only" : "read-write"},
                   {"requests", conn.requests},
                   {"errors", conn.errors}});
    }
    j.push_back({{"name", l.name},
                 {"size_bytes", (*e)->size()},
                 {"mode", (*e)->read_only() ? "read-only" : "read-write"},
                 {"connections", std::move(c)}});
  }
  return j;
}

void Daemon::Dispatch(const std::string& id, const Endpoint& e,
                      const char* trigger, Operation op) {
  MutexLock lock(mu_);
  if (stop_ || busy_.contains(id)) return;
  busy_.insert(id);
  last_attempt_ns_[id] = absl::GetCurrentTimeNanos();
  workers_.emplace_back([this, id, e, trigger, op] {
    if (op == Operation::kNone) {
      // Go on with whatever is interrupted (quietly when nothing is).
      absl::StatusOr<engine::TransferStats> t = rep_->Continue(e);
      if (!t.ok() && !absl::IsFailedPrecondition(t.status())) {
        Log(absl::StrCat("relationship=", e.ToString(),
                         " operation=continue trigger=", trigger,
                         " outcome=error: \"", t.status().message(), "\""));
      } else if (t.ok() && t->snapshots > 0) {
        Log(absl::StrFormat(
            "relationship=%s operation=continue trigger=%s outcome=ok "
            "bytes=%d seconds=%.3f resumed=%d",
            e.ToString(), trigger, t->stream_bytes, t->seconds, t->resumed));
      }
    } else {
      absl::StatusOr<ordered_json> r = Run(
          op, e, [](const engine::LossPreview&) { return false; }, trigger);
      if (!r.ok()) {
        MutexLock done(mu_);
        ++transfers_failed_;
      }
    }
    MutexLock done(mu_);
    busy_.erase(id);
    finished_.push_back(std::this_thread::get_id());
  });
}

void Daemon::Schedule() {
  bool first = true;
  for (;;) {
    {
      MutexLock lock(mu_);
      if (!first) {
        wake_.wait_for(mu_, std::chrono::seconds(1),
                       [this]()
                           ABSL_NO_THREAD_SAFETY_ANALYSIS { return stop_; });
      }
      if (stop_) return;
      // Join the workers that are done.
      for (auto it = workers_.begin(); it != workers_.end();) {
        if (std::find(finished_.begin(), finished_.end(), it->get_id()) !=
            finished_.end()) {
          it->join();
          it = workers_.erase(it);
        } else {
          ++it;
        }
      }
      finished_.clear();
    }
    first = false;
    const int64_t now = absl::GetCurrentTimeNanos();
    for (const auto& [name, own] : pools_) {
      absl::StatusOr<std::map<std::string, std::string>> records =
          own.site->Records();
      if (!records.ok()) continue;
      for (const auto& [volume, text] : *records) {
        absl::StatusOr<engine::RelationshipRecord> r =
            engine::RelationshipRecord::FromJson(text);
        if (!r.ok()) continue;
        const Endpoint here{name, volume, config_.site};
        const bool mine = r->driver.empty() || r->driver == config_.site;
        if (r->released ||
            (r->status == engine::TransferStatus::kTransferring && mine) ||
            (r->pending == Operation::kReestablish && mine)) {
          Dispatch(r->id, here, "resume", Operation::kNone);
          continue;
        }
        if (!(r->destination == here) ||
            r->mirror_state != engine::MirrorState::kMirrored ||
            r->status != engine::TransferStatus::kIdle) {
          continue;
        }
        // The destination pulls: an interrupted receive goes on, a due
        // schedule runs.
        absl::StatusOr<std::optional<engine::ResumeToken>> point =
            own.site->ResumePoint(volume);
        if (point.ok() && point->has_value()) {
          Dispatch(r->id, here, "resume", Operation::kNone);
          continue;
        }
        if (r->schedule_seconds <= 0) continue;
        int64_t last = r->last_transfer_end_ns;
        {
          MutexLock lock(mu_);
          last = std::max(last, last_attempt_ns_[r->id]);
        }
        if (now - last >= r->schedule_seconds * int64_t{1000000000}) {
          Dispatch(r->id, here, "schedule", Operation::kUpdate);
        }
      }
    }
  }
}

// --- Status and metrics
// ---------------------------------------------------------

std::vector<engine::RelationshipReport> Daemon::AllReports() {
  std::vector<engine::RelationshipReport> out;
  std::set<std::string> seen;
  for (const auto& [name, own] : pools_) {
    absl::StatusOr<std::vector<engine::RelationshipReport>> r =
        rep_->ReportPool(Endpoint{name, "", config_.site});
    if (!r.ok()) continue;
    for (auto& one : *r) {
      if (seen.insert(one.record.id).second) out.push_back(std::move(one));
    }
  }
  return out;
}

namespace {

std::string Label(const std::string& v) {
  std::string out;
  for (char c : v) {
    if (c == '\\' || c == '"') out.push_back('\\');
    if (c == '\n') {
      out += "\\n";
      continue;
    }
    out.push_back(c);
  }
  return out;
}

}  // namespace

std::string Daemon::Metrics() {
  struct Family {
    const char* name;
    const char* type;
    const char* help;
    std::function<double(const engine::RelationshipReport&)> value;
  };
  const Family families[] = {
      {"tandem_relationship_healthy", "gauge",
       "1 if the last transfer succeeded and the lag is within the schedule",
       [](const auto& r) { return r.healthy ? 1.0 : 0.0; }},
      {"tandem_relationship_transferring", "gauge", "1 while a transfer runs",
       [](const auto& r) {
         return r.record.status == engine::TransferStatus::kTransferring ? 1.0
                                                                         : 0.0;
       }},
      {"tandem_relationship_lag_seconds", "gauge",
       "age of the data the destination holds (NaN: unknown)",
       [](const auto& r) {
         return r.lag_seconds < 0 ? std::nan("")
                                  : static_cast<double>(r.lag_seconds);
       }},
      {"tandem_relationship_last_transfer_bytes", "gauge",
       "bytes on the wire of the last transfer",
       [](const auto& r) {
         return static_cast<double>(r.record.last_transfer_bytes);
       }},
      {"tandem_relationship_last_transfer_duration_seconds", "gauge",
       "duration of the last transfer",
       [](const auto& r) { return r.record.last_transfer_seconds; }},
      {"tandem_relationship_progress_bytes", "gauge",
       "data bytes done of the running (or last) transfer",
       [](const auto& r) {
         return static_cast<double>(r.record.progress_bytes);
       }},
      {"tandem_relationship_progress_total_bytes", "gauge",
       "data bytes the running (or last) transfer carries in all",
       [](const auto& r) {
         return static_cast<double>(r.record.progress_total_bytes);
       }},
      {"tandem_relationship_transferred_bytes_total", "counter",
       "bytes on the wire of every transfer so far",
       [](const auto& r) {
         return static_cast<double>(r.record.total_transfer_bytes);
       }},
  };
  std::vector<engine::RelationshipReport> reports = AllReports();
  std::string out;
  for (const Family& f : families) {
    absl::StrAppend(&out, "# HELP ", f.name, " ", f.help, "\n# TYPE ", f.name,
                    " ", f.type, "\n");
    for (const auto& r : reports) {
      double v = f.value(r);
      absl::StrAppend(
          &out, f.name, "{id=\"", Label(r.record.id), "\",source=\"",
          Label(r.record.source.ToString()), "\",destination=\"",
          Label(r.record.destination.ToString()), "\"} ",
          std::isnan(v) ? std::string("NaN") : absl::StrFormat("%.17g", v),
          "\n");
    }
  }
  uint64_t failed = 0;
  {
    MutexLock lock(mu_);
    failed = transfers_failed_;
  }
  absl::StrAppend(
      &out,
      "# HELP tandem_peer_connections_refused_total peer connections refused "
      "(failed authentication, unknown site, garbage, time-outs)\n"
      "# TYPE tandem_peer_connections_refused_total counter\n"
      "tandem_peer_connections_refused_total ",
      peer_server_ ? peer_server_->refused() : 0,
      "\n# HELP tandem_peer_connections_total peer connections accepted\n"
      "# TYPE tandem_peer_connections_total counter\n"
      "tandem_peer_connections_total ",
      peer_server_ ? peer_server_->accepted() : 0,
      "\n# HELP tandem_scheduled_transfers_failed_total scheduled updates "
      "that failed\n# TYPE tandem_scheduled_transfers_failed_total counter\n"
      "tandem_scheduled_transfers_failed_total ",
      failed, "\n");
  if (nbd_) {
    absl::StrAppend(
        &out,
        "# HELP tandem_nbd_export_read_only 1 if the NBD export is read-only "
        "(a snapshot, or a mirror destination's volume)\n"
        "# TYPE tandem_nbd_export_read_only gauge\n");
    const ordered_json exports = ExportsJson();
    for (const auto& e : exports) {
      absl::StrAppend(&out, "tandem_nbd_export_read_only{export=\"",
                      Label(e["name"].get<std::string>()), "\"} ",
                      e["mode"] == "read-only" ? 1 : 0, "\n");
    }
    absl::StrAppend(&out,
                    "# HELP tandem_nbd_export_connections NBD connections "
                    "open to the export\n"
                    "# TYPE tandem_nbd_export_connections gauge\n");
    for (const auto& e : exports) {
      absl::StrAppend(&out, "tandem_nbd_export_connections{export=\"",
                      Label(e["name"].get<std::string>()), "\"} ",
                      e["connections"].size(), "\n");
    }
    absl::StrAppend(
        &out,
        "# HELP tandem_nbd_connections_total NBD connections accepted\n"
        "# TYPE tandem_nbd_connections_total counter\n"
        "tandem_nbd_connections_total ",
        nbd_->connections_total(),
        "\n# HELP tandem_nbd_connections_refused_total NBD connections "
        "refused (not in nbd_allow, too many)\n"
        "# TYPE tandem_nbd_connections_refused_total counter\n"
        "tandem_nbd_connections_refused_total ",
        nbd_->connections_refused(), "\n");
  }
  return out;
}

void Daemon::RegisterMetrics(httplib::Server& http) {
  http.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    res.set_content(Metrics(), "text/plain; version=0.0.4");
  });
  http.Get("/exports", [this](const httplib::Request&, httplib::Response& res) {
    res.set_content(ExportsJson().dump(2), "application/json");
  });
  http.Get("/status", [this](const httplib::Request&, httplib::Response& res) {
    ordered_json j = ordered_json::array();
    for (const auto& r : AllReports()) j.push_back(ReportJson(r));
    res.set_content(j.dump(2), "application/json");
  });
}

// --- The control API
// ---------------------------------------------------------------

namespace {

void Reply(httplib::Response& res, const absl::StatusOr<ordered_json>& r) {
  if (r.ok()) {
    res.status = 200;
    res.set_content(r->dump(), "application/json");
  } else {
    res.status = HttpStatus(r.status());
    res.set_content(ErrorJson(r.status()).dump(), "application/json");
  }
}

void Reply(httplib::Response& res, const absl::Status& s) {
  Reply(res, s.ok() ? absl::StatusOr<ordered_json>(ordered_json::object())
                    : absl::StatusOr<ordered_json>(s));
}

absl::StatusOr<ordered_json> Body(const httplib::Request& req) {
  if (req.body.empty()) return ordered_json::object();
  ordered_json j = ordered_json::parse(req.body, nullptr, false);
  if (!j.is_object()) {
    return absl::InvalidArgumentError("the request body is not a JSON object");
  }
  return j;
}

absl::StatusOr<uint64_t> Param(const httplib::Request& req, const char* name,
                               bool required) {
  if (!req.has_param(name)) {
    if (required) {
      return absl::InvalidArgumentError(
          absl::StrCat("missing query parameter '", name, "'"));
    }
    return 0;
  }
  return blockstore::ParseSize(req.get_param_value(name), name);
}

// A confirmation the CLI gives back is good for exactly what it was shown.
bool Matches(const engine::LossPreview& p, const ordered_json& c) {
  return c.is_object() &&
         c.value("operation", "") == engine::ToString(p.operation) &&
         c.value("method", "") == engine::ToString(p.method) &&
         c.value("overwritten", "") == p.overwritten.ToString() &&
         c.value("common_snapshot", "") == p.common_snapshot &&
         c.value("bytes", uint64_t{0}) == p.bytes &&
         c.value("chunks", uint64_t{0}) == p.chunks;
}

class HttpSink final : public engine::ByteSink {
 public:
  explicit HttpSink(httplib::DataSink& sink) : sink_(sink) {}
  absl::Status Write(std::span<const std::byte> data) override {
    if (!sink_.write(reinterpret_cast<const char*>(data.data()), data.size())) {
      return absl::UnavailableError("the client went away");
    }
    return absl::OkStatus();
  }

 private:
  httplib::DataSink& sink_;
};

}  // namespace

void Daemon::RegisterControl(httplib::Server& http) {
  http.Get("/v1/exports",
           [this](const httplib::Request&, httplib::Response& res) {
             Reply(res, absl::StatusOr<ordered_json>(ExportsJson()));
           });
  http.Get("/v1/status",
           [this](const httplib::Request& req, httplib::Response& res) {
             ordered_json j = ordered_json::array();
             if (req.has_param("endpoint")) {
               absl::StatusOr<Endpoint> e =
                   ParseSiteEndpoint(req.get_param_value("endpoint"));
               if (!e.ok()) return Reply(res, e.status());
               absl::StatusOr<engine::RelationshipReport> r = rep_->Report(*e);
               if (!r.ok()) return Reply(res, r.status());
               j.push_back(ReportJson(*r));
             } else if (req.has_param("pool")) {
               absl::StatusOr<std::vector<engine::RelationshipReport>> r =
                   rep_->ReportPool(
                       Endpoint{req.get_param_value("pool"), "", config_.site});
               if (!r.ok()) return Reply(res, r.status());
               for (const auto& one : *r) j.push_back(ReportJson(one));
             } else {
               for (const auto& r : AllReports()) j.push_back(ReportJson(r));
             }
             Reply(res, j);
           });

  http.Post("/v1/relationships", [this](const httplib::Request& req,
                                        httplib::Response& res) {
    absl::StatusOr<ordered_json> body = Body(req);
    if (!body.ok()) return Reply(res, body.status());
    absl::StatusOr<Endpoint> s = ParseSiteEndpoint(body->value("source", ""));
    if (!s.ok()) return Reply(res, s.status());
    absl::StatusOr<Endpoint> d =
        ParseSiteEndpoint(body->value("destination", ""));
    if (!d.ok()) return Reply(res, d.status());
    absl::StatusOr<engine::RelationshipRecord> r =
        rep_->Create(*s, *d, body->value("schedule_seconds", int64_t{0}),
                     body->value("max_rate_bytes", uint64_t{0}));
    Log(absl::StrCat(
        "relationship=", s->ToString(), "->", d->ToString(),
        " operation=create trigger=control outcome=",
        r.ok() ? "ok" : absl::StrCat("error: \"", r.status().message(), "\"")));
    if (!r.ok()) return Reply(res, r.status());
    Reply(res, RecordJson(*r));
  });

  http.Post(R"(/v1/relationships/([a-z-]+))", [this](
                                                  const httplib::Request& req,
                                                  httplib::Response& res) {
    std::optional<Operation> op = engine::ParseOperation(req.matches[1].str());
    if (!op || *op == Operation::kNone) {
      return Reply(res, absl::NotFoundError(absl::StrCat(
                            "no operation '", req.matches[1].str(), "'")));
    }
    absl::StatusOr<ordered_json> body = Body(req);
    if (!body.ok()) return Reply(res, body.status());
    absl::StatusOr<Endpoint> e = ParseSiteEndpoint(body->value("endpoint", ""));
    if (!e.ok()) return Reply(res, e.status());
    const bool yes = body->value("yes", false);
    const ordered_json confirmed =
        body->contains("confirm") ? (*body)["confirm"] : ordered_json();
    ordered_json asked;
    engine::Confirm confirm = [&](const engine::LossPreview& p) {
      if (yes || Matches(p, confirmed)) return true;
      asked = PreviewJson(p);
      return false;
    };
    absl::StatusOr<ordered_json> r = Run(*op, *e, confirm, "control");
    if (!r.ok() && absl::IsCancelled(r.status()) && !asked.is_null()) {
      res.status = 428;
      ordered_json j = ErrorJson(absl::CancelledError(absl::StrCat(
          engine::ToString(*op), " needs confirmation; nothing was changed")));
      j["preview"] = asked;
      res.set_content(j.dump(), "application/json");
      return;
    }
    Reply(res, r);
  });

  // Pools, volumes and snapshots of this daemon's pools.
  auto ops =
      [this](
          const std::string& pool) -> absl::StatusOr<std::shared_ptr<PoolOps>> {
    auto it = pools_.find(pool);
    if (it == pools_.end()) {
      return absl::NotFoundError(
          absl::StrCat("site ", config_.site, " has no pool '", pool, "'"));
    }
    return std::shared_ptr<PoolOps>(PoolOpsOver(*it->second.pool));
  };
  // A JSON route on a pool (the path's first group): finds it, reads the
  // body, answers what `f` returns.
  using PoolCall = std::function<absl::StatusOr<ordered_json>(
      PoolOps&, const httplib::Request&, const ordered_json&)>;
  auto on_pool = [ops](PoolCall f) {
    return [ops, f](const httplib::Request& req, httplib::Response& res) {
      absl::StatusOr<std::shared_ptr<PoolOps>> o = ops(req.matches[1]);
      if (!o.ok()) return Reply(res, o.status());
      absl::StatusOr<ordered_json> body = Body(req);
      if (!body.ok()) return Reply(res, body.status());
      Reply(res, f(**o, req, *body));
    };
  };
  // An operation that answers only how it went.
  auto done = [](absl::Status s) -> absl::StatusOr<ordered_json> {
    if (!s.ok()) return s;
    return ordered_json::object();
  };
  const std::string pool_re = R"(/v1/pools/([A-Za-z0-9._-]+))";
  const std::string vol_re = pool_re + R"(/volumes/([A-Za-z0-9._:-]+))";
  http.Get(pool_re, on_pool([](PoolOps& o, auto&, auto&) { return o.Info(); }));
  http.Post(pool_re + "/check", on_pool([](PoolOps& o, auto&, auto& body) {
              return o.Check(body.value("data", false));
            }));
  http.Get(pool_re + "/volumes",
           on_pool([](PoolOps& o, auto&, auto&) { return o.ListVolumes(); }));
  http.Post(
      pool_re + "/volumes", on_pool([done](PoolOps& o, auto&, auto& body) {
        return done(o.CreateVolume(body.value("name", ""),
                                   body.value("size_bytes", uint64_t{0})));
      }));
  http.Post(vol_re + "/resize",
            on_pool([done](PoolOps& o, auto& req, auto& body) {
              return done(o.ResizeVolume(
                  req.matches[2], body.value("size_bytes", uint64_t{0})));
            }));
  http.Delete(
      vol_re, on_pool([done](PoolOps& o, auto& req, auto&) {
        return done(o.DeleteVolume(req.matches[2], req.has_param("recursive")));
      }));
  http.Get(vol_re + "/snapshots", on_pool([](PoolOps& o, auto& req, auto&) {
             return o.ListSnapshots(req.matches[2]);
           }));
  http.Post(vol_re + "/snapshots",
            on_pool([](PoolOps& o, auto& req, auto& body) {
              return o.CreateSnapshot(req.matches[2], body.value("name", ""));
            }));
  http.Delete(vol_re + R"(/snapshots/([A-Za-z0-9._:-]+))",
              on_pool([done](PoolOps& o, auto& req, auto&) {
                return done(o.DeleteSnapshot(req.matches[2], req.matches[3]));
              }));
  http.Post(
      vol_re + "/rollback", on_pool([done](PoolOps& o, auto& req, auto& body) {
        return done(o.Rollback(req.matches[2], body.value("snapshot", "")));
      }));
  http.Get(
      vol_re + "/digest",
      on_pool([](PoolOps& o, auto& req, auto&) -> absl::StatusOr<ordered_json> {
        absl::StatusOr<std::string> d =
            o.Digest(req.matches[2], req.get_param_value("snapshot"));
        if (!d.ok()) return d.status();
        return ordered_json{{"digest", *d}};
      }));
  http.Post(
      vol_re + "/trim", on_pool([done](PoolOps& o, auto& req, auto& body) {
        return done(o.Trim(req.matches[2], body.value("offset", uint64_t{0}),
                           body.value("length", uint64_t{0})));
      }));
  http.Get(vol_re + "/length",
           [ops](const httplib::Request& req, httplib::Response& res) {
             absl::StatusOr<std::shared_ptr<PoolOps>> o = ops(req.matches[1]);
             if (!o.ok()) return Reply(res, o.status());
             absl::StatusOr<uint64_t> off = Param(req, "offset", false);
             if (!off.ok()) return Reply(res, off.status());
             std::optional<uint64_t> len;
             if (req.has_param("length")) {
               absl::StatusOr<uint64_t> l = Param(req, "length", true);
               if (!l.ok()) return Reply(res, l.status());
               len = *l;
             }
             absl::StatusOr<uint64_t> n = (*o)->ReadLength(
                 req.matches[2], req.get_param_value("snapshot"), *off, len);
             if (!n.ok()) return Reply(res, n.status());
             Reply(res, ordered_json{{"length", *n}});
           });
  http.Get(vol_re + "/data", [ops](const httplib::Request& req,
                                   httplib::Response& res) {
    absl::StatusOr<std::shared_ptr<PoolOps>> o = ops(req.matches[1]);
    if (!o.ok()) return Reply(res, o.status());
    absl::StatusOr<uint64_t> off = Param(req, "offset", false);
    if (!off.ok()) return Reply(res, off.status());
    std::optional<uint64_t> len;
    if (req.has_param("length")) {
      absl::StatusOr<uint64_t> l = Param(req, "length", true);
      if (!l.ok()) return Reply(res, l.status());
      len = *l;
    }
    const std::string volume = req.matches[2];
    const std::string snapshot = req.get_param_value("snapshot");
    absl::StatusOr<uint64_t> n = (*o)->ReadLength(volume, snapshot, *off, len);
    if (!n.ok()) return Reply(res, n.status());
    std::shared_ptr<PoolOps> keep = *o;
    const uint64_t base = *off;
    res.set_content_provider(
        *n, "application/octet-stream",
        [keep, volume, snapshot, base](size_t at, size_t length,
                                       httplib::DataSink& sink) {
          HttpSink out(sink);
          return keep
              ->Read(volume, snapshot, base + at,
                     std::min<uint64_t>(length, 4 << 20), out)
              .ok();
        });
  });
  http.Put(vol_re + "/data", [ops](const httplib::Request& req,
                                   httplib::Response& res,
                                   const httplib::ContentReader& reader) {
    absl::StatusOr<std::shared_ptr<PoolOps>> o = ops(req.matches[1]);
    if (!o.ok()) return Reply(res, o.status());
    absl::StatusOr<uint64_t> off = Param(req, "offset", false);
    if (!off.ok()) return Reply(res, off.status());
    absl::StatusOr<uint64_t> size = Param(req, "size", false);
    if (!size.ok()) return Reply(res, size.status());
    // The pool reads the body through a bounded pipe as it arrives.
    engine::Pipe pipe;
    absl::Status written;
    std::thread writer([&] {
      written = (*o)->Write(req.matches[2], *off, *size, pipe.source());
      if (!written.ok()) pipe.AbortRead(written);
    });
    // Refused part way (a read-only volume, say): the rest of the body is
    // read and dropped, up to kDrainBytes, so that the client gets to read
    // the reason rather than a connection closed under its upload.
    constexpr uint64_t kDrainBytes = 64 << 20;
    uint64_t drained = 0;
    bool refused = false;
    const bool whole = reader([&](const char* data, size_t len) {
      if (!refused &&
          pipe.sink()
              .Write({reinterpret_cast<const std::byte*>(data), len})
              .ok()) {
        return true;
      }
      refused = true;
      drained += len;
      return drained <= kDrainBytes;
    });
    // A body cut short must not commit what came of it.
    pipe.CloseWrite(whole ? absl::OkStatus()
                          : absl::UnavailableError(
                                "the client went away before the end of the "
                                "data; nothing was written"));
    writer.join();
    Reply(res, written);
  });
}

}  // namespace tools
