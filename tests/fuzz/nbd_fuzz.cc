// libFuzzer target: the bytes an NBD client sends tandemd, from its client
// flags on: option haggling, then requests, answered by the same
// ServeNbdSession and PoolExports a daemon runs (requests carried out one
// at a time, so a run is deterministic), over a pool in memory (a volume
// "v" partly written, and its snapshot "s"). Never a crash, a leak, an
// allocation beyond the announced limits or a hang. The corpus
// (tests/fuzz/nbd_corpus) holds conversations of nbdinfo, nbdcopy and
// qemu-io; tests/fuzz/nbd.dict the protocol's magic numbers.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <string>

#include "blockstore/mem_io.h"
#include "blockstore/pool.h"
#include "tests/fuzz/fuzz_pool.h"
#include "transport/nbd_exports.h"
#include "transport/nbd_server.h"

namespace {

// The client's bytes, then its close; what the server sends goes nowhere.
class Scripted final : public transport::NbdStream {
 public:
  Scripted(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  absl::Status ReadFull(std::span<std::byte> out) override {
    if (out.empty()) return absl::OkStatus();
    if (size_ - at_ < out.size()) return absl::UnavailableError("end");
    std::memcpy(out.data(), data_ + at_, out.size());
    at_ += out.size();
    return absl::OkStatus();
  }
  absl::Status WriteAll(std::span<const std::byte>) override {
    return absl::OkStatus();
  }
  void ShutdownRead() override { at_ = size_; }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t at_ = 0;
};

blockstore::MemIo* Template() {
  static blockstore::MemIo* io = MakeTemplatePool(256 << 10);
  return io;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::unique_ptr<blockstore::MemIo> disk = Template()->Clone();
  absl::StatusOr<std::unique_ptr<blockstore::Pool>> pool =
      blockstore::Pool::Open(*disk, blockstore::OpenMode::kReadWrite);
  if (!pool.ok()) return 0;
  transport::PoolExports exports({{"p", pool->get()}});
  transport::NbdSessionOptions options;
  options.workers = 0;
  options.max_payload = 1 << 20;
  transport::NbdSessionState state;
  Scripted stream(data, size);
  transport::ServeNbdSession(stream, exports, options, state,
                             [](const std::string&) {})
      .IgnoreError();
  return 0;
}
