#include "blockstore/pool.h"

#include <cerrno>
#include <cstring>
#include <memory>
#include <random>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "blockstore/mem_io.h"
#include "blockstore/util.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/fault_io.h"
#include "tests/testing/model.h"
#include "tests/testing/pools.h"

namespace blockstore {
namespace {

using ::testing::HasSubstr;
using testing_util::MakePool;
using testing_util::PoolModel;
using testing_util::ReadAll;
using testing_util::TestData;

constexpr uint32_t kChunk = 4096;

std::unique_ptr<Pool> Reopen(MemIo& io, OpenMode mode = OpenMode::kReadWrite) {
  absl::StatusOr<std::unique_ptr<Pool>> pool = Pool::Open(io, mode);
  EXPECT_TRUE(pool.ok()) << pool.status();
  return pool.ok() ? std::move(*pool) : nullptr;
}

void ExpectConsistent(Pool& pool, bool data = true) {
  absl::StatusOr<Pool::CheckReport> r = pool.Check(data);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_THAT(r->problems, ::testing::IsEmpty());
}

TEST(PoolTest, DataSurvivesReopen) {
  MemIo io(32 << 20);
  auto pool = MakePool(io);
  ASSERT_TRUE(pool->CreateVolume("v", 1 << 20).ok());
  std::vector<std::byte> data = TestData(300000, 2);
  ASSERT_TRUE(pool->Write("v", 12345, data).ok());
  ASSERT_TRUE(pool->Flush().ok());
  pool.reset();
  pool = Reopen(io);
  std::vector<std::byte> back(data.size());
  ASSERT_TRUE(pool->Read("v", "", 12345, back).ok());
  EXPECT_EQ(back, data);
  ExpectConsistent(*pool);
}

TEST(PoolTest, UnflushedWritesAreGoneAfterReopenWithoutFlush) {
  MemIo io(32 << 20);
  auto pool = MakePool(io);
  ASSERT_TRUE(pool->CreateVolume("v", 1 << 20).ok());
  ASSERT_TRUE(pool->Write("v", 0, TestData(8192, 2)).ok());
  pool.reset();  // no Flush: as a crash
  io.Crash();
  pool = Reopen(io);
  EXPECT_TRUE(IsAllZero(ReadAll(*pool, "v")));
  ExpectConsistent(*pool);
}

// Says it is in a file system (as a pool file's Io does), counts flushes
// and fails them when told to.
class FileLikeIo : public blockstore::IoWrapper {
 public:
  using IoWrapper::IoWrapper;
  bool in_file_system() const override { return in_file_system_; }
  absl::Status Flush() override {
    ++flushes_;
    if (fail_flushes_) return blockstore::ErrnoError(EIO, "injected flush");
    return target().Flush();
  }
  bool in_file_system_ = true;
  bool fail_flushes_ = false;
  int flushes_ = 0;
};

TEST(PoolTest, SyncAheadFlushesAPoolInAFileWithoutCommitting) {
  MemIo mem(32 << 20);
  FileLikeIo io(mem);
  absl::StatusOr<std::unique_ptr<Pool>> pool =
      Pool::Create(io, {.chunk_size_bytes = 4096});
  ASSERT_TRUE(pool.ok()) << pool.status();
  ASSERT_TRUE((*pool)->CreateVolume("v", 1 << 20).ok());
  const std::vector<std::byte> committed = TestData(1 << 20, 3);
  ASSERT_TRUE((*pool)->Write("v", 0, committed).ok());
  ASSERT_TRUE((*pool)->Flush().ok());
  ASSERT_TRUE((*pool)->Write("v", 0, TestData(1 << 20, 4)).ok());
  int flushes = io.flushes_;
  ASSERT_TRUE((*pool)->SyncAhead().ok());
  EXPECT_EQ(io.flushes_, flushes + 1);
  // In memory or on a block device there is nothing to do ahead.
  io.in_file_system_ = false;
  ASSERT_TRUE((*pool)->SyncAhead().ok());
  EXPECT_EQ(io.flushes_, flushes + 1);
  // Flushed, not committed: a crash now leaves the last commit.
  pool->reset();
  mem.Crash();
  std::unique_ptr<Pool> back = Reopen(mem);
  EXPECT_EQ(ReadAll(*back, "v"), committed);
  ExpectConsistent(*back);
}

TEST(PoolTest, AFailedSyncAheadStopsThePoolHandle) {
  MemIo mem(32 << 20);
  FileLikeIo io(mem);
  absl::StatusOr<std::unique_ptr<Pool>> pool =
      Pool::Create(io, {.chunk_size_bytes = 4096});
  ASSERT_TRUE(pool.ok()) << pool.status();
  ASSERT_TRUE((*pool)->CreateVolume("v", 1 << 20).ok());
  ASSERT_TRUE((*pool)->Write("v", 0, TestData(8192, 5)).ok());
  io.fail_flushes_ = true;
  absl::Status s = (*pool)->SyncAhead();
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;  // EIO
  EXPECT_THAT(std::string(s.message()), HasSubstr("injected flush"));
  // The file system may not report that error again: nothing is committed
  // through this handle any more, even once flushes work.
  io.fail_flushes_ = false;
  s = (*pool)->Flush();
  EXPECT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.message()), HasSubstr("pool handle stopped"));
  EXPECT_FALSE((*pool)->SyncAhead().ok());
}

TEST(PoolTest, UnalignedWritesMatchTheModel) {
  MemIo io(32 << 20);
  auto pool = MakePool(io);
  PoolModel model(kChunk);
  const uint64_t size = 100 * kChunk + 123;  // a partial last chunk too
  ASSERT_TRUE(pool->CreateVolume("v", size).ok());
  model.volumes["v"].size_bytes = size;
  std::mt19937_64 rng(5);
  for (int i = 0; i < 200; ++i) {
    uint64_t off = rng() % size;
    uint64_t len = std::min<uint64_t>(1 + rng() % (3 * kChunk), size - off);
    std::vector<std::byte> data = TestData(len, rng());
    ASSERT_TRUE(pool->Write("v", off, data).ok());
    model.Write("v", off, data);
  }
  EXPECT_EQ(testing_util::DiffPool(*pool, model), "");
  ASSERT_TRUE(pool->Flush().ok());
  ExpectConsistent(*pool);
}

TEST(PoolTest, SnapshotKeepsItsContentWhileTheVolumeChanges) {
  MemIo io(32 << 20);
  auto pool = MakePool(io);
  ASSERT_TRUE(pool->CreateVolume("v", 64 * kChunk).ok());
  std::vector<std::byte> before = TestData(64 * kChunk, 3);
  ASSERT_TRUE(pool->Write("v", 0, before).ok());
  absl::StatusOr<SnapshotInfo> s1 = pool->CreateSnapshot("v", "s1");
  ASSERT_TRUE(s1.ok());
  ASSERT_TRUE(pool->Write("v", 5 * kChunk + 7, TestData(3 * kChunk, 6)).ok());
  ASSERT_TRUE(pool->Trim("v", 40 * kChunk, 10 * kChunk).ok());
  EXPECT_EQ(ReadAll(*pool, "v", "s1"), before);
  EXPECT_NE(ReadAll(*pool, "v"), before);
  EXPECT_EQ(*pool->RootDigest("v", "s1"), s1->root_digest);
  EXPECT_NE(*pool->RootDigest("v", ""), s1->root_digest);
  absl::StatusOr<std::vector<SnapshotInfo>> list = pool->ListSnapshots("v");
  ASSERT_EQ(list->size(), 1u);
  EXPECT_EQ((*list)[0].guid, s1->guid);
  EXPECT_EQ((*list)[0].name, "s1");
  ASSERT_TRUE(pool->Flush().ok());
  ExpectConsistent(*pool);
}

TEST(PoolTest, SnapshotWritesTheSameMetadataForATinyAndAHugeVolume) {
  // O(1) snapshots: the commit of a snapshot writes a bounded number of
  // nodes whatever the volume size (a 1 GiB and a 1 TiB sparse volume).
  uint64_t written[2];
  for (int i = 0; i < 2; ++i) {
    MemIo io(64 << 20);
    auto pool = MakePool(io, 65536);
    uint64_t size = i == 0 ? (1ull << 30) : (1ull << 40);
    ASSERT_TRUE(pool->CreateVolume("v", size).ok());
    for (uint64_t off : {uint64_t{0}, size / 2, size - 65536}) {
      ASSERT_TRUE(pool->Write("v", off, TestData(65536, 2)).ok());
    }
    ASSERT_TRUE(pool->Flush().ok());
    uint64_t before = pool->stats().metadata_bytes_written;
    ASSERT_TRUE(pool->CreateSnapshot("v", "s").ok());
    written[i] = pool->stats().metadata_bytes_written - before;
  }
  // Catalog node + refcount pages + superblock; no tree nodes at all.
  EXPECT_EQ(written[0], written[1]);
  EXPECT_LE(written[1], 4u * 4096);
}

TEST(PoolTest, WriteChunksReadsTheTreeOneBatchPerLevel) {
  // A receive writes scattered chunks: the nodes on their paths must be read
  // in one batch per tree level, leaves included, not one read per node.
  constexpr uint64_t kStride = 2 * 126;       // one chunk in every other leaf
  constexpr uint64_t kChunks = 64 * kStride;  // three levels
  MemIo io(64 << 20);
  {
    auto pool = MakePool(io, kChunk);
    ASSERT_TRUE(pool->CreateVolume("v", kChunks * kChunk).ok());
    for (uint64_t i = 0; i < 64; ++i) {
      ASSERT_TRUE(
          pool->Write("v", i * kStride * kChunk, TestData(kChunk, i)).ok());
    }
    ASSERT_TRUE(pool->Flush().ok());
  }
  testing_util::CountingIo counting(io);
  absl::StatusOr<std::unique_ptr<Pool>> pool =
      Pool::Open(counting, OpenMode::kReadWrite);
  ASSERT_TRUE(pool.ok()) << pool.status();
  std::vector<AlignedBuffer> bufs;
  std::vector<Pool::ChunkWrite> writes;
  for (uint64_t i = 0; i < 64; ++i) {
    bufs.emplace_back(kChunk);
    std::vector<std::byte> data = TestData(kChunk, 100 + i);
    std::memcpy(bufs.back().data(), data.data(), kChunk);
  }
  for (uint64_t i = 0; i < 64; ++i) {
    writes.push_back({i * kStride, {bufs[i].data(), kChunk}});
  }
  int before = counting.read_calls();
  ASSERT_TRUE((*pool)->WriteChunks("v", writes).ok());
  EXPECT_LE(counting.read_calls() - before, 3);  // root, interior, leaves
  ASSERT_TRUE((*pool)->Flush().ok());
  for (uint64_t i = 0; i < 64; ++i) {
    std::vector<std::byte> got(kChunk);
    ASSERT_TRUE((*pool)->Read("v", "", i * kStride * kChunk, got).ok());
    EXPECT_EQ(got, TestData(kChunk, 100 + i)) << "chunk " << i * kStride;
  }
}

TEST(PoolTest, DiffReadsTheTreesOneBatchPerLevel) {
  // 64 chunks changed between two snapshots, one in every other leaf of a
  // three-level tree: the walk reads both trees' nodes a level at a time
  // (root, interior, leaves), not a batch per interior node.
  constexpr uint64_t kStride = 2 * 126;
  constexpr uint64_t kChunks = 64 * kStride;
  MemIo io(64 << 20);
  {
    auto pool = MakePool(io, kChunk);
    ASSERT_TRUE(pool->CreateVolume("v", kChunks * kChunk).ok());
    for (int round = 0; round < 2; ++round) {
      for (uint64_t i = 0; i < 64; ++i) {
        // Seeds 4k + 3: random bytes (4k would be zeros).
        ASSERT_TRUE(pool->Write("v", i * kStride * kChunk,
                                TestData(kChunk, 4 * (round * 64 + i) + 3))
                        .ok());
      }
      ASSERT_TRUE(pool->CreateSnapshot("v", absl::StrCat("s", round)).ok());
    }
  }
  testing_util::CountingIo counting(io);
  absl::StatusOr<std::unique_ptr<Pool>> pool =
      Pool::Open(counting, OpenMode::kReadOnly);
  ASSERT_TRUE(pool.ok()) << pool.status();
  const int before = counting.read_calls();
  absl::StatusOr<DiffBatch> d = (*pool)->Diff("v", "s0", "s1", 0, 65536);
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(counting.read_calls() - before, 3);
  ASSERT_EQ(d->runs.size(), 64u);
  for (uint64_t i = 0; i < 64; ++i) {
    EXPECT_EQ(d->runs[i].kind, ChangedRun::Kind::kData);
    EXPECT_EQ(d->runs[i].first_chunk, i * kStride);
    EXPECT_EQ(d->runs[i].digest, Hash128(TestData(kChunk, 4 * (64 + i) + 3)));
  }
  EXPECT_TRUE(d->done);
  // A walk that stops early, on a pool with nothing cached.
  pool = Pool::Open(counting, OpenMode::kReadOnly);
  ASSERT_TRUE(pool.ok()) << pool.status();
  absl::StatusOr<DiffBatch> two = (*pool)->Diff("v", "s0", "s1", 0, 2);
  ASSERT_TRUE(two.ok()) << two.status();
  ASSERT_EQ(two->runs.size(), 2u);
  EXPECT_EQ(two->runs[1].first_chunk, kStride);
  EXPECT_EQ(two->next_chunk, kStride + 1);
  EXPECT_FALSE(two->done);
}

// Records, for each read call, whether it was made as a writer's own
// (WritePathReads alive on the calling thread).
class ReadPurposeIo : public blockstore::IoWrapper {
 public:
  explicit ReadPurposeIo(blockstore::Io& target) : IoWrapper(target) {}
  absl::Status Read(std::span<const blockstore::ReadOp> ops) override {
    (blockstore::WritePathReads::active() ? writer_reads_ : reader_reads_)++;
    return target().Read(ops);
  }
  int writer_reads() const { return writer_reads_; }
  int reader_reads() const { return reader_reads_; }

 private:
  int writer_reads_ = 0, reader_reads_ = 0;
};

TEST(PoolTest, AWritesOwnTreeReadsAreMarkedAsAWriters) {
  // The io_uring backend makes writes yield to readers; a write's reads of
  // the nodes it rewrites (and of a partial chunk's rest) must not count as
  // readers, or a cold receive throttles itself. Reads for a read must.
  constexpr uint64_t kChunks = 4 * 126;  // two tree levels
  MemIo io(64 << 20);
  {
    auto pool = MakePool(io, kChunk);
    ASSERT_TRUE(pool->CreateVolume("v", kChunks * kChunk).ok());
    for (uint64_t i = 0; i < kChunks; i += 63) {
      ASSERT_TRUE(
          pool->Write("v", i * kChunk, TestData(kChunk, 4 * i + 3)).ok());
    }
    ASSERT_TRUE(pool->Flush().ok());
  }
  ReadPurposeIo purpose(io);
  absl::StatusOr<std::unique_ptr<Pool>> pool =
      Pool::Open(purpose, OpenMode::kReadWrite);
  ASSERT_TRUE(pool.ok()) << pool.status();
  const int opened = purpose.reader_reads();
  EXPECT_EQ(purpose.writer_reads(), 0);
  // Nothing of the tree is cached: a whole-chunk write reads its leaf path,
  // a partial one also the chunk's old bytes.
  ASSERT_TRUE((*pool)->Write("v", 126 * kChunk, TestData(kChunk, 11)).ok());
  ASSERT_TRUE(
      (*pool)->Write("v", 3 * 126 * kChunk + 100, TestData(4096, 15)).ok());
  EXPECT_GE(purpose.writer_reads(), 2);
  EXPECT_EQ(purpose.reader_reads(), opened);
  EXPECT_FALSE(blockstore::WritePathReads::active());  // the scope ended
  // A read of data the writes did not touch: its own reads count.
  std::vector<std::byte> out(kChunk);
  ASSERT_TRUE((*pool)->Read("v", "", 2 * 126 * kChunk, out).ok());
  EXPECT_GT(purpose.reader_reads(), opened);
  EXPECT_TRUE(out == TestData(kChunk, 4 * (2 * 126) + 3));
}

TEST(PoolTest, ReadOnlyOpenLeavesTheReferenceCountsOnDisk) {
  // Reads and diffs never look at the counts (a table as large as the
  // device's chunk count): a read-only open reads the superblocks and the
  // catalog only, and still reports what a read-write open does.
  MemIo io(64 << 20);
  {
    auto pool = MakePool(io, kChunk);
    ASSERT_TRUE(pool->CreateVolume("v", 1 << 20).ok());
    ASSERT_TRUE(pool->Write("v", 8192, TestData(3 * kChunk, 7)).ok());
    ASSERT_TRUE(pool->CreateSnapshot("v", "s").ok());
    ASSERT_TRUE(pool->Flush().ok());
  }
  PoolInfo rw = Reopen(io)->Info();
  testing_util::CountingIo counting(io);
  absl::StatusOr<std::unique_ptr<Pool>> ro =
      Pool::Open(counting, OpenMode::kReadOnly);
  ASSERT_TRUE(ro.ok()) << ro.status();
  EXPECT_EQ(counting.read_calls(), 2);  // superblocks, one catalog node
  PoolInfo info = (*ro)->Info();
  EXPECT_EQ(info.used_bytes, rw.used_bytes);
  EXPECT_EQ(info.metadata_used_bytes, rw.metadata_used_bytes);
  EXPECT_EQ(info.used_bytes, 3 * kChunk);
  EXPECT_EQ(counting.read_calls(), 2);
  // The check needs them: it loads them, and finds them right.
  absl::StatusOr<Pool::CheckReport> r = (*ro)->Check(true);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_THAT(r->problems, ::testing::IsEmpty());
  EXPECT_GT(counting.read_calls(), 2);
}

TEST(PoolTest, ReadOnlyVolumeRefusesChangesAndSurvivesReopen) {
  MemIo io(64 << 20);
  {
    auto pool = MakePool(io);
    ASSERT_TRUE(pool->CreateVolume("v", 1 << 20).ok());
    ASSERT_TRUE(pool->Write("v", 0, TestData(8192, 1)).ok());
    ASSERT_TRUE(pool->CreateSnapshot("v", "s").ok());
    ASSERT_TRUE(pool->SetVolumeReadOnly("v", true).ok());
  }
  auto pool = Reopen(io);
  EXPECT_TRUE(pool->GetVolume("v")->read_only);
  for (absl::Status s :
       {pool->Write("v", 0, TestData(4096, 2)), pool->Trim("v", 0, 4096),
        pool->ResizeVolume("v", 2 << 20),
        pool->CreateSnapshot("v", "t").status(), pool->Rollback("v", "s"),
        pool->DeleteVolume("v", true)}) {
    EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
    EXPECT_THAT(s.message(),
                HasSubstr("volume 'v' in pool memory is read-only"));
  }
  EXPECT_EQ(ReadAll(*pool, "v").size(), 1u << 20);
  EXPECT_TRUE(pool->DeleteSnapshot("v", "s").ok());  // retention still works
  ASSERT_TRUE(pool->SetVolumeReadOnly("v", false).ok());
  EXPECT_TRUE(pool->Write("v", 0, TestData(4096, 2)).ok());
  EXPECT_FALSE(pool->GetVolume("v")->read_only);
  ExpectConsistent(*pool);
}

TEST(PoolTest, PropertiesAreCommittedAndRemoved) {
  MemIo io(64 << 20);
  {
    auto pool = MakePool(io);
    ASSERT_TRUE(pool->SetProperty("a", "1").ok());
    ASSERT_TRUE(pool->SetProperty("b", std::string(50000, 'x')).ok());
    ASSERT_TRUE(pool->SetProperty("a", "2").ok());
  }
  auto pool = Reopen(io);
  std::map<std::string, std::string> props = pool->Properties();
  EXPECT_EQ(props.size(), 2u);
  EXPECT_EQ(props["a"], "2");
  EXPECT_EQ(props["b"], std::string(50000, 'x'));
  ASSERT_TRUE(pool->SetProperty("a", "").ok());
  EXPECT_EQ(Reopen(io)->Properties().count("a"), 0u);
  EXPECT_EQ(pool->SetProperty("", "x").code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(pool->SetProperty("k", std::string(70000, 'x')).code(),
            absl::StatusCode::kInvalidArgument);
  ExpectConsistent(*pool);
}

TEST(PoolTest, SnapshotOwnerIsKeptAndNeverTakenFromTheName) {
  MemIo io(32 << 20);
  {
    auto pool = MakePool(io);
    ASSERT_TRUE(pool->CreateVolume("v", 1 << 20).ok());
    absl::StatusOr<SnapshotInfo> mine = pool->CreateSnapshot("v", "rep.x.1");
    ASSERT_TRUE(mine.ok()) << mine.status();
    EXPECT_EQ(mine->owner, "");
    absl::StatusOr<SnapshotInfo> owned =
        pool->CreateSnapshot("v", "s2", "0a1b2c3d-relationship");
    ASSERT_TRUE(owned.ok()) << owned.status();
    EXPECT_EQ(owned->owner, "0a1b2c3d-relationship");
    EXPECT_EQ(
        pool->CreateSnapshot("v", "s3", std::string(65, 'o')).status().code(),
        absl::StatusCode::kInvalidArgument);
    // A received snapshot takes the owner its receiver gives it.
    ASSERT_TRUE(pool->BeginReceive(".recv-w", "w", "", 1 << 20).ok());
    absl::StatusOr<Digest> d = pool->RootDigest(".recv-w", "");
    ASSERT_TRUE(d.ok());
    ASSERT_TRUE(pool->FinishReceive(".recv-w", "w", Guid{},
                                    {"got", Guid{std::byte{7}}, 5, "them"}, *d)
                    .ok());
  }
  auto pool = Reopen(io);
  auto snaps = pool->ListSnapshots("v");
  ASSERT_TRUE(snaps.ok());
  ASSERT_EQ(snaps->size(), 2u);
  EXPECT_EQ((*snaps)[0].owner, "");
  EXPECT_EQ((*snaps)[1].owner, "0a1b2c3d-relationship");
  EXPECT_EQ(pool->GetSnapshot("w", "got")->owner, "them");
  ExpectConsistent(*pool);
}

TEST(PoolTest, ARefusedFullReceiveLeavesNoVolumeBehind) {
  MemIo io(8 << 20);
  {
    auto pool = MakePool(io);
    ASSERT_TRUE(pool->BeginReceive(".recv-v", "v", "", 1 << 20).ok());
    ASSERT_TRUE(pool->Write(".recv-v", 0, TestData(8192, 3)).ok());
    absl::StatusOr<Digest> d = pool->RootDigest(".recv-v", "");
    ASSERT_TRUE(d.ok());
    // Fill the metadata area with properties until the pool refuses more.
    absl::Status s;
    for (int i = 0; s.ok() && i < 1000; ++i) {
      s = pool->SetProperty(absl::StrCat("k", i), std::string(60000, 'x'));
    }
    ASSERT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
    absl::StatusOr<SnapshotInfo> got = pool->FinishReceive(
        ".recv-v", "v", Guid{}, {"s", Guid{std::byte{1}}, 1, ""}, *d);
    EXPECT_EQ(got.status().code(), absl::StatusCode::kResourceExhausted);
    EXPECT_EQ(pool->GetVolume("v").status().code(),
              absl::StatusCode::kNotFound);
    ASSERT_TRUE(pool->Flush().ok());
  }
  auto pool = Reopen(io);
  EXPECT_EQ(pool->GetVolume("v").status().code(), absl::StatusCode::kNotFound);
  ExpectConsistent(*pool);
}

TEST(PoolTest, DeletingSnapshotsAndVolumesFreesEverything) {
  MemIo io(32 << 20);
  auto pool = MakePool(io);
  PoolInfo empty = pool->Info();
  EXPECT_EQ(empty.used_bytes, 0u);
  ASSERT_TRUE(pool->CreateVolume("v", 256 * kChunk).ok());
  ASSERT_TRUE(pool->Write("v", 0, TestData(256 * kChunk, 2)).ok());
  ASSERT_TRUE(pool->CreateSnapshot("v", "a").ok());
  ASSERT_TRUE(pool->Write("v", 0, TestData(128 * kChunk, 3)).ok());
  ASSERT_TRUE(pool->CreateSnapshot("v", "b").ok());
  ASSERT_TRUE(pool->Write("v", 64 * kChunk, TestData(64 * kChunk, 5)).ok());
  ASSERT_TRUE(pool->Flush().ok());
  EXPECT_EQ(pool->Info().used_bytes, (256 + 128 + 64) * kChunk);
  ASSERT_TRUE(pool->DeleteSnapshot("v", "a").ok());
  // a's first half was overwritten in b and the live volume: freed; its
  // second half is still shared.
  EXPECT_EQ(pool->Info().used_bytes, (256 + 64) * kChunk);
  absl::Status refused = pool->DeleteVolume("v", false);
  EXPECT_EQ(refused.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(refused.message()), HasSubstr("1 snapshot(s) (b)"));
  ASSERT_TRUE(pool->DeleteVolume("v", true).ok());
  PoolInfo after = pool->Info();
  EXPECT_EQ(after.used_bytes, 0u);
  EXPECT_EQ(after.free_bytes, after.capacity_bytes);
  EXPECT_EQ(after.metadata_used_bytes, empty.metadata_used_bytes);
  ExpectConsistent(*pool);
  pool = Reopen(io);
  EXPECT_EQ(pool->Info().used_bytes, 0u);
  ExpectConsistent(*pool);
}

TEST(PoolTest, RollbackRestoresContentAndSize) {
  MemIo io(32 << 20);
  auto pool = MakePool(io);
  ASSERT_TRUE(pool->CreateVolume("v", 10 * kChunk).ok());
  std::vector<std::byte> before = TestData(10 * kChunk, 2);
  ASSERT_TRUE(pool->Write("v", 0, before).ok());
  absl::StatusOr<SnapshotInfo> s = pool->CreateSnapshot("v", "s");
  ASSERT_TRUE(pool->ResizeVolume("v", 1000 * kChunk).ok());
  ASSERT_TRUE(pool->Write("v", 900 * kChunk, TestData(kChunk, 3)).ok());
  ASSERT_TRUE(pool->Write("v", 0, TestData(kChunk, 3)).ok());
  ASSERT_TRUE(pool->Rollback("v", "s").ok());
  EXPECT_EQ(pool->GetVolume("v")->size_bytes, 10 * kChunk);
  EXPECT_EQ(ReadAll(*pool, "v"), before);
  EXPECT_EQ(*pool->RootDigest("v", ""), s->root_digest);
  ExpectConsistent(*pool);
  EXPECT_EQ(pool->Rollback("v", "nope").code(), absl::StatusCode::kNotFound);
}

TEST(PoolTest, TrimReadsZerosAndFreesWholeChunks) {
  MemIo io(32 << 20);
  auto pool = MakePool(io);
  ASSERT_TRUE(pool->CreateVolume("v", 100 * kChunk).ok());
  std::vector<std::byte> data = TestData(100 * kChunk, 2);
  ASSERT_TRUE(pool->Write("v", 0, data).ok());
  // From the middle of chunk 10 to the middle of chunk 20: chunks 11-19 go.
  ASSERT_TRUE(pool->Trim("v", 10 * kChunk + 100, 10 * kChunk).ok());
  ASSERT_TRUE(pool->Flush().ok());
  std::memset(data.data() + 10 * kChunk + 100, 0, 10 * kChunk);
  EXPECT_EQ(ReadAll(*pool, "v"), data);
  EXPECT_EQ(pool->Info().used_bytes, 91 * kChunk);
  // Trimming everything frees everything and folds the tree away.
  ASSERT_TRUE(pool->Trim("v", 0, 100 * kChunk).ok());
  ASSERT_TRUE(pool->Flush().ok());
  EXPECT_EQ(pool->Info().used_bytes, 0u);
  EXPECT_TRUE(IsAllZero(ReadAll(*pool, "v")));
  ExpectConsistent(*pool);
}

TEST(PoolTest, ZeroWritesUseNoSpace) {
  MemIo io(32 << 20);
  auto pool = MakePool(io);
  ASSERT_TRUE(pool->CreateVolume("v", 100 * kChunk).ok());
  std::vector<std::byte> zeros(50 * kChunk);
  ASSERT_TRUE(pool->Write("v", 0, zeros).ok());
  ASSERT_TRUE(pool->Flush().ok());
  EXPECT_EQ(pool->Info().used_bytes, 0u);
}

TEST(PoolTest, ShrinkDiscardsAndGrowReadsZeros) {
  MemIo io(32 << 20);
  auto pool = MakePool(io);
  PoolModel model(kChunk);
  ASSERT_TRUE(pool->CreateVolume("v", 300 * kChunk).ok());
  model.volumes["v"].size_bytes = 300 * kChunk;
  std::vector<std::byte> data = TestData(300 * kChunk, 2);
  ASSERT_TRUE(pool->Write("v", 0, data).ok());
  model.Write("v", 0, data);
  ASSERT_TRUE(pool->CreateSnapshot("v", "full").ok());
  model.Snapshot("v", "full");
  // Depth 2 -> 1 -> 3 (126^2 chunks is the depth-2 limit) and back.
  for (uint64_t size : {uint64_t{50 * kChunk + 77}, uint64_t{20000} * kChunk,
                        uint64_t{3 * kChunk}, uint64_t{130 * kChunk}}) {
    ASSERT_TRUE(pool->ResizeVolume("v", size).ok()) << size;
    model.Resize("v", size);
    ASSERT_TRUE(pool->Write("v", size - 5000, TestData(5000, size)).ok());
    model.Write("v", size - 5000, TestData(5000, size));
    EXPECT_EQ(testing_util::DiffPool(*pool, model), "") << size;
    ExpectConsistent(*pool);
  }
  EXPECT_EQ(pool->ResizeVolume("v", 0).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(PoolTest, EqualContentHasEqualDigestWhateverTheHistory) {
  MemIo io_a(32 << 20), io_b(32 << 20);
  auto a = MakePool(io_a);
  auto b = MakePool(io_b);
  const uint64_t size = 500 * kChunk;
  ASSERT_TRUE(a->CreateVolume("x", size).ok());
  ASSERT_TRUE(b->CreateVolume("y", size).ok());
  // a: written front to back. b: filler first (other placement), written
  // back to front, with junk that is later trimmed and rewritten.
  ASSERT_TRUE(b->CreateVolume("filler", size).ok());
  ASSERT_TRUE(b->Write("filler", 0, TestData(77 * kChunk, 3)).ok());
  std::vector<std::byte> data = TestData(size, 2);
  ASSERT_TRUE(a->Write("x", 0, data).ok());
  ASSERT_TRUE(b->Write("y", 0, TestData(size, 7)).ok());
  ASSERT_TRUE(b->CreateSnapshot("y", "junk").ok());
  ASSERT_TRUE(b->Trim("y", 0, size).ok());
  for (uint64_t c = 500; c-- > 0;) {
    ASSERT_TRUE(
        b->Write("y", c * kChunk, std::span(data).subspan(c * kChunk, kChunk))
            .ok());
  }
  EXPECT_EQ(*a->RootDigest("x", ""), *b->RootDigest("y", ""));
  ASSERT_TRUE(b->Write("y", 1234, TestData(1, 9)).ok());
  EXPECT_NE(*a->RootDigest("x", ""), *b->RootDigest("y", ""));
  // An empty volume's digest depends only on its size.
  ASSERT_TRUE(a->CreateVolume("e", size).ok());
  ASSERT_TRUE(b->CreateVolume("e", size).ok());
  EXPECT_EQ(*a->RootDigest("e", ""), *b->RootDigest("e", ""));
}

TEST(PoolTest, FullPoolRefusesWritesAndKeepsCommittedData) {
  MemIo io(8 << 20);
  auto pool = MakePool(io);
  uint64_t capacity = pool->Info().capacity_bytes;
  ASSERT_TRUE(pool->CreateVolume("v", 2 * capacity).ok());
  std::vector<std::byte> first = TestData(capacity / 2, 2);
  ASSERT_TRUE(pool->Write("v", 0, first).ok());
  ASSERT_TRUE(pool->Flush().ok());
  absl::Status s = pool->Write("v", capacity, TestData(capacity, 3));
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(s.message()), HasSubstr("out of space"));
  // The handle still works and the committed data is intact.
  std::vector<std::byte> back(first.size());
  ASSERT_TRUE(pool->Read("v", "", 0, back).ok());
  EXPECT_EQ(back, first);
  ASSERT_TRUE(pool->Trim("v", 0, 2 * capacity).ok());
  ASSERT_TRUE(pool->Write("v", 0, TestData(capacity / 2, 5)).ok());
  ASSERT_TRUE(pool->Flush().ok());
  ExpectConsistent(*pool);
}

TEST(PoolTest, ReadOnlyPoolRefusesChanges) {
  MemIo io(32 << 20);
  {
    auto pool = MakePool(io);
    ASSERT_TRUE(pool->CreateVolume("v", kChunk).ok());
  }
  auto pool = Reopen(io, OpenMode::kReadOnly);
  absl::Status s = pool->Write("v", 0, TestData(10, 2));
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(s.message()), HasSubstr("read-only"));
  EXPECT_EQ(pool->CreateSnapshot("v", "s").status().code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST(PoolTest, BadInputNamesWhatIsWrong) {
  MemIo io(32 << 20);
  auto pool = MakePool(io);
  ASSERT_TRUE(pool->CreateVolume("v", 10 * kChunk).ok());
  absl::Status s = pool->CreateVolume("v", kChunk);
  EXPECT_EQ(s.code(), absl::StatusCode::kAlreadyExists);
  s = pool->CreateVolume("a@b", kChunk);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("bad volume name 'a@b'"));
  s = pool->Write("v", 10 * kChunk - 1, TestData(2, 2));
  EXPECT_EQ(s.code(), absl::StatusCode::kOutOfRange);
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("past the end of volume 'v'"));
  s = pool->Write("nope", 0, TestData(2, 2));
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(s.message()), HasSubstr("no volume 'nope'"));
  std::vector<std::byte> buf(10);
  s = pool->Read("v", "missing", 0, buf);
  EXPECT_THAT(std::string(s.message()), HasSubstr("no snapshot 'v@missing'"));
  ASSERT_TRUE(pool->CreateSnapshot("v", "s").ok());
  EXPECT_EQ(pool->CreateSnapshot("v", "s").status().code(),
            absl::StatusCode::kAlreadyExists);
}

// Chunks freed by a durable commit go back to the disk (a punched hole, a
// discard; MemIo drops the pages) in free runs of 1 MiB or more, and only
// free ones: what a snapshot still holds stays and reads as written. A lone
// chunk freed among live ones stays until its neighbours are free too.
TEST(PoolTest, FreedRunsGoBackToTheDisk) {
  constexpr uint64_t kC = 64 << 10;  // 16 chunks make a 1 MiB run
  MemIo io(64 << 20);
  auto pool = MakePool(io, kC);
  auto discarded = [&] { return pool->stats().data_bytes_discarded; };
  const std::vector<std::byte> data = TestData(32 * kC, 6);
  ASSERT_TRUE(pool->CreateVolume("v", 32 * kC).ok());
  ASSERT_TRUE(pool->Write("v", 0, data).ok());
  ASSERT_TRUE(pool->CreateSnapshot("v", "s").ok());
  // The first half rewritten: the old half is the snapshot's alone.
  const std::vector<std::byte> half = TestData(16 * kC, 7);
  ASSERT_TRUE(pool->Write("v", 0, half).ok());
  ASSERT_TRUE(pool->Flush().ok());
  EXPECT_EQ(discarded(), 0u);
  uint64_t resident = io.resident_bytes();
  ASSERT_TRUE(pool->DeleteSnapshot("v", "s").ok());
  EXPECT_EQ(discarded(), 16 * kC);
  EXPECT_LE(io.resident_bytes(), resident - 15 * kC);  // less new metadata
  std::vector<std::byte> want = half;
  want.insert(want.end(), data.begin() + 16 * kC, data.end());
  EXPECT_EQ(ReadAll(*pool, "v"), want);
  ExpectConsistent(*pool);

  // Every other chunk of w rewritten: its snapshot alone holds 16 chunks,
  // each between two live ones. Deleting it gives nothing back...
  ASSERT_TRUE(pool->CreateVolume("w", 32 * kC).ok());
  ASSERT_TRUE(pool->Write("w", 0, TestData(32 * kC, 10)).ok());
  ASSERT_TRUE(pool->CreateSnapshot("w", "t").ok());
  for (uint64_t c = 0; c < 32; c += 2) {
    ASSERT_TRUE(pool->Write("w", c * kC, TestData(kC, 11 + c)).ok());
  }
  ASSERT_TRUE(pool->Flush().ok());
  const uint64_t before = discarded();
  ASSERT_TRUE(pool->DeleteSnapshot("w", "t").ok());
  EXPECT_EQ(discarded(), before);
  ExpectConsistent(*pool);
  // ... until w goes too: then its old chunks and the new ones are free runs.
  resident = io.resident_bytes();
  ASSERT_TRUE(pool->DeleteVolume("w", false).ok());
  EXPECT_GE(discarded(), before + 48 * kC);
  EXPECT_LE(io.resident_bytes(), resident - 44 * kC);
  ExpectConsistent(*pool);

  // The space is reused as before, and v is untouched.
  ASSERT_TRUE(pool->CreateVolume("x", 32 * kC).ok());
  ASSERT_TRUE(pool->Write("x", 0, data).ok());
  ASSERT_TRUE(pool->Flush().ok());
  pool = Reopen(io);
  EXPECT_EQ(ReadAll(*pool, "x"), data);
  EXPECT_EQ(ReadAll(*pool, "v"), want);
  ExpectConsistent(*pool, true);
}

// A chunk an overwrite frees is needed again by the writes that follow: it
// stays on the disk and is reused first, so rewriting a volume again and
// again discards nothing and keeps the disk's use at the volume and one
// transaction's rewrite. Zeros written over it give the space back.
TEST(PoolTest, OverwrittenChunksAreReusedNotDiscarded) {
  constexpr uint64_t kC = 64 << 10;
  MemIo io(64 << 20);  // ~900 chunks: room for 28 rewrites elsewhere
  auto pool = MakePool(io, kC);
  auto discarded = [&] { return pool->stats().data_bytes_discarded; };
  ASSERT_TRUE(pool->CreateVolume("v", 32 * kC).ok());
  std::vector<std::byte> data;
  for (int round = 0; round < 10; ++round) {
    data = TestData(32 * kC, 4 * round + 2);  // random bytes
    ASSERT_TRUE(pool->Write("v", 0, data).ok());
    ASSERT_TRUE(pool->Flush().ok());
  }
  EXPECT_EQ(discarded(), 0u);
  const uint64_t resident = io.resident_bytes();
  EXPECT_LE(resident, 2 * 32 * kC + (4 << 20)) << "metadata: at most 4 MiB";
  EXPECT_EQ(ReadAll(*pool, "v"), data);
  ExpectConsistent(*pool);

  ASSERT_TRUE(pool->Write("v", 0, std::vector<std::byte>(32 * kC)).ok());
  ASSERT_TRUE(pool->Flush().ok());
  EXPECT_GE(discarded(), 16 * kC);
  EXPECT_LE(io.resident_bytes(), resident - 16 * kC);
  EXPECT_EQ(ReadAll(*pool, "v"), std::vector<std::byte>(32 * kC));
  ExpectConsistent(*pool, true);
}

// Diff's base may be a snapshot of another volume, written OTHER@SNAPSHOT:
// against a clone's origin only what the clone changed differs.
TEST(PoolTest, DiffAgainstASnapshotOfAnotherVolume) {
  MemIo io(32 << 20);
  auto pool = MakePool(io);
  ASSERT_TRUE(pool->CreateVolume("v", 64 * kChunk).ok());
  ASSERT_TRUE(pool->Write("v", 0, TestData(64 * kChunk, 1)).ok());
  ASSERT_TRUE(pool->CreateSnapshot("v", "s").ok());
  // A receive's staging volume is a clone of v@s; two chunks rewritten.
  ASSERT_TRUE(pool->BeginReceive(".clone", "v", "s", 0).ok());
  ASSERT_TRUE(pool->Write(".clone", 5 * kChunk, TestData(kChunk, 2)).ok());
  ASSERT_TRUE(pool->Write(".clone", 40 * kChunk, TestData(kChunk, 3)).ok());
  absl::StatusOr<DiffBatch> d = pool->Diff(".clone", "v@s", "", 0, 1000);
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_TRUE(d->done);
  ASSERT_EQ(d->runs.size(), 2u);
  EXPECT_EQ(d->runs[0].first_chunk, 5u);
  EXPECT_EQ(d->runs[1].first_chunk, 40u);
  for (const ChangedRun& r : d->runs) {
    EXPECT_EQ(r.kind, ChangedRun::Kind::kData);
    EXPECT_EQ(r.count_chunks, 1u);
  }
  // A plain name is a snapshot of the volume itself, as always.
  d = pool->Diff("v", "s", "", 0, 1000);
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_THAT(d->runs, ::testing::IsEmpty());
  // A volume sharing nothing with v@s: all of it differs (never written).
  ASSERT_TRUE(pool->CreateVolume("w", 64 * kChunk).ok());
  d = pool->Diff("w", "v@s", "", 0, 1000);
  ASSERT_TRUE(d.ok()) << d.status();
  uint64_t unmapped = 0;
  for (const ChangedRun& r : d->runs) {
    EXPECT_EQ(r.kind, ChangedRun::Kind::kUnmap);
    unmapped += r.count_chunks;
  }
  EXPECT_EQ(unmapped, 64u);
  EXPECT_EQ(pool->Diff("w", "nope@s", "", 0, 1000).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(pool->Diff("w", "v@nope", "", 0, 1000).status().code(),
            absl::StatusCode::kNotFound);
}

TEST(PoolTest, NotAPoolAndDamagedSuperblocksAreToldApart) {
  MemIo blank(32 << 20);
  absl::Status s = Pool::Open(blank, OpenMode::kReadOnly).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(s.message()), HasSubstr("not a tandem pool"));

  MemIo io(32 << 20);
  MakePool(io)->CreateVolume("v", kChunk).IgnoreError();
  // One damaged superblock: the other (older) one is used.
  io.FlipBit(4096 + 100, 3);
  auto pool = Reopen(io);
  ASSERT_NE(pool, nullptr);
  io.FlipBit(100, 3);
  s = Pool::Open(io, OpenMode::kReadOnly).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("both pool superblocks are damaged"));
}

// Finds the device offset of the first tree node of `pool` by scanning the
// metadata area for a node that decodes as a tree node.
uint64_t FirstTreeNodeOffset(MemIo& io, const Superblock& sb) {
  for (uint64_t id = sb.meta_start; id < sb.meta_start + sb.meta_count; ++id) {
    std::vector<std::byte> raw = io.Peek(id * kNodeSize, kNodeSize);
    absl::StatusOr<NodeHeader> h = OpenNode(
        std::span<const std::byte, kNodeSize>(raw.data(), kNodeSize), id);
    if (h.ok() && h->kind == NodeKind::kTree) return id * kNodeSize;
  }
  return 0;
}

TEST(PoolTest, FlippedMetadataBitIsReportedNeverRead) {
  MemIo io(32 << 20);
  auto pool = MakePool(io);
  ASSERT_TRUE(pool->CreateVolume("v", 50 * kChunk).ok());
  ASSERT_TRUE(pool->Write("v", 0, TestData(50 * kChunk, 2)).ok());
  ASSERT_TRUE(pool->Flush().ok());
  Superblock sb = pool->superblock();
  pool.reset();
  uint64_t node = FirstTreeNodeOffset(io, sb);
  ASSERT_NE(node, 0u);
  for (uint64_t byte : {uint64_t{20}, uint64_t{64 + 5}, uint64_t{4000}}) {
    io.FlipBit(node + byte, 1);
    pool = Reopen(io, OpenMode::kReadOnly);
    absl::StatusOr<Pool::CheckReport> r = pool->Check(false);
    ASSERT_TRUE(r.ok());
    ASSERT_FALSE(r->problems.empty()) << byte;
    EXPECT_THAT(r->problems[0], HasSubstr("checksum mismatch"));
    std::vector<std::byte> buf(kChunk);
    absl::Status s = pool->Read("v", "", 0, buf);
    EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
    EXPECT_THAT(std::string(s.message()), HasSubstr("checksum mismatch"));
    io.FlipBit(node + byte, 1);  // repair
  }
}

// Damages each metadata structure of a pool in turn. Each is survived, or
// reported saying what to do, and what is undamaged stays readable.
TEST(PoolTest, EachDamagedMetadataStructureIsSurvivedOrReported) {
  MemIo io(32 << 20);
  const std::vector<std::byte> v_data = TestData(50 * kChunk, 2);
  const std::vector<std::byte> w_data = TestData(30 * kChunk, 3);
  {
    auto pool = MakePool(io);
    ASSERT_TRUE(pool->CreateVolume("v", 50 * kChunk).ok());
    ASSERT_TRUE(pool->Write("v", 0, v_data).ok());
    ASSERT_TRUE(pool->CreateSnapshot("v", "s").ok());
    ASSERT_TRUE(pool->CreateVolume("w", 30 * kChunk).ok());
    ASSERT_TRUE(pool->Write("w", 0, w_data).ok());
    ASSERT_TRUE(pool->Flush().ok());
    // The last commit changes only a property: the one before it has the
    // same volumes.
    ASSERT_TRUE(pool->SetProperty("last", "1").ok());
  }
  const Superblock sb = Reopen(io, OpenMode::kReadOnly)->superblock();
  auto readable = [&](Pool& pool, const std::string& what) {
    EXPECT_EQ(ReadAll(pool, "v"), v_data) << what;
    EXPECT_EQ(ReadAll(pool, "v", "s"), v_data) << what;
    EXPECT_EQ(ReadAll(pool, "w"), w_data) << what;
  };
  auto damage = [](MemIo& disk, uint64_t at, size_t len) {
    for (size_t k = 0; k < len; ++k) disk.FlipBit(at + k, k % 8);
  };
  {
    SCOPED_TRACE("a reference count page of the last commit");
    std::unique_ptr<MemIo> disk = io.Clone();
    damage(*disk, sb.refcount_copy_offset(sb.generation) + 100, 64);
    absl::Status rw = Pool::Open(*disk, OpenMode::kReadWrite).status();
    EXPECT_EQ(rw.code(), absl::StatusCode::kDataLoss);
    EXPECT_THAT(std::string(rw.message()),
                HasSubstr(absl::StrCat("reference count page 0 of generation ",
                                       sb.generation, " is damaged")));
    EXPECT_THAT(std::string(rw.message()),
                HasSubstr("open read-only; rebuild the counts with 'tandem "
                          "pool check --repair"));
    {
      auto ro = Reopen(*disk, OpenMode::kReadOnly);
      ASSERT_NE(ro, nullptr);
      readable(*ro, "read-only");
      EXPECT_EQ(ro->Info().used_bytes, 80 * kChunk);
      absl::StatusOr<Pool::CheckReport> r = ro->Check(true);
      ASSERT_TRUE(r.ok()) << r.status();
      ASSERT_EQ(r->problems.size(), 1u) << absl::StrJoin(r->problems, "\n");
      EXPECT_THAT(r->problems[0], HasSubstr("pool check --repair"));
    }
    absl::StatusOr<Pool::Repaired> fixed = Pool::Repair(*disk);
    ASSERT_TRUE(fixed.ok()) << fixed.status();
    EXPECT_THAT(fixed->what, HasSubstr("rebuilt from the trees"));
    fixed->pool.reset();
    auto pool = Reopen(*disk);
    ASSERT_NE(pool, nullptr);
    readable(*pool, "repaired");
    ExpectConsistent(*pool);
    ASSERT_TRUE(pool->Write("w", 0, TestData(kChunk, 9)).ok());
    ASSERT_TRUE(pool->Flush().ok());
    ExpectConsistent(*pool);
    // Nothing left to repair: Repair says so.
    pool.reset();
    absl::StatusOr<Pool::Repaired> again = Pool::Repair(*disk);
    ASSERT_TRUE(again.ok()) << again.status();
    EXPECT_EQ(again->what, "");
  }
  {
    SCOPED_TRACE("the superblock of the last commit");
    std::unique_ptr<MemIo> disk = io.Clone();
    damage(*disk, (sb.generation % 2) * kSuperblockSize + 200, 8);
    auto pool = Reopen(*disk);
    ASSERT_NE(pool, nullptr);  // the commit before it
    readable(*pool, "older superblock");
    EXPECT_EQ(pool->Info().generation, sb.generation - 1);
    ExpectConsistent(*pool);
  }
  {
    SCOPED_TRACE("the catalog");
    std::unique_ptr<MemIo> disk = io.Clone();
    damage(*disk, sb.catalog_head * kNodeSize + 300, 4);
    absl::Status s = Pool::Open(*disk, OpenMode::kReadOnly).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
    EXPECT_THAT(std::string(s.message()),
                HasSubstr("the catalog (its list of volumes and snapshots) is "
                          "damaged"));
    EXPECT_THAT(std::string(s.message()), HasSubstr("restore the pool"));
  }
  {
    SCOPED_TRACE("a tree node");
    std::unique_ptr<MemIo> disk = io.Clone();
    const uint64_t node = FirstTreeNodeOffset(*disk, sb);
    ASSERT_NE(node, 0u);
    damage(*disk, node + 1000, 16);
    auto pool = Reopen(*disk, OpenMode::kReadOnly);
    ASSERT_NE(pool, nullptr);
    // The tree it is in fails its reads; the other one reads as written.
    int failed = 0, fine = 0;
    for (auto [vol, snap, data] : {std::tuple{"v", "", &v_data},
                                   {"v", "s", &v_data},
                                   {"w", "", &w_data}}) {
      std::vector<std::byte> buf(data->size());
      absl::Status s = pool->Read(vol, snap, 0, buf);
      if (s.ok()) {
        EXPECT_EQ(buf, *data) << vol << "@" << snap;
        ++fine;
      } else {
        EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
        EXPECT_THAT(std::string(s.message()), HasSubstr("checksum mismatch"));
        ++failed;
      }
    }
    EXPECT_GT(failed, 0);
    EXPECT_GT(fine, 0);
    absl::StatusOr<Pool::CheckReport> r = pool->Check(false);
    ASSERT_TRUE(r.ok());
    ASSERT_FALSE(r->problems.empty());
    EXPECT_THAT(r->problems[0], HasSubstr("checksum mismatch"));
  }
}

TEST(PoolTest, FlippedDataBitFailsTheReadAndTheDataCheck) {
  MemIo io(32 << 20);
  auto pool = MakePool(io);
  ASSERT_TRUE(pool->CreateVolume("v", 4 * kChunk).ok());
  ASSERT_TRUE(pool->Write("v", 0, TestData(4 * kChunk, 2)).ok());
  ASSERT_TRUE(pool->Flush().ok());
  uint64_t data_at = pool->superblock().data_start * kChunk;
  pool.reset();
  io.FlipBit(data_at + 777, 0);
  pool = Reopen(io, OpenMode::kReadOnly);
  std::vector<std::byte> buf(4 * kChunk);
  absl::Status s = pool->Read("v", "", 0, buf);
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(s.message()), HasSubstr("'v' chunk 0"));
  EXPECT_TRUE(pool->Check(false)->problems.empty());
  std::vector<std::string> problems = pool->Check(true)->problems;
  ASSERT_EQ(problems.size(), 1u);
  EXPECT_THAT(problems[0], HasSubstr("does not match its digest"));
}

class DeviceErrorTest : public ::testing::TestWithParam<int> {};

// EIO, or ENOSPC from a full filesystem under a sparse pool file: either
// way the disk is behind the in-memory state, so the handle must stop, and
// reopening must return to the last commit.
TEST_P(DeviceErrorTest, StopsTheHandleAndReopenReturnsToLastCommit) {
  MemIo mem(32 << 20);
  {
    auto pool = MakePool(mem);
    ASSERT_TRUE(pool->CreateVolume("v", 10 * kChunk).ok());
    ASSERT_TRUE(pool->Write("v", 0, TestData(kChunk, 2)).ok());
    ASSERT_TRUE(pool->Flush().ok());
  }
  for (int n = 1; n <= 4; ++n) {
    testing_util::FailNthWrite faulty(mem, n, GetParam());
    absl::StatusOr<std::unique_ptr<Pool>> p =
        Pool::Open(faulty, OpenMode::kReadWrite);
    ASSERT_TRUE(p.ok());
    absl::Status s = (*p)->Write("v", 0, TestData(2 * kChunk, 3));
    if (s.ok()) s = (*p)->Flush();
    ASSERT_FALSE(s.ok()) << n;
    EXPECT_THAT(std::string(s.message()), HasSubstr("injected write fault"));
    // Everything after is refused with the same cause.
    absl::Status again = (*p)->Write("v", 0, TestData(10, 3));
    EXPECT_THAT(std::string(again.message()), HasSubstr("reopen the pool"));
    p->reset();
    mem.Crash();
    auto back = Reopen(mem);
    std::vector<std::byte> buf(kChunk);
    ASSERT_TRUE(back->Read("v", "", 0, buf).ok());
    EXPECT_EQ(buf, TestData(kChunk, 2)) << n;
    ExpectConsistent(*back);
  }
}

INSTANTIATE_TEST_SUITE_P(Errnos, DeviceErrorTest,
                         ::testing::Values(EIO, ENOSPC), [](const auto& info) {
                           return info.param == EIO ? "EIO" : "ENOSPC";
                         });

}  // namespace
}  // namespace blockstore
