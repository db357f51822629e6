// Test data for the end-to-end benchmarks, the same bytes into a pool
// volume or a plain file, so tandem and its peers move identical changes.
//   prep fill-pool POOL VOLUME SIZE [DATA [words]]  create VOLUME, fill it
//                                        (its first DATA bytes; words: all
//                                        text), snapshot @base
//   prep fill-file FILE SIZE
//   prep change-pool POOL VOLUME N RANGE SEED   rewrite N random chunks of
//   prep change-file FILE N RANGE SEED          the first RANGE (64 KiB each)
// Content: even chunks random, odd chunks repetitive text (zstd -1 ~ 10x),
// so the whole is "half compressible, half random".
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "blockstore/io.h"
#include "blockstore/pool.h"
#include "blockstore/util.h"

namespace {

constexpr uint64_t kChunk = 64 << 10;
constexpr uint64_t kPiece = 16 << 20;

void Die(const std::string& what) {
  std::fprintf(stderr, "prep: %s\n", what.c_str());
  std::exit(1);
}

void Check(const absl::Status& s) {
  if (!s.ok()) Die(std::string(s.message()));
}

// Text of words drawn at random from a vocabulary of 512 made-up ones:
// compressible (zstd -1 about 2.5x) but not trivially, so that compressing
// it costs what real text does.
void FillWords(std::byte* p, std::mt19937_64& rng) {
  static const std::vector<std::string> kWords = [] {
    std::vector<std::string> w;
    std::mt19937_64 g(42);
    const char* syl[] = {"ka", "to", "re", "mi", "su", "lo", "ne", "vi",
                         "da", "pe", "ru", "xo", "ba", "fi", "go", "ha"};
    for (int i = 0; i < 512; ++i) {
      std::string word;
      for (uint64_t k = 0, n = 1 + g() % 4; k < n; ++k) word += syl[g() % 16];
      w.push_back(word);
    }
    return w;
  }();
  for (uint64_t i = 0; i < kChunk;) {
    const std::string& word = kWords[rng() % kWords.size()];
    for (char ch : word) {
      if (i == kChunk) break;
      p[i++] = static_cast<std::byte>(ch);
    }
    if (i < kChunk)
      p[i++] = static_cast<std::byte>(rng() % 8 == 0 ? '\n' : ' ');
  }
}

bool g_words = false;  // every chunk FillWords

void FillChunk(std::byte* p, uint64_t chunk, uint64_t seed) {
  std::mt19937_64 rng(chunk * 1000003 + seed);
  if (g_words) {
    FillWords(p, rng);
  } else if ((chunk + seed) % 2 == 0) {
    for (uint64_t i = 0; i < kChunk; i += 8) {
      uint64_t v = rng();
      std::memcpy(p + i, &v, 8);
    }
  } else {
    static const char kText[] =
        "Tandem replicates block volumes by shipping snapshot deltas. ";
    uint64_t start = rng() % (sizeof(kText) - 1);
    for (uint64_t i = 0; i < kChunk; ++i) {
      p[i] = static_cast<std::byte>(kText[(start + i) % (sizeof(kText) - 1)]);
    }
    // A little noise so it is not trivially compressible.
    for (int k = 0; k < 64; ++k)
      p[rng() % kChunk] = static_cast<std::byte>(rng());
  }
}

std::vector<uint64_t> Pick(uint64_t n, uint64_t range, uint64_t seed) {
  std::vector<uint64_t> all(range);
  for (uint64_t i = 0; i < range; ++i) all[i] = i;
  std::mt19937_64 rng(seed);
  std::shuffle(all.begin(), all.end(), rng);
  all.resize(std::min(n, range));
  std::sort(all.begin(), all.end());
  return all;
}

std::unique_ptr<blockstore::Pool> OpenPool(const char* path) {
  blockstore::FileIoOptions o;
  auto io = blockstore::OpenFileIo(path, o);
  if (!io.ok()) Die(std::string(io.status().message()));
  auto pool =
      blockstore::Pool::Open(std::move(*io), blockstore::OpenMode::kReadWrite);
  if (!pool.ok()) Die(std::string(pool.status().message()));
  return std::move(*pool);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) Die("usage: see the comment at the top of bench/prep.cc");
  std::string cmd = argv[1];
  g_words = argc > 6 && std::string(argv[6]) == "words";
  blockstore::AlignedBuffer buf(kPiece);
  if (cmd == "fill-pool" || cmd == "fill-file") {
    bool pool_mode = cmd == "fill-pool";
    const uint64_t volume_size =
        *blockstore::ParseSize(argv[pool_mode ? 4 : 3]);
    const uint64_t size =
        pool_mode && argc > 5 ? *blockstore::ParseSize(argv[5]) : volume_size;
    std::unique_ptr<blockstore::Pool> pool;
    int fd = -1;
    if (pool_mode) {
      pool = OpenPool(argv[2]);
      Check(pool->CreateVolume(argv[3], volume_size));
    } else {
      fd = open(argv[2], O_WRONLY | O_CREAT | O_TRUNC, 0644);
      if (fd < 0) Die("open");
    }
    for (uint64_t at = 0; at < size; at += kPiece) {
      uint64_t n = std::min(kPiece, size - at);
      for (uint64_t c = 0; c < n / kChunk; ++c) {
        FillChunk(buf.data() + c * kChunk, at / kChunk + c, 0);
      }
      if (pool_mode) {
        Check(pool->Write(argv[3], at, buf.span().first(n)));
      } else if (pwrite(fd, buf.data(), n, at) != static_cast<ssize_t>(n)) {
        Die("write");
      }
    }
    if (pool_mode) {
      Check(pool->Flush());
      Check(pool->CreateSnapshot(argv[3], "base").status());
    } else {
      fsync(fd);
      close(fd);
    }
    return 0;
  }
  if (cmd == "change-pool" || cmd == "change-file") {
    bool pool_mode = cmd == "change-pool";
    int a = pool_mode ? 4 : 3;
    if (argc < a + 3) Die("usage: see bench/prep.cc");
    uint64_t n = std::strtoull(argv[a], nullptr, 10);
    uint64_t range = std::strtoull(argv[a + 1], nullptr, 10);
    uint64_t seed = std::strtoull(argv[a + 2], nullptr, 10);
    std::vector<uint64_t> chunks = Pick(n, range, seed);
    std::unique_ptr<blockstore::Pool> pool;
    int fd = -1;
    if (pool_mode) {
      pool = OpenPool(argv[2]);
    } else {
      fd = open(argv[2], O_WRONLY);
      if (fd < 0) Die("open");
    }
    for (uint64_t c : chunks) {
      FillChunk(buf.data(), c, seed + 1);
      if (pool_mode) {
        Check(pool->Write(argv[3], c * kChunk, buf.span().first(kChunk)));
      } else if (pwrite(fd, buf.data(), kChunk, c * kChunk) != kChunk) {
        Die("write");
      }
    }
    if (pool_mode) {
      Check(pool->Flush());
    } else {
      fsync(fd);
      close(fd);
    }
    std::printf("%zu chunks changed\n", chunks.size());
    return 0;
  }
  Die("unknown command " + cmd);
}
