#!/usr/bin/env bash
# The scale table of issue 13: `fsdpsim run --ranks fibers --simulated-time`
# (mlp_stack d64, real data) at growing world sizes, per N: wall time per
# step (the mean of the run's step lines), peak RSS, time per rank-step; then
# the fiber collective round against the memcpy time of its bytes, both
# measured in one process (`fsdpsim bench comm`, section 3).
#
# Usage: tools/bench_scale.sh [FSDPSIM] [N...]   (default: build/tools/fsdpsim 64 256 1024 4096 16384)
# FSDPSIM_SCALE_STEPS (default 2), FSDPSIM_SCALE_RSS_GIB (default 16: a run whose
# resident memory passes it is stopped and reported), FSDPSIM_SCALE_ROUND_RANKS
# (default 4096; 0 skips the round), FSDPSIM_SCALE_REPRESENTATIVE (default
# "4096 16384 131072"; empty skips it: data-free representative-rank runs,
# op costs recorded by a world-4 data run). Exit status 1 when a run failed or was stopped.
set -euo pipefail
bin=${1:-build/tools/fsdpsim}
shift || true
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(64 256 1024 4096 16384)
steps=${FSDPSIM_SCALE_STEPS:-2}
cap_kib=$(( ${FSDPSIM_SCALE_RSS_GIB:-16} * 1024 * 1024 ))
round_ranks=${FSDPSIM_SCALE_ROUND_RANKS:-4096}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Runs "$@" in the background, stopping it if its RSS passes the cap; prints
# "ok", "rss-cap" or "failed".
guarded() {
  "$@" >"$work/out" 2>"$work/err" &
  local pid=$! verdict=ok
  while kill -0 "$pid" 2>/dev/null; do
    local rss
    rss=$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
    if [ "${rss:-0}" -gt "$cap_kib" ]; then
      kill "$pid" 2>/dev/null || true
      verdict=rss-cap
      break
    fi
    sleep 0.5
  done
  wait "$pid" 2>/dev/null || { [ "$verdict" = ok ] && verdict=failed; }
  echo "$verdict"
}

echo "== fsdpsim run --ranks fibers --simulated-time --steps $steps (mlp_stack d64, real data) =="
# Runs `fsdpsim run` at N ranks with the remaining arguments; on success sets
# per_step_ms and rss from its summary, else prints a failure row, sets
# status=1 and returns 1.
status=0
run_row() {
  local n=$1
  shift
  verdict=$(guarded "$bin" run --ranks fibers --world-size "$n" --simulated-time --steps "$steps" "$@")
  if [ "$verdict" != ok ]; then
    status=1
    printf '%8s | %12s | %12s | %16s | %s\n' "$n" - - - "$verdict: $(tail -1 "$work/err" | cut -c1-80)"
    return 1
  fi
  # "  step 2/2  loss(rank 0) 1.39  24106.72 ms ..." -> mean ms over the steps
  per_step_ms=$(awk '/^  step [0-9]+\/[0-9]+/ {for (i = 1; i < NF; i++) if ($(i + 1) == "ms") {s += $i; k++; break}}
                     END {if (k) printf "%.1f", s / k}' "$work/out")
  rss=$(sed -n 's/.*memory: peak RSS \([0-9.]* [KMG]iB\).*/\1/p' "$work/out")
}

printf '%8s | %12s | %12s | %16s | %s\n' ranks "s/step" "peak RSS" "us/rank-step" "note"
for n in "${sizes[@]}"; do
  run_row "$n" --timeout 600 --trace "$work/trace.json" || continue
  awk -v n="$n" -v ms="$per_step_ms" -v rss="$rss" \
    'BEGIN {printf "%8d | %12.2f | %12s | %16.1f |\n", n, ms / 1000, rss, ms * 1000 / n}'
done

representative=${FSDPSIM_SCALE_REPRESENTATIVE-4096 16384 131072}
if [ -n "$representative" ]; then
  echo
  echo "== data-free --representative-ranks auto --steps $steps (mlp_stack d64, op costs from a world-4 data run) =="
  "$bin" run --ranks fibers --simulated-time --world-size 4 --steps 2 --record-op-costs "$work/costs.json" \
    --trace "$work/trace.json" >/dev/null
  printf '%8s | %12s | %12s | %16s | %s\n' ranks "s/step" "peak RSS" "predicted ms" "note"
  for n in $representative; do
    run_row "$n" --data-free --op-costs "$work/costs.json" --representative-ranks auto --no-trace \
      --fiber-stacks pooled --fiber-stack-kib 64 || continue
    predicted=$(sed -n 's/.*step time predicted ([^)]*): \([0-9.]*\) ms.*/\1/p' "$work/out")
    note=$(sed -n 's/.*representative ranks: \([0-9]*\) ran.*/\1 representatives/p' "$work/out")
    awk -v n="$n" -v ms="$per_step_ms" -v rss="$rss" -v p="$predicted" -v note="$note" \
      'BEGIN {printf "%8d | %12.2f | %12s | %16s | %s\n", n, ms / 1000, rss, p, note}'
  done
fi

if [ "$round_ranks" -gt 0 ]; then
  echo
  "$bin" bench comm --quick --scale-ranks "$round_ranks" 2>/dev/null | sed -n '/== 3\./,/section 3 took/p'
fi
exit $status
