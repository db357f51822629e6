// The tandem command line end to end, on a real pool file and on a loop
// device (a stand-in for NVMe; skipped where loop devices are unavailable).
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "blockstore/format.h"
#include "blockstore/io.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/process.h"

namespace {

using ::testing::HasSubstr;
using json = nlohmann::json;

using testing_util::RandomBytes;
using testing_util::Result;
class CliTest : public ::testing::TestWithParam<bool> {
 protected:
  void SetUp() override {
    const char* tmp = std::getenv("TMPDIR");
    dir_ = absl::StrCat(tmp ? tmp : "/tmp", "/tandem-cli-XXXXXX");
    ASSERT_NE(mkdtemp(dir_.data()), nullptr);
    if (GetParam()) {
      std::string backing = dir_ + "/loop.img";
      ASSERT_EQ(truncate(backing.c_str(), 0), -1);  // does not exist yet
      testing_util::Spit(backing, "");
      ASSERT_EQ(truncate(backing.c_str(), 256 << 20), 0);
      Result r = Exec({"/sbin/losetup", "--find", "--show", backing});
      if (r.code != 0 || r.out.empty()) {
        GTEST_SKIP() << "no loop device here (" << r.err << ")";
      }
      loop_ = std::string(absl::StripTrailingAsciiWhitespace(r.out));
      pool_ = loop_;
    } else {
      pool_ = dir_ + "/pool.img";
    }
  }

  void TearDown() override {
    if (!loop_.empty()) Exec({"/sbin/losetup", "-d", loop_});
    Exec({"/bin/rm", "-rf", dir_});
  }

  // Runs argv with stdin from `input`, capturing stdout and stderr.
  Result Exec(const std::vector<std::string>& argv,
              const std::string& input = "",
              const std::vector<std::string>& env = {}) {
    return testing_util::Exec(dir_, argv, input, env);
  }

  Result Tandem(std::vector<std::string> args, const std::string& input = "") {
    args.insert(args.begin(), TANDEM_BIN);
    return Exec(args, input);
  }

  // Runs a command that must succeed; returns its stdout.
  std::string Ok(std::vector<std::string> args, const std::string& input = "") {
    Result r = Tandem(args, input);
    EXPECT_EQ(r.code, 0) << absl::StrJoin(args, " ") << ": " << r.err;
    EXPECT_EQ(r.err, "") << absl::StrJoin(args, " ");
    return r.out;
  }

  // Runs a command that must fail with one line on stderr containing `what`.
  void Fails(std::vector<std::string> args, const std::string& what,
             int code = 1) {
    Result r = Tandem(args);
    EXPECT_EQ(r.code, code) << absl::StrJoin(args, " ");
    EXPECT_THAT(r.err, HasSubstr(what)) << absl::StrJoin(args, " ");
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1)
        << "not one line: " << r.err;
  }

  std::string Digest(const std::string& ref) {
    return std::string(absl::StripTrailingAsciiWhitespace(
        Ok({"digest", "--pool", pool_, ref})));
  }

  std::string dir_, pool_, loop_;
};

TEST_P(CliTest, PoolVolumeSnapshotLifecycle) {
  std::vector<std::string> create = {"pool", "create", pool_, "--chunk-size",
                                     "16K"};
  if (!GetParam()) create.insert(create.end(), {"--size", "256M"});
  EXPECT_THAT(Ok(create), HasSubstr("created pool"));
  json info = json::parse(Ok({"pool", "info", pool_, "--json"}));
  EXPECT_EQ(info["chunk_size_bytes"], 16384);
  EXPECT_EQ(info["used_bytes"], 0);
  if (GetParam()) {  // a block device always takes O_DIRECT
    EXPECT_THAT(info["io"].get<std::string>(), HasSubstr("O_DIRECT"));
  }

  Ok({"volume", "create", "--pool", pool_, "vol", "--size", "10M"});
  json vols = json::parse(Ok({"volume", "list", "--pool", pool_, "--json"}));
  ASSERT_EQ(vols.size(), 1u);
  EXPECT_EQ(vols[0]["name"], "vol");
  EXPECT_EQ(vols[0]["size_bytes"], 10 << 20);

  // Write a file at an unaligned offset, read it back exactly.
  std::string data = RandomBytes(3'000'001, 1);
  testing_util::Spit(dir_ + "/data", data);
  Ok({"write", "--pool", pool_, "vol", dir_ + "/data", "--offset", "1001"});
  EXPECT_EQ(Ok({"read", "--pool", pool_, "vol", "--offset", "1001", "--length",
                "3000001"}),
            data);
  std::string whole = Ok({"read", "--pool", pool_, "vol"});
  ASSERT_EQ(whole.size(), 10u << 20);
  EXPECT_EQ(whole.substr(0, 1001), std::string(1001, '\0'));

  // Snapshot, then overwrite from stdin: the snapshot keeps the old bytes.
  std::string snap_line =
      Ok({"snapshot", "create", "--pool", pool_, "vol@one"});
  std::string patch = RandomBytes(70000, 2);
  Ok({"write", "--pool", pool_, "vol", "--offset", "5000"}, patch);
  EXPECT_EQ(Ok({"read", "--pool", pool_, "vol@one"}), whole);
  std::string live = Ok({"read", "--pool", pool_, "vol"});
  EXPECT_EQ(live.substr(5000, 70000), patch);
  json snaps =
      json::parse(Ok({"snapshot", "list", "--pool", pool_, "vol", "--json"}));
  ASSERT_EQ(snaps.size(), 1u);
  EXPECT_EQ(snaps[0]["name"], "one");
  EXPECT_EQ(snaps[0]["root_digest"], Digest("vol@one"));
  EXPECT_THAT(snap_line, HasSubstr(snaps[0]["guid"].get<std::string>()));
  EXPECT_NE(Digest("vol"), Digest("vol@one"));

  // Rollback restores the snapshot; trim zeroes; resize changes the size.
  Ok({"rollback", "--pool", pool_, "vol@one"});
  EXPECT_EQ(Digest("vol"), Digest("vol@one"));
  EXPECT_EQ(Ok({"read", "--pool", pool_, "vol"}), whole);
  Ok({"trim", "--pool", pool_, "vol", "--offset", "0", "--length", "10M"});
  EXPECT_EQ(Ok({"read", "--pool", pool_, "vol"}), std::string(10 << 20, '\0'));
  Ok({"volume", "resize", "--pool", pool_, "vol", "--size", "1G"});
  EXPECT_EQ(json::parse(Ok({"volume", "list", "--pool", pool_,
                            "--json"}))[0]["size_bytes"],
            1 << 30);
  // An empty 1 GiB volume has the digest of any other empty 1 GiB volume.
  Ok({"volume", "create", "--pool", pool_, "other", "--size", "1G"});
  EXPECT_EQ(Digest("vol"), Digest("other"));

  EXPECT_THAT(Ok({"pool", "check", pool_, "--data"}), HasSubstr("consistent"));

  // Deleting everything frees everything.
  Fails({"volume", "delete", "--pool", pool_, "vol"},
        "has 1 snapshot(s) (one)");
  Ok({"snapshot", "delete", "--pool", pool_, "vol@one"});
  Ok({"volume", "delete", "--pool", pool_, "vol"});
  Ok({"volume", "delete", "--pool", pool_, "other"});
  info = json::parse(Ok({"pool", "info", pool_, "--json"}));
  EXPECT_EQ(info["used_bytes"], 0);
  EXPECT_EQ(info["free_bytes"], info["capacity_bytes"]);
  EXPECT_EQ(info["volumes"], 0);
  EXPECT_THAT(Ok({"pool", "check", pool_, "--data"}), HasSubstr("consistent"));
}

TEST_P(CliTest, BadInputIsOneClearLineAndChangesNothing) {
  std::vector<std::string> create = {"pool", "create", pool_};
  if (!GetParam()) create.insert(create.end(), {"--size", "64M"});
  Ok(create);
  Ok({"volume", "create", "--pool", pool_, "vol", "--size", "1M"});
  Ok({"write", "--pool", pool_, "vol"}, RandomBytes(100000, 3));
  Ok({"snapshot", "create", "--pool", pool_, "vol@s"});
  std::string before = Digest("vol");

  Fails({"read", "--pool", pool_, "nope"}, "no volume 'nope'");
  Fails({"read", "--pool", pool_, "vol@nope"}, "no snapshot 'vol@nope'");
  Fails({"read", "--pool", pool_, "vol", "--offset", "2M"},
        "offset 2097152 is past the end of 'vol'");
  Fails({"read", "--pool", pool_, "vol", "--length", "2M"}, "past the end");
  Fails({"volume", "create", "--pool", pool_, "v2", "--size", "12Q"},
        "bad volume size '12Q'");
  Fails({"volume", "create", "--pool", pool_, "bad/name", "--size", "1M"},
        "bad volume name 'bad/name'");
  Fails({"volume", "create", "--pool", pool_, "vol", "--size", "1M"},
        "already exists");
  Fails({"snapshot", "create", "--pool", pool_, "vol"}, "names no snapshot");
  Fails({"trim", "--pool", pool_, "vol", "--offset", "1M", "--length", "1"},
        "past the end of volume 'vol'");
  // Writing past the end from stdin: refused, nothing committed.
  Result r = Tandem({"write", "--pool", pool_, "vol", "--offset", "1000000"},
                    RandomBytes(100000, 4));
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, HasSubstr("past the end of volume 'vol'"));
  // ... and from a file, refused before anything is written.
  testing_util::Spit(dir_ + "/big", RandomBytes(2 << 20, 5));
  Fails({"write", "--pool", pool_, "vol", dir_ + "/big"},
        "would pass the end of volume 'vol'");
  EXPECT_EQ(Digest("vol"), before);

  // Not a pool; no pool at all; a pool that is already there.
  testing_util::Spit(dir_ + "/junk", RandomBytes(1 << 20, 6));
  Fails({"pool", "info", dir_ + "/junk"}, "is not a tandem pool");
  Fails({"volume", "list", "--pool", dir_ + "/missing"}, "no such file");
  Fails({"volume", "list"}, "no pool given");
  Fails({"pool", "create", pool_}, "already holds a tandem pool");
  Fails({"pool", "create", dir_ + "/junk"}, "exists and is not empty");
  Fails({"pool", "create", dir_ + "/new", "--chunk-size", "3000"},
        "bad chunk size");
  // Refused creates make nothing.
  Fails({"pool", "create", dir_ + "/new", "--size", "0"},
        "bad pool size 0: 0 bytes is too small for a pool with 65536-byte "
        "chunks");
  Fails({"pool", "create", dir_ + "/new", "--size", "1M"}, "too small");
  EXPECT_FALSE(std::filesystem::exists(dir_ + "/new"));
  Fails({"frobnicate"}, "see 'tandem --help'", 2);
  EXPECT_EQ(Digest("vol"), before);
  EXPECT_THAT(Ok({"pool", "check", pool_}), HasSubstr("consistent"));

  // TANDEM_POOL stands in for --pool.
  Result env = Exec({TANDEM_BIN, "volume", "list", "--json"}, "",
                    {"TANDEM_POOL=" + pool_});
  EXPECT_EQ(env.code, 0) << env.err;
  EXPECT_EQ(json::parse(env.out)[0]["name"], "vol");
}

TEST_P(CliTest, SecondWriterIsRefusedNamingTheHolder) {
  std::vector<std::string> create = {"pool", "create", pool_};
  if (!GetParam()) create.insert(create.end(), {"--size", "64M"});
  Ok(create);
  blockstore::FileIoOptions o;
  absl::StatusOr<std::unique_ptr<blockstore::Io>> held =
      blockstore::OpenFileIo(pool_, o);
  ASSERT_TRUE(held.ok()) << held.status();
  Fails({"volume", "create", "--pool", pool_, "v", "--size", "1M"},
        absl::StrCat("is in use by process ", getpid()));
  held->reset();
  Ok({"volume", "create", "--pool", pool_, "v", "--size", "1M"});
}

TEST_P(CliTest, DamagedPoolIsReportedByCheck) {
  if (GetParam()) GTEST_SKIP() << "the file variant covers this";
  Ok({"pool", "create", pool_, "--size", "64M", "--chunk-size", "4K"});
  Ok({"volume", "create", "--pool", pool_, "v", "--size", "1M"});
  Ok({"write", "--pool", pool_, "v"}, RandomBytes(1 << 20, 7));
  EXPECT_THAT(Ok({"pool", "check", pool_, "--data"}), HasSubstr("consistent"));
  // Flip a bit in the first data chunk: reads fail, check --data says so.
  json info = json::parse(Ok({"pool", "info", pool_, "--json"}));
  int64_t data_start = 64ll << 20;
  data_start -= info["capacity_bytes"].get<int64_t>();
  std::string bytes = testing_util::Slurp(pool_);
  bytes[data_start + 100] ^= 1;
  testing_util::Spit(pool_, bytes);
  Result r = Tandem({"pool", "check", pool_, "--data"});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.out, HasSubstr("does not match its digest"));
  EXPECT_THAT(r.err, HasSubstr("is inconsistent: 1 problem(s)"));
  Fails({"read", "--pool", pool_, "v"}, "data does not match its digest");
}

// A bad sector in the reference-count table of the last commit: the volumes
// stay readable, writing is refused naming the repair, and the repair
// rebuilds the counts from the trees.
TEST_P(CliTest, DamagedCountsAreReadThroughAndRepaired) {
  if (GetParam()) GTEST_SKIP() << "the file variant covers this";
  Ok({"pool", "create", pool_, "--size", "64M", "--chunk-size", "4K"});
  Ok({"volume", "create", "--pool", pool_, "v", "--size", "1M"});
  const std::string data = RandomBytes(1 << 20, 7);
  Ok({"write", "--pool", pool_, "v"}, data);
  json info = json::parse(Ok({"pool", "info", pool_, "--json"}));
  const uint64_t generation = info["generation"];
  absl::StatusOr<blockstore::Superblock> layout =
      blockstore::LayOut(64 << 20, 4096);
  ASSERT_TRUE(layout.ok());
  std::string bytes = testing_util::Slurp(pool_);
  const uint64_t page = layout->refcount_copy_offset(generation);
  for (int k = 0; k < 64; ++k) bytes[page + 200 + k] ^= 0x5a;
  testing_util::Spit(pool_, bytes);

  EXPECT_EQ(Ok({"read", "--pool", pool_, "v"}), data);
  EXPECT_THAT(Ok({"volume", "list", "--pool", pool_}), HasSubstr("v"));
  Fails({"write", "--pool", pool_, "v"},
        absl::StrCat("reference count page 0 of generation ", generation,
                     " is damaged (checksum mismatch); the volumes are intact "
                     "and open read-only; rebuild the counts with 'tandem "
                     "pool check --repair ",
                     pool_, "'"));
  Result r = Tandem({"pool", "check", pool_});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.out, HasSubstr("problem: reference count page 0"));
  std::string out = Ok({"pool", "check", pool_, "--repair", "--data"});
  EXPECT_THAT(out, HasSubstr("rebuilt from the trees and written back"));
  EXPECT_THAT(out, HasSubstr("consistent"));
  EXPECT_THAT(Ok({"pool", "check", pool_, "--repair"}),
              HasSubstr("nothing to repair"));
  Ok({"write", "--pool", pool_, "v", "--offset", "4096"}, "again");
  EXPECT_THAT(Ok({"pool", "check", pool_, "--data"}), HasSubstr("consistent"));
}

// Deleting snapshots and volumes gives their space back to the file system
// the pool file is on (a full one can be mended that way).
TEST_P(CliTest, DeletingGivesTheSpaceBackToTheFileSystem) {
  if (GetParam()) GTEST_SKIP() << "the file variant covers this";
  {
    const std::string probe = dir_ + "/probe";
    testing_util::Spit(probe, std::string(1 << 20, 'x'));
    int fd = open(probe.c_str(), O_RDWR);
    ASSERT_GE(fd, 0);
    const int rc =
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 1 << 20);
    close(fd);
    if (rc != 0) GTEST_SKIP() << "no hole punching on " << dir_;
  }
  auto allocated = [&] {
    struct stat st {};
    EXPECT_EQ(stat(pool_.c_str(), &st), 0);
    return static_cast<uint64_t>(st.st_blocks) * 512;
  };
  Ok({"pool", "create", pool_, "--size", "256M"});
  const uint64_t empty = allocated();
  Ok({"volume", "create", "--pool", pool_, "v", "--size", "32M"});
  Ok({"write", "--pool", pool_, "v"}, RandomBytes(32 << 20, 8));
  Ok({"snapshot", "create", "--pool", pool_, "v@s"});
  Ok({"write", "--pool", pool_, "v"}, RandomBytes(16 << 20, 9));
  const uint64_t full = allocated();
  EXPECT_GE(full, empty + (48 << 20));
  // The snapshot alone held 16 MiB.
  Ok({"snapshot", "delete", "--pool", pool_, "v@s"});
  EXPECT_LE(allocated(), full - (15 << 20));
  Ok({"volume", "delete", "--pool", pool_, "v"});
  EXPECT_LE(allocated(), empty + (1 << 20));
  EXPECT_THAT(Ok({"pool", "check", pool_, "--data"}), HasSubstr("consistent"));

  // A sparse pool larger than the space its file system has left: said.
  EXPECT_THAT(Ok({"pool", "create", dir_ + "/small", "--size", "64M"}),
              ::testing::Not(HasSubstr("note:")));
  struct statvfs fs {};
  ASSERT_EQ(statvfs(dir_.c_str(), &fs), 0);
  const uint64_t too_big = (uint64_t{fs.f_bavail} * fs.f_frsize / (1 << 30) + 8)
                           << 30;
  if (too_big < (uint64_t{8} << 40)) {  // within what ext4 files can be
    EXPECT_THAT(Ok({"pool", "create", dir_ + "/big", "--size",
                    absl::StrCat(too_big >> 30, "G")}),
                HasSubstr("note: its file system has"));
  }
}

TEST_P(CliTest, WhatIsNotAPoolIsNamed) {
  if (GetParam()) GTEST_SKIP() << "the file variant covers this";
  // A FIFO is refused at once (opening it would wait for a writer).
  const std::string fifo = dir_ + "/fifo";
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0);
  Fails({"volume", "list", "--pool", fifo},
        fifo + " is a FIFO, not a pool: name a regular file or a block device");
  Fails({"pool", "create", fifo}, fifo + " is a FIFO, not a pool");
  Fails({"pool", "info", dir_}, dir_ + " is a directory, not a pool");
  // A pool file cut one MiB short: said so, with the size it needs; given
  // back its size, it opens with everything in it.
  Ok({"pool", "create", pool_, "--size", "64M"});
  Ok({"volume", "create", "--pool", pool_, "v", "--size", "1M"});
  ASSERT_EQ(truncate(pool_.c_str(), 63 << 20), 0);
  Fails({"volume", "list", "--pool", pool_},
        pool_ +
            " is 66060288 bytes but its pool is 67108864: the file was "
            "truncated or the device shrank; give it back its size (a "
            "file: truncate -s 67108864) and open it again");
  ASSERT_EQ(truncate(pool_.c_str(), 64 << 20), 0);
  EXPECT_THAT(Ok({"volume", "list", "--pool", pool_}), HasSubstr("v"));
}

TEST_P(CliTest, DeltaFilesBetweenTwoPoolsAndAnImage) {
  if (GetParam()) GTEST_SKIP() << "the file variant covers this";
  std::string a = dir_ + "/a.img", b = dir_ + "/b.img";
  Ok({"pool", "create", a, "--size", "256M"});
  Ok({"pool", "create", b, "--size", "256M"});
  Ok({"volume", "create", "--pool", a, "v", "--size", "8M"});
  std::string first = RandomBytes(3 << 20, 11);
  Ok({"write", "--pool", a, "v"}, first);
  Ok({"snapshot", "create", "--pool", a, "v@one"});
  Ok({"write", "--pool", a, "v", "--offset", "5000000"},
     RandomBytes(300000, 12));
  Ok({"trim", "--pool", a, "v", "--offset", "0", "--length", "1M"});
  Ok({"snapshot", "create", "--pool", a, "v@two"});
  auto delta = [&](std::vector<std::string> args) {
    args.insert(args.begin(), TANDEM_DELTA_BIN);
    return Exec(args);
  };
  std::string full = dir_ + "/full.tdd", inc = dir_ + "/inc.tdd";
  Result r = delta({"create", "--pool", a, "v@one", "-o", full});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.err, HasSubstr("delta full v@one"));
  r = delta({"create", "--pool", a, "v@two", "--base", "one", "-o", inc});
  ASSERT_EQ(r.code, 0) << r.err;
  r = delta({"verify", inc});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("intact (incremental delta of v@two"));
  r = delta({"inspect", inc, "--json"});
  ASSERT_EQ(r.code, 0) << r.err;
  json j = json::parse(r.out);
  EXPECT_EQ(j["header"]["base"], "one");
  EXPECT_EQ(j["header"]["target"], "two");
  EXPECT_EQ(j["header"]["target_root_digest"],
            std::string(absl::StripTrailingAsciiWhitespace(
                Ok({"digest", "--pool", a, "v@two"}))));
  bool saw_unmap = false;
  for (const auto& rec : j["records"]) saw_unmap |= rec["type"] == "UNMAP";
  EXPECT_TRUE(saw_unmap);

  // Apply both to the second pool, and to a raw image.
  r = delta({"apply", full, "--pool", b, "v"});
  ASSERT_EQ(r.code, 0) << r.err;
  r = delta({"apply", inc, "--pool", b, "v"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.err, HasSubstr("applied v@two"));
  EXPECT_EQ(Ok({"digest", "--pool", b, "v@two"}),
            Ok({"digest", "--pool", a, "v@two"}));
  EXPECT_EQ(Ok({"read", "--pool", b, "v"}), Ok({"read", "--pool", a, "v@two"}));
  std::string image = dir_ + "/image.raw";
  testing_util::Spit(image,
                     RandomBytes(8 << 20, 13));  // garbage a full delta clears
  ASSERT_EQ(delta({"apply", full, "--image", image}).code, 0);
  ASSERT_EQ(delta({"apply", inc, "--image", image}).code, 0);
  EXPECT_EQ(testing_util::Slurp(image), Ok({"read", "--pool", a, "v@two"}));

  // Applied again, the image holds the target already.
  r = delta({"apply", inc, "--image", image});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.err, HasSubstr("already holds v@two: nothing written"));

  // Refusals: an image that does not hold the base; the pool already has
  // it; a corrupt file; not a delta at all.
  testing_util::Spit(image, RandomBytes(8 << 20, 14));
  r = delta({"apply", inc, "--image", image});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err,
              HasSubstr("does not hold the delta's base snapshot 'one'"));
  r = delta({"apply", inc, "--pool", b, "v"});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, HasSubstr("delta base is snapshot 'one'"));
  std::string bytes = testing_util::Slurp(inc);
  bytes[bytes.size() / 2] ^= 4;
  testing_util::Spit(dir_ + "/bad.tdd", bytes);
  r = delta({"verify", dir_ + "/bad.tdd"});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, HasSubstr("tandem-delta: delta segment"));
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1);
  r = delta({"verify", a});
  EXPECT_THAT(r.err, HasSubstr("not a Tandem delta stream"));
  // A refused apply commits nothing: no volume, the same generation.
  auto generation = [&] {
    return json::parse(Ok({"pool", "info", b, "--json"}))["generation"];
  };
  const json before = generation();
  const std::string volumes = Ok({"volume", "list", "--pool", b});
  testing_util::Spit(dir_ + "/cut.tdd",
                     testing_util::Slurp(full).substr(0, 2 << 20));
  bytes = testing_util::Slurp(full);
  bytes[bytes.size() - 100] ^= 1;
  testing_util::Spit(dir_ + "/flip.tdd", bytes);
  for (const char* bad : {"/cut.tdd", "/flip.tdd"}) {
    r = delta({"apply", dir_ + bad, "--pool", b, "w"});
    EXPECT_EQ(r.code, 1) << bad;
    EXPECT_EQ(generation(), before) << bad << ": " << r.err;
  }
  EXPECT_EQ(Ok({"volume", "list", "--pool", b}), volumes);
  r = delta({"create", "--pool", a, "v@nope", "-o", dir_ + "/x.tdd"});
  EXPECT_THAT(r.err, HasSubstr("no snapshot 'v@nope'"));
  EXPECT_NE(access((dir_ + "/x.tdd").c_str(), F_OK), 0);
  EXPECT_NE(access((dir_ + "/x.tdd.partial").c_str(), F_OK), 0);

  // -o naming something that is not a regular file (a FIFO here, /dev/null
  // in real life) writes into it and leaves the node in place.
  std::string fifo = dir_ + "/pipe";
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0);
  std::string keep = fifo + "-link";  // reaches the FIFO even if replaced
  ASSERT_EQ(link(fifo.c_str(), keep.c_str()), 0);
  std::string piped;
  std::thread reader([&] { piped = testing_util::Slurp(fifo); });
  r = delta({"create", "--pool", a, "v@two", "--base", "one", "-o", fifo});
  // Had the tool not opened the FIFO, the reader would wait forever.
  if (int fd = open(keep.c_str(), O_WRONLY | O_NONBLOCK); fd >= 0) close(fd);
  reader.join();
  EXPECT_EQ(r.code, 0) << r.err;
  struct stat st;
  ASSERT_EQ(stat(fifo.c_str(), &st), 0);
  EXPECT_TRUE(S_ISFIFO(st.st_mode));
  EXPECT_NE(access((fifo + ".partial").c_str(), F_OK), 0);
  EXPECT_EQ(piped.size(), testing_util::Slurp(inc).size());
  testing_util::Spit(dir_ + "/piped.tdd", piped);
  EXPECT_EQ(delta({"verify", dir_ + "/piped.tdd"}).code, 0);
  EXPECT_THAT(Ok({"pool", "check", b, "--data"}), HasSubstr("consistent"));

  // --snapshot takes the target now and sends it: applied, b holds what a
  // holds. A base that is not there takes no snapshot; a target that is
  // there already is refused.
  const std::string third = RandomBytes(200000, 15);
  Ok({"write", "--pool", a, "v", "--offset", "1000000"}, third);
  r = delta({"create", "--pool", a, "v@three", "--base", "nope", "--snapshot",
             "-o", dir_ + "/x.tdd"});
  EXPECT_EQ(r.code, 1);
  EXPECT_EQ(r.err, "tandem-delta: no snapshot 'v@nope' in pool " + a + "\n");
  EXPECT_THAT(Ok({"snapshot", "list", "--pool", a, "v"}),
              ::testing::Not(HasSubstr("three")));
  std::string snap_inc = dir_ + "/three.tdd";
  r = delta({"create", "--pool", a, "v@three", "--base", "two", "--snapshot",
             "-o", snap_inc});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.err, HasSubstr("delta v@two..v@three"));
  r = delta({"apply", snap_inc, "--pool", b, "v"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(Ok({"digest", "--pool", b, "v@three"}),
            Ok({"digest", "--pool", a, "v@three"}));
  EXPECT_EQ(Ok({"read", "--pool", b, "v@three"}).substr(1000000, 200000),
            third);
  r = delta(
      {"create", "--pool", a, "v@three", "--snapshot", "-o", dir_ + "/x.tdd"});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, HasSubstr("'v@three' already exists"));
  EXPECT_NE(access((dir_ + "/x.tdd").c_str(), F_OK), 0);
  // A send that fails after the snapshot keeps it, and says so.
  r = delta({"create", "--pool", a, "v@four", "--base", "three", "--snapshot",
             "-o", dir_ + "/no-such-folder/x.tdd"});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, HasSubstr("; snapshot 'v@four' was taken: send it with "
                               "the same command without --snapshot\n"));
  EXPECT_THAT(Ok({"snapshot", "list", "--pool", a, "v"}), HasSubstr("four"));
  r = delta({"create", "--pool", a, "v@four", "--base", "three", "-o",
             dir_ + "/four.tdd"});
  EXPECT_EQ(r.code, 0) << r.err;
}

TEST_P(CliTest, RelationshipProcedureAndStatus) {
  if (GetParam()) GTEST_SKIP() << "the file variant covers this";
  std::string a = dir_ + "/a.img", b = dir_ + "/b.img";
  std::string src = a + ":v", dst = b + ":v";
  Ok({"pool", "create", a, "--size", "256M"});
  Ok({"pool", "create", b, "--size", "256M"});
  Ok({"volume", "create", "--pool", a, "v", "--size", "8M"});
  Ok({"write", "--pool", a, "v"}, RandomBytes(4 << 20, 21));
  EXPECT_THAT(Ok({"relationship", "create", "--source", src, "--destination",
                  dst, "--schedule", "10m"}),
              HasSubstr("(schedule 10m); Uninitialized, Idle"));
  Fails({"relationship", "break", dst}, "mirror state is Uninitialized");
  Fails({"relationship", "create", "--source", src, "--destination",
         dir_ + "/nope.img:v"},
        "no pool file or device before any ':'");
  Fails({"relationship", "create", "--source", a + ":w", "--destination",
         b + ":w", "--schedule", "sometimes"},
        "bad schedule 'sometimes'");
  EXPECT_THAT(Ok({"relationship", "initialize", src}),
              HasSubstr("4 MiB of data, 1 snapshot(s))"));
  Fails({"write", "--pool", b, "v"}, "is read-only");
  Fails({"volume", "delete", "--pool", a, "v", "--recursive"},
        "is in a replication relationship");

  Ok({"write", "--pool", a, "v", "--offset", "1M"}, RandomBytes(65536, 22));
  Ok({"snapshot", "create", "--pool", a, "v@mine"});
  Ok({"relationship", "update", dst});
  EXPECT_EQ(Ok({"read", "--pool", b, "v"}), Ok({"read", "--pool", a, "v"}));
  EXPECT_EQ(Ok({"digest", "--pool", b, "v@mine"}),
            Ok({"digest", "--pool", a, "v@mine"}));

  json j = json::parse(Ok({"status", src, "--json"}));
  ASSERT_EQ(j.size(), 1u);
  EXPECT_THAT(j[0]["source"].get<std::string>(), HasSubstr("/a.img:v"));
  for (const char* key :
       {"source", "destination", "mirror_state", "relationship_status",
        "healthy", "unhealthy_reason", "lag_seconds", "last_transfer_bytes",
        "last_transfer_seconds", "last_transfer_error", "progress_bytes",
        "progress_total_bytes", "total_transfer_bytes",
        "last_common_snapshot"}) {
    EXPECT_TRUE(j[0].contains(key)) << key;
  }
  EXPECT_EQ(j[0]["mirror_state"], "Mirrored");
  EXPECT_EQ(j[0]["relationship_status"], "Idle");
  EXPECT_EQ(j[0]["healthy"], true);
  EXPECT_THAT(j[0]["destination"].get<std::string>(), HasSubstr("/b.img:v"));
  EXPECT_EQ(j[0]["progress_bytes"], j[0]["progress_total_bytes"]);
  std::string common = j[0]["last_common_snapshot"];
  Fails({"snapshot", "delete", "--pool", b, "v@" + common},
        "is in a replication relationship");

  // Disaster: break, write on the destination, then resync back: refused
  // without a terminal or --yes, and what it would overwrite is shown.
  // Break asks first, as the seed's "Type Yes": refused without a terminal.
  Result refused = Tandem({"relationship", "break", dst});
  EXPECT_EQ(refused.code, 1);
  EXPECT_THAT(refused.out, HasSubstr("becomes read-write"));
  EXPECT_THAT(refused.err,
              HasSubstr("no terminal to confirm on: rerun with --yes"));
  EXPECT_EQ(json::parse(Ok({"status", dst, "--json"}))[0]["mirror_state"],
            "Mirrored");
  EXPECT_THAT(Ok({"relationship", "break", dst, "--yes"}),
              HasSubstr("Broken, Idle"));
  Ok({"write", "--pool", b, "v", "--offset", "2M"}, RandomBytes(131072, 23));
  Result r = Tandem({"relationship", "resync", dst});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.out, HasSubstr("128 KiB (131072 bytes in 2 chunks) written "
                               "there since will be overwritten"));
  EXPECT_THAT(r.err, HasSubstr("no terminal to confirm on: rerun with --yes"));
  json st = json::parse(Ok({"status", "--pool", b, "--json"}));
  EXPECT_EQ(st[0]["mirror_state"], "Broken");
  EXPECT_EQ(st[0]["healthy"], false);
  EXPECT_THAT(Ok({"relationship", "reverse-resync", src, "--yes"}),
              HasSubstr("Mirrored, Idle"));
  EXPECT_EQ(Ok({"read", "--pool", a, "v"}), Ok({"read", "--pool", b, "v"}));
  st = json::parse(Ok({"status", src, "--json"}));
  EXPECT_THAT(st[0]["source"].get<std::string>(), HasSubstr("/b.img:v"));
  Fails({"write", "--pool", a, "v"}, "is read-only");
  EXPECT_THAT(Ok({"relationship", "reestablish", src, "--yes"}),
              HasSubstr("Mirrored, Idle"));
  st = json::parse(Ok({"status", src, "--json"}));
  EXPECT_THAT(st[0]["source"].get<std::string>(), HasSubstr("/a.img:v"));
  EXPECT_THAT(Ok({"status", src}),
              HasSubstr("mirror state           Mirrored"));
  EXPECT_THAT(Ok({"relationship", "release", dst}), HasSubstr("released"));
  EXPECT_THAT(Ok({"status", "--pool", a}), HasSubstr("no relationships"));
  Ok({"write", "--pool", b, "v"}, RandomBytes(4096, 24));
  for (const std::string& pool : {a, b}) {
    EXPECT_THAT(Ok({"pool", "check", pool, "--data"}), HasSubstr("consistent"));
  }
}

TEST_P(CliTest, DemoRunsTheDrill) {
  if (GetParam()) GTEST_SKIP() << "the file variant covers this";
  // Through two tandemd processes (the default), and in one process.
  for (bool local : {false, true}) {
    std::vector<std::string> args = {
        "demo", dir_ + (local ? "/local" : "/daemons"), "--size", "8M"};
    if (local) args.push_back("--local");
    Result r = Tandem(args);
    EXPECT_EQ(r.code, 0) << r.out << r.err;
    EXPECT_THAT(r.out, HasSubstr("demo: all checks passed"));
    EXPECT_THAT(r.out, HasSubstr("break refused while Transferring"));
    EXPECT_EQ(r.out.find("FAIL"), std::string::npos) << r.out;
    if (!local) {
      EXPECT_THAT(r.out, HasSubstr("site a's daemon is gone (kill -9)"));
      EXPECT_THAT(r.out, HasSubstr("both exit 0"));
      // The seed's mount steps: each site's NBD export in its mode.
      EXPECT_THAT(r.out, HasSubstr("site b's volume is served read-only"));
      EXPECT_THAT(r.out, HasSubstr("site b's volume is served read-write"));
      EXPECT_THAT(r.out, HasSubstr("site a's volume is served read-only"));
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Backends, CliTest, ::testing::Values(false, true),
                         [](const auto& info) {
                           return info.param ? "LoopDevice" : "File";
                         });

}  // namespace
