// fsdpsim: the one binary of the tools (tools/cli.h): run, list,
// replay check|run|predict, launch, bench comm|engine; and, re-executed by
// them, their worker processes (tools/worker.h).

#include <malloc.h>

#include "tools/cli.h"

int main(int argc, char** argv) {
  // A fixed mmap threshold (glibc's initial 128 KiB, which it otherwise
  // raises after the first large free): a large buffer is mapped when
  // allocated, resident only once written, and unmapped when freed. With
  // thousands of ranks in one process the per-rank collective buffers (an
  // all-gather output of world x shard bytes each) then cost memory only
  // while in use, instead of staying resident on the heap.
  mallopt(M_MMAP_THRESHOLD, 128 * 1024);
  return fsdpsim::tools::fsdpsim_main(argc, argv);
}
