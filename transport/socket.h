// Sockets for the transport layer: an owned file descriptor, TCP and Unix
// listeners and connections, and waiting on a descriptor with a deadline.
// The only place (with channel.cc) that calls the socket API.
#ifndef TANDEM_TRANSPORT_SOCKET_H_
#define TANDEM_TRANSPORT_SOCKET_H_

#include <chrono>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace transport {

using Clock = std::chrono::steady_clock;
using Deadline = Clock::time_point;

inline Deadline After(std::chrono::milliseconds d) { return Clock::now() + d; }

// Owns a file descriptor; closes it on destruction. Move-only.
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() { Reset(); }
  Fd(Fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  Fd& operator=(Fd&& o) noexcept {
    if (this != &o) {
      Reset();
      fd_ = std::exchange(o.fd_, -1);
    }
    return *this;
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;

  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  // Gives the descriptor up (the caller closes it).
  int Release() { return std::exchange(fd_, -1); }
  void Reset();

 private:
  int fd_ = -1;
};

// "HOST:PORT" ("[::1]:7601" for IPv6). InvalidArgument naming `text`.
struct HostPort {
  std::string host;
  int port = 0;
  std::string ToString() const;
};
absl::StatusOr<HostPort> ParseHostPort(absl::string_view text);

// A listening TCP socket (SO_REUSEADDR, close-on-exec). Port 0 picks one.
absl::StatusOr<Fd> ListenTcp(const HostPort& at, int backlog = 64);
// The port a listening socket got.
absl::StatusOr<int> LocalPort(const Fd& listener);
// A Unix socket at `path` (an old socket file there is replaced), mode
// 0600, listening.
absl::StatusOr<Fd> ListenUnix(const std::string& path);
// Connects before `deadline`; the descriptor is non-blocking, TCP_NODELAY.
absl::StatusOr<Fd> ConnectTcp(const HostPort& to, Deadline deadline);
absl::StatusOr<Fd> ConnectUnix(const std::string& path);
// Accepts one connection (non-blocking, close-on-exec); `peer` gets its
// address. Unavailable once the listener is shut down.
absl::StatusOr<Fd> Accept(const Fd& listener, std::string* peer);

// Waits until `fd` is readable (`events` POLLIN) or writable (POLLOUT), or
// `deadline` passes (DeadlineExceeded) or the wait is woken by a shutdown
// of the socket (returns OK: the next call sees the error).
absl::Status WaitFor(int fd, short events, Deadline deadline);

// Whether the peer of connected socket `fd` has hung up (sent FIN or
// reset): an idle pooled connection to a daemon that restarted, say.
bool PeerHungUp(int fd);

void SetNonBlocking(int fd);

}  // namespace transport

#endif  // TANDEM_TRANSPORT_SOCKET_H_
