// The Site of a pool behind another site's daemon (engine/site.h over the
// peer protocol of peer.h), and the server side that answers for a
// daemon's own pools.
//
// Calls are request/response messages on pooled connections; a delta
// travels as DATA frames (at most 1 MiB each) on a connection of its own,
// from the sender's pipeline straight into the receiver's apply. Memory is
// bounded by TCP: a receiver reads the next frame only when its apply has
// room, so a slow receiver stalls the sender instead of making it buffer.
#ifndef TANDEM_TRANSPORT_REMOTE_SITE_H_
#define TANDEM_TRANSPORT_REMOTE_SITE_H_

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "blockstore/mutex.h"
#include "engine/local_site.h"
#include "engine/site.h"
#include "transport/connection.h"
#include "transport/peer.h"

namespace transport {

// The connections to one peer: idle authenticated ones, reused for calls,
// and a short memory of the peer failing. After a connection to it was
// lost, the idle ones go (they are likely dead too: a vanished host says
// nothing); after a connection attempt timed out, new attempts fail at
// once for a second, so that what follows (recording the failure,
// letting go of claims) does not wait out a time-out per call.
class ConnectionPool {
 public:
  explicit ConnectionPool(PeerClient& client) : client_(client) {}
  // A connection and whether it was reused (it may have gone stale).
  absl::StatusOr<std::unique_ptr<Connection>> Get(bool* reused);
  // A new connection of its own (streams and claims).
  absl::StatusOr<std::unique_ptr<Connection>> Fresh();
  void Put(std::unique_ptr<Connection> conn);
  // A connection to the peer broke (`why`): drops the idle ones.
  void Failed(const absl::Status& why);
  PeerClient& client() { return client_; }

 private:
  PeerClient& client_;
  blockstore::Mutex mu_;
  std::vector<std::unique_ptr<Connection>> idle_ ABSL_GUARDED_BY(mu_);
  Clock::time_point down_until_ ABSL_GUARDED_BY(mu_);
  absl::Status down_why_ ABSL_GUARDED_BY(mu_);
};

// Thread-safe; `pool` must outlive it.
class RemoteSite final : public engine::Site {
 public:
  // Pool `pool_name` of the daemon `connections` reach.
  RemoteSite(ConnectionPool& connections, std::string pool_name);

  const std::string& name() const override { return name_; }
  absl::StatusOr<engine::SiteInfo> Info() override;
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
  absl::StatusOr<engine::ChangeCount> CountChanges(
      const std::string& volume, const std::string& base,
      const std::string& target) override;
  absl::StatusOr<std::vector<engine::Sha256>> ChunkDigests(
      const std::string& volume, const std::string& snapshot,
      uint64_t first_chunk, uint64_t count) override;
  absl::StatusOr<std::map<std::string, std::string>> Records() override;
  absl::Status SaveRecord(const std::string& volume, const std::string& text,
                          const std::optional<engine::Prune>& prune) override;
  absl::StatusOr<engine::SendStats> Send(const engine::SendRequest& request,
                                         engine::ByteSink& out) override;
  absl::StatusOr<engine::ApplyStats> Receive(
      const engine::ReceiveRequest& request, engine::ByteSource& in) override;
  absl::StatusOr<std::optional<engine::ResumeToken>> ResumePoint(
      const std::string& volume) override;
  absl::Status DropReceive(const std::string& volume) override;
  absl::StatusOr<std::unique_ptr<engine::Claim>> TakeClaim(
      const std::string& id, const engine::Activity& what) override;
  absl::StatusOr<std::optional<engine::Activity>> Running(
      const std::string& id) override;

 private:
  // One request and its response. `idempotent` calls are tried again on a
  // fresh connection when a reused one turns out to be dead.
  absl::StatusOr<Message> Call(nlohmann::json request, bool idempotent,
                               std::span<const std::byte> blob = {});

  ConnectionPool& connections_;
  const std::string pool_;
  const std::string name_;  // "SITE/POOL"
};

// Finds a daemon's own pool by name.
using PoolLookup =
    std::function<absl::StatusOr<engine::LocalSite*>(const std::string& pool)>;

// Answers Site calls arriving on `conn` (a PeerServer handler) until the
// peer closes it. `log` gets one line per delta served.
void ServeSites(Connection& conn, const PoolLookup& pools, const Logger& log);

}  // namespace transport

#endif  // TANDEM_TRANSPORT_REMOTE_SITE_H_
