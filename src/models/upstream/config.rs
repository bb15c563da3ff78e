//! The architecture of an upstream, read from a Hugging Face `config.json`. Fields a saved config
//! omits take the model class's defaults (transformers writes only values that differ from them).
//! Everything the forward pass depends on comes from here, never from a model name.

use crate::error::{Error, Result};
use serde_json::Value;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelType {
    Hubert,
    Wav2Vec2,
    WavLm,
}

impl ModelType {
    /// The attribute name a task-head checkpoint nests the base model under.
    pub fn prefix(self) -> &'static str {
        match self {
            ModelType::Hubert => "hubert.",
            ModelType::Wav2Vec2 => "wav2vec2.",
            ModelType::WavLm => "wavlm.",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FeatNorm {
    /// GroupNorm (one group per channel) after the first conv only.
    Group,
    /// LayerNorm over channels after every conv.
    Layer,
}

#[derive(Clone, Debug, PartialEq)]
pub struct UpstreamConfig {
    pub model_type: ModelType,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub intermediate_size: usize,
    pub feat_norm: FeatNorm,
    pub conv_dim: Vec<usize>,
    pub conv_kernel: Vec<usize>,
    pub conv_stride: Vec<usize>,
    pub conv_bias: bool,
    pub pos_conv_kernel: usize,
    pub pos_conv_groups: usize,
    /// Pre-LN encoder (large models) when true, post-LN (base models) when false.
    pub stable_layer_norm: bool,
    pub layer_norm_eps: f64,
    /// HuBERT only: LayerNorm before the feature projection (wav2vec2 / WavLM always have it).
    pub feat_proj_layer_norm: bool,
    /// WavLM only.
    pub num_buckets: usize,
    pub max_bucket_distance: usize,
}

fn err(path: &str, msg: String) -> Error {
    Error::Config(format!("{path}: {msg}"))
}

struct Fields<'a> {
    v: &'a Value,
    path: &'a str,
}

impl Fields<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.v.get(key).filter(|x| !x.is_null())
    }
    fn usize(&self, key: &str, default: usize) -> Result<usize> {
        match self.get(key) {
            None => Ok(default),
            Some(x) => x.as_u64().map(|u| u as usize).ok_or_else(|| {
                err(
                    self.path,
                    format!("'{key}' must be a non-negative integer, got {x}"),
                )
            }),
        }
    }
    fn f64(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(x) => x
                .as_f64()
                .ok_or_else(|| err(self.path, format!("'{key}' must be a number, got {x}"))),
        }
    }
    fn bool(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(x) => x
                .as_bool()
                .ok_or_else(|| err(self.path, format!("'{key}' must be true or false, got {x}"))),
        }
    }
    fn str<'b>(&'b self, key: &str, default: &'b str) -> Result<&'b str> {
        match self.get(key) {
            None => Ok(default),
            Some(x) => x
                .as_str()
                .ok_or_else(|| err(self.path, format!("'{key}' must be a string, got {x}"))),
        }
    }
    fn usizes(&self, key: &str, default: &[usize]) -> Result<Vec<usize>> {
        match self.get(key) {
            None => Ok(default.to_vec()),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_u64().map(|u| u as usize).ok_or_else(|| {
                        err(
                            self.path,
                            format!("'{key}' must be a list of integers, got {x} in it"),
                        )
                    })
                })
                .collect(),
            Some(x) => Err(err(
                self.path,
                format!("'{key}' must be a list of integers, got {x}"),
            )),
        }
    }
}

impl UpstreamConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
            path: p.clone(),
            detail: format!("cannot read the model config: {e}"),
        })?;
        let v: Value = serde_json::from_str(&text).map_err(|e| Error::Io {
            path: p.clone(),
            detail: format!("not valid JSON: {e}"),
        })?;
        Self::from_json(&v, &p)
    }

    pub fn from_json(v: &Value, path: &str) -> Result<Self> {
        let f = Fields { v, path };
        let model_type = match f.str("model_type", "")? {
            "hubert" => ModelType::Hubert,
            "wav2vec2" => ModelType::Wav2Vec2,
            "wavlm" => ModelType::WavLm,
            "" => {
                return Err(err(
                    path,
                    "has no 'model_type': expected hubert, wav2vec2 or wavlm".into(),
                ))
            }
            other => {
                return Err(err(
                    path,
                    format!(
                        "model_type '{other}' is not supported: expected hubert, wav2vec2 or wavlm"
                    ),
                ))
            }
        };
        let feat_norm = match f.str("feat_extract_norm", "group")? {
            "group" => FeatNorm::Group,
            "layer" => FeatNorm::Layer,
            other => {
                return Err(err(
                    path,
                    format!(
                        "feat_extract_norm '{other}' is not supported: expected 'group' or 'layer'"
                    ),
                ))
            }
        };
        for key in ["hidden_act", "feat_extract_activation"] {
            let act = f.str(key, "gelu")?;
            if act != "gelu" && act != "gelu_python" {
                return Err(err(path, format!("{key} '{act}' is not supported: these upstreams use the exact erf GELU ('gelu')")));
            }
        }
        if f.bool("conv_pos_batch_norm", false)? {
            return Err(err(path, "conv_pos_batch_norm = true is not supported (none of the HuBERT / wav2vec2 / WavLM checkpoints use it)".into()));
        }
        if f.get("adapter_attn_dim").is_some() || f.bool("add_adapter", false)? {
            return Err(err(
                path,
                "adapter layers (adapter_attn_dim / add_adapter) are not supported".into(),
            ));
        }
        let conv_dim = f.usizes("conv_dim", &[512; 7])?;
        let conv_kernel = f.usizes("conv_kernel", &[10, 3, 3, 3, 3, 2, 2])?;
        let conv_stride = f.usizes("conv_stride", &[5, 2, 2, 2, 2, 2, 2])?;
        if conv_dim.is_empty()
            || conv_dim.len() != conv_kernel.len()
            || conv_dim.len() != conv_stride.len()
        {
            return Err(err(path, format!(
                "conv_dim, conv_kernel and conv_stride must have the same non-zero length, got {}, {} and {}",
                conv_dim.len(), conv_kernel.len(), conv_stride.len()
            )));
        }
        if conv_kernel
            .iter()
            .chain(&conv_stride)
            .chain(&conv_dim)
            .any(|&x| x == 0)
        {
            return Err(err(
                path,
                "conv_dim, conv_kernel and conv_stride entries must be >= 1".into(),
            ));
        }
        let cfg = UpstreamConfig {
            model_type,
            hidden_size: f.usize("hidden_size", 768)?,
            num_layers: f.usize("num_hidden_layers", 12)?,
            num_heads: f.usize("num_attention_heads", 12)?,
            intermediate_size: f.usize("intermediate_size", 3072)?,
            feat_norm,
            conv_dim,
            conv_kernel,
            conv_stride,
            conv_bias: f.bool("conv_bias", false)?,
            pos_conv_kernel: f.usize("num_conv_pos_embeddings", 128)?,
            pos_conv_groups: f.usize("num_conv_pos_embedding_groups", 16)?,
            stable_layer_norm: f.bool("do_stable_layer_norm", false)?,
            layer_norm_eps: f.f64("layer_norm_eps", 1e-5)?,
            feat_proj_layer_norm: model_type != ModelType::Hubert
                || f.bool("feat_proj_layer_norm", true)?,
            num_buckets: f.usize("num_buckets", 320)?,
            max_bucket_distance: f.usize("max_bucket_distance", 800)?,
        };
        let c = &cfg;
        if c.hidden_size == 0 || c.num_heads == 0 || !c.hidden_size.is_multiple_of(c.num_heads) {
            return Err(err(
                path,
                format!(
                    "hidden_size {} must be a positive multiple of num_attention_heads {}",
                    c.hidden_size, c.num_heads
                ),
            ));
        }
        if c.pos_conv_groups == 0
            || !c.hidden_size.is_multiple_of(c.pos_conv_groups)
            || c.pos_conv_kernel == 0
        {
            return Err(err(path, format!(
                "hidden_size {} must be divisible by num_conv_pos_embedding_groups {} (and num_conv_pos_embeddings >= 1)",
                c.hidden_size, c.pos_conv_groups
            )));
        }
        if c.model_type == ModelType::WavLm
            && (c.num_buckets < 4 || c.max_bucket_distance <= c.num_buckets / 4)
        {
            return Err(err(path, format!("WavLM needs num_buckets >= 4 and max_bucket_distance > num_buckets / 4, got {} and {}", c.num_buckets, c.max_bucket_distance)));
        }
        Ok(cfg)
    }

    /// A tiny HuBERT-Base-shaped model (13 states x 64 dims, the Base feature encoder's kernels and
    /// strides at 64 channels, so 20 ms frames): the built-in demo's upstream, with random weights
    /// from [`super::Upstream::random`].
    pub fn tiny() -> Self {
        let v = serde_json::json!({
            "model_type": "hubert",
            "hidden_size": 64,
            "num_hidden_layers": 12,
            "num_attention_heads": 4,
            "intermediate_size": 256,
            "conv_dim": [64, 64, 64, 64, 64, 64, 64],
            "num_conv_pos_embeddings": 32,
            "num_conv_pos_embedding_groups": 4,
        });
        Self::from_json(&v, "tiny config").expect("the tiny config is valid")
    }

    /// Hidden states per frame: transformer layers + 1.
    pub fn num_states(&self) -> usize {
        self.num_layers + 1
    }

    /// Samples needed for one frame: the feature encoder's receptive field (400 for the real stack).
    pub fn min_samples(&self) -> usize {
        let mut r = 1;
        for (k, s) in self.conv_kernel.iter().zip(&self.conv_stride).rev() {
            r = (r - 1) * s + k;
        }
        r
    }

    /// Frames for `samples` input samples: HF's conv-length formula, applied layer by layer.
    pub fn num_frames(&self, samples: usize) -> usize {
        let mut len = samples;
        for (k, s) in self.conv_kernel.iter().zip(&self.conv_stride) {
            if len < *k {
                return 0;
            }
            len = (len - k) / s + 1;
        }
        len
    }
}
