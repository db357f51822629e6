#include "blockstore/space_map.h"

#include <algorithm>
#include <bit>
#include <cstring>
#include <limits>

#include "blockstore/util.h"

namespace blockstore {

SpaceMap::SpaceMap(const Superblock& shape) { Reset(shape); }

void SpaceMap::Reset(const Superblock& shape) {
  shape_ = shape;
  uint64_t total = shape.meta_count + shape.data_count;
  counts_.assign(total, 0);
  state_.assign(total, kInUseOrFree);
  reuse_.assign(total, false);
  reusable_.clear();
  dirty_pages_.clear();
  node_cursor_ = chunk_cursor_ = 0;
  // Every count 0 and every block free: no need to look.
  used_nodes_ = used_chunks_ = 0;
  free_nodes_ = shape.meta_count;
  free_chunks_ = shape.data_count;
}

void SpaceMap::LoadPage(uint64_t page, std::span<const std::byte, 4096> raw) {
  const uint64_t first = page * kCountsPerPage;
  if (first >= counts_.size()) return;
  const uint64_t n = std::min(kCountsPerPage, counts_.size() - first);
  const std::byte* in = raw.data() + 16;
  if constexpr (std::endian::native == std::endian::little) {
    std::memcpy(counts_.data() + first, in, 4 * n);  // the format's order
  } else {
    for (uint64_t i = 0; i < n; ++i) counts_[first + i] = GetLe32(in + 4 * i);
  }
}

void SpaceMap::SetCounts(std::span<const uint32_t> counts) {
  counts_.assign(counts.begin(), counts.end());
  reuse_.assign(counts_.size(), false);
  reusable_.clear();
}

void SpaceMap::Recount() {
  // A pool's table has a count for every block of the device (about 760,000
  // for 24 GiB) and every read-write open recounts it all: two passes the
  // compiler vectorizes, over the counts (which are 0), then over the
  // states 8 at a time (nearly all kInUseOrFree, i.e. 0), looking closer only
  // where a word is not 0. (One pass testing both was 1.4 ms of a
  // snapshot's 18 ms of CPU.)
  const uint32_t* counts = counts_.data();
  const State* state = state_.data();
  static_assert(sizeof(State) == 1 && kInUseOrFree == 0);
  auto tally = [&](uint64_t from, uint64_t to, uint64_t& used, uint64_t& free) {
    uint64_t zero = 0;
    for (uint64_t i = from; i < to; ++i) zero += counts[i] == 0;
    uint64_t zero_not_free = 0;  // count 0 but held, deferred or reserved
    uint64_t i = from;
    for (; i + 8 <= to; i += 8) {
      uint64_t word;
      std::memcpy(&word, state + i, 8);
      if (word == 0) continue;
      for (uint64_t k = i; k < i + 8; ++k) {
        zero_not_free += counts[k] == 0 && state[k] != kInUseOrFree;
      }
    }
    for (; i < to; ++i) {
      zero_not_free += counts[i] == 0 && state[i] != kInUseOrFree;
    }
    used = (to - from) - zero;
    free = zero - zero_not_free;
  };
  tally(0, shape_.meta_count, used_nodes_, free_nodes_);
  tally(shape_.meta_count, counts_.size(), used_chunks_, free_chunks_);
}

void SpaceMap::Set(uint64_t index, uint32_t count) {
  uint32_t old = counts_[index];
  counts_[index] = count;
  bool is_node = IsNodeIndex(index);
  if (old == 0 && count != 0) ++(is_node ? used_nodes_ : used_chunks_);
  if (old != 0 && count == 0) --(is_node ? used_nodes_ : used_chunks_);
  dirty_pages_.insert(index / kCountsPerPage);
}

uint32_t SpaceMap::Drop(uint64_t index, Freed why) {
  uint32_t left = counts_[index] - 1;
  Set(index, left);
  if (left == 0) {
    state_[index] = kHeld;
    held_.push_back(index);
    reuse_[index] = why == Freed::kReuse && !IsNodeIndex(index);
  }
  return left;
}

void SpaceMap::MakeFree(uint64_t index) {
  state_[index] = kInUseOrFree;
  if (counts_[index] != 0) return;
  if (IsNodeIndex(index)) {
    ++free_nodes_;
    return;
  }
  ++free_chunks_;
  if (reuse_[index]) {
    reusable_.push_back(index);
  } else {
    freed_chunks_.push_back(AddressOf(index));
  }
}

std::optional<uint64_t> SpaceMap::AllocNode() {
  if (free_nodes_ == 0) return std::nullopt;
  for (uint64_t n = 0; n < shape_.meta_count; ++n) {
    uint64_t i = (node_cursor_ + n) % shape_.meta_count;
    if (Free(i)) {
      node_cursor_ = i + 1;
      Set(i, 1);
      --free_nodes_;
      return shape_.meta_start + i;
    }
  }
  return std::nullopt;
}

std::optional<uint64_t> SpaceMap::ReserveChunk() {
  if (free_chunks_ == 0) return std::nullopt;
  while (!reusable_.empty()) {
    uint64_t i = reusable_.front();
    reusable_.pop_front();
    if (Free(i) && reuse_[i]) return Reserve(i);
  }
  for (uint64_t n = 0; n < shape_.data_count; ++n) {
    uint64_t c = (chunk_cursor_ + n) % shape_.data_count;
    uint64_t i = shape_.meta_count + c;
    if (Free(i)) {
      chunk_cursor_ = c + 1;
      return Reserve(i);
    }
  }
  return std::nullopt;
}

uint64_t SpaceMap::Reserve(uint64_t index) {
  reuse_[index] = false;
  state_[index] = kReserved;
  --free_chunks_;
  ++reserved_chunks_;
  return AddressOf(index);
}

void SpaceMap::Install(uint64_t phys) {
  uint64_t i = ChunkIndex(phys);
  state_[i] = kInUseOrFree;
  --reserved_chunks_;
  Set(i, 1);
}

void SpaceMap::Unreserve(uint64_t phys) {
  uint64_t i = ChunkIndex(phys);
  --reserved_chunks_;
  state_[i] = kInUseOrFree;
  ++free_chunks_;
}

SpaceMap::Frees SpaceMap::TakeHeld() {
  Frees out{std::move(held_)};
  held_.clear();
  return out;
}

void SpaceMap::Release(Frees frees) {
  for (uint64_t i : frees.index) state_[i] = kDeferred;
  deferred_.push_back({epoch_++, std::move(frees.index)});
  (void)ReleaseDeferred();
}

uint64_t SpaceMap::BeginRead() {
  ++readers_[epoch_];
  ++reader_count_;
  return epoch_;
}

bool SpaceMap::EndRead(uint64_t ticket) {
  auto it = readers_.find(ticket);
  if (--it->second == 0) readers_.erase(it);
  --reader_count_;
  return ReleaseDeferred();
}

bool SpaceMap::ReleaseDeferred() {
  // A batch released at epoch E may still be read by readers whose ticket
  // is <= E (they began before); none of them is left once the oldest
  // ticket is newer.
  const uint64_t oldest = readers_.empty()
                              ? std::numeric_limits<uint64_t>::max()
                              : readers_.begin()->first;
  bool freed = false;
  while (!deferred_.empty() && deferred_.front().epoch < oldest) {
    // Each batch's reusable chunks in address order, so that a large write
    // taking several gets adjacent ones (one request, not many).
    const size_t reusable_before = reusable_.size();
    for (uint64_t i : deferred_.front().index) MakeFree(i);
    std::sort(reusable_.begin() + reusable_before, reusable_.end());
    freed = freed || !deferred_.front().index.empty();
    deferred_.pop_front();
  }
  return freed;
}

std::vector<uint64_t> SpaceMap::TakeFreedChunks() {
  std::vector<uint64_t> out = std::move(freed_chunks_);
  freed_chunks_.clear();
  return out;
}

std::vector<std::pair<uint64_t, uint64_t>> SpaceMap::BeginDiscard(
    std::vector<uint64_t> freed, uint64_t min_chunks) {
  // A lone chunk among live ones stays: punching it costs the file system a
  // metadata operation and fragments the file, and it is soon reused; once
  // its neighbours are free too, the run goes. Neighbours are looked at no
  // further than one run on each side.
  const uint64_t first = shape_.meta_count, end = counts_.size();
  for (uint64_t& phys : freed) phys = ChunkIndex(phys);
  std::sort(freed.begin(), freed.end());
  std::vector<std::pair<uint64_t, uint64_t>> runs;  // flat indices
  uint64_t covered = first;  // indices below this are in `runs`
  for (uint64_t i : freed) {
    if (i < covered || !Discardable(i)) continue;
    uint64_t lo = i, hi = i + 1;
    while (lo > std::max(first, covered) && i - lo < min_chunks &&
           Discardable(lo - 1)) {
      --lo;
    }
    while (hi < end && hi - i < min_chunks && Discardable(hi)) ++hi;
    if (!runs.empty() && runs.back().second == lo) {
      runs.back().second = hi;  // the run before goes on
    } else if (hi - lo >= min_chunks) {
      runs.emplace_back(lo, hi);
    } else {
      continue;
    }
    covered = hi;
  }
  for (auto& [lo, hi] : runs) {
    for (uint64_t i = lo; i < hi; ++i) state_[i] = kReserved;
    free_chunks_ -= hi - lo;
    lo = AddressOf(lo);
    hi = AddressOf(hi - 1) + 1;
  }
  return runs;
}

void SpaceMap::EndDiscard(std::span<const std::pair<uint64_t, uint64_t>> runs) {
  for (const auto& [lo, hi] : runs) {
    for (uint64_t phys = lo; phys < hi; ++phys) {
      state_[ChunkIndex(phys)] = kInUseOrFree;
    }
    free_chunks_ += hi - lo;
  }
}

std::vector<uint64_t> SpaceMap::TakeDirtyPages() {
  std::vector<uint64_t> out(dirty_pages_.begin(), dirty_pages_.end());
  dirty_pages_.clear();
  std::sort(out.begin(), out.end());
  return out;
}

void SpaceMap::EncodePage(uint64_t page, std::span<std::byte, 4096> out) const {
  for (uint64_t k = 0; k < kCountsPerPage; ++k) {
    uint64_t index = page * kCountsPerPage + k;
    PutLe32(out.data() + 16 + 4 * k,
            index < counts_.size() ? counts_[index] : 0);
  }
  SealRefcountPage(page, out);
}

}  // namespace blockstore
