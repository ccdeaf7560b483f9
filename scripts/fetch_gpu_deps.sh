#!/usr/bin/env bash
# Fetches, on a machine that reaches Debian's archive (the development machines: Debian 12),
# the packages that benchmarks/gpu_check.sh needs on a GPU machine that has only CUDA, CMake
# and Python: Open MPI, Boost.Program_options, oneDNN, nlohmann-json, GoogleTest and xxHash.
# The .deb files go to third_party/debs/ (git-ignored, about 25 MB); gpu_check.sh unpacks them
# with `dpkg -x` into build-gpu/sysroot/ there and points CMake and the loader at it.
#
# Compatibility: these are Debian 12 (bookworm) binaries, built against glibc 2.36 and GCC 12's
# libstdc++. They load on any x86-64 Linux whose glibc and libstdc++ are at least as new (the
# GPU image's Ubuntu 24.04: glibc 2.39, GCC 13/14): glibc and libstdc++ keep old symbol
# versions. On an older system they fail to load; this script writes the newest GLIBC_ and
# GLIBCXX_ symbol versions the carried libraries ask for into third_party/debs/REQUIRES, and
# gpu_check.sh compares them with the machine's before building.
#
#   scripts/fetch_gpu_deps.sh        # then: git status shows nothing new (the folder is ignored)
set -euo pipefail
cd "$(dirname "$0")/.."
dest=third_party/debs
packages=(
  # MPI: runtime, launcher (orterun, orted for singleton starts), headers, and what libmpi loads
  libopenmpi3 openmpi-bin openmpi-common libopenmpi-dev
  libpmix2 libhwloc15 libhwloc-plugins libevent-core-2.1-7 libevent-pthreads-2.1-7
  libfabric1 libucx0 libibverbs1 librdmacm1 libpsm2-2 libpsm-infinipath1 libnl-3-200
  libnl-route-3-200 libmunge2
  # Boost.Program_options (headers are the whole Boost tree: the biggest package here)
  libboost1.74-dev libboost-program-options1.74-dev libboost-program-options1.74.0
  # oneDNN (it links the OpenCL ICD loader, though the CPU engine never uses it)
  libdnnl2 libdnnl-dev ocl-icd-libopencl1
  # header-only or static
  nlohmann-json3-dev libgtest-dev googletest libxxhash-dev libxxhash0
)
mkdir -p "$dest"
rm -f "$dest"/*.deb
if ! (cd "$dest" && apt-get download "${packages[@]}"); then
  echo "fetch_gpu_deps.sh: apt-get download failed; run 'apt-get update' first" >&2
  exit 1
fi

# The newest glibc / libstdc++ symbol versions any carried shared library needs.
unpacked=$(mktemp -d)
trap 'rm -rf "$unpacked"' EXIT
for deb in "$dest"/*.deb; do dpkg -x "$deb" "$unpacked"; done
newest() {
  find "$unpacked" -name '*.so*' -type f -print0 | xargs -0 objdump -T 2>/dev/null |
    grep -o "$1_[0-9.]*" | sort -u -V | tail -1
}
{
  echo "glibc $(newest GLIBC | sed 's/GLIBC_//')"
  echo "libstdc++ $(newest GLIBCXX | sed 's/GLIBCXX_//')"
} > "$dest/REQUIRES"
echo "fetch_gpu_deps.sh: $(ls "$dest"/*.deb | wc -l) packages, $(du -sh "$dest" | cut -f1) in $dest;" \
     "they need $(awk '{printf "%s%s %s", NR > 1 ? ", " : "", $1, $2}' "$dest/REQUIRES") or newer"
