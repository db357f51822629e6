// The delta stream, version 1: docs/delta-format.md is the contract. This
// header is shared by the writer and the reader; every Decode* is a pure
// function that checks one piece completely (bounds before allocation,
// magic, checksum, ranges) and names the field, its value and the stream
// offset in its error. Errors: DataLoss for anything malformed or
// mis-checksummed, Unimplemented for unknown versions and feature bits.
#ifndef TANDEM_ENGINE_DELTA_FORMAT_H_
#define TANDEM_ENGINE_DELTA_FORMAT_H_

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "blockstore/format.h"
#include "blockstore/hash.h"

namespace engine {

using blockstore::Digest;
using blockstore::Guid;

inline constexpr uint32_t kDeltaVersion = 1;
inline constexpr uint64_t kFeatureZstd = 1;
inline constexpr uint64_t kKnownFeatures = kFeatureZstd;
inline constexpr uint32_t kHeaderPrefixBytes = 16;
inline constexpr uint32_t kMaxHeaderBytes = 65536;
inline constexpr uint32_t kMaxListedSnapshots = 1000;
inline constexpr size_t kSegmentHeaderBytes = 48;
inline constexpr uint32_t kMaxSegmentRecordBytes = (1 << 20) + 4096;
inline constexpr size_t kRecordHeaderBytes = 16;
inline constexpr size_t kEndBytes = 88;
inline constexpr uint64_t kMaxVolumeBytes = uint64_t{1} << 60;
inline constexpr size_t kResumeTokenBytes = 112;

struct ListedSnapshot {
  Guid guid{};
  int64_t create_time_ns = 0;
  std::string name;
};

struct DeltaHeader {
  uint64_t features = kFeatureZstd;
  uint32_t chunk_size = 0;
  uint64_t size_bytes = 0;       // target
  uint64_t base_size_bytes = 0;  // 0: full delta
  Guid volume_guid{};
  Guid base_guid{};
  Guid target_guid{};
  int64_t base_create_time_ns = 0;
  int64_t target_create_time_ns = 0;
  Digest base_digest;
  Digest target_digest;
  std::string volume_name;
  std::string base_name;  // empty: full delta
  std::string target_name;
  std::vector<ListedSnapshot> listed;

  bool full() const { return base_name.empty(); }
  uint64_t chunk_count() const {
    return (size_bytes + chunk_size - 1) / chunk_size;
  }
};

// Encodes the header, its checksum last. `checksum` receives that value
// (the seed of segment 0's chain).
std::string EncodeHeader(const DeltaHeader& h, uint64_t* checksum);
// From the first kHeaderPrefixBytes: the whole header's length.
absl::StatusOr<uint32_t> DecodeHeaderLength(std::span<const std::byte> prefix);
// The whole header (prefix included).
absl::StatusOr<DeltaHeader> DecodeHeader(std::span<const std::byte> bytes,
                                         uint64_t* checksum);

enum class Codec : uint32_t { kRaw = 0, kZstd = 1 };

struct SegmentHeader {
  Codec codec = Codec::kRaw;
  uint64_t sequence = 0;
  uint32_t record_bytes = 0;
  uint32_t stored_bytes = 0;
  uint32_t record_count = 0;
  uint64_t chain = 0;  // XXH3-64(stored, seed = previous chain)
};

void EncodeSegmentHeader(const SegmentHeader& s,
                         std::span<std::byte, kSegmentHeaderBytes> out);
// Checks magic, checksum, codec against `features`, lengths and that the
// sequence is `expected_sequence`. Does not check the chain (that needs the
// payload): ChainChecksum does.
absl::StatusOr<SegmentHeader> DecodeSegmentHeader(
    std::span<const std::byte, kSegmentHeaderBytes> in,
    uint64_t expected_sequence, uint64_t features, uint64_t stream_offset);
uint64_t ChainChecksum(std::span<const std::byte> stored, uint64_t previous);

// The first four bytes of a segment, or of the end.
bool IsEndMagic(std::span<const std::byte> first4);

enum class RecordType : uint8_t {
  kWrite = 1,
  kZero = 2,
  kUnmap = 3,
  kResize = 4
};

struct RecordHeader {
  RecordType type = RecordType::kWrite;
  uint32_t count_chunks = 0;
  uint64_t first_chunk = 0;  // kResize: the new size in bytes
  // Bytes of the record, header included.
  uint64_t length(uint32_t chunk_size) const {
    return kRecordHeaderBytes +
           (type == RecordType::kWrite
                ? uint64_t{count_chunks} * (16 + chunk_size)
                : 0);
  }
};

void EncodeRecordHeader(const RecordHeader& r, std::byte* out);

// Where the reader is in the record sequence: records come in increasing
// chunk order, RESIZE only first.
struct RecordOrder {
  bool any_record = false;
  uint64_t next_chunk = 0;
};

// Checks the record at the start of `rest` (the remaining record bytes of a
// segment): type, reserved bytes, that it fits in `rest`, its range within
// the target size and its order. Advances `order`.
absl::StatusOr<RecordHeader> DecodeRecord(std::span<const std::byte> rest,
                                          const DeltaHeader& header,
                                          RecordOrder& order, uint64_t segment,
                                          uint64_t record_index);

struct DeltaEnd {
  uint64_t segment_count = 0;
  uint64_t record_count = 0;
  uint64_t chunks_written = 0;
  uint64_t chunks_cleared = 0;
  uint64_t record_bytes = 0;
  uint64_t stored_bytes = 0;
  uint64_t chain = 0;
  Digest target_digest;
};

void EncodeEnd(const DeltaEnd& e, std::span<std::byte, kEndBytes> out);
absl::StatusOr<DeltaEnd> DecodeEnd(std::span<const std::byte, kEndBytes> in,
                                   uint64_t stream_offset);

// Where an interrupted receive of one stream stands: everything up to
// segment `next_segment` is applied and committed on the receiver. A sender
// given the token re-sends the same header, then segments from
// `next_segment` on, holding the records for chunks `next_chunk` and after,
// with the chain seeded from `chain` and the end's totals counted from the
// ones here; records are absolute, so chunks applied again after a crash
// come out the same. The receiver keeps the token with its staging volume
// and checks that a resumed stream matches it.
struct ResumeToken {
  Guid target_guid{};
  Guid base_guid{};              // zero for a full delta
  uint64_t header_checksum = 0;  // of the stream's header: the same stream
  uint64_t next_segment = 0;
  uint64_t chain = 0;  // chain checksum of segment next_segment - 1
  uint64_t next_chunk = 0;
  bool any_record = false;  // a record came before (RESIZE only first)
  // Totals of segments [0, next_segment).
  uint64_t records = 0;
  uint64_t chunks_written = 0;
  uint64_t chunks_cleared = 0;
  uint64_t record_bytes = 0;
  uint64_t stored_bytes = 0;

  bool operator==(const ResumeToken&) const = default;
};
std::string EncodeResumeToken(const ResumeToken& t);
// DataLoss if `in` is not a token of this version.
absl::StatusOr<ResumeToken> DecodeResumeToken(std::span<const std::byte> in);

}  // namespace engine

#endif  // TANDEM_ENGINE_DELTA_FORMAT_H_
