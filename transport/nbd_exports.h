// tandemd's NBD exports (transport/nbd_server.h): every volume of every
// pool as POOL/VOLUME, read-write unless the volume is read-only (a mirror
// destination: writes get EPERM), and every snapshot as the read-only
// POOL/VOLUME@SNAPSHOT. Hidden volumes (a receive's staging, names starting
// with '.') are not exported.
#ifndef TANDEM_TRANSPORT_NBD_EXPORTS_H_
#define TANDEM_TRANSPORT_NBD_EXPORTS_H_

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "blockstore/pool.h"
#include "transport/nbd_server.h"

namespace transport {

class PoolExports final : public NbdExports {
 public:
  // Pools by name; they outlive this.
  explicit PoolExports(std::map<std::string, blockstore::Pool*> pools)
      : pools_(std::move(pools)) {}
  std::vector<Listed> List() override;
  absl::StatusOr<std::shared_ptr<NbdExport>> Open(
      const std::string& name) override;

 private:
  const std::map<std::string, blockstore::Pool*> pools_;
};

}  // namespace transport

#endif  // TANDEM_TRANSPORT_NBD_EXPORTS_H_
