#include "transport/nbd.h"

#include "absl/strings/str_cat.h"

namespace transport::nbd {
namespace {

uint64_t GetBe(const std::byte* p, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v = (v << 8) | static_cast<uint8_t>(p[i]);
  return v;
}
void PutBe(std::string& out, uint64_t v, int bytes) {
  for (int i = bytes - 1; i >= 0; --i) {
    out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
  }
}
void Put16(std::string& out, uint16_t v) { PutBe(out, v, 2); }
void Put32(std::string& out, uint32_t v) { PutBe(out, v, 4); }
void Put64(std::string& out, uint64_t v) { PutBe(out, v, 8); }

// Reads big-endian fields and strings off the front of an option's data.
class Reader {
 public:
  explicit Reader(std::span<const std::byte> data) : data_(data) {}
  bool Get(int bytes, uint64_t& v) {
    if (data_.size() < static_cast<size_t>(bytes)) return false;
    v = GetBe(data_.data(), bytes);
    data_ = data_.subspan(bytes);
    return true;
  }
  bool GetString(uint64_t length, std::string& s) {
    if (data_.size() < length) return false;
    s.assign(reinterpret_cast<const char*>(data_.data()), length);
    data_ = data_.subspan(length);
    return true;
  }
  // A string after its 32-bit length (names and queries: at most
  // kMaxString bytes).
  bool GetName(std::string& s);
  size_t left() const { return data_.size(); }

 private:
  std::span<const std::byte> data_;
};

// Export names and queries are UTF-8 strings of at most 4096 bytes.
constexpr uint64_t kMaxString = 4096;

bool Reader::GetName(std::string& s) {
  uint64_t length = 0;
  return Get(4, length) && length <= kMaxString && GetString(length, s);
}

// NBD_REP_INFO of a text item (NBD_INFO_NAME, NBD_INFO_DESCRIPTION).
void PutInfoText(std::string& out, uint32_t option, uint16_t type,
                 const std::string& text) {
  std::string d;
  Put16(d, type);
  d += text;
  PutOptionReply(out, option, kRepInfo, d);
}

}  // namespace

absl::StatusOr<OptionHeader> ParseOptionHeader(
    std::span<const std::byte, kOptionHeaderSize> raw) {
  if (GetBe(raw.data(), 8) != kOptMagic) {
    return absl::InvalidArgumentError("option without the IHAVEOPT magic");
  }
  return OptionHeader{static_cast<uint32_t>(GetBe(raw.data() + 8, 4)),
                      static_cast<uint32_t>(GetBe(raw.data() + 12, 4))};
}

absl::StatusOr<InfoRequest> ParseInfoRequest(std::span<const std::byte> data) {
  Reader r(data);
  InfoRequest out;
  uint64_t count = 0;
  if (!r.GetName(out.name) || !r.Get(2, count)) {
    return absl::InvalidArgumentError("malformed export name");
  }
  if (r.left() != 2 * count) {
    return absl::InvalidArgumentError(
        absl::StrCat("information request list of ", count, " items in ",
                     r.left(), " bytes"));
  }
  for (uint64_t i = 0; i < count; ++i) {
    uint64_t info = 0;
    r.Get(2, info);
    out.infos.push_back(static_cast<uint16_t>(info));
  }
  return out;
}

absl::StatusOr<MetaContextRequest> ParseMetaContextRequest(
    std::span<const std::byte> data) {
  Reader r(data);
  MetaContextRequest out;
  uint64_t count = 0;
  if (!r.GetName(out.name) || !r.Get(4, count)) {
    return absl::InvalidArgumentError("malformed export name");
  }
  for (uint64_t i = 0; i < count; ++i) {
    std::string query;
    if (!r.GetName(query)) {
      return absl::InvalidArgumentError(
          absl::StrCat("malformed query ", i + 1, " of ", count));
    }
    out.queries.push_back(std::move(query));
  }
  if (r.left() != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(r.left(), " bytes after the last query"));
  }
  return out;
}

absl::StatusOr<Request> ParseRequest(
    std::span<const std::byte, kRequestSize> raw) {
  if (GetBe(raw.data(), 4) != kRequestMagic) {
    return absl::InvalidArgumentError(
        absl::StrCat("request magic 0x", absl::Hex(GetBe(raw.data(), 4)),
                     ", not 0x", absl::Hex(kRequestMagic)));
  }
  Request r;
  r.flags = static_cast<uint16_t>(GetBe(raw.data() + 4, 2));
  r.type = static_cast<uint16_t>(GetBe(raw.data() + 6, 2));
  r.cookie = GetBe(raw.data() + 8, 8);
  r.offset = GetBe(raw.data() + 16, 8);
  r.length = static_cast<uint32_t>(GetBe(raw.data() + 24, 4));
  return r;
}

Verdict CheckRequest(const Request& r, const ExportLimits& limits) {
  auto einval = [](std::string why) {
    return Verdict{kEinval, std::move(why)};
  };
  // A write's payload follows its header whatever the verdict: one too
  // large to read is the end of the connection.
  if (r.type == kCmdWrite && r.length > limits.max_payload) {
    return {kEoverflow,
            absl::StrCat("write of ", r.length, " bytes, more than the ",
                         limits.max_payload, " announced"),
            true};
  }
  uint16_t allowed = kCmdFlagFua;
  switch (r.type) {
    case kCmdRead:
      allowed |= kCmdFlagDf;
      break;
    case kCmdWrite:
    case kCmdTrim:
    case kCmdFlush:
    case kCmdCache:
      break;
    case kCmdWriteZeroes:
      allowed |= kCmdFlagNoHole | kCmdFlagFastZero;
      break;
    case kCmdBlockStatus:
      allowed |= kCmdFlagReqOne;
      if (!limits.block_status) {
        return einval("block status without a negotiated metadata context");
      }
      break;
    default:
      return einval(absl::StrCat("unknown command ", r.type));
  }
  if ((r.flags & ~allowed) != 0) {
    return einval(absl::StrCat("flags 0x", absl::Hex(r.flags),
                               " not valid for command ", r.type));
  }
  if (r.type == kCmdFlush) return {};
  if (r.type == kCmdRead && r.length > limits.max_payload) {
    return {kEoverflow,
            absl::StrCat("read of ", r.length, " bytes, more than the ",
                         limits.max_payload, " announced")};
  }
  if (r.offset > limits.size || r.length > limits.size - r.offset) {
    return einval(absl::StrCat("request of ", r.length, " bytes at ", r.offset,
                               " past the end (", limits.size, ")"));
  }
  if (r.offset % limits.min_block != 0 || r.length % limits.min_block != 0) {
    return einval(absl::StrCat("request of ", r.length, " bytes at ", r.offset,
                               " not aligned to ", limits.min_block));
  }
  if (r.length == 0 && r.type != kCmdRead && r.type != kCmdWrite) {
    return einval("zero length");
  }
  if (limits.read_only && (r.type == kCmdWrite || r.type == kCmdTrim ||
                           r.type == kCmdWriteZeroes)) {
    return {kEperm, "write to a read-only export"};
  }
  return {};
}

void PutServerGreeting(std::string& out) {
  Put64(out, kNbdMagic);
  Put64(out, kOptMagic);
  Put16(out, kFlagFixedNewstyle | kFlagNoZeroes);
}

void PutOptionReply(std::string& out, uint32_t option, uint32_t type,
                    std::span<const std::byte> data) {
  Put64(out, kOptReplyMagic);
  Put32(out, option);
  Put32(out, type);
  Put32(out, static_cast<uint32_t>(data.size()));
  out.append(reinterpret_cast<const char*>(data.data()), data.size());
}

void PutOptionReply(std::string& out, uint32_t option, uint32_t type,
                    const std::string& data) {
  PutOptionReply(out, option, type, std::as_bytes(std::span(data)));
}

void PutInfoExport(std::string& out, uint32_t option, uint64_t size,
                   uint16_t flags) {
  std::string d;
  Put16(d, kInfoExport);
  Put64(d, size);
  Put16(d, flags);
  PutOptionReply(out, option, kRepInfo, d);
}

void PutInfoBlockSize(std::string& out, uint32_t option, uint32_t min_block,
                      uint32_t preferred, uint32_t max_payload) {
  std::string d;
  Put16(d, kInfoBlockSize);
  Put32(d, min_block);
  Put32(d, preferred);
  Put32(d, max_payload);
  PutOptionReply(out, option, kRepInfo, d);
}

void PutInfoName(std::string& out, uint32_t option, const std::string& name) {
  PutInfoText(out, option, kInfoName, name);
}

void PutInfoDescription(std::string& out, uint32_t option,
                        const std::string& text) {
  PutInfoText(out, option, kInfoDescription, text);
}

void PutServerEntry(std::string& out, const std::string& name,
                    const std::string& description) {
  std::string d;
  Put32(d, static_cast<uint32_t>(name.size()));
  d += name;
  d += description;
  PutOptionReply(out, kOptList, kRepServer, d);
}

void PutMetaContext(std::string& out, uint32_t option, uint32_t id,
                    const std::string& name) {
  std::string d;
  Put32(d, id);
  d += name;
  PutOptionReply(out, option, kRepMetaContext, d);
}

void PutExportNameReply(std::string& out, uint64_t size, uint16_t flags,
                        bool no_zeroes) {
  Put64(out, size);
  Put16(out, flags);
  if (!no_zeroes) out.append(124, '\0');
}

void PutSimpleReply(std::string& out, uint64_t cookie, uint32_t error) {
  Put32(out, kSimpleReplyMagic);
  Put32(out, error);
  Put64(out, cookie);
}

void PutStructuredHeader(std::string& out, uint64_t cookie, uint16_t flags,
                         uint16_t type, uint32_t length) {
  Put32(out, kStructuredReplyMagic);
  Put16(out, flags);
  Put16(out, type);
  Put64(out, cookie);
  Put32(out, length);
}

void PutOffsetDataHeader(std::string& out, uint64_t cookie, uint16_t flags,
                         uint64_t offset, uint32_t data_length) {
  PutStructuredHeader(out, cookie, flags, kReplyTypeOffsetData,
                      8 + data_length);
  Put64(out, offset);
}

void PutOffsetHole(std::string& out, uint64_t cookie, uint16_t flags,
                   uint64_t offset, uint32_t length) {
  PutStructuredHeader(out, cookie, flags, kReplyTypeOffsetHole, 12);
  Put64(out, offset);
  Put32(out, length);
}

void PutStructuredError(std::string& out, uint64_t cookie, uint32_t error,
                        const std::string& message) {
  const std::string m = message.substr(0, 4096);
  PutStructuredHeader(out, cookie, kReplyFlagDone, kReplyTypeError,
                      static_cast<uint32_t>(6 + m.size()));
  Put32(out, error);
  Put16(out, static_cast<uint16_t>(m.size()));
  out += m;
}

void PutBlockStatus(std::string& out, uint64_t cookie, uint16_t flags,
                    uint32_t context_id, std::span<const Extent> extents) {
  PutStructuredHeader(out, cookie, flags, kReplyTypeBlockStatus,
                      static_cast<uint32_t>(4 + 8 * extents.size()));
  Put32(out, context_id);
  for (const Extent& e : extents) {
    Put32(out, e.length);
    Put32(out, e.flags);
  }
}

}  // namespace transport::nbd
