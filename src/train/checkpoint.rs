//! Training checkpoints that survive a crash at any moment and resume bit for bit.
//!
//! A checkpoint folder holds `params-<step>.safetensors` (every parameter), `optim-<step>.safetensors`
//! (Adam's moments, `exp_avg.<name>` / `exp_avg_sq.<name>`) and `state.json`, which names those two
//! files with their sizes and carries the step, the optimizer's configuration and caller state (data
//! order, RNG seeds...). Each file is written to a temporary name and renamed; `state.json` is
//! written last, so it always describes complete files, and older step files are removed only after
//! it. Loading checks names, shapes and sizes and fails with a message naming the mismatch.

use crate::autograd::ParamStore;
use crate::error::{Error, Result};
use crate::io::{load_safetensors, save_safetensors_atomic};
use crate::optim::{Adam, AdamConfig};
use crate::tensor::Tensor;
use serde_json::{json, Value};
use std::path::Path;

fn io_err(path: &Path, detail: impl Into<String>) -> Error {
    Error::Io {
        path: path.display().to_string(),
        detail: detail.into(),
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f =
        std::fs::File::create(&tmp).map_err(|e| io_err(&tmp, format!("cannot write: {e}")))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| io_err(&tmp, format!("cannot write: {e}")))?;
    std::fs::rename(&tmp, path).map_err(|e| io_err(path, format!("cannot write: {e}")))
}

/// Saves parameters, optimizer state and `extra` (any JSON the caller needs to resume).
pub fn save(dir: &Path, store: &ParamStore, opt: &Adam, extra: &Value) -> Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| io_err(dir, format!("cannot create the checkpoint folder: {e}")))?;
    let step = opt.step;
    let params = format!("params-{step}.safetensors");
    let optim = format!("optim-{step}.safetensors");
    store.save_safetensors(&dir.join(&params))?;
    let mut moments = Vec::new();
    for (i, p) in store.iter().enumerate() {
        let shape = p.value.shape();
        moments.push((
            format!("exp_avg.{}", p.name),
            Tensor::from_vec(opt.exp_avg[i].clone(), shape)?,
        ));
        moments.push((
            format!("exp_avg_sq.{}", p.name),
            Tensor::from_vec(opt.exp_avg_sq[i].clone(), shape)?,
        ));
    }
    let named: Vec<(String, &Tensor)> = moments.iter().map(|(n, t)| (n.clone(), t)).collect();
    save_safetensors_atomic(&dir.join(&optim), &named)?;
    let size = |name: &str| {
        std::fs::metadata(dir.join(name))
            .map(|m| m.len())
            .unwrap_or(0)
    };
    let c = opt.config;
    let state = json!({
        "format": "strata-checkpoint-1",
        "step": step,
        "params": {"file": params, "bytes": size(&params)},
        "optimizer": {"file": optim, "bytes": size(&optim), "lr": c.lr, "beta1": c.beta1, "beta2": c.beta2,
                      "eps": c.eps, "weight_decay": c.weight_decay, "decoupled": c.decoupled},
        "extra": extra,
    });
    let text = serde_json::to_string_pretty(&state).map_err(|e| io_err(dir, e.to_string()))?;
    write_atomic(&dir.join("state.json"), text.as_bytes())?;
    // Only now is the previous checkpoint garbage.
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let stale = (name.starts_with("params-") || name.starts_with("optim-"))
                && name != params
                && name != optim;
            if stale {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    Ok(())
}

/// Restores parameters and optimizer state saved by [`save`] into a store and optimizer built with
/// the same modules; returns the caller's `extra` JSON.
pub fn load(dir: &Path, store: &mut ParamStore, opt: &mut Adam) -> Result<Value> {
    let state_path = dir.join("state.json");
    let text = std::fs::read_to_string(&state_path).map_err(|e| {
        io_err(
            &state_path,
            format!("cannot read the checkpoint state: {e}"),
        )
    })?;
    let state: Value = serde_json::from_str(&text)
        .map_err(|e| io_err(&state_path, format!("not valid JSON: {e}")))?;
    if state["format"] != "strata-checkpoint-1" {
        return Err(io_err(
            &state_path,
            "is not a strata checkpoint (format strata-checkpoint-1)",
        ));
    }
    let file = |key: &str| -> Result<std::path::PathBuf> {
        let name = state[key]["file"]
            .as_str()
            .ok_or_else(|| io_err(&state_path, format!("has no {key}.file")))?;
        let path = dir.join(name);
        let want = state[key]["bytes"].as_u64().unwrap_or(0);
        let got = std::fs::metadata(&path)
            .map_err(|e| io_err(&path, format!("cannot read: {e}")))?
            .len();
        if got != want {
            return Err(io_err(
                &path,
                format!(
                    "has {got} bytes but state.json recorded {want}: the checkpoint is damaged"
                ),
            ));
        }
        Ok(path)
    };
    let params = file("params")?;
    let bytes = std::fs::read(&params).map_err(|e| io_err(&params, format!("cannot read: {e}")))?;
    store.load_from_safetensors(&bytes, "", &params.display().to_string())?;
    let optim = file("optimizer")?;
    let moments: std::collections::HashMap<String, Tensor> =
        load_safetensors(&optim)?.into_iter().collect();
    let o = &state["optimizer"];
    let num = |k: &str| {
        o[k].as_f64()
            .ok_or_else(|| io_err(&state_path, format!("optimizer.{k} is missing")))
    };
    let config = AdamConfig {
        lr: num("lr")?,
        beta1: num("beta1")?,
        beta2: num("beta2")?,
        eps: num("eps")?,
        weight_decay: num("weight_decay")?,
        decoupled: o["decoupled"].as_bool().unwrap_or(true),
    };
    let mut restored = Adam::new(config, store)?;
    restored.step = state["step"]
        .as_u64()
        .ok_or_else(|| io_err(&state_path, "has no step"))?;
    for (i, p) in store.iter().enumerate() {
        for (prefix, dst) in [
            ("exp_avg", &mut restored.exp_avg[i]),
            ("exp_avg_sq", &mut restored.exp_avg_sq[i]),
        ] {
            let key = format!("{prefix}.{}", p.name);
            let t = moments
                .get(&key)
                .ok_or_else(|| io_err(&optim, format!("has no tensor '{key}'")))?;
            if t.shape() != p.value.shape() {
                return Err(io_err(
                    &optim,
                    format!(
                        "'{key}' has shape {:?}, the parameter {:?}",
                        t.shape(),
                        p.value.shape()
                    ),
                ));
            }
            *dst = t.to_vec();
        }
    }
    *opt = restored;
    Ok(state["extra"].clone())
}
