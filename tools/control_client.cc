#include "tools/control_client.h"

#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "absl/strings/str_cat.h"
#include "tools/http_unix.h"
#include "tools/progress.h"

namespace tools {

namespace {

constexpr time_t kLongTimeout = 7 * 24 * 3600;  // an initialize may take hours

std::string Volume(const std::string& pool, const std::string& volume) {
  return absl::StrCat("/v1/pools/", UrlEncode(pool), "/volumes/",
                      UrlEncode(volume));
}

}  // namespace

std::string UrlEncode(const std::string& text) {
  static const char kHex[] = "0123456789ABCDEF";
  std::string out;
  for (unsigned char c : text) {
    if (std::isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~') {
      out.push_back(static_cast<char>(c));
    } else {
      out.push_back('%');
      out.push_back(kHex[c >> 4]);
      out.push_back(kHex[c & 15]);
    }
  }
  return out;
}

ControlClient::ControlClient(std::string socket)
    : http_(std::make_unique<UnixHttpClient>(socket)), socket_(socket) {
  // A daemon that answered and closed before taking a whole upload must
  // fail the write, not end this process by SIGPIPE without a word.
  signal(SIGPIPE, SIG_IGN);
  http_->set_read_timeout(kLongTimeout, 0);
  http_->set_write_timeout(kLongTimeout, 0);
  http_->set_keep_alive(false);
}

ControlClient::~ControlClient() = default;

absl::Status ControlClient::Unreachable() const {
  return absl::UnavailableError(
      http_->last_error_.empty()
          ? absl::StrCat("the daemon at ", socket_, " did not answer")
          : http_->last_error_);
}

absl::StatusOr<ordered_json> ControlClient::Call(const std::string& method,
                                                 const std::string& path,
                                                 const ordered_json& body,
                                                 int* http) {
  httplib::Result r = [&] {
    const std::string text = body.is_null() ? "" : body.dump();
    if (method == "GET") return http_->Get(path.c_str());
    if (method == "DELETE") return http_->Delete(path.c_str());
    return http_->Post(path.c_str(), text, "application/json");
  }();
  if (!r) return Unreachable();
  if (http != nullptr) *http = r->status;
  last_reply_ = ordered_json::parse(r->body, nullptr, false);
  if (absl::Status s = StatusFromResponse(r->status, r->body); !s.ok()) {
    return s;
  }
  const ordered_json& j = last_reply_;
  if (j.is_discarded()) {
    return absl::DataLossError("the daemon's answer is not JSON");
  }
  return j;
}

absl::Status ControlClient::Upload(const std::string& path,
                                   engine::ByteSource& in, uint64_t size) {
  absl::Status failed;
  std::vector<std::byte> buf(1 << 20);
  auto provide = [&](size_t, httplib::DataSink& sink) {
    absl::StatusOr<size_t> n = in.Read(buf);
    if (!n.ok()) {
      failed = n.status();
      return false;
    }
    if (*n == 0) {
      sink.done();
      return true;
    }
    return sink.write(reinterpret_cast<const char*>(buf.data()), *n);
  };
  httplib::Result r =
      size > 0 ? http_->Put(
                     path.c_str(), size,
                     [&](size_t off, size_t, httplib::DataSink& sink) {
                       return provide(off, sink);
                     },
                     "application/octet-stream")
               : http_->Put(path.c_str(), provide, "application/octet-stream");
  if (!failed.ok()) return failed;
  if (!r) return Unreachable();
  return StatusFromResponse(r->status, r->body);
}

absl::Status ControlClient::Download(const std::string& path,
                                     engine::ByteSink& out) {
  int status = 0;
  std::string error_body;
  absl::Status written;
  httplib::Result r = http_->Get(
      path.c_str(),
      [&](const httplib::Response& res) {
        status = res.status;
        return true;
      },
      [&](const char* data, size_t len) {
        if (status != 200) {
          error_body.append(data, len);
          return true;
        }
        written = out.Write({reinterpret_cast<const std::byte*>(data), len});
        return written.ok();
      });
  if (!written.ok()) return written;
  if (!r) return Unreachable();
  return StatusFromResponse(status, error_body);
}

namespace {

class DaemonBackend final : public RelationshipBackend {
 public:
  explicit DaemonBackend(ControlClient& c) : c_(c) {}

  absl::StatusOr<ordered_json> Create(const std::string& source,
                                      const std::string& destination,
                                      int64_t schedule_seconds,
                                      uint64_t max_rate_bytes) override {
    return c_.Call("POST", "/v1/relationships",
                   {{"source", source},
                    {"destination", destination},
                    {"schedule_seconds", schedule_seconds},
                    {"max_rate_bytes", max_rate_bytes}});
  }

  absl::StatusOr<ordered_json> Run(engine::Operation op,
                                   const std::string& endpoint,
                                   Asker& asker) override {
    const std::string path =
        absl::StrCat("/v1/relationships/", engine::ToString(op));
    ordered_json body = {{"endpoint", endpoint}, {"yes", asker.yes}};
    // Progress from the daemon's status while the request runs.
    std::atomic<bool> done{false};
    std::thread watcher;
    if (isatty(2)) {
      watcher = std::thread([&] {
        ControlClient status(c_.socket());
        Progress progress("transferring");
        while (!done) {
          std::this_thread::sleep_for(std::chrono::milliseconds(300));
          absl::StatusOr<ordered_json> s = status.Call(
              "GET", absl::StrCat("/v1/status?endpoint=", UrlEncode(endpoint)));
          if (s.ok() && s->is_array() && !s->empty() &&
              (*s)[0].value("relationship_status", "") == "Transferring") {
            progress.Update((*s)[0].value("progress_bytes", uint64_t{0}),
                            (*s)[0].value("progress_total_bytes", uint64_t{0}));
          }
        }
      });
    }
    absl::StatusOr<ordered_json> r;
    for (int round = 0; round < 3; ++round) {
      int http = 0;
      r = c_.Call("POST", path, body, &http);
      // 428: the daemon shows what it would do and waits for a "yes"; it
      // goes ahead only if that is still what it would do.
      if (r.ok() || http != 428 || !c_.last_reply().contains("preview")) break;
      const ordered_json preview = c_.last_reply()["preview"];
      if (!asker(preview)) {
        r = absl::CancelledError(absl::StrCat(
            engine::ToString(op), " cancelled; nothing was changed"));
        break;
      }
      body["confirm"] = preview;
    }
    done = true;
    if (watcher.joinable()) watcher.join();
    return r;
  }

  absl::StatusOr<ordered_json> Status(const std::string& endpoint,
                                      const std::string& pool) override {
    return c_.Call(
        "GET", endpoint.empty()
                   ? absl::StrCat("/v1/status?pool=", UrlEncode(pool))
                   : absl::StrCat("/v1/status?endpoint=", UrlEncode(endpoint)));
  }
  absl::StatusOr<ordered_json> Exports() override {
    return c_.Call("GET", "/v1/exports");
  }

 private:
  ControlClient& c_;
};

class DaemonPool final : public PoolOps {
 public:
  DaemonPool(ControlClient& c, std::string pool)
      : c_(c), pool_(std::move(pool)) {}

  absl::StatusOr<ordered_json> Info() override {
    return c_.Call("GET", absl::StrCat("/v1/pools/", UrlEncode(pool_)));
  }
  absl::StatusOr<ordered_json> Check(bool data) override {
    return c_.Call("POST",
                   absl::StrCat("/v1/pools/", UrlEncode(pool_), "/check"),
                   {{"data", data}});
  }
  absl::StatusOr<ordered_json> ListVolumes() override {
    return c_.Call("GET",
                   absl::StrCat("/v1/pools/", UrlEncode(pool_), "/volumes"));
  }
  absl::Status CreateVolume(const std::string& name, uint64_t size) override {
    return c_
        .Call("POST", absl::StrCat("/v1/pools/", UrlEncode(pool_), "/volumes"),
              {{"name", name}, {"size_bytes", size}})
        .status();
  }
  absl::Status ResizeVolume(const std::string& name, uint64_t size) override {
    return c_
        .Call("POST", Volume(pool_, name) + "/resize", {{"size_bytes", size}})
        .status();
  }
  absl::Status DeleteVolume(const std::string& name, bool recursive) override {
    return c_
        .Call("DELETE", Volume(pool_, name) + (recursive ? "?recursive=1" : ""))
        .status();
  }
  absl::StatusOr<ordered_json> CreateSnapshot(
      const std::string& volume, const std::string& name) override {
    return c_.Call("POST", Volume(pool_, volume) + "/snapshots",
                   {{"name", name}});
  }
  absl::StatusOr<ordered_json> ListSnapshots(
      const std::string& volume) override {
    return c_.Call("GET", Volume(pool_, volume) + "/snapshots");
  }
  absl::Status DeleteSnapshot(const std::string& volume,
                              const std::string& name) override {
    return c_
        .Call("DELETE", absl::StrCat(Volume(pool_, volume), "/snapshots/",
                                     UrlEncode(name)))
        .status();
  }
  absl::Status Rollback(const std::string& volume,
                        const std::string& snapshot) override {
    return c_
        .Call("POST", Volume(pool_, volume) + "/rollback",
              {{"snapshot", snapshot}})
        .status();
  }
  absl::StatusOr<std::string> Digest(const std::string& volume,
                                     const std::string& snapshot) override {
    absl::StatusOr<ordered_json> r =
        c_.Call("GET", absl::StrCat(Volume(pool_, volume),
                                    "/digest?snapshot=", UrlEncode(snapshot)));
    if (!r.ok()) return r.status();
    return r->value("digest", "");
  }
  absl::Status Trim(const std::string& volume, uint64_t offset,
                    uint64_t length) override {
    return c_
        .Call("POST", Volume(pool_, volume) + "/trim",
              {{"offset", offset}, {"length", length}})
        .status();
  }
  absl::Status Write(const std::string& volume, uint64_t offset,
                     uint64_t size_hint, engine::ByteSource& in) override {
    return c_.Upload(absl::StrCat(Volume(pool_, volume),
                                  "/data?offset=", offset, "&size=", size_hint),
                     in, size_hint);
  }
  absl::StatusOr<uint64_t> ReadLength(const std::string& volume,
                                      const std::string& snapshot,
                                      uint64_t offset,
                                      std::optional<uint64_t> length) override {
    absl::StatusOr<ordered_json> r =
        c_.Call("GET", absl::StrCat(Volume(pool_, volume), "/length?",
                                    Query(snapshot, offset, length)));
    if (!r.ok()) return r.status();
    return r->value("length", uint64_t{0});
  }
  absl::Status Read(const std::string& volume, const std::string& snapshot,
                    uint64_t offset, std::optional<uint64_t> length,
                    engine::ByteSink& out) override {
    return c_.Download(absl::StrCat(Volume(pool_, volume), "/data?",
                                    Query(snapshot, offset, length)),
                       out);
  }

 private:
  static std::string Query(const std::string& snapshot, uint64_t offset,
                           std::optional<uint64_t> length) {
    return absl::StrCat("snapshot=", UrlEncode(snapshot), "&offset=", offset,
                        length ? absl::StrCat("&length=", *length) : "");
  }
  ControlClient& c_;
  const std::string pool_;
};

}  // namespace

std::unique_ptr<RelationshipBackend> DaemonRelationships(ControlClient& c) {
  return std::make_unique<DaemonBackend>(c);
}

std::unique_ptr<PoolOps> DaemonPoolOps(ControlClient& c, std::string pool) {
  return std::make_unique<DaemonPool>(c, std::move(pool));
}

}  // namespace tools
