// A byte channel between two daemons: plain TCP (only where both sides'
// configs say insecure_plaintext) or TLS 1.3, authenticated both ways with
// certificates from a CA or with a pre-shared key (TLS 1.3 external PSK).
// OpenSSL does all the cryptography; nothing here is home-made.
//
// Threads: one reader and one writer may use a Channel at once (the
// keepalive writes while a stream is read); Shutdown from any thread.
#ifndef TANDEM_TRANSPORT_CHANNEL_H_
#define TANDEM_TRANSPORT_CHANNEL_H_

#include <memory>
#include <span>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "transport/socket.h"

namespace transport {

class Channel {
 public:
  virtual ~Channel() = default;
  // Reads at least one byte before `deadline`; 0 once the peer closed.
  // DeadlineExceeded on time-out, Unavailable on a broken connection.
  virtual absl::StatusOr<size_t> ReadSome(std::span<std::byte> out,
                                          Deadline deadline) = 0;
  // Writes `pieces` one after the other, all of them, before `deadline`
  // (DeadlineExceeded), as few writes to the socket as it takes.
  virtual absl::Status Write(std::span<const std::span<const std::byte>> pieces,
                             Deadline deadline) = 0;
  absl::Status WriteAll(std::span<const std::byte> data, Deadline deadline) {
    const std::span<const std::byte> one[] = {data};
    return Write(one, deadline);
  }
  // Wakes blocked calls; later ones fail.
  virtual void Shutdown() = 0;
  // "TLS 1.3 TLS_AES_256_GCM_SHA384 (certificate)", "plaintext", ...
  virtual std::string Describe() const = 0;
  // The peer hung up (see PeerHungUp); bytes it sent before may be unread.
  virtual bool HungUp() const = 0;
};

struct SecurityConfig {
  enum class Mode { kCertificates, kPsk, kPlaintext };
  Mode mode = Mode::kCertificates;
  std::string cert_file, key_file, ca_file;  // kCertificates (PEM)
  std::string psk_file;  // kPsk: hex, at least 32 bytes of key
};

// The TLS contexts of one daemon, for both ends of its connections.
class Security {
 public:
  // InvalidArgument naming the file that is missing or unreadable. Sets
  // SIGPIPE to be ignored (process-wide): a write to a vanished peer fails.
  static absl::StatusOr<std::unique_ptr<Security>> Create(
      const SecurityConfig& config);
  ~Security();

  // Runs the server side of the handshake on `fd` before `deadline`. On
  // success, `identity` is who the peer proved to be: the site name its
  // certificate was issued for (CN), or its PSK identity; empty in
  // plaintext mode. PermissionDenied for a failed authentication.
  absl::StatusOr<std::unique_ptr<Channel>> Accept(Fd fd, Deadline deadline,
                                                  std::string* identity);
  // The client side, to the daemon of `peer_site` (the name its certificate
  // must carry); `my_site` is this daemon's PSK identity.
  absl::StatusOr<std::unique_ptr<Channel>> Connect(Fd fd,
                                                   const std::string& peer_site,
                                                   const std::string& my_site,
                                                   Deadline deadline);
  SecurityConfig::Mode mode() const { return config_.mode; }

 private:
  explicit Security(const SecurityConfig& config) : config_(config) {}
  SecurityConfig config_;
  void* server_ctx_ = nullptr;  // SSL_CTX
  void* client_ctx_ = nullptr;
  std::string psk_;  // raw key bytes
};

// Plain bytes over `fd` (no TLS), for the plaintext mode and tests.
std::unique_ptr<Channel> PlainChannel(Fd fd);

}  // namespace transport

#endif  // TANDEM_TRANSPORT_CHANNEL_H_
