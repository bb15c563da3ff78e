#!/usr/bin/env python3
"""Joins examples/gpu_bench.rs output (ours) and tools/gpu_bench_torch.py output into one table:
ours, PyTorch, speed ratio, our GB/s and its share of the measured copy bandwidth.
    python3 tools/gpu_table.py ours.jsonl torch.jsonl"""
import json
import sys


def load(path):
    return [json.loads(line) for line in open(path) if line.strip().startswith("{")]


def main():
    ours, theirs = load(sys.argv[1]), load(sys.argv[2])
    peak = next(r["bytes_per_s"] for r in theirs if r["name"] == "peak_copy")
    peak_mm = next((r["flops_per_s"] for r in theirs if r["name"] == "peak_mm"), None)
    t = {r["name"]: r["ms"] for r in theirs if "ms" in r}
    o = {r["name"]: r for r in ours}
    print(f"measured copy bandwidth: {peak / 1e12:.2f} TB/s (bytes read + written)")
    if peak_mm:
        print(f"measured bf16 matmul (8192^3): {peak_mm / 1e12:.0f} TFLOP/s")
    print(f"{'kernel':28s} {'strata ms':>10s} {'torch ms':>10s} {'speedup':>8s} {'GB/s':>8s} {'% peak':>7s}")
    rows = []
    for name, r in o.items():
        if "flops" in r:
            tf = r["flops"] / (r["ms"] * 1e-3) / 1e12
            tm = t.get(name)
            sp = f"{tm / r['ms']:7.2f}x" if tm else "     n/a"
            pk = f"{100 * tf * 1e12 / peak_mm:6.0f}%" if peak_mm else "    n/a"
            tms = f"{tm:10.4f}" if tm else "       n/a"
            print(f"{name:28s} {r['ms']:10.4f} {tms} {sp} {tf:6.1f}TF {pk}")
            continue
        if name.endswith("_bwd_dw"):
            continue
        torch_ms = t.get(name)
        rows.append((name, r["ms"], torch_ms, r["bytes"]))
        bwd = o.get(name.replace("_fwd", "_bwd_dw")) if name.endswith("_fwd") else None
        if bwd is not None:
            rows.append((name.replace("_fwd", "_fwd_bwd"), r["ms"] + bwd["ms"], t.get(name.replace("_fwd", "_fwd_bwd")), r["bytes"] + bwd["bytes"]))
    for name, ms, torch_ms, nbytes in rows:
        gbs = nbytes / (ms * 1e-3) / 1e9
        sp = f"{torch_ms / ms:7.2f}x" if torch_ms else "     n/a"
        tm = f"{torch_ms:10.4f}" if torch_ms else "       n/a"
        print(f"{name:28s} {ms:10.4f} {tm} {sp} {gbs:8.0f} {100 * gbs * 1e9 / peak:6.0f}%")
    values(o, {r["name"]: r for r in theirs})


# Where a row carries the loss and a weighted sum of its gradient on both sides (the losses, on
# the same formula inputs), how far apart they are. Limits: the loss to 1e-4 relative (fp32 sums
# over a batch); the gradient's sum to 1e-2 (it is a small residual of cancelling terms: on the
# CPU, strata's reference and PyTorch's CTC gave sums 3e-4 apart, a wrong gradient moves it by
# its own size).
def values(ours, theirs):
    shared = [n for n in ours if "loss" in ours[n] and "loss" in theirs.get(n, {})]
    if not shared:
        return
    print(f"values vs PyTorch: {'kernel':28s} {'strata loss':>14s} {'torch loss':>14s} {'rel':>9s} {'grad sum rel':>13s}")
    for n in shared:
        a, b = ours[n], theirs[n]
        rel = abs(a["loss"] - b["loss"]) / max(abs(b["loss"]), 1e-30)
        grel = abs(a["grad_sum"] - b["grad_sum"]) / max(abs(b["grad_sum"]), 1e-30)
        verdict = "ok" if rel <= 1e-4 and grel <= 1e-2 else "DIFFERS"
        print(f"values vs PyTorch: {n:28s} {a['loss']:14.7g} {b['loss']:14.7g} {rel:9.1e} {grel:13.1e} {verdict}")


if __name__ == "__main__":
    main()
