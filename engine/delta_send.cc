#include "engine/delta_send.h"

#include <zstd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "blockstore/util.h"
#include "engine/delta_format.h"

namespace engine {
namespace {

using blockstore::ChangedRun;

// Bytes of a fixed capacity whose length changes without writing them: a
// segment's records are copied in and its compressed form written by zstd,
// nothing is read before it is written. (A std::vector zero-fills what it
// grows by: each segment's 2 MiB were written twice, and their pages faulted
// in for the zeros.) A view of memory its segment owns.
class Bytes {
 public:
  explicit Bytes(std::span<std::byte> memory) : buf_(memory) {}
  std::byte* data() { return buf_.data(); }
  size_t capacity() const { return buf_.size(); }
  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  std::span<const std::byte> span() const { return buf_.first(size_); }
  // The first min(size(), n) bytes stay; the rest are undefined until
  // written. n is at most the capacity.
  void resize(size_t n) {
    if (n > buf_.size()) std::abort();  // a bug: capacity is fixed
    size_ = n;
  }
  void clear() { size_ = 0; }

 private:
  std::span<std::byte> buf_;
  size_t size_ = 0;
};

// Made once each and reused (Pipeline::TakeSegment): a send fills at most
// 2N + 1 of them whatever its size, and their pages fault in once. The
// records and their compressed form share one 2 MiB huge page (apart, each
// took one of its own, 4 MiB a segment, zeroed by the kernel when first
// touched): a compressed form that does not fit in the rest, 8 KiB less
// than the records at most, saved under 1% and is stored raw anyway.
struct Segment {
  Segment() = default;
  Segment(const Segment&) = delete;  // records and stored point into memory
  Segment& operator=(const Segment&) = delete;
  static constexpr size_t kBytes = size_t{2} << 20;
  static_assert(kMaxSegmentRecordBytes < kBytes / 2 + 8192);
  blockstore::AlignedBuffer memory =
      blockstore::AlignedBuffer::Uninitialized(kBytes);
  uint64_t sequence = 0;
  uint32_t record_count = 0;
  Bytes records{memory.span().first(kMaxSegmentRecordBytes)};
  Bytes stored{memory.span().subspan(kMaxSegmentRecordBytes)};  // empty: raw
};

// The send pipeline:
//
//   caller thread              N workers                 writer thread
//   diff walk + chunk reads -> zstd each segment  ->     chain checksum,
//   -> record bytes            (raw if no gain)          segments in order
//      in ~1 MiB segments                                -> ByteSink
//
// `Push` blocks while 2N segments are in flight, so memory is bounded by
// 2N + 1 segments (a 2 MiB huge page each, Segment) plus the caller's
// read-ahead (up to 128 MiB), whatever the delta's size.
class Pipeline {
 public:
  Pipeline(int workers, int level, ByteSink& out, uint64_t chain_seed,
           const SendOptions& options, uint64_t total, uint64_t first_sequence)
      : level_(level),
        out_(out),
        chain_(chain_seed),
        first_sequence_(first_sequence),
        max_in_flight_(2 * workers),
        options_(options),
        total_(total) {
    for (int i = 0; i < workers; ++i) {
      workers_.emplace_back([this] { Work(); });
    }
    writer_ = std::thread([this] { WriteInOrder(); });
  }

  ~Pipeline() { Stop(); }

  // The total record bytes for progress, once known (0: not yet).
  void SetTotal(uint64_t total) {
    total_.store(total, std::memory_order_relaxed);
  }

  absl::Status Push(std::unique_ptr<Segment> seg) {
    std::unique_lock<std::mutex> lock(mu_);
    room_.wait(lock,
               [this] { return in_flight_ < max_in_flight_ || !error_.ok(); });
    if (!error_.ok()) return error_;
    ++in_flight_;
    todo_.push_back(std::move(seg));
    work_.notify_one();
    return absl::OkStatus();
  }

  // An empty segment to fill: one already written out, or a new one.
  std::unique_ptr<Segment> TakeSegment() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!free_.empty()) {
        std::unique_ptr<Segment> seg = std::move(free_.back());
        free_.pop_back();
        return seg;
      }
    }
    return std::make_unique<Segment>();
  }

  // Waits for everything pushed; returns the first error and the final
  // chain checksum.
  absl::Status Finish(uint64_t* chain, uint64_t* stored_bytes) {
    Stop();
    std::lock_guard<std::mutex> lock(mu_);
    *chain = chain_;
    *stored_bytes = stored_bytes_;
    return error_;
  }

 private:
  void Stop() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      closed_ = true;
    }
    work_.notify_all();
    for (std::thread& t : workers_) {
      if (t.joinable()) t.join();
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      workers_done_ = true;
    }
    done_cv_.notify_all();
    if (writer_.joinable()) writer_.join();
  }

  // Called with mu_ held.
  void SetError(absl::Status s) {
    if (error_.ok()) error_ = std::move(s);
    room_.notify_all();
    work_.notify_all();
    done_cv_.notify_all();
  }

  void Work() {
    ZSTD_CCtx* cctx = ZSTD_createCCtx();
    while (true) {
      std::unique_ptr<Segment> seg;
      {
        std::unique_lock<std::mutex> lock(mu_);
        work_.wait(
            lock, [this] { return !todo_.empty() || closed_ || !error_.ok(); });
        if (todo_.empty() || !error_.ok()) break;
        seg = std::move(todo_.front());
        todo_.pop_front();
      }
      if (level_ > 0) {
        // Only a compressed form smaller than the records is kept.
        seg->stored.resize(
            std::min(seg->stored.capacity(), seg->records.size() - 1));
        size_t n =
            ZSTD_compressCCtx(cctx, seg->stored.data(), seg->stored.size(),
                              seg->records.data(), seg->records.size(), level_);
        if (ZSTD_isError(n) || n >= seg->records.size()) {
          seg->stored.clear();  // no gain: store raw
        } else {
          seg->stored.resize(n);
        }
      }
      std::lock_guard<std::mutex> lock(mu_);
      done_.emplace(seg->sequence, std::move(seg));
      done_cv_.notify_all();
    }
    ZSTD_freeCCtx(cctx);
  }

  void WriteInOrder() {
    uint64_t next = first_sequence_;
    uint64_t done_bytes = 0;
    while (true) {
      std::unique_ptr<Segment> seg;
      {
        std::unique_lock<std::mutex> lock(mu_);
        done_cv_.wait(lock, [&] {
          return done_.contains(next) || workers_done_ || !error_.ok();
        });
        if (!error_.ok()) return;
        auto it = done_.find(next);
        if (it == done_.end()) return;  // workers finished, nothing left
        seg = std::move(it->second);
        done_.erase(it);
      }
      bool raw = seg->stored.empty();
      std::span<const std::byte> payload =
          raw ? seg->records.span() : seg->stored.span();
      SegmentHeader h;
      h.codec = raw ? Codec::kRaw : Codec::kZstd;
      h.sequence = seg->sequence;
      h.record_bytes = static_cast<uint32_t>(seg->records.size());
      h.stored_bytes = static_cast<uint32_t>(payload.size());
      h.record_count = seg->record_count;
      uint64_t chain;
      {
        std::lock_guard<std::mutex> lock(mu_);
        chain = chain_;
      }
      h.chain = ChainChecksum(payload, chain);
      std::array<std::byte, kSegmentHeaderBytes> hdr;
      EncodeSegmentHeader(h, hdr);
      absl::Status s = out_.Write(hdr);
      if (s.ok()) s = out_.Write(payload);
      done_bytes += seg->records.size();
      if (s.ok() && options_.progress) {
        options_.progress(done_bytes, total_.load(std::memory_order_relaxed));
      }
      std::lock_guard<std::mutex> lock(mu_);
      if (!s.ok()) {
        SetError(s);
        return;
      }
      chain_ = h.chain;
      stored_bytes_ += payload.size();
      seg->record_count = 0;
      seg->records.clear();
      seg->stored.clear();
      free_.push_back(std::move(seg));
      --in_flight_;
      room_.notify_one();
      ++next;
    }
  }

  const int level_;
  ByteSink& out_;
  // std::mutex rather than absl::Mutex: Debian's Abseil is not built for
  // ThreadSanitizer, which then cannot see absl::Mutex's ordering.
  std::mutex mu_;
  std::condition_variable room_;     // in_flight_ dropped, or an error
  std::condition_variable work_;     // todo_ grew, closed_, or an error
  std::condition_variable done_cv_;  // done_ grew, workers_done_, or an error
  uint64_t chain_;                   // guarded by mu_, as is all below
  const uint64_t first_sequence_;
  uint64_t stored_bytes_ = 0;
  const int max_in_flight_;
  int in_flight_ = 0;
  bool closed_ = false;
  bool workers_done_ = false;
  absl::Status error_;
  std::deque<std::unique_ptr<Segment>> todo_;
  std::map<uint64_t, std::unique_ptr<Segment>> done_;
  std::vector<std::unique_ptr<Segment>> free_;  // written out, to refill
  const SendOptions& options_;
  std::atomic<uint64_t> total_;
  std::vector<std::thread> workers_;
  std::thread writer_;
};

// Packs records into segments and hands full ones to the pipeline.
class SegmentBuilder {
 public:
  SegmentBuilder(Pipeline& pipeline, uint32_t chunk_size, SendStats& stats,
                 uint64_t first_sequence)
      : pipeline_(pipeline),
        chunk_size_(chunk_size),
        stats_(stats),
        next_sequence_(first_sequence) {
    Start();
  }

  absl::Status Clear(ChangedRun::Kind kind, uint64_t first, uint64_t count) {
    RecordType type = kind == ChangedRun::Kind::kZero ? RecordType::kZero
                                                      : RecordType::kUnmap;
    stats_.chunks_cleared += count;
    while (count > 0) {
      uint32_t n = static_cast<uint32_t>(std::min<uint64_t>(count, UINT32_MAX));
      if (absl::Status s = Record({type, n, first}); !s.ok()) return s;
      first += n;
      count -= n;
    }
    return absl::OkStatus();
  }

  absl::Status Resize(uint64_t size_bytes) {
    return Record({RecordType::kResize, 0, size_bytes});
  }

  // One data chunk; adjacent ones extend the open WRITE record.
  absl::Status Write(uint64_t chunk, const blockstore::Digest& digest,
                     std::span<const std::byte> data) {
    const size_t per_chunk = 16 + chunk_size_;
    bool extend = write_at_ != kNone && write_next_ == chunk &&
                  seg_->records.size() + per_chunk <= kMaxSegmentRecordBytes;
    if (!extend) {
      if (seg_->records.size() + kRecordHeaderBytes + per_chunk >
          kMaxSegmentRecordBytes) {
        if (absl::Status s = Flush(); !s.ok()) return s;
      }
      write_at_ = seg_->records.size();
      seg_->records.resize(write_at_ + kRecordHeaderBytes);
      EncodeRecordHeader({RecordType::kWrite, 0, chunk},
                         seg_->records.data() + write_at_);
      ++seg_->record_count;
      ++stats_.records;
    }
    size_t at = seg_->records.size();
    seg_->records.resize(at + per_chunk);
    std::memcpy(seg_->records.data() + at, digest.bytes.data(), 16);
    std::memcpy(seg_->records.data() + at + 16, data.data(), chunk_size_);
    std::byte* count = seg_->records.data() + write_at_ + 4;
    blockstore::PutLe32(count, blockstore::GetLe32(count) + 1);
    write_next_ = chunk + 1;
    ++stats_.chunks_written;
    return absl::OkStatus();
  }

  absl::Status Flush() {
    write_at_ = kNone;
    if (seg_->record_count == 0) return absl::OkStatus();
    stats_.record_bytes += seg_->records.size();
    ++stats_.segments;
    absl::Status s = pipeline_.Push(std::move(seg_));
    Start();
    return s;
  }

 private:
  static constexpr size_t kNone = ~size_t{0};

  void Start() {
    seg_ = pipeline_.TakeSegment();
    seg_->sequence = next_sequence_++;
  }

  absl::Status Record(const RecordHeader& r) {
    write_at_ = kNone;
    if (seg_->records.size() + kRecordHeaderBytes > kMaxSegmentRecordBytes) {
      if (absl::Status s = Flush(); !s.ok()) return s;
    }
    size_t at = seg_->records.size();
    seg_->records.resize(at + kRecordHeaderBytes);
    EncodeRecordHeader(r, seg_->records.data() + at);
    ++seg_->record_count;
    ++stats_.records;
    return absl::OkStatus();
  }

  Pipeline& pipeline_;
  const uint32_t chunk_size_;
  SendStats& stats_;
  std::unique_ptr<Segment> seg_;
  uint64_t next_sequence_;
  size_t write_at_ = kNone;
  uint64_t write_next_ = 0;
};

// Where a send starts: the beginning, or a receiver's resume point.
struct Start {
  uint64_t chain = 0;
  uint64_t next_segment = 0;
  uint64_t next_chunk = 0;
  bool any_record = false;
  SendStats totals;  // records before the start (for the end record)
  uint64_t stored_bytes = 0;
};

// Checks `options.resume` against the stream about to be sent and turns it
// into a start. FailedPrecondition if it is another stream's (the
// receiver must start over).
absl::StatusOr<Start> StartOf(const DeltaHeader& h, uint64_t header_checksum,
                              const SendOptions& options) {
  Start st;
  st.chain = header_checksum;
  if (!options.resume) return st;
  const ResumeToken& t = *options.resume;
  if (t.target_guid != h.target_guid || t.base_guid != h.base_guid ||
      t.header_checksum != header_checksum) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the receiver's resume point is for another stream than the delta "
        "of '",
        h.volume_name, "@", h.target_name,
        "' (its snapshots changed since); the receive must start over"));
  }
  if (t.next_chunk > h.chunk_count() || t.next_segment == 0) {
    return absl::FailedPreconditionError(
        "the receiver's resume point is out of range for this delta");
  }
  st.chain = t.chain;
  st.next_segment = t.next_segment;
  st.next_chunk = t.next_chunk;
  st.any_record = t.any_record;
  st.totals.segments = t.next_segment;
  st.totals.records = t.records;
  st.totals.chunks_written = t.chunks_written;
  st.totals.chunks_cleared = t.chunks_cleared;
  st.totals.record_bytes = t.record_bytes;
  st.stored_bytes = t.stored_bytes;
  return st;
}

// What goes into the records: batches of changed runs with the data of
// their kData runs, in increasing chunk order.
class RunFeed {
 public:
  virtual ~RunFeed() = default;
  // Total record bytes still to come (for progress) once known: a feed that
  // walks its diff as it sends knows it when the walk ends, nullopt before.
  virtual absl::StatusOr<std::optional<uint64_t>> Remaining() = 0;
  // The next batch; `runs` empty and true returned at the end.
  virtual absl::StatusOr<bool> Next(std::vector<ChangedRun>& runs,
                                    std::span<const std::byte>& data) = 0;
  // Tree nodes the feed's own walks of the diff visited.
  virtual uint64_t nodes_visited() const { return 0; }
};

// The changes between two snapshots, from the tree diff walked once (here,
// or by the caller), with read-ahead: while the chunks of one batch are
// packed into segments (and compressed by the pipeline), the next batch is
// read from disk on another thread into the other buffer.
class DiffFeed final : public RunFeed {
 public:
  DiffFeed(blockstore::Pool& pool, absl::string_view volume,
           absl::string_view base, absl::string_view target, uint64_t from,
           std::shared_ptr<const WalkedDiff> walked)
      : pool_(pool),
        volume_(volume),
        base_(base),
        target_(target),
        from_(from),
        chunk_(pool.chunk_size()),
        batch_(std::max<size_t>(1, (4u << 20) / chunk_)),
        recycler_(batch_ * chunk_),
        walked_(walked && walked->from == from ? std::move(walked) : nullptr) {
    for (uint64_t i = 0; i < kInFlight; ++i) {
      readers_.emplace_back([this] { ReadBatches(); });
    }
  }

  ~DiffFeed() override {
    // Never leave a read running into a buffer about to be freed: the
    // readers finish the batch they are reading and leave the rest.
    {
      std::lock_guard lock(gate_mu_);
      stopping_ = true;
    }
    gate_.notify_all();
    for (std::thread& t : readers_) t.join();
  }

  absl::StatusOr<std::optional<uint64_t>> Remaining() override {
    if (!walked_) return std::nullopt;  // the walk is under way
    if (total_) return total_;
    uint64_t total = 0;
    auto add = [&](const std::vector<ChangedRun>& runs) {
      for (const ChangedRun& r : runs) {
        total += r.kind == ChangedRun::Kind::kData ? 16 + chunk_
                                                   : kRecordHeaderBytes;
      }
    };
    add(walked_->runs);
    // Past what the walk kept: counted now, walked again as it is sent.
    for (uint64_t from = walked_->next_chunk; !walked_->complete;) {
      absl::StatusOr<blockstore::DiffBatch> d =
          pool_.Diff(volume_, base_, target_, from, 65536);
      if (!d.ok()) return d.status();
      nodes_visited_ += d->nodes_visited;
      add(d->runs);
      if (d->done) break;
      from = d->next_chunk;
    }
    total_ = total;
    return total_;
  }

  absl::StatusOr<bool> Next(std::vector<ChangedRun>& runs,
                            std::span<const std::byte>& data) override {
    if (started_) {
      // The caller is done with the batch returned last: its buffer goes to
      // the reads to come.
      recycler_.Give(std::move(batches_[consumed_ % kReadAhead].data));
      ++consumed_;
    }
    started_ = true;
    // The walk goes on (when the send walks its own diff) up to the read-
    // ahead: until the batch to return is found, a step at each call at
    // least, and more while that batch's read is under way. The tree is
    // walked while the disk reads the chunks found so far and the caller
    // compresses those read, and the read-ahead deepens by a batch a call
    // (a send slower than its reads still gets ahead of them, to ride out
    // a receiver's writes that hold the disk).
    for (bool stepped = false;
         !walked_ &&
         (started_batches_ == consumed_ ||
          (started_batches_ - consumed_ < kReadAhead &&
           (!stepped || !ReadDone(batches_[consumed_ % kReadAhead]))));
         stepped = true) {
      if (absl::Status s = WalkStep(); !s.ok()) return s;
    }
    // Keep kReadAhead batches read or being read ahead of the caller.
    while (walked_ && !all_started_ &&
           started_batches_ - consumed_ < kReadAhead) {
      Batch& b = batches_[started_batches_ % kReadAhead];
      if (absl::Status s = StartBatch(b); !s.ok()) return s;
      ++started_batches_;
      all_started_ = b.last;
    }
    if (consumed_ == started_batches_) {
      runs.clear();
      return true;
    }
    Batch& b = batches_[consumed_ % kReadAhead];
    if (absl::Status s = b.read.get(); !s.ok()) return s;
    runs = b.runs;
    data = b.data.span();
    return false;
  }

  uint64_t nodes_visited() const override { return nodes_visited_; }

 private:
  // Batches (4 MiB each) whose chunks are read at once, ahead of the one
  // being sent: up to 128 MiB read ahead. A receiver writing the same disk
  // takes it from the reads in bursts, and with 16 MiB (on both sides) the
  // send stalled through them: the full baseline of bench/run_delta.sh
  // measures what the depth buys (bench/RESULTS.md). A read takes its
  // buffer as it starts, one the caller gave back if there is one: a send
  // that keeps up with its reads holds a few buffers, not one a batch.
  static constexpr uint64_t kReadAhead = 32;
  // Of those, the oldest kInFlight are read at a time: issued all at once,
  // the disk serves them side by side and the first batch comes in with the
  // last (a 1% update's 10 batches together, compression starting only then);
  // two at a time hand the caller batches in order as they finish, while
  // the next is already at the disk. One reader thread each, for the whole
  // send (a thread a batch cost a stack's mmap and munmap every 4 MiB: a
  // full 4 GiB baseline started 1,024).
  static constexpr uint64_t kInFlight = 2;

  struct Batch {
    std::vector<ChangedRun> runs;
    bool last = false;
    std::vector<ChangedRun> reads;
    blockstore::AlignedBuffer data;
    std::promise<absl::Status> read_done;  // set by a reader
    std::future<absl::Status> read;
  };

  static bool ReadDone(const Batch& b) {
    return b.read.wait_for(std::chrono::seconds(0)) ==
           std::future_status::ready;
  }

  // One step of the send's own walk of the diff, which goes a batch at a
  // time (each pool walk stops after batch_ data chunks, and the next takes
  // up where it stopped), starting the batch's read as soon as its runs are
  // known: the disk reads the first chunks while the rest of the tree is
  // walked. (Walked whole first, a 1% update's data reads and compression
  // waited for all the tree's leaves to be read, decoded and compared.)
  absl::Status WalkStep() {
    if (!walking_) {
      walking_ = std::make_shared<WalkedDiff>();
      walking_->from = from_;
      walking_->next_chunk = from_;
    }
    WalkedDiff& w = *walking_;
    absl::StatusOr<blockstore::DiffBatch> d =
        pool_.Diff(volume_, base_, target_, w.next_chunk, batch_);
    if (!d.ok()) return d.status();
    w.nodes_visited += d->nodes_visited;
    nodes_visited_ += d->nodes_visited;
    w.runs.insert(w.runs.end(), d->runs.begin(), d->runs.end());
    w.complete = d->done;
    w.next_chunk = d->next_chunk;
    if (w.complete || w.runs.size() >= kMaxWalkedRuns) {
      // The last batch starts in Next, marked as the last.
      walked_ = std::move(walking_);
      return absl::OkStatus();
    }
    // One pool walk's runs are one batch: it stopped at batch_ data chunks.
    // Next walks only while there is room in the read-ahead.
    if (absl::Status s = StartBatch(batches_[started_batches_ % kReadAhead]);
        !s.ok()) {
      return s;
    }
    ++started_batches_;
    return absl::OkStatus();
  }

  // The next batch_ data chunks' runs: from the walk (or what of it is done
  // while it runs), then (past what it kept) from the tree again.
  absl::Status TakeRuns(Batch& b) {
    b.runs.clear();
    const WalkedDiff& walk = walked_ ? *walked_ : *walking_;
    const std::vector<ChangedRun>& kept = walk.runs;
    size_t data = 0;
    while (next_run_ < kept.size() && data < batch_) {
      const ChangedRun& r = kept[next_run_++];
      data += r.kind == ChangedRun::Kind::kData;
      b.runs.push_back(r);
    }
    if (!walked_) {
      b.last = false;  // more to come: the walk goes on
      return absl::OkStatus();
    }
    if (next_run_ < kept.size() || walked_->complete) {
      b.last = next_run_ == kept.size();
      return absl::OkStatus();
    }
    if (!b.runs.empty()) {
      b.last = false;
      return absl::OkStatus();
    }
    if (rest_from_ == 0) rest_from_ = walked_->next_chunk;
    absl::StatusOr<blockstore::DiffBatch> d =
        pool_.Diff(volume_, base_, target_, rest_from_, batch_);
    if (!d.ok()) return d.status();
    nodes_visited_ += d->nodes_visited;
    b.runs = std::move(d->runs);
    b.last = d->done;
    rest_from_ = d->next_chunk;
    return absl::OkStatus();
  }

  absl::Status StartBatch(Batch& b) {
    if (absl::Status s = TakeRuns(b); !s.ok()) return s;
    b.reads.clear();
    for (const ChangedRun& r : b.runs) {
      if (r.kind == ChangedRun::Kind::kData) b.reads.push_back(r);
    }
    b.read_done = std::promise<absl::Status>();
    b.read = b.read_done.get_future();
    {
      std::lock_guard lock(gate_mu_);
      to_read_.push_back(&b);
    }
    gate_.notify_one();
    return absl::OkStatus();
  }

  // A reader: the batches started, in order, until the feed is destroyed.
  void ReadBatches() {
    while (true) {
      Batch* b;
      {
        std::unique_lock lock(gate_mu_);
        gate_.wait(lock, [&] { return stopping_ || !to_read_.empty(); });
        if (stopping_) return;
        b = to_read_.front();
        to_read_.pop_front();
      }
      // Taken only now, when the read starts: by then the caller has most
      // often given back a buffer (memory already touched) for it. Not
      // zeroed: ReadChunks fills every slot a run of the batch is read
      // into, and only those are sent.
      b->data = recycler_.Take();
      b->read_done.set_value(pool_.ReadChunks(b->reads, b->data.span()));
    }
  }

  blockstore::Pool& pool_;
  const std::string volume_, base_, target_;
  const uint64_t from_;
  const uint32_t chunk_;
  const size_t batch_;
  blockstore::BufferRecycler recycler_;  // the batches' buffers
  std::shared_ptr<const WalkedDiff> walked_;
  std::shared_ptr<WalkedDiff> walking_;  // the walk under way (WalkStep)
  std::optional<uint64_t> total_;        // Remaining(), once counted
  size_t next_run_ = 0;                  // the next of walked_->runs to send
  uint64_t rest_from_ = 0;      // where the tree is walked again, past them
  uint64_t nodes_visited_ = 0;  // by this feed's own walks
  Batch batches_[kReadAhead];
  uint64_t started_batches_ = 0, consumed_ = 0;
  // Batches started and not yet taken by a reader, in order. std::mutex for
  // ThreadSanitizer, as in Pipeline.
  std::mutex gate_mu_;
  std::condition_variable gate_;
  std::deque<Batch*> to_read_;  // guarded by gate_mu_, as is stopping_
  bool stopping_ = false;
  std::vector<std::thread> readers_;  // last: they use all of the above
  bool started_ = false;
  bool all_started_ = false;
};

// Listed chunks of a snapshot, each read and hashed here (hash-diff: the
// chunks found to differ, a small part of the volume).
class ChunkListFeed final : public RunFeed {
 public:
  ChunkListFeed(blockstore::Pool& pool, absl::string_view volume,
                const blockstore::SnapshotInfo& target,
                std::span<const uint64_t> chunks)
      : pool_(pool),
        volume_(volume),
        target_(target),
        chunks_(chunks),
        chunk_(pool.chunk_size()),
        buf_(kBatch * chunk_) {}

  absl::StatusOr<std::optional<uint64_t>> Remaining() override {
    return (chunks_.size() - at_) * (16 + chunk_);
  }

  absl::StatusOr<bool> Next(std::vector<ChangedRun>& runs,
                            std::span<const std::byte>& data) override {
    runs.clear();
    if (at_ == chunks_.size()) return true;
    for (size_t i = 0; i < kBatch && at_ < chunks_.size(); ++i, ++at_) {
      const uint64_t c = chunks_[at_];
      std::span<std::byte> slot = buf_.span().subspan(i * chunk_, chunk_);
      std::fill(slot.begin(), slot.end(), std::byte{0});
      const uint64_t off = c * chunk_;
      const uint64_t len = std::min<uint64_t>(chunk_, target_.size_bytes - off);
      if (absl::Status s =
              pool_.Read(volume_, target_.name, off, slot.first(len));
          !s.ok()) {
        return s;
      }
      runs.push_back(
          {ChangedRun::Kind::kData, c, 1, 0, blockstore::Hash128(slot)});
    }
    data = buf_.span();
    return false;
  }

 private:
  static constexpr size_t kBatch = 64;
  blockstore::Pool& pool_;
  const std::string volume_;
  const blockstore::SnapshotInfo target_;
  std::span<const uint64_t> chunks_;
  const uint32_t chunk_;
  size_t at_ = 0;
  blockstore::AlignedBuffer buf_;
};

// Sends `h` and the records `feed` yields (a RESIZE first when the sizes
// differ), from `options.resume` if given, then the end.
absl::StatusOr<SendStats> SendStream(const DeltaHeader& h, RunFeed& feed,
                                     ByteSink& out,
                                     const SendOptions& options) {
  uint64_t header_checksum = 0;
  std::string header = EncodeHeader(h, &header_checksum);
  absl::StatusOr<Start> start = StartOf(h, header_checksum, options);
  if (!start.ok()) return start.status();
  // The header goes out first, so the receiver prepares while the metadata
  // is walked.
  if (absl::Status s = out.Write(
          {reinterpret_cast<const std::byte*>(header.data()), header.size()});
      !s.ok()) {
    return s;
  }
  absl::StatusOr<std::optional<uint64_t>> total = feed.Remaining();
  if (!total.ok()) return total.status();
  SendStats stats = start->totals;
  const uint64_t segments_before = stats.segments;
  bool total_known = total->has_value();

  int workers = options.threads > 0
                    ? options.threads
                    : std::max(1u, std::thread::hardware_concurrency());
  Pipeline pipeline(workers, options.zstd_level, out, start->chain, options,
                    total->value_or(0), start->next_segment);
  SegmentBuilder builder(pipeline, h.chunk_size, stats, start->next_segment);
  absl::Status status;
  if (!h.full() && h.base_size_bytes != h.size_bytes && !start->any_record) {
    status = builder.Resize(h.size_bytes);
  }
  std::vector<ChangedRun> runs;
  std::span<const std::byte> data;
  while (status.ok()) {
    absl::StatusOr<bool> end = feed.Next(runs, data);
    if (!end.ok()) {
      status = end.status();
      break;
    }
    if (*end) break;
    if (!total_known) {
      total = feed.Remaining();
      if (!total.ok()) {
        status = total.status();
        break;
      }
      if (total->has_value()) pipeline.SetTotal(**total);
      total_known = total->has_value();
    }
    size_t next_read = 0;
    for (const ChangedRun& r : runs) {
      if (!status.ok()) break;
      if (r.kind == ChangedRun::Kind::kData) {
        status = builder.Write(
            r.first_chunk, r.digest,
            data.subspan(next_read++ * h.chunk_size, h.chunk_size));
      } else {
        status = builder.Clear(r.kind, r.first_chunk, r.count_chunks);
      }
    }
  }
  if (status.ok()) status = builder.Flush();
  uint64_t end_chain = 0, stored = 0;
  absl::Status finished = pipeline.Finish(&end_chain, &stored);
  if (!status.ok()) return status;
  if (!finished.ok()) return finished;

  DeltaEnd e;
  e.segment_count = stats.segments;
  e.record_count = stats.records;
  e.chunks_written = stats.chunks_written;
  e.chunks_cleared = stats.chunks_cleared;
  e.record_bytes = stats.record_bytes;
  e.stored_bytes = start->stored_bytes + stored;
  e.chain = end_chain;
  e.target_digest = h.target_digest;
  std::array<std::byte, kEndBytes> end;
  EncodeEnd(e, end);
  if (absl::Status s = out.Write(end); !s.ok()) return s;
  stats.stream_bytes =
      header.size() + (stats.segments - segments_before) * kSegmentHeaderBytes +
      stored + kEndBytes;
  stats.nodes_visited = feed.nodes_visited();
  return stats;
}

void SetTarget(DeltaHeader& h, const blockstore::VolumeInfo& vol,
               const blockstore::SnapshotInfo& t, uint32_t chunk_size) {
  h.features = kFeatureZstd;
  h.chunk_size = chunk_size;
  h.size_bytes = t.size_bytes;
  h.volume_guid = vol.guid;
  h.target_guid = t.guid;
  h.target_create_time_ns = t.create_time_ns;
  h.target_digest = t.root_digest;
  h.volume_name = vol.name;
  h.target_name = t.name;
}

void SetBase(DeltaHeader& h, const blockstore::SnapshotInfo& b) {
  h.base_size_bytes = b.size_bytes;
  h.base_guid = b.guid;
  h.base_create_time_ns = b.create_time_ns;
  h.base_digest = b.root_digest;
  h.base_name = b.name;
}

}  // namespace

absl::StatusOr<WalkedDiff> WalkDiff(blockstore::Pool& pool,
                                    absl::string_view volume,
                                    absl::string_view base,
                                    absl::string_view target, uint64_t from,
                                    size_t max_runs) {
  WalkedDiff w;
  w.from = from;
  w.next_chunk = from;
  while (!w.complete && w.runs.size() < max_runs) {
    absl::StatusOr<blockstore::DiffBatch> d =
        pool.Diff(volume, base, target, w.next_chunk, 65536);
    if (!d.ok()) return d.status();
    w.nodes_visited += d->nodes_visited;
    w.runs.insert(w.runs.end(), d->runs.begin(), d->runs.end());
    w.complete = d->done;
    w.next_chunk = d->next_chunk;
  }
  return w;
}

absl::StatusOr<SendStats> SendDelta(blockstore::Pool& pool,
                                    absl::string_view volume,
                                    absl::string_view base,
                                    absl::string_view target, ByteSink& out,
                                    const SendOptions& options) {
  absl::StatusOr<blockstore::VolumeInfo> vol = pool.GetVolume(volume);
  if (!vol.ok()) return vol.status();
  absl::StatusOr<blockstore::SnapshotInfo> t = pool.GetSnapshot(volume, target);
  if (!t.ok()) return t.status();
  DeltaHeader h;
  SetTarget(h, *vol, *t, pool.chunk_size());
  absl::StatusOr<std::vector<blockstore::SnapshotInfo>> all =
      pool.ListSnapshots(volume);
  if (!all.ok()) return all.status();
  uint64_t base_generation = 0;
  if (!base.empty()) {
    absl::StatusOr<blockstore::SnapshotInfo> b = pool.GetSnapshot(volume, base);
    if (!b.ok()) return b.status();
    if (b->generation >= t->generation) {
      return absl::InvalidArgumentError(
          absl::StrCat("base snapshot '", base, "' is not older than target '",
                       target, "'"));
    }
    SetBase(h, *b);
    base_generation = b->generation;
  }
  for (const blockstore::SnapshotInfo& s : *all) {
    if (s.generation > base_generation && s.generation < t->generation &&
        h.listed.size() < kMaxListedSnapshots) {
      h.listed.push_back({s.guid, s.create_time_ns, s.name});
    }
  }
  uint64_t from = options.resume ? options.resume->next_chunk : 0;
  DiffFeed feed(pool, volume, base, target, from, options.diff);
  return SendStream(h, feed, out, options);
}

absl::StatusOr<SendStats> SendChunks(
    blockstore::Pool& pool, absl::string_view volume, absl::string_view target,
    const blockstore::SnapshotInfo& base, std::span<const uint64_t> chunks,
    ByteSink& out, const SendOptions& options) {
  absl::StatusOr<blockstore::VolumeInfo> vol = pool.GetVolume(volume);
  if (!vol.ok()) return vol.status();
  absl::StatusOr<blockstore::SnapshotInfo> t = pool.GetSnapshot(volume, target);
  if (!t.ok()) return t.status();
  const uint64_t count =
      blockstore::DivRoundUp(t->size_bytes, pool.chunk_size());
  for (size_t i = 0; i < chunks.size(); ++i) {
    if (chunks[i] >= count || (i > 0 && chunks[i] <= chunks[i - 1])) {
      return absl::InvalidArgumentError(absl::StrCat(
          "chunk list for '", volume, "@", target,
          "' is not increasing within the snapshot (entry ", i, ")"));
    }
  }
  DeltaHeader h;
  SetTarget(h, *vol, *t, pool.chunk_size());
  SetBase(h, base);
  const uint64_t from = options.resume ? options.resume->next_chunk : 0;
  std::span<const uint64_t> rest = chunks.subspan(
      std::lower_bound(chunks.begin(), chunks.end(), from) - chunks.begin());
  ChunkListFeed feed(pool, volume, *t, rest);
  return SendStream(h, feed, out, options);
}

}  // namespace engine
