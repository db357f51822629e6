#include "engine/delta_format.h"

#include <zstd.h>

#include <cstring>

#include "absl/strings/str_cat.h"
#include "blockstore/byte_codec.h"
#include "blockstore/util.h"

namespace engine {
namespace {

using blockstore::GetLe32;
using blockstore::GetLe64;
using blockstore::Hash64;
using blockstore::PutLe32;
using blockstore::PutLe64;

constexpr char kHeaderMagic[8] = {'T', 'N', 'D', 'M', 'D', 'L', 'T', 'A'};
constexpr char kSegmentMagic[4] = {'T', 'S', 'E', 'G'};
constexpr char kEndMagic[4] = {'T', 'E', 'N', 'D'};

absl::Status Bad(uint64_t offset, absl::string_view what) {
  return absl::DataLossError(
      absl::StrCat("delta stream offset ", offset, ": ", what));
}

}  // namespace

std::string EncodeHeader(const DeltaHeader& h, uint64_t* checksum) {
  blockstore::ByteWriter o;
  o.Raw(kHeaderMagic, 8);
  o.U32(kDeltaVersion);
  o.U32(0);  // length, patched below
  o.U64(h.features);
  o.U32(h.chunk_size);
  o.U32(0);
  o.U64(h.size_bytes);
  o.U64(h.base_size_bytes);
  o.Raw(h.volume_guid.data(), 16);
  o.Raw(h.base_guid.data(), 16);
  o.Raw(h.target_guid.data(), 16);
  o.U64(static_cast<uint64_t>(h.base_create_time_ns));
  o.U64(static_cast<uint64_t>(h.target_create_time_ns));
  o.Raw(h.base_digest.bytes.data(), 16);
  o.Raw(h.target_digest.bytes.data(), 16);
  o.Str(h.volume_name);
  o.Str(h.base_name);
  o.Str(h.target_name);
  o.U32(static_cast<uint32_t>(h.listed.size()));
  for (const ListedSnapshot& l : h.listed) {
    o.Raw(l.guid.data(), 16);
    o.U64(static_cast<uint64_t>(l.create_time_ns));
    o.Str(l.name);
  }
  uint32_t length = static_cast<uint32_t>(o.bytes().size() + 8);
  PutLe32(reinterpret_cast<std::byte*>(o.bytes().data() + 12), length);
  uint64_t sum = Hash64(
      {reinterpret_cast<const std::byte*>(o.bytes().data()), o.bytes().size()},
      0);
  o.U64(sum);
  *checksum = sum;
  return o.Take();
}

absl::StatusOr<uint32_t> DecodeHeaderLength(std::span<const std::byte> prefix) {
  if (prefix.size() < kHeaderPrefixBytes ||
      std::memcmp(prefix.data(), kHeaderMagic, 8) != 0) {
    return Bad(0, "not a Tandem delta stream (bad magic)");
  }
  uint32_t version = GetLe32(prefix.data() + 8);
  if (version != kDeltaVersion) {
    return absl::UnimplementedError(absl::StrCat(
        "delta stream format version ", version,
        " is not supported (this build reads version ", kDeltaVersion, ")"));
  }
  uint32_t length = GetLe32(prefix.data() + 12);
  if (length < 144 + 6 + 4 + 8 || length > kMaxHeaderBytes) {
    return Bad(12, absl::StrCat("header length ", length, " out of range"));
  }
  return length;
}

absl::StatusOr<DeltaHeader> DecodeHeader(std::span<const std::byte> bytes,
                                         uint64_t* checksum) {
  absl::StatusOr<uint32_t> length = DecodeHeaderLength(bytes);
  if (!length.ok()) return length.status();
  if (bytes.size() != *length) {
    return Bad(12, absl::StrCat("header length ", *length, " but ",
                                bytes.size(), " bytes given"));
  }
  uint64_t sum = GetLe64(bytes.data() + bytes.size() - 8);
  if (Hash64(bytes.first(bytes.size() - 8), 0) != sum) {
    return Bad(bytes.size() - 8, "header checksum mismatch");
  }
  // The checksum holds; still, every field is checked on its own.
  blockstore::ByteReader in(bytes.first(bytes.size() - 8));
  in.U64();
  in.U32();
  in.U32();
  DeltaHeader h;
  h.features = in.U64();
  if (h.features & ~kKnownFeatures) {
    return absl::UnimplementedError(absl::StrCat(
        "delta stream uses unknown feature bits 0x",
        absl::Hex(h.features & ~kKnownFeatures), "; upgrade tandem"));
  }
  h.chunk_size = in.U32();
  if (!blockstore::IsPowerOfTwo(h.chunk_size) || h.chunk_size < 4096 ||
      h.chunk_size > (1u << 20)) {
    return Bad(24, absl::StrCat("chunk size ", h.chunk_size, " invalid"));
  }
  if (in.U32() != 0) return Bad(28, "reserved field is not zero");
  h.size_bytes = in.U64();
  if (h.size_bytes == 0 || h.size_bytes > kMaxVolumeBytes) {
    return Bad(32, absl::StrCat("volume size ", h.size_bytes, " out of range"));
  }
  h.base_size_bytes = in.U64();
  if (h.base_size_bytes > kMaxVolumeBytes) {
    return Bad(40, absl::StrCat("base volume size ", h.base_size_bytes,
                                " out of range"));
  }
  in.Take(h.volume_guid.data(), 16);
  in.Take(h.base_guid.data(), 16);
  in.Take(h.target_guid.data(), 16);
  h.base_create_time_ns = static_cast<int64_t>(in.U64());
  h.target_create_time_ns = static_cast<int64_t>(in.U64());
  in.Take(h.base_digest.bytes.data(), 16);
  in.Take(h.target_digest.bytes.data(), 16);
  h.volume_name = in.Str();
  h.base_name = in.Str();
  h.target_name = in.Str();
  if (!in.ok()) return Bad(144, "header ends inside the names");
  if (!blockstore::IsValidName(h.volume_name))
    return Bad(144, "volume name is invalid");
  if (!blockstore::IsValidName(h.target_name))
    return Bad(144, "target snapshot name is invalid");
  if (!h.base_name.empty() && !blockstore::IsValidName(h.base_name)) {
    return Bad(144, "base snapshot name is invalid");
  }
  bool zero_base_guid = h.base_guid == Guid{};
  if (h.full() != zero_base_guid || h.full() != (h.base_size_bytes == 0)) {
    return Bad(40, "base snapshot fields are inconsistent (name, GUID, size)");
  }
  uint32_t listed = in.U32();
  if (listed > kMaxListedSnapshots) {
    return Bad(in.pos() - 4,
               absl::StrCat("listed snapshot count ", listed, " too large"));
  }
  for (uint32_t i = 0; i < listed && in.ok(); ++i) {
    ListedSnapshot l;
    in.Take(l.guid.data(), 16);
    l.create_time_ns = static_cast<int64_t>(in.U64());
    l.name = in.Str();
    if (in.ok() && !blockstore::IsValidName(l.name)) {
      return Bad(in.pos(),
                 absl::StrCat("listed snapshot ", i, " name is invalid"));
    }
    h.listed.push_back(std::move(l));
  }
  if (!in.ok()) return Bad(in.pos(), "header ends inside the snapshot list");
  if (in.pos() != bytes.size() - 8) {
    return Bad(in.pos(), "header has trailing bytes");
  }
  *checksum = sum;
  return h;
}

void EncodeSegmentHeader(const SegmentHeader& s,
                         std::span<std::byte, kSegmentHeaderBytes> out) {
  std::memset(out.data(), 0, out.size());
  std::memcpy(out.data(), kSegmentMagic, 4);
  PutLe32(out.data() + 4, static_cast<uint32_t>(s.codec));
  PutLe64(out.data() + 8, s.sequence);
  PutLe32(out.data() + 16, s.record_bytes);
  PutLe32(out.data() + 20, s.stored_bytes);
  PutLe32(out.data() + 24, s.record_count);
  PutLe64(out.data() + 32, s.chain);
  PutLe64(out.data() + 40, Hash64(out.first(40), 0));
}

absl::StatusOr<SegmentHeader> DecodeSegmentHeader(
    std::span<const std::byte, kSegmentHeaderBytes> in,
    uint64_t expected_sequence, uint64_t features, uint64_t at) {
  if (std::memcmp(in.data(), kSegmentMagic, 4) != 0) {
    return Bad(at, absl::StrCat("segment ", expected_sequence,
                                ": bad magic (expected TSEG or TEND)"));
  }
  if (GetLe64(in.data() + 40) != Hash64(in.first(40), 0)) {
    return Bad(at + 40, absl::StrCat("segment ", expected_sequence,
                                     ": header checksum mismatch"));
  }
  SegmentHeader s;
  uint32_t codec = GetLe32(in.data() + 4);
  if (codec > 1 || (codec == 1 && !(features & kFeatureZstd))) {
    return Bad(at + 4, absl::StrCat("segment ", expected_sequence,
                                    ": unknown codec ", codec));
  }
  s.codec = static_cast<Codec>(codec);
  s.sequence = GetLe64(in.data() + 8);
  if (s.sequence != expected_sequence) {
    return Bad(at + 8, absl::StrCat("segment sequence ", s.sequence,
                                    ", expected ", expected_sequence,
                                    " (dropped or reordered segment)"));
  }
  s.record_bytes = GetLe32(in.data() + 16);
  s.stored_bytes = GetLe32(in.data() + 20);
  s.record_count = GetLe32(in.data() + 24);
  if (s.record_bytes < kRecordHeaderBytes ||
      s.record_bytes > kMaxSegmentRecordBytes) {
    return Bad(at + 16, absl::StrCat("segment ", s.sequence, ": record bytes ",
                                     s.record_bytes, " out of range"));
  }
  uint64_t max_stored = s.codec == Codec::kRaw
                            ? s.record_bytes
                            : ZSTD_compressBound(s.record_bytes);
  if (s.stored_bytes == 0 || s.stored_bytes > max_stored ||
      (s.codec == Codec::kRaw && s.stored_bytes != s.record_bytes)) {
    return Bad(at + 20, absl::StrCat("segment ", s.sequence, ": stored bytes ",
                                     s.stored_bytes, " out of range"));
  }
  if (s.record_count == 0 ||
      s.record_count > s.record_bytes / kRecordHeaderBytes) {
    return Bad(at + 24, absl::StrCat("segment ", s.sequence, ": record count ",
                                     s.record_count, " out of range"));
  }
  if (GetLe32(in.data() + 28) != 0) {
    return Bad(at + 28, absl::StrCat("segment ", s.sequence,
                                     ": reserved field is not zero"));
  }
  s.chain = GetLe64(in.data() + 32);
  return s;
}

uint64_t ChainChecksum(std::span<const std::byte> stored, uint64_t previous) {
  return Hash64(stored, previous);
}

bool IsEndMagic(std::span<const std::byte> first4) {
  return first4.size() >= 4 && std::memcmp(first4.data(), kEndMagic, 4) == 0;
}

void EncodeRecordHeader(const RecordHeader& r, std::byte* out) {
  std::memset(out, 0, kRecordHeaderBytes);
  out[0] = static_cast<std::byte>(r.type);
  PutLe32(out + 4, r.count_chunks);
  PutLe64(out + 8, r.first_chunk);
}

absl::StatusOr<RecordHeader> DecodeRecord(std::span<const std::byte> rest,
                                          const DeltaHeader& h,
                                          RecordOrder& order, uint64_t segment,
                                          uint64_t index) {
  auto bad = [&](absl::string_view what) {
    return absl::DataLossError(
        absl::StrCat("delta segment ", segment, " record ", index, ": ", what));
  };
  if (rest.size() < kRecordHeaderBytes) return bad("truncated record header");
  RecordHeader r;
  uint8_t type = static_cast<uint8_t>(rest[0]);
  if (type < 1 || type > 4) return bad(absl::StrCat("unknown type ", type));
  r.type = static_cast<RecordType>(type);
  if (rest[1] != std::byte{0} || rest[2] != std::byte{0} ||
      rest[3] != std::byte{0}) {
    return bad("reserved bytes are not zero");
  }
  r.count_chunks = GetLe32(rest.data() + 4);
  r.first_chunk = GetLe64(rest.data() + 8);
  if (r.type == RecordType::kResize) {
    if (order.any_record) return bad("RESIZE is not the first record");
    if (r.count_chunks != 0) return bad("RESIZE with a chunk count");
    if (r.first_chunk != h.size_bytes) {
      return bad(absl::StrCat("RESIZE to ", r.first_chunk,
                              " bytes, header says ", h.size_bytes));
    }
    order.any_record = true;
    return r;
  }
  if (r.count_chunks == 0) return bad("record of zero chunks");
  uint64_t chunks = h.chunk_count();
  if (r.first_chunk >= chunks || r.count_chunks > chunks - r.first_chunk) {
    return bad(absl::StrCat("chunks ", r.first_chunk, "+", r.count_chunks,
                            " past the volume end (", chunks, " chunks)"));
  }
  if (r.first_chunk < order.next_chunk) {
    return bad(absl::StrCat("chunk ", r.first_chunk,
                            " out of order (next allowed ", order.next_chunk,
                            ")"));
  }
  if (r.length(h.chunk_size) > rest.size()) {
    return bad(absl::StrCat("record of ", r.length(h.chunk_size),
                            " bytes overruns its segment (", rest.size(),
                            " left)"));
  }
  order.any_record = true;
  order.next_chunk = r.first_chunk + r.count_chunks;
  return r;
}

void EncodeEnd(const DeltaEnd& e, std::span<std::byte, kEndBytes> out) {
  std::memset(out.data(), 0, out.size());
  std::memcpy(out.data(), kEndMagic, 4);
  PutLe64(out.data() + 8, e.segment_count);
  PutLe64(out.data() + 16, e.record_count);
  PutLe64(out.data() + 24, e.chunks_written);
  PutLe64(out.data() + 32, e.chunks_cleared);
  PutLe64(out.data() + 40, e.record_bytes);
  PutLe64(out.data() + 48, e.stored_bytes);
  PutLe64(out.data() + 56, e.chain);
  std::memcpy(out.data() + 64, e.target_digest.bytes.data(), 16);
  PutLe64(out.data() + 80, Hash64(out.first(80), 0));
}

absl::StatusOr<DeltaEnd> DecodeEnd(std::span<const std::byte, kEndBytes> in,
                                   uint64_t at) {
  if (!IsEndMagic(in)) return Bad(at, "bad end magic");
  if (GetLe64(in.data() + 80) != Hash64(in.first(80), 0)) {
    return Bad(at + 80, "end record checksum mismatch");
  }
  if (GetLe32(in.data() + 4) != 0)
    return Bad(at + 4, "reserved field is not zero");
  DeltaEnd e;
  e.segment_count = GetLe64(in.data() + 8);
  e.record_count = GetLe64(in.data() + 16);
  e.chunks_written = GetLe64(in.data() + 24);
  e.chunks_cleared = GetLe64(in.data() + 32);
  e.record_bytes = GetLe64(in.data() + 40);
  e.stored_bytes = GetLe64(in.data() + 48);
  e.chain = GetLe64(in.data() + 56);
  std::memcpy(e.target_digest.bytes.data(), in.data() + 64, 16);
  return e;
}

std::string EncodeResumeToken(const ResumeToken& t) {
  blockstore::ByteWriter o;
  o.Raw(t.target_guid.data(), 16);
  o.Raw(t.base_guid.data(), 16);
  for (uint64_t v : {t.header_checksum, t.next_segment, t.chain, t.next_chunk,
                     uint64_t{t.any_record}, t.records, t.chunks_written,
                     t.chunks_cleared, t.record_bytes, t.stored_bytes}) {
    o.U64(v);
  }
  return o.Take();
}

absl::StatusOr<ResumeToken> DecodeResumeToken(std::span<const std::byte> in) {
  if (in.size() != kResumeTokenBytes) {
    return absl::DataLossError(absl::StrCat(
        "resume token of ", in.size(), " bytes, expected ", kResumeTokenBytes));
  }
  ResumeToken t;
  std::memcpy(t.target_guid.data(), in.data(), 16);
  std::memcpy(t.base_guid.data(), in.data() + 16, 16);
  const std::byte* p = in.data() + 32;
  auto next = [&p] {
    uint64_t v = GetLe64(p);
    p += 8;
    return v;
  };
  t.header_checksum = next();
  t.next_segment = next();
  t.chain = next();
  t.next_chunk = next();
  uint64_t any = next();
  if (any > 1) return absl::DataLossError("resume token: bad record flag");
  t.any_record = any == 1;
  t.records = next();
  t.chunks_written = next();
  t.chunks_cleared = next();
  t.record_bytes = next();
  t.stored_bytes = next();
  return t;
}

}  // namespace engine
