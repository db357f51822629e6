// Pools on in-memory devices for tests.
#ifndef TANDEM_TESTS_TESTING_POOLS_H_
#define TANDEM_TESTS_TESTING_POOLS_H_

#include <memory>
#include <string>
#include <vector>

#include "blockstore/mem_io.h"
#include "blockstore/pool.h"
#include "gtest/gtest.h"

namespace testing_util {

// A fresh pool on `io` (which must outlive it); nullptr, with a test
// failure recorded, if creation fails.
inline std::unique_ptr<blockstore::Pool> MakePool(blockstore::MemIo& io,
                                                  uint32_t chunk_size = 4096) {
  absl::StatusOr<std::unique_ptr<blockstore::Pool>> pool =
      blockstore::Pool::Create(io, {.chunk_size_bytes = chunk_size});
  EXPECT_TRUE(pool.ok()) << pool.status();
  return pool.ok() ? std::move(*pool) : nullptr;
}

// The whole of `vol` (live), or of its snapshot `snap`, read back.
inline std::vector<std::byte> ReadAll(blockstore::Pool& pool,
                                      const std::string& vol,
                                      const std::string& snap = "") {
  uint64_t size = snap.empty() ? pool.GetVolume(vol)->size_bytes
                               : pool.GetSnapshot(vol, snap)->size_bytes;
  std::vector<std::byte> out(size);
  absl::Status s = pool.Read(vol, snap, 0, out);
  EXPECT_TRUE(s.ok()) << s;
  return out;
}

}  // namespace testing_util

#endif  // TANDEM_TESTS_TESTING_POOLS_H_
