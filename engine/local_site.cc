#include "engine/local_site.h"

#include <openssl/evp.h>

#include <algorithm>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "blockstore/util.h"

namespace engine {

using blockstore::MutexLock;

namespace {
constexpr char kRecordPrefix[] = "relationship:";
}  // namespace

std::string RecordKey(absl::string_view volume) {
  return absl::StrCat(kRecordPrefix, volume);
}

class LocalSite::LocalClaim final : public Claim {
 public:
  LocalClaim(LocalSite& site, std::string id) : site_(site), id_(id) {}
  ~LocalClaim() override { site_.Release(id_); }
  void Progress(uint64_t done, uint64_t total) override {
    site_.SetProgress(id_, done, total);
  }
  absl::Status Renew() override { return absl::OkStatus(); }

 private:
  LocalSite& site_;
  const std::string id_;
};

LocalSite::LocalSite(std::string name, blockstore::Pool& pool,
                     LocalSiteOptions options)
    : name_(std::move(name)), pool_(pool), options_(options) {}

LocalSite::~LocalSite() = default;

absl::StatusOr<SiteInfo> LocalSite::Info() {
  blockstore::PoolInfo i = pool_.Info();
  return SiteInfo{i.pool_guid, i.chunk_size_bytes};
}

absl::StatusOr<blockstore::VolumeInfo> LocalSite::GetVolume(
    const std::string& volume) {
  return pool_.GetVolume(volume);
}

absl::StatusOr<std::vector<blockstore::SnapshotInfo>> LocalSite::ListSnapshots(
    const std::string& volume) {
  return pool_.ListSnapshots(volume);
}

absl::StatusOr<blockstore::SnapshotInfo> LocalSite::CreateSnapshot(
    const std::string& volume, const std::string& name,
    const std::string& owner) {
  return pool_.CreateSnapshot(volume, name, owner);
}

absl::Status LocalSite::DeleteSnapshots(const std::string& volume,
                                        const std::vector<std::string>& names) {
  for (const std::string& n : names) {
    if (absl::Status s = pool_.GetSnapshot(volume, n).status(); !s.ok()) {
      return s;
    }
  }
  blockstore::Pool::Group group = pool_.BeginGroup();
  absl::Status s;
  for (const std::string& n : names) {
    if (s.ok()) s = pool_.DeleteSnapshot(volume, n, &group);
  }
  absl::Status ended = group.Commit();
  return s.ok() ? ended : s;
}

absl::Status LocalSite::SetReadOnly(const std::string& volume, bool read_only) {
  return pool_.SetVolumeReadOnly(volume, read_only);
}

absl::StatusOr<bool> LocalSite::ChangedSince(const std::string& volume,
                                             const std::string& snapshot) {
  return pool_.ChangedSince(volume, snapshot);
}

absl::StatusOr<ChangeCount> LocalSite::CountChanges(const std::string& volume,
                                                    const std::string& base,
                                                    const std::string& target) {
  absl::StatusOr<WalkedDiff> walked = WalkDiff(pool_, volume, base, target, 0);
  if (!walked.ok()) return walked.status();
  ChangeCount c;
  auto count = [&c](const std::vector<blockstore::ChangedRun>& runs) {
    for (const blockstore::ChangedRun& r : runs) {
      c.all_chunks += r.count_chunks;
      if (r.kind == blockstore::ChangedRun::Kind::kData) {
        c.data_chunks += r.count_chunks;
      }
    }
  };
  count(walked->runs);
  // Past what the walk keeps: counted, and walked again by the send.
  for (uint64_t from = walked->next_chunk; !walked->complete;) {
    absl::StatusOr<blockstore::DiffBatch> b =
        pool_.Diff(volume, base, target, from, 8192);
    if (!b.ok()) return b.status();
    count(b->runs);
    if (b->done) break;
    from = b->next_chunk;
  }
  // The send of this delta, which usually follows, takes the walk. The
  // steps of a chain are all counted before the first is sent: keep the
  // newest walks, kMaxWalkedRuns runs in all.
  // (Not a diff against the live volume: its chunks move.)
  if (target.empty()) return c;
  absl::StatusOr<DiffKey> key = KeyOf(volume, base, target);
  if (!key.ok()) return key.status();
  blockstore::MutexLock lock(mu_);
  walks_.push_back(
      {*key, std::make_shared<const WalkedDiff>(std::move(*walked))});
  size_t kept = 0;
  for (auto it = walks_.rbegin(); it != walks_.rend(); ++it) {
    kept += it->second->runs.size();
    if (kept > kMaxWalkedRuns) {
      walks_.erase(walks_.begin(), it.base());
      break;
    }
  }
  return c;
}

absl::StatusOr<LocalSite::DiffKey> LocalSite::KeyOf(const std::string& volume,
                                                    const std::string& base,
                                                    const std::string& target) {
  // By GUID: a snapshot deleted and made again under its name is another.
  DiffKey key{volume, {}, {}};
  if (!base.empty()) {
    absl::StatusOr<blockstore::SnapshotInfo> b =
        pool_.GetSnapshot(volume, base);
    if (!b.ok()) return b.status();
    key.base = b->guid;
  }
  absl::StatusOr<blockstore::SnapshotInfo> t =
      pool_.GetSnapshot(volume, target);
  if (!t.ok()) return t.status();
  key.target = t->guid;
  return key;
}

std::shared_ptr<const WalkedDiff> LocalSite::TakeWalk(
    const std::string& volume, const std::string& base,
    const std::string& target) {
  absl::StatusOr<DiffKey> key = KeyOf(volume, base, target);
  if (!key.ok()) return nullptr;
  blockstore::MutexLock lock(mu_);
  for (auto it = walks_.begin(); it != walks_.end(); ++it) {
    if (it->first == *key) {
      std::shared_ptr<const WalkedDiff> w = std::move(it->second);
      walks_.erase(it);
      return w;
    }
  }
  return nullptr;
}

absl::StatusOr<std::vector<Sha256>> LocalSite::ChunkDigests(
    const std::string& volume, const std::string& snapshot,
    uint64_t first_chunk, uint64_t count) {
  if (count > kMaxDigestBatch) {
    return absl::InvalidArgumentError(
        absl::StrCat("at most ", kMaxDigestBatch, " chunk digests a call"));
  }
  uint64_t size_bytes = 0;
  if (snapshot.empty()) {
    absl::StatusOr<blockstore::VolumeInfo> v = pool_.GetVolume(volume);
    if (!v.ok()) return v.status();
    size_bytes = v->size_bytes;
  } else {
    absl::StatusOr<blockstore::SnapshotInfo> s =
        pool_.GetSnapshot(volume, snapshot);
    if (!s.ok()) return s.status();
    size_bytes = s->size_bytes;
  }
  const uint64_t cs = pool_.chunk_size();
  const uint64_t per_read = std::max<uint64_t>(1, (8 << 20) / cs);
  std::vector<Sha256> out(count);
  blockstore::AlignedBuffer buf(
      std::min(per_read, std::max<uint64_t>(1, count)) * cs);
  for (uint64_t done = 0; done < count; done += per_read) {
    const uint64_t n = std::min(per_read, count - done);
    const uint64_t at = (first_chunk + done) * cs;
    std::fill(buf.data(), buf.data() + n * cs, std::byte{0});
    if (at < size_bytes) {
      uint64_t len = std::min(n * cs, size_bytes - at);
      if (absl::Status s =
              pool_.Read(volume, snapshot, at, buf.span().first(len));
          !s.ok()) {
        return s;
      }
    }
    for (uint64_t i = 0; i < n; ++i) {
      unsigned int len = 0;
      if (EVP_Digest(buf.data() + i * cs, cs, out[done + i].data(), &len,
                     EVP_sha256(), nullptr) != 1) {
        return absl::InternalError("SHA-256 failed (OpenSSL)");
      }
    }
  }
  return out;
}

absl::StatusOr<std::map<std::string, std::string>> LocalSite::Records() {
  std::map<std::string, std::string> out;
  for (auto& [key, value] : pool_.Properties()) {
    if (absl::StartsWith(key, kRecordPrefix)) {
      out[key.substr(sizeof(kRecordPrefix) - 1)] = std::move(value);
    }
  }
  return out;
}

absl::Status LocalSite::SaveRecord(const std::string& volume,
                                   const std::string& text,
                                   const std::optional<Prune>& prune) {
  std::vector<std::string> doomed;
  if (prune) {
    absl::StatusOr<std::vector<blockstore::SnapshotInfo>> snaps =
        pool_.ListSnapshots(volume);
    if (!snaps.ok()) return snaps.status();
    for (const blockstore::SnapshotInfo& s : *snaps) {
      if (s.guid == prune->keep_from) break;  // newer ones stay
      if (s.owner == prune->owner) doomed.push_back(s.name);
    }
  }
  // The record and the pruning land in one commit.
  blockstore::Pool::Group group = pool_.BeginGroup();
  absl::Status s;
  for (const std::string& n : doomed) {
    if (s.ok()) s = pool_.DeleteSnapshot(volume, n, &group);
  }
  if (s.ok()) s = pool_.SetProperty(RecordKey(volume), text, &group);
  absl::Status ended = group.Commit();
  return s.ok() ? ended : s;
}

absl::StatusOr<SendStats> LocalSite::Send(const SendRequest& r, ByteSink& out) {
  SendOptions options;
  options.resume = r.resume;
  options.progress = r.progress;
  if (r.onto) {
    return SendChunks(pool_, r.volume, r.target, *r.onto, r.chunks, out,
                      options);
  }
  if (!r.resume) options.diff = TakeWalk(r.volume, r.base, r.target);
  return SendDelta(pool_, r.volume, r.base, r.target, out, options);
}

absl::StatusOr<ApplyStats> LocalSite::Receive(const ReceiveRequest& r,
                                              ByteSource& in) {
  ApplyOptions options;
  options.rollback = r.rollback;
  options.target_owner = r.target_owner;
  options.checkpoint_bytes = options_.checkpoint_bytes;
  options.resume = r.resume;
  if (!r.rollback_advice.empty()) options.rollback_advice = r.rollback_advice;
  options.progress = r.progress;
  return ApplyDelta(pool_, r.volume, in, options);
}

absl::StatusOr<std::optional<ResumeToken>> LocalSite::ResumePoint(
    const std::string& volume) {
  return engine::ResumePoint(pool_, volume);
}

absl::Status LocalSite::DropReceive(const std::string& volume) {
  return engine::DropReceive(pool_, volume);
}

absl::StatusOr<std::unique_ptr<Claim>> LocalSite::TakeClaim(
    const std::string& id, const Activity& what) {
  MutexLock lock(mu_);
  auto [it, fresh] = claims_.emplace(id, what);
  if (!fresh) {
    return absl::FailedPreconditionError(absl::StrCat(
        "Transferring (", ToString(it->second.operation), " in progress",
        it->second.driver.empty()
            ? ""
            : absl::StrCat(", run by site ", it->second.driver),
        ")"));
  }
  return std::make_unique<LocalClaim>(*this, id);
}

absl::StatusOr<std::optional<Activity>> LocalSite::Running(
    const std::string& id) {
  MutexLock lock(mu_);
  auto it = claims_.find(id);
  if (it == claims_.end()) return std::nullopt;
  return it->second;
}

void LocalSite::Release(const std::string& id) {
  MutexLock lock(mu_);
  claims_.erase(id);
}

void LocalSite::SetProgress(const std::string& id, uint64_t done,
                            uint64_t total) {
  MutexLock lock(mu_);
  auto it = claims_.find(id);
  if (it == claims_.end()) return;
  it->second.progress_bytes = done;
  it->second.progress_total_bytes = total;
}

}  // namespace engine
