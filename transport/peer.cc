#include "transport/peer.h"

#include <sys/socket.h>

#include "absl/strings/str_cat.h"
#include "transport/site_codec.h"

namespace transport {

using blockstore::MutexLock;
using json = nlohmann::json;

namespace {

// Handshakes in progress at once; more connections wait for none of them:
// they are closed at once (a flood of stalled clients costs nothing more).
constexpr int kMaxHandshakes = 32;

std::string Field(const json& j, const char* key) {
  auto it = j.find(key);
  return it != j.end() && it->is_string() ? it->get<std::string>() : "";
}

}  // namespace

absl::Status CheckHello(const json& hello, const std::string& identity,
                        bool plaintext, const std::set<std::string>& peers,
                        std::string* site) {
  *site = Field(hello, "site");
  auto number = [&](const char* key) {
    auto it = hello.find(key);
    return it != hello.end() && it->is_number_integer() ? it->get<int64_t>()
                                                        : int64_t{0};
  };
  const int64_t lo = number("min_version"), hi = number("max_version");
  if (Field(hello, "protocol") != "tandem-peer") {
    return absl::PermissionDeniedError("not a tandem peer");
  }
  if (lo > kProtocolVersion || hi < kProtocolVersion) {
    return absl::PermissionDeniedError(
        absl::StrCat("speaks protocol versions ", lo, "-", hi, ", this daemon ",
                     kProtocolVersion));
  }
  if (!plaintext && *site != identity) {
    return absl::PermissionDeniedError(absl::StrCat(
        "says it is site '", *site, "' but authenticated as '", identity, "'"));
  }
  if (!peers.contains(*site)) {
    return absl::PermissionDeniedError(
        absl::StrCat("site '", *site, "' is not one of this daemon's peers"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<PeerServer>> PeerServer::Start(
    const HostPort& at, Security& security, PeerOptions options,
    std::set<std::string> peers, Handler handler, Logger log) {
  std::unique_ptr<PeerServer> s(
      new PeerServer(security, std::move(options), std::move(peers),
                     std::move(handler), std::move(log)));
  absl::StatusOr<Fd> listener = ListenTcp(at);
  if (!listener.ok()) return listener.status();
  s->listener_ = std::move(*listener);
  absl::StatusOr<int> port = LocalPort(s->listener_);
  if (!port.ok()) return port.status();
  s->port_ = *port;
  s->acceptor_ = std::thread([p = s.get()] { p->AcceptLoop(); });
  return s;
}

PeerServer::~PeerServer() { Stop(); }

void PeerServer::AcceptLoop() {
  while (!stopping_) {
    std::string address;
    absl::StatusOr<Fd> fd = Accept(listener_, &address);
    if (stopping_) break;
    if (!fd.ok()) continue;
    {
      // Reap the threads of connections that ended.
      MutexLock lock(mu_);
      for (auto it = threads_.begin(); it != threads_.end();) {
        if (std::find(finished_.begin(), finished_.end(), it->get_id()) !=
            finished_.end()) {
          it->join();
          it = threads_.erase(it);
        } else {
          ++it;
        }
      }
      finished_.clear();
    }
    if (handshaking_.load() >= kMaxHandshakes) {
      ++refused_;
      log_(absl::StrCat("peer ", address,
                        ": refused: too many handshakes in progress"));
      continue;  // closes it
    }
    ++handshaking_;
    MutexLock lock(mu_);
    threads_.emplace_back([this, f = std::move(*fd), address]() mutable {
      Serve(std::move(f), address);
      MutexLock done(mu_);
      finished_.push_back(std::this_thread::get_id());
    });
  }
}

void PeerServer::Serve(Fd fd, std::string address) {
  const Deadline deadline = After(options_.handshake_timeout);
  const int raw = fd.get();
  auto refuse = [&](const std::string& why) {
    ++refused_;
    log_(absl::StrCat("peer ", address, ": refused: ", why));
  };
  std::string identity;
  absl::StatusOr<std::unique_ptr<Channel>> channel = [&] {
    // Stop() shuts the socket down to end a handshake early.
    {
      MutexLock lock(mu_);
      if (stopping_)
        return absl::StatusOr<std::unique_ptr<Channel>>(
            absl::UnavailableError("stopping"));
      handshaking_fds_.insert(raw);
    }
    absl::StatusOr<std::unique_ptr<Channel>> c =
        security_.Accept(std::move(fd), deadline, &identity);
    MutexLock lock(mu_);
    handshaking_fds_.erase(raw);
    return c;
  }();
  if (!channel.ok()) {
    --handshaking_;
    refuse(std::string(channel.status().message()));
    return;
  }
  Connection conn(std::move(*channel), options_.connection, address);
  absl::StatusOr<Message> hello =
      conn.ReceiveMessageBefore(FrameType::kHello, deadline);
  std::string why;
  std::string site;
  if (!hello.ok()) {
    why = absl::StrCat("no HELLO: ", hello.status().message());
  } else if (absl::Status s = CheckHello(
                 hello->json, identity,
                 security_.mode() == SecurityConfig::Mode::kPlaintext, peers_,
                 &site);
             !s.ok()) {
    why = std::string(s.message());
  }
  if (!why.empty()) {
    --handshaking_;
    if (hello.ok()) {
      conn.SendMessage(FrameType::kHello, {{"error", why}}).IgnoreError();
    }
    refuse(why);
    return;
  }
  if (absl::Status s = conn.SendMessage(
          FrameType::kHello,
          {{"version", kProtocolVersion}, {"site", options_.site}});
      !s.ok()) {
    --handshaking_;
    refuse(std::string(s.message()));
    return;
  }
  --handshaking_;
  ++accepted_;
  conn.peer_site = site;
  {
    MutexLock lock(mu_);
    if (stopping_) return;
    live_.insert(&conn);
  }
  conn.StartKeepalive();
  handler_(conn);
  MutexLock lock(mu_);
  live_.erase(&conn);
}

void PeerServer::Stop() {
  if (stopping_.exchange(true)) {
    if (acceptor_.joinable()) acceptor_.join();
    return;
  }
  shutdown(listener_.get(), SHUT_RDWR);
  if (acceptor_.joinable()) acceptor_.join();
  std::list<std::thread> threads;
  {
    MutexLock lock(mu_);
    for (Connection* c : live_) c->Close();
    for (int fd : handshaking_fds_) shutdown(fd, SHUT_RDWR);
    threads.swap(threads_);
  }
  for (std::thread& t : threads) t.join();
}

absl::StatusOr<std::unique_ptr<Connection>> PeerClient::Connect() {
  const Deadline deadline = After(options_.handshake_timeout);
  absl::StatusOr<Fd> fd = ConnectTcp(address_, deadline);
  if (!fd.ok()) {
    return absl::UnavailableError(
        absl::StrCat("site ", peer_site_, " (", address_.ToString(),
                     ") cannot be reached: ", fd.status().message()));
  }
  absl::StatusOr<std::unique_ptr<Channel>> channel =
      security_.Connect(std::move(*fd), peer_site_, options_.site, deadline);
  if (!channel.ok()) {
    // A refused TLS handshake may be the peer restarting or dropping us;
    // either way nothing was exchanged.
    return absl::Status(absl::IsDeadlineExceeded(channel.status())
                            ? absl::StatusCode::kUnavailable
                            : channel.status().code(),
                        channel.status().message());
  }
  auto conn = std::make_unique<Connection>(
      std::move(*channel), options_.connection, address_.ToString());
  conn->peer_site = peer_site_;
  if (absl::Status s = conn->SendMessage(FrameType::kHello,
                                         {{"protocol", "tandem-peer"},
                                          {"min_version", kProtocolVersion},
                                          {"max_version", kProtocolVersion},
                                          {"site", options_.site}});
      !s.ok()) {
    return s;
  }
  absl::StatusOr<Message> hello =
      conn->ReceiveMessageBefore(FrameType::kHello, deadline);
  if (!hello.ok()) {
    return absl::UnavailableError(absl::StrCat(
        "site ", peer_site_, " (", address_.ToString(),
        ") closed the connection during its handshake (does it list this "
        "site, ",
        options_.site, ", among its peers, with matching security?)"));
  }
  if (std::string error = Field(hello->json, "error"); !error.empty()) {
    return absl::PermissionDeniedError(
        absl::StrCat("site ", peer_site_, " refused this daemon: ", error));
  }
  if (U64Or(hello->json, "version", 0) != kProtocolVersion ||
      Field(hello->json, "site") != peer_site_) {
    return absl::PermissionDeniedError(absl::StrCat(
        address_.ToString(), " is not the daemon of site ", peer_site_,
        " (it says it is '", Field(hello->json, "site"), "')"));
  }
  conn->StartKeepalive();
  return conn;
}

}  // namespace transport
