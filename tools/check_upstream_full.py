#!/usr/bin/env python3
"""On-demand full-size parity check (not part of `cargo test`: ~370 MB of weights):
a HuBERT-Base-sized model (HubertConfig defaults, random init, fixed seed) on 4 s of audio,
transformers vs `strata extract`, every hidden state compared as max abs error / RMS per layer.

    cargo build --release
    .venv/bin/python tools/check_upstream_full.py [--model-type hubert|wav2vec2|wavlm] [--large]
"""
import argparse
import os
import subprocess
import sys
import tempfile
import wave

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import (HubertConfig, HubertModel, Wav2Vec2Config, Wav2Vec2Model, WavLMConfig,
                          WavLMModel)

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-type", default="hubert", choices=["hubert", "wav2vec2", "wavlm"])
    ap.add_argument("--large", action="store_true", help="24 layers x 1024, layer-norm conv stack, pre-LN")
    ap.add_argument("--seconds", type=float, default=4.0)
    args = ap.parse_args()
    cls, cfg_cls = {"hubert": (HubertModel, HubertConfig), "wav2vec2": (Wav2Vec2Model, Wav2Vec2Config),
                    "wavlm": (WavLMModel, WavLMConfig)}[args.model_type]
    extra = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                 feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True) if args.large else {}
    torch.manual_seed(0)
    model = cls(cfg_cls(**extra)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        mdir = os.path.join(tmp, "model")
        model.save_pretrained(mdir)
        n = int(16000 * args.seconds)
        t = np.arange(n) / 16000.0
        x = (0.2 * np.sin(2 * np.pi * 150 * t) * np.sin(2 * np.pi * 3 * t) + 0.02 * np.random.default_rng(0).standard_normal(n))
        pcm = np.round(np.clip(x, -1, 1) * 32767).astype(np.int16)
        wav = os.path.join(tmp, "utt.wav")
        with wave.open(wav, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(16000)
            w.writeframes(pcm.tobytes())
        audio = torch.tensor(pcm.astype(np.float32) / 32768.0)[None]
        with torch.no_grad():
            out = model(audio, output_hidden_states=True)
        states = list(out.hidden_states[:-1]) + [out.last_hidden_state]
        want = torch.stack(states)[:, 0]  # (L, T, D)
        feats = os.path.join(tmp, "feats.safetensors")
        exe = os.path.join(ROOT, "target", "release", "strata")
        subprocess.run([exe, "extract", "--model", mdir, "--out", feats, "--normalize", "off", wav], check=True)
        got = load_file(feats)["utt"].permute(1, 0, 2)  # (L, T, D)
        assert got.shape == want.shape, (got.shape, want.shape)
        worst = 0.0
        for layer in range(want.shape[0]):
            rms = want[layer].pow(2).mean().sqrt().item()
            err = (got[layer] - want[layer]).abs().max().item()
            worst = max(worst, err / rms)
            print(f"state {layer:2d}: max abs error {err:.3e}  RMS {rms:.3e}  ratio {err / rms:.2e}")
        print(f"{args.model_type}{' large' if args.large else ' base'}: {tuple(want.shape)} states, "
              f"worst max-abs-error / RMS = {worst:.2e} (bound 1e-4): {'PASS' if worst <= 1e-4 else 'FAIL'}")
        sys.exit(0 if worst <= 1e-4 else 1)


if __name__ == "__main__":
    main()
