#!/usr/bin/env python3
"""Turns the runs of benchmarks/quality/run.sh into CSV tables and gnuplot data files.

usage: analyze.py OUT FIGURES
  OUT      the run directory: protocol.json, valid.bin, routing.csv, runs/NAME/{metrics.jsonl,
           final.json, seconds}
  FIGURES  where the CSVs (tables, read by report.py) and .dat files (read by plot_*.gp) go

Definitions (also printed in RESULTS.md by report.py):
  final validation loss  moe-eval's mean cross-entropy over every held-out window (capacity 2.0)
  validation curve       the trainer's val_loss every eval_interval iterations on the first
                         eval_iters held-out batches (the same windows for every arm)
  steps to dense         the first iteration at which a run's validation curve reaches the dense
                         arm's final curve value (mean over dense seeds), interpolated linearly
                         between evaluations; speedup = dense iterations / that step
  spike                  an iteration after warmup whose lm_loss exceeds 1.2 x the median of the
                         previous 20 iterations' lm_loss (the same rule within warm-up, from
                         iteration 21, is reported apart as a warm-up spike)
  divergence             a run that failed, skipped an iteration (non-finite loss or gradient),
                         or ended with a final validation loss at or above the entropy of the
                         training bytes' unigram distribution (it learned less than byte counts)
  load max/mean          per iteration and Switch layer, the most loaded expert's tokens (before
                         capacity) over the mean; averaged over layers
"""
import csv
import json
import math
import os
import statistics
import sys
from collections import Counter

SPIKE_FACTOR = 1.2
SPIKE_WINDOW = 20


def mean(xs):
    return statistics.fmean(xs) if xs else float("nan")


def std(xs):
    return statistics.stdev(xs) if len(xs) > 1 else float("nan")


def median(xs):
    return statistics.median(xs) if xs else float("nan")


class Run:
    def __init__(self, out, name):
        self.name = name
        self.arm, _, seed = name.rpartition("_s")
        self.seed = int(seed)
        directory = os.path.join(out, "runs", name)
        self.final = json.load(open(os.path.join(directory, "final.json")))
        self.failed = bool(self.final.get("failed"))
        self.train = []  # metrics of each iteration
        self.valid = []  # (iteration, val_loss)
        path = os.path.join(directory, "metrics.jsonl")
        if os.path.exists(path):
            for line in open(path):
                m = json.loads(line)
                if "val_loss" in m:
                    self.valid.append((m["iteration"], m["val_loss"]))
                else:
                    self.train.append(m)
        seconds = os.path.join(directory, "seconds")
        self.seconds = float(open(seconds).read()) if os.path.exists(seconds) else float("nan")

    def final_val(self):
        return float("nan") if self.failed else self.final["loss"]

    def tokens_per_sec(self):
        # The median over iterations, the first five (warm-up of caches and allocations) left out.
        return median([m["tokens_per_sec"] for m in self.train[5:]])

    def skipped(self):
        return sum(1 for m in self.train if m.get("skipped")) + sum(
            1 for m in self.train if not math.isfinite(m["lm_loss"]))

    def spikes(self, first, last=None):
        """Iterations k (0-based index in [first, last)) whose loss is a spike."""
        losses = [m["lm_loss"] for m in self.train]
        found = []
        for k in range(max(first, SPIKE_WINDOW), len(losses) if last is None else last):
            if losses[k] > SPIKE_FACTOR * statistics.median(losses[k - SPIKE_WINDOW:k]):
                found.append(self.train[k]["iteration"])
        return found

    def steps_to(self, target):
        previous = None
        for iteration, loss in self.valid:
            if loss <= target:
                if previous is None:
                    return float(iteration)
                i0, l0 = previous
                return i0 + (iteration - i0) * (l0 - target) / (l0 - loss)
            previous = (iteration, loss)
        return None

    def load_max_over_mean(self):
        """Per iteration: mean over Switch layers of (most loaded expert / mean load)."""
        values = []
        for m in self.train:
            ratios = []
            for layer in m.get("expert_load") or []:
                total = sum(layer)
                if total > 0:
                    ratios.append(max(layer) / (total / len(layer)))
            values.append(mean(ratios) if ratios else float("nan"))
        return values

    def dropped(self):
        return mean([m["dropped_fraction"] for m in self.train])


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for row in rows:
            w.writerow([fmt(x) for x in row])


def fmt(x):
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        return f"{x:.6g}"
    return x


def unigram_entropy(path, protocol):
    data = open(path, "rb").read()
    # The training part only: everything before the held-out windows.
    T = protocol["seq_length"]
    n = (len(data) - 1) // T
    train = data[: (n - math.ceil(0.1 * n)) * T + 1]
    counts = Counter(train)
    total = len(train)
    return -sum(c / total * math.log(c / total) for c in counts.values())


def main():
    out, figures = sys.argv[1], sys.argv[2]
    os.makedirs(figures, exist_ok=True)
    protocol = json.load(open(os.path.join(out, "protocol.json")))
    warmup, iters = protocol["warmup"], protocol["train_iters"]
    runs = {}
    for name in sorted(os.listdir(os.path.join(out, "runs"))):
        if os.path.exists(os.path.join(out, "runs", name, "final.json")):
            runs[name] = Run(out, name)
    arms = {}
    for run in runs.values():
        arms.setdefault(run.arm, []).append(run)
    for group in arms.values():
        group.sort(key=lambda r: r.seed)
    seeds_main = [int(s) for s in protocol["seeds_main"].split()]
    main_runs = lambda arm: [r for r in arms.get(arm, []) if r.seed in seeds_main]
    entropy = unigram_entropy(protocol["data"], protocol)
    summary = {"unigram_entropy": entropy, "runs": len(runs),
               "train_seconds": sum(r.seconds for r in runs.values() if math.isfinite(r.seconds))}

    # ---- Study 1: dense against Switch E = 2, 4, 8, 16 at capacity 1.25.
    experts = [int(e) for e in protocol["experts_main"].split()]
    study1 = ["dense"] + [f"e{e}" for e in experts]
    dense = main_runs("dense")
    dense_curve_final = mean([r.valid[-1][1] for r in dense if r.valid and not r.failed])
    summary["dense_curve_final"] = dense_curve_final
    rows = []
    for arm in study1:
        group = main_runs(arm)
        finals = [r.final_val() for r in group if not r.failed]
        steps = [r.steps_to(dense_curve_final) for r in group if not r.failed]
        reached = [s for s in steps if s is not None]
        rows.append([arm, 0 if arm == "dense" else int(arm[1:]), len(group), len(finals),
                     mean(finals), std(finals), min(finals, default=float("nan")),
                     max(finals, default=float("nan")),
                     mean([r.valid[-1][1] for r in group if r.valid]), len(reached),
                     mean(reached), std(reached),
                     iters / mean(reached) if reached else float("nan"),
                     mean([r.tokens_per_sec() for r in group]),
                     mean([r.dropped() for r in group if not r.failed])])
    write_csv(os.path.join(figures, "study1_dense_vs_switch.csv"),
              ["arm", "experts", "runs", "finished", "final_val_mean", "final_val_std",
               "final_val_min", "final_val_max", "curve_final_mean", "seeds_reaching_dense",
               "steps_to_dense_mean", "steps_to_dense_std", "speedup_in_steps",
               "tokens_per_sec", "dropped_fraction"], rows)
    # Validation curves (mean over seeds) and training loss averaged over each evaluation window.
    steps = sorted({i for arm in study1 for r in main_runs(arm) for i, _ in r.valid})
    with open(os.path.join(figures, "study1_val_curves.dat"), "w") as f:
        f.write("iteration " + " ".join(study1) + "\n")
        for step in steps:
            values = []
            for arm in study1:
                at = [l for r in main_runs(arm) for i, l in r.valid if i == step]
                values.append(fmt(mean(at)) if at else "nan")
            f.write(f"{step} " + " ".join(values) + "\n")
    interval = protocol["eval_interval"]
    with open(os.path.join(figures, "study1_train_vs_val.dat"), "w") as f:
        f.write("iteration " + " ".join(f"{a}_train {a}_val" for a in study1) + "\n")
        for step in steps:
            values = []
            for arm in study1:
                train = [m["lm_loss"] for r in main_runs(arm) for m in r.train
                         if step - interval < m["iteration"] <= step]
                val = [l for r in main_runs(arm) for i, l in r.valid if i == step]
                values += [fmt(mean(train)), fmt(mean(val))]
            f.write(f"{step} " + " ".join(values) + "\n")

    # ---- Study 2: init scale 0.1 against 1.0 on E = 8.
    rows, per_run = [], []
    for arm, scale in (("e8", "0.1"), ("e8_init1", "1.0")):
        group = arms.get(arm, [])
        finals = [r.final_val() for r in group if not r.failed]
        diverged = [r for r in group if r.failed or r.skipped() > 0 or
                    not math.isfinite(r.final_val()) or r.final_val() >= entropy]
        spikes = [len(r.spikes(warmup)) for r in group]
        # The same rule inside warm-up (from iteration SPIKE_WINDOW + 1), reported apart.
        warmup_spikes = [len(r.spikes(0, warmup)) for r in group]
        rows.append([scale, len(group), mean(finals), std(finals),
                     min(finals, default=float("nan")), max(finals, default=float("nan")),
                     len(diverged), sum(1 for s in spikes if s > 0), sum(spikes),
                     sum(1 for s in warmup_spikes if s > 0), sum(warmup_spikes)])
        for r in group:
            per_run.append([scale, r.seed, r.final_val(), int(r.failed), r.skipped(),
                            len(r.spikes(warmup)), " ".join(map(str, r.spikes(warmup))),
                            " ".join(map(str, r.spikes(0, warmup)))])
    write_csv(os.path.join(figures, "study2_init_scale.csv"),
              ["init_scale", "runs", "final_val_mean", "final_val_std", "final_val_min",
               "final_val_max", "diverged", "runs_with_spikes", "spikes",
               "runs_with_warmup_spikes", "warmup_spikes"], rows)
    write_csv(os.path.join(figures, "study2_runs.csv"),
              ["init_scale", "seed", "final_val", "failed", "skipped_iterations", "spikes",
               "spike_iterations", "warmup_spike_iterations"], per_run)
    for arm, scale in (("e8", "0.1"), ("e8_init1", "1.0")):
        group = arms.get(arm, [])
        with open(os.path.join(figures, f"study2_train_init{scale}.dat"), "w") as f:
            f.write("iteration " + " ".join(f"seed{r.seed}" for r in group) + "\n")
            for k in range(iters):
                values = [fmt(r.train[k]["lm_loss"]) if k < len(r.train) else "nan"
                          for r in group]
                f.write(f"{k + 1} " + " ".join(values) + "\n")
    summary["study2_columns"] = len(arms.get("e8", [])), len(arms.get("e8_init1", []))

    # The warm-up rule over every arm: is a warm-up spike the router's or the schedule's?
    write_csv(os.path.join(figures, "warmup_spikes_by_arm.csv"),
              ["arm", "runs", "runs_with_warmup_spikes", "runs_with_spikes"],
              [[arm, len(group), sum(1 for r in group if r.spikes(0, warmup)),
                sum(1 for r in group if r.spikes(warmup))]
               for arm, group in sorted(arms.items())])

    # ---- Study 3: capacity factor.
    capacities = [("0.5", "e8_cf0.5"), ("1.0", "e8_cf1.0"), ("1.25", "e8"), ("2.0", "e8_cf2.0"),
                  ("dropless", "e8_cf0")]
    capacities = [(label, arm) for label, arm in capacities if main_runs(arm)]
    rows = []
    for label, arm in capacities:
        group = [r for r in main_runs(arm) if not r.failed]
        finals = [r.final_val() for r in group]
        rows.append([label, len(group), mean([r.dropped() for r in group]),
                     mean(finals), std(finals), mean([r.tokens_per_sec() for r in group]),
                     mean([r.seconds for r in group])])
    write_csv(os.path.join(figures, "study3_capacity.csv"),
              ["capacity_factor", "runs", "dropped_fraction", "final_val_mean", "final_val_std",
               "tokens_per_sec", "run_seconds"], rows)
    with open(os.path.join(figures, "study3_dropped.dat"), "w") as f:
        f.write("iteration " + " ".join(label for label, _ in capacities) + "\n")
        for start in range(0, iters, interval):
            values = []
            for _, arm in capacities:
                window = [m["dropped_fraction"] for r in main_runs(arm) for m in r.train
                          if start < m["iteration"] <= start + interval]
                values.append(fmt(mean(window)) if window else "nan")
            f.write(f"{start + interval} " + " ".join(values) + "\n")

    # ---- Study 4: load balancing on (0.01) and off (0).
    balance = [("0.01", "e8"), ("0", "e8_nolb")]
    balance = [(label, arm) for label, arm in balance if main_runs(arm)]
    rows = []
    tail = max(1, iters // 10)
    for label, arm in balance:
        group = [r for r in main_runs(arm) if not r.failed]
        ratios = [r.load_max_over_mean() for r in group]
        rows.append([label, len(group), mean([mean(x) for x in ratios]),
                     mean([mean(x[-tail:]) for x in ratios]),
                     mean([max(x) for x in ratios]), mean([r.dropped() for r in group]),
                     mean([r.final_val() for r in group]), std([r.final_val() for r in group])])
    write_csv(os.path.join(figures, "study4_load_balance.csv"),
              ["aux_loss_coeff", "runs", "load_max_over_mean_avg", "load_max_over_mean_last10pct",
               "load_max_over_mean_peak", "dropped_fraction", "final_val_mean",
               "final_val_std"], rows)
    with open(os.path.join(figures, "study4_max_over_mean.dat"), "w") as f:
        f.write("iteration " + " ".join(f"aux{label}" for label, _ in balance) + "\n")
        curves = [[r.load_max_over_mean() for r in main_runs(arm) if not r.failed]
                  for _, arm in balance]
        for start in range(0, iters, interval):
            values = [fmt(mean([v for x in c for v in x[start:start + interval]])) for c in curves]
            f.write(f"{start + interval} " + " ".join(values) + "\n")
    # Heatmaps: the first seed of each arm, load / mean per (layer, expert) per window.
    switch_layers = [l for l in range(protocol["num_layers"]) if l % 2 == 1]  # freq 2
    with open(os.path.join(figures, "study4_axes.gp"), "w") as f:
        f.write("set ytics (" + ", ".join(
            f'"layer {l} e{e}" {s * 8 + e}' for s, l in enumerate(switch_layers)
            for e in range(8)) + ") font \",8\"\n")
    for label, arm in balance:
        run = main_runs(arm)[0]
        with open(os.path.join(figures, f"study4_heatmap_aux{label}.dat"), "w") as f:
            for start in range(0, iters, interval):
                window = [m["expert_load"] for m in run.train
                          if start < m["iteration"] <= start + interval]
                if not window:
                    continue
                rows_out = 0
                for layer in range(len(window[0])):
                    E = len(window[0][layer])
                    load = [sum(w[layer][e] for w in window) for e in range(E)]
                    share = sum(load) / E
                    for e in range(E):
                        f.write(f"{start + interval / 2} {rows_out} {fmt(load[e] / share)}\n")
                        rows_out += 1
                f.write("\n")
    summary["heatmap_rows"] = "layer-major: row = layer_index * E + expert"

    # ---- Study 5: what experts learn (the first E = 8 model's routing of held-out text).
    routing = os.path.join(out, "routing.csv")
    if os.path.exists(routing):
        study5(routing, figures, summary)
    json.dump(summary, open(os.path.join(figures, "summary.json"), "w"), indent=1)


CATEGORIES = ["speaker name", "newline", "space", "upper case", "lower case", "punctuation",
              "other"]


def categorize(data):
    """A category per byte. A speaker name is a line that opens a speech: it follows a blank
    line (or the start) and ends with ':'; its bytes, colon included, are 'speaker name'."""
    cats = [None] * len(data)
    lines_start = 0
    previous_blank = True
    while lines_start < len(data):
        end = data.find(b"\n", lines_start)
        end = len(data) if end < 0 else end
        line = data[lines_start:end]
        if previous_blank and line.endswith(b":") and 0 < len(line) <= 40:
            for i in range(lines_start, end):
                cats[i] = "speaker name"
        previous_blank = len(line) == 0
        lines_start = end + 1
    for i, b in enumerate(data):
        if cats[i] is not None:
            continue
        c = chr(b)
        if c == "\n":
            cats[i] = "newline"
        elif c == " ":
            cats[i] = "space"
        elif "A" <= c <= "Z":
            cats[i] = "upper case"
        elif "a" <= c <= "z":
            cats[i] = "lower case"
        elif 33 <= b < 127 and not c.isalnum():
            cats[i] = "punctuation"
        else:
            cats[i] = "other"
    return cats


def study5(routing, figures, summary):
    rows = list(csv.reader(open(routing)))
    header, body = rows[0], rows[1:]
    layers = [h[len("layer"):-len("_expert")] for h in header if h.endswith("_expert")]
    tokens = bytes(int(r[1]) for r in body)
    cats = categorize(tokens)
    experts = 1 + max(int(r[2 + 2 * s]) for r in body for s in range(len(layers)))
    present = [c for c in CATEGORIES if c in cats]
    table = []
    for s, layer in enumerate(layers):
        counts = {c: [0] * experts for c in present}
        by_byte = [Counter() for _ in range(experts)]
        for r, c in zip(body, cats):
            e = int(r[2 + 2 * s])
            counts[c][e] += 1
            by_byte[e][int(r[1])] += 1
        with open(os.path.join(figures, f"study5_heatmap_layer{layer}.dat"), "w") as f:
            for y, c in enumerate(present):
                total = sum(counts[c])
                for e in range(experts):
                    f.write(f"{e} {y} {fmt(counts[c][e] / total)}\n")
                f.write("\n")
        for c in present:
            total = sum(counts[c])
            table.append([layer, c, total] + [counts[c][e] / total for e in range(experts)])
        # Each expert's most frequent bytes and how much of the expert they make up.
        top_rows = []
        for e in range(experts):
            total = sum(by_byte[e].values())
            top = by_byte[e].most_common(6)
            top_rows.append([layer, e, total, " ".join(
                f"{printable(b)}:{n / total:.0%}" for b, n in top)])
        write_csv(os.path.join(figures, f"study5_top_bytes_layer{layer}.csv"),
                  ["layer", "expert", "tokens", "top_bytes"], top_rows)
    # The heatmaps' category labels and layers, for plot_study5.gp.
    with open(os.path.join(figures, "study5_axes.gp"), "w") as f:
        f.write("set ytics (" + ", ".join(f'"{c}" {y}' for y, c in enumerate(present)) + ")\n")
        f.write(f'layers = "{" ".join(layers)}"\n')
        f.write(f"experts = {experts}\n")
    write_csv(os.path.join(figures, "study5_routing.csv"),
              ["layer", "category", "tokens"] + [f"expert{e}" for e in range(experts)], table)
    summary["study5_layers"] = layers
    summary["study5_categories"] = present
    summary["study5_tokens"] = len(body)


def printable(b):
    return {10: "\\n", 32: "␠", 44: "','"}.get(b, chr(b) if 33 <= b < 127 else f"0x{b:02x}")


if __name__ == "__main__":
    main()
