#!/usr/bin/env bash
# The Switch Transformer's claims at small scale (issue 7): trains every arm of every study with
# moe-train on one text file, evaluates each final model with moe-eval on the held-out windows,
# writes CSV, draws PNG plots with gnuplot and writes the results page from those files.
#
# usage: benchmarks/quality/run.sh [--quick] [--data FILE] [--out DIR] [--build DIR]
#                                  [--jobs N] [--threads N] [--doc FILE]
#   --quick    a reduced version of every study (fewer iterations, seeds and arms): a smoke check
#   --data     training text (default ../shared/data/tinyshakespeare.txt)
#   --out      run directory (default runs/quality, or runs/quality-quick with --quick)
#   --build    build directory holding moe-train and moe-eval (default build)
#   --jobs     runs trained at once (default 2), each with --threads threads (default 1)
#   --doc      the results page (default docs/RESULTS.md with its CSVs and PNGs in
#              docs/results/; with --quick, OUT/RESULTS.md beside OUT's CSVs and PNGs)
#
# A run whose final.json exists is not trained again: after an interruption the same command
# continues where it stopped. Delete OUT to start from scratch.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)

quick=0
data=""
out=""
build="$root/build"
jobs=2
threads=1
doc=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --quick) quick=1; shift ;;
    --data) data=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --build) build=$2; shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --doc) doc=$2; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "quality/run.sh: unknown argument '$1' (--help lists them)" >&2; exit 2 ;;
  esac
done
if [[ -z $data ]]; then
  data="$root/../shared/data/tinyshakespeare.txt"
  [[ -f $data ]] || { echo "quality/run.sh: no --data FILE and no $data" >&2; exit 2; }
fi
[[ -f $data ]] || { echo "quality/run.sh: --data $data: no such file" >&2; exit 2; }
for tool in "$build/moe-train" "$build/moe-eval"; do
  [[ -x $tool ]] || { echo "quality/run.sh: $tool not built (scripts/build.sh)" >&2; exit 2; }
done
command -v gnuplot > /dev/null || { echo "quality/run.sh: gnuplot not found (scripts/setup.sh installs it)" >&2; exit 2; }
if [[ -z $out ]]; then out="$root/runs/quality"; [[ $quick == 1 ]] && out="$root/runs/quality-quick"; fi
mkdir -p "$out/runs"
out=$(cd "$out" && pwd)
if [[ -z $doc ]]; then
  if [[ $quick == 1 ]]; then doc="$out/RESULTS.md"; else doc="$root/docs/RESULTS.md"; fi
fi

# ---------------------------------------------------------------------------------------------
# The protocol: fixed before any run, identical for every arm. A Switch arm differs from the
# dense arm only by its Switch layers (every other FFN replaced by E experts of the same size)
# and, within a study, by the one setting the study varies.
layers=4 hidden=128 heads=4 ffn=512 seq=128 batch=16
lr=2e-3 min_lr=2e-4 warmup=30 decay=cosine
iters=200 eval_interval=10 eval_iters=4
seeds_main="1 2 3" seeds_init="1 2 3 4 5"
experts_main="2 4 8 16" capacities="0.5 1.0 2.0 0"
if [[ $quick == 1 ]]; then
  iters=60 eval_interval=12 eval_iters=2 warmup=6
  seeds_main="1" seeds_init="1 2"
  experts_main="4 8" capacities="0.5 0"
fi
common=(--num-layers $layers --hidden-size $hidden --num-attention-heads $heads
        --ffn-hidden-size $ffn --seq-length $seq --micro-batch-size $batch
        --global-batch-size $batch --train-iters $iters --lr $lr --min-lr $min_lr
        --lr-warmup-iters $warmup --lr-decay-style $decay --data-path "$data"
        --valid-fraction 0.1 --eval-interval $eval_interval --eval-iters $eval_iters
        --moe-layer-freq 2 --moe-router-topk 1 --moe-eval-capacity-factor 2.0
        --moe-z-loss-coeff 0.001 --log-interval 1000000 --threads $threads)
# The flags of a Switch arm: E, then the Switch defaults (capacity factor 1.25, load-balancing
# coefficient 0.01, init scale 0.1) with any of them overridden: switch_arm E [CF [AUX [SCALE]]].
switch_arm() {
  echo "--num-experts $1 --moe-expert-capacity-factor ${2:-1.25} --moe-aux-loss-coeff ${3:-0.01}" \
       "--init-scale ${4:-0.1}"
}

# The held-out windows as one file, for the final evaluation with moe-eval: the trainer holds
# out the last ceil(0.1 n) of n = floor((N-1)/T) windows.
/usr/bin/python3 - "$data" "$seq" "$out/valid.bin" <<'PY'
import math, sys
data, T, path = open(sys.argv[1], "rb").read(), int(sys.argv[2]), sys.argv[3]
n = (len(data) - 1) // T
valid = math.ceil(0.1 * n)
start = (n - valid) * T
open(path, "wb").write(data[start:start + valid * T + 1])
PY

# One line per run: NAME then the flags that make it differ from the protocol's defaults.
jobs_file="$out/jobs.txt"
: > "$jobs_file"
add() { echo "$*" >> "$jobs_file"; }
# Seed by seed, so that an interrupted study still has every arm.
for s in $seeds_init; do
  if [[ " $seeds_main " == *" $s "* ]]; then
    add "dense_s$s --num-experts 0 --init-scale 0.1 --seed $s"
    for e in $experts_main; do add "e${e}_s$s $(switch_arm $e) --seed $s"; done
    for cf in $capacities; do add "e8_cf${cf}_s$s $(switch_arm 8 $cf) --seed $s"; done
    add "e8_nolb_s$s $(switch_arm 8 1.25 0) --seed $s"
  else
    add "e8_s$s $(switch_arm 8) --seed $s"
  fi
  add "e8_init1_s$s $(switch_arm 8 1.25 0.01 1.0) --seed $s"
done

# The protocol as the report prints it.
/usr/bin/python3 - "$out/protocol.json" <<PY
import json, sys
json.dump({"quick": $quick, "data": "$data", "num_layers": $layers, "hidden_size": $hidden,
           "num_attention_heads": $heads, "ffn_hidden_size": $ffn, "seq_length": $seq,
           "batch": $batch, "train_iters": $iters, "lr": "$lr", "min_lr": "$min_lr",
           "warmup": $warmup, "decay": "$decay", "eval_interval": $eval_interval,
           "eval_iters": $eval_iters, "seeds_main": "$seeds_main", "seeds_init": "$seeds_init",
           "experts_main": "$experts_main", "capacities": "$capacities", "jobs": $jobs,
           "threads": $threads, "common_flags": """${common[*]}""",
           "switch_flags": """$(switch_arm E)"""}, open(sys.argv[1], "w"), indent=1)
PY

# The protocol's flags, one per line, for train_one.sh. Finished runs are reused only under the
# same protocol (threads aside, which change no result).
new_args=$(printf '%s\n' "${common[@]}")
if [[ -f $out/common.args ]] && ls "$out"/runs/*/final.json > /dev/null 2>&1 &&
   [[ $(sed '/^--threads$/,+1d' "$out/common.args") != $(sed '/^--threads$/,+1d' <<< "$new_args") ]]; then
  echo "quality/run.sh: $out holds runs of another protocol; delete it or give another --out" >&2
  exit 2
fi
echo "$new_args" > "$out/common.args"

started=$(date +%s)
echo "quality: $(wc -l < "$jobs_file") runs of $iters iterations, $jobs at a time, into $out"
export QUALITY_OUT=$out QUALITY_BUILD=$build QUALITY_SEQ=$seq QUALITY_BATCH=$batch \
       QUALITY_THREADS=$threads
xargs -P "$jobs" -L 1 "$here/train_one.sh" < "$jobs_file"
echo "quality: training took $(( $(date +%s) - started )) s"

# Study 5: the first E=8 model's routing of every held-out token.
if [[ ! -f $out/routing.csv ]]; then
  "$build/moe-eval" --model "$out/runs/e8_s1/model.safetensors" --data-path "$out/valid.bin" \
      --data-format bytes --seq-length $seq --micro-batch-size $batch --threads "$threads" \
      --dump-routing "$out/routing.csv.tmp" > "$out/routing.log"
  mv "$out/routing.csv.tmp" "$out/routing.csv"
fi

# CSVs, plots, page.
figures="$out/results"
[[ $quick == 1 ]] || figures="$(dirname "$doc")/results"
mkdir -p "$figures"
/usr/bin/python3 "$here/analyze.py" "$out" "$figures"
for gp in "$here"/plot_*.gp; do
  gnuplot -e "dir='$figures'" "$gp"
done
cmd="benchmarks/quality/run.sh"
[[ $quick == 1 ]] && cmd+=" --quick"
/usr/bin/python3 "$here/report.py" "$out" "$figures" "$doc" "$cmd"
echo "quality: wrote $doc and $figures/ in $(( $(date +%s) - started )) s"
