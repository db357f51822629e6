#include "engine/relationship.h"

#include <openssl/evp.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <random>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "blockstore/util.h"
#include "engine/delta_receive.h"
#include "engine/delta_send.h"
#include "engine/pipe.h"
#include "nlohmann/json.hpp"

namespace engine {

using blockstore::Pool;
using blockstore::SnapshotInfo;
using json = nlohmann::json;

namespace {

constexpr char kPropertyPrefix[] = "relationship:";
constexpr char kReestablish[] = "reestablish";

std::string PropertyKey(const std::string& volume) {
  return kPropertyPrefix + volume;
}

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

// "rep.<first 8 hex digits of the relationship id>.": this relationship's
// replication snapshots.
std::string RepPrefix(const std::string& id) {
  return absl::StrCat("rep.", id.substr(0, 8), ".");
}

double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
      .count();
}

bool HasVolume(Pool& pool, const std::string& volume) {
  return pool.GetVolume(volume).ok();
}

// Chunks that differ between `base` and `target` (empty: the live volume)
// of `volume`: data chunks, and all kinds together.
struct ChangeCount {
  uint64_t data_chunks = 0;
  uint64_t all_chunks = 0;
};
absl::StatusOr<ChangeCount> CountChanges(Pool& pool, const std::string& volume,
                                         const std::string& base,
                                         const std::string& target) {
  ChangeCount c;
  uint64_t from = 0;
  for (;;) {
    absl::StatusOr<blockstore::DiffBatch> b =
        pool.Diff(volume, base, target, from, 8192);
    if (!b.ok()) return b.status();
    for (const blockstore::ChangedRun& r : b->runs) {
      c.all_chunks += r.count_chunks;
      if (r.kind == blockstore::ChangedRun::Kind::kData) {
        c.data_chunks += r.count_chunks;
      }
    }
    if (b->done) return c;
    from = b->next_chunk;
  }
}

using Sha256 = std::array<uint8_t, 32>;

// SHA-256 of each of the first `chunks` chunks of `volume@snapshot` (empty:
// live); chunks past the volume's end count as zeros. Hash-diff decides what
// NOT to send from these, so they are cryptographic (volume data may be
// adversarial; XXH3 equality proves nothing).
absl::StatusOr<std::vector<Sha256>> HashChunks(Pool& pool,
                                               const std::string& volume,
                                               const std::string& snapshot,
                                               uint64_t size_bytes,
                                               uint64_t chunks) {
  const uint64_t cs = pool.chunk_size();
  const uint64_t per_read = std::max<uint64_t>(1, (8 << 20) / cs);
  std::vector<Sha256> out(chunks);
  std::vector<std::byte> buf(per_read * cs);
  for (uint64_t first = 0; first < chunks; first += per_read) {
    uint64_t n = std::min(per_read, chunks - first);
    uint64_t at = first * cs;
    std::fill(buf.begin(), buf.end(), std::byte{0});
    if (at < size_bytes) {
      uint64_t len = std::min(n * cs, size_bytes - at);
      if (absl::Status s = pool.Read(volume, snapshot, at,
                                     std::span<std::byte>(buf.data(), len));
          !s.ok()) {
        return s;
      }
    }
    for (uint64_t i = 0; i < n; ++i) {
      unsigned int len = 0;
      if (EVP_Digest(buf.data() + i * cs, cs, out[first + i].data(), &len,
                     EVP_sha256(), nullptr) != 1) {
        return absl::InternalError("SHA-256 failed (OpenSSL)");
      }
    }
  }
  return out;
}

std::string SafetyName(Pool& pool, const std::string& volume, int64_t now_ns) {
  std::string base = absl::StrCat(
      "safety-", absl::FormatTime("%Y%m%dT%H%M%SZ", absl::FromUnixNanos(now_ns),
                                  absl::UTCTimeZone()));
  std::string name = base;
  for (int i = 2; pool.GetSnapshot(volume, name).ok(); ++i) {
    name = absl::StrCat(base, "-", i);
  }
  return name;
}

}  // namespace

const char* ToString(MirrorState s) {
  switch (s) {
    case MirrorState::kUninitialized:
      return "Uninitialized";
    case MirrorState::kMirrored:
      return "Mirrored";
    case MirrorState::kBroken:
      return "Broken";
  }
  return "?";
}

const char* ToString(TransferStatus s) {
  return s == TransferStatus::kIdle ? "Idle" : "Transferring";
}

// --- The record ---------------------------------------------------------

std::string RelationshipRecord::ToJson() const {
  json j = {
      {"version", 1},
      {"id", id},
      {"epoch", epoch},
      {"source", {{"pool", source.pool}, {"volume", source.volume}}},
      {"destination",
       {{"pool", destination.pool}, {"volume", destination.volume}}},
      {"schedule_seconds", schedule_seconds},
      {"mirror_state", ToString(mirror_state)},
      {"relationship_status", ToString(status)},
      {"operation", operation},
      {"pending", pending},
      {"origin", {{"pool", origin.pool}, {"volume", origin.volume}}},
      {"next_snapshot", next_snapshot},
      {"last_transfer_end_ns", last_transfer_end_ns},
      {"last_transfer_bytes", last_transfer_bytes},
      {"last_transfer_data_bytes", last_transfer_data_bytes},
      {"last_transfer_seconds", last_transfer_seconds},
      {"last_transfer_error", last_transfer_error},
      {"total_transfer_bytes", total_transfer_bytes},
      {"progress_bytes", progress_bytes},
      {"progress_total_bytes", progress_total_bytes},
  };
  return j.dump();
}

absl::StatusOr<RelationshipRecord> RelationshipRecord::FromJson(
    const std::string& text) {
  RelationshipRecord r;
  try {
    json j = json::parse(text);
    if (j.at("version").get<int>() != 1) {
      return absl::UnimplementedError(
          absl::StrCat("relationship record version ", j.at("version").dump(),
                       " is newer than this tandem; upgrade it"));
    }
    r.id = j.at("id").get<std::string>();
    r.epoch = j.at("epoch").get<uint64_t>();
    r.source = {j.at("source").at("pool").get<std::string>(),
                j.at("source").at("volume").get<std::string>()};
    r.destination = {j.at("destination").at("pool").get<std::string>(),
                     j.at("destination").at("volume").get<std::string>()};
    r.schedule_seconds = j.at("schedule_seconds").get<int64_t>();
    std::string m = j.at("mirror_state").get<std::string>();
    if (m == "Uninitialized") {
      r.mirror_state = MirrorState::kUninitialized;
    } else if (m == "Mirrored") {
      r.mirror_state = MirrorState::kMirrored;
    } else if (m == "Broken") {
      r.mirror_state = MirrorState::kBroken;
    } else {
      return absl::DataLossError(
          absl::StrCat("relationship record: bad mirror_state '", m, "'"));
    }
    std::string st = j.at("relationship_status").get<std::string>();
    if (st != "Idle" && st != "Transferring") {
      return absl::DataLossError(absl::StrCat(
          "relationship record: bad relationship_status '", st, "'"));
    }
    r.status =
        st == "Idle" ? TransferStatus::kIdle : TransferStatus::kTransferring;
    r.operation = j.at("operation").get<std::string>();
    r.pending = j.at("pending").get<std::string>();
    r.origin = {j.at("origin").at("pool").get<std::string>(),
                j.at("origin").at("volume").get<std::string>()};
    r.next_snapshot = j.at("next_snapshot").get<uint64_t>();
    r.last_transfer_end_ns = j.at("last_transfer_end_ns").get<int64_t>();
    r.last_transfer_bytes = j.at("last_transfer_bytes").get<uint64_t>();
    r.last_transfer_data_bytes =
        j.at("last_transfer_data_bytes").get<uint64_t>();
    r.last_transfer_seconds = j.at("last_transfer_seconds").get<double>();
    r.last_transfer_error = j.at("last_transfer_error").get<std::string>();
    r.total_transfer_bytes = j.at("total_transfer_bytes").get<uint64_t>();
    r.progress_bytes = j.at("progress_bytes").get<uint64_t>();
    r.progress_total_bytes = j.at("progress_total_bytes").get<uint64_t>();
  } catch (const json::exception& e) {
    return absl::DataLossError(
        absl::StrCat("relationship record is malformed: ", e.what()));
  }
  return r;
}

std::string RelationshipRecord::Direction() const {
  return absl::StrCat(source.ToString(), " -> ", destination.ToString());
}

std::string LossPreview::Describe() const {
  std::string s;
  if (operation == "reestablish") {
    return absl::StrCat(
        "reestablish: ", overwritten.ToString(),
        " goes back to being the destination. Its writes since the last "
        "update are sent over first, then it is made equal to the other "
        "side: nothing written on it is lost.");
  }
  if (method == "new-volume") {
    return absl::StrCat(operation, ": volume ", overwritten.ToString(),
                        " is gone; a full baseline recreates it. Nothing "
                        "is overwritten.");
  }
  if (method == "hash-diff") {
    absl::StrAppend(&s, operation, ": ", overwritten.ToString(),
                    " shares no snapshot with the other side; ",
                    blockstore::FormatBytes(bytes), " (", bytes, " bytes in ",
                    chunks,
                    " chunks) differ by SHA-256 and will be overwritten.");
  } else {
    absl::StrAppend(&s, operation, ": ", overwritten.ToString(),
                    " rolls back to the common snapshot '", common_snapshot,
                    "'; ", blockstore::FormatBytes(bytes), " (", bytes,
                    " bytes in ", chunks,
                    " chunks) written there since will be overwritten.");
  }
  if (!kept_snapshots.empty()) {
    absl::StrAppend(&s, "\n  Its snapshots newer than that are kept: ",
                    absl::StrJoin(kept_snapshots, ", "), ".");
  }
  if (!safety_snapshot.empty()) {
    absl::StrAppend(&s, "\n  Its current content is kept in snapshot '",
                    overwritten.volume, "@", safety_snapshot,
                    "' until you delete it.");
  }
  return s;
}

// --- Loading and saving ---------------------------------------------------

struct Replication::Loaded {
  RelationshipRecord rec;
  Pool* src = nullptr;  // null: could not be opened (src_error says why)
  Pool* dst = nullptr;
  absl::Status src_error, dst_error;
};

int64_t Replication::Now() const {
  return now_ ? now_() : absl::GetCurrentTimeNanos();
}

void Replication::Inactive(const std::string& id) {
  std::lock_guard<std::mutex> lock(mu_);
  active_.erase(id);
}

std::optional<std::string> Replication::Running(const std::string& id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = active_.find(id);
  if (it == active_.end()) return std::nullopt;
  return it->second;
}

bool Replication::InRelationship(Pool& pool, const std::string& volume) {
  return pool.Properties().contains(PropertyKey(volume));
}

bool Replication::IsReplicationSnapshot(const std::string& name) {
  return absl::StartsWith(name, "rep.");
}

std::optional<SnapshotInfo> Replication::CommonSnapshot(
    Pool& a, const std::string& volume_a, Pool& b,
    const std::string& volume_b) {
  absl::StatusOr<std::vector<SnapshotInfo>> sa = a.ListSnapshots(volume_a);
  absl::StatusOr<std::vector<SnapshotInfo>> sb = b.ListSnapshots(volume_b);
  if (!sa.ok() || !sb.ok()) return std::nullopt;
  for (auto it = sa->rbegin(); it != sa->rend(); ++it) {
    for (const SnapshotInfo& s : *sb) {
      if (s.guid == it->guid) return *it;
    }
  }
  return std::nullopt;
}

absl::StatusOr<Replication::Loaded> Replication::Load(const Endpoint& either) {
  absl::StatusOr<Pool*> here = pools_.Get(either.pool);
  if (!here.ok()) return here.status();
  auto props = (*here)->Properties();
  auto it = props.find(PropertyKey(either.volume));
  if (it == props.end()) {
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
  bool here_is_source = rec->source == either;
  if (!here_is_source && !(rec->destination == either)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the relationship record of ", either.ToString(), " names ",
        rec->Direction(),
        "; was the pool moved? Name it by the path the relationship was "
        "created with"));
  }
  const Endpoint& other = here_is_source ? rec->destination : rec->source;
  absl::StatusOr<Pool*> there = pools_.Get(other.pool);
  bool there_stale = false;
  if (there.ok()) {
    auto other_props = (*there)->Properties();
    auto ot = other_props.find(PropertyKey(other.volume));
    if (ot == other_props.end()) {
      there_stale = true;
    } else {
      absl::StatusOr<RelationshipRecord> orec =
          RelationshipRecord::FromJson(ot->second);
      if (orec.ok() && orec->id == rec->id) {
        if (orec->epoch > rel.rec.epoch) {
          rel.rec = *orec;
          // The newer copy wins; bring this side up to date.
          (*here)
              ->SetProperty(PropertyKey(either.volume), rel.rec.ToJson())
              .IgnoreError();
        } else if (orec->epoch < rel.rec.epoch) {
          there_stale = true;
        }
      } else if (!orec.ok() || orec->id != rec->id) {
        return absl::FailedPreconditionError(absl::StrCat(
            other.ToString(), " holds a different relationship record than ",
            either.ToString(), "; release one of them"));
      }
    }
    if (there_stale) {
      (*there)
          ->SetProperty(PropertyKey(other.volume), rel.rec.ToJson())
          .IgnoreError();
    }
  }
  // After a reverse resync the record's source may be the other side.
  bool src_here = rel.rec.source == either;
  Pool* other_pool = there.ok() ? *there : nullptr;
  absl::Status other_error = there.ok() ? absl::OkStatus() : there.status();
  rel.src = src_here ? *here : other_pool;
  rel.dst = src_here ? other_pool : *here;
  rel.src_error = src_here ? absl::OkStatus() : other_error;
  rel.dst_error = src_here ? other_error : absl::OkStatus();
  return rel;
}

absl::Status Replication::Save(Loaded& rel, bool require_both, bool prune) {
  if (require_both) {
    if (rel.src == nullptr) return rel.src_error;
    if (rel.dst == nullptr) return rel.dst_error;
  }
  std::optional<SnapshotInfo> common;
  if (prune && rel.src != nullptr && rel.dst != nullptr) {
    common = CommonSnapshot(*rel.src, rel.rec.source.volume, *rel.dst,
                            rel.rec.destination.volume);
  }
  ++rel.rec.epoch;
  const std::string text = rel.rec.ToJson();
  // The record and the pruning land in one commit per pool, both pools at
  // once (the epoch orders them, not the sequence).
  auto save = [&](Pool* pool, const std::string& volume) {
    if (pool == nullptr) return absl::OkStatus();
    pool->BeginGroup();
    absl::Status s = common ? PruneSnapshots(*pool, volume, rel.rec.id, *common)
                            : absl::OkStatus();
    if (s.ok()) s = pool->SetProperty(PropertyKey(volume), text);
    absl::Status ended = pool->EndGroup();
    return s.ok() ? ended : s;
  };
  absl::Status src_saved;
  std::thread src_thread(
      [&] { src_saved = save(rel.src, rel.rec.source.volume); });
  absl::Status dst_saved = save(rel.dst, rel.rec.destination.volume);
  src_thread.join();
  return dst_saved.ok() ? src_saved : dst_saved;
}

absl::Status Replication::CheckNotActive(const Loaded& rel) {
  if (std::optional<std::string> op = Running(rel.rec.id)) {
    return absl::FailedPreconditionError(
        absl::StrCat("relationship ", rel.rec.Direction(), " is Transferring (",
                     *op, " in progress); wait until its status is Idle"));
  }
  return absl::OkStatus();
}

// A new replication snapshot of `volume` on `pool` (the sender). The name
// counter is saved with the record at the end of a transfer: after a crash,
// names it handed out may exist already, on either side.
absl::StatusOr<std::string> Replication::TakeReplicationSnapshot(
    Loaded& rel, Pool& pool, const std::string& volume) {
  for (;;) {
    std::string name = absl::StrFormat("%s%06d", RepPrefix(rel.rec.id),
                                       rel.rec.next_snapshot++);
    bool taken = false;
    for (auto [pool, volume] :
         {std::pair{rel.src, rel.rec.source.volume},
          std::pair{rel.dst, rel.rec.destination.volume}}) {
      taken =
          taken || (pool != nullptr && pool->GetSnapshot(volume, name).ok());
    }
    if (taken) continue;
    absl::StatusOr<SnapshotInfo> snap = pool.CreateSnapshot(volume, name);
    if (!snap.ok()) return snap.status();
    return name;
  }
}

// An operation found Transferring here was interrupted (this process holds
// both pools, so nobody else runs it). Finish it from the data if its
// transfer completed, else put back the state it started from.
absl::StatusOr<std::string> Replication::Recover(Loaded& rel) {
  if (rel.rec.status != TransferStatus::kTransferring) return std::string();
  if (rel.src == nullptr) return rel.src_error;
  if (rel.dst == nullptr) return rel.dst_error;
  const std::string op = rel.rec.operation;
  const bool reverse = op == "reverse-resync";
  Pool& sender = reverse ? *rel.dst : *rel.src;
  Pool& receiver = reverse ? *rel.src : *rel.dst;
  const std::string sv =
      reverse ? rel.rec.destination.volume : rel.rec.source.volume;
  const std::string rv =
      reverse ? rel.rec.source.volume : rel.rec.destination.volume;
  // A receive cut short leaves its staging volume: give the space back.
  if (absl::Status s = receiver.DeleteVolume(absl::StrCat(".recv-", rv), true);
      !s.ok() && !absl::IsNotFound(s)) {
    return s;
  }
  bool done = false;
  absl::StatusOr<std::vector<SnapshotInfo>> sent = sender.ListSnapshots(sv);
  absl::StatusOr<std::vector<SnapshotInfo>> got = receiver.ListSnapshots(rv);
  if (sent.ok() && got.ok() && !sent->empty() && !got->empty() &&
      got->back().guid == sent->back().guid) {
    absl::StatusOr<bool> changed = receiver.ChangedSince(rv, got->back().name);
    done = changed.ok() && !*changed;
  }
  rel.rec.status = TransferStatus::kIdle;
  rel.rec.operation.clear();
  if (done) {
    if (reverse) std::swap(rel.rec.source, rel.rec.destination);
    if (reverse) std::swap(rel.src, rel.dst);
    rel.rec.mirror_state = MirrorState::kMirrored;
    rel.rec.last_transfer_error.clear();
    if (absl::Status s = receiver.SetVolumeReadOnly(rv, true); !s.ok()) {
      return s;
    }
  } else {
    rel.rec.mirror_state = op == "initialize" ? MirrorState::kUninitialized
                           : op == "update"   ? MirrorState::kMirrored
                                              : MirrorState::kBroken;
    rel.rec.last_transfer_error =
        absl::StrCat(op,
                     " was interrupted (crash or kill) before it "
                     "completed; nothing was changed; run it again");
    if (rel.rec.mirror_state == MirrorState::kBroken &&
        HasVolume(receiver, rv)) {
      if (absl::Status s = receiver.SetVolumeReadOnly(rv, false); !s.ok()) {
        return s;
      }
    }
  }
  if (absl::Status s = Save(rel, true, /*prune=*/done); !s.ok()) return s;
  return done ? op : std::string();
}

// `persist`: record Transferring in both pools before any data changes, so
// that a crash is recovered from the record. An update does without (two
// commits fewer on the hot path): until it ends, its only changes are a new
// replication snapshot on the source (the next update ships it as well) and
// an atomic receive, so the Mirrored record stays true whatever happens.
absl::Status Replication::Begin(Loaded& rel, const std::string& operation,
                                bool persist) {
  if (rel.src == nullptr) return rel.src_error;
  if (rel.dst == nullptr) return rel.dst_error;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!active_.emplace(rel.rec.id, operation).second) {
      return absl::FailedPreconditionError(absl::StrCat(
          "relationship ", rel.rec.Direction(), " is Transferring"));
    }
  }
  rel.rec.status = TransferStatus::kTransferring;
  rel.rec.operation = operation;
  rel.rec.progress_bytes = 0;
  rel.rec.progress_total_bytes = 0;
  if (persist) {
    if (absl::Status s = Save(rel, true); !s.ok()) {
      Inactive(rel.rec.id);
      return s;
    }
  }
  if (transfer_started_) transfer_started_(operation);
  return absl::OkStatus();
}

absl::Status Replication::Finish(Loaded& rel, const TransferStats& stats) {
  rel.rec.status = TransferStatus::kIdle;
  rel.rec.operation.clear();
  rel.rec.last_transfer_end_ns = Now();
  rel.rec.last_transfer_bytes = stats.stream_bytes;
  rel.rec.last_transfer_data_bytes = stats.data_bytes;
  rel.rec.last_transfer_seconds = stats.seconds;
  rel.rec.last_transfer_error.clear();
  rel.rec.total_transfer_bytes += stats.stream_bytes;
  rel.rec.progress_bytes = rel.rec.progress_total_bytes;
  absl::Status s = Save(rel, true, /*prune=*/true);
  Inactive(rel.rec.id);
  return s;
}

absl::Status Replication::Fail(Loaded& rel, const absl::Status& error) {
  rel.rec.status = TransferStatus::kIdle;
  rel.rec.operation.clear();
  rel.rec.last_transfer_end_ns = Now();
  rel.rec.last_transfer_error = std::string(error.message());
  // Best effort: a pool that failed may refuse this too; the next command
  // then recovers from the Transferring record.
  Save(rel, false).IgnoreError();
  Inactive(rel.rec.id);
  return error;
}

// Replication snapshots of this relationship older than the last common
// one are no longer a possible base: delete them. The common one itself is
// kept (only release deletes it); user and safety snapshots are never
// touched.
absl::Status Replication::PruneSnapshots(Pool& pool, const std::string& volume,
                                         const std::string& id,
                                         const SnapshotInfo& common) {
  const std::string prefix = RepPrefix(id);
  absl::StatusOr<std::vector<SnapshotInfo>> snaps = pool.ListSnapshots(volume);
  if (!snaps.ok()) return snaps.status();
  for (const SnapshotInfo& s : *snaps) {
    if (s.guid == common.guid) break;  // newer ones stay
    if (absl::StartsWith(s.name, prefix)) {
      if (absl::Status st = pool.DeleteSnapshot(volume, s.name); !st.ok()) {
        return st;
      }
    }
  }
  return absl::OkStatus();
}

// --- Moving data ------------------------------------------------------------

namespace {

struct StepResult {
  uint64_t stream_bytes = 0;
  uint64_t data_bytes = 0;
};

// One delta, `from_volume@base..target` (base empty: full), streamed through
// an in-process pipe into `to_volume`: the sender on its own thread, the
// receiver here, so reading, compressing and applying overlap.
absl::StatusOr<StepResult> Step(
    Pool& from, const std::string& from_volume, const std::string& base,
    const std::string& target, Pool& to, const std::string& to_volume,
    bool rollback, const std::function<void(uint64_t, uint64_t)>& progress) {
  Pipe pipe;
  absl::StatusOr<SendStats> sent;
  std::thread sender([&] {
    SendOptions options;
    options.progress = progress;
    sent = SendDelta(from, from_volume, base, target, pipe.sink(), options);
    pipe.CloseWrite(sent.ok() ? absl::OkStatus() : sent.status());
  });
  ApplyOptions options;
  options.rollback = rollback;
  absl::StatusOr<ApplyStats> applied =
      ApplyDelta(to, to_volume, pipe.source(), options);
  if (!applied.ok()) pipe.AbortRead(applied.status());
  sender.join();
  if (!sent.ok()) return sent.status();
  if (!applied.ok()) return applied.status();
  return StepResult{sent->stream_bytes,
                    applied->chunks_written * uint64_t{to.chunk_size()}};
}

// The sender's snapshots from the last one both sides hold, oldest first:
// {common, every snapshot after it}, user snapshots included.
absl::StatusOr<std::vector<std::string>> ChainSinceCommon(
    Pool& from, const std::string& from_volume, Pool& to,
    const std::string& to_volume) {
  std::optional<SnapshotInfo> common =
      Replication::CommonSnapshot(from, from_volume, to, to_volume);
  if (!common) {
    return absl::FailedPreconditionError(
        "the two volumes share no snapshot any more (deleted by hand?): "
        "break, then resync or reverse-resync to compare them chunk by "
        "chunk");
  }
  absl::StatusOr<std::vector<SnapshotInfo>> snaps =
      from.ListSnapshots(from_volume);
  if (!snaps.ok()) return snaps.status();
  std::vector<std::string> chain = {common->name};
  bool after = false;
  for (const SnapshotInfo& s : *snaps) {
    if (after) chain.push_back(s.name);
    after = after || s.guid == common->guid;
  }
  return chain;
}

}  // namespace

// Ships chain[0]..chain[1], chain[1]..chain[2], ... (chain[0] empty: a full
// delta of chain[1]) one delta each, so the receiver gets every snapshot.
absl::StatusOr<TransferStats> Replication::Transfer(
    Loaded& rel, Pool& from, const std::string& from_volume, Pool& to,
    const std::string& to_volume, const std::vector<std::string>& chain,
    bool rollback_first) {
  auto start = std::chrono::steady_clock::now();
  std::vector<uint64_t> step_total;
  uint64_t total = 0;
  for (size_t i = 1; i < chain.size(); ++i) {
    absl::StatusOr<ChangeCount> c =
        CountChanges(from, from_volume, chain[i - 1], chain[i]);
    if (!c.ok()) return c.status();
    step_total.push_back(c->data_chunks * from.chunk_size());
    total += step_total.back();
  }
  rel.rec.progress_total_bytes = total;
  rel.rec.progress_bytes = 0;
  if (progress_) progress_(rel.rec);
  TransferStats stats;
  uint64_t done_before = 0;
  for (size_t i = 1; i < chain.size(); ++i) {
    const uint64_t this_total = step_total[i - 1];
    auto progress = [&, this_total](uint64_t d, uint64_t t) {
      if (!progress_) return;
      RelationshipRecord now = rel.rec;
      now.progress_bytes =
          done_before + (t == 0 ? 0 : this_total * std::min(d, t) / t);
      progress_(now);
    };
    absl::StatusOr<StepResult> r =
        Step(from, from_volume, chain[i - 1], chain[i], to, to_volume,
             rollback_first && i == 1, progress);
    if (!r.ok()) return r.status();
    stats.stream_bytes += r->stream_bytes;
    stats.data_bytes += r->data_bytes;
    ++stats.snapshots;
    done_before += this_total;
    rel.rec.progress_bytes = done_before;
  }
  if (progress_) progress_(rel.rec);
  stats.seconds = SecondsSince(start);
  return stats;
}

// No common snapshot, but the receiver still has data: compare SHA-256 of
// every chunk on both sides and write only the chunks that differ into a
// staging clone of the receiver's `to_base` snapshot, committed atomically
// as the sender's `snapshot` (same identity, digest checked). On the wire
// this is one digest list (32 bytes a chunk) plus the differing chunks.
absl::StatusOr<TransferStats> Replication::HashDiffTransfer(
    Loaded& rel, Pool& from, const std::string& from_volume,
    const std::string& snapshot, Pool& to, const std::string& to_volume,
    const std::string& to_base) {
  auto start = std::chrono::steady_clock::now();
  absl::StatusOr<SnapshotInfo> target = from.GetSnapshot(from_volume, snapshot);
  if (!target.ok()) return target.status();
  absl::StatusOr<SnapshotInfo> base = to.GetSnapshot(to_volume, to_base);
  if (!base.ok()) return base.status();
  absl::StatusOr<blockstore::VolumeInfo> to_info = to.GetVolume(to_volume);
  if (!to_info.ok()) return to_info.status();
  const uint64_t cs = from.chunk_size();
  const uint64_t chunks = (target->size_bytes + cs - 1) / cs;
  absl::StatusOr<std::vector<Sha256>> mine =
      HashChunks(from, from_volume, snapshot, target->size_bytes, chunks);
  if (!mine.ok()) return mine.status();
  absl::StatusOr<std::vector<Sha256>> theirs =
      HashChunks(to, to_volume, to_base, base->size_bytes, chunks);
  if (!theirs.ok()) return theirs.status();
  std::vector<uint64_t> differ;
  for (uint64_t i = 0; i < chunks; ++i) {
    if ((*mine)[i] != (*theirs)[i]) differ.push_back(i);
  }
  rel.rec.progress_total_bytes = differ.size() * cs;
  rel.rec.progress_bytes = 0;
  if (progress_) progress_(rel.rec);

  const std::string staging = absl::StrCat(".recv-", to_volume);
  if (absl::Status s = to.BeginReceive(staging, to_volume, to_base, 0);
      !s.ok()) {
    return s;
  }
  auto fail = [&](absl::Status s) {
    to.DeleteVolume(staging, true).IgnoreError();
    return s;
  };
  if (base->size_bytes != target->size_bytes) {
    if (absl::Status s = to.ResizeVolume(staging, target->size_bytes);
        !s.ok()) {
      return fail(s);
    }
  }
  std::vector<std::byte> buf(cs);
  for (size_t k = 0; k < differ.size(); ++k) {
    uint64_t at = differ[k] * cs;
    uint64_t len = std::min<uint64_t>(cs, target->size_bytes - at);
    std::span<std::byte> piece(buf.data(), len);
    if (absl::Status s = from.Read(from_volume, snapshot, at, piece); !s.ok()) {
      return fail(s);
    }
    if (absl::Status s = to.Write(staging, at, piece); !s.ok()) return fail(s);
    rel.rec.progress_bytes = (k + 1) * cs;
    if (progress_ && (k % 256 == 255)) progress_(rel.rec);
  }
  absl::StatusOr<SnapshotInfo> got =
      to.FinishReceive(staging, to_volume, to_info->guid,
                       {target->name, target->guid, target->create_time_ns, ""},
                       target->root_digest);
  if (!got.ok()) return fail(got.status());
  if (progress_) progress_(rel.rec);
  TransferStats stats;
  stats.data_bytes = differ.size() * cs;
  stats.stream_bytes = differ.size() * (cs + 16) + chunks * 32;
  stats.snapshots = 1;
  stats.seconds = SecondsSince(start);
  return stats;
}

// --- Operations
// ---------------------------------------------------------------

absl::StatusOr<RelationshipRecord> Replication::Create(
    const Endpoint& source, const Endpoint& destination,
    int64_t schedule_seconds) {
  absl::StatusOr<Pool*> src = pools_.Get(source.pool);
  if (!src.ok()) return src.status();
  absl::StatusOr<Pool*> dst = pools_.Get(destination.pool);
  if (!dst.ok()) return dst.status();
  if (*src == *dst || (*src)->Info().pool_guid == (*dst)->Info().pool_guid) {
    return absl::InvalidArgumentError(
        "source and destination must be in different pools");
  }
  if ((*src)->chunk_size() != (*dst)->chunk_size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the source pool has ", (*src)->chunk_size(),
        "-byte chunks and the destination pool ", (*dst)->chunk_size(),
        "; create the destination pool with --chunk-size ",
        (*src)->chunk_size()));
  }
  if (absl::StatusOr<blockstore::VolumeInfo> v =
          (*src)->GetVolume(source.volume);
      !v.ok()) {
    return v.status();
  }
  if ((*dst)->GetVolume(destination.volume).ok()) {
    return absl::AlreadyExistsError(absl::StrCat(
        "destination volume ", destination.ToString(),
        " exists; initialize creates it: pick a new name or delete it"));
  }
  for (auto [pool, ep] :
       {std::pair{*src, source}, std::pair{*dst, destination}}) {
    if (pool->Properties().contains(PropertyKey(ep.volume))) {
      return absl::AlreadyExistsError(absl::StrCat(
          ep.ToString(), " is already in a relationship; release it first"));
    }
  }
  if (schedule_seconds < 0) {
    return absl::InvalidArgumentError("the schedule must not be negative");
  }
  Loaded rel;
  rel.rec.id = NewId();
  rel.rec.source = source;
  rel.rec.origin = source;
  rel.rec.destination = destination;
  rel.rec.schedule_seconds = schedule_seconds;
  rel.src = *src;
  rel.dst = *dst;
  if (absl::Status s = Save(rel, true); !s.ok()) return s;
  return rel.rec;
}

absl::StatusOr<TransferStats> Replication::Initialize(const Endpoint& either) {
  absl::StatusOr<Loaded> rel = Load(either);
  if (!rel.ok()) return rel.status();
  if (absl::Status s = CheckNotActive(*rel); !s.ok()) return s;
  absl::StatusOr<std::string> recovered = Recover(*rel);
  if (!recovered.ok()) return recovered.status();
  if (*recovered == "initialize") return TransferStats{};
  RelationshipRecord& r = rel->rec;
  // Run again after it completed (a crash before the reply): done.
  if (r.mirror_state == MirrorState::kMirrored) return TransferStats{};
  if (r.mirror_state != MirrorState::kUninitialized) {
    return absl::FailedPreconditionError(
        absl::StrCat("relationship ", r.Direction(),
                     " is already initialized (mirror state ",
                     ToString(r.mirror_state), "); use update"));
  }
  if (rel->src == nullptr) return rel->src_error;
  if (rel->dst == nullptr) return rel->dst_error;
  if (HasVolume(*rel->dst, r.destination.volume)) {
    return absl::FailedPreconditionError(
        absl::StrCat("destination volume ", r.destination.ToString(),
                     " exists; initialize creates it: delete it first"));
  }
  if (absl::Status s = Begin(*rel, "initialize", /*persist=*/true); !s.ok()) {
    return s;
  }
  absl::StatusOr<std::string> snap =
      TakeReplicationSnapshot(*rel, *rel->src, r.source.volume);
  if (!snap.ok()) return Fail(*rel, snap.status());
  absl::StatusOr<TransferStats> stats =
      Transfer(*rel, *rel->src, r.source.volume, *rel->dst,
               r.destination.volume, {"", *snap}, false);
  if (!stats.ok()) return Fail(*rel, stats.status());
  if (absl::Status s = rel->dst->SetVolumeReadOnly(r.destination.volume, true);
      !s.ok()) {
    return Fail(*rel, s);
  }
  r.mirror_state = MirrorState::kMirrored;
  if (absl::Status s = Finish(*rel, *stats); !s.ok()) return s;
  return stats;
}

absl::StatusOr<TransferStats> Replication::Update(const Endpoint& either) {
  absl::StatusOr<Loaded> rel = Load(either);
  if (!rel.ok()) return rel.status();
  if (absl::Status s = CheckNotActive(*rel); !s.ok()) return s;
  if (absl::StatusOr<std::string> r = Recover(*rel); !r.ok()) return r.status();
  RelationshipRecord& r = rel->rec;
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
  if (rel->src == nullptr) return rel->src_error;
  if (rel->dst == nullptr) return rel->dst_error;
  if (absl::Status s = rel->dst->SetVolumeReadOnly(r.destination.volume, true);
      !s.ok()) {
    return s;
  }
  if (absl::Status s = Begin(*rel, "update", /*persist=*/false); !s.ok()) {
    return s;
  }
  absl::StatusOr<std::string> snap =
      TakeReplicationSnapshot(*rel, *rel->src, r.source.volume);
  if (!snap.ok()) return Fail(*rel, snap.status());
  absl::StatusOr<std::vector<std::string>> chain = ChainSinceCommon(
      *rel->src, r.source.volume, *rel->dst, r.destination.volume);
  if (!chain.ok()) return Fail(*rel, chain.status());
  absl::StatusOr<TransferStats> stats =
      Transfer(*rel, *rel->src, r.source.volume, *rel->dst,
               r.destination.volume, *chain, false);
  if (!stats.ok()) return Fail(*rel, stats.status());
  if (absl::Status s = Finish(*rel, *stats); !s.ok()) return s;
  return stats;
}

absl::Status Replication::Break(const Endpoint& either) {
  absl::StatusOr<Loaded> rel = Load(either);
  if (!rel.ok()) return rel.status();
  RelationshipRecord& r = rel->rec;
  const std::string name = r.Direction();
  if (std::optional<std::string> op = Running(r.id)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "cannot break ", name, ": relationship status is Transferring (", *op,
        " in progress); wait until it is Idle, then break"));
  }
  if (rel->src != nullptr && rel->dst != nullptr) {
    if (absl::StatusOr<std::string> rec = Recover(*rel); !rec.ok()) {
      return rec.status();
    }
  } else if (r.status == TransferStatus::kTransferring) {
    // The source is lost mid-transfer: the destination is still at its last
    // complete snapshot (apply is atomic), so breaking is safe.
    r.status = TransferStatus::kIdle;
    r.last_transfer_error = absl::StrCat(r.operation, " was interrupted");
    r.operation.clear();
  }
  if (r.mirror_state == MirrorState::kUninitialized) {
    return absl::FailedPreconditionError(absl::StrCat(
        "cannot break ", name,
        ": mirror state is Uninitialized (no baseline yet); run `tandem "
        "relationship initialize` first, or release it"));
  }
  if (rel->dst == nullptr) return rel->dst_error;
  if (absl::Status s = rel->dst->SetVolumeReadOnly(r.destination.volume, false);
      !s.ok()) {
    return s;
  }
  if (r.mirror_state == MirrorState::kBroken) return absl::OkStatus();
  r.mirror_state = MirrorState::kBroken;
  return Save(*rel, false);
}

absl::StatusOr<LossPreview> Replication::Preview(Loaded& rel,
                                                 const std::string& operation,
                                                 bool reverse) {
  const RelationshipRecord& r = rel.rec;
  Pool& sender = reverse ? *rel.dst : *rel.src;
  Pool& receiver = reverse ? *rel.src : *rel.dst;
  const std::string& sv = reverse ? r.destination.volume : r.source.volume;
  LossPreview p;
  p.operation = operation;
  p.overwritten = reverse ? r.source : r.destination;
  const std::string& rv = p.overwritten.volume;
  if (!HasVolume(receiver, rv)) {
    p.method = "new-volume";
    return p;
  }
  const uint64_t cs = receiver.chunk_size();
  std::optional<SnapshotInfo> common = CommonSnapshot(sender, sv, receiver, rv);
  if (common) {
    p.method = "rollback";
    p.common_snapshot = common->name;
    absl::StatusOr<ChangeCount> c =
        CountChanges(receiver, rv, common->name, "");
    if (!c.ok()) return c.status();
    p.chunks = c->all_chunks;
    p.bytes = c->all_chunks * cs;
    absl::StatusOr<std::vector<SnapshotInfo>> snaps =
        receiver.ListSnapshots(rv);
    if (!snaps.ok()) return snaps.status();
    bool after = false;
    for (const SnapshotInfo& s : *snaps) {
      if (after) p.kept_snapshots.push_back(s.name);
      after = after || s.guid == common->guid;
    }
    absl::StatusOr<bool> changed =
        receiver.ChangedSince(rv, snaps->back().name);
    if (!changed.ok()) return changed.status();
    if (p.bytes > 0 || *changed)
      p.safety_snapshot = SafetyName(receiver, rv, Now());
    return p;
  }
  p.method = "hash-diff";
  absl::StatusOr<blockstore::VolumeInfo> si = sender.GetVolume(sv);
  if (!si.ok()) return si.status();
  absl::StatusOr<blockstore::VolumeInfo> ri = receiver.GetVolume(rv);
  if (!ri.ok()) return ri.status();
  const uint64_t chunks = (si->size_bytes + cs - 1) / cs;
  absl::StatusOr<std::vector<Sha256>> a =
      HashChunks(sender, sv, "", si->size_bytes, chunks);
  if (!a.ok()) return a.status();
  absl::StatusOr<std::vector<Sha256>> b =
      HashChunks(receiver, rv, "", ri->size_bytes, chunks);
  if (!b.ok()) return b.status();
  for (uint64_t i = 0; i < chunks; ++i) p.chunks += (*a)[i] != (*b)[i];
  p.bytes = p.chunks * cs;
  p.safety_snapshot = SafetyName(receiver, rv, Now());
  return p;
}

// resync (reverse = false: the destination is overwritten from the source)
// and reverse resync (reverse = true: the source from the destination, and
// the direction flips).
absl::StatusOr<TransferStats> Replication::Overwrite(
    Loaded& rel, const std::string& operation, bool reverse,
    const Confirm& confirm) {
  RelationshipRecord& r = rel.rec;
  const std::string name = r.Direction();
  // Mirrored: it already ran (a crash before the reply), or there is
  // nothing to resync; either way nothing to do.
  if (r.mirror_state == MirrorState::kMirrored) return TransferStats{};
  if (r.mirror_state != MirrorState::kBroken) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot ", operation, " ", name, ": mirror state is ",
                     ToString(r.mirror_state),
                     "; run `tandem relationship initialize` "
                     "first"));
  }
  if (rel.src == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(
        "cannot ", operation, ": the source pool cannot be opened (",
        rel.src_error.message(),
        "); if it is lost for good, create an empty pool at ", r.source.pool,
        " and run ", operation, " again"));
  }
  if (rel.dst == nullptr) return rel.dst_error;
  absl::StatusOr<LossPreview> preview = Preview(rel, operation, reverse);
  if (!preview.ok()) return preview.status();
  if (!confirm(*preview)) {
    return absl::CancelledError(
        absl::StrCat(operation, " cancelled; nothing was changed"));
  }
  Pool& sender = reverse ? *rel.dst : *rel.src;
  Pool& receiver = reverse ? *rel.src : *rel.dst;
  const std::string sv = reverse ? r.destination.volume : r.source.volume;
  const std::string rv = reverse ? r.source.volume : r.destination.volume;
  if (absl::Status s = Begin(rel, operation, /*persist=*/true); !s.ok()) {
    return s;
  }
  auto undo = [&](absl::Status s) {
    if (HasVolume(receiver, rv)) {
      receiver.SetVolumeReadOnly(rv, false).IgnoreError();
    }
    return Fail(rel, s);
  };
  if (!preview->safety_snapshot.empty()) {
    if (absl::StatusOr<SnapshotInfo> s =
            receiver.CreateSnapshot(rv, preview->safety_snapshot);
        !s.ok()) {
      return undo(s.status());
    }
  }
  if (preview->method != "new-volume") {
    if (absl::Status s = receiver.SetVolumeReadOnly(rv, true); !s.ok()) {
      return undo(s);
    }
  }
  absl::StatusOr<std::string> snap = TakeReplicationSnapshot(rel, sender, sv);
  if (!snap.ok()) return undo(snap.status());
  absl::StatusOr<TransferStats> stats;
  if (preview->method == "new-volume") {
    stats = Transfer(rel, sender, sv, receiver, rv, {"", *snap}, false);
  } else if (preview->method == "hash-diff") {
    stats = HashDiffTransfer(rel, sender, sv, *snap, receiver, rv,
                             preview->safety_snapshot);
  } else {
    absl::StatusOr<std::vector<std::string>> chain =
        ChainSinceCommon(sender, sv, receiver, rv);
    stats = chain.ok() ? Transfer(rel, sender, sv, receiver, rv, *chain, true)
                       : chain.status();
  }
  if (!stats.ok()) return undo(stats.status());
  if (absl::Status s = receiver.SetVolumeReadOnly(rv, true); !s.ok()) {
    return undo(s);
  }
  if (reverse) {
    std::swap(r.source, r.destination);
    std::swap(rel.src, rel.dst);
  }
  r.mirror_state = MirrorState::kMirrored;
  if (absl::Status s = Finish(rel, *stats); !s.ok()) return s;
  return stats;
}

absl::StatusOr<TransferStats> Replication::Resync(const Endpoint& either,
                                                  const Confirm& confirm) {
  absl::StatusOr<Loaded> rel = Load(either);
  if (!rel.ok()) return rel.status();
  if (absl::Status s = CheckNotActive(*rel); !s.ok()) return s;
  absl::StatusOr<std::string> recovered = Recover(*rel);
  if (!recovered.ok()) return recovered.status();
  if (*recovered == "resync") return TransferStats{};
  return Overwrite(*rel, "resync", false, confirm);
}

absl::StatusOr<TransferStats> Replication::ReverseResync(
    const Endpoint& either, const Confirm& confirm) {
  absl::StatusOr<Loaded> rel = Load(either);
  if (!rel.ok()) return rel.status();
  if (absl::Status s = CheckNotActive(*rel); !s.ok()) return s;
  if (rel->src != nullptr) {
    absl::StatusOr<std::string> recovered = Recover(*rel);
    if (!recovered.ok()) return recovered.status();
    if (*recovered == "reverse-resync") return TransferStats{};
  }
  return Overwrite(*rel, "reverse-resync", true, confirm);
}

// The seed's last section: with the mirror running destination -> source
// after a reverse resync, bring the original direction back. Steps: update
// (so nothing written on the current source is lost), break, reverse resync.
// A crash part way leaves `pending` set: run it again to go on.
absl::StatusOr<TransferStats> Replication::Reestablish(const Endpoint& either,
                                                       const Confirm& confirm) {
  absl::StatusOr<Loaded> rel = Load(either);
  if (!rel.ok()) return rel.status();
  if (absl::Status s = CheckNotActive(*rel); !s.ok()) return s;
  if (absl::StatusOr<std::string> r = Recover(*rel); !r.ok()) return r.status();
  TransferStats total;
  auto add = [&](const TransferStats& t) {
    total.stream_bytes += t.stream_bytes;
    total.data_bytes += t.data_bytes;
    total.snapshots += t.snapshots;
    total.seconds += t.seconds;
  };
  const bool home = rel->rec.mirror_state == MirrorState::kMirrored &&
                    rel->rec.source == rel->rec.origin;
  if (rel->rec.pending != kReestablish) {
    RelationshipRecord& r = rel->rec;
    if (home) return total;  // already the original direction
    if (r.mirror_state != MirrorState::kMirrored) {
      return absl::FailedPreconditionError(absl::StrCat(
          "cannot reestablish ", r.Direction(), ": mirror state is ",
          ToString(r.mirror_state),
          "; reestablish turns a Mirrored relationship around (after a "
          "reverse resync)"));
    }
    LossPreview p;
    p.operation = "reestablish";
    p.overwritten = r.source;
    p.method = "reestablish";
    if (!confirm(p)) {
      return absl::CancelledError("reestablish cancelled; nothing was changed");
    }
    r.pending = kReestablish;
    if (absl::Status s = Save(*rel, true); !s.ok()) return s;
  }
  // Run again after a crash, `pending` is set and the state says which step
  // it reached: still Mirrored backwards (update and break to do), Broken
  // (the reverse resync to do), or home (only `pending` to clear).
  if (!home && rel->rec.mirror_state == MirrorState::kMirrored) {
    absl::StatusOr<TransferStats> u = Update(either);
    if (!u.ok()) return u.status();
    add(*u);
    if (absl::Status s = Break(either); !s.ok()) return s;
    rel = Load(either);
    if (!rel.ok()) return rel.status();
  }
  if (!home) {
    // Written on the current source since the update just made: nothing,
    // unless something wrote in between; then it must be confirmed again.
    absl::StatusOr<TransferStats> rr = Overwrite(
        *rel, "reverse-resync", true,
        [&](const LossPreview& p) { return p.bytes == 0 || confirm(p); });
    if (!rr.ok()) return rr.status();
    add(*rr);
  }
  rel->rec.pending.clear();
  if (absl::Status s = Save(*rel, true); !s.ok()) return s;
  return total;
}

absl::Status Replication::Release(const Endpoint& either) {
  absl::StatusOr<Loaded> rel = Load(either);
  if (!rel.ok()) return rel.status();
  if (absl::Status s = CheckNotActive(*rel); !s.ok()) return s;
  if (rel->src != nullptr && rel->dst != nullptr) {
    if (absl::StatusOr<std::string> r = Recover(*rel); !r.ok()) {
      return r.status();
    }
  }
  const RelationshipRecord& r = rel->rec;
  const std::string prefix = RepPrefix(r.id);
  for (auto [pool, volume] : {std::pair{rel->dst, r.destination.volume},
                              std::pair{rel->src, r.source.volume}}) {
    if (pool == nullptr) continue;  // unreachable: its record stays
    if (HasVolume(*pool, volume)) {
      absl::StatusOr<std::vector<SnapshotInfo>> snaps =
          pool->ListSnapshots(volume);
      if (!snaps.ok()) return snaps.status();
      for (const SnapshotInfo& s : *snaps) {
        if (!absl::StartsWith(s.name, prefix)) continue;
        if (absl::Status st = pool->DeleteSnapshot(volume, s.name); !st.ok()) {
          return st;
        }
      }
      if (absl::Status s = pool->SetVolumeReadOnly(volume, false); !s.ok()) {
        return s;
      }
    }
    if (absl::Status s = pool->SetProperty(PropertyKey(volume), ""); !s.ok()) {
      return s;
    }
  }
  return absl::OkStatus();
}

// --- Health
// ---------------------------------------------------------------------

absl::StatusOr<RelationshipReport> Replication::Report(const Endpoint& either) {
  absl::StatusOr<Loaded> rel = Load(either);
  if (!rel.ok()) return rel.status();
  RelationshipReport out;
  out.record = rel->rec;
  const RelationshipRecord& r = rel->rec;
  if (rel->src == nullptr) {
    out.notes.push_back(absl::StrCat("source pool cannot be opened: ",
                                     rel->src_error.message()));
  }
  if (rel->dst == nullptr) {
    out.notes.push_back(absl::StrCat("destination pool cannot be opened: ",
                                     rel->dst_error.message()));
  }
  // Lag: how old the data the destination holds is, i.e. the creation time
  // of the last common snapshot (or, with the source unreachable, of the
  // newest snapshot the destination received; its safety snapshots and
  // the like are not replicated data).
  int64_t replicated_ns = -1;
  if (rel->src != nullptr && rel->dst != nullptr) {
    if (std::optional<SnapshotInfo> c = CommonSnapshot(
            *rel->src, r.source.volume, *rel->dst, r.destination.volume)) {
      out.last_common_snapshot = c->name;
      replicated_ns = c->create_time_ns;
    }
  } else if (rel->dst != nullptr) {
    absl::StatusOr<std::vector<SnapshotInfo>> snaps =
        rel->dst->ListSnapshots(r.destination.volume);
    if (snaps.ok()) {
      for (const SnapshotInfo& s : *snaps) {
        if (IsReplicationSnapshot(s.name)) {
          replicated_ns = std::max(replicated_ns, s.create_time_ns);
        }
      }
    }
  }
  if (replicated_ns >= 0) {
    out.lag_seconds =
        std::max<int64_t>(0, (Now() - replicated_ns) / 1000000000);
  }
  std::optional<std::string> running = Running(r.id);
  if (running) {  // this process is transferring it now
    out.record.status = TransferStatus::kTransferring;
    out.record.operation = *running;
  }
  const bool interrupted =
      r.status == TransferStatus::kTransferring && !running;
  auto unhealthy = [&](std::string why) {
    out.healthy = false;
    out.unhealthy_reason = std::move(why);
  };
  out.healthy = true;
  if (interrupted) {
    unhealthy(absl::StrCat(r.operation,
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
  } else if (rel->src == nullptr || rel->dst == nullptr) {
    unhealthy(out.notes.front());
  } else if (r.schedule_seconds > 0 &&
             out.lag_seconds > 2 * r.schedule_seconds) {
    unhealthy(absl::StrCat("lag ", out.lag_seconds,
                           " s is more than twice the schedule (",
                           r.schedule_seconds, " s): updates are not running"));
  }
  return out;
}

absl::StatusOr<std::vector<RelationshipReport>> Replication::ReportPool(
    const std::string& pool) {
  absl::StatusOr<Pool*> p = pools_.Get(pool);
  if (!p.ok()) return p.status();
  std::vector<RelationshipReport> out;
  for (const auto& [key, value] : (*p)->Properties()) {
    if (!absl::StartsWith(key, kPropertyPrefix)) continue;
    absl::StatusOr<RelationshipReport> r =
        Report({pool, key.substr(sizeof(kPropertyPrefix) - 1)});
    if (!r.ok()) return r.status();
    out.push_back(std::move(*r));
  }
  return out;
}

}  // namespace engine
