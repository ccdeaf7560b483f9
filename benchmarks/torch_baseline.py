#!/usr/bin/python3
"""PyTorch eager float32 baseline for training speed (tokens/s), for comparison with moe-train.

Trains the configs/switch-small shape (4 layers, hidden 256, 4 heads, ffn 1024, 8 experts,
moe_layer_freq 2, top-1, capacity factor 1.25, seq 128, micro-batch 16 = global batch,
vocab 256) with the model of tests/torch_ref/moe_ref.py run in float32: AdamW (wd on >= 2-D
tensors), clip-grad 1.0, aux 0.01, z 0.001. Data: random bytes, or --data-path read as the
trainer would (sequential windows). --warmup iterations (default 2) are not timed; prints one
JSON line {"tokens_per_sec": median, "ms_per_iter": median, "threads": n, ...}.
--linear onednn (default) runs every linear as a oneDNN 1x1 convolution because this
torch's BLAS is the netlib reference one; --linear matmul is plain eager x @ W^T.

    /usr/bin/python3 benchmarks/torch_baseline.py [--threads 2] [--iters 10] [--data-path FILE]
"""
import argparse
import ctypes
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "torch_ref"))
import moe_ref as R  # noqa: E402


def linear_onednn(x, w, b=None):
    """y = x W^T + b as a 1x1 convolution, which this torch runs on oneDNN.

    Debian's python3-torch links the netlib reference BLAS (BLAS_INFO=generic), whose sgemm
    runs at ~1 GFLOP/s; its oneDNN convolutions are ~10x faster. The math is the same, so
    --linear onednn (default) gives the fairer baseline and --linear matmul the plain one.
    """
    lead, c_in = x.shape[:-1], x.shape[-1]
    x4 = x.reshape(-1, c_in, 1, 1)                                  # (N, C_in, 1, 1)
    y = F.conv2d(x4, w[:, :, None, None], b)                        # (N, C_out, 1, 1)
    return y.reshape(*lead, w.shape[0])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10, help="timed iterations")
    ap.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    ap.add_argument("--data-path", default="", help="default: random bytes")
    ap.add_argument("--linear", default="onednn", choices=["onednn", "matmul"],
                    help="how linears run: oneDNN 1x1 conv (default) or plain x @ W^T (BLAS)")
    ap.add_argument("--plain-ops", action="store_true",
                    help="keep moe_ref's written-out gelu/layernorm and glibc's malloc defaults")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--num-layers", type=int, default=4)
    ap.add_argument("--hidden-size", type=int, default=256)
    ap.add_argument("--num-attention-heads", type=int, default=4)
    ap.add_argument("--ffn-hidden-size", type=int, default=1024)
    ap.add_argument("--num-experts", type=int, default=8)
    ap.add_argument("--moe-layer-freq", type=int, default=2)
    ap.add_argument("--moe-router-topk", type=int, default=1)
    ap.add_argument("--moe-expert-capacity-factor", type=float, default=1.25)
    ap.add_argument("--seq-length", type=int, default=128)
    ap.add_argument("--micro-batch-size", type=int, default=16)
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    if a.linear == "onednn":
        R.linear = linear_onednn   # every linear of moe_ref (incl. router and tied head)
    if not a.plain_ops:
        # The fused kernels an ordinary PyTorch user would call (selfcheck.py checks that they
        # equal moe_ref's written-out formulas), and glibc told to keep freed memory: without
        # it every large tensor is a fresh mmap whose page faults dominate elementwise ops.
        R.gelu_tanh = lambda x: F.gelu(x, approximate="tanh")
        R.layernorm = lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)            # M_MMAP_MAX = 0: no mmap for large blocks
        libc.mallopt(-1, 1 << 30)      # M_TRIM_THRESHOLD = 1 GiB: do not give memory back
    cfg = R.Config(a.num_layers, a.hidden_size, a.num_attention_heads, a.ffn_hidden_size,
                   a.num_experts, a.moe_layer_freq, a.moe_router_topk, 256, a.seq_length)
    params = R.to_params(R.make_weights(cfg, a.seed), torch.float32)
    if a.data_path:
        tokens = R.load_tokens(a.data_path)
    else:
        tokens = np.random.default_rng(a.seed).integers(0, 256, size=1 << 20).astype(np.int64)
    windows = R.Windows(tokens, a.seq_length, 0.0)
    opt = R.make_optimizer(params, 3e-4, 0.9, 0.95, 1e-8, 0.1)
    B, T = a.micro_batch_size, a.seq_length

    times = []
    for k in range(1, a.warmup + a.iters + 1):
        t0 = time.perf_counter()
        for p in params.values():
            p.grad = None
        x, y = windows.batch(windows.train_windows(k, B))
        r = R.micro_step_losses(params, cfg, x, y, a.moe_expert_capacity_factor, "position", 0.01, 0.001)
        r.loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        dt = time.perf_counter() - t0
        if k > a.warmup:
            times.append(dt)
    ms = 1000.0 * statistics.median(times)
    print(json.dumps({"tokens_per_sec": B * T / (ms / 1000.0), "ms_per_iter": ms, "threads": a.threads,
                      "linear": a.linear,
                      "plain_ops": a.plain_ops, "iters": a.iters, "tokens_per_iter": B * T, "final_loss": float(r.lm),
                      "torch": torch.__version__}))


if __name__ == "__main__":
    main()
