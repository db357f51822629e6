// Computes a volume root digest (the definition in format.h) from chunks
// fed in order, in O(depth x fan-out) memory: how a raw image or any byte
// stream is compared with a pool's volume. Not thread-safe.
#ifndef TANDEM_BLOCKSTORE_DIGEST_BUILDER_H_
#define TANDEM_BLOCKSTORE_DIGEST_BUILDER_H_

#include <cstdint>
#include <span>
#include <vector>

#include "blockstore/hash.h"

namespace blockstore {

class DigestBuilder {
 public:
  DigestBuilder(uint64_t size_bytes, uint32_t chunk_size);

  // The next chunk: exactly chunk_size bytes, the last one zero-padded
  // past the volume end.
  void AddChunk(std::span<const std::byte> chunk);
  // Same as AddChunk of the chunk's digest.
  void AddDigest(const Digest& chunk_digest);
  // After all ChunkCount() chunks.
  Digest Finish();

  uint64_t chunk_count() const { return chunks_; }

 private:
  void Push(int level, const Digest& d);
  const uint64_t size_bytes_;
  const uint32_t chunk_size_;
  const uint64_t chunks_;
  int depth_ = 1;
  uint64_t added_ = 0;
  std::vector<std::vector<Digest>> levels_;  // partial node per level
  std::vector<Digest> empty_;  // [0] zero chunk, [1 + l] empty node at l
};

}  // namespace blockstore

#endif  // TANDEM_BLOCKSTORE_DIGEST_BUILDER_H_
