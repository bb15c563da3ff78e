#!/usr/bin/env python3
"""Parity fixtures for the upstream encoders: small random-init HuBERT / wav2vec2 / WavLM models
saved as Hugging Face model directories, input waveforms, and every hidden state that
`transformers` returns with output_hidden_states=True for each utterance run ALONE (no padding).

    .venv/bin/python tools/gen_upstream_fixtures.py   # writes tests/fixtures/upstream/

Configs keep the real conv stack (kernels 10,3,3,3,3,2,2 / strides 5,2,2,2,2,2,2, so frame counts
follow the real formula) at small widths. Checkpoint variants exercise the loader: a task-head
prefix with unused head tensors, both weight-norm spellings, f16 / bf16 storage, sharding.
"""
import json
import os
import shutil

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import HubertConfig, HubertModel, Wav2Vec2Config, Wav2Vec2Model, WavLMConfig, WavLMModel

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "upstream")
torch.set_num_threads(2)

SMALL = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
             conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
             hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
             layerdrop=0.0, mask_time_prob=0.0)

MODELS = {
    # name: (model class, config, checkpoint variant)
    "hubert_group_postln": (HubertModel, HubertConfig(**SMALL, feat_extract_norm="group", conv_bias=False,
                                                      do_stable_layer_norm=False), "prefix_f32_wnorm_gv"),
    "wav2vec2_layer_preln": (Wav2Vec2Model, Wav2Vec2Config(**SMALL, feat_extract_norm="layer", conv_bias=True,
                                                           do_stable_layer_norm=True), "bf16_sharded"),
    "wavlm_group_postln": (WavLMModel, WavLMConfig(**SMALL, feat_extract_norm="group", conv_bias=False,
                                                   do_stable_layer_norm=False), "f32"),
    "wavlm_layer_preln": (WavLMModel, WavLMConfig(**SMALL, feat_extract_norm="layer", conv_bias=False,
                                                  do_stable_layer_norm=True), "f16"),
}
# 2.4 s (119 frames: WavLM's log-spaced buckets start at distance 80), 1.1 s, and one frame + 1 sample.
LENGTHS = [38400, 17600, 401]


def randomize(model, seed):
    """Random init with non-trivial norms, biases and gates, so every parameter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("masked_spec_embed"):
                continue
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias") or "gru_rel_pos_const" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g) + (1.0 if "const" in name else 0.0))
            elif "weight_g" in name or "original0" in name:
                p.copy_(1.0 + 0.3 * torch.rand(p.shape, generator=g))
            else:
                fan_in = p[0].numel() if p.dim() > 1 else p.numel()
                p.copy_(torch.randn(p.shape, generator=g) / max(fan_in, 1) ** 0.5)


def round_params(model, dtype):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).to(torch.float32))


def write_checkpoint(model, cfg, path, variant):
    os.makedirs(path, exist_ok=True)
    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    if "wnorm_gv" in variant:  # the older weight-norm spelling
        sd = {k.replace("parametrizations.weight.original0", "weight_g")
               .replace("parametrizations.weight.original1", "weight_v"): v for k, v in sd.items()}
    if "prefix" in variant:  # saved from a task head: base-model prefix plus unused head tensors
        pre = model.base_model_prefix + "."
        sd = {pre + k: v for k, v in sd.items()}
        sd["lm_head.weight"] = torch.randn(5, cfg.hidden_size)
        sd["lm_head.bias"] = torch.zeros(5)
    dtype = torch.bfloat16 if "bf16" in variant else torch.float16 if "f16" in variant else torch.float32
    sd = {k: v.to(dtype) for k, v in sd.items()}
    cfg.to_json_file(os.path.join(path, "config.json"))
    if "sharded" in variant:
        names = sorted(sd)
        half = len(names) // 2
        shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
        weight_map = {}
        for fname, keys in shards.items():
            save_file({k: sd[k] for k in keys}, os.path.join(path, fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in keys})
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f, indent=1)
    else:
        save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def main():
    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    g = torch.Generator().manual_seed(7)
    # Speech-like input: a few decaying harmonics plus noise, amplitude ~0.3.
    waves = {}
    for i, n in enumerate(LENGTHS):
        t = torch.arange(n, dtype=torch.float64) / 16000
        w = sum(0.1 / (k + 1) * torch.sin(2 * np.pi * (120 + 35 * i) * (k + 1) * t) for k in range(5))
        w = w + 0.02 * torch.randn(n, generator=g, dtype=torch.float64)
        waves[f"wave{i}"] = w.to(torch.float32)
    save_file(waves, os.path.join(OUT, "waves.safetensors"))
    for seed, (name, (cls, cfg, variant)) in enumerate(MODELS.items()):
        torch.manual_seed(seed)
        model = cls(cfg).eval()
        randomize(model, 100 + seed)
        if "bf16" in variant:
            round_params(model, torch.bfloat16)
        elif "f16" in variant:
            round_params(model, torch.float16)
        write_checkpoint(model, cfg, os.path.join(OUT, name), variant)
        expected = {}
        with torch.no_grad():
            for k, w in waves.items():
                out = model(w[None], output_hidden_states=True)
                # State N is transformers' last_hidden_state (after the encoder's final LayerNorm
                # for pre-LN models), as transformers 4, fairseq and s3prl return it. transformers
                # 5 puts the raw last-layer output in hidden_states[-1] for pre-LN models instead.
                states = list(out.hidden_states[:-1]) + [out.last_hidden_state]
                if not cfg.do_stable_layer_norm:
                    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)
                hs = torch.stack(states, dim=0)[:, 0]  # (L, T, D)
                expected[k] = hs.permute(1, 0, 2).contiguous()  # frame-major [T, L, D]
        save_file(expected, os.path.join(OUT, name, "expected_hidden_states.safetensors"))
        print(f"{name}: {variant}, states {[tuple(v.shape) for v in expected.values()]}")
    # WavLM's relative-position bucket table as torch computes it (f32 log, truncation).
    m = WavLMModel(WavLMConfig(**SMALL)).encoder.layers[0].attention
    rel = torch.arange(-1500, 1501)[None, :]
    save_file({"relative_position": rel[0], "bucket": m._relative_positions_bucket(rel)[0]},
              os.path.join(OUT, "wavlm_buckets.safetensors"))
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(OUT) for f in fs)
    print(f"upstream fixtures: {total / 1e6:.2f} MB in {os.path.normpath(OUT)}")


if __name__ == "__main__":
    main()
