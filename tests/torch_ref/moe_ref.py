#!/usr/bin/python3
"""Independent PyTorch reference of the Switch-Transformer training contract.

Every function cites the rule of /work/shared/DESIGN.md ("DESIGN") it implements.
Clarity beats speed: the model is written functionally over a dict of tensors keyed by
the DESIGN safetensors names, the Switch layer is a plain loop over experts, and the
default precision is float64 so that differences against the C++ trainer are the
trainer's (its float32 rounding), not ours.

Modes (run with --help for every flag):
  make-weights  random weights of our own choosing -> safetensors (+ config metadata)
  train         Megatron-style training loop -> metrics JSONL (+ --export-safetensors)
  eval          mean CE per target token over every window of a data file -> one JSON line
  grads         one forward/backward on the first micro-batch -> safetensors of
                logits, losses and grad.<param> tensors

Needs only torch and numpy (no safetensors package: own reader/writer below).
"""
import argparse
import glob
import json
import math
import os
import struct
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------
# safetensors I/O (DESIGN, Formats: F32 tensors, "__metadata__" string map, "format": "pt")

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
}


def read_safetensors(path):
    """Read a safetensors file -> (OrderedDict name -> float/int numpy array, metadata dict).

    Format: 8-byte little-endian u64 header length N, N bytes of JSON header
    {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}},
    then the data buffer (offsets are relative to its start). BF16 is widened to float32.
    """
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n].decode("utf-8"))
    data = memoryview(blob)[8 + n:]
    meta = header.pop("__metadata__", {}) or {}
    tensors = OrderedDict()
    for name, info in header.items():
        b, e = info["data_offsets"]
        shape = tuple(info["shape"])
        if info["dtype"] == "BF16":
            raw = np.frombuffer(data[b:e], dtype="<u2").astype(np.uint32) << 16
            arr = raw.view(np.float32)
        else:
            arr = np.frombuffer(data[b:e], dtype=np.dtype(_ST_DTYPES[info["dtype"]]).newbyteorder("<"))
        tensors[name] = arr.reshape(shape).copy()
    return tensors, meta


def write_safetensors(path, tensors, metadata=None):
    """Write name -> tensor/array as F32 safetensors (DESIGN, Formats), header padded to 8 bytes."""
    header = OrderedDict()
    if metadata is not None:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    chunks, offset = [], 0
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor):
            t = t.detach().cpu().numpy()
        arr = np.ascontiguousarray(np.asarray(t, dtype="<f4"))
        buf = arr.tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(buf)]}
        chunks.append(buf)
        offset += len(buf)
    hjson = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hjson += b" " * ((8 - len(hjson) % 8) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for c in chunks:
            f.write(c)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------
# Config (DESIGN, Formats: the config keys of __metadata__; Model: the Switch-layer rule)

CONFIG_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
               "num_experts", "moe_layer_freq", "moe_router_topk", "vocab_size",
               "max_position_embeddings")


@dataclass
class Config:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    num_experts: int = 0
    moe_layer_freq: int = 2
    moe_router_topk: int = 1
    vocab_size: int = 256
    max_position_embeddings: int = 1024

    @staticmethod
    def from_metadata(meta):
        missing = [k for k in CONFIG_KEYS if k not in meta]
        if missing:
            raise ValueError("safetensors __metadata__ lacks config keys: %s" % ", ".join(missing))
        return Config(**{k: int(meta[k]) for k in CONFIG_KEYS})

    def metadata(self):
        meta = {"format": "pt"}
        meta.update({k: str(getattr(self, k)) for k in CONFIG_KEYS})
        return meta

    def is_switch_layer(self, l):
        """DESIGN, Model: layer l is Switch iff E > 0 && freq > 0 && l % freq == freq - 1."""
        f = self.moe_layer_freq
        return self.num_experts > 0 and f > 0 and l % f == f - 1

    def param_shapes(self):
        """Every parameter name and shape, in DESIGN, Formats naming ([out, in] weights)."""
        C, F_, V, E = self.hidden_size, self.ffn_hidden_size, self.vocab_size, self.num_experts
        s = OrderedDict()
        s["wte.weight"] = (V, C)
        s["wpe.weight"] = (self.max_position_embeddings, C)
        for l in range(self.num_layers):
            p = "h.%d." % l
            s[p + "ln_1.weight"] = (C,)
            s[p + "ln_1.bias"] = (C,)
            s[p + "attn.c_attn.weight"] = (3 * C, C)
            s[p + "attn.c_attn.bias"] = (3 * C,)
            s[p + "attn.c_proj.weight"] = (C, C)
            s[p + "attn.c_proj.bias"] = (C,)
            s[p + "ln_2.weight"] = (C,)
            s[p + "ln_2.bias"] = (C,)
            if self.is_switch_layer(l):
                s[p + "moe.router.weight"] = (E, C)
                for e in range(E):
                    q = p + "moe.experts.%d." % e
                    s[q + "c_fc.weight"] = (F_, C)
                    s[q + "c_fc.bias"] = (F_,)
                    s[q + "c_proj.weight"] = (C, F_)
                    s[q + "c_proj.bias"] = (C,)
            else:
                s[p + "mlp.c_fc.weight"] = (F_, C)
                s[p + "mlp.c_fc.bias"] = (F_,)
                s[p + "mlp.c_proj.weight"] = (C, F_)
                s[p + "mlp.c_proj.bias"] = (C,)
        s["ln_f.weight"] = (C,)
        s["ln_f.bias"] = (C,)
        return s


def make_weights(cfg, seed, init_scale=0.1):
    """Random weights OF OUR OWN CHOOSING (not DESIGN's hashed truncated normal init).

    Same distributions' scales as DESIGN, Initialization (embeddings std 0.02, linears and
    the router std sqrt(init_scale/fan_in)), but biases and LayerNorm parameters are
    randomised too (LN weight 1 + N(0, 0.1), LN bias N(0, 0.1), linear biases N(0, 0.02))
    so that a bug in a bias or LayerNorm path shows in a comparison. Values are rounded to
    float32 so both implementations start from identical numbers.
    """
    g = torch.Generator().manual_seed(seed)
    out = OrderedDict()
    for name, shape in cfg.param_shapes().items():
        z = torch.randn(shape, generator=g, dtype=torch.float64)
        if name in ("wte.weight", "wpe.weight"):
            t = 0.02 * z
        elif ".ln_" in name or name.startswith("ln_f."):
            t = 1.0 + 0.1 * z if name.endswith(".weight") else 0.1 * z
        elif name.endswith(".weight"):
            t = math.sqrt(init_scale / shape[1]) * z
        else:
            t = 0.02 * z
        out[name] = t.to(torch.float32)
    return out


def load_params(path, dtype):
    """Load a DESIGN-named safetensors file -> (Config, OrderedDict of leaf tensors with grad)."""
    arrays, meta = read_safetensors(path)
    cfg = Config.from_metadata(meta)
    params = OrderedDict()
    for name, shape in cfg.param_shapes().items():
        if name not in arrays:
            raise ValueError("%s: missing tensor %s" % (path, name))
        if tuple(arrays[name].shape) != tuple(shape):
            raise ValueError("%s: %s has shape %s, expected %s"
                             % (path, name, list(arrays[name].shape), list(shape)))
        params[name] = torch.tensor(arrays[name], dtype=dtype).requires_grad_(True)
    extra = set(arrays) - set(params)
    if extra:
        raise ValueError("%s: unexpected tensors %s" % (path, sorted(extra)[:5]))
    return cfg, params


def to_params(weights, dtype):
    """name -> tensor dict (e.g. from make_weights) -> leaf tensors requiring grad."""
    return OrderedDict((k, v.detach().to(dtype).clone().requires_grad_(True))
                       for k, v in weights.items())


# ----------------------------------------------------------------------------------------
# Dense layers (DESIGN, Model)

def layernorm(x, w, b):
    """LayerNorm over the last dim, eps 1e-5, biased variance, with weight and bias."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * w + b


def gelu_tanh(x):
    """gelu = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def linear(x, w, b=None):
    """y = x W^T + b with W stored [out, in] like torch.nn.Linear."""
    y = x @ w.t()
    return y if b is None else y + b


def attention(x_BTC, w_attn, b_attn, w_proj, b_proj, num_heads):
    """c_attn [3C,C]: rows [0,C) q, [C,2C) k, [2C,3C) v; head h = slice h*hd..(h+1)*hd;
    causal softmax(q k^T / sqrt(hd)); then c_proj [C,C] + bias."""
    B, T, C = x_BTC.shape
    hd = C // num_heads
    qkv = linear(x_BTC, w_attn, b_attn)                      # (B, T, 3C)
    q, k, v = qkv.split(C, dim=-1)                           # (B, T, C) each
    q = q.view(B, T, num_heads, hd).transpose(1, 2)          # (B, H, T, hd)
    k = k.view(B, T, num_heads, hd).transpose(1, 2)
    v = v.view(B, T, num_heads, hd).transpose(1, 2)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(hd)          # (B, H, T, T)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    y = (att @ v).transpose(1, 2).reshape(B, T, C)           # (B, T, C)
    return linear(y, w_proj, b_proj)


def ffn(x, w_fc, b_fc, w_proj, b_proj):
    """Dense FFN / one expert: c_proj(gelu(c_fc(x)))."""
    return linear(gelu_tanh(linear(x, w_fc, b_fc)), w_proj, b_proj)


# ----------------------------------------------------------------------------------------
# Router, capacity and the Switch layer (DESIGN, Router; Losses)

def expert_capacity(capacity_factor, num_tokens, top_k, num_experts):
    """C = ceil(cf * S * k / E), evaluated left to right in double; None when cf == 0 (dropless)."""
    if capacity_factor <= 0.0:
        return None
    return int(math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def route_topk(probs_SE, top_k):
    """top-1: e = argmax p, g = p_e. top-k: the k largest (ties to the lower expert index),
    gates renormalised to sum to 1 over the chosen. Returns expert_idx_SK, gate_SK."""
    _, order_SE = torch.sort(probs_SE.detach(), dim=-1, descending=True, stable=True)
    expert_idx_SK = order_SE[:, :top_k]
    gate_SK = probs_SE.gather(1, expert_idx_SK)
    if top_k > 1:
        gate_SK = gate_SK / gate_SK.sum(dim=-1, keepdim=True)
    return expert_idx_SK, gate_SK


def capacity_keep(expert_idx_SK, gate_SK, num_experts, capacity, policy):
    """Which choices are kept under capacity. Returns a bool mask keep_SK.

    'position': every token's first choice is placed before any second choice; within one
    choice rank tokens go in (batch, time) order; a choice that finds its expert full is
    dropped. 'probs': each expert keeps its `capacity` highest-gate choices; ties are broken
    by the same position order (choice rank, then token index).
    """
    S, K = expert_idx_SK.shape
    if capacity is None:
        return torch.ones(S, K, dtype=torch.bool)
    if policy == "position":
        fill_E = [0] * num_experts
        idx = expert_idx_SK.tolist()
        keep = [[False] * K for _ in range(S)]
        for j in range(K):
            for s in range(S):
                e = idx[s][j]
                keep[s][j] = fill_E[e] < capacity
                fill_E[e] += 1
        keep_SK = torch.tensor(keep, dtype=torch.bool).view(S, K)
    elif policy == "probs":
        # Choices listed in position order: flat index j*S + s.
        e_flat = expert_idx_SK.t().reshape(-1)
        g_flat = gate_SK.detach().t().reshape(-1)
        keep_flat = torch.zeros(S * K, dtype=torch.bool)
        for e in range(num_experts):
            mine = torch.nonzero(e_flat == e).flatten()          # position order
            _, order = torch.sort(g_flat[mine], descending=True, stable=True)
            keep_flat[mine[order[:capacity]]] = True
        keep_SK = keep_flat.view(K, S).t()
    else:
        raise ValueError("unknown drop policy %r (position|probs)" % policy)
    return keep_SK


@dataclass
class SwitchStats:
    """Per Switch layer, per micro-step."""
    lb: torch.Tensor            # load-balancing loss (E/k) sum_i P_i f_i, grad through P only
    z: torch.Tensor             # mean over tokens of logsumexp(logits)^2
    num_dropped: int            # choices dropped by capacity
    num_choices: int            # S * k
    counts_E: torch.Tensor      # top-k choices per expert before capacity
    kept_E: torch.Tensor        # choices per expert after capacity


def switch_ffn(x_SC, params, prefix, cfg, capacity_factor, policy):
    """Switch FFN over one routing group (the tokens of one micro-batch, S = B*T).

    logits = x W_r^T, p = softmax(logits); top-k routing; capacity per expert; output of a
    token = sum over its kept choices of g * expert(x), 0 when none is kept.
    """
    S, C = x_SC.shape
    E, K = cfg.num_experts, cfg.moe_router_topk
    logits_SE = linear(x_SC, params[prefix + "router.weight"])     # (S, E)
    probs_SE = logits_SE.softmax(dim=-1)
    expert_idx_SK, gate_SK = route_topk(probs_SE, K)
    capacity = expert_capacity(capacity_factor, S, K, E)
    keep_SK = capacity_keep(expert_idx_SK, gate_SK, E, capacity, policy)

    y_SC = torch.zeros_like(x_SC)
    for e in range(E):
        tok_idx, k_idx = torch.nonzero((expert_idx_SK == e) & keep_SK, as_tuple=True)
        if tok_idx.numel() == 0:
            continue
        q = prefix + "experts.%d." % e
        h = ffn(x_SC.index_select(0, tok_idx), params[q + "c_fc.weight"], params[q + "c_fc.bias"],
                params[q + "c_proj.weight"], params[q + "c_proj.bias"])
        y_SC = y_SC.index_add(0, tok_idx, gate_SK[tok_idx, k_idx].unsqueeze(1) * h)

    # DESIGN, Losses: lb = (E/k) sum_i P_i f_i; f_i = choices before capacity / S (no grad).
    counts_E = torch.bincount(expert_idx_SK.reshape(-1), minlength=E)
    f_E = counts_E.to(x_SC.dtype) / S
    P_E = probs_SE.mean(dim=0)
    lb = (E / K) * (P_E * f_E).sum()
    z = (torch.logsumexp(logits_SE, dim=-1) ** 2).mean()
    kept_E = torch.bincount(expert_idx_SK[keep_SK], minlength=E)
    stats = SwitchStats(lb=lb, z=z, num_dropped=int((~keep_SK).sum()), num_choices=S * K,
                        counts_E=counts_E, kept_E=kept_E)
    return y_SC, stats


# ----------------------------------------------------------------------------------------
# The model (DESIGN, Model)

def forward(params, cfg, idx_BT, capacity_factor, policy):
    """x = wte[idx] + wpe[pos]; L blocks (x += attn(ln_1 x); x += ffn(ln_2 x)); ln_f;
    logits = ln_f(x) @ wte^T. Returns logits (B, T, V) and a list of SwitchStats."""
    B, T = idx_BT.shape
    if T > cfg.max_position_embeddings:
        raise ValueError("seq length %d > max_position_embeddings %d" % (T, cfg.max_position_embeddings))
    x = params["wte.weight"][idx_BT] + params["wpe.weight"][:T].unsqueeze(0)   # (B, T, C)
    stats = []
    for l in range(cfg.num_layers):
        p = "h.%d." % l
        h = layernorm(x, params[p + "ln_1.weight"], params[p + "ln_1.bias"])
        x = x + attention(h, params[p + "attn.c_attn.weight"], params[p + "attn.c_attn.bias"],
                          params[p + "attn.c_proj.weight"], params[p + "attn.c_proj.bias"],
                          cfg.num_attention_heads)
        h = layernorm(x, params[p + "ln_2.weight"], params[p + "ln_2.bias"])
        if cfg.is_switch_layer(l):
            y, st = switch_ffn(h.reshape(B * T, -1), params, p + "moe.", cfg, capacity_factor, policy)
            x = x + y.view(B, T, -1)
            stats.append(st)
        else:
            x = x + ffn(h, params[p + "mlp.c_fc.weight"], params[p + "mlp.c_fc.bias"],
                        params[p + "mlp.c_proj.weight"], params[p + "mlp.c_proj.bias"])
    x = layernorm(x, params["ln_f.weight"], params["ln_f.bias"])
    logits = linear(x, params["wte.weight"])                                    # (B, T, V), tied
    return logits, stats


@dataclass
class MicroStepLosses:
    loss: torch.Tensor          # lm + aux * sum lb + z_coeff * sum z (one micro-step)
    lm: torch.Tensor
    lb: torch.Tensor            # summed over Switch layers, before coefficient
    z: torch.Tensor
    stats: list
    logits: torch.Tensor


def micro_step_losses(params, cfg, inputs_BT, targets_BT, capacity_factor, policy,
                      aux_coeff, z_coeff):
    """DESIGN, Losses: loss = lm_loss + aux_coeff * sum_layers lb + z_coeff * sum_layers z,
    lm_loss = mean cross-entropy over the micro-batch's target tokens."""
    logits, stats = forward(params, cfg, inputs_BT, capacity_factor, policy)
    lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets_BT.reshape(-1))
    zero = logits.new_zeros(())
    lb = sum((s.lb for s in stats), zero)
    z = sum((s.z for s in stats), zero)
    return MicroStepLosses(loss=lm + aux_coeff * lb + z_coeff * z, lm=lm, lb=lb, z=z,
                           stats=stats, logits=logits)


# ----------------------------------------------------------------------------------------
# Optimizer, clipping and schedule (DESIGN, Optimizer and schedule)

def make_optimizer(params, lr, beta1, beta2, eps, weight_decay):
    """torch.optim.AdamW; decay only for tensors with >= 2 dims (others weight decay 0)."""
    decay = [p for p in params.values() if p.dim() >= 2]
    no_decay = [p for p in params.values() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(beta1, beta2), eps=eps)


def global_grad_norm(params):
    """Global L2 norm of all gradients, each parameter once (tied wte counted once)."""
    total = 0.0
    for p in params.values():
        if p.grad is not None:
            total += float((p.grad.double() ** 2).sum())
    return math.sqrt(total)


def clip_factor(grad_norm, clip):
    """THE clipping formula (torch.nn.utils.clip_grad_norm_): grads *= min(1, clip/(norm+1e-6));
    clip <= 0 disables clipping."""
    if clip <= 0.0:
        return 1.0
    return min(1.0, clip / (grad_norm + 1e-6))


def lr_at(k, lr, min_lr, warmup, train_iters, style):
    """LR at iteration k (1-based): warmup lr*k/W for k <= W; then 'constant' lr, or 'linear' /
    'cosine' from lr to min_lr at train_iters with progress (k-W)/(train_iters-W)."""
    if warmup > 0 and k <= warmup:
        return lr * k / warmup
    if style == "constant":
        return lr
    span = train_iters - warmup
    progress = 1.0 if span <= 0 else min(1.0, max(0.0, (k - warmup) / span))
    if style == "linear":
        return lr - (lr - min_lr) * progress
    if style == "cosine":
        return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    raise ValueError("unknown --lr-decay-style %r (constant|linear|cosine)" % style)


# ----------------------------------------------------------------------------------------
# Data (DESIGN, Data)

LLMC_MAGIC, LLMC_VERSION = 20240520, 1


def _read_one(path, fmt):
    raw = np.fromfile(path, dtype=np.uint8)
    if fmt == "auto":
        is_llmc = raw.size >= 1024 and tuple(raw[:8].view("<i4")) == (LLMC_MAGIC, LLMC_VERSION)
        fmt = "llmc" if is_llmc else "bytes"
    if fmt == "bytes":
        return raw.astype(np.int64)
    if fmt == "llmc":
        header = raw[:1024].view("<i4")
        if header[0] != LLMC_MAGIC or header[1] != LLMC_VERSION:
            raise ValueError("%s: not an llm.c shard (magic %d version %d)" % (path, header[0], header[1]))
        count = int(header[2])
        toks = raw[1024:].view("<u2")
        if toks.size < count:
            raise ValueError("%s: header says %d tokens, file holds %d" % (path, count, toks.size))
        return toks[:count].astype(np.int64)
    if fmt == "uint16":
        return raw[: raw.size // 2 * 2].view("<u2").astype(np.int64)
    raise ValueError("unknown --data-format %r (auto|bytes|llmc|uint16)" % fmt)


def load_tokens(path, fmt="auto"):
    """Raw bytes (vocab 256), llm.c shards (256 int32 header: magic 20240520, version 1, count;
    then uint16 tokens; several by glob, concatenated in name order), or raw uint16.
    'auto' picks llm.c when the magic and version match, else bytes."""
    paths = sorted(glob.glob(path)) if any(c in path for c in "*?[") else [path]
    if not paths:
        raise ValueError("no file matches --data-path %s" % path)
    return np.concatenate([_read_one(p, fmt) for p in paths])


class Windows:
    """Window w = tokens[w*T : w*T+T+1] (T inputs, targets shifted by one);
    n = floor((N-1)/T); --valid-fraction f holds out the last ceil(f*n) windows."""

    def __init__(self, tokens, seq_len, valid_fraction=0.0):
        self.tokens = torch.from_numpy(tokens)
        self.T = seq_len
        self.n = (len(tokens) - 1) // seq_len
        self.n_valid = int(math.ceil(valid_fraction * self.n)) if valid_fraction > 0 else 0
        self.n_train = self.n - self.n_valid
        if self.n_train <= 0:
            raise ValueError("no training windows (n=%d, held out %d)" % (self.n, self.n_valid))

    def batch(self, window_ids):
        """Inputs and targets (B, T) of the given windows."""
        rows = [self.tokens[w * self.T: w * self.T + self.T + 1] for w in window_ids]
        x = torch.stack(rows)
        return x[:, :-1].contiguous(), x[:, 1:].contiguous()

    def train_windows(self, k, global_batch):
        """--data-order sequential: iteration k (1-based) takes training windows
        (k-1)*G .. k*G-1 modulo n_train (single rank: dp = 1)."""
        return [((k - 1) * global_batch + i) % self.n_train for i in range(global_batch)]


# ----------------------------------------------------------------------------------------
# Modes

def _dtype(name):
    return {"float64": torch.float64, "float32": torch.float32}[name]


def evaluate(params, cfg, windows, window_ids, micro_batch, capacity_factor, policy, max_batches=0):
    """Mean CE per target token over the given windows in order, micro-batch by micro-batch
    (the last one may be smaller); capacity per micro-batch with the eval capacity factor.
    Returns (loss, tokens)."""
    total, tokens, done = 0.0, 0, 0
    with torch.no_grad():
        for i in range(0, len(window_ids), micro_batch):
            if max_batches and done >= max_batches:
                break
            x, y = windows.batch(window_ids[i:i + micro_batch])
            logits, _ = forward(params, cfg, x, capacity_factor, policy)
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                           reduction="sum"))
            tokens += y.numel()
            done += 1
    return total / max(tokens, 1), tokens


def cmd_make_weights(a):
    cfg = Config(a.num_layers, a.hidden_size, a.num_attention_heads, a.ffn_hidden_size,
                 a.num_experts, a.moe_layer_freq, a.moe_router_topk, a.vocab_size,
                 a.max_position_embeddings)
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError("heads must divide hidden size")
    write_safetensors(a.out, make_weights(cfg, a.seed, a.init_scale), cfg.metadata())
    print(json.dumps({"out": a.out, "params": sum(int(np.prod(s)) for s in cfg.param_shapes().values())}))


def _check_tokens(windows, cfg):
    mx = int(windows.tokens.max())
    if mx >= cfg.vocab_size:
        raise ValueError("token id %d >= vocab_size %d" % (mx, cfg.vocab_size))


def cmd_train(a):
    dtype = _dtype(a.dtype)
    cfg, params = load_params(a.init_from, dtype)
    if a.moe_router_topk:
        cfg.moe_router_topk = a.moe_router_topk
    if a.data_order != "sequential":
        raise ValueError("only --data-order sequential is implemented by the reference")
    if a.global_batch_size % a.micro_batch_size:
        raise ValueError("micro-batch-size must divide global-batch-size")
    num_micro = a.global_batch_size // a.micro_batch_size
    windows = Windows(load_tokens(a.data_path, a.data_format), a.seq_length, a.valid_fraction)
    _check_tokens(windows, cfg)
    opt = make_optimizer(params, a.lr, a.adam_beta1, a.adam_beta2, a.adam_eps, a.weight_decay)
    out = open(a.metrics_file, "w") if a.metrics_file else None
    for k in range(1, a.train_iters + 1):
        t0 = time.time()
        lr = lr_at(k, a.lr, a.min_lr, a.lr_warmup_iters, a.train_iters, a.lr_decay_style)
        # Dense zero gradients, not None: an expert that received no token this iteration
        # still gets its weight decay and Adam moment update, like a trainer whose gradients
        # live in one zeroed buffer (torch.optim skips params whose grad is None).
        for p in params.values():
            p.grad = torch.zeros_like(p)
        ids = windows.train_windows(k, a.global_batch_size)
        lm = lb = z = 0.0
        dropped = choices = 0
        load = None
        for m in range(num_micro):
            x, y = windows.batch(ids[m * a.micro_batch_size:(m + 1) * a.micro_batch_size])
            r = micro_step_losses(params, cfg, x, y, a.moe_expert_capacity_factor,
                                  a.moe_token_drop_policy, a.moe_aux_loss_coeff, a.moe_z_loss_coeff)
            (r.loss / num_micro).backward()   # DESIGN: each micro-step contributes 1/num_micro
            lm += float(r.lm) / num_micro
            lb += float(r.lb) / num_micro
            z += float(r.z) / num_micro
            dropped += sum(s.num_dropped for s in r.stats)
            choices += sum(s.num_choices for s in r.stats)
            cnt = [s.counts_E.tolist() for s in r.stats]
            load = cnt if load is None else [[u + v for u, v in zip(a_, b_)] for a_, b_ in zip(load, cnt)]
        norm = global_grad_norm(params)
        factor = clip_factor(norm, a.clip_grad)
        with torch.no_grad():
            for p in params.values():
                if p.grad is not None and factor != 1.0:
                    p.grad.mul_(factor)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        dt = time.time() - t0
        rec = OrderedDict([
            ("iteration", k), ("lm_loss", lm), ("load_balancing_loss", lb), ("z_loss", z),
            ("grad_norm", norm), ("lr", lr),
            ("tokens_per_sec", a.global_batch_size * a.seq_length / dt),
            ("dropped_fraction", dropped / choices if choices else 0.0),
            ("expert_load", load or []),
        ])
        line = json.dumps(rec)
        if out:
            out.write(line + "\n")
            out.flush()
        if not a.quiet:
            print(line)
        if a.eval_interval and k % a.eval_interval == 0 and windows.n_valid:
            vids = list(range(windows.n_train, windows.n))
            vl, _ = evaluate(params, cfg, windows, vids, a.micro_batch_size,
                             a.moe_eval_capacity_factor, a.moe_token_drop_policy, a.eval_iters)
            vline = json.dumps({"iteration": k, "val_loss": vl})
            if out:
                out.write(vline + "\n")
                out.flush()
            if not a.quiet:
                print(vline)
    if out:
        out.close()
    if a.export_safetensors:
        write_safetensors(a.export_safetensors, params, cfg.metadata())


def cmd_eval(a):
    dtype = _dtype(a.dtype)
    cfg, params = load_params(a.model, dtype)
    windows = Windows(load_tokens(a.data_path, a.data_format), a.seq_length, 0.0)
    _check_tokens(windows, cfg)
    loss, tokens = evaluate(params, cfg, windows, list(range(windows.n)), a.micro_batch_size,
                            a.moe_eval_capacity_factor, a.moe_token_drop_policy, a.eval_iters)
    print(json.dumps({"loss": loss, "tokens": tokens}))


def cmd_grads(a):
    dtype = _dtype(a.dtype)
    cfg, params = load_params(a.init_from, dtype)
    if a.moe_router_topk:
        cfg.moe_router_topk = a.moe_router_topk
    windows = Windows(load_tokens(a.data_path, a.data_format), a.seq_length, 0.0)
    _check_tokens(windows, cfg)
    if windows.n < a.micro_batch_size:
        raise ValueError("data has %d windows < micro-batch-size" % windows.n)
    x, y = windows.batch(range(a.micro_batch_size))
    r = micro_step_losses(params, cfg, x, y, a.moe_expert_capacity_factor, a.moe_token_drop_policy,
                          a.moe_aux_loss_coeff, a.moe_z_loss_coeff)
    r.loss.backward()
    out = OrderedDict()
    out["logits"] = r.logits.detach().float()
    for name, v in (("lm_loss", r.lm), ("load_balancing_loss", r.lb), ("z_loss", r.z), ("loss", r.loss)):
        out[name] = v.detach().reshape(1).float()
    for name, p in params.items():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        out["grad." + name] = g.detach().float()
    meta = cfg.metadata()
    meta["dropped_fraction"] = repr(sum(s.num_dropped for s in r.stats) /
                                    max(1, sum(s.num_choices for s in r.stats)))
    write_safetensors(a.out, out, meta)
    print(json.dumps({"out": a.out, "lm_loss": float(r.lm), "load_balancing_loss": float(r.lb),
                      "z_loss": float(r.z), "loss": float(r.loss), "grad_norm": global_grad_norm(params)}))


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)

    def common_moe(p, train=True):
        p.add_argument("--dtype", default="float64", choices=["float64", "float32"])
        p.add_argument("--data-path", required=True)
        p.add_argument("--data-format", default="auto", choices=["auto", "bytes", "llmc", "uint16"])
        p.add_argument("--seq-length", type=int, required=True)
        p.add_argument("--micro-batch-size", type=int, required=True)
        p.add_argument("--moe-token-drop-policy", default="position", choices=["position", "probs"])
        if train:
            p.add_argument("--moe-expert-capacity-factor", type=float, default=1.25,
                           help="0 = dropless (default 1.25; pass it explicitly in comparisons)")
            p.add_argument("--moe-router-topk", type=int, default=0,
                           help="override the metadata's moe_router_topk (0 = keep)")
            p.add_argument("--moe-aux-loss-coeff", type=float, default=0.01)
            p.add_argument("--moe-z-loss-coeff", type=float, default=0.001)

    m = sub.add_parser("make-weights", help="random weights of our own choosing")
    m.add_argument("--out", required=True)
    m.add_argument("--seed", type=int, default=1234)
    m.add_argument("--init-scale", type=float, default=0.1)
    m.add_argument("--num-layers", type=int, default=2)
    m.add_argument("--hidden-size", type=int, default=32)
    m.add_argument("--num-attention-heads", type=int, default=2)
    m.add_argument("--ffn-hidden-size", type=int, default=64)
    m.add_argument("--num-experts", type=int, default=4)
    m.add_argument("--moe-layer-freq", type=int, default=2)
    m.add_argument("--moe-router-topk", type=int, default=1)
    m.add_argument("--vocab-size", type=int, default=256)
    m.add_argument("--max-position-embeddings", type=int, default=1024)

    t = sub.add_parser("train", help="training loop -> metrics JSONL")
    t.add_argument("--init-from", required=True)
    common_moe(t)
    t.add_argument("--global-batch-size", type=int, required=True)
    t.add_argument("--train-iters", type=int, required=True)
    t.add_argument("--lr", type=float, default=3e-4)
    t.add_argument("--min-lr", type=float, default=0.0)
    t.add_argument("--lr-warmup-iters", type=int, default=0)
    t.add_argument("--lr-decay-style", default="cosine", choices=["constant", "linear", "cosine"])
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--adam-beta1", type=float, default=0.9)
    t.add_argument("--adam-beta2", type=float, default=0.95)
    t.add_argument("--adam-eps", type=float, default=1e-8)
    t.add_argument("--clip-grad", type=float, default=1.0)
    t.add_argument("--valid-fraction", type=float, default=0.1)
    t.add_argument("--data-order", default="sequential")
    t.add_argument("--moe-eval-capacity-factor", type=float, default=2.0)
    t.add_argument("--eval-interval", type=int, default=0, help="0 = no evaluation")
    t.add_argument("--eval-iters", type=int, default=0, help="micro-batches per evaluation, 0 = all")
    t.add_argument("--seed", type=int, default=1234, help="accepted for parity; unused (no shuffle/jitter)")
    t.add_argument("--metrics-file", default="")
    t.add_argument("--export-safetensors", default="")
    t.add_argument("--quiet", action="store_true", help="do not echo metrics to stdout")

    e = sub.add_parser("eval", help="mean CE over every window of a data file")
    e.add_argument("--model", required=True)
    common_moe(e, train=False)
    e.add_argument("--eval-iters", type=int, default=0, help="micro-batches to evaluate, 0 = all")
    e.add_argument("--moe-eval-capacity-factor", type=float, default=2.0)

    g = sub.add_parser("grads", help="one forward/backward on micro-batch 0 -> safetensors")
    g.add_argument("--init-from", required=True)
    common_moe(g)
    g.add_argument("--out", required=True)
    return ap


def main(argv=None):
    a = build_parser().parse_args(argv)
    try:
        {"make-weights": cmd_make_weights, "train": cmd_train, "eval": cmd_eval,
         "grads": cmd_grads}[a.mode](a)
    except (ValueError, OSError) as err:
        print("moe_ref.py %s: error: %s" % (a.mode, err), file=sys.stderr)
        return 2 if isinstance(err, ValueError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
