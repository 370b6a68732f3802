#!/usr/bin/env bash
# Installs this build into a fresh prefix, configures and builds examples/
# against it (find_package(fsdpsim)) with the same compiler, and runs the
# example's tests. Any failed step fails the test.
#   tests/example_test.sh BUILD_DIR EXAMPLES_DIR CXX CMAKE CTEST GENERATOR [LAUNCHER]
set -euo pipefail
build=$1 examples=$2 cxx=$3 cmake=$4 ctest=$5 generator=$6 launcher=${7:-}
# Inside the build tree and at a fixed path, so ccache (base_dir) hits on reruns.
work="$build/example-test"
rm -rf "$work"
mkdir -p "$work"
"$cmake" --install "$build" --prefix "$work/prefix" >"$work/install.log"
"$cmake" -S "$examples" -B "$work/build" -G "$generator" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CXX_COMPILER="$cxx" ${launcher:+-DCMAKE_CXX_COMPILER_LAUNCHER="$launcher"} \
  -DCMAKE_PREFIX_PATH="$work/prefix"
"$cmake" --build "$work/build" -j "${FSDPSIM_BUILD_JOBS:-2}"
"$ctest" --test-dir "$work/build" --output-on-failure --no-tests=error
