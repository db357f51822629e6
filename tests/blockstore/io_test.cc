// One typed suite that every Io backend passes.
#include "blockstore/io.h"

#include <fcntl.h>
#include <liburing.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/ascii.h"
#include "blockstore/mem_io.h"
#include "blockstore/util.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/process.h"

namespace blockstore {
namespace {

using ::testing::HasSubstr;

constexpr uint64_t kSize = 8 << 20;

std::string TempPath() {
  const char* tmp = std::getenv("TMPDIR");
  std::string path = std::string(tmp ? tmp : "/tmp") + "/tandem-io-XXXXXX";
  int fd = mkstemp(path.data());
  close(fd);
  return path;
}

bool UringAvailable() {
  io_uring ring;
  if (io_uring_queue_init(4, &ring, 0) != 0) return false;
  io_uring_queue_exit(&ring);
  return true;
}

struct MemBackend {
  static std::unique_ptr<Io> Make(std::string*) {
    return std::make_unique<MemIo>(kSize);
  }
};
template <bool kUring>
struct FileBackend {
  static std::unique_ptr<Io> Make(std::string* path) {
    *path = TempPath();
    FileIoOptions o;
    o.create_size_bytes = kSize;
    o.use_uring = kUring;
    absl::StatusOr<std::unique_ptr<Io>> io = OpenFileIo(*path, o);
    EXPECT_TRUE(io.ok()) << io.status();
    return io.ok() ? std::move(*io) : nullptr;
  }
};

template <typename B>
class IoTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (std::is_same_v<B, FileBackend<true>> && !UringAvailable()) {
      GTEST_SKIP() << "io_uring is not available here";
    }
    io_ = B::Make(&path_);
    ASSERT_NE(io_, nullptr);
  }
  void TearDown() override {
    io_.reset();
    if (!path_.empty()) unlink(path_.c_str());
  }
  std::unique_ptr<Io> io_;
  std::string path_;
};

using Backends =
    ::testing::Types<MemBackend, FileBackend<false>, FileBackend<true>>;
TYPED_TEST_SUITE(IoTest, Backends);

TYPED_TEST(IoTest, BatchedWritesReadBack) {
  EXPECT_EQ(this->io_->size_bytes(), kSize);
  AlignedBuffer a(3 * 4096), b(4096), c(1 << 20);
  std::memset(a.data(), 0xa1, a.size());
  std::memset(b.data(), 0xb2, b.size());
  for (size_t i = 0; i < c.size(); ++i) c.data()[i] = std::byte(i * 31);
  std::vector<WriteOp> ops = {
      {0, a.span()}, {8 * 4096, b.span()}, {kSize - c.size(), c.span()}};
  ASSERT_TRUE(this->io_->Write(ops).ok());
  ASSERT_TRUE(this->io_->Flush().ok());
  AlignedBuffer ra(3 * 4096), rb(4096), rc(1 << 20), hole(4096);
  std::vector<ReadOp> reads = {{0, ra.span()},
                               {8 * 4096, rb.span()},
                               {kSize - rc.size(), rc.span()},
                               {4 * 4096, hole.span()}};
  ASSERT_TRUE(this->io_->Read(reads).ok());
  EXPECT_EQ(std::memcmp(ra.data(), a.data(), a.size()), 0);
  EXPECT_EQ(std::memcmp(rb.data(), b.data(), b.size()), 0);
  EXPECT_EQ(std::memcmp(rc.data(), c.data(), c.size()), 0);
  EXPECT_TRUE(IsAllZero(hole.span()));
}

TYPED_TEST(IoTest, SaysWhetherItIsInAFileSystem) {
  // A regular file's blocks are allocated as they are first written (and a
  // flush commits that); memory has none (a block device: below).
  EXPECT_EQ(this->io_->in_file_system(), !this->path_.empty());
}

TYPED_TEST(IoTest, RejectsMisalignedAndOutOfRange) {
  AlignedBuffer buf(8192);
  absl::Status s = this->io_->ReadAt(100, buf.span().first(4096));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("not aligned"));
  s = this->io_->WriteAt(0, buf.span().subspan(1, 4096));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  s = this->io_->ReadAt(kSize - 4096, buf.span());
  EXPECT_EQ(s.code(), absl::StatusCode::kOutOfRange);
  EXPECT_THAT(std::string(s.message()), HasSubstr("past the end"));
}

TEST(MemIoTest, CrashForgetsUnflushedWritesAndTears) {
  MemIo io(1 << 20);
  AlignedBuffer one(4096), two(4096);
  std::memset(one.data(), 1, 4096);
  std::memset(two.data(), 2, 4096);
  ASSERT_TRUE(io.WriteAt(0, one.span()).ok());
  ASSERT_TRUE(io.Flush().ok());
  ASSERT_TRUE(io.WriteAt(0, two.span()).ok());
  ASSERT_TRUE(io.WriteAt(4096, two.span()).ok());
  EXPECT_EQ(io.pending_writes(), 2u);
  std::unique_ptr<MemIo> copy = io.Clone();
  io.Crash();
  EXPECT_EQ(io.Peek(0, 1)[0], std::byte{1});
  EXPECT_EQ(io.Peek(4096, 1)[0], std::byte{0});
  // Keep none whole, tear the first after 1024 bytes.
  copy->Crash(0, 1024);
  EXPECT_EQ(copy->Peek(1023, 1)[0], std::byte{2});
  EXPECT_EQ(copy->Peek(1024, 1)[0], std::byte{1});
  EXPECT_EQ(copy->Peek(4096, 1)[0], std::byte{0});
}

TEST(FileIoTest, ABlockDeviceIsNotInAFileSystem) {
  const std::string backing = TempPath();
  std::string dir = backing + ".d";  // losetup's output
  ASSERT_EQ(mkdir(dir.c_str(), 0700), 0);
  std::string loop;
  absl::Cleanup cleanup = [&] {
    if (!loop.empty()) testing_util::Exec(dir, {"/sbin/losetup", "-d", loop});
    std::filesystem::remove_all(dir);
    unlink(backing.c_str());
  };
  ASSERT_EQ(truncate(backing.c_str(), kSize), 0);
  testing_util::Result r =
      testing_util::Exec(dir, {"/sbin/losetup", "--find", "--show", backing});
  if (r.code != 0)
    GTEST_SKIP() << "no loop device here (root needed): " << r.err;
  loop = std::string(absl::StripAsciiWhitespace(r.out));
  absl::StatusOr<std::unique_ptr<Io>> io = OpenFileIo(loop, FileIoOptions());
  ASSERT_TRUE(io.ok()) << io.status();
  EXPECT_FALSE((*io)->in_file_system());
  EXPECT_EQ((*io)->size_bytes(), kSize);
}

TEST(FileIoTest, SecondWriterIsToldWhoHoldsThePool) {
  std::string path = TempPath();
  FileIoOptions o;
  o.create_size_bytes = kSize;
  absl::StatusOr<std::unique_ptr<Io>> first = OpenFileIo(path, o);
  ASSERT_TRUE(first.ok());
  // POSIX record locks are per process: the conflict is seen from a child.
  pid_t child = fork();
  if (child == 0) {
    absl::StatusOr<std::unique_ptr<Io>> second = OpenFileIo(path, o);
    bool ok = !second.ok() &&
              second.status().code() == absl::StatusCode::kFailedPrecondition &&
              std::string(second.status().message())
                      .find("in use by process " + std::to_string(getppid())) !=
                  std::string::npos;
    _exit(ok ? 0 : 1);
  }
  int status = 0;
  waitpid(child, &status, 0);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  first->reset();
  unlink(path.c_str());
}

TEST(FileIoTest, MissingFileIsNotFound) {
  FileIoOptions o;
  absl::StatusOr<std::unique_ptr<Io>> io =
      OpenFileIo("/nonexistent-dir/pool.img", o);
  EXPECT_EQ(io.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(io.status().message()), HasSubstr("no such file"));
}

}  // namespace
}  // namespace blockstore
