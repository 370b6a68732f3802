// fsdpsim: the one binary of the tools (tools/cli.h): run, list,
// replay check|run|predict, launch, bench comm|engine; and, re-executed by
// them, their worker processes (tools/worker.h).

#include "tools/cli.h"

int main(int argc, char** argv) { return fsdpsim::tools::fsdpsim_main(argc, argv); }
