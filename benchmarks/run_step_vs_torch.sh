#!/usr/bin/env bash
# Training speed of our step (bench_step) against the PyTorch eager baseline
# (benchmarks/torch_baseline.py) on the same model (switch-small), data and thread count.
# Runs alternate -- ours, torch, ours, torch, ... -- so that load from other jobs falls on
# both alike; prints the median tokens/s of each and the ratio ours/torch, and writes a JSON
# summary. Builds nothing: build bench_step first.
#
#   benchmarks/run_step_vs_torch.sh [BUILD_DIR (default: the repository's build)] [--rounds 3] [--threads 2]
#       [--iters 10] [--warmup 2] [--data-path FILE] [--out BUILD_DIR/bench_step_vs_torch.json]
#
# Data: --data-path, else ../shared/data/tinyshakespeare.txt beside the repository, else
# 1 MiB of random bytes written to a temporary file that both read.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=/usr/bin/python3
build=$repo/build rounds=3 threads=2 iters=10 warmup=2 data="" out=""

usage() { sed -n '2,12s/^# \{0,1\}//p' "$0"; exit "${1:-2}"; }
die() { echo "run_step_vs_torch.sh: error: $1" >&2; exit "${2:-2}"; }
while [[ $# -gt 0 ]]; do
  case $1 in
    --rounds) rounds=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --iters) iters=$2; shift 2 ;;
    --warmup) warmup=$2; shift 2 ;;
    --data-path) data=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    -h|--help) usage 0 ;;
    -*) echo "run_step_vs_torch.sh: error: unknown option $1" >&2; usage ;;
    *) build=$1; shift ;;
  esac
done
for n in "$rounds" "$threads" "$iters" "$warmup"; do
  [[ $n =~ ^[0-9]+$ ]] || die "not a count: $n"
done
(( rounds >= 1 && iters >= 1 )) || die "--rounds and --iters must be at least 1"
out=${out:-$build/bench_step_vs_torch.json}
bench=$build/benchmarks/bench_step
[[ -x $bench ]] || die "no $bench (build it: cmake --build $build --target bench_step)"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [[ -z $data ]]; then
  data=$repo/../shared/data/tinyshakespeare.txt
  if [[ -f $data ]]; then
    data=$(realpath "$data")
  else
    data=$work/random.bytes
    head -c 1048576 /dev/urandom > "$data"
  fi
fi

# Runs one benchmark command; appends its last stdout line (a JSON object) to $1.
run_one() {
  local results=$1; shift
  if ! "$@" > "$work/stdout" 2> "$work/stderr"; then
    cat "$work/stderr" >&2
    die "failed: $*" 1
  fi
  tail -n 1 "$work/stdout" >> "$results"
}

tokens_per_sec() { $python -c 'import json,sys; print("%.0f" % json.loads(sys.argv[1])["tokens_per_sec"])' "$1"; }

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
echo "threads $threads, iters $iters (+$warmup warm-up), rounds $rounds, data $data"
echo "load average before: $load_before (on $(nproc) CPUs)"
common=(--threads "$threads" --iters "$iters" --warmup "$warmup" --data-path "$data")
for ((round = 1; round <= rounds; round++)); do
  run_one "$work/ours.jsonl" "$bench" "${common[@]}" --json
  run_one "$work/torch.jsonl" "$python" "$repo/benchmarks/torch_baseline.py" "${common[@]}"
  echo "round $round: ours $(tokens_per_sec "$(tail -n 1 "$work/ours.jsonl")") tokens/s," \
       "torch $(tokens_per_sec "$(tail -n 1 "$work/torch.jsonl")") tokens/s"
done
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

mkdir -p "$(dirname "$out")"
$python - "$work/ours.jsonl" "$work/torch.jsonl" "$out" "$load_before" "$load_after" \
    "$threads" "$iters" "$warmup" "$data" <<'EOF'
import json, os, statistics, sys

ours_path, torch_path, out, load_before, load_after, threads, iters, warmup, data = sys.argv[1:]
ours = [json.loads(line) for line in open(ours_path)]
torch = [json.loads(line) for line in open(torch_path)]
ours_tps = [r["tokens_per_sec"] for r in ours]
torch_tps = [r["tokens_per_sec"] for r in torch]
summary = {
    "ours_tokens_per_sec": statistics.median(ours_tps),
    "torch_tokens_per_sec": statistics.median(torch_tps),
    "ratio": statistics.median(ours_tps) / statistics.median(torch_tps),
    "ours_rounds": ours_tps,
    "torch_rounds": torch_tps,
    "ours_ms_per_iter": statistics.median(r["ms_per_iter"] for r in ours),
    "torch_ms_per_iter": statistics.median(r["ms_per_iter"] for r in torch),
    "ours_mfu": statistics.median(r["mfu"] for r in ours),
    "ours_sgemm_peak_gflops": statistics.median(r["sgemm_peak_gflops"] for r in ours),
    "threads": int(threads), "iters": int(iters), "warmup": int(warmup), "rounds": len(ours),
    "data": data, "torch": torch[0].get("torch"), "torch_linear": torch[0].get("linear"),
    "load_average_before": load_before, "load_average_after": load_after, "cpus": os.cpu_count(),
}
with open(out, "w") as f:
    json.dump(summary, f, indent=2)
    f.write("\n")
print("%-8s %14s %12s" % ("", "tokens/s", "ms/iter"))
print("%-8s %14.0f %12.1f" % ("ours", summary["ours_tokens_per_sec"], summary["ours_ms_per_iter"]))
print("%-8s %14.0f %12.1f" % ("torch", summary["torch_tokens_per_sec"], summary["torch_ms_per_iter"]))
print("ratio ours/torch %.2f (medians of %d rounds); ours MFU %.3f of sgemm peak %.1f GFLOP/s"
      % (summary["ratio"], len(ours), summary["ours_mfu"], summary["ours_sgemm_peak_gflops"]))
print("load average after: %s; summary: %s" % (load_after, out))
EOF
