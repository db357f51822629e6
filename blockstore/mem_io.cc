#include "blockstore/mem_io.h"

#include <algorithm>
#include <cstring>

#include "blockstore/util.h"

namespace blockstore {

MemIo::MemIo(uint64_t size_bytes) : size_(size_bytes / kIoAlign * kIoAlign) {}

void MemIo::Apply(std::map<uint64_t, Page>& image, uint64_t offset,
                  std::span<const std::byte> data) {
  // Offsets are page aligned but tears can end mid-page.
  size_t done = 0;
  while (done < data.size()) {
    uint64_t page = (offset + done) / kIoAlign;
    size_t in_page = (offset + done) % kIoAlign;
    size_t n = std::min(kIoAlign - in_page, data.size() - done);
    Page& p = image[page];
    if (p.empty()) p.assign(kIoAlign, std::byte{0});
    std::memcpy(p.data() + in_page, data.data() + done, n);
    done += n;
  }
}

void MemIo::CopyOut(const std::map<uint64_t, Page>& image, uint64_t offset,
                    std::span<std::byte> out) {
  for (size_t done = 0; done < out.size(); done += kIoAlign) {
    auto it = image.find((offset + done) / kIoAlign);
    if (it == image.end()) {
      std::memset(out.data() + done, 0, kIoAlign);
    } else {
      std::memcpy(out.data() + done, it->second.data(), kIoAlign);
    }
  }
}

absl::Status MemIo::Read(std::span<const ReadOp> ops) {
  MutexLock lock(mu_);
  for (const ReadOp& op : ops) {
    if (absl::Status s = CheckIoOp("read", "memory", op.offset_bytes,
                                   op.out.size(), op.out.data(), size_);
        !s.ok()) {
      return s;
    }
    CopyOut(current_, op.offset_bytes, op.out);
  }
  return absl::OkStatus();
}

absl::Status MemIo::Write(std::span<const WriteOp> ops) {
  MutexLock lock(mu_);
  for (const WriteOp& op : ops) {
    if (absl::Status s = CheckIoOp("write", "memory", op.offset_bytes,
                                   op.data.size(), op.data.data(), size_);
        !s.ok()) {
      return s;
    }
  }
  for (const WriteOp& op : ops) {
    Apply(current_, op.offset_bytes, op.data);
    pending_.push_back({op.offset_bytes, std::vector<std::byte>(
                                             op.data.begin(), op.data.end())});
  }
  return absl::OkStatus();
}

absl::Status MemIo::Flush() {
  MutexLock lock(mu_);
  for (const Pending& p : pending_) Apply(durable_, p.offset, p.data);
  pending_.clear();
  return absl::OkStatus();
}

absl::Status MemIo::Discard(std::span<const Extent> extents) {
  MutexLock lock(mu_);
  for (const Extent& e : extents) {
    if (absl::Status s = CheckIoOp("discard", "memory", e.offset_bytes,
                                   e.length_bytes, nullptr, size_);
        !s.ok()) {
      return s;
    }
    for (auto* image : {&current_, &durable_}) {
      image->erase(
          image->lower_bound(e.offset_bytes / kIoAlign),
          image->lower_bound((e.offset_bytes + e.length_bytes) / kIoAlign));
    }
  }
  return absl::OkStatus();
}

size_t MemIo::pending_writes() const {
  MutexLock lock(mu_);
  return pending_.size();
}

void MemIo::Crash(size_t keep_writes, size_t tear_bytes) {
  CrashKeeping([&](size_t i, size_t len) -> size_t {
    if (i < keep_writes) return len;
    if (i == keep_writes) return std::min(tear_bytes, len);
    return 0;
  });
}

void MemIo::CrashKeeping(const std::function<size_t(size_t, size_t)>& kept) {
  MutexLock lock(mu_);
  for (size_t i = 0; i < pending_.size(); ++i) {
    const Pending& p = pending_[i];
    size_t n = std::min(kept(i, p.data.size()), p.data.size());
    if (n < p.data.size()) n = n / 512 * 512;
    if (n > 0) Apply(durable_, p.offset, std::span(p.data).first(n));
  }
  pending_.clear();
  current_ = durable_;
}

std::unique_ptr<MemIo> MemIo::Clone() const {
  MutexLock lock(mu_);
  auto copy = std::make_unique<MemIo>(size_);
  MutexLock lock2(copy->mu_);
  copy->current_ = current_;
  copy->durable_ = durable_;
  copy->pending_ = pending_;
  return copy;
}

void MemIo::FlipBit(uint64_t offset_bytes, int bit) {
  MutexLock lock(mu_);
  for (auto* image : {&current_, &durable_}) {
    Page& p = (*image)[offset_bytes / kIoAlign];
    if (p.empty()) p.assign(kIoAlign, std::byte{0});
    p[offset_bytes % kIoAlign] ^= static_cast<std::byte>(1u << bit);
  }
}

std::vector<std::byte> MemIo::Peek(uint64_t offset_bytes, size_t len) const {
  MutexLock lock(mu_);
  std::vector<std::byte> out(RoundUp(len + offset_bytes % kIoAlign, kIoAlign));
  CopyOut(current_, offset_bytes / kIoAlign * kIoAlign, out);
  out.erase(out.begin(), out.begin() + offset_bytes % kIoAlign);
  out.resize(len);
  return out;
}

uint64_t MemIo::resident_bytes() const {
  MutexLock lock(mu_);
  return current_.size() * kIoAlign;
}

}  // namespace blockstore
