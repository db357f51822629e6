// Crash consistency, exhaustively: a scripted workload runs on a MemIo that
// loses power at durable-write point k, for EVERY k (each write op and each
// flush is a point). Each crash is then resolved four ways: all unflushed
// writes lost, all kept, all kept but the last torn at a sector, and a
// random subset kept with tears. After each, the pool must reopen, equal the
// model as of its last acknowledged commit (or of the commit in flight, if
// that one's superblock made it), pass Check(), and accept new writes.
//
// The second sweep runs a write from another thread while each explicit
// commit is being written (the commit holds no lock then): it lands in the
// next transaction, never in the one being written.
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "blockstore/mem_io.h"
#include "blockstore/pool.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/fault_io.h"
#include "tests/testing/model.h"

namespace blockstore {
namespace {

using testing_util::CrashingIo;
using testing_util::PoolModel;
using testing_util::TestData;

constexpr uint32_t kChunk = 4096;
constexpr uint64_t kPoolBytes = 16 << 20;

struct Outcome {
  std::vector<std::pair<uint64_t, PoolModel>> acked;  // generation, model
  std::optional<PoolModel> in_flight;  // model after the op that crashed
  int writes_during_commits = 0;
};

// Runs a hook, once, inside the n-th Flush after it is armed (the commit
// protocol's first or second flush), before passing the flush on.
class DuringFlush : public IoWrapper {
 public:
  using IoWrapper::IoWrapper;
  void Arm(int nth, std::function<void()> hook) {
    nth_ = nth;
    hook_ = std::move(hook);
  }
  absl::Status Flush() override {
    if (hook_ && --nth_ == 0) {
      std::function<void()> hook = std::move(hook_);
      hook_ = nullptr;
      hook();
    }
    return IoWrapper::Flush();
  }

 private:
  int nth_ = 0;
  std::function<void()> hook_;
};

// The scripted workload. Stops at the first failing op. With `during`
// (the Io the pool runs on), every explicit flush has a write to "a" run
// by another thread while the commit is in flight.
Outcome Workload(Io& io, const PoolTuning& tuning,
                 DuringFlush* during = nullptr) {
  Outcome out;
  absl::StatusOr<std::unique_ptr<Pool>> created =
      Pool::Create(io, {.chunk_size_bytes = kChunk});
  if (!created.ok()) {
    out.in_flight = PoolModel(kChunk);
    return out;
  }
  Pool& pool = **created;
  pool.SetTuning(tuning);
  PoolModel model(kChunk);
  out.acked.emplace_back(pool.Info().generation, model);

  using Op = std::function<absl::Status()>;
  using Change = std::function<void(PoolModel&)>;
  auto step = [&](const Op& op, const Change& change) {
    PoolModel next = model;
    change(next);
    if (absl::Status s = op(); !s.ok()) {
      out.in_flight = std::move(next);
      return false;
    }
    model = std::move(next);
    if (uint64_t g = pool.Info().generation; g != out.acked.back().first) {
      out.acked.emplace_back(g, model);
    }
    return true;
  };
  auto write = [&](const std::string& v, uint64_t off, uint64_t len,
                   uint64_t seed) {
    std::vector<std::byte> d = TestData(len, seed);
    return step([&] { return pool.Write(v, off, d); },
                [&](PoolModel& m) { m.Write(v, off, d); });
  };
  auto trim = [&](const std::string& v, uint64_t off, uint64_t len) {
    return step([&] { return pool.Trim(v, off, len); },
                [&](PoolModel& m) { m.Trim(v, off, len); });
  };
  int flushes = 0;
  auto flush = [&] {
    if (during == nullptr) {
      return step([&] { return pool.Flush(); }, [](PoolModel&) {});
    }
    ++flushes;
    const uint64_t off = (flushes * 12345) % (90 << 10);
    std::vector<std::byte> d = TestData(3000, 100 + flushes);
    absl::Status written;
    bool ran = false;
    during->Arm(1 + flushes % 2, [&] {
      ran = true;
      std::thread t([&] { written = pool.Write("a", off, d); });
      t.join();
    });
    bool ok = step([&] { return pool.Flush(); }, [](PoolModel&) {});
    during->Arm(0, nullptr);
    if (!ok) return false;
    out.writes_during_commits += ran ? 1 : 0;
    if (!ran) {
      // Nothing was left to commit (the call before committed): the write
      // goes on its own.
      return step([&] { return pool.Write("a", off, d); },
                  [&](PoolModel& m) { m.Write("a", off, d); });
    }
    if (!written.ok()) {  // the flush went through, so this cannot be
      ADD_FAILURE() << "write during a commit: " << written;
      out.in_flight = model;
      return false;
    }
    // Acknowledged, and in the next transaction.
    model.Write("a", off, d);
    return true;
  };
  auto create = [&](const std::string& v, uint64_t size) {
    return step([&] { return pool.CreateVolume(v, size); },
                [&](PoolModel& m) { m.volumes[v].size_bytes = size; });
  };
  auto snapshot = [&](const std::string& v, const std::string& s) {
    return step([&] { return pool.CreateSnapshot(v, s).status(); },
                [&](PoolModel& m) { m.Snapshot(v, s); });
  };
  auto resize = [&](const std::string& v, uint64_t size) {
    return step([&] { return pool.ResizeVolume(v, size); },
                [&](PoolModel& m) { m.Resize(v, size); });
  };
  auto drop_snapshot = [&](const std::string& v, const std::string& s) {
    return step([&] { return pool.DeleteSnapshot(v, s); },
                [&](PoolModel& m) { m.volumes.at(v).snapshots.erase(s); });
  };
  auto rollback = [&](const std::string& v, const std::string& s) {
    return step([&] { return pool.Rollback(v, s); },
                [&](PoolModel& m) { m.Rollback(v, s); });
  };
  auto drop_volume = [&](const std::string& v) {
    return step([&] { return pool.DeleteVolume(v, true); },
                [&](PoolModel& m) { m.volumes.erase(v); });
  };

  create("a", 600 << 10) && write("a", 0, 200 << 10, 2) &&
      write("a", 7000, 5000, 3) && write("a", 300 << 10, 8192, 4) && flush() &&
      snapshot("a", "s1") && write("a", 100 << 10, 200 << 10, 6) &&
      trim("a", 400 << 10, (50 << 10) + 123) && flush() &&
      resize("a", (126 * 126 + 10) * kChunk) &&
      write("a", (126 * 126 + 2) * kChunk, 10 << 10, 7) &&
      snapshot("a", "s2") && create("b", 300 << 10) &&
      write("b", 1000, 150 << 10, 9) && flush() && drop_snapshot("a", "s1") &&
      rollback("a", "s2") && write("a", 5 * kChunk, 3 * kChunk, 10) &&
      drop_volume("b") && resize("a", 100 << 10) && flush() &&
      drop_snapshot("a", "s2") && trim("a", 0, 100 << 10) &&
      write("a", 0, kChunk, 11) && flush();
  // Enough snapshots with long names that the catalog spans two nodes.
  for (int i = 0; i < 25 && !out.in_flight.has_value(); ++i) {
    std::string name = absl::StrCat(std::string(100, 'n'), i);
    (void)(write("a", i * 1000, 700, 20 + i) && snapshot("a", name));
  }
  return out;
}

// Default tuning, and a 3-node cache with a commit every 2 dirty nodes (so
// automatic commits and cache eviction fall between the crash points too).
class PoolCrashTest : public ::testing::TestWithParam<PoolTuning> {};

void Sweep(const PoolTuning& tuning, bool writes_during_commits) {
  MemIo probe(kPoolBytes);
  CrashingIo counter(probe, UINT64_MAX);
  DuringFlush counter_during(counter);
  Outcome full = writes_during_commits
                     ? Workload(counter_during, tuning, &counter_during)
                     : Workload(counter, tuning);
  ASSERT_FALSE(full.in_flight.has_value()) << "the workload itself failed";
  if (writes_during_commits) {
    EXPECT_GE(full.writes_during_commits, 2);
  }
  const uint64_t points = counter.points();
  ASSERT_GT(points, 60u);
  std::printf("crash points: %llu, commits: %zu, writes during commits: %d\n",
              static_cast<unsigned long long>(points), full.acked.size(),
              full.writes_during_commits);

  int landed_acked = 0, landed_in_flight = 0, unformatted = 0;
  for (uint64_t k = 0; k < points; ++k) {
    MemIo mem(kPoolBytes);
    CrashingIo crash(mem, k);
    DuringFlush crash_during(crash);
    Outcome out = writes_during_commits
                      ? Workload(crash_during, tuning, &crash_during)
                      : Workload(crash, tuning);
    ASSERT_TRUE(crash.crashed()) << "point " << k;
    ASSERT_TRUE(out.in_flight.has_value()) << "point " << k;

    std::mt19937_64 rng(k);
    const std::vector<
        std::pair<std::string, std::function<size_t(size_t, size_t)>>>
        modes = {
            {"drop all", [](size_t, size_t) -> size_t { return 0; }},
            {"keep all", [](size_t, size_t len) { return len; }},
            {"tear last",
             [n = mem.pending_writes()](size_t i, size_t len) -> size_t {
               return i + 1 < n ? len : len / 2;
             }},
            {"random subset",
             [&rng](size_t, size_t len) -> size_t {
               switch (rng() % 3) {
                 case 0:
                   return 0;
                 case 1:
                   return len;
                 default:
                   return rng() % len;
               }
             }},
        };
    for (const auto& [mode, kept] : modes) {
      SCOPED_TRACE(absl::StrCat("crash point ", k, " of ", points, ", ", mode));
      std::unique_ptr<MemIo> disk = mem.Clone();
      disk->CrashKeeping(kept);
      absl::StatusOr<std::unique_ptr<Pool>> pool =
          Pool::Open(*disk, OpenMode::kReadWrite);
      if (out.acked.empty()) {
        // Crashed while formatting: no pool yet (or a torn first
        // superblock, said as such), or the empty new one.
        if (!pool.ok()) {
          EXPECT_THAT(
              std::string(pool.status().message()),
              ::testing::AnyOf(
                  ::testing::HasSubstr("not a tandem pool"),
                  ::testing::HasSubstr("both pool superblocks are damaged")));
          ++unformatted;
          continue;
        }
        EXPECT_EQ((*pool)->Info().volume_count, 0u);
        continue;
      }
      ASSERT_TRUE(pool.ok()) << pool.status();
      uint64_t gen = (*pool)->Info().generation;
      const PoolModel* want = nullptr;
      if (gen == out.acked.back().first) {
        want = &out.acked.back().second;
        ++landed_acked;
      } else if (gen == out.acked.back().first + 1) {
        want = &*out.in_flight;
        ++landed_in_flight;
      } else {
        FAIL() << "reopened at generation " << gen << ", last acknowledged "
               << out.acked.back().first;
      }
      ASSERT_EQ(testing_util::DiffPool(**pool, *want), "");
      absl::StatusOr<Pool::CheckReport> report = (*pool)->Check(true);
      ASSERT_TRUE(report.ok()) << report.status();
      ASSERT_THAT(report->problems, ::testing::IsEmpty());
      // And life goes on: the recovered pool takes writes and commits.
      ASSERT_TRUE((*pool)->CreateVolume("after", 64 << 10).ok());
      ASSERT_TRUE((*pool)->Write("after", 100, TestData(9000, 2)).ok());
      ASSERT_TRUE((*pool)->Flush().ok());
      ASSERT_THAT((*pool)->Check(false)->problems, ::testing::IsEmpty());
    }
  }
  // The sweep must have exercised both outcomes, not just one.
  EXPECT_GT(landed_acked, 0);
  EXPECT_GT(landed_in_flight, 0);
  EXPECT_GT(unformatted, 0);
}

TEST_P(PoolCrashTest, EveryCrashPointRecoversToACommittedState) {
  Sweep(GetParam(), false);
}

TEST_P(PoolCrashTest, WritesDuringACommitLandInTheNextOne) {
  Sweep(GetParam(), true);
}

INSTANTIATE_TEST_SUITE_P(
    Tunings, PoolCrashTest,
    ::testing::Values(PoolTuning{}, PoolTuning{.max_cached_nodes = 3,
                                               .auto_commit_dirty_nodes = 2}),
    [](const auto& info) {
      return info.param.max_cached_nodes == 3 ? "TinyCacheFrequentCommits"
                                              : "Default";
    });

}  // namespace
}  // namespace blockstore
