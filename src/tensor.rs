//! A minimal tensor: a shape, a dtype and a device-resident buffer. Storage is reference counted so
//! that the autograd tape can keep inputs alive for backward without copying them.
//!
//! The CPU engine computes in f32 (the reference precision); bf16/f16 exist for storage and for the
//! GPU path, and convert to and from f32 explicitly.

use crate::error::{Error, Result};
use half::{bf16, f16};
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    F16,
}

impl DType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }
}

/// Where a tensor lives. Only the CPU exists in the engine; CUDA buffers come with the GPU runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

#[derive(Debug, Clone)]
enum Storage {
    F32(Arc<Vec<f32>>),
    BF16(Arc<Vec<bf16>>),
    F16(Arc<Vec<f16>>),
}

#[derive(Debug, Clone)]
pub struct Tensor {
    shape: Vec<usize>,
    storage: Storage,
    device: Device,
}

impl Tensor {
    /// An f32 CPU tensor; errors when `data.len()` is not the product of `shape`.
    pub fn from_vec(data: Vec<f32>, shape: &[usize]) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::shape(
                "Tensor::from_vec",
                format!("{n} elements for shape {shape:?}"),
                format!("{} elements", data.len()),
            ));
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            storage: Storage::F32(Arc::new(data)),
            device: Device::Cpu,
        })
    }

    pub fn zeros(shape: &[usize]) -> Self {
        let n = shape.iter().product();
        Tensor {
            shape: shape.to_vec(),
            storage: Storage::F32(Arc::new(vec![0.0; n])),
            device: Device::Cpu,
        }
    }

    pub fn scalar(v: f32) -> Self {
        Tensor {
            shape: vec![],
            storage: Storage::F32(Arc::new(vec![v])),
            device: Device::Cpu,
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn dims(&self) -> usize {
        self.shape.len()
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn device(&self) -> Device {
        self.device
    }
    pub fn dtype(&self) -> DType {
        match self.storage {
            Storage::F32(_) => DType::F32,
            Storage::BF16(_) => DType::BF16,
            Storage::F16(_) => DType::F16,
        }
    }

    /// The f32 data; errors for other dtypes (convert with [`Tensor::to_dtype`] first).
    pub fn f32s(&self) -> Result<&[f32]> {
        match &self.storage {
            Storage::F32(v) => Ok(v),
            _ => Err(Error::Unsupported(format!(
                "this CPU op computes in f32 but the tensor is {:?}: call .to_dtype(DType::F32) first",
                self.dtype()
            ))),
        }
    }

    /// The f32 data, for tensors the engine itself created as f32.
    pub(crate) fn data(&self) -> &[f32] {
        match &self.storage {
            Storage::F32(v) => v,
            _ => unreachable!("engine-internal tensors are f32"),
        }
    }

    /// The data as mutable f32, converted to f32 first if stored narrower; copied only when the
    /// buffer is shared with another tensor (copy on write).
    pub(crate) fn f32_data_mut(&mut self) -> &mut [f32] {
        if self.dtype() != DType::F32 {
            *self = self.to_dtype(DType::F32);
        }
        match &mut self.storage {
            Storage::F32(v) => Arc::make_mut(v).as_mut_slice(),
            _ => unreachable!("converted to f32 above"),
        }
    }

    pub fn to_vec(&self) -> Vec<f32> {
        match &self.storage {
            Storage::F32(v) => v.to_vec(),
            Storage::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Storage::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }

    /// Converts with round-to-nearest-even (the `half` crate), as PyTorch's `.to(dtype)` does.
    pub fn to_dtype(&self, dtype: DType) -> Tensor {
        if dtype == self.dtype() {
            return self.clone();
        }
        let v = self.to_vec();
        let storage = match dtype {
            DType::F32 => Storage::F32(Arc::new(v)),
            DType::BF16 => Storage::BF16(Arc::new(v.iter().map(|&x| bf16::from_f32(x)).collect())),
            DType::F16 => Storage::F16(Arc::new(v.iter().map(|&x| f16::from_f32(x)).collect())),
        };
        Tensor {
            shape: self.shape.clone(),
            storage,
            device: self.device,
        }
    }

    /// Same data, new shape (no copy); errors when the element count differs.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if n != self.numel() {
            return Err(Error::shape(
                "reshape",
                format!("{} elements", self.numel()),
                format!("shape {shape:?} ({n} elements)"),
            ));
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            storage: self.storage.clone(),
            device: self.device,
        })
    }

    /// The index of the first NaN or infinite element, if any.
    pub fn first_non_finite(&self) -> Option<usize> {
        match &self.storage {
            Storage::F32(v) => first_in_chunks(v, |x| !x.is_finite()),
            Storage::BF16(v) => first_in_chunks(v, |x| !x.is_finite()),
            Storage::F16(v) => first_in_chunks(v, |x| !x.is_finite()),
        }
    }

    /// The single value of a one-element tensor.
    pub fn item(&self) -> Result<f32> {
        if self.numel() != 1 {
            return Err(Error::shape(
                "item",
                "one element",
                format!("shape {:?}", self.shape),
            ));
        }
        Ok(self.to_vec()[0])
    }
}

/// Index of the first element matching `pred`, scanning 64K-element chunks in parallel.
fn first_in_chunks<T: Sync>(v: &[T], pred: impl Fn(&T) -> bool + Sync) -> Option<usize> {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    v.par_chunks(CHUNK)
        .enumerate()
        .find_map_first(|(ci, c)| c.iter().position(&pred).map(|p| ci * CHUNK + p))
}
