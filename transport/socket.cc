#include "transport/socket.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "blockstore/util.h"

namespace transport {

using blockstore::ErrnoError;

void Fd::Reset() {
  if (fd_ >= 0) close(fd_);
  fd_ = -1;
}

std::string HostPort::ToString() const {
  return host.find(':') != std::string::npos
             ? absl::StrCat("[", host, "]:", port)
             : absl::StrCat(host, ":", port);
}

absl::StatusOr<HostPort> ParseHostPort(absl::string_view text) {
  auto bad = [&] {
    return absl::InvalidArgumentError(absl::StrCat(
        "'", text, "' is not HOST:PORT (e.g. 127.0.0.1:7601 or [::1]:7601)"));
  };
  HostPort hp;
  size_t colon;
  if (!text.empty() && text[0] == '[') {
    size_t close = text.find(']');
    if (close == absl::string_view::npos || close + 1 >= text.size() ||
        text[close + 1] != ':') {
      return bad();
    }
    hp.host = std::string(text.substr(1, close - 1));
    colon = close + 1;
  } else {
    colon = text.rfind(':');
    if (colon == absl::string_view::npos || colon == 0) return bad();
    hp.host = std::string(text.substr(0, colon));
  }
  if (!absl::SimpleAtoi(text.substr(colon + 1), &hp.port) || hp.port < 0 ||
      hp.port > 65535) {
    return bad();
  }
  return hp;
}

namespace {

absl::StatusOr<addrinfo*> Resolve(const HostPort& hp, bool passive) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = passive ? AI_PASSIVE : 0;
  addrinfo* res = nullptr;
  std::string port = absl::StrCat(hp.port);
  int rc = getaddrinfo(hp.host.c_str(), port.c_str(), &hints, &res);
  if (rc != 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot resolve ", hp.host, ": ", gai_strerror(rc)));
  }
  return res;
}

}  // namespace

void SetNonBlocking(int fd) {
  int flags = fcntl(fd, F_GETFL, 0);
  fcntl(fd, F_SETFL, flags | O_NONBLOCK);
}

absl::StatusOr<Fd> ListenTcp(const HostPort& at, int backlog) {
  absl::StatusOr<addrinfo*> res = Resolve(at, true);
  if (!res.ok()) return res.status();
  absl::Status last = absl::UnavailableError("no address");
  for (addrinfo* ai = *res; ai != nullptr; ai = ai->ai_next) {
    Fd fd(
        socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol));
    if (!fd.valid()) {
      last = ErrnoError(errno, "socket");
      continue;
    }
    int one = 1;
    setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(fd.get(), ai->ai_addr, ai->ai_addrlen) != 0 ||
        listen(fd.get(), backlog) != 0) {
      last = ErrnoError(errno, absl::StrCat("listen on ", at.ToString()));
      continue;
    }
    freeaddrinfo(*res);
    return fd;
  }
  freeaddrinfo(*res);
  return last;
}

absl::StatusOr<int> LocalPort(const Fd& listener) {
  sockaddr_storage ss{};
  socklen_t len = sizeof(ss);
  if (getsockname(listener.get(), reinterpret_cast<sockaddr*>(&ss), &len) !=
      0) {
    return ErrnoError(errno, "getsockname");
  }
  if (ss.ss_family == AF_INET) {
    return ntohs(reinterpret_cast<sockaddr_in*>(&ss)->sin_port);
  }
  return ntohs(reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port);
}

absl::StatusOr<Fd> ListenUnix(const std::string& path) {
  sockaddr_un addr{};
  if (path.size() >= sizeof(addr.sun_path)) {
    return absl::InvalidArgumentError(
        absl::StrCat("control socket path '", path, "' is longer than ",
                     sizeof(addr.sun_path) - 1, " bytes; pick a shorter one"));
  }
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  Fd fd(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return ErrnoError(errno, "socket");
  struct stat st {};
  if (lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) {
      return absl::AlreadyExistsError(
          absl::StrCat(path, " exists and is not a socket; remove it"));
    }
    // A live daemon there answers a connect: refuse to take its socket.
    Fd probe(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (connect(probe.get(), reinterpret_cast<sockaddr*>(&addr),
                sizeof(addr)) == 0) {
      return absl::AlreadyExistsError(absl::StrCat(
          "another daemon listens on ", path, "; stop it or pick another"));
    }
    unlink(path.c_str());
  }
  // Created 0600 from the start: no window where others may connect.
  mode_t old = umask(0177);
  int rc = bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  umask(old);
  if (rc != 0) return ErrnoError(errno, absl::StrCat("bind ", path));
  if (listen(fd.get(), 64) != 0) {
    return ErrnoError(errno, absl::StrCat("listen ", path));
  }
  return fd;
}

absl::StatusOr<Fd> ConnectTcp(const HostPort& to, Deadline deadline) {
  absl::StatusOr<addrinfo*> res = Resolve(to, false);
  if (!res.ok()) return res.status();
  absl::Status last = absl::UnavailableError("no address");
  for (addrinfo* ai = *res; ai != nullptr; ai = ai->ai_next) {
    Fd fd(
        socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol));
    if (!fd.valid()) continue;
    SetNonBlocking(fd.get());
    int one = 1;
    setsockopt(fd.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    int rc = connect(fd.get(), ai->ai_addr, ai->ai_addrlen);
    if (rc != 0 && errno == EINPROGRESS) {
      absl::Status w = WaitFor(fd.get(), POLLOUT, deadline);
      if (!w.ok()) {
        last = absl::UnavailableError(
            absl::StrCat("connect to ", to.ToString(), ": timed out"));
        continue;
      }
      int err = 0;
      socklen_t len = sizeof(err);
      getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &err, &len);
      rc = err == 0 ? 0 : -1;
      errno = err;
    }
    if (rc != 0) {
      last = absl::UnavailableError(absl::StrCat("connect to ", to.ToString(),
                                                 ": ", std::strerror(errno)));
      continue;
    }
    freeaddrinfo(*res);
    return fd;
  }
  freeaddrinfo(*res);
  return last;
}

absl::StatusOr<Fd> ConnectUnix(const std::string& path) {
  sockaddr_un addr{};
  if (path.size() >= sizeof(addr.sun_path)) {
    return absl::InvalidArgumentError(
        absl::StrCat("socket path '", path, "' is too long"));
  }
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  Fd fd(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return ErrnoError(errno, "socket");
  if (connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) !=
      0) {
    return absl::UnavailableError(absl::StrCat(
        "cannot reach the daemon at ", path, ": ", std::strerror(errno),
        errno == ENOENT || errno == ECONNREFUSED
            ? " (is tandemd running with this control socket?)"
            : ""));
  }
  return fd;
}

absl::StatusOr<Fd> Accept(const Fd& listener, std::string* peer) {
  for (;;) {
    sockaddr_storage ss{};
    socklen_t len = sizeof(ss);
    int fd = accept4(listener.get(), reinterpret_cast<sockaddr*>(&ss), &len,
                     SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd >= 0) {
      if (peer != nullptr) {
        char host[NI_MAXHOST] = "?", serv[NI_MAXSERV] = "?";
        getnameinfo(reinterpret_cast<sockaddr*>(&ss), len, host, sizeof(host),
                    serv, sizeof(serv), NI_NUMERICHOST | NI_NUMERICSERV);
        *peer = absl::StrCat(host, ":", serv);
      }
      int one = 1;
      setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
      return Fd(fd);
    }
    if (errno == EINTR || errno == ECONNABORTED) continue;
    if (errno == EMFILE || errno == ENFILE) {
      // Out of descriptors: back off instead of spinning.
      usleep(10000);
      return absl::ResourceExhaustedError("out of file descriptors");
    }
    return absl::UnavailableError(
        absl::StrCat("accept: ", std::strerror(errno)));
  }
}

bool PeerHungUp(int fd) {
  pollfd p{fd, POLLRDHUP, 0};
  return poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR));
}

absl::Status WaitFor(int fd, short events, Deadline deadline) {
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - Clock::now());
    if (left.count() <= 0) return absl::DeadlineExceededError("timed out");
    pollfd p{fd, events, 0};
    int rc =
        poll(&p, 1, static_cast<int>(std::min<int64_t>(left.count(), 1000)));
    if (rc > 0) return absl::OkStatus();
    if (rc < 0 && errno != EINTR) return ErrnoError(errno, "poll");
  }
}

}  // namespace transport
