//! safetensors reading and atomic writing.

use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};
use half::{bf16, f16};
use std::path::Path;

/// Converts a stored f32/f16/bf16 tensor to an f32 CPU tensor.
pub fn tensor_from_view(
    view: &safetensors::tensor::TensorView<'_>,
    name: &str,
    source: &str,
) -> Result<Tensor> {
    use safetensors::Dtype;
    let bytes = view.data();
    let data: Vec<f32> = match view.dtype() {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(Error::Io {
                path: source.to_string(),
                detail: format!("tensor '{name}' has dtype {other:?}; expected F32, F16 or BF16"),
            })
        }
    };
    Tensor::from_vec(data, view.shape())
}

/// Reads a whole safetensors file into name -> f32 tensor.
pub fn load_safetensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let source = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| Error::Io {
        path: source.clone(),
        detail: format!("cannot read: {e}"),
    })?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| Error::Io {
        path: source.clone(),
        detail: format!("not a valid safetensors file: {e}"),
    })?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        out.push((name.clone(), tensor_from_view(&view, &name, &source)?));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Writes tensors (in their own dtype) to `path` via a temporary file and a rename, so a crash
/// never leaves a half-written file under the final name.
pub fn save_safetensors_atomic(path: &Path, tensors: &[(String, &Tensor)]) -> Result<()> {
    let source = path.display().to_string();
    let io_err = |e: std::io::Error| Error::Io {
        path: source.clone(),
        detail: format!("cannot write: {e}"),
    };
    let bufs: Vec<(String, Vec<u8>, Vec<usize>, safetensors::Dtype)> = tensors
        .iter()
        .map(|(n, t)| {
            let (bytes, dt) = match t.dtype() {
                DType::F32 => (
                    t.to_vec().iter().flat_map(|x| x.to_le_bytes()).collect(),
                    safetensors::Dtype::F32,
                ),
                DType::BF16 => (
                    t.to_vec()
                        .iter()
                        .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
                        .collect(),
                    safetensors::Dtype::BF16,
                ),
                DType::F16 => (
                    t.to_vec()
                        .iter()
                        .flat_map(|&x| f16::from_f32(x).to_le_bytes())
                        .collect(),
                    safetensors::Dtype::F16,
                ),
            };
            (n.clone(), bytes, t.shape().to_vec(), dt)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bufs
        .iter()
        .map(|(n, b, s, dt)| {
            safetensors::tensor::TensorView::new(*dt, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::Io {
                    path: source.clone(),
                    detail: format!("tensor '{n}': {e}"),
                })
        })
        .collect::<Result<_>>()?;
    let data = safetensors::serialize(views, &None).map_err(|e| Error::Io {
        path: source.clone(),
        detail: format!("serialize: {e}"),
    })?;
    let tmp = path.with_extension("safetensors.tmp");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(io_err)?;
        f.write_all(&data).map_err(io_err)?;
        f.sync_all().map_err(io_err)?;
    }
    std::fs::rename(&tmp, path).map_err(io_err)?;
    Ok(())
}
