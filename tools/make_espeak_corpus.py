#!/usr/bin/env python3
"""Builds a small real-speech phone-recognition corpus with espeak-ng and sox (Debian packages:
apt-get install espeak-ng sox) in the Kaldi layout strata reads:

    OUT/{train,dev,test}/{wav.scp,text,utt2spk} and OUT/wav/*.wav (16 kHz mono PCM16)

Sentences are drawn deterministically from a fixed word list. Transcripts are espeak-ng's en-us
phonemes (-x mnemonics, stress marks removed), the canonical pronunciation of the text, for
`--task units`; or with `--transcripts words` the sentence itself, for `--task chars` (character
CTC, as ML-SUPERB). The audio is spoken by en-us voice variants; the split is by voice
(speaker-disjoint): train m1 m2 m3 f1 f2, dev m4 f3, test m5 f4.

    python3 tools/make_espeak_corpus.py OUT [--per-voice 40] [--seed 0] [--transcripts phones|words]
"""
import argparse
import os
import random
import subprocess
import tempfile

WORDS = """the a small large red green blue old new cold warm dark bright quiet loud happy sad
dog cat bird fish horse child teacher doctor farmer sailor river mountain forest garden city house
window table letter story song picture boat train road bridge morning evening winter summer water
bread apple stone paper music light fire wind rain snow reads finds opens carries builds paints
watches follows remembers brings sees hears loves keeps moves quickly slowly often never always
near under over behind across through beside and but with without""".split()

SPLITS = {"train": ["m1", "m2", "m3", "f1", "f2"], "dev": ["m4", "f3"], "test": ["m5", "f4"]}


def run(cmd):
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def phones(text):
    raw = run(["espeak-ng", "-v", "en-us", "-q", "-x", "--sep= ", text])
    return " ".join(p.strip("',") for p in raw.split() if p.strip("',"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--per-voice", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--transcripts", choices=["phones", "words"], default="phones")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    os.makedirs(os.path.join(args.out, "wav"), exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for split, voices in SPLITS.items():
            d = os.path.join(args.out, split)
            os.makedirs(d, exist_ok=True)
            scp, text, spk = [], [], []
            for v in voices:
                for i in range(args.per_voice):
                    sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 8)))
                    uid = f"{v}-{split}-{i:03d}"
                    raw = os.path.join(tmp, "raw.wav")
                    speed = str(rng.randint(140, 190))
                    run(["espeak-ng", "-v", f"en-us+{v}", "-s", speed, "-w", raw, sentence])
                    wav = os.path.join(args.out, "wav", uid + ".wav")
                    run(["sox", raw, "-r", "16000", "-c", "1", "-b", "16", wav])
                    scp.append(f"{uid} {os.path.relpath(wav, d)}")
                    said = phones(sentence) if args.transcripts == "phones" else sentence
                    text.append(f"{uid} {said}")
                    spk.append(f"{uid} {v}")
            for name, lines in (("wav.scp", scp), ("text", text), ("utt2spk", spk)):
                with open(os.path.join(d, name), "w") as f:
                    f.write("\n".join(lines) + "\n")
            print(f"{split}: {len(scp)} utterances, voices {', '.join(voices)}")


if __name__ == "__main__":
    main()
