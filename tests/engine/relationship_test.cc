// Replication relationships on two in-memory pools: the operator procedure
// with every guard, data-loss previews, hash-diff, lost pools and a crash at
// every durable write of every operation.
#include "engine/relationship.h"

#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "engine/delta_send.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/model.h"
#include "tests/testing/pools.h"
#include "tests/testing/site_pair.h"
#include "tests/testing/two_pools.h"

namespace engine {
namespace {

using blockstore::Pool;
using ::testing::HasSubstr;
using testing_util::Reach;
using testing_util::SitePair;
using testing_util::TestData;

constexpr uint32_t kChunk = 4096;
constexpr uint64_t kVolume = 256 * kChunk;  // 1 MiB
const Endpoint kA{"a", "v"};
const Endpoint kB{"b", "v"};

std::vector<std::byte> Content(Pool& pool, const std::string& vol,
                               const std::string& snap = "") {
  return testing_util::ReadAll(pool, vol, snap);
}

// Distinct incompressible data, never all zeros (exact byte counts).
std::vector<std::byte> Chunk(uint64_t seed) {
  return TestData(kChunk, seed * 4 + 2);
}

// Writes `count` chunks of fresh data at chunk positions first, first+step...
void WriteChunks(Pool& pool, const std::string& vol, uint64_t first,
                 uint64_t count, uint64_t step, uint64_t seed) {
  for (uint64_t i = 0; i < count; ++i) {
    absl::Status s =
        pool.Write(vol, (first + i * step) * kChunk, Chunk(seed * 1000 + i));
    ASSERT_TRUE(s.ok()) << s;
  }
  ASSERT_TRUE(pool.Flush().ok());
}

std::vector<blockstore::SnapshotInfo> Snaps(Pool& pool) {
  auto snaps = pool.ListSnapshots("v");
  EXPECT_TRUE(snaps.ok()) << snaps.status();
  return snaps.ok() ? *snaps : std::vector<blockstore::SnapshotInfo>{};
}

std::string NewestSnapshot(Pool& pool, const std::string& vol) {
  auto snaps = pool.ListSnapshots(vol);
  return snaps.ok() && !snaps->empty() ? snaps->back().name : "";
}

RelationshipRecord Record(Replication& rep, const Endpoint& e) {
  absl::StatusOr<RelationshipReport> r = rep.Report(e);
  EXPECT_TRUE(r.ok()) << r.status();
  return r.ok() ? r->record : RelationshipRecord{};
}

const Confirm kYes = [](const LossPreview&) { return true; };
const Confirm kNo = [](const LossPreview&) { return false; };

// A source volume with data and a relationship a:v -> b:v, not initialized.
void Prepare(SitePair& pools, Replication& rep) {
  Pool& a = pools.pool("a");
  ASSERT_TRUE(a.CreateVolume("v", kVolume).ok());
  WriteChunks(a, "v", 0, 200, 1, 1);
  ASSERT_TRUE(rep.Create(kA, kB, 600).ok());
}

// Two empty pools and the engine over them; with Loopback, pool b is
// behind a real peer connection.
class RelationshipTest : public ::testing::TestWithParam<Reach> {
 protected:
  SitePair pools{GetParam()};
  Replication rep{pools};
  Pool& a = pools.pool("a");
  Pool& b = pools.pool("b");
};

TEST_P(RelationshipTest, TheOperatorProcedureWithEveryGuard) {
  Prepare(pools, rep);
  RelationshipRecord r = Record(rep, kA);
  EXPECT_EQ(r.mirror_state, MirrorState::kUninitialized);
  EXPECT_EQ(r.status, TransferStatus::kIdle);

  // Guards before the baseline.
  absl::Status s = rep.Break(kB, kYes);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(s.message(), HasSubstr("mirror state is Uninitialized"));
  EXPECT_THAT(rep.Update(kA).status().message(),
              HasSubstr("run `tandem relationship initialize` first"));
  EXPECT_EQ(rep.Resync(kA, kYes).status().code(),
            absl::StatusCode::kFailedPrecondition);

  // Baseline: the destination is created, equal and read-only.
  absl::StatusOr<TransferStats> init = rep.Initialize(kB);
  ASSERT_TRUE(init.ok()) << init.status();
  EXPECT_EQ(init->data_bytes, 200 * kChunk);
  r = Record(rep, kB);
  EXPECT_EQ(r.mirror_state, MirrorState::kMirrored);
  EXPECT_EQ(r.last_transfer_data_bytes, 200 * kChunk);
  EXPECT_GT(r.total_transfer_bytes, 0u);
  EXPECT_EQ(Content(b, "v"), Content(a, "v"));
  EXPECT_TRUE(b.GetVolume("v")->read_only);
  s = b.Write("v", 0, Chunk(9));
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(rep.Initialize(kA)->snapshots, 0u);  // done already

  // Update: user snapshots taken on the source arrive too.
  WriteChunks(a, "v", 10, 5, 3, 2);
  ASSERT_TRUE(a.CreateSnapshot("v", "user1").ok());
  WriteChunks(a, "v", 100, 4, 1, 3);
  absl::StatusOr<TransferStats> up = rep.Update(kA);
  ASSERT_TRUE(up.ok()) << up.status();
  EXPECT_EQ(up->snapshots, 2u);
  EXPECT_EQ(up->data_bytes, 9 * kChunk);
  EXPECT_EQ(Content(b, "v", "user1"), Content(a, "v", "user1"));
  EXPECT_EQ(Content(b, "v"), Content(a, "v"));
  EXPECT_EQ(NewestSnapshot(b, "v"), NewestSnapshot(a, "v"));
  // Only the newest replication snapshot is kept (plus user1).
  EXPECT_EQ(a.ListSnapshots("v")->size(), 2u);
  EXPECT_EQ(b.ListSnapshots("v")->size(), 2u);

  // Break while Transferring is refused, from another thread.
  absl::Status during;
  RelationshipRecord seen;
  rep.set_transfer_started([&](Operation) {
    std::thread t([&] {
      during = rep.Break(kB, kYes);
      seen = Record(rep, kB);
    });
    t.join();
  });
  WriteChunks(a, "v", 50, 2, 1, 4);
  ASSERT_TRUE(rep.Update(kA).ok());
  rep.set_transfer_started(nullptr);
  EXPECT_EQ(during.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(during.message(),
              HasSubstr("relationship status is Transferring (update in "
                        "progress); wait until it is Idle"));
  EXPECT_EQ(seen.status, TransferStatus::kTransferring);
  EXPECT_EQ(Record(rep, kA).status, TransferStatus::kIdle);

  // Break: the destination becomes read-write.
  ASSERT_TRUE(rep.Break(kB, kYes).ok());
  EXPECT_EQ(Record(rep, kA).mirror_state, MirrorState::kBroken);
  EXPECT_FALSE(b.GetVolume("v")->read_only);
  EXPECT_TRUE(rep.Break(kB, kYes).ok());  // again: nothing to do
  EXPECT_THAT(rep.Update(kA).status().message(),
              HasSubstr("mirror state is Broken"));
  WriteChunks(b, "v", 20, 6, 7, 5);   // the destination runs production
  WriteChunks(a, "v", 150, 3, 1, 6);  // late writes on the old source

  // Reverse resync without confirmation changes nothing.
  std::vector<std::byte> a_before = Content(a, "v");
  absl::StatusOr<TransferStats> no = rep.ReverseResync(kA, kNo);
  EXPECT_EQ(no.status().code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(Content(a, "v"), a_before);
  EXPECT_EQ(Record(rep, kA).mirror_state, MirrorState::kBroken);

  // With it: the preview names exactly what the old source loses, and the
  // safety snapshot keeps it.
  LossPreview shown;
  absl::StatusOr<TransferStats> rr =
      rep.ReverseResync(kA, [&](const LossPreview& p) {
        shown = p;
        return true;
      });
  ASSERT_TRUE(rr.ok()) << rr.status();
  EXPECT_EQ(shown.method, Method::kRollback);
  EXPECT_EQ(shown.overwritten, kA);
  EXPECT_EQ(shown.bytes, 3 * kChunk);
  EXPECT_EQ(rr->data_bytes, 6 * kChunk);
  EXPECT_THAT(shown.Describe(),
              HasSubstr("12 KiB (12288 bytes in 3 chunks) written there"));
  ASSERT_FALSE(shown.safety_snapshot.empty());
  EXPECT_EQ(Content(a, "v", shown.safety_snapshot), a_before);
  EXPECT_EQ(Content(a, "v"), Content(b, "v"));
  r = Record(rep, kA);
  EXPECT_EQ(r.source, kB);
  EXPECT_EQ(r.destination, kA);
  EXPECT_EQ(r.mirror_state, MirrorState::kMirrored);
  EXPECT_TRUE(a.GetVolume("v")->read_only);
  EXPECT_FALSE(b.GetVolume("v")->read_only);

  // Re-establish the original direction; then production goes on.
  WriteChunks(b, "v", 60, 2, 1, 7);
  absl::StatusOr<TransferStats> re = rep.Reestablish(kB, kYes);
  ASSERT_TRUE(re.ok()) << re.status();
  r = Record(rep, kA);
  EXPECT_EQ(r.source, kA);
  EXPECT_EQ(r.destination, kB);
  EXPECT_EQ(r.mirror_state, MirrorState::kMirrored);
  EXPECT_EQ(Content(a, "v"), Content(b, "v"));
  EXPECT_TRUE(b.GetVolume("v")->read_only);
  EXPECT_FALSE(a.GetVolume("v")->read_only);
  WriteChunks(a, "v", 70, 2, 1, 8);
  ASSERT_TRUE(rep.Update(kA).ok());
  EXPECT_EQ(Content(a, "v"), Content(b, "v"));
  absl::StatusOr<RelationshipReport> report = rep.Report(kA);
  ASSERT_TRUE(report.ok());
  EXPECT_TRUE(report->healthy) << report->unhealthy_reason;
  EXPECT_EQ(report->last_common_snapshot, NewestSnapshot(a, "v"));

  // Release keeps data and user/safety snapshots, drops the rest.
  ASSERT_TRUE(rep.Release(kB).ok());
  EXPECT_FALSE(b.GetVolume("v")->read_only);
  for (Pool* p : {&a, &b}) {
    EXPECT_TRUE(p->Properties().empty());
    for (const auto& snap : Snaps(*p)) {
      EXPECT_FALSE(Replication::IsReplicationSnapshot(snap)) << snap.name;
    }
  }
  EXPECT_EQ(Content(a, "v"), Content(b, "v"));
  EXPECT_EQ(rep.Report(kA).status().code(), absl::StatusCode::kNotFound);
}

TEST_P(RelationshipTest, AnUpdateWalksTheDiffOnce) {
  Prepare(pools, rep);
  ASSERT_TRUE(rep.Initialize(kA).ok());
  WriteChunks(a, "v", 3, 40, 5, 7);
  // When the update first reports progress its changes are counted and
  // none sent: walk the same diff once here, to know what one walk reads.
  uint64_t one_walk = 0, ours = 0;
  rep.set_progress([&](const RelationshipRecord&) {
    if (one_walk > 0) return;
    std::vector<blockstore::SnapshotInfo> snaps = Snaps(a);
    ASSERT_GE(snaps.size(), 2u);
    const uint64_t before = a.diff_nodes_visited();
    absl::StatusOr<WalkedDiff> w =
        WalkDiff(a, "v", snaps[snaps.size() - 2].name, snaps.back().name, 0);
    ASSERT_TRUE(w.ok()) << w.status();
    one_walk = w->nodes_visited;
    ours = a.diff_nodes_visited() - before;
  });
  const uint64_t before = a.diff_nodes_visited();
  absl::StatusOr<TransferStats> up = rep.Update(kA);
  rep.set_progress(nullptr);
  ASSERT_TRUE(up.ok()) << up.status();
  EXPECT_EQ(up->data_bytes, 40 * kChunk);
  ASSERT_GT(one_walk, 4u);
  EXPECT_EQ(ours, one_walk);
  // Counting the changes and sending them: one walk between them.
  EXPECT_EQ(a.diff_nodes_visited() - before - ours, one_walk);
  EXPECT_EQ(Content(b, "v"), Content(a, "v"));
}

TEST_P(RelationshipTest, ResyncPreviewEqualsWhatTheDestinationLoses) {
  Prepare(pools, rep);
  ASSERT_TRUE(rep.Initialize(kA).ok());
  ASSERT_TRUE(rep.Break(kA, kYes).ok());
  WriteChunks(b, "v", 30, 5, 2, 11);
  ASSERT_TRUE(b.CreateSnapshot("v", "dest-own").ok());
  ASSERT_TRUE(b.Trim("v", 190 * kChunk, 2 * kChunk).ok());
  std::vector<std::byte> b_before = Content(b, "v");
  LossPreview shown;
  absl::StatusOr<TransferStats> rs = rep.Resync(kA, [&](const LossPreview& p) {
    shown = p;
    return true;
  });
  ASSERT_TRUE(rs.ok()) << rs.status();
  EXPECT_EQ(shown.overwritten, kB);
  EXPECT_EQ(shown.chunks, 7u);
  EXPECT_EQ(shown.kept_snapshots, std::vector<std::string>{"dest-own"});
  // Exactly the chunks that differ between the safety copy and the result.
  std::vector<std::byte> after = Content(b, "v");
  uint64_t differing = 0;
  for (uint64_t c = 0; c < kVolume / kChunk; ++c) {
    differing += !std::equal(after.begin() + c * kChunk,
                             after.begin() + (c + 1) * kChunk,
                             b_before.begin() + c * kChunk);
  }
  EXPECT_EQ(differing * kChunk, shown.bytes);
  EXPECT_EQ(Content(b, "v", shown.safety_snapshot), b_before);
  EXPECT_EQ(after, Content(a, "v"));
  EXPECT_EQ(Record(rep, kB).mirror_state, MirrorState::kMirrored);
  EXPECT_TRUE(b.GetSnapshot("v", "dest-own").ok());
}

TEST_P(RelationshipTest, HashDiffShipsOnlyTheChunksThatDiffer) {
  ASSERT_TRUE(a.CreateVolume("v", 4 * kVolume).ok());
  WriteChunks(a, "v", 0, 1024, 1, 21);
  ASSERT_TRUE(rep.Create(kA, kB, 0).ok());
  ASSERT_TRUE(rep.Initialize(kA).ok());
  ASSERT_TRUE(rep.Break(kA, kYes).ok());
  // The old source lost its snapshots: no common base is left.
  for (const auto& s : Snaps(a)) {
    ASSERT_TRUE(a.DeleteSnapshot("v", s.name).ok());
  }
  WriteChunks(b, "v", 3, 10, 97, 22);  // 1% of 1024 chunks
  LossPreview shown;
  absl::StatusOr<TransferStats> rr = rep.ReverseResync(kA, [&](const auto& p) {
    shown = p;
    return true;
  });
  ASSERT_TRUE(rr.ok()) << rr.status();
  EXPECT_EQ(shown.method, Method::kHashDiff);
  EXPECT_EQ(shown.chunks, 10u);
  EXPECT_EQ(rr->data_bytes, 10 * kChunk);  // 1% of the data, not all of it
  // The digests of one side, then a delta of the 10 chunks (plus its
  // header, segment header and end).
  EXPECT_GE(rr->stream_bytes, 10 * kChunk + 1024 * 32);
  EXPECT_LE(rr->stream_bytes, 10 * (kChunk + 32) + 1024 * 32 + 1024);
  EXPECT_EQ(Content(a, "v"), Content(b, "v"));
  EXPECT_EQ(*a.RootDigest("v", ""), *b.RootDigest("v", ""));
  EXPECT_EQ(Record(rep, kA).mirror_state, MirrorState::kMirrored);
  // The two now share a snapshot again: the next update is incremental.
  WriteChunks(b, "v", 500, 1, 1, 23);
  absl::StatusOr<TransferStats> up = rep.Update(kB);
  ASSERT_TRUE(up.ok()) << up.status();
  EXPECT_EQ(up->data_bytes, kChunk);
}

TEST_P(RelationshipTest, HealthFollowsStateErrorsAndLag) {
  Prepare(pools, rep);  // schedule 600 s
  absl::StatusOr<RelationshipReport> r = rep.Report(kA);
  ASSERT_TRUE(r.ok());
  EXPECT_FALSE(r->healthy);
  EXPECT_THAT(r->unhealthy_reason, HasSubstr("not initialized"));
  EXPECT_EQ(r->lag_seconds, -1);
  ASSERT_TRUE(rep.Initialize(kA).ok());
  const int64_t common_ns =
      pools.pool("b").ListSnapshots("v")->back().create_time_ns;
  rep.set_clock([&] { return common_ns + int64_t{1100} * 1000000000; });
  r = rep.Report(kB);
  EXPECT_TRUE(r->healthy) << r->unhealthy_reason;
  EXPECT_EQ(r->lag_seconds, 1100);
  EXPECT_EQ(r->record.progress_bytes, 200 * kChunk);
  EXPECT_EQ(r->record.progress_total_bytes, 200 * kChunk);
  rep.set_clock([&] { return common_ns + int64_t{1300} * 1000000000; });
  r = rep.Report(kB);
  EXPECT_FALSE(r->healthy);
  EXPECT_THAT(r->unhealthy_reason,
              HasSubstr("lag 1300 s is more than twice the schedule (600 s)"));
  // A failed transfer makes it unhealthy with the error, until one succeeds.
  rep.set_clock(nullptr);
  pools.SetDown("b", true);
  EXPECT_FALSE(rep.Update(kA).ok());
  pools.SetDown("b", false);
  r = rep.Report(kA);
  EXPECT_TRUE(r->healthy) << "a refused start is not a failed transfer";
  // Someone deleted the destination's snapshots behind the engine's back.
  for (const auto& snap : Snaps(pools.pool("b"))) {
    ASSERT_TRUE(pools.pool("b").DeleteSnapshot("v", snap.name).ok());
  }
  EXPECT_THAT(rep.Update(kA).status().message(),
              HasSubstr("break, then resync or reverse-resync"));
  r = rep.Report(kA);
  EXPECT_FALSE(r->healthy);
  EXPECT_THAT(
      r->unhealthy_reason,
      HasSubstr("last transfer failed: the two volumes share no snapshot"));
  EXPECT_EQ(r->record.status, TransferStatus::kIdle);
  EXPECT_EQ(r->record.mirror_state, MirrorState::kMirrored);
  // The way out: break and resync (a hash-diff: nothing differs).
  ASSERT_TRUE(rep.Break(kA, kYes).ok());
  absl::StatusOr<TransferStats> rs = rep.Resync(kA, kYes);
  ASSERT_TRUE(rs.ok()) << rs.status();
  EXPECT_EQ(rs->data_bytes, 0u);
  EXPECT_TRUE(rep.Report(kA)->healthy);
  EXPECT_EQ(Content(pools.pool("b"), "v"), Content(pools.pool("a"), "v"));
}

TEST_P(RelationshipTest, RecordsRoundTripAndBadOnesAreNamed) {
  RelationshipRecord r;
  r.id = "0a1b2c3d-0000-4000-8000-000000000000";
  r.epoch = 7;
  r.source = {"/p/a.img", "v"};
  r.origin = r.source;
  r.destination = {"/p/b.img", "w:x"};
  r.mirror_state = MirrorState::kBroken;
  r.status = TransferStatus::kTransferring;
  r.operation = Operation::kResync;
  r.last_transfer_error = "disk \"full\"\n";
  r.total_transfer_bytes = uint64_t{1} << 50;
  absl::StatusOr<RelationshipRecord> back =
      RelationshipRecord::FromJson(r.ToJson());
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->ToJson(), r.ToJson());
  EXPECT_EQ(back->destination, r.destination);
  EXPECT_EQ(back->mirror_state, MirrorState::kBroken);

  std::string text = r.ToJson();
  std::string bad_state = text;
  bad_state.replace(bad_state.find("\"Broken\""), 8, "\"Bent\"");
  EXPECT_THAT(RelationshipRecord::FromJson(bad_state).status().message(),
              HasSubstr("bad mirror_state 'Bent'"));
  EXPECT_THAT(RelationshipRecord::FromJson("{}").status().message(),
              HasSubstr("relationship record is malformed"));
  EXPECT_THAT(
      RelationshipRecord::FromJson(text.substr(0, 40)).status().message(),
      HasSubstr("relationship record is malformed"));
  std::string newer = text;
  newer.replace(newer.find("\"version\":2"), 11, "\"version\":9");
  // A version 1 record (before sites, rates and plans) is still read.
  const std::string v1 =
      R"({"version":1,"id":"x","epoch":3,"source":{"pool":"/p/a","volume":"v"},)"
      R"("destination":{"pool":"/p/b","volume":"v"},"schedule_seconds":600,)"
      R"("mirror_state":"Mirrored","relationship_status":"Idle",)"
      R"("operation":"","pending":"","origin":{"pool":"/p/a","volume":"v"},)"
      R"("next_snapshot":4,"last_transfer_end_ns":1,"last_transfer_bytes":2,)"
      R"("last_transfer_data_bytes":3,"last_transfer_seconds":0.5,)"
      R"("last_transfer_error":"","total_transfer_bytes":9,)"
      R"("progress_bytes":0,"progress_total_bytes":0})";
  absl::StatusOr<RelationshipRecord> old = RelationshipRecord::FromJson(v1);
  ASSERT_TRUE(old.ok()) << old.status();
  EXPECT_EQ(old->source.ToString(), "/p/a:v");
  EXPECT_EQ(old->mirror_state, MirrorState::kMirrored);
  EXPECT_EQ(old->max_rate_bytes, 0u);
  std::string bad_op = text;
  bad_op.replace(bad_op.find("\"resync\""), 8, "\"resink\"");
  EXPECT_THAT(RelationshipRecord::FromJson(bad_op).status().message(),
              HasSubstr("bad operation 'resink'"));
  EXPECT_EQ(RelationshipRecord::FromJson(newer).status().code(),
            absl::StatusCode::kUnimplemented);
}

TEST_P(RelationshipTest, LostSourceVolumeGetsAFullBaseline) {
  Prepare(pools, rep);
  ASSERT_TRUE(rep.Initialize(kA).ok());
  // The site goes down: break works with the source unreachable.
  pools.SetDown("a", true);
  ASSERT_TRUE(rep.Break(kB, kYes).ok());
  absl::StatusOr<RelationshipReport> report = rep.Report(kB);
  ASSERT_TRUE(report.ok());
  EXPECT_FALSE(report->healthy);
  EXPECT_THAT(report->notes[0], HasSubstr("source pool cannot be reached"));
  absl::StatusOr<TransferStats> rr = rep.ReverseResync(kB, kYes);
  EXPECT_THAT(rr.status().message(), HasSubstr("create an empty pool at a"));
  WriteChunks(b, "v", 0, 3, 1, 31);
  // It comes back with the volume gone.
  pools.SetDown("a", false);
  ASSERT_TRUE(a.DeleteVolume("v", true).ok());
  LossPreview shown;
  rr = rep.ReverseResync(kB, [&](const auto& p) {
    shown = p;
    return true;
  });
  ASSERT_TRUE(rr.ok()) << rr.status();
  EXPECT_EQ(shown.method, Method::kNewVolume);
  EXPECT_EQ(Content(a, "v"), Content(b, "v"));
  EXPECT_EQ(Record(rep, kA).source, kB);
}

TEST_P(RelationshipTest, AUserSnapshotNamedLikeAReplicationOneIsKept) {
  Prepare(pools, rep);
  ASSERT_TRUE(rep.Initialize(kA).ok());
  const std::string id = Record(rep, kA).id;
  // Exactly the name the next replication snapshot would get, and an older
  // one's.
  const std::string next = "rep." + id.substr(0, 8) + ".000002";
  const std::string older = "rep." + id.substr(0, 8) + ".000000";
  ASSERT_TRUE(a.CreateSnapshot("v", next).ok());
  WriteChunks(a, "v", 0, 1, 1, 51);
  ASSERT_TRUE(a.CreateSnapshot("v", older).ok());
  for (int i = 0; i < 3; ++i) {
    WriteChunks(a, "v", 5 + i, 1, 1, 52 + i);
    ASSERT_TRUE(rep.Update(kA).ok());
  }
  for (const std::string& name : {next, older}) {
    absl::StatusOr<blockstore::SnapshotInfo> mine = a.GetSnapshot("v", name);
    ASSERT_TRUE(mine.ok()) << name << " was deleted as a replication snapshot";
    EXPECT_EQ(mine->owner, "");
    EXPECT_TRUE(b.GetSnapshot("v", name).ok()) << name;
  }
  // Release keeps them too; only the relationship's own snapshots go.
  ASSERT_TRUE(rep.Release(kA).ok());
  EXPECT_TRUE(a.GetSnapshot("v", next).ok());
  for (const auto& snap : Snaps(a)) EXPECT_EQ(snap.owner, "") << snap.name;
}

TEST_P(RelationshipTest, CreateValidatesEverythingFirst) {
  ASSERT_TRUE(a.CreateVolume("v", kVolume).ok());
  absl::StatusOr<RelationshipRecord> r = rep.Create(kA, {"b", "a b"}, 0);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("'a b'"));
  EXPECT_THAT(r.status().message(), HasSubstr("not a valid volume name"));
  EXPECT_EQ(rep.Create(kA, {"b", ".hidden"}, 0).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(rep.Create(kA, kB, -5).status().code(),
            absl::StatusCode::kInvalidArgument);
  pools.SetDown("b", true);
  EXPECT_EQ(rep.Create(kA, kB, 0).status().code(),
            absl::StatusCode::kUnavailable);
  pools.SetDown("b", false);
  // Nothing was left behind by the refusals.
  EXPECT_TRUE(a.Properties().empty());
  EXPECT_TRUE(b.Properties().empty());
  EXPECT_TRUE(Snaps(a).empty());
}

TEST_P(RelationshipTest, NoCommonSnapshotIsUnhealthyWithWhatToRun) {
  Prepare(pools, rep);
  ASSERT_TRUE(rep.Initialize(kA).ok());
  // The destination pool "restored from an older copy": its snapshots are
  // not the source's any more.
  for (const auto& snap : Snaps(b)) {
    ASSERT_TRUE(b.DeleteSnapshot("v", snap.name).ok());
  }
  absl::StatusOr<RelationshipReport> r = rep.Report(kA);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->record.mirror_state, MirrorState::kMirrored);
  EXPECT_EQ(r->last_common_snapshot, "");
  EXPECT_FALSE(r->healthy);
  EXPECT_THAT(r->unhealthy_reason, HasSubstr("share no snapshot"));
  EXPECT_THAT(r->unhealthy_reason,
              HasSubstr("break, then resync or reverse-resync"));
}

TEST_P(RelationshipTest, UpdateRefusalsSayWhatToRunNotAToolFlag) {
  Prepare(pools, rep);
  ASSERT_TRUE(rep.Initialize(kA).ok());
  // Someone took a snapshot on the destination behind the engine's back
  // (the pool API allows it while read-only is lifted).
  ASSERT_TRUE(b.SetVolumeReadOnly("v", false).ok());
  ASSERT_TRUE(b.CreateSnapshot("v", "stray").ok());
  WriteChunks(a, "v", 1, 1, 1, 61);
  absl::Status s = rep.Update(kA).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(s.message(), HasSubstr("run `tandem relationship break`"));
  EXPECT_THAT(s.message(), ::testing::Not(HasSubstr("--rollback")));
}

TEST_P(RelationshipTest, ReleaseWithTheOtherSideDownFinishesWhenItIsBack) {
  Prepare(pools, rep);
  ASSERT_TRUE(rep.Initialize(kA).ok());
  pools.SetDown("a", true);
  absl::StatusOr<ReleaseReport> half = rep.Release(kB);
  ASSERT_TRUE(half.ok()) << half.status();
  EXPECT_FALSE(half->complete);
  EXPECT_EQ(half->waiting, kA);
  EXPECT_THAT(half->why, HasSubstr("site down"));
  EXPECT_FALSE(b.GetVolume("v")->read_only);
  for (const auto& snap : Snaps(b)) EXPECT_EQ(snap.owner, "") << snap.name;
  // Other operations know it is released.
  EXPECT_THAT(rep.Update(kB).status().message(), HasSubstr("was released"));
  absl::StatusOr<RelationshipReport> r = rep.Report(kB);
  ASSERT_TRUE(r.ok());
  EXPECT_FALSE(r->healthy);
  EXPECT_THAT(r->unhealthy_reason, HasSubstr("released"));
  // Site a returns, still believing it is Mirrored; the first status that
  // reaches both sides finishes the release there.
  pools.SetDown("a", false);
  EXPECT_FALSE(a.Properties().empty());
  EXPECT_EQ(rep.Report(kA).status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(a.Properties().empty());
  EXPECT_TRUE(b.Properties().empty());
  EXPECT_FALSE(a.GetVolume("v")->read_only);
  for (const auto& snap : Snaps(a)) EXPECT_EQ(snap.owner, "") << snap.name;
  // And the volumes can join a new relationship.
  ASSERT_TRUE(b.DeleteVolume("v", true).ok());
  EXPECT_TRUE(rep.Create(kA, kB, 0).ok());
}

TEST_P(RelationshipTest, UpdatesFromBothEndsAtOnceRunOneAndReferTheOther) {
  Prepare(pools, rep);
  ASSERT_TRUE(rep.Initialize(kA).ok());
  WriteChunks(a, "v", 3, 4, 1, 71);
  absl::Status other;
  RelationshipReport seen;
  rep.set_transfer_started([&](Operation) {
    std::thread t([&] {
      other = rep.Update(kB).status();
      seen = *rep.Report(kB);
    });
    t.join();
  });
  absl::StatusOr<TransferStats> first = rep.Update(kA);
  rep.set_transfer_started(nullptr);
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(other.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(other.message(), HasSubstr("Transferring (update in progress)"));
  EXPECT_EQ(seen.record.status, TransferStatus::kTransferring);
  EXPECT_EQ(seen.record.operation, Operation::kUpdate);
  EXPECT_EQ(Content(b, "v"), Content(a, "v"));
}

// --- Crash at every durable write -------------------------------------------

using Op = std::function<absl::Status(Replication&)>;
using Check = std::function<void(SitePair&, Replication&)>;

// Runs `op` on a copy of `start` with a power loss at every durable write
// point in turn; after each, the pools are reopened and the same op run
// again must succeed and pass `check`.
void CrashEverywhere(SitePair& start, const Op& op, const Check& check) {
  testing_util::CrashPlan counting;
  uint64_t points = 0;
  {
    SitePair pools(start, true);
    pools.Arm(counting);
    Replication rep(pools);
    ASSERT_TRUE(op(rep).ok());
    points = counting.points;
  }
  ASSERT_GT(points, 0u);
  for (uint64_t at = 0; at < points; ++at) {
    SCOPED_TRACE(
        absl::StrCat("power loss at durable write ", at, " of ", points));
    SitePair pools(start, true);
    testing_util::CrashPlan plan{0, at};
    pools.Arm(plan);
    {
      Replication rep(pools);
      EXPECT_FALSE(op(rep).ok());
    }
    pools.CrashAndReopen();
    Replication rep(pools);
    absl::Status again = op(rep);
    ASSERT_TRUE(again.ok()) << again;
    check(pools, rep);
    for (const char* name : {"a", "b"}) {
      auto report = pools.pool(name).Check(false);
      ASSERT_TRUE(report.ok());
      EXPECT_THAT(report->problems, ::testing::IsEmpty()) << name;
    }
    if (::testing::Test::HasFailure()) return;
  }
}

void ExpectMirrored(SitePair& pools, Replication& rep, const Endpoint& src) {
  RelationshipRecord r = Record(rep, kA);
  EXPECT_EQ(r.mirror_state, MirrorState::kMirrored);
  EXPECT_EQ(r.status, TransferStatus::kIdle);
  EXPECT_EQ(r.source, src);
  Pool& s = pools.pool(src.pool);
  Pool& d = pools.pool(src == kA ? "b" : "a");
  EXPECT_EQ(Content(d, "v"), Content(s, "v"));
  EXPECT_EQ(NewestSnapshot(d, "v"), NewestSnapshot(s, "v"));
  EXPECT_TRUE(d.GetVolume("v")->read_only);
}

class RelationshipCrashTest : public ::testing::TestWithParam<Reach> {};

TEST_P(RelationshipCrashTest, EveryOperationCompletesWhenRunAgain) {
  SitePair start(GetParam());
  {
    Replication rep(start);
    Prepare(start, rep);
  }
  {
    SCOPED_TRACE("initialize");
    CrashEverywhere(
        start, [](Replication& r) { return r.Initialize(kA).status(); },
        [](SitePair& p, Replication& r) { ExpectMirrored(p, r, kA); });
  }
  {
    Replication rep(start);
    ASSERT_TRUE(rep.Initialize(kA).ok());
    WriteChunks(start.pool("a"), "v", 5, 4, 9, 41);
    ASSERT_TRUE(start.pool("a").CreateSnapshot("v", "mine").ok());
    WriteChunks(start.pool("a"), "v", 90, 2, 1, 42);
  }
  {
    SCOPED_TRACE("update");
    CrashEverywhere(
        start, [](Replication& r) { return r.Update(kA).status(); },
        [](SitePair& p, Replication& r) {
          ExpectMirrored(p, r, kA);
          EXPECT_TRUE(p.pool("b").GetSnapshot("v", "mine").ok());
        });
  }
  {
    SCOPED_TRACE("break");
    CrashEverywhere(
        start, [](Replication& r) { return r.Break(kA, kYes); },
        [](SitePair& p, Replication& r) {
          EXPECT_EQ(Record(r, kA).mirror_state, MirrorState::kBroken);
          EXPECT_FALSE(p.pool("b").GetVolume("v")->read_only);
        });
  }
  {
    Replication rep(start);
    ASSERT_TRUE(rep.Break(kA, kYes).ok());
    WriteChunks(start.pool("b"), "v", 7, 3, 11, 43);
    WriteChunks(start.pool("a"), "v", 8, 2, 13, 44);
  }
  std::vector<std::byte> a_before = Content(start.pool("a"), "v");
  std::vector<std::byte> b_before = Content(start.pool("b"), "v");
  // Run again after a crash, the preview may show a safety snapshot that the
  // first run already took: the data is still all there.
  auto kept = [](Pool& pool, const std::vector<std::byte>& before) {
    bool found = false;
    for (const auto& s : Snaps(pool)) {
      found = found || (absl::StartsWith(s.name, "safety-") &&
                        Content(pool, "v", s.name) == before);
    }
    EXPECT_TRUE(found) << "no safety snapshot holds the overwritten data";
  };
  {
    SCOPED_TRACE("resync");
    CrashEverywhere(
        start, [](Replication& r) { return r.Resync(kA, kYes).status(); },
        [&](SitePair& p, Replication& r) {
          ExpectMirrored(p, r, kA);
          kept(p.pool("b"), b_before);
        });
  }
  {
    SCOPED_TRACE("reverse resync");
    CrashEverywhere(
        start,
        [](Replication& r) { return r.ReverseResync(kA, kYes).status(); },
        [&](SitePair& p, Replication& r) {
          ExpectMirrored(p, r, kB);
          kept(p.pool("a"), a_before);
        });
  }
  {
    Replication rep(start);
    ASSERT_TRUE(rep.ReverseResync(kA, kYes).ok());
    WriteChunks(start.pool("b"), "v", 40, 3, 5, 45);  // b is the source now
  }
  {
    SCOPED_TRACE("reestablish");
    CrashEverywhere(
        start, [](Replication& r) { return r.Reestablish(kB, kYes).status(); },
        [](SitePair& p, Replication& r) {
          ExpectMirrored(p, r, kA);
          EXPECT_EQ(Record(r, kA).pending, Operation::kNone);
        });
  }
  {
    SCOPED_TRACE("release");
    CrashEverywhere(
        start, [](Replication& r) { return r.Release(kB).status(); },
        [](SitePair& p, Replication&) {
          for (const char* name : {"a", "b"}) {
            EXPECT_TRUE(p.pool(name).Properties().empty()) << name;
            for (const auto& s : Snaps(p.pool(name))) {
              EXPECT_FALSE(Replication::IsReplicationSnapshot(s));
            }
            EXPECT_FALSE(p.pool(name).GetVolume("v")->read_only) << name;
          }
        });
  }
}

INSTANTIATE_TEST_SUITE_P(Reach, RelationshipTest,
                         ::testing::Values(Reach::kLocal, Reach::kLoopback),
                         testing_util::ReachName);
INSTANTIATE_TEST_SUITE_P(Reach, RelationshipCrashTest,
                         ::testing::Values(Reach::kLocal, Reach::kLoopback),
                         testing_util::ReachName);

}  // namespace
}  // namespace engine
