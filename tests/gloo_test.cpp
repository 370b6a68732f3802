// Real Gloo behind fsdpsim::ProcessGroup (thread ranks in this process and
// separate processes via the launcher), the process launcher itself and
// `fsdpsim launch`.
//
// Inputs follow nccl-tests: value = f(rank, index), small integers, so every
// expected output is exact in every dtype and compared exactly.

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/distributed/c10d/HashStore.hpp>

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <optional>
#include <sstream>
#include <thread>

#include "backends/errors.h"
#include "backends/gloo/gloo_process_group.h"
#include "backends/observe/flight_recorder.h"
#include "backends/observe/observed_process_group.h"
#include "sim/fake_process_group.h"
#include "tests/worker_registry.h"
#include "tools/process_launcher.h"

namespace fsdpsim {
namespace {

using namespace std::chrono_literals;
using ::testing::HasSubstr;

// ---------------------------------------------------------------------------
// Checks shared by thread-rank tests and worker processes: each runs one
// collective and appends a description of every mismatch to `failures`.

using Failures = std::vector<std::string>;

const std::vector<at::ScalarType> kDtypes = {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf, at::kLong};
const std::vector<ReduceOp> kReduceOps = {ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Min, ReduceOp::Max};

// In [-8, 8]; differs by rank and index.
at::Tensor pattern(int rank, int64_t numel, at::ScalarType dtype) {
  at::Tensor index = at::arange(numel, at::kLong);
  return ((index * 7 + (rank * 5 + 3)).remainder(17) - 8).to(dtype);
}

std::string values_string(const at::Tensor& tensor) {
  std::ostringstream out;
  at::Tensor flat = tensor.reshape({-1}).to(at::kDouble);
  out << "[";
  for (int64_t i = 0; i < std::min<int64_t>(flat.numel(), 12); ++i) out << (i ? ", " : "") << flat[i].item<double>();
  if (flat.numel() > 12) out << ", ...";
  out << "]";
  return out.str();
}

std::string where(const ProcessGroup& pg, const std::string& what) {
  return "rank " + std::to_string(pg.rank()) + "/" + std::to_string(pg.size()) + " group " + pg.name() + ": " + what;
}

void expect_equal(Failures& failures, const std::string& what, const at::Tensor& actual, const at::Tensor& expected) {
  std::string problem;
  if (actual.scalar_type() != expected.scalar_type()) {
    problem =
        std::string("dtype ") + c10::toString(actual.scalar_type()) + " != " + c10::toString(expected.scalar_type());
  } else if (actual.sizes() != expected.sizes()) {
    problem = "shape differs";
  } else if (!at::equal(actual.to(at::kDouble), expected.to(at::kDouble))) {
    problem = "got " + values_string(actual) + " expected " + values_string(expected);
  }
  if (!problem.empty()) failures.push_back(what + ": " + problem);
}

std::string case_name(const char* op, at::ScalarType dtype, int64_t numel, const std::string& extra = "") {
  return std::string(op) + " " + c10::toString(dtype) + " numel " + std::to_string(numel) +
         (extra.empty() ? "" : " " + extra);
}

// Element-wise reduction over ranks of pattern(r, numel), exact in int64,
// then converted; Avg divides in the target dtype as the backends do.
at::Tensor reduced_pattern(int size, int64_t numel, ReduceOp op, at::ScalarType dtype) {
  at::Tensor acc = pattern(0, numel, at::kLong);
  for (int r = 1; r < size; ++r) {
    at::Tensor x = pattern(r, numel, at::kLong);
    acc = (op == ReduceOp::Min) ? at::minimum(acc, x) : (op == ReduceOp::Max) ? at::maximum(acc, x) : acc + x;
  }
  at::Tensor result = acc.to(dtype);
  if (op == ReduceOp::Avg) result.div_(size);
  return result;
}

void check_all_gather(ProcessGroup& pg, Failures& failures, at::ScalarType dtype, int64_t numel, bool in_place) {
  const std::string what = where(pg, case_name("all_gather", dtype, numel, in_place ? "in place" : ""));
  std::vector<at::Tensor> chunks;
  for (int r = 0; r < pg.size(); ++r) chunks.push_back(pattern(r, numel, dtype));
  at::Tensor expected = at::cat(chunks);
  at::Tensor output = at::full({pg.size() * numel}, 99, at::TensorOptions().dtype(dtype));
  at::Tensor input;
  if (in_place) {
    input = output.narrow(0, pg.rank() * numel, numel);
    input.copy_(pattern(pg.rank(), numel, dtype));
  } else {
    input = pattern(pg.rank(), numel, dtype);
  }
  pg.all_gather_into_tensor(output, input)->wait();
  expect_equal(failures, what, output, expected);
}

void check_reduce_scatter(ProcessGroup& pg, Failures& failures, at::ScalarType dtype, int64_t numel, ReduceOp op,
                          double predivide = 1.0, double postdivide = 1.0) {
  std::ostringstream extra;
  extra << "op " << to_string(op);
  if (predivide != 1.0 || postdivide != 1.0) extra << " predivide " << predivide << " postdivide " << postdivide;
  const std::string what = where(pg, case_name("reduce_scatter", dtype, numel, extra.str()));
  const int64_t total = pg.size() * numel;
  at::Tensor input = pattern(pg.rank(), total, dtype);
  at::Tensor output = at::full({numel}, 99, at::TensorOptions().dtype(dtype));
  ReduceScatterOptions options;
  options.reduce_op = op;
  options.predivide_factor = predivide;
  options.postdivide_factor = postdivide;
  pg.reduce_scatter_tensor(output, input, options)->wait();
  at::Tensor expected;
  if (predivide == 1.0 && postdivide == 1.0) {
    expected = reduced_pattern(pg.size(), total, op, dtype).narrow(0, pg.rank() * numel, numel);
  } else {
    // The documented arithmetic, in rank order and in the dtype.
    auto part = [&](int r) { return at::div(pattern(r, total, dtype).narrow(0, pg.rank() * numel, numel), predivide); };
    expected = part(0);
    for (int r = 1; r < pg.size(); ++r) expected.add_(part(r));
    expected.div_(postdivide);
  }
  expect_equal(failures, what, output, expected);
}

void check_all_reduce(ProcessGroup& pg, Failures& failures, at::ScalarType dtype, int64_t numel, ReduceOp op) {
  const std::string what = where(pg, case_name("all_reduce", dtype, numel, std::string("op ") + to_string(op)));
  at::Tensor tensor = pattern(pg.rank(), numel, dtype);
  AllReduceOptions options;
  options.reduce_op = op;
  pg.all_reduce(tensor, options)->wait();
  expect_equal(failures, what, tensor, reduced_pattern(pg.size(), numel, op, dtype));
}

void check_broadcast(ProcessGroup& pg, Failures& failures, at::ScalarType dtype, int64_t numel, int root) {
  const std::string what = where(pg, case_name("broadcast", dtype, numel, "root " + std::to_string(root)));
  at::Tensor tensor = pattern(pg.rank(), numel, dtype);
  BroadcastOptions options;
  options.root = root;
  pg.broadcast(tensor, options)->wait();
  expect_equal(failures, what, tensor, pattern(root, numel, dtype));
}

bool reducible(at::ScalarType dtype, ReduceOp op) { return op != ReduceOp::Avg || at::isFloatingType(dtype); }

// A quick pass over every collective and dtype (the process worker's body).
void check_everything(ProcessGroup& pg, Failures& failures, const std::vector<int64_t>& numels) {
  for (auto dtype : kDtypes) {
    for (int64_t numel : numels) {
      check_all_gather(pg, failures, dtype, numel, false);
      check_all_gather(pg, failures, dtype, numel, true);
      for (auto op : kReduceOps) {
        if (!reducible(dtype, op)) continue;
        check_reduce_scatter(pg, failures, dtype, numel, op);
        check_all_reduce(pg, failures, dtype, numel, op);
      }
      for (int root = 0; root < pg.size(); ++root) check_broadcast(pg, failures, dtype, numel, root);
    }
  }
  pg.barrier()->wait();
}

// ---------------------------------------------------------------------------
// Thread ranks

struct ThreadWorld {
  int size = 1;
  std::chrono::milliseconds timeout{20000};
  c10::intrusive_ptr<c10d::Store> store;  // default: a fresh HashStore
  std::string name = "world";
};

/// Runs body(pg) on one thread per rank, each with its own Gloo group; a
/// rank's exception becomes a test failure naming the rank.
void run_gloo_threads(const ThreadWorld& world, const std::function<void(ProcessGroup&)>& body) {
  c10::intrusive_ptr<c10d::Store> store = world.store;
  if (!store) store = c10::make_intrusive<c10d::HashStore>();
  std::vector<std::string> errors(world.size);
  std::vector<std::thread> threads;
  for (int rank = 0; rank < world.size; ++rank) {
    threads.emplace_back([&, rank] {
      at::set_num_threads(1);
      try {
        GlooOptions options;
        options.store = store;
        options.rank = rank;
        options.size = world.size;
        options.name = world.name;
        options.timeout = world.timeout;
        ProcessGroupPtr pg = make_gloo_process_group(options);
        body(*pg);
      } catch (const std::exception& e) {
        errors[rank] = e.what();
      }
    });
  }
  for (auto& thread : threads) thread.join();
  for (int rank = 0; rank < world.size; ++rank) {
    EXPECT_EQ(errors[rank], "") << "rank " << rank << " threw";
  }
}

/// Like run_gloo_threads, collecting Failures per rank and expecting none.
void run_checks(const ThreadWorld& world, const std::function<void(ProcessGroup&, Failures&)>& checks) {
  std::vector<Failures> failures(world.size);
  run_gloo_threads(world, [&](ProcessGroup& pg) { checks(pg, failures[pg.rank()]); });
  for (int rank = 0; rank < world.size; ++rank) {
    EXPECT_THAT(failures[rank], ::testing::IsEmpty()) << "rank " << rank;
  }
}

class GlooThreads : public ::testing::TestWithParam<int> {
 protected:
  ThreadWorld world() const {
    ThreadWorld w;
    w.size = GetParam();
    return w;
  }
};

TEST_P(GlooThreads, AllGatherEveryDtypeAndOddCounts) {
  run_checks(world(), [](ProcessGroup& pg, Failures& failures) {
    for (auto dtype : kDtypes) {
      for (int64_t numel : {0, 1, 7, 13}) {
        check_all_gather(pg, failures, dtype, numel, /*in_place=*/false);
        check_all_gather(pg, failures, dtype, numel, /*in_place=*/true);
      }
    }
  });
}

TEST_P(GlooThreads, AllGatherKeepsShapesOfMultiDimTensors) {
  run_checks(world(), [](ProcessGroup& pg, Failures& failures) {
    at::Tensor input = pattern(pg.rank(), 6, at::kFloat).view({2, 3});
    at::Tensor output = at::zeros({pg.size() * 2, 3});
    pg.all_gather_into_tensor(output, input)->wait();
    std::vector<at::Tensor> chunks;
    for (int r = 0; r < pg.size(); ++r) chunks.push_back(pattern(r, 6, at::kFloat).view({2, 3}));
    expect_equal(failures, "all_gather [2, 3]", output, at::cat(chunks));
  });
}

TEST_P(GlooThreads, DataMovementKeepsEveryBitPattern) {
  // bf16 travels as Half: NaN payloads, infinities and -0 must arrive as sent.
  run_checks(world(), [](ProcessGroup& pg, Failures& failures) {
    const int64_t n = 512;
    auto bits = [&](int rank) {
      return (at::arange(n, at::kInt) * 131 + rank * 7919).remainder(65536).sub(32768).to(at::kShort);
    };
    at::Tensor input = bits(pg.rank()).view(at::kBFloat16);
    at::Tensor output = at::empty({pg.size() * n}, at::kBFloat16);
    pg.all_gather_into_tensor(output, input)->wait();
    std::vector<at::Tensor> chunks;
    for (int r = 0; r < pg.size(); ++r) chunks.push_back(bits(r));
    if (!at::equal(output.view(at::kShort), at::cat(chunks))) failures.push_back("all_gather changed bf16 bits");
    at::Tensor flags = at::arange(7, at::kLong).remainder(2).to(at::kBool);
    if (pg.rank() == 0) flags = flags.logical_not();
    BroadcastOptions root0;
    pg.broadcast(flags, root0)->wait();
    if (!at::equal(flags, at::arange(7, at::kLong).remainder(2).to(at::kBool).logical_not())) {
      failures.push_back("broadcast of bool tensor");
    }
  });
}

TEST_P(GlooThreads, ReduceScatterEveryOpAndDtype) {
  run_checks(world(), [](ProcessGroup& pg, Failures& failures) {
    for (auto dtype : kDtypes) {
      for (auto op : kReduceOps) {
        if (!reducible(dtype, op)) continue;
        for (int64_t numel : {0, 1, 5}) check_reduce_scatter(pg, failures, dtype, numel, op);
      }
    }
  });
}

TEST_P(GlooThreads, ReduceScatterDivideFactors) {
  run_checks(world(), [](ProcessGroup& pg, Failures& failures) {
    for (auto dtype : {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf}) {
      // Powers of two keep the result exact: compare with the int64 sum.
      const int64_t numel = 9;
      at::Tensor input = pattern(pg.rank(), pg.size() * numel, dtype);
      at::Tensor output = at::empty({numel}, at::TensorOptions().dtype(dtype));
      ReduceScatterOptions options;
      options.predivide_factor = 2.0;
      options.postdivide_factor = 4.0;
      pg.reduce_scatter_tensor(output, input, options)->wait();
      at::Tensor sum = reduced_pattern(pg.size(), pg.size() * numel, ReduceOp::Sum, at::kLong);
      at::Tensor expected = (sum.narrow(0, pg.rank() * numel, numel).to(at::kDouble) / 8.0).to(dtype);
      expect_equal(failures, where(pg, case_name("reduce_scatter", dtype, numel, "/2 /4")), output, expected);
      // Inexact factors: the rank-order arithmetic of the header.
      check_reduce_scatter(pg, failures, dtype, numel, ReduceOp::Sum, 3.0, 1.5);
    }
  });
}

TEST_P(GlooThreads, AllReduceEveryOpAndDtype) {
  run_checks(world(), [](ProcessGroup& pg, Failures& failures) {
    for (auto dtype : kDtypes) {
      for (auto op : kReduceOps) {
        if (!reducible(dtype, op)) continue;
        for (int64_t numel : {0, 1, 9}) check_all_reduce(pg, failures, dtype, numel, op);
      }
    }
  });
}

TEST_P(GlooThreads, AvgOfIntegersIsRejectedAtTheCall) {
  run_gloo_threads(world(), [](ProcessGroup& pg) {
    at::Tensor tensor = pattern(pg.rank(), 4, at::kLong);
    AllReduceOptions options;
    options.reduce_op = ReduceOp::Avg;
    try {
      (void)pg.all_reduce(tensor, options);
      ADD_FAILURE() << "int64 avg all_reduce did not throw";
    } catch (const CommError& e) {
      EXPECT_THAT(e.what(), HasSubstr("avg"));
      EXPECT_THAT(e.what(), HasSubstr("Long"));
      EXPECT_THAT(e.what(), HasSubstr("group world"));
    }
    at::Tensor output = at::empty({4}, at::kLong);
    ReduceScatterOptions rs;
    rs.reduce_op = ReduceOp::Avg;
    EXPECT_THROW((void)pg.reduce_scatter_tensor(output, pattern(pg.rank(), 4 * pg.size(), at::kLong), rs), CommError);
    // A rejected call consumes no sequence number: the group still works.
    EXPECT_EQ(pg.sequence_number(), 0u);
    Failures failures;
    check_all_reduce(pg, failures, at::kLong, 4, ReduceOp::Sum);
    EXPECT_THAT(failures, ::testing::IsEmpty());
  });
}

TEST_P(GlooThreads, BroadcastFromEveryRoot) {
  run_checks(world(), [](ProcessGroup& pg, Failures& failures) {
    for (auto dtype : kDtypes) {
      for (int root = 0; root < pg.size(); ++root) {
        for (int64_t numel : {0, 3, 11}) check_broadcast(pg, failures, dtype, numel, root);
      }
    }
  });
}

TEST_P(GlooThreads, WorkReportsDescTimesAndCallbacksOnce) {
  run_gloo_threads(world(), [](ProcessGroup& pg) {
    std::atomic<int> before{0};
    std::atomic<int> after{0};
    at::Tensor tensor = pattern(pg.rank(), 5, at::kFloat);
    WorkPtr work = pg.all_reduce(tensor, AllReduceOptions{});
    EXPECT_EQ(pg.sequence_number(), 1u);
    work->on_completion([&] { before++; });
    work->wait();
    EXPECT_TRUE(work->is_completed());
    EXPECT_EQ(work->exception(), nullptr);
    work->on_completion([&] { after++; });
    work->wait();  // waiting twice is harmless
    EXPECT_EQ(before.load(), 1);
    EXPECT_EQ(after.load(), 1);
    const CollectiveDesc& desc = work->desc();
    EXPECT_EQ(desc.seq, 1u);
    EXPECT_EQ(desc.group, "world");
    EXPECT_EQ(desc.group_rank, pg.rank());
    EXPECT_EQ(desc.op, CollectiveOp::AllReduce);
    EXPECT_EQ(desc.input_shape, std::vector<int64_t>{5});
    WorkTimes times = work->times();
    EXPECT_GT(times.issue_ns, 0);
    EXPECT_LE(times.issue_ns, times.start_ns);
    EXPECT_LE(times.start_ns, times.end_ns);

    WorkPtr barrier = pg.barrier();
    EXPECT_EQ(barrier->desc().seq, 2u);
    EXPECT_EQ(barrier->desc().op, CollectiveOp::Barrier);
    barrier->wait();
    // Zero elements complete at once but still take a sequence number.
    WorkPtr empty = pg.all_reduce(at::empty({0}), AllReduceOptions{});
    EXPECT_TRUE(empty->is_completed());
    EXPECT_EQ(empty->desc().seq, 3u);
    EXPECT_EQ(pg.sequence_number(), 3u);
    std::vector<int> expected_ranks;
    for (int r = 0; r < pg.size(); ++r) expected_ranks.push_back(r);
    EXPECT_EQ(pg.global_ranks(), expected_ranks);
  });
}

TEST_P(GlooThreads, SeveralCollectivesInFlightBeforeWaiting) {
  run_checks(world(), [](ProcessGroup& pg, Failures& failures) {
    const int64_t n = 6;
    at::Tensor gathered = at::empty({pg.size() * n}, at::kBFloat16);
    at::Tensor gather_in = pattern(pg.rank(), n, at::kBFloat16);
    at::Tensor reduced = pattern(pg.rank(), n, at::kBFloat16);  // bf16: the allgather-based path
    at::Tensor summed = pattern(pg.rank(), n, at::kFloat);
    at::Tensor scattered = at::empty({n}, at::kDouble);
    at::Tensor scatter_in = pattern(pg.rank(), pg.size() * n, at::kDouble);
    std::vector<WorkPtr> works;
    works.push_back(pg.all_gather_into_tensor(gathered, gather_in));
    works.push_back(pg.all_reduce(reduced, AllReduceOptions{ReduceOp::Max}));
    works.push_back(pg.reduce_scatter_tensor(scattered, scatter_in, ReduceScatterOptions{}));
    works.push_back(pg.all_reduce(summed, AllReduceOptions{ReduceOp::Avg}));
    works.push_back(pg.barrier());
    for (auto it = works.rbegin(); it != works.rend(); ++it) (*it)->wait();
    for (size_t i = 0; i < works.size(); ++i) EXPECT_EQ(works[i]->desc().seq, i + 1);
    std::vector<at::Tensor> chunks;
    for (int r = 0; r < pg.size(); ++r) chunks.push_back(pattern(r, n, at::kBFloat16));
    expect_equal(failures, "in flight all_gather", gathered, at::cat(chunks));
    expect_equal(failures, "in flight all_reduce max", reduced,
                 reduced_pattern(pg.size(), n, ReduceOp::Max, at::kBFloat16));
    expect_equal(failures, "in flight reduce_scatter", scattered,
                 reduced_pattern(pg.size(), pg.size() * n, ReduceOp::Sum, at::kDouble).narrow(0, pg.rank() * n, n));
    expect_equal(failures, "in flight all_reduce avg", summed,
                 reduced_pattern(pg.size(), n, ReduceOp::Avg, at::kFloat));
  });
}

TEST_P(GlooThreads, SplitIntoPairsAndRunCollectivesOnThem) {
  run_checks(world(), [](ProcessGroup& pg, Failures& failures) {
    // Pairs in reverse order ({1, 0}, {3, 2}, ...); an odd last rank alone.
    std::vector<std::vector<int>> pairs;
    for (int r = 0; r < pg.size(); r += 2) {
      pairs.push_back(r + 1 < pg.size() ? std::vector<int>{r + 1, r} : std::vector<int>{r});
    }
    ProcessGroupPtr pair = pg.split(pairs);
    ASSERT_NE(pair, nullptr);
    const int index = pg.rank() / 2;
    EXPECT_EQ(pair->name(), "world/split1." + std::to_string(index));
    EXPECT_EQ(pair->global_ranks(), pairs[index]);
    EXPECT_EQ(pair->size(), static_cast<int>(pairs[index].size()));
    EXPECT_EQ(pair->global_ranks()[pair->rank()], pg.rank());
    check_everything(*pair, failures, {3});
    // The parent still works after (and independently of) the split.
    check_all_reduce(pg, failures, at::kFloat, 4, ReduceOp::Sum);

    // A second split leaves rank 0 out; the others form one group.
    std::vector<int> rest;
    for (int r = 1; r < pg.size(); ++r) rest.push_back(r);
    std::vector<std::vector<int>> partition;
    if (!rest.empty()) partition.push_back(rest);
    ProcessGroupPtr others = pg.split(partition);
    if (pg.rank() == 0) {
      EXPECT_EQ(others, nullptr);
    } else {
      ASSERT_NE(others, nullptr);
      EXPECT_EQ(others->name(), "world/split2.0");
      EXPECT_EQ(others->rank(), pg.rank() - 1);
      check_all_reduce(*others, failures, at::kBFloat16, 5, ReduceOp::Sum);
      // A split of a split maps global ranks through its parent.
      // An empty partition places nobody.
      EXPECT_EQ(others->split({}), nullptr);
      std::vector<std::vector<int>> singles;
      for (int r = 0; r < others->size(); ++r) singles.push_back({r});
      ProcessGroupPtr alone = others->split(singles);
      ASSERT_NE(alone, nullptr);
      EXPECT_EQ(alone->size(), 1);
      EXPECT_EQ(alone->global_ranks(), std::vector<int>{pg.rank()});
      EXPECT_EQ(alone->name(), "world/split2.0/split2." + std::to_string(others->rank()));
      check_all_reduce(*alone, failures, at::kFloat, 3, ReduceOp::Sum);
    }
    pg.barrier()->wait();
  });
}

// Needs two ranks to disagree: instantiated for sizes >= 2 below.
class GlooThreadsMultiRank : public GlooThreads {};

TEST_P(GlooThreadsMultiRank, SplitRejectsBadAndMismatchedPartitions) {
  run_gloo_threads(world(), [](ProcessGroup& pg) {
    EXPECT_THROW(pg.split({{0, 0}}), CommError);
    EXPECT_THROW(pg.split({{0}, {}}), CommError);
    EXPECT_THROW(pg.split({{pg.size()}}), CommError);
    // Rank 0 lists the ranks in another order: every rank must fail, naming the group.
    std::vector<int> all;
    for (int r = 0; r < pg.size(); ++r) all.push_back(r);
    if (pg.rank() == 0) std::reverse(all.begin(), all.end());
    try {
      pg.split({all});
      ADD_FAILURE() << "mismatched partitions were accepted on rank " << pg.rank();
    } catch (const CommError& e) {
      EXPECT_THAT(e.what(), HasSubstr("group world"));
      EXPECT_THAT(e.what(), HasSubstr("different partition"));
    }
    // The group is still usable.
    Failures failures;
    check_all_reduce(pg, failures, at::kFloat, 2, ReduceOp::Sum);
    EXPECT_THAT(failures, ::testing::IsEmpty());
  });
}

INSTANTIATE_TEST_SUITE_P(Gloo, GlooThreadsMultiRank, ::testing::Values(2, 3, 5, 8),
                         [](const ::testing::TestParamInfo<int>& info) { return "size" + std::to_string(info.param); });
INSTANTIATE_TEST_SUITE_P(Gloo, GlooThreads, ::testing::Values(1, 2, 3, 5, 8),
                         [](const auto& info) { return "size" + std::to_string(info.param); });

TEST(GlooThreadsTcpStore, RendezvousThroughTcpStoreOnAFreePort) {
  auto master = make_tcp_store("127.0.0.1", 0, 3, /*is_master=*/true, 10s);
  const int port = tcp_store_port(master);
  EXPECT_GT(port, 0);
  std::vector<c10::intrusive_ptr<c10d::Store>> stores{master};
  for (int r = 1; r < 3; ++r) stores.push_back(make_tcp_store("127.0.0.1", port, 3, false, 10s));
  std::vector<Failures> failures(3);
  std::vector<std::thread> threads;
  for (int rank = 0; rank < 3; ++rank) {
    threads.emplace_back([&, rank] {
      at::set_num_threads(1);
      try {
        GlooOptions options;
        options.store = stores[rank];
        options.rank = rank;
        options.size = 3;
        options.name = "tcp";
        options.timeout = 10s;
        ProcessGroupPtr pg = make_gloo_process_group(options);
        EXPECT_EQ(pg->name(), "tcp");
        check_all_reduce(*pg, failures[rank], at::kFloat, 7, ReduceOp::Sum);
        check_reduce_scatter(*pg, failures[rank], at::kBFloat16, 4, ReduceOp::Sum);
      } catch (const std::exception& e) {
        failures[rank].push_back(e.what());
      }
    });
  }
  for (auto& thread : threads) thread.join();
  for (int rank = 0; rank < 3; ++rank) EXPECT_THAT(failures[rank], ::testing::IsEmpty()) << "rank " << rank;
}

TEST(GlooErrors, BadOptionsAreCommErrors) {
  GlooOptions options;
  EXPECT_THROW(make_gloo_process_group(options), CommError);  // no store
  options.store = c10::make_intrusive<c10d::HashStore>();
  options.rank = 2;
  options.size = 2;
  EXPECT_THROW(make_gloo_process_group(options), CommError);
  options.rank = 0;
  options.global_ranks = {0, 1, 2};
  EXPECT_THROW(make_gloo_process_group(options), CommError);
  EXPECT_THROW(tcp_store_port(options.store), std::invalid_argument);
  EXPECT_THROW(make_tcp_store("127.0.0.1", 70000, 1, true, 1s), CommError);
}

TEST(GlooErrors, MissingRankFailsRendezvousWithContext) {
  GlooOptions options;
  options.store = c10::make_intrusive<c10d::HashStore>();
  options.rank = 0;
  options.size = 2;
  options.name = "lonely";
  options.timeout = 700ms;
  const auto start = std::chrono::steady_clock::now();
  try {
    make_gloo_process_group(options);
    ADD_FAILURE() << "rendezvous without rank 1 succeeded";
  } catch (const CommError& e) {
    EXPECT_THAT(e.what(), HasSubstr("rank 0 group lonely"));
    EXPECT_THAT(e.what(), HasSubstr("rendezvous"));
    EXPECT_THAT(e.what(), ::testing::Not(HasSubstr("\n")));
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, 10s);
}

TEST(GlooErrors, CollectiveThatAPeerNeverJoinsTimesOutWithContext) {
  ThreadWorld world;
  world.size = 2;
  world.timeout = 1500ms;
  std::atomic<bool> rank0_done{false};
  run_gloo_threads(world, [&](ProcessGroup& pg) {
    if (pg.rank() == 1) {
      // Issue nothing; stay alive so the failure is a timeout, not a closed peer.
      while (!rank0_done.load()) std::this_thread::sleep_for(10ms);
      return;
    }
    at::Tensor tensor = at::ones({4});
    WorkPtr work = pg.all_reduce(tensor, AllReduceOptions{});
    try {
      work->wait();
      ADD_FAILURE() << "all_reduce without rank 1 completed";
    } catch (const CommError& e) {
      EXPECT_THAT(e.what(), HasSubstr("group world seq 1 rank 0: all_reduce Float in [4]"));
      EXPECT_THAT(e.what(), ::testing::Not(HasSubstr("\n")));
      EXPECT_NE(dynamic_cast<const CollectiveTimeoutError*>(&e), nullptr) << e.what();
    }
    EXPECT_TRUE(work->is_completed());
    EXPECT_NE(work->exception(), nullptr);
    int called = 0;
    work->on_completion([&] { called++; });
    EXPECT_EQ(called, 1);
    rank0_done = true;
  });
}

// ---------------------------------------------------------------------------
// Gloo against the in-memory fake: the rank-order reductions must agree bit
// for bit on values whose sums do round (unlike the integer patterns above).

// Runs body on one thread per rank with groups from make_group; returns what
// each rank's body returned.
std::vector<std::vector<at::Tensor>> run_with_groups(
    int size, const std::function<ProcessGroupPtr(int)>& make_group,
    const std::function<std::vector<at::Tensor>(ProcessGroup&)>& body) {
  std::vector<std::vector<at::Tensor>> results(size);
  std::vector<std::string> errors(size);
  std::vector<std::thread> threads;
  for (int rank = 0; rank < size; ++rank) {
    threads.emplace_back([&, rank] {
      at::set_num_threads(1);
      try {
        ProcessGroupPtr pg = make_group(rank);
        results[rank] = body(*pg);
      } catch (const std::exception& e) {
        errors[rank] = e.what();
      }
    });
  }
  for (auto& thread : threads) thread.join();
  for (int rank = 0; rank < size; ++rank) EXPECT_EQ(errors[rank], "") << "rank " << rank;
  return results;
}

// Non-integers of mixed magnitude, different on every rank.
at::Tensor awkward(int rank, int64_t numel, at::ScalarType dtype) {
  at::Tensor x = at::arange(numel, at::kDouble);
  return (at::sin(x * 0.37 + rank * 1.3) * at::pow(10.0, (x + rank).remainder(5) - 2)).to(dtype);
}

at::Tensor bits_of(const at::Tensor& tensor) {
  switch (tensor.element_size()) {
    case 2: return tensor.view(at::kShort);
    case 4: return tensor.view(at::kInt);
    default: return tensor.view(at::kLong);
  }
}

std::vector<at::Tensor> reductions_to_compare(ProcessGroup& pg) {
  std::vector<at::Tensor> outputs;
  const int64_t n = 37;
  for (auto dtype : {at::kBFloat16, at::kHalf, at::kFloat, at::kDouble}) {
    struct Case {
      ReduceOp op;
      double pre, post;
    };
    for (Case c : {Case{ReduceOp::Sum, 1, 1}, Case{ReduceOp::Sum, 2, 1.5}, Case{ReduceOp::Sum, 0.1, 7},
                   Case{ReduceOp::Avg, 1, 1}, Case{ReduceOp::Min, 1, 1}, Case{ReduceOp::Max, 1, 1}}) {
      at::Tensor output = at::empty({n}, at::TensorOptions().dtype(dtype));
      ReduceScatterOptions options;
      options.reduce_op = c.op;
      options.predivide_factor = c.pre;
      options.postdivide_factor = c.post;
      pg.reduce_scatter_tensor(output, awkward(pg.rank(), pg.size() * n, dtype), options)->wait();
      outputs.push_back(output);
    }
  }
  // bf16 all-reduce is rank-order on Gloo too (native float all-reduce is not).
  for (auto op : kReduceOps) {
    at::Tensor tensor = awkward(pg.rank(), n, at::kBFloat16);
    pg.all_reduce(tensor, AllReduceOptions{op})->wait();
    outputs.push_back(tensor);
  }
  return outputs;
}

TEST(GlooMatchesFake, RankOrderReductionsAreBitwiseEqual) {
  const int size = 3;
  auto store = c10::make_intrusive<c10d::HashStore>();
  auto gloo = run_with_groups(
      size,
      [&](int rank) {
        GlooOptions options;
        options.store = store;
        options.rank = rank;
        options.size = size;
        options.timeout = 20s;
        return make_gloo_process_group(options);
      },
      reductions_to_compare);
  auto fake_world = std::make_shared<sim::FakeWorldState>(size, false, 20s, SteadyClock::instance());
  auto fake = run_with_groups(
      size, [&](int rank) { return fake_world->world_group(rank); }, reductions_to_compare);
  for (int rank = 0; rank < size; ++rank) {
    ASSERT_EQ(gloo[rank].size(), fake[rank].size());
    for (size_t i = 0; i < gloo[rank].size(); ++i) {
      EXPECT_TRUE(at::equal(bits_of(gloo[rank][i]), bits_of(fake[rank][i])))
          << "rank " << rank << " case " << i << " (" << c10::toString(gloo[rank][i].scalar_type()) << "): gloo "
          << values_string(gloo[rank][i]) << " fake " << values_string(fake[rank][i]);
    }
  }
}

// ---------------------------------------------------------------------------
// LaunchEnv

class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = std::string(old);
    if (value) {
      setenv(name, value, 1);
    } else {
      unsetenv(name);
    }
  }
  ~ScopedEnv() {
    if (old_) {
      setenv(name_.c_str(), old_->c_str(), 1);
    } else {
      unsetenv(name_.c_str());
    }
  }

 private:
  std::string name_;
  std::optional<std::string> old_;
};

struct EnvCase {
  const char* addr;
  const char* port;
  const char* rank;
  const char* world;
  const char* message;  // expected substring of the error, nullptr = valid
};

TEST(GlooLaunchEnv, ReadsValidEnvironment) {
  ScopedEnv a("MASTER_ADDR", "10.1.2.3"), p("MASTER_PORT", "29500"), r("RANK", "3"), w("WORLD_SIZE", "4");
  LaunchEnv env = LaunchEnv::from_env();
  EXPECT_EQ(env.master_addr, "10.1.2.3");
  EXPECT_EQ(env.master_port, 29500);
  EXPECT_EQ(env.rank, 3);
  EXPECT_EQ(env.world_size, 4);
}

TEST(GlooLaunchEnv, TorchrunVariablesDefaultWhenUnset) {
  ScopedEnv a("MASTER_ADDR", "h"), p("MASTER_PORT", "29500"), r("RANK", "2"), w("WORLD_SIZE", "4");
  ScopedEnv l("LOCAL_RANK", nullptr), s("TORCHELASTIC_USE_AGENT_STORE", nullptr),
      c("TORCHELASTIC_RESTART_COUNT", nullptr);
  LaunchEnv env = LaunchEnv::from_env();
  EXPECT_EQ(env.local_rank, 2);
  EXPECT_FALSE(env.agent_store);
  EXPECT_EQ(env.restart_count, 0);
}

TEST(GlooLaunchEnv, ReadsTorchrunVariables) {
  ScopedEnv a("MASTER_ADDR", "h"), p("MASTER_PORT", "29500"), r("RANK", "3"), w("WORLD_SIZE", "4");
  ScopedEnv l("LOCAL_RANK", "1"), s("TORCHELASTIC_USE_AGENT_STORE", "True"), c("TORCHELASTIC_RESTART_COUNT", "2");
  LaunchEnv env = LaunchEnv::from_env();
  EXPECT_EQ(env.rank, 3);
  EXPECT_EQ(env.local_rank, 1);
  EXPECT_TRUE(env.agent_store);
  EXPECT_EQ(env.restart_count, 2);
  ScopedEnv not_true("TORCHELASTIC_USE_AGENT_STORE", "False");
  EXPECT_FALSE(LaunchEnv::from_env().agent_store);
}

TEST(GlooLaunchEnv, RejectsBadTorchrunVariablesNamingThem) {
  ScopedEnv a("MASTER_ADDR", "h"), p("MASTER_PORT", "29500"), r("RANK", "0"), w("WORLD_SIZE", "4");
  {
    ScopedEnv l("LOCAL_RANK", "4");
    EXPECT_THAT([] { LaunchEnv::from_env(); },
                ::testing::ThrowsMessage<std::invalid_argument>(HasSubstr("LOCAL_RANK=4 is outside [0, 3]")));
  }
  ScopedEnv c("TORCHELASTIC_RESTART_COUNT", "-1");
  EXPECT_THAT([] { LaunchEnv::from_env(); },
              ::testing::ThrowsMessage<std::invalid_argument>(HasSubstr("TORCHELASTIC_RESTART_COUNT=-1 is outside")));
}

TEST(GlooLaunchEnv, RejectsMissingOrBadVariablesNamingThem) {
  const std::vector<EnvCase> cases = {
      {nullptr, "1234", "0", "1", "MASTER_ADDR is not set"},
      {"", "1234", "0", "1", "MASTER_ADDR is not set"},
      {"h", nullptr, "0", "1", "MASTER_PORT is not set"},
      {"h", "12ab", "0", "1", "MASTER_PORT='12ab' is not an integer"},
      {"h", "0", "0", "1", "MASTER_PORT=0 is outside [1, 65535]"},
      {"h", "65536", "0", "1", "MASTER_PORT=65536 is outside"},
      {"h", "1234", nullptr, "2", "RANK is not set"},
      {"h", "1234", "x", "2", "RANK='x' is not an integer"},
      {"h", "1234", "2", "2", "RANK=2 is outside [0, 1]"},
      {"h", "1234", "-1", "2", "RANK=-1 is outside"},
      {"h", "1234", "0", nullptr, "WORLD_SIZE is not set"},
      {"h", "1234", "0", "0", "WORLD_SIZE=0 is outside"},
      {"h", "1234", "0", " 2", "WORLD_SIZE=' 2' is not an integer"},
      {"h", "1234", "0", "99999999999999999999", "WORLD_SIZE='99999999999999999999' is not an integer"},
  };
  for (const auto& c : cases) {
    ScopedEnv a("MASTER_ADDR", c.addr), p("MASTER_PORT", c.port), r("RANK", c.rank), w("WORLD_SIZE", c.world);
    try {
      LaunchEnv::from_env();
      ADD_FAILURE() << "accepted; expected: " << c.message;
    } catch (const std::invalid_argument& e) {
      EXPECT_THAT(e.what(), HasSubstr(c.message));
    }
  }
}

// ---------------------------------------------------------------------------
// Process launcher

std::chrono::milliseconds env_ms(const char* name, std::chrono::milliseconds fallback) {
  const char* value = std::getenv(name);
  return value ? std::chrono::milliseconds(std::atoll(value)) : fallback;
}

LaunchOptions quiet(int nproc, std::vector<std::string> command, std::ostream* output) {
  LaunchOptions options;
  options.nproc = nproc;
  options.command = std::move(command);
  options.output = output;
  options.timeout = 5s;
  options.deadline = 60s;
  return options;
}

TEST(GlooLauncher, SetsRankEnvironmentAndPrefixesOutput) {
  std::ostringstream output;
  LaunchOptions options =
      quiet(3,
            {"/bin/sh", "-c",
             "echo $MASTER_ADDR:$MASTER_PORT $RANK/$WORLD_SIZE $LOCAL_RANK/$LOCAL_WORLD_SIZE $EXTRA; echo err >&2; "
             "printf partial"},
            &output);
  options.extra_env["EXTRA"] = "x1";
  LaunchResult result = launch_processes(options);
  ASSERT_TRUE(result.ok()) << result.report();
  EXPECT_GT(result.master_port, 0);
  ASSERT_EQ(result.ranks.size(), 3u);
  const std::string port = std::to_string(result.master_port);
  for (int r = 0; r < 3; ++r) {
    const auto& outcome = result.ranks[r];
    EXPECT_EQ(outcome.rank, r);
    EXPECT_EQ(outcome.exit_code, 0);
    EXPECT_EQ(outcome.output_tail,
              "127.0.0.1:" + port + " " + std::to_string(r) + "/3 " + std::to_string(r) + "/3 x1\nerr\npartial\n");
    EXPECT_THAT(output.str(), HasSubstr("[rank " + std::to_string(r) + "] 127.0.0.1:" + port));
    EXPECT_THAT(output.str(), HasSubstr("[rank " + std::to_string(r) + "] partial\n"));
  }
  EXPECT_THAT(result.report(), HasSubstr("all 3 ranks exited 0"));
}

TEST(GlooLauncher, KeepsOnlyTheLastFiftyLines) {
  LaunchResult result = launch_processes(quiet(1, {"/bin/sh", "-c", "seq 1 200"}, nullptr));
  ASSERT_TRUE(result.ok()) << result.report();
  std::string tail = result.ranks[0].output_tail;
  EXPECT_EQ(std::count(tail.begin(), tail.end(), '\n'), 50);
  EXPECT_THAT(tail, ::testing::StartsWith("151\n"));
  EXPECT_THAT(tail, ::testing::EndsWith("200\n"));
}

TEST(GlooLauncher, FailureStopsTheOthersAfterTheGracePeriod) {
  LaunchOptions options =
      quiet(3, {"/bin/sh", "-c", "if [ $RANK = 1 ]; then echo boom; exit 4; fi; exec sleep 30"}, nullptr);
  options.timeout = 300ms;
  const auto start = std::chrono::steady_clock::now();
  LaunchResult result = launch_processes(options);
  EXPECT_LT(std::chrono::steady_clock::now() - start, 5s);
  EXPECT_FALSE(result.ok());
  EXPECT_EQ(result.first_failed_rank, 1);
  EXPECT_EQ(result.ranks[1].exit_code, 4);
  EXPECT_FALSE(result.ranks[1].stopped_by_launcher);
  for (int r : {0, 2}) {
    EXPECT_EQ(result.ranks[r].signal, SIGTERM) << r;
    EXPECT_EQ(result.ranks[r].exit_code, 128 + SIGTERM) << r;
    EXPECT_TRUE(result.ranks[r].stopped_by_launcher) << r;
  }
  const std::string report = result.report();
  EXPECT_THAT(report, HasSubstr("rank 1 failed first (exit code 4)"));
  EXPECT_THAT(report, HasSubstr("rank 0: killed by signal 15"));
  EXPECT_THAT(report, HasSubstr("sent by the launcher"));
  EXPECT_THAT(report, HasSubstr("--- last output of rank 1 ---\nboom\n"));
  // Which timeout fired: the launcher's grace, on the ranks it had to stop.
  EXPECT_TRUE(result.grace_expired);
  EXPECT_EQ(result.stalled_ranks(), (std::vector<int>{0, 2}));
  EXPECT_THAT(report, HasSubstr("; the launcher's grace of 0.3 s after the first failure ran out: ranks {0,2} still "
                                "running, stopped by the launcher"));
}

TEST(GlooLauncher, SigkillFollowsAnIgnoredSigterm) {
  LaunchOptions options =
      quiet(2, {"/bin/sh", "-c", "if [ $RANK = 0 ]; then exit 1; fi; trap '' TERM; exec sleep 30"}, nullptr);
  options.timeout = 100ms;
  const auto start = std::chrono::steady_clock::now();
  LaunchResult result = launch_processes(options);
  const auto elapsed = std::chrono::steady_clock::now() - start;
  EXPECT_GE(elapsed, 2s);  // SIGTERM, then the 2 s grace, then SIGKILL
  EXPECT_LT(elapsed, 6s);
  EXPECT_EQ(result.first_failed_rank, 0);
  EXPECT_EQ(result.ranks[1].signal, SIGKILL);
}

TEST(GlooLauncher, DeadlineStopsEverybody) {
  LaunchOptions options = quiet(2, {"/bin/sh", "-c", "exec sleep 30"}, nullptr);
  options.deadline = 300ms;
  LaunchResult result = launch_processes(options);
  EXPECT_FALSE(result.ok());
  EXPECT_TRUE(result.deadline_exceeded);
  EXPECT_EQ(result.first_failed_rank, -1);
  EXPECT_LT(result.elapsed, 5s);
  for (const auto& rank : result.ranks) EXPECT_EQ(rank.signal, SIGTERM);
  EXPECT_THAT(result.report(), HasSubstr("deadline"));
}

TEST(GlooLauncher, CommandThatCannotStartIsAFailedRank) {
  LaunchResult result = launch_processes(quiet(2, {"/nonexistent/fsdpsim-no-such-program"}, nullptr));
  EXPECT_FALSE(result.ok());
  EXPECT_EQ(result.first_failed_rank, 0);
  for (const auto& rank : result.ranks) {
    EXPECT_EQ(rank.exit_code, 127);
    EXPECT_THAT(rank.output_tail, HasSubstr("cannot start"));
  }
}

TEST(GlooLauncher, RejectsBadOptions) {
  EXPECT_THROW(launch_processes(quiet(0, {"true"}, nullptr)), std::invalid_argument);
  EXPECT_THROW(launch_processes(quiet(1, {}, nullptr)), std::invalid_argument);
  LaunchOptions options = quiet(1, {"true"}, nullptr);
  options.master_port = 70000;
  EXPECT_THROW(launch_processes(options), std::invalid_argument);
}

// `fsdpsim launch`, run through the launcher itself to capture its output.
LaunchResult run_launch_cli(std::vector<std::string> args) {
  args.insert(args.begin(), {std::string(FSDPSIM_TOOLS_DIR) + "/fsdpsim", "launch"});
  return launch_processes(quiet(1, std::move(args), nullptr));
}

TEST(GlooLauncher, CliRunsRanksAndReportsExitStatus) {
  LaunchResult ok = run_launch_cli({"--nproc", "2", "--", "/bin/sh", "-c", "echo hello $RANK"});
  ASSERT_EQ(ok.ranks[0].exit_code, 0) << ok.ranks[0].output_tail;
  EXPECT_THAT(ok.ranks[0].output_tail, HasSubstr("[rank 1] hello 1"));
  EXPECT_THAT(ok.ranks[0].output_tail, HasSubstr("all 2 ranks exited 0"));

  LaunchResult failed =
      run_launch_cli({"--nproc", "2", "--timeout-s", "1", "--", "/bin/sh", "-c", "exit $((RANK + 5))"});
  EXPECT_EQ(failed.ranks[0].exit_code, 1) << failed.ranks[0].output_tail;
  EXPECT_THAT(failed.ranks[0].output_tail, HasSubstr("failed first"));
}

TEST(GlooLauncher, CliRejectsBadUsageWithOneLine) {
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{"--", "true"}, "--nproc is required"},
      {{"--nproc", "zero", "--", "true"}, "--nproc needs an integer, got 'zero'"},
      {{"--nproc", "0", "--", "true"}, "--nproc must be in [1, 4096]"},
      {{"--nproc", "2"}, "no command given"},
      {{"--nproc", "2", "--master-port", "99999", "--", "true"}, "--master-port must be in [0, 65535]"},
      {{"--nproc", "2", "--bogus", "--", "true"}, "unknown option '--bogus'"},
      {{"--nproc"}, "--nproc needs a value"},
  };
  for (const auto& [args, message] : cases) {
    LaunchResult result = run_launch_cli(args);
    const auto& outcome = result.ranks[0];
    EXPECT_EQ(outcome.exit_code, 2) << message;
    EXPECT_THAT(outcome.output_tail, HasSubstr(message));
    EXPECT_EQ(std::count(outcome.output_tail.begin(), outcome.output_tail.end(), '\n'), 1) << outcome.output_tail;
  }
}

// ---------------------------------------------------------------------------
// Gloo across processes: this binary re-executed as workers.

LaunchOptions worker_launch(int nproc, const std::string& worker, std::ostream* output) {
  LaunchOptions options = quiet(nproc, {}, output);
  fsdpsim::testing::set_test_worker(options, worker);
  options.extra_env["FSDPSIM_TEST_TIMEOUT_MS"] = "5000";
  return options;
}

class GlooProcesses : public ::testing::TestWithParam<int> {};

TEST_P(GlooProcesses, CollectivesMatchAcrossProcesses) {
  std::ostringstream output;
  LaunchResult result = launch_processes(worker_launch(GetParam(), "gloo_collectives", &output));
  EXPECT_TRUE(result.ok()) << result.report() << output.str();
  for (const auto& rank : result.ranks) EXPECT_THAT(rank.output_tail, HasSubstr("all checks passed"));
}

INSTANTIATE_TEST_SUITE_P(Gloo, GlooProcesses, ::testing::Values(2, 4),
                         [](const auto& info) { return "size" + std::to_string(info.param); });

void expect_peer_failure_reported(const LaunchResult& result, const std::string& output) {
  const std::string context = result.report() + output;
  EXPECT_EQ(result.first_failed_rank, 1) << context;
  for (const auto& rank : result.ranks) {
    if (rank.rank == 1) continue;
    EXPECT_NE(rank.exit_code, 0) << context;
    EXPECT_FALSE(rank.stopped_by_launcher) << "rank " << rank.rank << " hung\n" << context;
    // Noticed through the closed connection, not by waiting for the timeout.
    EXPECT_THAT(rank.output_tail, ::testing::Not(HasSubstr("Timed out"))) << context;
    // The CommError names group, seq, rank and op, then Gloo's one-line reason.
    EXPECT_THAT(rank.output_tail, HasSubstr("caught: group world seq 1 rank " + std::to_string(rank.rank) +
                                            ": all_reduce Float in [16] out [16] op sum failed: "))
        << context;
  }
}

TEST(GlooProcessFailures, RankExitingAfterRendezvousFailsTheOthers) {
  std::ostringstream output;
  const auto start = std::chrono::steady_clock::now();
  LaunchResult result = launch_processes(worker_launch(3, "gloo_rank1_exits", &output));
  EXPECT_LT(std::chrono::steady_clock::now() - start, 15s);
  EXPECT_EQ(result.ranks.at(1).exit_code, 3);
  EXPECT_EQ(result.ranks.at(1).signal, 0);
  expect_peer_failure_reported(result, output.str());
}

// Gloo may write to a peer that has gone: the process must see EPIPE, not
// die of SIGPIPE (rank 0 of RankKilledBySigkillFailsTheOthers did, now and
// then). The worker builds a group, then writes to a pipe nobody reads.
TEST(GlooProcessFailures, ProcessWithAGroupSurvivesWritingToAClosedConnection) {
  std::ostringstream output;
  LaunchResult result = launch_processes(worker_launch(1, "gloo_write_to_closed_pipe", &output));
  EXPECT_EQ(result.ranks.at(0).signal, 0) << result.report() << output.str();
  EXPECT_EQ(result.ranks.at(0).exit_code, 0) << result.report() << output.str();
  EXPECT_THAT(result.ranks.at(0).output_tail, HasSubstr("write failed with EPIPE"));
}

TEST(GlooProcessFailures, FailingRanksDumpTheirRecentCollectives) {
  std::ostringstream output;
  LaunchResult result = launch_processes(worker_launch(3, "gloo_rank1_exits_flight_recorder", &output));
  EXPECT_EQ(result.ranks.at(1).exit_code, 3);
  for (int r : {0, 2}) {
    const std::string& tail = result.ranks.at(r).output_tail;
    EXPECT_NE(result.ranks.at(r).exit_code, 0) << tail;
    // The launcher's report carries each rank's ring: the completed barrier,
    // then the all-reduce that failed when rank 1 went away.
    EXPECT_THAT(tail, HasSubstr("barrier")) << tail;
    EXPECT_THAT(tail, HasSubstr("rank " + std::to_string(r) + " at seq 2 all_reduce (failed)")) << tail;
  }
}

TEST(GlooProcessFailures, RankKilledBySigkillFailsTheOthers) {
  std::ostringstream output;
  const auto start = std::chrono::steady_clock::now();
  LaunchResult result = launch_processes(worker_launch(3, "gloo_rank1_sigkill", &output));
  EXPECT_LT(std::chrono::steady_clock::now() - start, 15s);
  EXPECT_EQ(result.ranks.at(1).signal, SIGKILL);
  EXPECT_EQ(result.ranks.at(1).exit_code, 128 + SIGKILL);
  EXPECT_THAT(result.report(), HasSubstr("rank 1 failed first (killed by signal 9"));
  expect_peer_failure_reported(result, output.str());
}

TEST(GlooProcessFailures, StoppedRankIsNamedAsTheOneThatStoppedMakingProgress) {
  std::ostringstream output;
  LaunchOptions options = worker_launch(3, "gloo_rank1_sigstop", &output);
  options.extra_env["FSDPSIM_TEST_TIMEOUT_MS"] = "5000";  // rendezvous and the all-reduce
  options.timeout = 120s;  // a grace the launcher must not wait out for a stopped process
  LaunchResult result = launch_processes(options);
  const std::string context = result.report() + output.str();
  const ProcessOutcome& stopped = result.ranks.at(1);
  EXPECT_TRUE(stopped.process_was_stopped) << context;
  EXPECT_TRUE(stopped.stopped_by_launcher) << context;
  EXPECT_EQ(stopped.signal, SIGKILL) << context;
  EXPECT_FALSE(result.grace_expired) << context;
  EXPECT_EQ(result.stalled_ranks(), std::vector<int>{1});
  for (int r : {0, 2}) {
    EXPECT_EQ(result.ranks.at(r).exit_code, 1) << context;
    EXPECT_FALSE(result.ranks.at(r).stopped_by_launcher) << context;
  }
  EXPECT_THAT(result.report(), HasSubstr("; rank 1 stopped making progress (process stopped, state T; killed by the "
                                         "launcher); rank "));
  EXPECT_THAT(result.report(), HasSubstr("  <- stopped making progress"));
}

// Workers ------------------------------------------------------------------

ProcessGroupPtr worker_group() {
  at::set_num_threads(1);
  return make_gloo_process_group_from_env(env_ms("FSDPSIM_TEST_TIMEOUT_MS", 10000ms));
}

// Rendezvous like make_gloo_process_group_from_env, then wait until every
// rank's group exists: a rank that dies earlier could fail another rank's
// rendezvous instead of its first collective.
ProcessGroupPtr worker_group_after_full_rendezvous() {
  at::set_num_threads(1);
  const auto timeout = env_ms("FSDPSIM_TEST_TIMEOUT_MS", 10000ms);
  LaunchEnv env = LaunchEnv::from_env();
  GlooOptions options;
  options.store = make_tcp_store(env.master_addr, env.master_port, env.world_size, env.rank == 0, timeout);
  options.rank = env.rank;
  options.size = env.world_size;
  options.timeout = timeout;
  ProcessGroupPtr pg = make_gloo_process_group(options);
  std::vector<std::string> keys;
  for (int r = 0; r < env.world_size; ++r) keys.push_back("test/constructed/" + std::to_string(r));
  options.store->set(keys[env.rank], std::vector<uint8_t>{1});
  options.store->wait(keys, timeout);
  return pg;
}

// The others enter an all_reduce that the dead rank never joins.
int all_reduce_expecting_failure(ProcessGroup& pg) {
  at::Tensor tensor = at::ones({16});
  try {
    pg.all_reduce(tensor, AllReduceOptions{})->wait();
  } catch (const CommError& e) {
    std::cerr << "caught: " << e.what() << std::endl;
    return 1;
  }
  std::cerr << "rank " << pg.rank() << ": all_reduce succeeded without rank 1" << std::endl;
  return 0;
}

}  // namespace
}  // namespace fsdpsim

FSDPSIM_REGISTER_WORKER(gloo_collectives) {
  using namespace fsdpsim;
  ProcessGroupPtr pg = worker_group();
  Failures failures;
  check_everything(*pg, failures, {0, 5});
  check_reduce_scatter(*pg, failures, at::kBFloat16, 4, ReduceOp::Sum, 2.0, 4.0);
  std::vector<std::vector<int>> pairs;
  for (int r = 0; r < pg->size(); r += 2) pairs.push_back({r, r + 1});
  ProcessGroupPtr pair = pg->split(pairs);
  check_everything(*pair, failures, {3});
  for (const auto& failure : failures) std::cerr << "MISMATCH " << failure << std::endl;
  if (!failures.empty()) return 1;
  std::cout << "rank " << pg->rank() << ": all checks passed" << std::endl;
  return 0;
}

FSDPSIM_REGISTER_WORKER(gloo_rank1_exits) {
  using namespace fsdpsim;
  ProcessGroupPtr pg = worker_group_after_full_rendezvous();
  if (pg->rank() == 1) {
    std::cout << "rank 1 exits with code 3" << std::endl;
    std::_Exit(3);
  }
  return all_reduce_expecting_failure(*pg);
}

// As gloo_rank1_exits, after one barrier, every rank recording its
// collectives in a flight recorder that it dumps when it fails.
FSDPSIM_REGISTER_WORKER(gloo_rank1_exits_flight_recorder) {
  using namespace fsdpsim;
  ProcessGroupPtr gloo = worker_group_after_full_rendezvous();
  auto flight = std::make_shared<observe::FlightRecorder>(gloo->size(), 8);
  ProcessGroupPtr pg =
      std::make_shared<observe::ObservedProcessGroup>(gloo, std::vector<observe::SinkPtr>{flight}, gloo->rank());
  pg->barrier()->wait();
  if (pg->rank() == 1) std::_Exit(3);
  at::Tensor tensor = at::ones({16});
  try {
    pg->all_reduce(tensor, AllReduceOptions{})->wait();
  } catch (const CommError& e) {
    std::cerr << "caught: " << e.what() << "\n" << flight->dump() << std::flush;
    return 1;
  }
  return 0;
}

FSDPSIM_REGISTER_WORKER(gloo_write_to_closed_pipe) {
  using namespace fsdpsim;
  ProcessGroupPtr pg = worker_group();
  int fds[2];
  if (pipe(fds) != 0) return 4;
  close(fds[0]);
  const char byte = 0;
  const bool epipe = write(fds[1], &byte, 1) == -1 && errno == EPIPE;
  close(fds[1]);
  std::cout << (epipe ? "write failed with EPIPE" : "write did not fail with EPIPE") << std::endl;
  return epipe ? 0 : 5;
}

FSDPSIM_REGISTER_WORKER(gloo_rank1_sigkill) {
  using namespace fsdpsim;
  ProcessGroupPtr pg = worker_group_after_full_rendezvous();
  if (pg->rank() == 1) {
    std::cout << "rank 1 kills itself" << std::endl;
    std::raise(SIGKILL);
  }
  return all_reduce_expecting_failure(*pg);
}

FSDPSIM_REGISTER_WORKER(gloo_rank1_sigstop) {
  using namespace fsdpsim;
  ProcessGroupPtr pg = worker_group_after_full_rendezvous();
  if (pg->rank() == 1) {
    std::cout << "rank 1 stops itself" << std::endl;
    std::raise(SIGSTOP);
    return 0;
  }
  return all_reduce_expecting_failure(*pg);
}
