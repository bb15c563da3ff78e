//! Reading a Hugging Face model directory's weights: `model.safetensors`, or the shards listed in
//! `model.safetensors.index.json`; f32 / f16 / bf16 storage (converted to f32); an optional
//! base-model prefix (`hubert.`, `wav2vec2.`, `wavlm.`) stripped; tensors nobody asks for (task
//! heads, quantizer, masked_spec_embed) ignored.

use crate::error::{Error, Result};
use crate::tensor::Tensor;
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

pub struct Checkpoint {
    dir: String,
    tensors: HashMap<String, Tensor>,
    /// Set for [`Checkpoint::random`]: every `take` draws a fresh tensor instead of looking it up.
    random: Option<crate::rng::Rng>,
}

impl Checkpoint {
    pub fn load(dir: &Path, prefix: &str) -> Result<Self> {
        let d = dir.display().to_string();
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<std::path::PathBuf> = if single.exists() {
            vec![single]
        } else if index.exists() {
            let ip = index.display().to_string();
            let text = std::fs::read_to_string(&index).map_err(|e| Error::Io {
                path: ip.clone(),
                detail: format!("cannot read: {e}"),
            })?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Io {
                path: ip.clone(),
                detail: format!("not valid JSON: {e}"),
            })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::Io {
                    path: ip.clone(),
                    detail: "has no 'weight_map' object".into(),
                })?;
            let names: BTreeSet<&str> = map.values().filter_map(|f| f.as_str()).collect();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            return Err(Error::Io {
                path: d,
                detail: "has neither model.safetensors nor model.safetensors.index.json (PyTorch .bin checkpoints are not read: re-save with safetensors)".into(),
            });
        };
        let mut tensors = HashMap::new();
        for file in files {
            for (name, t) in crate::io::load_safetensors(&file)? {
                tensors.insert(name, t);
            }
        }
        // A task-head checkpoint nests the base model under its prefix: strip it when present.
        if tensors.keys().any(|k| k.starts_with(prefix)) {
            tensors = tensors
                .into_iter()
                .filter_map(|(k, v)| k.strip_prefix(prefix).map(|s| (s.to_string(), v)))
                .collect();
        }
        Ok(Checkpoint {
            dir: d,
            tensors,
            random: None,
        })
    }

    /// A random-init "checkpoint": whatever the model asks for is drawn from `seed`, as
    /// transformers initialises these models (norm weights 1, biases 0, convolutions Kaiming-normal,
    /// linear layers N(0, 0.02^2)), except the positional conv's weight-norm gain, which is 1. Used by the built-in demo
    /// and tests to build an upstream with no download; `take` still checks nothing, so the model's
    /// own shapes define it.
    pub fn random(seed: u64) -> Self {
        Checkpoint {
            dir: format!("random-init upstream (seed {seed})"),
            tensors: HashMap::new(),
            random: Some(crate::rng::Rng::new(seed)),
        }
    }

    /// A checkpoint built in memory (benchmarks, tests); `source` names it in errors.
    pub fn from_tensors(source: &str, tensors: HashMap<String, Tensor>) -> Self {
        Checkpoint {
            dir: source.to_string(),
            tensors,
            random: None,
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The tensor `name` with exactly `shape`, as f32 values.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        if let Some(rng) = &mut self.random {
            return Ok(random_tensor(rng, name, shape));
        }
        let t = self.tensors.remove(name).ok_or_else(|| Error::Io {
            path: self.dir.clone(),
            detail: format!("checkpoint has no tensor '{name}' (expected shape {shape:?}); does config.json match these weights?"),
        })?;
        if t.shape() != shape {
            return Err(Error::Io {
                path: self.dir.clone(),
                detail: format!(
                    "tensor '{name}' has shape {:?}, expected {shape:?} from config.json",
                    t.shape()
                ),
            });
        }
        if let Some(i) = t.first_non_finite() {
            return Err(Error::Io {
                path: self.dir.clone(),
                detail: format!(
                    "tensor '{name}' holds NaN or Inf (element {i}): the checkpoint is damaged"
                ),
            });
        }
        Ok(t.to_vec())
    }

    /// The first of `names` that exists, taken with `shape`.
    pub fn take_any(&mut self, names: &[&str], shape: &[usize]) -> Result<Vec<f32>> {
        let name = names
            .iter()
            .find(|n| self.contains(n))
            .copied()
            .unwrap_or(names[0]);
        self.take(name, shape)
    }
}

fn random_tensor(rng: &mut crate::rng::Rng, name: &str, shape: &[usize]) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let normal = |rng: &mut crate::rng::Rng, std: f32| (0..n).map(|_| std * rng.normal()).collect();
    let fan_in: usize = shape.iter().skip(1).product::<usize>().max(1);
    if (name.contains("norm") && name.ends_with(".weight")) || name.ends_with("gru_rel_pos_const") {
        vec![1.0; n]
    } else if name.ends_with(".bias") {
        vec![0.0; n]
    } else if name.ends_with("weight_g") || name.ends_with("original0") {
        // Unit-norm taps (transformers starts from g = ||v||; that norm is not known here).
        vec![1.0; n]
    } else if shape.len() == 3 {
        normal(rng, (2.0 / fan_in as f32).sqrt())
    } else {
        normal(rng, 0.02)
    }
}
