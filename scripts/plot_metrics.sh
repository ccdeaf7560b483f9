#!/usr/bin/env bash
# Plots a moe-train metrics file: loss.png (training and validation loss) and
# expert_load.png (tokens per expert over iterations, first Switch layer, relative to the mean).
# usage: scripts/plot_metrics.sh METRICS.jsonl OUT_DIR
set -euo pipefail
metrics=$1
out=${2:-$(dirname "$metrics")}
command -v gnuplot > /dev/null || { echo "plot_metrics: gnuplot not found (scripts/setup.sh installs it)" >&2; exit 1; }
/usr/bin/python3 - "$metrics" "$out" <<'PY'
import json, sys
metrics, out = sys.argv[1], sys.argv[2]
train, valid, load = [], [], []
for line in open(metrics):
    m = json.loads(line)
    if "val_loss" in m:
        valid.append((m["iteration"], m["val_loss"]))
    elif "lm_loss" in m:
        train.append((m["iteration"], m["lm_loss"]))
        if m.get("expert_load"):
            layer = m["expert_load"][0]
            mean = sum(layer) / len(layer) or 1.0
            load.append((m["iteration"], [x / mean for x in layer]))
with open(f"{out}/train.dat", "w") as f:
    f.writelines(f"{i} {v}\n" for i, v in train)
with open(f"{out}/valid.dat", "w") as f:
    f.writelines(f"{i} {v}\n" for i, v in valid)
with open(f"{out}/load.dat", "w") as f:
    for i, row in load:
        f.writelines(f"{i} {e} {x}\n" for e, x in enumerate(row))
        f.write("\n")
PY
gnuplot <<GP
set terminal pngcairo size 900,500
set output "$out/loss.png"
set title "moe-train: loss"
set xlabel "iteration"; set ylabel "cross-entropy (nats/token)"; set grid
plot "$out/train.dat" with lines lw 2 title "train lm_loss", \
     "$out/valid.dat" with linespoints lw 2 pt 7 title "validation"
set output "$out/expert_load.png"
set title "tokens per expert / mean, first Switch layer"
set xlabel "iteration"; set ylabel "expert"; unset grid
set cblabel "load / mean"; set palette defined (0 "white", 1 "yellow", 2 "red", 4 "black")
set cbrange [0:4]
set autoscale fix
plot "$out/load.dat" using 1:2:3 with image notitle
GP
echo "plots: $out/loss.png $out/expert_load.png"
