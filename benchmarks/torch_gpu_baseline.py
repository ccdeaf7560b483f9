#!/usr/bin/env python3
"""PyTorch eager baseline on one GPU for bench_step --device cuda: tokens/s of the same model.

The model of DESIGN.md (GPT-2 blocks, tied logits, Switch layers every --moe-layer-freq with
top-k routing, capacity ceil(cf*S*k/E) with the `position` drop policy, load-balancing and
z losses) written the way a PyTorch user would write it for a GPU: fp32 master weights,
torch.autocast to bf16 for the matmuls, the router in fp32, F.scaled_dot_product_attention
(causal; --attention math writes the softmax out instead), capacity by a cumulative sum over
one-hot choices (no host round trip), one loop over the experts with index_select/index_add,
clip-grad 1.0 and the fused torch.optim.AdamW (weight decay on >= 2-D tensors). Data: random
bytes, sequential windows. --warmup iterations are not timed; each timed iteration ends with
torch.cuda.synchronize(). Prints one JSON line {"tokens_per_sec": median, "ms_per_iter": ...}.

    python3 benchmarks/torch_gpu_baseline.py --num-layers 12 --hidden-size 768 \
        --num-attention-heads 12 --ffn-hidden-size 3072 --num-experts 8 --seq-length 1024
"""
import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F


def trunc_normal(shape, std, gen):
    return torch.nn.init.trunc_normal_(torch.empty(shape), std=std, a=-2 * std, b=2 * std,
                                       generator=gen)


def make_params(a, device):
    """DESIGN.md's names and initialization (truncated normals, init scale 0.1)."""
    g = torch.Generator().manual_seed(a.seed)
    C, F_, E, V, T = a.hidden_size, a.ffn_hidden_size, a.num_experts, 256, a.seq_length
    lin = lambda out, inp: trunc_normal((out, inp), math.sqrt(0.1 / inp), g)
    p = {"wte": trunc_normal((V, C), 0.02, g), "wpe": trunc_normal((T, C), 0.02, g),
         "ln_f.w": torch.ones(C), "ln_f.b": torch.zeros(C)}
    for l in range(a.num_layers):
        h = "h%d." % l
        p.update({h + "ln1.w": torch.ones(C), h + "ln1.b": torch.zeros(C),
                  h + "attn.w": lin(3 * C, C), h + "attn.b": torch.zeros(3 * C),
                  h + "proj.w": lin(C, C), h + "proj.b": torch.zeros(C),
                  h + "ln2.w": torch.ones(C), h + "ln2.b": torch.zeros(C)})
        if is_switch(a, l):
            p[h + "router.w"] = lin(E, C)
            p[h + "fc.w"] = torch.stack([lin(F_, C) for _ in range(E)])    # (E, F, C)
            p[h + "fc.b"] = torch.zeros(E, F_)
            p[h + "cproj.w"] = torch.stack([lin(C, F_) for _ in range(E)])  # (E, C, F)
            p[h + "cproj.b"] = torch.zeros(E, C)
        else:
            p.update({h + "fc.w": lin(F_, C), h + "fc.b": torch.zeros(F_),
                      h + "cproj.w": lin(C, F_), h + "cproj.b": torch.zeros(C)})
    return {k: v.to(device).requires_grad_(True) for k, v in p.items()}


def is_switch(a, l):
    f = a.moe_layer_freq
    return a.num_experts > 0 and f > 0 and l % f == f - 1


def attention(x, p, h, a):
    B, T, C = x.shape
    nh, hd = a.num_attention_heads, C // a.num_attention_heads
    q, k, v = F.linear(x, p[h + "attn.w"], p[h + "attn.b"]).split(C, dim=-1)
    q, k, v = (t.view(B, T, nh, hd).transpose(1, 2) for t in (q, k, v))       # (B, nh, T, hd)
    if a.attention == "sdpa":
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        y = att.masked_fill(~mask, float("-inf")).softmax(dim=-1) @ v
    return F.linear(y.transpose(1, 2).reshape(B, T, C), p[h + "proj.w"], p[h + "proj.b"])


def switch_ffn(x_SC, p, h, a):
    """Router in fp32, top-k, capacity by position, experts in a loop; returns y, lb, z."""
    S, C = x_SC.shape
    E, K = a.num_experts, a.moe_router_topk
    with torch.autocast("cuda", enabled=False):
        logits = F.linear(x_SC.float(), p[h + "router.w"])                     # (S, E) fp32
        probs = logits.softmax(dim=-1)
        gates, idx = probs.topk(K, dim=-1)                                      # (S, K)
        if K > 1:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        # Position order: every first choice before any second choice, tokens in order.
        onehot = F.one_hot(idx.t().reshape(-1), E)                              # (K*S, E)
        slot = ((onehot.cumsum(0) - 1) * onehot).sum(-1)                        # (K*S)
        capacity = math.ceil(a.moe_expert_capacity_factor * S * K / E)
        keep = (slot < capacity).view(K, S).t() if a.moe_expert_capacity_factor > 0 else \
            torch.ones(S, K, dtype=torch.bool, device=x_SC.device)
        f = onehot.sum(0).float() / S
        lb = (E / K) * (probs.mean(0) * f).sum()
        z = (torch.logsumexp(logits, dim=-1) ** 2).mean()
    y = torch.zeros_like(x_SC)
    for e in range(E):
        tok, k = torch.nonzero((idx == e) & keep, as_tuple=True)
        hid = F.gelu(F.linear(x_SC.index_select(0, tok), p[h + "fc.w"][e], p[h + "fc.b"][e]),
                     approximate="tanh")
        out = F.linear(hid, p[h + "cproj.w"][e], p[h + "cproj.b"][e])
        y = y.index_add(0, tok, (gates[tok, k].unsqueeze(1) * out).to(y.dtype))
    return y, lb, z


def loss_fn(p, a, x_BT, y_BT):
    B, T = x_BT.shape
    with torch.autocast("cuda", dtype=torch.bfloat16):
        x = p["wte"][x_BT] + p["wpe"][:T]
        lb_sum, z_sum = 0.0, 0.0
        for l in range(a.num_layers):
            h = "h%d." % l
            x = x + attention(F.layer_norm(x, (x.shape[-1],), p[h + "ln1.w"], p[h + "ln1.b"]), p, h, a)
            hn = F.layer_norm(x, (x.shape[-1],), p[h + "ln2.w"], p[h + "ln2.b"])
            if is_switch(a, l):
                y, lb, z = switch_ffn(hn.reshape(B * T, -1), p, h, a)
                x = x + y.view(B, T, -1)
                lb_sum, z_sum = lb_sum + lb, z_sum + z
            else:
                x = x + F.linear(F.gelu(F.linear(hn, p[h + "fc.w"], p[h + "fc.b"]), approximate="tanh"),
                                 p[h + "cproj.w"], p[h + "cproj.b"])
        x = F.layer_norm(x, (x.shape[-1],), p["ln_f.w"], p["ln_f.b"])
        logits = F.linear(x, p["wte"])
    lm = F.cross_entropy(logits.float().view(B * T, -1), y_BT.view(-1))
    return lm + 0.01 * lb_sum + 0.001 * z_sum, lm


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--num-layers", type=int, default=12)
    ap.add_argument("--hidden-size", type=int, default=768)
    ap.add_argument("--num-attention-heads", type=int, default=12)
    ap.add_argument("--ffn-hidden-size", type=int, default=3072)
    ap.add_argument("--num-experts", type=int, default=8)
    ap.add_argument("--moe-layer-freq", type=int, default=2)
    ap.add_argument("--moe-router-topk", type=int, default=1)
    ap.add_argument("--moe-expert-capacity-factor", type=float, default=1.25)
    ap.add_argument("--seq-length", type=int, default=1024)
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--attention", choices=["sdpa", "math"], default="sdpa")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("torch_gpu_baseline.py: no CUDA device visible to PyTorch")
    dev = torch.device("cuda")
    torch.manual_seed(a.seed)
    p = make_params(a, dev)
    decay = [t for t in p.values() if t.dim() >= 2]
    no_decay = [t for t in p.values() if t.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=3e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)
    B, T = a.micro_batch_size, a.seq_length
    tokens = torch.randint(0, 256, (1 << 22,), generator=torch.Generator().manual_seed(a.seed)).to(dev)
    times, lm = [], None
    for k in range(a.warmup + a.iters):
        start = (k * B * T) % (tokens.numel() - B * T - 1)
        win = tokens[start:start + B * (T + 1)].view(B, T + 1)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss, lm = loss_fn(p, a, win[:, :T], win[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(p.values()), 1.0)
        opt.step()
        torch.cuda.synchronize()
        if k >= a.warmup:
            times.append(time.perf_counter() - t0)
    ms = 1000.0 * statistics.median(times)
    print(json.dumps({"tokens_per_sec": B * T / (ms / 1000.0), "ms_per_iter": ms, "iters": a.iters,
                      "warmup": a.warmup, "tokens_per_iter": B * T, "attention": a.attention,
                      "final_lm_loss": float(lm), "torch": torch.__version__,
                      "device": torch.cuda.get_device_name(0)}))


if __name__ == "__main__":
    main()
