#include "transport/remote_site.h"

#include <atomic>
#include <chrono>
#include <cstring>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "blockstore/util.h"
#include "transport/site_codec.h"

namespace transport {

using blockstore::MutexLock;
using blockstore::SnapshotInfo;

namespace {

constexpr size_t kDataPiece = 1 << 20;
constexpr size_t kMaxIdle = 4;
// Credit-based flow control of a stream: the sender may be at most this
// many bytes ahead of what the receiver has consumed, so what a cut
// connection loses in flight is bounded whatever the TCP buffers hold.
constexpr uint64_t kCreditWindow = 2 << 20;
constexpr auto kCreditTimeout = std::chrono::seconds(120);

// The sender's side of the credits.
class CreditGate {
 public:
  // Takes `n` bytes of credit, waiting for the receiver to grant it.
  absl::Status Take(uint64_t n) {
    MutexLock lock(mu_);
    for (;;) {
      if (failed_) return absl::UnavailableError("the receiver went away");
      if (sent_ + n <= granted_ + kCreditWindow) break;
      const uint64_t before = granted_;
      cv_.wait_for(mu_, kCreditTimeout);
      if (granted_ == before && !failed_ &&
          sent_ + n > granted_ + kCreditWindow) {
        return absl::UnavailableError(
            "the receiver consumed nothing for 120 s");
      }
    }
    sent_ += n;
    return absl::OkStatus();
  }
  void Grant(uint64_t total) {
    MutexLock lock(mu_);
    granted_ = std::max(granted_, total);
    cv_.notify_all();
  }
  void Fail() {
    MutexLock lock(mu_);
    failed_ = true;
    cv_.notify_all();
  }

 private:
  blockstore::Mutex mu_;
  blockstore::CondVar cv_;
  uint64_t sent_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t granted_ ABSL_GUARDED_BY(mu_) = 0;
  bool failed_ ABSL_GUARDED_BY(mu_) = false;
};

// The receiver's side: grants credit as it consumes.
class CreditGrant {
 public:
  explicit CreditGrant(Connection& conn) : conn_(conn) {}
  void Consumed(uint64_t n) {
    consumed_ += n;
    if (consumed_ - granted_ >= kCreditWindow / 2) Send(false);
  }
  void Final() { Send(true); }

 private:
  void Send(bool final) {
    granted_ = consumed_;
    conn_
        .SendMessage(FrameType::kCredit,
                     {{"bytes", consumed_}, {"final", final}})
        .IgnoreError();
  }
  Connection& conn_;
  uint64_t consumed_ = 0, granted_ = 0;
};

// Reads credit grants (and, for a push, the final answer) from `conn`.
void ReadCredits(Connection& conn, CreditGate& gate,
                 absl::StatusOr<Message>* answer) {
  for (;;) {
    absl::StatusOr<Frame> f = conn.Receive();
    if (!f.ok()) {
      if (answer != nullptr) *answer = f.status();
      gate.Fail();
      return;
    }
    if (f->type == FrameType::kCredit) {
      absl::StatusOr<Message> m = DecodeMessage(f->payload);
      if (!m.ok()) break;
      gate.Grant(U64Or(m->json, "bytes", 0));
      if (BoolOr(m->json, "final", false) && answer == nullptr) return;
      continue;
    }
    if (answer != nullptr && f->type == FrameType::kResponse) {
      *answer = DecodeMessage(f->payload);
      gate.Fail();  // no more sending either way
      return;
    }
    break;
  }
  if (answer != nullptr) *answer = absl::DataLossError("unexpected frame");
  gate.Fail();
  conn.Close();
}

// Chunk indices travel as little-endian u64s in a message's attachment.
std::vector<std::byte> EncodeChunks(const std::vector<uint64_t>& chunks) {
  std::vector<std::byte> out(chunks.size() * 8);
  for (size_t i = 0; i < chunks.size(); ++i) {
    blockstore::PutLe64(out.data() + 8 * i, chunks[i]);
  }
  return out;
}

absl::StatusOr<std::vector<uint64_t>> DecodeChunks(
    std::span<const std::byte> blob) {
  if (blob.size() % 8 != 0) {
    return absl::DataLossError("chunk list is not whole u64s");
  }
  std::vector<uint64_t> out(blob.size() / 8);
  for (size_t i = 0; i < out.size(); ++i) {
    out[i] = blockstore::GetLe64(blob.data() + 8 * i);
  }
  return out;
}

double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

}  // namespace

// --- Connections
// ---------------------------------------------------------------

absl::StatusOr<std::unique_ptr<Connection>> ConnectionPool::Get(bool* reused) {
  {
    MutexLock lock(mu_);
    while (!idle_.empty()) {
      std::unique_ptr<Connection> c = std::move(idle_.back());
      idle_.pop_back();
      if (!c->dead()) {
        *reused = true;
        return c;
      }
    }
  }
  *reused = false;
  return Fresh();
}

absl::StatusOr<std::unique_ptr<Connection>> ConnectionPool::Fresh() {
  {
    MutexLock lock(mu_);
    if (Clock::now() < down_until_) return down_why_;
  }
  const auto start = Clock::now();
  absl::StatusOr<std::unique_ptr<Connection>> c = client_.Connect();
  // Only a slow failure (a time-out: the host is there but silent) trips
  // the breaker; a refused connection costs nothing to try again, and the
  // peer may be back any moment.
  if (!c.ok() && absl::IsUnavailable(c.status()) &&
      Clock::now() - start >= std::chrono::milliseconds(500)) {
    std::vector<std::unique_ptr<Connection>> idle;
    MutexLock lock(mu_);
    idle.swap(idle_);
    down_until_ = Clock::now() + std::chrono::seconds(1);
    down_why_ = c.status();
  }
  return c;
}

void ConnectionPool::Failed(const absl::Status&) {
  std::vector<std::unique_ptr<Connection>> idle;
  MutexLock lock(mu_);
  idle.swap(idle_);
}

void ConnectionPool::Put(std::unique_ptr<Connection> conn) {
  if (conn->broken()) return;
  MutexLock lock(mu_);
  if (idle_.size() < kMaxIdle) idle_.push_back(std::move(conn));
}

// --- The client side
// ------------------------------------------------------------

RemoteSite::RemoteSite(ConnectionPool& connections, std::string pool_name)
    : connections_(connections),
      pool_(std::move(pool_name)),
      name_(absl::StrCat(connections.client().peer_site(), "/", pool_)) {}

absl::StatusOr<Message> RemoteSite::Call(nlohmann::json request,
                                         bool idempotent,
                                         std::span<const std::byte> blob) {
  request["pool"] = pool_;
  for (int attempt = 0;; ++attempt) {
    bool reused = false;
    const auto start = Clock::now();
    absl::StatusOr<std::unique_ptr<Connection>> conn =
        connections_.Get(&reused);
    if (!conn.ok()) return conn.status();
    absl::Status sent =
        (*conn)->SendMessage(FrameType::kRequest, request, blob);
    absl::StatusOr<Message> reply =
        sent.ok() ? (*conn)->ReceiveMessage(FrameType::kResponse) : sent;
    if (reply.ok()) {
      connections_.Put(std::move(*conn));
      if (absl::Status s = StatusFrom(reply->json); !s.ok()) return s;
      return reply;
    }
    // A pooled connection the peer dropped (it restarted, say, just
    // now): once more on a fresh one, if the peer cannot have acted on the
    // request (it never got all of it) or asking twice does no harm. The
    // other idle ones likely went with it. (Not after a time-out: the peer
    // may be gone, not just restarted.)
    if (reused && (idempotent || !sent.ok()) && attempt == 0 &&
        Clock::now() - start < std::chrono::seconds(1)) {
      connections_.Failed(reply.status());
      continue;
    }
    connections_.Failed(reply.status());
    return absl::UnavailableError(
        absl::StrCat("site ", name_, ": ", reply.status().message()));
  }
}

absl::StatusOr<engine::SiteInfo> RemoteSite::Info() {
  absl::StatusOr<Message> r = Call({{"method", "info"}}, true);
  if (!r.ok()) return r.status();
  engine::SiteInfo info;
  absl::StatusOr<std::string> guid = GetString(r->json, "pool_guid");
  absl::StatusOr<uint64_t> chunk = GetU64(r->json, "chunk_size_bytes");
  if (!guid.ok() || !chunk.ok()) return absl::DataLossError("bad info reply");
  absl::StatusOr<std::vector<std::byte>> raw = blockstore::Unhex(*guid);
  if (!raw.ok() || raw->size() != 16) {
    return absl::DataLossError("bad pool guid");
  }
  std::memcpy(info.pool_guid.data(), raw->data(), 16);
  info.chunk_size_bytes = static_cast<uint32_t>(*chunk);
  return info;
}

absl::StatusOr<blockstore::VolumeInfo> RemoteSite::GetVolume(
    const std::string& volume) {
  absl::StatusOr<Message> r =
      Call({{"method", "get_volume"}, {"volume", volume}}, true);
  if (!r.ok()) return r.status();
  return VolumeFrom(r->json.value("volume", nlohmann::json()));
}

absl::StatusOr<std::vector<SnapshotInfo>> RemoteSite::ListSnapshots(
    const std::string& volume) {
  absl::StatusOr<Message> r =
      Call({{"method", "list_snapshots"}, {"volume", volume}}, true);
  if (!r.ok()) return r.status();
  auto it = r->json.find("snapshots");
  if (it == r->json.end() || !it->is_array()) {
    return absl::DataLossError("bad snapshot list");
  }
  std::vector<SnapshotInfo> out;
  for (const auto& j : *it) {
    absl::StatusOr<SnapshotInfo> s = SnapshotFrom(j);
    if (!s.ok()) return s.status();
    out.push_back(std::move(*s));
  }
  return out;
}

absl::StatusOr<SnapshotInfo> RemoteSite::CreateSnapshot(
    const std::string& volume, const std::string& name,
    const std::string& owner) {
  absl::StatusOr<Message> r = Call({{"method", "create_snapshot"},
                                    {"volume", volume},
                                    {"name", name},
                                    {"owner", owner}},
                                   false);
  if (!r.ok()) return r.status();
  return SnapshotFrom(r->json.value("snapshot", nlohmann::json()));
}

absl::Status RemoteSite::DeleteSnapshots(
    const std::string& volume, const std::vector<std::string>& names) {
  return Call({{"method", "delete_snapshots"},
               {"volume", volume},
               {"names", names}},
              false)
      .status();
}

absl::Status RemoteSite::SetReadOnly(const std::string& volume,
                                     bool read_only) {
  return Call({{"method", "set_read_only"},
               {"volume", volume},
               {"read_only", read_only}},
              true)
      .status();
}

absl::StatusOr<bool> RemoteSite::ChangedSince(const std::string& volume,
                                              const std::string& snapshot) {
  absl::StatusOr<Message> r = Call(
      {{"method", "changed_since"}, {"volume", volume}, {"snapshot", snapshot}},
      true);
  if (!r.ok()) return r.status();
  return GetBool(r->json, "changed");
}

absl::StatusOr<engine::ChangeCount> RemoteSite::CountChanges(
    const std::string& volume, const std::string& base,
    const std::string& target) {
  absl::StatusOr<Message> r = Call({{"method", "count_changes"},
                                    {"volume", volume},
                                    {"base", base},
                                    {"target", target}},
                                   true);
  if (!r.ok()) return r.status();
  absl::StatusOr<uint64_t> data = GetU64(r->json, "data_chunks");
  absl::StatusOr<uint64_t> all = GetU64(r->json, "all_chunks");
  if (!data.ok() || !all.ok()) return absl::DataLossError("bad change count");
  return engine::ChangeCount{*data, *all};
}

absl::StatusOr<std::vector<engine::Sha256>> RemoteSite::ChunkDigests(
    const std::string& volume, const std::string& snapshot,
    uint64_t first_chunk, uint64_t count) {
  absl::StatusOr<Message> r = Call({{"method", "chunk_digests"},
                                    {"volume", volume},
                                    {"snapshot", snapshot},
                                    {"first", first_chunk},
                                    {"count", count}},
                                   true);
  if (!r.ok()) return r.status();
  if (r->blob.size() != count * sizeof(engine::Sha256)) {
    return absl::DataLossError(absl::StrCat("site ", name_, " sent ",
                                            r->blob.size(),
                                            " bytes of digests for ", count));
  }
  std::vector<engine::Sha256> out(count);
  std::memcpy(out.data(), r->blob.data(), r->blob.size());
  return out;
}

absl::StatusOr<std::map<std::string, std::string>> RemoteSite::Records() {
  absl::StatusOr<Message> r = Call({{"method", "records"}}, true);
  if (!r.ok()) return r.status();
  auto it = r->json.find("records");
  if (it == r->json.end() || !it->is_object()) {
    return absl::DataLossError("bad records reply");
  }
  std::map<std::string, std::string> out;
  for (auto& [k, v] : it->items()) {
    if (!v.is_string()) return absl::DataLossError("bad record");
    out[k] = v.get<std::string>();
  }
  return out;
}

absl::Status RemoteSite::SaveRecord(const std::string& volume,
                                    const std::string& text,
                                    const std::optional<engine::Prune>& prune) {
  nlohmann::json req = {
      {"method", "save_record"}, {"volume", volume}, {"text", text}};
  if (prune) {
    req["prune"] = {{"owner", prune->owner},
                    {"keep_from", blockstore::Hex(prune->keep_from)}};
  }
  return Call(std::move(req), true).status();
}

absl::StatusOr<std::optional<engine::ResumeToken>> RemoteSite::ResumePoint(
    const std::string& volume) {
  absl::StatusOr<Message> r =
      Call({{"method", "resume_point"}, {"volume", volume}}, true);
  if (!r.ok()) return r.status();
  auto it = r->json.find("resume");
  if (it == r->json.end() || it->is_null()) return std::nullopt;
  absl::StatusOr<engine::ResumeToken> t = TokenFrom(*it);
  if (!t.ok()) return t.status();
  return *t;
}

absl::Status RemoteSite::DropReceive(const std::string& volume) {
  return Call({{"method", "drop_receive"}, {"volume", volume}}, true).status();
}

absl::StatusOr<std::optional<engine::Activity>> RemoteSite::Running(
    const std::string& id) {
  absl::StatusOr<Message> r = Call({{"method", "running"}, {"id", id}}, true);
  if (!r.ok()) return r.status();
  auto it = r->json.find("activity");
  if (it == r->json.end() || it->is_null()) return std::nullopt;
  absl::StatusOr<engine::Activity> a = ActivityFrom(*it);
  if (!a.ok()) return a.status();
  return *a;
}

absl::StatusOr<engine::SendStats> RemoteSite::Send(
    const engine::SendRequest& request, engine::ByteSink& out) {
  absl::StatusOr<std::unique_ptr<Connection>> conn = connections_.Fresh();
  if (!conn.ok()) return conn.status();
  nlohmann::json req = {{"method", "send"},
                        {"pool", pool_},
                        {"volume", request.volume},
                        {"base", request.base},
                        {"target", request.target}};
  if (request.onto) req["onto"] = ToJson(*request.onto);
  if (request.resume) req["resume"] = ToJson(*request.resume);
  if (absl::Status s = (*conn)->SendMessage(FrameType::kRequest, req,
                                            EncodeChunks(request.chunks));
      !s.ok()) {
    return s;
  }
  CreditGrant credit(**conn);
  for (;;) {
    absl::StatusOr<Frame> f = (*conn)->Receive();
    if (!f.ok()) {
      connections_.Failed(f.status());
      return f.status();
    }
    if (f->type == FrameType::kData) {
      if (absl::Status s = out.Write(f->payload); !s.ok()) {
        (*conn)->Close();  // the receiver gave up: stop the sender
        return s;
      }
      credit.Consumed(f->payload.size());
      continue;
    }
    if (f->type == FrameType::kEnd) credit.Final();
    if (f->type != FrameType::kEnd && f->type != FrameType::kResponse) {
      (*conn)->Close();
      return absl::DataLossError("unexpected frame in a delta stream");
    }
    absl::StatusOr<Message> m = DecodeMessage(f->payload);
    if (!m.ok()) return m.status();
    if (absl::Status s = StatusFrom(m->json); !s.ok()) return s;
    absl::StatusOr<engine::SendStats> stats =
        SendStatsFrom(m->json.value("stats", nlohmann::json()));
    if (stats.ok()) connections_.Put(std::move(*conn));
    return stats;
  }
}

absl::StatusOr<engine::ApplyStats> RemoteSite::Receive(
    const engine::ReceiveRequest& request, engine::ByteSource& in) {
  absl::StatusOr<std::unique_ptr<Connection>> made = connections_.Fresh();
  if (!made.ok()) return made.status();
  Connection& conn = **made;
  nlohmann::json req = {{"method", "receive"},
                        {"pool", pool_},
                        {"volume", request.volume},
                        {"rollback", request.rollback},
                        {"target_owner", request.target_owner},
                        {"rollback_advice", request.rollback_advice}};
  if (request.resume) req["resume"] = ToJson(*request.resume);
  if (absl::Status s = conn.SendMessage(FrameType::kRequest, req); !s.ok()) {
    return s;
  }
  absl::StatusOr<Message> ready = conn.ReceiveMessage(FrameType::kResponse);
  if (!ready.ok()) return ready.status();
  if (absl::Status s = StatusFrom(ready->json); !s.ok()) return s;
  // The receiver may refuse the stream part way (its base moved, say): its
  // answer is read while we send, and cuts the sending short.
  absl::StatusOr<Message> answer = absl::UnavailableError("no answer");
  CreditGate gate;
  std::thread reader([&] {
    ReadCredits(conn, gate, &answer);
    if (!answer.ok() || !StatusFrom(answer->json).ok()) conn.Close();
  });
  std::vector<std::byte> buf(kDataPiece);
  absl::Status sending;
  for (;;) {
    absl::StatusOr<size_t> n = in.Read(buf);
    if (!n.ok()) {
      // Our sender failed: tell the receiver why, so its apply stops.
      conn.SendMessage(FrameType::kEnd, StatusJson(n.status())).IgnoreError();
      sending = n.status();
      break;
    }
    if (*n == 0) {
      sending = conn.SendMessage(FrameType::kEnd, StatusJson(absl::OkStatus()));
      break;
    }
    sending = gate.Take(*n);
    if (sending.ok()) {
      sending = conn.Send(FrameType::kData, std::span(buf).first(*n));
    }
    if (!sending.ok()) break;
  }
  reader.join();
  if (conn.broken() && !answer.ok()) connections_.Failed(answer.status());
  if (answer.ok()) {
    if (absl::Status s = StatusFrom(answer->json); !s.ok()) return s;
    absl::StatusOr<engine::ApplyStats> stats =
        ApplyStatsFrom(answer->json.value("stats", nlohmann::json()));
    if (stats.ok() && sending.ok()) connections_.Put(std::move(*made));
    return stats;
  }
  return sending.ok() ? answer.status() : sending;
}

namespace {

// A claim held at a peer: alive as long as its connection is.
class RemoteClaim final : public engine::Claim {
 public:
  RemoteClaim(ConnectionPool& pool, nlohmann::json request,
              std::unique_ptr<Connection> conn)
      : pool_(pool), request_(std::move(request)), conn_(std::move(conn)) {}
  // Lets go at the peer and waits for it to, so that what is said about
  // the relationship right after (status) no longer shows it running.
  ~RemoteClaim() override {
    MutexLock lock(mu_);
    if (!conn_) return;
    // Briefly: a peer that does not answer lets go when the connection
    // closes anyway.
    if (!conn_->broken() &&
        conn_->SendMessage(FrameType::kRequest, {{"method", "release"}}).ok()) {
      conn_
          ->ReceiveMessageBefore(FrameType::kResponse,
                                 After(std::chrono::seconds(2)))
          .IgnoreError();
    }
    conn_->Close();
  }

  void Progress(uint64_t done, uint64_t total) override {
    MutexLock lock(mu_);
    auto now = Clock::now();
    if (!conn_ ||
        (now - last_ < std::chrono::milliseconds(250) && done < total)) {
      return;
    }
    last_ = now;
    conn_->SendMessage(FrameType::kProgress, {{"done", done}, {"total", total}})
        .IgnoreError();
  }

  absl::Status Renew() override {
    MutexLock lock(mu_);
    if (conn_ && !conn_->broken()) return absl::OkStatus();
    absl::StatusOr<std::unique_ptr<Connection>> c = Take(pool_, request_);
    if (!c.ok()) return c.status();
    conn_ = std::move(*c);
    return absl::OkStatus();
  }

  static absl::StatusOr<std::unique_ptr<Connection>> Take(
      ConnectionPool& pool, const nlohmann::json& request) {
    absl::StatusOr<std::unique_ptr<Connection>> conn = pool.Fresh();
    if (!conn.ok()) return conn.status();
    if (absl::Status s = (*conn)->SendMessage(FrameType::kRequest, request);
        !s.ok()) {
      return s;
    }
    absl::StatusOr<Message> r = (*conn)->ReceiveMessage(FrameType::kResponse);
    if (!r.ok()) return r.status();
    if (absl::Status s = StatusFrom(r->json); !s.ok()) return s;
    return conn;
  }

 private:
  ConnectionPool& pool_;
  const nlohmann::json request_;
  blockstore::Mutex mu_;
  std::unique_ptr<Connection> conn_ ABSL_GUARDED_BY(mu_);
  Clock::time_point last_ ABSL_GUARDED_BY(mu_);
};

}  // namespace

absl::StatusOr<std::unique_ptr<engine::Claim>> RemoteSite::TakeClaim(
    const std::string& id, const engine::Activity& what) {
  nlohmann::json req = {{"method", "claim"},
                        {"pool", pool_},
                        {"id", id},
                        {"activity", ToJson(what)}};
  absl::StatusOr<std::unique_ptr<Connection>> conn =
      RemoteClaim::Take(connections_, req);
  if (!conn.ok()) return conn.status();
  return std::make_unique<RemoteClaim>(connections_, std::move(req),
                                       std::move(*conn));
}

// --- The server side
// ---------------------------------------------------------------

namespace {

// Stream bytes out as DATA frames, as the receiver's credit allows.
class FrameSink final : public engine::ByteSink {
 public:
  FrameSink(Connection& conn, CreditGate& gate) : conn_(conn), gate_(gate) {}
  absl::Status Write(std::span<const std::byte> data) override {
    while (!data.empty()) {
      size_t n = std::min(data.size(), kDataPiece);
      if (absl::Status s = gate_.Take(n); !s.ok()) return s;
      if (absl::Status s = conn_.Send(FrameType::kData, data.first(n));
          !s.ok()) {
        return s;
      }
      data = data.subspan(n);
    }
    return absl::OkStatus();
  }

 private:
  Connection& conn_;
  CreditGate& gate_;
};

// Stream bytes in from DATA frames, to an END, granting credit as they
// are consumed.
class FrameSource final : public engine::ByteSource {
 public:
  explicit FrameSource(Connection& conn) : conn_(conn), credit_(conn) {}
  absl::StatusOr<size_t> Read(std::span<std::byte> out) override {
    while (at_ == frame_.payload.size()) {
      if (ended_) return size_t{0};
      absl::StatusOr<Frame> f = conn_.Receive();
      if (!f.ok()) return f.status();
      if (f->type == FrameType::kEnd) {
        ended_ = true;
        absl::StatusOr<Message> m = DecodeMessage(f->payload);
        if (!m.ok()) return m.status();
        absl::Status s = StatusFrom(m->json);
        if (!s.ok()) {
          return absl::Status(s.code(),
                              absl::StrCat("the sender failed: ", s.message()));
        }
        return size_t{0};
      }
      if (f->type != FrameType::kData) {
        return absl::DataLossError("unexpected frame in a delta stream");
      }
      frame_ = std::move(*f);
      at_ = 0;
    }
    size_t n = std::min(out.size(), frame_.payload.size() - at_);
    std::memcpy(out.data(), frame_.payload.data() + at_, n);
    at_ += n;
    credit_.Consumed(n);
    return n;
  }
  bool ended() const { return ended_; }

 private:
  Connection& conn_;
  CreditGrant credit_;
  Frame frame_;
  size_t at_ = 0;
  bool ended_ = false;
};

absl::StatusOr<std::string> Str(const nlohmann::json& j, const char* key) {
  return GetString(j, key);
}

// Handles one request; false when the connection is no longer in step (a
// stream cut short) or was handed to a claim.
bool Handle(Connection& conn, engine::LocalSite& site, const Message& m,
            const std::string& method, const Logger& log) {
  const nlohmann::json& j = m.json;
  auto reply = [&](absl::Status s,
                   nlohmann::json extra = nlohmann::json::object(),
                   std::span<const std::byte> blob = {}) {
    nlohmann::json r = StatusJson(s);
    if (s.ok()) r.update(extra);
    return conn.SendMessage(FrameType::kResponse, r, blob).ok();
  };
  absl::StatusOr<std::string> volume = Str(j, "volume");
  auto need_volume = [&] {
    return volume.ok() ? absl::OkStatus() : volume.status();
  };
  if (method == "info") {
    absl::StatusOr<engine::SiteInfo> i = site.Info();
    if (!i.ok()) return reply(i.status());
    return reply(absl::OkStatus(),
                 {{"pool_guid", blockstore::Hex(i->pool_guid)},
                  {"chunk_size_bytes", i->chunk_size_bytes}});
  }
  if (method == "records") {
    absl::StatusOr<std::map<std::string, std::string>> r = site.Records();
    if (!r.ok()) return reply(r.status());
    return reply(absl::OkStatus(), {{"records", *r}});
  }
  if (method == "running") {
    absl::StatusOr<std::string> id = Str(j, "id");
    if (!id.ok()) return reply(id.status());
    absl::StatusOr<std::optional<engine::Activity>> a = site.Running(*id);
    if (!a.ok()) return reply(a.status());
    return reply(absl::OkStatus(),
                 {{"activity", *a ? ToJson(**a) : nlohmann::json(nullptr)}});
  }
  if (method == "claim") {
    absl::StatusOr<std::string> id = Str(j, "id");
    auto a = j.find("activity");
    absl::StatusOr<engine::Activity> what =
        a != j.end()
            ? ActivityFrom(*a)
            : absl::StatusOr<engine::Activity>(absl::DataLossError("activity"));
    if (!id.ok() || !what.ok())
      return reply(absl::DataLossError("id/activity"));
    absl::StatusOr<std::unique_ptr<engine::Claim>> claim =
        site.TakeClaim(*id, *what);
    if (!claim.ok()) return reply(claim.status());
    if (!reply(absl::OkStatus())) return false;
    // Held until the driver lets go (or its connection dies).
    for (;;) {
      absl::StatusOr<Frame> f = conn.Receive();
      if (!f.ok()) return false;
      if (f->type == FrameType::kRequest) {
        claim->reset();
        reply(absl::OkStatus());
        return false;
      }
      if (f->type != FrameType::kProgress) return false;
      absl::StatusOr<Message> p = DecodeMessage(f->payload);
      if (!p.ok()) return false;
      (*claim)->Progress(U64Or(p->json, "done", 0), U64Or(p->json, "total", 0));
    }
  }
  if (absl::Status s = need_volume(); !s.ok()) return reply(s);
  if (method == "get_volume") {
    absl::StatusOr<blockstore::VolumeInfo> v = site.GetVolume(*volume);
    if (!v.ok()) return reply(v.status());
    return reply(absl::OkStatus(), {{"volume", ToJson(*v)}});
  }
  if (method == "list_snapshots") {
    absl::StatusOr<std::vector<SnapshotInfo>> snaps =
        site.ListSnapshots(*volume);
    if (!snaps.ok()) return reply(snaps.status());
    nlohmann::json list = nlohmann::json::array();
    for (const SnapshotInfo& s : *snaps) list.push_back(ToJson(s));
    return reply(absl::OkStatus(), {{"snapshots", list}});
  }
  if (method == "create_snapshot") {
    absl::StatusOr<std::string> name = Str(j, "name");
    absl::StatusOr<std::string> owner = Str(j, "owner");
    if (!name.ok() || !owner.ok())
      return reply(name.ok() ? owner.status() : name.status());
    absl::StatusOr<SnapshotInfo> s =
        site.CreateSnapshot(*volume, *name, *owner);
    if (!s.ok()) return reply(s.status());
    return reply(absl::OkStatus(), {{"snapshot", ToJson(*s)}});
  }
  if (method == "delete_snapshots") {
    auto it = j.find("names");
    if (it == j.end() || !it->is_array()) {
      return reply(absl::DataLossError("names missing"));
    }
    std::vector<std::string> names;
    for (const auto& n : *it) {
      if (!n.is_string()) return reply(absl::DataLossError("bad name"));
      names.push_back(n.get<std::string>());
    }
    return reply(site.DeleteSnapshots(*volume, names));
  }
  if (method == "set_read_only") {
    absl::StatusOr<bool> ro = GetBool(j, "read_only");
    if (!ro.ok()) return reply(ro.status());
    return reply(site.SetReadOnly(*volume, *ro));
  }
  if (method == "changed_since") {
    absl::StatusOr<std::string> snap = Str(j, "snapshot");
    if (!snap.ok()) return reply(snap.status());
    absl::StatusOr<bool> c = site.ChangedSince(*volume, *snap);
    if (!c.ok()) return reply(c.status());
    return reply(absl::OkStatus(), {{"changed", *c}});
  }
  if (method == "count_changes") {
    absl::StatusOr<std::string> base = Str(j, "base");
    absl::StatusOr<std::string> target = Str(j, "target");
    if (!base.ok() || !target.ok())
      return reply(absl::DataLossError("base/target"));
    absl::StatusOr<engine::ChangeCount> c =
        site.CountChanges(*volume, *base, *target);
    if (!c.ok()) return reply(c.status());
    return reply(absl::OkStatus(), {{"data_chunks", c->data_chunks},
                                    {"all_chunks", c->all_chunks}});
  }
  if (method == "chunk_digests") {
    absl::StatusOr<std::string> snap = Str(j, "snapshot");
    absl::StatusOr<uint64_t> first = GetU64(j, "first");
    absl::StatusOr<uint64_t> count = GetU64(j, "count");
    if (!snap.ok() || !first.ok() || !count.ok()) {
      return reply(absl::DataLossError("snapshot/first/count"));
    }
    absl::StatusOr<std::vector<engine::Sha256>> d =
        site.ChunkDigests(*volume, *snap, *first, *count);
    if (!d.ok()) return reply(d.status());
    return reply(absl::OkStatus(), nlohmann::json::object(),
                 {reinterpret_cast<const std::byte*>(d->data()),
                  d->size() * sizeof(engine::Sha256)});
  }
  if (method == "save_record") {
    absl::StatusOr<std::string> text = Str(j, "text");
    if (!text.ok()) return reply(text.status());
    std::optional<engine::Prune> prune;
    if (auto p = j.find("prune"); p != j.end() && p->is_object()) {
      absl::StatusOr<std::string> owner = Str(*p, "owner");
      absl::StatusOr<std::string> keep = Str(*p, "keep_from");
      absl::StatusOr<std::vector<std::byte>> raw =
          keep.ok() ? blockstore::Unhex(*keep)
                    : absl::StatusOr<std::vector<std::byte>>(keep.status());
      if (!owner.ok() || !raw.ok() || raw->size() != 16) {
        return reply(absl::DataLossError("bad prune"));
      }
      prune.emplace();
      prune->owner = *owner;
      std::memcpy(prune->keep_from.data(), raw->data(), 16);
    }
    return reply(site.SaveRecord(*volume, *text, prune));
  }
  if (method == "resume_point") {
    absl::StatusOr<std::optional<engine::ResumeToken>> t =
        site.ResumePoint(*volume);
    if (!t.ok()) return reply(t.status());
    return reply(absl::OkStatus(),
                 {{"resume", *t ? ToJson(**t) : nlohmann::json(nullptr)}});
  }
  if (method == "drop_receive") return reply(site.DropReceive(*volume));
  if (method == "send") {
    engine::SendRequest r;
    r.volume = *volume;
    absl::StatusOr<std::string> base = Str(j, "base");
    absl::StatusOr<std::string> target = Str(j, "target");
    if (!base.ok() || !target.ok()) {
      return conn
          .SendMessage(FrameType::kEnd,
                       StatusJson(absl::DataLossError("base/target")))
          .ok();
    }
    r.base = *base;
    r.target = *target;
    absl::Status bad;
    if (auto o = j.find("onto"); o != j.end()) {
      absl::StatusOr<SnapshotInfo> onto = SnapshotFrom(*o);
      if (onto.ok()) r.onto = *onto;
      bad = onto.status();
    }
    if (auto t = j.find("resume"); bad.ok() && t != j.end()) {
      absl::StatusOr<engine::ResumeToken> token = TokenFrom(*t);
      if (token.ok()) r.resume = *token;
      bad = token.status();
    }
    absl::StatusOr<std::vector<uint64_t>> chunks = DecodeChunks(m.blob);
    if (bad.ok() && !chunks.ok()) bad = chunks.status();
    if (!bad.ok()) {
      return conn.SendMessage(FrameType::kEnd, StatusJson(bad)).ok();
    }
    r.chunks = std::move(*chunks);
    auto start = Clock::now();
    CreditGate gate;
    std::thread credits([&] { ReadCredits(conn, gate, nullptr); });
    FrameSink sink(conn, gate);
    absl::StatusOr<engine::SendStats> stats = site.Send(r, sink);
    auto finish = [&](const nlohmann::json& end) {
      bool sent = conn.SendMessage(FrameType::kEnd, end).ok();
      if (!sent) conn.Close();
      credits.join();  // to the receiver's final credit (or its going away)
      return sent && !conn.broken();
    };
    log(absl::StrCat("served send ", site.name(), ":", r.volume, "@", r.target,
                     " to site ", conn.peer_site, ": ",
                     stats.ok() ? "ok" : std::string(stats.status().message()),
                     ", ", stats.ok() ? stats->stream_bytes : 0, " bytes, ",
                     absl::StrFormat("%.2f", SecondsSince(start)), " s"));
    if (!stats.ok()) return finish(StatusJson(stats.status()));
    return finish({{"ok", true}, {"stats", ToJson(*stats)}});
  }
  if (method == "receive") {
    engine::ReceiveRequest r;
    r.volume = *volume;
    absl::StatusOr<bool> rollback = GetBool(j, "rollback");
    absl::StatusOr<std::string> owner = Str(j, "target_owner");
    absl::StatusOr<std::string> advice = Str(j, "rollback_advice");
    if (!rollback.ok() || !owner.ok() || !advice.ok()) {
      return reply(absl::DataLossError("rollback/target_owner/advice"));
    }
    r.rollback = *rollback;
    r.target_owner = *owner;
    r.rollback_advice = *advice;
    if (auto t = j.find("resume"); t != j.end()) {
      absl::StatusOr<engine::ResumeToken> token = TokenFrom(*t);
      if (!token.ok()) return reply(token.status());
      r.resume = *token;
    }
    if (!reply(absl::OkStatus())) return false;
    auto start = Clock::now();
    FrameSource source(conn);
    absl::StatusOr<engine::ApplyStats> stats = site.Receive(r, source);
    log(absl::StrCat("served receive ", site.name(), ":", r.volume,
                     " from site ", conn.peer_site, ": ",
                     stats.ok() ? "ok" : std::string(stats.status().message()),
                     ", ", conn.bytes_received(), " bytes, ",
                     absl::StrFormat("%.2f", SecondsSince(start)), " s"));
    bool in_step = source.ended() && !conn.broken();
    if (!stats.ok()) {
      reply(stats.status());
      return in_step;
    }
    return reply(absl::OkStatus(), {{"stats", ToJson(*stats)}}) && in_step;
  }
  return reply(absl::InvalidArgumentError(
      absl::StrCat("unknown method '", method, "'")));
}

}  // namespace

void ServeSites(Connection& conn, const PoolLookup& pools, const Logger& log) {
  for (;;) {
    absl::StatusOr<Message> m = conn.ReceiveMessage(FrameType::kRequest);
    if (!m.ok()) {
      // A peer that broke the protocol (or went silent) is worth a line.
      if (!conn.peer_closed()) {
        log(absl::StrCat("peer site ", conn.peer_site, " (", conn.peer(),
                         "): dropped: ", m.status().message()));
      }
      return;
    }
    absl::StatusOr<std::string> method = GetString(m->json, "method");
    absl::StatusOr<std::string> pool = GetString(m->json, "pool");
    absl::StatusOr<engine::LocalSite*> site =
        pool.ok() ? pools(*pool)
                  : absl::StatusOr<engine::LocalSite*>(pool.status());
    if (!method.ok() || !site.ok()) {
      absl::Status why = !method.ok() ? method.status() : site.status();
      const bool stream = method.ok() && *method == "send";
      if (!conn.SendMessage(stream ? FrameType::kEnd : FrameType::kResponse,
                            StatusJson(why))
               .ok()) {
        return;
      }
      continue;
    }
    if (!Handle(conn, **site, *m, *method, log)) return;
  }
}

}  // namespace transport
