// The two pools of the relationship tests, reached either in-process
// (LocalSite for both) or with pool "b" behind a real peer connection on
// loopback: a PeerServer in this process serves b's LocalSite over TCP and
// TLS 1.3 (pre-shared key), and the engine reaches it through RemoteSite,
// so every call, stream, claim and error crosses the transport.
#ifndef TANDEM_TESTS_TESTING_SITE_PAIR_H_
#define TANDEM_TESTS_TESTING_SITE_PAIR_H_

#include <unistd.h>

#include <cstdio>
#include <memory>
#include <string>

#include "engine/site.h"
#include "gtest/gtest.h"
#include "tests/testing/two_pools.h"
#include "transport/peer.h"
#include "transport/remote_site.h"

namespace testing_util {

enum class Reach { kLocal, kLoopback };

inline std::string ReachName(const ::testing::TestParamInfo<Reach>& info) {
  return info.param == Reach::kLocal ? "Local" : "Loopback";
}

class SitePair : public engine::SiteProvider {
 public:
  explicit SitePair(Reach reach = Reach::kLocal, uint32_t chunk = 4096)
      : pools_(chunk), reach_(reach) {
    Serve();
  }
  // A copy of `other`'s devices as they are now (pending writes included).
  SitePair(const SitePair& other, bool)
      : pools_(other.pools_, true), reach_(other.reach_) {
    Serve();
  }
  ~SitePair() override { Unserve(); }

  absl::StatusOr<engine::Site*> Get(const engine::Endpoint& e) override {
    if (reach_ == Reach::kLoopback && e.pool == "b") {
      absl::StatusOr<engine::Site*> local = pools_.Get(e);  // down?
      if (!local.ok()) return local.status();
      return remote_.get();
    }
    return pools_.Get(e);
  }

  blockstore::Pool& pool(const std::string& name) { return pools_.pool(name); }
  void SetDown(const std::string& name, bool down) {
    pools_.SetDown(name, down);
  }
  void Arm(CrashPlan& plan) {
    Unserve();
    pools_.Arm(plan);
    Serve();
  }
  void CrashAndReopen() {
    Unserve();
    pools_.CrashAndReopen();
    Serve();
  }
  // Connections the server refused (none expected).
  uint64_t refused() const { return server_ ? server_->refused() : 0; }

 private:
  void Serve() {
    if (reach_ != Reach::kLoopback) return;
    char path[] = "/tmp/tandem-psk-XXXXXX";
    int fd = mkstemp(path);
    ASSERT_GE(fd, 0);
    const std::string key(64, 'a');  // hex: 32 bytes
    ASSERT_EQ(write(fd, key.data(), key.size()),
              static_cast<ssize_t>(key.size()));
    close(fd);
    transport::SecurityConfig config;
    config.mode = transport::SecurityConfig::Mode::kPsk;
    config.psk_file = path;
    auto security = transport::Security::Create(config);
    unlink(path);
    ASSERT_TRUE(security.ok()) << security.status();
    security_ = std::move(*security);
    transport::PeerOptions server_options;
    server_options.site = "site-b";
    auto server = transport::PeerServer::Start(
        {"127.0.0.1", 0}, *security_, server_options, {"site-a"},
        [this](transport::Connection& conn) {
          transport::ServeSites(
              conn,
              [this](const std::string& pool)
                  -> absl::StatusOr<engine::LocalSite*> {
                if (pool != "b") return absl::NotFoundError("no such pool");
                return &pools_.site("b");
              },
              [](const std::string&) {});
        },
        [](const std::string& line) {
          std::fprintf(stderr, "%s\n", line.c_str());
        });
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
    transport::PeerOptions client_options;
    client_options.site = "site-a";
    client_ = std::make_unique<transport::PeerClient>(
        "site-b", transport::HostPort{"127.0.0.1", server_->port()}, *security_,
        client_options);
    connections_ = std::make_unique<transport::ConnectionPool>(*client_);
    remote_ = std::make_unique<transport::RemoteSite>(*connections_, "b");
  }

  // Every connection and server thread ends before the pools they reach.
  void Unserve() {
    remote_.reset();
    connections_.reset();
    client_.reset();
    server_.reset();
    security_.reset();
  }

  TwoPools pools_;
  const Reach reach_;
  std::unique_ptr<transport::Security> security_;
  std::unique_ptr<transport::PeerServer> server_;
  std::unique_ptr<transport::PeerClient> client_;
  std::unique_ptr<transport::ConnectionPool> connections_;
  std::unique_ptr<transport::RemoteSite> remote_;
};

}  // namespace testing_util

#endif  // TANDEM_TESTS_TESTING_SITE_PAIR_H_
