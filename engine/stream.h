// The byte streams deltas travel through. engine knows no files or sockets:
// tools implement these for files and pipes, transport for TCP.
#ifndef TANDEM_ENGINE_STREAM_H_
#define TANDEM_ENGINE_STREAM_H_

#include <cstddef>
#include <span>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace engine {

class ByteSink {
 public:
  virtual ~ByteSink() = default;
  // Writes all of `data` or fails.
  virtual absl::Status Write(std::span<const std::byte> data) = 0;
};

class ByteSource {
 public:
  virtual ~ByteSource() = default;
  // Reads up to out.size() bytes; 0 only at the end of the stream.
  virtual absl::StatusOr<size_t> Read(std::span<std::byte> out) = 0;
};

// In memory, for tests and in-process transfers.
class StringSink final : public ByteSink {
 public:
  absl::Status Write(std::span<const std::byte> data) override {
    bytes_.append(reinterpret_cast<const char*>(data.data()), data.size());
    return absl::OkStatus();
  }
  const std::string& bytes() const { return bytes_; }
  std::string Take() { return std::move(bytes_); }

 private:
  std::string bytes_;
};

class StringSource final : public ByteSource {
 public:
  // `bytes` must outlive the source.
  explicit StringSource(const std::string& bytes) : bytes_(bytes) {}
  absl::StatusOr<size_t> Read(std::span<std::byte> out) override {
    size_t n = std::min(out.size(), bytes_.size() - pos_);
    std::copy_n(reinterpret_cast<const std::byte*>(bytes_.data()) + pos_, n,
                out.data());
    pos_ += n;
    return n;
  }

 private:
  const std::string& bytes_;
  size_t pos_ = 0;
};

// Reads exactly out.size() bytes. DataLoss naming `what` and the stream
// offset if the stream ends first.
absl::Status ReadFull(ByteSource& in, std::span<std::byte> out,
                      const char* what, uint64_t stream_offset);

}  // namespace engine

#endif  // TANDEM_ENGINE_STREAM_H_
