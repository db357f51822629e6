#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "blockstore/mem_io.h"
#include "blockstore/pool.h"
#include "engine/delta_format.h"
#include "engine/delta_receive.h"
#include "engine/delta_send.h"
#include "engine/image.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/fault_io.h"
#include "tests/testing/model.h"
#include "tests/testing/pools.h"

namespace engine {
namespace {

using blockstore::MemIo;
using blockstore::OpenMode;
using blockstore::Pool;
using ::testing::HasSubstr;
using testing_util::MakePool;
using testing_util::TestData;

constexpr uint32_t kChunk = 4096;

std::string Send(Pool& pool, const std::string& vol, const std::string& base,
                 const std::string& target, SendStats* stats = nullptr,
                 int level = 1) {
  StringSink sink;
  SendOptions options;
  options.zstd_level = level;
  absl::StatusOr<SendStats> s =
      SendDelta(pool, vol, base, target, sink, options);
  EXPECT_TRUE(s.ok()) << s.status();
  if (stats != nullptr && s.ok()) *stats = *s;
  return sink.Take();
}

absl::Status Verify(const std::string& stream) {
  StringSource in(stream);
  absl::StatusOr<std::unique_ptr<DeltaReader>> r = DeltaReader::Open(in);
  if (!r.ok()) return r.status();
  while (true) {
    absl::StatusOr<std::optional<DeltaReader::Record>> rec = (*r)->Next();
    if (!rec.ok()) return rec.status();
    if (!rec->has_value()) return absl::OkStatus();
  }
}

absl::Status Apply(Pool& pool, const std::string& vol,
                   const std::string& stream, bool rollback = false) {
  StringSource in(stream);
  ApplyOptions options;
  options.rollback = rollback;
  return ApplyDelta(pool, vol, in, options).status();
}

std::vector<std::byte> ReadAll(Pool& pool, const std::string& vol,
                               const std::string& snap = "") {
  uint64_t size = snap.empty() ? pool.GetVolume(vol)->size_bytes
                               : pool.GetSnapshot(vol, snap)->size_bytes;
  std::vector<std::byte> out(size);
  EXPECT_TRUE(pool.Read(vol, snap, 0, out).ok());
  return out;
}

// A random history on `pool`'s volume "v": writes (unaligned, zeros,
// rewrites of the same data), trims and resizes, snapshot after each round.
void RandomRounds(Pool& pool, std::mt19937_64& rng, int rounds, int first) {
  for (int round = first; round < first + rounds; ++round) {
    uint64_t size = pool.GetVolume("v")->size_bytes;
    for (int i = 0; i < 20; ++i) {
      uint64_t off = rng() % size;
      uint64_t len = std::min<uint64_t>(1 + rng() % (5 * kChunk), size - off);
      switch (rng() % 5) {
        case 0:
          ASSERT_TRUE(pool.Trim("v", off, len).ok());
          break;
        case 1: {  // rewrite what is there
          std::vector<std::byte> same(len);
          ASSERT_TRUE(pool.Read("v", "", off, same).ok());
          ASSERT_TRUE(pool.Write("v", off, same).ok());
          break;
        }
        default:
          ASSERT_TRUE(pool.Write("v", off, TestData(len, rng())).ok());
      }
    }
    if (rng() % 3 == 0) {
      uint64_t new_size = (1 + rng() % 400) * kChunk - rng() % 2 * 100;
      ASSERT_TRUE(pool.ResizeVolume("v", new_size).ok());
    }
    ASSERT_TRUE(pool.CreateSnapshot("v", absl::StrCat("s", round)).ok());
  }
}

TEST(DeltaTest, RoundTripsFullAndIncrementalToPoolAndImage) {
  for (uint64_t seed = 1; seed <= 6; ++seed) {
    SCOPED_TRACE(absl::StrCat("seed ", seed));
    std::mt19937_64 rng(seed);
    MemIo src_io(64 << 20), dst_io(64 << 20);
    auto src = MakePool(src_io);
    auto dst = MakePool(dst_io);
    ASSERT_TRUE(src->CreateVolume("v", (100 + rng() % 300) * kChunk + 77).ok());
    RandomRounds(*src, rng, 1, 0);
    // Full delta of s0, then incrementals s0 -> s1 -> s2 -> s3.
    std::string full = Send(*src, "v", "", "s0");
    ASSERT_TRUE(Verify(full).ok());
    ASSERT_TRUE(Apply(*dst, "v", full).ok());
    MemIo image_io(64 << 20);
    std::unique_ptr<RawImage> image = ImageOnIo(image_io);
    StringSource full_in(full);
    ASSERT_TRUE(ApplyDeltaToImage(*image, full_in).ok());
    RandomRounds(*src, rng, 3, 1);
    for (int i = 1; i <= 3; ++i) {
      std::string base = absl::StrCat("s", i - 1),
                  target = absl::StrCat("s", i);
      std::string delta = Send(*src, "v", base, target);
      ASSERT_TRUE(Verify(delta).ok());
      absl::Status applied = Apply(*dst, "v", delta);
      ASSERT_TRUE(applied.ok()) << target << ": " << applied;
      StringSource in(delta);
      absl::StatusOr<ImageApplyStats> img = ApplyDeltaToImage(*image, in);
      ASSERT_TRUE(img.ok()) << img.status();
      blockstore::SnapshotInfo want = *src->GetSnapshot("v", target);
      absl::StatusOr<blockstore::SnapshotInfo> got =
          dst->GetSnapshot("v", target);
      ASSERT_TRUE(got.ok());
      EXPECT_EQ(got->guid, want.guid);
      EXPECT_EQ(got->create_time_ns, want.create_time_ns);
      EXPECT_EQ(got->root_digest, want.root_digest);
      EXPECT_EQ(ReadAll(*dst, "v", target), ReadAll(*src, "v", target));
      EXPECT_EQ(ReadAll(*dst, "v"), ReadAll(*src, "v", target));
      absl::StatusOr<Digest> image_digest =
          ImageDigest(*image, want.size_bytes, kChunk);
      EXPECT_EQ(*image_digest, want.root_digest);
    }
    absl::StatusOr<Pool::CheckReport> report = dst->Check(true);
    ASSERT_TRUE(report.ok());
    EXPECT_THAT(report->problems, ::testing::IsEmpty());
    EXPECT_EQ(dst->ListVolumes()->size(), 1u);  // no staging left behind
  }
}

// A small incremental delta with every record type: RESIZE, WRITE (one
// compressible and one random chunk), ZERO and UNMAP.
struct SmallDelta {
  MemIo src_io{16 << 20};
  std::unique_ptr<Pool> src = MakePool(src_io);
  std::string stream;
  SmallDelta() {
    EXPECT_TRUE(src->CreateVolume("v", 40 * kChunk).ok());
    EXPECT_TRUE(src->Write("v", 0, TestData(40 * kChunk, 2)).ok());
    EXPECT_TRUE(src->CreateSnapshot("v", "a").ok());
    EXPECT_TRUE(src->ResizeVolume("v", 48 * kChunk).ok());
    EXPECT_TRUE(src->Write("v", 3 * kChunk, TestData(kChunk, 1)).ok());
    EXPECT_TRUE(src->Write("v", 7 * kChunk, TestData(kChunk, 3)).ok());
    EXPECT_TRUE(src->Write("v", 9 * kChunk, TestData(2 * kChunk, 0)).ok());
    EXPECT_TRUE(src->Trim("v", 20 * kChunk, 3 * kChunk).ok());
    EXPECT_TRUE(src->CreateSnapshot("v", "b").ok());
    stream = Send(*src, "v", "a", "b");
  }
};

// A destination holding v@a, and a way to see that it did not change.
struct Destination {
  MemIo io{16 << 20};
  std::unique_ptr<Pool> pool = MakePool(io);
  explicit Destination(Pool& src) {
    std::string full = Send(src, "v", "", "a");
    EXPECT_TRUE(Apply(*pool, "v", full).ok());
  }
  std::string State() {
    std::string s = pool->RootDigest("v", "")->ToHex();
    absl::StatusOr<std::vector<blockstore::SnapshotInfo>> snaps =
        pool->ListSnapshots("v");
    for (const blockstore::SnapshotInfo& snap : snaps.value()) {
      s += " " + snap.name;
    }
    // A refused apply commits nothing either: the generation stays.
    return absl::StrCat(s, " used ", pool->Info().used_bytes, " generation ",
                        pool->Info().generation);
  }
};

TEST(DeltaTest, EveryBitFlipIsRefusedByVerifyAndApply) {
  SmallDelta d;
  ASSERT_TRUE(Verify(d.stream).ok());
  ASSERT_LT(d.stream.size(), 8192u) << "keep the exhaustive loop small";
  Destination dst(*d.src);
  const std::string before = dst.State();
  for (size_t bit = 0; bit < d.stream.size() * 8; ++bit) {
    std::string bad = d.stream;
    bad[bit / 8] ^= static_cast<char>(1 << (bit % 8));
    absl::Status v = Verify(bad);
    ASSERT_FALSE(v.ok()) << "bit " << bit << " went unnoticed by verify";
    absl::Status a = Apply(*dst.pool, "v", bad);
    ASSERT_FALSE(a.ok()) << "bit " << bit << " went unnoticed by apply";
    // Most flips are caught before the destination is touched; the rest
    // must leave it exactly as it was.
    if (bit % 61 == 0) {
      ASSERT_EQ(dst.State(), before) << "bit " << bit;
    }
  }
  EXPECT_EQ(dst.State(), before);
  EXPECT_THAT(dst.pool->Check(true)->problems, ::testing::IsEmpty());
  // And the intact stream still applies.
  ASSERT_TRUE(Apply(*dst.pool, "v", d.stream).ok());
  EXPECT_EQ(*dst.pool->RootDigest("v", "b"), *d.src->RootDigest("v", "b"));
}

TEST(DeltaTest, EveryTruncationIsRefused) {
  SmallDelta d;
  Destination dst(*d.src);
  const std::string before = dst.State();
  for (size_t len = 0; len < d.stream.size(); ++len) {
    std::string cut = d.stream.substr(0, len);
    absl::Status v = Verify(cut);
    ASSERT_FALSE(v.ok()) << "truncated at " << len;
    EXPECT_EQ(v.code(), absl::StatusCode::kDataLoss) << len << ": " << v;
    ASSERT_FALSE(Apply(*dst.pool, "v", cut).ok()) << len;
  }
  EXPECT_EQ(dst.State(), before);
  // Trailing garbage is refused too.
  absl::Status extra = Verify(d.stream + "x");
  EXPECT_THAT(std::string(extra.message()), HasSubstr("after the end"));
}

TEST(DeltaTest, ForeignAndFutureStreamsAreNamedAsSuch) {
  SmallDelta d;
  std::string future = d.stream;
  future[8] = 2;  // version
  absl::Status s = Verify(future);
  EXPECT_EQ(s.code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("version 2 is not supported"));
  s = Verify("hello, this is not a delta at all");
  EXPECT_THAT(std::string(s.message()), HasSubstr("not a Tandem delta stream"));
}

TEST(DeltaTest, BaseMismatchIsRefusedNamingBothUnlessRollback) {
  SmallDelta d;
  Destination dst(*d.src);
  // The destination moves on: its newest snapshot is no longer the base.
  ASSERT_TRUE(dst.pool->Write("v", 0, TestData(kChunk, 9)).ok());
  ASSERT_TRUE(dst.pool->CreateSnapshot("v", "local").ok());
  absl::Status s = Apply(*dst.pool, "v", d.stream);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("delta base is snapshot 'a'"));
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("its newest snapshot is 'local'"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("--rollback"));
  ASSERT_TRUE(Apply(*dst.pool, "v", d.stream, /*rollback=*/true).ok());
  EXPECT_EQ(*dst.pool->RootDigest("v", ""), *d.src->RootDigest("v", "b"));

  // Written since the base (no new snapshot): refused too.
  Destination other(*d.src);
  ASSERT_TRUE(other.pool->Write("v", 0, TestData(10, 9)).ok());
  s = Apply(*other.pool, "v", d.stream);
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("was written since snapshot 'a'"));

  // A full delta never lands on an existing volume.
  s = Apply(*other.pool, "v", Send(*d.src, "v", "", "b"));
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("exists and the delta is a full one"));
}

TEST(DeltaTest, CrashAtEveryDurableWriteOfAnApplyKeepsTheBase) {
  SmallDelta d;
  // Count the apply's durable-write points.
  Destination probe(*d.src);
  std::unique_ptr<MemIo> template_io = probe.io.Clone();
  const std::string before = probe.State();
  probe.pool.reset();
  uint64_t points = 0;
  {
    std::unique_ptr<MemIo> disk = template_io->Clone();
    testing_util::CrashingIo counter(*disk, UINT64_MAX);
    auto pool = *Pool::Open(counter, OpenMode::kReadWrite);
    ASSERT_TRUE(Apply(*pool, "v", d.stream).ok());
    points = counter.points();
  }
  ASSERT_GT(points, 5u);
  for (uint64_t k = 0; k < points; ++k) {
    for (bool keep : {false, true}) {
      SCOPED_TRACE(absl::StrCat("crash point ", k, keep ? " keep" : " drop"));
      std::unique_ptr<MemIo> disk = template_io->Clone();
      {
        testing_util::CrashingIo crash(*disk, k);
        auto pool = *Pool::Open(crash, OpenMode::kReadWrite);
        ASSERT_FALSE(Apply(*pool, "v", d.stream).ok());
      }
      disk->CrashKeeping([keep](size_t, size_t len) { return keep ? len : 0; });
      auto pool = *Pool::Open(*disk, OpenMode::kReadWrite);
      absl::StatusOr<blockstore::SnapshotInfo> b = pool->GetSnapshot("v", "b");
      if (b.ok()) {
        // The commit that received it made it to disk whole.
        EXPECT_EQ(b->root_digest, *d.src->RootDigest("v", "b"));
        EXPECT_EQ(*pool->RootDigest("v", ""), b->root_digest);
      } else {
        Destination view(*d.src);  // for State() of an untouched destination
        view.pool = std::move(pool);
        ASSERT_EQ(view.State().substr(0, 32), before.substr(0, 32));
        pool = std::move(view.pool);
        // The next apply succeeds and cleans up after the interrupted one.
        ASSERT_TRUE(Apply(*pool, "v", d.stream).ok());
      }
      EXPECT_THAT(pool->Check(true)->problems, ::testing::IsEmpty());
      EXPECT_EQ(pool->ListVolumes()->size(), 1u);
      EXPECT_EQ(pool->Info().used_bytes,
                d.src->Info().used_bytes - 0 * kChunk)  // same chunks as source
          << "space leaked";
    }
  }
}

// A source that hands out `limit` bytes of `bytes`, then fails as a cut
// connection does.
class CutSource final : public ByteSource {
 public:
  CutSource(const std::string& bytes, size_t limit)
      : bytes_(bytes), limit_(limit) {}
  absl::StatusOr<size_t> Read(std::span<std::byte> out) override {
    if (pos_ >= limit_) return absl::UnavailableError("connection cut");
    size_t n = std::min({out.size(), bytes_.size() - pos_, limit_ - pos_});
    std::memcpy(out.data(), bytes_.data() + pos_, n);
    pos_ += n;
    return n;
  }

 private:
  const std::string& bytes_;
  const size_t limit_;
  size_t pos_ = 0;
};

// The source of a resumed send: its stream from the receiver's resume point.
std::string SendRest(Pool& pool, const std::string& base,
                     const std::string& target, const ResumeToken& token,
                     SendStats* stats) {
  StringSink sink;
  SendOptions options;
  options.zstd_level = 0;  // the test data compresses well; count raw bytes
  options.resume = token;
  absl::StatusOr<SendStats> s =
      SendDelta(pool, "v", base, target, sink, options);
  EXPECT_TRUE(s.ok()) << s.status();
  if (s.ok()) *stats = *s;
  return sink.Take();
}

TEST(DeltaTest, ACutReceiveResumesFromItsLastResumePoint) {
  // Incompressible chunks in ~1 MiB segments: 24 segments a full delta, and
  // an incremental that resizes, trims and rewrites.
  MemIo src_io(128 << 20);
  auto src = MakePool(src_io);
  ASSERT_TRUE(src->CreateVolume("v", 6000 * kChunk).ok());
  ASSERT_TRUE(src->Write("v", 0, TestData(6000 * kChunk, 5)).ok());
  ASSERT_TRUE(src->CreateSnapshot("v", "a").ok());
  ASSERT_TRUE(src->Trim("v", 100 * kChunk, 50 * kChunk).ok());
  ASSERT_TRUE(src->ResizeVolume("v", 6500 * kChunk + 9).ok());
  for (uint64_t c = 0; c < 6500; c += 3) {
    ASSERT_TRUE(src->Write("v", c * kChunk, TestData(kChunk, c)).ok());
  }
  ASSERT_TRUE(src->CreateSnapshot("v", "b").ok());
  const std::string full = Send(*src, "v", "", "a", nullptr, 0);
  const std::string inc = Send(*src, "v", "a", "b", nullptr, 0);
  MemIo dst_io(128 << 20);
  auto dst = MakePool(dst_io);
  ApplyOptions options;
  options.checkpoint_bytes = 3 << 20;
  for (auto [stream, base, target] :
       {std::tuple{&full, "", "a"}, std::tuple{&inc, "a", "b"}}) {
    // Each attempt is cut after `step` bytes, more than one checkpoint
    // interval: it commits at least one resume point, and what the next
    // attempt sends again stays within one interval (plus a segment and
    // the header).
    const size_t step = 4500 << 10;
    uint64_t attempts = 0;
    for (;;) {
      SCOPED_TRACE(absl::StrCat("target ", target, ", attempt ", attempts));
      absl::StatusOr<std::optional<ResumeToken>> point = ResumePoint(*dst, "v");
      ASSERT_TRUE(point.ok()) << point.status();
      SendStats sent;
      std::string piece =
          *point ? SendRest(*src, base, target, **point, &sent) : *stream;
      ApplyOptions o = options;
      o.resume = *point;
      CutSource in(piece, step);
      absl::StatusOr<ApplyStats> got = ApplyDelta(*dst, "v", in, o);
      ++attempts;
      if (got.ok()) {
        EXPECT_EQ(got->snapshot.name, target);
        break;
      }
      ASSERT_EQ(got.status().code(), absl::StatusCode::kUnavailable)
          << got.status();
      absl::StatusOr<std::optional<ResumeToken>> after = ResumePoint(*dst, "v");
      ASSERT_TRUE(after.ok() && after->has_value());
      const uint64_t before = *point ? (*point)->stored_bytes : 0;
      const uint64_t kept = (*after)->stored_bytes - before;
      EXPECT_GT(kept, 0u);
      EXPECT_LE(step - kept, options.checkpoint_bytes + (1 << 20) + 8192)
          << "an attempt lost more than one checkpoint interval";
      ASSERT_LT(attempts, 100u);
    }
    EXPECT_GE(attempts, stream->size() / step) << "no cut happened";
    EXPECT_EQ(*dst->RootDigest("v", target), *src->RootDigest("v", target));
    EXPECT_EQ(ReadAll(*dst, "v"), ReadAll(*src, "v", target));
    absl::StatusOr<std::optional<ResumeToken>> none = ResumePoint(*dst, "v");
    ASSERT_TRUE(none.ok());
    EXPECT_FALSE(none->has_value());
  }
  EXPECT_THAT(dst->Check(true)->problems, ::testing::IsEmpty());
  EXPECT_EQ(dst->ListVolumes()->size(), 1u) << "a staging volume was left";
}

TEST(DeltaTest, AResumePointForAnotherStreamIsRefused) {
  MemIo src_io(32 << 20), dst_io(32 << 20);
  auto src = MakePool(src_io);
  auto dst = MakePool(dst_io);
  ASSERT_TRUE(src->CreateVolume("v", 2000 * kChunk).ok());
  ASSERT_TRUE(src->Write("v", 0, TestData(2000 * kChunk, 9)).ok());
  ASSERT_TRUE(src->CreateSnapshot("v", "a").ok());
  ASSERT_TRUE(src->CreateSnapshot("v", "other").ok());
  const std::string full = Send(*src, "v", "", "a", nullptr, 0);
  ApplyOptions options;
  options.checkpoint_bytes = 1;
  CutSource in(full, full.size() / 2);
  ASSERT_EQ(ApplyDelta(*dst, "v", in, options).status().code(),
            absl::StatusCode::kUnavailable);
  absl::StatusOr<std::optional<ResumeToken>> point = ResumePoint(*dst, "v");
  ASSERT_TRUE(point.ok() && point->has_value());
  StringSink sink;
  SendOptions so;
  so.resume = **point;
  absl::StatusOr<SendStats> s = SendDelta(*src, "v", "", "other", sink, so);
  EXPECT_EQ(s.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(s.status().message(), HasSubstr("must start over"));
  // A resume the pool no longer holds is refused too; a fresh apply (no
  // token) starts over and cleans up.
  ASSERT_TRUE(DropReceive(*dst, "v").ok());
  StringSource again(full);
  options.resume = **point;
  EXPECT_EQ(ApplyDelta(*dst, "v", again, options).status().code(),
            absl::StatusCode::kFailedPrecondition);
  options.resume.reset();
  StringSource fresh(full);
  ASSERT_TRUE(ApplyDelta(*dst, "v", fresh, options).ok());
  EXPECT_EQ(*dst->RootDigest("v", ""), *src->RootDigest("v", "a"));
}

TEST(DeltaTest, SendChunksCarriesOnlyTheListedChunksOntoTheReceiversBase) {
  MemIo src_io(32 << 20), dst_io(32 << 20);
  auto src = MakePool(src_io);
  auto dst = MakePool(dst_io);
  // Two volumes that never shared a snapshot, equal but for a few chunks
  // and their sizes.
  ASSERT_TRUE(src->CreateVolume("v", 300 * kChunk).ok());
  ASSERT_TRUE(dst->CreateVolume("v", 280 * kChunk + 5).ok());
  std::vector<std::byte> data = TestData(300 * kChunk, 4);
  ASSERT_TRUE(src->Write("v", 0, data).ok());
  ASSERT_TRUE(dst->Write("v", 0, std::span(data).first(280 * kChunk + 5)).ok());
  const std::vector<uint64_t> differ = {3, 17, 18, 280, 299};
  for (uint64_t c : {3, 17, 18}) {
    ASSERT_TRUE(dst->Write("v", c * kChunk, TestData(kChunk, 100 + c)).ok());
  }
  ASSERT_TRUE(src->CreateSnapshot("v", "t").ok());
  absl::StatusOr<blockstore::SnapshotInfo> base =
      dst->CreateSnapshot("v", "mine");
  ASSERT_TRUE(base.ok());
  StringSink sink;
  SendOptions so;
  so.zstd_level = 0;
  absl::StatusOr<SendStats> sent = SendChunks(
      *src, "v", "t", *base, std::vector<uint64_t>{280, 3}, sink, so);
  EXPECT_EQ(sent.status().code(), absl::StatusCode::kInvalidArgument);
  sent = SendChunks(*src, "v", "t", *base, differ, sink, so);
  ASSERT_TRUE(sent.ok()) << sent.status();
  EXPECT_EQ(sent->chunks_written, differ.size());
  EXPECT_LT(sent->stream_bytes, differ.size() * (kChunk + 32) + 1024);
  StringSource in(sink.bytes());
  absl::StatusOr<ApplyStats> got = ApplyDelta(*dst, "v", in);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(ReadAll(*dst, "v"), data);
  EXPECT_EQ(got->snapshot.guid, src->GetSnapshot("v", "t")->guid);
  // Listing a chunk too few leaves a wrong result, which the digest catches.
  ASSERT_TRUE(dst->Write("v", 0, TestData(kChunk, 77)).ok());
  ASSERT_TRUE(dst->CreateSnapshot("v", "again").ok());
  StringSink partial;
  ASSERT_TRUE(SendChunks(*src, "v", "t", *dst->GetSnapshot("v", "again"),
                         std::vector<uint64_t>{5}, partial, so)
                  .ok());
  StringSource wrong(partial.bytes());
  absl::StatusOr<ApplyStats> refused = ApplyDelta(*dst, "v", wrong);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kDataLoss);
}

TEST(DeltaTest, ADeltaOfMoreBatchesThanTheSendReadsAheadRoundTrips) {
  // The send walks the diff a batch (4 MiB of data chunks) at a time and
  // starts each batch's read as it is found, up to 32 batches ahead: a
  // full delta of 36 batches and an incremental of every third chunk (12
  // batches, with gaps) arrive byte for byte.
  constexpr uint64_t kChunks = 36 * 1024;
  MemIo src_io(224 << 20), dst_io(224 << 20);
  auto src = MakePool(src_io);
  auto dst = MakePool(dst_io);
  ASSERT_TRUE(src->CreateVolume("v", kChunks * kChunk).ok());
  // Every chunk different (its index in it), and compressible.
  std::vector<std::byte> data(kChunks * kChunk, std::byte{0x5a});
  for (uint64_t c = 0; c < kChunks; ++c) {
    std::memcpy(data.data() + c * kChunk, &c, sizeof c);
  }
  ASSERT_TRUE(src->Write("v", 0, data).ok());
  ASSERT_TRUE(src->CreateSnapshot("v", "a").ok());
  for (uint64_t c = 0; c < kChunks; c += 3) {
    const uint64_t stamp = c + (1ull << 40);
    std::memcpy(data.data() + c * kChunk, &stamp, sizeof stamp);
    ASSERT_TRUE(
        src->Write("v", c * kChunk, {data.data() + c * kChunk, kChunk}).ok());
  }
  ASSERT_TRUE(src->CreateSnapshot("v", "b").ok());
  SendStats full, incremental;
  ASSERT_TRUE(Apply(*dst, "v", Send(*src, "v", "", "a", &full)).ok());
  EXPECT_EQ(full.chunks_written, kChunks);
  ASSERT_TRUE(Apply(*dst, "v", Send(*src, "v", "a", "b", &incremental)).ok());
  EXPECT_EQ(incremental.chunks_written, kChunks / 3);
  // Compared 4 MiB at a time (whole copies would take a gigabyte).
  std::vector<std::byte> got(4 << 20), want(4 << 20);
  for (uint64_t off = 0; off < data.size(); off += got.size()) {
    ASSERT_TRUE(dst->Read("v", "b", off, got).ok());
    ASSERT_TRUE(std::equal(got.begin(), got.end(), data.begin() + off))
        << "v@b differs at byte " << off;
    ASSERT_TRUE(dst->Read("v", "a", off, got).ok());
    ASSERT_TRUE(src->Read("v", "a", off, want).ok());
    ASSERT_EQ(got, want) << "v@a differs at byte " << off;
  }
}

TEST(DeltaTest, DiffCostFollowsTheChangeNotTheVolumeSize) {
  // The same change (40 chunks rewritten) on a volume and on a 64x larger
  // sparse one: the diff reads about the same number of tree nodes.
  uint64_t visited[2];
  for (int i = 0; i < 2; ++i) {
    MemIo io(64 << 20);
    auto pool = MakePool(io);
    uint64_t chunks = (i == 0 ? 4000 : 4000 * 64);
    ASSERT_TRUE(pool->CreateVolume("v", chunks * kChunk).ok());
    ASSERT_TRUE(pool->Write("v", 0, TestData(4000 * kChunk, 2)).ok());
    ASSERT_TRUE(pool->CreateSnapshot("v", "a").ok());
    for (int c = 0; c < 40; ++c) {
      ASSERT_TRUE(pool->Write("v", (c * 97 % 4000) * kChunk,
                              TestData(kChunk, 4 * c + 2))
                      .ok());
    }
    ASSERT_TRUE(pool->CreateSnapshot("v", "b").ok());
    SendStats stats;
    Send(*pool, "v", "a", "b", &stats);
    EXPECT_EQ(stats.chunks_written, 40u);
    visited[i] = stats.nodes_visited;
  }
  // One more tree level in the larger volume: a couple of nodes more. (40
  // changed chunks in 4000: a leaf each in both trees, and the paths.)
  EXPECT_GE(visited[0], 2u * 32) << visited[0];
  EXPECT_LE(visited[1], visited[0] + 4) << visited[0] << " vs " << visited[1];
  EXPECT_GE(visited[1], visited[0]);
}

}  // namespace
}  // namespace engine
