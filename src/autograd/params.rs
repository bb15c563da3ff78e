//! Trainable parameters by name (PyTorch state_dict style names), their gradient accumulators, and
//! safetensors save/load (saving is atomic: write to a temporary file, then rename). A module's
//! fitted, untrained values (PCA + Concat's projections) are frozen entries: saved and loaded with
//! the rest, never updated by the optimizer, not counted as trainable.

use crate::error::{Error, Result};
use crate::tensor::Tensor;
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ParamId(pub(crate) usize);

#[derive(Clone, Debug)]
pub struct Param {
    pub name: String,
    pub value: Tensor,
    pub grad: Vec<f32>,
    /// Fitted, not trained: the optimizer leaves it alone (its gradient stays zero: modules
    /// read frozen values as tape constants).
    pub frozen: bool,
}

#[derive(Clone, Debug, Default)]
pub struct ParamStore {
    params: Vec<Param>,
    index: HashMap<String, usize>,
}

impl ParamStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers an f32 parameter; names must be unique.
    pub fn add(&mut self, name: &str, value: Tensor) -> Result<ParamId> {
        self.register(name, value, false)
    }

    /// Registers a frozen (fitted, untrained) value, saved and loaded like a parameter.
    pub fn add_frozen(&mut self, name: &str, value: Tensor) -> Result<ParamId> {
        self.register(name, value, true)
    }

    fn register(&mut self, name: &str, value: Tensor, frozen: bool) -> Result<ParamId> {
        if self.index.contains_key(name) {
            return Err(Error::Config(format!(
                "parameter '{name}' is registered twice: give each module a distinct prefix"
            )));
        }
        value.f32s()?;
        let id = self.params.len();
        self.params.push(Param {
            name: name.to_string(),
            grad: vec![0.0; value.numel()],
            value,
            frozen,
        });
        self.index.insert(name.to_string(), id);
        Ok(ParamId(id))
    }

    pub fn len(&self) -> usize {
        self.params.len()
    }
    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }
    pub fn ids(&self) -> impl Iterator<Item = ParamId> {
        (0..self.params.len()).map(ParamId)
    }
    pub fn get(&self, id: ParamId) -> &Param {
        &self.params[id.0]
    }
    pub fn get_mut(&mut self, id: ParamId) -> &mut Param {
        &mut self.params[id.0]
    }
    pub fn value(&self, id: ParamId) -> &Tensor {
        &self.params[id.0].value
    }
    pub fn grad(&self, id: ParamId) -> &[f32] {
        &self.params[id.0].grad
    }
    pub fn id(&self, name: &str) -> Option<ParamId> {
        self.index.get(name).map(|&i| ParamId(i))
    }
    pub fn iter(&self) -> impl Iterator<Item = &Param> {
        self.params.iter()
    }
    /// Total number of trainable scalars (frozen values not counted).
    pub fn num_scalars(&self) -> usize {
        self.num_scalars_under("")
    }
    /// Number of trainable scalars of the parameters whose name starts with `prefix`.
    pub fn num_scalars_under(&self, prefix: &str) -> usize {
        self.params
            .iter()
            .filter(|p| !p.frozen && p.name.starts_with(prefix))
            .map(|p| p.value.numel())
            .sum()
    }

    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            p.grad.par_iter_mut().for_each(|g| *g = 0.0);
        }
    }

    /// Replaces a parameter's value; the shape must stay the same.
    pub fn set_value(&mut self, id: ParamId, value: Tensor) -> Result<()> {
        let p = &mut self.params[id.0];
        if p.value.shape() != value.shape() {
            return Err(Error::shape(
                format!("parameter '{}'", p.name),
                format!("{:?}", p.value.shape()),
                format!("{:?}", value.shape()),
            ));
        }
        p.value = value.to_dtype(crate::tensor::DType::F32);
        Ok(())
    }

    pub(crate) fn accumulate_grad(&mut self, id: ParamId, g: &[f32]) {
        // Elementwise, so parallel chunks give the same sums (a large head's gradients are tens of
        // millions of values, added at every backward).
        const CHUNK: usize = 1 << 15;
        (self.params[id.0].grad.par_chunks_mut(CHUNK))
            .zip(g.par_chunks(CHUNK))
            .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, &b)| *a += b));
    }

    /// Sets every parameter from the tensor named `prefix + name` in safetensors `bytes`.
    /// A missing tensor or a shape mismatch is an error naming it; extra tensors are ignored.
    pub fn load_from_safetensors(
        &mut self,
        bytes: &[u8],
        prefix: &str,
        source: &str,
    ) -> Result<()> {
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| Error::Io {
            path: source.to_string(),
            detail: format!("not a valid safetensors file: {e}"),
        })?;
        for i in 0..self.params.len() {
            let key = format!("{prefix}{}", self.params[i].name);
            let view = st.tensor(&key).map_err(|_| Error::Io {
                path: source.to_string(),
                detail: format!(
                    "has no tensor '{key}' (expected shape {:?})",
                    self.params[i].value.shape()
                ),
            })?;
            let t = crate::io::tensor_from_view(&view, &key, source)?;
            self.set_value(ParamId(i), t)?;
        }
        Ok(())
    }

    /// Writes every parameter (f32) to `path` atomically.
    pub fn save_safetensors(&self, path: &Path) -> Result<()> {
        let named: Vec<(String, &Tensor)> = self
            .params
            .iter()
            .map(|p| (p.name.clone(), &p.value))
            .collect();
        crate::io::save_safetensors_atomic(path, &named)
    }
}
