#!/usr/bin/env python3
"""PyTorch's side of the GPU benchmark (the device script runs it next to examples/gpu_bench.rs):
the same work, same sizes, CUDA events, L2 flush, median of 20. JSON lines {"name", "ms"}, plus
the measured device-to-device copy bandwidth ("peak_copy", bytes read + written per second)."""
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
import torch.nn.functional as F


def time_ms(f, reps=20):
    flush = torch.empty(64 << 20, dtype=torch.float32, device="cuda")
    for _ in range(3):
        f()
    times = []
    for _ in range(reps):
        flush.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        f()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def bench_log_probs(n, t, v):
    """examples/gpu_bench.rs's CTC input, [t, n, v]: log_softmax over v of
    2 sin(0.37 t + 1.3 c + 0.11 u), in float64, rounded to float32."""
    f = torch.arange(t, dtype=torch.float64).view(t, 1, 1)
    u = torch.arange(n, dtype=torch.float64).view(1, n, 1)
    c = torch.arange(v, dtype=torch.float64).view(1, 1, v)
    return torch.log_softmax(2.0 * torch.sin(0.37 * f + 1.3 * c + 0.11 * u), -1).float()


def bench_logits(rows, classes):
    """examples/gpu_bench.rs's cross-entropy input: 3 sin(0.013 r + 0.7 c), rounded to float32."""
    r = torch.arange(rows, dtype=torch.float64).view(rows, 1)
    c = torch.arange(classes, dtype=torch.float64).view(1, classes)
    return (3.0 * torch.sin(0.013 * r + 0.7 * c)).float()


def weighted_sum(g):
    """examples/gpu_bench.rs's `weighted_sum`: the elements in (contiguous) memory order, each
    times cos(1.3 i), summed in float64."""
    x = g.contiguous().flatten().double()
    return float((x * torch.cos(1.3 * torch.arange(x.numel(), dtype=torch.float64, device=x.device))).sum())


def main():
    dev = "cuda"
    src = torch.empty(512 << 20, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    print(json.dumps({"name": "peak_copy", "bytes_per_s": 2 * src.numel() / (ms * 1e-3)}))
    del src, dst
    for name, L, D in (("base", 13, 768), ("large", 25, 1024)):
        n = 32 * 500
        stacked = torch.full((L, n, D), 0.5, dtype=torch.bfloat16, device=dev)  # s3prl layout (L, B*T, D)
        w = torch.full((L,), 0.1, device=dev, requires_grad=True)
        dout = torch.full((n, D), 0.01, dtype=torch.bfloat16, device=dev)
        for normalize in (False, True):
            tag = f"ws_{name}{'_norm' if normalize else ''}"

            def fwd():
                x = F.layer_norm(stacked, (D,)) if normalize else stacked
                return (F.softmax(w, -1).to(x.dtype).view(-1, 1, 1) * x).sum(0)

            with torch.no_grad():
                print(json.dumps({"name": f"{tag}_fwd", "ms": time_ms(fwd)}))
            t_all = time_ms(lambda: torch.autograd.grad(fwd(), w, dout))
            print(json.dumps({"name": f"{tag}_fwd_bwd", "ms": t_all}))
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ a, reps=10)
    print(json.dumps({"name": "peak_mm", "flops_per_s": 2 * 8192**3 / (ms * 1e-3)}))
    del a
    from gen_fixtures import HConv  # the official module (atosystem/SSL_Interface form)
    for name, L, D in (("base", 13, 768), ("large", 25, 1024)):
        n = 32 * 500
        m = HConv(L, D).to(dev)
        stacked = torch.randn(L, 1, n, D, device=dev)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            print(json.dumps({"name": f"hconv_{name}_fwd", "ms": time_ms(lambda: m(stacked))}))
        params = list(m.parameters())

        def fwd_bwd():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = m(stacked)
            torch.autograd.grad(out, params, torch.full_like(out, 0.01))

        print(json.dumps({"name": f"hconv_{name}_fwd_bwd", "ms": time_ms(fwd_bwd)}))
    N, T, V, U = 32, 500, 71, 120
    lp = bench_log_probs(N, T, V).to(dev).requires_grad_()
    targets = torch.tensor([[1 + (i * 7 + j * 13) % (V - 1) for j in range(U)] for i in range(N)], device=dev)
    il, tl = torch.full((N,), T, dtype=torch.long), torch.full((N,), U, dtype=torch.long)

    def ctc():
        loss = F.ctc_loss(lp, targets, il, tl, reduction="mean", zero_infinity=True)
        (g,) = torch.autograd.grad(loss, lp)
        return loss.item(), g  # strata's call returns the loss value on the host too

    ms = time_ms(ctc)
    loss, g = ctc()
    # strata's memory order: utterance-major frames [N, T, V]. PyTorch's gradient here is the
    # logits' (its ctc_loss assumes a log_softmax before it); examples/gpu_bench.rs converts to it.
    print(json.dumps({"name": "ctc_32x500", "ms": ms, "loss": loss, "grad_sum": weighted_sum(g.permute(1, 0, 2))}))
    rows, classes = 4096, 1251
    logits = bench_logits(rows, classes).to(dev).requires_grad_()
    labels = torch.tensor([(i * 31) % classes for i in range(rows)], device=dev)

    def ce():
        loss = F.cross_entropy(logits, labels)
        (g,) = torch.autograd.grad(loss, logits)
        return loss.item(), g

    ms = time_ms(ce)
    loss, g = ce()
    print(json.dumps({"name": "cross_entropy_4096x1251", "ms": ms, "loss": loss, "grad_sum": weighted_sum(g)}))
    # A whole interface + PR-head training step (bf16 autocast, CTC in fp32, clip, fused AdamW)
    # on a bf16 stack already on the GPU: 32 utterances x 500 frames, 71 symbols, 120 labels each.
    # HConv on the Base and Large stacks; WS and CLS pooling (8 heads, FFN 3072, GELU) on Base.
    # PyTorch's CLS pooling is the official form: the whole TransformerEncoderLayer over the L+1
    # tokens, output token 0 (strata computes only the CLS query's row: exactly equal, less work).
    from gen_fixtures import WeightedSum, ClsPool
    steps = (
        ("step_base", 13, 768, lambda L, D: HConv(L, D)),
        ("step_large", 25, 1024, lambda L, D: HConv(L, D)),
        ("step_ws_base", 13, 768, lambda L, D: WeightedSum(L, D, False)),
        ("step_cls_base", 13, 768, lambda L, D: ClsPool(L, D, 8, 4 * D, "gelu")),
    )
    for name, L, D, make in steps:
        m = make(L, D).to(dev)
        stacked = torch.randn(L, 1, N * T, D, device=dev).to(torch.bfloat16)
        with torch.no_grad():
            d_out = m(stacked.float()[:, :, :2]).shape[-1]
        head = torch.nn.Sequential(torch.nn.Linear(d_out, 256), torch.nn.Linear(256, V)).to(dev)
        params = list(m.parameters()) + list(head.parameters())
        opt = torch.optim.AdamW(params, lr=1e-3, fused=True)

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = head(m(stacked))
            lp = logits.float().log_softmax(-1).view(N, T, V).transpose(0, 1)
            loss = F.ctc_loss(lp, targets, il, tl, reduction="mean", zero_infinity=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            loss.item()

        print(json.dumps({"name": name, "ms": time_ms(step)}))
        del m, stacked, head, params, opt
    def ws_head_row(name, head, loss_of):
        """WS (Base) + `head` on the same batch, loss_of(head, features (N, T, 768)): bf16 autocast,
        clip, fused AdamW."""
        ws = WeightedSum(13, 768, False).to(dev)
        head = head.to(dev)
        stacked = torch.randn(13, 1, N * T, 768, device=dev).to(torch.bfloat16)
        params = list(ws.parameters()) + list(head.parameters())
        opt = torch.optim.AdamW(params, lr=1e-3, fused=True)

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = loss_of(head, ws(stacked).view(N, T, 768))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            loss.item()

        print(json.dumps({"name": name, "ms": time_ms(step)}))

    from bench_heads_torch import AsrHead, MlSuperbHead
    # The ML-SUPERB head (tools/bench_heads_torch.py: ESPnet's modules, without dropout and
    # SpecAugment, as strata's row): CTC summed / 32 in fp32.
    ws_head_row("step_mlsuperb_ws_base", MlSuperbHead(768, V), lambda h, x: h(x, targets, tl))
    # The SUPERB ASR head (tools/bench_heads_torch.py: s3prl's projector, 2 x bidirectional
    # nn.LSTM(1024) over pack_padded_sequence, i.e. cuDNN, linear, CTC mean; no dropout, as
    # strata's row).
    ws_head_row("step_asr_ws_base", AsrHead(768, V), lambda h, x: h(x, il, targets, tl))
    # Fused AdamW over the tensors of an HConv (Base) + PR-head pair (strata: adam_step_multi).
    m = HConv(13, 768).to(dev)
    d_out = m(torch.zeros(13, 1, 2, 768, device=dev)).shape[-1]
    head = torch.nn.Sequential(torch.nn.Linear(d_out, 256), torch.nn.Linear(256, V)).to(dev)
    params = list(m.parameters()) + list(head.parameters())
    for p in params:
        p.grad = torch.full_like(p, 0.01)
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
    print(json.dumps({"name": "adamw_multi_hconv_base", "ms": time_ms(opt.step)}))
    # The total norm clip_grad_norm_ computes before scaling (strata: sum_squares_multi +
    # clip_coefficient; the scale is applied inside AdamW).
    grads = [p.grad for p in params]

    def total_norm():
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)

    print(json.dumps({"name": "clip_norm_hconv_base", "ms": time_ms(total_norm)}))
    del m, head, params, opt, grads
    for n in (4_424_832 + 768 * 256 + 256 * 43, 100_000_000):
        p = torch.nn.Parameter(torch.full((n,), 0.1, device=dev))
        p.grad = torch.full((n,), 0.01, device=dev)
        opt = torch.optim.AdamW([p], lr=1e-3, fused=True)
        print(json.dumps({"name": f"adamw_{n}", "ms": time_ms(opt.step)}))


if __name__ == "__main__":
    main()
