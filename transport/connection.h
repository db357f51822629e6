// Framed messages over a Channel, with keepalives and time-outs.
//
//   frame := u32 length (little-endian, of the payload) | u8 type |
//            3 reserved (0) | payload
//
// Every length is checked against a hard limit before anything is
// allocated for it. A message frame's payload is u32 json_length | JSON |
// binary attachment; DATA frames carry stream bytes as they are. PING
// frames, sent by a keepalive thread whenever this side has been quiet for
// a while, are skipped by Receive: any frame proves the peer alive, and a
// peer silent for the whole time-out is dropped (Unavailable).
//
// Threads: Send may be called from any thread (one frame at a time goes
// out whole); Receive from one thread at a time.
#ifndef TANDEM_TRANSPORT_CONNECTION_H_
#define TANDEM_TRANSPORT_CONNECTION_H_

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "blockstore/mutex.h"
#include "nlohmann/json.hpp"
#include "transport/channel.h"

namespace transport {

enum class FrameType : uint8_t {
  kHello = 1,     // message: protocol version and site, both ways, first
  kRequest = 2,   // message: {"method": ..., params}
  kResponse = 3,  // message: {"ok": true, ...} or {"ok": false, "code", ...}
  kData = 4,      // stream bytes
  kEnd = 5,       // message: the stream is complete (or failed, with why)
  kPing = 6,      // keepalive (empty)
  kProgress = 7,  // message: progress of a claimed operation
  kCredit = 8,    // message: stream bytes the receiver has consumed
};

inline constexpr size_t kFrameHeaderBytes = 8;
inline constexpr uint32_t kMaxFramePayload = 4 << 20;
inline constexpr uint32_t kMaxMessageJson = 1 << 20;

struct Frame {
  FrameType type = FrameType::kPing;
  std::vector<std::byte> payload;
};

// A message frame taken apart.
struct Message {
  nlohmann::json json;
  std::vector<std::byte> blob;
};
// DataLoss for a malformed message payload (the fuzz target's entry).
absl::StatusOr<Message> DecodeMessage(std::span<const std::byte> payload);
std::vector<std::byte> EncodeMessage(const nlohmann::json& j,
                                     std::span<const std::byte> blob = {});
// Checks a frame header; DataLoss for an unknown type, reserved bits or a
// payload over the limit (the connection must then be dropped).
absl::StatusOr<std::pair<FrameType, uint32_t>> DecodeFrameHeader(
    std::span<const std::byte, kFrameHeaderBytes> header);

struct ConnectionOptions {
  // A peer silent this long is gone.
  std::chrono::milliseconds timeout{15000};
  // Quiet this long, we send a PING.
  std::chrono::milliseconds keepalive{3000};
};

class Connection {
 public:
  Connection(std::unique_ptr<Channel> channel, ConnectionOptions options,
             std::string peer);
  ~Connection();
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  // Starts the keepalive thread (after the handshake).
  void StartKeepalive();

  absl::Status Send(FrameType type, std::span<const std::byte> payload);
  absl::Status SendMessage(FrameType type, const nlohmann::json& j,
                           std::span<const std::byte> blob = {});
  // The next frame other than PING. Unavailable if the connection broke,
  // the peer closed it or stayed silent past the time-out, or broke the
  // framing (the connection is then unusable).
  absl::StatusOr<Frame> Receive();
  // The next frame, which must be a message of `type`.
  absl::StatusOr<Message> ReceiveMessage(FrameType type);
  // As ReceiveMessage, but the peer has only until `deadline` (the
  // handshake's HELLO).
  absl::StatusOr<Message> ReceiveMessageBefore(FrameType type,
                                               Deadline deadline);

  // Closes the channel (wakes a blocked Receive or Send).
  void Close();
  bool broken() const { return broken_.load(); }
  // The peer closed the connection in order (not an error of either side).
  bool peer_closed() const { return peer_closed_.load(); }
  // Broken, or the peer hung up: no use for another request.
  bool dead() const { return broken() || channel_->HungUp(); }

  const std::string& peer() const { return peer_; }
  // Who the peer authenticated as, once known.
  std::string peer_site;
  std::string security() const { return channel_->Describe(); }
  uint64_t bytes_received() const { return bytes_in_.load(); }
  uint64_t bytes_sent() const { return bytes_out_.load(); }

 private:
  absl::Status ReadFull(std::span<std::byte> out,
                        std::optional<Deadline> deadline = std::nullopt);
  absl::StatusOr<Frame> ReceiveFrame(std::optional<Deadline> deadline);
  absl::StatusOr<Message> AsMessage(absl::StatusOr<Frame> f, FrameType type);
  absl::Status Fail(absl::Status s);
  void Keepalive();

  std::unique_ptr<Channel> channel_;
  const ConnectionOptions options_;
  const std::string peer_;
  blockstore::Mutex write_mu_;
  std::atomic<int64_t> last_write_ns_{0};
  std::atomic<bool> broken_{false};
  std::atomic<bool> peer_closed_{false};
  std::atomic<uint64_t> bytes_in_{0}, bytes_out_{0};
  blockstore::Mutex stop_mu_;
  blockstore::CondVar stop_cv_;
  bool stop_ ABSL_GUARDED_BY(stop_mu_) = false;
  std::thread keepalive_;
};

}  // namespace transport

#endif  // TANDEM_TRANSPORT_CONNECTION_H_
