// An NBD server (the fixed newstyle handshake, then the transmission
// phase; transport/nbd.h has the wire format) for whatever exports an
// NbdExports names. tandemd serves its pools' volumes and snapshots with it
// (tools/nbd_exports.h).
//
// Handshake: NBD_OPT_GO, INFO, LIST, ABORT, STRUCTURED_REPLY,
// LIST_META_CONTEXT and SET_META_CONTEXT (base:allocation), EXPORT_NAME;
// other options get NBD_REP_ERR_UNSUP. Transmission: READ, WRITE, FLUSH,
// TRIM, WRITE_ZEROES (FAST_ZERO, NO_HOLE), CACHE, BLOCK_STATUS and DISC;
// FUA on any of them.
//
// Concurrency: a thread per connection reads requests and hands them to
// the connection's workers (one per request in flight, made as needed),
// which carry them out and reply as each ends (replies out of order, as the
// protocol allows), at most max_in_flight requests and max_in_flight_bytes
// of payload at once per connection; payload buffers are reused. A
// client that breaks the protocol in a way the stream cannot survive (a bad
// magic, a write longer than announced) is disconnected once its requests
// in flight have been answered; other bad requests get an error reply. A
// connection whose export changes mode (a volume made read-only, or
// writable, by a relationship) is closed the same way, after its requests
// in flight: its client reconnects and sees the new mode.
#ifndef TANDEM_TRANSPORT_NBD_SERVER_H_
#define TANDEM_TRANSPORT_NBD_SERVER_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <set>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "blockstore/mutex.h"
#include "transport/nbd.h"
#include "transport/socket.h"

namespace transport {

// One export as a connection uses it. Called from many threads at once.
class NbdExport {
 public:
  virtual ~NbdExport() = default;
  virtual uint64_t size() const = 0;
  // Whether it is read-only now (it may change while connections are open).
  virtual bool read_only() const = 0;
  // The size at which requests are efficient (no read-modify-write).
  virtual uint32_t preferred_block() const = 0;
  virtual absl::Status Read(uint64_t offset, std::span<std::byte> out) = 0;
  virtual absl::Status Write(uint64_t offset,
                             std::span<const std::byte> data) = 0;
  // Both read as zeros afterwards; whole chunks give their space back.
  virtual absl::Status Trim(uint64_t offset, uint64_t length) = 0;
  virtual absl::Status WriteZeroes(uint64_t offset, uint64_t length) = 0;
  // Every write completed before it is durable on return.
  virtual absl::Status Flush() = 0;
  // base:allocation of [offset, offset + length) from `offset` on: extents
  // in order, covering at least one byte and at most `length`.
  virtual absl::StatusOr<std::vector<nbd::Extent>> BlockStatus(
      uint64_t offset, uint32_t length) = 0;
};

class NbdExports {
 public:
  virtual ~NbdExports() = default;
  struct Listed {
    std::string name;
    std::string description;
  };
  virtual std::vector<Listed> List() = 0;
  // NotFound if there is no such export.
  virtual absl::StatusOr<std::shared_ptr<NbdExport>> Open(
      const std::string& name) = 0;
};

// A connection's bytes: blocking reads and writes of whole buffers.
class NbdStream {
 public:
  virtual ~NbdStream() = default;
  // Fills `out`, or fails (the peer went away, a timeout, a shutdown).
  virtual absl::Status ReadFull(std::span<std::byte> out) = 0;
  virtual absl::Status WriteAll(std::span<const std::byte> data) = 0;
  // Ends reading: a ReadFull blocked now or later fails. Thread-safe.
  virtual void ShutdownRead() = 0;
  // The handshake is over (a socket drops its handshake timeout).
  virtual void EnterTransmission() {}
};

struct NbdSessionOptions {
  // Threads carrying out one connection's requests, made as requests in
  // flight need them, at most this many; 0: the reading thread does each
  // before reading the next (the fuzz target's mode). Past the device's
  // useful depth more threads only switch (bench/RESULTS.md, NBD exports).
  int workers = 16;
  size_t max_in_flight = 64;
  size_t max_in_flight_bytes = 64 << 20;
  uint32_t max_payload = 32 << 20;
};

// What a session tells its server while it runs.
struct NbdSessionState {
  std::atomic<bool> closing{false};
  blockstore::Mutex mu;
  std::string export_name ABSL_GUARDED_BY(mu);  // once in transmission
  std::shared_ptr<NbdExport> exp ABSL_GUARDED_BY(mu);
  bool announced_read_only ABSL_GUARDED_BY(mu) = false;
  std::atomic<uint64_t> requests{0};
  std::atomic<uint64_t> errors{0};
};

// Serves one connection from the greeting to its end: OK when the client
// disconnected cleanly (NBD_CMD_DISC or NBD_OPT_ABORT), the reason
// otherwise. `log` gets a line for each protocol violation.
absl::Status ServeNbdSession(
    NbdStream& stream, NbdExports& exports, const NbdSessionOptions& options,
    NbdSessionState& state, const std::function<void(const std::string&)>& log);

// A TCP listener serving NBD sessions, a thread each.
class NbdServer {
 public:
  struct Config {
    HostPort listen;
    // Client addresses allowed (empty: any); others are closed at once.
    std::set<std::string> allow;
    std::chrono::milliseconds handshake_timeout{10000};
    size_t max_connections = 256;
    NbdSessionOptions session;
  };
  static absl::StatusOr<std::unique_ptr<NbdServer>> Start(
      Config config, NbdExports& exports,
      std::function<void(const std::string&)> log);
  ~NbdServer();
  // Closes the listener and every connection (after their requests in
  // flight); returns once every thread has ended.
  void Stop();
  int port() const { return port_; }

  // Closes, after their requests in flight, the connections whose export
  // changed mode or went away. The server also does this twice a second.
  void Reconcile();

  struct ConnectionInfo {
    std::string peer;
    std::string export_name;  // empty while in the handshake
    bool read_only = false;
    uint64_t requests = 0;
    uint64_t errors = 0;
  };
  std::vector<ConnectionInfo> Connections();
  uint64_t connections_total() const { return accepted_.load(); }
  uint64_t connections_refused() const { return refused_.load(); }

 private:
  struct Conn {
    std::string peer;
    Fd fd;
    NbdSessionState state;
    std::thread thread;
    std::atomic<bool> done{false};
  };
  NbdServer(Config config, NbdExports& exports,
            std::function<void(const std::string&)> log);
  void AcceptLoop();
  void Serve(Conn& conn);
  // Joins the threads of connections that ended.
  void Reap();

  const Config config_;
  NbdExports& exports_;
  const std::function<void(const std::string&)> log_;
  Fd listener_;
  int port_ = 0;
  std::thread accept_thread_, reconcile_thread_;
  std::atomic<bool> stopping_{false};
  std::atomic<uint64_t> accepted_{0};
  std::atomic<uint64_t> refused_{0};
  blockstore::Mutex mu_;
  blockstore::CondVar stop_cv_;
  std::list<std::unique_ptr<Conn>> conns_ ABSL_GUARDED_BY(mu_);
};

}  // namespace transport

#endif  // TANDEM_TRANSPORT_NBD_SERVER_H_
