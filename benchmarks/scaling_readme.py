#!/usr/bin/env python3
"""Writes the measured part of README.md's "Performance" section from the files that
benchmarks/scaling_report.sh leaves in docs/perf/, between the markers
<!-- perf:begin --> and <!-- perf:end -->. Nothing in that block is typed by hand: rerun
scaling_report.sh (or this script alone, to redraw the text from the same files).

usage: benchmarks/scaling_readme.py [--perf docs/perf] [--readme README.md]
"""
import argparse
import csv
import json
import os
import sys

BEGIN, END = "<!-- perf:begin -->", "<!-- perf:end -->"


def load(path):
    with open(path) as f:
        return json.load(f)


def alltoall_section(perf, lines):
    plain_path, moe_path = f"{perf}/alltoall.json", f"{perf}/alltoall_moe.json"
    if os.path.exists(plain_path):
        a = load(plain_path)
        lines += [f"**All-to-all, {a['nranks']} ranks** (`mpirun -np 2 build/benchmarks/bench_alltoall "
                  f"{a['command_args']}`): `Communicator::alltoallv` against a bare `MPI_Alltoall` of the "
                  f"same buffers, alternating in one run; medians of {a['iters']} iterations of the "
                  f"slowest rank; `#wrong` from seeded data.", "",
                  "| size per rank (B) | ours time (us) | ours algbw (GB/s) | ours busbw | bare MPI time (us) "
                  "| bare algbw | ratio (algbw) | #wrong |", "|---|---|---|---|---|---|---|---|"]
        for r in a["rows"]:
            o, b = r["ours"], r["bare_mpi_alltoall"]
            lines.append(f"| {o['size']} | {o['time_us']:.1f} | {o['algbw']:.2f} | {o['busbw']:.2f} | "
                         f"{b['time_us']:.1f} | {b['algbw']:.2f} | **{r['ratio_algbw']:.3f}** | "
                         f"{o['wrong'] + b['wrong']} |")
        lines += ["", f"Avg bus bandwidth {a['avg_busbw']:.2f} GB/s; median ratio {a['median_ratio_algbw']:.3f}.", ""]
    if os.path.exists(moe_path):
        m = load(moe_path)
        lines += [f"**MoE dispatch + combine, {m['nranks']} ranks** (`mpirun -np 2 build/benchmarks/bench_alltoall "
                  f"{m['command_args']}`): `ExpertDispatcher` dispatch + combine of routed tokens "
                  f"({m['hidden']} floats each, {m['experts']} experts) against two bare `MPI_Alltoallv` "
                  "calls (there and back) with the same counts; `plan` (the counts' exchange before them) is timed "
                  "alone. size = mean bytes dispatched per rank.", "",
                  "| routing | top-k | capacity | size (B) | dropped | busiest rank / mean | ours (us) | bare (us) "
                  "| ratio (algbw) | plan (us) |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in m["rows"]:
            cf = "dropless" if r["capacity_factor"] == 0 else f"cf {r['capacity_factor']:g}"
            lines.append(f"| {r['routing']} | {r['top_k']} | {cf} | {r['ours']['size']} | "
                         f"{r['dropped_fraction']:.3f} | {r['busiest_rank_over_mean']:.2f} | "
                         f"{r['ours']['time_us']:.0f} | {r['bare_mpi_alltoallv']['time_us']:.0f} | "
                         f"**{r['ratio_algbw']:.3f}** | {r.get('plan_us', float('nan')):.0f} |")
        lines += ["", f"Median ratio {m['median_ratio_algbw']:.3f}. The dispatcher moves rows "
                  "straight from their place in the sender's buffer to theirs in the receiver's "
                  "(one `MPI_Alltoallv` round per local expert with explicit displacements), so "
                  "what it adds to the bare exchange is the extra rounds' latency, which shows at "
                  "the small sizes.", ""]


def moe_layer_section(perf, lines):
    files = sorted(f for f in os.listdir(perf) if f.startswith("moe_layer_ep") and f.endswith(".json"))
    if not files:
        return
    lines += ["**One Switch layer, forward + backward** (`[mpirun -np EP] build/benchmarks/bench_moe_layer "
              f"{load(f'{perf}/{files[0]}')['command_args']}`), ms, medians of the slowest rank:", "",
              "| ep | E | k | capacity | fwd+bwd | router | permute | all-to-all | expert GEMM | combine | dropped |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in files:
        j = load(f"{perf}/{name}")
        for r in j["rows"]:
            p = r["phases_ms"]
            cf = "dropless" if r["capacity_factor"] == 0 else f"cf {r['capacity_factor']:g}"
            lines.append(f"| {r['ep']} | {r['experts']} | {r['top_k']} | {cf} | {r['fwd_bwd_ms']:.1f} | "
                         f"{p['router']:.2f} | {p['permute']:.2f} | {p['all_to_all']:.1f} | "
                         f"{p['expert_gemm']:.1f} | {p['combine']:.2f} | {r['dropped_fraction']:.3f} |")
    lines.append("")


def scaling_section(perf, lines):
    path = f"{perf}/scaling.csv"
    if not os.path.exists(path):
        return
    meta = load(f"{perf}/scaling_meta.json") if os.path.exists(f"{perf}/scaling_meta.json") else {}
    rows = list(csv.DictReader(open(path)))
    lines += [f"**Strong and weak scaling** (`benchmarks/scaling_sweep.sh build {meta.get('args', '')}`): "
              "switch-small, expert-parallel ranks (ep = dp = ranks), one thread each; strong keeps the global "
              "batch, weak grows it with the ranks; efficiency = tokens/s per rank / that of 1 rank.", "",
              "| mode | ranks | global batch | tokens/s | efficiency | ms/iter | router | permute | all-to-all "
              "| expert GEMM | combine | grad all-reduce | rest |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['ranks']} | {r['global_batch']} | {float(r['tokens_per_sec']):.0f} | "
                     f"**{float(r['efficiency']):.3f}** | {float(r['ms_per_iter']):.1f} | {r['router']} | "
                     f"{r['permute']} | {r['all_to_all']} | {r['expert_gemm']} | {r['combine']} | "
                     f"{r['grad_allreduce']} | {r['rest']} |")
    lines += ["", "![tokens/s and efficiency against ranks](docs/perf/scaling_throughput.png)",
              "![time per iteration by phase](docs/perf/scaling_breakdown.png)",
              "![expert load, layer x expert over iterations](docs/perf/expert_load_heatmap.png)", "",
              "The plots are drawn by the same script from `docs/perf/scaling.csv` and "
              "`docs/perf/expert_load.csv` (`--plot-only` redraws them).", ""]


def step_memory_section(perf, lines):
    path = f"{perf}/step.json"
    if not os.path.exists(path):
        return
    s = load(path)
    mem = s["memory"]
    mib = 1048576
    lines += [f"**Peak memory of one rank** (`build/benchmarks/bench_step {s['command_args']}`): "
              f"{mem['peak_rss_bytes'] / mib:.0f} MiB peak resident, {mem['rss_before_trainer_bytes'] / mib:.0f} MiB "
              f"before the trainer existed; moe-plan's estimate {mem['estimate_bytes'] / mib:.0f} MiB (weights "
              f"{mem['estimate_weights_bytes'] / mib:.1f}, gradients {mem['estimate_grads_bytes'] / mib:.1f}, AdamW "
              f"{mem['estimate_optimizer_bytes'] / mib:.1f}, activations {mem['estimate_activations_bytes'] / mib:.1f}); "
              f"(peak - before) / estimate = **{mem['ratio']:.2f}** (the data tokens and the benchmark's own sgemm "
              f"buffers are not in the estimate). Same run: {s['tokens_per_sec']:.0f} tokens/s, MFU {s['mfu']:.3f}.", ""]


def plan_section(perf, lines):
    path = f"{perf}/plan_check.json"
    if os.path.exists(path):
        p = load(path)
        lines += [f"**moe-plan against measured steps** (`benchmarks/plan_check.sh build {p.get('command_args', '')}`): "
                  "switch-small, global batch 32, 1 thread per rank; the model is calibrated from "
                  "`plan_calibrate` (GEMM, attention and memory rates of the model's own kernels) and "
                  "`bench_alltoall` measured in the same rounds as the training runs "
                  "(`docs/perf/calibration.json`).", "",
                  "| layout | measured ms/iter | predicted | error | expert GEMM meas. / pred. | all-to-all meas. / pred. |",
                  "|---|---|---|---|---|---|"]
        for r in p["rows"]:
            m, q = r["measured_phases_ms"], r["predicted_phases_ms"]
            lines.append(f"| {r['layout']} | {r['measured_ms']:.1f} | {r['predicted_ms']:.1f} | "
                         f"**{100 * r['error']:+.1f}%** | {m.get('expert_gemm', 0):.1f} / {q['expert_gemm']:.1f} | "
                         f"{m.get('all_to_all', 0):.1f} / {q['all_to_all']:.1f} |")
        lines += ["", f"Tolerance {100 * p['tolerance']:.0f}%; medians of {p['rounds']} rounds.", ""]
    proj = f"{perf}/projection.md"
    if os.path.exists(proj):
        lines += ["**Projection** (`build/moe-plan --projection`, every assumption printed by the tool):", "",
                  "```"]
        text = open(proj).read().rstrip("\n").split("\n")
        # The tables go in as tables; the assumptions and the model lines as text.
        in_table = False
        for line in text:
            if line.startswith("|") and not in_table:
                lines += ["```", ""]
                in_table = True
            elif not line.startswith("|") and in_table:
                lines += ["", "```"]
                in_table = False
            lines.append(line)
        lines += ["" if in_table else "```", ""]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument("--perf", default=f"{root}/docs/perf")
    parser.add_argument("--readme", default=f"{root}/README.md")
    args = parser.parse_args()
    lines = [BEGIN, "", "*Generated by `benchmarks/scaling_readme.py` from `docs/perf/` "
             "(measurements: `benchmarks/scaling_report.sh build`).*", ""]
    meta_path = f"{args.perf}/report_meta.json"
    if os.path.exists(meta_path):
        meta = load(meta_path)
        lines += [f"Measured {meta['date']} on {meta['machine']}; load average at the start "
                  f"{meta['load_start']}, at the end {meta['load_end']} (other jobs share this machine, "
                  "so every comparison alternates both sides in one run and reports medians).", ""]
    for section in (alltoall_section, moe_layer_section, scaling_section, step_memory_section, plan_section):
        section(args.perf, lines)
    lines.append(END)
    readme = open(args.readme).read()
    if BEGIN not in readme or END not in readme:
        sys.exit(f"scaling_readme: {args.readme} has no {BEGIN} ... {END} block")
    head, rest = readme.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    with open(args.readme, "w") as f:
        f.write(head + "\n".join(lines) + tail)
    print(f"scaling_readme: wrote the performance block of {args.readme}")


if __name__ == "__main__":
    main()
