// HTTP over a Unix socket with cpp-httplib (Debian's 0.11 has no AF_UNIX
// of its own): a server that serves an already listening socket, a client
// that connects to a socket path, and one mapping between absl::Status and
// HTTP/JSON errors for both ends of the daemon's control API.
#ifndef TANDEM_TOOLS_HTTP_UNIX_H_
#define TANDEM_TOOLS_HTTP_UNIX_H_

#include <string>

#include "absl/status/status.h"
#include "httplib.h"
#include "nlohmann/json.hpp"
#include "transport/socket.h"

namespace tools {

class UnixHttpServer : public httplib::Server {
 public:
  // Serves `listener` (from transport::ListenUnix) until stop(); the server
  // owns and closes it.
  bool ServeSocket(transport::Fd listener) {
    svr_sock_ = listener.Release();
    return listen_after_bind();
  }
};

class UnixHttpClient : public httplib::ClientImpl {
 public:
  explicit UnixHttpClient(std::string path)
      : httplib::ClientImpl("localhost"), path_(std::move(path)) {}

 protected:
  bool create_and_connect_socket(Socket& socket,
                                 httplib::Error& error) override {
    absl::StatusOr<transport::Fd> fd = transport::ConnectUnix(path_);
    if (!fd.ok()) {
      error = httplib::Error::Connection;
      last_error_ = std::string(fd.status().message());
      return false;
    }
    socket.sock = fd->Release();
    return true;
  }

 public:
  // Why the last connection failed, in words.
  std::string last_error_;

 private:
  const std::string path_;
};

// The HTTP status for a Status (200 for OK).
int HttpStatus(const absl::Status& s);
// {"error": message, "code": "NOT_FOUND", "status": 5}
nlohmann::ordered_json ErrorJson(const absl::Status& s);
// The Status an error response carries (OK for 2xx).
absl::Status StatusFromResponse(int http_status, const std::string& body);

}  // namespace tools

#endif  // TANDEM_TOOLS_HTTP_UNIX_H_
