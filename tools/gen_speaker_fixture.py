#!/usr/bin/env python3
"""The speaker-verification head's reference (tests/fixtures/speaker.safetensors), written the
way s3prl's sv_voxceleb1 downstream computes it: connector Linear, the XVector's five TDNN layers
(F.unfold over a (context, H) window with the dilation, Linear, ReLU), statistics pooling (mean
and torch.std), UtteranceExtractor (Linear + ReLU: the embedding `inference` returns; then Linear
+ ReLU) and AMSoftmaxLoss (s = 30, m = 0.4) with its own formula. Each utterance goes through
the frame-level layers alone (s3prl's evaluation batch size 1), so no padding is involved.
Parameter names are strata's (the AM-softmax W is stored transposed, [speakers, width]).

The same float32 inputs and parameters run twice: in float64 (the reference, stored as float32)
and in float32 (stored under "f32."), so that the test can hold strata's float32 error to
PyTorch's own (flash-attention's rule: at most twice PyTorch's float32 error, each measured
against the float64 result). The gradient passes nine layers and AM-softmax's scale 30, which
puts both float32 errors near 1e-5.

It also holds the equal error rate s3prl computes (sklearn's roc_curve, scipy's brentq on
interp1d) for random trial scores with ties ("eer.*"; needs scikit-learn and scipy).

    .venv/bin/python tools/gen_speaker_fixture.py
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
IN, WIDTH, AGG, SPEAKERS = 12, 16, 24, 5
LENGTHS, LABELS = [20, 17, 25, 16], [3, 0, 3, 4]
TDNN = [(5, 1), (3, 2), (3, 3), (1, 1), (1, 1)]
S, M = 30.0, 0.4

torch.manual_seed(20261127)
torch.set_num_threads(1)


def tdnn(x, layer, context, dilation):  # x (1, T, H), as s3prl's TDNN.forward
    h = F.unfold(x.unsqueeze(1), (context, x.shape[-1]), stride=(1, x.shape[-1]), dilation=(dilation, 1))
    return F.relu(layer(h.transpose(1, 2)))


connector = nn.Linear(IN, WIDTH)
layers = [nn.Linear(WIDTH * c, AGG if i == len(TDNN) - 1 else WIDTH) for i, (c, _) in enumerate(TDNN)]
utter1, utter2 = nn.Linear(2 * AGG, WIDTH), nn.Linear(WIDTH, WIDTH)
W = nn.Parameter(torch.empty(WIDTH, SPEAKERS))
nn.init.xavier_normal_(W, gain=1)
X = torch.randn(sum(LENGTHS), IN)
modules = {"head.connector": connector, "head.utter1": utter1, "head.utter2": utter2}
modules.update({f"head.tdnn{i}": layer for i, layer in enumerate(layers)})


def run(dtype):
    for m in modules.values():
        m.to(dtype)
        m.zero_grad()
    w = nn.Parameter(W.detach().to(dtype))
    x = X.to(dtype).requires_grad_(True)
    pooled, start = [], 0
    for n in LENGTHS:
        h = connector(x[start:start + n]).unsqueeze(0)
        for layer, (c, d) in zip(layers, TDNN):
            h = tdnn(h, layer, c, d)
        h = h[0]
        pooled.append(torch.cat([h.mean(0), h.std(0)]))
        start += n
    embedding = F.relu(utter1(torch.stack(pooled)))
    h = F.relu(utter2(embedding))
    # AMSoftmaxLoss.forward
    labels = torch.tensor(LABELS)
    wf = torch.mm(F.normalize(h, dim=1), F.normalize(w, dim=0))
    numerator = S * (torch.diagonal(wf.transpose(0, 1)[labels]) - M)
    excl = torch.cat([torch.cat((wf[i, :y], wf[i, y + 1:])).unsqueeze(0) for i, y in enumerate(labels)], dim=0)
    denominator = torch.exp(numerator) + torch.sum(torch.exp(S * excl), dim=1)
    loss = -torch.mean(numerator - torch.log(denominator))
    loss.backward()
    out = {
        "embedding": embedding.detach(),
        "loss": loss.detach().reshape(1),
        "grad.x": x.grad,
        "grad.head.amsoftmax.weight": w.grad.T,
    }
    for name, m in modules.items():
        for p in ("weight", "bias"):
            out[f"grad.{name}.{p}"] = getattr(m, p).grad
    return {k: v.float().contiguous() for k, v in out.items()}


tensors = {
    "x": X,
    "lengths": torch.tensor(LENGTHS, dtype=torch.int64),
    "labels": torch.tensor(LABELS, dtype=torch.int64),
    "head.amsoftmax.weight": W.detach().T.contiguous(),
}
for name, m in modules.items():
    for p in ("weight", "bias"):
        tensors[f"{name}.{p}"] = getattr(m, p).detach().clone()
reference = run(torch.float64)
tensors.update(reference)
tensors.update({f"f32.{k}": v for k, v in run(torch.float32).items()})
# EER: 300 trials, a third targets scoring higher on average; scores on a 0.01 grid, so that
# many tie.
import numpy as np  # noqa: E402
from scipy.interpolate import interp1d  # noqa: E402
from scipy.optimize import brentq  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

g = torch.Generator().manual_seed(7)
targets = (torch.rand(300, generator=g) < 1 / 3).long()
scores = (torch.randn(300, generator=g) * 0.25 + 0.3 * targets).mul(100).round().div(100).float()
fpr, tpr, _ = roc_curve(targets.numpy(), scores.double().numpy(), pos_label=1)
eer = brentq(lambda x: 1.0 - x - interp1d(fpr, tpr)(x), 0.0, 1.0)
tensors["eer.scores"] = scores
tensors["eer.targets"] = targets
tensors["eer.value"] = torch.tensor([eer], dtype=torch.float32)
print("eer", eer)
save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, "speaker.safetensors"))
print("wrote speaker.safetensors: loss", reference["loss"].item())
