// Block store micro benchmarks on a real pool file (in $TMPDIR, default /tmp).
// Each volume figure has its physical-limit twin in the same run: the same
// I/O pattern straight through io_uring + O_DIRECT on the same file.
//   build/bench/blockstore_bench --benchmark_counters_tabular=true
#include <fcntl.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>

#include "benchmark/benchmark.h"
#include "blockstore/io.h"
#include "blockstore/pool.h"
#include "blockstore/util.h"

namespace {

using blockstore::AlignedBuffer;
using blockstore::Pool;

constexpr uint64_t kPoolBytes = 6ull << 30;
constexpr uint64_t kVolumeBytes = 1ull << 30;
constexpr uint64_t kIoBytes = 1 << 20;

std::string PoolPath() {
  const char* tmp = std::getenv("TMPDIR");
  return std::string(tmp ? tmp : "/tmp") + "/tandem-bench-pool.img";
}

// A fresh pool file, removed when the benchmark ends.
struct BenchPool {
  explicit BenchPool(uint32_t chunk = 64 << 10) : path(PoolPath()) {
    unlink(path.c_str());
    if (std::getenv("BENCH_FALLOCATE") != nullptr) {
      int fd = open(path.c_str(), O_CREAT | O_RDWR, 0644);
      if (fd < 0 || fallocate(fd, 0, 0, kPoolBytes) != 0) std::abort();
      close(fd);
    }
    blockstore::FileIoOptions o;
    o.create_size_bytes = kPoolBytes;
    auto io = blockstore::OpenFileIo(path, o);
    if (!io.ok()) std::abort();
    auto p = Pool::Create(std::move(*io), {.chunk_size_bytes = chunk});
    if (!p.ok()) std::abort();
    pool = std::move(*p);
  }
  ~BenchPool() {
    pool.reset();
    unlink(path.c_str());
  }
  std::string path;
  std::unique_ptr<Pool> pool;
};

void FillRandom(std::span<std::byte> buf, uint64_t seed) {
  std::mt19937_64 rng(seed);
  for (size_t i = 0; i + 8 <= buf.size(); i += 8) {
    uint64_t v = rng();
    std::memcpy(buf.data() + i, &v, 8);
  }
}

void Check(const absl::Status& s) {
  if (!s.ok()) {
    std::fprintf(stderr, "bench: %s\n", std::string(s.message()).c_str());
    std::abort();
  }
}

// Snapshot creation on a 1 GiB and on a 1 TiB sparse volume, 64 MiB written
// in both. A snapshot commit is fsync-bound; the point is that the two are
// the same.
void BM_SnapshotCreate(benchmark::State& state) {
  BenchPool bp;
  uint64_t size = uint64_t(state.range(0)) << 30;
  Check(bp.pool->CreateVolume("v", size));
  AlignedBuffer buf(kIoBytes);
  FillRandom(buf.span(), 1);
  for (uint64_t i = 0; i < 64; ++i) {
    Check(bp.pool->Write("v", (size / 64) * i, buf.span()));
  }
  Check(bp.pool->Flush());
  uint64_t n = 0;
  for (auto _ : state) {
    Check(bp.pool->CreateSnapshot("v", "s" + std::to_string(n++)).status());
    state.PauseTiming();
    Check(bp.pool->Write("v", 0, std::span(buf.span()).first(4096)));
    state.ResumeTiming();
  }
  state.counters["volume_GiB"] = static_cast<double>(size >> 30);
}
BENCHMARK(BM_SnapshotCreate)
    ->Arg(1)
    ->Arg(1024)
    ->Unit(benchmark::kMillisecond)
    ->Iterations(50)
    ->UseRealTime();

// Sequential 1 MiB writes through a volume, 1 GiB per iteration, flushed.
// Redirect-on-write sends each pass to the chunks the pass before last
// freed; four untimed passes first make the file's blocks exist and warm
// the virtual disk, so this is the steady state of a used pool.
void BM_VolumeSeqWrite(benchmark::State& state) {
  BenchPool bp;
  Check(bp.pool->CreateVolume("v", kVolumeBytes));
  AlignedBuffer buf(kIoBytes);
  FillRandom(buf.span(), 2);
  for (int warm = 0; warm < 4; ++warm) {
    for (uint64_t off = 0; off < kVolumeBytes; off += kIoBytes) {
      Check(bp.pool->Write("v", off, buf.span()));
    }
    Check(bp.pool->Flush());
  }
  for (auto _ : state) {
    for (uint64_t off = 0; off < kVolumeBytes; off += kIoBytes) {
      buf.data()[0] = static_cast<std::byte>(off);
      Check(bp.pool->Write("v", off, buf.span()));
    }
    Check(bp.pool->Flush());
  }
  state.SetBytesProcessed(state.iterations() * kVolumeBytes);
}
BENCHMARK(BM_VolumeSeqWrite)
    ->Unit(benchmark::kMillisecond)
    ->Iterations(3)
    ->UseRealTime();

void BM_VolumeSeqRead(benchmark::State& state) {
  BenchPool bp;
  Check(bp.pool->CreateVolume("v", kVolumeBytes));
  AlignedBuffer buf(kIoBytes);
  FillRandom(buf.span(), 3);
  for (uint64_t off = 0; off < kVolumeBytes; off += kIoBytes) {
    Check(bp.pool->Write("v", off, buf.span()));
  }
  Check(bp.pool->Flush());
  for (auto _ : state) {
    for (uint64_t off = 0; off < kVolumeBytes; off += kIoBytes) {
      Check(bp.pool->Read("v", "", off, buf.span()));
    }
  }
  state.SetBytesProcessed(state.iterations() * kVolumeBytes);
}
BENCHMARK(BM_VolumeSeqRead)
    ->Unit(benchmark::kMillisecond)
    ->Iterations(3)
    ->UseRealTime();

// The physical limit for the two above: the same 1 MiB requests at queue
// depth 1, io_uring + O_DIRECT, on the same file (range(0): 1 = write).
void BM_RawUring(benchmark::State& state) {
  BenchPool bp;  // same file, same size, same filesystem
  uint64_t base = bp.pool->superblock().data_start *
                  uint64_t{bp.pool->superblock().chunk_size};
  std::string path = bp.path;
  bp.pool.reset();
  blockstore::FileIoOptions o;
  auto io = blockstore::OpenFileIo(path, o);
  if (!io.ok()) std::abort();
  AlignedBuffer buf(kIoBytes);
  FillRandom(buf.span(), 4);
  bool write = state.range(0) == 1;
  // Writes alternate between two 1 GiB regions as redirect-on-write does;
  // the same four untimed warm-up passes as the volume benchmarks.
  for (int warm = 0; warm < 4; ++warm) {
    for (uint64_t off = 0; off < kVolumeBytes; off += kIoBytes) {
      Check((*io)->WriteAt(base + (warm % 2) * kVolumeBytes + off, buf.span()));
    }
    Check((*io)->Flush());
  }
  uint64_t pass = 0;
  for (auto _ : state) {
    uint64_t region = base + (write ? (pass++ % 2) * kVolumeBytes : 0);
    for (uint64_t off = 0; off < kVolumeBytes; off += kIoBytes) {
      Check(write ? (*io)->WriteAt(region + off, buf.span())
                  : (*io)->ReadAt(region + off, buf.span()));
    }
    if (write) Check((*io)->Flush());
  }
  state.SetBytesProcessed(state.iterations() * kVolumeBytes);
  state.SetLabel(write ? "write" : "read");
}
BENCHMARK(BM_RawUring)
    ->Arg(1)
    ->Arg(0)
    ->Unit(benchmark::kMillisecond)
    ->Iterations(3)
    ->UseRealTime();

// 4 KiB random writes into a 1 GiB volume just snapshotted (every first
// touch of a chunk copies it), a commit every 1000 writes. Counters: IOPS,
// metadata bytes and device data bytes written per byte the caller wrote.
void BM_RandomWrite4KAfterSnapshot(benchmark::State& state) {
  uint32_t chunk = static_cast<uint32_t>(state.range(0));
  BenchPool bp(chunk);
  Check(bp.pool->CreateVolume("v", kVolumeBytes));
  AlignedBuffer buf(kIoBytes);
  FillRandom(buf.span(), 5);
  for (uint64_t off = 0; off < kVolumeBytes; off += kIoBytes) {
    Check(bp.pool->Write("v", off, buf.span()));
  }
  Check(bp.pool->CreateSnapshot("v", "s").status());
  Pool::Stats before = bp.pool->stats();
  std::mt19937_64 rng(6);
  uint64_t writes = 0;
  for (auto _ : state) {
    uint64_t off = (rng() % (kVolumeBytes / 4096)) * 4096;
    Check(bp.pool->Write("v", off, std::span(buf.span()).first(4096)));
    if (++writes % 1000 == 0) Check(bp.pool->Flush());
  }
  Check(bp.pool->Flush());
  Pool::Stats after = bp.pool->stats();
  double user = static_cast<double>(writes) * 4096;
  state.counters["IOPS"] = benchmark::Counter(static_cast<double>(writes),
                                              benchmark::Counter::kIsRate);
  state.counters["meta_per_byte"] =
      (after.metadata_bytes_written - before.metadata_bytes_written) / user;
  state.counters["data_per_byte"] =
      (after.data_bytes_written - before.data_bytes_written) / user;
  state.counters["chunk_KiB"] = chunk / 1024.0;
}
BENCHMARK(BM_RandomWrite4KAfterSnapshot)
    ->Arg(64 << 10)
    ->Arg(4 << 10)
    ->Iterations(20000)
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
