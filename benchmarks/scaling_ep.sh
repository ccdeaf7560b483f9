#!/usr/bin/env bash
# Strong scaling of switch-small from 1 rank to 2 expert-parallel ranks (1 thread each), global
# batch 32, in one run: both layouts alternate for --rounds rounds; prints median tokens/s per
# layout, the efficiency tokens/s(2) / (2 x tokens/s(1)), and the time per phase (router,
# permute, all-to-all, expert GEMM, combine, gradient all-reduce, rest) from the metrics files.
# usage: benchmarks/scaling_ep.sh [BUILD_DIR] [--rounds N] [--iters N] [--data-path FILE] [--out FILE.json]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=$root/build
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then build=$1; shift; fi
rounds=3 iters=12 data=$root/../shared/data/tinyshakespeare.txt out=""
while [ $# -gt 0 ]; do
  case $1 in
    --rounds) rounds=$2; shift 2 ;;
    --iters) iters=$2; shift 2 ;;
    --data-path) data=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "scaling_ep: unknown option $1" >&2; exit 2 ;;
  esac
done
out=${out:-$build/scaling_ep.json}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [ ! -f "$data" ]; then
  head -c 2000000 /dev/urandom > "$work/random.bin"
  data=$work/random.bin
fi
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
common=(--config "$root/configs/switch-small.ini" --data-path "$data" --global-batch-size 32
        --micro-batch-size 16 --train-iters "$iters" --threads 1 --valid-fraction 0
        --log-interval 1000 --data-order sequential)
for round in $(seq "$rounds"); do
  "$build/moe-train" "${common[@]}" --metrics-file "$work/ranks1_$round.jsonl" > /dev/null
  mpirun -np 2 --oversubscribe --bind-to none "$build/moe-train" "${common[@]}" \
    --expert-model-parallel-size 2 --metrics-file "$work/ranks2_$round.jsonl" > /dev/null
done
/usr/bin/python3 - "$work" "$rounds" "$out" <<'PY'
import json, statistics, sys
work, rounds, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def load(ranks):
    rates, phases = [], {}
    for r in range(1, rounds + 1):
        lines = [json.loads(l) for l in open(f"{work}/ranks{ranks}_{r}.jsonl")]
        lines = [l for l in lines if "tokens_per_sec" in l][2:]  # the first two warm up
        rates += [l["tokens_per_sec"] for l in lines]
        for l in lines:
            for k, v in l["time_breakdown_ms"].items():
                phases.setdefault(k, []).append(v)
    return statistics.median(rates), {k: statistics.median(v) for k, v in phases.items()}
one, two = load(1), load(2)
eff = two[0] / (2 * one[0])
print(f"tokens/s  1 rank: {one[0]:.0f}   2 EP ranks: {two[0]:.0f}   efficiency {eff:.3f} "
      f"(medians over {rounds} alternating rounds)")
print(f"{'phase (ms/iter, median)':<26}{'1 rank':>10}{'2 EP ranks':>12}")
for k in one[1]:
    print(f"{k:<26}{one[1][k]:>10.1f}{two[1].get(k, 0):>12.1f}")
json.dump({"tokens_per_sec_1": one[0], "tokens_per_sec_2": two[0], "efficiency": eff,
           "phases_ms_1": one[1], "phases_ms_2": two[1], "rounds": rounds}, open(out, "w"), indent=1)
print(f"wrote {out}")
PY
