// Many threads on one pool at once, checked against models: every thread
// owns what it checks, so its model is exact whatever the others do, and at
// quiet points (every thread paused) the whole pool is compared, digests
// included, and scrubbed. Run under ThreadSanitizer by the sanitizer build.
//
//  - 4 owners, each with a volume of its own: writes, trims, reads,
//    snapshots, snapshot deletes, rollbacks, flushes;
//  - 4 stripers, two per shared volume, writing and trimming interleaved
//    stripes that are not chunk aligned, so that both write into the same
//    chunks (a read-modify-write each) and the same tree nodes;
//  - a snapshot reader reading the snapshots owner 0 publishes while owner
//    0 goes on writing and deletes them: every read returns exactly the
//    snapshot's bytes, or NotFound once it is gone;
//  - a committer flushing all the while (and automatic commits, a small
//    node cache evicting).
#include <atomic>
#include <barrier>
#include <condition_variable>
#include <cstring>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "blockstore/mem_io.h"
#include "blockstore/pool.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/model.h"
#include "tests/testing/pools.h"

namespace blockstore {
namespace {

using testing_util::PoolModel;
using testing_util::TestData;

constexpr uint32_t kChunk = 4096;
constexpr uint64_t kVolumeBytes = 512 << 10;
constexpr uint64_t kStripe = 3 * kChunk + 100;  // not chunk aligned
constexpr uint64_t kStripes = kVolumeBytes / kStripe;
constexpr int kOwners = 4;
constexpr int kSharedVolumes = 2;

std::string Owned(int i) { return absl::StrCat("own", i); }
std::string Shared(int i) { return absl::StrCat("shared", i); }

int Rounds() {
  const char* env = std::getenv("TANDEM_CONCURRENCY_ROUNDS");
  return env != nullptr ? std::atoi(env) : 3;
}

// What owner 0 last snapshotted, for the reader.
struct Published {
  std::mutex mu;
  std::string name;
  std::vector<std::byte> bytes;
};

class ConcurrencyRun {
 public:
  explicit ConcurrencyRun(uint64_t seed) : seed_(seed), io_(128 << 20) {
    pool_ = testing_util::MakePool(io_, kChunk);
    pool_->SetTuning({.max_cached_nodes = 24, .auto_commit_dirty_nodes = 16});
    for (int i = 0; i < kOwners; ++i) {
      models_.emplace_back(kChunk);
      models_.back().volumes[Owned(i)].size_bytes = kVolumeBytes;
      EXPECT_TRUE(pool_->CreateVolume(Owned(i), kVolumeBytes).ok());
    }
    for (int i = 0; i < kSharedVolumes; ++i) {
      shared_.emplace_back(kVolumeBytes);
      EXPECT_TRUE(pool_->CreateVolume(Shared(i), kVolumeBytes).ok());
    }
  }

  void Run(int rounds, int steps) {
    const int workers = kOwners + 2 * kSharedVolumes;
    std::barrier quiet(workers + 1);
    std::atomic<bool> stop{false};
    std::vector<std::thread> threads;
    for (int w = 0; w < workers; ++w) {
      threads.emplace_back([&, w] {
        std::mt19937_64 rng(seed_ * 1000 + w);
        for (int r = 0; r < rounds; ++r) {
          for (int i = 0; i < steps && !failed_.load(); ++i) {
            if (w < kOwners) {
              OwnerStep(w, rng, r * steps + i);
            } else {
              StriperStep(w - kOwners, rng, r * steps + i);
            }
          }
          quiet.arrive_and_wait();  // the main thread checks
          quiet.arrive_and_wait();  // and lets everyone go on
        }
      });
    }
    std::thread reader([&] { ReadSnapshots(stop); });
    std::thread committer([&] {
      while (!stop.load()) {
        absl::Status s = pool_->Flush();
        if (!s.ok()) Fail(absl::StrCat("flush: ", s.ToString()));
        std::this_thread::yield();
      }
    });
    for (int r = 0; r < rounds; ++r) {
      quiet.arrive_and_wait();
      CheckQuiet(r);
      quiet.arrive_and_wait();
    }
    for (std::thread& t : threads) t.join();
    stop = true;
    reader.join();
    committer.join();
    EXPECT_GT(snapshot_reads_.load(), 0);
  }

  void CheckQuiet(int round) {
    SCOPED_TRACE(absl::StrCat("quiet point after round ", round));
    for (int i = 0; i < kOwners; ++i) {
      EXPECT_EQ(testing_util::DiffVolume(*pool_, models_[i], Owned(i)), "");
    }
    for (int i = 0; i < kSharedVolumes; ++i) {
      std::vector<std::byte> got = testing_util::ReadAll(*pool_, Shared(i));
      EXPECT_TRUE(got == shared_[i]) << Shared(i) << " differs";
      PoolModel m(kChunk);
      m.volumes["v"].size_bytes = kVolumeBytes;
      m.Write("v", 0, shared_[i]);
      absl::StatusOr<Digest> d = pool_->RootDigest(Shared(i), "");
      ASSERT_TRUE(d.ok()) << d.status();
      EXPECT_EQ(*d, m.RootDigest(m.volumes["v"])) << Shared(i);
    }
    absl::StatusOr<Pool::CheckReport> report = pool_->Check(true);
    ASSERT_TRUE(report.ok()) << report.status();
    EXPECT_THAT(report->problems, ::testing::IsEmpty());
  }

  bool failed() const { return failed_.load(); }
  std::string first_failure() {
    std::lock_guard<std::mutex> lock(failure_mu_);
    return failure_;
  }

 private:
  void Fail(const std::string& what) {
    std::lock_guard<std::mutex> lock(failure_mu_);
    if (!failed_.exchange(true)) failure_ = what;
  }
  void Expect(const absl::Status& s, const std::string& what) {
    if (!s.ok()) Fail(absl::StrCat(what, ": ", s.ToString()));
  }

  void OwnerStep(int o, std::mt19937_64& rng, int step) {
    const std::string vol = Owned(o);
    PoolModel& model = models_[o];
    testing_util::VolumeModel& vm = model.volumes.at(vol);
    const uint64_t size = vm.size_bytes;
    const uint64_t off = rng() % size;
    const uint64_t len = std::min<uint64_t>(1 + rng() % (48 << 10), size - off);
    switch (rng() % 12) {
      case 0:
      case 1:
      case 2:
      case 3: {
        std::vector<std::byte> d = TestData(len, rng());
        Expect(pool_->Write(vol, off, d), "write " + vol);
        model.Write(vol, off, d);
        break;
      }
      case 4:
        Expect(pool_->Trim(vol, off, len), "trim " + vol);
        model.Trim(vol, off, len);
        break;
      case 5:
      case 6: {
        std::vector<std::byte> got(len);
        Expect(pool_->Read(vol, "", off, got), "read " + vol);
        if (got != model.Read(vm, off, len)) {
          Fail(absl::StrCat(vol, ": read at ", off, " length ", len,
                            " differs from the model"));
        }
        break;
      }
      case 7:
      case 8: {
        if (vm.snapshots.size() > 3) break;
        std::string name = absl::StrCat("s", step);
        absl::StatusOr<SnapshotInfo> info = pool_->CreateSnapshot(vol, name);
        Expect(info.status(), "snapshot " + vol);
        if (!info.ok()) break;
        model.Snapshot(vol, name);
        if (o == 0) {
          std::lock_guard<std::mutex> lock(published_.mu);
          published_.name = name;
          published_.bytes = model.Read(vm.snapshots.at(name), 0, size);
        }
        break;
      }
      case 9:
        // At most a few snapshots each, so the pool never fills up.
        if (vm.snapshots.size() > 2 || (!vm.snapshots.empty() && rng() % 2)) {
          auto it = vm.snapshots.begin();
          std::advance(it, rng() % vm.snapshots.size());
          Expect(pool_->DeleteSnapshot(vol, it->first), "delete " + vol);
          vm.snapshots.erase(it);
        }
        break;
      case 10:
        if (!vm.snapshots.empty()) {
          auto it = vm.snapshots.begin();
          std::advance(it, rng() % vm.snapshots.size());
          Expect(pool_->Rollback(vol, it->first), "rollback " + vol);
          model.Rollback(vol, it->first);
        }
        break;
      default:
        if (!vm.snapshots.empty()) {
          auto it = vm.snapshots.begin();
          std::advance(it, rng() % vm.snapshots.size());
          std::vector<std::byte> got(len);
          Expect(pool_->Read(vol, it->first, off, got), "read snapshot");
          if (got != model.Read(it->second, off, len)) {
            Fail(absl::StrCat(vol, "@", it->first, ": read at ", off,
                              " differs from the model"));
          }
        }
        break;
    }
  }

  // Striper k writes the stripes of parity k % 2 of shared volume k / 2.
  void StriperStep(int k, std::mt19937_64& rng, int) {
    const int v = k / 2;
    const std::string vol = Shared(v);
    const uint64_t stripe = 2 * (rng() % (kStripes / 2)) + (k % 2);
    const uint64_t base = stripe * kStripe;
    const uint64_t from = base + rng() % kStripe;
    const uint64_t len = 1 + rng() % (base + kStripe - from);
    std::vector<std::byte>& bytes = shared_[v];  // this striper's part only
    switch (rng() % 4) {
      case 0:
      case 1: {
        std::vector<std::byte> d = TestData(len, rng());
        Expect(pool_->Write(vol, from, d), "write " + vol);
        std::memcpy(bytes.data() + from, d.data(), len);
        break;
      }
      case 2:
        Expect(pool_->Trim(vol, from, len), "trim " + vol);
        std::memset(bytes.data() + from, 0, len);
        break;
      default: {
        std::vector<std::byte> got(kStripe);
        Expect(pool_->Read(vol, "", base, got), "read " + vol);
        if (std::memcmp(got.data(), bytes.data() + base, kStripe) != 0) {
          Fail(absl::StrCat(vol, ": stripe ", stripe, " differs"));
        }
        break;
      }
    }
  }

  void ReadSnapshots(const std::atomic<bool>& stop) {
    const std::string vol = Owned(0);
    std::vector<std::byte> got(kVolumeBytes);
    while (!stop.load()) {
      std::string name;
      std::vector<std::byte> want;
      {
        std::lock_guard<std::mutex> lock(published_.mu);
        name = published_.name;
        want = published_.bytes;
      }
      if (name.empty()) {
        std::this_thread::yield();
        continue;
      }
      got.resize(want.size());
      absl::Status s = pool_->Read(vol, name, 0, got);
      if (absl::IsNotFound(s)) continue;  // deleted (or rolled past) by now
      Expect(s, "read " + vol + "@" + name);
      if (s.ok() && got != want) {
        Fail(
            absl::StrCat(vol, "@", name, ": a read differs from the snapshot"));
      }
      ++snapshot_reads_;
    }
  }

  const uint64_t seed_;
  MemIo io_;
  std::unique_ptr<Pool> pool_;
  std::vector<PoolModel> models_;               // one per owner
  std::vector<std::vector<std::byte>> shared_;  // bytes of each shared
  Published published_;
  std::atomic<int> snapshot_reads_{0};
  std::atomic<bool> failed_{false};
  std::mutex failure_mu_;
  std::string failure_;
};

TEST(PoolConcurrencyTest, ManyThreadsMatchTheirModels) {
  for (uint64_t seed = 1; seed <= 2; ++seed) {
    SCOPED_TRACE(absl::StrCat("seed ", seed));
    ConcurrencyRun run(seed);
    run.Run(Rounds(), 60);
    EXPECT_FALSE(run.failed()) << run.first_failure();
  }
}

// A snapshot read while its volume is overwritten, trimmed and committed
// under it returns the snapshot's bytes, every time.
TEST(PoolConcurrencyTest, SnapshotReadsDuringWritesAndCommits) {
  MemIo io(32 << 20);
  std::unique_ptr<Pool> pool = testing_util::MakePool(io, kChunk);
  pool->SetTuning({.max_cached_nodes = 8, .auto_commit_dirty_nodes = 4});
  constexpr uint64_t kSize = 1 << 20;
  ASSERT_TRUE(pool->CreateVolume("v", kSize).ok());
  std::vector<std::byte> base = TestData(kSize, 7);
  ASSERT_TRUE(pool->Write("v", 0, base).ok());
  ASSERT_TRUE(pool->CreateSnapshot("v", "base").ok());

  std::atomic<bool> stop{false};
  std::atomic<int> bad{0}, reads{0};
  std::vector<std::thread> readers;
  for (int r = 0; r < 3; ++r) {
    readers.emplace_back([&, r] {
      std::mt19937_64 rng(r);
      std::vector<std::byte> got;
      while (!stop.load()) {
        uint64_t off = rng() % kSize;
        uint64_t len = 1 + rng() % std::min<uint64_t>(kSize - off, 200 << 10);
        got.resize(len);
        absl::Status s = pool->Read("v", "base", off, got);
        if (!s.ok() || std::memcmp(got.data(), base.data() + off, len) != 0) {
          ++bad;
        }
        ++reads;
      }
    });
  }
  std::mt19937_64 rng(99);
  for (int i = 0; i < 200; ++i) {
    uint64_t off = rng() % kSize;
    uint64_t len = 1 + rng() % std::min<uint64_t>(kSize - off, 64 << 10);
    if (i % 5 == 4) {
      ASSERT_TRUE(pool->Trim("v", off, len).ok());
    } else {
      ASSERT_TRUE(pool->Write("v", off, TestData(len, i)).ok());
    }
    if (i % 7 == 0) {
      ASSERT_TRUE(pool->Flush().ok());
    }
  }
  stop = true;
  for (std::thread& t : readers) t.join();
  EXPECT_EQ(bad.load(), 0);
  EXPECT_GT(reads.load(), 0);
  EXPECT_EQ(testing_util::ReadAll(*pool, "v", "base"), base);
  EXPECT_THAT(pool->Check(true)->problems, ::testing::IsEmpty());
}

// Writes to the same chunk from many threads are applied one at a time:
// each thread writes its own bytes of every chunk (a read-modify-write),
// and all of them are there at the end.
TEST(PoolConcurrencyTest, OverlappingPartialWritesAreOrdered) {
  MemIo io(16 << 20);
  std::unique_ptr<Pool> pool = testing_util::MakePool(io, kChunk);
  constexpr int kThreads = 8;
  constexpr uint64_t kChunks = 16;
  ASSERT_TRUE(pool->CreateVolume("v", kChunks * kChunk).ok());
  std::vector<std::thread> threads;
  std::atomic<int> errors{0};
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      constexpr uint64_t kPart = kChunk / kThreads;
      for (int pass = 0; pass < 20; ++pass) {
        for (uint64_t c = 0; c < kChunks; ++c) {
          std::vector<std::byte> d(kPart, std::byte(t * 16 + pass % 16 + 1));
          if (!pool->Write("v", c * kChunk + t * kPart, d).ok()) ++errors;
        }
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(errors.load(), 0);
  std::vector<std::byte> got = testing_util::ReadAll(*pool, "v");
  for (uint64_t c = 0; c < kChunks; ++c) {
    for (int t = 0; t < kThreads; ++t) {
      uint64_t at = c * kChunk + t * (kChunk / kThreads);
      EXPECT_EQ(got[at], std::byte(t * 16 + 19 % 16 + 1))
          << "chunk " << c << " part " << t;
    }
  }
  ASSERT_TRUE(pool->Flush().ok());
  EXPECT_THAT(pool->Check(true)->problems, ::testing::IsEmpty());
}

// A call that waits for another caller's group to end holds nothing the
// group's own calls need: the group goes on, commits, and the call follows.
TEST(PoolConcurrencyTest, AGroupIsNotBlockedByACallWaitingForIt) {
  MemIo io(16 << 20);
  std::unique_ptr<Pool> pool = testing_util::MakePool(io, kChunk);
  ASSERT_TRUE(pool->CreateVolume("x", 1 << 20).ok());
  ASSERT_TRUE(pool->CreateVolume("y", 1 << 20).ok());
  Pool::Group group = pool->BeginGroup();
  ASSERT_TRUE(pool->SetProperty("k", "1", &group).ok());
  absl::Status deleted;
  std::thread other([&] { deleted = pool->DeleteVolume("y", false); });
  // The delete is applied before its commit waits for the group.
  while (pool->GetVolume("y").ok()) std::this_thread::yield();
  EXPECT_TRUE(absl::IsNotFound(pool->SetVolumeReadOnly("y", true, &group)));
  EXPECT_TRUE(pool->SetVolumeReadOnly("x", true, &group).ok());
  const uint64_t before = pool->Info().generation;
  EXPECT_TRUE(group.Commit().ok());
  other.join();
  EXPECT_TRUE(deleted.ok()) << deleted;
  EXPECT_GT(pool->Info().generation, before);
  EXPECT_TRUE(pool->GetVolume("x")->read_only);
  EXPECT_EQ(pool->Properties().at("k"), "1");
}

// Holds the reads of one thread (the scrub's) until opened.
class GateIo : public IoWrapper {
 public:
  using IoWrapper::IoWrapper;
  void Hold(std::thread::id who) {
    std::lock_guard<std::mutex> lock(mu_);
    held_ = who;
  }
  void WaitUntilHolding() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return waiting_; });
  }
  void Open() {
    std::lock_guard<std::mutex> lock(mu_);
    open_ = true;
    cv_.notify_all();
  }
  absl::Status Read(std::span<const ReadOp> ops) override {
    {
      std::unique_lock<std::mutex> lock(mu_);
      if (std::this_thread::get_id() == held_ && !open_) {
        waiting_ = true;
        cv_.notify_all();
        cv_.wait(lock, [&] { return open_; });
      }
    }
    return IoWrapper::Read(ops);
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::thread::id held_;
  bool waiting_ = false;
  bool open_ = false;
};

// The scrub reads the pool without its lock: while it is stopped in the
// middle of a read, writes, reads, snapshots and commits go on.
TEST(PoolConcurrencyTest, TheScrubDoesNotStopOtherCalls) {
  MemIo mem(32 << 20);
  GateIo io(mem);
  ASSERT_NE(testing_util::MakePool(mem, kChunk), nullptr);
  absl::StatusOr<std::unique_ptr<Pool>> opened =
      Pool::Open(io, OpenMode::kReadWrite);
  ASSERT_TRUE(opened.ok()) << opened.status();
  Pool& p = **opened;
  ASSERT_TRUE(p.CreateVolume("v", 1 << 20).ok());
  ASSERT_TRUE(p.Write("v", 0, TestData(1 << 20, 3)).ok());
  ASSERT_TRUE(p.Flush().ok());

  absl::StatusOr<Pool::CheckReport> report;
  std::thread scrub([&] {
    io.Hold(std::this_thread::get_id());
    report = p.Check(true);
  });
  io.WaitUntilHolding();
  std::vector<std::byte> d = TestData(100 << 10, 4);
  EXPECT_TRUE(p.Write("v", 5000, d).ok());
  std::vector<std::byte> got(d.size());
  EXPECT_TRUE(p.Read("v", "", 5000, got).ok());
  EXPECT_EQ(got, d);
  EXPECT_TRUE(p.CreateSnapshot("v", "during").ok());
  EXPECT_TRUE(p.Flush().ok());
  io.Open();
  scrub.join();
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_THAT(report->problems, ::testing::IsEmpty());
  EXPECT_GT(report->chunks_checked, 0u);
  // And the state after: consistent too.
  EXPECT_THAT(p.Check(true)->problems, ::testing::IsEmpty());
}

// A read-only pool loads its reference counts only when the check asks:
// a read in flight meanwhile (its data read stopped) ends normally after.
TEST(PoolConcurrencyTest, ReadOnlyCountsLoadWhileAReadIsInFlight) {
  MemIo mem(32 << 20);
  {
    std::unique_ptr<Pool> pool = testing_util::MakePool(mem, kChunk);
    ASSERT_TRUE(pool->CreateVolume("v", 1 << 20).ok());
    ASSERT_TRUE(pool->Write("v", 0, TestData(1 << 20, 7)).ok());
    ASSERT_TRUE(pool->Flush().ok());
  }
  GateIo io(mem);
  absl::StatusOr<std::unique_ptr<Pool>> opened =
      Pool::Open(io, OpenMode::kReadOnly);
  ASSERT_TRUE(opened.ok()) << opened.status();
  Pool& p = **opened;
  std::vector<std::byte> got(1 << 20);
  ASSERT_TRUE(p.Read("v", "", 0, got).ok());  // the tree is cached now
  absl::Status read;
  std::vector<std::byte> again(1 << 20);
  std::thread reader([&] {
    io.Hold(std::this_thread::get_id());
    read = p.Read("v", "", 0, again);  // stops in its data read
  });
  io.WaitUntilHolding();
  absl::StatusOr<Pool::CheckReport> report = p.Check(false);
  io.Open();
  reader.join();
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_THAT(report->problems, ::testing::IsEmpty());
  ASSERT_TRUE(read.ok()) << read;
  EXPECT_EQ(again, TestData(1 << 20, 7));
  EXPECT_EQ(p.Info().used_bytes, uint64_t{1} << 20);
  EXPECT_EQ(p.stats().reads_in_flight, 0u);  // the reader's ticket ended
}

// Deleting a snapshot reads the nodes only it holds outside the lock: while
// those reads are stopped, another volume is written and read.
TEST(PoolConcurrencyTest, DeletingASnapshotReadsItsNodesOutsideTheLock) {
  MemIo mem(64 << 20);
  {
    std::unique_ptr<Pool> pool = testing_util::MakePool(mem, kChunk);
    ASSERT_TRUE(pool->CreateVolume("v", 8 << 20).ok());
    ASSERT_TRUE(pool->CreateVolume("w", 1 << 20).ok());
    ASSERT_TRUE(pool->Write("v", 0, TestData(8 << 20, 5)).ok());
    ASSERT_TRUE(pool->CreateSnapshot("v", "s").ok());
    ASSERT_TRUE(pool->Write("v", 0, TestData(8 << 20, 6)).ok());  // all new
    ASSERT_TRUE(pool->Flush().ok());
  }
  GateIo io(mem);
  absl::StatusOr<std::unique_ptr<Pool>> opened =
      Pool::Open(io, OpenMode::kReadWrite);  // a cold cache
  ASSERT_TRUE(opened.ok()) << opened.status();
  Pool& p = **opened;
  const uint64_t loaded_before = p.stats().nodes_loaded;
  absl::Status deleted;
  std::thread deleter([&] {
    io.Hold(std::this_thread::get_id());
    deleted = p.DeleteSnapshot("v", "s");
  });
  io.WaitUntilHolding();
  std::vector<std::byte> d = TestData(200 << 10, 7);
  EXPECT_TRUE(p.Write("w", 0, d).ok());
  std::vector<std::byte> got(d.size());
  EXPECT_TRUE(p.Read("w", "", 0, got).ok());
  EXPECT_EQ(got, d);
  io.Open();
  deleter.join();
  EXPECT_TRUE(deleted.ok()) << deleted;
  EXPECT_GT(p.stats().nodes_loaded, loaded_before + 10);
  ASSERT_TRUE(p.Flush().ok());
  EXPECT_THAT(p.Check(true)->problems, ::testing::IsEmpty());
  EXPECT_EQ(testing_util::ReadAll(p, "v"), TestData(8 << 20, 6));
}

}  // namespace
}  // namespace blockstore
