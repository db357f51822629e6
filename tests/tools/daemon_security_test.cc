// Hostile and mistaken peers against a real tandemd: each is refused before
// any message of theirs is parsed, logged, and the daemon goes on serving
// the good peer. With encryption on, what crosses between two daemons never
// shows the data.
#include <openssl/ssl.h>
#include <sys/socket.h>

#include <chrono>
#include <string>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "blockstore/util.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/daemons.h"
#include "transport/channel.h"
#include "transport/connection.h"
#include "transport/peer.h"
#include "transport/remote_site.h"

namespace {

using ::testing::HasSubstr;
using testing_util::Result;
using testing_util::SameBytes;
using testing_util::TwoDaemons;
using transport::SecurityConfig;

transport::PeerOptions As(const std::string& site) {
  transport::PeerOptions o;
  o.site = site;
  o.handshake_timeout = std::chrono::seconds(3);
  return o;
}

SecurityConfig Certs(TwoDaemons& d, const std::string& name,
                     const std::string& ca = "ca") {
  SecurityConfig c;
  c.mode = SecurityConfig::Mode::kCertificates;
  c.cert_file = absl::StrCat(d.dir(), "/", name, ".crt");
  c.key_file = absl::StrCat(d.dir(), "/", name, ".key");
  c.ca_file = absl::StrCat(d.dir(), "/", ca, ".crt");
  return c;
}

// Site b, properly: it connects and a Site call works.
absl::Status GoodPeer(TwoDaemons& d) {
  absl::StatusOr<std::unique_ptr<transport::Security>> sec =
      transport::Security::Create(Certs(d, "b"));
  if (!sec.ok()) return sec.status();
  transport::PeerClient client("a", {"127.0.0.1", d.port("a")}, **sec, As("b"));
  transport::ConnectionPool pool(client);
  transport::RemoteSite site(pool, "p");
  return site.Info().status();
}

// Connects with `config` as `site`; the error it gets.
absl::Status TryAs(TwoDaemons& d, const SecurityConfig& config,
                   const std::string& site, const std::string& dial = "a") {
  absl::StatusOr<std::unique_ptr<transport::Security>> sec =
      transport::Security::Create(config);
  if (!sec.ok()) return sec.status();
  transport::PeerClient client(dial, {"127.0.0.1", d.port("a")}, **sec,
                               As(site));
  absl::StatusOr<std::unique_ptr<transport::Connection>> c = client.Connect();
  if (!c.ok()) return c.status();
  // A connection the server dropped after the handshake fails its first call.
  transport::ConnectionPool pool(client);
  transport::RemoteSite s(pool, "p");
  return s.Info().status();
}

int Refusals(TwoDaemons& d) {
  std::string log = d.Log("a");
  int n = 0;
  for (size_t at = log.find("refused:"); at != std::string::npos;
       at = log.find("refused:", at + 1)) {
    ++n;
  }
  return n;
}

TEST(DaemonSecurityTest, EveryBadPeerIsRefusedAndTheGoodOneStillServed) {
  TwoDaemons d;
  ASSERT_TRUE(d.Start("a")) << d.Log("a");
  ASSERT_TRUE(GoodPeer(d).ok()) << GoodPeer(d);
  int refused = Refusals(d);
  auto expect_refused = [&](const absl::Status& s, const char* what,
                            const char* logged) {
    EXPECT_FALSE(s.ok()) << what;
    // Logged, and the daemon goes on serving the good peer.
    for (int i = 0; i < 100 && Refusals(d) <= refused; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    EXPECT_GT(Refusals(d), refused) << what << ": not logged\n" << d.Log("a");
    EXPECT_THAT(d.Log("a"), HasSubstr(logged)) << what;
    refused = Refusals(d);
    absl::Status good = GoodPeer(d);
    EXPECT_TRUE(good.ok()) << what << ": " << good;
  };

  // A certificate from another CA.
  expect_refused(TryAs(d, Certs(d, "mallory", "ca"), "mallory"),
                 "certificate from another CA", "TLS handshake failed");
  // A good certificate of b, claiming to be someone else.
  expect_refused(TryAs(d, Certs(d, "b"), "c"), "impersonation",
                 "says it is site 'c' but authenticated as 'b'");
  // A pre-shared key where the daemon wants certificates.
  SecurityConfig psk;
  psk.mode = SecurityConfig::Mode::kPsk;
  psk.psk_file = d.dir() + "/site.psk";
  expect_refused(TryAs(d, psk, "b"), "PSK against certificates",
                 "TLS handshake failed");

  // No client certificate at all (a plain TLS 1.3 client that trusts the CA).
  {
    SSL_CTX* ctx = SSL_CTX_new(TLS_client_method());
    SSL_CTX_load_verify_locations(ctx, (d.dir() + "/ca.crt").c_str(), nullptr);
    absl::StatusOr<transport::Fd> fd = transport::ConnectTcp(
        {"127.0.0.1", d.port("a")}, transport::After(std::chrono::seconds(3)));
    ASSERT_TRUE(fd.ok());
    int raw = fd->get();
    int flags = fcntl(raw, F_GETFL);
    fcntl(raw, F_SETFL, flags & ~O_NONBLOCK);
    SSL* ssl = SSL_new(ctx);
    SSL_set_fd(ssl, raw);
    int rc = SSL_connect(ssl);
    char byte;
    // TLS 1.3: the server checks the client's (missing) certificate after
    // the client's side of the handshake is done, and then closes.
    int n = rc == 1 ? SSL_read(ssl, &byte, 1) : -1;
    SSL_free(ssl);
    SSL_CTX_free(ctx);
    expect_refused(n > 0 ? absl::OkStatus() : absl::UnavailableError("closed"),
                   "no client certificate", "TLS handshake failed");
  }

  // Garbage instead of TLS.
  {
    absl::StatusOr<transport::Fd> fd = transport::ConnectTcp(
        {"127.0.0.1", d.port("a")}, transport::After(std::chrono::seconds(3)));
    ASSERT_TRUE(fd.ok());
    std::string junk = testing_util::RandomBytes(4096, 77);
    send(fd->get(), junk.data(), junk.size(), MSG_NOSIGNAL);
    char buf[64];
    ssize_t n = 0;
    for (int i = 0; i < 100; ++i) {
      n = recv(fd->get(), buf, sizeof(buf), MSG_DONTWAIT);
      if (n == 0 || (n < 0 && errno != EAGAIN)) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    expect_refused(n > 0 ? absl::OkStatus() : absl::UnavailableError("closed"),
                   "garbage", "TLS handshake failed");
  }

  // A TLS client that stalls mid-handshake: dropped after the handshake
  // time-out, and meanwhile the good peer is served.
  {
    absl::StatusOr<transport::Fd> fd = transport::ConnectTcp(
        {"127.0.0.1", d.port("a")}, transport::After(std::chrono::seconds(3)));
    ASSERT_TRUE(fd.ok());
    const char hello_start[] = {0x16, 0x03, 0x01, 0x02, 0x00, 0x01};
    send(fd->get(), hello_start, sizeof(hello_start), MSG_NOSIGNAL);
    EXPECT_TRUE(GoodPeer(d).ok()) << "served while another stalls";
    auto start = std::chrono::steady_clock::now();
    char buf[16];
    ssize_t n = -1;
    while (std::chrono::steady_clock::now() - start <
           std::chrono::seconds(10)) {
      n = recv(fd->get(), buf, sizeof(buf), MSG_DONTWAIT);
      if (n == 0 || (n < 0 && errno != EAGAIN)) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    EXPECT_LE(n, 0) << "the stalled client was never dropped";
    expect_refused(absl::UnavailableError("dropped"), "stalled handshake",
                   "TLS handshake timed out");
  }

  // An oversized frame after a valid handshake and HELLO.
  {
    absl::StatusOr<std::unique_ptr<transport::Security>> sec =
        transport::Security::Create(Certs(d, "b"));
    ASSERT_TRUE(sec.ok());
    absl::StatusOr<transport::Fd> fd = transport::ConnectTcp(
        {"127.0.0.1", d.port("a")}, transport::After(std::chrono::seconds(3)));
    ASSERT_TRUE(fd.ok());
    absl::StatusOr<std::unique_ptr<transport::Channel>> ch = (*sec)->Connect(
        std::move(*fd), "a", "b", transport::After(std::chrono::seconds(3)));
    ASSERT_TRUE(ch.ok()) << ch.status();
    auto frame = [](transport::FrameType type, uint32_t length,
                    std::span<const std::byte> payload) {
      std::vector<std::byte> out(transport::kFrameHeaderBytes);
      blockstore::PutLe32(out.data(), length);
      out[4] = static_cast<std::byte>(type);
      out.insert(out.end(), payload.begin(), payload.end());
      return out;
    };
    std::vector<std::byte> hello =
        transport::EncodeMessage({{"protocol", "tandem-peer"},
                                  {"min_version", 1},
                                  {"max_version", 1},
                                  {"site", "b"}});
    auto deadline = transport::After(std::chrono::seconds(3));
    ASSERT_TRUE(
        (*ch)
            ->WriteAll(frame(transport::FrameType::kHello, hello.size(), hello),
                       deadline)
            .ok());
    std::vector<std::byte> reply(256);
    ASSERT_TRUE((*ch)->ReadSome(reply, deadline).ok());
    // 100 MiB announced: the daemon must drop us without reading it.
    ASSERT_TRUE(
        (*ch)
            ->WriteAll(frame(transport::FrameType::kRequest, 100 << 20, {}),
                       deadline)
            .ok());
    absl::StatusOr<size_t> n = (*ch)->ReadSome(reply, deadline);
    while (n.ok() && *n > 0) n = (*ch)->ReadSome(reply, deadline);  // pings
    EXPECT_TRUE(!n.ok() || *n == 0) << "not dropped";
    for (int i = 0; i < 100 && !absl::StrContains(d.Log("a"), "over the limit");
         ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    EXPECT_THAT(d.Log("a"), HasSubstr("over the limit"));
    EXPECT_TRUE(GoodPeer(d).ok());
  }
}

TEST(DaemonSecurityTest, AWrongPreSharedKeyIsRefused) {
  testing_util::DaemonOptions o;
  o.security = "psk";
  TwoDaemons d(o);
  ASSERT_TRUE(d.Start("a")) << d.Log("a");
  ASSERT_TRUE(d.Start("b")) << d.Log("b");
  d.Ok("a", {"volume", "create", "--pool", "p", "vol", "--size", "1M"});
  d.Ok("a", {"relationship", "create", "--source", "a/p:vol", "--destination",
             "b/p:vol"});
  EXPECT_THAT(d.Ok("b", {"relationship", "initialize", "b/p:vol"}),
              HasSubstr("Mirrored, Idle"));
  testing_util::Spit(d.dir() + "/wrong.psk", std::string(64, 'd'));
  SecurityConfig wrong;
  wrong.mode = SecurityConfig::Mode::kPsk;
  wrong.psk_file = d.dir() + "/wrong.psk";
  absl::Status s = TryAs(d, wrong, "b");
  EXPECT_FALSE(s.ok());
  for (int i = 0; i < 100 && Refusals(d) == 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_THAT(d.Log("a"), HasSubstr("refused: TLS handshake failed"));
  // The right key still works.
  EXPECT_THAT(d.Ok("b", {"relationship", "update", "b/p:vol"}),
              HasSubstr("Mirrored, Idle"));
}

// A volume whose every chunk carries a marker, replicated through a proxy
// that records the bytes between the daemons.
std::string Captured(const std::string& security) {
  testing_util::DaemonOptions o;
  o.security = security;
  o.proxy_b_to_a = true;
  TwoDaemons d(o);
  EXPECT_TRUE(d.Start("a")) << d.Log("a");
  EXPECT_TRUE(d.Start("b")) << d.Log("b");
  const std::string marker = "TANDEM-SECRET-16";
  std::string data = testing_util::RandomBytes(4 << 20, 31);
  for (size_t at = 1000; at + marker.size() < data.size(); at += 64 << 10) {
    data.replace(at, marker.size(), marker);
  }
  d.Ok("a", {"volume", "create", "--pool", "p", "vol", "--size", "4M"});
  d.Ok("a", {"write", "--pool", "p", "vol"}, data);
  d.proxy("a").record = true;
  d.Ok("a", {"relationship", "create", "--source", "a/p:vol", "--destination",
             "b/p:vol"});
  d.Ok("b", {"relationship", "initialize", "b/p:vol"});
  EXPECT_TRUE(SameBytes(d.Read("b", "vol"), data));
  std::string wire = d.proxy("a").Captured();
  EXPECT_GT(wire.size(), 4u << 20);
  size_t hits = 0;
  for (size_t at = wire.find(marker); at != std::string::npos;
       at = wire.find(marker, at + 1)) {
    ++hits;
  }
  return absl::StrCat(hits);
}

TEST(DaemonSecurityTest, EncryptedTrafficNeverShowsTheData) {
  EXPECT_EQ(Captured("certificates"), "0");
  EXPECT_EQ(Captured("psk"), "0");
  // The check can see: without TLS the marker crosses in the clear.
  EXPECT_NE(Captured("plaintext"), "0");
}

}  // namespace
