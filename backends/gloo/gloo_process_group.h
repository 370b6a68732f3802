#pragma once
// Real communication: fsdpsim::ProcessGroup over LibTorch 2.x's
// c10d::ProcessGroupGloo on the loopback TCP device, usable from thread ranks
// of one process (a shared HashStore or TCPStore) or from separate processes
// (a TCPStore, e.g. from make_gloo_process_group_from_env()).
//
// How each collective maps onto Gloo (LibTorch 2.15 has native
// all_gather_single and reduce_scatter_single; measured against these on
// loopback, the first was no faster and the second slower and not in rank
// order, so neither is used):
// - all_gather_into_tensor: Gloo's list allgather writing into views (chunks)
//   of the flat output; `input` may itself be this rank's chunk (Gloo reads
//   the input into its own buffer before it writes the outputs).
// - reduce_scatter_tensor: an all_to_all_single (rank j receives chunk j of
//   every rank's input) followed by a LOCAL reduction in rank order,
//   in_0 op in_1 op ... op in_{n-1}, with ATen ops in the tensor's dtype:
//   pre-divide each input (x / predivide, computed in float for half/bf16
//   and rounded once) when predivide != 1, sum, divide by the group size for
//   Avg, then divide by postdivide when != 1. This is the fake backend's
//   arithmetic, so both give bitwise-equal results (a test checks it).
// - all_reduce: Gloo's native allreduce for Sum/Min/Max (Avg = native Sum,
//   then an in-dtype division by the group size). Gloo may add the ranks'
//   contributions in any order, so float sums can differ in the last bit from
//   the fake's rank-order sum. BFloat16, which Gloo rejects, goes through an
//   allgather of every rank's whole tensor and the rank-order local
//   reduction above (bitwise equal to the fake). It is one Gloo op rather than
//   reduce-scatter + all-gather because a second stage issued when the first
//   completes would reach Gloo after collectives the caller issued meanwhile,
//   in a different order on each rank.
// - Data movement (all-gather, broadcast, the alltoall) of dtypes Gloo lacks
//   goes through a same-width view Gloo accepts (BFloat16 as Half, Bool as
//   Byte): Gloo copies the bytes and never looks at the values.
// - Tensors of zero elements move nothing: the Work completes at once, on
//   every rank alike (the shapes agree across ranks by the ordering contract).
//
// Post-processing (the local reductions and Avg's division) runs in the
// completion callback of Gloo's future, i.e. on a Gloo worker thread, before
// the Work counts as completed; wait() only blocks. on_completion callbacks
// run right after, on the same thread, and wait() returns only once they
// have run.
//
// Unlike the fake, Gloo cannot tell that ranks called different collectives
// under one sequence number (mismatched sizes fail inside Gloo or time out):
// GlooOptions::check_collectives (on by default) adds that check.
//
// Errors: argument errors throw CommError at the call (collective_checks.h).
// Building a group sets SIGPIPE to ignored if it is still at its default (as
// Python does), so that a peer's death reaches the caller as an error and
// does not kill the process. Transport failures (a peer died, a timeout)
// travel in the Work and wait()
// throws CommError -- CollectiveTimeoutError for Gloo timeouts -- whose
// message holds the CollectiveDesc (rank, group, seq, op, shapes) and the
// first line of Gloo's message. Rendezvous failures throw CommError from the
// factory functions and from split().
//
// WorkTimes: Gloo does not report when a collective starts moving data, so
// start_ns is the issue time; end_ns is taken after post-processing.
//
// Thread-safety: as for every ProcessGroup, one GlooProcessGroup belongs to
// one rank and is called from that rank's thread only. on_completion
// callbacks run on a Gloo worker thread (or at once on the caller's thread if
// the work already completed).

#include <torch/csrc/distributed/c10d/Store.hpp>

#include <chrono>
#include <string>
#include <vector>

#include "backends/clock.h"
#include "backends/process_group.h"

namespace fsdpsim {

struct GlooOptions {
  /// Rendezvous store shared by all ranks (TCPStore or HashStore). Every key
  /// the group writes lies under "<name>/", so worlds of different names may
  /// share one store.
  c10::intrusive_ptr<c10d::Store> store;
  int rank = 0;
  int size = 1;
  /// Group name used in errors and traces; unique within a world.
  std::string name = "world";
  /// Ranks of the root world by group rank; empty means 0..size-1.
  std::vector<int> global_ranks;
  /// Rendezvous and per-collective timeout.
  std::chrono::milliseconds timeout{60000};
  /// Address of the loopback device Gloo binds to.
  std::string hostname = "127.0.0.1";
  /// Timestamps of Work::times(); nullptr = SteadyClock::instance().
  const Clock* clock = nullptr;
  /// Check every collective across ranks first (backends/checked_process_group.h)
  /// over a side group "<name>/check": a mismatch fails with a report instead
  /// of mixing data, crashing inside Gloo or hanging.
  bool check_collectives = true;
};

/// Builds this rank's group; blocks until every rank of the group has
/// connected (within options.timeout). Throws CommError on bad options or a
/// failed rendezvous.
ProcessGroupPtr make_gloo_process_group(GlooOptions options);

/// TCP store for rendezvous. With is_master the store binds host:port (port 0
/// picks a free one; read it with tcp_store_port()) and does not wait for the
/// other ranks; otherwise it connects to host:port, retrying until `timeout`.
/// Throws CommError on failure.
c10::intrusive_ptr<c10d::Store> make_tcp_store(const std::string& host, int port, int world_size, bool is_master,
                                               std::chrono::milliseconds timeout);

/// The port a store from make_tcp_store() uses. Throws std::invalid_argument
/// for other stores.
int tcp_store_port(const c10::intrusive_ptr<c10d::Store>& store);

/// The rendezvous variables PyTorch launchers set (and fsdpsim_launch sets).
struct LaunchEnv {
  std::string master_addr;
  int master_port = 0;
  int rank = 0;
  int world_size = 1;
  /// LOCAL_RANK (this process's index on its node); RANK when unset.
  int local_rank = 0;
  /// torchrun's agent already hosts the TCP store at MASTER_ADDR:MASTER_PORT
  /// (TORCHELASTIC_USE_AGENT_STORE=True): every rank, rank 0 too, connects.
  bool agent_store = false;
  /// TORCHELASTIC_RESTART_COUNT (0 when unset): which attempt of the job this is.
  int restart_count = 0;

  /// Reads MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE, and when set
  /// LOCAL_RANK, TORCHELASTIC_USE_AGENT_STORE and TORCHELASTIC_RESTART_COUNT.
  /// Throws std::invalid_argument naming the variable if one is missing, not
  /// a number, or out of range (port 1..65535, world size >= 1,
  /// 0 <= rank, local rank < world size, restart count >= 0).
  static LaunchEnv from_env();
};

/// Rendezvous from the environment and builds the group "world" over all
/// ranks. Rank 0 hosts the TCP store at MASTER_ADDR:MASTER_PORT, unless
/// torchrun's agent hosts it (LaunchEnv::agent_store); then this attempt's
/// keys go under "fsdpsim/attempt<restart_count>/", so a restarted job never
/// reads the rendezvous keys of an earlier attempt from the agent's store.
ProcessGroupPtr make_gloo_process_group_from_env(std::chrono::milliseconds timeout, bool check_collectives = true);

}  // namespace fsdpsim
