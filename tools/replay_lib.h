#pragma once
// `fsdpsim replay`'s logic, as a library the tests call directly:
//   check   -- flight-recorder style analysis of a JSONL trace: every
//              collective matched across ranks by (group, seq); op, dtype,
//              size, reduce-op and root mismatches; missing ranks; ranks that
//              stopped early; failed and in-flight collectives.
//   run     -- replays the trace's collectives with the recorded sizes,
//              dtypes and order on a chosen backend (fake threads / fibers,
//              Gloo threads / processes), optionally at another world size,
//              with the recorded gaps, or verifying every output exactly;
//              reports per-op p50/p95 latency, algbw and busbw.
//   predict -- the trace's communication time at another world size from
//              the cost model (sim/cost_model.h), calibrated by replaying a
//              few sizes, and compared with a measured replay.
//
// Trust: a trace file is untrusted input. Parsing validates every field
// (backends/observe/jsonl.h) plus what replay needs (consistent groups, per-record sizes
// that fit the op, no duplicated (rank, group, seq)); every problem is one
// TraceFileError "trace line N: ..." and nothing is allocated from a size
// before it passed ReplayLimits.
//
// Replay model: each rank runs its recorded collectives in its recorded
// issue order, waiting for each before issuing the next (blocking replay, as
// PARAM's comms replay does by default). One collective's latency is the
// time from the moment the LAST rank called it to the moment the last rank's
// wait() returned: the collective itself, without the skew of the ranks
// arriving. Sizes follow nccl-tests (S = total size, cost_model.h).
//
// Thread-safety: free functions over values; run_replay starts and joins
// its own ranks. Nothing here is global state.

#include <chrono>
#include <cstdint>
#include <functional>
#include <iosfwd>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "backends/observe/record.h"
#include "backends/process_group.h"
#include "sim/cost_model.h"

namespace fsdpsim::tools {

class WorkerContext;  // tools/worker.h

/// A trace that cannot be used: "trace line N: <field>: <problem>" (or a
/// file-level problem without a line).
class TraceFileError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// The trace is well formed but this replay cannot run it (unmatched
/// collectives, a sub-group that does not exist at the new world size, a
/// size over the limits). One line.
class ReplayPlanError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// The replay ran and failed (a rank's collective failed, a process died).
class ReplayRunError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// ---------------------------------------------------------------------------
// Reading

/// A validated trace: its collectives rank by rank, each rank's in file order
/// (a streamed trace interleaves ranks), with their line numbers.
struct ReplayTrace {
  int world_size = 0;
  std::vector<observe::Record> collectives;
  std::vector<size_t> lines;  ///< line of each collective in the file (header = line 1)
  size_t engine_events = 0;
  /// Every group: name -> global ranks by group rank.
  std::map<std::string, std::vector<int>> groups;
};

/// Most groups a trace may hold (each becomes a sub-group in a replay).
constexpr size_t kMaxTraceGroups = 1024;
/// Most collective calls a replay plan holds over all ranks (one iteration).
constexpr size_t kMaxPlannedOps = size_t{1} << 24;
/// Most ranks a replay runs inside one process (threads or fibers).
constexpr int kMaxInProcessRanks = 8192;

/// Parses and validates (see the file comment). Throws TraceFileError.
ReplayTrace parse_replay_trace(std::istream& in);
/// Opens `path` and parses it; the error names the file.
ReplayTrace load_replay_trace(const std::string& path);

/// Element size of a trace dtype name ("Float" -> 4). Throws TraceFileError
/// for names c10 does not know.
int64_t dtype_element_size(const std::string& dtype);

// ---------------------------------------------------------------------------
// check

struct CheckFinding {
  enum class Kind {
    OpMismatch,  ///< "collective type mismatch"
    DtypeMismatch,
    SizeMismatch,
    ReduceOpMismatch,
    RootMismatch,
    MissingRanks,   ///< "not all ranks joined collective N of group G"
    StateMismatch,  ///< some ranks completed it, some did not
    Failed,         ///< failed on every rank that joined
    InFlight,       ///< never completed on any rank that joined
    NoCollectives,  ///< the trace holds no collective record
    AbsentRanks,    ///< ranks of the header's world in no group and without records
  };
  Kind kind = Kind::OpMismatch;
  std::string group;
  uint64_t seq = 0;
  std::vector<int> ranks;  ///< the ranks at fault (missing, failed, the minority of a mismatch)
  std::string message;     ///< one line
};

const char* to_string(CheckFinding::Kind kind);

struct CheckReport {
  int world_size = 0;
  size_t groups = 0;
  size_t collectives = 0;  ///< distinct (group, seq)
  size_t records = 0;      ///< collective records over all ranks
  std::vector<CheckFinding> findings;
  /// "where each rank was": one line per set of ranks with the same last
  /// collective (empty when the trace is clean).
  std::vector<std::string> where;
  bool clean() const { return findings.empty(); }
  /// The report as printed by `fsdpsim replay check`.
  std::string text() const;
};

CheckReport check_trace(const ReplayTrace& trace);

/// Whether a finding of this kind makes every replay of the trace refuse it
/// (make_replay_plan throws the finding's message): mismatches, missing or
/// absent ranks, no collectives. Failed and in-flight collectives replay.
bool blocks_replay(CheckFinding::Kind kind);

// ---------------------------------------------------------------------------
// Planning a replay

/// Limits on what a trace may make a replay allocate or wait for.
struct ReplayLimits {
  /// One rank's buffers for one collective (input + output; in-place ops
  /// count once). --max-bytes.
  int64_t max_bytes_per_collective = int64_t{1} << 30;
  /// Every in-process rank's largest collective at once. --max-memory.
  int64_t max_memory_bytes = int64_t{8} << 30;
  /// --use-timestamps: the most one rank may sleep over the whole replay.
  double max_sleep_s = 60;
};

struct PlannedOp {
  size_t line = 0;         ///< trace line of the record this op replays
  size_t group_index = 0;  ///< into ReplayPlan::groups
  uint64_t seq = 0;        ///< the recorded sequence number (reports)
  CollectiveOp op = CollectiveOp::Barrier;
  at::ScalarType dtype = at::kFloat;
  int64_t in_numel = 0;
  int64_t out_numel = 0;
  ReduceOp reduce_op = ReduceOp::Sum;
  int root = 0;              ///< group rank
  int64_t gap_ns = 0;        ///< recorded idle time on this rank before the issue
  int64_t buffer_bytes = 0;  ///< what one rank allocates for it
  int64_t total_bytes = 0;   ///< S
};

struct PlannedGroup {
  std::string name;
  std::vector<int> ranks;  ///< global ranks of the replay world, by group rank
};

struct ReplayPlan {
  int trace_world_size = 0;
  int world_size = 0;
  std::vector<PlannedGroup> groups;
  std::vector<std::vector<PlannedOp>> per_rank;  ///< by rank: its ops in issue order
  /// Rescaled per-rank counts were rounded up to a multiple of the new
  /// world (FSDP pads its flat parameters the same way).
  bool padded = false;
  int64_t max_buffer_bytes = 0;  ///< largest PlannedOp::buffer_bytes
  /// Distinct collectives (group, seq) per iteration.
  size_t collectives = 0;
};

/// Builds the per-rank programs. world_size 0 = the trace's. At another
/// world size every group must span the whole trace world (it then spans the
/// new one) and all-gather / reduce-scatter keep their total size S (per-rank
/// counts S / n, rounded up). Needs a trace without findings that
/// blocks_replay(): the error is check's first such finding. Throws
/// ReplayPlanError.
ReplayPlan make_replay_plan(const ReplayTrace& trace, int world_size, const ReplayLimits& limits);

// ---------------------------------------------------------------------------
// Running

enum class ReplayBackend { FakeThreads, FakeFibers, GlooThreads, GlooProcesses };
const char* to_string(ReplayBackend backend);
/// "fake-threads", ...; throws std::invalid_argument listing the choices.
ReplayBackend replay_backend_from_string(const std::string& name);

struct ReplayOptions {
  ReplayBackend backend = ReplayBackend::FakeThreads;
  int iterations = 1;
  /// Sleep each rank's recorded gap before each of its collectives.
  bool use_timestamps = false;
  /// Fill inputs with crafted values and verify every output bit for bit.
  bool check_data = false;
  std::chrono::milliseconds timeout{60000};
  ReplayLimits limits;
  /// GlooProcesses: the command that runs a worker (tools/worker.h:
  /// worker_command(); the job names kReplayWorker); empty: refused.
  std::vector<std::string> worker_command;
  /// In-process backends: decorates each rank's world group before the
  /// replay builds its sub-groups (tests inject faults through it).
  std::function<ProcessGroupPtr(ProcessGroupPtr group, int rank)> wrap_group;
  /// Data-free (fake-fibers only): buffers on the meta device (nothing is
  /// allocated or moved, so no memory limit applies) and a simulated clock:
  /// each collective lasts `cost_model`'s time from its last arrival and the
  /// recorded gaps (use_timestamps) are compute that costs no real time.
  /// Timings are then simulated nanoseconds.
  bool data_free = false;
  sim::CostModelParams cost_model;
};

/// One replayed collective (one iteration of one (group, seq)).
struct CollectiveTiming {
  size_t group_index = 0;
  uint64_t seq = 0;
  int iteration = 0;
  CollectiveOp op = CollectiveOp::Barrier;
  int group_size = 0;
  int64_t total_bytes = 0;     ///< S
  int64_t per_rank_bytes = 0;  ///< one rank's input
  int64_t latency_ns = 0;      ///< last rank's end - last rank's start
};

struct ReplayResult {
  std::vector<CollectiveTiming> collectives;  ///< by iteration, then first issue
  double wall_s = 0;
  /// check_data: outputs verified, and the first wrong element ("" = none).
  size_t checked_outputs = 0;
  std::string data_error;
  /// data_free: the slowest rank's simulated clock at the end (the replay's
  /// makespan: gaps, waits and collectives on its critical path).
  int64_t simulated_end_ns = 0;
  /// Sum of every collective's latency.
  int64_t total_latency_ns() const;
};

/// Runs the plan. Throws ReplayPlanError when the limits or the backend's
/// own limits refuse it before anything runs, ReplayRunError when it fails.
ReplayResult run_replay(const ReplayPlan& plan, const ReplayOptions& options);

/// The worker kind (tools/worker.h) of a gloo-processes rank, and its entry
/// point (the job, and the launcher's RANK / WORLD_SIZE / MASTER_*).
inline constexpr const char* kReplayWorker = "replay";
int replay_worker_main(const WorkerContext& context);

// ---------------------------------------------------------------------------
// Reports

struct OpSummary {
  CollectiveOp op = CollectiveOp::Barrier;
  size_t count = 0;
  int64_t total_bytes = 0;     ///< sum of S
  int64_t per_rank_bytes = 0;  ///< sum of one rank's input
  int64_t p50_ns = 0;
  int64_t p95_ns = 0;
  int64_t total_ns = 0;
  double algbw_gbps = 0;  ///< sum S / sum t
  double busbw_gbps = 0;  ///< sum (S x bus factor) / sum t
};

/// Per op kind, in the order all_gather, reduce_scatter, all_reduce, broadcast, barrier.
std::vector<OpSummary> summarize(const std::vector<CollectiveTiming>& timings);
std::string format_summary(const std::vector<OpSummary>& summary);
/// --dry-run: counts, sizes and groups of the plan, without running it.
std::string format_plan_statistics(const ReplayTrace& trace, const ReplayPlan& plan);

// ---------------------------------------------------------------------------
// predict

/// Predicted time of each planned collective at the plan's world size.
int64_t predict_plan_ns(const ReplayPlan& plan, const sim::CostModelParams& params,
                        std::map<CollectiveOp, int64_t>* per_op = nullptr);

struct CalibrationOptions {
  /// Sizes S per op: `sizes` points spaced geometrically from a quarter of
  /// the plan's smallest S for that op to four times its largest, clamped to
  /// [min_bytes, max_bytes] and spanning at least a factor 16.
  int sizes = 4;
  int64_t min_bytes = 4 << 10;
  int64_t max_bytes = 64 << 20;
  /// Timed repetitions of each size (after one untimed).
  int reps = 5;
};

/// Replays a ladder of Float sizes of each op the plan uses (plus barriers)
/// on `options.backend` over each of `world_sizes` ranks (one group over
/// all; one replay per world size) and returns the median latency of each
/// (world, op, size). Two world sizes let the fit tell the fixed overhead
/// per collective from the per-step latency.
std::vector<sim::CostSample> calibrate(const ReplayPlan& plan, const std::vector<int>& world_sizes,
                                       const ReplayOptions& options, const CalibrationOptions& calibration = {});

// ---------------------------------------------------------------------------
// Command line

/// `fsdpsim replay`: `args` after "replay". Returns the exit code: 0 clean /
/// success, 1 problems found or the replay failed, 2 usage errors and
/// unreadable or unreplayable traces (one line on `err`). `worker_command`
/// starts a worker of this binary (worker_command() in tools/worker.h);
/// without it gloo-processes is refused.
int replay_main(const std::vector<std::string>& args, std::ostream& out, std::ostream& err,
                const std::vector<std::string>& worker_command = {});

}  // namespace fsdpsim::tools
