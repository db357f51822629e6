#include "blockstore/hash.h"

#include <cstring>

#include "blockstore/util.h"
#include "xxh_x86dispatch.h"
#include "xxhash.h"

namespace blockstore {

std::string Digest::ToHex() const { return Hex(bytes); }

Digest Hash128(std::span<const std::byte> data) {
  XXH128_hash_t h = XXH3_128bits_dispatch(data.data(), data.size());
  XXH128_canonical_t c;
  XXH128_canonicalFromHash(&c, h);
  Digest d;
  std::memcpy(d.bytes.data(), c.digest, 16);
  return d;
}

Digest Hash128Digests(std::span<const Digest> parts) {
  static_assert(sizeof(Digest) == 16);
  return Hash128({reinterpret_cast<const std::byte*>(parts.data()),
                  parts.size() * sizeof(Digest)});
}

uint64_t Hash64(std::span<const std::byte> data, uint64_t seed) {
  return XXH3_64bits_withSeed_dispatch(data.data(), data.size(), seed);
}

}  // namespace blockstore
