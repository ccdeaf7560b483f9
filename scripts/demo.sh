#!/usr/bin/env bash
# The Quick start's training run: switch-small (4 layers, 8 experts in layers 1 and 3) on two
# expert-parallel MPI ranks of this machine, then a loss-curve plot and moe-eval.
# Data: ../shared/data/tinyshakespeare.txt when it exists; otherwise this repository's own
# documentation and sources as one text file (no download either way).
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir=${BUILD_DIR:-build}
run_dir=${RUN_DIR:-runs/demo}
iters=${ITERS:-200}
mkdir -p "$run_dir"

data=../shared/data/tinyshakespeare.txt
if [ ! -f "$data" ]; then
  data="$run_dir/corpus.txt"
  cat README.md docs/*.md core/*.h core/cpu/*.cpp dist/*.cpp experts/*.cpp model/*.cpp \
      launcher/*.cpp > "$data"
fi
echo "data: $data"

export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
mpirun -np 2 --oversubscribe --bind-to none "$build_dir/moe-train" \
  --config configs/switch-small.ini --data-path "$data" \
  --expert-model-parallel-size 2 --threads 1 \
  --train-iters "$iters" --eval-interval 50 --eval-iters 8 --log-interval 10 \
  --metrics-file "$run_dir/metrics.jsonl" --export-safetensors "$run_dir/model.safetensors"

scripts/plot_metrics.sh "$run_dir/metrics.jsonl" "$run_dir"
"$build_dir/moe-eval" --model "$run_dir/model.safetensors" --data-path "$data" \
  --seq-length 128 --eval-iters 16 --threads 2
