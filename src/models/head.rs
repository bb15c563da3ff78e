//! SUPERB downstream heads (s3prl defaults).
//! - PR (phone recognition, CTC): Linear(D', 256) -> Linear(256, V); no nonlinearity between.
//! - Utterance classifier (ER / IC / SID): Linear(D', 256) -> mean over each utterance's valid
//!   frames -> Linear(256, C).
//! - Speaker verification (SV): the x-vector with AM-softmax ([`SpeakerHead`]).

use crate::autograd::{ParamStore, Tape, Var};
use crate::batch::PackedBatch;
use crate::error::Result;
use crate::models::nn::Linear;
use crate::rng::Rng;
use crate::tensor::Tensor;

/// s3prl's projector size for PR and the utterance-level tasks.
pub const SUPERB_HIDDEN: usize = 256;

pub struct PrHead {
    pub proj: Linear,
    pub out: Linear,
}

impl PrHead {
    pub fn new(
        store: &mut ParamStore,
        prefix: &str,
        in_dim: usize,
        hidden: usize,
        vocab: usize,
        rng: &mut Rng,
    ) -> Result<Self> {
        Ok(PrHead {
            proj: Linear::new(store, &format!("{prefix}proj"), in_dim, hidden, true, rng)?,
            out: Linear::new(store, &format!("{prefix}out"), hidden, vocab, true, rng)?,
        })
    }

    /// features [frames, D'] -> logits [frames, V].
    pub fn forward(&self, tape: &mut Tape, store: &ParamStore, x: Var) -> Result<Var> {
        let h = self.proj.forward(tape, store, x)?;
        self.out.forward(tape, store, h)
    }
}

pub struct UtteranceClassifier {
    pub proj: Linear,
    pub out: Linear,
}

impl UtteranceClassifier {
    pub fn new(
        store: &mut ParamStore,
        prefix: &str,
        in_dim: usize,
        hidden: usize,
        classes: usize,
        rng: &mut Rng,
    ) -> Result<Self> {
        Ok(UtteranceClassifier {
            proj: Linear::new(store, &format!("{prefix}proj"), in_dim, hidden, true, rng)?,
            out: Linear::new(store, &format!("{prefix}out"), hidden, classes, true, rng)?,
        })
    }

    /// features [frames, D'] of a packed batch -> logits [utterances, C].
    pub fn forward(
        &self,
        tape: &mut Tape,
        store: &ParamStore,
        x: Var,
        batch: &PackedBatch,
    ) -> Result<Var> {
        let h = self.proj.forward(tape, store, x)?;
        let pooled = tape.mean_pool(h, batch)?;
        self.out.forward(tape, store, pooled)
    }
}

/// The SUPERB speaker-verification head (s3prl's sv_voxceleb1 x-vector with AM-softmax):
/// Linear(D', 512) -> five TDNN layers (Linear over a temporal window + ReLU; windows of 5, 3,
/// 3, 1, 1 frames at dilations 1, 2, 3, 1, 1, the last 1500 wide) -> statistics pooling (mean and
/// std, 3000) -> Linear(3000, 512) + ReLU (the embedding verification scores with cosine
/// similarity) -> Linear(512, 512) + ReLU -> AM-softmax (s = 30, m = 0.4) over the training
/// speakers. The TDNN windows stay inside each utterance (each loses 14 frames).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SpeakerHeadConfig {
    /// The TDNNs' width (s3prl `input_dim`, 512).
    pub width: usize,
    /// The last TDNN's width (s3prl `agg_dim`, 1500).
    pub agg_width: usize,
    /// AM-softmax scale and additive margin.
    pub scale: f32,
    pub margin: f32,
}

impl Default for SpeakerHeadConfig {
    fn default() -> Self {
        SpeakerHeadConfig {
            width: 512,
            agg_width: 1500,
            scale: 30.0,
            margin: 0.4,
        }
    }
}

/// (context, dilation) of the x-vector's TDNN layers.
pub const XVECTOR_TDNN: [(usize, usize); 5] = [(5, 1), (3, 2), (3, 3), (1, 1), (1, 1)];

/// Frames the x-vector's TDNN layers take from each utterance: 4 + 4 + 6 = 14.
pub const fn xvector_frames_lost() -> usize {
    let mut lost = 0;
    let mut i = 0;
    while i < XVECTOR_TDNN.len() {
        lost += (XVECTOR_TDNN[i].0 - 1) * XVECTOR_TDNN[i].1;
        i += 1;
    }
    lost
}

/// Frames an utterance needs for the x-vector head: what the TDNN windows take, and 2 left for
/// the standard deviation (16).
pub const XVECTOR_MIN_FRAMES: usize = xvector_frames_lost() + 2;

pub struct SpeakerHead {
    pub config: SpeakerHeadConfig,
    pub connector: Linear,
    /// (layer, context, dilation) per TDNN.
    pub tdnn: Vec<(Linear, usize, usize)>,
    pub utter1: Linear,
    pub utter2: Linear,
    /// AM-softmax's speaker vectors, [speakers, width] (s3prl's W transposed).
    pub am_weight: crate::autograd::ParamId,
    pub speakers: usize,
}

impl SpeakerHead {
    pub fn new(
        store: &mut ParamStore,
        prefix: &str,
        in_dim: usize,
        config: SpeakerHeadConfig,
        speakers: usize,
        rng: &mut Rng,
    ) -> Result<Self> {
        let w = config.width;
        let connector = Linear::new(store, &format!("{prefix}connector"), in_dim, w, true, rng)?;
        let mut tdnn = Vec::new();
        for (i, &(context, dilation)) in XVECTOR_TDNN.iter().enumerate() {
            let out = if i + 1 == XVECTOR_TDNN.len() {
                config.agg_width
            } else {
                w
            };
            let name = format!("{prefix}tdnn{i}");
            let layer = Linear::new(store, &name, w * context, out, true, rng)?;
            tdnn.push((layer, context, dilation));
        }
        let utter1 = Linear::new(
            store,
            &format!("{prefix}utter1"),
            2 * config.agg_width,
            w,
            true,
            rng,
        )?;
        let utter2 = Linear::new(store, &format!("{prefix}utter2"), w, w, true, rng)?;
        // xavier_normal_ of s3prl's [width, speakers] W: std sqrt(2 / (width + speakers)).
        let std = (2.0 / (w + speakers) as f64).sqrt() as f32;
        let values: Vec<f32> = (0..speakers * w).map(|_| std * rng.normal()).collect();
        let am_weight = store.add(
            &format!("{prefix}amsoftmax.weight"),
            Tensor::from_vec(values, &[speakers, w])?,
        )?;
        Ok(SpeakerHead {
            config,
            connector,
            tdnn,
            utter1,
            utter2,
            am_weight,
            speakers,
        })
    }

    /// features [frames, D'] of a packed batch -> the embeddings [utterances, width] that trials
    /// are scored with (s3prl's `inference`: the first utterance-level layer + ReLU).
    pub fn embed(
        &self,
        tape: &mut Tape,
        store: &ParamStore,
        x: Var,
        batch: &PackedBatch,
    ) -> Result<Var> {
        let need = XVECTOR_MIN_FRAMES;
        if let Some(u) = (0..batch.num_utterances()).find(|&u| batch.len_of(u) < need) {
            return Err(crate::error::Error::value(
                "speaker head input",
                format!(
                    "utterance {u} of the batch has {} frames; the x-vector head needs at least {need} (about 0.33 s of audio): leave shorter utterances out",
                    batch.len_of(u)
                ),
            ));
        }
        let mut h = self.connector.forward(tape, store, x)?;
        let mut b = batch.clone();
        for (layer, context, dilation) in &self.tdnn {
            let (window, nb) = tape.time_context(h, &b, *context, *dilation)?;
            h = layer.forward(tape, store, window)?;
            h = tape.relu(h)?;
            b = nb;
        }
        let pooled = tape.stats_pool(h, &b)?;
        let e = self.utter1.forward(tape, store, pooled)?;
        tape.relu(e)
    }

    /// The AM-softmax logits [utterances, speakers] of a batch whose speakers are `labels`:
    /// s (cos - m [speaker = label]), the cosines between the normalized training embeddings
    /// (embedding -> Linear -> ReLU) and the normalized speaker vectors. Cross-entropy over them
    /// is s3prl's AMSoftmaxLoss.
    pub fn am_logits(
        &self,
        tape: &mut Tape,
        store: &ParamStore,
        x: Var,
        batch: &PackedBatch,
        labels: &[usize],
    ) -> Result<Var> {
        if let Some(&bad) = labels.iter().find(|&&l| l >= self.speakers) {
            return Err(crate::error::Error::value(
                "speaker label",
                format!("{bad}, but the head knows {} speakers", self.speakers),
            ));
        }
        let e = self.embed(tape, store, x, batch)?;
        let h = self.utter2.forward(tape, store, e)?;
        let h = tape.relu(h)?;
        let xn = tape.l2_normalize(h)?;
        let w = tape.param(store, self.am_weight);
        let wn = tape.l2_normalize(w)?;
        let cos = tape.linear(xn, wn, None)?;
        let mut margin = vec![0f32; labels.len() * self.speakers];
        for (u, &l) in labels.iter().enumerate() {
            margin[u * self.speakers + l] = -self.config.margin;
        }
        let margin = tape.constant(Tensor::from_vec(margin, &[labels.len(), self.speakers])?)?;
        let shifted = tape.add(cos, margin)?;
        tape.scale(shifted, self.config.scale)
    }
}
