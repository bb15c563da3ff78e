#!/usr/bin/env python3
"""PyTorch CPU forward of a HuBERT-Base-sized model (random init, HubertConfig defaults) on 10 s of
audio with output_hidden_states=True, fp32: the counterpart of `cargo bench --bench upstream`.

    .venv/bin/python tools/bench_upstream_torch.py --threads 2
"""
import argparse
import time

import torch
from transformers import HubertConfig, HubertModel


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = HubertModel(HubertConfig()).eval()
    wave = 0.1 * torch.randn(1, 160_000)
    with torch.inference_mode():
        model(wave, output_hidden_states=True)
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            model(wave, output_hidden_states=True)
            times.append(time.perf_counter() - t0)
    times.sort()
    print(f"torch {torch.__version__}, {args.threads} threads: HuBERT-Base 10 s forward, all states: "
          f"median {times[len(times) // 2] * 1e3:.0f} ms (min {times[0] * 1e3:.0f} ms) over {args.reps}")


if __name__ == "__main__":
    main()
