// Content digests: XXH3-128 through the SIMD runtime dispatch
// (xxh_x86dispatch.h), which picks AVX2/AVX-512 when the CPU has them.
// XXH3 detects corruption and identifies content we wrote ourselves; it is
// not collision-resistant, so it never proves two writers' data equal.
// Thread-safe.
#ifndef TANDEM_BLOCKSTORE_HASH_H_
#define TANDEM_BLOCKSTORE_HASH_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

namespace blockstore {

// A 128-bit digest, stored big-endian (high 64 bits first) as XXH128
// canonical form, so its hex is the same as `xxhsum -H2` prints.
struct Digest {
  std::array<std::byte, 16> bytes{};
  friend bool operator==(const Digest&, const Digest&) = default;
  std::string ToHex() const;
};

Digest Hash128(std::span<const std::byte> data);
// Hash of the concatenation of `parts`' bytes, without copying them.
Digest Hash128Digests(std::span<const Digest> parts);
uint64_t Hash64(std::span<const std::byte> data, uint64_t seed);

}  // namespace blockstore

#endif  // TANDEM_BLOCKSTORE_HASH_H_
