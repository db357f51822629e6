// `tandem-delta apply --image` as users run it: onto a raw file that does not
// exist yet, through resizes to sizes that are not 4 KiB multiples, onto a
// loop device (a stand-in for a block device), killed part way and run
// again; each step checked byte for byte and with `qemu-img compare -s`.
#include <fcntl.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/process.h"

namespace {

using ::testing::AnyOf;
using ::testing::HasSubstr;
using testing_util::RandomBytes;
using testing_util::Result;
using testing_util::Slurp;
using testing_util::Spit;

// The source volume's snapshots: s0 (full), then s1 grown, s2 shrunk and
// trimmed, s3 grown again with chunks written as zeros; no size a 4 KiB
// multiple.
constexpr uint64_t kSizes[] = {10498105, 13000001, 7000003, 9437187};

class ImageTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* tmp = std::getenv("TMPDIR");
    dir_ = absl::StrCat(tmp ? tmp : "/tmp", "/tandem-image-XXXXXX");
    ASSERT_NE(mkdtemp(dir_.data()), nullptr);
    pool_ = dir_ + "/a.pool";
    Ok({"pool", "create", pool_, "--size", "256M"});
    Ok({"volume", "create", "--pool", pool_, "v", "--size",
        absl::StrCat(kSizes[0])});
    Ok({"write", "--pool", pool_, "v"}, RandomBytes(6'000'000, 1));
    Ok({"write", "--pool", pool_, "v", "--offset", "9000000"},
       RandomBytes(1'498'105, 2));
    Ok({"snapshot", "create", "--pool", pool_, "v@s0"});
    Ok({"write", "--pool", pool_, "v", "--offset", "3000000"},
       RandomBytes(100'000, 3));
    Ok({"volume", "resize", "--pool", pool_, "v", "--size",
        absl::StrCat(kSizes[1])});
    Ok({"write", "--pool", pool_, "v", "--offset", "12990000"},
       RandomBytes(10'001, 4));
    Ok({"snapshot", "create", "--pool", pool_, "v@s1"});
    Ok({"trim", "--pool", pool_, "v", "--offset", "1048576", "--length", "1M"});
    Ok({"volume", "resize", "--pool", pool_, "v", "--size",
        absl::StrCat(kSizes[2])});
    Ok({"snapshot", "create", "--pool", pool_, "v@s2"});
    Ok({"volume", "resize", "--pool", pool_, "v", "--size",
        absl::StrCat(kSizes[3])});
    Ok({"write", "--pool", pool_, "v", "--offset", "0"},
       std::string(200'000, '\0'));
    Ok({"write", "--pool", pool_, "v", "--offset", "8000000"},
       RandomBytes(1'000'000, 5));
    Ok({"snapshot", "create", "--pool", pool_, "v@s3"});
    for (int i = 0; i < 4; ++i) {
      deltas_.push_back(absl::StrCat(dir_, "/d", i, ".tdd"));
      std::vector<std::string> args = {"create", "--pool",
                                       pool_,    absl::StrCat("v@s", i),
                                       "-o",     deltas_.back()};
      if (i > 0) args.insert(args.end(), {"--base", absl::StrCat("s", i - 1)});
      Result r = Delta(args);
      ASSERT_EQ(r.code, 0) << r.err;
      // The snapshot as `tandem read` writes it into a new file.
      expected_.push_back(absl::StrCat(dir_, "/s", i, ".raw"));
      r = Exec({"/bin/sh", "-c",
                absl::StrCat(TANDEM_BIN, " read --pool ", pool_, " v@s", i,
                             " > ", expected_.back())});
      ASSERT_EQ(r.code, 0) << r.err;
      ASSERT_EQ(Slurp(expected_.back()).size(), kSizes[i]);
    }
  }

  void TearDown() override {
    if (!loop_.empty()) Exec({"/sbin/losetup", "-d", loop_});
    Exec({"/bin/rm", "-rf", dir_});
  }

  Result Exec(const std::vector<std::string>& argv,
              const std::string& input = "") {
    return testing_util::Exec(dir_, argv, input);
  }
  Result Delta(std::vector<std::string> args) {
    args.insert(args.begin(), TANDEM_DELTA_BIN);
    return Exec(args);
  }
  void Ok(std::vector<std::string> args, const std::string& input = "") {
    args.insert(args.begin(), TANDEM_BIN);
    Result r = Exec(args, input);
    ASSERT_EQ(r.code, 0) << absl::StrJoin(args, " ") << ": " << r.err;
  }

  // A loop device over a new file of `size` bytes filled with a pattern;
  // empty (and the test skipped by the caller) where there are none.
  std::string Loop(uint64_t size) {
    std::string backing = dir_ + "/loop.img";
    Spit(backing, RandomBytes(size, 99));
    Result r = Exec({"/sbin/losetup", "--find", "--show", backing});
    if (r.code != 0 || r.out.empty()) return "";
    loop_ = std::string(absl::StripTrailingAsciiWhitespace(r.out));
    return loop_;
  }

  // Image content is snapshot i's: byte for byte, and (a file) to qemu-img.
  void ExpectHolds(const std::string& image, int i, bool file) {
    std::string got = Slurp(image);
    if (!file) got.resize(std::min<size_t>(got.size(), kSizes[i]));
    ASSERT_EQ(got.size(), kSizes[i]);
    EXPECT_TRUE(got == Slurp(expected_[i])) << image << " is not s" << i;
    if (file) {
      Result r = Exec({"/usr/bin/env", "qemu-img", "compare", "-s", "-f", "raw",
                       "-F", "raw", expected_[i], image});
      EXPECT_EQ(r.code, 0) << r.out << r.err;
      EXPECT_THAT(r.out, HasSubstr("Images are identical"));
    }
  }

  static int64_t ChangeTime(const std::string& path) {
    struct stat st {};
    stat(path.c_str(), &st);
    return int64_t{st.st_ctim.tv_sec} * 1'000'000'000 + st.st_ctim.tv_nsec;
  }

  std::string dir_, pool_, loop_;
  std::vector<std::string> deltas_, expected_;
};

TEST_F(ImageTest, FullThenIncrementalsOntoAFileThatDidNotExist) {
  const std::string image = dir_ + "/new.raw";
  for (int i = 0; i < 4; ++i) {
    SCOPED_TRACE(absl::StrCat("s", i));
    Result r = Delta({"apply", deltas_[i], "--image", image});
    ASSERT_EQ(r.code, 0) << r.err;
    EXPECT_THAT(r.err, HasSubstr(absl::StrCat("applied v@s", i, " to ")));
    // The record says what the image holds: an incremental reads at most
    // the chunk a resize cut, never the whole image.
    EXPECT_THAT(r.err, AnyOf(HasSubstr(" 0 B of the image read"),
                             HasSubstr(" 64 KiB of the image read")));
    ExpectHolds(image, i, true);
    // Again: the target is there already, nothing is written.
    const int64_t before = ChangeTime(image);
    r = Delta({"apply", deltas_[i], "--image", image});
    ASSERT_EQ(r.code, 0) << r.err;
    EXPECT_THAT(r.err, HasSubstr(absl::StrCat("already holds v@s", i,
                                              ": nothing written")));
    EXPECT_EQ(ChangeTime(image), before);
    ExpectHolds(image, i, true);
  }
  // An incremental whose base the image does not hold is refused, and an
  // incremental onto no image at all.
  Result r = Delta({"apply", deltas_[1], "--image", image});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, HasSubstr("does not hold the delta's base snapshot 's0'"));
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  r = Delta({"apply", deltas_[1], "--image", dir_ + "/none.raw"});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, HasSubstr("none.raw does not exist; an incremental delta "
                               "needs the image of its base 'v@s0'"));
  ExpectHolds(image, 3, true);
}

TEST_F(ImageTest, ARecordGoneStaleIsCheckedByReading) {
  const std::string image = dir_ + "/new.raw";
  ASSERT_EQ(Delta({"apply", deltas_[0], "--image", image}).code, 0);
  // Someone else writes one byte: the record no longer describes the image.
  std::string bytes = Slurp(image);
  const char saved = bytes[5000];
  {
    int fd = open(image.c_str(), O_WRONLY);
    ASSERT_GE(fd, 0);
    const char x = static_cast<char>(saved ^ 1);
    ASSERT_EQ(pwrite(fd, &x, 1, 5000), 1);
    close(fd);
  }
  Result r = Delta({"apply", deltas_[1], "--image", image});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, HasSubstr("does not hold the delta's base snapshot 's0' "
                               "(content digest "));
  {
    int fd = open(image.c_str(), O_WRONLY);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(pwrite(fd, &saved, 1, 5000), 1);
    close(fd);
  }
  // Put back, the image holds s0 again: found by reading all of it (and
  // the chunk s1's growth cuts).
  r = Delta({"apply", deltas_[1], "--image", image});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.err, HasSubstr("10.07 MiB of the image read"));
  ExpectHolds(image, 1, true);
  // --verify reads before and after, whatever the record says: s1 and s2,
  // and the chunk s2's shrink cuts.
  r = Delta({"apply", deltas_[2], "--image", image, "--verify"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.err, HasSubstr("19.14 MiB of the image read"));
  ExpectHolds(image, 2, true);
}

TEST_F(ImageTest, FullThenIncrementalsOntoALoopDevice) {
  const std::string loop = Loop(16 << 20);
  if (loop.empty()) GTEST_SKIP() << "no loop device here";
  // Without a record every incremental reads the device to check it; with
  // one (--state) it does not.
  for (const bool record : {false, true}) {
    SCOPED_TRACE(record ? "with --state" : "without a record");
    for (int i = 0; i < 4; ++i) {
      std::vector<std::string> args = {"apply", deltas_[i], "--image", loop};
      if (record) args.insert(args.end(), {"--state", dir_ + "/loop.state"});
      Result r = Delta(args);
      ASSERT_EQ(r.code, 0) << r.err;
      if (i > 0) {
        if (record) {
          EXPECT_THAT(r.err, AnyOf(HasSubstr(" 0 B of the image read"),
                                   HasSubstr(" 64 KiB of the image read")));
        } else {
          EXPECT_THAT(r.err, HasSubstr(" MiB of the image read"));
        }
      }
      ExpectHolds(loop, i, false);
    }
  }
}

TEST_F(ImageTest, ADeviceTooSmallIsRefusedBeforeAnythingIsWritten) {
  const std::string loop = Loop(12 << 20);
  if (loop.empty()) GTEST_SKIP() << "no loop device here";
  const std::string before = Slurp(loop);
  Result r = Delta({"apply", deltas_[0], "--image", loop});
  ASSERT_EQ(r.code, 0) << r.err;
  ExpectHolds(loop, 0, false);
  const std::string s0 = Slurp(loop);
  // s1 grows the volume past the device.
  r = Delta({"apply", deltas_[1], "--image", loop});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err,
              HasSubstr(absl::StrCat(
                  "image ", loop,
                  " has 12582912 bytes but snapshot 's1' of volume 'v' "
                  "needs 13000001; use a device of at least that size")));
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_TRUE(Slurp(loop) == s0) << "the device changed";
  EXPECT_FALSE(before == s0);
}

// Runs `tandem-delta apply - --image IMAGE` fed `delta` through a pipe and
// kills it (SIGKILL) once it has taken `upto` bytes of it.
void ApplyKilled(const std::string& delta, size_t upto,
                 const std::string& image) {
  int p[2];
  ASSERT_EQ(pipe(p), 0);
  const pid_t parent = getpid();
  pid_t pid = fork();
  if (pid == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(127);
    dup2(p[0], 0);
    close(p[1]);
    int null = open("/dev/null", O_WRONLY);
    dup2(null, 2);
    execl(TANDEM_DELTA_BIN, TANDEM_DELTA_BIN, "apply", "-", "--image",
          image.c_str(), "--checkpoint", "256K", nullptr);
    _exit(127);
  }
  close(p[0]);
  for (size_t done = 0; done < upto;) {
    ssize_t n = write(p[1], delta.data() + done, upto - done);
    if (n <= 0) break;  // it ended (refused) before taking it all
    done += static_cast<size_t>(n);
  }
  // Wait until it took all it was given, let it work on it a moment.
  for (int i = 0; i < 2000; ++i) {
    int unread = 0;
    if (ioctl(p[1], FIONREAD, &unread) != 0 || unread == 0) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(upto % 7));
  kill(pid, SIGKILL);
  int status = 0;
  waitpid(pid, &status, 0);
  close(p[1]);
}

TEST_F(ImageTest, AKilledApplyIsCompletedByRunningItAgain) {
  // 24 kill points: 12 through a full delta onto a new file, 12 through an
  // incremental that grows it.
  int resumed = 0;
  for (int which : {0, 1}) {
    const std::string delta = Slurp(deltas_[which]);
    for (int k = 0; k < 12; ++k) {
      SCOPED_TRACE(absl::StrCat("delta ", which, ", kill point ", k));
      const std::string image = absl::StrCat(dir_, "/kill", which, "-", k);
      if (which == 1) {
        ASSERT_EQ(Delta({"apply", deltas_[0], "--image", image}).code, 0);
      }
      const size_t upto = delta.size() * k / 12 + 4096 * (k % 3);
      ApplyKilled(delta, std::min(upto, delta.size()), image);
      Result r = Delta({"apply", deltas_[which], "--image", image});
      ASSERT_EQ(r.code, 0) << r.err;
      resumed += r.err.find("(resumed)") != std::string::npos;
      ExpectHolds(image, which, true);
      unlink(image.c_str());
      unlink((image + ".tandem-state").c_str());
    }
  }
  // Most kills land after the apply began writing: those runs resume.
  EXPECT_GE(resumed, 12);
}

}  // namespace
