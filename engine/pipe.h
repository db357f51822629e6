// An in-process byte pipe: one thread writes a delta stream into it, another
// applies it. Bounded in bytes, so a slow reader stalls the writer instead of
// buffering the whole stream.
#ifndef TANDEM_ENGINE_PIPE_H_
#define TANDEM_ENGINE_PIPE_H_

#include <condition_variable>
#include <cstddef>
#include <deque>
#include <mutex>
#include <span>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/stream.h"

namespace engine {

class Pipe {
 public:
  explicit Pipe(size_t capacity_bytes = 8 << 20) : capacity_(capacity_bytes) {}

  // The writer's end. Write blocks while the pipe is full; it fails once
  // the reader has aborted.
  ByteSink& sink() { return sink_; }
  // The reader's end. Read returns 0 after CloseWrite(OK) and everything
  // before it was read; an error after CloseWrite(error).
  ByteSource& source() { return source_; }

  // The writer is done: `status` OK for a complete stream.
  void CloseWrite(absl::Status status);
  // The reader gives up: pending and later writes fail with `status`.
  void AbortRead(absl::Status status);

 private:
  class Sink final : public ByteSink {
   public:
    explicit Sink(Pipe& p) : p_(p) {}
    absl::Status Write(std::span<const std::byte> data) override {
      return p_.Write(data);
    }

   private:
    Pipe& p_;
  };
  class Source final : public ByteSource {
   public:
    explicit Source(Pipe& p) : p_(p) {}
    absl::StatusOr<size_t> Read(std::span<std::byte> out) override {
      return p_.Read(out);
    }

   private:
    Pipe& p_;
  };

  absl::Status Write(std::span<const std::byte> data);
  absl::StatusOr<size_t> Read(std::span<std::byte> out);

  const size_t capacity_;
  std::mutex mu_;
  std::condition_variable changed_;
  std::deque<std::string> pieces_;  // guarded by mu_
  size_t front_used_ = 0;           // bytes of pieces_.front() already read
  size_t buffered_ = 0;
  bool write_closed_ = false;
  absl::Status write_status_;
  absl::Status read_aborted_;  // non-OK once the reader gave up
  Sink sink_{*this};
  Source source_{*this};
};

}  // namespace engine

#endif  // TANDEM_ENGINE_PIPE_H_
