//! SUPERB's ASR head (s3prl `downstream/asr`, its default `RNNs` model): the interface's features
//! -> Linear(D', 1024) (the expert's projector, no activation) -> 2 bidirectional LSTM layers of
//! 1024 units per direction, each followed by dropout 0.2 -> Linear(2048, V) -> CTC over
//! characters (blank 0, PyTorch's 'mean' reduction, zero_infinity), trained with Adam at 1e-4.
//! Each utterance of a packed batch is its own sequence, as s3prl's `pack_padded_sequence`.
//!
//! Parameter names follow s3prl's module tree (`projector`, `rnns.{i}.layer.weight_ih_l0`,
//! `..._reverse`, `linear`), so weights map one to one onto a PyTorch state dict.

use crate::autograd::{ParamId, ParamStore, Tape, Var};
use crate::batch::PackedBatch;
use crate::error::{Error, Result};
use crate::models::nn::Linear;
use crate::rng::Rng;
use crate::tensor::Tensor;

/// The most parameters a head may have (f32: 4 GiB).
const MAX_SCALARS: usize = 1 << 30;

/// The head's sizes; the default is s3prl's ASR config.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AsrHeadConfig {
    /// The projector's output (s3prl `project_dim`).
    pub project_dim: usize,
    /// LSTM units per direction.
    pub hidden: usize,
    /// Bidirectional LSTM layers.
    pub layers: usize,
    /// Dropout after each LSTM layer while training.
    pub dropout: f64,
}

impl Default for AsrHeadConfig {
    fn default() -> Self {
        AsrHeadConfig {
            project_dim: 1024,
            hidden: 1024,
            layers: 2,
            dropout: 0.2,
        }
    }
}

impl AsrHeadConfig {
    fn check(&self) -> Result<()> {
        if self.project_dim == 0
            || self.hidden == 0
            || self.layers == 0
            || !(0.0..1.0).contains(&self.dropout)
        {
            return Err(Error::Config(format!(
                "ASR head {self:?}: the sizes must be at least 1 and the dropout in [0, 1)"
            )));
        }
        Ok(())
    }
}

/// One direction of one LSTM layer: PyTorch's `weight_ih_l0[_reverse]` [4H, in], `weight_hh_l0`
/// [4H, H], `bias_ih_l0`, `bias_hh_l0` [4H].
#[derive(Clone, Debug)]
pub struct LstmDirection {
    pub weight_ih: ParamId,
    pub weight_hh: ParamId,
    pub bias_ih: ParamId,
    pub bias_hh: ParamId,
    pub reverse: bool,
}

impl LstmDirection {
    /// PyTorch's initialisation: every tensor ~ U(±1/sqrt(H)).
    fn new(
        store: &mut ParamStore,
        prefix: &str,
        input: usize,
        hidden: usize,
        reverse: bool,
        rng: &mut Rng,
    ) -> Result<Self> {
        let bound = 1.0 / (hidden as f64).sqrt();
        let suffix = if reverse { "_reverse" } else { "" };
        let mut add = |name: &str, shape: &[usize]| {
            let n = shape.iter().product();
            store.add(
                &format!("{prefix}{name}_l0{suffix}"),
                Tensor::from_vec(rng.uniform_vec(n, bound), shape)?,
            )
        };
        Ok(LstmDirection {
            weight_ih: add("weight_ih", &[4 * hidden, input])?,
            weight_hh: add("weight_hh", &[4 * hidden, hidden])?,
            bias_ih: add("bias_ih", &[4 * hidden])?,
            bias_hh: add("bias_hh", &[4 * hidden])?,
            reverse,
        })
    }

    fn forward(
        &self,
        tape: &mut Tape,
        store: &ParamStore,
        x: Var,
        batch: &PackedBatch,
    ) -> Result<Var> {
        let weights = (
            tape.param(store, self.weight_ih),
            tape.param(store, self.weight_hh),
            tape.param(store, self.bias_ih),
            tape.param(store, self.bias_hh),
        );
        tape.lstm(x, weights, batch, self.reverse)
    }
}

pub struct AsrHead {
    pub config: AsrHeadConfig,
    pub projector: Linear,
    /// Per layer, its forward and reverse direction.
    pub rnns: Vec<[LstmDirection; 2]>,
    pub linear: Linear,
}

impl AsrHead {
    pub fn new(
        store: &mut ParamStore,
        prefix: &str,
        in_dim: usize,
        config: AsrHeadConfig,
        vocab: usize,
        rng: &mut Rng,
    ) -> Result<Self> {
        config.check()?;
        // A width typed by mistake (asr-100000) would otherwise abort on a failed allocation.
        if param_count(in_dim, &config, vocab) > MAX_SCALARS as u128 {
            return Err(Error::Config(format!(
                "ASR head {config:?} on {in_dim} features: over {MAX_SCALARS} parameters (4 GiB, and twice that for Adam's moments); s3prl's is 1024 wide (about 42M)"
            )));
        }
        let projector = Linear::new(
            store,
            &format!("{prefix}projector"),
            in_dim,
            config.project_dim,
            true,
            rng,
        )?;
        let mut rnns = Vec::new();
        let mut input = config.project_dim;
        for i in 0..config.layers {
            let p = format!("{prefix}rnns.{i}.layer.");
            let forward = LstmDirection::new(store, &p, input, config.hidden, false, rng)?;
            let reverse = LstmDirection::new(store, &p, input, config.hidden, true, rng)?;
            rnns.push([forward, reverse]);
            input = 2 * config.hidden;
        }
        let linear = Linear::new(store, &format!("{prefix}linear"), input, vocab, true, rng)?;
        Ok(AsrHead {
            config,
            projector,
            rnns,
            linear,
        })
    }

    pub fn vocab(&self) -> usize {
        self.linear.out_features
    }

    /// Trainable scalars of the head on `in_dim` features.
    pub fn num_params(in_dim: usize, config: &AsrHeadConfig, vocab: usize) -> usize {
        param_count(in_dim, config, vocab) as usize
    }

    /// features [frames, D'] of a packed batch -> logits [frames, V]. `train`: the seed of the
    /// dropout masks of a training forward (None: evaluation, no dropout).
    pub fn forward(
        &self,
        tape: &mut Tape,
        store: &ParamStore,
        x: Var,
        batch: &PackedBatch,
        train: Option<u64>,
    ) -> Result<Var> {
        let mut h = self.projector.forward(tape, store, x)?;
        let seeds = train.map(|seed| dropout_seeds(seed, self.rnns.len()));
        for (i, [forward, reverse]) in self.rnns.iter().enumerate() {
            let f = forward.forward(tape, store, h, batch)?;
            let r = reverse.forward(tape, store, h, batch)?;
            h = tape.concat_cols(&[f, r])?;
            if let Some(seeds) = &seeds {
                if self.config.dropout > 0.0 {
                    h = tape.dropout(h, self.config.dropout, seeds[i])?;
                }
            }
        }
        self.linear.forward(tape, store, h)
    }
}

/// [`AsrHead::num_params`] without overflow, for any sizes.
fn param_count(in_dim: usize, config: &AsrHeadConfig, vocab: usize) -> u128 {
    let (h, p) = (config.hidden as u128, config.project_dim as u128);
    let lstm = |input: u128| 2 * (4 * h * (input + h) + 8 * h);
    // The first layer reads the projector; the others both directions of the one before.
    let layers = lstm(p) + (config.layers as u128).saturating_sub(1) * lstm(2 * h);
    (in_dim as u128 + 1) * p + layers + (2 * h + 1) * vocab as u128
}

/// The seeds of each LSTM layer's dropout mask in a training forward seeded with `seed` (the CPU
/// head and the device step draw the same).
pub fn dropout_seeds(seed: u64, layers: usize) -> Vec<u64> {
    let mut rng = Rng::new(seed ^ 0x6173_725f_6865_6164);
    (0..layers).map(|_| rng.next_u64()).collect()
}
