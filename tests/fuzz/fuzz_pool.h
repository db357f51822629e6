// The pool the protocol fuzz targets serve: in memory, 4 KiB chunks, a
// volume "v" of `volume_bytes` with 16 KiB of 'x' at 4 KiB, and its
// snapshot "s". Made once; each input runs on a clone.
#ifndef TANDEM_TESTS_FUZZ_FUZZ_POOL_H_
#define TANDEM_TESTS_FUZZ_FUZZ_POOL_H_

#include <cstdint>
#include <string>

#include "blockstore/mem_io.h"
#include "blockstore/pool.h"

inline blockstore::MemIo* MakeTemplatePool(uint64_t volume_bytes) {
  auto* dev = new blockstore::MemIo(8 << 20);
  auto pool = blockstore::Pool::Create(*dev, {.chunk_size_bytes = 4096});
  if (pool.ok()) {
    (*pool)->CreateVolume("v", volume_bytes).IgnoreError();
    std::string data(16384, 'x');
    (*pool)
        ->Write("v", 4096,
                {reinterpret_cast<const std::byte*>(data.data()), data.size()})
        .IgnoreError();
    (*pool)->CreateSnapshot("v", "s").IgnoreError();
  }
  return dev;
}

#endif  // TANDEM_TESTS_FUZZ_FUZZ_POOL_H_
