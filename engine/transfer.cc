#include "engine/transfer.h"

#include <algorithm>
#include <future>
#include <thread>

#include "absl/strings/str_cat.h"
#include "engine/pipe.h"

namespace engine {

using blockstore::MutexLock;
using blockstore::SnapshotInfo;

// --- Rate ----------------------------------------------------------------

RateLimiter::RateLimiter(uint64_t bytes_per_second)
    : rate_(std::max<uint64_t>(1, bytes_per_second)),
      burst_(static_cast<double>(rate_) / 20),
      tokens_(burst_),
      last_(Clock::now()) {}

void RateLimiter::Take(uint64_t bytes) {
  Clock::time_point wake;
  {
    MutexLock lock(mu_);
    Clock::time_point now = Clock::now();
    tokens_ = std::min(
        burst_, tokens_ + std::chrono::duration<double>(now - last_).count() *
                              static_cast<double>(rate_));
    last_ = now;
    // Pay first, then wait out the debt: bytes pass only once they fit.
    tokens_ -= static_cast<double>(bytes);
    if (tokens_ >= 0) return;
    wake = now + std::chrono::duration_cast<Clock::duration>(
                     std::chrono::duration<double>(-tokens_ / rate_));
  }
  std::this_thread::sleep_until(wake);
}

absl::Status MeteredSink::Write(std::span<const std::byte> data) {
  constexpr size_t kPiece = 64 << 10;
  while (!data.empty()) {
    if (cancel_ != nullptr && cancel_->load()) {
      return absl::UnavailableError(
          "stopping: the transfer goes on at the "
          "next start from its last resume point");
    }
    std::span<const std::byte> piece =
        data.first(std::min(kPiece, data.size()));
    if (limiter_ != nullptr) limiter_->Take(piece.size());
    if (absl::Status s = out_.Write(piece); !s.ok()) return s;
    bytes_ += piece.size();
    data = data.subspan(piece.size());
  }
  return absl::OkStatus();
}

namespace {

double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
      .count();
}

// Worth another attempt: the connection to a site was lost, or the site is
// restarting.
bool Retryable(const absl::Status& s) { return absl::IsUnavailable(s); }

absl::StatusOr<SnapshotInfo> FindSnapshot(Site& site, const std::string& volume,
                                          const std::string& name) {
  absl::StatusOr<std::vector<SnapshotInfo>> snaps = site.ListSnapshots(volume);
  if (!snaps.ok()) return snaps.status();
  for (const SnapshotInfo& s : *snaps) {
    if (s.name == name) return s;
  }
  return absl::NotFoundError(absl::StrCat("snapshot '", volume, "@", name,
                                          "' not found at ", site.name()));
}

// Progress comes from both ends of a delta when both are local (the
// sender's pipeline thread and the receiver's): one at a time, and never
// backwards.
void Report(TransferContext& ctx, uint64_t done, uint64_t total) {
  MutexLock lock(ctx.progress_mu);
  if (done < ctx.progress_done && total == ctx.progress_total) return;
  ctx.progress_done = done;
  ctx.progress_total = total;
  for (Claim* c : ctx.claims) c->Progress(done, total);
  if (ctx.progress) ctx.progress(done, total);
}

// A received snapshot is the relationship's on the receiver too if it was
// on the sender; a user's snapshot carried along stays a user's.
std::string OwnerOnReceiver(const TransferContext& ctx, const SnapshotInfo& s) {
  return s.owner == ctx.relationship_id ? ctx.relationship_id : "";
}

// One delta from `from` to `to`.
struct Step {
  Site* from = nullptr;
  std::string from_volume;
  std::string base;  // empty: full (or a hash-diff, with `onto`)
  SnapshotInfo target;
  Site* to = nullptr;
  std::string to_volume;
  bool rollback = false;
  std::string target_owner;
  std::optional<SnapshotInfo> onto;
  std::vector<uint64_t> chunks;
  uint64_t data_total = 0;  // data bytes this delta carries
};

struct StepResult {
  uint64_t stream_bytes = 0;
  uint64_t data_bytes = 0;
  bool resumed = false;
  uint64_t retries = 0;
};

// Runs one delta, again from the receiver's resume point after a lost
// connection, for as long as attempts keep making progress within the
// retry window. `progress(data bytes done)` as it goes.
absl::StatusOr<StepResult> RunStep(
    TransferContext& ctx, const Step& step,
    const std::function<void(uint64_t)>& progress, uint32_t chunk_size) {
  StepResult result;
  auto last_progress = std::chrono::steady_clock::now();
  absl::Duration backoff = absl::Milliseconds(100);
  bool started_over = false;
  for (;;) {
    std::optional<ResumeToken> token;
    absl::StatusOr<std::optional<ResumeToken>> point =
        step.to->ResumePoint(step.to_volume);
    absl::Status failed = point.status();
    if (point.ok() && point->has_value() &&
        (*point)->target_guid == step.target.guid) {
      token = **point;
    }
    const uint64_t done_before =
        token ? std::min(step.data_total, token->chunks_written * chunk_size)
              : 0;
    if (failed.ok()) {
      // Small: enough to overlap the two ends, little to resend after a
      // cut.
      Pipe pipe(2 << 20);
      MeteredSink sink(pipe.sink(), ctx.limiter, ctx.cancel);
      SendRequest send;
      send.volume = step.from_volume;
      send.base = step.base;
      send.target = step.target.name;
      send.onto = step.onto;
      send.chunks = step.chunks;
      send.resume = token;
      // The sender knows what is left of its stream; the receiver counts
      // record bytes from the stream's start. Data bytes from either.
      const double per_record = static_cast<double>(chunk_size) /
                                (16.0 + static_cast<double>(chunk_size));
      send.progress = [&](uint64_t done, uint64_t total) {
        if (total == 0) return;
        progress(done_before + (step.data_total - done_before) *
                                   std::min(done, total) / total);
      };
      ReceiveRequest receive;
      receive.volume = step.to_volume;
      receive.rollback = step.rollback;
      receive.target_owner = step.target_owner;
      receive.resume = token;
      receive.rollback_advice = ctx.rollback_advice;
      receive.progress = [&](uint64_t done, uint64_t) {
        progress(std::min<uint64_t>(step.data_total,
                                    static_cast<uint64_t>(done * per_record)));
      };
      absl::StatusOr<SendStats> sent;
      std::thread sender([&] {
        sent = step.from->Send(send, sink);
        pipe.CloseWrite(sent.ok() ? absl::OkStatus() : sent.status());
      });
      absl::StatusOr<ApplyStats> applied =
          step.to->Receive(receive, pipe.source());
      if (!applied.ok()) pipe.AbortRead(applied.status());
      sender.join();
      result.stream_bytes += sink.bytes();
      result.resumed = result.resumed || token.has_value();
      // A sender's failure reaches the receiver through the pipe, so the
      // receiver's error is the one that says what went wrong first.
      failed = !applied.ok() ? applied.status() : sent.status();
      if (failed.ok()) {
        result.data_bytes = (token ? token->chunks_written : 0) * chunk_size +
                            applied->chunks_written * uint64_t{chunk_size};
        return result;
      }
      // Progress is what the receiver made durable: a resume point further
      // on than the one this attempt started from.
      absl::StatusOr<std::optional<ResumeToken>> now =
          step.to->ResumePoint(step.to_volume);
      if (now.ok() && now->has_value() &&
          (*now)->target_guid == step.target.guid &&
          (!token || (*now)->stored_bytes > token->stored_bytes)) {
        last_progress = std::chrono::steady_clock::now();
        backoff = absl::Milliseconds(100);
      }
      if (token && absl::IsFailedPrecondition(failed) && !started_over) {
        // The resume point is for a stream that cannot be sent any more
        // (the sender's snapshots changed): start this delta over.
        started_over = true;
        if (absl::Status s = step.to->DropReceive(step.to_volume); !s.ok()) {
          return s;
        }
        continue;
      }
    }
    if (!Retryable(failed) || (ctx.cancel != nullptr && ctx.cancel->load()) ||
        absl::FromChrono(std::chrono::steady_clock::now() - last_progress) >=
            ctx.retry_window) {
      return failed;
    }
    absl::SleepFor(backoff);
    backoff = std::min(backoff * 2, absl::Seconds(2));
    ++result.retries;
    for (Claim* c : ctx.claims) {
      if (absl::Status s = c->Renew(); !s.ok() && !Retryable(s)) return s;
    }
  }
}

}  // namespace

absl::StatusOr<TransferStats> TransferChain(
    TransferContext& ctx, Site& from, const std::string& from_volume, Site& to,
    const std::string& to_volume, const std::vector<SnapshotInfo>& chain,
    bool rollback_first) {
  auto start = std::chrono::steady_clock::now();
  absl::StatusOr<SiteInfo> info = from.Info();
  if (!info.ok()) return info.status();
  const uint32_t cs = info->chunk_size_bytes;
  std::vector<Step> steps;
  uint64_t total = 0;
  for (size_t i = 1; i < chain.size(); ++i) {
    absl::StatusOr<ChangeCount> c =
        from.CountChanges(from_volume, chain[i - 1].name, chain[i].name);
    if (!c.ok()) return c.status();
    Step s;
    s.from = &from;
    s.from_volume = from_volume;
    s.base = chain[i - 1].name;
    s.target = chain[i];
    s.to = &to;
    s.to_volume = to_volume;
    s.rollback = rollback_first && i == 1;
    s.target_owner = OwnerOnReceiver(ctx, chain[i]);
    s.data_total = c->data_chunks * cs;
    total += s.data_total;
    steps.push_back(std::move(s));
  }
  if (ctx.progress) ctx.progress(0, total);
  TransferStats stats;
  uint64_t done_before = 0;
  for (const Step& step : steps) {
    auto progress = [&](uint64_t done) {
      Report(ctx, done_before + std::min(done, step.data_total), total);
    };
    absl::StatusOr<StepResult> r = RunStep(ctx, step, progress, cs);
    if (!r.ok()) return r.status();
    stats.stream_bytes += r->stream_bytes;
    stats.data_bytes += r->data_bytes;
    stats.resumed += r->resumed;
    stats.retries += r->retries;
    ++stats.snapshots;
    done_before += step.data_total;
    progress(0);
  }
  stats.seconds = SecondsSince(start);
  return stats;
}

absl::StatusOr<std::vector<uint64_t>> DifferingChunks(
    Site& a, const std::string& a_volume, const std::string& a_snapshot,
    Site& b, const std::string& b_volume, const std::string& b_snapshot,
    uint64_t chunks) {
  std::vector<uint64_t> differ;
  for (uint64_t first = 0; first < chunks; first += Site::kMaxDigestBatch) {
    const uint64_t n = std::min(Site::kMaxDigestBatch, chunks - first);
    // Both sides hash at once (one of them is usually across the network).
    std::future<absl::StatusOr<std::vector<Sha256>>> theirs = std::async(
        std::launch::async,
        [&] { return b.ChunkDigests(b_volume, b_snapshot, first, n); });
    absl::StatusOr<std::vector<Sha256>> mine =
        a.ChunkDigests(a_volume, a_snapshot, first, n);
    absl::StatusOr<std::vector<Sha256>> other = theirs.get();
    if (!mine.ok()) return mine.status();
    if (!other.ok()) return other.status();
    if (mine->size() != n || other->size() != n) {
      return absl::DataLossError("a site returned the wrong number of digests");
    }
    for (uint64_t i = 0; i < n; ++i) {
      if ((*mine)[i] != (*other)[i]) differ.push_back(first + i);
    }
  }
  return differ;
}

absl::StatusOr<TransferStats> HashDiffTransfer(TransferContext& ctx, Site& from,
                                               const std::string& from_volume,
                                               const std::string& snapshot,
                                               Site& to,
                                               const std::string& to_volume,
                                               const std::string& to_base) {
  auto start = std::chrono::steady_clock::now();
  absl::StatusOr<SnapshotInfo> target =
      FindSnapshot(from, from_volume, snapshot);
  if (!target.ok()) return target.status();
  absl::StatusOr<SnapshotInfo> base = FindSnapshot(to, to_volume, to_base);
  if (!base.ok()) return base.status();
  absl::StatusOr<SiteInfo> info = from.Info();
  if (!info.ok()) return info.status();
  const uint32_t cs = info->chunk_size_bytes;
  const uint64_t chunks = (target->size_bytes + cs - 1) / cs;
  absl::StatusOr<std::vector<uint64_t>> differ = DifferingChunks(
      from, from_volume, snapshot, to, to_volume, to_base, chunks);
  if (!differ.ok()) return differ.status();
  Step step;
  step.from = &from;
  step.from_volume = from_volume;
  step.target = *target;
  step.to = &to;
  step.to_volume = to_volume;
  step.target_owner = OwnerOnReceiver(ctx, *target);
  step.onto = *base;
  step.chunks = std::move(*differ);
  step.data_total = step.chunks.size() * cs;
  auto progress = [&](uint64_t done) { Report(ctx, done, step.data_total); };
  progress(0);
  absl::StatusOr<StepResult> r = RunStep(ctx, step, progress, cs);
  if (!r.ok()) return r.status();
  progress(step.data_total);
  TransferStats stats;
  stats.data_bytes = r->data_bytes;
  // One side's digests cross to be compared, besides the delta.
  stats.stream_bytes = r->stream_bytes + chunks * sizeof(Sha256);
  stats.snapshots = 1;
  stats.resumed = r->resumed;
  stats.retries = r->retries;
  stats.seconds = SecondsSince(start);
  return stats;
}

}  // namespace engine
