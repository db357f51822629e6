// Block store micro benchmarks on a real pool file (in $TMPDIR, default /tmp).
// Each volume figure has its physical-limit twin in the same run: the same
// I/O pattern straight through io_uring + O_DIRECT on the same file.
//   build/bench/blockstore_bench --benchmark_counters_tabular=true
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

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
    if (std::getenv("TANDEM_BENCH_PREWRITE") != nullptr) {
      // Every block of the file written once (zeros) before the pool is
      // made: the file system then has nothing to allocate or convert when
      // the pool writes, as on a block device.
      int fd = open(path.c_str(), O_CREAT | O_RDWR, 0644);
      AlignedBuffer zeros(16 << 20);
      for (uint64_t off = 0; fd >= 0 && off < kPoolBytes; off += zeros.size()) {
        if (pwrite(fd, zeros.data(), zeros.size(), off) !=
            static_cast<ssize_t>(zeros.size())) {
          std::abort();
        }
      }
      if (fd < 0 || fsync(fd) != 0) std::abort();
      close(fd);
    }
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

// ---------------------------------------------------------------------------
// Many requests in flight at once (the block store of issue 9): requests
// from 1, 4 and 16 threads (each thread one request at a time, so threads
// = requests in flight) into one pool, whose twin is fio on the same pool
// file at the same queue depth (bench/run_blockstore.sh runs both). The
// pool stays between these benchmarks: a 1 GiB volume written once, whose
// chunks lie at the start of the data area (TANDEM_BENCH_KEEP_POOL=1 keeps
// the file afterwards, for fio; its data offset is in the label).

struct SharedPool {
  SharedPool() : bp(64 << 10) {
    Check(bp.pool->CreateVolume("v", kVolumeBytes));
    Check(bp.pool->CreateVolume("w", kVolumeBytes));
    AlignedBuffer buf(16 << 20);
    FillRandom(buf.span(), 7);
    for (uint64_t off = 0; off < kVolumeBytes; off += buf.size()) {
      Check(bp.pool->Write("v", off, buf.span()));
    }
    Check(bp.pool->Flush());
    data_offset = bp.pool->superblock().data_start *
                  uint64_t{bp.pool->superblock().chunk_size};
  }
  ~SharedPool() {
    if (std::getenv("TANDEM_BENCH_KEEP_POOL") != nullptr) {
      bp.pool.reset();
      bp.path += ".kept";  // ~BenchPool removes this name, not the pool
    }
  }
  BenchPool bp;
  uint64_t data_offset = 0;
};
SharedPool* shared_pool = nullptr;
uint64_t commits_before = 0;  // the shared pool's, when a case began

// Resident memory of the process, MiB.
double RssMiB() {
  long pages = 0, resident = 0;
  if (FILE* f = std::fopen("/proc/self/statm", "r")) {
    if (std::fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = 0;
    std::fclose(f);
  }
  return static_cast<double>(resident) * sysconf(_SC_PAGESIZE) / (1 << 20);
}

void SetUpShared(benchmark::State& state) {
  if (state.thread_index() == 0 && shared_pool == nullptr) {
    shared_pool = new SharedPool();
  }
  if (state.thread_index() == 0) {
    commits_before = shared_pool->bp.pool->stats().commits;
  }
}

void FinishShared(benchmark::State& state, uint64_t bytes_each) {
  state.SetItemsProcessed(state.iterations());
  state.SetBytesProcessed(state.iterations() * bytes_each);
  if (state.thread_index() == 0) {
    state.counters["rss_MiB"] = RssMiB();
    state.counters["commits"] = static_cast<double>(
        shared_pool->bp.pool->stats().commits - commits_before);
    state.SetLabel("data_offset=" + std::to_string(shared_pool->data_offset));
  }
}

// Random 64 KiB (one chunk) reads or writes (range(0): 1 = write).
void BM_ConcurrentRandom64K(benchmark::State& state) {
  SetUpShared(state);
  const bool write = state.range(0) == 1;
  AlignedBuffer buf(64 << 10);
  FillRandom(buf.span(), 8 + state.thread_index());
  std::mt19937_64 rng(100 + state.thread_index());
  for (auto _ : state) {
    uint64_t off = (rng() % (kVolumeBytes >> 16)) << 16;
    Pool& pool = *shared_pool->bp.pool;
    Check(write ? pool.Write("v", off, buf.span())
                : pool.Read("v", "", off, buf.span()));
  }
  FinishShared(state, 64 << 10);
}
BENCHMARK(BM_ConcurrentRandom64K)
    ->ArgName("write")
    ->Arg(0)
    ->Arg(1)
    ->Threads(1)
    ->Threads(4)
    ->Threads(16)
    ->MinTime(3)
    ->UseRealTime();

// Sequential 1 MiB reads or writes, 8 in flight: 8 threads, each through
// its own eighth of the volume.
void BM_ConcurrentSequential1M(benchmark::State& state) {
  SetUpShared(state);
  const bool write = state.range(0) == 1;
  AlignedBuffer buf(kIoBytes);
  FillRandom(buf.span(), 20 + state.thread_index());
  const uint64_t region = kVolumeBytes / state.threads();
  const uint64_t base = region * state.thread_index();
  uint64_t at = 0;
  for (auto _ : state) {
    Pool& pool = *shared_pool->bp.pool;
    uint64_t off = base + at;
    at = (at + kIoBytes) % region;
    Check(write ? pool.Write("v", off, buf.span())
                : pool.Read("v", "", off, buf.span()));
  }
  FinishShared(state, kIoBytes);
}
BENCHMARK(BM_ConcurrentSequential1M)
    ->ArgName("write")
    ->Arg(0)
    ->Arg(1)
    ->Threads(8)
    ->MinTime(3)
    ->UseRealTime();

// The latency of a 4 KiB read, idle and while another thread writes 1 GiB
// into another volume of the pool and commits it: p50 and p99 of each, and
// their ratio (the goal: busy p99 <= 3x idle p99).
void BM_ConcurrentReadLatencyDuringWrite(benchmark::State& state) {
  SetUpShared(state);
  Pool& pool = *shared_pool->bp.pool;
  AlignedBuffer buf(4096);
  std::mt19937_64 rng(30);
  auto one_read = [&] {
    uint64_t off = (rng() % (kVolumeBytes >> 12)) << 12;
    auto start = std::chrono::steady_clock::now();
    Check(pool.Read("v", "", off, buf.span()));
    return std::chrono::duration<double, std::micro>(
               std::chrono::steady_clock::now() - start)
        .count();
  };
  auto pct = [](std::vector<double> v, double p) {
    std::sort(v.begin(), v.end());
    return v.empty() ? 0.0 : v[static_cast<size_t>(p * (v.size() - 1))];
  };
  std::vector<double> idle, busy;
  for (auto _ : state) {
    idle.clear();
    busy.clear();
    for (int i = 0; i < 3000; ++i) idle.push_back(one_read());
    std::atomic<bool> done{false};
    std::thread writer([&] {
      AlignedBuffer big(16 << 20);
      FillRandom(big.span(), 31);
      for (uint64_t off = 0; off < kVolumeBytes; off += big.size()) {
        big.data()[0] = static_cast<std::byte>(off >> 24);
        Check(pool.Write("w", off, big.span()));
      }
      Check(pool.Flush());
      done = true;
    });
    while (!done.load()) busy.push_back(one_read());
    writer.join();
  }
  state.counters["idle_p50_us"] = pct(idle, 0.5);
  state.counters["idle_p99_us"] = pct(idle, 0.99);
  state.counters["busy_p50_us"] = pct(busy, 0.5);
  state.counters["busy_p99_us"] = pct(busy, 0.99);
  state.counters["p99_ratio"] = pct(busy, 0.99) / pct(idle, 0.99);
  state.counters["busy_reads"] = static_cast<double>(busy.size());
}
BENCHMARK(BM_ConcurrentReadLatencyDuringWrite)
    ->Iterations(1)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  delete shared_pool;
  return 0;
}
