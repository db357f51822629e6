// Io backends over a file descriptor: io_uring (batched submits, a ring per
// caller in flight) and pread/pwrite. Both take the advisory pool lock at open.
#include <fcntl.h>
#include <liburing.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <deque>
#include <mutex>

#include "absl/base/thread_annotations.h"
#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "blockstore/io.h"
#include "blockstore/mutex.h"
#include "blockstore/util.h"

namespace blockstore {

absl::Status CheckIoOp(absl::string_view what, absl::string_view name,
                       uint64_t offset_bytes, uint64_t len, const void* buf,
                       uint64_t size_bytes) {
  if (offset_bytes % kIoAlign != 0 || len % kIoAlign != 0 ||
      reinterpret_cast<uintptr_t>(buf) % kIoAlign != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " ", name, " at ", offset_bytes, " length ", len,
                     ": not aligned to ", kIoAlign, " bytes"));
  }
  if (offset_bytes > size_bytes || len > size_bytes - offset_bytes) {
    return absl::OutOfRangeError(
        absl::StrCat(what, " ", name, " at ", offset_bytes, " length ", len,
                     ": past the end (", size_bytes, " bytes)"));
  }
  return absl::OkStatus();
}

namespace {

class FileIo : public Io {
 public:
  FileIo(int fd, std::string path, uint64_t size, bool direct)
      : fd_(fd), path_(std::move(path)), size_(size), direct_(direct) {
    struct stat st {};
    device_ = fstat(fd_, &st) == 0 && S_ISBLK(st.st_mode);
  }
  ~FileIo() override { close(fd_); }
  FileIo(const FileIo&) = delete;
  FileIo& operator=(const FileIo&) = delete;

  uint64_t size_bytes() const override { return size_; }
  std::string name() const override { return path_; }
  bool in_file_system() const override { return !device_; }
  virtual std::string Describe() const = 0;

  absl::Status Resize(uint64_t size_bytes) {
    if (device_) {
      return absl::FailedPreconditionError(
          absl::StrCat(path_, " is a block device: its size is its own"));
    }
    if (ftruncate(fd_, static_cast<off_t>(size_bytes)) != 0) {
      return ErrnoError(
          errno, absl::StrCat("resize ", path_, " to ", size_bytes, " bytes"));
    }
    size_ = size_bytes / kIoAlign * kIoAlign;
    return absl::OkStatus();
  }

  // A hole punched in a file, a discard on a device. A file system or
  // device that cannot is asked once.
  absl::Status Discard(std::span<const Extent> extents) override {
    for (const Extent& e : extents) {
      if (!can_discard_.load(std::memory_order_relaxed)) break;
      if (absl::Status s =
              Check("discard", e.offset_bytes, e.length_bytes, nullptr);
          !s.ok()) {
        return s;
      }
      int rc;
      if (device_) {
        uint64_t range[2] = {e.offset_bytes, e.length_bytes};
        rc = ioctl(fd_, BLKDISCARD, &range);
      } else {
        rc = fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                       static_cast<off_t>(e.offset_bytes),
                       static_cast<off_t>(e.length_bytes));
      }
      if (rc == 0) continue;
      if (errno == EOPNOTSUPP || errno == ENOTTY || errno == ENOSYS) {
        can_discard_.store(false, std::memory_order_relaxed);
        break;
      }
      return ErrnoError(errno,
                        absl::StrCat("discard ", path_, " at ", e.offset_bytes,
                                     " length ", e.length_bytes));
    }
    return absl::OkStatus();
  }

 protected:
  absl::Status Check(absl::string_view what, uint64_t off, uint64_t len,
                     const void* buf) const {
    return CheckIoOp(what, path_, off, len, buf, size_);
  }
  const int fd_;
  const std::string path_;
  uint64_t size_;  // changed only by Resize, with no I/O in flight
  const bool direct_;
  bool device_ = false;  // a block device, else a regular file
  std::atomic<bool> can_discard_{true};
};

class PosixIo final : public FileIo {
 public:
  using FileIo::FileIo;

  absl::Status Read(std::span<const ReadOp> ops) override {
    for (const ReadOp& op : ops) {
      if (absl::Status s =
              Check("read", op.offset_bytes, op.out.size(), op.out.data());
          !s.ok()) {
        return s;
      }
      size_t done = 0;
      while (done < op.out.size()) {
        ssize_t n = pread(fd_, op.out.data() + done, op.out.size() - done,
                          op.offset_bytes + done);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) {
          return ErrnoError(errno, absl::StrCat("read ", path_, " at ",
                                                op.offset_bytes + done));
        }
        if (n == 0) {
          return absl::OutOfRangeError(absl::StrCat(
              "read ", path_, " at ", op.offset_bytes + done, ": end of file"));
        }
        done += n;
      }
    }
    return absl::OkStatus();
  }

  absl::Status Write(std::span<const WriteOp> ops) override {
    for (const WriteOp& op : ops) {
      if (absl::Status s =
              Check("write", op.offset_bytes, op.data.size(), op.data.data());
          !s.ok()) {
        return s;
      }
      size_t done = 0;
      while (done < op.data.size()) {
        ssize_t n = pwrite(fd_, op.data.data() + done, op.data.size() - done,
                           op.offset_bytes + done);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
          return ErrnoError(
              n < 0 ? errno : EIO,
              absl::StrCat("write ", path_, " at ", op.offset_bytes + done));
        }
        done += n;
      }
    }
    return absl::OkStatus();
  }

  absl::Status Flush() override {
    if (fdatasync(fd_) != 0) {
      return ErrnoError(errno, absl::StrCat("flush ", path_));
    }
    return absl::OkStatus();
  }

  std::string Describe() const override {
    return direct_ ? "pread/pwrite, O_DIRECT" : "pread/pwrite, buffered";
  }
};

// io_uring with a ring per caller in flight: a call takes an idle ring from
// the pool's set (making a new one when none is idle, up to kMaxRings),
// submits its whole batch and waits on that ring alone, then gives it back.
// No lock is held while requests are in flight, so many threads keep many
// requests on the device at once; the set's mutex guards only the idle list.
// A batch larger than the ring depth is fed as completions free slots, and
// short transfers are resubmitted for their remainder.
class UringIo final : public FileIo {
 public:
  static constexpr unsigned kDepth = 128;
  // Rings beyond this wait for an idle one: callers past it would only queue
  // in the device anyway, and each ring pins a little kernel memory.
  static constexpr size_t kMaxRings = 64;
  // A call keeps at most this many bytes of writes at the device, in
  // requests of at most this size, so a read arriving behind a 16 MiB write
  // waits for half of it, not all. Smaller caps shorten a read's tail
  // further but throttle one writer: at 2 MiB a receive kept only 32 of its
  // scattered 64 KiB chunks in flight and the daemon baseline fell from 0.88
  // to 0.59 of the disk. 8 MiB is the ring's depth of 64 KiB chunks
  // (bench/RESULTS.md has the trade-off measured). Reads are not capped.
  static constexpr size_t kWriteBytesInFlight = 8 << 20;
  // While reads are at the device, or ended less than kReadWindow ago, a
  // call keeps at most this much of its writes there instead, so a read
  // waits behind a few of them, not 8 MiB: the writer yields to readers
  // (the kernel's writeback throttling does the same for buffered writes).
  // A writer's reads for its own writes (WritePathReads) do not count: a
  // cold receive reads the tree nodes it rewrites, and yielding to those
  // kept its writes at 128 KiB, one request at a time.
  static constexpr size_t kWriteBytesBesideReads = 128 << 10;
  static constexpr std::chrono::milliseconds kReadWindow{5};

  UringIo(int fd, std::string path, uint64_t size, bool direct,
          std::unique_ptr<io_uring> first)
      : FileIo(fd, std::move(path), size, direct) {
    MutexLock lock(mu_);
    idle_.push_back(std::move(first));
    rings_ = 1;
  }
  // Every ring is idle by now: no call is in progress.
  ~UringIo() override {
    MutexLock lock(mu_);
    for (Ring& ring : idle_) io_uring_queue_exit(ring.get());
  }

  absl::Status Read(std::span<const ReadOp> ops) override {
    std::vector<Piece> pieces;
    pieces.reserve(ops.size());
    for (const ReadOp& op : ops) {
      if (absl::Status s =
              Check("read", op.offset_bytes, op.out.size(), op.out.data());
          !s.ok()) {
        return s;
      }
      pieces.push_back({op.offset_bytes, op.out.data(), op.out.size(), false});
    }
    return Run(pieces);
  }

  absl::Status Write(std::span<const WriteOp> ops) override {
    std::vector<Piece> pieces;
    pieces.reserve(ops.size());
    for (const WriteOp& op : ops) {
      if (absl::Status s =
              Check("write", op.offset_bytes, op.data.size(), op.data.data());
          !s.ok()) {
        return s;
      }
      pieces.push_back({op.offset_bytes, const_cast<std::byte*>(op.data.data()),
                        op.data.size(), true});
    }
    return Run(pieces);
  }

  absl::Status Flush() override {
    absl::StatusOr<Ring> ring = Acquire();
    if (!ring.ok()) return ring.status();
    io_uring_sqe* sqe = io_uring_get_sqe(ring->get());
    io_uring_prep_fsync(sqe, fd_, IORING_FSYNC_DATASYNC);
    io_uring_sqe_set_data(sqe, nullptr);
    int rc = io_uring_submit_and_wait(ring->get(), 1);
    if (rc < 0) {
      // Whether the entry went out is unknown: this ring is not reused.
      DropRing(std::move(*ring));
      return ErrnoError(-rc, absl::StrCat("flush ", path_));
    }
    io_uring_cqe* cqe = nullptr;
    rc = io_uring_wait_cqe(ring->get(), &cqe);
    if (rc < 0) {
      DropRing(std::move(*ring));
      return ErrnoError(-rc, absl::StrCat("flush ", path_));
    }
    int res = cqe->res;
    io_uring_cqe_seen(ring->get(), cqe);
    Release(std::move(*ring));
    if (res < 0) return ErrnoError(-res, absl::StrCat("flush ", path_));
    return absl::OkStatus();
  }

  std::string Describe() const override {
    return direct_ ? "io_uring, O_DIRECT" : "io_uring, buffered";
  }

 private:
  using Ring = std::unique_ptr<io_uring>;
  struct Piece {
    uint64_t offset;
    std::byte* buf;
    size_t len;
    bool write;
  };

  absl::StatusOr<Ring> Acquire() {
    MutexLock lock(mu_);
    for (;;) {
      if (!idle_.empty()) {
        Ring ring = std::move(idle_.back());
        idle_.pop_back();
        return ring;
      }
      if (rings_ < kMaxRings) {
        auto ring = std::make_unique<io_uring>();
        int rc = io_uring_queue_init(kDepth, ring.get(), 0);
        if (rc == 0) {
          ++rings_;
          return ring;
        }
        // Out of memory for another ring (locked-memory limit): wait for
        // one of those that exist, unless none does.
        if (rings_ == 0) {
          return ErrnoError(-rc, absl::StrCat("io_uring setup for ", path_));
        }
      }
      idle_cv_.wait(mu_, [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return !idle_.empty() || rings_ < kMaxRings;
      });
    }
  }
  void Release(Ring ring) {
    {
      MutexLock lock(mu_);
      idle_.push_back(std::move(ring));
    }
    idle_cv_.notify_one();
  }
  // A ring whose submission failed may still hold entries that point into
  // a caller's buffers: it is dropped (its requests die with it), and a
  // fresh one takes its place when needed.
  void DropRing(Ring ring) {
    io_uring_queue_exit(ring.get());
    {
      MutexLock lock(mu_);
      --rings_;
    }
    idle_cv_.notify_one();
  }

  absl::Status Run(std::vector<Piece>& pieces) {
    std::deque<Piece*> todo;
    for (Piece& p : pieces) {
      if (p.len > 0) todo.push_back(&p);
    }
    if (todo.empty()) return absl::OkStatus();
    // Parts of pieces split into requests (a deque: pointers stay valid).
    std::deque<Piece> parts;
    absl::StatusOr<Ring> acquired = Acquire();
    if (!acquired.ok()) return acquired.status();
    io_uring* ring = acquired->get();
    const bool reading = !todo.front()->write;
    // Readers that writes yield to: not a writer's reads for its own write.
    const bool reader = reading && !WritePathReads::active();
    if (reader) reads_in_flight_.fetch_add(1, std::memory_order_relaxed);
    absl::Cleanup read_ended = [&] {
      if (!reader) return;
      last_read_end_ns_.store(NowNs(), std::memory_order_relaxed);
      reads_in_flight_.fetch_sub(1, std::memory_order_relaxed);
    };
    absl::Status first_error;
    unsigned in_flight = 0;
    size_t write_bytes = 0;  // of the requests in flight
    while (!todo.empty() || in_flight > 0) {
      const size_t write_cap = reading ? 0 : WriteCap();
      unsigned queued = 0;
      while (!todo.empty() && in_flight + queued < kDepth) {
        Piece* p = todo.front();
        // A piece larger than a request goes out in parts: the rest of it
        // stays at the front of the queue.
        const size_t cap = p->write ? write_cap : size_t{1} << 30;
        if (p->write && write_bytes > 0 &&
            write_bytes + std::min(p->len, cap) > write_cap) {
          break;
        }
        io_uring_sqe* sqe = io_uring_get_sqe(ring);
        if (sqe == nullptr) break;
        const unsigned len = static_cast<unsigned>(std::min(p->len, cap));
        Piece* sent = p;
        if (len < p->len) {
          parts.push_back({p->offset, p->buf, len, p->write});
          sent = &parts.back();
          p->offset += len;
          p->buf += len;
          p->len -= len;
        } else {
          todo.pop_front();
        }
        if (sent->write) {
          io_uring_prep_write(sqe, fd_, sent->buf, len, sent->offset);
          write_bytes += len;
        } else {
          io_uring_prep_read(sqe, fd_, sent->buf, len, sent->offset);
        }
        io_uring_sqe_set_data(sqe, sent);
        ++queued;
      }
      int rc = io_uring_submit_and_wait(ring, 1);
      if (rc < 0 && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY) {
        // The ring refused the batch for a reason retrying will not mend.
        DropRing(std::move(*acquired));
        return ErrnoError(-rc, absl::StrCat("io_uring submit on ", path_));
      }
      in_flight += queued;
      io_uring_cqe* cqe = nullptr;
      unsigned head;
      unsigned seen = 0;
      io_uring_for_each_cqe(ring, head, cqe) {
        ++seen;
        --in_flight;
        Piece* p = static_cast<Piece*>(io_uring_cqe_get_data(cqe));
        if (p->write) write_bytes -= p->len;
        int res = cqe->res;
        if (res == -EAGAIN || res == -EINTR) {
          todo.push_back(p);
        } else if (res < 0) {
          if (first_error.ok()) {
            first_error =
                ErrnoError(-res, absl::StrCat(p->write ? "write " : "read ",
                                              path_, " at ", p->offset));
          }
        } else if (res == 0) {
          if (first_error.ok()) {
            first_error =
                p->write
                    ? ErrnoError(
                          EIO, absl::StrCat("write ", path_, " at ", p->offset))
                    : absl::OutOfRangeError(absl::StrCat(
                          "read ", path_, " at ", p->offset, ": end of file"));
          }
        } else {
          p->offset += res;
          p->buf += res;
          p->len -= res;
          if (p->len > 0 && first_error.ok()) todo.push_back(p);
        }
      }
      io_uring_cq_advance(ring, seen);
      if (!first_error.ok()) todo.clear();
    }
    Release(std::move(*acquired));
    return first_error;
  }

  static int64_t NowNs() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }
  // How much of one call's writes may be at the device now.
  size_t WriteCap() const {
    if (reads_in_flight_.load(std::memory_order_relaxed) > 0 ||
        NowNs() - last_read_end_ns_.load(std::memory_order_relaxed) <
            std::chrono::nanoseconds(kReadWindow).count()) {
      return kWriteBytesBesideReads;
    }
    return kWriteBytesInFlight;
  }

  Mutex mu_;
  CondVar idle_cv_;
  std::vector<Ring> idle_ ABSL_GUARDED_BY(mu_);
  size_t rings_ ABSL_GUARDED_BY(mu_) = 0;  // idle and in use
  // Calls reading now, and when the last one ended (steady clock, ns).
  std::atomic<int> reads_in_flight_{0};
  std::atomic<int64_t> last_read_end_ns_{0};
};

absl::Status Lock(int fd, absl::string_view path, OpenMode mode) {
  struct flock fl {};
  fl.l_type = mode == OpenMode::kReadWrite ? F_WRLCK : F_RDLCK;
  fl.l_whence = SEEK_SET;
  if (fcntl(fd, F_SETLK, &fl) == 0) return absl::OkStatus();
  int err = errno;
  if (err != EACCES && err != EAGAIN) {
    return ErrnoError(err, absl::StrCat("lock ", path));
  }
  struct flock holder {};
  holder.l_type = fl.l_type;
  holder.l_whence = SEEK_SET;
  std::string who = "another process";
  if (fcntl(fd, F_GETLK, &holder) == 0 && holder.l_type != F_UNLCK) {
    who = absl::StrCat("process ", holder.l_pid);
  }
  return absl::FailedPreconditionError(absl::StrCat(
      "pool ", path, " is in use by ", who,
      holder.l_type == F_WRLCK ? " (open for writing)" : " (open for reading)",
      "; wait for it to finish or stop it"));
}

const char* FileKind(mode_t mode) {
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISFIFO(mode)) return "a FIFO";
  if (S_ISSOCK(mode)) return "a socket";
  if (S_ISCHR(mode)) return "a character device";
  return "not a regular file";
}

}  // namespace

absl::StatusOr<std::unique_ptr<Io>> OpenFileIo(absl::string_view path_view,
                                               const FileIoOptions& options) {
  std::string path(path_view);
  // O_NONBLOCK: opening a FIFO would otherwise wait for its other end; what
  // is not a file or a block device is refused below, once open.
  int flags = O_CLOEXEC | O_NONBLOCK |
              (options.mode == OpenMode::kReadWrite ? O_RDWR : O_RDONLY);
  if (options.create_size_bytes > 0) flags |= O_CREAT;
  bool direct = options.direct;
  int fd = open(path.c_str(), flags | (direct ? O_DIRECT : 0), 0644);
  if (fd < 0 && direct && errno == EINVAL) {
    direct = false;  // The filesystem (tmpfs, say) has no O_DIRECT.
    fd = open(path.c_str(), flags, 0644);
  }
  if (fd < 0) {
    int err = errno;
    if (err == ENOENT) {
      return absl::NotFoundError(absl::StrCat(path, ": no such file"));
    }
    return ErrnoError(err, absl::StrCat("open ", path));
  }
  auto close_fd = [fd] { close(fd); };
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    int err = errno;
    close_fd();
    return ErrnoError(err, absl::StrCat("stat ", path));
  }
  uint64_t size = 0;
  if (S_ISBLK(st.st_mode)) {
    if (ioctl(fd, BLKGETSIZE64, &size) != 0) {
      int err = errno;
      close_fd();
      return ErrnoError(err, absl::StrCat("size of block device ", path));
    }
  } else if (S_ISREG(st.st_mode)) {
    size = st.st_size;
  } else {
    close_fd();
    return absl::InvalidArgumentError(
        absl::StrCat(path, " is ", FileKind(st.st_mode),
                     ", not a pool: name a regular file or a block device"));
  }
  if (absl::Status s = Lock(fd, path, options.mode); !s.ok()) {
    close_fd();
    return s;
  }
  if (S_ISREG(st.st_mode) && options.create_size_bytes > size) {
    if (ftruncate(fd, options.create_size_bytes) != 0) {
      int err = errno;
      close_fd();
      return ErrnoError(err, absl::StrCat("extend ", path, " to ",
                                          options.create_size_bytes));
    }
    size = options.create_size_bytes;
  }
  // Back to blocking I/O (it means nothing for files and devices anyway).
  if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK) != 0) {
    int err = errno;
    close_fd();
    return ErrnoError(err, absl::StrCat("open ", path));
  }
  size = size / kIoAlign * kIoAlign;

  if (options.use_uring) {
    auto ring = std::make_unique<io_uring>();
    int rc = io_uring_queue_init(UringIo::kDepth, ring.get(), 0);
    if (rc == 0) {
      return std::make_unique<UringIo>(fd, path, size, direct, std::move(ring));
    }
    // ENOSYS/EPERM (seccomp) or ENOMEM (locked-memory limit): fall back.
  }
  return std::make_unique<PosixIo>(fd, path, size, direct);
}

absl::Status ResizeFileIo(Io& io, uint64_t size_bytes) {
  auto* f = dynamic_cast<FileIo*>(&io);
  if (f == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat(io.name(), " is not a file: it cannot be resized"));
  }
  return f->Resize(size_bytes);
}

std::string DescribeFileIo(const Io& io) {
  if (auto* f = dynamic_cast<const FileIo*>(&io)) return f->Describe();
  return "memory";
}

}  // namespace blockstore
