#include "blockstore/format.h"

#include <cstring>

#include "blockstore/util.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace blockstore {
namespace {

using ::testing::HasSubstr;

TEST(LayOutTest, RejectsBadChunkSizesAndTinyDevices) {
  for (uint32_t c : {0u, 2048u, 4097u, 3u << 12, 2u << 20}) {
    absl::StatusOr<Superblock> sb = LayOut(1ull << 30, c);
    ASSERT_FALSE(sb.ok()) << c;
    EXPECT_THAT(std::string(sb.status().message()),
                HasSubstr("bad chunk size"));
  }
  absl::StatusOr<Superblock> tiny = LayOut(64 * 1024, 4096);
  ASSERT_FALSE(tiny.ok());
  EXPECT_THAT(std::string(tiny.status().message()), HasSubstr("too small"));
}

TEST(LayOutTest, RegionsDoNotOverlapAndFit) {
  for (uint32_t c : {4096u, 65536u, 1u << 20}) {
    absl::StatusOr<Superblock> sb = LayOut(10ull << 30, c);
    ASSERT_TRUE(sb.ok());
    uint64_t table_end =
        sb->refcount_start_bytes + 2 * sb->refcount_pages * 4096;
    EXPECT_LE(table_end, sb->meta_start * kNodeSize);
    EXPECT_LE((sb->meta_start + sb->meta_count) * kNodeSize,
              sb->data_start * uint64_t{c});
    EXPECT_LE((sb->data_start + sb->data_count) * uint64_t{c}, 10ull << 30);
    EXPECT_GE(sb->refcount_pages * kCountsPerPage,
              sb->meta_count + sb->data_count);
  }
}

TEST(SuperblockTest, RoundTripsAndDetectsEveryBitFlip) {
  Superblock sb = *LayOut(1ull << 30, 65536);
  sb.generation = 42;
  sb.catalog_head = sb.meta_start + 3;
  sb.used_chunks = 17;
  std::array<std::byte, kSuperblockSize> buf;
  EncodeSuperblock(sb, 4096, buf);
  Superblock back;
  std::string why;
  ASSERT_EQ(DecodeSuperblock(buf, 4096, 1ull << 30, &back, &why),
            SuperblockState::kValid);
  EXPECT_EQ(back.generation, 42u);
  EXPECT_EQ(back.catalog_head, sb.meta_start + 3);
  EXPECT_EQ(back.used_chunks, 17u);
  // Read at the wrong slot: the seed differs.
  EXPECT_EQ(DecodeSuperblock(buf, 0, 1ull << 30, &back, &why),
            SuperblockState::kDamaged);
  for (size_t bit = 64; bit < 8 * 200; bit += 7) {
    auto copy = buf;
    copy[bit / 8] ^= static_cast<std::byte>(1 << (bit % 8));
    EXPECT_EQ(DecodeSuperblock(copy, 4096, 1ull << 30, &back, &why),
              SuperblockState::kDamaged)
        << bit;
  }
  std::array<std::byte, kSuperblockSize> zeros{};
  EXPECT_EQ(DecodeSuperblock(zeros, 0, 1ull << 30, &back, &why),
            SuperblockState::kNoMagic);
}

TEST(NodeTest, ChecksumCatchesFlipsAndMisdirectedWrites) {
  std::array<std::byte, kNodeSize> node{};
  std::array<Entry, kFanout> entries;
  for (int i = 0; i < kFanout; ++i) entries[i] = {uint64_t(i) + 100, 7, {}};
  EncodeEntries(entries, node);
  SealNode({NodeKind::kTree, 2, 0, 555, 9, 0}, node);
  absl::StatusOr<NodeHeader> h = OpenNode(node, 555);
  ASSERT_TRUE(h.ok());
  EXPECT_EQ(h->level, 2);
  EXPECT_EQ(h->birth, 9u);
  std::array<Entry, kFanout> back;
  DecodeEntries(node, back);
  EXPECT_EQ(back[125].ptr, 225u);

  absl::Status wrong = OpenNode(node, 556).status();
  EXPECT_EQ(wrong.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(wrong.message()), HasSubstr("metadata node 556"));
  for (size_t byte = 0; byte < kNodeSize; byte += 61) {
    auto copy = node;
    copy[byte] ^= std::byte{0x10};
    EXPECT_EQ(OpenNode(copy, 555).status().code(), absl::StatusCode::kDataLoss)
        << byte;
  }
}

TEST(RefcountPageTest, DetectsWrongIndexAndFlips) {
  std::array<std::byte, 4096> page{};
  PutLe32(page.data() + 16, 5);
  SealRefcountPage(3, page);
  EXPECT_TRUE(RefcountPageValid(3, page));
  EXPECT_FALSE(RefcountPageValid(4, page));
  page[100] ^= std::byte{1};
  EXPECT_FALSE(RefcountPageValid(3, page));
}

}  // namespace
}  // namespace blockstore
