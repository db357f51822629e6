// Real tandemd processes for tests: a scratch directory with certificates
// (sites a and b from one CA, "mallory" from another), pool files and
// configs; daemons started, killed and restarted by PID; the tandem CLI run
// against them; and a TCP proxy to put between two daemons, which can cut,
// blackhole and record what passes.
#ifndef TANDEM_TESTS_TESTING_DAEMONS_H_
#define TANDEM_TESTS_TESTING_DAEMONS_H_

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <map>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "blockstore/io.h"
#include "blockstore/pool.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/process.h"
#include "transport/certs.h"
#include "transport/socket.h"

namespace testing_util {

// Whether `got` (a volume read whole) equals `want`, saying where they first
// differ: EXPECT_EQ on two such strings prints and diffs megabytes (gtest's
// line diff of two 24 MiB strings of random bytes wanted more than a
// 24 GiB machine has, and the test was killed for it).
inline ::testing::AssertionResult SameBytes(const std::string& got,
                                            const std::string& want) {
  if (got == want) return ::testing::AssertionSuccess();
  const size_t n = std::min(got.size(), want.size());
  const size_t at =
      std::mismatch(got.begin(), got.begin() + n, want.begin()).first -
      got.begin();
  return ::testing::AssertionFailure()
         << got.size() << " bytes where " << want.size()
         << " were expected, the first difference at byte " << at;
}

inline int FreePort() {
  absl::StatusOr<transport::Fd> fd = transport::ListenTcp({"127.0.0.1", 0});
  EXPECT_TRUE(fd.ok());
  return fd.ok() ? *transport::LocalPort(*fd) : 0;
}

// A TCP proxy on 127.0.0.1 in front of `target_port`. Each connection is
// forwarded both ways; `cut_after` (0: never) closes a connection once it
// has carried that many bytes; `blackhole` stops forwarding (and accepting
// is still possible, but nothing passes); `record` keeps every byte.
class Proxy {
 public:
  explicit Proxy(int target_port) : target_(target_port) {
    absl::StatusOr<transport::Fd> l = transport::ListenTcp({"127.0.0.1", 0});
    EXPECT_TRUE(l.ok());
    listener_ = std::move(*l);
    port_ = *transport::LocalPort(listener_);
    thread_ = std::thread([this] { Loop(); });
  }
  ~Proxy() {
    stop_ = true;
    shutdown(listener_.get(), SHUT_RDWR);
    thread_.join();
    for (std::thread& t : pumps_) t.join();
  }
  int port() const { return port_; }
  std::atomic<uint64_t> cut_after{0};
  std::atomic<bool> blackhole{false};
  std::atomic<bool> record{false};
  std::atomic<uint64_t> cuts{0};
  std::atomic<uint64_t> forwarded{0};  // bytes, both directions
  std::string Captured() {
    std::lock_guard<std::mutex> lock(mu_);
    return captured_;
  }
  // (seconds since start, cumulative bytes) samples, for rate checks.
  std::vector<std::pair<double, uint64_t>> Samples() {
    std::lock_guard<std::mutex> lock(mu_);
    return samples_;
  }

 private:
  void Loop() {
    while (!stop_) {
      std::string peer;
      absl::StatusOr<transport::Fd> in = transport::Accept(listener_, &peer);
      if (stop_) break;
      if (!in.ok()) continue;
      absl::StatusOr<transport::Fd> out = transport::ConnectTcp(
          {"127.0.0.1", target_}, transport::After(std::chrono::seconds(5)));
      if (!out.ok()) continue;
      auto pair = std::make_shared<std::pair<transport::Fd, transport::Fd>>(
          std::move(*in), std::move(*out));
      pumps_.emplace_back(
          [this, pair] { Pump(pair->first.get(), pair->second.get()); });
    }
  }
  // Forwards both ways until one side closes or a cut.
  void Pump(int a, int b) {
    uint64_t carried = 0;
    std::vector<char> buf(64 << 10);
    while (!stop_) {
      pollfd fds[2] = {{a, POLLIN, 0}, {b, POLLIN, 0}};
      if (poll(fds, 2, 100) <= 0) continue;
      if (blackhole) {
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
        continue;
      }
      for (int k = 0; k < 2; ++k) {
        if (!(fds[k].revents & (POLLIN | POLLHUP | POLLERR))) continue;
        int from = k == 0 ? a : b, to = k == 0 ? b : a;
        ssize_t n = read(from, buf.data(), buf.size());
        if (n <= 0) {
          shutdown(a, SHUT_RDWR);
          shutdown(b, SHUT_RDWR);
          return;
        }
        for (ssize_t put = 0; put < n;) {
          ssize_t w = send(to, buf.data() + put, n - put, MSG_NOSIGNAL);
          if (w < 0 && errno == EAGAIN) {
            pollfd p{to, POLLOUT, 0};
            poll(&p, 1, 100);
            continue;
          }
          if (w <= 0) {
            shutdown(a, SHUT_RDWR);
            shutdown(b, SHUT_RDWR);
            return;
          }
          put += w;
        }
        carried += n;
        forwarded += n;
        {
          std::lock_guard<std::mutex> lock(mu_);
          if (record) captured_.append(buf.data(), n);
          samples_.push_back({std::chrono::duration<double>(
                                  std::chrono::steady_clock::now() - start_)
                                  .count(),
                              forwarded.load()});
        }
        if (cut_after > 0 && carried >= cut_after) {
          ++cuts;
          shutdown(a, SHUT_RDWR);
          shutdown(b, SHUT_RDWR);
          return;
        }
      }
    }
  }

  const int target_;
  transport::Fd listener_;
  int port_ = 0;
  std::atomic<bool> stop_{false};
  std::thread thread_;
  std::vector<std::thread> pumps_;
  std::mutex mu_;
  std::string captured_;
  std::vector<std::pair<double, uint64_t>> samples_;
  const std::chrono::steady_clock::time_point start_ =
      std::chrono::steady_clock::now();
};

struct DaemonOptions {
  std::string security = "certificates";  // or "psk", "plaintext"
  std::string checkpoint = "4M";
  std::string timeout = "5s";
  std::string retry = "10s";
  std::string handshake_timeout = "2s";
  bool proxy_b_to_a = false;  // b reaches a through a Proxy
  bool proxy_a_to_b = false;
  std::string pool_size = "1G";
  bool nbd = false;  // serve NBD on a port of its own (nbd_port)
};

// Two sites, a and b, each a daemon with one pool "p", in a scratch folder.
class TwoDaemons {
 public:
  using Options = DaemonOptions;
  TwoDaemons() : TwoDaemons(Options{}) {}

  explicit TwoDaemons(Options options) : options_(options) {
    const char* tmp = std::getenv("TMPDIR");
    dir_ = absl::StrCat(tmp ? tmp : "/tmp", "/tandem-daemons-XXXXXX");
    EXPECT_NE(mkdtemp(dir_.data()), nullptr);
    EXPECT_TRUE(transport::MakeCertificates(dir_, "ca", {"a", "b"}).ok());
    EXPECT_TRUE(
        transport::MakeCertificates(dir_, "other-ca", {"mallory"}).ok());
    Spit(dir_ + "/site.psk", std::string(64, 'c'));
    port_["a"] = FreePort();
    port_["b"] = FreePort();
    if (options_.nbd) {
      nbd_port_["a"] = FreePort();
      nbd_port_["b"] = FreePort();
    }
    if (options_.proxy_b_to_a)
      proxy_["a"] = std::make_unique<Proxy>(port_["a"]);
    if (options_.proxy_a_to_b)
      proxy_["b"] = std::make_unique<Proxy>(port_["b"]);
    for (const char* site : {"a", "b"}) {
      Result r =
          Tandem({"pool", "create", Pool(site), "--size", options_.pool_size});
      EXPECT_EQ(r.code, 0) << r.err;
      WriteConfig(site);
    }
  }

  ~TwoDaemons() {
    for (auto& [site, pid] : pids_) {
      if (pid > 0) {
        kill(pid, SIGKILL);
        waitpid(pid, nullptr, 0);
      }
    }
    proxy_.clear();
    Exec(dir_, {"/bin/rm", "-rf", dir_});
  }

  const std::string& dir() const { return dir_; }
  std::string Pool(const std::string& site) const {
    return absl::StrCat(dir_, "/", site, ".pool");
  }
  std::string Socket(const std::string& site) const {
    return absl::StrCat(dir_, "/", site, ".sock");
  }
  std::string Log(const std::string& site) const {
    return Slurp(absl::StrCat(dir_, "/", site, ".log"));
  }
  int port(const std::string& site) { return port_[site]; }
  int nbd_port(const std::string& site) { return nbd_port_[site]; }
  // nbd://127.0.0.1:PORT/EXPORT of `site`'s daemon.
  std::string NbdUri(const std::string& site, const std::string& name) {
    return absl::StrCat("nbd://127.0.0.1:", nbd_port_[site], "/", name);
  }
  Proxy& proxy(const std::string& site) { return *proxy_.at(site); }

  void WriteConfig(const std::string& site, const std::string& extra = "") {
    const std::string other = site == "a" ? "b" : "a";
    const int other_port =
        proxy_.contains(other) ? proxy_[other]->port() : port_[other];
    std::string security;
    if (options_.security == "certificates") {
      security = absl::StrCat("[tls]\ncert = \"", site, ".crt\"\nkey = \"",
                              site, ".key\"\nca = \"ca.crt\"\n");
    } else if (options_.security == "psk") {
      security = "[tls]\npsk = \"site.psk\"\n";
    } else {
      security = "";
    }
    Spit(absl::StrCat(dir_, "/", site, ".toml"),
         absl::StrCat(
             "site = \"", site, "\"\nlisten = \"127.0.0.1:", port_[site],
             "\"\ncontrol = \"", site, ".sock\"\nmetrics = \"127.0.0.1:0\"\n",
             "checkpoint = \"", options_.checkpoint, "\"\ntimeout = \"",
             options_.timeout, "\"\nretry = \"", options_.retry,
             "\"\nhandshake_timeout = \"", options_.handshake_timeout, "\"\n",
             options_.security == "plaintext" ? "insecure_plaintext = true\n"
                                              : "",
             options_.nbd
                 ? absl::StrCat("nbd = \"127.0.0.1:", nbd_port_[site], "\"\n")
                 : "",
             extra, security, "[pools]\np = \"", site, ".pool\"\n[peers]\n",
             other, " = \"127.0.0.1:", other_port, "\"\n"));
  }

  // Starts (or restarts) the daemon of `site` and waits for its control
  // socket to answer.
  bool Start(const std::string& site) {
    const std::string config = absl::StrCat(dir_, "/", site, ".toml");
    const std::string log = absl::StrCat(dir_, "/", site, ".log");
    const pid_t parent = getpid();
    pid_t pid = fork();
    if (pid == 0) {
      // A test killed by its timeout takes its daemons with it.
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (getppid() != parent) _exit(127);
      int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
      dup2(fd, 2);
      execl(TANDEMD_BIN, TANDEMD_BIN, "--config", config.c_str(), nullptr);
      _exit(127);
    }
    pids_[site] = pid;
    for (int i = 0; i < 400; ++i) {
      if (transport::ConnectUnix(Socket(site)).ok()) return true;
      int status = 0;
      if (waitpid(pid, &status, WNOHANG) == pid) {
        pids_[site] = -1;
        return false;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(25));
    }
    return false;
  }

  // Sends `sig`; returns the exit status (or -signal), waiting up to
  // `wait_s` seconds; -1000 if it did not end (it is then killed).
  int Stop(const std::string& site, int sig = SIGTERM,
           double* seconds = nullptr, int wait_s = 10) {
    pid_t pid = pids_[site];
    if (pid <= 0) return -1000;
    auto start = std::chrono::steady_clock::now();
    kill(pid, sig);
    int status = 0;
    for (int i = 0; i < wait_s * 100; ++i) {
      if (waitpid(pid, &status, WNOHANG) == pid) {
        pids_[site] = -1;
        if (seconds != nullptr) {
          *seconds = std::chrono::duration<double>(
                         std::chrono::steady_clock::now() - start)
                         .count();
        }
        return WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    kill(pid, SIGKILL);
    waitpid(pid, nullptr, 0);
    pids_[site] = -1;
    return -1000;
  }

  // `tandem ARGS` (no daemon).
  Result Tandem(std::vector<std::string> args, const std::string& input = "") {
    args.insert(args.begin(), TANDEM_BIN);
    return Exec(dir_, args, input);
  }
  // `tandem --daemon <site's socket> ARGS`.
  Result Via(const std::string& site, std::vector<std::string> args,
             const std::string& input = "") {
    args.insert(args.begin(), {TANDEM_BIN, "--daemon", Socket(site)});
    return Exec(dir_, args, input);
  }
  // Must succeed; its stdout.
  std::string Ok(const std::string& site, std::vector<std::string> args,
                 const std::string& input = "") {
    Result r = Via(site, args, input);
    EXPECT_EQ(r.code, 0) << site << ": " << absl::StrJoin(args, " ") << ": "
                         << r.err;
    return r.out;
  }
  nlohmann::json Status(const std::string& site, const std::string& endpoint) {
    Result r = Via(site, {"status", endpoint, "--json"});
    if (r.code != 0) return nlohmann::json::object();
    nlohmann::json j = nlohmann::json::parse(r.out, nullptr, false);
    return j.is_array() && !j.empty() ? j[0] : nlohmann::json::object();
  }
  // Waits until `pred(status)` holds (true) or `seconds` pass (false).
  template <typename Pred>
  bool WaitFor(const std::string& site, const std::string& endpoint, Pred pred,
               double seconds = 60) {
    auto end = std::chrono::steady_clock::now() +
               std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000));
    while (std::chrono::steady_clock::now() < end) {
      if (pred(Status(site, endpoint))) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return false;
  }
  std::string Digest(const std::string& site, const std::string& ref) {
    std::string d = Ok(site, {"digest", "--pool", "p", ref});
    return d.substr(0, d.find('\n'));
  }
  std::string Read(const std::string& site, const std::string& ref) {
    return Ok(site, {"read", "--pool", "p", ref});
  }

 private:
  const Options options_;
  std::string dir_;
  std::map<std::string, int> port_;
  std::map<std::string, int> nbd_port_;
  std::map<std::string, pid_t> pids_;
  std::map<std::string, std::unique_ptr<Proxy>> proxy_;
};

}  // namespace testing_util

#endif  // TANDEM_TESTS_TESTING_DAEMONS_H_
