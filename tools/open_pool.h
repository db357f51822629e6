// Opening a pool file or device for the command-line tools.
#ifndef TANDEM_TOOLS_OPEN_POOL_H_
#define TANDEM_TOOLS_OPEN_POOL_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "blockstore/io.h"
#include "blockstore/pool.h"

namespace tools {

// The pool file or device at `path`, opened (and locked) for `mode`.
// InvalidArgument when no path was given (neither --pool nor TANDEM_POOL).
inline absl::StatusOr<std::unique_ptr<blockstore::Io>> OpenPoolIo(
    const std::string& path, blockstore::OpenMode mode) {
  if (path.empty()) {
    return absl::InvalidArgumentError(
        "no pool given: pass --pool PATH or set TANDEM_POOL");
  }
  blockstore::FileIoOptions options;
  options.mode = mode;
  return blockstore::OpenFileIo(path, options);
}

inline absl::StatusOr<std::unique_ptr<blockstore::Pool>> OpenPool(
    const std::string& path, blockstore::OpenMode mode) {
  absl::StatusOr<std::unique_ptr<blockstore::Io>> io = OpenPoolIo(path, mode);
  if (!io.ok()) return io.status();
  return blockstore::Pool::Open(std::move(*io), mode);
}

}  // namespace tools

#endif  // TANDEM_TOOLS_OPEN_POOL_H_
