// Two tandemd processes on 127.0.0.1, real sockets, each with its own pool
// file and certificates made by the test, driven through `tandem --daemon`:
// the seed procedure, the daemon's lifecycle, schedules and metrics.
#include <signal.h>

#include <chrono>
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
using ::testing::Not;
using testing_util::RandomBytes;
using testing_util::Result;
using testing_util::SameBytes;
using testing_util::TwoDaemons;
using json = nlohmann::json;

const std::string kA = "a/p:vol";
const std::string kB = "b/p:vol";

// Both daemons up, a 16 MiB source volume of random data on site a.
void Up(TwoDaemons& d, const std::string& size = "16M") {
  ASSERT_TRUE(d.Start("a")) << d.Log("a");
  ASSERT_TRUE(d.Start("b")) << d.Log("b");
  d.Ok("a", {"volume", "create", "--pool", "p", "vol", "--size", size});
  d.Ok("a", {"write", "--pool", "p", "vol"}, RandomBytes(12 << 20, 1));
}

bool Is(const json& s, const char* mirror, const char* status) {
  return s.value("mirror_state", "") == mirror &&
         s.value("relationship_status", "") == status;
}

TEST(DaemonTest, TheSeedProcedureAcrossTwoDaemons) {
  TwoDaemons d;
  Up(d);
  EXPECT_THAT(
      d.Ok("a", {"relationship", "create", "--source", kA, "--destination", kB,
                 "--schedule", "10m", "--max-rate", "8M"}),
      HasSubstr("a/p:vol -> b/p:vol (schedule 10m); Uninitialized, Idle"));
  // Break is refused while Uninitialized, from either daemon.
  Result r = d.Via("b", {"relationship", "break", kB, "--yes"});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, HasSubstr("mirror state is Uninitialized"));

  // Initialize through the destination's daemon (it pulls).
  EXPECT_THAT(d.Ok("b", {"relationship", "initialize", kB}),
              HasSubstr("Mirrored, Idle"));
  EXPECT_TRUE(SameBytes(d.Read("b", "vol"), d.Read("a", "vol")));
  // Refused at once, however much is sent: the reason, not a connection
  // closed under the upload.
  for (const std::string& data : {std::string("x"), RandomBytes(8 << 20, 1)}) {
    r = d.Via("b", {"write", "--pool", "p", "vol"}, data);
    EXPECT_EQ(r.code, 1) << data.size();
    EXPECT_THAT(r.err, HasSubstr("read-only")) << data.size();
  }

  // Update through the source's daemon, with a user snapshot on the way.
  d.Ok("a", {"write", "--pool", "p", "vol", "--offset", "1M"},
       RandomBytes(256 << 10, 2));
  d.Ok("a", {"snapshot", "create", "--pool", "p", "vol@mine"});
  d.Ok("a", {"write", "--pool", "p", "vol", "--offset", "5M"},
       RandomBytes(128 << 10, 3));
  d.Ok("a", {"relationship", "update", kA});
  EXPECT_TRUE(SameBytes(d.Read("b", "vol"), d.Read("a", "vol")));
  EXPECT_EQ(d.Digest("b", "vol@mine"), d.Digest("a", "vol@mine"));

  // Break while Transferring is refused: an update held to 8 MB/s runs
  // for about a second.
  d.Ok("a", {"write", "--pool", "p", "vol"}, RandomBytes(8 << 20, 4));
  Result update;
  std::thread updater([&] {
    update = d.Via("a", {"relationship", "update", kA});
  });
  ASSERT_TRUE(d.WaitFor(
      "b", kB,
      [](const json& s) {
        return s.value("relationship_status", "") == "Transferring";
      },
      30));
  Result refused = d.Via("b", {"relationship", "break", kB, "--yes"});
  updater.join();
  EXPECT_EQ(update.code, 0) << update.err;
  EXPECT_EQ(refused.code, 1);
  EXPECT_THAT(refused.err,
              HasSubstr("relationship status is Transferring (update in "
                        "progress, run by site a)"));
  EXPECT_TRUE(SameBytes(d.Read("b", "vol"), d.Read("a", "vol")));
  const std::string b_before = d.Read("b", "vol");

  // Site A goes down. Break through B: it asks first (no terminal: refused),
  // then with --yes the destination becomes writable.
  EXPECT_EQ(d.Stop("a", SIGKILL), -SIGKILL);
  r = d.Via("b", {"relationship", "break", kB});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.out, HasSubstr("becomes read-write"));
  EXPECT_THAT(r.err, HasSubstr("no terminal to confirm on: rerun with --yes"));
  EXPECT_TRUE(Is(d.Status("b", kB), "Mirrored", "Idle"));
  EXPECT_THAT(d.Ok("b", {"relationship", "break", kB, "--yes"}),
              HasSubstr("Broken, Idle"));
  json s = d.Status("b", kB);
  EXPECT_EQ(s["healthy"], false);
  EXPECT_THAT(s["notes"].dump(), HasSubstr("source pool cannot be reached"));
  d.Ok("b", {"write", "--pool", "p", "vol", "--offset", "2M"},
       RandomBytes(128 << 10, 5));

  // Site A returns, with late writes of its own; reverse resync shows what
  // it will overwrite, refuses without confirmation, keeps it in a safety
  // snapshot with it.
  ASSERT_TRUE(d.Start("a")) << d.Log("a");
  d.Ok("a", {"write", "--pool", "p", "vol", "--offset", "7M"},
       RandomBytes(64 << 10, 6));
  const std::string a_before = d.Digest("a", "vol");
  r = d.Via("a", {"relationship", "reverse-resync", kA});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.out, HasSubstr("rolls back to the common snapshot"));
  EXPECT_THAT(r.out, HasSubstr("64 KiB (65536 bytes in 1 chunks) written "
                               "there since will be overwritten"));
  EXPECT_THAT(r.err, HasSubstr("rerun with --yes"));
  EXPECT_THAT(d.Ok("a", {"relationship", "reverse-resync", kA, "--yes"}),
              HasSubstr("Mirrored, Idle"));
  EXPECT_TRUE(SameBytes(d.Read("a", "vol"), d.Read("b", "vol")));
  EXPECT_NE(d.Read("b", "vol"), b_before);  // B's writes made it over
  s = d.Status("a", kA);
  EXPECT_EQ(s["source"], kB);
  EXPECT_EQ(s["destination"], kA);
  json snaps = json::parse(
      d.Ok("a", {"snapshot", "list", "--pool", "p", "vol", "--json"}));
  bool kept = false;
  for (const auto& snap : snaps) {
    kept =
        kept || (absl::StartsWith(snap["name"].get<std::string>(), "safety-") &&
                 snap["root_digest"] == a_before);
  }
  EXPECT_TRUE(kept) << snaps.dump();

  // Re-establish the original direction, then production goes on.
  EXPECT_THAT(d.Ok("b", {"relationship", "reestablish", kB, "--yes"}),
              HasSubstr("Mirrored, Idle"));
  s = d.Status("b", kB);
  EXPECT_EQ(s["source"], kA);
  d.Ok("a", {"write", "--pool", "p", "vol", "--offset", "3M"},
       RandomBytes(64 << 10, 7));
  d.Ok("b", {"relationship", "update", kB});
  EXPECT_TRUE(SameBytes(d.Read("a", "vol"), d.Read("b", "vol")));
  s = d.Status("a", kA);
  EXPECT_TRUE(Is(s, "Mirrored", "Idle"));
  EXPECT_EQ(s["healthy"], true) << s.dump();
  for (const char* key :
       {"id", "source", "destination", "mirror_state", "relationship_status",
        "healthy", "unhealthy_reason", "lag_seconds", "last_transfer_bytes",
        "last_transfer_seconds", "last_transfer_error", "progress_bytes",
        "progress_total_bytes", "total_transfer_bytes", "last_common_snapshot",
        "max_rate_bytes"}) {
    EXPECT_TRUE(s.contains(key)) << key;
  }
  for (const char* site : {"a", "b"}) {
    EXPECT_THAT(d.Ok(site, {"pool", "check", "p", "--data"}),
                HasSubstr("consistent"));
  }
  // SIGTERM: both exit 0, quickly.
  for (const char* site : {"a", "b"}) {
    double seconds = 0;
    EXPECT_EQ(d.Stop(site, SIGTERM, &seconds), 0) << d.Log(site);
    EXPECT_LT(seconds, 5) << site;
  }
}

TEST(DaemonTest, ReleaseWithTheOtherSiteDownFinishesWhenItReturns) {
  TwoDaemons d;
  Up(d);
  d.Ok("a", {"relationship", "create", "--source", kA, "--destination", kB});
  d.Ok("a", {"relationship", "initialize", kA});
  EXPECT_EQ(d.Stop("b", SIGKILL), -SIGKILL);
  std::string out = d.Ok("a", {"relationship", "release", kA});
  EXPECT_THAT(out, HasSubstr("b/p:vol could not be reached"));
  EXPECT_THAT(d.Ok("a", {"status", kA}), HasSubstr("released"));
  ASSERT_TRUE(d.Start("b"));
  // b's daemon still had its record; the first looks from both sides end
  // it, on each side (a slow machine may see one before the other).
  EXPECT_TRUE(d.WaitFor(
      "b", kB, [](const json& s) { return s.empty(); }, 20))
      << d.Ok("b", {"status", kB});
  Result r;
  for (int i = 0; i < 400; ++i) {
    r = d.Via("a", {"status", kA});
    if (r.code != 0) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_THAT(r.err, HasSubstr("not in a replication relationship"));
  d.Ok("b", {"write", "--pool", "p", "vol"}, "writable again");
}

// The other daemon restarted since the last operation (by SIGTERM or kill
// -9): the connections pooled to it are dead, and the next operation, from
// either end, goes through on fresh ones the first time.
TEST(DaemonTest, TheFirstOperationAfterThePeerRestartsSucceeds) {
  TwoDaemons d;
  Up(d);
  d.Ok("a", {"relationship", "create", "--source", kA, "--destination", kB});
  d.Ok("b", {"relationship", "initialize", kB});
  int round = 0;
  for (int sig : {SIGTERM, SIGKILL}) {
    for (const char* victim : {"a", "b"}) {
      SCOPED_TRACE(absl::StrCat(victim, " signal ", sig));
      const std::string caller = std::string(victim) == "a" ? "b" : "a";
      d.Ok("a", {"write", "--pool", "p", "vol", "--offset", "2M"},
           RandomBytes(64 << 10, 100 + round++));
      EXPECT_EQ(d.Stop(victim, sig), sig == SIGTERM ? 0 : -SIGKILL);
      ASSERT_TRUE(d.Start(victim)) << d.Log(victim);
      Result r =
          d.Via(caller, {"relationship", "update", caller == "a" ? kA : kB});
      EXPECT_EQ(r.code, 0) << r.err << d.Log(caller);
      EXPECT_TRUE(SameBytes(d.Read("b", "vol"), d.Read("a", "vol")));
    }
  }
}

TEST(DaemonTest, AScheduledRelationshipUpdatesByItself) {
  TwoDaemons d;
  Up(d);
  d.Ok("a", {"relationship", "create", "--source", kA, "--destination", kB,
             "--schedule", "1s"});
  d.Ok("a", {"relationship", "initialize", kA});
  d.Ok("a", {"write", "--pool", "p", "vol", "--offset", "4M"},
       RandomBytes(64 << 10, 9));
  const std::string want = d.Digest("a", "vol");
  // The destination's daemon pulls on its own. The data lands before the
  // operation's log line, which follows its commit: wait for both.
  const std::string logged = "operation=update trigger=schedule outcome=ok";
  EXPECT_TRUE(d.WaitFor(
      "b", kB,
      [&](const json&) {
        return d.Digest("b", "vol") == want &&
               absl::StrContains(d.Log("b"), logged);
      },
      20))
      << d.Log("b");
  // A manual update while one runs is refused as Transferring, like break
  // (or finds nothing running and succeeds).
  json s = d.Status("a", kA);
  EXPECT_EQ(s["healthy"], true) << s.dump();
}

TEST(DaemonTest, MetricsAreValidPrometheusAndStatusIsTheSameJson) {
  TwoDaemons d;
  Up(d);
  d.Ok("a", {"relationship", "create", "--source", kA, "--destination", kB});
  d.Ok("a", {"relationship", "initialize", kA});
  // The metrics port was picked by the daemon: it says which in its log.
  std::string log = d.Log("a");
  size_t at = log.find("metrics on port ");
  ASSERT_NE(at, std::string::npos) << log;
  int port = std::stoi(log.substr(at + 16));
  Result metrics = testing_util::Exec(
      d.dir(), {"/usr/bin/curl", "-sf",
                absl::StrCat("http://127.0.0.1:", port, "/metrics")});
  if (metrics.code == 127) GTEST_SKIP() << "no curl";
  ASSERT_EQ(metrics.code, 0) << metrics.err;
  for (const char* name :
       {"tandem_relationship_healthy", "tandem_relationship_transferring",
        "tandem_relationship_lag_seconds",
        "tandem_relationship_last_transfer_bytes",
        "tandem_relationship_last_transfer_duration_seconds",
        "tandem_relationship_progress_bytes",
        "tandem_relationship_progress_total_bytes",
        "tandem_relationship_transferred_bytes_total"}) {
    EXPECT_THAT(metrics.out, HasSubstr(absl::StrCat(name, "{id=\""))) << name;
  }
  EXPECT_THAT(metrics.out,
              HasSubstr("source=\"a/p:vol\",destination=\"b/p:vol\"} "));
  EXPECT_THAT(metrics.out, HasSubstr("tandem_relationship_healthy{"));
  testing_util::Spit(d.dir() + "/metrics.txt", metrics.out);
  Result check = testing_util::Exec(
      d.dir(),
      {"/bin/sh", "-c",
       absl::StrCat("promtool check metrics < ", d.dir(), "/metrics.txt")});
  if (check.code == 127)
    GTEST_SKIP() << "no promtool (Debian package prometheus)";
  EXPECT_EQ(check.code, 0) << check.out << check.err;
  Result status = testing_util::Exec(
      d.dir(), {"/usr/bin/curl", "-sf",
                absl::StrCat("http://127.0.0.1:", port, "/status")});
  ASSERT_EQ(status.code, 0);
  json j = json::parse(status.out);
  ASSERT_EQ(j.size(), 1u);
  json cli = d.Status("a", kA);
  for (const char* key : {"id", "source", "destination", "mirror_state",
                          "healthy", "last_transfer_bytes"}) {
    EXPECT_EQ(j[0][key], cli[key]) << key;
  }
}

TEST(DaemonTest, PoolCommandsWorkThroughTheDaemonWithTheSameGuards) {
  TwoDaemons d;
  ASSERT_TRUE(d.Start("a")) << d.Log("a");
  ASSERT_TRUE(d.Start("b")) << d.Log("b");
  // The daemon holds its pool: the CLI without it is told who has it.
  Result locked = d.Tandem({"pool", "info", d.Pool("a")});
  EXPECT_EQ(locked.code, 1);
  EXPECT_THAT(locked.err, HasSubstr("in use by process"));
  json info = json::parse(d.Ok("a", {"pool", "info", "p", "--json"}));
  EXPECT_EQ(info["chunk_size_bytes"], 65536);
  d.Ok("a", {"volume", "create", "--pool", "p", "vol", "--size", "4M"});
  const std::string data = RandomBytes(1 << 20, 40);
  d.Ok("a", {"write", "--pool", "p", "vol", "--offset", "64K"}, data);
  EXPECT_EQ(d.Ok("a", {"read", "--pool", "p", "vol", "--offset", "64K",
                       "--length", "1M"}),
            data);
  d.Ok("a", {"snapshot", "create", "--pool", "p", "vol@one"});
  d.Ok("a",
       {"trim", "--pool", "p", "vol", "--offset", "64K", "--length", "1M"});
  EXPECT_EQ(d.Ok("a", {"read", "--pool", "p", "vol", "--offset", "64K",
                       "--length", "1M"}),
            std::string(1 << 20, '\0'));
  d.Ok("a", {"rollback", "--pool", "p", "vol@one"});
  EXPECT_EQ(d.Ok("a", {"read", "--pool", "p", "vol@one", "--offset", "64K",
                       "--length", "1M"}),
            data);
  d.Ok("a", {"volume", "resize", "--pool", "p", "vol", "--size", "8M"});
  json vols =
      json::parse(d.Ok("a", {"volume", "list", "--pool", "p", "--json"}));
  ASSERT_EQ(vols.size(), 1u);
  EXPECT_EQ(vols[0]["size_bytes"], 8 << 20);
  // Errors are the same one line as without a daemon.
  Result r = d.Via("a", {"read", "--pool", "p", "vol", "--offset", "9M"});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, HasSubstr("is past the end of 'vol'"));
  r = d.Via("a", {"volume", "list", "--pool", "q"});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, HasSubstr("site a has no pool 'q'"));
  r = d.Via("a", {"pool", "create", "x.pool"});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, HasSubstr("add it under [pools]"));
  // A related volume keeps its guards.
  d.Ok("a", {"relationship", "create", "--source", kA, "--destination", kB});
  d.Ok("a", {"relationship", "initialize", kA});
  r = d.Via("a", {"volume", "delete", "--pool", "p", "vol", "-r"});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, HasSubstr("is in a replication relationship"));
  std::string common = d.Status("a", kA)["last_common_snapshot"];
  r = d.Via("b", {"snapshot", "delete", "--pool", "p", "vol@" + common});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, HasSubstr("replication snapshots would break it"));
  d.Ok("a", {"snapshot", "delete", "--pool", "p", "vol@one"});
  EXPECT_THAT(d.Ok("b", {"pool", "check", "p", "--data"}),
              HasSubstr("consistent"));
  // Without a daemon there, the CLI says so.
  r = testing_util::Exec(
      d.dir(), {TANDEM_BIN, "--daemon", d.dir() + "/none.sock", "status", kA});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, HasSubstr("is tandemd running with this control socket?"));
}

TEST(DaemonTest, ConfigErrorsAreOneLineNamingTheKey) {
  TwoDaemons d;
  struct Case {
    std::string text, want;
  } cases[] = {
      {"site = \"a\"\n", "key 'listen': missing"},
      {"site = \"a b\"\nlisten = \"1:2\"\n",
       "key 'site': 'a b' is not a site name"},
      {"site = \"a\"\nlisten = \"7601\"\ncontrol = \"x\"\n",
       "key 'listen': '7601' is not HOST:PORT"},
      {"site = \"a\"\nlisten = \"127.0.0.1:1\"\ncontrol = \"x\"\nlisen = 1\n",
       "key 'lisen': unknown key"},
      {"site = \"a\"\nlisten = \"127.0.0.1:1\"\ncontrol = \"x\"\n[pools]\np = "
       "\"p\"\n",
       "key 'tls': missing"},
      {"site = \"a\"\nlisten = \"127.0.0.1:1\"\ncontrol = \"x\"\n[tls]\ncert = "
       "\"c\"\n[pools]\np = \"p\"\n",
       "key 'tls.key': missing"},
      {"site = \"a\"\nlisten = \"127.0.0.1:1\"\ncontrol = \"x\"\ncheckpoint = "
       "\"1K\"\n",
       "key 'checkpoint'"},
      {"site = [\n", "line 1"},
  };
  for (const Case& c : cases) {
    testing_util::Spit(d.dir() + "/bad.toml", c.text);
    Result r = testing_util::Exec(
        d.dir(), {TANDEMD_BIN, "--config", d.dir() + "/bad.toml"});
    EXPECT_EQ(r.code, 2) << c.text;
    EXPECT_THAT(r.err, HasSubstr(c.want)) << c.text;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  }
  // A pool another process holds: one line naming it, exit 1.
  testing_util::Spit(
      d.dir() + "/dup.toml",
      absl::StrCat("site = \"a\"\nlisten = \"127.0.0.1:0\"\n"
                   "control = \"dup.sock\"\ninsecure_plaintext = true\n"
                   "[pools]\np = \"nope.pool\"\n"));
  Result r = testing_util::Exec(
      d.dir(), {TANDEMD_BIN, "--config", d.dir() + "/dup.toml"});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, HasSubstr("pool p ("));
}

TEST(DaemonTest, UpdatesFromBothEndsAtOnceRunOneAndReferTheOther) {
  TwoDaemons d;
  Up(d);
  d.Ok("a", {"relationship", "create", "--source", kA, "--destination", kB,
             "--max-rate", "8M"});
  d.Ok("a", {"relationship", "initialize", kA});
  for (int round = 0; round < 3; ++round) {
    d.Ok("a", {"write", "--pool", "p", "vol"},
         RandomBytes(4 << 20, 20 + round));
    Result from_a, from_b;
    std::thread ta([&] {
      from_a = d.Via("a", {"relationship", "update", kA});
    });
    std::thread tb([&] {
      from_b = d.Via("b", {"relationship", "update", kB});
    });
    ta.join();
    tb.join();
    // Never both refused: one runs, the other is told it is Transferring
    // (or, started after, finds the work done).
    EXPECT_TRUE(from_a.code == 0 || from_b.code == 0)
        << from_a.err << " / " << from_b.err;
    for (const Result* r : {&from_a, &from_b}) {
      if (r->code != 0) {
        EXPECT_THAT(r->err, HasSubstr("Transferring"));
      }
    }
    EXPECT_TRUE(SameBytes(d.Read("a", "vol"), d.Read("b", "vol")));
  }
}

}  // namespace
