#include "blockstore/node_cache.h"

#include "gtest/gtest.h"

namespace blockstore {
namespace {

NodeRef MakeNode(uint64_t id, bool dirty = false) {
  NodeRef n = AllocateNode();
  n->id = id;
  n->dirty = dirty;
  return n;
}

TEST(NodeCacheTest, EvictsTheLeastRecentlyUsedCleanNodes) {
  NodeCache cache;
  for (uint64_t id = 1; id <= 5; ++id) cache.Insert(MakeNode(id));
  ASSERT_NE(cache.Find(1), nullptr);  // 1 is now the most recent
  cache.Trim(3);
  EXPECT_EQ(cache.size(), 3u);
  EXPECT_TRUE(cache.Contains(1));
  EXPECT_FALSE(cache.Contains(2));
  EXPECT_FALSE(cache.Contains(3));
  EXPECT_TRUE(cache.Contains(4));
  EXPECT_TRUE(cache.Contains(5));
}

TEST(NodeCacheTest, KeepsDirtyAndUnwrittenNodesWhateverTheBound) {
  NodeCache cache;
  Node* dirty = cache.Insert(MakeNode(1, /*dirty=*/true));
  Node* frozen = cache.Insert(MakeNode(2, /*dirty=*/true));
  cache.Insert(MakeNode(3));
  EXPECT_EQ(cache.dirty_count(), 2u);
  cache.Freeze(*frozen);
  EXPECT_EQ(cache.dirty_count(), 1u);
  EXPECT_EQ(cache.Dirty(), std::vector<Node*>{dirty});
  cache.DropClean();
  EXPECT_EQ(cache.size(), 2u);
  EXPECT_TRUE(cache.Contains(1));
  EXPECT_TRUE(cache.Contains(2));
  cache.Written(*frozen);  // on disk now: evictable
  cache.DropClean();
  EXPECT_EQ(cache.size(), 1u);
  EXPECT_TRUE(cache.Contains(1));
  cache.Erase(1);
  EXPECT_EQ(cache.dirty_count(), 0u);
  EXPECT_EQ(cache.size(), 0u);
}

TEST(NodeCacheTest, DecodeRefusesPointersOutsideThePool) {
  Superblock shape;
  shape.meta_start = 10;
  shape.meta_count = 5;
  shape.data_start = 100;
  shape.data_count = 5;
  std::array<Entry, kFanout> entries{};
  entries[3].ptr = 12;
  std::array<std::byte, kNodeSize> raw{};
  EncodeEntries(entries, raw);
  NodeHeader h;
  h.id = 11;
  h.level = 1;
  SealNode(h, raw);
  absl::StatusOr<NodeRef> ok = DecodeTreeNode(shape, 11, 1, raw);
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ((*ok)->e[3].ptr, 12u);
  EXPECT_FALSE(DecodeTreeNode(shape, 11, 0, raw).ok()) << "wrong level";
  entries[3].ptr = 15;  // one past the metadata area
  EncodeEntries(entries, raw);
  SealNode(h, raw);
  absl::StatusOr<NodeRef> bad = DecodeTreeNode(shape, 11, 1, raw);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().message(),
            "metadata node 11: pointer 15 out of range");
}

}  // namespace
}  // namespace blockstore
