// The pool commands of `tandem` (pool info|check, volume, snapshot,
// rollback, read, write, trim, digest) as operations with JSON results, so
// that the same code serves a pool file opened here and a pool a daemon
// owns (its control API runs exactly these, and the CLI prints their
// results the same way either way).
#ifndef TANDEM_TOOLS_POOL_OPS_H_
#define TANDEM_TOOLS_POOL_OPS_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "blockstore/pool.h"
#include "engine/stream.h"
#include "nlohmann/json.hpp"

namespace tools {

using ordered_json = nlohmann::ordered_json;

ordered_json VolumeJson(const blockstore::VolumeInfo& v);
ordered_json SnapshotJson(const blockstore::SnapshotInfo& s);
ordered_json PoolInfoJson(const blockstore::PoolInfo& i);

class PoolOps {
 public:
  virtual ~PoolOps() = default;
  virtual absl::StatusOr<ordered_json> Info() = 0;
  // {"notes": [...], "problems": [...], "nodes_checked", "chunks_checked"}
  virtual absl::StatusOr<ordered_json> Check(bool data) = 0;
  virtual absl::StatusOr<ordered_json> ListVolumes() = 0;
  virtual absl::Status CreateVolume(const std::string& name,
                                    uint64_t size_bytes) = 0;
  virtual absl::Status ResizeVolume(const std::string& name,
                                    uint64_t size_bytes) = 0;
  // Refused for a volume in a replication relationship.
  virtual absl::Status DeleteVolume(const std::string& name,
                                    bool recursive) = 0;
  virtual absl::StatusOr<ordered_json> CreateSnapshot(
      const std::string& volume, const std::string& name) = 0;
  virtual absl::StatusOr<ordered_json> ListSnapshots(
      const std::string& volume) = 0;
  // Refused for a replication snapshot of a related volume.
  virtual absl::Status DeleteSnapshot(const std::string& volume,
                                      const std::string& name) = 0;
  virtual absl::Status Rollback(const std::string& volume,
                                const std::string& snapshot) = 0;
  // Root digest, hex.
  virtual absl::StatusOr<std::string> Digest(const std::string& volume,
                                             const std::string& snapshot) = 0;
  virtual absl::Status Trim(const std::string& volume, uint64_t offset_bytes,
                            uint64_t length_bytes) = 0;
  // Writes what `in` yields at `offset_bytes`, committed on success (on
  // error nothing is); `size_hint` (0: unknown) lets a write that cannot
  // fit be refused before anything is written.
  virtual absl::Status Write(const std::string& volume, uint64_t offset_bytes,
                             uint64_t size_hint, engine::ByteSource& in) = 0;
  // Writes `length_bytes` (nullopt: to the end) of the volume or snapshot
  // from `offset_bytes` to `out`.
  virtual absl::Status Read(const std::string& volume,
                            const std::string& snapshot, uint64_t offset_bytes,
                            std::optional<uint64_t> length_bytes,
                            engine::ByteSink& out) = 0;
  // The size a Read of these arguments will send, or its error (checked
  // before any byte is sent, so a refused read is one clean error).
  virtual absl::StatusOr<uint64_t> ReadLength(
      const std::string& volume, const std::string& snapshot,
      uint64_t offset_bytes, std::optional<uint64_t> length_bytes) = 0;
};

// Over a pool this process holds; `pool` must outlive it.
std::unique_ptr<PoolOps> PoolOpsOver(blockstore::Pool& pool);
// Opens the pool file or device at `path` (locked) for the ops' lifetime.
absl::StatusOr<std::unique_ptr<PoolOps>> OpenPoolOps(const std::string& path,
                                                     blockstore::OpenMode mode);

// `tandem pool check --repair`: rebuilds the damaged reference counts of the
// pool at `path` from its trees and commits them (Pool::Repair). `what` says
// what was done ("" when nothing needed it); `ops` work on the pool.
struct RepairedPool {
  std::string what;
  std::unique_ptr<PoolOps> ops;
};
absl::StatusOr<RepairedPool> RepairPoolFile(const std::string& path);

}  // namespace tools

#endif  // TANDEM_TOOLS_POOL_OPS_H_
