#!/usr/bin/python3
"""N ranks against one rank, end to end through the real moe-train binary (DESIGN.md, Parallel
layout): the same tiny dropless model trained on the same data for the same global batch and
the same number of micro-steps per iteration must give the same per-iteration lm_loss (and
load_balancing_loss, z_loss, grad_norm) and the same final exported weights on every layout:
1 rank, ep2, dp2, tp2, tp2 x dp2 x ep2 (4 ranks) and ep4 (4 ranks).

Usage: layout_check.py MOE_TRAIN MPIEXEC NUMPROC_FLAG [MPIEXEC_PREFLAGS...]
       [--postflags MPIEXEC_POSTFLAGS...]

The 1-rank run starts the binary directly (a singleton MPI start); the others go through
`MPIEXEC NUMPROC_FLAG N PREFLAGS... MOE_TRAIN ARGS... POSTFLAGS...`. Exits 1 on any mismatch,
printing the worst differences of every layout; 2 on bad usage.

Tolerance: 1e-4 relative. Losses relative to their value; each weight tensor relative to its
largest reference magnitude. The key bias (rows [C, 2C) of every c_attn.bias) has no gradient
in exact arithmetic (softmax ignores the constant q.b_k added to every score of a query): its
gradient is rounding noise that AdamW turns into steps of up to lr, so its value is not a
function of the layout and is only checked to stay within the sum of the learning rates.
"""

import json
import math
import os
import random
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np

TOLERANCE = 1e-4
ITERS = 4
GLOBAL_BATCH = 8  # windows per iteration; one micro-step per iteration on every layout
SEQ = 16
HIDDEN = 32

# (name, ranks, tp, ep); dp = ranks / tp, micro-batch = GLOBAL_BATCH / dp.
LAYOUTS = [
    ("1 rank", 1, 1, 1),
    ("ep2", 2, 1, 2),
    ("dp2", 2, 1, 1),
    ("tp2", 2, 2, 1),
    ("tp2 x dp2 x ep2", 4, 2, 2),
    ("ep4", 4, 1, 4),
]


def write_text(path, size):
    """Text-like bytes: sentences of a small vocabulary from a fixed generator."""
    words = ("the expert router token sends a layer of switch model learns to balance load "
             "across ranks and gates each choice is kept when capacity").split()
    rng = random.Random(2024)
    parts = []
    total = 0
    while total < size:
        n = rng.randint(4, 12)
        sentence = " ".join(rng.choice(words) for _ in range(n))
        sentence = sentence[0].upper() + sentence[1:] + ". "
        if rng.randint(0, 4) == 0:
            sentence += "\n"
        parts.append(sentence)
        total += len(sentence)
    with open(path, "wb") as f:
        f.write("".join(parts).encode()[:size])


def read_safetensors(path):
    """{name: float32 array of its shape}, and the metadata."""
    with open(path, "rb") as f:
        blob = f.read()
    (header_len,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + header_len])
    data = blob[8 + header_len:]
    metadata = header.pop("__metadata__", {})
    tensors = {}
    for name, info in header.items():
        if info["dtype"] != "F32":
            raise ValueError(f"{path}: {name} has dtype {info['dtype']}, expected F32")
        begin, end = info["data_offsets"]
        array = np.frombuffer(data[begin:end], dtype="<f4")
        tensors[name] = array.reshape(info["shape"]) if info["shape"] else array.reshape(())
    return tensors, metadata


def read_metrics(path):
    """The training lines of a metrics JSONL, by iteration."""
    lines = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            obj = json.loads(line)
            if "lm_loss" in obj:
                lines[obj["iteration"]] = obj
    return lines


def train_args(data, workdir, tag, tp, ep, micro):
    return [
        "--num-layers", "2", "--hidden-size", str(HIDDEN), "--num-attention-heads", "4",
        "--ffn-hidden-size", "64", "--num-experts", "4", "--moe-layer-freq", "2",
        "--moe-router-topk", "1", "--seq-length", str(SEQ), "--max-position-embeddings", str(SEQ),
        "--moe-expert-capacity-factor", "0", "--moe-aux-loss-coeff", "0.01",
        "--moe-z-loss-coeff", "0.001", "--seed", "1234",
        "--micro-batch-size", str(micro), "--global-batch-size", str(GLOBAL_BATCH),
        "--train-iters", str(ITERS), "--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "1",
        "--lr-decay-style", "cosine",
        "--tensor-model-parallel-size", str(tp), "--expert-model-parallel-size", str(ep),
        "--data-path", data, "--data-format", "bytes", "--data-order", "sequential",
        "--valid-fraction", "0", "--log-interval", "1", "--threads", "1",
        "--metrics-file", os.path.join(workdir, tag + ".jsonl"),
        "--export-safetensors", os.path.join(workdir, tag + ".safetensors"),
    ]


def relative(got, want, scale=None):
    s = abs(want) if scale is None else scale
    s = max(s, 1e-30)
    d = abs(got - want) / s
    return math.inf if math.isnan(d) else d


def compare(name, run, ref, lr_sum):
    """The list of failure lines for one layout; prints its worst differences."""
    failures = []
    worst = {}

    def note(what, diff, where):
        if what not in worst or diff > worst[what][0]:
            worst[what] = (diff, where)

    # Per-iteration losses.
    for it in range(1, ITERS + 1):
        if it not in run["metrics"]:
            failures.append(f"{name}: no metrics line for iteration {it}")
            continue
        got, want = run["metrics"][it], ref["metrics"][it]
        for key in ("lm_loss", "load_balancing_loss", "z_loss", "grad_norm"):
            d = relative(got[key], want[key])
            note(key, d, f"iteration {it}: {got[key]!r} vs {want[key]!r}")
            if not d <= TOLERANCE:
                failures.append(f"{name}: {key} iteration {it}: got {got[key]!r}, want "
                                f"{want[key]!r} (relative {d:.3e})")

    # Final weights.
    got_t, want_t = run["tensors"], ref["tensors"]
    if set(got_t) != set(want_t):
        failures.append(f"{name}: tensor names differ: missing {sorted(set(want_t) - set(got_t))}"
                        f", extra {sorted(set(got_t) - set(want_t))}")
    for tname in sorted(set(got_t) & set(want_t)):
        g, w = got_t[tname].astype(np.float64), want_t[tname].astype(np.float64)
        if g.shape != w.shape:
            failures.append(f"{name}: {tname} shape {list(g.shape)} vs {list(w.shape)}")
            continue
        parts = [(tname, g.ravel(), w.ravel())]
        if tname.endswith(".attn.c_attn.bias") and g.size == 3 * HIDDEN:
            C = HIDDEN
            parts = [(tname + " (q)", g[:C], w[:C]), (tname + " (v)", g[2 * C:], w[2 * C:])]
            key = max(np.max(np.abs(g[C:2 * C])), np.max(np.abs(w[C:2 * C]))) / lr_sum
            note("key bias |value|/sum(lr)", float(key), tname)
            if not key <= 1.0:
                failures.append(f"{name}: {tname} key bias reaches {key:.3e} x sum(lr)")
        for label, gp, wp in parts:
            scale = float(np.max(np.abs(wp))) if wp.size else 0.0
            if scale == 0.0:
                scale = 1.0
            diff = np.abs(gp - wp) / scale
            diff[np.isnan(diff)] = math.inf
            i = int(np.argmax(diff)) if diff.size else 0
            d = float(diff[i]) if diff.size else 0.0
            note("weights", d, f"{label}[{i}]: {gp[i]!r} vs {wp[i]!r}" if diff.size else label)
            if not d <= TOLERANCE:
                failures.append(f"{name}: weight {label}[{i}]: got {gp[i]!r}, want {wp[i]!r} "
                                f"(relative to the tensor's scale {d:.3e}; "
                                f"{int(np.sum(diff > TOLERANCE))} of {diff.size} elements off)")
    print(f"  {name}: worst relative differences against 1 rank:")
    for what in ("lm_loss", "load_balancing_loss", "z_loss", "grad_norm", "weights",
                 "key bias |value|/sum(lr)"):
        if what in worst:
            d, where = worst[what]
            print(f"    {what:26s} {d:.3e}  ({where})")
    return failures


def main(argv):
    if len(argv) < 4:
        print(__doc__, file=sys.stderr)
        return 2
    moe_train, mpiexec, np_flag = argv[1], argv[2], argv[3]
    rest = argv[4:]
    if "--postflags" in rest:
        i = rest.index("--postflags")
        preflags, postflags = rest[:i], rest[i + 1:]
    else:
        preflags, postflags = rest, []
    preflags = [f for f in preflags if f]
    postflags = [f for f in postflags if f]
    env = dict(os.environ, OMP_NUM_THREADS="1")

    with tempfile.TemporaryDirectory(prefix="moe_layout_check_") as workdir:
        data = os.path.join(workdir, "text.txt")
        write_text(data, 6000)
        runs = {}
        failures = []
        for name, ranks, tp, ep in LAYOUTS:
            dp = ranks // tp
            micro = GLOBAL_BATCH // dp
            tag = "run_" + "".join(c if c.isalnum() else "_" for c in name)
            args = [moe_train] + train_args(data, workdir, tag, tp, ep, micro)
            if ranks > 1:
                args = [mpiexec, np_flag, str(ranks)] + preflags + args + postflags
            start = time.time()
            proc = subprocess.run(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, timeout=300)
            seconds = time.time() - start
            print(f"{name}: {ranks} rank(s), tp {tp} dp {dp} ep {ep}, micro-batch {micro}: "
                  f"exit {proc.returncode}, {seconds:.1f} s")
            if proc.returncode != 0:
                print("  $ " + " ".join(args))
                print("  " + proc.stdout.strip().replace("\n", "\n  "))
                failures.append(f"{name}: moe-train exited {proc.returncode}")
                continue
            try:
                metrics = read_metrics(os.path.join(workdir, tag + ".jsonl"))
                tensors, _ = read_safetensors(os.path.join(workdir, tag + ".safetensors"))
            except (OSError, ValueError, KeyError) as e:
                failures.append(f"{name}: cannot read its outputs: {e}")
                continue
            runs[name] = {"metrics": metrics, "tensors": tensors}
            for it in sorted(metrics):
                m = metrics[it]
                print(f"  iter {it}  lm {m['lm_loss']:.7f}  lb {m['load_balancing_loss']:.7f}  "
                      f"z {m['z_loss']:.7f}  gnorm {m['grad_norm']:.6f}")

        reference = runs.get(LAYOUTS[0][0])
        if reference is None:
            failures.append("the 1-rank reference run failed: nothing to compare against")
        else:
            missing = [it for it in range(1, ITERS + 1) if it not in reference["metrics"]]
            if missing:
                failures.append(f"the 1-rank run has no metrics for iterations {missing}")
            else:
                lr_sum = sum(reference["metrics"][it]["lr"] for it in range(1, ITERS + 1))
                for name, *_ in LAYOUTS[1:]:
                    if name in runs:
                        failures += compare(name, runs[name], reference, lr_sum)

    if failures:
        print(f"\nFAILED: {len(failures)} mismatch(es), tolerance {TOLERANCE:g}:")
        for line in failures[:50]:
            print("  " + line)
        return 1
    print(f"\nOK: every layout agrees with 1 rank within {TOLERANCE:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
