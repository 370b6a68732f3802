#!/usr/bin/env bash
# Runs every benchmark once and prints one table of the ratios each measured
# side by side in its own run: fake collectives vs memcpy, Gloo vs fake, fiber
# vs thread ranks at scale, engine step vs plain step, checkpoint save vs
# fwrite, cost model vs a measured replay. Full logs stay in $FSDPSIM_BENCH_LOGS (default a temp dir).
#   bash tools/bench_report.sh [BUILD_DIR]      (default ./build; about 5-8 minutes on 2 cores)
set -uo pipefail
build=${1:-build}
tools="$build/tools"
logs=${FSDPSIM_BENCH_LOGS:-$(mktemp -d /tmp/fsdpsim-bench-XXXXXX)}
mkdir -p "$logs"
if [ ! -x "$tools/fsdpsim" ]; then
  echo "bench_report: $tools/fsdpsim is missing; build first (bash .ci/build.sh)" >&2
  exit 2
fi

started=$(date +%s)
status=0
step() { echo "bench_report: [$1/4] $2 (log: $logs/$3)"; }

step 1 "collectives: fake vs memcpy, Gloo vs fake, fibers vs threads" comm.log
"$tools/fsdpsim" bench comm >"$logs/comm.log" 2>&1 || status=1
step 2 "engine step vs plain step, peak memory, checkpoints" engine.log
"$tools/fsdpsim" bench engine >"$logs/engine.log" 2>&1 || status=1
step 3 "record a trace to replay (mlp_stack, 4 fake thread ranks)" trace.log
"$tools/fsdpsim" run --scenario mlp_stack --world-size 4 --steps 3 --mlp-dim 256 \
  --trace "$logs/trace.json" >"$logs/trace.log" 2>&1 || status=1
step 4 "cost model: predicted vs measured replay at world 4" predict.log
"$tools/fsdpsim" replay predict "$logs/trace.json.jsonl" --world-size 4 --calibrate-backend fake-threads \
  --measure >"$logs/predict.log" 2>&1 || status=1

pick() {  # pick FILE PATTERN: the first matching line, trimmed
  grep -m1 -E "$2" "$logs/$1" 2>/dev/null | sed -e 's/^ *//' || true
}
row() { printf '  %-44s %s\n' "$1" "${2:-n/a (see $3)}"; }

echo
echo "== fsdpsim benchmark report ($(nproc) cores, $(date -u +%Y-%m-%dT%H:%MZ)) =="
echo "  every ratio below was measured side by side within one benchmark run"
row "fake all-gather vs memcpy (8 ranks, 16 MiB)" "$(pick comm.log '^target: fake all_gather')" comm.log
row "Gloo/fake time, all_gather" "$(pick comm.log '^ratio gloo/fake all_gather')" comm.log
row "Gloo/fake time, reduce_scatter" "$(pick comm.log '^ratio gloo/fake reduce_scatter')" comm.log
row "threads/fibers time at scale" "$(pick comm.log '^ratio threads/fibers')" comm.log
row "engine vs plain step at world size 1" "$(pick engine.log '^target: world-size-1')" engine.log
row "dcp save vs one fwrite+fsync (throughput)" "$(pick engine.log '^ratio dcp save/fwrite')" engine.log
row "resharding vs plain dcp load (time)" "$(pick engine.log '^ratio resharding/plain load')" engine.log
row "cost model vs measured replay" "$(pick predict.log 'prediction error')" predict.log
echo "  total $(( $(date +%s) - started )) s; logs in $logs"
exit $status
