// fsdpsim replay: reading hostile traces (one clean "trace line N" error,
// never a crash or a huge allocation), the corpus in tests/replay_corpus/
// plus generated mutations, the flight-recorder style check (on crafted
// traces and on worlds that fail on purpose), replay on every backend with
// exact data checks and rescaled worlds, reports, predict, and the command
// line's exit codes.

#include <ATen/ATen.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <regex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "backends/errors.h"
#include "backends/observe/flight_recorder.h"
#include "backends/observe/jsonl.h"
#include "backends/observe/observed_process_group.h"
#include "backends/observe/trace_recorder.h"
#include "sim/world.h"
#include "tools/replay_lib.h"
#include "tools/worker.h"

namespace fsdpsim::tools {
namespace {

using namespace std::chrono_literals;
using ::testing::HasSubstr;

// ---------------------------------------------------------------------------
// Helpers

class TempFile {
 public:
  explicit TempFile(const std::string& text) {
    static int counter = 0;
    path_ = (std::filesystem::temp_directory_path() /
             ("fsdpsim-replay-test-" + std::to_string(getpid()) + "-" + std::to_string(counter++) + ".jsonl"))
                .string();
    std::ofstream out(path_, std::ios::binary);
    out << text;
  }
  ~TempFile() { std::filesystem::remove(path_); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

struct CliResult {
  int code = 0;
  std::string out;
  std::string err;
};

CliResult cli(const std::vector<std::string>& args, const std::vector<std::string>& worker = {}) {
  std::ostringstream out, err;
  CliResult r;
  r.code = replay_main(args, out, err, worker);
  r.out = out.str();
  r.err = err.str();
  return r;
}

size_t count_lines(const std::string& text) { return static_cast<size_t>(std::count(text.begin(), text.end(), '\n')); }

ReplayTrace parse(const std::string& text) {
  std::istringstream in(text);
  return parse_replay_trace(in);
}

// Runs `body` on a traced fake world and returns the JSONL trace.
std::string record_world(int world_size, sim::RankKind kind, const std::function<void(sim::RankContext&)>& body,
                         sim::WorldResult* result = nullptr, std::shared_ptr<observe::TraceRecorder>* keep = nullptr) {
  sim::WorldOptions options;
  options.world_size = world_size;
  options.rank_kind = kind;
  options.collective_timeout = 10s;
  auto recorder = std::make_shared<observe::TraceRecorder>(world_size);
  options.trace = recorder;
  sim::World world(options);
  sim::WorldResult outcome = world.run(body);
  if (result) *result = outcome;
  if (keep) *keep = recorder;
  std::ostringstream out;
  recorder->write_jsonl(out);
  return out.str();
}

// An FSDP-like step: all-gather parameters, reduce-scatter gradients of two
// units, an averaged all-reduce, a Double broadcast from rank 1, a BFloat16
// all-gather, a barrier.
void fsdp_like(sim::RankContext& ctx) {
  ProcessGroup& pg = *ctx.world_group();
  const int n = pg.size();
  for (int unit = 0; unit < 2; ++unit) {
    const int64_t shard = 3 + unit;
    at::Tensor full = at::empty({shard * n});
    pg.all_gather_into_tensor(full, at::ones({shard}))->wait();
    at::Tensor grad = at::empty({shard});
    pg.reduce_scatter_tensor(grad, at::ones({shard * n}), {})->wait();
  }
  AllReduceOptions avg;
  avg.reduce_op = ReduceOp::Avg;
  pg.all_reduce(at::ones({5}), avg)->wait();
  BroadcastOptions from1;
  from1.root = n > 1 ? 1 : 0;
  pg.broadcast(at::ones({4}, at::kDouble), from1)->wait();
  pg.all_gather_into_tensor(at::empty({2 * n}, at::kBFloat16), at::ones({2}, at::kBFloat16))->wait();
  pg.barrier()->wait();
}
constexpr size_t kFsdpLikeOps = 8;      // collectives per rank
constexpr size_t kFsdpLikeChecked = 7;  // all but the barrier

// fsdp_like plus sub-groups {0,1},{2,3} (Int max all-reduce) and {0,2},{1,3} (all-gather).
void with_subgroups(sim::RankContext& ctx) {
  fsdp_like(ctx);
  ProcessGroup& pg = *ctx.world_group();
  ProcessGroupPtr pairs = pg.split({{0, 1}, {2, 3}});
  ProcessGroupPtr strided = pg.split({{0, 2}, {1, 3}});
  AllReduceOptions max;
  max.reduce_op = ReduceOp::Max;
  pairs->all_reduce(at::ones({6}, at::kInt), max)->wait();
  strided->all_gather_into_tensor(at::empty({10}), at::ones({5}))->wait();
  pg.barrier()->wait();
}

// One record for make_trace.
struct Rec {
  int rank = 0;
  uint64_t seq = 1;
  CollectiveOp op = CollectiveOp::AllGather;
  int64_t in = 4;
  int64_t out = 16;
  at::ScalarType dtype = at::kFloat;
  ReduceOp reduce_op = ReduceOp::Sum;
  int root = 0;
  std::string status = "completed";
  std::string error;
  int64_t issue_ns = 1000;
  int64_t end_ns = 2000;
  std::string group = "world";
  std::vector<int> ranks;  // empty: the whole world
};

// A trace written by a TraceRecorder from scripted records (ranks in order).
std::string make_trace(int world_size, const std::vector<Rec>& recs) {
  observe::TraceRecorder recorder(world_size);
  for (const Rec& r : recs) {
    CollectiveDesc desc;
    desc.group = r.group;
    desc.seq = r.seq;
    desc.op = r.op;
    desc.dtype = r.dtype;
    if (r.op != CollectiveOp::Barrier) {
      desc.input_shape = {r.in};
      desc.output_shape = {r.out};
    }
    desc.reduce_op = r.reduce_op;
    desc.root = r.root;
    std::vector<int> ranks = r.ranks;
    if (ranks.empty()) {
      for (int i = 0; i < world_size; ++i) ranks.push_back(i);
    }
    desc.group_size = static_cast<int>(ranks.size());
    const size_t id = recorder.record_issue(r.rank, desc, ranks, r.issue_ns);
    if (r.status == "completed") {
      recorder.record_completion(id, WorkTimes{r.issue_ns, r.issue_ns, r.end_ns}, nullptr);
    } else if (r.status == "failed") {
      recorder.record_completion(id, WorkTimes{r.issue_ns, r.issue_ns, r.end_ns},
                                 std::make_exception_ptr(std::runtime_error(r.error)));
    }
  }
  std::ostringstream out;
  recorder.write_jsonl(out);
  return out.str();
}

// Four ranks all-gathering 4 floats at seq 1..`seqs`.
std::vector<Rec> clean_records(int world_size, uint64_t seqs) {
  std::vector<Rec> recs;
  for (int r = 0; r < world_size; ++r) {
    for (uint64_t s = 1; s <= seqs; ++s) {
      Rec rec;
      rec.rank = r;
      rec.seq = s;
      rec.out = 4 * world_size;
      rec.issue_ns = static_cast<int64_t>(s) * 10000;
      rec.end_ns = rec.issue_ns + 1000;
      recs.push_back(rec);
    }
  }
  return recs;
}

const CheckFinding* find(const CheckReport& report, CheckFinding::Kind kind) {
  for (const auto& f : report.findings) {
    if (f.kind == kind) return &f;
  }
  return nullptr;
}

std::string header(int world = 2) {
  return "{\"schema\":\"fsdpsim.trace\",\"version\":1,\"world_size\":" + std::to_string(world) + "}\n";
}

// One valid collective line of a world-2 trace, with `replace` applied
// (key -> raw JSON value).
std::string event_line(int id, int rank, uint64_t seq, const std::map<std::string, std::string>& replace = {}) {
  std::map<std::string, std::string> fields = {{"id", std::to_string(id)},
                                               {"rank", std::to_string(rank)},
                                               {"kind", "\"collective\""},
                                               {"name", "\"all_gather\""},
                                               {"detail", "\"\""},
                                               {"group", "\"world\""},
                                               {"group_ranks", "[0,1]"},
                                               {"seq", std::to_string(seq)},
                                               {"op", "\"all_gather\""},
                                               {"dtype", "\"Float\""},
                                               {"in_numel", "2"},
                                               {"out_numel", "4"},
                                               {"reduce_op", "\"sum\""},
                                               {"root", "0"},
                                               {"issue_ns", "100"},
                                               {"start_ns", "110"},
                                               {"end_ns", "120"},
                                               {"logical_clock_issue", std::to_string(2 * seq - 1)},
                                               {"logical_clock_end", std::to_string(2 * seq)},
                                               {"status", "\"completed\""},
                                               {"error", "\"\""}};
  for (const auto& [k, v] : replace) fields[k] = v;
  std::string line = "{";
  bool first = true;
  for (const auto& [k, v] : fields) {
    if (v.empty()) continue;  // "" removes the field
    line += (first ? "\"" : ",\"") + k + "\":" + v;
    first = false;
  }
  return line + "}\n";
}

// ---------------------------------------------------------------------------
// Reading hostile input: one clean error naming the line

struct BadCase {
  const char* name;
  std::string text;
  const char* expected;  // the error starts with this
};

std::vector<BadCase> bad_cases() {
  const std::string ok0 = event_line(0, 0, 1), ok1 = event_line(1, 1, 1);
  std::string garbage = header();
  for (int i = 0; i < 300; ++i) garbage.push_back(static_cast<char>((i * 37 + 11) % 256));
  std::string full = header() + ok0 + ok1;
  return {
      {"empty file", "", "trace line 1: missing header (empty input)"},
      {"wrong schema", "{\"schema\":\"torch.flight\",\"version\":1,\"world_size\":2}\n" + ok0,
       "trace line 1: field 'schema': 'torch.flight' is not 'fsdpsim.trace'"},
      {"wrong version", "{\"schema\":\"fsdpsim.trace\",\"version\":7,\"world_size\":2}\n" + ok0,
       "trace line 1: field 'version': version 7 is not supported"},
      {"binary garbage", garbage, "trace line 2: not valid JSON"},
      {"truncated", full.substr(0, full.size() - 30), "trace line 3: not valid JSON"},
      {"string count", header() + ok0 + event_line(1, 1, 1, {{"in_numel", "\"2\""}}),
       "trace line 3: field 'in_numel': expected an integer, got string"},
      {"float count", header() + event_line(0, 0, 1, {{"in_numel", "1e15"}}),
       "trace line 2: field 'in_numel': expected an integer"},
      {"negative count", header() + event_line(0, 0, 1, {{"in_numel", "-2"}, {"out_numel", "-4"}}),
       "trace line 2: field 'in_numel': -2 is outside"},
      {"unknown op", header() + event_line(0, 0, 1, {{"op", "\"all_to_all\""}}),
       "trace line 2: field 'op': unknown collective op 'all_to_all'"},
      {"duplicated seq", header() + ok0 + event_line(2, 0, 1) + ok1,
       "trace line 3: field 'seq': rank 0 recorded group 'world' seq 1 twice (also on line 2)"},
      {"seq backwards", header() + event_line(0, 0, 2) + event_line(1, 0, 1),
       "trace line 3: field 'seq': rank 0 recorded group 'world' seq 1 after seq 2 (line 2)"},
      {"group changes ranks", header() + ok0 + event_line(1, 1, 1, {{"group_ranks", "[1,0]"}}),
       "trace line 3: field 'group_ranks': group 'world' has ranks [1,0] here but [0,1] on line 2"},
      {"all_gather sizes", header() + event_line(0, 0, 1, {{"out_numel", "5"}}),
       "trace line 2: field 'out_numel': all_gather over 2 ranks needs out_numel = 2 x in_numel 2, got 5"},
      {"all_gather size overflow",
       header() + event_line(0, 0, 1, {{"in_numel", "9223372036854775807"}, {"out_numel", "2"}}),
       "trace line 2: field 'out_numel': all_gather over 2 ranks needs out_numel = 2 x in_numel"},
      {"rank outside", header() + event_line(0, 5, 1), "trace line 2: field 'rank': 5 is outside [0, 1]"},
      {"unknown field", header() + event_line(0, 0, 1, {{"bogus", "1"}}), "trace line 2: field 'bogus': unknown field"},
      {"missing field", header() + event_line(0, 0, 1, {{"status", ""}}), "trace line 2: field 'status': missing"},
      {"not an object", header() + "[1,2]\n", "trace line 2: expected a JSON object, got array"},
      {"deep nesting", header() + std::string(5000, '[') + std::string(5000, ']') + "\n",
       "trace line 2: nested deeper than"},
      {"blank line", header() + ok0 + "\n" + ok1, "trace line 3: empty line"},
      {"line too long", header() + std::string(observe::kMaxJsonlLineBytes + 10, ' ') + "\n",
       "trace line 2: longer than"},
      {"world size zero", "{\"schema\":\"fsdpsim.trace\",\"version\":1,\"world_size\":0}\n",
       "trace line 1: field 'world_size': 0 is outside"},
  };
}

TEST(ReplayParse, HostileInputGivesOneErrorNamingTheLine) {
  for (const auto& c : bad_cases()) {
    SCOPED_TRACE(c.name);
    try {
      parse(c.text);
      ADD_FAILURE() << "parsed without error";
    } catch (const TraceFileError& e) {
      EXPECT_EQ(std::string(e.what()).rfind(c.expected, 0), 0u) << e.what();
      EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos) << e.what();
      EXPECT_LT(std::string(e.what()).size(), 600u);
    }
  }
}

TEST(ReplayParse, CommandLineRefusesHostileTracesWithExit2AndOneLine) {
  for (const auto& c : bad_cases()) {
    SCOPED_TRACE(c.name);
    TempFile file(c.text);
    for (const char* command : {"check", "run"}) {
      CliResult r = cli({command, file.path()});
      EXPECT_EQ(r.code, 2) << r.out << r.err;
      EXPECT_EQ(count_lines(r.err), 1u) << r.err;
      EXPECT_THAT(r.err, HasSubstr(c.expected));
      EXPECT_EQ(r.out, "");
    }
  }
}

TEST(ReplayParse, HugeSizesAreRefusedBeforeAnythingIsAllocated) {
  // 1e15 floats per rank: well formed, describable by check, never allocated by run.
  const std::string text = header() +
                           event_line(0, 0, 1, {{"in_numel", "1000000000000000"}, {"out_numel", "2000000000000000"}}) +
                           event_line(1, 1, 1, {{"in_numel", "1000000000000000"}, {"out_numel", "2000000000000000"}});
  const ReplayTrace trace = parse(text);
  EXPECT_TRUE(check_trace(trace).clean());
  try {
    make_replay_plan(trace, 0, ReplayLimits{});
    FAIL() << "planned a 12 PB collective";
  } catch (const ReplayPlanError& e) {
    EXPECT_EQ(std::string(e.what()),
              "trace line 2: field 'in_numel': all_gather of 1000000000000000 Float elements in and 2000000000000000 "
              "out needs 1.2e+16 bytes on each rank, over the limit of 1073741824 bytes per collective (--max-bytes)");
  }
  TempFile file(text);
  CliResult r = cli({"run", file.path(), "--max-bytes", "64M"});
  EXPECT_EQ(r.code, 2);
  EXPECT_EQ(count_lines(r.err), 1u);
  EXPECT_THAT(r.err, HasSubstr("over the limit of 67108864 bytes per collective (--max-bytes)"));
  // --max-memory bounds all in-process ranks together.
  const std::string small = make_trace(4, clean_records(4, 1));
  TempFile small_file(small);
  r = cli({"run", small_file.path(), "--max-memory", "100"});
  EXPECT_EQ(r.code, 2);
  EXPECT_THAT(r.err, HasSubstr("over the limit of 100 bytes (--max-memory)"));
}

TEST(ReplayParse, EmptyTraceAndHeaderOnly) {
  const ReplayTrace trace = parse(header(3));
  EXPECT_EQ(trace.world_size, 3);
  const CheckReport report = check_trace(trace);
  ASSERT_EQ(report.findings.size(), 1u) << report.text();
  EXPECT_EQ(report.findings[0].message, "the trace holds no collective record (world 3)");
  EXPECT_THROW(make_replay_plan(trace, 0, {}), ReplayPlanError);
}

// ---------------------------------------------------------------------------
// The corpus, and mutations of a real trace

// Not __FILE__: ccache with base_dir makes it relative to the build directory.
std::filesystem::path corpus_dir() { return std::filesystem::path(FSDPSIM_TESTS_SOURCE_DIR) / "replay_corpus"; }

// Parse + check + plan; returns "" or the error. Anything but our error types fails the test.
std::string exercise(const std::string& text) {
  try {
    const ReplayTrace trace = parse(text);
    const CheckReport report = check_trace(trace);
    EXPECT_FALSE(report.text().empty());
    ReplayLimits limits;
    limits.max_bytes_per_collective = 1 << 20;
    for (int world : {0, 3}) {
      try {
        make_replay_plan(trace, world, limits);
      } catch (const ReplayPlanError& e) {
        EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos) << e.what();
      }
    }
    return "";
  } catch (const TraceFileError& e) {
    return e.what();
  }
}

TEST(ReplayCorpus, EveryFileParsesOrFailsCleanly) {
  const std::regex clean_error("^trace line [0-9]+: [^\n]+$");
  size_t valid = 0, bad = 0;
  for (const auto& entry : std::filesystem::directory_iterator(corpus_dir())) {
    if (entry.path().extension() != ".jsonl") continue;
    const std::string name = entry.path().filename().string();
    SCOPED_TRACE(name);
    std::ifstream in(entry.path(), std::ios::binary);
    std::stringstream text;
    text << in.rdbuf();
    const std::string error = exercise(text.str());
    if (name.rfind("valid_", 0) == 0) {
      EXPECT_EQ(error, "");
      ++valid;
    } else {
      EXPECT_TRUE(std::regex_match(error, clean_error)) << "'" << error << "'";
      ++bad;
    }
  }
  EXPECT_GE(valid, 10u);
  EXPECT_GE(bad, 25u);
}

TEST(ReplayCorpus, CheckVerdictsOfTheValidFiles) {
  auto check_file = [](const std::string& name) {
    std::ifstream in(corpus_dir() / name, std::ios::binary);
    return check_trace(parse_replay_trace(in));
  };
  EXPECT_TRUE(check_file("valid_clean.jsonl").clean());
  EXPECT_TRUE(check_file("valid_v2_groups.jsonl").clean());
  EXPECT_TRUE(check_file("valid_subgroups.jsonl").clean());
  EXPECT_TRUE(check_file("valid_late_start.jsonl").clean());  // a ring buffer that starts at seq 7
  EXPECT_NE(find(check_file("valid_op_mismatch.jsonl"), CheckFinding::Kind::OpMismatch), nullptr);
  EXPECT_NE(find(check_file("valid_size_mismatch.jsonl"), CheckFinding::Kind::SizeMismatch), nullptr);
  EXPECT_NE(find(check_file("valid_dtype_mismatch.jsonl"), CheckFinding::Kind::DtypeMismatch), nullptr);
  EXPECT_NE(find(check_file("valid_missing_rank.jsonl"), CheckFinding::Kind::MissingRanks), nullptr);
  EXPECT_NE(find(check_file("valid_failed.jsonl"), CheckFinding::Kind::Failed), nullptr);
  EXPECT_NE(find(check_file("valid_in_flight.jsonl"), CheckFinding::Kind::InFlight), nullptr);
}

TEST(ReplayCorpus, MutatedTracesNeverCrash) {
  const std::string base = record_world(4, sim::RankKind::Fibers, with_subgroups);
  ASSERT_EQ(exercise(base), "");
  std::vector<std::string> lines;
  {
    std::istringstream in(base);
    std::string line;
    while (std::getline(in, line)) lines.push_back(line + "\n");
  }
  const std::regex clean_error("^trace line ([0-9]+): [^\n]+$");
  std::mt19937_64 rng(20240601);
  auto pick = [&](size_t n) { return static_cast<size_t>(rng() % n); };
  const char* tokens[] = {"-1",
                          "0",
                          "1e308",
                          "99999999999999999999",
                          "\"x\"",
                          "null",
                          "[]",
                          "{}",
                          "true",
                          "18446744073709551615",
                          "9223372036854775807",
                          "\"all_to_all\"",
                          "\"in_flight\""};
  size_t parsed = 0, refused = 0;
  for (int i = 0; i < 400; ++i) {
    std::string text;
    switch (i % 6) {
      case 0: {  // flip bytes
        text = base;
        for (int k = 0; k < 1 + i % 4; ++k) text[pick(text.size())] = static_cast<char>(rng());
        break;
      }
      case 1:  // truncate anywhere
        text = base.substr(0, pick(base.size()));
        break;
      case 2: {  // drop or duplicate a line
        std::vector<std::string> l = lines;
        const size_t at = 1 + pick(l.size() - 1);
        if (i % 2)
          l.erase(l.begin() + static_cast<long>(at));
        else
          l.insert(l.begin() + static_cast<long>(at), l[at]);
        for (const auto& s : l) text += s;
        break;
      }
      case 3: {  // swap two lines
        std::vector<std::string> l = lines;
        std::swap(l[1 + pick(l.size() - 1)], l[1 + pick(l.size() - 1)]);
        for (const auto& s : l) text += s;
        break;
      }
      default: {  // replace a value with a hostile token
        text = base;
        size_t colon = text.find(':', pick(text.size()));
        if (colon == std::string::npos) break;
        size_t end = text.find_first_of(",}", colon + 1);
        if (end == std::string::npos) break;
        text.replace(colon + 1, end - colon - 1, tokens[pick(std::size(tokens))]);
        break;
      }
    }
    const std::string error = exercise(text);
    if (error.empty()) {
      ++parsed;
      continue;
    }
    ++refused;
    std::smatch m;
    ASSERT_TRUE(std::regex_match(error, m, clean_error)) << "mutation " << i << ": '" << error << "'";
    EXPECT_LE(std::stoul(m[1].str()), lines.size() + 5) << error;  // flips may add a few newlines
  }
  EXPECT_GT(refused, 100u);
  // Version 2's group lines make a swap of two lines refused more often (a
  // record moved above its group's definition), so fewer mutants parse.
  EXPECT_GT(parsed, 5u);
}

// ---------------------------------------------------------------------------
// check on crafted traces

TEST(ReplayCheck, CleanTraceFromEveryRankKind) {
  for (auto kind : {sim::RankKind::Threads, sim::RankKind::Fibers}) {
    SCOPED_TRACE(sim::to_string(kind));
    const ReplayTrace trace = parse(record_world(4, kind, with_subgroups));
    const CheckReport report = check_trace(trace);
    EXPECT_TRUE(report.clean()) << report.text();
    EXPECT_EQ(report.groups, 5u);  // world + two splits of two groups each
    EXPECT_EQ(report.records, 4 * (kFsdpLikeOps + 3));
    EXPECT_EQ(report.text(),
              "world 4, 5 groups, " + std::to_string(kFsdpLikeOps + 1 + 2 + 2) + " collectives, " +
                  std::to_string(report.records) +
                  " records\nOK: every collective of every group was joined by all its ranks with matching arguments "
                  "and completed\n");
  }
}

TEST(ReplayCheck, OpMismatchInTheWordsUsersKnow) {
  auto recs = clean_records(4, 2);
  for (auto& r : recs) {
    if (r.rank == 3 && r.seq == 2) r.op = CollectiveOp::ReduceScatter, r.in = 16, r.out = 4;
  }
  const CheckReport report = check_trace(parse(make_trace(4, recs)));
  ASSERT_EQ(report.findings.size(), 1u) << report.text();
  const CheckFinding& f = report.findings[0];
  EXPECT_EQ(f.kind, CheckFinding::Kind::OpMismatch);
  EXPECT_EQ(f.group, "world");
  EXPECT_EQ(f.seq, 2u);
  EXPECT_EQ(f.ranks, std::vector<int>{3});
  EXPECT_EQ(f.message,
            "group world seq 2: collective type mismatch: ranks {0-2} called all_gather Float in [4] out [16], "
            "rank 3 called reduce_scatter Float in [16] out [4]");
}

TEST(ReplayCheck, SizeDtypeReduceOpAndRootMismatches) {
  {
    auto recs = clean_records(4, 1);
    recs[0].in = 5, recs[0].out = 20;  // rank 0
    const auto report = check_trace(parse(make_trace(4, recs)));
    ASSERT_EQ(report.findings.size(), 1u);
    EXPECT_EQ(report.findings[0].message,
              "group world seq 1: size mismatch: rank 0 called all_gather Float in [5] out [20], ranks {1-3} called "
              "all_gather Float in [4] out [16]");
    EXPECT_EQ(report.findings[0].ranks, std::vector<int>{0});
  }
  {
    auto recs = clean_records(2, 1);
    recs[1].dtype = at::kBFloat16;
    const auto report = check_trace(parse(make_trace(2, recs)));
    ASSERT_EQ(report.findings.size(), 1u);
    EXPECT_EQ(report.findings[0].kind, CheckFinding::Kind::DtypeMismatch);
    EXPECT_EQ(report.findings[0].message,
              "group world seq 1: dtype mismatch: rank 0 called all_gather Float in [4] out [8], rank 1 called "
              "all_gather BFloat16 in [4] out [8]");
  }
  {
    std::vector<Rec> recs(3);
    for (int r = 0; r < 3; ++r) {
      recs[r].rank = r, recs[r].op = CollectiveOp::AllReduce, recs[r].in = recs[r].out = 6;
      recs[r].reduce_op = r == 2 ? ReduceOp::Max : ReduceOp::Sum;
    }
    const auto report = check_trace(parse(make_trace(3, recs)));
    ASSERT_EQ(report.findings.size(), 1u);
    EXPECT_EQ(report.findings[0].kind, CheckFinding::Kind::ReduceOpMismatch);
    EXPECT_EQ(report.findings[0].message,
              "group world seq 1: reduce op mismatch: ranks {0-1} called all_reduce Float in [6] out [6] op sum, rank "
              "2 called all_reduce Float in [6] out [6] op max");
  }
  {
    std::vector<Rec> recs(2);
    for (int r = 0; r < 2; ++r) recs[r].rank = r, recs[r].op = CollectiveOp::Broadcast, recs[r].in = recs[r].out = 3;
    recs[1].root = 1;
    const auto report = check_trace(parse(make_trace(2, recs)));
    ASSERT_EQ(report.findings.size(), 1u);
    EXPECT_EQ(report.findings[0].kind, CheckFinding::Kind::RootMismatch);
    EXPECT_EQ(report.findings[0].message,
              "group world seq 1: broadcast root mismatch: rank 0 called broadcast Float in [3] out [3] root 0, rank 1 "
              "called broadcast Float in [3] out [3] root 1");
  }
}

TEST(ReplayCheck, MissingRanksAndWhereEachRankWas) {
  // Rank 3 stops after seq 4; ranks 0-2 go on to seq 6, which never completes.
  std::vector<Rec> recs;
  for (auto& r : clean_records(4, 6)) {
    if (r.rank == 3 && r.seq > 4) continue;
    if (r.seq >= 5) r.status = "in_flight";
    recs.push_back(r);
  }
  const CheckReport report = check_trace(parse(make_trace(4, recs)));
  const CheckFinding* missing = find(report, CheckFinding::Kind::MissingRanks);
  ASSERT_NE(missing, nullptr) << report.text();
  EXPECT_EQ(missing->group, "world");
  EXPECT_EQ(missing->seq, 5u);
  EXPECT_EQ(missing->ranks, std::vector<int>{3});
  EXPECT_EQ(missing->message,
            "not all ranks joined collective 5 of group world: missing ranks {3}; rank 3's last collective: group "
            "world seq 4 all_gather (completed); the same rank is missing from every later collective of the group up "
            "to seq 6");
  const CheckFinding* in_flight = find(report, CheckFinding::Kind::InFlight);
  ASSERT_NE(in_flight, nullptr);
  EXPECT_EQ(in_flight->seq, 5u);
  EXPECT_EQ(in_flight->ranks, (std::vector<int>{0, 1, 2}));
  // One finding for the run of collectives left in flight the same way.
  EXPECT_EQ(in_flight->message,
            "group world seqs 5-6 (2 collectives, from all_gather): never completed: ranks {0-2} still in flight when "
            "the trace was written");
  ASSERT_EQ(report.findings.size(), 2u) << report.text();
  EXPECT_EQ(report.where,
            (std::vector<std::string>{
                "ranks {0-2}: group world seq 6 all_gather Float in [4] out [16] (in_flight)",
                "rank 3: group world seq 4 all_gather Float in [4] out [16] (completed), stopped early"}));
  EXPECT_THAT(report.text(), HasSubstr("2 problems:\n  not all ranks joined collective 5 of group world"));
}

TEST(ReplayCheck, StateMismatchAndFailures) {
  auto recs = clean_records(3, 2);
  for (auto& r : recs) {
    if (r.seq != 2) continue;
    if (r.rank == 1) r.status = "failed", r.error = "connection reset by peer\nsecond line";
    if (r.rank == 2) r.status = "in_flight";
  }
  CheckReport report = check_trace(parse(make_trace(3, recs)));
  ASSERT_EQ(report.findings.size(), 1u) << report.text();
  EXPECT_EQ(report.findings[0].kind, CheckFinding::Kind::StateMismatch);
  EXPECT_EQ(report.findings[0].ranks, (std::vector<int>{1, 2}));
  EXPECT_EQ(report.findings[0].message,
            "group world seq 2 all_gather: state mismatch: rank 0 completed, rank 1 failed, rank 2 still in flight; "
            "rank 1's error: connection reset by peer");
  for (auto& r : recs) {
    if (r.seq == 2) r.status = "failed", r.error = "timed out";
  }
  report = check_trace(parse(make_trace(3, recs)));
  ASSERT_EQ(report.findings.size(), 1u);
  EXPECT_EQ(report.findings[0].message, "group world seq 2 all_gather: ranks {0-2} failed; rank 0's error: timed out");
}

TEST(ReplayCheck, SubgroupsAreMatchedSeparately) {
  // Two pairs; in pair {2,3} rank 3 never joined its seq 1.
  std::vector<Rec> recs;
  for (int r = 0; r < 4; ++r) {
    if (r == 3) continue;
    Rec rec;
    rec.rank = r;
    rec.group = r < 2 ? "world/split1.0" : "world/split1.1";
    rec.ranks = r < 2 ? std::vector<int>{0, 1} : std::vector<int>{2, 3};
    rec.out = 8;
    recs.push_back(rec);
  }
  const CheckReport report = check_trace(parse(make_trace(4, recs)));
  ASSERT_EQ(report.findings.size(), 1u) << report.text();
  EXPECT_EQ(report.findings[0].message,
            "not all ranks joined collective 1 of group world/split1.1: missing ranks {3}; rank 3 recorded no "
            "collective");
}

// ---------------------------------------------------------------------------
// Worlds that fail on purpose: check (and the flight recorder) name the rank,
// group and sequence number.

struct FailedRun {
  std::string jsonl;
  std::string flight_dump;        // recorded live through an ObservedProcessGroup
  std::string trace_flight_dump;  // rebuilt from the trace, as `fsdpsim run` prints it
  sim::WorldResult result;
};

FailedRun run_failing(sim::RankKind kind, const std::function<void(int rank, ProcessGroup& pg)>& body) {
  FailedRun run;
  auto flight = std::make_shared<observe::FlightRecorder>(4, 8);
  std::shared_ptr<observe::TraceRecorder> recorder;
  run.jsonl = record_world(
      4, kind,
      [&](sim::RankContext& ctx) {
        observe::ObservedProcessGroup pg(ctx.world_group(), {flight}, ctx.rank());
        body(ctx.rank(), pg);
      },
      &run.result, &recorder);
  run.flight_dump = flight->dump();
  run.trace_flight_dump = observe::FlightRecorder::from_trace(recorder->events(), 4, 8)->dump();
  return run;
}

void gather(ProcessGroup& pg) { pg.all_gather_into_tensor(at::empty({8}), at::ones({2}))->wait(); }
void reduce(ProcessGroup& pg) { pg.all_reduce(at::ones({8}), {})->wait(); }

class ReplayFailure : public ::testing::TestWithParam<sim::RankKind> {};

TEST_P(ReplayFailure, RankSkipsACollective) {
  // Rank 3 skips the last of three identical all-gathers and returns.
  const FailedRun run = run_failing(GetParam(), [](int rank, ProcessGroup& pg) {
    gather(pg);
    gather(pg);
    if (rank != 3) gather(pg);
  });
  EXPECT_FALSE(run.result.ok());
  const CheckReport report = check_trace(parse(run.jsonl));
  const CheckFinding* missing = find(report, CheckFinding::Kind::MissingRanks);
  ASSERT_NE(missing, nullptr) << report.text();
  EXPECT_EQ(missing->message,
            "not all ranks joined collective 3 of group world: missing ranks {3}; rank 3's last collective: group "
            "world seq 2 all_gather (completed)");
  const CheckFinding* failed = find(report, CheckFinding::Kind::Failed);
  ASSERT_NE(failed, nullptr) << report.text();
  EXPECT_EQ(failed->seq, 3u);
  EXPECT_EQ(failed->ranks, (std::vector<int>{0, 1, 2}));
  EXPECT_THAT(
      report.where,
      ::testing::Contains("rank 3: group world seq 2 all_gather Float in [2] out [8] (completed), stopped early"));
  const std::string where =
      "group world: ranks {0-2} at seq 3 all_gather (failed); rank 3 at seq 2 all_gather (completed)";
  EXPECT_THAT(run.flight_dump, HasSubstr(where)) << run.flight_dump;
  EXPECT_THAT(run.trace_flight_dump, HasSubstr(where)) << run.trace_flight_dump;

  TempFile file(run.jsonl);
  CliResult r = cli({"check", file.path()});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.out, HasSubstr("not all ranks joined collective 3 of group world: missing ranks {3}"));
}

TEST_P(ReplayFailure, RankSkipsADifferentCollective) {
  // all_gather, all_reduce, all_gather; rank 3 skips the all_reduce.
  const FailedRun run = run_failing(GetParam(), [](int rank, ProcessGroup& pg) {
    gather(pg);
    if (rank != 3) reduce(pg);
    gather(pg);
  });
  const CheckReport report = check_trace(parse(run.jsonl));
  ASSERT_FALSE(report.findings.empty());
  const CheckFinding& first = report.findings[0];
  EXPECT_EQ(first.kind, CheckFinding::Kind::OpMismatch);
  EXPECT_EQ(first.seq, 2u);
  EXPECT_EQ(first.ranks, std::vector<int>{3});
  EXPECT_EQ(first.message,
            "group world seq 2: collective type mismatch: ranks {0-2} called all_reduce Float in [8] out [8], rank 3 "
            "called all_gather Float in [2] out [8]");
  EXPECT_THAT(run.flight_dump, HasSubstr("at seq 2")) << run.flight_dump;
}

TEST_P(ReplayFailure, TwoRanksCallInADifferentOrder) {
  const FailedRun run = run_failing(GetParam(), [](int rank, ProcessGroup& pg) {
    if (rank == 1 || rank == 2) {
      reduce(pg);
      gather(pg);
    } else {
      gather(pg);
      reduce(pg);
    }
  });
  const CheckReport report = check_trace(parse(run.jsonl));
  ASSERT_FALSE(report.findings.empty());
  EXPECT_EQ(report.findings[0].message,
            "group world seq 1: collective type mismatch: ranks {0,3} called all_gather Float in [2] out [8], ranks "
            "{1-2} called all_reduce Float in [8] out [8]");
  EXPECT_EQ(report.findings[0].ranks, (std::vector<int>{1, 2}));
  EXPECT_EQ(report.findings[0].group, "world");
}

TEST_P(ReplayFailure, RankDies) {
  const FailedRun run = run_failing(GetParam(), [](int rank, ProcessGroup& pg) {
    gather(pg);
    gather(pg);
    if (rank == 2) throw std::runtime_error("rank 2 crashed");
    gather(pg);
  });
  ASSERT_FALSE(run.result.ok());
  EXPECT_EQ(run.result.ranks[2].error, "rank 2 crashed");
  const CheckReport report = check_trace(parse(run.jsonl));
  const CheckFinding* missing = find(report, CheckFinding::Kind::MissingRanks);
  ASSERT_NE(missing, nullptr) << report.text();
  EXPECT_EQ(missing->message,
            "not all ranks joined collective 3 of group world: missing ranks {2}; rank 2's last collective: group "
            "world seq 2 all_gather (completed)");
  const CheckFinding* failed = find(report, CheckFinding::Kind::Failed);
  ASSERT_NE(failed, nullptr);
  EXPECT_EQ(failed->ranks, (std::vector<int>{0, 1, 3}));
  EXPECT_THAT(failed->message, HasSubstr("group world seq 3 all_gather: ranks {0-1,3} failed; rank 0's error: "));
  EXPECT_THAT(
      report.where,
      ::testing::Contains("rank 2: group world seq 2 all_gather Float in [2] out [8] (completed), stopped early"));
  const std::string where =
      "group world: ranks {0-1,3} at seq 3 all_gather (failed); rank 2 at seq 2 all_gather (completed)";
  EXPECT_THAT(run.flight_dump, HasSubstr(where)) << run.flight_dump;
  EXPECT_THAT(run.trace_flight_dump, HasSubstr(where)) << run.trace_flight_dump;
}

INSTANTIATE_TEST_SUITE_P(RankKinds, ReplayFailure, ::testing::Values(sim::RankKind::Threads, sim::RankKind::Fibers),
                         [](const auto& info) { return std::string(sim::to_string(info.param)); });

// ---------------------------------------------------------------------------
// run

ReplayOptions options_for(ReplayBackend backend) {
  ReplayOptions o;
  o.backend = backend;
  o.timeout = 20s;
  o.check_data = true;
  o.worker_command = worker_command();
  return o;
}

class ReplayRun : public ::testing::TestWithParam<ReplayBackend> {};

TEST_P(ReplayRun, ReplaysEveryCollectiveAndVerifiesTheData) {
  const bool gloo = GetParam() == ReplayBackend::GlooThreads || GetParam() == ReplayBackend::GlooProcesses;
  const int world = gloo ? 2 : 4;
  const ReplayTrace trace = parse(record_world(world, sim::RankKind::Threads, fsdp_like));
  const ReplayPlan plan = make_replay_plan(trace, 0, {});
  ReplayOptions options = options_for(GetParam());
  options.iterations = 2;
  const ReplayResult result = run_replay(plan, options);
  EXPECT_EQ(result.data_error, "");
  EXPECT_EQ(result.checked_outputs, static_cast<size_t>(world) * kFsdpLikeChecked * 2);
  ASSERT_EQ(result.collectives.size(), kFsdpLikeOps * 2);
  const auto summary = summarize(result.collectives);
  ASSERT_EQ(summary.size(), 5u);
  EXPECT_EQ(summary[0].op, CollectiveOp::AllGather);
  EXPECT_EQ(summary[0].count, 6u);  // 3 per iteration
  // S of the all-gathers: (3 + 4) floats x world + 2 bf16 x world, twice.
  EXPECT_EQ(summary[0].total_bytes, 2 * ((3 + 4) * 4 * world + 2 * 2 * world));
  EXPECT_EQ(summary[3].op, CollectiveOp::Broadcast);
  EXPECT_EQ(summary[3].total_bytes, 2 * 4 * 8);
  for (const auto& t : result.collectives) EXPECT_GE(t.latency_ns, 0);
}

INSTANTIATE_TEST_SUITE_P(Backends, ReplayRun,
                         ::testing::Values(ReplayBackend::FakeThreads, ReplayBackend::FakeFibers,
                                           ReplayBackend::GlooThreads, ReplayBackend::GlooProcesses),
                         [](const auto& info) {
                           std::string name = to_string(info.param);
                           name.erase(std::remove(name.begin(), name.end(), '-'), name.end());
                           return name;
                         });

TEST(ReplayRunFake, SubgroupsReplayWithData) {
  const ReplayTrace trace = parse(record_world(4, sim::RankKind::Fibers, with_subgroups));
  const ReplayPlan plan = make_replay_plan(trace, 0, {});
  EXPECT_EQ(plan.groups.size(), 5u);
  const ReplayResult result = run_replay(plan, options_for(ReplayBackend::FakeThreads));
  EXPECT_EQ(result.data_error, "");
  EXPECT_EQ(result.checked_outputs, 4 * (kFsdpLikeChecked + 2));
}

TEST(ReplayRunFake, OtherWorldSizesKeepTheTotalSize) {
  const ReplayTrace trace = parse(record_world(4, sim::RankKind::Fibers, fsdp_like));
  for (int world : {2, 3, 8}) {
    SCOPED_TRACE(world);
    const ReplayPlan plan = make_replay_plan(trace, world, {});
    ASSERT_EQ(plan.per_rank.size(), static_cast<size_t>(world));
    const PlannedOp& first = plan.per_rank[0][0];  // all_gather of 3 floats per rank at world 4: S = 48 bytes
    EXPECT_EQ(first.op, CollectiveOp::AllGather);
    EXPECT_EQ(first.in_numel, (12 + world - 1) / world);
    EXPECT_EQ(first.out_numel, first.in_numel * world);
    EXPECT_EQ(plan.padded, 12 % world != 0 || 16 % world != 0 || 8 % world != 0);
    const ReplayResult result = run_replay(plan, options_for(ReplayBackend::FakeFibers));
    EXPECT_EQ(result.data_error, "");
    EXPECT_EQ(result.checked_outputs, static_cast<size_t>(world) * kFsdpLikeChecked);
  }
}

TEST(ReplayRunFake, SubgroupsDoNotRescale) {
  const ReplayTrace trace = parse(record_world(4, sim::RankKind::Fibers, with_subgroups));
  try {
    make_replay_plan(trace, 8, {});
    FAIL() << "rescaled sub-groups";
  } catch (const ReplayPlanError& e) {
    EXPECT_EQ(std::string(e.what()),
              "group 'world/split0.0' spans ranks {0-1} of the trace's 4; at world size 8 only groups over the whole "
              "world can be replayed (they then span all 8 ranks)");
  }
  EXPECT_NO_THROW(make_replay_plan(trace, 4, {}));
}

TEST(ReplayRunFake, UnmatchedTracesAreNotReplayed) {
  auto recs = clean_records(4, 2);
  recs.pop_back();  // rank 3's seq 2
  try {
    make_replay_plan(parse(make_trace(4, recs)), 0, {});
    FAIL();
  } catch (const ReplayPlanError& e) {
    EXPECT_EQ(std::string(e.what()),
              "cannot replay: not all ranks joined collective 2 of group world: missing ranks {3}; rank 3's last "
              "collective: group world seq 1 all_gather (completed) (run 'fsdpsim replay check' for the full report)");
  }
}

// check and run share one verdict: every trace run refuses, check reports,
// with the same words.
void expect_check_reports_what_run_refuses(const std::string& text, CheckFinding::Kind kind,
                                           const std::string& message) {
  const CheckReport report = check_trace(parse(text));
  const CheckFinding* finding = find(report, kind);
  ASSERT_NE(finding, nullptr) << report.text();
  EXPECT_EQ(finding->message, message);
  TempFile file(text);
  CliResult checked = cli({"check", file.path()});
  EXPECT_EQ(checked.code, 1) << checked.out;
  EXPECT_THAT(checked.out, HasSubstr(message));
  CliResult ran = cli({"run", file.path()});
  EXPECT_EQ(ran.code, 2) << ran.out;
  EXPECT_EQ(ran.err, "fsdpsim: error: " + file.path() + ": cannot replay: " + message +
                         " (run 'fsdpsim replay check' for the full report)\n");
}

TEST(ReplayRunFake, CheckReportsARankWhoseRecordsStartLate) {
  // Rank 1 lacks seq 1 but recorded seq 2: a ring buffer that dropped it.
  auto recs = clean_records(2, 2);
  recs.erase(recs.begin() + 2);
  expect_check_reports_what_run_refuses(
      make_trace(2, recs), CheckFinding::Kind::MissingRanks,
      "not all ranks joined collective 1 of group world: missing ranks {1}; rank 1 has no record of it but recorded "
      "seq 2 of the group later");
}

TEST(ReplayRunFake, CheckReportsAHeaderWorldTheRecordsDoNotBack) {
  // The header claims 8192 ranks; two of them recorded a collective of their pair.
  std::vector<Rec> recs = clean_records(2, 1);
  for (auto& r : recs) r.ranks = {0, 1}, r.out = 8;
  expect_check_reports_what_run_refuses(
      make_trace(8192, recs), CheckFinding::Kind::AbsentRanks,
      "ranks {2-8191} of the header's world of 8192 recorded no collective and belong to no group: the header's "
      "world_size does not match the records");
}

TEST(ReplayRunFake, CheckReportsATraceWithoutCollectives) {
  expect_check_reports_what_run_refuses(header(3), CheckFinding::Kind::NoCollectives,
                                        "the trace holds no collective record (world 3)");
}

// Corrupts element 5 of the output of the `target`-th all-gather.
class CorruptingGroup final : public ProcessGroup {
 public:
  CorruptingGroup(ProcessGroupPtr inner, int target) : inner_(std::move(inner)), target_(target) {}
  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  const std::string& name() const override { return inner_->name(); }
  const std::vector<int>& global_ranks() const override { return inner_->global_ranks(); }
  uint64_t sequence_number() const override { return inner_->sequence_number(); }
  WorkPtr all_gather_into_tensor(const at::Tensor& output, const at::Tensor& input) override {
    WorkPtr work = inner_->all_gather_into_tensor(output, input);
    if (++calls_ != target_) return work;
    work->wait();
    output.view({-1})[5] = 1000;
    return work;
  }
  WorkPtr reduce_scatter_tensor(const at::Tensor& o, const at::Tensor& i, const ReduceScatterOptions& opt) override {
    return inner_->reduce_scatter_tensor(o, i, opt);
  }
  WorkPtr all_reduce(const at::Tensor& t, const AllReduceOptions& opt) override { return inner_->all_reduce(t, opt); }
  WorkPtr broadcast(const at::Tensor& t, const BroadcastOptions& opt) override { return inner_->broadcast(t, opt); }
  WorkPtr barrier() override { return inner_->barrier(); }
  ProcessGroupPtr split(const std::vector<std::vector<int>>& p) override { return inner_->split(p); }

 private:
  ProcessGroupPtr inner_;
  int target_;
  int calls_ = 0;
};

TEST(ReplayRunFake, DataCheckNamesTheFirstWrongElement) {
  const ReplayTrace trace = parse(record_world(4, sim::RankKind::Threads, fsdp_like));
  const ReplayPlan plan = make_replay_plan(trace, 0, {});
  ReplayOptions options = options_for(ReplayBackend::FakeThreads);
  options.wrap_group = [](ProcessGroupPtr group, int rank) -> ProcessGroupPtr {
    return rank == 1 ? std::make_shared<CorruptingGroup>(group, 2) : group;
  };
  const ReplayResult result = run_replay(plan, options);
  // The second all-gather is world seq 3 (4 floats per rank): element 5 is
  // rank 1's element 1, value(1, 1) = ((7 + 3) % 11) - 5 = 5.
  size_t line = 0;
  for (size_t i = 0; i < trace.collectives.size(); ++i) {
    if (trace.collectives[i].rank == 1 && trace.collectives[i].seq == 3) line = trace.lines[i];
  }
  EXPECT_EQ(result.data_error,
            "data check failed on rank 1: group world seq 3 all_gather Float in [4] out [16] (trace line " +
                std::to_string(line) + "), iteration 1: element 5 is 1000, expected 5");
  TempFile file(make_trace(4, clean_records(4, 1)));
  EXPECT_EQ(cli({"run", file.path(), "--check-data"}).code, 0);
}

TEST(ReplayRunFake, RecordedGapsAreSleptAndBounded) {
  // Rank 0 and 1: two all-gathers 40 ms apart (end of the first to issue of the second).
  auto recs = clean_records(2, 2);
  for (auto& r : recs) {
    r.issue_ns = r.seq == 1 ? 1'000'000 : 42'000'000;
    r.end_ns = r.seq == 1 ? 2'000'000 : 43'000'000;
  }
  const ReplayTrace trace = parse(make_trace(2, recs));
  const ReplayPlan plan = make_replay_plan(trace, 0, {});
  EXPECT_EQ(plan.per_rank[0][1].gap_ns, 40'000'000);
  ReplayOptions options = options_for(ReplayBackend::FakeFibers);
  options.use_timestamps = true;
  options.iterations = 2;
  const ReplayResult result = run_replay(plan, options);
  EXPECT_GE(result.wall_s, 0.080);
  options.limits.max_sleep_s = 0.05;
  try {
    run_replay(plan, options);
    FAIL();
  } catch (const ReplayPlanError& e) {
    EXPECT_EQ(std::string(e.what()),
              "--use-timestamps: rank 0's recorded gaps add up to 0.08 s, over the limit of 0.05 s (--max-sleep-s)");
  }
}

TEST(ReplayReport, PercentilesAndBandwidthsFollowNcclTests) {
  std::vector<CollectiveTiming> timings;
  for (int i = 1; i <= 20; ++i) {
    CollectiveTiming t;
    t.op = CollectiveOp::AllGather;
    t.group_size = 4;
    t.total_bytes = 1000;
    t.per_rank_bytes = 250;
    t.latency_ns = i * 1000;
    timings.push_back(t);
  }
  const auto summary = summarize(timings);
  ASSERT_EQ(summary.size(), 1u);
  EXPECT_EQ(summary[0].count, 20u);
  EXPECT_EQ(summary[0].p50_ns, 10'000);
  EXPECT_EQ(summary[0].p95_ns, 19'000);
  EXPECT_EQ(summary[0].total_ns, 210'000);
  EXPECT_DOUBLE_EQ(summary[0].algbw_gbps, 20'000.0 / 210'000.0);
  EXPECT_DOUBLE_EQ(summary[0].busbw_gbps, 0.75 * 20'000.0 / 210'000.0);
  EXPECT_THAT(
      format_summary(summary),
      HasSubstr(
          "  all_gather          20    19.5 KiB       250 B       10.0       19.0      0.210    0.095    0.071\n"));
}

// ---------------------------------------------------------------------------
// predict

TEST(ReplayPredict, GivenParametersPredictExactly) {
  // 3 all-gathers of S = 4 floats x 4 ranks = 64 bytes at world 8: 7 * (5 us + 64/(8 * 10) ns) each.
  TempFile file(make_trace(4, clean_records(4, 3)));
  const ReplayPlan plan = make_replay_plan(load_replay_trace(file.path()), 8, {});
  sim::CostModelParams p;
  p.latency_us = 5;
  p.bandwidth_gbps = 10;
  const int64_t one = 7 * 5000 + 6;  // 7 * 0.8 ns rounds once: llround(35005.6)
  EXPECT_EQ(predict_plan_ns(plan, p), 3 * one);
  CliResult r = cli({"predict", file.path(), "--world-size", "8", "--latency-us", "5", "--bandwidth-gbps", "10"});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("  total                3         0.105\n"));
}

TEST(ReplayPredict, CalibratesMeasuresAndReportsTheError) {
  const ReplayTrace trace = parse(record_world(4, sim::RankKind::Threads, fsdp_like));
  const ReplayPlan plan = make_replay_plan(trace, 0, {});
  CalibrationOptions calibration;
  calibration.max_bytes = 64 << 10;
  calibration.reps = 2;
  calibration.sizes = 3;
  const auto samples = calibrate(plan, {2, 3}, options_for(ReplayBackend::FakeThreads), calibration);
  // Barrier + 3 sizes of each of the 4 data ops, at two world sizes.
  ASSERT_EQ(samples.size(), 2u * (1 + 3 * 4));
  for (const auto& s : samples) EXPECT_GT(s.time_ns, 0);
  const sim::CostModelParams fit = sim::fit_cost_model(samples, 2);
  EXPECT_GT(fit.bandwidth_gbps, 0);

  TempFile file(record_world(2, sim::RankKind::Threads, fsdp_like));
  CliResult r = cli({"predict", file.path(), "--world-size", "3", "--measure", "--calibrate-world-sizes", "2,3"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("cost model: fitted, latency"));
  EXPECT_TRUE(std::regex_search(r.out, std::regex("prediction error -?[0-9]+\\.[0-9]%")));
}

// ---------------------------------------------------------------------------
// The command line

TEST(ReplayCli, UsageErrorsExit2WithOneLine) {
  TempFile file(make_trace(2, clean_records(2, 1)));
  const std::vector<std::vector<std::string>> cases = {
      {},
      {"replay"},
      {"check"},
      {"check", file.path(), "--use-timestamps"},
      {"run", file.path(), "--backend", "nccl"},
      {"run", file.path(), "--world-size", "abc"},
      {"run", file.path(), "--world-size", "0"},
      {"run", file.path(), "--iterations"},
      {"run", file.path(), "--max-bytes", "12X"},
      {"run", file.path(), file.path()},
      {"predict", file.path()},
      {"predict", file.path(), "--world-size", "4", "--latency-us", "5"},
      {"predict", file.path(), "--world-size", "4", "--preset", "nope"},
      {"check", "/nonexistent/trace.jsonl"},
      {"run", file.path(), "--backend", "gloo-processes"},  // no worker command
      {"run", file.path(), "--world-size", "+4"},
      {"run", file.path(), "--timeout-s", "0x10"},
      {"predict", file.path(), "--world-size", "4", "--calibrate-world-sizes", "2,"},
      {"predict", file.path(), "--world-size", "4", "--calibrate-world-sizes", "2,,4"},
  };
  for (const auto& args : cases) {
    std::string joined;
    for (const auto& a : args) joined += a + " ";
    SCOPED_TRACE(joined);
    CliResult r = cli(args);
    EXPECT_EQ(r.code, 2);
    EXPECT_EQ(count_lines(r.err), 1u) << r.err;
    EXPECT_EQ(r.err.rfind("fsdpsim: error: ", 0), 0u) << r.err;
  }
  EXPECT_EQ(cli({"--help"}).code, 0);
}

TEST(ReplayCli, CheckRunAndDryRun) {
  TempFile file(record_world(4, sim::RankKind::Threads, fsdp_like));
  CliResult r = cli({"check", file.path()});
  EXPECT_EQ(r.code, 0);
  EXPECT_THAT(r.out, HasSubstr(": world 4, 1 group, 8 collectives, 32 records\nOK: "));
  r = cli({"run", file.path(), "--dry-run"});
  EXPECT_EQ(r.code, 0);
  EXPECT_THAT(r.out, HasSubstr("  all_gather           3"));
  EXPECT_THAT(r.out, HasSubstr("ranks {0-3}: 8 collectives"));
  r = cli({"run", file.path(), "--backend", "fake-fibers", "--world-size", "6", "--iterations", "2", "--check-data",
           "--per-op"});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out,
              HasSubstr("world 6 (trace world 4), backend fake-fibers, 2 iterations, 8 collectives per iteration"));
  EXPECT_THAT(r.out, HasSubstr("data check: 84 outputs verified bit for bit"));
  EXPECT_THAT(r.out, HasSubstr("busbw"));
}

}  // namespace
}  // namespace fsdpsim::tools
