// Model-based randomized test: thousands of random operations on a pool,
// each checked against testing_util::PoolModel. Every failure names its seed;
// rerun one seed with TANDEM_MODEL_SEED=<seed>. TANDEM_MODEL_SEEDS and
// TANDEM_MODEL_STEPS scale the run (the soak label runs more).
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>

#include "absl/strings/str_cat.h"
#include "blockstore/mem_io.h"
#include "blockstore/pool.h"
#include "blockstore/util.h"
#include "gtest/gtest.h"
#include "tests/testing/model.h"

namespace blockstore {
namespace {

using testing_util::DiffPool;
using testing_util::PoolModel;
using testing_util::TestData;

constexpr uint32_t kChunk = 4096;

uint64_t EnvOr(const char* name, uint64_t fallback) {
  const char* v = std::getenv(name);
  return v != nullptr ? std::strtoull(v, nullptr, 10) : fallback;
}

class ModelRun {
 public:
  explicit ModelRun(uint64_t seed)
      : seed_(seed),
        rng_(seed),
        io_(96 << 20),
        model_(kChunk),
        committed_(kChunk) {}

  // Returns "" or what went wrong, with the step.
  std::string Run(int steps) {
    absl::StatusOr<std::unique_ptr<Pool>> p =
        Pool::Create(io_, {.chunk_size_bytes = kChunk});
    if (!p.ok()) return std::string(p.status().message());
    pool_ = std::move(*p);
    Tune();
    generation_ = pool_->Info().generation;
    for (step_ = 0; step_ < steps; ++step_) {
      std::string err = Step();
      if (err.empty()) err = Track();
      if (err.empty() && step_ % 25 == 24) err = FullCheck();
      if (!err.empty()) {
        return absl::StrCat("seed ", seed_, " step ", step_, " (", last_op_,
                            "): ", err);
      }
    }
    std::string err = FullCheck();
    return err.empty() ? "" : absl::StrCat("seed ", seed_, " at end: ", err);
  }

 private:
  uint64_t Rand(uint64_t n) { return n == 0 ? 0 : rng_() % n; }

  std::string PickVolume() {
    if (model_.volumes.empty()) return "";
    auto it = model_.volumes.begin();
    std::advance(it, Rand(model_.volumes.size()));
    return it->first;
  }

  uint64_t RandomSize() {
    switch (Rand(4)) {
      case 0:
        return 1 + Rand(3 * kChunk);  // one leaf
      case 1:
        return (1 + Rand(300)) * kChunk - Rand(2) * Rand(kChunk);
      case 2:
        return (126 * 126 + 1 + Rand(2000)) * kChunk;  // depth 3
      default:
        return (1 + Rand(126)) * kChunk;
    }
  }

  // Check an op's result against expectation: an op the model allows must
  // succeed; a refused one must leave things unchanged (checked later).
  std::string Expect(absl::Status s, bool should_succeed) {
    if (s.ok() != should_succeed) {
      return absl::StrCat(
          should_succeed ? "failed: " : "succeeded, expected failure",
          s.message());
    }
    return "";
  }

  std::string Step() {
    uint64_t r = Rand(100);
    std::string v = PickVolume();
    if (v.empty() || (r < 4 && model_.volumes.size() < 4)) {
      std::string name = absl::StrCat("vol", next_name_++);
      uint64_t size = RandomSize();
      last_op_ = absl::StrCat("create ", name, " size ", size);
      if (std::string e = Expect(pool_->CreateVolume(name, size), true);
          !e.empty()) {
        return e;
      }
      model_.volumes[name].size_bytes = size;
      return "";
    }
    testing_util::VolumeModel& vm = model_.volumes.at(v);
    uint64_t size = vm.size_bytes;
    if (r < 45) {
      uint64_t off = Rand(size);
      if (Rand(3) == 0) off = off / kChunk * kChunk;
      uint64_t max_len = Rand(10) == 0 ? 40 * kChunk : 3 * kChunk;
      uint64_t len = std::min<uint64_t>(1 + Rand(max_len), size - off);
      std::vector<std::byte> data = TestData(len, rng_());
      last_op_ = absl::StrCat("write ", v, " at ", off, " len ", len);
      // Half the writes come from a buffer aligned like the volume offset,
      // so whole chunks take the zero-copy path.
      std::span<const std::byte> src = data;
      AlignedBuffer aligned(len + kIoAlign);
      if (Rand(2) == 0) {
        std::byte* p = aligned.data() + off % kIoAlign;
        std::memcpy(p, data.data(), len);
        src = {p, len};
      }
      if (std::string e = Expect(pool_->Write(v, off, src), true); !e.empty()) {
        return e;
      }
      model_.Write(v, off, data);
      return Verify(v, off, len);
    }
    if (r < 53) {
      uint64_t off = Rand(size);
      uint64_t len = Rand(2) ? std::min<uint64_t>(Rand(20 * kChunk), size - off)
                             : size - off;
      last_op_ = absl::StrCat("trim ", v, " at ", off, " len ", len);
      if (std::string e = Expect(pool_->Trim(v, off, len), true); !e.empty()) {
        return e;
      }
      model_.Trim(v, off, len);
      return Verify(v, off, len);
    }
    if (r < 61) {
      std::string name = absl::StrCat("s", next_name_++);
      last_op_ = absl::StrCat("snapshot ", v, "@", name);
      absl::StatusOr<SnapshotInfo> s = pool_->CreateSnapshot(v, name);
      if (!s.ok()) return std::string(s.status().message());
      model_.Snapshot(v, name);
      if (s->root_digest != model_.RootDigest(vm))
        return "snapshot digest differs";
      return "";
    }
    if (r < 67 && !vm.snapshots.empty()) {
      auto it = vm.snapshots.begin();
      std::advance(it, Rand(vm.snapshots.size()));
      std::string name = it->first;
      last_op_ = absl::StrCat("delete snapshot ", v, "@", name);
      if (std::string e = Expect(pool_->DeleteSnapshot(v, name), true);
          !e.empty()) {
        return e;
      }
      vm.snapshots.erase(name);
      return "";
    }
    if (r < 71 && !vm.snapshots.empty()) {
      auto it = vm.snapshots.begin();
      std::advance(it, Rand(vm.snapshots.size()));
      last_op_ = absl::StrCat("rollback ", v, "@", it->first);
      if (std::string e = Expect(pool_->Rollback(v, it->first), true);
          !e.empty()) {
        return e;
      }
      model_.Rollback(v, it->first);
      return Verify(v, 0, 0);
    }
    if (r < 77) {
      uint64_t new_size =
          Rand(2) ? RandomSize() : std::max<uint64_t>(1, size / 2);
      last_op_ = absl::StrCat("resize ", v, " from ", size, " to ", new_size);
      if (std::string e = Expect(pool_->ResizeVolume(v, new_size), true);
          !e.empty()) {
        return e;
      }
      model_.Resize(v, new_size);
      return Verify(v, 0, 0);
    }
    if (r < 79) {
      bool recursive = Rand(2) == 0;
      last_op_ = absl::StrCat("delete volume ", v, recursive ? " -r" : "");
      bool ok = recursive || vm.snapshots.empty();
      if (std::string e = Expect(pool_->DeleteVolume(v, recursive), ok);
          !e.empty()) {
        return e;
      }
      if (ok) model_.volumes.erase(v);
      return "";
    }
    if (r < 88) {
      last_op_ = "flush";
      return Expect(pool_->Flush(), true);
    }
    if (r < 93) {
      last_op_ = "flush and reopen";
      if (std::string e = Expect(pool_->Flush(), true); !e.empty()) return e;
      return Reopen();
    }
    // Power loss: everything since the last commit is gone.
    last_op_ = "crash";
    pool_.reset();
    io_.Crash();
    model_ = committed_;
    return Reopen();
  }

  std::string Reopen() {
    pool_.reset();
    absl::StatusOr<std::unique_ptr<Pool>> p =
        Pool::Open(io_, OpenMode::kReadWrite);
    if (!p.ok()) return absl::StrCat("reopen: ", p.status().message());
    pool_ = std::move(*p);
    Tune();
    return DiffPool(*pool_, model_);
  }

  // Every third seed runs with a 3-node cache and a commit every 5 dirty
  // nodes, so eviction and automatic commits happen all the time.
  void Tune() {
    if (seed_ % 3 == 0) {
      pool_->SetTuning({.max_cached_nodes = 3, .auto_commit_dirty_nodes = 5});
    }
  }

  // After each op: whenever the pool committed, that is the model to return
  // to after a crash. (A commit can fall inside an op, when it ran short of
  // space or past the dirty-node limit; flush so the whole op is in it.)
  std::string Track() {
    uint64_t g = pool_->Info().generation;
    if (g != generation_) {
      if (absl::Status s = pool_->Flush(); !s.ok()) {
        return std::string(s.message());
      }
      generation_ = pool_->Info().generation;
      committed_ = model_;
    }
    return "";
  }

  // Reads back the touched range of the live volume and compares digests.
  std::string Verify(const std::string& v, uint64_t off, uint64_t len) {
    const testing_util::VolumeModel& vm = model_.volumes.at(v);
    uint64_t from = off >= kChunk ? off - kChunk : 0;
    uint64_t to = std::min(vm.size_bytes, off + len + kChunk);
    // Read into a buffer aligned like the volume offset (zero-copy path).
    AlignedBuffer aligned(to - from + kIoAlign);
    std::span<std::byte> got(aligned.data() + from % kIoAlign, to - from);
    if (absl::Status s = pool_->Read(v, "", from, got); !s.ok()) {
      return std::string(s.message());
    }
    std::vector<std::byte> want = model_.Read(vm, from, to - from);
    if (std::memcmp(got.data(), want.data(), want.size()) != 0) {
      return absl::StrCat("bytes [", from, ", ", to, ") differ from the model");
    }
    absl::StatusOr<Digest> d = pool_->RootDigest(v, "");
    if (!d.ok()) return std::string(d.status().message());
    if (*d != model_.RootDigest(vm))
      return "live root digest differs from the model";
    return "";
  }

  std::string FullCheck() {
    if (absl::Status s = pool_->Flush(); !s.ok())
      return std::string(s.message());
    Track();
    if (std::string d = DiffPool(*pool_, model_); !d.empty()) return d;
    absl::StatusOr<Pool::CheckReport> r = pool_->Check(true);
    if (!r.ok()) return std::string(r.status().message());
    if (!r->problems.empty()) return absl::StrCat("check: ", r->problems[0]);
    return "";
  }

  const uint64_t seed_;
  std::mt19937_64 rng_;
  MemIo io_;
  PoolModel model_;
  PoolModel committed_;
  std::unique_ptr<Pool> pool_;
  uint64_t generation_ = 0;
  int step_ = 0;
  int next_name_ = 0;
  std::string last_op_;
};

TEST(PoolModelTest, RandomOperationsMatchTheModel) {
  uint64_t only = EnvOr("TANDEM_MODEL_SEED", 0);
  uint64_t seeds = EnvOr("TANDEM_MODEL_SEEDS", 12);
  int steps = static_cast<int>(EnvOr("TANDEM_MODEL_STEPS", 400));
  for (uint64_t seed = only != 0 ? only : 1; seed <= (only != 0 ? only : seeds);
       ++seed) {
    ModelRun run(seed);
    std::string err = run.Run(steps);
    ASSERT_EQ(err, "") << "reproduce with TANDEM_MODEL_SEED=" << seed;
  }
}

}  // namespace
}  // namespace blockstore
