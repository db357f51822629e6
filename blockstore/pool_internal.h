// Helpers shared by the pool's translation units; not part of its API.
#ifndef TANDEM_BLOCKSTORE_POOL_INTERNAL_H_
#define TANDEM_BLOCKSTORE_POOL_INTERNAL_H_

#include <cstdint>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "blockstore/format.h"

namespace blockstore::internal {

inline constexpr uint64_t kMaxVolumeBytes = uint64_t{1} << 60;

int64_t NowNs();
Guid RandomGuid();  // RFC 4122 version 4
// InvalidArgument naming `what` unless `name` is 1-200 of [A-Za-z0-9._:-],
// not starting with '.' or '-'.
absl::Status ValidName(absl::string_view name, absl::string_view what);
// A receive's staging volume (hidden: its name starts with '.').
inline bool IsStaging(absl::string_view volume) {
  return !volume.empty() && volume[0] == '.';
}

}  // namespace blockstore::internal

#endif  // TANDEM_BLOCKSTORE_POOL_INTERNAL_H_
