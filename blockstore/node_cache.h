// The node cache: the pool's tree nodes in memory, decoded, and a bound on
// how many clean ones it keeps.
//
// A node is in one of three conditions:
//   dirty      changed by the open transaction, not yet on disk (a commit
//              writes it); modifiable in place while only one tree holds it;
//   unwritten  frozen by a commit whose write is in flight: not modifiable,
//              and not yet readable from disk;
//   clean      equal to its copy on disk.
// Only clean nodes are evicted, least recently used first, once the cache
// holds more than its bound; dirty and unwritten nodes (the transaction's
// working set, bounded by the pool's automatic commits) stay whatever the
// bound.
//
// Not thread-safe: the pool's lock guards it. Pointers it returns stay valid
// until the node is erased or evicted (Trim), so nobody keeps one across a
// release of the lock: an operation that reads nodes outside the lock keeps
// its own copies of them (Pool::Loaded) for as long as it runs.
#ifndef TANDEM_BLOCKSTORE_NODE_CACHE_H_
#define TANDEM_BLOCKSTORE_NODE_CACHE_H_

#include <array>
#include <cstdint>
#include <list>
#include <memory>
#include <span>
#include <unordered_map>
#include <vector>

#include "absl/status/statusor.h"
#include "blockstore/format.h"

namespace blockstore {

struct Node {
  uint64_t id = 0;  // its metadata block number
  uint64_t birth = 0;
  int level = 0;
  bool dirty = false;      // of the open transaction (see above)
  bool unwritten = false;  // frozen by a commit in flight
  bool stale = false;      // entry digests below may be out of date
  std::array<Entry, kFanout> e;

  // The cache's bookkeeping.
  bool in_lru = false;
  std::list<uint64_t>::iterator lru;
};

// Nodes are shared: a node read from disk is immutable (a change copies it
// to a new node) but for the cache's bookkeeping, so the cache and a walk
// that read it outside the lock (Pool::Loaded) hold the same one. Their
// memory comes from an arena on huge pages (SlotArena).
using NodeRef = std::shared_ptr<Node>;

// A new node, all entries zero.
NodeRef AllocateNode();

// Decodes the tree node `id` at `level` from its disk block, checking its
// checksum, kind, level and that every pointer lies in `shape`'s areas.
// DataLoss naming the node otherwise.
absl::StatusOr<NodeRef> DecodeTreeNode(
    const Superblock& shape, uint64_t id, int level,
    std::span<const std::byte, kNodeSize> raw);

class NodeCache {
 public:
  NodeCache() = default;
  NodeCache(const NodeCache&) = delete;
  NodeCache& operator=(const NodeCache&) = delete;

  // The node, or nullptr; a hit counts as a use.
  Node* Find(uint64_t id);
  bool Contains(uint64_t id) const { return nodes_.contains(id); }
  // Adds `node`, whose id must not be cached (nor in use by another node:
  // a node freed is erased before its id is allocated again); returns it.
  Node* Insert(NodeRef node);
  void Erase(uint64_t id);

  // A commit froze `node` (dirty -> unwritten), then wrote it (-> clean).
  void Freeze(Node& node);
  void Written(Node& node);

  // Dirty nodes, in no order.
  std::vector<Node*> Dirty();
  size_t dirty_count() const { return dirty_; }
  // Evicts clean nodes, least recently used first, until at most
  // `max_nodes` are cached (or none is evictable).
  void Trim(size_t max_nodes);
  // Evicts every clean node.
  void DropClean() { Trim(0); }
  size_t size() const { return nodes_.size(); }

 private:
  static bool Evictable(const Node& n) { return !n.dirty && !n.unwritten; }
  // Puts `node` in or out of the LRU list to match its condition.
  void Place(Node& node);

  std::unordered_map<uint64_t, NodeRef> nodes_;
  std::list<uint64_t> lru_;  // evictable ids, most recently used first
  size_t dirty_ = 0;
};

}  // namespace blockstore

#endif  // TANDEM_BLOCKSTORE_NODE_CACHE_H_
