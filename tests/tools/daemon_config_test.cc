// tandemd's config: the documented example parses to what it says, paths
// resolve against the file's folder, and each mistake names its key.
#include "tools/daemon_config.h"

#include <cstdio>
#include <fstream>
#include <string>

#include "absl/cleanup/cleanup.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace tools {
namespace {

using ::testing::HasSubstr;

TEST(DaemonConfigTest, TheDocumentedExampleIsValid) {
  absl::StatusOr<DaemonConfig> c =
      LoadDaemonConfig(std::string(SOURCE_DIR) + "/docs/tandemd.example.toml");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->site, "a");
  EXPECT_EQ(c->listen.ToString(), "127.0.0.1:7601");
  EXPECT_EQ(c->control, "/run/tandem/a.sock");
  ASSERT_TRUE(c->metrics.has_value());
  EXPECT_EQ(c->metrics->port, 9601);
  EXPECT_EQ(c->checkpoint_bytes, 64u << 20);
  EXPECT_EQ(c->security.mode, transport::SecurityConfig::Mode::kCertificates);
  EXPECT_EQ(c->security.cert_file, std::string(SOURCE_DIR) + "/docs/a.crt");
  EXPECT_EQ(c->pools.at("p"), "/srv/a.pool");
  EXPECT_EQ(c->peers.at("b").port, 7602);
  EXPECT_EQ(c->timeout.count(), 10000);
  ASSERT_TRUE(c->nbd.has_value());
  EXPECT_EQ(c->nbd->ToString(), "127.0.0.1:10809");
  EXPECT_TRUE(c->nbd_allow.empty());
}

TEST(DaemonConfigTest, NbdOffLoopbackNeedsAnAllowList) {
  const std::string dir = ::testing::TempDir();
  absl::Cleanup remove = [&] { std::remove((dir + "/n.toml").c_str()); };
  auto load = [&](const std::string& text) {
    std::ofstream(dir + "/n.toml")
        << "site = \"a\"\nlisten = \"127.0.0.1:1\"\ncontrol = \"a.sock\"\n"
        << "insecure_plaintext = true\n"
        << text << "[pools]\np = \"p\"\n";
    return LoadDaemonConfig(dir + "/n.toml");
  };
  absl::StatusOr<DaemonConfig> c = load("nbd = \"[::1]:10809\"\n");
  ASSERT_TRUE(c.ok()) << c.status();
  c = load("nbd = \"0.0.0.0:10809\"\nnbd_allow = [\"192.0.2.7\", \"::1\"]\n");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->nbd_allow, (std::set<std::string>{"192.0.2.7", "::1"}));
  c = load("nbd = \"0.0.0.0:10809\"\n");
  ASSERT_FALSE(c.ok());
  EXPECT_THAT(c.status().message(),
              HasSubstr("key 'nbd': '0.0.0.0:10809' is not loopback: list the "
                        "clients allowed in nbd_allow"));
  c = load("nbd = \"0.0.0.0:10809\"\nnbd_allow = [\"somehost\"]\n");
  ASSERT_FALSE(c.ok());
  EXPECT_THAT(c.status().message(),
              HasSubstr("key 'nbd_allow': every entry must be an IP address"));
  c = load("nbd = \"10809\"\n");
  ASSERT_FALSE(c.ok());
  EXPECT_THAT(c.status().message(), HasSubstr("key 'nbd': "));
}

TEST(DaemonConfigTest, PskAndPlaintextAndTheirMistakes) {
  const std::string dir = ::testing::TempDir();
  absl::Cleanup remove = [&] { std::remove((dir + "/c.toml").c_str()); };
  auto load = [&](const std::string& text) {
    std::ofstream(dir + "/c.toml") << text;
    return LoadDaemonConfig(dir + "/c.toml");
  };
  const std::string head =
      "site = \"b\"\nlisten = \"[::1]:7602\"\ncontrol = \"b.sock\"\n";
  absl::StatusOr<DaemonConfig> c =
      load(head + "[tls]\npsk = \"k\"\n[pools]\nq = \"/dev/sdb\"\n");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->security.mode, transport::SecurityConfig::Mode::kPsk);
  EXPECT_EQ(c->security.psk_file, dir + "/k");
  EXPECT_EQ(c->listen.host, "::1");
  EXPECT_EQ(c->control, dir + "/b.sock");
  c = load(head + "insecure_plaintext = true\n[pools]\nq = \"q\"\n");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->security.mode, transport::SecurityConfig::Mode::kPlaintext);
  EXPECT_TRUE(c->peers.empty());
  struct Case {
    std::string text, want;
  } cases[] = {
      {head + "insecure_plaintext = true\n[tls]\npsk = \"k\"\n[pools]\nq = "
              "\"q\"\n",
       "key 'insecure_plaintext': set either [tls] or"},
      {head + "[tls]\npsk = \"k\"\ncert = \"c\"\n[pools]\nq = \"q\"\n",
       "key 'tls.psk': give psk alone"},
      {head + "[tls]\npsk = \"k\"\n[pools]\n", "key 'pools': missing"},
      {head + "[tls]\npsk = \"k\"\n[pools]\n\"a/b\" = \"q\"\n",
       "key 'pools.a/b': is not a pool name"},
      {head + "[tls]\npsk = \"k\"\n[pools]\nq = \"q\"\n[peers]\nb = \"x:1\"\n",
       "key 'peers.b': is this daemon's own site"},
      {head + "[tls]\npsk = \"k\"\n[pools]\nq = \"q\"\n[peers]\na = \"nope\"\n",
       "key 'peers.a': 'nope' is not HOST:PORT"},
      {head + "timeout = \"soon\"\n",
       "key 'timeout': 'soon' is not a duration"},
  };
  for (const Case& k : cases) {
    absl::StatusOr<DaemonConfig> bad = load(k.text);
    EXPECT_FALSE(bad.ok()) << k.text;
    EXPECT_THAT(bad.status().message(), HasSubstr(k.want)) << k.text;
  }
}

}  // namespace
}  // namespace tools
