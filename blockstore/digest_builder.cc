#include "blockstore/digest_builder.h"

#include <cstring>

#include "blockstore/format.h"
#include "blockstore/util.h"

namespace blockstore {

DigestBuilder::DigestBuilder(uint64_t size_bytes, uint32_t chunk_size)
    : size_bytes_(size_bytes),
      chunk_size_(chunk_size),
      chunks_(DivRoundUp(size_bytes, chunk_size)) {
  while (depth_ < kMaxDepth && Span(depth_) < chunks_) ++depth_;
  levels_.resize(depth_);
  std::vector<std::byte> zero(chunk_size);
  empty_.push_back(Hash128(zero));
  for (int l = 0; l < depth_; ++l) {
    std::vector<Digest> parts(kFanout, empty_.back());
    empty_.push_back(Hash128Digests(parts));
  }
}

void DigestBuilder::AddChunk(std::span<const std::byte> chunk) {
  AddDigest(Hash128(chunk));
}

void DigestBuilder::AddDigest(const Digest& d) {
  ++added_;
  Push(0, d);
}

void DigestBuilder::Push(int level, const Digest& d) {
  std::vector<Digest>& node = levels_[level];
  node.push_back(d);
  if (node.size() == static_cast<size_t>(kFanout) && level + 1 < depth_) {
    Digest full = Hash128Digests(node);
    node.clear();
    Push(level + 1, full);
  }
}

Digest DigestBuilder::Finish() {
  // Pad every level with empty entries, lowest first, carrying up.
  for (int level = 0; level < depth_; ++level) {
    std::vector<Digest>& node = levels_[level];
    bool root = level + 1 == depth_;
    if (node.empty() && !root) continue;
    while (node.size() < static_cast<size_t>(kFanout)) {
      node.push_back(empty_[level]);  // level 0: zero chunk
    }
    if (!root) {
      Digest full = Hash128Digests(node);
      node.clear();
      levels_[level + 1].push_back(full);
    }
  }
  Digest sub = Hash128Digests(levels_[depth_ - 1]);
  std::byte buf[28];
  std::memcpy(buf, sub.bytes.data(), 16);
  PutLe64(buf + 16, size_bytes_);
  PutLe32(buf + 24, chunk_size_);
  return Hash128(buf);
}

}  // namespace blockstore
