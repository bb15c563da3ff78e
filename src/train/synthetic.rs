//! A deterministic synthetic hidden-state corpus for the built-in demo and the benches: utterances
//! of "phones" (2-5 frames each), whose identity is written into a [frames, L, D] stack the way SSL
//! upstreams tend to hold it — strongest in the middle layers, blurred towards the neighbouring
//! phone in the upper layers, buried in noise at the bottom. No audio, no downloads.

use crate::rng::Rng;
use crate::tensor::Tensor;

pub struct Utterance {
    /// [frames, L, D]
    pub stack: Tensor,
    /// Phone labels in 1..=phones (0 is the CTC blank).
    pub phones: Vec<usize>,
}

pub struct SyntheticCorpus {
    pub layers: usize,
    pub dim: usize,
    /// Number of phone classes, excluding the blank: the CTC vocabulary is phones + 1.
    pub phones: usize,
    pub utterances: Vec<Utterance>,
}

/// The fixed "upstream": phone embeddings, per-layer mixing and gain. Train, dev and test sets
/// drawn from one world share it and differ only in the utterances sampled.
pub struct SyntheticWorld {
    pub layers: usize,
    pub dim: usize,
    pub phones: usize,
    embed: Vec<Vec<f32>>,
    mix: Vec<Vec<f32>>,
    gain: Vec<f32>,
}

impl SyntheticWorld {
    pub fn new(seed: u64, layers: usize, dim: usize, phones: usize) -> Self {
        let mut rng = Rng::new(seed);
        let embed = (0..=phones)
            .map(|_| (0..dim).map(|_| rng.normal()).collect())
            .collect();
        let mix = (0..layers)
            .map(|_| {
                (0..dim * dim)
                    .map(|_| rng.normal() / (dim as f32).sqrt())
                    .collect()
            })
            .collect();
        let centre = (layers as f32 - 1.0) * 0.6;
        let gain = (0..layers)
            .map(|l| (-((l as f32 - centre) / (layers as f32 * 0.25)).powi(2)).exp())
            .collect();
        SyntheticWorld {
            layers,
            dim,
            phones,
            embed,
            mix,
            gain,
        }
    }

    /// `count` utterances sampled with `seed`.
    pub fn corpus(&self, seed: u64, count: usize) -> SyntheticCorpus {
        let (layers, dim) = (self.layers, self.dim);
        let mut rng = Rng::new(seed);
        let mut utterances = Vec::with_capacity(count);
        for _ in 0..count {
            let n_phones = 4 + rng.below(7);
            let labels: Vec<usize> = (0..n_phones).map(|_| 1 + rng.below(self.phones)).collect();
            let mut frame_phone = Vec::new();
            for (i, &p) in labels.iter().enumerate() {
                for _ in 0..2 + rng.below(4) {
                    frame_phone.push((p, labels.get(i + 1).copied().unwrap_or(0)));
                }
            }
            let frames = frame_phone.len();
            let mut data = vec![0f32; frames * layers * dim];
            for (t, &(p, next)) in frame_phone.iter().enumerate() {
                for l in 0..layers {
                    // Upper layers drift towards the next phone (context), lower ones towards noise.
                    let blur = l as f32 / layers as f32 * 0.5;
                    let src: Vec<f32> = (0..dim)
                        .map(|i| (1.0 - blur) * self.embed[p][i] + blur * self.embed[next][i])
                        .collect();
                    let row = &mut data[(t * layers + l) * dim..(t * layers + l + 1) * dim];
                    for (o, r) in row.iter_mut().enumerate() {
                        let m = &self.mix[l][o * dim..(o + 1) * dim];
                        let signal: f32 = m.iter().zip(&src).map(|(a, b)| a * b).sum();
                        *r = self.gain[l] * signal + NOISE * rng.normal();
                    }
                }
            }
            let stack = Tensor::from_vec(data, &[frames, layers, dim]).expect("sizes agree");
            utterances.push(Utterance {
                stack,
                phones: labels,
            });
        }
        SyntheticCorpus {
            layers,
            dim,
            phones: self.phones,
            utterances,
        }
    }
}

/// Per-element noise next to a unit-scale signal at the best layer.
const NOISE: f32 = 1.5;

/// Packs utterances into one [frames, L, D] stack (frame-major, utterances concatenated).
pub fn pack(utts: &[&Utterance]) -> (Tensor, Vec<usize>) {
    let (l, d) = (utts[0].stack.shape()[1], utts[0].stack.shape()[2]);
    let mut data = Vec::new();
    let mut lengths = Vec::new();
    for u in utts {
        data.extend_from_slice(&u.stack.to_vec());
        lengths.push(u.stack.shape()[0]);
    }
    let frames = lengths.iter().sum();
    (
        Tensor::from_vec(data, &[frames, l, d]).expect("sizes agree"),
        lengths,
    )
}
