#!/usr/bin/env bash
# Installs every build and test dependency from Debian packages. Idempotent:
# packages already installed are skipped, and apt is not touched at all when
# nothing is missing.
set -euo pipefail

packages=(
  build-essential cmake ninja-build ccache
  libtorch-dev          # LibTorch 1.13 (CPU) with c10d and ProcessGroupGloo
  libgloo-dev
  libboost-fiber-dev libboost-context-dev
  libgtest-dev libgmock-dev
  libbenchmark-dev
  nlohmann-json3-dev
)

missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#packages[@]} packages already installed"
  exit 0
fi

echo "setup: installing ${missing[*]}"
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
