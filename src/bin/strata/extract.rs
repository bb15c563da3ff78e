//! `strata extract`: every hidden state of audio files (WAV, FLAC) into one safetensors file, or
//! of a whole data set into a feature cache (`--data`), which `strata train --features` reads.

use super::{model_normalize, parse_normalize, USAGE};
use std::path::PathBuf;
use std::time::Instant;
use strata::models::upstream::Upstream;
use strata::train::data::{load_audio_only, OnBad};
use strata::train::features::FeatureCache;
use strata::DType;

struct ExtractArgs {
    model: PathBuf,
    out: PathBuf,
    dtype: DType,
    normalize: Option<bool>,
    data: Option<PathBuf>,
    on_bad: OnBad,
    overwrite: bool,
    wavs: Vec<PathBuf>,
}

fn parse_extract(args: &[String]) -> Result<ExtractArgs, String> {
    let (mut model, mut out, mut dtype, mut normalize, mut data, mut wavs) =
        (None, None, DType::F32, None, None, Vec::new());
    let mut on_bad = OnBad::Fail;
    let mut overwrite = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{a} needs a value"))
        };
        match a.as_str() {
            "--model" => model = Some(PathBuf::from(value()?)),
            "--out" => out = Some(PathBuf::from(value()?)),
            "--data" => data = Some(PathBuf::from(value()?)),
            "--skip-bad" => on_bad = OnBad::Skip,
            "--overwrite" => overwrite = true,
            "--dtype" => {
                dtype = match value()?.as_str() {
                    "f32" => DType::F32,
                    "f16" => DType::F16,
                    other => return Err(format!("--dtype takes f32 or f16, got '{other}'")),
                }
            }
            "--normalize" => normalize = parse_normalize(&value()?)?,
            flag if flag.starts_with("--") => {
                return Err(format!("unknown option '{flag}' for extract\n\n{USAGE}"))
            }
            wav => wavs.push(PathBuf::from(wav)),
        }
    }
    let model = model.ok_or_else(|| format!("extract needs --model DIR\n\n{USAGE}"))?;
    let out = out.ok_or_else(|| {
        format!("extract needs --out FEATS.safetensors (or --out DIR with --data)\n\n{USAGE}")
    })?;
    match (&data, wavs.is_empty()) {
        (None, true) => {
            return Err(format!(
                "extract needs audio files (WAV or FLAC) or --data DATA\n\n{USAGE}"
            ))
        }
        (Some(_), false) => {
            return Err("extract takes either audio files or --data DATA, not both".into())
        }
        _ => {}
    }
    Ok(ExtractArgs {
        model,
        out,
        dtype,
        normalize,
        data,
        on_bad,
        overwrite,
        wavs,
    })
}

pub fn extract(args: &[String]) -> Result<(), String> {
    let a = parse_extract(args)?;
    // Extraction can take hours: what an earlier run wrote is replaced only when asked.
    if !a.overwrite {
        let held = if a.data.is_some() {
            FeatureCache::exists(&a.out).then(|| match FeatureCache::open(&a.out) {
                Ok(c) => format!(
                    "a feature cache of {} utterances, {} states x {}",
                    c.len(),
                    c.layers,
                    c.dim
                ),
                Err(_) => "a damaged feature cache".to_string(),
            })
        } else {
            a.out.exists().then(|| "a file".to_string())
        };
        if let Some(what) = held {
            return Err(format!(
                "--out {} already holds {what}: pass --overwrite to replace it, or choose another --out",
                a.out.display()
            ));
        }
    }
    let normalize = model_normalize(&a.model, a.normalize)?;
    if let Some(data) = &a.data {
        let model = Upstream::load(&a.model).map_err(|e| e.to_string())?;
        let ds = load_audio_only(data, a.on_bad).map_err(|e| e.to_string())?;
        return extract_cache(&model, &ds, &a.out, a.dtype, normalize);
    }
    let mut names = std::collections::BTreeMap::new();
    for w in &a.wavs {
        let stem = w
            .file_stem()
            .and_then(|s| s.to_str())
            .ok_or_else(|| format!("{}: cannot name a tensor after this path", w.display()))?;
        if let Some(prev) = names.insert(stem.to_string(), w.clone()) {
            return Err(format!(
                "{} and {} share the stem '{stem}': output tensors are named by stem",
                prev.display(),
                w.display()
            ));
        }
    }
    let model = Upstream::load(&a.model).map_err(|e| e.to_string())?;
    eprintln!(
        "{}: {:?}, {} states x {} dims, input normalization {}",
        a.model.display(),
        model.config.model_type,
        model.num_states(),
        model.hidden_size(),
        if normalize { "on" } else { "off" }
    );
    let mut outputs: Vec<(String, strata::Tensor)> = Vec::new();
    let t0 = Instant::now();
    let mut audio_seconds = 0.0;
    for (stem, path) in &names {
        let wave =
            strata::train::features::read_wave(path, normalize).map_err(|e| e.to_string())?;
        audio_seconds += wave.len() as f64 / 16000.0;
        let label = path.display().to_string();
        let (stack, _) = model
            .forward(&[&wave], &[label.as_str()])
            .map_err(|e| e.to_string())?;
        outputs.push((stem.clone(), stack.to_dtype(a.dtype)));
    }
    let named: Vec<(String, &strata::Tensor)> =
        outputs.iter().map(|(n, t)| (n.clone(), t)).collect();
    strata::io::save_safetensors_atomic(&a.out, &named).map_err(|e| e.to_string())?;
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "wrote {} tensors to {} ({audio_seconds:.1} s of audio in {secs:.1} s)",
        outputs.len(),
        a.out.display()
    );
    Ok(())
}

/// Extracts a whole data set into a feature cache folder, with a progress line.
pub fn extract_cache(
    model: &Upstream,
    ds: &strata::train::data::Dataset,
    out: &std::path::Path,
    dtype: DType,
    normalize: bool,
) -> Result<(), String> {
    let audio: f64 = ds.utterances.iter().map(|u| u.samples).sum::<usize>() as f64 / 16000.0;
    eprintln!(
        "extracting {} utterances ({audio:.1} s of audio) into {} ({:?}, {} states x {}, normalization {})",
        ds.utterances.len(),
        out.display(),
        model.config.model_type,
        model.num_states(),
        model.hidden_size(),
        if normalize { "on" } else { "off" }
    );
    let t0 = Instant::now();
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let frames =
        strata::train::features::extract_dataset(model, ds, out, dtype, normalize, |d, n| {
            if terminal {
                eprint!("\r  batch {d}/{n}");
            }
        })
        .map_err(|e| e.to_string())?;
    eprintln!(
        "{}  wrote {frames} frames in {:.1} s",
        if terminal { "\r" } else { "" },
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
