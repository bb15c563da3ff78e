#!/usr/bin/env python3
"""SUPERB's ASR head reference (tests/fixtures/asr.safetensors), written as s3prl's
downstream/asr computes it on a PADDED batch: the expert's projector Linear(D', project_dim), its
RNNs model (each RNNLayer: nn.LSTM(bidirectional, batch_first) over pack_padded_sequence with
enforce_sorted=False, pad_packed_sequence back; no layer norm, no projection, no downsampling;
dropout is off in eval mode), the final Linear, log_softmax and nn.CTCLoss(blank=0,
zero_infinity=True) with its default 'mean' reduction (each utterance's loss over its target
length, averaged). Parameter names are s3prl's module tree under "head.".

Small sizes (features 10 -> projector 8 -> 2 bidirectional layers of 6 units -> 7 tokens) keep
the file small. The third utterance's target needs more frames than it has (a repeated token
needs a blank between), so its loss is infinite and zeroed (zero_infinity).

The same float32 inputs and parameters run twice: in float64 (the reference, stored as float32)
and in float32 (stored under "f32."), so that the test can hold strata's float32 error to twice
PyTorch's (flash-attention's rule).

    .venv/bin/python tools/gen_asr_fixture.py
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
IN, PROJ, HIDDEN, LAYERS, VOCAB = 10, 8, 6, 2, 7
LENGTHS = [11, 7, 4]
TARGETS = [[1, 2, 2, 3], [4, 5], [6, 6, 6]]

torch.manual_seed(20261127)
torch.set_num_threads(1)


class RNNLayer(nn.Module):  # s3prl downstream/asr/model.py, module LSTM, the config's defaults
    def __init__(self, input_dim):
        super().__init__()
        self.layer = nn.LSTM(input_dim, HIDDEN, bidirectional=True, num_layers=1, batch_first=True)

    def forward(self, x, x_len):
        packed = pack_padded_sequence(x, x_len, batch_first=True, enforce_sorted=False)
        out, _ = self.layer(packed)
        out, x_len = pad_packed_sequence(out, batch_first=True)
        return out, x_len


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.projector = nn.Linear(IN, PROJ)
        self.rnns = nn.ModuleList(RNNLayer(PROJ if i == 0 else 2 * HIDDEN) for i in range(LAYERS))
        self.linear = nn.Linear(2 * HIDDEN, VOCAB)

    def forward(self, x, lengths):
        x = self.projector(x)
        for rnn in self.rnns:
            x, lengths = rnn(x, lengths)
        return self.linear(x), lengths


head = Head().eval()
X = torch.randn(sum(LENGTHS), IN)


def run(dtype):
    head.to(dtype)
    head.zero_grad()
    x = X.to(dtype).requires_grad_(True)
    pieces = torch.split(x, LENGTHS)
    padded = nn.utils.rnn.pad_sequence(pieces, batch_first=True)
    lengths = torch.tensor(LENGTHS)
    logits, _ = head(padded, lengths)
    lp = F.log_softmax(logits, dim=-1)
    targets = torch.tensor([c for t in TARGETS for c in t])
    loss = F.ctc_loss(lp.transpose(0, 1), targets, lengths, torch.tensor([len(t) for t in TARGETS]),
                      blank=0, reduction="mean", zero_infinity=True)
    loss.backward()
    out = {"logits": torch.cat([logits[i, :n] for i, n in enumerate(LENGTHS)]).detach(),
           "loss": loss.detach().reshape(1), "grad.x": x.grad}
    for name, p in head.named_parameters():
        out[f"grad.head.{name}"] = p.grad
    return {k: v.float().contiguous() for k, v in out.items()}


tensors = {
    "x": X,
    "lengths": torch.tensor(LENGTHS, dtype=torch.int64),
    "targets": torch.tensor([c for t in TARGETS for c in t], dtype=torch.int64),
    "target_lengths": torch.tensor([len(t) for t in TARGETS], dtype=torch.int64),
}
for name, p in head.named_parameters():
    tensors[f"head.{name}"] = p.detach().clone()
reference = run(torch.float64)
tensors.update(reference)
tensors.update({f"f32.{k}": v for k, v in run(torch.float32).items()})
save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, "asr.safetensors"))
print("wrote asr.safetensors: loss", reference["loss"].item(), "parameters",
      sorted(n for n, _ in head.named_parameters()))
