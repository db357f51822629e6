// The `tandem` side of a daemon's control API (docs/control-api.md): HTTP
// and JSON over the daemon's Unix socket, one request per command.
#ifndef TANDEM_TOOLS_CONTROL_CLIENT_H_
#define TANDEM_TOOLS_CONTROL_CLIENT_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "engine/stream.h"
#include "nlohmann/json.hpp"
#include "tools/pool_ops.h"
#include "tools/relationship_cli.h"

namespace tools {

class UnixHttpClient;

class ControlClient {
 public:
  // The daemon at `socket` (not contacted yet).
  explicit ControlClient(std::string socket);
  ~ControlClient();

  // A JSON request (GET without a body, DELETE, POST with one); the reply's
  // JSON, or the daemon's error as a Status. `http` gets the HTTP status.
  absl::StatusOr<ordered_json> Call(const std::string& method,
                                    const std::string& path,
                                    const ordered_json& body = nullptr,
                                    int* http = nullptr);
  // Streams `in` as the body of a PUT (`size` bytes, or chunked when 0).
  absl::Status Upload(const std::string& path, engine::ByteSource& in,
                      uint64_t size);
  // Streams a GET's body into `out`.
  absl::Status Download(const std::string& path, engine::ByteSink& out);

  const std::string& socket() const { return socket_; }
  // The JSON body of the last Call's answer, errors included.
  const ordered_json& last_reply() const { return last_reply_; }

 private:
  ordered_json last_reply_;
  absl::Status Unreachable() const;
  std::unique_ptr<UnixHttpClient> http_;
  const std::string socket_;
};

std::unique_ptr<RelationshipBackend> DaemonRelationships(ControlClient& c);
std::unique_ptr<PoolOps> DaemonPoolOps(ControlClient& c, std::string pool);

// Escapes one path segment or query value.
std::string UrlEncode(const std::string& text);

}  // namespace tools

#endif  // TANDEM_TOOLS_CONTROL_CLIENT_H_
