#!/usr/bin/env bash
# Strong and weak scaling of moe-train over MPI ranks (expert-parallel: ep = dp = ranks), one
# OpenMP thread per rank, with CSV results and gnuplot PNGs drawn from that CSV:
#
#   strong   the global batch is fixed (--batch-per-rank x the largest rank count)
#   weak     the global batch grows with the ranks (--batch-per-rank sequences per rank)
#
# Every (mode, ranks) run repeats for --rounds rounds, the runs of one round in turn, so each
# layout sees the same load from other jobs; the tables are medians over rounds and timed
# iterations (the first two iterations of each run warm up).
#
# usage: benchmarks/scaling_sweep.sh [BUILD_DIR] [--ranks "1 2"] [--rounds 2] [--iters 10]
#          [--config FILE] [--batch-per-rank 16] [--data-path FILE] [--out DIR]
#          [--mpirun "mpirun --oversubscribe --bind-to none"] [--metrics FILE] [--plot-only]
# writes DIR/scaling.csv (one row per mode and rank count), DIR/scaling_runs.csv (every run),
# DIR/expert_load.csv, and DIR/scaling_throughput.png, scaling_breakdown.png,
# expert_load_heatmap.png. The heatmap is drawn from --metrics FILE when given, else from the
# metrics of the largest strong-scaling run. Default DIR: docs/perf. --plot-only redraws the
# PNGs from the CSVs already in DIR.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=$root/build
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then build=$1; shift; fi
ranks_list="1 2" rounds=2 iters=10 config=$root/configs/switch-small.ini per_rank=16
data=$root/../shared/data/tinyshakespeare.txt out=$root/docs/perf metrics=""
mpirun_cmd="mpirun --oversubscribe --bind-to none" plot_only=0
while [ $# -gt 0 ]; do
  case $1 in
    --ranks) ranks_list=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --iters) iters=$2; shift 2 ;;
    --config) config=$2; shift 2 ;;
    --batch-per-rank) per_rank=$2; shift 2 ;;
    --data-path) data=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --mpirun) mpirun_cmd=$2; shift 2 ;;
    --metrics) metrics=$2; shift 2 ;;
    --plot-only) plot_only=1; shift ;;
    *) echo "scaling_sweep: unknown option $1" >&2; exit 2 ;;
  esac
done
[ "$plot_only" = 1 ] || [ -x "$build/moe-train" ] || { echo "scaling_sweep: $build/moe-train is not built" >&2; exit 2; }
command -v gnuplot > /dev/null || { echo "scaling_sweep: gnuplot not found (scripts/setup.sh installs it)" >&2; exit 1; }
[ "$iters" -ge 3 ] || { echo "scaling_sweep: --iters must be at least 3 (two warm up)" >&2; exit 2; }
max_ranks=0
for n in $ranks_list; do
  [[ $n =~ ^[1-9][0-9]*$ ]] || { echo "scaling_sweep: bad rank count '$n'" >&2; exit 2; }
  [ "$n" -gt "$max_ranks" ] && max_ranks=$n
done
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [ ! -f "$data" ]; then
  head -c 2000000 /dev/urandom > "$work/random.bin"
  data=$work/random.bin
fi
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
# Open MPI's CMA single copy stalls for milliseconds here (bench_alltoall shows it); plain
# shared-memory copies are steady. Set the variable to override.
export OMPI_MCA_btl_vader_single_copy_mechanism=${OMPI_MCA_btl_vader_single_copy_mechanism:-none}
# A rank waiting in a collective yields its core: other jobs share these cores, and a spinning
# rank would take the time slice its peer needs to arrive.
export OMPI_MCA_mpi_yield_when_idle=${OMPI_MCA_mpi_yield_when_idle:-1}
common=(--config "$config" --data-path "$data" --micro-batch-size "$per_rank" --train-iters "$iters"
        --threads 1 --valid-fraction 0 --log-interval 1000 --data-order sequential)
if [ "$plot_only" = 0 ]; then
for round in $(seq "$rounds"); do
  for mode in strong weak; do
    for n in $ranks_list; do
      if [ "$mode" = strong ]; then batch=$((per_rank * max_ranks)); else batch=$((per_rank * n)); fi
      metrics_file=$work/${mode}_${n}_${round}.jsonl
      args=("${common[@]}" --global-batch-size "$batch" --expert-model-parallel-size "$n"
            --metrics-file "$metrics_file")
      echo "scaling_sweep: round $round, $mode, $n rank(s), global batch $batch" >&2
      if [ "$n" -eq 1 ]; then
        "$build/moe-train" "${args[@]}" > /dev/null
      else
        $mpirun_cmd -np "$n" "$build/moe-train" "${args[@]}" > /dev/null
      fi
    done
  done
done
heatmap_source=${metrics:-$work/strong_${max_ranks}_${rounds}.jsonl}
/usr/bin/python3 - "$work" "$rounds" "$out" "$ranks_list" "$per_rank" "$max_ranks" "$heatmap_source" <<'PY'
import csv, json, statistics, sys
work, rounds, out, ranks_list, per_rank, max_ranks, heat = sys.argv[1:8]
rounds, per_rank, max_ranks = int(rounds), int(per_rank), int(max_ranks)
ranks = [int(n) for n in ranks_list.split()]
phases = ["router", "permute", "all_to_all", "expert_gemm", "combine", "grad_allreduce", "rest"]
runs, summary = [], []
for mode in ("strong", "weak"):
    per_ranks = {}
    for n in ranks:
        rates, steps, parts = [], [], {p: [] for p in phases}
        for r in range(1, rounds + 1):
            lines = [json.loads(l) for l in open(f"{work}/{mode}_{n}_{r}.jsonl")]
            lines = [l for l in lines if "tokens_per_sec" in l][2:]
            run_rates = [l["tokens_per_sec"] for l in lines]
            runs.append([mode, n, r, statistics.median(run_rates),
                         statistics.median(l["ms_per_iter"] for l in lines)])
            rates += run_rates
            steps += [l["ms_per_iter"] for l in lines]
            for l in lines:
                for p in phases:
                    parts[p].append(l["time_breakdown_ms"].get(p, 0.0))
        per_ranks[n] = (statistics.median(rates), statistics.median(steps),
                        [statistics.median(parts[p]) for p in phases], len(rates))
    base = per_ranks[min(ranks)]
    for n in ranks:
        rate, step, parts, samples = per_ranks[n]
        batch = per_rank * (max_ranks if mode == "strong" else n)
        # Efficiency: tokens/s per rank relative to the smallest run's (strong and weak alike).
        eff = (rate / n) / (base[0] / min(ranks))
        summary.append([mode, n, batch, round(rate, 1), round(eff, 4), round(step, 2)] +
                       [round(x, 2) for x in parts] + [samples])
with open(f"{out}/scaling.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["mode", "ranks", "global_batch", "tokens_per_sec", "efficiency", "ms_per_iter"]
               + phases + ["samples"])
    w.writerows(summary)
with open(f"{out}/scaling_runs.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["mode", "ranks", "round", "tokens_per_sec", "ms_per_iter"])
    w.writerows(runs)
# Expert load: tokens routed to each expert / the mean of its layer, per iteration; row y of
# the heatmap is layer * E + expert.
with open(f"{out}/expert_load.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["iteration", "row", "layer", "expert", "load_over_mean"])
    for line in open(heat):
        m = json.loads(line)
        for layer, load in enumerate(m.get("expert_load") or []):
            mean = sum(load) / len(load) if sum(load) > 0 else 1.0
            for e, x in enumerate(load):
                w.writerow([m["iteration"], layer * len(load) + e, layer, e, round(x / mean, 4)])
for row in summary:
    print(f"{row[0]:<7}{row[1]:>4} ranks  batch {row[2]:>4}  {row[3]:>9.0f} tokens/s  "
          f"efficiency {row[4]:.3f}  {row[5]:.1f} ms/iter")
PY
fi
experts=$(awk -F, 'NR > 1 && $4 > max { max = $4 } END { print max + 1 }' "$out/expert_load.csv")
# One gnuplot program per figure; every number comes from the CSVs written above.
gnuplot <<GP
set datafile separator ","
set terminal pngcairo size 900,520 font ",11"
set key top left
set grid
set output "$out/scaling_throughput.png"
set title "moe-train scaling (expert-parallel ranks, 1 thread each): tokens/s and efficiency"
set xlabel "MPI ranks"; set ylabel "tokens/s (median)"; set y2label "efficiency"
set yrange [0:*]
set y2range [0:1.2]; set y2tics; set ytics nomirror
set logscale x 2; set xtics 2; set offsets graph 0.05, graph 0.05, 0, 0
plot "$out/scaling.csv" using (strcol(1) eq "strong" ? \$2 : 1/0):4 with linespoints lw 2 pt 7 title "strong: tokens/s", \
     "" using (strcol(1) eq "weak" ? \$2 : 1/0):4 with linespoints lw 2 pt 5 title "weak: tokens/s", \
     "" using (strcol(1) eq "strong" ? \$2 : 1/0):5 axes x1y2 with linespoints dt 2 lw 2 pt 6 title "strong: efficiency", \
     "" using (strcol(1) eq "weak" ? \$2 : 1/0):5 axes x1y2 with linespoints dt 2 lw 2 pt 4 title "weak: efficiency"
unset logscale x; unset y2tics; unset y2label; set ytics mirror; set offsets 0, 0, 0, 0
set autoscale y
set output "$out/scaling_breakdown.png"
set title "time per iteration by phase (median ms; rest: attention, dense layers, optimizer...)" font ",10"
set style data histograms
set style histogram rowstacked
set style fill solid 0.85 border -1
set boxwidth 0.7
set key outside right top
set xlabel ""; set ylabel "ms per iteration"; unset xtics; set xtics rotate by -30 nomirror
plot "$out/scaling.csv" every ::1 using 7:xtic(sprintf("%s %d", strcol(1), \$2)) title "router", \
     "" every ::1 using 8 title "permute", "" every ::1 using 9 title "all-to-all", \
     "" every ::1 using 10 title "expert GEMM", "" every ::1 using 11 title "combine", \
     "" every ::1 using 12 title "gradient all-reduce", "" every ::1 using 13 title "rest"
reset
set datafile separator ","
set terminal pngcairo size 900,520 font ",11"
set output "$out/expert_load_heatmap.png"
set title "tokens per expert / layer mean over iterations (row = Switch layer x $experts + expert)"
set xlabel "iteration"; set ylabel "Switch layer x expert"
set cblabel "load / mean"
set palette defined (0 "white", 1 "yellow", 2 "red", 4 "black")
set cbrange [0:3]
set autoscale fix
set ytics 1
plot "$out/expert_load.csv" using 1:2:5 every ::1 with image notitle
GP
echo "scaling_sweep: wrote $out/scaling.csv, $out/scaling_runs.csv, $out/expert_load.csv and" \
     "$out/scaling_throughput.png, $out/scaling_breakdown.png, $out/expert_load_heatmap.png"
