#!/usr/bin/env bash
# Every measurement behind README.md's "Performance" block, into docs/perf/, then the block
# itself (benchmarks/scaling_readme.py). Each file records the arguments that made it, and the
# README prints them beside each table.
#
# usage: benchmarks/scaling_report.sh [BUILD_DIR] [--out DIR] [--readme-only]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=$root/build
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then build=$1; shift; fi
out=$root/docs/perf readme_only=0
while [ $# -gt 0 ]; do
  case $1 in
    --out) out=$2; shift 2 ;;
    --readme-only) readme_only=1; shift ;;
    *) echo "scaling_report: unknown option $1" >&2; exit 2 ;;
  esac
done
if [ "$readme_only" = 1 ]; then
  exec /usr/bin/python3 "$root/benchmarks/scaling_readme.py" --perf "$out" --readme "$root/README.md"
fi
mkdir -p "$out"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
# See scaling_sweep.sh: steady shared-memory copies, and waiting ranks that yield their core.
export OMPI_MCA_btl_vader_single_copy_mechanism=${OMPI_MCA_btl_vader_single_copy_mechanism:-none}
export OMPI_MCA_mpi_yield_when_idle=${OMPI_MCA_mpi_yield_when_idle:-1}
mpirun=(mpirun --oversubscribe --bind-to none)
load() { cut -d' ' -f1 /proc/loadavg; }
load_start=$(load)
# record FILE ARGS: stores the arguments that made FILE in it, for the README.
record() {
  /usr/bin/python3 - "$1" "$2" <<'PY'
import json, sys
path, args = sys.argv[1], sys.argv[2]
j = json.load(open(path))
j["command_args"] = args
json.dump(j, open(path, "w"), indent=1)
PY
}

a2a_args="-b 64K -e 16M -f 4 -n 40 -w 5"
"${mpirun[@]}" -np 2 "$build/benchmarks/bench_alltoall" $a2a_args --json "$out/alltoall.json"
record "$out/alltoall.json" "$a2a_args"

moe_args="--moe -b 1M -e 4M -f 4 -n 30 -w 5"
"${mpirun[@]}" -np 2 "$build/benchmarks/bench_alltoall" $moe_args --json "$out/alltoall_moe.json"
record "$out/alltoall_moe.json" "$moe_args"

layer_args="--tokens 2048 --experts 8 16 --top-k 1 2 --capacity-factor 0 1.25 --iters 5 --warmup 2"
"$build/benchmarks/bench_moe_layer" $layer_args --json "$out/moe_layer_ep1.json" > /dev/null
record "$out/moe_layer_ep1.json" "$layer_args"
"${mpirun[@]}" -np 2 "$build/benchmarks/bench_moe_layer" $layer_args --json "$out/moe_layer_ep2.json"
record "$out/moe_layer_ep2.json" "$layer_args"

step_args="--threads 1 --iters 6 --warmup 2 --json"
"$build/benchmarks/bench_step" $step_args | tail -n 1 > "$out/step.json"
record "$out/step.json" "$step_args"

plan_args="--rounds 3 --iters 8"
"$root/benchmarks/plan_check.sh" "$build" $plan_args --out "$out" || echo "scaling_report: plan_check is outside its tolerance (see $out/plan_check.csv)" >&2
record "$out/plan_check.json" "$plan_args"

sweep_args="--ranks \"1 2\" --rounds 2 --iters 8"
"$root/benchmarks/scaling_sweep.sh" "$build" --ranks "1 2" --rounds 2 --iters 8 --out "$out"
echo "{\"args\": \"$(echo "$sweep_args" | sed 's/"/\\"/g')\"}" > "$out/scaling_meta.json"

"$build/moe-plan" --projection > "$out/projection.md"

machine="$(lscpu | sed -n 's/^Model name: *//p' | head -n 1), $(nproc --all) cores, $(free -g | awk '/Mem:/ {print $2}') GiB"
printf '{"date": "%s", "machine": "%s", "load_start": "%s", "load_end": "%s"}\n' \
  "$(date -u +%Y-%m-%d)" "$machine" "$load_start" "$(load)" > "$out/report_meta.json"
/usr/bin/python3 "$root/benchmarks/scaling_readme.py" --perf "$out" --readme "$root/README.md"
