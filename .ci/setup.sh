#!/usr/bin/env bash
# Installs every build and test dependency: Debian packages with apt, then the
# pinned torch wheel (LibTorch: headers, libraries, c10d with Gloo) with pip
# into the project-local venv ./.venv. Idempotent: apt is not touched when
# every package is installed, pip not when the venv already has the pin.
# A fresh machine: ~5.3 GB (the torch wheel and its nvidia-* CUDA runtime
# wheels, which `import torch` and libtorch_cpu.so load even without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  build-essential cmake ninja-build ccache
  python3 python3-venv  # the venv that holds the torch wheel
  libgloo-dev           # Gloo headers only: the wheel ships none (see cmake/Torch.cmake)
  libboost-fiber-dev libboost-context-dev
  libgtest-dev libgmock-dev
  libbenchmark-dev
  nlohmann-json3-dev
  clang-format clang-tidy  # .ci/lint.sh
  libcli11-dev          # the fsdpsim command line (CLI11, header-only)
)

missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#packages[@]} Debian packages already installed"
else
  echo "setup: installing ${missing[*]}"
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi

requirements=.ci/python-requirements.txt
venv=.venv
if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating $venv"
  python3 -m venv "$venv"
fi
pinned=$(sed -n 's/^torch==//p' "$requirements")
if "$venv/bin/python" -c "import sys, importlib.metadata as m; sys.exit(m.version('torch') != '$pinned')" 2>/dev/null; then
  echo "setup: $venv already has torch $pinned"
else
  echo "setup: installing torch $pinned into $venv (about 5.3 GB with its CUDA runtime wheels)"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
fi
