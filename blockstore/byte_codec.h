// Little-endian encoding of fixed-width integers and short strings, for the
// catalog and the delta header. The reader is bounds-checked: the first
// read past the end makes ok() false and every later read return zeros.
#ifndef TANDEM_BLOCKSTORE_BYTE_CODEC_H_
#define TANDEM_BLOCKSTORE_BYTE_CODEC_H_

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>

#include "absl/strings/string_view.h"
#include "blockstore/util.h"

namespace blockstore {

class ByteWriter {
 public:
  void U16(uint16_t v) {
    char b[2] = {static_cast<char>(v), static_cast<char>(v >> 8)};
    out_.append(b, 2);
  }
  void U32(uint32_t v) {
    std::byte b[4];
    PutLe32(b, v);
    Raw(b, 4);
  }
  void U64(uint64_t v) {
    std::byte b[8];
    PutLe64(b, v);
    Raw(b, 8);
  }
  void Raw(const void* p, size_t n) {
    out_.append(static_cast<const char*>(p), n);
  }
  void Bytes(std::span<const std::byte> b) { Raw(b.data(), b.size()); }
  // u16 length + bytes; callers keep strings under 64 KiB.
  void Str(absl::string_view s) {
    U16(static_cast<uint16_t>(s.size()));
    Raw(s.data(), s.size());
  }
  std::string& bytes() { return out_; }
  std::string Take() { return std::move(out_); }

 private:
  std::string out_;
};

class ByteReader {
 public:
  explicit ByteReader(std::span<const std::byte> in) : in_(in) {}
  explicit ByteReader(absl::string_view in)
      : in_(reinterpret_cast<const std::byte*>(in.data()), in.size()) {}

  bool Take(void* out, size_t n) {
    if (!ok_ || n > in_.size() - pos_) {
      ok_ = false;
      return false;
    }
    std::memcpy(out, in_.data() + pos_, n);
    pos_ += n;
    return true;
  }
  uint16_t U16() {
    uint8_t b[2] = {};
    Take(b, 2);
    return static_cast<uint16_t>(b[0] | (b[1] << 8));
  }
  uint32_t U32() {
    std::byte b[4] = {};
    Take(b, 4);
    return GetLe32(b);
  }
  uint64_t U64() {
    std::byte b[8] = {};
    Take(b, 8);
    return GetLe64(b);
  }
  void Bytes(std::span<std::byte> out) { Take(out.data(), out.size()); }
  std::string Str() {
    uint16_t n = U16();
    std::string v(n, '\0');
    if (!Take(v.data(), n)) v.clear();
    return v;
  }
  bool ok() const { return ok_; }
  bool done() const { return pos_ == in_.size(); }
  size_t pos() const { return pos_; }

 private:
  std::span<const std::byte> in_;
  size_t pos_ = 0;
  bool ok_ = true;
};

}  // namespace blockstore

#endif  // TANDEM_BLOCKSTORE_BYTE_CODEC_H_
