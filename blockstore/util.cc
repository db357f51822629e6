#include "blockstore/util.h"

#include <sys/mman.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace blockstore {

absl::Status ErrnoError(int err, absl::string_view context) {
  std::string msg = absl::StrCat(context, ": ", std::strerror(err));
  switch (err) {
    case ENOENT:
      return absl::NotFoundError(msg);
    case EEXIST:
      return absl::AlreadyExistsError(msg);
    case EACCES:
    case EPERM:
      return absl::PermissionDeniedError(msg);
    case ENOSPC:
    case EDQUOT:
    case ENOMEM:
      return absl::ResourceExhaustedError(msg);
    case EINVAL:
    case ENOTDIR:
    case EISDIR:
      return absl::InvalidArgumentError(msg);
    case EAGAIN:
    case EBUSY:
      return absl::UnavailableError(msg);
    case ENOSYS:
    case EOPNOTSUPP:
      return absl::UnimplementedError(msg);
    default:
      // EIO and the rest: the device failed us; nothing the caller did.
      return absl::DataLossError(msg);
  }
}

absl::StatusOr<uint64_t> ParseSize(absl::string_view text,
                                   absl::string_view what) {
  absl::string_view s = absl::StripAsciiWhitespace(text);
  auto bad = [&] {
    return absl::InvalidArgumentError(absl::StrCat(
        "bad ", what, " '", text,
        "': expected a number of bytes with an optional K, M, G or T suffix"));
  };
  if (s.empty()) return bad();
  // Optional "B" / "iB" after the multiplier.
  if (absl::EndsWithIgnoreCase(s, "ib")) {
    s.remove_suffix(2);
  } else if (s.size() > 1 && (s.back() == 'B' || s.back() == 'b')) {
    s.remove_suffix(1);
  }
  uint64_t mult = 1;
  if (!s.empty()) {
    switch (absl::ascii_toupper(s.back())) {
      case 'K':
        mult = 1ull << 10;
        break;
      case 'M':
        mult = 1ull << 20;
        break;
      case 'G':
        mult = 1ull << 30;
        break;
      case 'T':
        mult = 1ull << 40;
        break;
      case 'P':
        mult = 1ull << 50;
        break;
      default:
        break;
    }
    if (mult != 1) s.remove_suffix(1);
  }
  if (s.empty() || !(absl::ascii_isdigit(s[0]))) return bad();
  uint64_t whole = 0;
  if (absl::SimpleAtoi(s, &whole)) {
    if (whole > UINT64_MAX / mult) return bad();
    return whole * mult;
  }
  double d = 0;
  if (mult == 1 || !absl::SimpleAtod(s, &d) || !std::isfinite(d) || d < 0) {
    return bad();
  }
  long double v = static_cast<long double>(d) * mult;
  if (v >= 18446744073709551615.0L) return bad();
  return static_cast<uint64_t>(v);
}

std::string FormatBytes(uint64_t bytes) {
  static constexpr const char* kUnits[] = {"B",   "KiB", "MiB",
                                           "GiB", "TiB", "PiB"};
  if (bytes < 1024) return absl::StrCat(bytes, " B");
  double v = static_cast<double>(bytes);
  int unit = 0;
  while (v >= 1024 && unit < 5) {
    v /= 1024;
    ++unit;
  }
  if (v == std::floor(v)) return absl::StrFormat("%.0f %s", v, kUnits[unit]);
  return absl::StrFormat("%.2f %s", v, kUnits[unit]);
}

std::string Hex(std::span<const std::byte> data) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out;
  out.reserve(data.size() * 2);
  for (std::byte b : data) {
    out.push_back(kDigits[static_cast<uint8_t>(b) >> 4]);
    out.push_back(kDigits[static_cast<uint8_t>(b) & 15]);
  }
  return out;
}

absl::StatusOr<std::vector<std::byte>> Unhex(absl::string_view hex) {
  if (hex.size() % 2 != 0) {
    return absl::InvalidArgumentError("hex of an odd length");
  }
  std::vector<std::byte> out(hex.size() / 2);
  for (size_t i = 0; i < out.size(); ++i) {
    int v = 0;
    for (char ch : hex.substr(2 * i, 2)) {
      int d = ch >= '0' && ch <= '9'   ? ch - '0'
              : ch >= 'a' && ch <= 'f' ? ch - 'a' + 10
              : ch >= 'A' && ch <= 'F' ? ch - 'A' + 10
                                       : -1;
      if (d < 0) return absl::InvalidArgumentError("not hex");
      v = v * 16 + d;
    }
    out[i] = static_cast<std::byte>(v);
  }
  return out;
}

namespace {
constexpr size_t kHugePage = size_t{2} << 20;
}  // namespace

std::byte* AllocateAligned(size_t size_bytes, size_t huge_from) {
  size_t align = kIoAlign;
  size_t alloc = RoundUp(size_bytes == 0 ? 1 : size_bytes, kIoAlign);
  if (alloc >= huge_from) {
    align = kHugePage;
    alloc = RoundUp(alloc, kHugePage);
  }
  void* p = std::aligned_alloc(align, alloc);
  if (p == nullptr) std::abort();
  // Best effort: without huge pages it is 4 KiB pages, as without asking.
  if (align == kHugePage) madvise(p, alloc, MADV_HUGEPAGE);
  return static_cast<std::byte*>(p);
}

AlignedBuffer::AlignedBuffer(size_t size_bytes)
    : data_(AllocateAligned(size_bytes)), size_(size_bytes) {
  // Up to the next kIoAlign, as a whole-block I/O of it reads.
  std::memset(data_.get(), 0,
              RoundUp(size_bytes == 0 ? 1 : size_bytes, kIoAlign));
}

AlignedBuffer AlignedBuffer::Uninitialized(size_t size_bytes,
                                           size_t huge_from) {
  AlignedBuffer b;
  b.data_.reset(AllocateAligned(size_bytes, huge_from));
  b.size_ = size_bytes;
  return b;
}

void AlignedBuffer::Free::operator()(std::byte* p) const { std::free(p); }

AlignedBuffer BufferRecycler::Take() {
  {
    std::lock_guard lock(mu_);
    if (!free_.empty()) {
      AlignedBuffer b = std::move(free_.back());
      free_.pop_back();
      return b;
    }
  }
  return AlignedBuffer::Uninitialized(size_);
}

void BufferRecycler::Give(AlignedBuffer buffer) {
  if (buffer.size() != size_) return;  // not one of ours: freed
  std::lock_guard lock(mu_);
  free_.push_back(std::move(buffer));
}

SlotArena::SlotArena(size_t slot_bytes)
    : slot_bytes_(RoundUp(std::max(slot_bytes, sizeof(FreeSlot)),
                          alignof(std::max_align_t))) {
  if (slot_bytes_ > kHugePage) std::abort();
}

SlotArena::~SlotArena() {
  for (std::byte* block : blocks_) std::free(block);
}

void* SlotArena::Take() {
  std::lock_guard lock(mu_);
  if (free_ != nullptr) {
    FreeSlot* slot = free_;
    free_ = slot->next;
    return slot;
  }
  if (static_cast<size_t>(carve_end_ - carve_) < slot_bytes_) {
    carve_ = AllocateAligned(kHugePage);  // a 2 MiB boundary, huge pages
    carve_end_ = carve_ + kHugePage;
    blocks_.push_back(carve_);
  }
  void* slot = carve_;
  carve_ += slot_bytes_;
  return slot;
}

void SlotArena::Give(void* slot) {
  std::lock_guard lock(mu_);
  free_ = new (slot) FreeSlot{free_};
}

size_t SlotArena::blocks() const {
  std::lock_guard lock(mu_);
  return blocks_.size();
}

bool IsAllZero(std::span<const std::byte> data) {
  if (data.empty()) return true;
  // Check a word first so typical non-zero data exits at once, then compare
  // the buffer with itself shifted by one: all equal and the first zero.
  if (data[0] != std::byte{0}) return false;
  return std::memcmp(data.data(), data.data() + 1, data.size() - 1) == 0;
}

}  // namespace blockstore
