//! SUPERB downstream heads (s3prl defaults).
//! - PR (phone recognition, CTC): Linear(D', 256) -> Linear(256, V); no nonlinearity between.
//! - Utterance classifier (ER / IC / SID): Linear(D', 256) -> mean over each utterance's valid
//!   frames -> Linear(256, C).

use crate::autograd::{ParamStore, Tape, Var};
use crate::batch::PackedBatch;
use crate::error::Result;
use crate::models::nn::Linear;
use crate::rng::Rng;

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
