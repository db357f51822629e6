// Running programs in tests: a child process with its stdin from a string
// and its stdout and stderr captured, and the file helpers around it.
#ifndef TANDEM_TESTS_TESTING_PROCESS_H_
#define TANDEM_TESTS_TESTING_PROCESS_H_

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"

namespace testing_util {

struct Result {
  int code = -1;
  std::string out, err;
};

inline std::string Slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

inline void Spit(const std::string& path, const std::string& data) {
  std::ofstream f(path, std::ios::binary);
  f << data;
}

// `n` pseudo-random bytes from `seed` (incompressible).
inline std::string RandomBytes(size_t n, uint64_t seed) {
  std::string s(n, '\0');
  std::mt19937_64 rng(seed);
  for (size_t i = 0; i < n; i += 8) {
    uint64_t v = rng();
    std::memcpy(s.data() + i, &v, std::min<size_t>(8, n - i));
  }
  return s;
}

// Runs argv to completion, stdin from `input`, with TANDEM_POOL and
// TANDEM_DAEMON unset and `env` ("NAME=value") set; scratch files in `dir`.
inline Result Exec(const std::string& dir, const std::vector<std::string>& argv,
                   const std::string& input = "",
                   const std::vector<std::string>& env = {}) {
  static std::atomic<int> serial{0};
  const std::string base = absl::StrCat(dir, "/exec", serial++);
  Spit(base + ".in", input);
  const pid_t parent = getpid();
  pid_t pid = fork();
  if (pid == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(127);
    int i = open((base + ".in").c_str(), O_RDONLY);
    int o = open((base + ".out").c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    int e = open((base + ".err").c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    dup2(i, 0);
    dup2(o, 1);
    dup2(e, 2);
    std::vector<char*> args;
    for (const std::string& a : argv)
      args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    unsetenv("TANDEM_POOL");
    unsetenv("TANDEM_DAEMON");
    for (const std::string& kv : env) putenv(const_cast<char*>(kv.c_str()));
    execv(args[0], args.data());
    _exit(127);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  Result r;
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : 128;
  r.out = Slurp(base + ".out");
  r.err = Slurp(base + ".err");
  for (const char* ext : {".in", ".out", ".err"}) unlink((base + ext).c_str());
  return r;
}

}  // namespace testing_util

#endif  // TANDEM_TESTS_TESTING_PROCESS_H_
