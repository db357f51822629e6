// Two in-memory pools ("a" and "b") behind one SiteProvider, for
// relationship tests: a power loss takes both down at the same durable-write
// count (one process holding both pools), and either can be "unreachable".
#ifndef TANDEM_TESTS_TESTING_TWO_POOLS_H_
#define TANDEM_TESTS_TESTING_TWO_POOLS_H_

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "blockstore/mem_io.h"
#include "blockstore/pool.h"
#include "engine/local_site.h"
#include "engine/relationship.h"
#include "gtest/gtest.h"

namespace testing_util {

// Counts durable-write points (write ops and flushes) across every device
// that shares it; from point `crash_at` on, all of them are unplugged.
struct CrashPlan {
  uint64_t points = 0;
  uint64_t crash_at = UINT64_MAX;
  bool crashed() const { return points > crash_at; }
};

class PlannedCrashIo : public blockstore::IoWrapper {
 public:
  PlannedCrashIo(blockstore::Io& target, CrashPlan& plan)
      : IoWrapper(target), plan_(plan) {}
  absl::Status Write(std::span<const blockstore::WriteOp> ops) override {
    std::lock_guard<std::mutex> lock(mu_);
    for (const blockstore::WriteOp& op : ops) {
      if (plan_.crashed()) return Unplugged();
      if (absl::Status s = target().Write({&op, 1}); !s.ok()) return s;
      if (plan_.points++ == plan_.crash_at) return Unplugged();
    }
    return absl::OkStatus();
  }
  absl::Status Flush() override {
    std::lock_guard<std::mutex> lock(mu_);
    if (plan_.crashed()) return Unplugged();
    if (plan_.points++ == plan_.crash_at) return Unplugged();
    return target().Flush();
  }
  absl::Status Read(std::span<const blockstore::ReadOp> ops) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (plan_.crashed()) return Unplugged();
    }
    return target().Read(ops);
  }

 private:
  static absl::Status Unplugged() {
    return absl::UnavailableError("injected power loss");
  }
  // One lock for every device: the plan's count is shared (the engine
  // commits to both pools at once).
  static inline std::mutex mu_;
  CrashPlan& plan_;
};

class TwoPools : public engine::SiteProvider {
 public:
  static constexpr uint64_t kDevice = 32 << 20;

  explicit TwoPools(uint32_t chunk = 4096) {
    for (const char* name : {"a", "b"}) {
      raw_[name] = std::make_unique<blockstore::MemIo>(kDevice);
      auto p =
          blockstore::Pool::Create(*raw_[name], {.chunk_size_bytes = chunk});
      EXPECT_TRUE(p.ok()) << p.status();
    }
    OpenAll();
  }

  // A copy of `other`'s devices as they are now (pending writes included).
  explicit TwoPools(const TwoPools& other, bool) {
    for (const auto& [name, io] : other.raw_) raw_[name] = io->Clone();
    OpenAll();
  }

  absl::StatusOr<engine::Site*> Get(const engine::Endpoint& e) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (down_.contains(e.pool)) {
      return absl::UnavailableError(
          absl::StrCat("pool ", e.pool, " cannot be opened (site down)"));
    }
    auto it = sites_.find(e.pool);
    if (it == sites_.end()) {
      return absl::NotFoundError(absl::StrCat(e.pool, ": no such pool"));
    }
    return it->second.get();
  }
  engine::LocalSite& site(const std::string& name) { return *sites_.at(name); }

  blockstore::Pool& pool(const std::string& name) { return *pools_.at(name); }
  void SetDown(const std::string& name, bool down) {
    std::lock_guard<std::mutex> lock(mu_);
    if (down) {
      down_.insert(name);
    } else {
      down_.erase(name);
    }
  }

  // From now on every durable write counts toward `plan`.
  void Arm(CrashPlan& plan) {
    sites_.clear();
    pools_.clear();
    wrappers_.clear();
    for (auto& [name, io] : raw_) {
      wrappers_[name] = std::make_unique<PlannedCrashIo>(*io, plan);
    }
    OpenAll();
  }

  // Power loss on both devices, then both pools opened again.
  void CrashAndReopen() {
    sites_.clear();
    pools_.clear();
    wrappers_.clear();
    for (auto& [name, io] : raw_) io->Crash();
    OpenAll();
  }

 private:
  void OpenAll() {
    for (auto& [name, io] : raw_) {
      blockstore::Io& dev = wrappers_.contains(name)
                                ? static_cast<blockstore::Io&>(*wrappers_[name])
                                : *io;
      auto p = blockstore::Pool::Open(dev, blockstore::OpenMode::kReadWrite);
      EXPECT_TRUE(p.ok()) << p.status();
      if (!p.ok()) continue;
      pools_[name] = std::move(*p);
      sites_[name] = std::make_unique<engine::LocalSite>(name, *pools_[name]);
    }
  }

  std::mutex mu_;
  std::set<std::string> down_;
  std::map<std::string, std::unique_ptr<blockstore::MemIo>> raw_;
  std::map<std::string, std::unique_ptr<PlannedCrashIo>> wrappers_;
  std::map<std::string, std::unique_ptr<blockstore::Pool>> pools_;
  std::map<std::string, std::unique_ptr<engine::LocalSite>> sites_;
};

}  // namespace testing_util

#endif  // TANDEM_TESTS_TESTING_TWO_POOLS_H_
