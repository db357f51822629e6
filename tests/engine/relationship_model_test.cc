// Randomized interleavings of writes on either side, user snapshots and
// every relationship operation, checked against a small model of the states
// and guards. Invariants after every step:
//  - each operation succeeds or is refused exactly as the state says;
//  - after every successful transfer the destination equals the source byte
//    for byte, and so do their newest snapshots (same GUID);
//  - user snapshots taken on the source are on the destination after the
//    next transfer, with the same content;
//  - nothing is lost except what a confirmed resync / reverse resync said it
//    would overwrite, and that is kept in a snapshot on the overwritten side;
//  - a declined confirmation changes nothing.
// A failure names its seed; rerun one with TANDEM_MODEL_SEED=<seed>.
// TANDEM_MODEL_SEEDS and TANDEM_MODEL_STEPS scale the run (label soak: more).
#include <cstdlib>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/relationship.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/model.h"
#include "tests/testing/pools.h"
#include "tests/testing/site_pair.h"

namespace engine {
namespace {

using blockstore::Pool;
using testing_util::Reach;
using testing_util::SitePair;
using testing_util::TestData;

constexpr uint32_t kChunk = 4096;
constexpr uint64_t kChunks = 128;
const Endpoint kA{"a", "v"};
const Endpoint kB{"b", "v"};

std::vector<std::byte> Content(Pool& pool, const std::string& snap = "") {
  return testing_util::ReadAll(pool, "v", snap);
}

std::vector<blockstore::SnapshotInfo> Snaps(Pool& pool) {
  auto s = pool.ListSnapshots("v");
  return s.ok() ? *s : std::vector<blockstore::SnapshotInfo>{};
}

// How often each overwrite method ran, to be sure the runs reach them all.
std::map<std::string, int> methods_seen;

class ModelRun {
 public:
  ModelRun(uint64_t seed, Reach reach)
      : rng_(seed), pools_(reach), rep_(pools_) {}

  void Go(int steps) {
    Pool& a = pools_.pool("a");
    ASSERT_TRUE(a.CreateVolume("v", kChunks * kChunk).ok());
    WriteSome(a, 60);
    ASSERT_TRUE(rep_.Create(kA, kB, 0).ok());
    for (int i = 0; i < steps && !::testing::Test::HasFatalFailure(); ++i) {
      SCOPED_TRACE(absl::StrCat("step ", i));
      Step();
      if (::testing::Test::HasFailure()) return;
    }
  }

 private:
  Pool& P(const Endpoint& e) { return pools_.pool(e.pool); }
  const Endpoint& Dest() { return source_ == kA ? kB : kA; }

  void WriteSome(Pool& pool, int n) {
    for (int i = 0; i < n; ++i) {
      uint64_t c = rng_() % kChunks;
      absl::Status s;
      if (rng_() % 8 == 0) {
        s = pool.Trim("v", c * kChunk, kChunk);
      } else {
        s = pool.Write("v", c * kChunk + (rng_() % 2) * 100,
                       TestData(kChunk - 100, rng_()));
      }
      ASSERT_TRUE(s.ok()) << s;
    }
  }

  void ExpectMirror() {
    Pool& s = P(source_);
    Pool& d = P(Dest());
    std::vector<std::byte> dc = Content(d), sc = Content(s);
    ASSERT_EQ(dc.size(), sc.size());
    for (uint64_t c = 0; c < kChunks; ++c) {
      ASSERT_TRUE(std::equal(dc.begin() + c * kChunk,
                             dc.begin() + (c + 1) * kChunk,
                             sc.begin() + c * kChunk))
          << "destination differs from source in chunk " << c;
    }
    auto ss = Snaps(s), ds = Snaps(d);
    ASSERT_FALSE(ss.empty());
    ASSERT_FALSE(ds.empty());
    EXPECT_EQ(ss.back().guid, ds.back().guid);
    EXPECT_TRUE(d.GetVolume("v")->read_only);
    // Every user snapshot of the source since the last transfer came along.
    for (const std::string& name : pending_user_snaps_) {
      ASSERT_TRUE(d.GetSnapshot("v", name).ok()) << name << " missing";
      EXPECT_EQ(Content(d, name), Content(s, name)) << name;
    }
    pending_user_snaps_.clear();
    RelationshipRecord r = rep_.Report(kA)->record;
    EXPECT_EQ(r.mirror_state, MirrorState::kMirrored);
    EXPECT_EQ(r.status, TransferStatus::kIdle);
    EXPECT_EQ(r.source, source_);
  }

  void Step() {
    const int op = rng_() % 13;
    SCOPED_TRACE(absl::StrCat("op ", op, " in state ", ToString(state_),
                              ", source ", source_.pool));
    RelationshipRecord before = rep_.Report(kA)->record;
    ASSERT_EQ(before.mirror_state, state_);
    switch (op) {
      case 0:
      case 1:
      case 2: {  // production writes on the source
        WriteSome(P(source_), 1 + rng_() % 6);
        break;
      }
      case 3: {  // writes on the destination: refused while Mirrored
        if (!P(Dest()).GetVolume("v").ok()) break;
        absl::Status s = P(Dest()).Write("v", 0, TestData(kChunk, rng_()));
        EXPECT_EQ(s.ok(), state_ == MirrorState::kBroken) << s;
        break;
      }
      case 4: {  // a user snapshot on the source
        std::string name = absl::StrCat("user", ++user_);
        ASSERT_TRUE(P(source_).CreateSnapshot("v", name).ok());
        if (state_ == MirrorState::kMirrored)
          pending_user_snaps_.push_back(name);
        break;
      }
      case 5:
      case 6: {
        absl::StatusOr<TransferStats> s = rep_.Update(source_);
        EXPECT_EQ(s.ok(), state_ == MirrorState::kMirrored) << s.status();
        if (s.ok()) ExpectMirror();
        break;
      }
      case 7: {
        absl::StatusOr<TransferStats> s = rep_.Initialize(source_);
        EXPECT_EQ(s.ok(), state_ != MirrorState::kBroken) << s.status();
        if (s.ok() && state_ == MirrorState::kUninitialized) {
          state_ = MirrorState::kMirrored;
          pending_user_snaps_.clear();  // a baseline carries no history
          ExpectMirror();
        }
        break;
      }
      case 8: {
        absl::Status s = rep_.Break(rng_() % 2 ? kA : kB,
                                    [](const LossPreview&) { return true; });
        EXPECT_EQ(s.ok(), state_ != MirrorState::kUninitialized) << s;
        if (s.ok()) {
          state_ = MirrorState::kBroken;
          EXPECT_FALSE(P(Dest()).GetVolume("v")->read_only);
          pending_user_snaps_.clear();
        }
        break;
      }
      case 9:
      case 10: {
        Overwrite(/*reverse=*/op == 10);
        break;
      }
      case 12: {  // the source loses its snapshots: no common base left
        if (state_ != MirrorState::kBroken || rng_() % 2) break;
        for (const auto& snap : Snaps(P(source_))) {
          ASSERT_TRUE(P(source_).DeleteSnapshot("v", snap.name).ok());
        }
        break;
      }
      case 11: {
        absl::StatusOr<TransferStats> s =
            rep_.Reestablish(source_, [](const LossPreview&) { return true; });
        EXPECT_EQ(s.ok(), state_ == MirrorState::kMirrored) << s.status();
        if (s.ok() && source_ == kB) {  // else: already the original way
          source_ = kA;
          ExpectMirror();
        }
        break;
      }
    }
  }

  void Overwrite(bool reverse) {
    const Endpoint victim = reverse ? source_ : Dest();
    const bool exists = P(victim).GetVolume("v").ok();
    std::vector<std::byte> before =
        exists ? Content(P(victim)) : std::vector<std::byte>{};
    const bool say_yes = rng_() % 4 != 0;
    LossPreview shown;
    bool asked = false;
    Confirm confirm = [&](const LossPreview& p) {
      shown = p;
      asked = true;
      return say_yes;
    };
    absl::StatusOr<TransferStats> s = reverse
                                          ? rep_.ReverseResync(source_, confirm)
                                          : rep_.Resync(source_, confirm);
    if (state_ == MirrorState::kUninitialized) {
      EXPECT_FALSE(s.ok());
      return;
    }
    if (state_ == MirrorState::kMirrored) {  // nothing to do
      EXPECT_TRUE(s.ok()) << s.status();
      EXPECT_FALSE(asked);
      return;
    }
    ASSERT_TRUE(asked);
    EXPECT_EQ(shown.overwritten, victim);
    if (!say_yes) {
      EXPECT_TRUE(absl::IsCancelled(s.status())) << s.status();
      if (exists) {
        EXPECT_EQ(Content(P(victim)), before);
      }
      return;
    }
    ASSERT_TRUE(s.ok()) << s.status();
    ++methods_seen[ToString(shown.method)];
    if (reverse) source_ = Dest();
    state_ = MirrorState::kMirrored;
    ExpectMirror();
    if (!exists) return;
    // What was there is either still the live content, or kept in the
    // safety snapshot the preview named; and the preview's byte count is
    // exactly the chunks that changed.
    std::vector<std::byte> after = Content(P(victim));
    if (shown.safety_snapshot.empty()) {
      EXPECT_EQ(shown.bytes, 0u);
    } else {
      EXPECT_EQ(Content(P(victim), shown.safety_snapshot), before);
    }
    if (shown.method == Method::kHashDiff) {
      uint64_t differ = 0;
      for (uint64_t c = 0; c < kChunks; ++c) {
        differ += !std::equal(after.begin() + c * kChunk,
                              after.begin() + (c + 1) * kChunk,
                              before.begin() + c * kChunk);
      }
      EXPECT_EQ(differ * kChunk, shown.bytes);
    }
  }

  std::mt19937_64 rng_;
  SitePair pools_;
  Replication rep_;
  Endpoint source_ = kA;
  MirrorState state_ = MirrorState::kUninitialized;
  int user_ = 0;
  std::vector<std::string> pending_user_snaps_;
};

class RelationshipModelTest : public ::testing::TestWithParam<Reach> {};

TEST_P(RelationshipModelTest, RandomInterleavingsKeepEveryInvariant) {
  methods_seen.clear();
  auto env = [](const char* name, uint64_t fallback) {
    const char* v = std::getenv(name);
    return v != nullptr ? std::strtoull(v, nullptr, 10) : fallback;
  };
  std::vector<uint64_t> seeds;
  if (const char* s = std::getenv("TANDEM_MODEL_SEED")) {
    seeds.push_back(std::strtoull(s, nullptr, 10));
  } else {
    const uint64_t n = env("TANDEM_MODEL_SEEDS", 40);
    for (uint64_t i = 1; i <= n; ++i) seeds.push_back(i * 7919);
  }
  const int steps = static_cast<int>(env("TANDEM_MODEL_STEPS", 80));
  for (uint64_t seed : seeds) {
    SCOPED_TRACE(absl::StrCat("TANDEM_MODEL_SEED=", seed));
    ModelRun run(seed, GetParam());
    run.Go(steps);
    if (::testing::Test::HasFailure()) return;
  }
  if (seeds.size() > 1) {
    EXPECT_GT(methods_seen["rollback"], 10);
    EXPECT_GT(methods_seen["hash-diff"], 3);
  }
}

INSTANTIATE_TEST_SUITE_P(Reach, RelationshipModelTest,
                         ::testing::Values(Reach::kLocal, Reach::kLoopback),
                         testing_util::ReachName);

}  // namespace
}  // namespace engine
