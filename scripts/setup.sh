#!/usr/bin/env bash
# Installs every build, test and plotting dependency from Debian's archive.
# Idempotent: re-running it only checks that the packages are there.
set -euo pipefail
packages=(
  g++ cmake make pkg-config
  openmpi-bin libopenmpi-dev
  libboost-program-options-dev
  libdnnl-dev
  nlohmann-json3-dev
  libxxhash-dev
  libgtest-dev googletest
  python3 python3-numpy python3-torch
  gnuplot-nox
  clang-14 libclang-rt-14-dev libomp-14-dev   # tests/fuzz: libFuzzer, ASan, UBSan runtimes
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
