//! Several interface + PR-head pairs trained side by side from the SAME hidden-state stack: a sweep
//! (WS vs HConv, kernel sizes, ...) costs one upstream pass per batch. Each pair owns its
//! parameters and optimizer, so the pairs never interact.

use crate::autograd::{ParamStore, Tape};
use crate::batch::PackedBatch;
use crate::error::{Error, Result};
use crate::models::head::PrHead;
use crate::models::interface::{self, Interface, InterfaceConfig};
use crate::ops::ctc::Reduction;
use crate::optim::{clip_grad_norm, Adam, AdamConfig};
use crate::rng::Rng;
use crate::tensor::Tensor;
use crate::train::metrics::ctc_greedy_decode;

pub struct PrPair {
    pub name: String,
    pub store: ParamStore,
    pub interface: Box<dyn Interface>,
    pub head: PrHead,
    pub optimizer: Adam,
    pub clip: Option<f64>,
    pub steps: u64,
}

impl PrPair {
    /// `vocab` includes the blank (index 0).
    pub fn new(
        name: &str,
        cfg: &InterfaceConfig,
        vocab: usize,
        opt: AdamConfig,
        clip: Option<f64>,
        seed: u64,
    ) -> Result<Self> {
        let mut rng = Rng::new(seed);
        let mut store = ParamStore::new();
        let itf = interface::build(cfg, &mut store, "interface.", &mut rng)?;
        let head = PrHead::new(
            &mut store,
            "head.",
            itf.output_dim(),
            crate::models::head::SUPERB_HIDDEN,
            vocab,
            &mut rng,
        )?;
        let optimizer = Adam::new(opt, &store)?;
        Ok(PrPair {
            name: name.to_string(),
            store,
            interface: itf,
            head,
            optimizer,
            clip,
            steps: 0,
        })
    }

    /// One optimizer step on a packed batch; returns the CTC loss (mean reduction).
    pub fn train_step(
        &mut self,
        stack: &Tensor,
        batch: &PackedBatch,
        targets: &[Vec<usize>],
    ) -> Result<f32> {
        self.store.zero_grad();
        let mut tape = Tape::new();
        let s = tape.constant(stack.clone())?;
        let feats = self.interface.forward(&mut tape, &self.store, s)?;
        let logits = self.head.forward(&mut tape, &self.store, feats)?;
        let lp = tape.log_softmax(logits)?;
        let loss = tape.ctc_loss(lp, batch, targets, Reduction::Mean, true)?;
        let value = tape.value(loss).item()?;
        if !value.is_finite() {
            return Err(Error::value(
                "training loss",
                format!(
                    "'{}' produced {value} at step {}: lower the learning rate",
                    self.name,
                    self.steps + 1
                ),
            ));
        }
        tape.backward(loss, &mut self.store)?;
        drop(tape);
        if let Some(max_norm) = self.clip {
            clip_grad_norm(&mut self.store, max_norm)?;
        }
        self.optimizer.step(&mut self.store)?;
        self.steps += 1;
        Ok(value)
    }

    /// Greedy CTC hypotheses for each utterance of the batch.
    pub fn decode(&self, stack: &Tensor, batch: &PackedBatch) -> Result<Vec<Vec<usize>>> {
        let mut tape = Tape::no_grad();
        let s = tape.constant(stack.clone())?;
        let feats = self.interface.forward(&mut tape, &self.store, s)?;
        let logits = self.head.forward(&mut tape, &self.store, feats)?;
        let lp = tape.log_softmax(logits)?;
        let (v, data) = (tape.shape(lp)[1], tape.value(lp).to_vec());
        Ok((0..batch.num_utterances())
            .map(|u| {
                ctc_greedy_decode(
                    &data[batch.offsets()[u] * v..batch.offsets()[u + 1] * v],
                    v,
                    0,
                )
            })
            .collect())
    }

    /// Trainable scalars of the interface alone.
    pub fn interface_params(&self) -> usize {
        self.store.num_scalars_under("interface.")
    }
}
