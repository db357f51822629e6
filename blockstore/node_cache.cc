#include "blockstore/node_cache.h"

#include "absl/strings/str_cat.h"
#include "blockstore/util.h"

namespace blockstore {

NodeRef AllocateNode() {
  return std::allocate_shared<Node>(ArenaAllocator<Node>());
}

absl::StatusOr<NodeRef> DecodeTreeNode(
    const Superblock& shape, uint64_t id, int level,
    std::span<const std::byte, kNodeSize> raw) {
  absl::StatusOr<NodeHeader> h = OpenNode(raw, id);
  if (!h.ok()) return h.status();
  if (h->kind != NodeKind::kTree || h->level != level) {
    return absl::DataLossError(absl::StrCat(
        "metadata node ", id, ": expected a tree node at level ", level));
  }
  NodeRef node = AllocateNode();
  node->id = id;
  node->birth = h->birth;
  node->level = level;
  DecodeEntries(raw, node->e);
  for (const Entry& e : node->e) {
    bool ok = level == 0 ? (!IsDataPtr(e.ptr) ||
                            (e.ptr >= shape.data_start &&
                             e.ptr < shape.data_start + shape.data_count))
                         : (e.ptr == 0 ||
                            (e.ptr >= shape.meta_start &&
                             e.ptr < shape.meta_start + shape.meta_count));
    if (!ok) {
      return absl::DataLossError(absl::StrCat(
          "metadata node ", id, ": pointer ", e.ptr, " out of range"));
    }
  }
  return node;
}

Node* NodeCache::Find(uint64_t id) {
  auto it = nodes_.find(id);
  if (it == nodes_.end()) return nullptr;
  Node& n = *it->second;
  if (n.in_lru) lru_.splice(lru_.begin(), lru_, n.lru);
  return &n;
}

Node* NodeCache::Insert(NodeRef node) {
  Node& n = *node;
  n.in_lru = false;
  if (n.dirty) ++dirty_;
  nodes_.emplace(n.id, std::move(node));
  Place(n);
  return &n;
}

void NodeCache::Erase(uint64_t id) {
  auto it = nodes_.find(id);
  if (it == nodes_.end()) return;
  Node& n = *it->second;
  if (n.in_lru) lru_.erase(n.lru);
  if (n.dirty) --dirty_;
  nodes_.erase(it);
}

void NodeCache::Freeze(Node& node) {
  if (node.dirty) --dirty_;
  node.dirty = false;
  node.unwritten = true;
  Place(node);
}

void NodeCache::Written(Node& node) {
  node.unwritten = false;
  Place(node);
}

std::vector<Node*> NodeCache::Dirty() {
  std::vector<Node*> out;
  out.reserve(dirty_);
  for (auto& [id, n] : nodes_) {
    if (n->dirty) out.push_back(n.get());
  }
  return out;
}

void NodeCache::Place(Node& n) {
  bool want = Evictable(n);
  if (want == n.in_lru) return;
  if (want) {
    lru_.push_front(n.id);
    n.lru = lru_.begin();
  } else {
    lru_.erase(n.lru);
  }
  n.in_lru = want;
}

void NodeCache::Trim(size_t max_nodes) {
  while (nodes_.size() > max_nodes && !lru_.empty()) {
    uint64_t id = lru_.back();
    lru_.pop_back();
    nodes_.erase(id);
  }
}

}  // namespace blockstore
