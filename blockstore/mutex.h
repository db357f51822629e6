// A mutex the compiler's thread-safety analysis can check (clang
// -Wthread-safety): std::mutex underneath, so ThreadSanitizer sees its
// ordering too (Debian's Abseil is not built for TSan, absl::Mutex would be
// opaque to it). Modelled on leveldb's port::Mutex.
//
//   Mutex mu_;
//   int n_ ABSL_GUARDED_BY(mu_);
//   void Add() { MutexLock lock(mu_); ++n_; }
//
// Condition variables: std::condition_variable_any waits on the Mutex
// itself (cv.wait(mu_, predicate) with a MutexLock held).
#ifndef TANDEM_BLOCKSTORE_MUTEX_H_
#define TANDEM_BLOCKSTORE_MUTEX_H_

#include <condition_variable>
#include <mutex>

#include "absl/base/thread_annotations.h"

namespace blockstore {

class ABSL_LOCKABLE Mutex {
 public:
  Mutex() = default;
  Mutex(const Mutex&) = delete;
  Mutex& operator=(const Mutex&) = delete;

  void lock() ABSL_EXCLUSIVE_LOCK_FUNCTION() { mu_.lock(); }
  void unlock() ABSL_UNLOCK_FUNCTION() { mu_.unlock(); }

 private:
  std::mutex mu_;
};

class ABSL_SCOPED_LOCKABLE MutexLock {
 public:
  explicit MutexLock(Mutex& mu) ABSL_EXCLUSIVE_LOCK_FUNCTION(mu) : mu_(mu) {
    mu_.lock();
  }
  ~MutexLock() ABSL_UNLOCK_FUNCTION() { mu_.unlock(); }
  MutexLock(const MutexLock&) = delete;
  MutexLock& operator=(const MutexLock&) = delete;

 private:
  Mutex& mu_;
};

using CondVar = std::condition_variable_any;

}  // namespace blockstore

#endif  // TANDEM_BLOCKSTORE_MUTEX_H_
