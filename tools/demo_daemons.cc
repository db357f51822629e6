// `tandem demo`: the seed's procedure through two tandemd processes on
// loopback, driven through their control sockets exactly as `tandem
// --daemon` drives them.
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "blockstore/io.h"
#include "blockstore/pool.h"
#include "blockstore/util.h"
#include "engine/stream.h"
#include "tools/control_client.h"
#include "tools/demo.h"
#include "tools/drill.h"
#include "tools/relationship_json.h"
#include "transport/certs.h"
#include "transport/socket.h"

namespace tools {
namespace {

constexpr uint32_t kChunk = 64 << 10;

using drill::Check;
using drill::failures;
using drill::Ok;
using drill::Step;

std::string MixedData(uint64_t bytes, uint64_t seed) {
  return drill::MixedData(bytes, seed, kChunk);
}

// A tandemd child process.
class Daemon {
 public:
  Daemon(std::string site, std::string binary, std::string config,
         std::string log, std::string socket)
      : site_(std::move(site)),
        binary_(std::move(binary)),
        config_(std::move(config)),
        log_(std::move(log)),
        socket_(std::move(socket)) {}
  ~Daemon() { Stop(SIGKILL); }

  bool Start() {
    const pid_t parent = getpid();
    pid_ = fork();
    if (pid_ == 0) {
      // The demo's daemons end with it, however it ends.
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (getppid() != parent) _exit(127);
      FILE* f = std::fopen(log_.c_str(), "a");
      if (f != nullptr) dup2(fileno(f), 2);
      execl(binary_.c_str(), binary_.c_str(), "--config", config_.c_str(),
            nullptr);
      _exit(127);
    }
    // Up once its control socket answers.
    for (int i = 0; i < 200; ++i) {
      if (transport::ConnectUnix(socket_).ok()) return true;
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return false;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return false;
  }

  // The exit status (-1 if it had to be killed).
  int Stop(int sig = SIGTERM) {
    if (pid_ <= 0) return -1;
    kill(pid_, sig);
    int status = 0;
    for (int i = 0; i < 100; ++i) {
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    kill(pid_, SIGKILL);
    waitpid(pid_, &status, 0);
    pid_ = -1;
    return -1;
  }

  const std::string& socket() const { return socket_; }
  const std::string& log() const { return log_; }

 private:
  const std::string site_, binary_, config_, log_, socket_;
  pid_t pid_ = -1;
};

int FreePort() {
  absl::StatusOr<transport::Fd> fd = transport::ListenTcp({"127.0.0.1", 0});
  if (!fd.ok()) return 0;
  absl::StatusOr<int> port = transport::LocalPort(*fd);
  return port.ok() ? *port : 0;
}

class StringSink final : public engine::ByteSink {
 public:
  absl::Status Write(std::span<const std::byte> data) override {
    bytes.append(reinterpret_cast<const char*>(data.data()), data.size());
    return absl::OkStatus();
  }
  std::string bytes;
};

class StringSource final : public engine::ByteSource {
 public:
  explicit StringSource(std::string_view b) : b_(b) {}
  absl::StatusOr<size_t> Read(std::span<std::byte> out) override {
    size_t n = std::min(out.size(), b_.size() - at_);
    std::memcpy(out.data(), b_.data() + at_, n);
    at_ += n;
    return n;
  }

 private:
  std::string_view b_;
  size_t at_ = 0;
};

class Drill {
 public:
  Drill(std::string dir, uint64_t bytes, std::string tandemd)
      : dir_(std::move(dir)), bytes_(bytes), tandemd_(std::move(tandemd)) {}
  int Run();

 private:
  ControlClient& C(char site) { return site == 'a' ? *ca_ : *cb_; }
  std::unique_ptr<PoolOps> Pool(char site) {
    return DaemonPoolOps(C(site), "p");
  }
  ordered_json Status(char via) {
    absl::StatusOr<ordered_json> s = DaemonRelationships(C(via))->Status(
        via == 'a' ? "a/p:vol" : "b/p:vol", "");
    return s.ok() && !s->empty() ? (*s)[0] : ordered_json::object();
  }
  void Show(char via) {
    ordered_json r = Status(via);
    std::printf("  (site %c's daemon) %s, %s; %s -> %s\n", via,
                r.value("mirror_state", "?").c_str(),
                r.value("relationship_status", "?").c_str(),
                r.value("source", "?").c_str(),
                r.value("destination", "?").c_str());
  }
  bool Write(char site, uint64_t chunks, uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::unique_ptr<PoolOps> pool = Pool(site);
    for (uint64_t i = 0; i < chunks; ++i) {
      uint64_t c = rng() % (bytes_ / kChunk);
      std::string data = MixedData(2 * kChunk, seed * 1000003 + i);
      StringSource in(std::string_view(data).substr((c % 2) * kChunk, kChunk));
      if (!Ok(pool->Write("vol", c * kChunk, kChunk, in), "write"))
        return false;
    }
    return true;
  }
  // Equal bytes, read back through both daemons in 16 MiB pieces.
  bool Same(const std::string& snap_a, const std::string& snap_b) {
    std::unique_ptr<PoolOps> a = Pool('a'), b = Pool('b');
    absl::StatusOr<uint64_t> na = a->ReadLength("vol", snap_a, 0, std::nullopt);
    absl::StatusOr<uint64_t> nb = b->ReadLength("vol", snap_b, 0, std::nullopt);
    if (!na.ok() || !nb.ok() || *na != *nb) return false;
    for (uint64_t at = 0; at < *na; at += 16 << 20) {
      uint64_t len = std::min<uint64_t>(16 << 20, *na - at);
      StringSink x, y;
      if (!a->Read("vol", snap_a, at, len, x).ok() ||
          !b->Read("vol", snap_b, at, len, y).ok() || x.bytes != y.bytes) {
        return false;
      }
    }
    return true;
  }
  // The seed's "mount the volume": where clients mount `site`'s volume
  // (its NBD export, docs/nbd.md) and in which mode it serves them now.
  void Mount(char site, const std::string& want) {
    std::string mode = "not exported";
    absl::StatusOr<ordered_json> e = C(site).Call("GET", "/v1/exports");
    if (e.ok()) {
      for (const auto& x : *e) {
        if (x.value("name", "") == "p/vol") mode = x.value("mode", "?");
      }
    }
    std::printf("  clients mount nbd://127.0.0.1:%d/p/vol (site %c): %s\n",
                site == 'a' ? nbd_a_ : nbd_b_, site, mode.c_str());
    Check(mode == want, absl::StrCat("site ", std::string(1, site),
                                     "'s volume is served ", want));
  }
  bool Mirrored(const std::string& what) {
    bool same = Same("", "");
    Check(same && Status('b').value("mirror_state", "") == "Mirrored",
          absl::StrCat(what, ": destination equals source byte for byte"));
    return same;
  }
  void Transferred(const absl::StatusOr<ordered_json>& r) {
    if (r.ok()) {
      const ordered_json& s = (*r)["stats"];
      std::printf(
          "  sent %s (%s of data, %llu snapshot(s)) in %.2f s\n",
          blockstore::FormatBytes(s.value("stream_bytes", uint64_t{0})).c_str(),
          blockstore::FormatBytes(s.value("data_bytes", uint64_t{0})).c_str(),
          static_cast<unsigned long long>(s.value("snapshots", uint64_t{0})),
          s.value("seconds", 0.0));
    }
  }
  absl::StatusOr<ordered_json> Op(char via, engine::Operation op,
                                  bool show_preview = true) {
    Asker asker{true};
    (void)show_preview;
    return DaemonRelationships(C(via))->Run(
        op, via == 'a' ? "a/p:vol" : "b/p:vol", asker);
  }

  const std::string dir_;
  const uint64_t bytes_;
  const std::string tandemd_;
  std::unique_ptr<Daemon> a_, b_;
  std::unique_ptr<ControlClient> ca_, cb_;
  int nbd_a_ = 0, nbd_b_ = 0;
};

int Drill::Run() {
  Step(
      "site a and site b: a CA, a certificate each, a 4 GiB sparse pool "
      "file each, in " +
      dir_);
  if (!Ok(transport::MakeCertificates(dir_, "demo-ca", {"a", "b"}),
          "certificates")) {
    return 1;
  }
  const int port_a = FreePort(), port_b = FreePort();
  nbd_a_ = FreePort();
  nbd_b_ = FreePort();
  for (char site : {'a', 'b'}) {
    std::string path =
        absl::StrCat(dir_, "/site-", std::string(1, site), ".pool");
    if (access(path.c_str(), F_OK) == 0) {
      std::printf(
          "  [FAIL] %s exists (from an earlier demo?): delete it or "
          "pick another directory\n",
          path.c_str());
      return 1;
    }
    blockstore::FileIoOptions options;
    options.create_size_bytes = 4ull << 30;
    absl::StatusOr<std::unique_ptr<blockstore::Io>> io =
        blockstore::OpenFileIo(path, options);
    if (!Ok(io.status(), "create pool file")) return 1;
    if (!Ok(blockstore::Pool::Create(std::move(*io),
                                     {.chunk_size_bytes = kChunk})
                .status(),
            "create pool")) {
      return 1;
    }
    const char other = site == 'a' ? 'b' : 'a';
    std::ofstream cfg(absl::StrCat(dir_, "/", std::string(1, site), ".toml"));
    cfg << "site = \"" << site << "\"\n"
        << "listen = \"127.0.0.1:" << (site == 'a' ? port_a : port_b) << "\"\n"
        << "control = \"" << site << ".sock\"\n"
        << "nbd = \"127.0.0.1:" << (site == 'a' ? nbd_a_ : nbd_b_) << "\"\n"
        << "checkpoint = \"16M\"\n"
        << "[tls]\ncert = \"" << site << ".crt\"\nkey = \"" << site
        << ".key\"\nca = \"demo-ca.crt\"\n"
        << "[pools]\np = \"site-" << site << ".pool\"\n"
        << "[peers]\n"
        << other << " = \"127.0.0.1:" << (other == 'a' ? port_a : port_b)
        << "\"\n";
  }
  auto daemon = [&](char site) {
    const std::string s(1, site);
    return std::make_unique<Daemon>(s, tandemd_, dir_ + "/" + s + ".toml",
                                    dir_ + "/" + s + ".log",
                                    dir_ + "/" + s + ".sock");
  };
  a_ = daemon('a');
  b_ = daemon('b');
  Step(absl::StrCat("start tandemd for site a (127.0.0.1:", port_a,
                    ") and site b (127.0.0.1:", port_b,
                    "): mutual TLS 1.3 between them"));
  if (!a_->Start() || !b_->Start()) {
    std::printf("  [FAIL] a daemon did not start; see %s and %s\n",
                a_->log().c_str(), b_->log().c_str());
    return 1;
  }
  ca_ = std::make_unique<ControlClient>(a_->socket());
  cb_ = std::make_unique<ControlClient>(b_->socket());
  Check(true, "both daemons answer on their control sockets");

  Step(absl::StrCat("source volume a/p:vol, ", blockstore::FormatBytes(bytes_),
                    " of mixed data, written through site a's daemon"));
  if (!Ok(Pool('a')->CreateVolume("vol", bytes_), "create volume")) return 1;
  {
    std::string data = MixedData(bytes_, 1);
    StringSource in(data);
    if (!Ok(Pool('a')->Write("vol", 0, data.size(), in), "write")) return 1;
  }
  Mount('a', "read-write");

  Step(
      "relationship create --source a/p:vol --destination b/p:vol "
      "--schedule 10m --max-rate 200M");
  if (!Ok(DaemonRelationships(*ca_)
              ->Create("a/p:vol", "b/p:vol", 600, 200 << 20)
              .status(),
          "create relationship")) {
    return 1;
  }
  Show('b');

  Step("break before the baseline: refused");
  absl::StatusOr<ordered_json> r = Op('b', engine::Operation::kBreak);
  std::printf("  refused: %s\n", std::string(r.status().message()).c_str());
  Check(absl::IsFailedPrecondition(r.status()),
        "break refused while Uninitialized");

  Step("initialize: baseline transfer, pulled through site b's daemon");
  r = Op('b', engine::Operation::kInitialize);
  if (!Ok(r.status(), "initialize")) return 1;
  Transferred(r);
  Show('b');
  Mirrored("initialize");
  Mount('b', "read-only");
  {
    const std::string chunk = MixedData(kChunk, 2);
    StringSource one(chunk);
    Check(!Pool('b')->Write("vol", 0, kChunk, one).ok(),
          "the destination refuses writes while Mirrored");
  }

  Step(
      "write 1% more, snapshot a/p:vol@before-upgrade, write 1% more; "
      "update through site a's daemon");
  const uint64_t one_percent = std::max<uint64_t>(1, bytes_ / kChunk / 100);
  if (!Write('a', one_percent, 3)) return 1;
  if (!Ok(Pool('a')->CreateSnapshot("vol", "before-upgrade").status(),
          "snapshot")) {
    return 1;
  }
  if (!Write('a', one_percent, 4)) return 1;
  r = Op('a', engine::Operation::kUpdate);
  if (!Ok(r.status(), "update")) return 1;
  Transferred(r);
  Show('a');
  Mirrored("update");
  Check(Same("before-upgrade", "before-upgrade"),
        "the user snapshot arrived: b/p:vol@before-upgrade equals "
        "a/p:vol@before-upgrade");

  Step(
      "write 10% more and update; try to break through site b while it "
      "transfers");
  if (!Write('a', 10 * one_percent, 5)) return 1;
  absl::StatusOr<ordered_json> during = absl::UnknownError("not tried");
  std::string seen;
  std::thread updater([&] { r = Op('a', engine::Operation::kUpdate); });
  for (int i = 0; i < 2000 && seen != "Transferring"; ++i) {
    seen = Status('b').value("relationship_status", "");
    if (seen == "Transferring") during = Op('b', engine::Operation::kBreak);
    if (seen != "Transferring")
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  updater.join();
  if (!Ok(r.status(), "update")) return 1;
  std::printf("  while %s: break refused: %s\n", seen.c_str(),
              std::string(during.status().message()).c_str());
  Check(seen == "Transferring" && absl::IsFailedPrecondition(during.status()),
        "break refused while Transferring");
  Transferred(r);
  Mirrored("update");

  Step(
      "disaster at site A: its daemon goes down; break through site b's "
      "daemon; site B serves (read-write)");
  Check(a_->Stop(SIGKILL) == -1, "site a's daemon is gone (kill -9)");
  r = Op('b', engine::Operation::kBreak);
  if (!Ok(r.status(), "break")) return 1;
  Show('b');
  {
    ordered_json s = Status('b');
    Check(s.value("mirror_state", "") == "Broken",
          "Broken, with site A unreachable");
  }
  Mount('b', "read-write");
  std::printf("  clients write 2%% on b/p:vol\n");
  if (!Write('b', 2 * one_percent, 6)) return 1;

  Step(
      "site A is back (its daemon restarts); it took 1% of late writes "
      "before it went down");
  if (!a_->Start()) {
    std::printf("  [FAIL] site a's daemon did not restart; see %s\n",
                a_->log().c_str());
    return 1;
  }
  if (!Write('a', one_percent, 7)) return 1;
  const std::string a_before = *Pool('a')->Digest("vol", "");

  Step("reverse resync through site a (a/p:vol takes b/p:vol's data)");
  r = Op('a', engine::Operation::kReverseResync);
  if (!Ok(r.status(), "reverse resync")) return 1;
  Transferred(r);
  Show('a');
  Mirrored("reverse resync");
  Check(Status('a').value("source", "") == "b/p:vol",
        "the direction flipped: b/p:vol -> a/p:vol");
  Mount('a', "read-only");
  {
    absl::StatusOr<ordered_json> snaps = Pool('a')->ListSnapshots("vol");
    bool kept = false;
    if (snaps.ok()) {
      for (const auto& s : *snaps) {
        kept = kept || (s.value("name", "").rfind("safety-", 0) == 0 &&
                        s.value("root_digest", "") == a_before);
      }
    }
    Check(kept, "a safety snapshot on a/p:vol keeps what was overwritten");
  }

  Step("reestablish a/p:vol -> b/p:vol (update, break, reverse resync)");
  if (!Write('b', one_percent, 8)) return 1;
  r = Op('b', engine::Operation::kReestablish);
  if (!Ok(r.status(), "reestablish")) return 1;
  Transferred(r);
  Show('b');
  Mirrored("reestablish");
  Check(Status('b').value("source", "") == "a/p:vol",
        "a/p:vol is the source again");
  Mount('a', "read-write");
  Mount('b', "read-only");

  Step("production on site A again: write 1% and update");
  if (!Write('a', one_percent, 9)) return 1;
  r = Op('b', engine::Operation::kUpdate);
  if (!Ok(r.status(), "update")) return 1;
  Transferred(r);
  Mirrored("update");

  Step("tandem status (through site b's daemon)");
  ordered_json report = Status('b');
  PrintReport(report);
  Check(report.value("healthy", false), "healthy");
  for (char site : {'a', 'b'}) {
    absl::StatusOr<ordered_json> c = Pool(site)->Check(false);
    Check(c.ok() && (*c)["problems"].empty(),
          absl::StrCat("pool check ", std::string(1, site), "/p: consistent"));
  }
  Step("stop both daemons (SIGTERM)");
  Check(a_->Stop() == 0 && b_->Stop() == 0, "both exit 0");
  return failures == 0 ? 0 : 1;
}

}  // namespace

int RunDaemonDemo(const std::string& dir_arg, uint64_t volume_bytes,
                  const char* self) {
  char exe[PATH_MAX];
  ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  std::string bin = n > 0 ? std::string(exe, n) : std::string(self);
  std::string tandemd = bin.substr(0, bin.rfind('/') + 1) + "tandemd";
  if (access(tandemd.c_str(), X_OK) != 0) {
    std::printf(
        "demo: no tandemd next to %s; build it, or run `tandem demo "
        "--local`\n",
        bin.c_str());
    return 1;
  }
  std::string dir = dir_arg;
  const bool temporary = dir.empty();
  if (temporary) {
    const char* tmp = std::getenv("TMPDIR");
    std::string tmpl =
        absl::StrCat(tmp != nullptr ? tmp : "/tmp", "/tandem-demo-XXXXXX");
    if (mkdtemp(tmpl.data()) == nullptr) {
      std::perror("tandem demo: mkdtemp");
      return 1;
    }
    dir = tmpl;
  } else if (mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST) {
    std::perror(("tandem demo: mkdir " + dir).c_str());
    return 1;
  }
  char resolved[PATH_MAX];
  if (realpath(dir.c_str(), resolved) != nullptr) dir = resolved;
  int rc = 1;
  std::string logs;
  {
    Drill drill(dir, volume_bytes, tandemd);
    rc = drill.Run();
  }  // daemons stopped
  if (rc != 0) {
    for (const char* site : {"a", "b"}) {
      std::ifstream f(absl::StrCat(dir, "/", site, ".log"));
      std::string line;
      std::printf("\n-- site %s's daemon log:\n", site);
      while (std::getline(f, line)) std::printf("  %s\n", line.c_str());
    }
  }
  if (temporary) {
    for (const char* f : {"site-a.pool", "site-b.pool", "a.toml", "b.toml",
                          "a.log", "b.log", "a.crt", "a.key", "b.crt", "b.key",
                          "demo-ca.crt", "a.sock", "b.sock"}) {
      unlink(absl::StrCat(dir, "/", f).c_str());
    }
    rmdir(dir.c_str());
  }
  std::printf("%s\n", rc == 0 ? "demo: all checks passed" : "demo: FAILED");
  return rc;
}

}  // namespace tools
