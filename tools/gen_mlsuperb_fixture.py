#!/usr/bin/env python3
"""The ML-SUPERB head's reference (tests/fixtures/mlsuperb.safetensors), written the way ESPnet's
ml_superb recipe computes it on a PADDED batch with masks (espnet2 ESPnetASRModel in eval mode:
UtteranceMVN with norm_means only, LinearProjection preencoder, TransformerEncoder with
input_layer conv2d2 and normalize_before, ESPnet's LayerNorm eps 1e-12, MultiHeadedAttention with
its key-padding mask, PositionwiseFeedForward with ReLU, after_norm, CTC's ctc_lo with
reduction "sum" / batch size and zero_infinity). Each utterance runs as a batch of its own:
ESPnet subsamples a padded batch's mask by slicing the padded length (x_mask[:, :, :-2:2][:, :,
:-2:1]), so in a padded batch a shorter utterance keeps (t + 1) / 2 frames, the last ones computed
from padding; alone (as at inference) it gets (t - 1) / 2 - 2, which is what strata gives every
utterance of a packed batch. Parameter names are strata's; a Conv2d weight [out, in, 3, 3] is
stored as strata's patches read it, permuted to [out, 3, 3, in] and flattened to [out, 9 * in].

Small sizes (features 12 -> preencoder 16 -> width 16, 4 heads, FFN 32, 2 blocks, 7 tokens) keep
the file small; the layer geometry is the recipe's. The third utterance's target needs more
frames than its two (a repeated token needs a blank between), so its loss is infinite and
zeroed (zero_infinity).

It also holds SpecAugment's time warp (bicubic F.interpolate of the frames before and after a
center) for a few utterance sizes.

The same float32 inputs and parameters run twice: in float64 (the reference, stored as float32)
and in float32 (stored under "f32."), so that the test can hold strata's float32 error to twice
PyTorch's (flash-attention's rule).

    .venv/bin/python tools/gen_mlsuperb_fixture.py
"""
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
IN, PRE, WIDTH, HEADS, FFN, BLOCKS, VOCAB = 12, 16, 16, 4, 32, 2, 7
LENGTHS = [23, 16, 9]
TARGETS = [[1, 1, 2, 3], [4, 6, 4], [5, 5]]

torch.manual_seed(20261128)
torch.set_num_threads(1)


def espnet_norm(d):
    return nn.LayerNorm(d, eps=1e-12)


class Block(nn.Module):  # EncoderLayer, normalize_before=True, concat_after=False
    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = espnet_norm(WIDTH), espnet_norm(WIDTH)
        self.linear_q, self.linear_k = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)
        self.linear_v, self.linear_out = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)
        self.w_1, self.w_2 = nn.Linear(WIDTH, FFN), nn.Linear(FFN, WIDTH)

    def attention(self, x, mask):  # MultiHeadedAttention; mask (B, 1, T), True = valid
        b, t, _ = x.shape
        dk = WIDTH // HEADS
        q = self.linear_q(x).view(b, t, HEADS, dk).transpose(1, 2)
        k = self.linear_k(x).view(b, t, HEADS, dk).transpose(1, 2)
        v = self.linear_v(x).view(b, t, HEADS, dk).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(dk)
        pad = mask.unsqueeze(1).eq(0)
        scores = scores.masked_fill(pad, torch.finfo(scores.dtype).min)
        attn = torch.softmax(scores, dim=-1).masked_fill(pad, 0.0)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, t, WIDTH)
        return self.linear_out(out)

    def forward(self, x, mask):
        x = x + self.attention(self.norm1(x), mask)
        return x + self.w_2(F.relu(self.w_1(self.norm2(x))))


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.preencoder = nn.Linear(IN, PRE)
        self.conv1 = nn.Conv2d(1, WIDTH, 3, 2)
        self.conv2 = nn.Conv2d(WIDTH, WIDTH, 3, 1)
        self.out = nn.Linear(WIDTH * ((PRE - 1) // 2 - 2), WIDTH)
        self.blocks = nn.ModuleList(Block() for _ in range(BLOCKS))
        self.after_norm = espnet_norm(WIDTH)
        self.ctc_lo = nn.Linear(WIDTH, VOCAB)

    def forward(self, x, lengths):  # x (B, T, IN) padded
        b, t, _ = x.shape
        valid = torch.arange(t)[None, :] < lengths[:, None]
        # UtteranceMVN(norm_means=True, norm_vars=False)
        x = x.masked_fill(~valid[..., None], 0.0)
        x = x - x.sum(1, keepdim=True) / lengths[:, None, None].to(x.dtype)
        x = x.masked_fill(~valid[..., None], 0.0)
        x = self.preencoder(x)
        # Conv2dSubsampling2 with PositionalEncoding
        h = F.relu(self.conv2(F.relu(self.conv1(x.unsqueeze(1)))))
        bb, c, tt, f = h.shape
        h = self.out(h.transpose(1, 2).contiguous().view(bb, tt, c * f))
        pos = torch.arange(0, tt, dtype=torch.float32).unsqueeze(1)
        div = torch.exp(torch.arange(0, WIDTH, 2, dtype=torch.float32) * -(math.log(10000.0) / WIDTH))
        pe = torch.zeros(tt, WIDTH)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
        h = h * math.sqrt(WIDTH) + pe.to(h.dtype)[None]
        mask = valid[:, None, :-2:2][:, :, :-2:1]
        for blk in self.blocks:
            h = blk(h, mask)
        h = self.after_norm(h)
        return self.ctc_lo(h), mask[:, 0, :].sum(1)


head = Head()
X = torch.randn(sum(LENGTHS), IN)


def run(dtype):
    head.to(dtype)
    head.zero_grad()
    x = X.to(dtype).requires_grad_(True)
    # One utterance at a time (see the module docstring), each a batch of one.
    logits, out_lens, loss, start = [], [], 0.0, 0
    for n, target in zip(LENGTHS, TARGETS):
        lg, m = head(x[start:start + n].unsqueeze(0), torch.tensor([n]))
        lp = F.log_softmax(lg, dim=-1)
        loss = loss + F.ctc_loss(lp.transpose(0, 1), torch.tensor([target]), m, torch.tensor([len(target)]),
                                 reduction="sum", zero_infinity=True)
        logits.append(lg[0].detach())
        out_lens.append(int(m[0]))
        start += n
    loss = loss / len(LENGTHS)  # ESPnet's CTC: the batch's summed loss / its size
    loss.backward()
    out = {"logits": torch.cat(logits), "loss": loss.detach().reshape(1), "grad.x": x.grad,
           "out_lengths": torch.tensor(out_lens)}
    for name, p in params().items():
        out[f"grad.{name}"] = as_strata(p.grad)
    return {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in out.items()}


def as_strata(v):
    """A Conv2d weight [out, in, kh, kw] as [out, kh * kw * in] (strata's patch order)."""
    return v.permute(0, 2, 3, 1).reshape(v.shape[0], -1) if v.dim() == 4 else v


def params():
    named = {
        "head.preencoder": head.preencoder,
        "head.embed.conv1": head.conv1,
        "head.embed.conv2": head.conv2,
        "head.embed.out": head.out,
        "head.after_norm": head.after_norm,
        "head.ctc_lo": head.ctc_lo,
    }
    for i, blk in enumerate(head.blocks):
        for m in ("norm1", "norm2"):
            named[f"head.encoders.{i}.{m}"] = getattr(blk, m)
        for m in ("linear_q", "linear_k", "linear_v", "linear_out"):
            named[f"head.encoders.{i}.self_attn.{m}"] = getattr(blk, m)
        for m in ("w_1", "w_2"):
            named[f"head.encoders.{i}.feed_forward.{m}"] = getattr(blk, m)
    return {f"{n}.{p}": getattr(m, p) for n, m in named.items() for p in ("weight", "bias")}


tensors = {
    "x": X,
    "lengths": torch.tensor(LENGTHS, dtype=torch.int64),
    "targets": torch.tensor([c for t in TARGETS for c in t], dtype=torch.int64),
    "target_lengths": torch.tensor([len(t) for t in TARGETS], dtype=torch.int64),
}
for name, p in params().items():
    tensors[name] = as_strata(p.detach().clone())
reference = run(torch.float64)
tensors.update(reference)
tensors.update({f"f32.{k}": v for k, v in run(torch.float32).items() if k != "out_lengths"})
# SpecAugment's time warp (espnet2's time_warp, bicubic, with the center and warp given) of one
# utterance (time, 6 features): "warpN.geom" = (frames, center, warped).
g = torch.Generator().manual_seed(3)
for i, (t, center, warped) in enumerate([(20, 7, 5), (23, 10, 14), (12, 6, 6), (11, 5, 1)]):
    x = torch.randn(1, 1, t, 6, generator=g)
    left = F.interpolate(x[:, :, :center], (warped, 6), mode="bicubic", align_corners=False)
    right = F.interpolate(x[:, :, center:], (t - warped, 6), mode="bicubic", align_corners=False)
    tensors[f"warp{i}.x"] = x[0, 0]
    tensors[f"warp{i}.y"] = torch.cat([left, right], dim=2)[0, 0]
    tensors[f"warp{i}.geom"] = torch.tensor([t, center, warped], dtype=torch.int64)
save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, "mlsuperb.safetensors"))
print("wrote mlsuperb.safetensors: loss", reference["loss"].item(), "frames", reference["out_lengths"].tolist())
