// Io wrappers that each break one thing, for crash and error tests.
#ifndef TANDEM_TESTS_TESTING_FAULT_IO_H_
#define TANDEM_TESTS_TESTING_FAULT_IO_H_

#include <cerrno>
#include <cstdint>
#include <vector>

#include "blockstore/io.h"
#include "blockstore/util.h"

namespace testing_util {

// Counts durable-write points: every write op and every flush is one. From
// point `crash_at` on, the device is "unplugged": the op at that point still
// reaches the target (so a Crash() mode can keep, tear or drop it), then it
// and every later write or flush fails. crash_at = UINT64_MAX never crashes
// and just counts.
class CrashingIo : public blockstore::IoWrapper {
 public:
  CrashingIo(blockstore::Io& target, uint64_t crash_at)
      : IoWrapper(target), crash_at_(crash_at) {}

  absl::Status Write(std::span<const blockstore::WriteOp> ops) override {
    for (const blockstore::WriteOp& op : ops) {
      if (crashed()) return Unplugged();
      if (absl::Status s = target().Write({&op, 1}); !s.ok()) return s;
      if (points_++ == crash_at_) return Unplugged();
    }
    return absl::OkStatus();
  }
  absl::Status Flush() override {
    if (crashed()) return Unplugged();
    if (points_++ == crash_at_) return Unplugged();
    return target().Flush();
  }
  absl::Status Read(std::span<const blockstore::ReadOp> ops) override {
    if (crashed()) return Unplugged();
    return target().Read(ops);
  }

  uint64_t points() const { return points_; }
  bool crashed() const { return points_ > crash_at_; }

 private:
  static absl::Status Unplugged() {
    return blockstore::ErrnoError(EIO, "injected power loss");
  }
  const uint64_t crash_at_;
  uint64_t points_ = 0;
};

// Fails the n-th write op (1-based) with `err`; everything else passes.
class FailNthWrite : public blockstore::IoWrapper {
 public:
  FailNthWrite(blockstore::Io& target, int n, int err)
      : IoWrapper(target), left_(n), err_(err) {}
  absl::Status Write(std::span<const blockstore::WriteOp> ops) override {
    for (const blockstore::WriteOp& op : ops) {
      if (--left_ == 0)
        return blockstore::ErrnoError(err_, "injected write fault");
      if (absl::Status s = target().Write({&op, 1}); !s.ok()) return s;
    }
    return absl::OkStatus();
  }

 private:
  int left_;
  const int err_;
};

// Passes everything through and counts read calls (batches, not ops).
class CountingIo : public blockstore::IoWrapper {
 public:
  explicit CountingIo(blockstore::Io& target) : IoWrapper(target) {}
  absl::Status Read(std::span<const blockstore::ReadOp> ops) override {
    ++read_calls_;
    return target().Read(ops);
  }
  int read_calls() const { return read_calls_; }

 private:
  int read_calls_ = 0;
};

}  // namespace testing_util

#endif  // TANDEM_TESTS_TESTING_FAULT_IO_H_
