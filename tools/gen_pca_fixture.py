#!/usr/bin/env python3
"""PCA + Concat's reference (tests/fixtures/pca.safetensors): per-layer PCA of a hidden-state stack
as numpy / sklearn compute it: the mean, the covariance with the n - 1 denominator, its
eigendecomposition (torch.linalg.eigh, float64), components in descending eigenvalue order, each
signed so that its largest-magnitude entry is positive, and the projection of the centered layer
onto its top k components, concatenated layer-major.

    .venv/bin/python tools/gen_pca_fixture.py

The stack is float32 [frames, L, D], built to look like hidden states: a few strong, well
separated directions per layer (so that the top components are well determined), isotropic
noise, and large per-dimension means (so that a fit that subtracts E[x]^2 from E[x^2] in float32
would lose precision to cancellation).
"""
import os

import torch
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
FRAMES, L, D, K = 300, 5, 32, 6

g = torch.Generator().manual_seed(20261127)
stack = torch.empty(FRAMES, L, D, dtype=torch.float64)
for l in range(L):
    basis, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    scales = torch.tensor([12.0, 9.0, 7.0, 5.5, 4.3, 3.4, 2.7, 2.1], dtype=torch.float64) * (1 + 0.1 * l)
    coeffs = torch.randn(FRAMES, len(scales), generator=g, dtype=torch.float64) * scales
    signal = coeffs @ basis[:, : len(scales)].T
    noise = 0.3 * torch.randn(FRAMES, D, generator=g, dtype=torch.float64)
    offset = 200.0 * torch.randn(D, generator=g, dtype=torch.float64)
    stack[:, l, :] = signal + noise + offset
stack = stack.float()

x = stack.double()
means, comps, values, outs = [], [], [], []
for l in range(L):
    xl = x[:, l, :]
    mu = xl.mean(0)
    xc = xl - mu
    cov = xc.T @ xc / (FRAMES - 1)
    w, v = torch.linalg.eigh(cov)
    order = torch.argsort(w, descending=True)
    w, v = w[order], v[:, order].T.clone()
    for j in range(D):
        if v[j, v[j].abs().argmax()] < 0:
            v[j] = -v[j]
    means.append(mu)
    comps.append(v[:K])
    values.append(w)
    outs.append(xc @ v[:K].T)

save_file(
    {
        "stack": stack.contiguous(),
        "mean": torch.stack(means).float().contiguous(),
        "components": torch.stack(comps).float().contiguous(),
        "eigenvalues": torch.stack(values).float().contiguous(),
        "output": torch.cat(outs, dim=1).float().contiguous(),
    },
    os.path.join(OUT, "pca.safetensors"),
)
print("wrote pca.safetensors:", FRAMES, "frames,", L, "layers x", D, ", k =", K)
