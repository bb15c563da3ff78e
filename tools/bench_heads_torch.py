#!/usr/bin/env python3
"""PyTorch CPU forward+backward of the heads of `cargo bench --bench heads`, on 768-dim features,
one padded batch of equal lengths (so no padding): the SUPERB SV head (s3prl's sv_voxceleb1:
connector, XVector with F.unfold TDNNs, statistics pooling, UtteranceExtractor, AMSoftmaxLoss),
8 utterances x 200 frames, 1,211 speakers; and the ML-SUPERB head (ESPnet's UtteranceMVN,
linear preencoder, Conv2dSubsampling2, 2 pre-LN transformer blocks, after_norm, ctc_lo, CTC sum /
batch; no dropout or SpecAugment, as the Rust bench), 8 utterances x 250 frames, 100 characters;
and the SUPERB ASR head (s3prl's downstream/asr: projector to 1024, 2 bidirectional nn.LSTM
layers of 1024 over pack_padded_sequence, linear, CTC mean; no dropout, as the Rust bench),
8 utterances x 150 frames, 31 characters. Same thread count as the Rust bench:

    .venv/bin/python tools/bench_heads_torch.py --threads 2
"""
import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

TDNN = [(5, 1), (3, 2), (3, 3), (1, 1), (1, 1)]


class SpeakerHead(nn.Module):
    def __init__(self, dim, width=512, agg=1500, speakers=1211):
        super().__init__()
        self.connector = nn.Linear(dim, width)
        self.tdnn = nn.ModuleList(
            nn.Linear(width * c, agg if i == len(TDNN) - 1 else width) for i, (c, _) in enumerate(TDNN)
        )
        self.utter1, self.utter2 = nn.Linear(2 * agg, width), nn.Linear(width, width)
        self.W = nn.Parameter(torch.empty(width, speakers))
        nn.init.xavier_normal_(self.W)

    def forward(self, x, labels, s=30.0, m=0.4):  # x (B, T, D)
        h = self.connector(x)
        for layer, (c, d) in zip(self.tdnn, TDNN):
            u = F.unfold(h.unsqueeze(1), (c, h.shape[-1]), stride=(1, h.shape[-1]), dilation=(d, 1))
            h = F.relu(layer(u.transpose(1, 2)))
        pooled = torch.cat([h.mean(1), h.std(1)], dim=-1)
        e = F.relu(self.utter2(F.relu(self.utter1(pooled))))
        cos = F.normalize(e, dim=1) @ F.normalize(self.W, dim=0)
        logits = s * (cos - m * F.one_hot(labels, cos.shape[1]))
        return F.cross_entropy(logits, labels)


class Block(nn.Module):  # ESPnet EncoderLayer, normalize_before=True
    def __init__(self, d=256, heads=8, ffn=1024):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d, eps=1e-12), nn.LayerNorm(d, eps=1e-12)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.w_1, self.w_2 = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, x):
        b, t, d = x.shape
        y = self.norm1(x)
        split = lambda z: z.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(y)), split(self.k(y)), split(self.v(y))
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.heads), dim=-1)
        x = x + self.o((attn @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.w_2(F.relu(self.w_1(self.norm2(x))))


class MlSuperbHead(nn.Module):
    def __init__(self, dim, vocab, d=256):
        super().__init__()
        self.d = d
        self.pre = nn.Linear(dim, 80)
        self.conv = nn.Sequential(nn.Conv2d(1, d, 3, 2), nn.ReLU(), nn.Conv2d(d, d, 3, 1), nn.ReLU())
        self.out = nn.Linear(d * 37, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(2))
        self.after_norm = nn.LayerNorm(d, eps=1e-12)
        self.ctc_lo = nn.Linear(d, vocab)

    def forward(self, x, targets, target_lengths):  # x (B, T, D)
        x = self.pre(x - x.mean(1, keepdim=True))
        h = self.conv(x.unsqueeze(1))
        b, c, t, f = h.shape
        h = self.out(h.transpose(1, 2).reshape(b, t, c * f))
        pos = torch.arange(t, dtype=torch.float32, device=x.device)[:, None]
        div = torch.exp(torch.arange(0, self.d, 2, dtype=torch.float32, device=x.device) * -(math.log(10000.0) / self.d))
        pe = torch.zeros(t, self.d, device=x.device)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
        h = h * math.sqrt(self.d) + pe
        for blk in self.blocks:
            h = blk(h)
        lp = F.log_softmax(self.ctc_lo(self.after_norm(h)), dim=-1)
        lengths = torch.full((b,), t, dtype=torch.long)
        loss = F.ctc_loss(lp.float().transpose(0, 1), targets, lengths, target_lengths, reduction="sum", zero_infinity=True)
        return loss / b


class AsrHead(nn.Module):
    def __init__(self, dim, vocab, project=1024, hidden=1024, layers=2):
        super().__init__()
        self.projector = nn.Linear(dim, project)
        self.rnns = nn.ModuleList(
            nn.LSTM(project if i == 0 else 2 * hidden, hidden, bidirectional=True, batch_first=True)
            for i in range(layers)
        )
        self.linear = nn.Linear(2 * hidden, vocab)

    def forward(self, x, lengths, targets, target_lengths):  # x (B, T, D)
        h = self.projector(x)
        for rnn in self.rnns:
            packed = nn.utils.rnn.pack_padded_sequence(h, lengths, batch_first=True, enforce_sorted=False)
            h, _ = nn.utils.rnn.pad_packed_sequence(rnn(packed)[0], batch_first=True)
        lp = F.log_softmax(self.linear(h), dim=-1)
        return F.ctc_loss(lp.transpose(0, 1), targets, lengths, target_lengths, zero_infinity=True)


def timed(step, seconds):
    for _ in range(2):
        step()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += 1
    return (time.perf_counter() - t0) / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=4.0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    head = SpeakerHead(768)
    x = torch.randn(8, 200, 768)
    labels = torch.tensor([(u * 151) % 1211 for u in range(8)])

    def step():
        head.zero_grad()
        head(x, labels).backward()

    dt = timed(step, args.seconds)
    print(f"torch {torch.__version__}, {args.threads} threads")
    print(f"speaker head 8 x 200 frames    {dt * 1e3:9.2f} ms  {1600 / dt:12.0f} frames/s")

    ml = MlSuperbHead(768, 100)
    x = torch.randn(8, 250, 768)
    targets = torch.tensor([[1 + (u * 7 + i * 13) % 99 for i in range(60)] for u in range(8)])
    target_lengths = torch.full((8,), 60, dtype=torch.long)

    def ml_step():
        ml.zero_grad()
        ml(x, targets, target_lengths).backward()

    dt = timed(ml_step, args.seconds)
    print(f"ML-SUPERB head 8 x 250 frames  {dt * 1e3:9.2f} ms  {2000 / dt:12.0f} frames/s")

    asr = AsrHead(768, 31)
    x = torch.randn(8, 150, 768)
    lengths = torch.full((8,), 150, dtype=torch.long)
    targets = torch.tensor([[1 + (u * 7 + i * 13) % 30 for i in range(40)] for u in range(8)])
    target_lengths = torch.full((8,), 40, dtype=torch.long)

    def asr_step():
        asr.zero_grad()
        asr(x, lengths, targets, target_lengths).backward()

    dt = timed(asr_step, args.seconds)
    print(f"ASR head 8 x 150 frames        {dt * 1e3:9.2f} ms  {1200 / dt:12.0f} frames/s")


if __name__ == "__main__":
    main()
