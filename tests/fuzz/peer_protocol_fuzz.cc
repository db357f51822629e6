// libFuzzer target: the byte stream a peer sends a daemon once TLS is up:
// the HELLO (checked as the server checks it), then frames of requests,
// streams and credits, answered by the same ServeSites a daemon runs, over
// a pool in memory (a volume "v" with a snapshot "s"). Never a crash, a
// leak, an allocation beyond the frame limits or an exception escaping.
// The corpus (tests/fuzz/peer_corpus) holds well-formed conversations;
// tests/fuzz/peer.dict the protocol's words.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>

#include "blockstore/mem_io.h"
#include "blockstore/pool.h"
#include "engine/local_site.h"
#include "tests/fuzz/fuzz_pool.h"
#include "transport/channel.h"
#include "transport/connection.h"
#include "transport/peer.h"
#include "transport/remote_site.h"

namespace {

// The peer's bytes, then its orderly close; what we send goes nowhere.
class Scripted final : public transport::Channel {
 public:
  Scripted(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  absl::StatusOr<size_t> ReadSome(std::span<std::byte> out,
                                  transport::Deadline) override {
    size_t n = std::min(out.size(), size_ - at_);
    std::memcpy(out.data(), data_ + at_, n);
    at_ += n;
    return n;
  }
  absl::Status Write(std::span<const std::span<const std::byte>>,
                     transport::Deadline) override {
    return absl::OkStatus();
  }
  void Shutdown() override {}
  std::string Describe() const override { return "fuzz"; }
  bool HungUp() const override { return false; }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t at_ = 0;
};

blockstore::MemIo* Template() {
  static blockstore::MemIo* io = MakeTemplatePool(64 << 10);
  return io;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::unique_ptr<blockstore::MemIo> disk = Template()->Clone();
  absl::StatusOr<std::unique_ptr<blockstore::Pool>> pool =
      blockstore::Pool::Open(*disk, blockstore::OpenMode::kReadWrite);
  if (!pool.ok()) return 0;
  engine::LocalSite site("b/p", **pool, {.checkpoint_bytes = 1});
  transport::ConnectionOptions options;
  transport::Connection conn(std::make_unique<Scripted>(data, size), options,
                             "fuzz");
  absl::StatusOr<transport::Message> hello = conn.ReceiveMessageBefore(
      transport::FrameType::kHello, transport::After(std::chrono::seconds(1)));
  if (!hello.ok()) return 0;
  std::string who;
  // As a daemon with certificates would: "a" authenticated, peers {a}.
  transport::CheckHello(hello->json, "a", false, {"a"}, &who).IgnoreError();
  conn.peer_site = "a";
  transport::ServeSites(
      conn,
      [&site](const std::string& name) -> absl::StatusOr<engine::LocalSite*> {
        if (name != "p") return absl::NotFoundError("no such pool");
        return &site;
      },
      [](const std::string&) {});
  return 0;
}
