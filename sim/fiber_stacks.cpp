#include "sim/fiber_stacks.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace fsdpsim::sim {

namespace {

constexpr uint64_t kCanary = 0x5a17f1b3c0ffee11ULL;
constexpr size_t kCanaryWords = 8;  // 64 bytes at the bottom of each stack

size_t page_size() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }

}  // namespace

FiberStackPool::FiberStackPool(size_t count, size_t stack_bytes) : count_(count) {
  const size_t page = page_size();
  stack_bytes_ = (stack_bytes + page - 1) / page * page;
  const size_t total = count_ * stack_bytes_;
  void* base = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (base == MAP_FAILED) {
    throw std::runtime_error("cannot reserve " + std::to_string(total >> 20) + " MiB for " + std::to_string(count) +
                             " fiber stacks of " + std::to_string(stack_bytes_ >> 10) + " KiB: " +
                             std::strerror(errno) + " (a smaller fiber_stack_bytes, or a higher address-space limit)");
  }
  base_ = static_cast<char*>(base);
  // Huge pages would commit 2 MiB wherever a fiber touches its first bytes.
  madvise(base_, total, MADV_NOHUGEPAGE);
}

FiberStackPool::~FiberStackPool() { munmap(base_, count_ * stack_bytes_); }

boost::context::stack_context FiberStackPool::Allocator::allocate() {
  char* bottom = pool_->stack_base(index_);
  auto* words = reinterpret_cast<uint64_t*>(bottom);
  for (size_t i = 0; i < kCanaryWords; ++i) words[i] = kCanary;
  boost::context::stack_context context;
  context.size = pool_->stack_bytes_;
  context.sp = bottom + pool_->stack_bytes_;  // stacks grow down
  return context;
}

bool FiberStackPool::canary_intact(size_t index) const {
  const auto* words = reinterpret_cast<const uint64_t*>(stack_base(index));
  for (size_t i = 0; i < kCanaryWords; ++i) {
    if (words[i] != kCanary) return false;
  }
  return true;
}

// Resident pages per stack, from the top: a stack is touched contiguously
// downwards from its top, plus the canary page at its bottom.
size_t FiberStackPool::deepest_stack_bytes() const {
  const size_t page = page_size();
  const size_t pages = stack_bytes_ / page;
  std::vector<unsigned char> resident(count_ * pages);
  if (mincore(base_, count_ * stack_bytes_, resident.data()) != 0) return 0;
  size_t deepest = 0;
  for (size_t s = 0; s < count_; ++s) {
    const unsigned char* p = resident.data() + s * pages;
    size_t depth = 0;
    for (size_t k = pages; k-- > 1;) {  // page 0 holds the canary
      if ((p[k] & 1) == 0) break;
      ++depth;
    }
    deepest = std::max(deepest, depth * page);
  }
  return deepest;
}

size_t FiberStackPool::resident_bytes() const {
  const size_t page = page_size();
  std::vector<unsigned char> resident(count_ * stack_bytes_ / page);
  if (mincore(base_, count_ * stack_bytes_, resident.data()) != 0) return 0;
  size_t pages = 0;
  for (unsigned char r : resident) pages += r & 1;
  return pages * page;
}

}  // namespace fsdpsim::sim
