// libFuzzer target: any byte string through the delta reader, and (when the
// reader accepts the header) through an apply onto a small in-memory image
// and onto a pool. Never a crash, a leak, an allocation beyond the format's
// bounds, or a write outside the image.
//
// The mutator re-seals what a mutation breaks on purpose: it turns zstd
// segments into raw ones (so that mutations land in record bytes, not in
// compressed ones), lets libFuzzer mutate, then recomputes the header
// checksum, every segment's header checksum and chain, and the end's chain
// and checksum. Without that nearly every mutation dies at the first
// checksum and the records are never reached. Build and run:
// scripts/fuzz.sh [SECONDS].
#include <zstd.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "blockstore/hash.h"
#include "blockstore/mem_io.h"
#include "blockstore/pool.h"
#include "blockstore/util.h"
#include "engine/delta_format.h"
#include "engine/delta_receive.h"
#include "engine/image.h"
#include "engine/stream.h"

extern "C" size_t LLVMFuzzerMutate(uint8_t* data, size_t size, size_t max);

namespace {

using blockstore::GetLe32;
using blockstore::GetLe64;
using blockstore::PutLe32;
using blockstore::PutLe64;

// Decompresses zstd segments in place (codec 1 -> 0), where it fits.
std::vector<std::byte> Rawify(const std::vector<std::byte>& in) {
  if (in.size() < engine::kHeaderPrefixBytes) return in;
  uint32_t hlen = GetLe32(in.data() + 12);
  if (hlen < 24 || hlen > in.size()) return in;
  std::vector<std::byte> out(in.begin(), in.begin() + hlen);
  size_t p = hlen;
  while (p + engine::kSegmentHeaderBytes <= in.size() &&
         std::memcmp(in.data() + p, "TSEG", 4) == 0) {
    uint32_t codec = GetLe32(in.data() + p + 4);
    uint32_t record_bytes = GetLe32(in.data() + p + 16);
    uint32_t stored = GetLe32(in.data() + p + 20);
    size_t body = p + engine::kSegmentHeaderBytes;
    if (stored > in.size() - body) break;
    std::vector<std::byte> seg(in.begin() + p, in.begin() + body);
    std::vector<std::byte> payload(in.begin() + body,
                                   in.begin() + body + stored);
    if (codec == 1 && record_bytes <= engine::kMaxSegmentRecordBytes) {
      std::vector<std::byte> raw(record_bytes);
      size_t n = ZSTD_decompress(raw.data(), raw.size(), payload.data(),
                                 payload.size());
      if (!ZSTD_isError(n) && n == record_bytes) {
        payload = std::move(raw);
        PutLe32(seg.data() + 4, 0);
        PutLe32(seg.data() + 20, record_bytes);
      }
    }
    out.insert(out.end(), seg.begin(), seg.end());
    out.insert(out.end(), payload.begin(), payload.end());
    p = body + stored;
  }
  out.insert(out.end(), in.begin() + p, in.end());
  return out;
}

// Recomputes every checksum the structure allows finding.
void Reseal(uint8_t* data, size_t size) {
  auto* b = reinterpret_cast<std::byte*>(data);
  if (size < engine::kHeaderPrefixBytes) return;
  uint32_t hlen = GetLe32(b + 12);
  if (hlen < 24 || hlen > size) return;
  uint64_t chain = blockstore::Hash64({b, hlen - 8}, 0);
  PutLe64(b + hlen - 8, chain);
  size_t p = hlen;
  while (p + engine::kSegmentHeaderBytes <= size &&
         std::memcmp(b + p, "TSEG", 4) == 0) {
    uint32_t stored = GetLe32(b + p + 20);
    size_t body = p + engine::kSegmentHeaderBytes;
    if (stored > size - body) return;
    chain = engine::ChainChecksum({b + body, stored}, chain);
    PutLe64(b + p + 32, chain);
    PutLe64(b + p + 40, blockstore::Hash64({b + p, 40}, 0));
    p = body + stored;
  }
  if (p + engine::kEndBytes <= size && std::memcmp(b + p, "TEND", 4) == 0) {
    PutLe64(b + p + 56, chain);
    PutLe64(b + p + 80, blockstore::Hash64({b + p, 80}, 0));
  }
}

}  // namespace

extern "C" size_t LLVMFuzzerCustomMutator(uint8_t* data, size_t size,
                                          size_t max_size, unsigned int seed) {
  std::vector<std::byte> raw =
      Rawify({reinterpret_cast<std::byte*>(data),
              reinterpret_cast<std::byte*>(data) + size});
  if (raw.size() <= max_size) {
    std::memcpy(data, raw.data(), raw.size());
    size = raw.size();
  }
  size = LLVMFuzzerMutate(data, size, max_size);
  // Now and then leave a checksum broken, so those checks stay covered.
  if (seed % 16 != 0) Reseal(data, size);
  return size;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string bytes(reinterpret_cast<const char*>(data), size);
  {
    engine::StringSource in(bytes);
    absl::StatusOr<std::unique_ptr<engine::DeltaReader>> reader =
        engine::DeltaReader::Open(in);
    if (!reader.ok()) return 0;
    while (true) {
      absl::StatusOr<std::optional<engine::DeltaReader::Record>> r =
          (*reader)->Next();
      if (!r.ok() || !r->has_value()) break;
    }
  }
  // Applying must stay inside an image of 1 MiB (bigger volumes are
  // refused before anything is written).
  {
    blockstore::MemIo io(1 << 20);
    std::unique_ptr<engine::RawImage> image = engine::ImageOnIo(io);
    engine::StringSource in(bytes);
    engine::ImageApplyOptions options;
    options.verify_base = false;
    engine::ApplyDeltaToImage(*image, in, options).IgnoreError();
  }
  // And into a pool (full deltas; an incremental finds no base).
  static blockstore::MemIo* fresh = [] {
    auto* io = new blockstore::MemIo(4 << 20);
    blockstore::Pool::Create(*io, {.chunk_size_bytes = 4096}).IgnoreError();
    return io;
  }();
  std::unique_ptr<blockstore::MemIo> disk = fresh->Clone();
  absl::StatusOr<std::unique_ptr<blockstore::Pool>> pool =
      blockstore::Pool::Open(*disk, blockstore::OpenMode::kReadWrite);
  if (pool.ok()) {
    engine::StringSource in(bytes);
    engine::ApplyOptions options;
    options.checkpoint_bytes = 1;
    engine::ApplyDelta(**pool, "v", in, options).IgnoreError();
  }
  return 0;
}
