#include <cstring>
#include <memory>
#include <random>
#include <string>

#include "absl/strings/str_cat.h"
#include "blockstore/mem_io.h"
#include "blockstore/pool.h"
#include "engine/delta_format.h"
#include "engine/delta_receive.h"
#include "engine/delta_send.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/fault_io.h"
#include "tests/testing/model.h"

namespace engine {
namespace {

using blockstore::MemIo;
using blockstore::OpenMode;
using blockstore::Pool;
using ::testing::HasSubstr;
using testing_util::TestData;

constexpr uint32_t kChunk = 4096;

std::unique_ptr<Pool> MakePool(MemIo& io, uint32_t chunk = kChunk) {
  absl::StatusOr<std::unique_ptr<Pool>> p =
      Pool::Create(io, {.chunk_size_bytes = chunk});
  EXPECT_TRUE(p.ok()) << p.status();
  return std::move(*p);
}

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
    MemIo image(64 << 20);
    StringSource full_in(full);
    ASSERT_TRUE(ApplyDeltaToImage(image, full_in).ok());
    RandomRounds(*src, rng, 3, 1);
    for (int i = 1; i <= 3; ++i) {
      std::string base = absl::StrCat("s", i - 1),
                  target = absl::StrCat("s", i);
      std::string delta = Send(*src, "v", base, target);
      ASSERT_TRUE(Verify(delta).ok());
      absl::Status applied = Apply(*dst, "v", delta);
      ASSERT_TRUE(applied.ok()) << target << ": " << applied;
      StringSource in(delta);
      absl::StatusOr<ApplyStats> img = ApplyDeltaToImage(image, in);
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
          ImageDigest(image, want.size_bytes, kChunk);
      EXPECT_EQ(*image_digest, want.root_digest);
    }
    absl::StatusOr<Pool::CheckReport> report = dst->Check(true);
    ASSERT_TRUE(report.ok());
    EXPECT_THAT(report->problems, ::testing::IsEmpty());
    EXPECT_EQ(dst->ListVolumes()->size(), 1u);  // no staging left behind
  }
}

}  // namespace
}  // namespace engine
