//! The ML-SUPERB downstream (ESPnet's `egs2/ml_superb` recipe, `train_asr_s3prl_{10min,1h}`): a
//! small transformer CTC model over the interface's features.
//!
//! features [frames, D'] -> (training: SpecAugment's time warp and masks) -> each utterance minus
//! its mean frame (`UtteranceMVN`, means only) -> Linear(D', 80) (`preencoder: linear`) ->
//! `Conv2dSubsampling2` (Conv2d(1, 256, 3, stride 2) + ReLU, Conv2d(256, 256, 3, stride 1) + ReLU
//! over each utterance's (time, 80) plane, then Linear(256 * 37, 256), x * 16 + sinusoidal
//! positions, dropout; t frames -> (t - 1) / 2 - 2) -> 2 pre-LN transformer blocks (8 heads, FFN
//! 1024 with ReLU, dropout 0.1 on residual branches, FFN and attention probabilities) -> LayerNorm
//! -> Linear(256, V) (`ctc_lo`). ESPnet's LayerNorm has eps 1e-12; the initialization is PyTorch's
//! (the recipe says `init: none`).
//!
//! Where a packed batch differs from ESPnet's padded one: ESPnet subsamples the padding mask by
//! slicing the padded length (`x_mask[:, :, :-2:2][:, :, :-2:1]`), so in a training batch a
//! shorter utterance keeps (t + 1) / 2 frames, its last ones computed from padding; here every
//! utterance gets (t - 1) / 2 - 2, what ESPnet gives it alone (as at inference), whatever the
//! batch. SpecAugment: ESPnet draws a time mask's width from the padded batch length, a feature
//! mask's position from the batch's widest mask, and one time warp for a batch of equal lengths;
//! here all three come from each utterance itself.

use crate::autograd::{ParamStore, Tape, Var};
use crate::batch::PackedBatch;
use crate::error::{Error, Result};
use crate::models::nn::{LayerNorm, Linear};
use crate::ops::attention::ProbDropout;
use crate::ops::conv2d::PatchGeom;
use crate::rng::Rng;
use crate::tensor::Tensor;

/// SpecAugment as ML-SUPERB's recipe: a bicubic time warp (window 5), then 2 feature masks 0-26
/// wide and 10 time masks up to 5% of the utterance, replaced with zeros.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SpecAugmentConfig {
    /// The time warp's window W: the warp's center is drawn from [W, t - W), the frames before it
    /// resampled to center + [-W + 1, W] frames; no warp for t <= 2W; 0 turns it off.
    pub time_warp_window: usize,
    /// Feature-mask widths are drawn from [lo, hi).
    pub freq_width: (usize, usize),
    pub freq_masks: usize,
    /// Time-mask widths are drawn from [lo * t, hi * t) frames of an utterance of t frames.
    pub time_ratio: (f64, f64),
    pub time_masks: usize,
}

impl Default for SpecAugmentConfig {
    fn default() -> Self {
        SpecAugmentConfig {
            time_warp_window: 5,
            freq_width: (0, 27),
            freq_masks: 2,
            time_ratio: (0.0, 0.05),
            time_masks: 10,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MlSuperbHeadConfig {
    /// The preencoder's output (the "filterbank" width the convolutions see).
    pub preencoder_dim: usize,
    /// The transformer's width (also the convolutions' channels).
    pub width: usize,
    pub heads: usize,
    pub ffn: usize,
    pub blocks: usize,
    /// Dropout after the positional encoding, on residual branches and inside the FFN.
    pub dropout: f64,
    pub attention_dropout: f64,
    /// None: no SpecAugment.
    pub specaug: Option<SpecAugmentConfig>,
}

impl Default for MlSuperbHeadConfig {
    fn default() -> Self {
        MlSuperbHeadConfig {
            preencoder_dim: 80,
            width: 256,
            heads: 8,
            ffn: 1024,
            blocks: 2,
            dropout: 0.1,
            attention_dropout: 0.1,
            specaug: Some(SpecAugmentConfig::default()),
        }
    }
}

/// Conv2dSubsampling2's kernel and strides.
const CONV_KERNEL: usize = 3;
const CONV1_STRIDE: usize = 2;

impl MlSuperbHeadConfig {
    /// The dropout on the attention probabilities of a training forward (`seed` Some), none in
    /// evaluation or at p = 0.
    pub fn attention_dropout_with(&self, seed: Option<u64>) -> Option<ProbDropout> {
        seed.filter(|_| self.attention_dropout > 0.0)
            .map(|seed| ProbDropout {
                p: self.attention_dropout,
                seed,
            })
    }
}

/// The seeds of one training forward's random sites, drawn from the micro-batch's seed in one
/// fixed order: the CPU head and the device step both take theirs from here, so they draw the
/// same dropout and SpecAugment masks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrainingSeeds {
    pub warp: u64,
    pub mask: u64,
    /// The dropout after the positional encoding.
    pub positions: u64,
    /// Per block: attention probabilities, attention output, FFN hidden, FFN output.
    pub blocks: Vec<[u64; 4]>,
}

impl TrainingSeeds {
    pub fn draw(seed: u64, blocks: usize) -> Self {
        let mut rng = Rng::new(seed);
        let (warp, mask, positions) = (rng.next_u64(), rng.next_u64(), rng.next_u64());
        let blocks = (0..blocks)
            .map(|_| {
                [
                    rng.next_u64(),
                    rng.next_u64(),
                    rng.next_u64(),
                    rng.next_u64(),
                ]
            })
            .collect();
        TrainingSeeds {
            warp,
            mask,
            positions,
            blocks,
        }
    }

    /// Block `i`'s four seeds, or none in evaluation.
    pub fn block(seeds: Option<&Self>, i: usize) -> [Option<u64>; 4] {
        seeds.map_or([None; 4], |s| s.blocks[i].map(Some))
    }
}

/// Head output frames for `frames` input frames (None: too short for the two convolutions).
pub fn mlsuperb_frames(frames: usize) -> Option<usize> {
    let after1 = frames.checked_sub(CONV_KERNEL)? / CONV1_STRIDE + 1;
    Some(after1.checked_sub(CONV_KERNEL)? + 1)
}

/// Input frames the head needs for one output frame (7: 140 ms at 50 Hz).
pub const MLSUPERB_MIN_FRAMES: usize = 2 * CONV_KERNEL + 1;

/// Refuses a batch with an utterance too short for the head's convolutions, naming it.
pub fn check_lengths(batch: &PackedBatch) -> Result<()> {
    match (0..batch.num_utterances()).find(|&u| mlsuperb_frames(batch.len_of(u)).is_none()) {
        Some(u) => Err(Error::value(
            "ML-SUPERB head input",
            format!(
                "utterance {u} of the batch has {} frames; the head's convolutions need at least {MLSUPERB_MIN_FRAMES} (about 0.15 s of audio): leave shorter utterances out",
                batch.len_of(u)
            ),
        )),
        None => Ok(()),
    }
}

pub struct EncoderBlock {
    pub norm1: LayerNorm,
    pub linear_q: Linear,
    pub linear_k: Linear,
    pub linear_v: Linear,
    pub linear_out: Linear,
    pub norm2: LayerNorm,
    pub w_1: Linear,
    pub w_2: Linear,
}

pub struct MlSuperbHead {
    pub config: MlSuperbHeadConfig,
    pub preencoder: Linear,
    /// The convolutions as GEMMs over im2col patches: weight [c_out, 3 * 3 * c_in] (PyTorch's
    /// Conv2d weight [c_out, c_in, 3, 3] permuted to [c_out, 3, 3, c_in]; see `ops::conv2d`),
    /// with Conv2d's default initialization (that of a Linear of fan-in 9 c_in).
    pub conv1: Linear,
    pub conv2: Linear,
    pub embed_out: Linear,
    pub blocks: Vec<EncoderBlock>,
    pub after_norm: LayerNorm,
    pub ctc_lo: Linear,
    /// Features per frame after each convolution.
    freq1: usize,
    freq2: usize,
}

/// ESPnet's LayerNorm: nn.LayerNorm with eps 1e-12.
fn espnet_norm(store: &mut ParamStore, name: &str, dim: usize) -> Result<LayerNorm> {
    let mut n = LayerNorm::new(store, name, dim)?;
    n.eps = 1e-12;
    Ok(n)
}

impl MlSuperbHead {
    pub fn new(
        store: &mut ParamStore,
        prefix: &str,
        in_dim: usize,
        config: MlSuperbHeadConfig,
        vocab: usize,
        rng: &mut Rng,
    ) -> Result<Self> {
        let c = config;
        if c.heads == 0 || !c.width.is_multiple_of(c.heads) {
            return Err(Error::Config(format!(
                "ML-SUPERB head: width {} is not divisible into {} attention heads",
                c.width, c.heads
            )));
        }
        let geom1 = PatchGeom {
            freq: c.preencoder_dim,
            channels: 1,
            kernel: CONV_KERNEL,
            stride: CONV1_STRIDE,
        };
        let freq1 = geom1.out_len(c.preencoder_dim);
        let freq2 = freq1.and_then(|f| f.checked_sub(CONV_KERNEL).map(|v| v + 1));
        let (Some(freq1), Some(freq2 @ 1..)) = (freq1, freq2) else {
            return Err(Error::Config(format!(
                "ML-SUPERB head: a preencoder width of {} is too narrow for the two 3 x 3 convolutions (at least 7)",
                c.preencoder_dim
            )));
        };
        let (w, p) = (c.width, prefix);
        let k2 = CONV_KERNEL * CONV_KERNEL;
        let preencoder = Linear::new(
            store,
            &format!("{p}preencoder"),
            in_dim,
            c.preencoder_dim,
            true,
            rng,
        )?;
        let conv1 = Linear::new(store, &format!("{p}embed.conv1"), k2, w, true, rng)?;
        let conv2 = Linear::new(store, &format!("{p}embed.conv2"), w * k2, w, true, rng)?;
        let embed_out = Linear::new(store, &format!("{p}embed.out"), w * freq2, w, true, rng)?;
        let mut blocks = Vec::with_capacity(c.blocks);
        for i in 0..c.blocks {
            let b = format!("{p}encoders.{i}.");
            let lin = |store: &mut ParamStore, name: &str, i: usize, o: usize, rng: &mut Rng| {
                Linear::new(store, &format!("{b}{name}"), i, o, true, rng)
            };
            blocks.push(EncoderBlock {
                norm1: espnet_norm(store, &format!("{b}norm1"), w)?,
                linear_q: lin(store, "self_attn.linear_q", w, w, rng)?,
                linear_k: lin(store, "self_attn.linear_k", w, w, rng)?,
                linear_v: lin(store, "self_attn.linear_v", w, w, rng)?,
                linear_out: lin(store, "self_attn.linear_out", w, w, rng)?,
                norm2: espnet_norm(store, &format!("{b}norm2"), w)?,
                w_1: lin(store, "feed_forward.w_1", w, c.ffn, rng)?,
                w_2: lin(store, "feed_forward.w_2", c.ffn, w, rng)?,
            });
        }
        let after_norm = espnet_norm(store, &format!("{p}after_norm"), w)?;
        let ctc_lo = Linear::new(store, &format!("{p}ctc_lo"), w, vocab, true, rng)?;
        Ok(MlSuperbHead {
            config,
            preencoder,
            conv1,
            conv2,
            embed_out,
            blocks,
            after_norm,
            ctc_lo,
            freq1,
            freq2,
        })
    }

    /// The patch geometries of Conv2dSubsampling2's two convolutions.
    pub fn conv_geoms(&self) -> (PatchGeom, PatchGeom) {
        let first = PatchGeom {
            freq: self.config.preencoder_dim,
            channels: 1,
            kernel: CONV_KERNEL,
            stride: CONV1_STRIDE,
        };
        let second = PatchGeom {
            freq: self.freq1,
            channels: self.config.width,
            kernel: CONV_KERNEL,
            stride: 1,
        };
        (first, second)
    }

    /// Features per frame after the convolutions (what `embed.out` reads channel-major).
    pub fn conv_out_features(&self) -> usize {
        self.freq2
    }

    pub fn vocab(&self) -> usize {
        self.ctc_lo.out_features
    }

    /// The trainable scalars of a head on `in_dim` features (what [`MlSuperbHead::new`] would
    /// add to a store), without building it; None for a configuration `new` refuses.
    pub fn num_params(in_dim: usize, c: &MlSuperbHeadConfig, vocab: usize) -> Option<usize> {
        let freq2 = mlsuperb_frames(c.preencoder_dim)?;
        if c.heads == 0 || !c.width.is_multiple_of(c.heads) {
            return None;
        }
        let (w, k2) = (c.width, CONV_KERNEL * CONV_KERNEL);
        let linear = |i: usize, o: usize| i * o + o;
        let block = 2 * w + 4 * linear(w, w) + 2 * w + linear(w, c.ffn) + linear(c.ffn, w);
        Some(
            linear(in_dim, c.preencoder_dim)
                + linear(k2, w)
                + linear(k2 * w, w)
                + linear(w * freq2, w)
                + c.blocks * block
                + 2 * w
                + linear(w, vocab),
        )
    }

    /// `base` widened (its transformer width and FFN in proportion, whole attention heads) until a
    /// head on `in_dim` features has about `target` scalars: the ML-SUPERB form of the paper's
    /// "WS + Large DS" (see [`crate::train::side_by_side::HeadWidth::MatchParams`]). None when
    /// even `base` is larger.
    pub fn widened_to(
        base: &MlSuperbHeadConfig,
        in_dim: usize,
        vocab: usize,
        target: usize,
    ) -> Option<MlSuperbHeadConfig> {
        let at = |width: usize| MlSuperbHeadConfig {
            width,
            ffn: base.ffn * width / base.width,
            ..*base
        };
        let size = |width: usize| Self::num_params(in_dim, &at(width), vocab);
        if size(base.width)? > target {
            return None;
        }
        // The size grows with the width: stop at the first step past the target.
        let mut width = base.width;
        while size(width + base.heads)? <= target {
            width += base.heads;
        }
        let (below, above) = (size(width)?, size(width + base.heads)?);
        Some(at(if target - below <= above - target {
            width
        } else {
            width + base.heads
        }))
    }

    /// features [frames, D'] of a packed batch -> (logits [frames', V], the batch of frames').
    /// `train`: Some(seed) applies SpecAugment and dropout with masks drawn from the seed (a
    /// training step); None is evaluation.
    pub fn forward(
        &self,
        tape: &mut Tape,
        store: &ParamStore,
        x: Var,
        batch: &PackedBatch,
        train: Option<u64>,
    ) -> Result<(Var, PackedBatch)> {
        let c = &self.config;
        check_lengths(batch)?;
        let seeds = train.map(|seed| TrainingSeeds::draw(seed, self.blocks.len()));
        let mut x = x;
        if let (Some(spec), Some(seeds)) = (&c.specaug, &seeds) {
            if spec.time_warp_window > 0 {
                x = tape.time_mix(x, time_warp(spec.time_warp_window, batch, seeds.warp))?;
            }
            let d = tape.shape(x)[1];
            let mask = specaug_mask(spec, batch, d, seeds.mask)?;
            x = tape.mul_const(x, &mask)?;
        }
        let x = tape.utterance_center(x, batch)?;
        let x = self.preencoder.forward(tape, store, x)?;
        // Conv2dSubsampling2.
        let w = c.width;
        let (geom1, geom2) = self.conv_geoms();
        let (p1, b1, _) = tape.conv2d_patches(x, batch, geom1)?;
        let h = self.conv1.forward(tape, store, p1)?;
        let h = tape.relu(h)?;
        let h = tape.reshape(h, &[b1.total_frames(), self.freq1 * w])?;
        let w2 = tape.param(store, self.conv2.weight);
        let bias2 = self.conv2.bias.map(|b| tape.param(store, b));
        let bias2 =
            bias2.ok_or_else(|| Error::Config("ML-SUPERB head: conv2 has no bias".into()))?;
        // Stride 1 and 256 channels: shifted GEMMs, not 9 x 256-wide patches.
        let (h, b2) = tape.conv2d_stride1(h, &b1, (w2, bias2), geom2)?;
        let h = tape.relu(h)?;
        // (frames, freq, channels) -> channel-major rows, as torch's x.transpose(1, 2).view(b, t, c * f).
        let h = tape.reshape(h, &[b2.total_frames(), self.freq2, w])?;
        let h = tape.flatten_channel_major(h)?;
        let h = self.embed_out.forward(tape, store, h)?;
        let h = tape.scale(h, (w as f32).sqrt())?;
        let pe = tape.constant(positions(&b2, w)?)?;
        let mut x = tape.add(h, pe)?;
        let dropout = |tape: &mut Tape, v: Var, p: f64, seed: Option<u64>| match seed {
            Some(seed) if p > 0.0 => tape.dropout(v, p, seed),
            _ => Ok(v),
        };
        x = dropout(tape, x, c.dropout, seeds.as_ref().map(|s| s.positions))?;
        for (i, blk) in self.blocks.iter().enumerate() {
            let [attn, attn_out, ffn, ffn_out] = TrainingSeeds::block(seeds.as_ref(), i);
            let y = blk.norm1.forward(tape, store, x)?;
            let q = blk.linear_q.forward(tape, store, y)?;
            let k = blk.linear_k.forward(tape, store, y)?;
            let v = blk.linear_v.forward(tape, store, y)?;
            let attn_drop = c.attention_dropout_with(attn);
            let a = tape.packed_self_attention((q, k, v), &b2, c.heads, attn_drop)?;
            let a = blk.linear_out.forward(tape, store, a)?;
            let a = dropout(tape, a, c.dropout, attn_out)?;
            x = tape.add(x, a)?;
            let y = blk.norm2.forward(tape, store, x)?;
            let f = blk.w_1.forward(tape, store, y)?;
            let f = tape.relu(f)?;
            let f = dropout(tape, f, c.dropout, ffn)?;
            let f = blk.w_2.forward(tape, store, f)?;
            let f = dropout(tape, f, c.dropout, ffn_out)?;
            x = tape.add(x, f)?;
        }
        let x = self.after_norm.forward(tape, store, x)?;
        let logits = self.ctc_lo.forward(tape, store, x)?;
        Ok((logits, b2))
    }
}

/// The rates r_i of [`positions`], one per sine / cosine pair.
pub fn position_rates(d: usize) -> Vec<f32> {
    (0..d.div_ceil(2))
        .map(|i| ((2 * i) as f32 * -((10000f64.ln() / d as f64) as f32)).exp())
        .collect()
}

/// ESPnet's `PositionalEncoding` table for each utterance's frames (positions restart at 0 per
/// utterance): pe[t, 2i] = sin(t * r_i), pe[t, 2i + 1] = cos(t * r_i), r_i = exp(-2i ln(10000) /
/// d), computed in f32 as torch does.
pub fn positions(batch: &PackedBatch, d: usize) -> Result<Tensor> {
    let rates = position_rates(d);
    let mut pe = Vec::with_capacity(batch.total_frames() * d);
    for u in 0..batch.num_utterances() {
        for t in 0..batch.len_of(u) {
            for j in 0..d {
                let a = t as f32 * rates[j / 2];
                pe.push(if j % 2 == 0 { a.sin() } else { a.cos() });
            }
        }
    }
    Tensor::from_vec(pe, &[batch.total_frames(), d])
}

/// SpecAugment's time warp of every utterance of a packed batch (each its own center and warp, as
/// ESPnet does for a batch of unequal lengths), as taps for [`Tape::time_mix`].
pub fn time_warp(window: usize, batch: &PackedBatch, seed: u64) -> Vec<crate::ops::resample::Taps> {
    let mut rng = Rng::new(seed);
    let mut taps = Vec::with_capacity(batch.total_frames());
    for u in 0..batch.num_utterances() {
        let (first, t) = (batch.offsets()[u], batch.len_of(u));
        if t <= 2 * window {
            taps.extend((first..first + t).map(|f| [(f, 1.0), (f, 0.0), (f, 0.0), (f, 0.0)]));
            continue;
        }
        let center = window + rng.below(t - 2 * window);
        let warped = center - window + rng.below(2 * window) + 1;
        taps.extend(crate::ops::resample::time_warp_taps(
            first, t, center, warped,
        ));
    }
    taps
}

/// SpecAugment's masked spans of one utterance: feature ranges (masked in every frame) and frame
/// ranges (relative to the utterance's first frame), half-open.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MaskedSpans {
    pub features: Vec<(usize, usize)>,
    pub frames: Vec<(usize, usize)>,
}

/// SpecAugment's masked spans for features [frames, d] of a packed batch: per utterance, feature
/// masks then time masks, drawn from `seed`.
pub fn specaug_spans(
    cfg: &SpecAugmentConfig,
    batch: &PackedBatch,
    d: usize,
    seed: u64,
) -> Vec<MaskedSpans> {
    let mut rng = Rng::new(seed);
    // `count` spans lo..hi wide, drawn from [lo, hi), positioned in [0, max(1, len - widest)).
    let spans = |rng: &mut Rng, count: usize, (lo, hi): (usize, usize), len: usize| {
        if hi <= lo {
            return Vec::new();
        }
        let widths: Vec<usize> = (0..count).map(|_| lo + rng.below(hi - lo)).collect();
        let widest = widths.iter().copied().max().unwrap_or(0);
        let room = len.saturating_sub(widest).max(1);
        widths
            .into_iter()
            .map(|w| {
                let start = rng.below(room);
                (start, (start + w).min(len))
            })
            .collect::<Vec<_>>()
    };
    (0..batch.num_utterances())
        .map(|u| {
            let t = batch.len_of(u);
            let features = spans(&mut rng, cfg.freq_masks, cfg.freq_width, d);
            let lo = (cfg.time_ratio.0 * t as f64).floor() as usize;
            let hi = ((cfg.time_ratio.1 * t as f64).floor() as usize).min(t);
            let frames = spans(&mut rng, cfg.time_masks, (lo, hi), t);
            MaskedSpans { features, frames }
        })
        .collect()
}

/// SpecAugment's keep mask (1 kept, 0 masked) for features [frames, d] of a packed batch
/// ([`specaug_spans`] drawn from `seed`).
pub fn specaug_mask(
    cfg: &SpecAugmentConfig,
    batch: &PackedBatch,
    d: usize,
    seed: u64,
) -> Result<Tensor> {
    let mut mask = vec![1f32; batch.total_frames() * d];
    for (u, spans) in specaug_spans(cfg, batch, d, seed).iter().enumerate() {
        let (first, t) = (batch.offsets()[u], batch.len_of(u));
        let rows = &mut mask[first * d..(first + t) * d];
        for &(a, b) in &spans.features {
            for row in rows.chunks_exact_mut(d) {
                row[a..b].iter_mut().for_each(|m| *m = 0.0);
            }
        }
        for &(a, b) in &spans.frames {
            rows[a * d..b * d].iter_mut().for_each(|m| *m = 0.0);
        }
    }
    Tensor::from_vec(mask, &[batch.total_frames(), d])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parameter_count_is_what_new_adds_and_widening_meets_a_target() {
        let small = MlSuperbHeadConfig {
            preencoder_dim: 16,
            width: 16,
            heads: 4,
            ffn: 32,
            ..MlSuperbHeadConfig::default()
        };
        for (dim, c, vocab) in [(12, small, 7), (40, MlSuperbHeadConfig::default(), 41)] {
            let mut store = ParamStore::new();
            MlSuperbHead::new(&mut store, "h.", dim, c, vocab, &mut Rng::new(0)).unwrap();
            assert_eq!(
                MlSuperbHead::num_params(dim, &c, vocab),
                Some(store.num_scalars())
            );
        }
        let base = MlSuperbHeadConfig::default();
        let own = MlSuperbHead::num_params(768, &base, 41).unwrap();
        let wide = MlSuperbHead::widened_to(&base, 768, 41, 2 * own).unwrap();
        assert_eq!(
            (wide.width % 8, wide.ffn, wide.heads),
            (0, 4 * wide.width, 8)
        );
        let got = MlSuperbHead::num_params(768, &wide, 41).unwrap();
        let step = |w: usize| {
            let at = |w| MlSuperbHeadConfig {
                width: w,
                ffn: 4 * w,
                ..base
            };
            MlSuperbHead::num_params(768, &at(w + 8), 41).unwrap()
                - MlSuperbHead::num_params(768, &at(w), 41).unwrap()
        };
        assert!(
            got.abs_diff(2 * own) <= step(wide.width) / 2,
            "{got} vs {}",
            2 * own
        );
        assert_eq!(MlSuperbHead::widened_to(&base, 768, 41, own - 1), None);
    }

    #[test]
    fn output_frames_follow_conv2d_subsampling2() {
        // (t - 1) / 2 - 2, as ESPnet's mask x_mask[:, :, :-2:2][:, :, :-2:1].
        for t in 7..200 {
            assert_eq!(mlsuperb_frames(t), Some((t - 1) / 2 - 2), "{t}");
        }
        assert_eq!(mlsuperb_frames(6), None);
        assert_eq!(mlsuperb_frames(MLSUPERB_MIN_FRAMES), Some(1));
    }

    #[test]
    fn time_warps_stay_in_each_utterance_and_leave_short_ones_alone() {
        let batch = PackedBatch::from_lengths(&[30, 10, 25]).unwrap();
        let taps = time_warp(5, &batch, 7);
        assert_eq!(taps.len(), 65);
        for (j, t) in taps.iter().enumerate() {
            let u = (0..3).find(|&u| j < batch.offsets()[u + 1]).unwrap();
            let range = batch.offsets()[u]..batch.offsets()[u + 1];
            assert!(t.iter().all(|(f, _)| range.contains(f)), "frame {j}: {t:?}");
        }
        // 10 frames <= 2 x 5: unwarped.
        for (j, t) in taps.iter().enumerate().take(40).skip(30) {
            assert_eq!(t[0], (j, 1.0));
        }
        assert_ne!(taps, time_warp(5, &batch, 8));
    }

    #[test]
    fn specaug_masks_stay_in_each_utterance_and_vary_with_the_seed() {
        let batch = PackedBatch::from_lengths(&[100, 60]).unwrap();
        let cfg = SpecAugmentConfig::default();
        let a = specaug_mask(&cfg, &batch, 256, 3).unwrap().to_vec();
        let b = specaug_mask(&cfg, &batch, 256, 3).unwrap().to_vec();
        let c = specaug_mask(&cfg, &batch, 256, 4).unwrap().to_vec();
        assert_eq!(a, b);
        assert_ne!(a, c);
        let masked = a.iter().filter(|&&m| m == 0.0).count();
        assert!(
            masked > 0 && masked < a.len() / 2,
            "{masked} of {}",
            a.len()
        );
        // Time masks are narrower than 5% of the utterance: under 5 frames of 100 and 3 of 60,
        // so 10 of them blank at most 40 and 20 whole frames.
        let zero_rows = |r: std::ops::Range<usize>| {
            r.filter(|&t| a[t * 256..(t + 1) * 256].iter().all(|&m| m == 0.0))
                .count()
        };
        assert!(zero_rows(0..100) <= 40 && zero_rows(100..160) <= 20);
        assert!(zero_rows(0..160) > 0);
        // Feature masks are under 27 wide: 2 of them leave at least 204 of 256 features of
        // every frame that no time mask blanked.
        for t in 0..160 {
            let kept = a[t * 256..(t + 1) * 256]
                .iter()
                .filter(|&&m| m == 1.0)
                .count();
            assert!(kept == 0 || kept >= 256 - 2 * 26, "frame {t}: {kept}");
        }
    }
}
