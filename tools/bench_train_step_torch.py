#!/usr/bin/env python3
"""PyTorch CPU counterpart of `cargo bench --bench train_step`: one whole training step
(zero_grad, interface, head, CTC, backward, clip_grad_norm_ 1.0, AdamW lr 1e-4) on 8 utterances x
150 frames of a random 13 x 768 stack, 31 tokens, 20 targets per utterance: the weighted sum and
HConv with the SUPERB PR head (Linear(D', 256) -> Linear(256, 31), CTC mean), and the weighted sum
with s3prl's ASR head (no dropout). Same thread count as the Rust bench:

    .venv/bin/python tools/bench_train_step_torch.py --threads 2
"""
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench_heads_torch import AsrHead, timed
from gen_fixtures import HConv, WeightedSum

L, D, B, T, V, U = 13, 768, 8, 150, 31, 20


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=8.0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(3)
    stack = torch.randn(L, B, T, D)
    lengths = torch.full((B,), T, dtype=torch.long)
    targets = torch.tensor([[1 + (i * 7 + j * 13) % (V - 1) for j in range(U)] for i in range(B)])
    target_lengths = torch.full((B,), U, dtype=torch.long)
    print(f"torch {torch.__version__}, {args.threads} threads")

    for name, interface, width in [
        ("ws_pr_head", WeightedSum(L, D, normalize=False), D),
        ("hconv_pr_head", HConv(L, D), None),
    ]:
        width = width or interface.transforms[-2].out_channels * 2
        proj, out = nn.Linear(width, 256), nn.Linear(256, V)
        params = list(interface.parameters()) + list(proj.parameters()) + list(out.parameters())
        opt = torch.optim.AdamW(params, lr=1e-4)

        def pr_step():
            opt.zero_grad()
            lp = F.log_softmax(out(proj(interface(stack))), -1).transpose(0, 1)
            loss = F.ctc_loss(lp, targets, lengths, target_lengths, blank=0, zero_infinity=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()

        dt = timed(pr_step, args.seconds)
        print(f"{name:14s} {B} x {T} frames  {dt * 1e3:9.2f} ms  {B * T / dt:9.0f} frames/s")

    ws, asr = WeightedSum(L, D, normalize=False), AsrHead(D, V)
    params = list(ws.parameters()) + list(asr.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)

    def asr_step():
        opt.zero_grad()
        asr(ws(stack), lengths, targets, target_lengths).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    dt = timed(asr_step, args.seconds)
    print(f"ws_asr_head    {B} x {T} frames  {dt * 1e3:9.2f} ms  {B * T / dt:9.0f} frames/s")


if __name__ == "__main__":
    main()
