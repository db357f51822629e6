// Moving a relationship's data between two Sites: a chain of deltas
// (baseline, update, resync), or a hash-diff when the two share no snapshot.
// Each delta streams from the sender to the receiver through a bounded
// in-process pipe (sender on its own thread), so reading, compressing,
// carrying and applying overlap; a transfer cut by a lost connection goes
// on from the receiver's last resume point.
#ifndef TANDEM_ENGINE_TRANSFER_H_
#define TANDEM_ENGINE_TRANSFER_H_

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "blockstore/mutex.h"
#include "blockstore/pool.h"
#include "engine/record.h"
#include "engine/site.h"
#include "engine/stream.h"

namespace engine {

// A token bucket: Take(n) returns once n more bytes fit in `rate` bytes a
// second, with at most 1/20 s of burst, so that over any window of T
// seconds at most rate * (T + 0.05) bytes pass. Thread-safe.
class RateLimiter {
 public:
  using Clock = std::chrono::steady_clock;
  explicit RateLimiter(uint64_t bytes_per_second);
  void Take(uint64_t bytes);
  uint64_t rate() const { return rate_; }

 private:
  const uint64_t rate_;
  const double burst_;
  blockstore::Mutex mu_;
  double tokens_ ABSL_GUARDED_BY(mu_);
  Clock::time_point last_ ABSL_GUARDED_BY(mu_);
};

// Writes through to `out`, each piece at most 64 KiB and let through by
// `limiter` first; `limiter` null: no limit. Counts what passed. Once
// `*cancel` is set (if given), writes fail (Unavailable).
class MeteredSink final : public ByteSink {
 public:
  MeteredSink(ByteSink& out, RateLimiter* limiter,
              const std::atomic<bool>* cancel = nullptr)
      : out_(out), limiter_(limiter), cancel_(cancel) {}
  absl::Status Write(std::span<const std::byte> data) override;
  uint64_t bytes() const { return bytes_.load(); }

 private:
  ByteSink& out_;
  RateLimiter* const limiter_;
  const std::atomic<bool>* const cancel_;
  std::atomic<uint64_t> bytes_{0};
};

// What a transfer needs to know about the relationship it moves data for.
struct TransferContext {
  std::string relationship_id;  // owner of its replication snapshots
  // Claims the transfer runs under: progress goes to each, and each is
  // renewed before a retry.
  std::vector<Claim*> claims;
  // Called with (data bytes done, total) as the transfer goes, one call at
  // a time (from whichever thread moves the data).
  std::function<void(uint64_t, uint64_t)> progress;
  blockstore::Mutex progress_mu;
  uint64_t progress_done ABSL_GUARDED_BY(progress_mu) = 0;
  uint64_t progress_total ABSL_GUARDED_BY(progress_mu) = 0;
  // How long to keep retrying a lost connection without progress; zero:
  // no retries.
  absl::Duration retry_window = absl::ZeroDuration();
  RateLimiter* limiter = nullptr;
  // Set: stop now (the process is stopping); no retries.
  const std::atomic<bool>* cancel = nullptr;
  // What the receiver's refusal of a moved base tells the user to do.
  std::string rollback_advice;
};

// Ships chain[0]..chain[1], chain[1]..chain[2], ... (chain[0] with an empty
// name: a full delta of chain[1]), one delta each, so the receiver gets
// every snapshot (with its owner where it is the relationship's). With
// `rollback_first` the first delta rolls the receiver back to its base.
absl::StatusOr<TransferStats> TransferChain(
    TransferContext& ctx, Site& from, const std::string& from_volume, Site& to,
    const std::string& to_volume,
    const std::vector<blockstore::SnapshotInfo>& chain, bool rollback_first);

// No common snapshot, but the receiver has data: compares SHA-256 of every
// chunk of `from_volume@snapshot` and `to_volume@to_base`, then sends only
// the chunks that differ as a delta onto `to_base` (atomic, digest checked
// as any delta). Stream bytes include the digests that crossed.
absl::StatusOr<TransferStats> HashDiffTransfer(TransferContext& ctx, Site& from,
                                               const std::string& from_volume,
                                               const std::string& snapshot,
                                               Site& to,
                                               const std::string& to_volume,
                                               const std::string& to_base);

// Chunks whose SHA-256 differs between the first `chunks` chunks of
// `a_volume@a_snapshot` and `b_volume@b_snapshot` (empty: live).
absl::StatusOr<std::vector<uint64_t>> DifferingChunks(
    Site& a, const std::string& a_volume, const std::string& a_snapshot,
    Site& b, const std::string& b_volume, const std::string& b_snapshot,
    uint64_t chunks);

}  // namespace engine

#endif  // TANDEM_ENGINE_TRANSFER_H_
