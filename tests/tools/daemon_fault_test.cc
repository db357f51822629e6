// Two tandemd processes through faults: a proxy that cuts the connection
// again and again, kill -9 of either daemon in the middle of initialize,
// update and reverse resync, SIGTERM mid-transfer, a source site that
// vanishes, and the rate limit. TANDEM_FAULT_ROUNDS scales the kill runs
// (label "fault": more).
#include <signal.h>

#include <chrono>
#include <cstdlib>
#include <random>
#include <string>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/daemons.h"

namespace {

using ::testing::HasSubstr;
using testing_util::RandomBytes;
using testing_util::Result;
using testing_util::SameBytes;
using testing_util::TwoDaemons;
using json = nlohmann::json;

const std::string kA = "a/p:vol";
const std::string kB = "b/p:vol";

bool Idle(const json& s, const char* mirror = "Mirrored") {
  return s.value("mirror_state", "") == mirror &&
         s.value("relationship_status", "") == "Idle";
}

size_t Count(const std::string& text, const std::string& what) {
  size_t n = 0;
  for (size_t at = text.find(what); at != std::string::npos;
       at = text.find(what, at + 1)) {
    ++n;
  }
  return n;
}

int Env(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v != nullptr ? std::atoi(v) : fallback;
}

TEST(DaemonFaultTest, ACutConnectionResumesFromTheLastCheckpoint) {
  testing_util::DaemonOptions o;
  o.proxy_b_to_a = true;
  o.checkpoint = "2M";
  TwoDaemons d(o);
  ASSERT_TRUE(d.Start("a")) << d.Log("a");
  ASSERT_TRUE(d.Start("b")) << d.Log("b");
  d.Ok("a", {"volume", "create", "--pool", "p", "vol", "--size", "80M"});
  d.Ok("a", {"write", "--pool", "p", "vol"}, RandomBytes(4 << 20, 1));
  d.Ok("a", {"relationship", "create", "--source", kA, "--destination", kB});
  d.Ok("b", {"relationship", "initialize", kB});
  // 64 MiB of incompressible change, pulled by b through the proxy, which
  // cuts every connection once it has carried 4 MiB.
  d.Ok("a", {"write", "--pool", "p", "vol", "--offset", "8M"},
       RandomBytes(64 << 20, 2));
  const uint64_t before = d.proxy("a").forwarded;
  d.proxy("a").cut_after = 4 << 20;
  std::string out = d.Ok("b", {"relationship", "update", kB});
  d.proxy("a").cut_after = 0;
  const uint64_t cuts = d.proxy("a").cuts;
  const uint64_t wire = d.proxy("a").forwarded - before;
  EXPECT_GE(cuts, 20u) << out;
  EXPECT_THAT(out, HasSubstr("resumed from a checkpoint")) << out;
  EXPECT_TRUE(SameBytes(d.Read("b", "vol"), d.Read("a", "vol")));
  // What crossed beyond the delta itself: at most one checkpoint interval
  // plus the in-flight window (credits 2 MiB, pipe 2 MiB, a segment and a
  // frame) per cut.
  json s = d.Status("b", kB);
  const uint64_t delta = 64ull << 20;
  EXPECT_LE(wire, delta + cuts * ((2 << 20) + (6 << 20)) + (2 << 20))
      << "cuts " << cuts << ", wire " << wire << ", " << s.dump();
  EXPECT_THAT(d.Ok("b", {"pool", "check", "p"}), HasSubstr("consistent"));
}

// Kills one daemon or the other, again and again, while `op` runs; each
// comes back at once. The first kill waits until the transfer has passed a
// checkpoint (4 MiB with checkpoints every 2 MiB), so that at least one
// kill leaves something to resume from however slow the machine; the rest
// land at random. Then the relationship must finish (run the command again
// only if the kill came before it recorded anything, as an operator would)
// with the destination byte-identical and the pools consistent.
void KillDuring(TwoDaemons& d, const std::string& via,
                const std::vector<std::string>& command, int kills,
                uint64_t seed, int* points) {
  std::mt19937_64 rng(seed);
  Result first;
  std::thread runner([&] { first = d.Via(via, command); });
  const std::string endpoint = command[2];
  for (int k = 0; k < kills; ++k) {
    if (k == 0) {
      d.WaitFor(
          via, endpoint,
          [](const json& s) {
            return s.value("relationship_status", "") == "Transferring" &&
                   s.value("progress_bytes", uint64_t{0}) > (4u << 20);
          },
          30);
    } else {
      std::this_thread::sleep_for(std::chrono::milliseconds(40 + rng() % 260));
    }
    const std::string victim = rng() % 2 ? "a" : "b";
    d.Stop(victim, SIGKILL);
    ASSERT_TRUE(d.Start(victim)) << d.Log(victim);
    ++*points;
  }
  runner.join();
  // Idle at both sites: while a site is down or just restarted, the other
  // answers from its own record (Idle) though the restarted one is about to
  // go on with the transfer it was killed in (trigger=resume in its log).
  auto both_idle = [&](double seconds) {
    auto end = std::chrono::steady_clock::now() +
               std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000));
    while (std::chrono::steady_clock::now() < end) {
      if (Idle(d.Status("a", kA)) && Idle(d.Status("b", kB))) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return false;
  };
  bool done = both_idle(60);
  if (!done) {
    // Killed before it recorded Transferring: nothing to go on with. The
    // same command again completes it.
    Result again = d.Via(via, command);
    EXPECT_EQ(again.code, 0) << again.err << d.Log("a") << d.Log("b");
    done = both_idle(60);
  }
  ASSERT_TRUE(done) << d.Ok("a", {"status", kA}) << d.Ok("b", {"status", kB})
                    << d.Log("a") << d.Log("b");
}

TEST(DaemonFaultTest, KillNineOfEitherDaemonAnywhereLosesNothing) {
  testing_util::DaemonOptions o;
  o.checkpoint = "2M";
  o.retry = "15s";
  TwoDaemons d(o);
  ASSERT_TRUE(d.Start("a"));
  ASSERT_TRUE(d.Start("b"));
  const int kills = Env("TANDEM_FAULT_ROUNDS", 8);
  int points = 0;
  d.Ok("a", {"volume", "create", "--pool", "p", "vol", "--size", "24M"});
  const std::string base = RandomBytes(24 << 20, 3);
  d.Ok("a", {"write", "--pool", "p", "vol"}, base);
  // 12 MB/s: the baseline takes about 2 s, plenty to be killed in.
  d.Ok("a", {"relationship", "create", "--source", kA, "--destination", kB,
             "--max-rate", "12M"});
  {
    SCOPED_TRACE("initialize");
    KillDuring(d, "b", {"relationship", "initialize", kB}, kills, 1, &points);
    EXPECT_TRUE(SameBytes(d.Read("b", "vol"), base));
  }
  {
    SCOPED_TRACE("update");
    d.Ok("a", {"write", "--pool", "p", "vol", "--offset", "4M"},
         RandomBytes(16 << 20, 4));
    d.Ok("a", {"snapshot", "create", "--pool", "p", "vol@kept"});
    KillDuring(d, "a", {"relationship", "update", kA}, kills, 2, &points);
    // Whatever the kills, the destination ends at a snapshot of the
    // source's: the last update, or another one after it.
    Result up = d.Via("a", {"relationship", "update", kA});
    EXPECT_EQ(up.code, 0) << up.err;
    EXPECT_TRUE(SameBytes(d.Read("b", "vol"), d.Read("a", "vol")));
    EXPECT_EQ(d.Digest("b", "vol@kept"), d.Digest("a", "vol@kept"));
  }
  {
    SCOPED_TRACE("reverse resync");
    d.Ok("b", {"relationship", "break", kB, "--yes"});
    d.Ok("b", {"write", "--pool", "p", "vol"}, RandomBytes(16 << 20, 5));
    const std::string b_data = d.Read("b", "vol");
    KillDuring(d, "a", {"relationship", "reverse-resync", kA, "--yes"}, kills,
               3, &points);
    json s = d.Status("a", kA);
    EXPECT_EQ(s["source"], kB) << s.dump();
    EXPECT_TRUE(SameBytes(d.Read("a", "vol"), b_data));
    EXPECT_TRUE(SameBytes(d.Read("b", "vol"),
                          b_data));  // what b's clients wrote is there
  }
  EXPECT_GE(points, 3 * kills);
  // The kills landed in transfers: some went on from a resume point.
  const std::string logs = d.Log("a") + d.Log("b");
  EXPECT_GT(Count(logs, "resumed="), Count(logs, "resumed=0")) << logs;
  for (const char* site : {"a", "b"}) {
    EXPECT_THAT(d.Ok(site, {"pool", "check", "p", "--data"}),
                HasSubstr("consistent"));
  }
}

TEST(DaemonFaultTest, SigtermMidTransferExitsAtOnceAndTheRestartGoesOn) {
  testing_util::DaemonOptions o;
  o.checkpoint = "2M";
  TwoDaemons d(o);
  ASSERT_TRUE(d.Start("a"));
  ASSERT_TRUE(d.Start("b"));
  d.Ok("a", {"volume", "create", "--pool", "p", "vol", "--size", "32M"});
  d.Ok("a", {"write", "--pool", "p", "vol"}, RandomBytes(1 << 20, 6));
  d.Ok("a", {"relationship", "create", "--source", kA, "--destination", kB,
             "--max-rate", "8M"});
  d.Ok("b", {"relationship", "initialize", kB});
  d.Ok("a", {"write", "--pool", "p", "vol"}, RandomBytes(32 << 20, 7));
  for (const char* victim : {"b", "a"}) {
    SCOPED_TRACE(victim);
    Result r;
    std::thread updater([&] {
      r = d.Via("b", {"relationship", "update", kB});
    });
    ASSERT_TRUE(d.WaitFor(
        "a", kA,
        [](const json& s) {
          return s.value("relationship_status", "") == "Transferring" &&
                 s.value("progress_bytes", uint64_t{0}) > (6u << 20);
        },
        30));
    const size_t resumes_before = Count(d.Log("b"), "resumed=1");
    double seconds = 0;
    EXPECT_EQ(d.Stop(victim, SIGTERM, &seconds), 0) << d.Log(victim);
    EXPECT_LT(seconds, 5);
    updater.join();
    ASSERT_TRUE(d.Start(victim));
    // The destination goes on from its resume point by itself (its log
    // line comes after the commit that makes the digests equal).
    EXPECT_TRUE(d.WaitFor(
        "b", kB,
        [&](const json&) {
          return Count(d.Log("b"), "resumed=1") > resumes_before &&
                 d.Digest("b", "vol") == d.Digest("a", "vol");
        },
        60))
        << d.Log("a") << d.Log("b");
    d.Ok("a", {"write", "--pool", "p", "vol"}, RandomBytes(32 << 20, 8));
  }
}

TEST(DaemonFaultTest, AVanishedSourceEndsTheTransferSoTheOperatorCanBreak) {
  testing_util::DaemonOptions o;
  o.proxy_b_to_a = true;
  o.timeout = "5s";
  o.retry = "5s";
  TwoDaemons d(o);
  ASSERT_TRUE(d.Start("a"));
  ASSERT_TRUE(d.Start("b"));
  d.Ok("a", {"volume", "create", "--pool", "p", "vol", "--size", "32M"});
  d.Ok("a", {"relationship", "create", "--source", kA, "--destination", kB,
             "--max-rate", "4M"});
  d.Ok("b", {"relationship", "initialize", kB});
  d.Ok("a", {"write", "--pool", "p", "vol"}, RandomBytes(24 << 20, 9));
  Result r;
  std::thread updater([&] { r = d.Via("b", {"relationship", "update", kB}); });
  ASSERT_TRUE(d.WaitFor(
      "b", kB,
      [](const json& s) {
        return s.value("relationship_status", "") == "Transferring" &&
               s.value("progress_bytes", uint64_t{0}) > (1u << 20);
      },
      30));
  // Site A's host vanishes: nothing it sends arrives any more.
  d.proxy("a").blackhole = true;
  auto start = std::chrono::steady_clock::now();
  updater.join();
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
          .count();
  EXPECT_NE(r.code, 0);
  EXPECT_LT(seconds, 30) << "the transfer hung on a vanished peer";
  std::printf("transfer ended %.1f s after the source vanished\n", seconds);
  json s = d.Status("b", kB);
  EXPECT_TRUE(Idle(s)) << s.dump();
  EXPECT_NE(s.value("last_transfer_error", ""), "");
  EXPECT_EQ(s["healthy"], false);
  EXPECT_THAT(d.Ok("b", {"relationship", "break", kB, "--yes"}),
              HasSubstr("Broken, Idle"));
}

TEST(DaemonFaultTest, TheRateLimitHoldsWithinTenPercent) {
  testing_util::DaemonOptions o;
  o.proxy_b_to_a = true;
  TwoDaemons d(o);
  ASSERT_TRUE(d.Start("a"));
  ASSERT_TRUE(d.Start("b"));
  d.Ok("a", {"volume", "create", "--pool", "p", "vol", "--size", "64M"});
  d.Ok("a", {"relationship", "create", "--source", kA, "--destination", kB,
             "--max-rate", "4M"});
  d.Ok("b", {"relationship", "initialize", kB});
  d.Ok("a", {"write", "--pool", "p", "vol"}, RandomBytes(52 << 20, 10));
  const auto from = d.proxy("a").Samples().size();
  d.Ok("b", {"relationship", "update", kB});
  std::vector<std::pair<double, uint64_t>> samples = d.proxy("a").Samples();
  samples.erase(samples.begin(), samples.begin() + from);
  ASSERT_GT(samples.size(), 10u);
  const double rate = 4 << 20;
  const double t0 = samples.front().first, t1 = samples.back().first;
  ASSERT_GT(t1 - t0, 11) << "the transfer was too quick to judge 10 s windows";
  // Every 10-second window within the transfer carries 10 s worth, +-10%.
  int windows = 0;
  for (size_t i = 0; i < samples.size(); ++i) {
    const double start = samples[i].first;
    if (start + 10 > t1) break;
    auto end =
        std::lower_bound(samples.begin(), samples.end(), start + 10,
                         [](const auto& s, double t) { return s.first < t; });
    const double bytes = static_cast<double>(end->second - samples[i].second);
    EXPECT_LE(bytes, 1.1 * 10 * rate) << "window at " << start - t0 << " s";
    EXPECT_GE(bytes, 0.9 * 10 * rate) << "window at " << start - t0 << " s";
    ++windows;
  }
  EXPECT_GT(windows, 0);
  EXPECT_TRUE(SameBytes(d.Read("b", "vol"), d.Read("a", "vol")));
}

}  // namespace
