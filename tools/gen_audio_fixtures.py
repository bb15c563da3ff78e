#!/usr/bin/env python3
"""FLAC input fixtures for tests/audio.rs, written by libsndfile (through soundfile), the library
torchaudio and s3prl read audio with. Each FLAC comes with a WAV of the same integer samples, so
the test compares strata's FLAC decoding with its WAV reading bit for bit; the layout errors
(8 kHz, stereo) get a FLAC each.
    python3 tools/gen_audio_fixtures.py      (writes tests/fixtures/audio/)"""
import os

import numpy as np
import soundfile as sf

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "audio")


def speechlike(n, rate):
    """A tone pair with a slow envelope and a deterministic ripple: every bit of the integers
    varies, so a decoder that drops or shifts bits shows."""
    i = np.arange(n)
    env = 0.5 + 0.4 * np.sin(2 * np.pi * 3 * i / rate)
    tone = 0.6 * np.sin(2 * np.pi * 220 * i / rate) + 0.3 * np.sin(2 * np.pi * 1234.5 * i / rate + 0.7)
    ripple = ((i * 7919) % 101 - 50) / 50.0
    return env * tone, ripple


def main():
    os.makedirs(OUT, exist_ok=True)
    n = 8000  # 0.5 s at 16 kHz
    x, ripple = speechlike(n, 16000)
    pcm16 = np.clip(np.round(x * 26000 + ripple * 40), -32768, 32767).astype(np.int16)
    pcm24 = np.clip(np.round(x * 26000 * 256 + ripple * 10000), -(1 << 23), (1 << 23) - 1).astype(np.int32)
    for name, data, subtype in (("pcm16", pcm16, "PCM_16"), ("pcm24", pcm24 << 8, "PCM_24")):
        # soundfile takes int32 as the top bits of a 32-bit sample: PCM_24 keeps the 24 that
        # pcm24 << 8 puts there.
        for fmt in ("FLAC", "WAV"):
            sf.write(os.path.join(OUT, f"{name}.{fmt.lower()}"), data, 16000, subtype=subtype, format=fmt)
    short = pcm16[:800]
    sf.write(os.path.join(OUT, "narrow.flac"), short, 8000, subtype="PCM_16", format="FLAC")
    sf.write(os.path.join(OUT, "stereo.flac"), np.stack([short, short], 1), 16000, subtype="PCM_16", format="FLAC")
    for f in sorted(os.listdir(OUT)):
        print(f, os.path.getsize(os.path.join(OUT, f)))


if __name__ == "__main__":
    main()
