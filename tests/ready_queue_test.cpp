// sim::ReadyQueue, the fiber scheduler's ready queue: the seeded-random
// schedule must pick the same fibers as the std::deque it replaced (draw k =
// rng() % size, erase position k), so a seed replays the interleaving it
// always did; and a pick must cost O(log n) steps, not the deque's O(n).

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <deque>
#include <random>
#include <vector>

#include "sim/ready_queue.h"

namespace fsdpsim::sim {
namespace {

// The old scheduler's pick, kept here as the reference: index 0 unless
// seeded-random with more than one ready, then rng() % size; erase in place.
int reference_pick(std::deque<int>& ready, std::mt19937_64& rng, bool random) {
  size_t index = 0;
  if (random && ready.size() > 1) index = static_cast<size_t>(rng() % ready.size());
  const int picked = ready[index];
  ready.erase(ready.begin() + static_cast<std::ptrdiff_t>(index));
  return picked;
}

int queue_pick(ReadyQueue<int>& ready, std::mt19937_64& rng, bool random) {
  size_t index = 0;
  if (random && ready.size() > 1) index = static_cast<size_t>(rng() % ready.size());
  return ready.take(index);
}

// A scheduler's life: fibers wake (push) and get picked in bursts, the
// queue growing to `peak` and draining, several times over.
void expect_same_picks(uint64_t seed, bool random, int peak, bool any_position = true) {
  std::mt19937_64 ref_rng(seed), rng(seed), shape(seed ^ 0x5eedULL);
  std::deque<int> reference;
  ReadyQueue<int> queue(any_position);
  int next = 0;
  size_t picks = 0;
  for (int wave = 0; wave < 4; ++wave) {
    while (static_cast<int>(reference.size()) < peak) {
      const int burst = 1 + static_cast<int>(shape() % 7);
      for (int i = 0; i < burst; ++i) {
        reference.push_back(next);
        queue.push_back(next++);
      }
      if (shape() % 3 == 0) {  // a pick in between: the woken fiber runs
        ASSERT_EQ(queue_pick(queue, rng, random), reference_pick(reference, ref_rng, random)) << "pick " << picks;
        ++picks;
      }
    }
    while (!reference.empty()) {
      ASSERT_EQ(queue.size(), reference.size());
      ASSERT_EQ(queue_pick(queue, rng, random), reference_pick(reference, ref_rng, random))
          << "seed " << seed << " pick " << picks;
      ++picks;
    }
    EXPECT_TRUE(queue.empty());
  }
}

TEST(ReadyQueue, SeededRandomPicksMatchTheDequeErase) {
  for (uint64_t seed : {0ULL, 1ULL, 7ULL, 12345ULL, 0xdeadbeefULL}) {
    expect_same_picks(seed, /*random=*/true, 300);
  }
}

TEST(ReadyQueue, RoundRobinIsFifo) {
  expect_same_picks(3, /*random=*/false, 300);
  expect_same_picks(3, /*random=*/false, 300, /*any_position=*/false);
}

// The round-robin scheduler's queue: FIFO only, O(1) per operation, and a
// pick anywhere but the front is refused rather than answered wrongly.
TEST(ReadyQueue, FifoOnlyQueueIsConstantCost) {
  constexpr int kFibers = 4096;
  ReadyQueue<int> queue(/*any_position=*/false);
  for (int i = 0; i < kFibers; ++i) queue.push_back(i);
  const uint64_t before = queue.steps();
  for (int i = 0; i < 20 * kFibers; ++i) queue.push_back(queue.take(0));
  EXPECT_LE(static_cast<double>(queue.steps() - before) / (20 * kFibers), 4.0) << "steps per pick + push";
  EXPECT_EQ(queue.take(0), 20 * kFibers % kFibers);
  EXPECT_THROW(queue.take(1), std::logic_error);
}

TEST(ReadyQueue, TakeFromEveryPositionKeepsTheRestInOrder) {
  for (size_t k = 0; k < 5; ++k) {
    ReadyQueue<int> queue;
    std::vector<int> expected;
    for (int i = 0; i < 5; ++i) queue.push_back(i);
    for (int i = 0; i < 5; ++i) {
      if (static_cast<size_t>(i) != k) expected.push_back(i);
    }
    EXPECT_EQ(queue.take(k), static_cast<int>(k));
    std::vector<int> rest;
    while (!queue.empty()) rest.push_back(queue.take(0));
    EXPECT_EQ(rest, expected);
  }
  ReadyQueue<int> queue;
  queue.push_back(1);
  EXPECT_THROW(queue.take(1), std::out_of_range);
}

// 4096 ready fibers, each picked at a random position then woken again: the
// deque erase moved ~n/2 pointers per pick (~2k at this size); the queue
// must stay within a few dozen steps per operation (log2 4096 = 12 per
// search and per tree update, plus amortised compaction).
TEST(ReadyQueue, PickCostIsLogarithmic) {
  constexpr int kFibers = 4096;
  constexpr int kOps = 20 * kFibers;
  ReadyQueue<int> queue;
  std::mt19937_64 rng(42);
  for (int i = 0; i < kFibers; ++i) queue.push_back(i);
  const uint64_t before = queue.steps();
  for (int i = 0; i < kOps; ++i) {
    const int fiber = queue.take(static_cast<size_t>(rng() % queue.size()));
    queue.push_back(fiber);
  }
  const double per_op = static_cast<double>(queue.steps() - before) / kOps;
  EXPECT_LE(per_op, 4 * std::log2(kFibers)) << "steps per pick + push";
  EXPECT_EQ(queue.size(), static_cast<size_t>(kFibers));
}

}  // namespace
}  // namespace fsdpsim::sim
