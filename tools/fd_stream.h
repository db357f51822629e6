// ByteSink/ByteSource over file descriptors (files, pipes, stdin/stdout),
// counting the bytes that pass.
#ifndef TANDEM_TOOLS_FD_STREAM_H_
#define TANDEM_TOOLS_FD_STREAM_H_

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "blockstore/util.h"
#include "engine/stream.h"

namespace tools {

// A pipe between two tools carries the stream in 1 MiB rather than 64 KiB
// (the default): fewer wake-ups on either end. Best effort: nothing for
// what is not a pipe, or where the limit (/proc/sys/fs/pipe-max-size) is
// lower.
inline void WidenPipe(int fd) {
  struct stat st {};
  if (::fstat(fd, &st) == 0 && S_ISFIFO(st.st_mode)) {
    ::fcntl(fd, F_SETPIPE_SZ, 1 << 20);
  }
}

class FdSink final : public engine::ByteSink {
 public:
  FdSink(int fd, std::string name) : fd_(fd), name_(std::move(name)) {}

  // Where the descriptor is an empty regular file at its start, blocks of
  // `block` bytes (from the start) that are all zeros are skipped as holes,
  // as `cp --sparse` does; Finish() then sets the file's length. Elsewhere
  // (a pipe, a terminal, a file with content) nothing changes.
  void MakeSparse(uint64_t block) {
    struct stat st {};
    if (block > 0 && fstat(fd_, &st) == 0 && S_ISREG(st.st_mode) &&
        st.st_size == 0 && lseek(fd_, 0, SEEK_CUR) == 0) {
      sparse_block_ = block;
    }
  }

  absl::Status Write(std::span<const std::byte> data) override {
    while (!data.empty()) {
      size_t n = data.size();
      if (sparse_block_ > 0) {
        n = std::min<uint64_t>(n, sparse_block_ - bytes_ % sparse_block_);
        if (blockstore::IsAllZero(data.first(n))) {
          if (lseek(fd_, static_cast<off_t>(n), SEEK_CUR) < 0) {
            return blockstore::ErrnoError(errno, absl::StrCat("seek ", name_));
          }
          bytes_ += n;
          data = data.subspan(n);
          continue;
        }
      }
      if (absl::Status s = WriteAll(data.first(n)); !s.ok()) return s;
      bytes_ += n;
      data = data.subspan(n);
    }
    return absl::OkStatus();
  }

  // After the last Write: a sparse file's length.
  absl::Status Finish() {
    if (sparse_block_ > 0 && ftruncate(fd_, static_cast<off_t>(bytes_)) != 0) {
      return blockstore::ErrnoError(errno, absl::StrCat("write ", name_));
    }
    return absl::OkStatus();
  }

  uint64_t bytes() const { return bytes_; }

 private:
  absl::Status WriteAll(std::span<const std::byte> data) {
    for (size_t done = 0; done < data.size();) {
      ssize_t n = ::write(fd_, data.data() + done, data.size() - done);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0)
        return blockstore::ErrnoError(errno, absl::StrCat("write ", name_));
      done += n;
    }
    return absl::OkStatus();
  }

  int fd_;
  std::string name_;
  uint64_t bytes_ = 0;
  uint64_t sparse_block_ = 0;
};

class FdSource final : public engine::ByteSource {
 public:
  FdSource(int fd, std::string name) : fd_(fd), name_(std::move(name)) {}
  absl::StatusOr<size_t> Read(std::span<std::byte> out) override {
    while (true) {
      ssize_t n = ::read(fd_, out.data(), out.size());
      if (n < 0 && errno == EINTR) continue;
      if (n < 0)
        return blockstore::ErrnoError(errno, absl::StrCat("read ", name_));
      bytes_ += n;
      return static_cast<size_t>(n);
    }
  }
  uint64_t bytes() const { return bytes_; }

 private:
  int fd_;
  std::string name_;
  uint64_t bytes_ = 0;
};

// A delta to read: FILE, or standard input for "-". Closes what it opened.
class InputFile {
 public:
  static absl::StatusOr<std::unique_ptr<InputFile>> Open(
      const std::string& file) {
    int fd = 0;
    if (file != "-") {
      fd = ::open(file.c_str(), O_RDONLY | O_CLOEXEC);
      if (fd < 0)
        return blockstore::ErrnoError(errno, absl::StrCat("open ", file));
    }
    WidenPipe(fd);
    return std::unique_ptr<InputFile>(
        new InputFile(fd, file == "-" ? "standard input" : file));
  }
  ~InputFile() {
    if (fd_ != 0) ::close(fd_);
  }
  InputFile(const InputFile&) = delete;
  InputFile& operator=(const InputFile&) = delete;

  FdSource& source() { return source_; }
  // Size of a regular file, 0 for a pipe (unknown).
  uint64_t size() const {
    struct stat st {};
    return ::fstat(fd_, &st) == 0 && S_ISREG(st.st_mode) ? st.st_size : 0;
  }

 private:
  InputFile(int fd, std::string name) : fd_(fd), source_(fd, std::move(name)) {}
  int fd_;
  FdSource source_;
};

}  // namespace tools

#endif  // TANDEM_TOOLS_FD_STREAM_H_
