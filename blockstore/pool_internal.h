// Helpers shared by the pool's translation units; not part of its API.
#ifndef TANDEM_BLOCKSTORE_POOL_INTERNAL_H_
#define TANDEM_BLOCKSTORE_POOL_INTERNAL_H_

#include <cstdint>
#include <limits>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "blockstore/format.h"
#include "blockstore/pool.h"

namespace blockstore::internal {

inline constexpr uint64_t kMaxVolumeBytes = uint64_t{1} << 60;

int64_t NowNs();
Guid RandomGuid();  // RFC 4122 version 4
// InvalidArgument naming `what` unless `name` is 1-200 of [A-Za-z0-9._:-],
// not starting with '.' or '-'.
absl::Status ValidName(absl::string_view name, absl::string_view what);
// A receive's staging volume (hidden: its name starts with '.').
inline bool IsStaging(absl::string_view volume) {
  return !volume.empty() && volume[0] == '.';
}

// The last chunk of a WriteGuard over a whole volume.
inline constexpr uint64_t kWholeVolume = std::numeric_limits<uint64_t>::max();

}  // namespace blockstore::internal

namespace blockstore {

// A read ticket (SpaceMap::BeginRead) for the scope of one operation: what
// it resolved under the lock is not reused before it ends.
class Pool::ReadTicket {
 public:
  explicit ReadTicket(Pool& pool) ABSL_EXCLUSIVE_LOCKS_REQUIRED(pool.mu_)
      : pool_(pool), ticket_(pool.space_.BeginRead()) {}
  // Runs where it was made, with the lock held (the analysis cannot name
  // the pool's mutex through the member).
  ~ReadTicket() ABSL_NO_THREAD_SAFETY_ANALYSIS {
    // Space it held back may be what a full pool waits for (EnsureSpace).
    if (pool_.space_.EndRead(ticket_)) pool_.cv_.notify_all();
  }
  ReadTicket(const ReadTicket&) = delete;
  ReadTicket& operator=(const ReadTicket&) = delete;

 private:
  Pool& pool_;
  const uint64_t ticket_;
};

// Owns chunks [first, last] of a volume for one write (or the whole volume
// for a call that replaces or resizes its tree): waits, dropping the lock,
// until no write in flight overlaps them, then registers; overlapping
// writes are thereby applied one at a time, in the order they arrived.
class Pool::WriteGuard {
 public:
  WriteGuard(Pool& pool, absl::string_view volume, uint64_t first,
             uint64_t last) ABSL_EXCLUSIVE_LOCKS_REQUIRED(pool.mu_)
      : pool_(pool) {
    auto overlaps = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(pool.mu_) {
      for (const InFlightWrite& w : pool.writes_) {
        if (w.volume == volume && w.first <= last && first <= w.last) {
          return true;
        }
      }
      return false;
    };
    while (overlaps()) pool.cv_.wait(pool.mu_);
    pool.writes_.push_back({std::string(volume), first, last});
    write_ = {std::string(volume), first, last};
  }
  // As ~ReadTicket: with the lock held.
  ~WriteGuard() ABSL_NO_THREAD_SAFETY_ANALYSIS { Release(); }
  // Gives the chunks up before the scope ends: before a commit, which may
  // wait for another caller's group, whose calls may need these chunks.
  void Release() ABSL_NO_THREAD_SAFETY_ANALYSIS {
    if (released_) return;
    released_ = true;
    auto& writes = pool_.writes_;
    for (auto it = writes.begin(); it != writes.end(); ++it) {
      if (it->volume == write_.volume && it->first == write_.first &&
          it->last == write_.last) {
        writes.erase(it);
        break;
      }
    }
    pool_.cv_.notify_all();
  }
  WriteGuard(const WriteGuard&) = delete;
  WriteGuard& operator=(const WriteGuard&) = delete;

 private:
  Pool& pool_;
  InFlightWrite write_;
  bool released_ = false;
};

}  // namespace blockstore

#endif  // TANDEM_BLOCKSTORE_POOL_INTERNAL_H_
