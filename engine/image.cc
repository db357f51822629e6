#include "engine/image.h"

#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <type_traits>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "blockstore/digest_builder.h"
#include "blockstore/util.h"

namespace engine {

using blockstore::AlignedBuffer;
using blockstore::ErrnoError;
using blockstore::kIoAlign;
using blockstore::ReadOp;
using blockstore::RoundUp;
using blockstore::WriteOp;

namespace {

uint64_t RoundDown(uint64_t v, uint64_t align) { return v / align * align; }

// Zeros [offset, offset + length) of `image` by writing zeros; a partial
// block at either end (not at the image's end) is read, patched, written.
absl::Status ZeroByWriting(RawImage& image, uint64_t offset, uint64_t length) {
  const uint64_t size = image.size_bytes();
  uint64_t end = std::min(size, offset + length);
  if (offset >= end) return absl::OkStatus();
  AlignedBuffer block(kIoAlign);
  auto patch = [&](uint64_t at, uint64_t from, uint64_t to) -> absl::Status {
    const uint64_t n = std::min<uint64_t>(kIoAlign, size - at);
    std::span<std::byte> b = block.span().first(n);
    ReadOp r{at, b};
    if (absl::Status s = image.Read({&r, 1}); !s.ok()) return s;
    std::memset(b.data() + (from - at), 0, to - from);
    WriteOp w{at, b};
    return image.Write({&w, 1});
  };
  if (offset % kIoAlign != 0) {
    const uint64_t at = RoundDown(offset, kIoAlign);
    const uint64_t to = std::min(end, at + kIoAlign);
    if (absl::Status s = patch(at, offset, to); !s.ok()) return s;
    offset = to;
  }
  if (offset >= end) return absl::OkStatus();
  // Whole blocks (and the image's last bytes when `end` is its end).
  const uint64_t whole_end = end == size ? end : RoundDown(end, kIoAlign);
  static const AlignedBuffer* zeros = new AlignedBuffer(1 << 20);
  for (uint64_t at = offset; at < whole_end;) {
    const uint64_t n = std::min<uint64_t>(zeros->size(), whole_end - at);
    WriteOp w{at, zeros->span().first(n)};
    if (absl::Status s = image.Write({&w, 1}); !s.ok()) return s;
    at += n;
  }
  if (whole_end < end) return patch(whole_end, whole_end, end);
  return absl::OkStatus();
}

// A regular file or block device: whole 4 KiB blocks through the block
// store's Io (io_uring, O_DIRECT), the bytes past the last whole block of a
// file of any size through a buffered descriptor.
class FileImage final : public RawImage {
 public:
  FileImage(std::unique_ptr<blockstore::Io> io, int fd, std::string path,
            bool regular, uint64_t size)
      : io_(std::move(io)),
        fd_(fd),
        path_(std::move(path)),
        regular_(regular),
        size_(size) {}
  ~FileImage() override {
    io_.reset();
    close(fd_);
  }

  uint64_t size_bytes() const override { return size_; }
  bool resizable() const override { return regular_; }
  std::string name() const override { return path_; }

  absl::Status Read(std::span<const ReadOp> ops) override {
    return Transfer<ReadOp, &ReadOp::out>(ops);
  }
  absl::Status Write(std::span<const WriteOp> ops) override {
    return Transfer<WriteOp, &WriteOp::data>(ops);
  }

  absl::Status Zero(uint64_t offset, uint64_t length) override {
    length = std::min(length, size_ > offset ? size_ - offset : 0);
    if (length == 0) return absl::OkStatus();
    if (regular_ && can_punch_) {
      // To the file's end: its last, partial block goes too.
      if (offset + length == size_) length = RoundUp(size_, kIoAlign) - offset;
      // A hole: zeros that take no space, at byte granularity.
      if (fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                    static_cast<off_t>(offset),
                    static_cast<off_t>(length)) == 0) {
        return absl::OkStatus();
      }
      if (errno != EOPNOTSUPP) {
        return ErrnoError(errno, absl::StrCat("zero ", length, " bytes of ",
                                              path_, " at ", offset));
      }
      can_punch_ = false;
    }
    if (!regular_ && can_punch_ && offset % kIoAlign == 0 &&
        length >= kIoAlign) {
      // A device zeroes whole blocks itself (WRITE ZEROES, or the kernel
      // writes them); the bytes past the last whole block are written.
      const uint64_t whole = RoundDown(length, kIoAlign);
      if (fallocate(fd_, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
                    static_cast<off_t>(offset),
                    static_cast<off_t>(whole)) == 0) {
        return ZeroByWriting(*this, offset + whole, length - whole);
      }
      if (errno != EOPNOTSUPP && errno != EINVAL) {
        return ErrnoError(errno, absl::StrCat("zero ", whole, " bytes of ",
                                              path_, " at ", offset));
      }
      can_punch_ = false;
    }
    return ZeroByWriting(*this, offset, length);
  }

  absl::Status Resize(uint64_t size_bytes) override {
    if (absl::Status s = blockstore::ResizeFileIo(*io_, size_bytes); !s.ok()) {
      return s;
    }
    size_ = size_bytes;
    return absl::OkStatus();
  }

  absl::Status Flush() override { return io_->Flush(); }

  std::optional<ImageIdentity> Identity() const override {
    struct stat st {};
    if (fstat(fd_, &st) != 0) return std::nullopt;
    ImageIdentity id;
    id.device = regular_ ? st.st_dev : st.st_rdev;
    id.inode = regular_ ? st.st_ino : 0;
    id.size_bytes = size_;
    id.change_time_ns =
        int64_t{st.st_ctim.tv_sec} * 1'000'000'000 + st.st_ctim.tv_nsec;
    return id;
  }

 private:
  absl::Status Check(uint64_t offset, uint64_t len) const {
    if (offset % kIoAlign != 0 || offset > size_ || len > size_ - offset) {
      return absl::InvalidArgumentError(
          absl::StrCat("image ", path_, ": ", len, " bytes at ", offset,
                       " are not aligned or past its end (", size_, " bytes)"));
    }
    return absl::OkStatus();
  }

  // Whole blocks of each op through the direct Io, in one batch; the bytes
  // past the last whole block of the file through the buffered descriptor.
  template <typename Op, auto kBuffer>
  absl::Status Transfer(std::span<const Op> ops) {
    constexpr bool kWrite = std::is_same_v<Op, WriteOp>;
    std::vector<Op> direct;
    for (const Op& op : ops) {
      const auto buffer = op.*kBuffer;
      if (absl::Status s = Check(op.offset_bytes, buffer.size()); !s.ok()) {
        return s;
      }
      const uint64_t n = DirectPart(op.offset_bytes, buffer.size());
      if (n > 0) direct.push_back({op.offset_bytes, buffer.first(n)});
      if (n < buffer.size()) {
        const auto rest = buffer.subspan(n);
        if (absl::Status s =
                Buffered(kWrite, op.offset_bytes + n,
                         {const_cast<std::byte*>(rest.data()), rest.size()});
            !s.ok()) {
          return s;
        }
      }
    }
    if (direct.empty()) return absl::OkStatus();
    if constexpr (kWrite) {
      return io_->Write(direct);
    } else {
      return io_->Read(direct);
    }
  }

  // How much of [offset, offset + len) goes through the direct Io.
  uint64_t DirectPart(uint64_t offset, uint64_t len) const {
    const uint64_t direct_end = io_->size_bytes();
    if (offset >= direct_end) return 0;
    return RoundDown(std::min(len, direct_end - offset), kIoAlign);
  }

  absl::Status Buffered(bool write, uint64_t offset, std::span<std::byte> b) {
    for (size_t done = 0; done < b.size();) {
      ssize_t n = write ? pwrite(fd_, b.data() + done, b.size() - done,
                                 static_cast<off_t>(offset + done))
                        : pread(fd_, b.data() + done, b.size() - done,
                                static_cast<off_t>(offset + done));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        return ErrnoError(n < 0 ? errno : EIO,
                          absl::StrCat(write ? "write " : "read ", path_,
                                       " at ", offset + done));
      }
      done += static_cast<size_t>(n);
    }
    return absl::OkStatus();
  }

  std::unique_ptr<blockstore::Io> io_;
  const int fd_;
  const std::string path_;
  const bool regular_;
  uint64_t size_;
  bool can_punch_ = true;  // a file's holes, a device's zeroed ranges
};

class IoImage final : public RawImage {
 public:
  explicit IoImage(blockstore::Io& io) : io_(io) {}
  uint64_t size_bytes() const override { return io_.size_bytes(); }
  bool resizable() const override { return false; }
  absl::Status Read(std::span<const ReadOp> ops) override {
    return io_.Read(ops);
  }
  absl::Status Write(std::span<const WriteOp> ops) override {
    return io_.Write(ops);
  }
  absl::Status Zero(uint64_t offset, uint64_t length) override {
    return ZeroByWriting(*this, offset, length);
  }
  absl::Status Resize(uint64_t) override {
    return absl::FailedPreconditionError(
        absl::StrCat(io_.name(), " cannot be resized"));
  }
  absl::Status Flush() override { return io_.Flush(); }
  std::string name() const override { return io_.name(); }
  std::optional<ImageIdentity> Identity() const override {
    return std::nullopt;
  }

 private:
  blockstore::Io& io_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<RawImage>> OpenImage(
    absl::string_view path_view, uint64_t create_size_bytes) {
  std::string path(path_view);
  blockstore::FileIoOptions o;
  o.create_size_bytes = create_size_bytes;
  absl::StatusOr<std::unique_ptr<blockstore::Io>> io =
      blockstore::OpenFileIo(path, o);
  if (!io.ok()) return io.status();
  int fd = open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) return ErrnoError(errno, absl::StrCat("open ", path));
  struct stat st {};
  uint64_t size = 0;
  if (fstat(fd, &st) != 0) {
    int err = errno;
    close(fd);
    return ErrnoError(err, absl::StrCat("stat ", path));
  }
  const bool regular = S_ISREG(st.st_mode);
  if (regular) {
    size = static_cast<uint64_t>(st.st_size);
  } else if (ioctl(fd, BLKGETSIZE64, &size) != 0) {
    int err = errno;
    close(fd);
    return ErrnoError(err, absl::StrCat("size of block device ", path));
  }
  return std::make_unique<FileImage>(std::move(*io), fd, path, regular, size);
}

std::unique_ptr<RawImage> ImageOnIo(blockstore::Io& io) {
  return std::make_unique<IoImage>(io);
}

// --- The record beside an image ----------------------------------------------

namespace {

constexpr char kRecordMagic[16] = {'T', 'A', 'N', 'D', 'E', 'M', '-', 'I',
                                   'M', 'A', 'G', 'E', '-', 'R', 'E', 'C'};
constexpr uint32_t kRecordVersion = 1;
constexpr size_t kRecordFixedBytes = 144;

void PutBytes(std::string& out, const void* p, size_t n) {
  if (n > 0) out.append(static_cast<const char*>(p), n);
}
void Put64(std::string& out, uint64_t v) {
  std::byte b[8];
  blockstore::PutLe64(b, v);
  PutBytes(out, b, 8);
}
void Put32(std::string& out, uint32_t v) {
  std::byte b[4];
  blockstore::PutLe32(b, v);
  PutBytes(out, b, 4);
}

std::string EncodeRecord(const ImageRecord& r) {
  std::string out;
  PutBytes(out, kRecordMagic, 16);
  Put32(out, kRecordVersion);
  Put32(out, static_cast<uint32_t>(r.state));
  Put32(out, r.chunk_size);
  Put32(out, 0);
  PutBytes(out, r.volume_guid.data(), 16);
  PutBytes(out, r.snapshot_guid.data(), 16);
  PutBytes(out, r.root_digest.bytes.data(), 16);
  Put64(out, r.size_bytes);
  Put64(out, r.identity.device);
  Put64(out, r.identity.inode);
  Put64(out, r.identity.size_bytes);
  Put64(out, static_cast<uint64_t>(r.identity.change_time_ns));
  Put64(out, r.header_checksum);
  Put64(out, r.segments_done);
  Put64(out, r.chunk_digests.size());
  PutBytes(out, r.chunk_digests.data(), r.chunk_digests.size() * 16);
  Put64(out,
        blockstore::Hash64(
            {reinterpret_cast<const std::byte*>(out.data()), out.size()}, 0));
  return out;
}

std::optional<ImageRecord> DecodeRecord(const std::string& in) {
  const auto* p = reinterpret_cast<const std::byte*>(in.data());
  if (in.size() < kRecordFixedBytes + 8 ||
      std::memcmp(p, kRecordMagic, 16) != 0 ||
      blockstore::GetLe32(p + 16) != kRecordVersion) {
    return std::nullopt;
  }
  const uint64_t count = blockstore::GetLe64(p + 136);
  if (count > (in.size() - kRecordFixedBytes - 8) / 16 ||
      in.size() != kRecordFixedBytes + count * 16 + 8 ||
      blockstore::Hash64({p, in.size() - 8}, 0) !=
          blockstore::GetLe64(p + in.size() - 8)) {
    return std::nullopt;
  }
  ImageRecord r;
  const uint32_t state = blockstore::GetLe32(p + 20);
  if (state != 1 && state != 2) return std::nullopt;
  r.state = static_cast<ImageRecord::State>(state);
  r.chunk_size = blockstore::GetLe32(p + 24);
  std::memcpy(r.volume_guid.data(), p + 32, 16);
  std::memcpy(r.snapshot_guid.data(), p + 48, 16);
  std::memcpy(r.root_digest.bytes.data(), p + 64, 16);
  r.size_bytes = blockstore::GetLe64(p + 80);
  r.identity.device = blockstore::GetLe64(p + 88);
  r.identity.inode = blockstore::GetLe64(p + 96);
  r.identity.size_bytes = blockstore::GetLe64(p + 104);
  r.identity.change_time_ns =
      static_cast<int64_t>(blockstore::GetLe64(p + 112));
  r.header_checksum = blockstore::GetLe64(p + 120);
  r.segments_done = blockstore::GetLe64(p + 128);
  r.chunk_digests.resize(count);
  if (count > 0) {
    std::memcpy(r.chunk_digests.data(), p + kRecordFixedBytes, count * 16);
  }
  return r;
}

std::string DirectoryOf(const std::string& path) {
  size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

absl::Status SyncDirectoryOf(const std::string& path) {
  const std::string dir = DirectoryOf(path);
  int fd = open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return ErrnoError(errno, absl::StrCat("open ", dir));
  int rc = fsync(fd);
  int err = errno;
  close(fd);
  return rc == 0 ? absl::OkStatus()
                 : ErrnoError(err, absl::StrCat("sync ", dir));
}

}  // namespace

absl::StatusOr<std::optional<ImageRecord>> LoadImageRecord(
    const std::string& path) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return std::nullopt;
    return ErrnoError(errno, absl::StrCat("open ", path));
  }
  absl::Cleanup closer = [fd] { close(fd); };
  std::string bytes;
  char buf[1 << 16];
  for (;;) {
    ssize_t n = read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return ErrnoError(errno, absl::StrCat("read ", path));
    if (n == 0) break;
    bytes.append(buf, static_cast<size_t>(n));
  }
  // A damaged record says nothing: the image is checked by reading it.
  return DecodeRecord(bytes);
}

absl::Status StoreImageRecord(const std::string& path, const ImageRecord& r) {
  const std::string bytes = EncodeRecord(r);
  const std::string partial = path + ".partial";
  int fd =
      open(partial.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return ErrnoError(errno, absl::StrCat("create ", partial));
  size_t done = 0;
  while (done < bytes.size()) {
    ssize_t n = write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      int err = errno;
      close(fd);
      unlink(partial.c_str());
      return ErrnoError(err, absl::StrCat("write ", partial));
    }
    done += static_cast<size_t>(n);
  }
  if (fsync(fd) != 0) {
    int err = errno;
    close(fd);
    unlink(partial.c_str());
    return ErrnoError(err, absl::StrCat("sync ", partial));
  }
  close(fd);
  if (rename(partial.c_str(), path.c_str()) != 0) {
    int err = errno;
    unlink(partial.c_str());
    return ErrnoError(err, absl::StrCat("rename to ", path));
  }
  return SyncDirectoryOf(path);
}

absl::Status RemoveImageRecord(const std::string& path) {
  if (unlink(path.c_str()) != 0 && errno != ENOENT) {
    return ErrnoError(errno, absl::StrCat("remove ", path));
  }
  return absl::OkStatus();
}

// --- Digests of an image
// ------------------------------------------------------

absl::StatusOr<Digest> ImageDigest(RawImage& image, uint64_t size_bytes,
                                   uint32_t chunk_size,
                                   std::vector<Digest>* chunks) {
  blockstore::DigestBuilder digest(size_bytes, chunk_size);
  if (chunks != nullptr) chunks->clear();
  const uint64_t piece = std::max<uint64_t>(chunk_size, 16 << 20);
  AlignedBuffer buf(piece);
  const uint64_t readable =
      std::min(image.size_bytes(), RoundUp(size_bytes, kIoAlign));
  const uint64_t padded = digest.chunk_count() * chunk_size;
  for (uint64_t at = 0; at < padded; at += piece) {
    const uint64_t n = std::min(piece, padded - at);
    uint64_t r = at < readable ? std::min(n, readable - at) : 0;
    if (r > 0) {
      ReadOp op{at, buf.span().first(r)};
      if (absl::Status s = image.Read({&op, 1}); !s.ok()) return s;
    }
    // Bytes past the volume (or the image) end count as zeros.
    const uint64_t valid =
        size_bytes > at ? std::min(n, std::min(r, size_bytes - at)) : 0;
    std::memset(buf.data() + valid, 0, n - valid);
    for (uint64_t c = 0; c < n; c += chunk_size) {
      Digest d = blockstore::Hash128(buf.span().subspan(c, chunk_size));
      if (chunks != nullptr) chunks->push_back(d);
      digest.AddDigest(d);
    }
  }
  return digest.Finish();
}

// --- Applying
// -----------------------------------------------------------------

namespace {

// Writes gathered into one buffer, sent to the image many at once.
class WriteQueue {
 public:
  explicit WriteQueue(RawImage& image) : image_(image) {}

  // A buffer of `n` bytes to fill, written at `offset` by a later Flush.
  absl::StatusOr<std::span<std::byte>> Add(uint64_t offset, size_t n) {
    if (used_ + n > buf_.size() && !ops_.empty()) {
      if (absl::Status s = Flush(); !s.ok()) return s;
    }
    if (n > buf_.size()) buf_ = AlignedBuffer::Uninitialized(RoundUp(n, 4096));
    std::span<std::byte> out = buf_.span().subspan(used_, n);
    ops_.push_back({offset, out});
    used_ += RoundUp(n, kIoAlign);
    return out;
  }

  absl::Status Flush() {
    absl::Status s = ops_.empty() ? absl::OkStatus() : image_.Write(ops_);
    ops_.clear();
    used_ = 0;
    return s;
  }

 private:
  RawImage& image_;
  AlignedBuffer buf_ = AlignedBuffer::Uninitialized(16 << 20);
  std::vector<WriteOp> ops_;
  size_t used_ = 0;
};

// Reads chunk `chunk` of a volume of `size_bytes` on `image` and returns
// its digest. On a file image, lays it out as every chunk there is: a hole
// if all zeros, else all of it written (a resize leaves part of a chunk a
// hole, or zeros written), so that the file's holes are its zero chunks.
absl::StatusOr<Digest> Normalize(RawImage& image, uint64_t chunk,
                                 uint32_t chunk_size, uint64_t size_bytes) {
  const uint64_t off = chunk * chunk_size;
  AlignedBuffer buf(chunk_size);
  const uint64_t valid = std::min<uint64_t>(chunk_size, size_bytes - off);
  const uint64_t n =
      std::min<uint64_t>(RoundUp(valid, kIoAlign), image.size_bytes() - off);
  ReadOp op{off, buf.span().first(n)};
  if (absl::Status s = image.Read({&op, 1}); !s.ok()) return s;
  std::memset(buf.data() + valid, 0, chunk_size - valid);
  if (image.resizable()) {
    absl::Status s = blockstore::IsAllZero(buf.span())
                         ? image.Zero(off, valid)
                         : image.Write({{WriteOp{off, buf.span().first(n)}}});
    if (!s.ok()) return s;
  }
  return blockstore::Hash128(buf.span());
}

bool Holds(const ImageRecord& r, const Guid& guid, const Digest& digest,
           uint64_t size_bytes) {
  return r.state == ImageRecord::State::kHolds && r.snapshot_guid == guid &&
         r.root_digest == digest && r.size_bytes == size_bytes;
}

}  // namespace

absl::StatusOr<ImageApplyStats> ApplyDeltaToImage(
    DeltaReader& reader, RawImage& image, const ImageApplyOptions& options) {
  const DeltaHeader& h = reader.header();
  const uint32_t c = h.chunk_size;
  const uint64_t header_checksum = reader.Checkpoint().header_checksum;
  ImageApplyStats stats;
  if (!image.resizable() && image.size_bytes() < h.size_bytes) {
    return absl::FailedPreconditionError(absl::StrCat(
        "image ", image.name(), " has ", image.size_bytes(),
        " bytes but snapshot '", h.target_name, "' of volume '", h.volume_name,
        "' needs ", h.size_bytes, "; use a device of at least that size"));
  }
  const std::string& record_path = options.record_path;
  std::optional<ImageRecord> record;
  if (!record_path.empty()) {
    absl::StatusOr<std::optional<ImageRecord>> r = LoadImageRecord(record_path);
    if (!r.ok()) return r.status();
    record = std::move(*r);
  }
  const std::optional<ImageIdentity> identity = image.Identity();
  // A record is believed only while the image is exactly as it left it.
  const bool record_current = record && !options.verify &&
                              record->chunk_size == c &&
                              record->volume_guid == h.volume_guid &&
                              (record->state == ImageRecord::State::kApplying ||
                               (identity && record->identity == *identity));
  const bool resuming = record_current &&
                        record->state == ImageRecord::State::kApplying &&
                        record->snapshot_guid == h.target_guid &&
                        record->header_checksum == header_checksum;
  auto refuse_base = [&](absl::string_view why) {
    return absl::FailedPreconditionError(absl::StrCat(
        "image ", image.name(), " does not hold the delta's base snapshot '",
        h.base_name, "' (", why, "); refusing to apply"));
  };

  // What the image holds before: the target already, the base (with its
  // chunk digests where known), or anything for a full delta.
  std::optional<std::vector<Digest>> digests;
  if (resuming) {
    stats.resumed = true;
  } else if (record_current &&
             Holds(*record, h.target_guid, h.target_digest, h.size_bytes)) {
    stats.already_held = true;
  } else if (!h.full() && record_current) {
    if (record->state == ImageRecord::State::kApplying) {
      return absl::FailedPreconditionError(absl::StrCat(
          "image ", image.name(),
          " is part way through another delta; apply that delta again to "
          "finish it, or start over with a full delta"));
    }
    if (!Holds(*record, h.base_guid, h.base_digest, h.base_size_bytes)) {
      return refuse_base(absl::StrCat("it holds a snapshot of root digest ",
                                      record->root_digest.ToHex(), ", see ",
                                      record_path));
    }
    if (record->chunk_digests.size() ==
        blockstore::DivRoundUp(h.base_size_bytes, c)) {
      digests = std::move(record->chunk_digests);
    }
  } else if (!h.full() && (options.verify_base || options.verify)) {
    std::vector<Digest> chunks;
    absl::StatusOr<Digest> d =
        ImageDigest(image, h.base_size_bytes, c, &chunks);
    if (!d.ok()) return d.status();
    stats.bytes_read += h.base_size_bytes;
    if (*d == h.base_digest) {
      digests = std::move(chunks);
    } else {
      absl::StatusOr<Digest> t = ImageDigest(image, h.size_bytes, c, &chunks);
      if (!t.ok()) return t.status();
      stats.bytes_read += h.size_bytes;
      if (*t != h.target_digest) {
        return refuse_base(absl::StrCat("content digest ", d->ToHex(),
                                        ", expected ", h.base_digest.ToHex()));
      }
      stats.already_held = true;
      digests = std::move(chunks);
    }
  }
  auto store_holds = [&](std::vector<Digest> chunk_digests) -> absl::Status {
    if (record_path.empty()) return absl::OkStatus();
    std::optional<ImageIdentity> now = image.Identity();
    if (!now) return RemoveImageRecord(record_path);
    ImageRecord held;
    held.state = ImageRecord::State::kHolds;
    held.chunk_size = c;
    held.volume_guid = h.volume_guid;
    held.snapshot_guid = h.target_guid;
    held.root_digest = h.target_digest;
    held.size_bytes = h.size_bytes;
    held.identity = *now;
    held.chunk_digests = std::move(chunk_digests);
    return StoreImageRecord(record_path, held);
  };
  if (stats.already_held) {
    // Nothing to write; the stream is still read to its end, so a damaged
    // delta is not taken for a good one.
    while (true) {
      absl::StatusOr<std::optional<DeltaReader::Record>> r = reader.Next();
      if (!r.ok()) return r.status();
      if (!r->has_value()) break;
    }
    stats.apply.stream_bytes = reader.stream_offset();
    if (!record_current && digests) {
      if (absl::Status s = store_holds(std::move(*digests)); !s.ok()) return s;
    }
    return stats;
  }

  // From here the image is neither base nor target until the end: say so
  // first, so that running the same delta again completes it.
  const uint64_t skip_segments = resuming ? record->segments_done : 0;
  ImageRecord applying;
  applying.state = ImageRecord::State::kApplying;
  applying.chunk_size = c;
  applying.volume_guid = h.volume_guid;
  applying.snapshot_guid = h.target_guid;
  applying.root_digest = h.target_digest;
  applying.size_bytes = h.size_bytes;
  applying.header_checksum = header_checksum;
  applying.segments_done = skip_segments;
  if (!record_path.empty() && !resuming) {
    if (absl::Status s = StoreImageRecord(record_path, applying); !s.ok()) {
      return s;
    }
  }
  const Digest zero_digest = [&] {
    std::vector<std::byte> zero(c);
    return blockstore::Hash128(zero);
  }();
  // A full delta onto a file starts from an empty file of the target's size:
  // every byte no record names reads as zeros without writing it. (Resumed
  // past its first resume point, that truncation is behind us.)
  const bool gaps_are_zero = h.full() && image.resizable();
  if (gaps_are_zero && skip_segments == 0) {
    if (absl::Status s = image.Resize(0); !s.ok()) return s;
    if (absl::Status s = image.Resize(h.size_bytes); !s.ok()) return s;
  } else if (!h.full() && image.resizable() && skip_segments == 0 &&
             image.size_bytes() != h.base_size_bytes) {
    // The base's size exactly (the bytes past it were zeros: checked).
    if (absl::Status s = image.Resize(h.base_size_bytes); !s.ok()) return s;
  }
  if (h.full() && !stats.resumed) {
    digests.emplace(blockstore::DivRoundUp(h.size_bytes, c), zero_digest);
  }
  // The chunks a resize cuts, which no record may name: their digest is
  // not known (a shrink) or their space not laid out as the rest of a file
  // image's (see Normalize), until the end reads them.
  std::vector<uint64_t> edges;
  auto covered = [&](uint64_t chunk) {
    edges.erase(std::remove(edges.begin(), edges.end(), chunk), edges.end());
  };

  WriteQueue queue(image);
  // A full delta carries only data: on a device, everything between its
  // records must become zeros, whatever it held.
  uint64_t cleared_to = h.full() && !gaps_are_zero ? 0 : h.size_bytes;
  uint64_t last_checkpoint = 0;
  // Zeroed ranges never meet a queued write: records come in chunk order.
  auto clear = [&](uint64_t from, uint64_t to) {
    return image.Zero(from, to - from);
  };
  while (true) {
    absl::StatusOr<std::optional<DeltaReader::Record>> r = reader.Next();
    if (!r.ok()) return r.status();
    if (!r->has_value()) break;
    const RecordHeader& rh = (**r).header;
    const bool write = (**r).segment >= skip_segments;
    absl::Status s;
    if (rh.type == RecordType::kResize) {
      const uint64_t old_size = h.base_size_bytes, new_size = rh.first_chunk;
      if (write) s = queue.Flush();
      if (write && s.ok() && image.resizable()) {
        s = image.Resize(new_size);
      } else if (write && s.ok() && new_size > old_size) {
        s = image.Zero(old_size, new_size - old_size);  // reads as zeros
      }
      if (digests)
        digests->resize(blockstore::DivRoundUp(new_size, c), zero_digest);
      if (new_size < old_size && new_size % c != 0) {
        edges.push_back(new_size / c);
      } else if (new_size > old_size && old_size % c != 0 &&
                 image.resizable()) {
        edges.push_back(old_size / c);
      }
    } else {
      const uint64_t off = rh.first_chunk * c;
      const uint64_t len = std::min<uint64_t>(uint64_t{rh.count_chunks} * c,
                                              image.size_bytes() - off);
      if (write && cleared_to < off) s = clear(cleared_to, off);
      if (s.ok() && rh.type == RecordType::kWrite) {
        for (uint32_t i = 0; write && s.ok() && i < rh.count_chunks; ++i) {
          const uint64_t at = uint64_t{i} * c;
          if (at >= len) break;
          const uint64_t n = std::min<uint64_t>(c, len - at);
          std::span<const std::byte> data =
              (**r).payload.subspan(at + 16 * (uint64_t{i} + 1), n);
          if (image.resizable() && blockstore::IsAllZero(data)) {
            // A file keeps a chunk of zeros as a hole.
            if (!gaps_are_zero) s = clear(off + at, off + at + n);
            continue;
          }
          absl::StatusOr<std::span<std::byte>> out = queue.Add(off + at, n);
          s = out.status();
          if (s.ok()) std::memcpy(out->data(), data.data(), n);
        }
        stats.apply.chunks_written += rh.count_chunks;
      } else if (s.ok()) {
        if (write && !gaps_are_zero) s = clear(off, off + len);
        stats.apply.chunks_cleared += rh.count_chunks;
      }
      for (uint32_t i = 0; digests && i < rh.count_chunks; ++i) {
        const uint64_t chunk = rh.first_chunk + i;
        if (chunk >= digests->size()) break;
        if (rh.type == RecordType::kWrite) {
          std::memcpy((*digests)[chunk].bytes.data(),
                      (**r).payload.data() + uint64_t{i} * (16 + c), 16);
        } else {
          (*digests)[chunk] = zero_digest;
        }
      }
      for (uint32_t i = 0; !edges.empty() && i < rh.count_chunks; ++i) {
        covered(rh.first_chunk + i);
      }
      cleared_to = std::max(cleared_to, off + len);
    }
    if (!s.ok()) return s;
    ++stats.apply.records;
    if (options.progress) options.progress(reader.record_bytes_read(), 0);
    if (write && !record_path.empty() && options.checkpoint_bytes > 0 &&
        reader.at_segment_end() &&
        reader.stream_offset() - last_checkpoint >= options.checkpoint_bytes) {
      // Everything up to this segment's end is on the image, durably.
      if (absl::Status f = queue.Flush(); !f.ok()) return f;
      if (absl::Status f = image.Flush(); !f.ok()) return f;
      applying.segments_done = (**r).segment + 1;
      if (absl::Status f = StoreImageRecord(record_path, applying); !f.ok()) {
        return f;
      }
      last_checkpoint = reader.stream_offset();
      ++stats.apply.checkpoints;
    }
  }
  if (absl::Status s = queue.Flush(); !s.ok()) return s;
  if (cleared_to < h.size_bytes) {
    if (absl::Status s = image.Zero(cleared_to, h.size_bytes - cleared_to);
        !s.ok()) {
      return s;
    }
  }
  if (image.resizable() && image.size_bytes() != h.size_bytes) {
    if (absl::Status s = image.Resize(h.size_bytes); !s.ok()) return s;
  }
  for (uint64_t chunk : edges) {
    absl::StatusOr<Digest> d = Normalize(image, chunk, c, h.size_bytes);
    if (!d.ok()) return d.status();
    stats.bytes_read += c;
    if (digests) (*digests)[chunk] = *d;
  }
  if (absl::Status s = image.Flush(); !s.ok()) return s;
  stats.apply.stream_bytes = reader.stream_offset();

  // The target's digest: from the base's chunk digests and the records'
  // where they are known, else (and when asked) from reading the image.
  bool verified = false;
  if (digests && !options.verify) {
    blockstore::DigestBuilder root(h.size_bytes, c);
    for (const Digest& d : *digests) root.AddDigest(d);
    verified = root.Finish() == h.target_digest;
  }
  if (!verified) {
    std::vector<Digest> chunks;
    absl::StatusOr<Digest> d = ImageDigest(image, h.size_bytes, c, &chunks);
    if (!d.ok()) return d.status();
    stats.bytes_read += h.size_bytes;
    if (*d != h.target_digest) {
      if (!record_path.empty()) RemoveImageRecord(record_path).IgnoreError();
      return absl::DataLossError(absl::StrCat(
          "image ", image.name(), " after apply has digest ", d->ToHex(),
          ", the delta's target is ", h.target_digest.ToHex()));
    }
    digests = std::move(chunks);
  }
  if (absl::Status s = store_holds(std::move(*digests)); !s.ok()) return s;
  return stats;
}

absl::StatusOr<ImageApplyStats> ApplyDeltaToImage(
    RawImage& image, ByteSource& in, const ImageApplyOptions& options) {
  absl::StatusOr<std::unique_ptr<DeltaReader>> reader = DeltaReader::Open(in);
  if (!reader.ok()) return reader.status();
  return ApplyDeltaToImage(**reader, image, options);
}

}  // namespace engine
