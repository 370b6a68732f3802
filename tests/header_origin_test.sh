#!/usr/bin/env bash
# Every object file of the build read LibTorch's headers from the pinned
# wheel, none from Debian's /usr/include/{torch,c10,ATen,caffe2} (present on a
# machine with libtorch-dev, and found silently if the wheel lacked a header).
# Gloo's headers are the one documented exception (the wheel ships none):
# only backends/gloo/gloo_process_group.cpp may read /usr/include/gloo.
#   tests/header_origin_test.sh BUILD_DIR TORCH_INCLUDE_DIR
set -euo pipefail
build=$1
wheel_include=$2
deps=$(ninja -C "$build" -t deps)
# Ninja records paths inside the source tree relative to the build directory.
wheel_relative=$(realpath -m --relative-to="$build" "$wheel_include")
report=$(awk -v wheel="$(realpath -m "$wheel_include")/" -v wheel_rel="$wheel_relative/" '
  /^[^ \t]/ { target = $1; sub(":$", "", target); next }
  { path = $1 }
  path ~ "^/usr/(local/)?include/(torch|c10|ATen|caffe2)/" { print "debian-torch " target " " path }
  path ~ "^/usr/(local/)?include/gloo/" && target !~ /gloo_process_group\.cpp\.o$/ { print "gloo " target " " path }
  index(path, wheel) == 1 || index(path, wheel_rel) == 1 { wheel_reads[target] = 1 }
  END { n = 0; for (t in wheel_reads) n++; print "objects-reading-the-wheel " n }
' <<<"$deps")
bad=$(grep -v '^objects-reading-the-wheel ' <<<"$report" || true)
readers=$(sed -n 's/^objects-reading-the-wheel //p' <<<"$report")
if [ -n "$bad" ]; then
  echo "header_origin: headers from outside the wheel:"
  head -20 <<<"$bad"
  exit 1
fi
if [ "${readers:-0}" -lt 10 ]; then
  echo "header_origin: only ${readers:-0} objects read headers from $wheel_include (no deps recorded? build first)"
  exit 1
fi
echo "header_origin: $readers objects read LibTorch headers, all from $wheel_include"
