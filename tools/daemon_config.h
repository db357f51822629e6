// tandemd's configuration: a TOML file (docs/tandemd.md has an example).
//
//   site = "a"                        # this daemon's site name
//   listen = "127.0.0.1:7601"         # peers connect here (TLS)
//   control = "/run/tandem/a.sock"    # the local CLI: a Unix socket, 0600
//   metrics = "127.0.0.1:9601"        # GET /metrics, GET /status
//   checkpoint = "64M"                # receiver resume points this often
//   [tls]                             # mutual TLS 1.3 with certificates ...
//   cert = "a.crt"
//   key = "a.key"
//   ca = "ca.crt"
//   # psk = "site.psk"                # ... or a pre-shared key file
//   [pools]
//   p = "/srv/a.pool"                 # pool name = path (file or device)
//   [peers]
//   b = "127.0.0.1:7602"              # peer site name = address
//
// Optional: nbd = "127.0.0.1:10809" serves the pools' volumes and
// snapshots over NBD (docs/nbd.md); off loopback it needs nbd_allow =
// ["192.0.2.7", ...], the client addresses allowed (TLS for NBD is not
// offered yet). insecure_plaintext = true (only where both daemons say so),
// timeout = "10s" (a silent peer is dropped), handshake_timeout = "5s",
// retry = "10s" (how long a transfer retries a lost peer without progress).
// Relative paths are relative to the config file's folder.
#ifndef TANDEM_TOOLS_DAEMON_CONFIG_H_
#define TANDEM_TOOLS_DAEMON_CONFIG_H_

#include <chrono>
#include <map>
#include <optional>
#include <set>
#include <string>

#include "absl/status/statusor.h"
#include "transport/channel.h"
#include "transport/socket.h"

namespace tools {

struct DaemonConfig {
  std::string file;
  std::string site;
  transport::HostPort listen;
  std::string control;
  std::optional<transport::HostPort> metrics;
  std::optional<transport::HostPort> nbd;
  std::set<std::string> nbd_allow;  // client addresses; empty: any
  uint64_t checkpoint_bytes = 64 << 20;
  transport::SecurityConfig security;
  std::map<std::string, std::string> pools;  // name -> path
  std::map<std::string, transport::HostPort> peers;
  // Together: a peer that vanishes mid-transfer ends it as failed within
  // timeout + retry + handshake_timeout, under 30 s by default.
  std::chrono::milliseconds timeout{10000};
  std::chrono::milliseconds handshake_timeout{5000};
  std::chrono::milliseconds retry{10000};
};

// Reads and checks the file. A config error is one line naming the file
// and the key, e.g. "config a.toml: key 'listen': '7601' is not HOST:PORT".
absl::StatusOr<DaemonConfig> LoadDaemonConfig(const std::string& path);

// Site, pool and peer names: 1-64 of [A-Za-z0-9._-], not starting with
// '.' or '-' (they appear in endpoints SITE/POOL:VOLUME and metric labels).
bool IsValidSiteName(const std::string& name);

}  // namespace tools

#endif  // TANDEM_TOOLS_DAEMON_CONFIG_H_
