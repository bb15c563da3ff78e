#!/usr/bin/env python3
"""Generates the PyTorch reference fixtures that `cargo test` compares the CPU engine against.

    python3 -m venv .venv && .venv/bin/pip install -r tools/requirements.txt
    .venv/bin/python tools/gen_fixtures.py            # writes tests/fixtures/*.safetensors

Everything is float32 on the CPU with fixed seeds. Each interface is written the way its reference
code writes it (s3prl's Featurizer for WS, atosystem/SSL_Interface for HConv, including its float
depth formula), not the way strata computes it, so the fixtures check strata's layout choices too.
Layouts: the hidden-state stack is frame-major [frames, L, D]; PyTorch code sees it as (L, 1, T, D).
Parameter names are strata's (see README "Parameter names").
"""
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file as _save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
torch.set_num_threads(1)


def hash_uniform(n, bound, seed):
    """Reproducible in Rust without storing: u_i = frac((i * 2654435761 + seed * 40503) / 2^32)."""
    i = np.arange(n, dtype=np.uint64)
    x = (i * np.uint64(2654435761) + np.uint64(seed * 40503)) % np.uint64(2**32)
    u = x.astype(np.float64) / 2.0**32
    return torch.tensor(((2.0 * u - 1.0) * bound).astype(np.float32))


# ---------------------------------------------------------------- interfaces (reference forms)
class WeightedSum(nn.Module):  # s3prl Featurizer
    def __init__(self, L, D, normalize):
        super().__init__()
        self.weights = nn.Parameter(torch.zeros(L))
        self.normalize = normalize

    def forward(self, stacked):  # (L, B, T, D)
        if self.normalize:
            stacked = F.layer_norm(stacked, (stacked.shape[-1],))
        w = F.softmax(self.weights, dim=-1)
        return (w.view(-1, 1, 1, 1) * stacked).sum(dim=0)


def hconv_transforms(L, D, kernel, stride):  # atosystem/SSL_Interface HierarchicalConvInterface
    n = math.floor(np.log(L) / np.log(stride))
    seq = nn.Sequential()
    for i in range(n):
        pad = math.floor(kernel / 2)
        L = int(np.floor((L + 2 * pad - (kernel - 1) - 1) / stride + 1))
        out_c = math.ceil(D // L) if i == n - 1 else D
        seq.append(nn.Conv1d(D, out_c, kernel_size=kernel, stride=stride, padding=pad))
        seq.append(nn.ReLU())
    return seq


class HConv(nn.Module):
    def __init__(self, L, D, kernel=5, stride=3, normalize=False):
        super().__init__()
        self.transforms = hconv_transforms(L, D, kernel, stride)
        self.normalize = normalize

    def forward(self, stacked):
        if self.normalize:
            stacked = F.layer_norm(stacked, (stacked.shape[-1],))
        L, B, T, D = stacked.shape
        x = stacked.permute(1, 2, 3, 0).reshape(-1, D, L)
        x = self.transforms(x)
        return x.reshape(B * T, -1).view(B, T, -1)

    def strata_params(self):
        convs = [m for m in self.transforms if isinstance(m, nn.Conv1d)]
        out = {}
        for i, c in enumerate(convs):
            out[f"conv{i}.weight"] = c.weight
            out[f"conv{i}.bias"] = c.bias
        return out


class ConcatProj(nn.Module):
    def __init__(self, L, D, out_dim):
        super().__init__()
        self.proj = nn.Linear(L * D, out_dim)

    def forward(self, stacked):
        return self.proj(torch.cat(list(stacked), dim=-1))


class GroupWS(nn.Module):
    def __init__(self, L, D, k, out_dim):
        super().__init__()
        self.splits = [len(a) for a in np.array_split(np.arange(L), k)]
        self.ws = nn.ParameterList([nn.Parameter(torch.zeros(s)) for s in self.splits])
        self.proj = nn.Linear(k * D, out_dim)

    def forward(self, stacked):
        outs, first = [], 0
        for w, s in zip(self.ws, self.splits):
            p = F.softmax(w, -1)
            outs.append((p.view(-1, 1, 1, 1) * stacked[first:first + s]).sum(0))
            first += s
        return self.proj(torch.cat(outs, dim=-1))

    def strata_params(self):
        out = {f"group{g}.weights": w for g, w in enumerate(self.ws)}
        out["proj.weight"], out["proj.bias"] = self.proj.weight, self.proj.bias
        return out


class SingleLayer(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, stacked):
        return stacked[self.layer]


class ClsPool(nn.Module):
    def __init__(self, L, D, heads, ffn, activation):
        super().__init__()
        self.cls = nn.Parameter(0.02 * torch.randn(D))
        self.layer = nn.TransformerEncoderLayer(D, heads, ffn, dropout=0.0, activation=activation,
                                                batch_first=True, norm_first=True)
        with torch.no_grad():  # non-zero biases so the test exercises them
            self.layer.self_attn.in_proj_bias.uniform_(-0.1, 0.1)
            self.layer.self_attn.out_proj.bias.uniform_(-0.1, 0.1)
            self.layer.norm1.weight.uniform_(0.5, 1.5)
            self.layer.norm2.bias.uniform_(-0.1, 0.1)

    def forward(self, stacked):
        L, B, T, D = stacked.shape
        tokens = stacked.permute(1, 2, 0, 3).reshape(B * T, L, D)
        tokens = torch.cat([self.cls.expand(B * T, 1, D), tokens], dim=1)
        return self.layer(tokens)[:, 0].view(B, T, D)

    def strata_params(self):
        """strata name -> (parameter, row slice): strata keeps q/k/v apart, torch packs them."""
        l, D = self.layer, self.cls.shape[0]
        w, b = l.self_attn.in_proj_weight, l.self_attn.in_proj_bias
        q, k, v = slice(0, D), slice(D, 2 * D), slice(2 * D, 3 * D)
        return {
            "cls": self.cls,
            "ln1.weight": l.norm1.weight, "ln1.bias": l.norm1.bias,
            "attn.q_proj.weight": (w, q), "attn.q_proj.bias": (b, q),
            "attn.k_proj.weight": (w, k), "attn.k_proj.bias": (b, k),
            "attn.v_proj.weight": (w, v), "attn.v_proj.bias": (b, v),
            "attn.out_proj.weight": l.self_attn.out_proj.weight, "attn.out_proj.bias": l.self_attn.out_proj.bias,
            "ln2.weight": l.norm2.weight, "ln2.bias": l.norm2.bias,
            "ffn1.weight": l.linear1.weight, "ffn1.bias": l.linear1.bias,
            "ffn2.weight": l.linear2.weight, "ffn2.bias": l.linear2.bias,
        }


def default_params(m):
    return {k: v for k, v in m.named_parameters()}


def interface_case(fx, name, module, params, L, D, N=5, seed=0):
    g = torch.Generator().manual_seed(1000 + seed)
    stack = torch.randn(N, L, D, generator=g)
    stack_in = stack.clone().requires_grad_(True)
    out = module(stack_in.permute(1, 0, 2).unsqueeze(1)).reshape(N, -1)
    r = torch.randn(out.shape, generator=g)
    loss = (out * r).sum()
    # A value is a parameter, or (parameter, row slice) for strata tensors cut out of a torch one.
    entries = {k: (v if isinstance(v, tuple) else (v, slice(None))) for k, v in params.items()}
    parents = list({id(p): p for p, _ in entries.values()}.values())
    gs = torch.autograd.grad(loss, parents + [stack_in])
    grad_of = {id(p): g for p, g in zip(parents, gs)}
    fx[f"{name}.stack"] = stack
    fx[f"{name}.out"] = out.detach()
    fx[f"{name}.r"] = r
    fx[f"{name}.dstack"] = gs[-1]
    for k, (p, sl) in entries.items():
        fx[f"{name}.param.{k}"] = p.detach()[sl].clone()
        fx[f"{name}.grad.{k}"] = grad_of[id(p)][sl].clone()


def gen_interfaces():
    fx = {}
    torch.manual_seed(0)
    D = 12
    for L in (2, 7, 13, 25):
        for normalize in (False, True):
            m = WeightedSum(L, D, normalize)
            with torch.no_grad():
                m.weights.normal_()  # zeros at init; random here so the softmax is not uniform
            interface_case(fx, f"ws_L{L}{'_norm' if normalize else ''}", m, default_params(m), L, D, seed=L)
        m = HConv(L, D)
        interface_case(fx, f"hconv_L{L}", m, m.strata_params(), L, D, seed=L + 1)
        m = ConcatProj(L, D, D)
        interface_case(fx, f"concat_L{L}", m, default_params(m), L, D, seed=L + 2)
        k = 2 if L == 2 else 3
        m = GroupWS(L, D, k, D)
        with torch.no_grad():
            for w in m.ws:
                w.normal_()
        interface_case(fx, f"groupws{k}_L{L}", m, m.strata_params(), L, D, seed=L + 3)
        m = SingleLayer(L // 2)
        interface_case(fx, f"single_L{L}", m, {}, L, D, seed=L + 4)
        act = "gelu" if L in (7, 25) else "relu"
        m = ClsPool(L, D, heads=3, ffn=20, activation=act)
        interface_case(fx, f"cls_L{L}", m, m.strata_params(), L, D, seed=L + 5)
    m = HConv(13, D, normalize=True)
    interface_case(fx, "hconv_L13_norm", m, m.strata_params(), 13, D, seed=77)
    m = HConv(7, D, kernel=3, stride=2)
    interface_case(fx, "hconv_L7_k3s2", m, m.strata_params(), 7, D, seed=78)
    m = HConv(25, D, kernel=4, stride=4)
    interface_case(fx, "hconv_L25_k4s4", m, m.strata_params(), 25, D, seed=79)
    save_file(fx, os.path.join(OUT, "interfaces.safetensors"))


def gen_hconv_base():
    """Full-size HConv (13 x 768), a few frames. Parameters come from hash_uniform (reproduced in
    Rust, not stored); the weight gradient is stored at a fixed stride to stay small."""
    L, D, N = 13, 768, 3
    m = HConv(L, D)
    assert sum(p.numel() for p in m.parameters()) == 4_424_832
    assert sum(p.numel() for p in HConv(25, 1024).parameters()) == 6_990_165
    params = m.strata_params()
    with torch.no_grad():
        for i, (k, p) in enumerate(params.items()):
            fan_in = p.shape[1] * p.shape[2] if p.dim() == 3 else params[k.replace("bias", "weight")].shape[1] * 5
            p.copy_(hash_uniform(p.numel(), 1.0 / math.sqrt(fan_in), i + 1).view(p.shape))
    fx = {}
    interface_case(fx, "hconv_base", m, params, L, D, N=N, seed=5)
    for k in list(fx):
        if ".param." in k:
            del fx[k]
        elif ".grad." in k and k.endswith("weight"):
            fx[k] = fx[k].flatten()[::101].clone()
    save_file(fx, os.path.join(OUT, "hconv_base.safetensors"))


# ---------------------------------------------------------------- heads, losses
def packed_to_padded(x, lengths):
    B, T = len(lengths), max(lengths)
    out = x.new_zeros(B, T, x.shape[-1])
    o = 0
    for b, l in enumerate(lengths):
        out[b, :l] = x[o:o + l]
        o += l
    return out


def gen_heads():
    fx = {}
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    lengths = [3, 4, 2]
    N, Din, H, V, C = sum(lengths), 10, 256, 7, 4
    x = torch.randn(N, Din, generator=g, requires_grad=True)
    # PR head: Linear(D', 256) -> Linear(256, V) -> log_softmax -> CTC (s3prl ctc expert)
    proj, out = nn.Linear(Din, H), nn.Linear(H, V)
    logits = out(proj(x))
    targets = [[1, 2], [3, 3, 1], [5]]
    lp = packed_to_padded(F.log_softmax(logits, -1), lengths).transpose(0, 1)
    loss = F.ctc_loss(lp, torch.tensor(sum(targets, [])), torch.tensor(lengths),
                      torch.tensor([len(t) for t in targets]), blank=0, zero_infinity=True)
    ps = {"proj.weight": proj.weight, "proj.bias": proj.bias, "out.weight": out.weight, "out.bias": out.bias}
    gs = torch.autograd.grad(loss, list(ps.values()) + [x])
    fx["pr.x"], fx["pr.logits"], fx["pr.loss"] = x.detach(), logits.detach(), loss.detach().reshape(1)
    fx["pr.dx"] = gs[-1]
    for (k, p), gk in zip(ps.items(), gs):
        fx[f"pr.param.{k}"], fx[f"pr.grad.{k}"] = p.detach(), gk
    # Utterance classifier: Linear(D', 256) -> mean over valid frames -> Linear(256, C) -> CE
    proj, out = nn.Linear(Din, H), nn.Linear(H, C)
    h = packed_to_padded(proj(x), lengths)
    lens = torch.tensor(lengths)
    pooled = torch.stack([h[b, :l].mean(0) for b, l in enumerate(lengths)])
    logits = out(pooled)
    labels = torch.tensor([2, 0, 3])
    loss = F.cross_entropy(logits, labels)
    ps = {"proj.weight": proj.weight, "proj.bias": proj.bias, "out.weight": out.weight, "out.bias": out.bias}
    gs = torch.autograd.grad(loss, list(ps.values()) + [x])
    fx["cls.logits"], fx["cls.loss"], fx["cls.dx"] = logits.detach(), loss.detach().reshape(1), gs[-1]
    fx["cls.labels"] = labels
    for (k, p), gk in zip(ps.items(), gs):
        fx[f"cls.param.{k}"], fx[f"cls.grad.{k}"] = p.detach(), gk
    fx["lengths"], fx["targets"] = lens, torch.tensor(sum(targets, []))
    save_file(fx, os.path.join(OUT, "heads.safetensors"))


def gen_losses():
    fx = {}
    g = torch.Generator().manual_seed(4)
    V = 6
    cases = {
        # name: (input lengths, targets)
        "repeats": ([8, 6], [[1, 1, 2], [3, 3]]),
        "blank_heavy": ([12, 10, 9], [[2], [], [4, 1]]),
        "impossible": ([3, 5], [[1, 1], [2, 3]]),  # "1 1" needs 3 frames; given 3 it is possible...
        "impossible2": ([2, 5], [[2, 2], [2, 3]]),  # ...with 2 it is not
        "mixed": ([1, 4, 15, 7], [[5], [1, 2], [1, 2, 3, 4, 5, 1], [2, 2, 2]]),
    }
    for name, (lengths, targets) in cases.items():
        x = torch.randn(sum(lengths), V, generator=g) * 2.0
        fx[f"ctc.{name}.logits"] = x
        fx[f"ctc.{name}.lengths"] = torch.tensor(lengths)
        fx[f"ctc.{name}.target_lengths"] = torch.tensor([len(t) for t in targets])
        fx[f"ctc.{name}.targets"] = torch.tensor(sum(targets, []) or [0])
        for red in ("mean", "sum", "none"):
            xi = x.clone().requires_grad_(True)
            lp = packed_to_padded(F.log_softmax(xi, -1), lengths).transpose(0, 1)
            loss = F.ctc_loss(lp, torch.tensor(sum(targets, []), dtype=torch.long), torch.tensor(lengths),
                              torch.tensor([len(t) for t in targets]), blank=0, reduction=red, zero_infinity=True)
            fx[f"ctc.{name}.{red}.loss"] = loss.detach().reshape(-1)
            if red != "none":
                (gx,) = torch.autograd.grad(loss, xi)
                fx[f"ctc.{name}.{red}.dlogits"] = gx
    # cross-entropy
    x = torch.randn(6, 5, generator=g) * 3.0
    y = torch.tensor([0, 4, 2, 2, 1, 3])
    fx["ce.logits"], fx["ce.labels"] = x, y
    for red in ("mean", "sum"):
        xi = x.clone().requires_grad_(True)
        loss = F.cross_entropy(xi, y, reduction=red)
        (gx,) = torch.autograd.grad(loss, xi)
        fx[f"ce.{red}.loss"], fx[f"ce.{red}.dlogits"] = loss.detach().reshape(1), gx
    save_file(fx, os.path.join(OUT, "losses.safetensors"))


def gen_ops():
    fx = {}
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 9, generator=g) * 2
    r = torch.randn(7, 9, generator=g)
    fx["x"], fx["r"] = x, r
    w, b = torch.rand(9, generator=g) + 0.5, torch.randn(9, generator=g)
    fx["ln.weight"], fx["ln.bias"] = w, b
    for name, f in {
        "gelu": lambda t: F.gelu(t),
        "relu": lambda t: F.relu(t),
        "softmax": lambda t: F.softmax(t, -1),
        "log_softmax": lambda t: F.log_softmax(t, -1),
        "ln_affine": lambda t: F.layer_norm(t, (9,), w, b),
        "ln_plain": lambda t: F.layer_norm(t, (9,)),
    }.items():
        xi = x.clone().requires_grad_(True)
        y = f(xi)
        (gx,) = torch.autograd.grad((y * r).sum(), xi)
        fx[f"{name}.y"], fx[f"{name}.dx"] = y.detach(), gx
    wi, bi = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    y = F.layer_norm(x, (9,), wi, bi)
    fx["ln_affine.dweight"], fx["ln_affine.dbias"] = torch.autograd.grad((y * r).sum(), [wi, bi])
    save_file(fx, os.path.join(OUT, "ops.safetensors"))


# ---------------------------------------------------------------- optimizers
def gen_optim():
    fx = {}
    g = torch.Generator().manual_seed(6)
    shapes = [(4, 3), (5,), (2, 2, 2)]
    for name, ctor in {
        "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01),
        "adam_l2": lambda ps: torch.optim.Adam(ps, lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
    }.items():
        ps = [torch.randn(s, generator=g).requires_grad_(True) for s in shapes]
        for i, p in enumerate(ps):
            fx[f"{name}.init.{i}"] = p.detach().clone()
        opt = ctor(ps)
        for step in range(10):
            for i, p in enumerate(ps):
                p.grad = torch.randn(p.shape, generator=g) * (10.0 ** (i - 1))
                fx[f"{name}.step{step}.grad.{i}"] = p.grad.clone()
            opt.step()
            for i, p in enumerate(ps):
                fx[f"{name}.step{step}.param.{i}"] = p.detach().clone()
    # clip_grad_norm_: one case that clips, one that does not
    for name, max_norm in (("clip", 1.0), ("noclip", 1e3)):
        ps = [torch.randn(s, generator=g).requires_grad_(True) for s in shapes]
        for i, p in enumerate(ps):
            p.grad = torch.randn(p.shape, generator=g) * 3
            fx[f"{name}.grad.{i}"] = p.grad.clone()
        total = torch.nn.utils.clip_grad_norm_(ps, max_norm)
        fx[f"{name}.total"] = total.reshape(1)
        for i, p in enumerate(ps):
            fx[f"{name}.clipped.{i}"] = p.grad.clone()
    save_file(fx, os.path.join(OUT, "optim.safetensors"))


# ---------------------------------------------------------------- end to end
def gen_end_to_end():
    """20 steps: HConv(13 x 24) + PR head + CTC(mean) + clip 1.0 + AdamW, one fixed packed batch."""
    torch.manual_seed(9)
    g = torch.Generator().manual_seed(9)
    L, D, V = 13, 24, 8
    lengths = [12, 9, 15]
    targets = [[1, 2, 2, 3], [4, 5], [6, 7, 1, 1, 2]]
    hconv = HConv(L, D)
    proj, out = nn.Linear(hconv.transforms[-2].out_channels * 2, 256), nn.Linear(256, V)
    params = {f"interface.{k}": v for k, v in hconv.strata_params().items()}
    params.update({"head.proj.weight": proj.weight, "head.proj.bias": proj.bias,
                   "head.out.weight": out.weight, "head.out.bias": out.bias})
    fx = {f"init.{k}": v.detach().clone() for k, v in params.items()}
    stack = torch.randn(sum(lengths), L, D, generator=g)
    opt = torch.optim.AdamW(list(params.values()), lr=2e-3, weight_decay=0.01)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        feats = hconv(stack.permute(1, 0, 2).unsqueeze(1)).reshape(sum(lengths), -1)
        lp = F.log_softmax(out(proj(feats)), -1)
        lp = packed_to_padded(lp, lengths).transpose(0, 1)
        loss = F.ctc_loss(lp, torch.tensor(sum(targets, [])), torch.tensor(lengths),
                          torch.tensor([len(t) for t in targets]), blank=0, zero_infinity=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        losses.append(loss.item())
    fx["stack"], fx["losses"] = stack, torch.tensor(losses)
    fx["lengths"], fx["targets"] = torch.tensor(lengths), torch.tensor(sum(targets, []))
    fx["target_lengths"] = torch.tensor([len(t) for t in targets])
    for k, v in params.items():
        fx[f"final.{k}"] = v.detach().clone()
    save_file(fx, os.path.join(OUT, "end_to_end.safetensors"))


def save_file(fx, path):
    _save_file({k: v.detach().contiguous() for k, v in fx.items()}, path)


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    gen_interfaces()
    gen_hconv_base()
    gen_heads()
    gen_losses()
    gen_ops()
    gen_optim()
    gen_end_to_end()
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(f"fixtures written to {os.path.normpath(OUT)}: {total / 1e6:.2f} MB")
