#!/usr/bin/env bash
# Lint: `lint.sh format` checks every tracked C++ file against .clang-format;
# `lint.sh tidy` runs clang-tidy (a curated check list, warnings are errors)
# on the library and tool sources the last commit changed, against
# build/compile_commands.json (so it runs after .ci/build.sh). Only changed
# files: one LibTorch translation unit takes clang-tidy ~15-40 s here.
# FSDPSIM_LINT_BASE picks another base commit (default HEAD~1).
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-}
case "$mode" in
  format)
    mapfile -t files < <(git ls-files '*.cpp' '*.h')
    clang-format --dry-run -Werror "${files[@]}"
    echo "lint: clang-format: ${#files[@]} files clean"
    ;;
  tidy)
    if [ ! -f build/compile_commands.json ]; then
      echo "lint: build/compile_commands.json is missing: run bash .ci/build.sh first" >&2
      exit 1
    fi
    base=${FSDPSIM_LINT_BASE:-HEAD~1}
    if ! git rev-parse --verify --quiet "$base^{commit}" >/dev/null; then
      echo "lint: base commit $base does not exist (a shallow clone?): set FSDPSIM_LINT_BASE" >&2
      exit 1
    fi
    mapfile -t files < <(git diff --name-only --diff-filter=d "$base" HEAD -- \
                           'backends/*.cpp' 'sim/*.cpp' 'fsdp/*.cpp' 'scenarios/*.cpp' 'tools/*.cpp')
    if [ ${#files[@]} -eq 0 ]; then
      echo "lint: clang-tidy: no library or tool source changed since $base"
      exit 0
    fi
    checks='-*,bugprone-use-after-move,bugprone-dangling-handle,bugprone-unused-raii'
    checks+=',bugprone-move-forwarding-reference,bugprone-unused-return-value,bugprone-infinite-loop'
    checks+=',performance-unnecessary-copy-initialization,performance-move-const-arg'
    checks+=',performance-for-range-copy,readability-function-size'
    echo "lint: clang-tidy on ${#files[@]} file(s) changed since $base"
    printf '%s\n' "${files[@]}" |
      xargs -P "${FSDPSIM_BUILD_JOBS:-2}" -n 1 clang-tidy -p build --quiet --checks="$checks" --warnings-as-errors='*' \
        --config='{CheckOptions: [{key: readability-function-size.LineThreshold, value: 80}]}'
    echo "lint: clang-tidy: ${#files[@]} file(s) clean"
    ;;
  *)
    echo "usage: bash .ci/lint.sh format|tidy" >&2
    exit 2
    ;;
esac
