#!/usr/bin/env bash
# Configures and builds everything into ./build (Release, Ninja, ccache when present).
set -euo pipefail
cd "$(dirname "$0")/.."
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release
# Two cores: two compile jobs. LibTorch translation units take ~1-2 GiB each.
cmake --build build -j "${FSDPSIM_BUILD_JOBS:-2}"
