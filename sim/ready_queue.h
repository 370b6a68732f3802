#pragma once
// The fiber scheduler's ready queue: a FIFO from which any position can be
// taken in O(log n), so the seeded-random schedule (take the k-th ready
// fiber, k drawn at random) picks the same fiber as erasing position k of a
// std::deque did, without the deque's O(n) erase at thousands of ranks.
//
// Layout: items sit in push order in `slots_` (taken ones are left as
// holes); a Fenwick tree over the slots counts the live ones, so the k-th
// live item is found by binary lifting. When the slots run out the live
// items are compacted to the front (amortised O(1) per push).
//
// Thread-safety: none; the scheduler's thread alone uses it.

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <vector>

namespace fsdpsim::sim {

template <typename T>
class ReadyQueue {
 public:
  /// `any_position` false: only take(0) (FIFO), and no tree to maintain.
  explicit ReadyQueue(bool any_position = true) : any_position_(any_position) {}

  size_t size() const { return live_; }
  bool empty() const { return live_ == 0; }

  void push_back(T item) {
    if (slots_.size() == capacity_) compact();
    const size_t slot = slots_.size();
    slots_.push_back(std::move(item));
    alive_.push_back(1);
    if (any_position_) add(slot, 1);
    ++live_;
  }

  /// Removes and returns the `k`-th item (0 = the oldest) in push order.
  T take(size_t k) {
    if (k >= live_) throw std::out_of_range("ReadyQueue::take: position past the end");
    if (k != 0 && !any_position_) throw std::logic_error("ReadyQueue::take: a FIFO-only queue takes position 0 only");
    const size_t slot = k == 0 ? first_live() : find(k);
    alive_[slot] = 0;
    if (any_position_) add(slot, -1);
    --live_;
    if (slot == head_) ++head_;
    return std::move(slots_[slot]);
  }

  /// Inner-loop steps taken so far (searches, tree updates, compactions):
  /// what a test counts to check the cost per operation stays logarithmic.
  uint64_t steps() const { return steps_; }

 private:
  // The oldest live slot; slots before head_ are all taken (each is passed once).
  size_t first_live() {
    while (!alive_[head_]) {
      ++head_;
      ++steps_;
    }
    return head_;
  }

  // The slot of the k-th live item: binary lifting down the Fenwick tree.
  size_t find(size_t k) {
    size_t pos = 0;
    size_t remaining = k + 1;
    for (size_t step = top_bit_; step > 0; step >>= 1) {
      ++steps_;
      if (pos + step <= capacity_ && tree_[pos + step] < remaining) {
        pos += step;
        remaining -= tree_[pos];
      }
    }
    return pos;  // 1-based pos + 1 is the slot, i.e. 0-based pos
  }

  void add(size_t slot, int delta) {
    for (size_t i = slot + 1; i <= capacity_; i += i & (~i + 1)) {
      tree_[i] = static_cast<size_t>(static_cast<std::ptrdiff_t>(tree_[i]) + delta);
      ++steps_;
    }
  }

  // Moves the live items to the front, in order, with room for as many
  // pushes again as there are live items (at least 16).
  void compact() {
    std::vector<T> live;
    live.reserve(live_);
    for (size_t s = head_; s < slots_.size(); ++s) {
      if (alive_[s]) live.push_back(std::move(slots_[s]));
      ++steps_;
    }
    slots_ = std::move(live);
    alive_.assign(slots_.size(), 1);
    capacity_ = 2 * slots_.size() + 16;
    slots_.reserve(capacity_);
    alive_.reserve(capacity_);
    head_ = 0;
    if (!any_position_) return;
    top_bit_ = 1;
    while (top_bit_ * 2 <= capacity_) top_bit_ *= 2;
    // O(capacity) build: each node passes its count to its parent.
    tree_.assign(capacity_ + 1, 0);
    for (size_t i = 1; i <= slots_.size(); ++i) tree_[i] = 1;
    for (size_t i = 1; i <= capacity_; ++i) {
      const size_t parent = i + (i & (~i + 1));
      if (parent <= capacity_) tree_[parent] += tree_[i];
      ++steps_;
    }
  }

  const bool any_position_;
  std::vector<T> slots_;
  std::vector<char> alive_;
  std::vector<size_t> tree_;  // 1-based Fenwick tree over slots_: live counts
  size_t capacity_ = 0;       // slots before the next compaction
  size_t top_bit_ = 0;        // highest power of two <= capacity_
  size_t head_ = 0;
  size_t live_ = 0;
  uint64_t steps_ = 0;
};

}  // namespace fsdpsim::sim
