//! Upstream SSL encoders (HuBERT, wav2vec2 / XLSR-53, WavLM) loaded from a Hugging Face model
//! directory and run on the CPU in f32, returning every hidden state exactly as `transformers`'
//! `output_hidden_states=True` does (see ../shared/reference/encoders.md for each detail).
//!
//! A batch is processed utterance by utterance at its own length, so an utterance's states never
//! depend on the others in the batch. For group-norm models (HuBERT/WavLM Base) this intentionally
//! differs from HF on zero-padded batches, where the first conv's GroupNorm statistics include the
//! padding: strata equals HF run on each utterance alone.

mod checkpoint;
mod config;
mod forward;

pub use checkpoint::Checkpoint;
pub use config::{FeatNorm, ModelType, UpstreamConfig};
pub use forward::relative_position_bucket;

use crate::batch::PackedBatch;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use rayon::prelude::*;
use std::path::Path;

/// Weight and bias of a Linear layer, PyTorch layout [out, in].
pub(crate) struct Dense {
    /// The weight transposed to [in_f, out_f] at load (PyTorch stores [out_f, in_f]): the frozen
    /// upstream's products x · W^T then read it row-major, the layout the `gemm` crate runs
    /// fastest (10-35% over the transposed operand at these shapes on the development VM).
    pub w_t: Vec<f32>,
    pub b: Vec<f32>,
    pub in_f: usize,
    pub out_f: usize,
}

pub(crate) struct Norm {
    pub w: Vec<f32>,
    pub b: Vec<f32>,
}

pub(crate) struct FeatureConv {
    /// [c_out, c_in, k]
    pub w: Vec<f32>,
    pub b: Vec<f32>,
    pub c_in: usize,
    pub c_out: usize,
    pub kernel: usize,
    pub stride: usize,
    /// GroupNorm (layer 0 of group models) or LayerNorm (every layer of layer models).
    pub norm: Option<Norm>,
}

pub(crate) struct WavLmGate {
    /// Linear(head_dim -> 8), [8, head_dim]
    pub w: Vec<f32>,
    pub b: Vec<f32>,
    /// gru_rel_pos_const, one per head
    pub c: Vec<f32>,
}

pub(crate) struct EncoderLayer {
    pub q: Dense,
    pub k: Dense,
    pub v: Dense,
    pub o: Dense,
    pub ln1: Norm,
    pub ln2: Norm,
    pub ffn1: Dense,
    pub ffn2: Dense,
    pub gate: Option<WavLmGate>,
}

pub struct Upstream {
    pub config: UpstreamConfig,
    pub(crate) convs: Vec<FeatureConv>,
    pub(crate) proj_ln: Option<Norm>,
    pub(crate) proj: Dense,
    /// Weight-norm folded positional conv weight [C, C/groups, k] and bias [C].
    pub(crate) pos_w: Vec<f32>,
    pub(crate) pos_b: Vec<f32>,
    pub(crate) enc_ln: Norm,
    pub(crate) layers: Vec<EncoderLayer>,
    /// WavLM: layer 0's relative-position embedding [num_buckets, heads].
    pub(crate) rel_embed: Option<Vec<f32>>,
}

fn dense(ck: &mut Checkpoint, name: &str, in_f: usize, out_f: usize) -> Result<Dense> {
    let w = ck.take(&format!("{name}.weight"), &[out_f, in_f])?;
    Ok(Dense {
        w_t: crate::ops::shape::transpose(&w, out_f, in_f),
        b: ck.take(&format!("{name}.bias"), &[out_f])?,
        in_f,
        out_f,
    })
}

fn norm(ck: &mut Checkpoint, name: &str, d: usize) -> Result<Norm> {
    Ok(Norm {
        w: ck.take(&format!("{name}.weight"), &[d])?,
        b: ck.take(&format!("{name}.bias"), &[d])?,
    })
}

/// W[o,i,k] = g[k] * v[o,i,k] / ||v[:,:,k]||: weight norm over every dim but the kernel axis
/// (torch._weight_norm(v, g, dim=2)).
fn fold_weight_norm(g: &[f32], v: &[f32], kernel: usize) -> Vec<f32> {
    let mut sq = vec![0f64; kernel];
    for (i, &x) in v.iter().enumerate() {
        sq[i % kernel] += (x as f64) * (x as f64);
    }
    let scale: Vec<f32> = sq
        .iter()
        .zip(g)
        .map(|(&s, &g)| g / (s.sqrt() as f32))
        .collect();
    v.iter()
        .enumerate()
        .map(|(i, &x)| x * scale[i % kernel])
        .collect()
}

impl Upstream {
    /// Loads config.json and the safetensors weights of a Hugging Face model directory.
    pub fn load(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::Io { path: dir.display().to_string(), detail: "is not a directory (expected a Hugging Face model directory with config.json and model.safetensors)".into() });
        }
        let config = UpstreamConfig::from_file(&dir.join("config.json"))?;
        let mut ck = Checkpoint::load(dir, config.model_type.prefix())?;
        Self::from_checkpoint(config, &mut ck)
    }

    /// A randomly initialised model of `config` (see [`Checkpoint::random`]): no download needed.
    pub fn random(config: UpstreamConfig, seed: u64) -> Result<Self> {
        Self::from_checkpoint(config, &mut Checkpoint::random(seed))
    }

    pub fn from_checkpoint(config: UpstreamConfig, ck: &mut Checkpoint) -> Result<Self> {
        let c = &config;
        let mut convs = Vec::new();
        let mut c_in = 1;
        for i in 0..c.conv_dim.len() {
            let (c_out, kernel, stride) = (c.conv_dim[i], c.conv_kernel[i], c.conv_stride[i]);
            let p = format!("feature_extractor.conv_layers.{i}");
            let w = ck.take(&format!("{p}.conv.weight"), &[c_out, c_in, kernel])?;
            let b = if c.conv_bias {
                ck.take(&format!("{p}.conv.bias"), &[c_out])?
            } else {
                vec![0.0; c_out]
            };
            let has_norm = c.feat_norm == FeatNorm::Layer || i == 0;
            let norm = if has_norm {
                Some(norm(ck, &format!("{p}.layer_norm"), c_out)?)
            } else {
                None
            };
            convs.push(FeatureConv {
                w,
                b,
                c_in,
                c_out,
                kernel,
                stride,
                norm,
            });
            c_in = c_out;
        }
        let d = c.hidden_size;
        let proj_ln = if c.feat_proj_layer_norm {
            Some(norm(ck, "feature_projection.layer_norm", c_in)?)
        } else {
            None
        };
        let proj = dense(ck, "feature_projection.projection", c_in, d)?;
        let (kp, gp) = (c.pos_conv_kernel, c.pos_conv_groups);
        let pc = "encoder.pos_conv_embed.conv";
        let g = ck.take_any(
            &[
                &format!("{pc}.parametrizations.weight.original0"),
                &format!("{pc}.weight_g"),
            ],
            &[1, 1, kp],
        )?;
        let v = ck.take_any(
            &[
                &format!("{pc}.parametrizations.weight.original1"),
                &format!("{pc}.weight_v"),
            ],
            &[d, d / gp, kp],
        )?;
        let pos_w = fold_weight_norm(&g, &v, kp);
        let pos_b = ck.take(&format!("{pc}.bias"), &[d])?;
        let enc_ln = norm(ck, "encoder.layer_norm", d)?;
        let wavlm = c.model_type == ModelType::WavLm;
        let (h, dh) = (c.num_heads, d / c.num_heads);
        let mut layers = Vec::new();
        for i in 0..c.num_layers {
            let p = format!("encoder.layers.{i}");
            let gate = if wavlm {
                Some(WavLmGate {
                    w: ck.take(
                        &format!("{p}.attention.gru_rel_pos_linear.weight"),
                        &[8, dh],
                    )?,
                    b: ck.take(&format!("{p}.attention.gru_rel_pos_linear.bias"), &[8])?,
                    c: ck.take(&format!("{p}.attention.gru_rel_pos_const"), &[1, h, 1, 1])?,
                })
            } else {
                None
            };
            layers.push(EncoderLayer {
                q: dense(ck, &format!("{p}.attention.q_proj"), d, d)?,
                k: dense(ck, &format!("{p}.attention.k_proj"), d, d)?,
                v: dense(ck, &format!("{p}.attention.v_proj"), d, d)?,
                o: dense(ck, &format!("{p}.attention.out_proj"), d, d)?,
                ln1: norm(ck, &format!("{p}.layer_norm"), d)?,
                ln2: norm(ck, &format!("{p}.final_layer_norm"), d)?,
                ffn1: dense(
                    ck,
                    &format!("{p}.feed_forward.intermediate_dense"),
                    d,
                    c.intermediate_size,
                )?,
                ffn2: dense(
                    ck,
                    &format!("{p}.feed_forward.output_dense"),
                    c.intermediate_size,
                    d,
                )?,
                gate,
            });
        }
        let rel_embed = if wavlm {
            Some(ck.take(
                "encoder.layers.0.attention.rel_attn_embed.weight",
                &[c.num_buckets, h],
            )?)
        } else {
            None
        };
        Ok(Upstream {
            config,
            convs,
            proj_ln,
            proj,
            pos_w,
            pos_b,
            enc_ln,
            layers,
            rel_embed,
        })
    }

    /// L: hidden states per frame.
    pub fn num_states(&self) -> usize {
        self.config.num_states()
    }
    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    /// Checks one waveform: long enough for a frame, finite.
    pub fn check_wave(&self, index: usize, name: &str, wave: &[f32]) -> Result<()> {
        let min = self.config.min_samples();
        if wave.len() < min {
            return Err(Error::value(
                "audio",
                format!("utterance {index} ({name}) has {} samples; at least {min} ({} ms at 16 kHz) are needed for one frame", wave.len(), min as f64 / 16.0),
            ));
        }
        if let Some(i) = wave.iter().position(|x| !x.is_finite()) {
            return Err(Error::value(
                "audio",
                format!("utterance {index} ({name}) has NaN or Inf at sample {i}"),
            ));
        }
        Ok(())
    }

    /// Every hidden state of every utterance: a frame-major stack [frames, L, D] and the packed
    /// batch describing it. `names` (same length as `waves`, or empty) name utterances in errors.
    pub fn forward(&self, waves: &[&[f32]], names: &[&str]) -> Result<(Tensor, PackedBatch)> {
        if waves.is_empty() {
            return Err(Error::value("audio", "no utterances given"));
        }
        for (i, w) in waves.iter().enumerate() {
            self.check_wave(i, names.get(i).copied().unwrap_or("unnamed"), w)?;
        }
        let states: Vec<Vec<f32>> = waves.par_iter().map(|w| self.forward_one(w)).collect();
        let (l, d) = (self.num_states(), self.hidden_size());
        let lengths: Vec<usize> = states.iter().map(|s| s.len() / (l * d)).collect();
        let batch = PackedBatch::from_lengths(&lengths)?;
        let stack = Tensor::from_vec(states.concat(), &[batch.total_frames(), l, d])?;
        Ok((stack, batch))
    }
}

/// HF feature extractor's `do_normalize`: (x - mean) / sqrt(var + 1e-7), per utterance.
pub fn normalize_wave(wave: &[f32]) -> Vec<f32> {
    let n = wave.len().max(1) as f64;
    let mean = wave.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = wave.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
    let inv = 1.0 / (var + 1e-7).sqrt();
    wave.iter()
        .map(|&x| ((x as f64 - mean) * inv) as f32)
        .collect()
}
