#pragma once
// Stacks of fiber ranks carved out of one reserved memory mapping.
//
// Why: Boost's protected_fixedsize_stack maps each stack with a guard page,
// two memory mappings per fiber, and Linux caps a process's mappings
// (vm.max_map_count, 65530 by default): worlds of more than ~32000 fibers
// cannot start. A pool reserves count x stack_bytes at once (MAP_NORESERVE:
// pages are committed only as a fiber touches them) as one mapping, without
// guard pages: an overflow would run into the neighbouring fiber's stack, so
// each stack's lowest bytes hold a canary that is checked when its fiber
// ends, and the pool reports how deep each stack went (its resident pages).
//
// Thread-safety: a pool belongs to the World::run that made it; allocate and
// deallocate run on the fiber host thread.

#include <boost/context/stack_context.hpp>

#include <cstddef>
#include <cstdint>

namespace fsdpsim::sim {

class FiberStackPool {
 public:
  /// Throws std::runtime_error when the reservation fails.
  FiberStackPool(size_t count, size_t stack_bytes);
  ~FiberStackPool();
  FiberStackPool(const FiberStackPool&) = delete;
  FiberStackPool& operator=(const FiberStackPool&) = delete;

  size_t stack_bytes() const { return stack_bytes_; }
  /// False when something wrote into the lowest bytes of stack `index`.
  bool canary_intact(size_t index) const;
  /// The deepest any stack went: its resident pages, in bytes (mincore).
  size_t deepest_stack_bytes() const;
  /// Resident bytes of every stack together.
  size_t resident_bytes() const;

  /// Boost.Context's StackAllocator for stack `index`.
  class Allocator {
   public:
    Allocator(FiberStackPool& pool, size_t index) : pool_(&pool), index_(index) {}
    boost::context::stack_context allocate();
    void deallocate(boost::context::stack_context&) noexcept {}  // the pool unmaps all at once

   private:
    FiberStackPool* pool_;
    size_t index_;
  };

 private:
  char* stack_base(size_t index) const { return base_ + index * stack_bytes_; }
  size_t count_;
  size_t stack_bytes_;
  char* base_ = nullptr;
};

}  // namespace fsdpsim::sim
