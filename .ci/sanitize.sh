#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer run of the tests that need no
# Gloo transport: builds ./build-asan (-DFSDPSIM_SANITIZE=ON, -O1 -g) and runs
# fsdpsim_tests without the Gloo, torchrun and conformance cases. Not part of
# .ci/run (a cold sanitizer build takes ~25 min on two cores); run it by hand
# or in a nightly job. Leak checking is off: LibTorch's process-lifetime
# singletons are reported as leaks at exit.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${FSDPSIM_PYTHON:-$PWD/.venv/bin/python}
cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g" \
  -DFSDPSIM_SANITIZE=ON -DFSDPSIM_PYTHON="$python"
cmake --build build-asan -j "${FSDPSIM_BUILD_JOBS:-2}" --target fsdpsim_tests
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
filter=${FSDPSIM_SANITIZE_FILTER:--*Gloo*:*Torchrun*:*TorchBuild*}
echo "sanitize: running fsdpsim_tests --gtest_filter=$filter"
build-asan/tests/fsdpsim_tests --gtest_filter="$filter" --gtest_brief=1
