#include "blockstore/space_map.h"

#include <set>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace blockstore {
namespace {

// A small layout: 10 nodes at block 100, 20 chunks at block 50.
Superblock Shape() {
  Superblock sb;
  sb.chunk_size = 65536;
  sb.meta_start = 100;
  sb.meta_count = 10;
  sb.data_start = 50;
  sb.data_count = 20;
  sb.refcount_pages = 1;
  return sb;
}

TEST(SpaceMapTest, AllocatesEveryBlockOnceAndSaysWhenFull) {
  SpaceMap map(Shape());
  std::set<uint64_t> nodes;
  for (int i = 0; i < 10; ++i) {
    std::optional<uint64_t> id = map.AllocNode();
    ASSERT_TRUE(id.has_value());
    EXPECT_GE(*id, 100u);
    EXPECT_LT(*id, 110u);
    EXPECT_EQ(map.NodeRefs(*id), 1u);
    nodes.insert(*id);
  }
  EXPECT_EQ(nodes.size(), 10u);
  EXPECT_FALSE(map.AllocNode().has_value());
  EXPECT_EQ(map.used_nodes(), 10u);
  EXPECT_EQ(map.free_nodes(), 0u);
  EXPECT_EQ(map.free_chunks(), 20u);
}

TEST(SpaceMapTest, AReservedChunkIsNotCountedUntilInstalled) {
  SpaceMap map(Shape());
  std::optional<uint64_t> phys = map.ReserveChunk();
  ASSERT_TRUE(phys.has_value());
  EXPECT_EQ(map.ChunkRefs(*phys), 0u);
  EXPECT_EQ(map.used_chunks(), 0u);
  EXPECT_EQ(map.free_chunks(), 19u);
  EXPECT_EQ(map.reserved_chunks(), 1u);
  // Not handed out twice.
  for (int i = 0; i < 19; ++i) EXPECT_NE(map.ReserveChunk(), phys);
  EXPECT_FALSE(map.ReserveChunk().has_value());
  map.Install(*phys);
  EXPECT_EQ(map.ChunkRefs(*phys), 1u);
  EXPECT_EQ(map.used_chunks(), 1u);
  EXPECT_EQ(map.reserved_chunks(), 19u);
}

TEST(SpaceMapTest, FreedSpaceWaitsForTheCommitAndForOlderReaders) {
  SpaceMap map(Shape());
  std::optional<uint64_t> phys = map.ReserveChunk();
  map.Install(*phys);
  map.AddChunkRef(*phys);
  EXPECT_EQ(map.DropChunkRef(*phys), 1u);
  EXPECT_FALSE(map.has_held());

  const uint64_t reader = map.BeginRead();  // began before the free
  EXPECT_EQ(map.DropChunkRef(*phys), 0u);
  EXPECT_TRUE(map.has_held());
  EXPECT_EQ(map.free_chunks(), 19u);  // held by the open transaction

  SpaceMap::Frees frees = map.TakeHeld();  // a commit froze it
  EXPECT_FALSE(map.has_held());
  const uint64_t late = map.BeginRead();  // began after the freeze
  map.Release(std::move(frees));          // ... and the commit is durable
  EXPECT_EQ(map.free_chunks(), 19u) << "a reader from before still runs";
  map.EndRead(late);
  EXPECT_EQ(map.free_chunks(), 19u) << "the older reader still runs";
  map.EndRead(reader);
  EXPECT_EQ(map.free_chunks(), 20u);
  EXPECT_EQ(map.TakeFreedChunks(), std::vector<uint64_t>{*phys});
}

TEST(SpaceMapTest, AReaderFromAfterTheReleaseDoesNotHoldItBack) {
  SpaceMap map(Shape());
  std::optional<uint64_t> id = map.AllocNode();
  map.DropNodeRef(*id);
  SpaceMap::Frees frees = map.TakeHeld();
  map.Release(std::move(frees));
  EXPECT_EQ(map.free_nodes(), 10u);
  const uint64_t t = map.BeginRead();
  std::optional<uint64_t> again = map.AllocNode();
  ASSERT_TRUE(again.has_value());
  map.EndRead(t);
  EXPECT_EQ(map.free_nodes(), 9u);
}

TEST(SpaceMapTest, DiscardsOnlyRunsLongEnoughAndReservesThemMeanwhile) {
  SpaceMap map(Shape());
  std::vector<uint64_t> all;
  for (int i = 0; i < 20; ++i) {
    uint64_t phys = *map.ReserveChunk();
    map.Install(phys);
    all.push_back(phys);
  }
  // Free chunks 50..55 (a run of 6) and 60 alone.
  for (uint64_t phys : {50, 51, 52, 53, 54, 55, 60}) map.DropChunkRef(phys);
  map.Release(map.TakeHeld());
  std::vector<uint64_t> freed = map.TakeFreedChunks();
  EXPECT_EQ(freed.size(), 7u);
  std::vector<std::pair<uint64_t, uint64_t>> runs = map.BeginDiscard(freed, 4);
  ASSERT_EQ(runs.size(), 1u);
  EXPECT_EQ(runs[0], std::make_pair(uint64_t{50}, uint64_t{56}));
  EXPECT_EQ(map.free_chunks(), 1u);  // only chunk 60 meanwhile
  EXPECT_EQ(map.ReserveChunk(), 60u);
  EXPECT_FALSE(map.ReserveChunk().has_value());
  map.EndDiscard(runs);
  EXPECT_EQ(map.free_chunks(), 6u);
}

TEST(SpaceMapTest, ChunksAnOverwriteFreedAreReusedFirstAndNotDiscarded) {
  SpaceMap map(Shape());
  for (int i = 0; i < 20; ++i) map.Install(*map.ReserveChunk());
  // An overwrite frees 57, 53, 54 (in that order); a delete frees 50..52
  // and 55, 56: the run 50..56 a discard would take is broken by the
  // overwritten ones.
  for (uint64_t phys : {57, 53, 54}) {
    map.DropChunkRef(phys, SpaceMap::Freed::kReuse);
  }
  for (uint64_t phys : {50, 51, 52, 55, 56}) map.DropChunkRef(phys);
  map.Release(map.TakeHeld());
  EXPECT_EQ(map.free_chunks(), 8u);
  std::vector<uint64_t> freed = map.TakeFreedChunks();
  EXPECT_THAT(freed, ::testing::UnorderedElementsAre(50, 51, 52, 55, 56));
  std::vector<std::pair<uint64_t, uint64_t>> runs = map.BeginDiscard(freed, 3);
  ASSERT_EQ(runs.size(), 1u);
  EXPECT_EQ(runs[0], std::make_pair(uint64_t{50}, uint64_t{53}));
  // The overwritten ones come back first, in address order.
  EXPECT_EQ(map.ReserveChunk(), 53u);
  EXPECT_EQ(map.ReserveChunk(), 54u);
  EXPECT_EQ(map.ReserveChunk(), 57u);
  EXPECT_EQ(map.ReserveChunk(), 55u);  // then the cursor: 50..52 are reserved
  map.EndDiscard(runs);
  EXPECT_EQ(map.free_chunks(), 4u);
}

TEST(SpaceMapTest, AChunkStillSharedIsNotKeptForReuse) {
  SpaceMap map(Shape());
  uint64_t phys = *map.ReserveChunk();
  map.Install(phys);
  map.AddChunkRef(phys);  // a snapshot shares it
  EXPECT_EQ(map.DropChunkRef(phys, SpaceMap::Freed::kReuse), 1u);
  map.Release(map.TakeHeld());
  EXPECT_TRUE(map.TakeFreedChunks().empty());
  EXPECT_EQ(map.DropChunkRef(phys), 0u);  // the snapshot is deleted
  map.Release(map.TakeHeld());
  EXPECT_EQ(map.TakeFreedChunks(), std::vector<uint64_t>{phys});
  // Not handed out first, as an overwritten chunk would be: the cursor's
  // next free chunk comes instead.
  EXPECT_NE(map.ReserveChunk(), phys);
}

TEST(SpaceMapTest, PagesCarryTheCountsAndTheirChanges) {
  SpaceMap map(Shape());
  uint64_t id = *map.AllocNode();
  map.AddNodeRef(id);
  uint64_t phys = *map.ReserveChunk();
  map.Install(phys);
  EXPECT_EQ(map.TakeDirtyPages(), std::vector<uint64_t>{0});
  EXPECT_THAT(map.TakeDirtyPages(), ::testing::IsEmpty());
  std::array<std::byte, 4096> page{};
  map.EncodePage(0, page);
  ASSERT_TRUE(RefcountPageValid(0, page));

  SpaceMap loaded(Shape());
  loaded.LoadPage(0, page);
  loaded.Recount();
  EXPECT_EQ(loaded.NodeRefs(id), 2u);
  EXPECT_EQ(loaded.ChunkRefs(phys), 1u);
  EXPECT_EQ(loaded.used_nodes(), 1u);
  EXPECT_EQ(loaded.used_chunks(), 1u);
  EXPECT_EQ(loaded.free_chunks(), 19u);
}

TEST(SpaceMapTest, ARecountLeavesHeldAndReservedBlocksOutOfTheFree) {
  // 30 blocks: the state words the recount skips are 8 wide, so blocks on
  // both sides of a word boundary and in the tail past the last whole word.
  SpaceMap map(Shape());
  std::vector<uint64_t> chunks;
  for (int i = 0; i < 20; ++i) chunks.push_back(*map.ReserveChunk());
  for (uint64_t phys : chunks) map.Install(phys);
  // Chunks 9 and 12 freed and released (free again), then one of them
  // reserved for a write in flight; 3 and 17 freed (held).
  EXPECT_EQ(map.DropChunkRef(chunks[9]), 0u);
  EXPECT_EQ(map.DropChunkRef(chunks[12]), 0u);
  map.Release(map.TakeHeld());
  std::optional<uint64_t> reserved = map.ReserveChunk();
  ASSERT_TRUE(reserved == chunks[9] || reserved == chunks[12]);
  EXPECT_EQ(map.DropChunkRef(chunks[3]), 0u);
  EXPECT_EQ(map.DropChunkRef(chunks[17]), 0u);
  uint64_t node = *map.AllocNode();
  EXPECT_EQ(map.DropNodeRef(node), 0u);  // held too
  const uint64_t free_chunks = map.free_chunks(), free_nodes = map.free_nodes();
  EXPECT_EQ(free_chunks, 1u);  // 9 or 12, the one not reserved
  EXPECT_EQ(free_nodes, 9u);
  map.Recount();
  EXPECT_EQ(map.free_chunks(), free_chunks);
  EXPECT_EQ(map.free_nodes(), free_nodes);
  EXPECT_EQ(map.used_chunks(), 16u);
  EXPECT_EQ(map.used_nodes(), 0u);
}

}  // namespace
}  // namespace blockstore
