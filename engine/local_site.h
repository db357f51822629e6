// A Site over a pool this process holds.
#ifndef TANDEM_ENGINE_LOCAL_SITE_H_
#define TANDEM_ENGINE_LOCAL_SITE_H_

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "blockstore/mutex.h"
#include "blockstore/pool.h"
#include "engine/site.h"

namespace engine {

struct LocalSiteOptions {
  // A receive commits a resume point at least this often (stream bytes);
  // 0: never (a cut receive starts over).
  uint64_t checkpoint_bytes = 0;
};

// The property a relationship record of `volume` is kept in.
std::string RecordKey(absl::string_view volume);

// Thread-safe; `pool` must outlive it. Claims live in this object: every
// Replication of the process that reaches the pool through it sees them.
class LocalSite final : public Site {
 public:
  LocalSite(std::string name, blockstore::Pool& pool,
            LocalSiteOptions options = {});
  ~LocalSite() override;

  blockstore::Pool& pool() { return pool_; }

  const std::string& name() const override { return name_; }
  absl::StatusOr<SiteInfo> Info() override;
  absl::StatusOr<blockstore::VolumeInfo> GetVolume(
      const std::string& volume) override;
  absl::StatusOr<std::vector<blockstore::SnapshotInfo>> ListSnapshots(
      const std::string& volume) override;
  absl::StatusOr<blockstore::SnapshotInfo> CreateSnapshot(
      const std::string& volume, const std::string& name,
      const std::string& owner) override;
  absl::Status DeleteSnapshots(const std::string& volume,
                               const std::vector<std::string>& names) override;
  absl::Status SetReadOnly(const std::string& volume, bool read_only) override;
  absl::StatusOr<bool> ChangedSince(const std::string& volume,
                                    const std::string& snapshot) override;
  absl::StatusOr<ChangeCount> CountChanges(const std::string& volume,
                                           const std::string& base,
                                           const std::string& target) override;
  absl::StatusOr<std::vector<Sha256>> ChunkDigests(const std::string& volume,
                                                   const std::string& snapshot,
                                                   uint64_t first_chunk,
                                                   uint64_t count) override;
  absl::StatusOr<std::map<std::string, std::string>> Records() override;
  absl::Status SaveRecord(const std::string& volume, const std::string& text,
                          const std::optional<Prune>& prune) override;
  absl::StatusOr<SendStats> Send(const SendRequest& request,
                                 ByteSink& out) override;
  absl::StatusOr<ApplyStats> Receive(const ReceiveRequest& request,
                                     ByteSource& in) override;
  absl::StatusOr<std::optional<ResumeToken>> ResumePoint(
      const std::string& volume) override;
  absl::Status DropReceive(const std::string& volume) override;
  absl::StatusOr<std::unique_ptr<Claim>> TakeClaim(
      const std::string& id, const Activity& what) override;
  absl::StatusOr<std::optional<Activity>> Running(
      const std::string& id) override;

 private:
  class LocalClaim;
  struct DiffKey {
    std::string volume;
    Guid base, target;
    bool operator==(const DiffKey&) const = default;
  };
  absl::StatusOr<DiffKey> KeyOf(const std::string& volume,
                                const std::string& base,
                                const std::string& target);
  // The walk CountChanges kept for this delta, if any (taken: once).
  std::shared_ptr<const WalkedDiff> TakeWalk(const std::string& volume,
                                             const std::string& base,
                                             const std::string& target);
  void Release(const std::string& id);
  void SetProgress(const std::string& id, uint64_t done, uint64_t total);

  const std::string name_;
  blockstore::Pool& pool_;
  const LocalSiteOptions options_;
  blockstore::Mutex mu_;
  std::map<std::string, Activity> claims_ ABSL_GUARDED_BY(mu_);
  // Diffs CountChanges walked, oldest first, for the sends that follow.
  std::vector<std::pair<DiffKey, std::shared_ptr<const WalkedDiff>>> walks_
      ABSL_GUARDED_BY(mu_);
};

}  // namespace engine

#endif  // TANDEM_ENGINE_LOCAL_SITE_H_
