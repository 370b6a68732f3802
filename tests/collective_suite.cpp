#include "tests/collective_suite.h"

#include <cstring>
#include <sstream>
#include <stdexcept>

#include "backends/errors.h"

namespace fsdpsim::testing {

at::Tensor crafted_values(int rank, int64_t count, at::ScalarType dtype) {
  auto index = at::arange(count, at::kLong);
  return ((index * 3 + rank * 7) % 11 - 5).to(dtype);
}

namespace {

void expect_equal(const at::Tensor& actual, const at::Tensor& expected, const std::string& what,
                  const ProcessGroup& group) {
  if (actual.sizes() != expected.sizes() || actual.scalar_type() != expected.scalar_type()) {
    throw std::runtime_error(what + ": shape/dtype differ on rank " + std::to_string(group.rank()));
  }
  if (actual.numel() == 0) return;
  // Bitwise: compare the raw bytes (NaN-free inputs make this equal to ==).
  auto a = actual.contiguous().view(-1);
  auto e = expected.contiguous().view(-1);
  if (std::memcmp(a.data_ptr(), e.data_ptr(), a.nbytes()) == 0) return;
  auto diff = at::ne(a.to(at::kDouble), e.to(at::kDouble)).nonzero();
  int64_t i = diff.numel() ? diff[0].item<int64_t>() : 0;
  std::ostringstream msg;
  msg << what << " on rank " << group.rank() << " of " << group.size() << " (group " << group.name() << ", dtype "
      << c10::toString(actual.scalar_type()) << "): element " << i << " is " << a[i].item<double>() << ", expected "
      << e[i].item<double>();
  throw std::runtime_error(msg.str());
}

at::Tensor reduce_expected(int n, int64_t count, int64_t offset, int64_t length, at::ScalarType dtype, ReduceOp op,
                           double predivide = 1.0, double postdivide = 1.0) {
  at::Tensor acc;
  for (int k = 0; k < n; ++k) {
    auto v = crafted_values(k, count, dtype).narrow(0, offset, length);
    if (predivide != 1.0) v = v.div(predivide);
    if (!acc.defined()) {
      acc = v.clone();
    } else if (op == ReduceOp::Min) {
      acc = at::minimum(acc, v);
    } else if (op == ReduceOp::Max) {
      acc = at::maximum(acc, v);
    } else {
      acc.add_(v);
    }
  }
  if (op == ReduceOp::Avg) acc.div_(n);
  if (postdivide != 1.0) acc.div_(postdivide);
  return acc;
}

}  // namespace

void check_all_collectives(ProcessGroup& group, at::ScalarType dtype, int64_t count) {
  const int n = group.size();
  const int rank = group.rank();
  const bool floating = c10::isFloatingType(dtype);
  const auto label = [&](const std::string& op) { return op + " count " + std::to_string(count); };

  {  // all-gather into a separate output; the input must stay untouched
    auto input = crafted_values(rank, count, dtype);
    auto pristine = input.clone();
    auto output = at::full({n * count}, -99, dtype);
    group.all_gather_into_tensor(output, input)->wait();
    for (int k = 0; k < n; ++k) {
      expect_equal(output.narrow(0, k * count, count), crafted_values(k, count, dtype), label("all_gather"), group);
    }
    expect_equal(input, pristine, label("all_gather input untouched"), group);
  }
  {  // all-gather in place: the input is this rank's chunk of the output
    auto output = at::full({n * count}, -99, dtype);
    auto input = output.narrow(0, rank * count, count);
    input.copy_(crafted_values(rank, count, dtype));
    group.all_gather_into_tensor(output, input)->wait();
    for (int k = 0; k < n; ++k) {
      expect_equal(output.narrow(0, k * count, count), crafted_values(k, count, dtype), label("all_gather in place"),
                   group);
    }
  }
  std::vector<ReduceOp> ops = {ReduceOp::Sum, ReduceOp::Min, ReduceOp::Max};
  if (floating) ops.push_back(ReduceOp::Avg);
  for (ReduceOp op : ops) {
    const std::string name = std::string("reduce_scatter ") + to_string(op);
    auto input = crafted_values(rank, n * count, dtype);
    auto pristine = input.clone();
    auto output = at::full({count}, -99, dtype);
    ReduceScatterOptions options;
    options.reduce_op = op;
    group.reduce_scatter_tensor(output, input, options)->wait();
    expect_equal(output, reduce_expected(n, n * count, rank * count, count, dtype, op), label(name), group);
    expect_equal(input, pristine, label(name + " input untouched"), group);
  }
  if (floating) {  // FSDP's gradient pre/post divide factors (powers of two: exact)
    auto input = crafted_values(rank, n * count, dtype);
    auto output = at::empty({count}, dtype);
    ReduceScatterOptions options;
    options.predivide_factor = 2.0;
    options.postdivide_factor = 4.0;
    group.reduce_scatter_tensor(output, input, options)->wait();
    expect_equal(output, reduce_expected(n, n * count, rank * count, count, dtype, ReduceOp::Sum, 2.0, 4.0),
                 label("reduce_scatter predivide 2 postdivide 4"), group);
  }
  for (ReduceOp op : ops) {
    auto tensor = crafted_values(rank, count, dtype);
    AllReduceOptions options;
    options.reduce_op = op;
    group.all_reduce(tensor, options)->wait();
    expect_equal(tensor, reduce_expected(n, count, 0, count, dtype, op),
                 label(std::string("all_reduce ") + to_string(op)), group);
  }
  if (!floating) {  // avg of integers is refused with a clear error
    auto tensor = crafted_values(rank, count, dtype);
    AllReduceOptions options;
    options.reduce_op = ReduceOp::Avg;
    bool threw = false;
    try {
      (void)group.all_reduce(tensor, options);  // throws before issuing
    } catch (const CommError& e) {
      threw = std::string(e.what()).find("avg") != std::string::npos;
    }
    if (!threw) throw std::runtime_error("all_reduce avg on an integer dtype did not fail clearly");
  }
  for (int root : {0, n - 1}) {
    auto tensor = rank == root ? crafted_values(root, count, dtype) : at::full({count}, -99, dtype);
    BroadcastOptions options;
    options.root = root;
    group.broadcast(tensor, options)->wait();
    expect_equal(tensor, crafted_values(root, count, dtype), label("broadcast root " + std::to_string(root)), group);
  }
  group.barrier()->wait();
  {  // two collectives in flight, waited on in reverse order
    auto gather_in = crafted_values(rank, count, dtype);
    auto gathered = at::empty({n * count}, dtype);
    auto reduced = crafted_values(rank, count, dtype);
    const uint64_t seq_before = group.sequence_number();
    WorkPtr first = group.all_gather_into_tensor(gathered, gather_in);
    WorkPtr second = group.all_reduce(reduced, AllReduceOptions{});
    if (first->desc().seq != seq_before + 1 || second->desc().seq != seq_before + 2) {
      throw std::runtime_error("sequence numbers of two in-flight collectives are not consecutive");
    }
    second->wait();
    first->wait();
    if (!first->is_completed() || !second->is_completed()) throw std::runtime_error("waited work not completed");
    for (int k = 0; k < n; ++k) {
      expect_equal(gathered.narrow(0, k * count, count), crafted_values(k, count, dtype),
                   label("overlapped all_gather"), group);
    }
    expect_equal(reduced, reduce_expected(n, count, 0, count, dtype, ReduceOp::Sum), label("overlapped all_reduce"),
                 group);
  }
}

}  // namespace fsdpsim::testing
