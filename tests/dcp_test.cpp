// fsdp::dcp (torch.distributed.checkpoint's on-disk format): save at one
// world size and load at another or into full tensors, on fake thread and
// fiber ranks, for fp32, bf16 and int64 with uneven shapes and an empty
// shard; the errors for a missing, killed, corrupt or truncated checkpoint;
// the pickle reader/writer behind .metadata. Python's dcp.load/dcp.save side
// is tests/dcp_interop/ (ctest dcp_interop.python).
//
// Every expected value is a slice of a reference tensor built here; loads
// must reproduce it bitwise (torch::equal: a load only copies bytes).

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <unistd.h>

#include <ATen/ATen.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "fsdp/dcp.h"
#include "fsdp/pickle_io.h"
#include "sim/world.h"

namespace fsdpsim::fsdp::dcp {
namespace {

namespace fs = std::filesystem;

struct Reference {
  std::string fqn;
  at::Tensor full;
  int64_t shard_dim;  // how the test splits it across ranks
};

// Uneven shapes (5 rows over 2 or 3 ranks; 7 over 3 leaves ranks short) and
// values that are exact in every dtype; int64 beyond 32 bits.
std::vector<Reference> references() {
  auto pattern = [](int64_t n) { return (at::arange(n, at::kLong) * 7 % 19 - 9); };
  return {
      {"layers.0.weight", (pattern(15).to(at::kFloat) * 0.25).reshape({5, 3}), 0},
      {"layers.0.bias", pattern(5).to(at::kFloat) * 0.5 + 0.125, 0},
      {"embed.weight", (pattern(14).to(at::kFloat) * 0.25).to(at::kBFloat16).reshape({7, 2}), 0},
      {"counts", (pattern(12) * 1000003 + (int64_t{1} << 40)).reshape({3, 4}), 1},
      {"tiny", at::full({1}, 3.5f), 0},  // one row: ranks > 0 hold an empty shard
  };
}

// FSDP's split: ceil(n / world) per rank, the last ones short or empty.
std::pair<int64_t, int64_t> rows(int64_t n, int rank, int world) {
  const int64_t chunk = (n + world - 1) / world;
  const int64_t lo = std::min(n, chunk * rank);
  return {lo, std::min(n, lo + chunk) - lo};
}

// This rank's entries: a copy of its slice (for save) or zeros (for load).
std::vector<Entry> entries_for(int rank, int world, bool with_data) {
  std::vector<Entry> out;
  for (const auto& r : references()) {
    const auto [lo, len] = rows(r.full.size(r.shard_dim), rank, world);
    Chunk chunk{std::vector<int64_t>(r.full.dim(), 0), r.full.narrow(r.shard_dim, lo, len).clone()};
    chunk.offsets[r.shard_dim] = lo;
    if (!with_data) chunk.tensor.zero_();
    out.push_back({r.fqn, r.full.scalar_type(), r.full.sizes().vec(), {chunk}});
  }
  return out;
}

std::vector<Entry> full_entries() {
  std::vector<Entry> out;
  for (const auto& r : references())
    out.push_back({r.fqn,
                   r.full.scalar_type(),
                   r.full.sizes().vec(),
                   {{std::vector<int64_t>(r.full.dim(), 0), at::zeros_like(r.full)}}});
  return out;
}

void expect_matches_reference(const std::vector<Entry>& entries) {
  const auto refs = references();
  ASSERT_EQ(entries.size(), refs.size());
  for (size_t i = 0; i < refs.size(); ++i) {
    for (const auto& c : entries[i].chunks) {
      at::Tensor expected = refs[i].full;
      for (int64_t d = 0; d < expected.dim(); ++d) expected = expected.narrow(d, c.offsets[d], c.tensor.size(d));
      EXPECT_TRUE(at::equal(c.tensor, expected)) << refs[i].fqn << " chunk at row " << c.offsets[0];
    }
  }
}

fs::path fresh_dir(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / ("fsdpsim_dcp_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  return dir;
}

void run_ranks(int world, sim::RankKind kind, const std::function<void(sim::RankContext&)>& body) {
  sim::WorldOptions options;
  options.world_size = world;
  options.rank_kind = kind;
  sim::World(options).run(body).throw_if_failed();
}

void save_world(const fs::path& dir, int world, sim::RankKind kind) {
  run_ranks(world, kind, [&](sim::RankContext& ctx) {
    save(dir, entries_for(ctx.rank(), world, true), process_group_coordinator(*ctx.world_group()));
  });
}

void load_world_and_check(const fs::path& dir, int world, sim::RankKind kind) {
  run_ranks(world, kind, [&](sim::RankContext& ctx) {
    auto entries = entries_for(ctx.rank(), world, false);
    load(dir, entries);
    expect_matches_reference(entries);
  });
}

struct ReshardCase {
  int save_world;
  int load_world;
  sim::RankKind kind;
};

class DcpReshard : public ::testing::TestWithParam<ReshardCase> {};

// Save at one world size, load at another and into full tensors: every
// loaded chunk equals the reference slice bitwise.
TEST_P(DcpReshard, LoadsAtAnotherWorldSizeAndIntoFullTensors) {
  const auto c = GetParam();
  const fs::path dir = fresh_dir("reshard");
  save_world(dir, c.save_world, c.kind);
  EXPECT_TRUE(fs::exists(dir / ".metadata"));
  for (int r = 0; r < c.save_world; ++r) EXPECT_TRUE(fs::exists(dir / ("__" + std::to_string(r) + "_0.distcp")));
  load_world_and_check(dir, c.load_world, c.kind);
  auto full = full_entries();
  const LoadStats stats = load(dir, full);
  expect_matches_reference(full);
  // A full load reads every saved chunk once; empty shards were not stored.
  int64_t saved = 0;
  for (const auto& [fqn, t] : read_metadata(dir).tensors) saved += static_cast<int64_t>(t.chunks.size());
  EXPECT_EQ(stats.chunks_read, saved);
  fs::remove_all(dir);
}

INSTANTIATE_TEST_SUITE_P(Worlds, DcpReshard,
                         ::testing::Values(ReshardCase{2, 3, sim::RankKind::Threads},
                                           ReshardCase{2, 3, sim::RankKind::Fibers},
                                           ReshardCase{3, 2, sim::RankKind::Fibers},
                                           ReshardCase{5, 1, sim::RankKind::Threads}),
                         [](const auto& info) {
                           return "save" + std::to_string(info.param.save_world) + "_load" +
                                  std::to_string(info.param.load_world) +
                                  (info.param.kind == sim::RankKind::Threads ? "_threads" : "_fibers");
                         });

// .metadata lists every tensor's dtype, shape and chunks as DCP does; a
// replicated chunk (two ranks, same offsets) is stored once.
TEST(Dcp, MetadataDescribesEveryChunkOnceEvenWhenReplicated) {
  const fs::path dir = fresh_dir("meta");
  run_ranks(2, sim::RankKind::Threads, [&](sim::RankContext& ctx) {
    std::vector<Entry> e = {{"rep", at::kFloat, {4}, {{{0}, at::arange(4, at::kFloat)}}},
                            {"shard",
                             at::kBFloat16,
                             {3, 2},
                             {{{ctx.rank() == 0 ? 0 : 2, 0}, at::ones({ctx.rank() == 0 ? 2 : 1, 2}, at::kBFloat16)}}}};
    save(dir, e, process_group_coordinator(*ctx.world_group()));
  });
  const auto meta = read_metadata(dir);
  ASSERT_EQ(meta.tensors.size(), 2u);
  EXPECT_EQ(meta.version, "1.0.0");
  EXPECT_EQ(meta.tensors.at("rep").chunks.size(), 1u);
  const auto& shard = meta.tensors.at("shard");
  EXPECT_EQ(shard.dtype, at::kBFloat16);
  EXPECT_EQ(shard.global_shape, (std::vector<int64_t>{3, 2}));
  ASSERT_EQ(shard.chunks.size(), 2u);
  EXPECT_EQ(shard.chunks[1].offsets, (std::vector<int64_t>{2, 0}));
  EXPECT_EQ(shard.chunks[1].sizes, (std::vector<int64_t>{1, 2}));
  EXPECT_EQ(shard.chunks[1].file, "__1_0.distcp");
  fs::remove_all(dir);
}

void save_single(const fs::path& dir) { save(dir, entries_for(0, 1, true), single_process()); }

template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(Dcp, MissingMetadataRefusesToLoad) {
  const fs::path dir = fresh_dir("nometa");
  save_single(dir);
  fs::remove(dir / ".metadata");
  auto entries = full_entries();
  EXPECT_THAT(error_of([&] { load(dir, entries); }), ::testing::HasSubstr("its save did not finish"));
}

// A save that dies after the data files but before .metadata (here: the
// coordinator fails) leaves no loadable checkpoint, even where an older one
// was: its .metadata is removed before any data file is replaced.
TEST(Dcp, KilledSaveLeavesNoLoadableCheckpoint) {
  const fs::path dir = fresh_dir("killed");
  save_single(dir);
  auto full = full_entries();
  load(dir, full);  // the old checkpoint loads
  Coordinator dying = single_process();
  dying.gather_to_rank0 = [](const std::string&) -> std::vector<std::string> { throw std::runtime_error("killed"); };
  EXPECT_THROW(save(dir, entries_for(0, 1, true), dying), std::runtime_error);
  EXPECT_TRUE(fs::exists(dir / "__0_0.distcp"));
  EXPECT_FALSE(fs::exists(dir / ".metadata"));
  EXPECT_THAT(error_of([&] { load(dir, full); }), ::testing::HasSubstr("did not finish"));
  fs::remove_all(dir);
}

// One rank's bad entry fails the save on every rank, and no .metadata appears.
TEST(Dcp, BadEntryOnOneRankFailsEveryRank) {
  const fs::path dir = fresh_dir("badentry");
  sim::WorldOptions options;
  options.world_size = 3;
  options.rank_kind = sim::RankKind::Fibers;
  sim::World w(options);
  auto result = w.run([&](sim::RankContext& ctx) {
    auto e = entries_for(ctx.rank(), 3, true);
    if (ctx.rank() == 2) e[0].chunks[0].tensor = at::zeros({2, 3});  // rows 4..5 of 5
    save(dir, e, process_group_coordinator(*ctx.world_group()));
  });
  for (int r = 0; r < 3; ++r) {
    EXPECT_FALSE(result.ranks[r].ok) << "rank " << r;
    EXPECT_THAT(result.ranks[r].error,
                ::testing::AllOf(::testing::HasSubstr("rank 2"), ::testing::HasSubstr("layers.0.weight"),
                                 ::testing::HasSubstr("outside global shape [5, 3]")));
  }
  EXPECT_FALSE(fs::exists(dir / ".metadata"));
  fs::remove_all(dir);
}

// Chunks that leave part of a tensor unwritten: DCP's save refuses them, so do we.
TEST(Dcp, ChunksThatDoNotTileTheTensorAreRefused) {
  const fs::path dir = fresh_dir("gap");
  std::vector<Entry> e = {{"w", at::kFloat, {4, 2}, {{{0, 0}, at::ones({3, 2})}}}};
  EXPECT_THAT(error_of([&] { save(dir, e, single_process()); }), ::testing::HasSubstr("cover 6 of its 8 elements"));
  EXPECT_FALSE(fs::exists(dir / ".metadata"));
  fs::remove_all(dir);
}

void flip_byte(const fs::path& file, std::streamoff at) {
  std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
  f.seekg(at);
  char c = 0;
  f.read(&c, 1);
  f.seekp(at);
  c = static_cast<char>(c ^ 0x5a);
  f.write(&c, 1);
}

// Where the first stored byte of `fqn` sits in its file.
SavedTensor::SavedChunk first_chunk(const fs::path& dir, const std::string& fqn) {
  return read_metadata(dir).tensors.at(fqn).chunks.at(0);
}

TEST(Dcp, CorruptChunkFailsTheChecksumNamingFileAndFqn) {
  const fs::path dir = fresh_dir("corrupt");
  save_single(dir);
  const auto c = first_chunk(dir, "embed.weight");
  flip_byte(dir / c.file, c.offset + c.length - 100);  // near the chunk's end
  auto full = full_entries();
  EXPECT_THAT(error_of([&] { load(dir, full); }),
              ::testing::AllOf(::testing::HasSubstr("embed.weight"), ::testing::HasSubstr("__0_0.distcp"),
                               ::testing::HasSubstr("checksum mismatch")));
  fs::remove_all(dir);
}

// Without the checksum file (as in Python's checkpoints), a damaged zip
// header still fails to parse rather than load wrong numbers.
TEST(Dcp, CorruptHeaderWithoutChecksumsFailsToParse) {
  const fs::path dir = fresh_dir("corrupt_nosums");
  save_single(dir);
  fs::remove(dir / ".fsdpsim_checksums.json");
  const auto c = first_chunk(dir, "layers.0.bias");
  flip_byte(dir / c.file, c.offset + 2);  // the zip's local header signature
  auto full = full_entries();
  EXPECT_THAT(error_of([&] { load(dir, full); }), ::testing::AllOf(::testing::HasSubstr("layers.0.bias"),
                                                                   ::testing::HasSubstr("not a readable torch.save")));
  fs::remove_all(dir);
}

TEST(Dcp, TruncatedFileIsNamed) {
  const fs::path dir = fresh_dir("truncated");
  save_single(dir);
  const fs::path file = dir / "__0_0.distcp";
  fs::resize_file(file, fs::file_size(file) - 10);
  auto full = full_entries();
  EXPECT_THAT(error_of([&] { load(dir, full); }),
              ::testing::AllOf(::testing::HasSubstr("__0_0.distcp"), ::testing::HasSubstr("truncated")));
  fs::remove(dir / ".fsdpsim_checksums.json");  // the metadata's offsets alone catch it too
  EXPECT_THAT(error_of([&] { load(dir, full); }), ::testing::HasSubstr("the file is truncated"));
  fs::remove_all(dir);
}

TEST(Dcp, MismatchedEntriesNameTheKey) {
  const fs::path dir = fresh_dir("mismatch");
  save_single(dir);
  std::vector<Entry> missing = {{"nope", at::kFloat, {1}, {{{0}, at::zeros({1})}}}};
  EXPECT_THAT(
      error_of([&] { load(dir, missing); }),
      ::testing::AllOf(::testing::HasSubstr("nope is not in the checkpoint"), ::testing::HasSubstr("layers.0.weight")));
  std::vector<Entry> shape = {{"layers.0.weight", at::kFloat, {3, 5}, {{{0, 0}, at::zeros({3, 5})}}}};
  EXPECT_THAT(error_of([&] { load(dir, shape); }),
              ::testing::HasSubstr("Float [5, 3], the entry asks for Float [3, 5]"));
  std::vector<Entry> dtype = {{"counts", at::kInt, {3, 4}, {{{0, 0}, at::zeros({3, 4}, at::kInt)}}}};
  EXPECT_THAT(error_of([&] { load(dir, dtype); }), ::testing::HasSubstr("counts: the checkpoint has Long"));
  fs::remove_all(dir);
}

// The pickle reader: what the writer emits reads back; an opcode it does not
// know is named with its offset; a truncated stream is an error.
TEST(PickleIo, WriterOutputReadsBackAndUnknownOpcodesAreNamed) {
  pickle::Writer w;
  w.global("torch", "Size").int_tuple({3, int64_t{1} << 40, -2}).tuple1().reduce();
  const std::string bytes = w.finish();
  const auto v = pickle::loads(bytes);
  EXPECT_EQ(v->qualified_name(), "torch.Size");
  const auto& ints = v->args->items.at(0)->items;
  ASSERT_EQ(ints.size(), 3u);
  EXPECT_EQ(ints[1]->integer, int64_t{1} << 40);
  EXPECT_EQ(ints[2]->integer, -2);
  EXPECT_THAT(
      error_of([] { pickle::loads(std::string("\x80\x02I1\n.", 6)); }),
      ::testing::AllOf(::testing::HasSubstr("unsupported pickle opcode 0x49"), ::testing::HasSubstr("at byte 2")));
  EXPECT_THAT(error_of([&] { pickle::loads(bytes.substr(0, bytes.size() - 3)); }), ::testing::HasSubstr("truncated"));
}

}  // namespace
}  // namespace fsdpsim::fsdp::dcp
