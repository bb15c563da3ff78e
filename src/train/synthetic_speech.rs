//! A deterministic speech-like audio corpus, made in memory: utterances of phone-like units with
//! their transcripts, for the built-in demo and the tests. No downloads, no espeak.
//!
//! Vowels and nasals are harmonic sources (a speaker's f0 with jitter) shaped by formant resonances
//! at the unit's F1 / F2 (Peterson & Barney averages, scaled by the speaker's vocal-tract factor);
//! fricatives are band-passed noise. Units last 60-160 ms with 5 ms raised-cosine edges, with
//! silence around each utterance and a little background noise. It is not speech, but like speech
//! the unit identity lives in the short-time spectrum and varies across speakers, which is what a
//! frame-level recogniser has to learn.

use crate::error::Result;
use crate::rng::Rng;
use std::path::Path;

pub const RATE: usize = 16000;

enum Source {
    /// Formants (F1, F2) in Hz and a level.
    Voiced(f32, f32, f32),
    /// Noise band centre, bandwidth (Hz) and a level.
    Noise(f32, f32, f32),
}

/// The unit inventory: (name, source).
const UNITS: [(&str, Source); 16] = [
    ("iy", Source::Voiced(270.0, 2290.0, 1.0)),
    ("ih", Source::Voiced(390.0, 1990.0, 1.0)),
    ("eh", Source::Voiced(530.0, 1840.0, 1.0)),
    ("ae", Source::Voiced(660.0, 1720.0, 1.0)),
    ("ah", Source::Voiced(520.0, 1190.0, 1.0)),
    ("aa", Source::Voiced(730.0, 1090.0, 1.0)),
    ("ao", Source::Voiced(570.0, 840.0, 1.0)),
    ("uh", Source::Voiced(440.0, 1020.0, 1.0)),
    ("uw", Source::Voiced(300.0, 870.0, 1.0)),
    ("er", Source::Voiced(490.0, 1350.0, 1.0)),
    ("m", Source::Voiced(250.0, 1000.0, 0.35)),
    ("n", Source::Voiced(250.0, 1700.0, 0.35)),
    ("s", Source::Noise(5500.0, 2000.0, 0.5)),
    ("sh", Source::Noise(3200.0, 1400.0, 0.6)),
    ("f", Source::Noise(4000.0, 5000.0, 0.2)),
    ("h", Source::Noise(1500.0, 1800.0, 0.25)),
];

/// The unit names, in inventory order.
pub fn unit_names() -> Vec<&'static str> {
    UNITS.iter().map(|u| u.0).collect()
}

pub struct SpeechUtterance {
    pub id: String,
    /// 16 kHz mono samples in [-1, 1].
    pub wave: Vec<f32>,
    /// Unit names, in order.
    pub units: Vec<String>,
}

struct Speaker {
    f0: f32,
    tract: f32,
    gain: f32,
}

/// A raised-cosine edge over the first / last 5 ms.
fn envelope(i: usize, n: usize) -> f32 {
    let ramp = RATE / 200;
    let d = i.min(n - 1 - i);
    if d >= ramp {
        1.0
    } else {
        0.5 - 0.5 * (std::f32::consts::PI * d as f32 / ramp as f32).cos()
    }
}

fn voiced(
    out: &mut Vec<f32>,
    n: usize,
    f1: f32,
    f2: f32,
    level: f32,
    spk: &Speaker,
    rng: &mut Rng,
) {
    let f0 = spk.f0 * (1.0 + 0.04 * rng.normal());
    let (f1, f2) = (f1 * spk.tract, f2 * spk.tract);
    let resonance = |f: f32, centre: f32, bw: f32| 1.0 / (1.0 + ((f - centre) / bw).powi(2));
    // Each harmonic as a rotating phasor: one complex multiply per sample, no sin().
    let mut harmonics = Vec::new();
    let mut h = 1.0f32;
    while h * f0 < 5000.0 {
        let f = h * f0;
        let a = resonance(f, f1, 90.0) + 0.7 * resonance(f, f2, 120.0) + 0.02;
        let w = 2.0 * std::f64::consts::PI * f as f64 / RATE as f64;
        let phase = 2.0 * std::f64::consts::PI * rng.next_f64();
        harmonics.push((a as f64, (w.cos(), w.sin()), (phase.cos(), phase.sin())));
        h += 1.0;
    }
    let norm: f64 = harmonics
        .iter()
        .map(|h| h.0 * h.0)
        .sum::<f64>()
        .sqrt()
        .max(1e-9);
    for i in 0..n {
        let mut s = 0f64;
        for (a, (c, sn), z) in harmonics.iter_mut() {
            s += *a * z.1;
            *z = (z.0 * *c - z.1 * *sn, z.0 * *sn + z.1 * *c);
        }
        out.push((0.35 * level * spk.gain) * (s / norm) as f32 * envelope(i, n));
    }
}

fn noise(
    out: &mut Vec<f32>,
    n: usize,
    centre: f32,
    bw: f32,
    level: f32,
    spk: &Speaker,
    rng: &mut Rng,
) {
    // A two-pole resonator (constant-gain band-pass) on white noise.
    let centre = (centre * spk.tract).min(7200.0);
    let r = (-std::f32::consts::PI * bw / RATE as f32).exp();
    let theta = 2.0 * std::f32::consts::PI * centre / RATE as f32;
    let (a1, a2) = (2.0 * r * theta.cos(), -r * r);
    let g = (1.0 - r * r).sqrt();
    let (mut y1, mut y2) = (0f32, 0f32);
    for i in 0..n {
        let y = g * rng.normal() + a1 * y1 + a2 * y2;
        y2 = y1;
        y1 = y;
        out.push(0.35 * level * spk.gain * y * envelope(i, n));
    }
}

/// `count` utterances of 4-10 units each, speakers and content drawn from `seed`; ids are
/// `{prefix}{index:04}`.
pub fn corpus(seed: u64, count: usize, prefix: &str) -> Vec<SpeechUtterance> {
    let mut rng = Rng::new(seed);
    (0..count)
        .map(|u| {
            let spk = Speaker {
                f0: rng.uniform(90.0, 230.0),
                tract: rng.uniform(0.88, 1.15),
                gain: rng.uniform(0.6, 1.0),
            };
            let mut wave = Vec::new();
            let silence = |rng: &mut Rng| RATE * (50 + rng.below(100)) / 1000;
            wave.resize(silence(&mut rng), 0.0);
            let mut units = Vec::new();
            for _ in 0..4 + rng.below(7) {
                let k = rng.below(UNITS.len());
                let ms = match UNITS[k].1 {
                    Source::Voiced(..) => 70 + rng.below(90),
                    Source::Noise(..) => 60 + rng.below(70),
                };
                let n = RATE * ms / 1000;
                match UNITS[k].1 {
                    Source::Voiced(f1, f2, level) => {
                        voiced(&mut wave, n, f1, f2, level, &spk, &mut rng)
                    }
                    Source::Noise(c, bw, level) => {
                        noise(&mut wave, n, c, bw, level, &spk, &mut rng)
                    }
                }
                units.push(UNITS[k].0.to_string());
            }
            let tail = silence(&mut rng);
            wave.resize(wave.len() + tail, 0.0);
            for s in &mut wave {
                *s = (*s + 0.003 * rng.normal()).clamp(-1.0, 1.0);
            }
            SpeechUtterance {
                id: format!("{prefix}{u:04}"),
                wave,
                units,
            }
        })
        .collect()
}

/// Writes a corpus as a Kaldi-style folder: one PCM16 WAV per utterance, `wav.scp` and `text`.
pub fn write_kaldi_dir(dir: &Path, utts: &[SpeechUtterance]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| crate::error::Error::Io {
        path: dir.display().to_string(),
        detail: format!("cannot create: {e}"),
    })?;
    let (mut scp, mut text) = (String::new(), String::new());
    for u in utts {
        let file = format!("{}.wav", u.id);
        crate::audio::write_wav_pcm16(&dir.join(&file), &u.wave)?;
        scp.push_str(&format!("{} {file}\n", u.id));
        text.push_str(&format!("{} {}\n", u.id, u.units.join(" ")));
    }
    for (name, body) in [("wav.scp", scp), ("text", text)] {
        std::fs::write(dir.join(name), body).map_err(|e| crate::error::Error::Io {
            path: dir.join(name).display().to_string(),
            detail: format!("cannot write: {e}"),
        })?;
    }
    Ok(())
}
