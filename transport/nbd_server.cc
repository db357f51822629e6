#include "transport/nbd_server.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/time.h>

#include <array>
#include <cerrno>
#include <cstring>
#include <deque>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "blockstore/util.h"

namespace transport {
namespace {

using blockstore::AlignedBuffer;
using blockstore::CondVar;
using blockstore::Mutex;
using blockstore::MutexLock;
using Log = std::function<void(const std::string&)>;

std::span<const std::byte> Bytes(const std::string& s) {
  return std::as_bytes(std::span(s));
}

// The NBD error for a failed call on an export.
uint32_t ErrorOf(const absl::Status& s) {
  switch (s.code()) {
    case absl::StatusCode::kFailedPrecondition:
    case absl::StatusCode::kPermissionDenied:
      return nbd::kEperm;
    case absl::StatusCode::kResourceExhausted:
      return nbd::kEnospc;
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kOutOfRange:
      return nbd::kEinval;
    case absl::StatusCode::kUnavailable:
    case absl::StatusCode::kCancelled:
      return nbd::kEshutdown;
    default:
      return nbd::kEio;
  }
}

// The handshake: options until the client picks an export (or leaves).
class Handshake {
 public:
  Handshake(NbdStream& stream, NbdExports& exports,
            const NbdSessionOptions& options)
      : stream_(stream), exports_(exports), options_(options) {}

  // The export chosen, or nullptr if the client aborted; an error if the
  // connection ended or broke the protocol.
  absl::StatusOr<std::shared_ptr<NbdExport>> Run() {
    std::string out;
    nbd::PutServerGreeting(out);
    if (absl::Status s = stream_.WriteAll(Bytes(out)); !s.ok()) return s;
    std::byte flags_raw[4];
    if (absl::Status s = stream_.ReadFull(flags_raw); !s.ok()) return s;
    const uint32_t flags = (static_cast<uint32_t>(flags_raw[0]) << 24) |
                           (static_cast<uint32_t>(flags_raw[1]) << 16) |
                           (static_cast<uint32_t>(flags_raw[2]) << 8) |
                           static_cast<uint32_t>(flags_raw[3]);
    if ((flags & ~uint32_t{nbd::kFlagFixedNewstyle | nbd::kFlagNoZeroes}) !=
        0) {
      return absl::InvalidArgumentError(
          absl::StrCat("client flags 0x", absl::Hex(flags), " unknown"));
    }
    no_zeroes_ = (flags & nbd::kFlagNoZeroes) != 0;
    for (;;) {
      std::array<std::byte, nbd::kOptionHeaderSize> raw;
      if (absl::Status s = stream_.ReadFull(raw); !s.ok()) return s;
      absl::StatusOr<nbd::OptionHeader> h = nbd::ParseOptionHeader(raw);
      if (!h.ok()) return h.status();
      if (h->length > nbd::kMaxOptionData) {
        return absl::InvalidArgumentError(
            absl::StrCat("option ", h->option, " with ", h->length,
                         " bytes of data (at most ", nbd::kMaxOptionData, ")"));
      }
      std::vector<std::byte> data(h->length);
      if (absl::Status s = stream_.ReadFull(data); !s.ok()) return s;
      absl::StatusOr<std::optional<std::shared_ptr<NbdExport>>> r =
          Option(h->option, data);
      if (!r.ok()) return r.status();
      if (r->has_value()) return **r;
    }
  }

  bool structured() const { return structured_; }
  // base:allocation selected for the export chosen.
  bool block_status() const { return meta_selected_ && meta_export_ == name_; }
  const std::string& name() const { return name_; }

 private:
  // nullopt: go on haggling; a value: the end of the handshake (nullptr
  // when the client aborted).
  using Next = absl::StatusOr<std::optional<std::shared_ptr<NbdExport>>>;

  // Appends the option's final reply to what `out` holds and sends it all;
  // haggling goes on.
  Next Finish(std::string& out, uint32_t option, uint32_t type,
              const std::string& data = "") {
    nbd::PutOptionReply(out, option, type, data);
    if (absl::Status s = stream_.WriteAll(Bytes(out)); !s.ok()) return s;
    return std::nullopt;
  }

  Next Option(uint32_t option, std::span<const std::byte> data) {
    std::string out;
    auto reply = [&](uint32_t type, const std::string& d = "") {
      return Finish(out, option, type, d);
    };
    switch (option) {
      case nbd::kOptExportName: {
        name_.assign(reinterpret_cast<const char*>(data.data()), data.size());
        absl::StatusOr<std::shared_ptr<NbdExport>> e = exports_.Open(name_);
        if (!e.ok()) {
          // The only answer the old option allows is a hang-up.
          return absl::NotFoundError(
              absl::StrCat("export '", name_, "': ", e.status().message()));
        }
        nbd::PutExportNameReply(out, (*e)->size(), Flags(**e), no_zeroes_);
        if (absl::Status s = stream_.WriteAll(Bytes(out)); !s.ok()) return s;
        return std::optional(*e);
      }
      case nbd::kOptAbort:
        reply(nbd::kRepAck).IgnoreError();  // the client may be gone
        return std::optional<std::shared_ptr<NbdExport>>(nullptr);
      case nbd::kOptList:
        if (!data.empty())
          return reply(nbd::kRepErrInvalid, "LIST takes no data");
        for (const NbdExports::Listed& l : exports_.List()) {
          nbd::PutServerEntry(out, l.name, l.description);
        }
        return reply(nbd::kRepAck);
      case nbd::kOptStructuredReply:
        if (!data.empty()) {
          return reply(nbd::kRepErrInvalid, "STRUCTURED_REPLY takes no data");
        }
        if (structured_) {
          return reply(nbd::kRepErrInvalid, "structured replies already on");
        }
        structured_ = true;
        return reply(nbd::kRepAck);
      case nbd::kOptInfo:
      case nbd::kOptGo:
        return InfoOrGo(option, data);
      case nbd::kOptListMetaContext:
      case nbd::kOptSetMetaContext:
        return MetaContext(option, data);
      case nbd::kOptStartTls:
        return reply(nbd::kRepErrPolicy,
                     "TLS is not offered on this address (loopback or an "
                     "allow-list guards it)");
      default:
        return reply(nbd::kRepErrUnsup,
                     absl::StrCat("option ", option, " not supported"));
    }
  }

  uint16_t Flags(const NbdExport& e) const {
    uint16_t f = nbd::kHasFlags | nbd::kSendFlush | nbd::kSendFua |
                 nbd::kSendTrim | nbd::kSendWriteZeroes | nbd::kSendFastZero |
                 nbd::kSendCache | nbd::kCanMultiConn;
    if (structured_) f |= nbd::kSendDf;
    if (e.read_only()) f |= nbd::kReadOnly;
    return f;
  }

  Next InfoOrGo(uint32_t option, std::span<const std::byte> data) {
    std::string out;
    auto fail = [&](uint32_t type, const std::string& why) {
      return Finish(out, option, type, why);
    };
    absl::StatusOr<nbd::InfoRequest> req = nbd::ParseInfoRequest(data);
    if (!req.ok())
      return fail(nbd::kRepErrInvalid, std::string(req.status().message()));
    absl::StatusOr<std::shared_ptr<NbdExport>> e = exports_.Open(req->name);
    if (!e.ok()) {
      return fail(nbd::kRepErrUnknown,
                  absl::StrCat("no export '", req->name,
                               "' (NBD_OPT_LIST names them)"));
    }
    nbd::PutInfoExport(out, option, (*e)->size(), Flags(**e));
    // Block sizes always: byte granularity works (the store reads, changes
    // and writes a partial chunk), a chunk is what is efficient.
    nbd::PutInfoBlockSize(out, option, 1, (*e)->preferred_block(),
                          options_.max_payload);
    for (uint16_t info : req->infos) {
      if (info == nbd::kInfoName) nbd::PutInfoName(out, option, req->name);
      if (info == nbd::kInfoDescription) {
        for (const NbdExports::Listed& l : exports_.List()) {
          if (l.name == req->name) {
            nbd::PutInfoDescription(out, option, l.description);
          }
        }
      }
    }
    Next sent = Finish(out, option, nbd::kRepAck);
    if (!sent.ok() || option == nbd::kOptInfo) return sent;
    name_ = req->name;
    return std::optional(*e);
  }

  Next MetaContext(uint32_t option, std::span<const std::byte> data) {
    std::string out;
    auto fail = [&](uint32_t type, const std::string& why) {
      return Finish(out, option, type, why);
    };
    if (!structured_) {
      return fail(nbd::kRepErrInvalid,
                  "metadata contexts need structured replies first");
    }
    absl::StatusOr<nbd::MetaContextRequest> req =
        nbd::ParseMetaContextRequest(data);
    if (!req.ok())
      return fail(nbd::kRepErrInvalid, std::string(req.status().message()));
    if (!exports_.Open(req->name).ok()) {
      return fail(nbd::kRepErrUnknown,
                  absl::StrCat("no export '", req->name, "'"));
    }
    const bool set = option == nbd::kOptSetMetaContext;
    bool chosen = false;
    if (!set && req->queries.empty()) chosen = true;  // list them all
    for (const std::string& q : req->queries) {
      if (q == nbd::kBaseAllocation || (!set && q == "base:")) chosen = true;
    }
    if (chosen) {
      nbd::PutMetaContext(out, option, nbd::kBaseAllocationId,
                          nbd::kBaseAllocation);
    }
    if (set) {
      meta_selected_ = chosen;
      meta_export_ = req->name;
    }
    return Finish(out, option, nbd::kRepAck);
  }

  NbdStream& stream_;
  NbdExports& exports_;
  const NbdSessionOptions& options_;
  bool no_zeroes_ = false;
  bool structured_ = false;
  bool meta_selected_ = false;
  std::string meta_export_;
  std::string name_;
};

// Payload buffers of one connection, kept for reuse: a fresh buffer of a
// MiB costs 256 page faults each time, more than the request's I/O.
class Buffers {
 public:
  explicit Buffers(size_t keep_bytes) : keep_bytes_(keep_bytes) {}
  AlignedBuffer Take(size_t size) {
    {
      MutexLock lock(mu_);
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->size() >= size) {
          AlignedBuffer b = std::move(*it);
          kept_ -= b.size();
          free_.erase(it);
          return b;
        }
      }
    }
    size_t rounded = 64 << 10;
    while (rounded < size) rounded *= 2;
    return AlignedBuffer::Uninitialized(rounded);
  }
  void Give(AlignedBuffer b) {
    if (b.size() == 0) return;
    MutexLock lock(mu_);
    if (kept_ + b.size() > keep_bytes_) return;  // freed
    kept_ += b.size();
    free_.push_back(std::move(b));
  }

 private:
  const size_t keep_bytes_;
  Mutex mu_;
  std::vector<AlignedBuffer> free_ ABSL_GUARDED_BY(mu_);
  size_t kept_ ABSL_GUARDED_BY(mu_) = 0;
};

// The transmission phase of one connection.
class Transmission {
 public:
  Transmission(NbdStream& stream, std::shared_ptr<NbdExport> exp,
               nbd::ExportLimits limits, const NbdSessionOptions& options,
               NbdSessionState& state, const Log& log)
      : stream_(stream),
        exp_(std::move(exp)),
        limits_(limits),
        options_(options),
        state_(state),
        log_(log),
        buffers_(options.max_in_flight_bytes + options.max_payload) {}

  absl::Status Run() {
    absl::Status end = ReadRequests();
    {
      MutexLock lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (std::thread& t : workers_) t.join();
    return end;
  }

 private:
  struct Job {
    nbd::Request r;
    AlignedBuffer payload;  // a write's data
  };

  absl::Status ReadRequests() {
    for (;;) {
      std::array<std::byte, nbd::kRequestSize> raw;
      if (absl::Status s = stream_.ReadFull(raw); !s.ok()) {
        return state_.closing.load() ? absl::OkStatus() : s;
      }
      absl::StatusOr<nbd::Request> r = nbd::ParseRequest(raw);
      if (!r.ok()) return r.status();
      state_.requests.fetch_add(1, std::memory_order_relaxed);
      if (r->type == nbd::kCmdDisc) return absl::OkStatus();
      nbd::Verdict v = nbd::CheckRequest(*r, limits_);
      if (v.disconnect) return absl::InvalidArgumentError(v.why);
      Job job{*r, {}};
      if (r->type == nbd::kCmdWrite) {
        job.payload = buffers_.Take(r->length);
        if (absl::Status s =
                stream_.ReadFull(job.payload.span().first(r->length));
            !s.ok()) {
          return s;
        }
      }
      if (v.error != 0) {
        log_(absl::StrCat("nbd: request refused: ", v.why));
        ReplyError(r->cookie, v.error, v.why);
        continue;
      }
      if (options_.workers == 0) {
        Do(job);
        buffers_.Give(std::move(job.payload));
        if (broken_.load()) return absl::UnavailableError("client gone");
        continue;
      }
      const size_t bytes = JobBytes(job.r);
      MutexLock lock(mu_);
      cv_.wait(mu_, [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return broken_.load() ||
               (in_flight_ < options_.max_in_flight &&
                (in_flight_bytes_ == 0 ||
                 in_flight_bytes_ + bytes <= options_.max_in_flight_bytes));
      });
      if (broken_.load()) return absl::UnavailableError("client gone");
      ++in_flight_;
      in_flight_bytes_ += bytes;
      queue_.push_back(std::move(job));
      // Workers come as requests need them: one per request in flight, up
      // to options_.workers.
      if (idle_ < queue_.size() &&
          workers_.size() < static_cast<size_t>(options_.workers)) {
        workers_.emplace_back([this] { Work(); });
      }
      cv_.notify_all();
    }
  }

  static size_t JobBytes(const nbd::Request& r) {
    return r.type == nbd::kCmdRead || r.type == nbd::kCmdWrite ? r.length : 0;
  }

  void Work() {
    for (;;) {
      Job job;
      {
        MutexLock lock(mu_);
        ++idle_;
        cv_.wait(mu_, [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
          return !queue_.empty() || stop_;
        });
        --idle_;
        // Requests read before the end are all answered.
        if (queue_.empty()) return;
        job = std::move(queue_.front());
        queue_.pop_front();
      }
      Do(job);
      buffers_.Give(std::move(job.payload));
      {
        MutexLock lock(mu_);
        --in_flight_;
        in_flight_bytes_ -= JobBytes(job.r);
      }
      cv_.notify_all();
    }
  }

  void Do(Job& job) {
    const nbd::Request& r = job.r;
    absl::Status s;
    switch (r.type) {
      case nbd::kCmdRead:
        return DoRead(r);
      case nbd::kCmdBlockStatus:
        return DoBlockStatus(r);
      case nbd::kCmdWrite:
        s = exp_->Write(r.offset, job.payload.span().first(r.length));
        break;
      case nbd::kCmdTrim:
        s = exp_->Trim(r.offset, r.length);
        break;
      case nbd::kCmdWriteZeroes:
        s = exp_->WriteZeroes(r.offset, r.length);
        break;
      case nbd::kCmdFlush:
        s = exp_->Flush();
        break;
      case nbd::kCmdCache:
        break;
    }
    if (s.ok() && (r.flags & nbd::kCmdFlagFua) != 0 &&
        r.type != nbd::kCmdFlush) {
      s = exp_->Flush();
    }
    if (!s.ok()) return ReplyError(r.cookie, s);
    std::string out;
    nbd::PutSimpleReply(out, r.cookie, 0);
    Send(out, {});
  }

  void DoRead(const nbd::Request& r) {
    AlignedBuffer buf = buffers_.Take(r.length);
    absl::Cleanup give = [&] { buffers_.Give(std::move(buf)); };
    std::span<std::byte> data = buf.span().first(r.length);
    if (absl::Status s = exp_->Read(r.offset, data); !s.ok()) {
      return ReplyError(r.cookie, s);
    }
    std::string out;
    if (!limits_.structured) {
      nbd::PutSimpleReply(out, r.cookie, 0);
    } else if (r.length == 0) {
      nbd::PutStructuredHeader(out, r.cookie, nbd::kReplyFlagDone,
                               nbd::kReplyTypeNone, 0);
      data = {};
    } else {
      nbd::PutOffsetDataHeader(out, r.cookie, nbd::kReplyFlagDone, r.offset,
                               r.length);
    }
    Send(out, data);
  }

  void DoBlockStatus(const nbd::Request& r) {
    absl::StatusOr<std::vector<nbd::Extent>> extents =
        exp_->BlockStatus(r.offset, r.length);
    if (!extents.ok()) return ReplyError(r.cookie, extents.status());
    if ((r.flags & nbd::kCmdFlagReqOne) != 0 && extents->size() > 1) {
      extents->resize(1);
    }
    std::string out;
    nbd::PutBlockStatus(out, r.cookie, nbd::kReplyFlagDone,
                        nbd::kBaseAllocationId, *extents);
    Send(out, {});
  }

  void ReplyError(uint64_t cookie, const absl::Status& s) {
    ReplyError(cookie, ErrorOf(s), std::string(s.message()));
  }
  // Counted in the connection's errors.
  void ReplyError(uint64_t cookie, uint32_t error, const std::string& why) {
    state_.errors.fetch_add(1, std::memory_order_relaxed);
    std::string out;
    if (limits_.structured) {
      nbd::PutStructuredError(out, cookie, error, why);
    } else {
      nbd::PutSimpleReply(out, cookie, error);
    }
    Send(out, {});
  }

  // One reply: its header and data go out together.
  void Send(const std::string& header, std::span<const std::byte> data) {
    MutexLock lock(send_mu_);
    if (broken_.load()) return;
    absl::Status s = stream_.WriteAll(Bytes(header));
    if (s.ok() && !data.empty()) s = stream_.WriteAll(data);
    if (!s.ok()) {
      // The client is gone or stuck: stop reading its requests.
      broken_.store(true);
      stream_.ShutdownRead();
      cv_.notify_all();
    }
  }

  NbdStream& stream_;
  const std::shared_ptr<NbdExport> exp_;
  const nbd::ExportLimits limits_;
  const NbdSessionOptions& options_;
  NbdSessionState& state_;
  const Log& log_;
  std::vector<std::thread> workers_;
  Mutex send_mu_;
  std::atomic<bool> broken_{false};
  Mutex mu_;
  CondVar cv_;
  std::deque<Job> queue_ ABSL_GUARDED_BY(mu_);
  size_t in_flight_ ABSL_GUARDED_BY(mu_) = 0;
  size_t in_flight_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  size_t idle_ ABSL_GUARDED_BY(mu_) = 0;  // workers waiting for a request
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  Buffers buffers_;
};

void SetTimeout(int fd, int option, std::chrono::milliseconds t) {
  timeval tv{};
  tv.tv_sec = t.count() / 1000;
  tv.tv_usec = (t.count() % 1000) * 1000;
  setsockopt(fd, SOL_SOCKET, option, &tv, sizeof(tv));
}

// A connected TCP socket as a blocking stream.
class SocketStream final : public NbdStream {
 public:
  explicit SocketStream(int fd) : fd_(fd) {}
  absl::Status ReadFull(std::span<std::byte> out) override {
    size_t got = 0;
    while (got < out.size()) {
      ssize_t n = recv(fd_, out.data() + got, out.size() - got, 0);
      if (n > 0) {
        got += static_cast<size_t>(n);
      } else if (n == 0) {
        return absl::UnavailableError("the client closed the connection");
      } else if (errno != EINTR) {
        return absl::UnavailableError(
            errno == EAGAIN || errno == EWOULDBLOCK
                ? "the client was silent past the handshake timeout"
                : absl::StrCat("receive: ", strerror(errno)));
      }
    }
    return absl::OkStatus();
  }
  absl::Status WriteAll(std::span<const std::byte> data) override {
    size_t sent = 0;
    while (sent < data.size()) {
      ssize_t n =
          send(fd_, data.data() + sent, data.size() - sent, MSG_NOSIGNAL);
      if (n > 0) {
        sent += static_cast<size_t>(n);
      } else if (n < 0 && errno != EINTR) {
        return absl::UnavailableError(absl::StrCat("send: ", strerror(errno)));
      }
    }
    return absl::OkStatus();
  }
  void ShutdownRead() override { shutdown(fd_, SHUT_RD); }
  // Transmission: a client may stay idle as long as it likes.
  void EnterTransmission() override {
    SetTimeout(fd_, SO_RCVTIMEO, std::chrono::milliseconds(0));
  }

 private:
  int fd_;
};

}  // namespace

absl::Status ServeNbdSession(NbdStream& stream, NbdExports& exports,
                             const NbdSessionOptions& options,
                             NbdSessionState& state, const Log& log) {
  Handshake hs(stream, exports, options);
  absl::StatusOr<std::shared_ptr<NbdExport>> exp = hs.Run();
  if (!exp.ok()) return exp.status();
  if (*exp == nullptr) return absl::OkStatus();  // NBD_OPT_ABORT
  nbd::ExportLimits limits;
  limits.size = (*exp)->size();
  limits.read_only = (*exp)->read_only();
  limits.max_payload = options.max_payload;
  limits.structured = hs.structured();
  limits.block_status = hs.block_status();
  {
    MutexLock lock(state.mu);
    state.export_name = hs.name();
    state.exp = *exp;
    state.announced_read_only = limits.read_only;
  }
  stream.EnterTransmission();
  Transmission t(stream, *exp, limits, options, state, log);
  return t.Run();
}

NbdServer::NbdServer(Config config, NbdExports& exports, Log log)
    : config_(std::move(config)), exports_(exports), log_(std::move(log)) {}

absl::StatusOr<std::unique_ptr<NbdServer>> NbdServer::Start(Config config,
                                                            NbdExports& exports,
                                                            Log log) {
  std::unique_ptr<NbdServer> s(
      new NbdServer(std::move(config), exports, std::move(log)));
  absl::StatusOr<Fd> l = ListenTcp(s->config_.listen);
  if (!l.ok()) return l.status();
  absl::StatusOr<int> port = LocalPort(*l);
  if (!port.ok()) return port.status();
  s->listener_ = std::move(*l);
  s->port_ = *port;
  s->accept_thread_ = std::thread([server = s.get()] { server->AcceptLoop(); });
  s->reconcile_thread_ = std::thread([server = s.get()] {
    MutexLock lock(server->mu_);
    while (!server->stopping_.load()) {
      server->stop_cv_.wait_for(server->mu_, std::chrono::milliseconds(500));
      server->mu_.unlock();
      server->Reconcile();
      server->mu_.lock();
    }
  });
  return s;
}

NbdServer::~NbdServer() { Stop(); }

void NbdServer::Stop() {
  if (stopping_.exchange(true)) return;
  shutdown(listener_.get(), SHUT_RDWR);
  stop_cv_.notify_all();
  if (accept_thread_.joinable()) accept_thread_.join();
  if (reconcile_thread_.joinable()) reconcile_thread_.join();
  std::list<std::unique_ptr<Conn>> conns;
  {
    MutexLock lock(mu_);
    for (auto& c : conns_) {
      c->state.closing.store(true);
      shutdown(c->fd.get(), SHUT_RD);
    }
    conns.swap(conns_);
  }
  for (auto& c : conns) c->thread.join();
}

void NbdServer::AcceptLoop() {
  while (!stopping_.load()) {
    std::string peer;
    absl::StatusOr<Fd> fd = Accept(listener_, &peer);
    if (!fd.ok()) {
      if (stopping_.load()) return;
      if (fd.status().code() == absl::StatusCode::kUnavailable) {
        // Nothing to accept yet (the listener is non-blocking).
        WaitFor(listener_.get(), POLLIN, After(std::chrono::milliseconds(500)))
            .IgnoreError();
      }
      continue;
    }
    Reap();
    // The address without its port.
    std::string host = peer.substr(0, peer.rfind(':'));
    if (host.size() > 2 && host.front() == '[')
      host = host.substr(1, host.size() - 2);
    if (!config_.allow.empty() && !config_.allow.contains(host)) {
      refused_.fetch_add(1);
      log_(absl::StrCat("nbd: connection from ", peer,
                        " refused: not in nbd_allow"));
      continue;
    }
    MutexLock lock(mu_);
    if (conns_.size() >= config_.max_connections) {
      refused_.fetch_add(1);
      log_(absl::StrCat("nbd: connection from ", peer,
                        " refused: ", conns_.size(), " connections already"));
      continue;
    }
    accepted_.fetch_add(1);
    auto conn = std::make_unique<Conn>();
    conn->peer = peer;
    conn->fd = std::move(*fd);
    Conn* c = conn.get();
    conns_.push_back(std::move(conn));
    c->thread = std::thread([this, c] { Serve(*c); });
  }
}

void NbdServer::Serve(Conn& conn) {
  const int fd = conn.fd.get();
  int flags = fcntl(fd, F_GETFL);
  fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
  SetTimeout(fd, SO_RCVTIMEO, config_.handshake_timeout);
  // A client that stops reading its replies is dropped after a minute.
  SetTimeout(fd, SO_SNDTIMEO, std::chrono::milliseconds(60000));
  SocketStream stream(fd);
  absl::Status s =
      ServeNbdSession(stream, exports_, config_.session, conn.state, log_);
  std::string name;
  {
    MutexLock lock(conn.state.mu);
    name = conn.state.export_name;
  }
  if (!s.ok() && !conn.state.closing.load()) {
    log_(absl::StrCat("nbd: connection from ", conn.peer,
                      name.empty() ? "" : absl::StrCat(" to ", name),
                      " ended: ", s.message()));
  }
  shutdown(fd, SHUT_RDWR);
  conn.done.store(true);
}

void NbdServer::Reap() {
  std::list<std::unique_ptr<Conn>> ended;
  {
    MutexLock lock(mu_);
    for (auto it = conns_.begin(); it != conns_.end();) {
      if ((*it)->done.load()) {
        ended.push_back(std::move(*it));
        it = conns_.erase(it);
      } else {
        ++it;
      }
    }
  }
  for (auto& c : ended) c->thread.join();
}

void NbdServer::Reconcile() {
  Reap();
  MutexLock lock(mu_);
  for (auto& c : conns_) {
    std::shared_ptr<NbdExport> exp;
    std::string name;
    bool announced = false;
    {
      MutexLock state_lock(c->state.mu);
      exp = c->state.exp;
      name = c->state.export_name;
      announced = c->state.announced_read_only;
    }
    if (exp == nullptr || c->state.closing.load()) continue;
    absl::StatusOr<std::shared_ptr<NbdExport>> now = exports_.Open(name);
    const char* why = !now.ok()                          ? "went away"
                      : (*now)->read_only() != announced ? "changed mode"
                                                         : nullptr;
    if (why == nullptr) continue;
    log_(absl::StrCat("nbd: export ", name, " ", why, ": closing the ",
                      "connection from ", c->peer,
                      " after its requests in flight"));
    c->state.closing.store(true);
    shutdown(c->fd.get(), SHUT_RD);
  }
}

std::vector<NbdServer::ConnectionInfo> NbdServer::Connections() {
  std::vector<ConnectionInfo> out;
  MutexLock lock(mu_);
  for (auto& c : conns_) {
    if (c->done.load()) continue;
    ConnectionInfo info;
    info.peer = c->peer;
    {
      MutexLock state_lock(c->state.mu);
      info.export_name = c->state.export_name;
      info.read_only = c->state.announced_read_only;
    }
    info.requests = c->state.requests.load();
    info.errors = c->state.errors.load();
    out.push_back(std::move(info));
  }
  return out;
}

}  // namespace transport
