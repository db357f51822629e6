#include "blockstore/util.h"

#include <array>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <set>
#include <thread>
#include <vector>

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
  // From 256 KiB on too (a block state a byte: 760,000 of them for 24 GiB).
  LargeVector<uint8_t> states(256 << 10, 1);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(states.data()) % (2 << 20), 0u);
  counts.assign(10, 3);  // small ones are 4 KiB-aligned blocks
  EXPECT_EQ(reinterpret_cast<uintptr_t>(counts.data()) % kIoAlign, 0u);
  EXPECT_EQ(counts, LargeVector<uint32_t>(10, 3));
}

TEST(SlotArenaTest, CarvesSlotsFromHugePageBlocksAndReusesThemFirst) {
  SlotArena arena(4000);
  EXPECT_EQ(arena.slot_bytes(), 4000u);  // a multiple of 16 already
  EXPECT_EQ(SlotArena(4001).slot_bytes(), 4016u);
  const size_t per_block = (size_t{2} << 20) / 4000;  // 524
  std::vector<void*> slots;
  std::set<void*> distinct;
  for (size_t i = 0; i < per_block + 1; ++i) {
    void* slot = arena.Take();
    EXPECT_EQ(reinterpret_cast<uintptr_t>(slot) % alignof(std::max_align_t),
              0u);
    std::memset(slot, static_cast<int>(i), 4000);  // all of it is ours
    slots.push_back(slot);
    distinct.insert(slot);
  }
  EXPECT_EQ(distinct.size(), per_block + 1);
  EXPECT_EQ(arena.blocks(), 2u);  // the last slot needed a second block
  // A block is one 2 MiB page: the first slot starts it.
  EXPECT_EQ(reinterpret_cast<uintptr_t>(slots[0]) % (2 << 20), 0u);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(slots[per_block]) % (2 << 20), 0u);
  // Given back, slots come out again, the last one first, before any new.
  arena.Give(slots[3]);
  arena.Give(slots[7]);
  EXPECT_EQ(arena.Take(), slots[7]);
  EXPECT_EQ(arena.Take(), slots[3]);
  void* fresh = arena.Take();
  EXPECT_EQ(distinct.count(fresh), 0u);
  EXPECT_EQ(arena.blocks(), 2u);
  arena.Give(fresh);
  for (void* slot : slots) arena.Give(slot);
}

TEST(SlotArenaTest, ThreadsTakeAndGiveWithoutSharingASlot) {
  SlotArena arena(64);
  constexpr int kThreads = 4, kRounds = 20000;
  std::vector<std::thread> threads;
  std::atomic<int> clashes{0};
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&arena, &clashes, t] {
      std::vector<uint64_t*> mine;
      for (int i = 0; i < kRounds; ++i) {
        auto* slot = static_cast<uint64_t*>(arena.Take());
        *slot = (uint64_t(t) << 32) | i;
        mine.push_back(slot);
        if (mine.size() == 16) {
          for (uint64_t* s : mine) {
            if ((*s >> 32) != uint64_t(t)) ++clashes;
            arena.Give(s);
          }
          mine.clear();
        }
      }
      for (uint64_t* s : mine) arena.Give(s);
    });
  }
  for (std::thread& th : threads) th.join();
  EXPECT_EQ(clashes.load(), 0);
  EXPECT_EQ(arena.blocks(), 1u);  // at most 64 slots were out at once
}

TEST(ArenaAllocatorTest, SharedObjectsLiveInTheirTypesArena) {
  struct Big {
    std::array<uint64_t, 500> v{};
  };
  auto a = std::allocate_shared<Big>(ArenaAllocator<Big>());
  auto b = std::allocate_shared<Big>(ArenaAllocator<Big>());
  a->v.back() = 1;
  EXPECT_EQ(b->v.back(), 0u);  // value-initialized, apart from a
  // Both came from one arena, whose slots fit the control block as well.
  const auto distance = reinterpret_cast<uintptr_t>(b.get()) -
                        reinterpret_cast<uintptr_t>(a.get());
  EXPECT_GE(distance, sizeof(Big));
  EXPECT_LT(distance, sizeof(Big) + 64);
  // An array of them comes from the heap.
  std::vector<Big, ArenaAllocator<Big>> several(3);
  EXPECT_EQ(several.size(), 3u);
}

}  // namespace
}  // namespace blockstore
