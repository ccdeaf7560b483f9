#!/usr/bin/python3
"""Self-consistency checks of the PyTorch reference (moe_ref.py) against DESIGN.md.

Each check prints one line (PASS/FAIL, name, worst difference when numeric); the script
exits 1 if any check fails. Run: /usr/bin/python3 tests/torch_ref/selfcheck.py
"""
import math
import os
import sys
import tempfile
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import moe_ref as R  # noqa: E402

torch.set_default_dtype(torch.float64)
FAILURES = []


def check(name, ok, worst=None):
    msg = "%s  %s" % ("PASS" if ok else "FAIL", name)
    if worst is not None:
        msg += "  (worst diff %.3g)" % worst
    print(msg)
    if not ok:
        FAILURES.append(name)


def close(name, a, b, tol):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    worst = float((a - b).abs().max()) if a.numel() else 0.0
    check(name, a.shape == b.shape and worst <= tol, worst)


def tiny_cfg(topk=1, experts=4, freq=2, layers=2):
    return R.Config(num_layers=layers, hidden_size=8, num_attention_heads=2, ffn_hidden_size=12,
                    num_experts=experts, moe_layer_freq=freq, moe_router_topk=topk,
                    vocab_size=16, max_position_embeddings=8)


# ---------------------------------------------------------------------------------------
def check_safetensors():
    cfg = tiny_cfg()
    w = R.make_weights(cfg, seed=3)
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "w.safetensors")
        R.write_safetensors(p, w, cfg.metadata())
        with open(p, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
        arrays, meta = R.read_safetensors(p)
        cfg2, params = R.load_params(p, torch.float64)
    check("safetensors header length multiple of 8", n % 8 == 0)
    check("safetensors metadata round trip", meta["format"] == "pt" and cfg2 == cfg)
    worst = max(float((params[k].detach() - w[k].double()).abs().max()) for k in w)
    check("safetensors tensors round trip", list(arrays) == list(w) and worst == 0.0, worst)
    names = set(cfg.param_shapes())
    check("switch-layer rule: freq 2 -> layer 1 is Switch, layer 0 dense",
          "h.1.moe.router.weight" in names and "h.0.mlp.c_fc.weight" in names
          and "h.0.moe.router.weight" not in names and "h.1.mlp.c_fc.weight" not in names)
    c3 = tiny_cfg(freq=3, layers=6)
    check("switch-layer rule: freq 3 -> layers 2, 5",
          [l for l in range(6) if c3.is_switch_layer(l)] == [2, 5])
    check("switch-layer rule: E=0 or freq=0 -> all dense",
          not any(tiny_cfg(experts=0).is_switch_layer(l) for l in range(4))
          and not any(tiny_cfg(freq=0).is_switch_layer(l) for l in range(4)))


def check_dense_ops():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8)
    w, b = torch.randn(8), torch.randn(8)
    close("layernorm == F.layer_norm(eps 1e-5)", R.layernorm(x, w, b), F.layer_norm(x, (8,), w, b, 1e-5), 1e-12)
    close("gelu tanh == F.gelu(approximate='tanh')", R.gelu_tanh(x), F.gelu(x, approximate="tanh"), 1e-12)
    # Attention against a per-head, per-position loop written from the DESIGN text.
    B, T, C, H = 2, 5, 8, 2
    hd = C // H
    wa, ba, wp, bp = torch.randn(3 * C, C), torch.randn(3 * C), torch.randn(C, C), torch.randn(C)
    y = R.attention(x[:B], wa, ba, wp, bp, H)
    ref = torch.zeros(B, T, C)
    for bi in range(B):
        qkv = x[bi] @ wa.t() + ba
        for h in range(H):
            q = qkv[:, h * hd:(h + 1) * hd]
            k = qkv[:, C + h * hd:C + (h + 1) * hd]
            v = qkv[:, 2 * C + h * hd:2 * C + (h + 1) * hd]
            for t in range(T):
                s = torch.stack([q[t] @ k[u] / math.sqrt(hd) for u in range(t + 1)])
                a = torch.softmax(s, 0)
                ref[bi, t, h * hd:(h + 1) * hd] = sum(a[u] * v[u] for u in range(t + 1))
        ref[bi] = ref[bi] @ wp.t() + bp
    close("attention == per-head causal loop", y, ref, 1e-12)


# ---------------------------------------------------------------------------------------
def check_capacity_and_routing():
    check("capacity ceil(1.25*128*1/8) = 20", R.expert_capacity(1.25, 128, 1, 8) == 20)
    check("capacity ceil(1.0*5*1/2) = 3", R.expert_capacity(1.0, 5, 1, 2) == 3)
    check("capacity ceil(1.5*10*2/4) = 8", R.expert_capacity(1.5, 10, 2, 4) == 8)
    check("capacity cf 0 = dropless", R.expert_capacity(0.0, 10, 1, 4) is None)

    # top-1 position: experts [0,0,0,0,1], C = 3 -> the 4th token to expert 0 is dropped.
    idx = torch.tensor([[0], [0], [0], [0], [1]])
    g = torch.ones(5, 1)
    keep = R.capacity_keep(idx, g, 2, R.expert_capacity(1.0, 5, 1, 2), "position")
    check("position top-1: 4th token of a full expert dropped",
          keep.flatten().tolist() == [True, True, True, False, True])

    # top-2 position: first choices [0,0,1], second [1,2,0], C = 1.
    idx = torch.tensor([[0, 1], [0, 2], [1, 0]])
    g = torch.full((3, 2), 0.5)
    keep = R.capacity_keep(idx, g, 3, R.expert_capacity(0.5, 3, 2, 3), "position")
    check("position top-2: all first choices before second choices",
          keep.tolist() == [[True, False], [False, True], [True, False]])

    # probs: expert 0 gets gates 0.6, 0.9, 0.7, 0.9 -> C=2 keeps the two 0.9s;
    # C=1 keeps the earlier of the tied 0.9s (position order).
    idx = torch.zeros(4, 1, dtype=torch.long)
    g = torch.tensor([[0.6], [0.9], [0.7], [0.9]])
    keep2 = R.capacity_keep(idx, g, 2, 2, "probs").flatten().tolist()
    keep1 = R.capacity_keep(idx, g, 2, 1, "probs").flatten().tolist()
    check("probs: expert keeps its highest-gate choices", keep2 == [False, True, False, True])
    check("probs: ties broken by position order", keep1 == [False, True, False, False])

    # top-2 renormalisation and ties to the lower index.
    p = torch.tensor([[0.1, 0.5, 0.3, 0.1], [0.25, 0.25, 0.25, 0.25], [0.2, 0.1, 0.2, 0.5]])
    e, gate = R.route_topk(p, 2)
    check("top-2 picks the two largest, ties to lower index", e.tolist() == [[1, 2], [0, 1], [3, 0]])
    close("top-2 gates renormalised", gate, torch.tensor([[0.625, 0.375], [0.5, 0.5], [5 / 7, 2 / 7]]), 1e-15)
    e1, g1 = R.route_topk(p, 1)
    check("top-1 gate = p_e (not renormalised)", e1.flatten().tolist() == [1, 0, 3]
          and torch.allclose(g1.flatten(), torch.tensor([0.5, 0.25, 0.5])))


def naive_switch(x_SC, params, prefix, cfg, cf, policy):
    """Token-by-token Switch layer written straight from the DESIGN text, for comparison."""
    S, E, K = x_SC.shape[0], cfg.num_experts, cfg.moe_router_topk
    W = params[prefix + "router.weight"]
    choices = []  # (rank j, token s, expert e, gate)
    for s in range(S):
        p = torch.softmax(W @ x_SC[s], 0)
        order = sorted(range(E), key=lambda i: (-float(p[i]), i))[:K]
        tot = sum(p[i] for i in order)
        for j, e in enumerate(order):
            choices.append((j, s, e, p[e] if K == 1 else p[e] / tot))
    cap = math.ceil(cf * S * K / E) if cf > 0 else None
    kept = set()
    for e in range(E):
        mine = sorted([c for c in choices if c[2] == e], key=lambda c: (c[0], c[1]))
        if policy == "probs":
            mine = sorted(mine, key=lambda c: -float(c[3]))  # stable: ties stay in position order
        for c in (mine if cap is None else mine[:cap]):
            kept.add((c[0], c[1]))
    out = torch.zeros_like(x_SC)
    for (j, s, e, g) in choices:
        if (j, s) in kept:
            q = prefix + "experts.%d." % e
            out[s] += g * R.ffn(x_SC[s], params[q + "c_fc.weight"], params[q + "c_fc.bias"],
                                params[q + "c_proj.weight"], params[q + "c_proj.bias"])
    return out, len(choices) - len(kept)


def check_switch_vs_naive():
    for topk in (1, 2):
        for policy in ("position", "probs"):
            for cf in (0.0, 0.5, 1.0, 1.25):
                cfg = tiny_cfg(topk=topk)
                params = R.to_params(R.make_weights(cfg, seed=11 + topk), torch.float64)
                # Bigger router weights -> uneven routing, so capacity actually bites.
                with torch.no_grad():
                    params["h.1.moe.router.weight"].mul_(8.0)
                torch.manual_seed(5)
                x = torch.randn(24, 8)
                y, st = R.switch_ffn(x, params, "h.1.moe.", cfg, cf, policy)
                yn, dropped = naive_switch(x, params, "h.1.moe.", cfg, cf, policy)
                worst = float((y - yn).abs().max())
                check("switch_ffn == naive loop (top-%d, %s, cf %.2f, %d dropped)"
                      % (topk, policy, cf, dropped),
                      worst < 1e-12 and dropped == st.num_dropped, worst)


def check_load_balance():
    for topk in (1, 2):
        cfg = tiny_cfg(topk=topk)
        params = R.to_params(R.make_weights(cfg, seed=2), torch.float64)
        with torch.no_grad():
            params["h.1.moe.router.weight"].zero_()
        x = torch.randn(10, 8)
        _, st = R.switch_ffn(x, params, "h.1.moe.", cfg, 1.0, "position")
        close("lb == 1.0 under uniform router probabilities (top-%d)" % topk, st.lb, 1.0, 1e-14)
        close("z == log(E)^2 under zero logits (top-%d)" % topk, st.z, math.log(4) ** 2, 1e-14)
    # Perfectly balanced hard routing: one-hot-ish probs, each expert gets S/E tokens.
    E, S = 4, 8
    cfg = tiny_cfg(topk=1, experts=E)
    params = R.to_params(R.make_weights(cfg, seed=2), torch.float64)
    with torch.no_grad():
        params["h.1.moe.router.weight"].zero_()
        params["h.1.moe.router.weight"][:, :E].copy_(torch.eye(E) * 50.0)
    x = torch.zeros(S, 8)
    x[torch.arange(S), torch.arange(S) % E] = 1.0
    _, st = R.switch_ffn(x, params, "h.1.moe.", cfg, 1.0, "position")
    close("lb == 1.0 under perfect balance", st.lb, 1.0, 1e-12)
    check("no drops under perfect balance with cf 1", st.num_dropped == 0)


def check_switch_gradcheck():
    for topk, cf, policy in ((1, 1.0, "position"), (2, 0.75, "position"), (2, 0.75, "probs")):
        cfg = tiny_cfg(topk=topk)
        base = R.to_params(R.make_weights(cfg, seed=7), torch.float64)
        names = ["h.1.moe.router.weight", "h.1.moe.experts.0.c_fc.weight",
                 "h.1.moe.experts.1.c_proj.bias", "h.1.moe.experts.2.c_fc.bias"]
        torch.manual_seed(1)
        x0 = torch.randn(12, 8, requires_grad=True)

        def fn(x, *ws):
            p = dict(base)
            p.update(zip(names, ws))
            y, st = R.switch_ffn(x, p, "h.1.moe.", cfg, cf, policy)
            return y, st.lb.reshape(1), st.z.reshape(1)

        ws = [base[n].detach().clone().requires_grad_(True) for n in names]
        _, st = R.switch_ffn(x0, base, "h.1.moe.", cfg, cf, policy)
        ok = torch.autograd.gradcheck(fn, (x0, *ws), eps=1e-6, atol=1e-7, rtol=1e-5, raise_exception=False)
        check("gradcheck switch_ffn output, lb, z (top-%d, %s, cf %.2f, %d dropped)"
              % (topk, policy, cf, st.num_dropped), ok)

    # f is detached: the lb gradient w.r.t. logits equals (E/k) f_i dP_i/dlogits only.
    cfg = tiny_cfg(topk=1)
    params = R.to_params(R.make_weights(cfg, seed=7), torch.float64)
    x = torch.randn(12, 8)
    _, st = R.switch_ffn(x, params, "h.1.moe.", cfg, 1.0, "position")
    g_lb, = torch.autograd.grad(st.lb, params["h.1.moe.router.weight"])
    W = params["h.1.moe.router.weight"].detach().clone().requires_grad_(True)
    p = torch.softmax(x @ W.t(), -1)
    f = torch.bincount(p.argmax(-1), minlength=4).double() / 12
    (4 * (p.mean(0) * f).sum()).backward()
    close("lb gradient flows through P only (f detached)", g_lb, W.grad, 1e-14)


def check_model_finite_differences():
    cfg = tiny_cfg(topk=2)
    params = R.to_params(R.make_weights(cfg, seed=9), torch.float64)
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(0, cfg.vocab_size, (3, 7), generator=g)
    x, y = toks[:, :-1], toks[:, 1:]
    args = (1.0, "position", 0.01, 0.001)

    def loss():
        return R.micro_step_losses(params, cfg, x, y, *args).loss

    L = loss()
    L.backward()
    worst = 0.0
    picks = ["wte.weight", "wpe.weight", "h.0.ln_1.weight", "h.0.attn.c_attn.bias",
             "h.0.attn.c_proj.weight", "h.0.mlp.c_fc.weight", "h.1.ln_2.bias",
             "h.1.moe.router.weight", "h.1.moe.experts.3.c_fc.weight", "ln_f.bias"]
    with torch.no_grad():
        for name in picks:
            p = params[name]
            flat, gflat = p.view(-1), p.grad.view(-1)
            for i in torch.randint(0, flat.numel(), (3,), generator=g).tolist():
                old = float(flat[i])
                flat[i] = old + 1e-6
                lp = float(loss())
                flat[i] = old - 1e-6
                lm = float(loss())
                flat[i] = old
                fd = (lp - lm) / 2e-6
                worst = max(worst, abs(fd - float(gflat[i])))
    check("full model grads == central differences (lm + aux + z)", worst < 1e-7, worst)


def check_accumulation():
    """Dropless with aux = z = 0: 2 micro-steps of 2 with 1/num_micro == one step of 4."""
    cfg = tiny_cfg(topk=1)
    w = R.make_weights(cfg, seed=4)
    toks = torch.randint(0, cfg.vocab_size, (4, 7), generator=torch.Generator().manual_seed(1))
    x, y = toks[:, :-1], toks[:, 1:]
    a = R.to_params(w, torch.float64)
    R.micro_step_losses(a, cfg, x, y, 0.0, "position", 0.0, 0.0).loss.backward()
    b = R.to_params(w, torch.float64)
    for m in range(2):
        r = R.micro_step_losses(b, cfg, x[2 * m:2 * m + 2], y[2 * m:2 * m + 2], 0.0, "position", 0.0, 0.0)
        (r.loss / 2).backward()
    worst = max(float((a[k].grad - b[k].grad).abs().max()) for k in a)
    check("gradient accumulation (1/num_micro) == one big batch when dropless", worst < 1e-14, worst)


# ---------------------------------------------------------------------------------------
def check_optimizer_schedule():
    lr = lambda k, s, W=2: R.lr_at(k, 1.0, 0.1, W, 10, s)  # noqa: E731
    check("warmup lr*k/W", lr(1, "cosine") == 0.5 and lr(2, "cosine") == 1.0)
    check("constant after warmup", lr(7, "constant") == 1.0)
    close("linear: k=6 -> progress 0.5", lr(6, "linear"), 0.55, 1e-15)
    close("linear: k=10 -> min_lr", lr(10, "linear"), 0.1, 1e-15)
    close("cosine: k=6 -> midpoint", lr(6, "cosine"), 0.55, 1e-15)
    close("cosine: k=10 -> min_lr", lr(10, "cosine"), 0.1, 1e-15)
    close("no warmup: k=1 cosine", R.lr_at(1, 1.0, 0.0, 0, 4, "cosine"), 0.5 * (1 + math.cos(math.pi / 4)), 1e-15)
    check("clip factor", R.clip_factor(0.5, 1.0) == 1.0 and R.clip_factor(3.0, 1.0) == 1.0 / (3.0 + 1e-6)
          and R.clip_factor(3.0, 0.0) == 1.0)

    # AdamW step by hand: decay only for >= 2-D tensors.
    torch.manual_seed(3)
    params = OrderedDict(w=torch.randn(3, 4).requires_grad_(True), b=torch.randn(4).requires_grad_(True))
    init = {k: v.detach().clone() for k, v in params.items()}
    opt = R.make_optimizer(params, 1e-2, 0.9, 0.95, 1e-8, 0.1)
    grads = [{k: torch.randn_like(v) for k, v in params.items()} for _ in range(2)]
    m = {k: torch.zeros_like(v) for k, v in init.items()}
    v2 = {k: torch.zeros_like(v) for k, v in init.items()}
    ref = {k: v.clone() for k, v in init.items()}
    for step, gr in enumerate(grads, 1):
        for k, p in params.items():
            p.grad = gr[k].clone()
        opt.step()
        for k in ref:
            wd = 0.1 if ref[k].dim() >= 2 else 0.0
            ref[k] *= 1 - 1e-2 * wd
            m[k] = 0.9 * m[k] + 0.1 * gr[k]
            v2[k] = 0.95 * v2[k] + 0.05 * gr[k] ** 2
            mh, vh = m[k] / (1 - 0.9 ** step), v2[k] / (1 - 0.95 ** step)
            ref[k] -= 1e-2 * mh / (vh.sqrt() + 1e-8)
    worst = max(float((params[k].detach() - ref[k]).abs().max()) for k in ref)
    check("AdamW == by-hand formula (decay on >=2-D only)", worst < 1e-12, worst)


def check_data():
    with tempfile.TemporaryDirectory() as d:
        toks = np.arange(1000, 1000 + 101, dtype=np.uint16)
        hdr = np.zeros(256, dtype="<i4")
        hdr[:3] = (20240520, 1, len(toks))
        p = os.path.join(d, "a.bin")
        with open(p, "wb") as f:
            f.write(hdr.tobytes() + toks.tobytes())
        t = R.load_tokens(p)
        check("llm.c shard read", t.tolist() == toks.tolist())
        p2 = os.path.join(d, "b.bin")
        with open(p2, "wb") as f:
            f.write(hdr.tobytes() + toks[:10].tobytes())
        hdr2 = hdr.copy()
        hdr2[2] = 10
        with open(p2, "wb") as f:
            f.write(hdr2.tobytes() + toks[:10].tobytes())
        t2 = R.load_tokens(os.path.join(d, "*.bin"))
        check("llm.c shards by glob, in name order", t2.tolist() == toks.tolist() + toks[:10].tolist())
        raw = os.path.join(d, "c.txt")
        with open(raw, "wb") as f:
            f.write(bytes(range(256)) * 2)
        check("raw bytes read", R.load_tokens(raw).tolist() == list(range(256)) * 2)
    # Windows: N = 101, T = 10 -> n = 10; f = 0.25 -> ceil(2.5) = 3 held out -> 7 train.
    w = R.Windows(np.arange(101, dtype=np.int64), 10, 0.25)
    check("window count and hold-out", (w.n, w.n_valid, w.n_train) == (10, 3, 7))
    x, y = w.batch([0, 6])
    check("window w = tokens[w*T : w*T+T+1], targets shifted",
          x[1].tolist() == list(range(60, 70)) and y[1].tolist() == list(range(61, 71)))
    check("sequential order modulo n_train", w.train_windows(1, 4) == [0, 1, 2, 3]
          and w.train_windows(2, 4) == [4, 5, 6, 0] and w.train_windows(3, 4) == [1, 2, 3, 4])
    check("valid fraction 0 holds out none", R.Windows(np.arange(101), 10, 0.0).n_train == 10)


def main():
    torch.manual_seed(0)
    for fn in (check_safetensors, check_dense_ops, check_capacity_and_routing, check_switch_vs_naive,
               check_load_balance, check_switch_gradcheck, check_model_finite_differences,
               check_accumulation, check_optimizer_schedule, check_data):
        fn()
    if FAILURES:
        print("selfcheck: %d FAILED: %s" % (len(FAILURES), "; ".join(FAILURES)))
        return 1
    print("selfcheck: all passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
