#include "blockstore/util.h"

#include <cerrno>
#include <cstring>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace blockstore {
namespace {

using ::testing::HasSubstr;

TEST(ParseSizeTest, AcceptsPlainAndSuffixedSizes) {
  EXPECT_EQ(*ParseSize("4096"), 4096u);
  EXPECT_EQ(*ParseSize("64K"), 65536u);
  EXPECT_EQ(*ParseSize("64k"), 65536u);
  EXPECT_EQ(*ParseSize("1M"), 1u << 20);
  EXPECT_EQ(*ParseSize("2GiB"), 2ull << 30);
  EXPECT_EQ(*ParseSize("1T"), 1ull << 40);
  EXPECT_EQ(*ParseSize("1.5G"), 3ull << 29);
  EXPECT_EQ(*ParseSize("0"), 0u);
}

TEST(ParseSizeTest, RejectsGarbageNamingTheField) {
  for (const char* bad : {"", "K", "12Q", "-1", "1..5G", "abc",
                          "99999999999999999999", "20000P"}) {
    absl::StatusOr<uint64_t> s = ParseSize(bad, "volume size");
    ASSERT_FALSE(s.ok()) << bad;
    EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(s.status().message()),
                HasSubstr("bad volume size"));
  }
}

TEST(FormatBytesTest, UsesBinaryUnits) {
  EXPECT_EQ(FormatBytes(12), "12 B");
  EXPECT_EQ(FormatBytes(65536), "64 KiB");
  EXPECT_EQ(FormatBytes(3ull << 29), "1.50 GiB");
}

TEST(ErrnoErrorTest, MapsCommonErrnos) {
  EXPECT_EQ(ErrnoError(ENOENT, "open x").code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(ErrnoError(ENOSPC, "w").code(),
            absl::StatusCode::kResourceExhausted);
  absl::Status eio = ErrnoError(EIO, "read pool.img at 8192");
  EXPECT_EQ(eio.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(eio.message()), HasSubstr("read pool.img at 8192"));
}

TEST(IsAllZeroTest, FindsAnyNonZeroByte) {
  std::vector<std::byte> buf(65536);
  EXPECT_TRUE(IsAllZero(buf));
  for (size_t i : {size_t{0}, size_t{1}, size_t{4095}, size_t{65535}}) {
    buf[i] = std::byte{1};
    EXPECT_FALSE(IsAllZero(buf)) << i;
    buf[i] = std::byte{0};
  }
}

TEST(AlignedBufferTest, IsAlignedAndZeroed) {
  AlignedBuffer b(10000);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(b.data()) % kIoAlign, 0u);
  EXPECT_TRUE(IsAllZero(b.span()));
  // To the next block too: a whole-block I/O of it reads zeros there.
  EXPECT_TRUE(IsAllZero({b.data(), RoundUp(10000, kIoAlign)}));
}

TEST(AlignedBufferTest, LargeOnesStartOnAHugePage) {
  // So that madvise(MADV_HUGEPAGE) can back them with 2 MiB pages.
  for (size_t size : {kHugeBufferBytes, size_t{3} << 20, size_t{16} << 20}) {
    AlignedBuffer zeroed(size);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(zeroed.data()) % (2 << 20), 0u);
    EXPECT_EQ(zeroed.size(), size);
    EXPECT_TRUE(IsAllZero(zeroed.span()));
    AlignedBuffer raw = AlignedBuffer::Uninitialized(size);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(raw.data()) % (2 << 20), 0u);
    EXPECT_EQ(raw.size(), size);
    std::memset(raw.data(), 0xab, size);  // all of it is there to write
  }
}

TEST(AlignedBufferTest, AMovedFromBufferIsEmpty) {
  AlignedBuffer a = AlignedBuffer::Uninitialized(8192);
  std::byte* p = a.data();
  AlignedBuffer b = std::move(a);
  EXPECT_EQ(b.data(), p);
  EXPECT_EQ(b.size(), 8192u);
  EXPECT_EQ(a.data(), nullptr);  // NOLINT(bugprone-use-after-move)
  EXPECT_EQ(a.size(), 0u);       // NOLINT(bugprone-use-after-move)
  AlignedBuffer c(4096);
  c = std::move(b);
  EXPECT_EQ(c.data(), p);
  EXPECT_EQ(b.size(), 0u);  // NOLINT(bugprone-use-after-move)
}

TEST(BufferRecyclerTest, HandsOutWhatWasGivenBack) {
  BufferRecycler r(1 << 20);
  AlignedBuffer first = r.Take();
  ASSERT_EQ(first.size(), size_t{1} << 20);
  std::byte* memory = first.data();
  first.data()[0] = std::byte{7};
  r.Give(std::move(first));
  AlignedBuffer again = r.Take();
  EXPECT_EQ(again.data(), memory);  // the same memory, as it was left
  EXPECT_EQ(again.data()[0], std::byte{7});
  AlignedBuffer other = r.Take();  // none left: a new one
  EXPECT_NE(other.data(), memory);
  EXPECT_EQ(other.size(), size_t{1} << 20);
  // One of another size (or an empty one) is freed, not kept.
  r.Give(AlignedBuffer::Uninitialized(4096));
  r.Give(AlignedBuffer());
  EXPECT_EQ(r.Take().size(), size_t{1} << 20);
}

TEST(LargeVectorTest, IsAVectorOnHugePageBoundaries) {
  LargeVector<uint32_t> counts(size_t{1} << 20, 7);  // 4 MiB
  EXPECT_EQ(reinterpret_cast<uintptr_t>(counts.data()) % (2 << 20), 0u);
  EXPECT_EQ(counts.size(), size_t{1} << 20);
  EXPECT_EQ(counts.front() + counts.back(), 14u);
  counts.assign(10, 3);  // small ones are 4 KiB-aligned blocks
  EXPECT_EQ(counts, LargeVector<uint32_t>(10, 3));
}

}  // namespace
}  // namespace blockstore
