// The catalog: the pool's list of volumes and their snapshots, and the
// pool's properties, as records in memory and as the bytes a commit writes
// into its chain of catalog nodes (the layout is in format.h).
//
// Not thread-safe: the pool's lock guards the Catalog it keeps.
#ifndef TANDEM_BLOCKSTORE_CATALOG_H_
#define TANDEM_BLOCKSTORE_CATALOG_H_

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "blockstore/format.h"

namespace blockstore {

inline constexpr size_t kMaxPropertyKeyBytes = 200;
inline constexpr size_t kMaxPropertyValueBytes = 60000;
inline constexpr size_t kMaxSnapshotOwnerBytes = 64;

struct CatalogSnapshot {
  std::string name;
  Guid guid{};
  int64_t create_time_ns = 0;
  uint64_t generation = 0;
  uint64_t size_bytes = 0;
  Entry root;
  std::string owner;
};

struct CatalogVolume {
  std::string name;
  Guid guid{};
  int64_t create_time_ns = 0;
  uint64_t size_bytes = 0;
  Entry root;                              // digest valid after a commit
  std::vector<CatalogSnapshot> snapshots;  // in creation order
  bool read_only = false;
};

struct Catalog {
  std::map<std::string, CatalogVolume, std::less<>> volumes;
  std::map<std::string, std::string, std::less<>> properties;
};

// The catalog's bytes (the current version, 3).
std::string SerializeCatalog(const Catalog& catalog);

// Parses `bytes` (versions 1 to 3; empty = an empty catalog) into `out`,
// which must be empty. DataLoss "malformed (WHAT)" if the bytes are not a
// catalog, or if a root does not satisfy `root_ok` (a node id outside the
// pool's metadata area) or a size is beyond `max_volume_bytes`.
absl::Status ParseCatalog(absl::string_view bytes,
                          const std::function<bool(const Entry&)>& root_ok,
                          uint64_t max_volume_bytes, Catalog& out);

}  // namespace blockstore

#endif  // TANDEM_BLOCKSTORE_CATALOG_H_
