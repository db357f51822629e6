// The NBD protocol's wire format (doc/proto.md of NetworkBlockDevice/nbd):
// its constants, the handshake's option payloads, the transmission phase's
// request header, and the replies the server sends. No I/O here: the
// server (tools/nbd_server.h) reads and writes; this parses and encodes,
// so the fuzz target (tests/fuzz/nbd_fuzz.cc) reaches all of it.
//
// Everything on the wire is big-endian.
#ifndef TANDEM_TRANSPORT_NBD_H_
#define TANDEM_TRANSPORT_NBD_H_

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace transport::nbd {

inline constexpr uint64_t kNbdMagic = 0x4e42444d41474943;  // "NBDMAGIC"
inline constexpr uint64_t kOptMagic = 0x49484156454f5054;  // "IHAVEOPT"
inline constexpr uint64_t kOptReplyMagic = 0x3e889045565a9;
inline constexpr uint32_t kRequestMagic = 0x25609513;
inline constexpr uint32_t kSimpleReplyMagic = 0x67446698;
inline constexpr uint32_t kStructuredReplyMagic = 0x668e33ef;

// Handshake flags (server) and client flags.
inline constexpr uint16_t kFlagFixedNewstyle = 1 << 0;
inline constexpr uint16_t kFlagNoZeroes = 1 << 1;

// Options.
inline constexpr uint32_t kOptExportName = 1;
inline constexpr uint32_t kOptAbort = 2;
inline constexpr uint32_t kOptList = 3;
inline constexpr uint32_t kOptStartTls = 5;
inline constexpr uint32_t kOptInfo = 6;
inline constexpr uint32_t kOptGo = 7;
inline constexpr uint32_t kOptStructuredReply = 8;
inline constexpr uint32_t kOptListMetaContext = 9;
inline constexpr uint32_t kOptSetMetaContext = 10;

// Option replies.
inline constexpr uint32_t kRepAck = 1;
inline constexpr uint32_t kRepServer = 2;
inline constexpr uint32_t kRepInfo = 3;
inline constexpr uint32_t kRepMetaContext = 4;
inline constexpr uint32_t kRepErrUnsup = 0x80000001;
inline constexpr uint32_t kRepErrPolicy = 0x80000002;
inline constexpr uint32_t kRepErrInvalid = 0x80000003;
inline constexpr uint32_t kRepErrTlsReqd = 0x80000005;
inline constexpr uint32_t kRepErrUnknown = 0x80000006;
inline constexpr uint32_t kRepErrShutdown = 0x80000007;
inline constexpr uint32_t kRepErrTooBig = 0x80000009;

// NBD_REP_INFO types.
inline constexpr uint16_t kInfoExport = 0;
inline constexpr uint16_t kInfoName = 1;
inline constexpr uint16_t kInfoDescription = 2;
inline constexpr uint16_t kInfoBlockSize = 3;

// Transmission flags.
inline constexpr uint16_t kHasFlags = 1 << 0;
inline constexpr uint16_t kReadOnly = 1 << 1;
inline constexpr uint16_t kSendFlush = 1 << 2;
inline constexpr uint16_t kSendFua = 1 << 3;
inline constexpr uint16_t kSendTrim = 1 << 5;
inline constexpr uint16_t kSendWriteZeroes = 1 << 6;
inline constexpr uint16_t kSendDf = 1 << 7;
inline constexpr uint16_t kCanMultiConn = 1 << 8;
inline constexpr uint16_t kSendCache = 1 << 10;
inline constexpr uint16_t kSendFastZero = 1 << 11;

// Commands and their flags.
inline constexpr uint16_t kCmdRead = 0;
inline constexpr uint16_t kCmdWrite = 1;
inline constexpr uint16_t kCmdDisc = 2;
inline constexpr uint16_t kCmdFlush = 3;
inline constexpr uint16_t kCmdTrim = 4;
inline constexpr uint16_t kCmdCache = 5;
inline constexpr uint16_t kCmdWriteZeroes = 6;
inline constexpr uint16_t kCmdBlockStatus = 7;
inline constexpr uint16_t kCmdFlagFua = 1 << 0;
inline constexpr uint16_t kCmdFlagNoHole = 1 << 1;
inline constexpr uint16_t kCmdFlagDf = 1 << 2;
inline constexpr uint16_t kCmdFlagReqOne = 1 << 3;
inline constexpr uint16_t kCmdFlagFastZero = 1 << 4;

// Structured replies.
inline constexpr uint16_t kReplyFlagDone = 1 << 0;
inline constexpr uint16_t kReplyTypeNone = 0;
inline constexpr uint16_t kReplyTypeOffsetData = 1;
inline constexpr uint16_t kReplyTypeOffsetHole = 2;
inline constexpr uint16_t kReplyTypeBlockStatus = 5;
inline constexpr uint16_t kReplyTypeError = 0x8001;

// base:allocation flags.
inline constexpr uint32_t kStateHole = 1 << 0;
inline constexpr uint32_t kStateZero = 1 << 1;

// Errors (replies in the transmission phase).
inline constexpr uint32_t kEperm = 1;
inline constexpr uint32_t kEio = 5;
inline constexpr uint32_t kEnomem = 12;
inline constexpr uint32_t kEinval = 22;
inline constexpr uint32_t kEnospc = 28;
inline constexpr uint32_t kEoverflow = 75;
inline constexpr uint32_t kEnotsup = 95;
inline constexpr uint32_t kEshutdown = 108;

// The one metadata context served, and its id on every connection.
inline constexpr const char* kBaseAllocation = "base:allocation";
inline constexpr uint32_t kBaseAllocationId = 1;

// Sizes of fixed parts.
inline constexpr size_t kOptionHeaderSize = 16;  // magic, option, length
inline constexpr size_t kRequestSize = 28;
// An option's data the server reads at most (export names are at most 4096
// bytes; a meta-context request carries a few of them).
inline constexpr uint32_t kMaxOptionData = 64 << 10;

struct OptionHeader {
  uint32_t option = 0;
  uint32_t length = 0;  // of the data that follows
};
// InvalidArgument if the magic is wrong.
absl::StatusOr<OptionHeader> ParseOptionHeader(
    std::span<const std::byte, kOptionHeaderSize> raw);

// NBD_OPT_INFO and NBD_OPT_GO's data: an export name and the information
// asked for.
struct InfoRequest {
  std::string name;
  std::vector<uint16_t> infos;
};
absl::StatusOr<InfoRequest> ParseInfoRequest(std::span<const std::byte> data);

// NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT's data.
struct MetaContextRequest {
  std::string name;
  std::vector<std::string> queries;
};
absl::StatusOr<MetaContextRequest> ParseMetaContextRequest(
    std::span<const std::byte> data);

struct Request {
  uint16_t flags = 0;
  uint16_t type = 0;
  uint64_t cookie = 0;
  uint64_t offset = 0;
  uint32_t length = 0;
};
// InvalidArgument if the magic is wrong.
absl::StatusOr<Request> ParseRequest(
    std::span<const std::byte, kRequestSize> raw);

// What an export allows, for checking requests against it.
struct ExportLimits {
  uint64_t size = 0;
  bool read_only = false;
  uint32_t min_block = 1;
  uint32_t max_payload = 32 << 20;
  bool structured = false;    // structured replies negotiated
  bool block_status = false;  // base:allocation selected
};
// Whether the server can carry out `r` at all: 0, or the NBD error to reply
// with, and why (a line for the log). A request the server cannot even read
// past (a write longer than max_payload) is `disconnect`: the stream cannot
// be resynchronised.
struct Verdict {
  uint32_t error = 0;
  std::string why;
  bool disconnect = false;
};
Verdict CheckRequest(const Request& r, const ExportLimits& limits);

// Encoders: each appends one message to `out`.
void PutServerGreeting(std::string& out);  // NBDMAGIC IHAVEOPT flags
void PutOptionReply(std::string& out, uint32_t option, uint32_t type,
                    std::span<const std::byte> data = {});
void PutOptionReply(std::string& out, uint32_t option, uint32_t type,
                    const std::string& data);
// NBD_REP_INFO NBD_INFO_EXPORT.
void PutInfoExport(std::string& out, uint32_t option, uint64_t size,
                   uint16_t flags);
void PutInfoBlockSize(std::string& out, uint32_t option, uint32_t min_block,
                      uint32_t preferred, uint32_t max_payload);
void PutInfoName(std::string& out, uint32_t option, const std::string& name);
void PutInfoDescription(std::string& out, uint32_t option,
                        const std::string& text);
// NBD_REP_SERVER for NBD_OPT_LIST.
void PutServerEntry(std::string& out, const std::string& name,
                    const std::string& description);
void PutMetaContext(std::string& out, uint32_t option, uint32_t id,
                    const std::string& name);
// The end of NBD_OPT_EXPORT_NAME: size and flags (and 124 zero bytes
// unless the client said NO_ZEROES).
void PutExportNameReply(std::string& out, uint64_t size, uint16_t flags,
                        bool no_zeroes);

// Transmission replies: headers only; a read's data follows its header.
void PutSimpleReply(std::string& out, uint64_t cookie, uint32_t error);
void PutStructuredHeader(std::string& out, uint64_t cookie, uint16_t flags,
                         uint16_t type, uint32_t length);
// NBD_REPLY_TYPE_OFFSET_DATA's header and offset: `data_length` bytes of
// data follow.
void PutOffsetDataHeader(std::string& out, uint64_t cookie, uint16_t flags,
                         uint64_t offset, uint32_t data_length);
void PutOffsetHole(std::string& out, uint64_t cookie, uint16_t flags,
                   uint64_t offset, uint32_t length);
void PutStructuredError(std::string& out, uint64_t cookie, uint32_t error,
                        const std::string& message);
struct Extent {
  uint32_t length;
  uint32_t flags;
};
void PutBlockStatus(std::string& out, uint64_t cookie, uint16_t flags,
                    uint32_t context_id, std::span<const Extent> extents);

}  // namespace transport::nbd

#endif  // TANDEM_TRANSPORT_NBD_H_
