// An in-memory model of a pool's volumes and snapshots, deliberately simple:
// sparse maps of chunk index -> bytes. It computes root digests from the
// definition in blockstore/format.h on its own, so the pool's digests are
// checked against an independent implementation.
#ifndef TANDEM_TESTS_TESTING_MODEL_H_
#define TANDEM_TESTS_TESTING_MODEL_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "blockstore/hash.h"
#include "blockstore/pool.h"

namespace testing_util {

struct VolumeModel {
  uint64_t size_bytes = 0;
  // Chunk index -> chunk_size bytes; absent chunks are zeros.
  std::map<uint64_t, std::vector<std::byte>> chunks;
  std::map<std::string, VolumeModel> snapshots;  // empty inside snapshots
};

class PoolModel {
 public:
  explicit PoolModel(uint32_t chunk_size) : chunk_size_(chunk_size) {}

  void Write(const std::string& volume, uint64_t offset,
             std::span<const std::byte> data);
  void Trim(const std::string& volume, uint64_t offset, uint64_t length);
  void Resize(const std::string& volume, uint64_t size_bytes);
  void Snapshot(const std::string& volume, const std::string& name);
  void Rollback(const std::string& volume, const std::string& name);

  std::vector<std::byte> Read(const VolumeModel& v, uint64_t offset,
                              uint64_t length) const;
  blockstore::Digest RootDigest(const VolumeModel& v) const;

  // Bytes of distinct chunks the pool must hold at least... (not tracked).
  std::map<std::string, VolumeModel> volumes;
  uint32_t chunk_size() const { return chunk_size_; }

 private:
  blockstore::Digest Subtree(const VolumeModel& v, int level,
                             uint64_t base) const;
  void ZeroRange(VolumeModel& v, uint64_t offset, uint64_t length);
  uint32_t chunk_size_;
};

// Empty if `pool` holds exactly what `model` says: the same volumes and
// snapshots with the same sizes, every byte (read back in full), and root
// digests equal to the model's. Otherwise says the first difference.
std::string DiffPool(blockstore::Pool& pool, const PoolModel& model);

// Like DiffPool for one volume and its snapshots.
std::string DiffVolume(blockstore::Pool& pool, const PoolModel& model,
                       const std::string& volume);

// Deterministic test data: random, zeros, or a repeating short pattern.
std::vector<std::byte> TestData(uint64_t length, uint64_t seed);

}  // namespace testing_util

#endif  // TANDEM_TESTS_TESTING_MODEL_H_
