#!/usr/bin/env bash
# One run of benchmarks/quality/run.sh: trains NAME with the protocol's flags
# (QUALITY_OUT/common.args) plus the arm's own, then evaluates the final model on every held-out
# window with moe-eval (capacity factor 2.0). Writes QUALITY_OUT/runs/NAME/final.json: the
# evaluation's JSON line, or {"failed": true, "exit_status": N} when training or evaluation failed.
# A run with a final.json is skipped.
# usage (from run.sh, through xargs): train_one.sh NAME [moe-train flags...]
set -uo pipefail
name=$1; shift
out=$QUALITY_OUT
dir="$out/runs/$name"
[[ -f $dir/final.json ]] && exit 0
mkdir -p "$dir"
mapfile -t common < "$out/common.args"
start=$(date +%s)
status=0
"$QUALITY_BUILD/moe-train" "${common[@]}" "$@" --metrics-file "$dir/metrics.jsonl" \
    --export-safetensors "$dir/model.safetensors" > "$dir/train.log" 2>&1 || status=$?
if [[ $status == 0 ]]; then
  "$QUALITY_BUILD/moe-eval" --model "$dir/model.safetensors" --data-path "$out/valid.bin" \
      --data-format bytes --seq-length "$QUALITY_SEQ" --micro-batch-size "$QUALITY_BATCH" \
      --threads "$QUALITY_THREADS" --moe-eval-capacity-factor 2.0 > "$dir/eval.log" 2>&1 \
      || status=$?
fi
# Only the first E=8 model is studied further (its routing); the others would fill the disk.
[[ $name == e8_s1 ]] || rm -f "$dir/model.safetensors"
if [[ $status == 0 ]]; then
  tail -n 1 "$dir/eval.log" > "$dir/final.json.tmp"
else
  echo "{\"failed\": true, \"exit_status\": $status}" > "$dir/final.json.tmp"
fi
echo "$(( $(date +%s) - start ))" > "$dir/seconds"
mv "$dir/final.json.tmp" "$dir/final.json"
echo "$(date +%T) $name: exit $status after $(( $(date +%s) - start )) s"
