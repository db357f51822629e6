// tandemd's NBD exports through the clients Linux users have (nbdinfo and
// nbdcopy from libnbd-bin, qemu-img and qemu-io from qemu-utils), and
// through a raw client for what no well-behaved client sends: writes to a
// read-only export, malformed and hostile requests, a client killed
// mid-write. Two tandemd processes on 127.0.0.1, ports picked by the test.
#include "transport/nbd.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <optional>
#include <set>
#include <string>
#include <thread>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/daemons.h"

namespace {

namespace nbd = transport::nbd;
using ::testing::HasSubstr;
using ::testing::Not;
using testing_util::Exec;
using testing_util::RandomBytes;
using testing_util::Result;
using testing_util::SameBytes;
using testing_util::Slurp;
using testing_util::Spit;
using testing_util::TwoDaemons;
using json = nlohmann::json;

const std::string kA = "a/p:vol";
const std::string kB = "b/p:vol";

TwoDaemons::Options WithNbd() {
  TwoDaemons::Options o;
  o.nbd = true;
  o.security = "plaintext";
  return o;
}

void Up(TwoDaemons& d) {
  ASSERT_TRUE(d.Start("a")) << d.Log("a");
  ASSERT_TRUE(d.Start("b")) << d.Log("b");
  d.Ok("a", {"volume", "create", "--pool", "p", "vol", "--size", "16M"});
  d.Ok("a", {"write", "--pool", "p", "vol"}, RandomBytes(16 << 20, 1));
}

// A client program found on PATH (nbdinfo, nbdcopy, qemu-img, qemu-io).
Result Client(TwoDaemons& d, std::vector<std::string> argv) {
  argv.insert(argv.begin(), "/usr/bin/env");
  return Exec(d.dir(), argv);
}

// A client that speaks NBD byte by byte: simple replies only, blocking.
class RawClient {
 public:
  explicit RawClient(int port) {
    absl::StatusOr<transport::Fd> fd = transport::ConnectTcp(
        {"127.0.0.1", port}, transport::After(std::chrono::seconds(5)));
    EXPECT_TRUE(fd.ok()) << fd.status();
    if (!fd.ok()) return;
    fd_ = std::move(*fd);
    fcntl(fd_.get(), F_SETFL, fcntl(fd_.get(), F_GETFL) & ~O_NONBLOCK);
    timeval tv{5, 0};
    setsockopt(fd_.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  }

  // Greeting, flags, NBD_OPT_GO: the transmission flags, or nullopt.
  std::optional<uint16_t> Go(const std::string& name) {
    std::string greeting = Recv(18);
    if (greeting.size() != 18) return std::nullopt;
    Send(Be(nbd::kFlagFixedNewstyle | nbd::kFlagNoZeroes, 4));
    std::string data = Be(name.size(), 4) + name + Be(0, 2);
    Send(Be(nbd::kOptMagic, 8) + Be(nbd::kOptGo, 4) + Be(data.size(), 4) +
         data);
    std::optional<uint16_t> flags;
    for (;;) {
      std::string h = Recv(20);
      if (h.size() != 20) return std::nullopt;
      const uint32_t type = static_cast<uint32_t>(Get(h, 12, 4));
      std::string payload = Recv(Get(h, 16, 4));
      if (type == nbd::kRepInfo && Get(payload, 0, 2) == nbd::kInfoExport) {
        flags = static_cast<uint16_t>(Get(payload, 10, 2));
      }
      if (type == nbd::kRepAck) return flags;
      if (type != nbd::kRepInfo) return std::nullopt;
    }
  }

  void Request(uint16_t type, uint64_t offset, uint32_t length,
               const std::string& payload = "", uint16_t flags = 0,
               uint64_t cookie = 7) {
    Send(Be(nbd::kRequestMagic, 4) + Be(flags, 2) + Be(type, 2) +
         Be(cookie, 8) + Be(offset, 8) + Be(length, 4) + payload);
  }
  // A simple reply's error (and `data_length` bytes of data when it is 0);
  // nullopt if the connection ended instead.
  std::optional<uint32_t> Reply(size_t data_length = 0,
                                std::string* data = nullptr) {
    std::string h = Recv(16);
    if (h.size() != 16) return std::nullopt;
    EXPECT_EQ(Get(h, 0, 4), nbd::kSimpleReplyMagic);
    const uint32_t error = static_cast<uint32_t>(Get(h, 4, 4));
    if (error == 0 && data_length > 0) {
      std::string d = Recv(data_length);
      if (data != nullptr) *data = d;
    }
    return error;
  }
  // True once the server has closed the connection (within 5 s).
  bool Closed() {
    char c;
    return recv(fd_.get(), &c, 1, 0) == 0;
  }
  void Send(const std::string& bytes) {
    send(fd_.get(), bytes.data(), bytes.size(), MSG_NOSIGNAL);
  }
  std::string Recv(size_t n) {
    std::string out(n, '\0');
    size_t got = 0;
    while (got < n) {
      ssize_t r = recv(fd_.get(), out.data() + got, n - got, 0);
      if (r <= 0) break;
      got += static_cast<size_t>(r);
    }
    out.resize(got);
    return out;
  }
  static std::string Be(uint64_t v, int bytes) {
    std::string out;
    for (int i = bytes - 1; i >= 0; --i)
      out.push_back(static_cast<char>(v >> (8 * i)));
    return out;
  }
  static uint64_t Get(const std::string& s, size_t at, int bytes) {
    uint64_t v = 0;
    for (int i = 0; i < bytes && at + i < s.size(); ++i) {
      v = (v << 8) | static_cast<uint8_t>(s[at + i]);
    }
    return v;
  }

 private:
  transport::Fd fd_;
};

TEST(NbdTest, RealClientsListCopyCompareAndEdit) {
  TwoDaemons d(WithNbd());
  Up(d);
  const std::string snap = d.Read("a", "vol");
  d.Ok("a", {"snapshot", "create", "--pool", "p", "vol@s"});

  // nbdinfo lists every export with its size and mode.
  Result r = Client(d, {"nbdinfo", "--list", "--json", d.NbdUri("a", "")});
  ASSERT_EQ(r.code, 0) << r.err;
  std::map<std::string, json> exports;
  const json listed = json::parse(r.out);
  for (const json& e : listed["exports"]) {
    exports[e["export-name"].get<std::string>()] = e;
  }
  ASSERT_TRUE(exports.contains("p/vol")) << r.out;
  ASSERT_TRUE(exports.contains("p/vol@s")) << r.out;
  EXPECT_EQ(exports["p/vol"]["export-size"], 16 << 20);
  EXPECT_EQ(exports["p/vol"]["is_read_only"], false);
  EXPECT_EQ(exports["p/vol@s"]["export-size"], 16 << 20);
  EXPECT_EQ(exports["p/vol@s"]["is_read_only"], true);
  EXPECT_EQ(exports["p/vol"]["block_size_preferred"], 65536);

  // nbdcopy a random file in and back out, byte for byte.
  const std::string data = RandomBytes(16 << 20, 2);
  Spit(d.dir() + "/in.raw", data);
  r = Client(d, {"nbdcopy", d.dir() + "/in.raw", d.NbdUri("a", "p/vol")});
  ASSERT_EQ(r.code, 0) << r.err;
  r = Client(d, {"nbdcopy", d.NbdUri("a", "p/vol"), d.dir() + "/out.raw"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_TRUE(Slurp(d.dir() + "/out.raw") == data);
  EXPECT_TRUE(d.Read("a", "vol") == data);

  // qemu-img: the snapshot export equals the raw image of the snapshot,
  // and the volume (changed since) does not.
  Spit(d.dir() + "/snap.raw", snap);
  r = Client(d, {"qemu-img", "compare", "-f", "raw", "-F", "raw",
                 d.dir() + "/snap.raw", d.NbdUri("a", "p/vol@s")});
  EXPECT_EQ(r.code, 0) << r.out << r.err;
  r = Client(d, {"qemu-img", "compare", "-f", "raw", "-F", "raw",
                 d.dir() + "/snap.raw", d.NbdUri("a", "p/vol")});
  EXPECT_EQ(r.code, 1) << r.out << r.err;

  // qemu-io: unaligned writes and reads, a discard, write-zeroes, flush.
  r = Client(d, {"qemu-io",
                 "-f",
                 "raw",
                 "-c",
                 "write -P 0xab 1000 3000",
                 "-c",
                 "read -P 0xab 1000 3000",
                 "-c",
                 "write -P 0x5c 65535 2",
                 "-c",
                 "discard 1M 2M",
                 "-c",
                 "write -z 4M 1M",
                 "-c",
                 "write -z 5000 100",
                 "-c",
                 "flush",
                 "-c",
                 "read -P 0 1M 2M",
                 d.NbdUri("a", "p/vol")});
  ASSERT_EQ(r.code, 0) << r.out << r.err;
  EXPECT_THAT(r.out, Not(HasSubstr("fail"))) << r.out;
  std::string want = data;
  want.replace(1000, 3000, std::string(3000, '\xab'));
  want.replace(65535, 2, std::string(2, '\x5c'));
  want.replace(1 << 20, 2 << 20, std::string(2 << 20, '\0'));
  want.replace(4 << 20, 1 << 20, std::string(1 << 20, '\0'));
  want.replace(5000, 100, std::string(100, '\0'));
  EXPECT_TRUE(d.Read("a", "vol") == want);

  // The trimmed and zeroed ranges are holes to nbdinfo --map (so nbdcopy
  // and qemu-img skip them), the rest is data.
  r = Client(d, {"nbdinfo", "--map", d.NbdUri("a", "p/vol")});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("1048576     2097152    3  hole,zero")) << r.out;
  EXPECT_THAT(r.out, HasSubstr("4194304     1048576    3  hole,zero")) << r.out;
  EXPECT_THAT(r.out, HasSubstr("         0     1048576    0  data")) << r.out;
}

TEST(NbdTest, AMirrorDestinationIsReadOnlyAndRoleChangesReachClients) {
  TwoDaemons d(WithNbd());
  Up(d);
  d.Ok("a", {"relationship", "create", "--source", kA, "--destination", kB});
  d.Ok("b", {"relationship", "initialize", kB});
  const std::string mirrored = d.Read("b", "vol");
  ASSERT_EQ(mirrored, d.Read("a", "vol"));

  Result r = Client(d, {"nbdinfo", "--json", d.NbdUri("b", "p/vol")});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(json::parse(r.out)["exports"][0]["is_read_only"], true) << r.out;

  // qemu-io will not open it for writing (the export says read-only) ...
  r = Client(d, {"qemu-io", "-f", "raw", "-c", "write -P 0x77 0 4096",
                 d.NbdUri("b", "p/vol")});
  EXPECT_NE(r.code, 0);
  EXPECT_THAT(r.err, HasSubstr("Could not open image: Permission denied"))
      << r.out << r.err;
  // ... and a write sent anyway gets EPERM and changes nothing.
  RawClient c(d.nbd_port("b"));
  std::optional<uint16_t> flags = c.Go("p/vol");
  ASSERT_TRUE(flags.has_value());
  EXPECT_NE(*flags & nbd::kReadOnly, 0);
  c.Request(nbd::kCmdWrite, 0, 4096, std::string(4096, 'w'));
  EXPECT_EQ(c.Reply(), nbd::kEperm);
  c.Request(nbd::kCmdTrim, 0, 1 << 20);
  EXPECT_EQ(c.Reply(), nbd::kEperm);
  std::string got;
  c.Request(nbd::kCmdRead, 0, 4096);
  EXPECT_EQ(c.Reply(4096, &got), 0u);
  EXPECT_EQ(got, mirrored.substr(0, 4096));
  EXPECT_TRUE(SameBytes(d.Read("b", "vol"), mirrored));

  // `tandem status --exports` and /metrics show the export, its mode and
  // the connection (promtool checks the metrics where it is installed).
  std::string status = d.Ok("b", {"status", "--exports"});
  EXPECT_THAT(status, HasSubstr("p/vol  read-only  16 MiB  1 connection(s)"))
      << status;
  EXPECT_THAT(status, HasSubstr("read-only  3 requests, 2 errors")) << status;
  const std::string log = d.Log("b");
  const size_t at = log.find("metrics on port ");
  ASSERT_NE(at, std::string::npos) << log;
  Result metrics = Client(
      d, {"curl", "-sf",
          absl::StrCat("http://127.0.0.1:", std::stoi(log.substr(at + 16)),
                       "/metrics")});
  ASSERT_EQ(metrics.code, 0) << metrics.err;
  EXPECT_THAT(metrics.out,
              HasSubstr("tandem_nbd_export_read_only{export=\"p/vol\"} 1"));
  EXPECT_THAT(metrics.out,
              HasSubstr("tandem_nbd_export_connections{export=\"p/vol\"} 1"));
  Spit(d.dir() + "/metrics.txt", metrics.out);
  Result check = Client(
      d, {"sh", "-c",
          absl::StrCat("promtool check metrics < ", d.dir(), "/metrics.txt")});
  if (check.code != 127) {
    EXPECT_EQ(check.code, 0) << check.out << check.err;
  }

  // Break: the connected client is closed (its mode changed), and a new
  // connection is read-write.
  d.Ok("b", {"relationship", "break", kB, "--yes"});
  EXPECT_TRUE(c.Closed());
  RawClient c2(d.nbd_port("b"));
  flags = c2.Go("p/vol");
  ASSERT_TRUE(flags.has_value());
  EXPECT_EQ(*flags & nbd::kReadOnly, 0);
  c2.Request(nbd::kCmdWrite, 4096, 4096, std::string(4096, 'w'),
             nbd::kCmdFlagFua);
  EXPECT_EQ(c2.Reply(), 0u);
  EXPECT_EQ(d.Read("b", "vol").substr(4096, 4096), std::string(4096, 'w'));
  EXPECT_THAT(d.Log("b"), HasSubstr("changed mode"));

  // Reverse resync makes a the mirror destination: a's writable connection
  // is closed, and a's export is read-only; b's stays writable.
  RawClient on_a(d.nbd_port("a"));
  flags = on_a.Go("p/vol");
  ASSERT_TRUE(flags.has_value());
  EXPECT_EQ(*flags & nbd::kReadOnly, 0);
  d.Ok("a", {"relationship", "reverse-resync", kA, "--yes"});
  EXPECT_TRUE(on_a.Closed());
  EXPECT_TRUE(SameBytes(d.Read("a", "vol"), d.Read("b", "vol")));
  RawClient a2(d.nbd_port("a"));
  flags = a2.Go("p/vol");
  ASSERT_TRUE(flags.has_value());
  EXPECT_NE(*flags & nbd::kReadOnly, 0);
  c2.Request(nbd::kCmdRead, 4096, 4096);
  EXPECT_EQ(c2.Reply(4096, &got), 0u);  // b's connection goes on
  EXPECT_EQ(got, std::string(4096, 'w'));

  // Re-establish: a is the source again (writable), b the destination.
  d.Ok("b", {"relationship", "reestablish", kB, "--yes"});
  EXPECT_TRUE(a2.Closed());
  EXPECT_TRUE(c2.Closed());
  RawClient a3(d.nbd_port("a")), b3(d.nbd_port("b"));
  flags = a3.Go("p/vol");
  ASSERT_TRUE(flags.has_value());
  EXPECT_EQ(*flags & nbd::kReadOnly, 0);
  flags = b3.Go("p/vol");
  ASSERT_TRUE(flags.has_value());
  EXPECT_NE(*flags & nbd::kReadOnly, 0);
}

// An update applying underneath a read-only export: every read returns the
// content of one update, never a mix. Each update rewrites the whole 24 MiB
// volume with one byte value; a reader keeps reading all of it (more than
// the store resolves in one batch, 16 MiB).
TEST(NbdTest, ReadsUnderAnUpdateSeeOneSnapshotOrTheNext) {
  TwoDaemons d(WithNbd());
  ASSERT_TRUE(d.Start("a")) << d.Log("a");
  ASSERT_TRUE(d.Start("b")) << d.Log("b");
  constexpr size_t kSize = 24 << 20;
  d.Ok("a", {"volume", "create", "--pool", "p", "vol", "--size", "24M"});
  d.Ok("a", {"write", "--pool", "p", "vol"}, std::string(kSize, '\x01'));
  d.Ok("a", {"relationship", "create", "--source", kA, "--destination", kB});
  d.Ok("b", {"relationship", "initialize", kB});
  std::atomic<bool> done{false};
  std::thread updates([&] {
    for (int g = 2; g <= 9; ++g) {
      d.Ok("a", {"write", "--pool", "p", "vol"},
           std::string(kSize, static_cast<char>(g)));
      d.Ok("a", {"relationship", "update", kA});
    }
    done = true;
  });
  RawClient c(d.nbd_port("b"));
  ASSERT_TRUE(c.Go("p/vol").has_value());
  std::set<char> seen;
  int reads = 0, mixed = 0;
  while (!done.load()) {
    std::string got;
    c.Request(nbd::kCmdRead, 0, kSize);
    ASSERT_EQ(c.Reply(kSize, &got), 0u);
    ASSERT_EQ(got.size(), kSize);
    ++reads;
    if (got.find_first_not_of(got[0]) != std::string::npos) ++mixed;
    seen.insert(got[0]);
  }
  updates.join();
  EXPECT_EQ(mixed, 0) << "of " << reads << " reads";
  EXPECT_GE(seen.size(), 3u) << reads << " reads saw too few updates";
  std::string last;
  c.Request(nbd::kCmdRead, 0, kSize);
  ASSERT_EQ(c.Reply(kSize, &last), 0u);
  EXPECT_TRUE(last == std::string(kSize, '\x09'));
}

TEST(NbdTest, HostileClientsAndAKilledWriterLeaveThePoolWhole) {
  TwoDaemons d(WithNbd());
  Up(d);
  const int port = d.nbd_port("a");

  // Flushed data, then a write cut off halfway through its payload.
  const std::string flushed = RandomBytes(1 << 20, 3);
  {
    RawClient c(port);
    ASSERT_TRUE(c.Go("p/vol").has_value());
    c.Request(nbd::kCmdWrite, 2 << 20, 1 << 20, flushed);
    EXPECT_EQ(c.Reply(), 0u);
    c.Request(nbd::kCmdFlush, 0, 0);
    EXPECT_EQ(c.Reply(), 0u);
    c.Request(nbd::kCmdWrite, 8 << 20, 1 << 20, RandomBytes(512 << 10, 4));
  }  // closed mid-payload

  // Requests the server refuses and goes on.
  {
    RawClient c(port);
    ASSERT_TRUE(c.Go("p/vol").has_value());
    c.Request(nbd::kCmdRead, 16 << 20, 1);  // past the end
    EXPECT_EQ(c.Reply(), nbd::kEinval);
    c.Request(nbd::kCmdWrite, (16 << 20) - 10, 20, std::string(20, 'x'));
    EXPECT_EQ(c.Reply(), nbd::kEinval);
    c.Request(42, 0, 0);  // unknown command
    EXPECT_EQ(c.Reply(), nbd::kEinval);
    c.Request(nbd::kCmdRead, 0, 4096, "", 1 << 9);  // unknown flag
    EXPECT_EQ(c.Reply(), nbd::kEinval);
    c.Request(nbd::kCmdBlockStatus, 0, 4096);  // no context negotiated
    EXPECT_EQ(c.Reply(), nbd::kEinval);
    c.Request(nbd::kCmdRead, 0, 64 << 20);  // larger than announced
    EXPECT_EQ(c.Reply(), nbd::kEoverflow);
    std::string got;
    c.Request(nbd::kCmdRead, 2 << 20, 1 << 20);
    EXPECT_EQ(c.Reply(1 << 20, &got), 0u);
    EXPECT_TRUE(got == flushed);
  }
  // Requests after which the stream cannot go on: the server hangs up.
  {
    RawClient c(port);
    ASSERT_TRUE(c.Go("p/vol").has_value());
    c.Send(std::string(28, 'x'));  // bad magic
    EXPECT_TRUE(c.Closed());
  }
  {
    RawClient c(port);
    ASSERT_TRUE(c.Go("p/vol").has_value());
    c.Request(nbd::kCmdWrite, 0, 64 << 20);  // payload too large to read
    EXPECT_TRUE(c.Closed());
  }
  {
    RawClient c(port);
    EXPECT_EQ(c.Recv(18).size(), 18u);
    c.Send(RawClient::Be(0xff, 4));  // unknown client flags
    EXPECT_TRUE(c.Closed());
  }
  {
    RawClient c(port);
    EXPECT_EQ(c.Recv(18).size(), 18u);
    c.Send(RawClient::Be(1, 4) + RawClient::Be(nbd::kOptMagic, 8) +
           RawClient::Be(nbd::kOptGo, 4) + RawClient::Be(1u << 30, 4));
    EXPECT_TRUE(c.Closed());  // a 1 GiB option
  }
  {
    RawClient c(port);
    EXPECT_FALSE(c.Go("p/nope").has_value());  // NBD_REP_ERR_UNKNOWN
  }
  // A flood of garbage from 64 connections at once.
  std::vector<std::thread> flood;
  for (int i = 0; i < 64; ++i) {
    flood.emplace_back([port, i] {
      RawClient c(port);
      c.Recv(18);
      c.Send(RandomBytes(4096, 100 + i));
    });
  }
  for (std::thread& t : flood) t.join();

  // A real client killed mid-copy (into another volume).
  d.Ok("a", {"volume", "create", "--pool", "p", "w", "--size", "64M"});
  Spit(d.dir() + "/big.raw", RandomBytes(64 << 20, 5));
  pid_t pid = fork();
  if (pid == 0) {
    execlp("nbdcopy", "nbdcopy", (d.dir() + "/big.raw").c_str(),
           d.NbdUri("a", "p/w").c_str(), nullptr);
    _exit(127);
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  kill(pid, SIGKILL);
  waitpid(pid, nullptr, 0);

  // Still serving; after a crash of the daemon the pool checks clean and
  // the flushed data is there.
  Result r = Client(d, {"nbdinfo", "--list", d.NbdUri("a", "")});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("p/w"));
  EXPECT_EQ(d.Stop("a", SIGKILL), -SIGKILL);
  r = d.Tandem({"pool", "check", d.Pool("a")});
  EXPECT_EQ(r.code, 0) << r.out << r.err;
  ASSERT_TRUE(d.Start("a")) << d.Log("a");
  EXPECT_TRUE(d.Read("a", "vol").substr(2 << 20, 1 << 20) == flushed);
  EXPECT_THAT(d.Log("a"), HasSubstr("request magic"));

  // With an allow-list, other addresses are closed before the greeting.
  EXPECT_EQ(d.Stop("a"), 0);
  d.WriteConfig("a", "nbd_allow = [\"192.0.2.7\"]\n");
  ASSERT_TRUE(d.Start("a")) << d.Log("a");
  {
    RawClient c(port);
    EXPECT_EQ(c.Recv(18), "");
  }
  r = Client(d, {"nbdinfo", "--list", d.NbdUri("a", "")});
  EXPECT_NE(r.code, 0);
  EXPECT_THAT(d.Log("a"), HasSubstr("refused: not in nbd_allow"));
}

// `nbdfuse` serving `uri` as the file DIR/nbd: started, waited for,
// unmounted (and reaped) when it goes out of scope.
class FuseFile {
 public:
  FuseFile(const std::string& dir, const std::string& uri) : dir_(dir) {
    mkdir(dir.c_str(), 0700);
    const std::string pidfile = dir + ".pid";
    unlink(pidfile.c_str());
    pid_ = fork();
    if (pid_ == 0) {
      execlp("nbdfuse", "nbdfuse", "-P", pidfile.c_str(), dir.c_str(),
             uri.c_str(), nullptr);
      _exit(127);
    }
    for (int i = 0; i < 500 && access(pidfile.c_str(), F_OK) != 0; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    ready_ = access(pidfile.c_str(), F_OK) == 0;
  }
  ~FuseFile() {
    Exec(dir_, {"/usr/bin/env", "fusermount3", "-u", dir_});
    for (int i = 0; i < 500; ++i) {
      if (waitpid(pid_, nullptr, WNOHANG) == pid_) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
  }
  bool ready() const { return ready_; }
  std::string file() const { return dir_ + "/nbd"; }

 private:
  std::string dir_;
  pid_t pid_ = -1;
  bool ready_ = false;
};

Result Sh(TwoDaemons& d, const std::string& command) {
  return Exec(d.dir(), {"/bin/sh", "-c", command});
}

// The seed's mount steps for real: the source export as a file (nbdfuse),
// ext4 on it, loop-mounted and written; the relationship updates, the
// mirror breaks, and the destination's export, mounted the same way, has
// the same files and a clean file system.
TEST(NbdTest, TheSeedsMountStepsThroughNbdfuseAndExt4) {
  for (const char* tool : {"nbdfuse", "fusermount3", "mkfs.ext4", "e2fsck"}) {
    if (std::system(absl::StrCat("command -v ", tool, " >/dev/null").c_str()) !=
        0) {
      GTEST_SKIP() << tool << " is not installed (fuse3, e2fsprogs)";
    }
  }
  if (access("/dev/fuse", R_OK | W_OK) != 0 ||
      access("/dev/loop-control", R_OK | W_OK) != 0) {
    GTEST_SKIP() << "no FUSE or loop devices on this machine";
  }
  TwoDaemons d(WithNbd());
  ASSERT_TRUE(d.Start("a")) << d.Log("a");
  ASSERT_TRUE(d.Start("b")) << d.Log("b");
  d.Ok("a", {"volume", "create", "--pool", "p", "vol", "--size", "64M"});
  const std::string mnt = d.dir() + "/mnt";
  mkdir(mnt.c_str(), 0700);
  absl::Cleanup unmount = [&] { Sh(d, "umount " + mnt + " 2>/dev/null"); };
  const std::string files = RandomBytes(3 << 20, 6);
  Spit(d.dir() + "/files.bin", files);
  {
    FuseFile f(d.dir() + "/fa", d.NbdUri("a", "p/vol"));
    ASSERT_TRUE(f.ready());
    Result r =
        Sh(d, absl::StrCat("mkfs.ext4 -q -F ", f.file(), " && mount -o loop ",
                           f.file(), " ", mnt, " && cp ", d.dir(),
                           "/files.bin ", mnt, "/b.bin && echo hello > ", mnt,
                           "/a.txt && sync && umount ", mnt));
    ASSERT_EQ(r.code, 0) << r.out << r.err;
  }
  d.Ok("a", {"relationship", "create", "--source", kA, "--destination", kB});
  d.Ok("b", {"relationship", "initialize", kB});
  {
    // More files after the baseline: the update carries them.
    FuseFile f(d.dir() + "/fa", d.NbdUri("a", "p/vol"));
    ASSERT_TRUE(f.ready());
    Result r =
        Sh(d, absl::StrCat("mount -o loop ", f.file(), " ", mnt, " && mkdir ",
                           mnt, "/later && cp ", d.dir(), "/files.bin ", mnt,
                           "/later/c.bin && sync && umount ", mnt));
    ASSERT_EQ(r.code, 0) << r.out << r.err;
  }
  d.Ok("a", {"relationship", "update", kA});
  d.Ok("b", {"relationship", "break", kB, "--yes"});
  {
    FuseFile f(d.dir() + "/fb", d.NbdUri("b", "p/vol"));
    ASSERT_TRUE(f.ready());
    Result r = Sh(d, "e2fsck -n " + f.file());
    EXPECT_EQ(r.code, 0) << r.out << r.err;
    r = Sh(d, absl::StrCat("mount -o loop ", f.file(), " ", mnt));
    ASSERT_EQ(r.code, 0) << r.out << r.err;
    EXPECT_EQ(Slurp(mnt + "/a.txt"), "hello\n");
    EXPECT_TRUE(Slurp(mnt + "/b.bin") == files);
    EXPECT_TRUE(Slurp(mnt + "/later/c.bin") == files);
    // Read-write after break: a file written here stays.
    Spit(mnt + "/after-break.txt", "mine\n");
    r = Sh(d, "sync && umount " + mnt);
    EXPECT_EQ(r.code, 0) << r.out << r.err;
  }
  FuseFile f(d.dir() + "/fb", d.NbdUri("b", "p/vol"));
  ASSERT_TRUE(f.ready());
  Result r = Sh(d, "e2fsck -n " + f.file());
  EXPECT_EQ(r.code, 0) << r.out << r.err;
}

}  // namespace
