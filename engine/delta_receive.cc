#include "engine/delta_receive.h"

#include <zstd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <future>
#include <map>
#include <mutex>
#include <thread>

#include "absl/strings/str_cat.h"
#include "blockstore/digest_builder.h"
#include "blockstore/util.h"

namespace engine {

absl::Status ReadFull(ByteSource& in, std::span<std::byte> out,
                      const char* what, uint64_t stream_offset) {
  size_t got = 0;
  while (got < out.size()) {
    absl::StatusOr<size_t> n = in.Read(out.subspan(got));
    if (!n.ok()) return n.status();
    if (*n == 0) {
      return absl::DataLossError(
          absl::StrCat("delta stream offset ", stream_offset + got,
                       ": stream ends inside ", what, " (truncated)"));
    }
    got += *n;
  }
  return absl::OkStatus();
}

// --- DeltaReader -------------------------------------------------------------

absl::StatusOr<std::unique_ptr<DeltaReader>> DeltaReader::Open(
    ByteSource& in, const ResumeToken* resume) {
  std::unique_ptr<DeltaReader> r(new DeltaReader(in));
  std::vector<std::byte> bytes(kHeaderPrefixBytes);
  if (absl::Status s = ReadFull(in, bytes, "the header", 0); !s.ok()) return s;
  absl::StatusOr<uint32_t> length = DecodeHeaderLength(bytes);
  if (!length.ok()) return length.status();
  bytes.resize(*length);
  if (absl::Status s =
          ReadFull(in, std::span(bytes).subspan(kHeaderPrefixBytes),
                   "the header", kHeaderPrefixBytes);
      !s.ok()) {
    return s;
  }
  absl::StatusOr<DeltaHeader> h = DecodeHeader(bytes, &r->chain_);
  if (!h.ok()) return h.status();
  r->header_ = std::move(*h);
  r->header_checksum_ = r->chain_;
  r->offset_ = *length;
  if (resume != nullptr) {
    if (resume->header_checksum != r->chain_ ||
        resume->target_guid != r->header_.target_guid ||
        resume->base_guid != r->header_.base_guid) {
      return absl::FailedPreconditionError(
          "the resumed delta stream is not the one this receive was "
          "interrupted in (its header differs)");
    }
    r->next_segment_ = resume->next_segment;
    r->chain_ = resume->chain;
    r->order_ = {resume->any_record, resume->next_chunk};
    r->record_total_ = resume->records;
    r->chunks_written_ = resume->chunks_written;
    r->chunks_cleared_ = resume->chunks_cleared;
    r->record_bytes_ = resume->record_bytes;
    r->stored_bytes_ = resume->stored_bytes;
  }
  ZSTD_DCtx* dctx = ZSTD_createDCtx();
  // Never let a frame make us allocate a window beyond 8 MiB.
  ZSTD_DCtx_setParameter(dctx, ZSTD_d_windowLogMax, 23);
  r->dctx_ = dctx;
  return r;
}

ResumeToken DeltaReader::Checkpoint() const {
  ResumeToken t;
  t.target_guid = header_.target_guid;
  t.base_guid = header_.base_guid;
  t.header_checksum = header_checksum_;
  t.next_segment = next_segment_;
  t.chain = chain_;
  t.next_chunk = order_.next_chunk;
  t.any_record = order_.any_record;
  t.records = record_total_;
  t.chunks_written = chunks_written_;
  t.chunks_cleared = chunks_cleared_;
  t.record_bytes = record_bytes_;
  t.stored_bytes = stored_bytes_;
  return t;
}

DeltaReader::~DeltaReader() { ZSTD_freeDCtx(static_cast<ZSTD_DCtx*>(dctx_)); }

absl::Status DeltaReader::ReadSegment() {
  std::array<std::byte, kSegmentHeaderBytes> hdr;
  // The first four bytes were read by Next() to tell a segment from the end.
  std::memcpy(hdr.data(), lead_.data(), 4);
  if (absl::Status s = ReadFull(in_, std::span(hdr).subspan(4),
                                "a segment header", offset_ + 4);
      !s.ok()) {
    return s;
  }
  absl::StatusOr<SegmentHeader> h =
      DecodeSegmentHeader(hdr, next_segment_, header_.features, offset_);
  if (!h.ok()) return h.status();
  offset_ += kSegmentHeaderBytes;
  if (stored_buf_.size() == 0) {
    // DecodeSegmentHeader bounds both sizes by this.
    const size_t most = ZSTD_compressBound(kMaxSegmentRecordBytes);
    stored_buf_ = blockstore::AlignedBuffer::Uninitialized(most);
    records_buf_ = blockstore::AlignedBuffer::Uninitialized(most);
  }
  std::span<std::byte> stored = stored_buf_.span().first(h->stored_bytes);
  if (absl::Status s = ReadFull(in_, stored, "a segment", offset_); !s.ok()) {
    return s;
  }
  if (ChainChecksum(stored, chain_) != h->chain) {
    return absl::DataLossError(absl::StrCat(
        "delta segment ", h->sequence, " at stream offset ", offset_,
        ": checksum mismatch (corrupt, or out of order)"));
  }
  if (h->codec == Codec::kRaw) {
    std::swap(stored_buf_, records_buf_);
  } else {
    unsigned long long declared =
        ZSTD_getFrameContentSize(stored.data(), stored.size());
    if (declared != h->record_bytes) {
      return absl::DataLossError(absl::StrCat(
          "delta segment ", h->sequence,
          ": zstd frame does not declare its size as ", h->record_bytes));
    }
    size_t n =
        ZSTD_decompressDCtx(static_cast<ZSTD_DCtx*>(dctx_), records_buf_.data(),
                            h->record_bytes, stored.data(), stored.size());
    if (ZSTD_isError(n) || n != h->record_bytes) {
      return absl::DataLossError(absl::StrCat(
          "delta segment ", h->sequence, ": zstd frame does not decode (",
          ZSTD_isError(n) ? ZSTD_getErrorName(n) : "wrong size", ")"));
    }
  }
  records_ = records_buf_.span().first(h->record_bytes);
  offset_ += h->stored_bytes;
  chain_ = h->chain;
  record_pos_ = 0;
  records_left_ = h->record_count;
  record_index_ = 0;
  ++next_segment_;
  record_bytes_ += h->record_bytes;
  stored_bytes_ += h->stored_bytes;
  return absl::OkStatus();
}

absl::Status DeltaReader::FinishStream(std::span<const std::byte> first4) {
  std::array<std::byte, kEndBytes> raw;
  std::memcpy(raw.data(), first4.data(), 4);
  if (absl::Status s = ReadFull(in_, std::span(raw).subspan(4),
                                "the end record", offset_ + 4);
      !s.ok()) {
    return s;
  }
  absl::StatusOr<DeltaEnd> e = DecodeEnd(raw, offset_);
  if (!e.ok()) return e.status();
  auto mismatch = [&](const char* what, uint64_t said, uint64_t seen) {
    return absl::DataLossError(absl::StrCat("delta end record says ", said, " ",
                                            what, ", the stream had ", seen));
  };
  if (e->segment_count != next_segment_) {
    return mismatch("segments", e->segment_count, next_segment_);
  }
  if (e->record_count != record_total_) {
    return mismatch("records", e->record_count, record_total_);
  }
  if (e->chunks_written != chunks_written_) {
    return mismatch("chunks written", e->chunks_written, chunks_written_);
  }
  if (e->chunks_cleared != chunks_cleared_) {
    return mismatch("chunks cleared", e->chunks_cleared, chunks_cleared_);
  }
  if (e->record_bytes != record_bytes_) {
    return mismatch("record bytes", e->record_bytes, record_bytes_);
  }
  if (e->stored_bytes != stored_bytes_) {
    return mismatch("stored bytes", e->stored_bytes, stored_bytes_);
  }
  if (e->chain != chain_) {
    return absl::DataLossError("delta end record's chain checksum mismatch");
  }
  if (e->target_digest != header_.target_digest) {
    return absl::DataLossError(
        "delta end record's target digest differs from the header's");
  }
  offset_ += kEndBytes;
  std::byte extra;
  absl::StatusOr<size_t> n = in_.Read({&extra, 1});
  if (!n.ok()) return n.status();
  if (*n != 0) {
    return absl::DataLossError(absl::StrCat("delta stream offset ", offset_,
                                            ": bytes after the end record"));
  }
  end_ = *e;
  return absl::OkStatus();
}

absl::StatusOr<std::optional<DeltaReader::Record>> DeltaReader::Next() {
  while (records_left_ == 0) {
    if (ended_) return std::nullopt;
    if (record_pos_ != records_.size()) {
      return absl::DataLossError(
          absl::StrCat("delta segment ", next_segment_ - 1,
                       ": bytes left after its last record"));
    }
    if (absl::Status s =
            ReadFull(in_, lead_, "the next segment or the end", offset_);
        !s.ok()) {
      return s;
    }
    if (IsEndMagic(lead_)) {
      if (absl::Status s = FinishStream(lead_); !s.ok()) {
        return s;
      }
      ended_ = true;
      return std::nullopt;
    }
    if (absl::Status s = ReadSegment(); !s.ok()) return s;
  }
  std::span<const std::byte> rest = records_.subspan(record_pos_);
  absl::StatusOr<RecordHeader> r =
      DecodeRecord(rest, header_, order_, next_segment_ - 1, record_index_);
  if (!r.ok()) return r.status();
  Record out;
  out.header = *r;
  out.segment = next_segment_ - 1;
  uint64_t length = r->length(header_.chunk_size);
  out.payload = rest.subspan(kRecordHeaderBytes, length - kRecordHeaderBytes);
  if (r->type == RecordType::kWrite) {
    const size_t per = 16 + header_.chunk_size;
    for (uint32_t i = 0; i < r->count_chunks; ++i) {
      const std::byte* p = out.payload.data() + i * per;
      Digest want;
      std::memcpy(want.bytes.data(), p, 16);
      if (blockstore::Hash128({p + 16, header_.chunk_size}) != want) {
        return absl::DataLossError(absl::StrCat(
            "delta segment ", out.segment, " record ", record_index_,
            ": chunk ", r->first_chunk + i, " does not match its digest"));
      }
    }
    chunks_written_ += r->count_chunks;
  } else if (r->type != RecordType::kResize) {
    chunks_cleared_ += r->count_chunks;
  }
  record_pos_ += length;
  --records_left_;
  ++record_index_;
  ++record_total_;
  return out;
}

// --- Apply to a pool ---------------------------------------------------------

namespace {

std::string GuidText(const Guid& g) { return blockstore::GuidToString(g); }

absl::Status CheckBase(blockstore::Pool& pool, absl::string_view volume,
                       const DeltaHeader& h, bool rollback,
                       const std::string& advice, std::string* base_name) {
  absl::StatusOr<std::vector<blockstore::SnapshotInfo>> snaps =
      pool.ListSnapshots(volume);
  if (!snaps.ok()) {
    if (absl::IsNotFound(snaps.status())) {
      return absl::FailedPreconditionError(
          absl::StrCat("volume '", volume,
                       "' does not exist but the delta is incremental "
                       "(from snapshot '",
                       h.base_name, "'); apply a full delta first"));
    }
    return snaps.status();
  }
  const blockstore::SnapshotInfo* base = nullptr;
  for (const auto& s : *snaps) {
    if (s.guid == h.base_guid) base = &s;
  }
  const blockstore::SnapshotInfo* newest =
      snaps->empty() ? nullptr : &snaps->back();
  std::string newest_text =
      newest == nullptr ? "it has no snapshots"
                        : absl::StrCat("its newest snapshot is '", newest->name,
                                       "' (", GuidText(newest->guid), ")");
  if (base == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(
        "delta base is snapshot '", h.base_name, "' (", GuidText(h.base_guid),
        ") but volume '", volume, "' has no such snapshot; ", newest_text));
  }
  *base_name = base->name;
  if (base != newest && !rollback) {
    return absl::FailedPreconditionError(absl::StrCat(
        "delta base is snapshot '", h.base_name, "' (", GuidText(h.base_guid),
        ") but on volume '", volume, "' ", newest_text, "; ", advice,
        " to roll back to '", base->name, "' first"));
  }
  if (!rollback) {
    absl::StatusOr<bool> changed = pool.ChangedSince(volume, base->name);
    if (!changed.ok()) return changed.status();
    if (*changed) {
      return absl::FailedPreconditionError(
          absl::StrCat("volume '", volume, "' was written since snapshot '",
                       base->name, "'; ", advice, " to discard those writes"));
    }
  }
  return absl::OkStatus();
}

// Gathers WRITE chunks (without their digests) into aligned buffers and
// hands them to the pool in batches of up to 4 MiB, so scattered chunks go
// to disk at a high queue depth rather than one by one. Batches are written
// by helper threads, several at once (their chunks never overlap): one
// batch's tree walk overlaps another's data write, while the caller
// decompresses into the next buffer.
class WriteBatch {
 public:
  WriteBatch(blockstore::Pool& pool, const std::string& volume,
             uint32_t chunk_size)
      : pool_(pool),
        volume_(volume),
        chunk_size_(chunk_size),
        capacity_(std::max<size_t>(1, (4u << 20) / chunk_size)),
        recycler_(capacity_ * chunk_size) {
    for (Buffer& b : buffers_) b.digests.resize(capacity_);
  }
  ~WriteBatch() {
    WaitAll().IgnoreError();
    {
      std::lock_guard lock(mu_);
      stopping_ = true;
    }
    ready_.notify_all();
    for (std::thread& t : writers_) t.join();
  }

  absl::Status Add(const DeltaReader::Record& r) {
    for (uint32_t i = 0; i < r.header.count_chunks; ++i) {
      if (buffers_[cur_].writes.size() == capacity_) {
        if (absl::Status s = Start(); !s.ok()) return s;
      }
      Buffer& fill = buffers_[cur_];
      const size_t n = fill.writes.size();
      if (n == 0) fill.data = recycler_.Take();
      std::byte* slot = fill.data.data() + n * chunk_size_;
      const std::byte* in = r.payload.data() + size_t{i} * (16 + chunk_size_);
      std::memcpy(slot, in + 16, chunk_size_);
      // The reader checked the chunk against this digest: the pool takes
      // it rather than hashing the chunk again.
      std::memcpy(fill.digests[n].bytes.data(), in, 16);
      fill.writes.push_back(
          {r.header.first_chunk + i, {slot, chunk_size_}, &fill.digests[n]});
    }
    return absl::OkStatus();
  }

  // Everything added so far is in the pool when this returns OK.
  absl::Status Flush() {
    if (absl::Status s = Start(); !s.ok()) return s;
    return WaitAll();
  }

 private:
  // Batches written at once, plus the one being filled: up to 128 MiB
  // behind the decompression, as deep as the send's read-ahead (see
  // DiffFeed::kReadAhead for what it bought). A buffer is taken as a batch
  // starts filling, one whose write is done if there is one (memory already
  // touched): a receive whose writes keep up holds a few, not one a batch.
  static constexpr int kBuffers = 32;
  // Threads writing them, each a batch at a time, for the whole receive (a
  // thread a batch cost a stack's mmap and munmap every 4 MiB). A full
  // 4 GiB apply from /dev/shm took about as long with 8 as with a thread a
  // batch and a third less system CPU; with 4, 5-15% longer. Started as
  // batches find none idle: a small delta starts a few, a stream refused
  // before its first batch none (DeltaTest.EveryBitFlipIsRefusedByVerify-
  // AndApply applies 60,000 of those).
  static constexpr size_t kWriters = 8;

  struct Buffer {
    blockstore::AlignedBuffer data;
    std::vector<Digest> digests;  // capacity_, one a slot
    std::vector<blockstore::Pool::ChunkWrite> writes;
    std::promise<absl::Status> written;  // set by a writer
    std::future<absl::Status> pending;
  };

  // Sends the current buffer off and moves to the next, once it is free.
  absl::Status Start() {
    Buffer& b = buffers_[cur_];
    if (!b.writes.empty()) {
      b.written = std::promise<absl::Status>();
      b.pending = b.written.get_future();
      bool spawn;
      {
        std::lock_guard lock(mu_);
        to_write_.push_back(&b);
        spawn = idle_ == 0 && writers_.size() < kWriters;
      }
      if (spawn) {
        writers_.emplace_back([this] { WriteBatches(); });
      } else {
        ready_.notify_one();
      }
      cur_ = (cur_ + 1) % kBuffers;
    }
    return Wait(buffers_[cur_]);
  }

  // A writer: the buffers sent off, in order, until the batch is destroyed
  // (which waits for all of them first).
  void WriteBatches() {
    while (true) {
      Buffer* b;
      {
        std::unique_lock lock(mu_);
        ++idle_;
        ready_.wait(lock, [&] { return stopping_ || !to_write_.empty(); });
        --idle_;
        if (to_write_.empty()) return;  // stopping
        b = to_write_.front();
        to_write_.pop_front();
      }
      absl::Status s = pool_.WriteChunks(volume_, b->writes);
      unsynced_bytes_ += b->writes.size() * chunk_size_;
      if (s.ok() && SyncAheadNow()) {
        s = pool_.SyncAhead();
        syncing_ = false;
      }
      b->writes.clear();
      recycler_.Give(std::move(b->data));
      b->written.set_value(std::move(s));
    }
  }

  // Whether this writer should flush what is written so far (and if so it
  // owns syncing_): so that a pool file's allocations become durable while
  // the receive waits for its stream, not all in the commit's flush after
  // the last chunk (Io::in_file_system). But each flush holds up the file
  // system's writes for a journal commit, and a full 4 GiB apply flushing
  // after every batch was slower (bench/RESULTS.md runs S-W). So only when
  // the writers have caught up (no batch waits), and after a quarter again
  // of what was flushed before (8 MiB to 256 MiB): a few flushes for a small
  // delta, a few dozen for 4 GiB. Its error fails the receive
  // (Pool::SyncAhead).
  bool SyncAheadNow() {
    const uint64_t due =
        std::clamp<uint64_t>(synced_bytes_ / 4, 8 << 20, 256 << 20);
    if (unsynced_bytes_ < due) return false;
    {
      std::lock_guard lock(mu_);
      if (!to_write_.empty()) return false;
    }
    if (syncing_.exchange(true)) return false;
    synced_bytes_ += unsynced_bytes_.exchange(0);
    return true;
  }

  absl::Status Wait(Buffer& b) {
    if (!b.pending.valid()) return absl::OkStatus();
    absl::Status s = b.pending.get();
    if (first_error_.ok()) first_error_ = s;
    return first_error_;
  }

  absl::Status WaitAll() {
    for (Buffer& b : buffers_) Wait(b).IgnoreError();
    return first_error_;
  }

  blockstore::Pool& pool_;
  const std::string& volume_;
  const uint32_t chunk_size_;
  const size_t capacity_;
  blockstore::BufferRecycler recycler_;  // the buffers' memory
  Buffer buffers_[kBuffers];
  int cur_ = 0;
  absl::Status first_error_;
  // Buffers sent off and not yet taken by a writer. std::mutex for
  // ThreadSanitizer, as in the send's Pipeline.
  std::mutex mu_;
  std::condition_variable ready_;
  std::deque<Buffer*> to_write_;  // guarded by mu_, as are stopping_, idle_
  bool stopping_ = false;
  int idle_ = 0;                             // writers waiting for a batch
  std::atomic<bool> syncing_{false};         // a writer is in Pool::SyncAhead
  std::atomic<uint64_t> unsynced_bytes_{0};  // since the last SyncAhead
  std::atomic<uint64_t> synced_bytes_{0};    // before it; SyncAheadNow's owner
  // Last: they use all of the above. Only the receive's thread (Start, the
  // destructor) changes it.
  std::vector<std::thread> writers_;
};

constexpr char kResumeKeyPrefix[] = "receive:";

std::string ResumeKey(absl::string_view volume) {
  return absl::StrCat(kResumeKeyPrefix, volume);
}

// Applies the records; at a segment end at least `checkpoint_bytes` of
// stream after the last resume point, commits the staging content with a
// new resume point.
absl::StatusOr<ApplyStats> ApplyRecords(blockstore::Pool& pool,
                                        absl::string_view volume,
                                        const std::string& staging,
                                        DeltaReader& reader,
                                        const ApplyOptions& options) {
  const DeltaHeader& h = reader.header();
  const uint64_t c = h.chunk_size;
  ApplyStats stats;
  WriteBatch batch(pool, staging, h.chunk_size);
  uint64_t checkpointed_at = reader.stream_offset();
  while (true) {
    absl::StatusOr<std::optional<DeltaReader::Record>> r = reader.Next();
    if (!r.ok()) return r.status();
    if (!r->has_value()) break;
    const DeltaReader::Record& rec = **r;
    const RecordHeader& rh = rec.header;
    absl::Status s;
    if (rh.type == RecordType::kWrite) {
      s = batch.Add(rec);
      stats.chunks_written += rh.count_chunks;
    } else {
      // Records do not overlap, but keep the order of what reaches the pool.
      s = batch.Flush();
      uint64_t off = rh.first_chunk * c;
      if (s.ok() && rh.type == RecordType::kResize) {
        s = pool.ResizeVolume(staging, rh.first_chunk);
      } else if (s.ok()) {
        s = pool.Trim(
            staging, off,
            std::min(uint64_t{rh.count_chunks} * c, h.size_bytes - off));
        stats.chunks_cleared += rh.count_chunks;
      }
    }
    if (!s.ok()) return s;
    ++stats.records;
    if (options.checkpoint_bytes > 0 && reader.at_segment_end() &&
        reader.stream_offset() - checkpointed_at >= options.checkpoint_bytes) {
      // The token lands in the same commit as the data it vouches for.
      if (absl::Status f = batch.Flush(); !f.ok()) return f;
      std::string token = EncodeResumeToken(reader.Checkpoint());
      if (absl::Status p = pool.SetProperty(
              ResumeKey(volume),
              blockstore::Hex({reinterpret_cast<const std::byte*>(token.data()),
                               token.size()}));
          !p.ok()) {
        return p;
      }
      checkpointed_at = reader.stream_offset();
      ++stats.checkpoints;
    }
    if (options.progress) options.progress(reader.record_bytes_read(), 0);
  }
  if (absl::Status s = batch.Flush(); !s.ok()) return s;
  stats.stream_bytes = reader.stream_offset();
  return stats;
}

}  // namespace

std::string StagingVolume(absl::string_view volume) {
  return absl::StrCat(".recv-", volume);
}

absl::StatusOr<std::optional<ResumeToken>> ResumePoint(
    blockstore::Pool& pool, absl::string_view volume) {
  std::map<std::string, std::string> props = pool.Properties();
  auto it = props.find(ResumeKey(volume));
  if (it == props.end()) return std::nullopt;
  if (!pool.GetVolume(StagingVolume(volume)).ok()) return std::nullopt;
  absl::StatusOr<std::vector<std::byte>> raw = blockstore::Unhex(it->second);
  if (!raw.ok()) {
    return absl::DataLossError(
        absl::StrCat("resume point of volume '", volume, "' is malformed"));
  }
  absl::StatusOr<ResumeToken> t = DecodeResumeToken(*raw);
  if (!t.ok()) return t.status();
  return *t;
}

absl::Status DropReceive(blockstore::Pool& pool, absl::string_view volume) {
  blockstore::Pool::Group group = pool.BeginGroup();
  absl::Status s = pool.SetProperty(ResumeKey(volume), "", &group);
  if (s.ok()) {
    s = pool.DeleteVolume(StagingVolume(volume), true, &group);
    if (absl::IsNotFound(s)) s = absl::OkStatus();
  }
  absl::Status ended = group.Commit();
  return s.ok() ? ended : s;
}

absl::StatusOr<ApplyStats> ApplyDelta(blockstore::Pool& pool,
                                      absl::string_view volume, ByteSource& in,
                                      const ApplyOptions& options) {
  std::optional<ResumeToken> held;
  if (options.resume) {
    absl::StatusOr<std::optional<ResumeToken>> point =
        ResumePoint(pool, volume);
    if (!point.ok()) return point.status();
    if (!*point || **point != *options.resume) {
      return absl::FailedPreconditionError(absl::StrCat(
          "volume '", volume,
          "' no longer holds the interrupted receive to resume; start it "
          "over"));
    }
    held = *point;
  }
  absl::StatusOr<std::unique_ptr<DeltaReader>> reader =
      DeltaReader::Open(in, held ? &*held : nullptr);
  if (!reader.ok()) return reader.status();
  const DeltaHeader& h = (*reader)->header();
  if (pool.chunk_size() != h.chunk_size) {
    return absl::FailedPreconditionError(
        absl::StrCat("the delta has ", h.chunk_size,
                     "-byte chunks but the pool has ", pool.chunk_size(),
                     "-byte chunks; apply it to a pool created with "
                     "--chunk-size ",
                     h.chunk_size));
  }
  const std::string staging = StagingVolume(volume);
  std::string base_name;
  if (h.full()) {
    if (pool.GetVolume(volume).ok()) {
      return absl::FailedPreconditionError(
          absl::StrCat("volume '", volume,
                       "' exists and the delta is a full one; apply it "
                       "under a new name or delete the volume first"));
    }
  } else if (absl::Status s = CheckBase(pool, volume, h, options.rollback,
                                        options.rollback_advice, &base_name);
             !s.ok()) {
    return s;
  }
  if (!held) {
    // A fresh receive: whatever an earlier one left goes.
    if (absl::Status s = pool.SetProperty(ResumeKey(volume), ""); !s.ok()) {
      return s;
    }
    absl::Status begun =
        h.full() ? pool.BeginReceive(staging, volume, "", h.size_bytes)
                 : pool.BeginReceive(staging, volume, base_name, 0);
    if (!begun.ok()) return begun;
  }
  absl::StatusOr<ApplyStats> stats =
      ApplyRecords(pool, volume, staging, **reader, options);
  bool bad_content = false;
  if (stats.ok()) {
    // The resume point goes in the commit that finishes the receive.
    blockstore::Pool::Group group = pool.BeginGroup();
    absl::Status cleared = pool.SetProperty(ResumeKey(volume), "", &group);
    absl::StatusOr<blockstore::SnapshotInfo> snap =
        cleared.ok() ? pool.FinishReceive(
                           staging, volume, h.volume_guid,
                           {h.target_name, h.target_guid,
                            h.target_create_time_ns, options.target_owner},
                           h.target_digest, &group)
                     : cleared;
    absl::Status ended = group.Commit();
    if (snap.ok() && ended.ok()) {
      stats->snapshot = *snap;
      return stats;
    }
    bad_content = absl::IsDataLoss(snap.status());
    stats = snap.ok() ? ended : snap.status();
  }
  // Nothing reached `volume`. Keep what a resume can go on from; else give
  // the staging space back (best effort: a stopped pool drops it at the
  // next receive).
  if (options.checkpoint_bytes == 0 || bad_content) {
    DropReceive(pool, volume).IgnoreError();
  }
  return stats.status();
}

}  // namespace engine
