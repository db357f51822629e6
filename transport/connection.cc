#include "transport/connection.h"

#include <array>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "blockstore/util.h"

namespace transport {

using blockstore::MutexLock;
using json = nlohmann::json;

namespace {

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             Clock::now().time_since_epoch())
      .count();
}

}  // namespace

absl::StatusOr<Message> DecodeMessage(std::span<const std::byte> payload) {
  if (payload.size() < 4) {
    return absl::DataLossError("message shorter than its length field");
  }
  uint32_t n = blockstore::GetLe32(payload.data());
  if (n > kMaxMessageJson || n > payload.size() - 4) {
    return absl::DataLossError(absl::StrCat(
        "message JSON of ", n, " bytes in a frame of ", payload.size()));
  }
  Message m;
  m.json = json::parse(reinterpret_cast<const char*>(payload.data()) + 4,
                       reinterpret_cast<const char*>(payload.data()) + 4 + n,
                       nullptr, /*allow_exceptions=*/false);
  if (m.json.is_discarded() || !m.json.is_object()) {
    return absl::DataLossError("message is not a JSON object");
  }
  m.blob.assign(payload.begin() + 4 + n, payload.end());
  return m;
}

std::vector<std::byte> EncodeMessage(const json& j,
                                     std::span<const std::byte> blob) {
  std::string text = j.dump();
  std::vector<std::byte> out(4 + text.size() + blob.size());
  blockstore::PutLe32(out.data(), static_cast<uint32_t>(text.size()));
  std::memcpy(out.data() + 4, text.data(), text.size());
  if (!blob.empty()) {
    std::memcpy(out.data() + 4 + text.size(), blob.data(), blob.size());
  }
  return out;
}

absl::StatusOr<std::pair<FrameType, uint32_t>> DecodeFrameHeader(
    std::span<const std::byte, kFrameHeaderBytes> h) {
  uint32_t length = blockstore::GetLe32(h.data());
  uint8_t type = static_cast<uint8_t>(h[4]);
  if (type < 1 || type > 8) {
    return absl::DataLossError(absl::StrCat("unknown frame type ", type));
  }
  if (h[5] != std::byte{0} || h[6] != std::byte{0} || h[7] != std::byte{0}) {
    return absl::DataLossError("frame reserved bytes are not zero");
  }
  if (length > kMaxFramePayload) {
    return absl::DataLossError(absl::StrCat(
        "frame of ", length, " bytes is over the limit of ", kMaxFramePayload));
  }
  return std::pair{static_cast<FrameType>(type), length};
}

Connection::Connection(std::unique_ptr<Channel> channel,
                       ConnectionOptions options, std::string peer)
    : channel_(std::move(channel)), options_(options), peer_(std::move(peer)) {
  last_write_ns_ = NowNs();
}

Connection::~Connection() {
  {
    MutexLock lock(stop_mu_);
    stop_ = true;
  }
  stop_cv_.notify_all();
  if (keepalive_.joinable()) keepalive_.join();
}

void Connection::StartKeepalive() {
  keepalive_ = std::thread([this] { Keepalive(); });
}

void Connection::Keepalive() {
  const auto quiet_limit = std::chrono::nanoseconds(options_.keepalive).count();
  for (;;) {
    {
      MutexLock lock(stop_mu_);
      stop_cv_.wait_for(stop_mu_, options_.keepalive / 3,
                        [this]()
                            ABSL_NO_THREAD_SAFETY_ANALYSIS { return stop_; });
      if (stop_) return;
    }
    if (broken_) continue;
    if (NowNs() - last_write_ns_.load() >= quiet_limit) {
      Send(FrameType::kPing, {}).IgnoreError();
    }
  }
}

absl::Status Connection::Fail(absl::Status s) {
  broken_ = true;
  channel_->Shutdown();
  return absl::UnavailableError(
      absl::StrCat("connection to ", peer_site.empty() ? peer_ : peer_site,
                   " lost: ", s.message()));
}

absl::Status Connection::Send(FrameType type,
                              std::span<const std::byte> payload) {
  if (payload.size() > kMaxFramePayload) {
    return absl::InvalidArgumentError("frame over the limit");
  }
  std::array<std::byte, kFrameHeaderBytes> h{};
  blockstore::PutLe32(h.data(), static_cast<uint32_t>(payload.size()));
  h[4] = static_cast<std::byte>(type);
  MutexLock lock(write_mu_);
  if (broken_) return absl::UnavailableError("connection already broken");
  // A peer that does not read for the whole time-out is gone.
  Deadline deadline = After(options_.timeout);
  const std::span<const std::byte> frame[] = {h, payload};
  absl::Status s = channel_->Write(frame, deadline);
  if (!s.ok()) {
    if (absl::IsDeadlineExceeded(s)) {
      s = absl::DeadlineExceededError(absl::StrCat(
          "the peer read nothing for ", options_.timeout.count() / 1000, " s"));
    }
    return Fail(s);
  }
  last_write_ns_ = NowNs();
  bytes_out_ += kFrameHeaderBytes + payload.size();
  return absl::OkStatus();
}

absl::Status Connection::SendMessage(FrameType type, const json& j,
                                     std::span<const std::byte> blob) {
  return Send(type, EncodeMessage(j, blob));
}

absl::Status Connection::ReadFull(std::span<std::byte> out,
                                  std::optional<Deadline> deadline) {
  while (!out.empty()) {
    absl::StatusOr<size_t> n =
        channel_->ReadSome(out, deadline ? *deadline : After(options_.timeout));
    if (!n.ok()) {
      if (absl::IsDeadlineExceeded(n.status())) {
        return Fail(absl::DeadlineExceededError(
            absl::StrCat("the peer was silent for ",
                         options_.timeout.count() / 1000, " s")));
      }
      return Fail(n.status());
    }
    if (*n == 0) {
      peer_closed_ = true;
      return Fail(absl::UnavailableError("closed by the peer"));
    }
    bytes_in_ += *n;
    out = out.subspan(*n);
  }
  return absl::OkStatus();
}

absl::StatusOr<Frame> Connection::Receive() { return ReceiveFrame({}); }

absl::StatusOr<Frame> Connection::ReceiveFrame(
    std::optional<Deadline> deadline) {
  for (;;) {
    if (broken_) return absl::UnavailableError("connection broken");
    std::array<std::byte, kFrameHeaderBytes> h;
    if (absl::Status s = ReadFull(h, deadline); !s.ok()) return s;
    absl::StatusOr<std::pair<FrameType, uint32_t>> hdr = DecodeFrameHeader(h);
    if (!hdr.ok()) return Fail(hdr.status());
    Frame f;
    f.type = hdr->first;
    f.payload.resize(hdr->second);
    if (absl::Status s = ReadFull(f.payload, deadline); !s.ok()) return s;
    if (f.type == FrameType::kPing) continue;
    return f;
  }
}

absl::StatusOr<Message> Connection::ReceiveMessage(FrameType type) {
  return AsMessage(Receive(), type);
}

absl::StatusOr<Message> Connection::ReceiveMessageBefore(FrameType type,
                                                         Deadline deadline) {
  return AsMessage(ReceiveFrame(deadline), type);
}

absl::StatusOr<Message> Connection::AsMessage(absl::StatusOr<Frame> f,
                                              FrameType type) {
  if (!f.ok()) return f.status();
  if (f->type != type) {
    return Fail(absl::DataLossError(
        absl::StrCat("expected a frame of type ", static_cast<int>(type),
                     ", got ", static_cast<int>(f->type))));
  }
  absl::StatusOr<Message> m = DecodeMessage(f->payload);
  if (!m.ok()) return Fail(m.status());
  return m;
}

void Connection::Close() {
  broken_ = true;
  channel_->Shutdown();
}

}  // namespace transport
