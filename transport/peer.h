// The daemon-to-daemon connection: TCP, then TLS (channel.h), then a
// versioned HELLO both ways, before any other message is read:
//
//   client -> server  HELLO {"protocol": "tandem-peer", "min_version": 1,
//                            "max_version": 1, "site": "a"}
//   server -> client  HELLO {"version": 1, "site": "b"}   (or closes)
//
// The site a peer names in HELLO must be the one it authenticated as (its
// certificate's CN, or its PSK identity) and one of this daemon's peers;
// otherwise the server logs it and closes, having parsed nothing else.
// Handshakes run on their own threads with a deadline, and only so many at
// once, so that a stalled or hostile client costs at most its handshake.
#ifndef TANDEM_TRANSPORT_PEER_H_
#define TANDEM_TRANSPORT_PEER_H_

#include <atomic>
#include <chrono>
#include <functional>
#include <list>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "blockstore/mutex.h"
#include "transport/channel.h"
#include "transport/connection.h"
#include "transport/socket.h"

namespace transport {

inline constexpr int kProtocolVersion = 1;

// Checks a client's HELLO (the first and only message read before a peer
// is known): the protocol, a version both speak, and that the site it
// names is the one it authenticated as (`identity`; unchecked in plaintext
// mode) and one of `peers`. On success `site` is set; the error says why not.
absl::Status CheckHello(const nlohmann::json& hello,
                        const std::string& identity, bool plaintext,
                        const std::set<std::string>& peers, std::string* site);

struct PeerOptions {
  std::string site;  // this daemon's site name
  std::chrono::milliseconds handshake_timeout{10000};
  ConnectionOptions connection;
};

// One line per event, for the daemon's log.
using Logger = std::function<void(const std::string&)>;

class PeerServer {
 public:
  // Runs on a connection's own thread once the peer is authenticated;
  // returns when it is done with it.
  using Handler = std::function<void(Connection&)>;

  // Listens at `at` (port 0: any) for the sites in `peers`.
  static absl::StatusOr<std::unique_ptr<PeerServer>> Start(
      const HostPort& at, Security& security, PeerOptions options,
      std::set<std::string> peers, Handler handler, Logger log);
  ~PeerServer();  // Stop()

  int port() const { return port_; }
  // Stops accepting, closes every connection, waits for their threads.
  void Stop();
  // Counters for tests and metrics.
  uint64_t refused() const { return refused_.load(); }
  uint64_t accepted() const { return accepted_.load(); }

 private:
  PeerServer(Security& security, PeerOptions options,
             std::set<std::string> peers, Handler handler, Logger log)
      : security_(security),
        options_(std::move(options)),
        peers_(std::move(peers)),
        handler_(std::move(handler)),
        log_(std::move(log)) {}
  void AcceptLoop();
  void Serve(Fd fd, std::string address);

  Security& security_;
  const PeerOptions options_;
  const std::set<std::string> peers_;
  const Handler handler_;
  const Logger log_;
  Fd listener_;
  int port_ = 0;
  std::thread acceptor_;
  std::atomic<bool> stopping_{false};
  std::atomic<int> handshaking_{0};
  std::atomic<uint64_t> refused_{0}, accepted_{0};
  blockstore::Mutex mu_;
  // Live connections, to close them on Stop; threads to join.
  std::set<Connection*> live_ ABSL_GUARDED_BY(mu_);
  std::list<std::thread> threads_ ABSL_GUARDED_BY(mu_);
  std::vector<std::thread::id> finished_ ABSL_GUARDED_BY(mu_);
  std::set<int> handshaking_fds_ ABSL_GUARDED_BY(mu_);
};

// Connects to one peer site's daemon.
class PeerClient {
 public:
  PeerClient(std::string peer_site, HostPort address, Security& security,
             PeerOptions options)
      : peer_site_(std::move(peer_site)),
        address_(std::move(address)),
        security_(security),
        options_(std::move(options)) {}

  // A fresh, authenticated connection (keepalive running). Unavailable if
  // the peer cannot be reached; PermissionDenied if it does not prove to be
  // `peer_site`.
  absl::StatusOr<std::unique_ptr<Connection>> Connect();
  const std::string& peer_site() const { return peer_site_; }
  const HostPort& address() const { return address_; }

 private:
  const std::string peer_site_;
  const HostPort address_;
  Security& security_;
  const PeerOptions options_;
};

}  // namespace transport

#endif  // TANDEM_TRANSPORT_PEER_H_
