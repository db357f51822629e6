#include "engine/relationship.h"

#include <algorithm>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "blockstore/format.h"
#include "engine/local_site.h"
#include "engine/transfer.h"

namespace engine {

using blockstore::SnapshotInfo;

namespace {

std::string NewId() {
  std::random_device rd;
  blockstore::Guid g;
  for (size_t i = 0; i < g.size(); i += 4) {
    uint32_t r = rd();
    for (size_t j = 0; j < 4 && i + j < g.size(); ++j) {
      g[i + j] = static_cast<std::byte>(r >> (8 * j));
    }
  }
  g[6] = (g[6] & std::byte{0x0f}) | std::byte{0x40};  // version 4
  g[8] = (g[8] & std::byte{0x3f}) | std::byte{0x80};
  return blockstore::GuidToString(g);
}

// "rep.<first 8 hex digits of the relationship id>.<n>": names for people;
// the engine knows its snapshots by owner.
std::string RepName(const std::string& id, uint64_t n) {
  return absl::StrFormat("rep.%s.%06d", id.substr(0, 8), n);
}

// The volume's snapshots; none if the volume does not exist.
absl::StatusOr<std::vector<SnapshotInfo>> Snaps(Site& site,
                                                const std::string& volume) {
  absl::StatusOr<std::vector<SnapshotInfo>> s = site.ListSnapshots(volume);
  if (absl::IsNotFound(s.status())) return std::vector<SnapshotInfo>{};
  return s;
}

absl::StatusOr<bool> Exists(Site& site, const std::string& volume) {
  absl::StatusOr<blockstore::VolumeInfo> v = site.GetVolume(volume);
  if (v.ok()) return true;
  if (absl::IsNotFound(v.status())) return false;
  return v.status();
}

std::string SafetyName(const std::vector<SnapshotInfo>& snaps, int64_t now_ns) {
  std::string base = absl::StrCat(
      "safety-", absl::FormatTime("%Y%m%dT%H%M%SZ", absl::FromUnixNanos(now_ns),
                                  absl::UTCTimeZone()));
  auto taken = [&](const std::string& name) {
    return std::any_of(snaps.begin(), snaps.end(),
                       [&](const SnapshotInfo& s) { return s.name == name; });
  };
  std::string name = base;
  for (int i = 2; taken(name); ++i) name = absl::StrCat(base, "-", i);
  return name;
}

// What a refused base tells the user during an update: the destination was
// changed behind the relationship's back.
constexpr char kUpdateAdvice[] =
    "run `tandem relationship break`, then `resync`";

}  // namespace

struct Replication::Loaded {
  RelationshipRecord rec;
  Site* src = nullptr;  // null: could not be reached (src_error says why)
  Site* dst = nullptr;
  absl::Status src_error, dst_error;
  Claims* claims = nullptr;  // held for the running operation

  bool both() const { return src != nullptr && dst != nullptr; }
  absl::Status NeedBoth() const {
    if (src == nullptr) return src_error;
    if (dst == nullptr) return dst_error;
    return absl::OkStatus();
  }
};

Replication::Replication(SiteProvider& sites, ReplicationOptions options)
    : sites_(sites), options_(std::move(options)) {}

Replication::~Replication() = default;

int64_t Replication::Now() const {
  return now_ ? now_() : absl::GetCurrentTimeNanos();
}

bool Replication::InRelationship(blockstore::Pool& pool,
                                 const std::string& volume) {
  return pool.Properties().contains(RecordKey(volume));
}

std::optional<SnapshotInfo> Replication::CommonSnapshot(
    const std::vector<SnapshotInfo>& a, const std::vector<SnapshotInfo>& b) {
  for (auto it = a.rbegin(); it != a.rend(); ++it) {
    for (const SnapshotInfo& s : b) {
      if (s.guid == it->guid) return *it;
    }
  }
  return std::nullopt;
}

// --- Loading, claiming and saving -------------------------------------------

absl::StatusOr<Replication::Loaded> Replication::Load(const Endpoint& either) {
  absl::StatusOr<Site*> here = sites_.Get(either);
  if (!here.ok()) return here.status();
  absl::StatusOr<std::map<std::string, std::string>> records =
      (*here)->Records();
  if (!records.ok()) return records.status();
  auto it = records->find(either.volume);
  if (it == records->end()) {
    return absl::NotFoundError(absl::StrCat(
        either.ToString(),
        " is not in a replication relationship; create one with `tandem "
        "relationship create --source POOL:VOLUME --destination "
        "POOL:VOLUME`"));
  }
  absl::StatusOr<RelationshipRecord> rec =
      RelationshipRecord::FromJson(it->second);
  if (!rec.ok()) return rec.status();
  Loaded rel;
  rel.rec = *rec;
  if (!(rec->source == either) && !(rec->destination == either)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the relationship record of ", either.ToString(), " names ",
        rec->Direction(),
        "; was the pool moved? Name it by the path the relationship was "
        "created with"));
  }
  const Endpoint other = rec->source == either ? rec->destination : rec->source;
  absl::StatusOr<Site*> there = sites_.Get(other);
  if (there.ok()) {
    absl::StatusOr<std::map<std::string, std::string>> theirs =
        (*there)->Records();
    if (!theirs.ok()) {
      there = theirs.status();
    } else {
      auto ot = theirs->find(other.volume);
      bool there_stale = ot == theirs->end();
      if (!there_stale) {
        absl::StatusOr<RelationshipRecord> orec =
            RelationshipRecord::FromJson(ot->second);
        if (!orec.ok() || orec->id != rec->id) {
          return absl::FailedPreconditionError(absl::StrCat(
              other.ToString(), " holds a different relationship record than ",
              either.ToString(), "; release one of them"));
        }
        if (orec->epoch > rel.rec.epoch) {
          rel.rec = *orec;
          // The newer copy wins; bring this side up to date.
          (*here)
              ->SaveRecord(either.volume, rel.rec.ToJson(), std::nullopt)
              .IgnoreError();
        } else if (orec->epoch < rel.rec.epoch) {
          there_stale = true;
        }
      }
      if (there_stale && !rel.rec.released) {
        (*there)
            ->SaveRecord(other.volume, rel.rec.ToJson(), std::nullopt)
            .IgnoreError();
      }
    }
  }
  // After a reverse resync the record's source may be the other side.
  const bool src_here = rel.rec.source == either;
  Site* other_site = there.ok() ? *there : nullptr;
  absl::Status other_error = there.ok() ? absl::OkStatus() : there.status();
  rel.src = src_here ? *here : other_site;
  rel.dst = src_here ? other_site : *here;
  rel.src_error = src_here ? absl::OkStatus() : other_error;
  rel.dst_error = src_here ? other_error : absl::OkStatus();
  return rel;
}

// Claims in one order (by endpoint name), whichever end asks, so that two
// drivers starting at once from the two ends never both lose: the first
// claim they race for decides.
absl::Status Replication::TakeClaims(Loaded& rel, Operation op,
                                     Claims& claims) {
  std::vector<std::pair<std::string, Site*>> order;
  if (rel.src) order.push_back({rel.rec.source.ToString(), rel.src});
  if (rel.dst) order.push_back({rel.rec.destination.ToString(), rel.dst});
  std::sort(order.begin(), order.end());
  for (auto& [name, site] : order) {
    absl::StatusOr<std::unique_ptr<Claim>> c =
        site->TakeClaim(rel.rec.id, Activity{op, options_.driver, 0, 0});
    if (!c.ok()) {
      if (absl::IsFailedPrecondition(c.status())) {
        return absl::FailedPreconditionError(
            absl::StrCat("cannot ", ToString(op), " ", rel.rec.Direction(),
                         ": relationship status is ", c.status().message(),
                         "; wait until it is Idle",
                         op == Operation::kBreak ? ", then break" : ""));
      }
      return c.status();
    }
    claims.push_back(std::move(*c));
  }
  rel.claims = &claims;
  return absl::OkStatus();
}

absl::StatusOr<Replication::Loaded> Replication::Start(const Endpoint& either,
                                                       Operation op,
                                                       Claims& claims,
                                                       bool* continuing) {
  absl::StatusOr<Loaded> rel = Load(either);
  if (!rel.ok()) return rel.status();
  if (rel->rec.released && op != Operation::kRelease) {
    return absl::FailedPreconditionError(
        absl::StrCat("relationship ", rel->rec.Direction(),
                     " was released; it finishes releasing when both sides are "
                     "reachable (run `tandem relationship release` again)"));
  }
  if (absl::Status s = TakeClaims(*rel, op, claims); !s.ok()) return s;
  if (rel->both()) {
    if (absl::Status s = Recover(*rel, op).status(); !s.ok()) return s;
  }
  if (continuing != nullptr) {
    *continuing = rel->rec.status == TransferStatus::kTransferring;
  }
  return rel;
}

absl::Status Replication::Save(Loaded& rel, bool require_both, bool prune) {
  if (require_both) {
    if (absl::Status s = rel.NeedBoth(); !s.ok()) return s;
  }
  std::optional<Prune> pruning;
  if (prune && rel.both()) {
    absl::StatusOr<std::vector<SnapshotInfo>> a =
        Snaps(*rel.src, rel.rec.source.volume);
    absl::StatusOr<std::vector<SnapshotInfo>> b =
        Snaps(*rel.dst, rel.rec.destination.volume);
    if (a.ok() && b.ok()) {
      if (std::optional<SnapshotInfo> common = CommonSnapshot(*a, *b)) {
        pruning = Prune{rel.rec.id, common->guid};
      }
    }
  }
  ++rel.rec.epoch;
  const std::string text = rel.rec.ToJson();
  // Both pools at once: the epoch orders the two copies, not the sequence.
  absl::Status src_saved;
  std::thread src_thread([&] {
    if (rel.src != nullptr) {
      src_saved = rel.src->SaveRecord(rel.rec.source.volume, text, pruning);
    }
  });
  absl::Status dst_saved =
      rel.dst != nullptr
          ? rel.dst->SaveRecord(rel.rec.destination.volume, text, pruning)
          : absl::OkStatus();
  src_thread.join();
  return dst_saved.ok() ? src_saved : dst_saved;
}

// Found Transferring with both claims held by us: interrupted. The same
// overwriting operation goes on with it (its plan was confirmed); anything
// else finishes it from the data if its transfer completed, else puts back
// the state it started from.
absl::StatusOr<Operation> Replication::Recover(Loaded& rel, Operation op) {
  RelationshipRecord& r = rel.rec;
  if (r.status != TransferStatus::kTransferring) return Operation::kNone;
  if (absl::Status s = rel.NeedBoth(); !s.ok()) return s;
  const Operation interrupted = r.operation;
  const bool reverse = interrupted == Operation::kReverseResync;
  Site& sender = reverse ? *rel.dst : *rel.src;
  Site& receiver = reverse ? *rel.src : *rel.dst;
  const std::string sv = reverse ? r.destination.volume : r.source.volume;
  const std::string rv = reverse ? r.source.volume : r.destination.volume;
  absl::StatusOr<std::vector<SnapshotInfo>> sent = Snaps(sender, sv);
  if (!sent.ok()) return sent.status();
  absl::StatusOr<std::vector<SnapshotInfo>> got = Snaps(receiver, rv);
  if (!got.ok()) return got.status();
  bool done = false;
  if (!sent->empty() && !got->empty() &&
      got->back().guid == sent->back().guid) {
    absl::StatusOr<bool> changed = receiver.ChangedSince(rv, got->back().name);
    if (!changed.ok()) return changed.status();
    done = !*changed;
  }
  // Goes on: the same overwrite, or re-establish in its reverse resync.
  if (!done &&
      (interrupted == Operation::kResync ||
       interrupted == Operation::kReverseResync) &&
      (interrupted == op || (op == Operation::kReestablish &&
                             interrupted == Operation::kReverseResync))) {
    return op;
  }
  r.EndOperation();
  if (done) {
    if (reverse) {
      std::swap(r.source, r.destination);
      std::swap(rel.src, rel.dst);
      std::swap(rel.src_error, rel.dst_error);
    }
    r.mirror_state = MirrorState::kMirrored;
    r.last_transfer_error.clear();
    if (absl::Status s = receiver.SetReadOnly(rv, true); !s.ok()) return s;
  } else {
    r.mirror_state =
        interrupted == Operation::kInitialize ? MirrorState::kUninitialized
        : interrupted == Operation::kUpdate   ? MirrorState::kMirrored
                                              : MirrorState::kBroken;
    r.last_transfer_error = absl::StrCat(
        ToString(interrupted),
        " was interrupted (crash or kill) before it completed; nothing was "
        "changed; run it again");
    if (r.mirror_state == MirrorState::kBroken) {
      absl::StatusOr<bool> there = Exists(receiver, rv);
      if (!there.ok()) return there.status();
      if (*there) {
        if (absl::Status s = receiver.SetReadOnly(rv, false); !s.ok()) return s;
      }
    }
  }
  if (absl::Status s = Save(rel, true, /*prune=*/done); !s.ok()) return s;
  return done ? interrupted : Operation::kNone;
}

// `persist`: record Transferring in both pools before any data changes, so
// that a crash is recovered from the record. An update does without (two
// commits fewer on the hot path): until it ends, its only changes are a new
// replication snapshot on the source (the next update ships it as well) and
// an atomic receive, so the Mirrored record stays true whatever happens.
absl::Status Replication::Begin(Loaded& rel, Operation op, bool persist) {
  if (absl::Status s = rel.NeedBoth(); !s.ok()) return s;
  rel.rec.status = TransferStatus::kTransferring;
  rel.rec.operation = op;
  rel.rec.driver = options_.driver;
  rel.rec.progress_bytes = 0;
  rel.rec.progress_total_bytes = 0;
  if (persist) {
    if (absl::Status s = Save(rel, true); !s.ok()) return s;
  }
  if (transfer_started_) transfer_started_(op);
  return absl::OkStatus();
}

absl::Status Replication::Finish(Loaded& rel, const TransferStats& stats) {
  RelationshipRecord& r = rel.rec;
  r.EndOperation();
  r.last_transfer_end_ns = Now();
  r.last_transfer_bytes = stats.stream_bytes;
  r.last_transfer_data_bytes = stats.data_bytes;
  r.last_transfer_seconds = stats.seconds;
  r.last_transfer_error.clear();
  r.total_transfer_bytes += stats.stream_bytes;
  r.progress_bytes = r.progress_total_bytes;
  return Save(rel, true, /*prune=*/true);
}

absl::Status Replication::Fail(Loaded& rel, const absl::Status& error) {
  if (options_.stopping && options_.stopping->load()) return error;
  RelationshipRecord& r = rel.rec;
  r.EndOperation();
  r.last_transfer_end_ns = Now();
  r.last_transfer_error = std::string(error.message());
  // Best effort: a pool that failed may refuse this too; the next command
  // then recovers from the Transferring record.
  Save(rel, false).IgnoreError();
  return error;
}

// --- Moving data ------------------------------------------------------------

// A new replication snapshot of `volume` at `site` (the sender). The name
// counter is saved with the record at the end of a transfer: after a crash,
// names it handed out may exist already, on either side.
absl::StatusOr<SnapshotInfo> Replication::TakeReplicationSnapshot(
    Loaded& rel, Site& site, const std::string& volume) {
  std::vector<SnapshotInfo> existing;
  for (auto [s, v] : {std::pair{rel.src, rel.rec.source.volume},
                      std::pair{rel.dst, rel.rec.destination.volume}}) {
    if (s == nullptr) continue;
    absl::StatusOr<std::vector<SnapshotInfo>> snaps = Snaps(*s, v);
    if (!snaps.ok()) return snaps.status();
    existing.insert(existing.end(), snaps->begin(), snaps->end());
  }
  for (;;) {
    std::string name = RepName(rel.rec.id, rel.rec.next_snapshot++);
    if (std::none_of(existing.begin(), existing.end(),
                     [&](const SnapshotInfo& s) { return s.name == name; })) {
      return site.CreateSnapshot(volume, name, rel.rec.id);
    }
  }
}

namespace {

// The replication snapshot of `sender` that an interrupted full receive
// into `receiver` was for, if any: sending it again lets the receive go on
// from its resume point instead of starting over with a new snapshot.
absl::StatusOr<std::optional<SnapshotInfo>> ResumableTarget(
    const std::string& id, Site& sender, const std::string& sv, Site& receiver,
    const std::string& rv) {
  absl::StatusOr<std::optional<ResumeToken>> point = receiver.ResumePoint(rv);
  if (!point.ok()) return point.status();
  if (!point->has_value()) return std::nullopt;
  absl::StatusOr<std::vector<SnapshotInfo>> snaps = Snaps(sender, sv);
  if (!snaps.ok()) return snaps.status();
  for (const SnapshotInfo& s : *snaps) {
    if (s.guid == (*point)->target_guid && s.owner == id) return s;
  }
  return std::nullopt;
}

// The sender's snapshots from the last one both sides hold, oldest first:
// {common, every snapshot after it}, user snapshots included.
absl::StatusOr<std::vector<SnapshotInfo>> ChainSinceCommon(
    Site& from, const std::string& from_volume, Site& to,
    const std::string& to_volume) {
  absl::StatusOr<std::vector<SnapshotInfo>> mine = Snaps(from, from_volume);
  if (!mine.ok()) return mine.status();
  absl::StatusOr<std::vector<SnapshotInfo>> theirs = Snaps(to, to_volume);
  if (!theirs.ok()) return theirs.status();
  std::optional<SnapshotInfo> common =
      Replication::CommonSnapshot(*mine, *theirs);
  if (!common) {
    return absl::FailedPreconditionError(
        "the two volumes share no snapshot any more (deleted by hand, or a "
        "pool restored from an older copy?): break, then resync or "
        "reverse-resync to compare them chunk by chunk");
  }
  std::vector<SnapshotInfo> chain = {*common};
  bool after = false;
  for (const SnapshotInfo& s : *mine) {
    if (after) chain.push_back(s);
    after = after || s.guid == common->guid;
  }
  return chain;
}

}  // namespace

void Replication::Context(Loaded& rel, std::optional<RateLimiter>& limiter,
                          TransferContext& ctx) {
  ctx.relationship_id = rel.rec.id;
  if (rel.claims != nullptr) {
    for (const std::unique_ptr<Claim>& c : *rel.claims) {
      ctx.claims.push_back(c.get());
    }
  }
  ctx.progress = [this, &rel](uint64_t done, uint64_t total) {
    rel.rec.progress_bytes = done;
    rel.rec.progress_total_bytes = total;
    if (progress_) progress_(rel.rec);
  };
  ctx.retry_window = options_.retry_window;
  ctx.cancel = options_.stopping.get();
  if (rel.rec.max_rate_bytes > 0) {
    limiter.emplace(rel.rec.max_rate_bytes);
    ctx.limiter = &*limiter;
  }
  ctx.rollback_advice = kUpdateAdvice;
}

absl::StatusOr<TransferStats> Replication::Move(
    Loaded& rel, Site& from, const std::string& from_volume, Site& to,
    const std::string& to_volume, const std::vector<SnapshotInfo>& chain,
    bool rollback_first) {
  std::optional<RateLimiter> limiter;
  TransferContext ctx;
  Context(rel, limiter, ctx);
  return TransferChain(ctx, from, from_volume, to, to_volume, chain,
                       rollback_first);
}

// --- Operations
// ---------------------------------------------------------------

absl::StatusOr<RelationshipRecord> Replication::Create(
    const Endpoint& source, const Endpoint& destination,
    int64_t schedule_seconds, uint64_t max_rate_bytes) {
  if (schedule_seconds < 0) {
    return absl::InvalidArgumentError("the schedule must not be negative");
  }
  for (const Endpoint* e : {&source, &destination}) {
    if (!blockstore::IsValidName(e->volume)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "'", e->volume, "' (in ", e->ToString(),
          ") is not a valid volume name: 1-200 of A-Z a-z 0-9 . _ : -, not "
          "starting with '.' or '-'"));
    }
  }
  absl::StatusOr<Site*> src = sites_.Get(source);
  if (!src.ok()) return src.status();
  absl::StatusOr<Site*> dst = sites_.Get(destination);
  if (!dst.ok()) return dst.status();
  absl::StatusOr<SiteInfo> si = (*src)->Info();
  if (!si.ok()) return si.status();
  absl::StatusOr<SiteInfo> di = (*dst)->Info();
  if (!di.ok()) return di.status();
  if (*src == *dst || si->pool_guid == di->pool_guid) {
    return absl::InvalidArgumentError(
        "source and destination must be in different pools");
  }
  if (si->chunk_size_bytes != di->chunk_size_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the source pool has ", si->chunk_size_bytes,
        "-byte chunks and the destination pool ", di->chunk_size_bytes,
        "; create the destination pool with --chunk-size ",
        si->chunk_size_bytes));
  }
  if (absl::StatusOr<blockstore::VolumeInfo> v =
          (*src)->GetVolume(source.volume);
      !v.ok()) {
    return v.status();
  }
  absl::StatusOr<bool> there = Exists(**dst, destination.volume);
  if (!there.ok()) return there.status();
  if (*there) {
    return absl::AlreadyExistsError(absl::StrCat(
        "destination volume ", destination.ToString(),
        " exists; initialize creates it: pick a new name or delete it"));
  }
  for (auto [site, ep] :
       {std::pair{*src, source}, std::pair{*dst, destination}}) {
    absl::StatusOr<std::map<std::string, std::string>> records =
        site->Records();
    if (!records.ok()) return records.status();
    if (records->contains(ep.volume)) {
      return absl::AlreadyExistsError(absl::StrCat(
          ep.ToString(), " is already in a relationship; release it first"));
    }
  }
  Loaded rel;
  rel.rec.id = NewId();
  rel.rec.source = source;
  rel.rec.origin = source;
  rel.rec.destination = destination;
  rel.rec.schedule_seconds = schedule_seconds;
  rel.rec.max_rate_bytes = max_rate_bytes;
  rel.src = *src;
  rel.dst = *dst;
  if (absl::Status s = Save(rel, true); !s.ok()) return s;
  return rel.rec;
}

absl::StatusOr<TransferStats> Replication::Initialize(const Endpoint& either) {
  Claims claims;
  absl::StatusOr<Loaded> rel =
      Start(either, Operation::kInitialize, claims, nullptr);
  if (!rel.ok()) return rel.status();
  RelationshipRecord& r = rel->rec;
  // Run again after it completed (a crash before the reply): done.
  if (r.mirror_state == MirrorState::kMirrored) return TransferStats{};
  if (r.mirror_state != MirrorState::kUninitialized) {
    return absl::FailedPreconditionError(
        absl::StrCat("relationship ", r.Direction(),
                     " is already initialized (mirror state ",
                     ToString(r.mirror_state), "); use update"));
  }
  if (absl::Status s = rel->NeedBoth(); !s.ok()) return s;
  absl::StatusOr<bool> there = Exists(*rel->dst, r.destination.volume);
  if (!there.ok()) return there.status();
  if (*there) {
    return absl::FailedPreconditionError(
        absl::StrCat("destination volume ", r.destination.ToString(),
                     " exists; initialize creates it: delete it first"));
  }
  if (absl::Status s = Begin(*rel, Operation::kInitialize, true); !s.ok()) {
    return s;
  }
  absl::StatusOr<std::optional<SnapshotInfo>> again = ResumableTarget(
      r.id, *rel->src, r.source.volume, *rel->dst, r.destination.volume);
  if (!again.ok()) return Fail(*rel, again.status());
  absl::StatusOr<SnapshotInfo> snap =
      *again ? **again
             : TakeReplicationSnapshot(*rel, *rel->src, r.source.volume);
  if (!snap.ok()) return Fail(*rel, snap.status());
  absl::StatusOr<TransferStats> stats =
      Move(*rel, *rel->src, r.source.volume, *rel->dst, r.destination.volume,
           {SnapshotInfo{}, *snap}, false);
  if (!stats.ok()) return Fail(*rel, stats.status());
  if (absl::Status s = rel->dst->SetReadOnly(r.destination.volume, true);
      !s.ok()) {
    return Fail(*rel, s);
  }
  r.mirror_state = MirrorState::kMirrored;
  if (absl::Status s = Finish(*rel, *stats); !s.ok()) return s;
  return stats;
}

absl::StatusOr<TransferStats> Replication::Update(const Endpoint& either) {
  Claims claims;
  absl::StatusOr<Loaded> rel =
      Start(either, Operation::kUpdate, claims, nullptr);
  if (!rel.ok()) return rel.status();
  return DoUpdate(*rel);
}

absl::StatusOr<TransferStats> Replication::DoUpdate(Loaded& rel) {
  RelationshipRecord& r = rel.rec;
  const std::string name = r.Direction();
  if (r.mirror_state == MirrorState::kUninitialized) {
    return absl::FailedPreconditionError(absl::StrCat(
        "cannot update ", name,
        ": mirror state is Uninitialized; run `tandem relationship "
        "initialize` first"));
  }
  if (r.mirror_state == MirrorState::kBroken) {
    return absl::FailedPreconditionError(absl::StrCat(
        "cannot update ", name,
        ": mirror state is Broken; run resync (the destination goes back to "
        "the source) or reverse-resync (the source takes the destination's "
        "data)"));
  }
  if (absl::Status s = rel.NeedBoth(); !s.ok()) return s;
  if (absl::Status s = rel.dst->SetReadOnly(r.destination.volume, true);
      !s.ok()) {
    return s;
  }
  if (absl::Status s = Begin(rel, Operation::kUpdate, false); !s.ok()) {
    return s;
  }
  absl::StatusOr<SnapshotInfo> snap =
      TakeReplicationSnapshot(rel, *rel.src, r.source.volume);
  if (!snap.ok()) return Fail(rel, snap.status());
  absl::StatusOr<std::vector<SnapshotInfo>> chain = ChainSinceCommon(
      *rel.src, r.source.volume, *rel.dst, r.destination.volume);
  if (!chain.ok()) return Fail(rel, chain.status());
  absl::StatusOr<TransferStats> stats =
      Move(rel, *rel.src, r.source.volume, *rel.dst, r.destination.volume,
           *chain, false);
  if (!stats.ok()) return Fail(rel, stats.status());
  if (absl::Status s = Finish(rel, *stats); !s.ok()) return s;
  return stats;
}

absl::Status Replication::Break(const Endpoint& either,
                                const Confirm& confirm) {
  Claims claims;
  absl::StatusOr<Loaded> rel = Load(either);
  if (!rel.ok()) return rel.status();
  if (rel->rec.released) {
    return absl::FailedPreconditionError(
        absl::StrCat("relationship ", rel->rec.Direction(), " was released"));
  }
  if (absl::Status s = TakeClaims(*rel, Operation::kBreak, claims); !s.ok()) {
    return s;
  }
  RelationshipRecord& r = rel->rec;
  if (rel->both()) {
    if (absl::Status s = Recover(*rel, Operation::kBreak).status(); !s.ok()) {
      return s;
    }
  } else if (r.status == TransferStatus::kTransferring && rel->dst != nullptr) {
    // The source is lost mid-transfer and nobody holds the destination's
    // claim: it is still at its last complete snapshot (apply is atomic),
    // so breaking is safe.
    r.last_transfer_error =
        absl::StrCat(ToString(r.operation), " was interrupted");
    r.EndOperation();
  }
  return DoBreak(*rel, confirm);
}

absl::Status Replication::DoBreak(Loaded& rel, const Confirm& confirm) {
  RelationshipRecord& r = rel.rec;
  const std::string name = r.Direction();
  if (r.mirror_state == MirrorState::kUninitialized) {
    return absl::FailedPreconditionError(absl::StrCat(
        "cannot break ", name,
        ": mirror state is Uninitialized (no baseline yet); run `tandem "
        "relationship initialize` first, or release it"));
  }
  if (rel.dst == nullptr) return rel.dst_error;
  if (r.mirror_state == MirrorState::kBroken) {
    // Already broken (run again after a crash): make sure of the flag.
    return rel.dst->SetReadOnly(r.destination.volume, false);
  }
  LossPreview p;
  p.operation = Operation::kBreak;
  p.overwritten = r.destination;
  absl::StatusOr<std::vector<SnapshotInfo>> snaps =
      Snaps(*rel.dst, r.destination.volume);
  if (!snaps.ok()) return snaps.status();
  if (!snaps->empty()) p.common_snapshot = snaps->back().name;
  if (!confirm(p)) {
    return absl::CancelledError("break cancelled; nothing was changed");
  }
  if (absl::Status s = rel.dst->SetReadOnly(r.destination.volume, false);
      !s.ok()) {
    return s;
  }
  r.mirror_state = MirrorState::kBroken;
  return Save(rel, false);
}

absl::StatusOr<LossPreview> Replication::Preview(Loaded& rel, Operation op,
                                                 bool reverse) {
  const RelationshipRecord& r = rel.rec;
  Site& sender = reverse ? *rel.dst : *rel.src;
  Site& receiver = reverse ? *rel.src : *rel.dst;
  const std::string& sv = reverse ? r.destination.volume : r.source.volume;
  LossPreview p;
  p.operation = op;
  p.overwritten = reverse ? r.source : r.destination;
  const std::string& rv = p.overwritten.volume;
  absl::StatusOr<bool> there = Exists(receiver, rv);
  if (!there.ok()) return there.status();
  if (!*there) {
    p.method = Method::kNewVolume;
    return p;
  }
  absl::StatusOr<SiteInfo> info = receiver.Info();
  if (!info.ok()) return info.status();
  const uint64_t cs = info->chunk_size_bytes;
  absl::StatusOr<std::vector<SnapshotInfo>> mine = Snaps(sender, sv);
  if (!mine.ok()) return mine.status();
  absl::StatusOr<std::vector<SnapshotInfo>> theirs = Snaps(receiver, rv);
  if (!theirs.ok()) return theirs.status();
  std::optional<SnapshotInfo> common = CommonSnapshot(*mine, *theirs);
  if (common) {
    p.method = Method::kRollback;
    p.common_snapshot = common->name;
    absl::StatusOr<ChangeCount> c = receiver.CountChanges(rv, common->name, "");
    if (!c.ok()) return c.status();
    p.chunks = c->all_chunks;
    p.bytes = c->all_chunks * cs;
    bool after = false;
    for (const SnapshotInfo& s : *theirs) {
      if (after) p.kept_snapshots.push_back(s.name);
      after = after || s.guid == common->guid;
    }
    absl::StatusOr<bool> changed =
        receiver.ChangedSince(rv, theirs->back().name);
    if (!changed.ok()) return changed.status();
    if (p.bytes > 0 || *changed) p.safety_snapshot = SafetyName(*theirs, Now());
    return p;
  }
  p.method = Method::kHashDiff;
  absl::StatusOr<blockstore::VolumeInfo> si = sender.GetVolume(sv);
  if (!si.ok()) return si.status();
  absl::StatusOr<std::vector<uint64_t>> differ = DifferingChunks(
      sender, sv, "", receiver, rv, "", (si->size_bytes + cs - 1) / cs);
  if (!differ.ok()) return differ.status();
  p.chunks = differ->size();
  p.bytes = p.chunks * cs;
  p.safety_snapshot = SafetyName(*theirs, Now());
  return p;
}

// resync (reverse = false: the destination is overwritten from the source)
// and reverse resync (reverse = true: the source from the destination, and
// the direction flips). `continuing`: one cut short goes on with its plan.
absl::StatusOr<TransferStats> Replication::Overwrite(Loaded& rel, Operation op,
                                                     bool reverse,
                                                     const Confirm& confirm,
                                                     bool continuing) {
  RelationshipRecord& r = rel.rec;
  const char* op_name = ToString(op);
  if (!continuing) {
    // Mirrored: it already ran (a crash before the reply), or there is
    // nothing to resync; either way nothing to do.
    if (r.mirror_state == MirrorState::kMirrored) return TransferStats{};
    if (r.mirror_state != MirrorState::kBroken) {
      return absl::FailedPreconditionError(
          absl::StrCat("cannot ", op_name, " ", r.Direction(),
                       ": mirror state is ", ToString(r.mirror_state),
                       "; run `tandem relationship initialize` first"));
    }
    if (rel.src == nullptr) {
      return absl::FailedPreconditionError(absl::StrCat(
          "cannot ", op_name, ": the source pool cannot be reached (",
          rel.src_error.message(),
          "); if it is lost for good, create an empty pool at ",
          r.source.PoolName(), " and run ", op_name, " again"));
    }
    if (rel.dst == nullptr) return rel.dst_error;
    absl::StatusOr<LossPreview> preview = Preview(rel, op, reverse);
    if (!preview.ok()) return preview.status();
    if (!confirm(*preview)) {
      return absl::CancelledError(
          absl::StrCat(op_name, " cancelled; nothing was changed"));
    }
    r.method = preview->method;
    r.safety_snapshot = preview->safety_snapshot;
  }
  if (absl::Status s = Begin(rel, op, /*persist=*/true); !s.ok()) return s;
  Site& sender = reverse ? *rel.dst : *rel.src;
  Site& receiver = reverse ? *rel.src : *rel.dst;
  const std::string sv = reverse ? r.destination.volume : r.source.volume;
  const std::string rv = reverse ? r.source.volume : r.destination.volume;
  auto undo = [&](absl::Status s) {
    if (options_.stopping && options_.stopping->load()) return s;  // as a crash
    absl::StatusOr<bool> there = Exists(receiver, rv);
    if (there.ok() && *there) receiver.SetReadOnly(rv, false).IgnoreError();
    return Fail(rel, s);
  };
  const Method method = r.method;
  const std::string safety = r.safety_snapshot;
  if (!safety.empty()) {
    absl::StatusOr<std::vector<SnapshotInfo>> snaps = Snaps(receiver, rv);
    if (!snaps.ok()) return undo(snaps.status());
    bool taken =
        std::any_of(snaps->begin(), snaps->end(),
                    [&](const SnapshotInfo& s) { return s.name == safety; });
    if (!taken) {
      if (absl::StatusOr<SnapshotInfo> s =
              receiver.CreateSnapshot(rv, safety, "");
          !s.ok()) {
        return undo(s.status());
      }
    }
  }
  if (method != Method::kNewVolume) {
    if (absl::Status s = receiver.SetReadOnly(rv, true); !s.ok()) {
      return undo(s);
    }
  }
  absl::StatusOr<TransferStats> stats;
  if (method == Method::kNewVolume) {
    absl::StatusOr<std::optional<SnapshotInfo>> again =
        ResumableTarget(r.id, sender, sv, receiver, rv);
    if (!again.ok()) return undo(again.status());
    absl::StatusOr<SnapshotInfo> snap =
        *again ? **again : TakeReplicationSnapshot(rel, sender, sv);
    if (!snap.ok()) return undo(snap.status());
    stats = Move(rel, sender, sv, receiver, rv, {SnapshotInfo{}, *snap}, false);
  } else {
    absl::StatusOr<SnapshotInfo> snap =
        TakeReplicationSnapshot(rel, sender, sv);
    if (!snap.ok()) return undo(snap.status());
    if (method == Method::kHashDiff) {
      std::optional<RateLimiter> limiter;
      TransferContext ctx;
      Context(rel, limiter, ctx);
      stats =
          HashDiffTransfer(ctx, sender, sv, snap->name, receiver, rv, safety);
    } else {
      absl::StatusOr<std::vector<SnapshotInfo>> chain =
          ChainSinceCommon(sender, sv, receiver, rv);
      stats = chain.ok() ? Move(rel, sender, sv, receiver, rv, *chain, true)
                         : chain.status();
    }
  }
  if (!stats.ok()) return undo(stats.status());
  if (absl::Status s = receiver.SetReadOnly(rv, true); !s.ok()) {
    return undo(s);
  }
  if (reverse) {
    std::swap(r.source, r.destination);
    std::swap(rel.src, rel.dst);
    std::swap(rel.src_error, rel.dst_error);
  }
  r.mirror_state = MirrorState::kMirrored;
  if (absl::Status s = Finish(rel, *stats); !s.ok()) return s;
  return stats;
}

absl::StatusOr<TransferStats> Replication::Resync(const Endpoint& either,
                                                  const Confirm& confirm) {
  Claims claims;
  bool continuing = false;
  absl::StatusOr<Loaded> rel =
      Start(either, Operation::kResync, claims, &continuing);
  if (!rel.ok()) return rel.status();
  return Overwrite(*rel, Operation::kResync, false, confirm, continuing);
}

absl::StatusOr<TransferStats> Replication::ReverseResync(
    const Endpoint& either, const Confirm& confirm) {
  Claims claims;
  bool continuing = false;
  absl::StatusOr<Loaded> rel =
      Start(either, Operation::kReverseResync, claims, &continuing);
  if (!rel.ok()) return rel.status();
  return Overwrite(*rel, Operation::kReverseResync, true, confirm, continuing);
}

// The seed's last section: with the mirror running destination -> source
// after a reverse resync, bring the original direction back. Steps: update
// (so nothing written on the current source is lost), break, reverse resync.
// A crash part way leaves `pending` set: run it again to go on.
absl::StatusOr<TransferStats> Replication::Reestablish(const Endpoint& either,
                                                       const Confirm& confirm) {
  Claims claims;
  bool continuing = false;
  absl::StatusOr<Loaded> rel =
      Start(either, Operation::kReestablish, claims, &continuing);
  if (!rel.ok()) return rel.status();
  TransferStats total;
  auto add = [&](const TransferStats& t) {
    total.stream_bytes += t.stream_bytes;
    total.data_bytes += t.data_bytes;
    total.snapshots += t.snapshots;
    total.resumed += t.resumed;
    total.retries += t.retries;
    total.seconds += t.seconds;
  };
  RelationshipRecord& r = rel->rec;
  const bool home =
      r.mirror_state == MirrorState::kMirrored && r.source == r.origin;
  if (r.pending != Operation::kReestablish) {
    if (home) return total;  // already the original direction
    if (r.mirror_state != MirrorState::kMirrored) {
      return absl::FailedPreconditionError(absl::StrCat(
          "cannot reestablish ", r.Direction(), ": mirror state is ",
          ToString(r.mirror_state),
          "; reestablish turns a Mirrored relationship around (after a "
          "reverse resync)"));
    }
    LossPreview p;
    p.operation = Operation::kReestablish;
    p.overwritten = r.source;
    if (!confirm(p)) {
      return absl::CancelledError("reestablish cancelled; nothing was changed");
    }
    r.pending = Operation::kReestablish;
    if (absl::Status s = Save(*rel, true); !s.ok()) return s;
  }
  // Run again after a crash, `pending` is set and the state says which step
  // it reached: still Mirrored backwards (update and break to do), Broken
  // (the reverse resync to do), or home (only `pending` to clear).
  if (!home && r.mirror_state == MirrorState::kMirrored) {
    absl::StatusOr<TransferStats> u = DoUpdate(*rel);
    if (!u.ok()) return u.status();
    add(*u);
    if (absl::Status s = DoBreak(*rel, [](const LossPreview&) { return true; });
        !s.ok()) {
      return s;
    }
  }
  if (!home) {
    // Written on the current source since the update just made: nothing,
    // unless something wrote in between; then it must be confirmed again.
    absl::StatusOr<TransferStats> rr = Overwrite(
        *rel, Operation::kReverseResync, true,
        [&](const LossPreview& p) { return p.bytes == 0 || confirm(p); },
        continuing);
    if (!rr.ok()) return rr.status();
    add(*rr);
  }
  r.pending = Operation::kNone;
  if (absl::Status s = Save(*rel, true); !s.ok()) return s;
  return total;
}

// Takes what this relationship put on each reachable side away: its
// snapshots, the read-only flag, an interrupted receive; and the record.
// With a side unreachable, the other keeps a tombstone that finishes the
// release there later.
absl::StatusOr<ReleaseReport> Replication::FinishRelease(Loaded& rel) {
  RelationshipRecord& r = rel.rec;
  for (auto [site, volume] : {std::pair{rel.dst, r.destination.volume},
                              std::pair{rel.src, r.source.volume}}) {
    if (site == nullptr) continue;
    absl::StatusOr<std::vector<SnapshotInfo>> snaps = Snaps(*site, volume);
    if (!snaps.ok()) return snaps.status();
    std::vector<std::string> owned;
    for (const SnapshotInfo& s : *snaps) {
      if (s.owner == r.id) owned.push_back(s.name);
    }
    if (!owned.empty()) {
      if (absl::Status s = site->DeleteSnapshots(volume, owned); !s.ok()) {
        return s;
      }
    }
    absl::StatusOr<bool> there = Exists(*site, volume);
    if (!there.ok()) return there.status();
    if (*there) {
      if (absl::Status s = site->SetReadOnly(volume, false); !s.ok()) return s;
    }
    if (absl::Status s = site->DropReceive(volume); !s.ok()) return s;
  }
  ReleaseReport report;
  if (rel.both()) {
    for (auto [site, volume] : {std::pair{rel.dst, r.destination.volume},
                                std::pair{rel.src, r.source.volume}}) {
      if (absl::Status s = site->SaveRecord(volume, "", std::nullopt);
          !s.ok()) {
        return s;
      }
    }
    return report;
  }
  report.complete = false;
  report.waiting = rel.src == nullptr ? r.source : r.destination;
  report.why = std::string(
      (rel.src == nullptr ? rel.src_error : rel.dst_error).message());
  r.released = true;
  r.EndOperation();
  if (absl::Status s = Save(rel, false); !s.ok()) return s;
  return report;
}

absl::StatusOr<ReleaseReport> Replication::Release(const Endpoint& either) {
  Claims claims;
  absl::StatusOr<Loaded> rel =
      Start(either, Operation::kRelease, claims, nullptr);
  if (!rel.ok()) return rel.status();
  return FinishRelease(*rel);
}

absl::StatusOr<TransferStats> Replication::Continue(const Endpoint& either) {
  absl::StatusOr<Loaded> rel = Load(either);
  if (!rel.ok()) return rel.status();
  const RelationshipRecord& r = rel->rec;
  if (r.released) {
    if (!rel->both()) return TransferStats{};
    absl::StatusOr<ReleaseReport> done = Release(either);
    if (!done.ok()) return done.status();
    return TransferStats{};
  }
  const Confirm never = [](const LossPreview& p) { return p.bytes == 0; };
  if (r.pending == Operation::kReestablish) return Reestablish(either, never);
  if (r.status == TransferStatus::kTransferring) {
    switch (r.operation) {
      case Operation::kInitialize:
        return Initialize(either);
      case Operation::kResync:
        return Resync(either, never);
      case Operation::kReverseResync:
        return ReverseResync(either, never);
      default:
        return TransferStats{};
    }
  }
  if (r.mirror_state == MirrorState::kMirrored && rel->dst != nullptr) {
    absl::StatusOr<std::optional<ResumeToken>> point =
        rel->dst->ResumePoint(r.destination.volume);
    if (!point.ok()) return point.status();
    if (point->has_value()) return Update(either);
  }
  return TransferStats{};
}

// --- Health
// ---------------------------------------------------------------------

absl::StatusOr<RelationshipReport> Replication::Report(const Endpoint& either) {
  absl::StatusOr<Loaded> rel = Load(either);
  if (!rel.ok()) return rel.status();
  RelationshipReport out;
  out.record = rel->rec;
  const RelationshipRecord& r = rel->rec;
  if (r.released) {
    if (rel->both()) {
      // Both sides are back: finish the release, then it is gone (unless
      // this process may not write, e.g. status on read-only pools).
      absl::StatusOr<ReleaseReport> done = Release(either);
      if (done.ok()) return Report(either);
    }
    out.healthy = false;
    out.unhealthy_reason = absl::StrCat(
        "released; ",
        (rel->src == nullptr ? r.source : r.destination).ToString(),
        " could not be reached, and keeps its record and read-only flag "
        "until it is");
    return out;
  }
  if (rel->src == nullptr) {
    out.notes.push_back(absl::StrCat("source pool cannot be reached: ",
                                     rel->src_error.message()));
  }
  if (rel->dst == nullptr) {
    out.notes.push_back(absl::StrCat("destination pool cannot be reached: ",
                                     rel->dst_error.message()));
  }
  // Lag: how old the data the destination holds is, i.e. the creation time
  // of the last common snapshot (or, with the source unreachable, of the
  // newest replication snapshot the destination received; its safety
  // snapshots and the like are not replicated data).
  int64_t replicated_ns = -1;
  bool no_common = false;
  if (rel->both()) {
    absl::StatusOr<std::vector<SnapshotInfo>> a =
        Snaps(*rel->src, r.source.volume);
    absl::StatusOr<std::vector<SnapshotInfo>> b =
        Snaps(*rel->dst, r.destination.volume);
    if (a.ok() && b.ok()) {
      if (std::optional<SnapshotInfo> c = CommonSnapshot(*a, *b)) {
        out.last_common_snapshot = c->name;
        replicated_ns = c->create_time_ns;
      } else {
        no_common = true;
      }
    }
  } else if (rel->dst != nullptr) {
    absl::StatusOr<std::vector<SnapshotInfo>> snaps =
        Snaps(*rel->dst, r.destination.volume);
    if (snaps.ok()) {
      for (const SnapshotInfo& s : *snaps) {
        if (s.owner == r.id) {
          replicated_ns = std::max(replicated_ns, s.create_time_ns);
        }
      }
    }
  }
  if (replicated_ns >= 0) {
    out.lag_seconds =
        std::max<int64_t>(0, (Now() - replicated_ns) / 1000000000);
  }
  std::optional<Activity> running;
  for (Site* site : {rel->src, rel->dst}) {
    if (site == nullptr || running) continue;
    absl::StatusOr<std::optional<Activity>> a = site->Running(r.id);
    if (a.ok() && a->has_value()) running = **a;
  }
  if (running) {  // somebody is transferring it now
    out.record.status = TransferStatus::kTransferring;
    out.record.operation = running->operation;
    out.record.driver = running->driver;
    out.record.progress_bytes = running->progress_bytes;
    out.record.progress_total_bytes = running->progress_total_bytes;
  }
  const bool interrupted =
      r.status == TransferStatus::kTransferring && !running;
  auto unhealthy = [&](std::string why) {
    out.healthy = false;
    out.unhealthy_reason = std::move(why);
  };
  out.healthy = true;
  if (interrupted) {
    unhealthy(absl::StrCat(ToString(r.operation),
                           " was interrupted; the next relationship command "
                           "finishes it or rolls it back"));
  } else if (r.mirror_state == MirrorState::kUninitialized) {
    unhealthy("not initialized: no baseline transfer yet");
  } else if (r.mirror_state == MirrorState::kBroken) {
    unhealthy(
        "mirror is Broken: the destination is read-write and no "
        "updates run");
  } else if (!r.last_transfer_error.empty()) {
    unhealthy(absl::StrCat("last transfer failed: ", r.last_transfer_error));
  } else if (!rel->both()) {
    unhealthy(out.notes.front());
  } else if (no_common && !running) {
    unhealthy(
        "the two sides share no snapshot (deleted by hand, or a pool "
        "restored from an older copy?): updates cannot run; break, then "
        "resync or reverse-resync to compare them chunk by chunk");
  } else if (r.schedule_seconds > 0 &&
             out.lag_seconds > 2 * r.schedule_seconds) {
    unhealthy(absl::StrCat("lag ", out.lag_seconds,
                           " s is more than twice the schedule (",
                           r.schedule_seconds,
                           " s): updates are not keeping "
                           "up"));
  }
  return out;
}

absl::StatusOr<std::vector<RelationshipReport>> Replication::ReportPool(
    const Endpoint& pool) {
  absl::StatusOr<Site*> site = sites_.Get(pool);
  if (!site.ok()) return site.status();
  absl::StatusOr<std::map<std::string, std::string>> records =
      (*site)->Records();
  if (!records.ok()) return records.status();
  std::vector<RelationshipReport> out;
  for (const auto& [volume, text] : *records) {
    Endpoint e = pool;
    e.volume = volume;
    absl::StatusOr<RelationshipReport> r = Report(e);
    if (absl::IsNotFound(r.status())) continue;  // released just now
    if (!r.ok()) return r.status();
    out.push_back(std::move(*r));
  }
  return out;
}

}  // namespace engine
