#!/usr/bin/env python3
"""PyTorch CPU forward+backward of the SUPERB SV head (s3prl's sv_voxceleb1: connector, XVector
with F.unfold TDNNs, statistics pooling, UtteranceExtractor, AMSoftmaxLoss) on 768-dim features,
8 utterances x 200 frames (one padded batch of equal lengths, so no padding), 1,211 speakers: the
counterpart of `cargo bench --bench heads`. Same thread count as the Rust bench:

    .venv/bin/python tools/bench_heads_torch.py --threads 2
"""
import argparse
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

    for _ in range(2):
        step()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < args.seconds:
        step()
        n += 1
    dt = (time.perf_counter() - t0) / n
    print(f"torch {torch.__version__}, {args.threads} threads")
    print(f"speaker head 8 x 200 frames  {dt * 1e3:9.2f} ms  {1600 / dt:12.0f} frames/s")


if __name__ == "__main__":
    main()
