// Pools on in-memory devices for tests.
#ifndef TANDEM_TESTS_TESTING_POOLS_H_
#define TANDEM_TESTS_TESTING_POOLS_H_

#include <memory>

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

}  // namespace testing_util

#endif  // TANDEM_TESTS_TESTING_POOLS_H_
