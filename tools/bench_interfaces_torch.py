#!/usr/bin/env python3
"""PyTorch CPU forward+backward of each interface at 13 x 768, frozen stack, in frames/s: the
counterpart of `cargo bench --bench interfaces`. Run with the same thread count as the Rust bench:

    .venv/bin/python tools/bench_interfaces_torch.py --threads 2
"""
import argparse
import time

import torch

from gen_fixtures import ClsPool, ConcatProj, GroupWS, HConv, SingleLayer, WeightedSum

L, D = 13, 768


class PcaConcat(torch.nn.Module):
    """Per-layer PCA (fitted, not trained), layers concatenated: sklearn's transform, batched."""

    def __init__(self, stack, k):
        super().__init__()
        x = stack[:, 0].double()  # (L, T, D)
        mu = x.mean(1, keepdim=True)
        xc = x - mu
        cov = xc.transpose(1, 2) @ xc / (x.shape[1] - 1)
        _, v = torch.linalg.eigh(cov)  # ascending
        self.register_buffer("mean", mu.float()[:, None])  # (L, 1, 1, D)
        self.register_buffer("components", v.flip(-1)[..., :k].float()[:, None])  # (L, 1, D, k)

    def forward(self, stack):  # (L, 1, T, D) -> (1, T, L * k)
        y = (stack - self.mean) @ self.components
        return y.permute(1, 2, 0, 3).flatten(2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--only", help="one case by name (e.g. pca_concat)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cases = [
        ("ws", WeightedSum(L, D, False), 2048),
        ("hconv", HConv(L, D), 256),
        ("concat_proj", ConcatProj(L, D, D), 256),
        ("group_ws3", GroupWS(L, D, 3, D), 1024),
        ("single_layer", SingleLayer(-1), 2048),
        ("cls_pool", ClsPool(L, D, 12, 3072, "gelu"), 256),
        ("pca_concat", PcaConcat(torch.randn(L, 1, 1024, D), D // L), 1024),
    ]
    print(f"torch {torch.__version__}, {args.threads} threads")
    for name, m, frames in cases:
        if args.only and name != args.only:
            continue
        stack = torch.randn(L, 1, frames, D)
        has_params = any(True for _ in m.parameters())

        def step():
            out = m(stack)
            if has_params:
                (out * 1.0).sum().backward()

        for _ in range(2):
            step()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < args.seconds:
            step()
            n += 1
        dt = (time.perf_counter() - t0) / n
        print(f"{name:14s} {frames:5d} frames  {dt * 1e3:9.2f} ms  {frames / dt:12.0f} frames/s")


if __name__ == "__main__":
    main()
