#!/usr/bin/env bash
# gpu_check.sh: the GPU acceptance run on a machine with one NVIDIA GPU (an H200) and nothing
# installed beyond CUDA (nvcc, cuBLASLt, NCCL from the toolkit or PyTorch's wheels), CMake and
# Python with PyTorch. In about 8 minutes it
#   1. unpacks the carried Debian packages (Open MPI, Boost, oneDNN, nlohmann-json, GoogleTest,
#      xxHash: scripts/fetch_gpu_deps.sh puts them in third_party/debs/, git-ignored) into
#      $BUILD/sysroot and checks that this machine's glibc/libstdc++ are new enough for them;
#   2. configures with MOE_ENABLE_CUDA=ON for this GPU's architecture and builds what it runs;
#   3. runs the GPU tests (every CUDA op against the CPU op, 20 iterations of the model on GPU
#      against CPU, the NCCL communicator against MPI at one rank) and fails if any skips;
#   4. runs bench_step --device cuda on a Switch-Base-like shape (12 layers, hidden 768, 12
#      heads, ffn 3072, 8 experts every other layer, seq 1024, batch 8): tokens/s and MFU
#      against the bf16 cuBLASLt GEMM rate measured in the same run, then again with
#      MOE_GROUPED_GEMM=0 (experts one product each) to show what the grouped GEMM buys, with
#      MOE_FUSED_GELU=0 (GELU as a separate kernel) for what the fused epilogue buys, and once
#      with MOE_CUDA_PROFILE=1 for the GPU time of every backend op;
#   5. runs benchmarks/torch_gpu_baseline.py (PyTorch eager, same model, same GPU);
#   6. prints a summary and the acceptance checks (all tests pass, MFU >= 0.40, tokens/s >=
#      1.5 x PyTorch eager); exit status 0 only when all hold.
#
#   scripts/fetch_gpu_deps.sh                  # once, where Debian's archive is reachable
#   benchmarks/gpu_check.sh [--out DIR]        # on the GPU machine (third_party/debs carried)
#
# Environment: BUILD (default build-gpu), ITERS (10), WARMUP (3), MICRO_BATCH (8).
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
build=${BUILD:-build-gpu}
out=""
[[ "${1:-}" == "--out" ]] && out=$2
iters=${ITERS:-10}
warmup=${WARMUP:-3}
micro=${MICRO_BATCH:-8}
sys=$root/$build/sysroot
arch_lib=x86_64-linux-gnu
started=$(date +%s)
log() { echo "gpu_check [$(( $(date +%s) - started ))s] $*"; }
die() { echo "gpu_check: error: $*" >&2; exit 1; }
mkdir -p "$build"
[[ -n "$out" ]] && mkdir -p "$out"
keep() { [[ -n "$out" ]] && cp "$1" "$out/" 2>/dev/null; true; }

# ---- 0. the machine --------------------------------------------------------------------
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
command -v nvcc > /dev/null || export PATH=/usr/local/cuda/bin:$PATH
command -v nvcc > /dev/null || die "no nvcc on PATH or in /usr/local/cuda/bin"
nvcc --version | tail -1
python=$(command -v python3) || die "no python3"

# ---- 1. carried packages -----------------------------------------------------------------
debs=third_party/debs
ls $debs/*.deb > /dev/null 2>&1 || die "no $debs/*.deb: run scripts/fetch_gpu_deps.sh where Debian's archive is reachable and carry $debs"
glibc_have=$(ldd --version 2>&1 | head -1 | grep -o '[0-9]*\.[0-9]*$')
glibc_need=$(awk '$1 == "glibc" {print $2}' $debs/REQUIRES 2>/dev/null)
if [[ -n "$glibc_need" && "$(printf '%s\n%s\n' "$glibc_need" "$glibc_have" | sort -V | head -1)" != "$glibc_need" ]]; then
  die "the carried Debian 12 libraries need glibc >= $glibc_need; this machine has $glibc_have"
fi
if [[ ! -f $sys/.unpacked ]] || [[ $debs -nt $sys/.unpacked ]]; then
  rm -rf "$sys" && mkdir -p "$sys"
  for deb in $debs/*.deb; do dpkg -x "$deb" "$sys" || die "cannot unpack $deb (dpkg -x)"; done
  touch "$sys/.unpacked"
fi
log "glibc $glibc_have (carried packages need >= ${glibc_need:-?}); $(ls $debs/*.deb | wc -l) packages in $sys"
# Open MPI and PMIx find their plugins, help files and helpers (orted) under their prefix.
export OPAL_PREFIX=$sys/usr
export PMIX_INSTALL_PREFIX=$sys/usr/lib/$arch_lib/pmix2
export HWLOC_PLUGINS_PATH=$sys/usr/lib/$arch_lib/hwloc
export PATH=$sys/usr/bin:$PATH
export LD_LIBRARY_PATH=$sys/usr/lib/$arch_lib:$sys/usr/lib/$arch_lib/openmpi/lib:${LD_LIBRARY_PATH:-}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# One node, no fabric: shared memory between ranks, no UCX/OFI probing.
export OMPI_MCA_pml=ob1 OMPI_MCA_btl=self,vader OMPI_MCA_mtl=^ofi,psm,psm2 OMPI_MCA_osc=^ucx
# Every run here is one process (one GPU): a singleton MPI start without an orted daemon.
export OMPI_MCA_ess_singleton_isolated=1

# NCCL: the toolkit's, else the one PyTorch's wheels bring (nvidia-nccl-cu*).
nccl_args=()
cuda_root=$(dirname "$(dirname "$(command -v nvcc)")")
if [[ ! -f $cuda_root/include/nccl.h && ! -f /usr/include/nccl.h ]]; then
  nccl_dir=$("$python" - <<'EOF' 2>/dev/null
import glob, os, site
for base in site.getsitepackages():
    for inc in glob.glob(os.path.join(base, "nvidia", "**", "nccl.h"), recursive=True):
        print(os.path.dirname(os.path.dirname(inc))); raise SystemExit
EOF
)
  [[ -n "$nccl_dir" ]] || die "no nccl.h in $cuda_root/include, /usr/include or PyTorch's nvidia-nccl wheel"
  nccl_lib=$(ls "$nccl_dir"/lib/libnccl.so* | head -1)
  nccl_args=(-DNCCL_INCLUDE_DIR="$nccl_dir/include" -DNCCL_LIBRARY="$nccl_lib")
  export LD_LIBRARY_PATH=$nccl_dir/lib:$LD_LIBRARY_PATH
  log "NCCL from $nccl_dir"
fi

# ---- 2. configure and build ----------------------------------------------------------------
cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '.')
cc=${cc:-90}
generator=()
command -v ninja > /dev/null && generator=(-G Ninja)
log "configure (sm_$cc)"
cmake "${generator[@]}" -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DMOE_ENABLE_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES="$cc" -DCMAKE_PREFIX_PATH="$sys/usr" \
  -DMPI_CXX_COMPILER="$sys/usr/bin/mpicxx.openmpi" -DMPIEXEC_EXECUTABLE="$sys/usr/bin/orterun" \
  "${nccl_args[@]}" > "$build/configure.log" 2>&1 || { tail -30 "$build/configure.log"; die "cmake configure failed"; }
keep "$build/configure.log"
log "build"
targets=(test_cuda_ops test_cuda_model mpi_test_nccl bench_step)
cmake --build "$build" -j "$(nproc)" --target "${targets[@]}" > "$build/build.log" 2>&1 ||
  { grep -E "error|Error" -A3 "$build/build.log" | head -40; keep "$build/build.log"; die "build failed"; }
for t in "$build"/tests/test_cuda_ops "$build"/benchmarks/bench_step "$build"/libmoe_cuda_backend.so; do
  missing=$(ldd "$t" | grep "not found")
  [[ -z "$missing" ]] || die "$t cannot load: $missing"
done

# ---- 3. GPU tests ----------------------------------------------------------------------------
tests_ok=1
run_test() {  # name, command...: must pass and must not skip
  local name=$1; shift
  log "test $name"
  if timeout 300 "$@" > "$build/$name.log" 2>&1; then
    if grep -q "\[  SKIPPED \]" "$build/$name.log"; then
      grep -m3 -A1 "SKIPPED\|Skipped" "$build/$name.log"
      echo "gpu_check: $name SKIPPED on a GPU machine"; tests_ok=0
    fi
  else
    echo "gpu_check: $name FAILED (exit $?)"; tests_ok=0
  fi
  grep -E "^\[  (PASSED|FAILED|SKIPPED) |worst|^iteration" "$build/$name.log" | tail -60
  keep "$build/$name.log"
}
run_test test_cuda_ops "$build/tests/test_cuda_ops"
run_test test_cuda_model "$build/tests/test_cuda_model"
# One GPU: the NCCL suite runs at one rank (its split and watchdog tests need two and skip).
OMP_NUM_THREADS=1 run_test mpi_test_nccl "$build/tests/mpi_test_nccl" \
  --gtest_filter='NcclVsMpi.CollectivesMatch:NcclVsMpi.Bf16ActivationsMatchAHostReference:NcclVsMpi.Bf16ActivationsInAGroupOfOneAreCopies'

# ---- 4. bench_step on the Switch-Base-like shape --------------------------------------------
shape=(--num-layers 12 --hidden-size 768 --num-attention-heads 12 --ffn-hidden-size 3072
       --num-experts 8 --moe-layer-freq 2 --moe-router-topk 1 --moe-expert-capacity-factor 1.25
       --seq-length 1024 --micro-batch-size "$micro")
log "bench_step --device cuda"
timeout 300 "$build/benchmarks/bench_step" --device cuda "${shape[@]}" --max-position-embeddings 1024 \
  --global-batch-size "$micro" --iters "$iters" --warmup "$warmup" --threads 4 --json \
  > "$build/bench_step.log" 2>&1 || { tail -20 "$build/bench_step.log"; echo "gpu_check: bench_step FAILED"; }
cat "$build/bench_step.log" | grep -v '^{'
keep "$build/bench_step.log"
# The same run with the experts as one cuBLASLt product each instead of one grouped call: what
# the grouped GEMM buys (and whether cuBLAS took it: its refusal is one stderr line above).
log "bench_step --device cuda, MOE_GROUPED_GEMM=0"
MOE_GROUPED_GEMM=0 timeout 300 "$build/benchmarks/bench_step" --device cuda "${shape[@]}" \
  --max-position-embeddings 1024 --global-batch-size "$micro" --iters "$iters" --warmup "$warmup" \
  --threads 4 --json > "$build/bench_step_per_expert.log" 2>&1 || echo "gpu_check: bench_step (per expert) FAILED"
keep "$build/bench_step_per_expert.log"
# And with the GELU unfused (a product, then a GELU kernel): what the cuBLASLt epilogue buys.
log "bench_step --device cuda, MOE_FUSED_GELU=0"
MOE_FUSED_GELU=0 timeout 300 "$build/benchmarks/bench_step" --device cuda "${shape[@]}" \
  --max-position-embeddings 1024 --global-batch-size "$micro" --iters "$iters" --warmup "$warmup" \
  --threads 4 --json > "$build/bench_step_unfused_gelu.log" 2>&1 || echo "gpu_check: bench_step (unfused GELU) FAILED"
keep "$build/bench_step_unfused_gelu.log"
# Where the GPU time goes, per op of the backend (CUDA events; no profiler needed on the machine).
log "bench_step --device cuda, MOE_CUDA_PROFILE=1"
MOE_CUDA_PROFILE=1 timeout 300 "$build/benchmarks/bench_step" --device cuda "${shape[@]}" \
  --max-position-embeddings 1024 --global-batch-size "$micro" --iters 3 --warmup 1 --threads 4 \
  > "$build/bench_step_profile.log" 2>&1 || echo "gpu_check: bench_step (profiled) FAILED"
grep "^moe:" "$build/bench_step_profile.log" | head -25
keep "$build/bench_step_profile.log"

# ---- 5. PyTorch eager, same model -------------------------------------------------------------
log "PyTorch eager baseline"
timeout 300 "$python" benchmarks/torch_gpu_baseline.py "${shape[@]}" --iters "$iters" --warmup "$warmup" \
  > "$build/torch_gpu_baseline.log" 2>&1 || { tail -20 "$build/torch_gpu_baseline.log"; echo "gpu_check: torch baseline FAILED"; }
keep "$build/torch_gpu_baseline.log"

# ---- 6. summary ---------------------------------------------------------------------------
"$python" - "$build/bench_step.log" "$build/torch_gpu_baseline.log" "$tests_ok" "$build/bench_step_per_expert.log" \
  "$build/bench_step_unfused_gelu.log" <<'EOF'
import json, sys
def last_json(path):
    try:
        lines = [l for l in open(path) if l.startswith("{")]
        return json.loads(lines[-1]) if lines else None
    except OSError:
        return None
ours, torch_run, tests_ok = last_json(sys.argv[1]), last_json(sys.argv[2]), sys.argv[3] == "1"
print("\n==== gpu_check summary ====")
ok = tests_ok
print("GPU tests: %s" % ("all passed" if tests_ok else "FAILED or skipped (see above)"))
if ours:
    print("bench_step --device cuda: %.0f tokens/s, %.1f ms/iter, %.1f TFLOP/s achieved, "
          "bf16 cuBLASLt peak %.1f TFLOP/s, MFU %.3f"
          % (ours["tokens_per_sec"], ours["ms_per_iter"], ours["gflops"] / 1e3,
             ours["sgemm_peak_gflops"] / 1e3, ours["mfu"]))
    ok &= ours["mfu"] >= 0.40
    print("  MFU >= 0.40: %s" % ("yes" if ours["mfu"] >= 0.40 else "NO"))
    per_expert = last_json(sys.argv[4])
    if per_expert:
        print("  experts one product each (MOE_GROUPED_GEMM=0): %.0f tokens/s; grouped/per-expert %.2fx"
              % (per_expert["tokens_per_sec"], ours["tokens_per_sec"] / per_expert["tokens_per_sec"]))
    unfused = last_json(sys.argv[5])
    if unfused:
        print("  GELU unfused (MOE_FUSED_GELU=0): %.0f tokens/s; fused/unfused %.2fx"
              % (unfused["tokens_per_sec"], ours["tokens_per_sec"] / unfused["tokens_per_sec"]))
else:
    print("bench_step: no result"); ok = False
if torch_run:
    print("PyTorch eager (%s, %s attention): %.0f tokens/s, %.1f ms/iter"
          % (torch_run["torch"], torch_run["attention"], torch_run["tokens_per_sec"], torch_run["ms_per_iter"]))
else:
    print("PyTorch eager: no result"); ok = False
if ours and torch_run:
    ratio = ours["tokens_per_sec"] / torch_run["tokens_per_sec"]
    print("  ratio %.2fx, >= 1.5x: %s" % (ratio, "yes" if ratio >= 1.5 else "NO"))
    ok &= ratio >= 1.5
print("acceptance: %s" % ("PASS" if ok else "FAIL"))
sys.exit(0 if ok else 1)
EOF
status=$?
log "done"
exit $status
