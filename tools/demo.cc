#include "tools/demo.h"

#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "blockstore/io.h"
#include "blockstore/pool.h"
#include "blockstore/util.h"

namespace tools {
namespace {

using blockstore::Pool;

constexpr uint64_t kVolumeBytes = 256ull << 20;
constexpr uint32_t kChunk = 64 << 10;

int failures = 0;

void Check(bool ok, const std::string& what) {
  std::printf("  [%s] %s\n", ok ? " ok " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

bool Ok(const absl::Status& s, const std::string& what) {
  if (!s.ok()) {
    std::printf("  [FAIL] %s: %s\n", what.c_str(),
                std::string(s.message()).c_str());
    ++failures;
  }
  return s.ok();
}

// Half compressible text-like bytes, half random, like a real disk.
std::vector<std::byte> MixedData(uint64_t bytes, uint64_t seed) {
  std::vector<std::byte> out(bytes);
  std::mt19937_64 rng(seed);
  for (uint64_t c = 0; c < bytes / kChunk; ++c) {
    std::byte* p = out.data() + c * kChunk;
    if (c % 2 == 0) {
      for (uint64_t i = 0; i < kChunk; i += 8) {
        uint64_t v = rng();
        std::memcpy(p + i, &v, 8);
      }
    } else {
      for (uint64_t i = 0; i < kChunk; ++i) {
        p[i] = static_cast<std::byte>("tandem block store "[(i + c) % 19]);
      }
    }
  }
  return out;
}

double Seconds(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since)
      .count();
}

void ShowSpace(Pool& pool) {
  blockstore::PoolInfo info = pool.Info();
  std::printf("  pool: %s used of %s, metadata %s\n",
              blockstore::FormatBytes(info.used_bytes).c_str(),
              blockstore::FormatBytes(info.capacity_bytes).c_str(),
              blockstore::FormatBytes(info.metadata_used_bytes).c_str());
}

int Walkthrough(const std::string& path) {
  std::printf("== create a 4 GiB sparse pool file with 64 KiB chunks\n");
  blockstore::FileIoOptions options;
  options.create_size_bytes = 4ull << 30;
  absl::StatusOr<std::unique_ptr<blockstore::Io>> io =
      blockstore::OpenFileIo(path, options);
  if (!Ok(io.status(), "open pool file")) return 1;
  absl::StatusOr<std::unique_ptr<Pool>> created =
      Pool::Create(std::move(*io), {.chunk_size_bytes = kChunk});
  if (!Ok(created.status(), "create pool")) return 1;
  Pool& pool = **created;
  std::printf("  %s (%s)\n", path.c_str(), pool.Info().io.c_str());

  std::printf("== create volume vol0 (256 MiB) and write mixed data\n");
  if (!Ok(pool.CreateVolume("vol0", kVolumeBytes), "create volume")) return 1;
  std::vector<std::byte> base = MixedData(kVolumeBytes, 1);
  auto t0 = std::chrono::steady_clock::now();
  if (!Ok(pool.Write("vol0", 0, base), "write")) return 1;
  if (!Ok(pool.Flush(), "flush")) return 1;
  std::printf("  wrote 256 MiB in %.2f s\n", Seconds(t0));
  ShowSpace(pool);

  std::printf("== snapshot vol0@base\n");
  t0 = std::chrono::steady_clock::now();
  absl::StatusOr<blockstore::SnapshotInfo> snap =
      pool.CreateSnapshot("vol0", "base");
  if (!Ok(snap.status(), "snapshot")) return 1;
  std::printf("  took %.3f ms; root digest %s\n", Seconds(t0) * 1e3,
              snap->root_digest.ToHex().c_str());

  std::printf("== overwrite 1%% of the chunks, plus one unaligned write\n");
  std::vector<std::byte> live = base;
  std::mt19937_64 rng(7);
  uint64_t chunks = kVolumeBytes / kChunk;
  std::vector<std::byte> fresh = MixedData(kChunk * 2, 99);
  for (uint64_t i = 0; i < chunks / 100; ++i) {
    uint64_t c = rng() % chunks;
    std::memcpy(live.data() + c * kChunk, fresh.data(), kChunk);
    if (!Ok(pool.Write("vol0", c * kChunk, std::span(fresh).first(kChunk)),
            "overwrite")) {
      return 1;
    }
  }
  const char kNote[] = "an unaligned write across a chunk boundary";
  uint64_t at = 5 * kChunk - 10;
  std::memcpy(live.data() + at, kNote, sizeof(kNote));
  if (!Ok(pool.Write("vol0", at,
                     std::as_bytes(std::span(kNote, sizeof(kNote)))),
          "unaligned write")) {
    return 1;
  }
  if (!Ok(pool.Flush(), "flush")) return 1;
  ShowSpace(pool);

  std::printf("== read back the snapshot and the live volume\n");
  std::vector<std::byte> got(kVolumeBytes);
  if (!Ok(pool.Read("vol0", "base", 0, got), "read snapshot")) return 1;
  Check(got == base,
        "vol0@base still holds the original 256 MiB, byte for byte");
  if (!Ok(pool.Read("vol0", "", 0, got), "read live")) return 1;
  Check(got == live, "vol0 holds the new data, byte for byte");
  absl::StatusOr<blockstore::Digest> live_digest = pool.RootDigest("vol0", "");
  if (!Ok(live_digest.status(), "digest")) return 1;
  Check(
      *live_digest != snap->root_digest,
      absl::StrCat("live digest ", live_digest->ToHex(), " differs from base"));

  std::printf("== roll vol0 back to base\n");
  if (!Ok(pool.Rollback("vol0", "base"), "rollback")) return 1;
  live_digest = pool.RootDigest("vol0", "");
  if (!Ok(live_digest.status(), "digest")) return 1;
  Check(*live_digest == snap->root_digest,
        "live digest equals vol0@base again");
  if (!Ok(pool.Read("vol0", "", 0, got), "read live")) return 1;
  Check(got == base, "vol0 is the original data again");
  ShowSpace(pool);

  std::printf("== delete the snapshot, trim half the volume\n");
  if (!Ok(pool.DeleteSnapshot("vol0", "base"), "delete snapshot")) return 1;
  if (!Ok(pool.Trim("vol0", 0, kVolumeBytes / 2), "trim")) return 1;
  if (!Ok(pool.Flush(), "flush")) return 1;
  blockstore::PoolInfo info = pool.Info();
  ShowSpace(pool);
  Check(info.used_bytes == kVolumeBytes / 2,
        "exactly the untrimmed half (128 MiB) is in use");

  std::printf("== pool check --data\n");
  absl::StatusOr<Pool::CheckReport> report = pool.Check(true);
  if (!Ok(report.status(), "check")) return 1;
  for (const std::string& p : report->problems)
    std::printf("  %s\n", p.c_str());
  Check(report->problems.empty(),
        absl::StrCat("checked ", report->nodes_checked, " nodes and ",
                     report->chunks_checked, " chunks: consistent"));
  return failures == 0 ? 0 : 1;
}

}  // namespace

int RunDemo(const std::string& dir_arg) {
  std::string dir = dir_arg;
  bool temporary = dir.empty();
  if (temporary) {
    const char* tmp = std::getenv("TMPDIR");
    std::string tmpl =
        absl::StrCat(tmp != nullptr ? tmp : "/tmp", "/tandem-demo-XXXXXX");
    if (mkdtemp(tmpl.data()) == nullptr) {
      std::perror("tandem demo: mkdtemp");
      return 1;
    }
    dir = tmpl;
  } else if (mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST) {
    std::perror(("tandem demo: mkdir " + dir).c_str());
    return 1;
  }
  std::string path = dir + "/pool.img";
  int rc = Walkthrough(path);
  if (temporary) {
    unlink(path.c_str());
    rmdir(dir.c_str());
  }
  std::printf("%s\n", rc == 0 ? "demo: all checks passed" : "demo: FAILED");
  return rc;
}

}  // namespace tools
