#pragma once
// GoogleMock matchers on CollectiveDesc, for expectations on MockCommHooks:
//   EXPECT_CALL(*hooks, before(AllOf(IsAllGather(), SeqIs(1), InputShapeIs(ElementsAre(4)))));
// Each takes a value or any matcher of the field's type (Gt(2), HasSubstr("unit 'block0'")).
//
// Thread-safety: matchers are immutable once built; match from any thread.

#include <gmock/gmock.h>

#include <utility>

#include "backends/process_group.h"

namespace fsdpsim::testing {

template <typename M>
auto OpIs(M&& m) {
  return ::testing::Field("op", &CollectiveDesc::op, std::forward<M>(m));
}
inline auto IsAllGather() { return OpIs(CollectiveOp::AllGather); }
inline auto IsReduceScatter() { return OpIs(CollectiveOp::ReduceScatter); }
inline auto IsAllReduce() { return OpIs(CollectiveOp::AllReduce); }
inline auto IsBroadcast() { return OpIs(CollectiveOp::Broadcast); }
inline auto IsBarrier() { return OpIs(CollectiveOp::Barrier); }

/// The group's name ("world", or a split sub-group's).
template <typename M>
auto GroupIs(M&& m) {
  return ::testing::Field("group", &CollectiveDesc::group, std::forward<M>(m));
}
template <typename M>
auto GroupRankIs(M&& m) {
  return ::testing::Field("group_rank", &CollectiveDesc::group_rank, std::forward<M>(m));
}
template <typename M>
auto GroupSizeIs(M&& m) {
  return ::testing::Field("group_size", &CollectiveDesc::group_size, std::forward<M>(m));
}
/// The per-group sequence number (1 for a group's first collective).
template <typename M>
auto SeqIs(M&& m) {
  return ::testing::Field("seq", &CollectiveDesc::seq, std::forward<M>(m));
}
template <typename M>
auto DtypeIs(M&& m) {
  return ::testing::Field("dtype", &CollectiveDesc::dtype, std::forward<M>(m));
}
/// A std::vector<int64_t> or a container matcher (ElementsAre(2, 4)).
template <typename M>
auto InputShapeIs(M&& m) {
  return ::testing::Field("input_shape", &CollectiveDesc::input_shape, std::forward<M>(m));
}
template <typename M>
auto OutputShapeIs(M&& m) {
  return ::testing::Field("output_shape", &CollectiveDesc::output_shape, std::forward<M>(m));
}
template <typename M>
auto ReduceOpIs(M&& m) {
  return ::testing::Field("reduce_op", &CollectiveDesc::reduce_op, std::forward<M>(m));
}
template <typename M>
auto RootIs(M&& m) {
  return ::testing::Field("root", &CollectiveDesc::root, std::forward<M>(m));
}
/// What the caller issued it for (backends/collective_label.h), e.g. the
/// engine's "fsdp all-gather of unit 'block0'"; "" when unlabelled.
template <typename M>
auto LabelIs(M&& m) {
  return ::testing::Field("label", &CollectiveDesc::label, std::forward<M>(m));
}

}  // namespace fsdpsim::testing
