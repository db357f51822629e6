// tandemd: one site's daemon. It owns (opens and locks) the site's pools,
// answers its peers' Site calls over TLS (transport/), runs relationship
// operations for the local CLI and fleet controllers (the control API, HTTP
// and JSON on a Unix socket: docs/control-api.md), drives scheduled updates
// of the relationships whose destination it holds (pull), goes on with
// whatever a crash or a stop interrupted, and serves Prometheus metrics and
// a JSON status on its metrics address.
//
// Threads: the control and metrics servers and the peer server each run
// their own threads; a scheduler thread wakes every second; operations run
// on the thread of the request or of the scheduler's worker that started
// them. Stop() from any thread (a signal handler's thread in tandemd).
#ifndef TANDEM_TOOLS_DAEMON_H_
#define TANDEM_TOOLS_DAEMON_H_

#include <atomic>
#include <functional>
#include <list>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "blockstore/mutex.h"
#include "blockstore/pool.h"
#include "engine/local_site.h"
#include "engine/relationship.h"
#include "tools/daemon_config.h"
#include "tools/relationship_json.h"
#include "transport/nbd_exports.h"
#include "transport/nbd_server.h"
#include "transport/peer.h"
#include "transport/remote_site.h"

namespace httplib {
class Server;
}

namespace tools {

class UnixHttpServer;

// "SITE/POOL:VOLUME". InvalidArgument saying the form otherwise.
absl::StatusOr<engine::Endpoint> ParseSiteEndpoint(const std::string& text);

class Daemon {
 public:
  // Opens the pools, starts listening and serving; `log` gets one line
  // per event.
  static absl::StatusOr<std::unique_ptr<Daemon>> Start(
      const DaemonConfig& config, transport::Logger log);
  ~Daemon();

  // Stops serving: running transfers end where their receiver's last
  // resume point is, and their records stay as a crash would leave them,
  // so the next start goes on with them. Returns once every thread ended.
  void Stop();

  int peer_port() const;
  int metrics_port() const { return metrics_port_; }
  // 0 when NBD is not served.
  int nbd_port() const { return nbd_ ? nbd_->port() : 0; }

 private:
  class Sites;
  struct OwnPool {
    std::string path;
    std::unique_ptr<blockstore::Pool> pool;
    std::unique_ptr<engine::LocalSite> site;
  };

  explicit Daemon(const DaemonConfig& config, transport::Logger log);
  absl::Status StartServing();
  void RegisterControl(httplib::Server& http);
  void RegisterMetrics(httplib::Server& http);
  // Every relationship with a record in one of this site's pools (once
  // each), as status reports.
  std::vector<engine::RelationshipReport> AllReports();
  std::string Metrics();
  // The NBD exports, each with its mode and connections (GET /v1/exports).
  ordered_json ExportsJson();
  // The scheduler: scheduled updates, interrupted operations, releases
  // to finish.
  void Schedule();
  void Dispatch(const std::string& id, const engine::Endpoint& e,
                const char* trigger, engine::Operation op);
  // Runs an operation and logs one line for it.
  absl::StatusOr<ordered_json> Run(engine::Operation op,
                                   const engine::Endpoint& e,
                                   const engine::Confirm& confirm,
                                   const char* trigger);
  void Log(const std::string& line) { log_(line); }

  const DaemonConfig config_;
  const transport::Logger log_;
  std::map<std::string, OwnPool> pools_;
  std::unique_ptr<transport::Security> security_;
  std::map<std::string, std::unique_ptr<transport::PeerClient>> clients_;
  std::map<std::string, std::unique_ptr<transport::ConnectionPool>> links_;
  std::unique_ptr<Sites> sites_;
  std::shared_ptr<std::atomic<bool>> stopping_;
  std::unique_ptr<engine::Replication> rep_;
  std::unique_ptr<transport::PeerServer> peer_server_;
  std::unique_ptr<UnixHttpServer> control_;
  std::unique_ptr<httplib::Server> metrics_;
  std::unique_ptr<transport::PoolExports> exports_;
  std::unique_ptr<transport::NbdServer> nbd_;
  std::thread control_thread_, metrics_thread_, scheduler_;
  int metrics_port_ = 0;

  blockstore::Mutex mu_;
  blockstore::CondVar wake_;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  // Relationships a scheduler worker runs now, and when it last started
  // one for each.
  std::set<std::string> busy_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, int64_t> last_attempt_ns_ ABSL_GUARDED_BY(mu_);
  std::list<std::thread> workers_ ABSL_GUARDED_BY(mu_);
  std::vector<std::thread::id> finished_ ABSL_GUARDED_BY(mu_);
  uint64_t transfers_failed_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace tools

#endif  // TANDEM_TOOLS_DAEMON_H_
