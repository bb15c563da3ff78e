//! `strata train` for CTC tasks (phones / characters): one upstream pass per batch feeds every
//! interface + PR-head pair; a JSONL log line per pair per step; dev PER/CER every `eval_every`
//! steps and at the end; each pair's checkpoint (latest, and best by dev error rate) in its own
//! folder; `resume` continues bit for bit from the latest checkpoints.

use crate::audio::read_wav;
use crate::batch::PackedBatch;
use crate::error::{Error, Result};
use crate::models::interface::InterfaceConfig;
use crate::models::upstream::Upstream;
use crate::optim::AdamConfig;
use crate::train::checkpoint;
use crate::train::data::{length_buckets, Dataset, OnBad, Vocab};
use crate::train::metrics::ErrorRate;
use crate::train::side_by_side::PrPair;
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub struct TrainConfig {
    /// (name, interface) pairs trained side by side.
    pub interfaces: Vec<(String, InterfaceConfig)>,
    pub optimizer: AdamConfig,
    pub clip: Option<f64>,
    pub steps: u64,
    pub batch_samples: usize,
    pub eval_every: u64,
    pub seed: u64,
    pub shuffle: bool,
    pub out: PathBuf,
    pub resume: bool,
    pub on_bad: OnBad,
}

/// One pair's dev results.
#[derive(Clone, Debug)]
pub struct EvalResult {
    pub name: String,
    pub step: u64,
    pub error_rate: f64,
}

fn log_line(out: &Path, v: serde_json::Value) -> Result<()> {
    let path = out.join("log.jsonl");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| Error::Io {
            path: path.display().to_string(),
            detail: format!("cannot write the log: {e}"),
        })?;
    writeln!(f, "{v}").map_err(|e| Error::Io {
        path: path.display().to_string(),
        detail: format!("cannot write the log: {e}"),
    })
}

/// Runs the upstream on a batch of utterances (indices into `ds`).
fn stack_of(
    upstream: &Upstream,
    ds: &Dataset,
    idx: &[usize],
) -> Result<(crate::Tensor, PackedBatch)> {
    let waves: Vec<Vec<f32>> = idx
        .iter()
        .map(|&i| read_wav(&ds.utterances[i].path))
        .collect::<Result<_>>()?;
    let refs: Vec<&[f32]> = waves.iter().map(Vec::as_slice).collect();
    let names: Vec<&str> = idx.iter().map(|&i| ds.utterances[i].id.as_str()).collect();
    upstream.forward(&refs, &names)
}

fn evaluate(
    upstream: &Upstream,
    pairs: &[PrPair],
    dev: &Dataset,
    dev_labels: &[Vec<usize>],
    batch_samples: usize,
) -> Result<Vec<f64>> {
    let samples: Vec<usize> = dev.utterances.iter().map(|u| u.samples).collect();
    let mut rates = vec![ErrorRate::default(); pairs.len()];
    for b in length_buckets(&samples, batch_samples, None) {
        let (stack, batch) = stack_of(upstream, dev, &b)?;
        for (p, rate) in pairs.iter().zip(&mut rates) {
            for (hyp, &i) in p.decode(&stack, &batch)?.iter().zip(&b) {
                rate.add(hyp, &dev_labels[i]);
            }
        }
    }
    Ok(rates.iter().map(ErrorRate::rate).collect())
}

/// Trains every pair for `cfg.steps` optimizer steps; returns the last dev evaluation.
pub fn train(
    upstream: &Upstream,
    mut train: Dataset,
    mut dev: Dataset,
    vocab: &Vocab,
    cfg: &TrainConfig,
) -> Result<Vec<EvalResult>> {
    std::fs::create_dir_all(&cfg.out).map_err(|e| Error::Io {
        path: cfg.out.display().to_string(),
        detail: format!("cannot create: {e}"),
    })?;
    let train_labels = vocab.encode_all(&mut train, cfg.on_bad)?;
    let dev_labels = vocab.encode_all(&mut dev, cfg.on_bad)?;
    if train.utterances.is_empty() || dev.utterances.is_empty() {
        return Err(Error::value(
            "dataset",
            "no usable training or dev utterance left",
        ));
    }
    let mut pairs = Vec::new();
    for (name, itf) in &cfg.interfaces {
        if itf.layers != upstream.num_states() || itf.dim != upstream.hidden_size() {
            return Err(Error::Config(format!(
                "interface '{name}' is for {} x {} states but the upstream gives {} x {}",
                itf.layers,
                itf.dim,
                upstream.num_states(),
                upstream.hidden_size()
            )));
        }
        pairs.push(PrPair::new(
            name,
            itf,
            vocab.len(),
            cfg.optimizer,
            cfg.clip,
            cfg.seed,
        )?);
    }
    // Where to continue: (step, best error rate per pair).
    let mut start = 0u64;
    let mut best = vec![f64::INFINITY; pairs.len()];
    if cfg.resume {
        for (i, p) in pairs.iter_mut().enumerate() {
            let extra = checkpoint::load(
                &cfg.out.join(&p.name).join("latest"),
                &mut p.store,
                &mut p.optimizer,
            )?;
            p.steps = p.optimizer.step;
            best[i] = extra["best"].as_f64().unwrap_or(f64::INFINITY);
        }
        start = pairs[0].steps;
        if pairs.iter().any(|p| p.steps != start) {
            return Err(Error::Config(
                "the pairs' checkpoints are at different steps: resume needs one consistent run"
                    .into(),
            ));
        }
    }
    let samples: Vec<usize> = train.utterances.iter().map(|u| u.samples).collect();
    let epoch_batches = |epoch: u64| {
        length_buckets(
            &samples,
            cfg.batch_samples,
            cfg.shuffle.then_some(cfg.seed.wrapping_add(epoch)),
        )
    };
    let per_epoch = epoch_batches(0).len() as u64;
    let mut cached: Option<(u64, Vec<Vec<usize>>)> = None;
    let mut last = Vec::new();
    let t0 = Instant::now();
    let mut frames_done = 0usize;
    for step in start..cfg.steps {
        // The data order is a function of (seed, step) only, so a resumed run sees the same batches.
        let (epoch, pos) = (step / per_epoch, (step % per_epoch) as usize);
        if cached.as_ref().map(|c| c.0) != Some(epoch) {
            cached = Some((epoch, epoch_batches(epoch)));
        }
        let b = &cached.as_ref().expect("just filled").1[pos];
        let (stack, batch) = stack_of(upstream, &train, b)?;
        let targets: Vec<Vec<usize>> = b.iter().map(|&i| train_labels[i].clone()).collect();
        frames_done += batch.total_frames();
        for p in &mut pairs {
            let loss = p.train_step(&stack, &batch, &targets)?;
            log_line(
                &cfg.out,
                json!({"step": step + 1, "pair": p.name, "loss": loss, "frames": batch.total_frames()}),
            )?;
        }
        let done = step + 1;
        let fps = frames_done as f64 / t0.elapsed().as_secs_f64().max(1e-9);
        eprint!("\rstep {done}/{} frames/s {fps:.0}   ", cfg.steps);
        if done % cfg.eval_every.max(1) == 0 || done == cfg.steps {
            let rates = evaluate(upstream, &pairs, &dev, &dev_labels, cfg.batch_samples)?;
            last.clear();
            for ((p, &rate), best) in pairs.iter().zip(&rates).zip(&mut best) {
                log_line(
                    &cfg.out,
                    json!({"step": done, "pair": p.name, "dev_error_rate": rate}),
                )?;
                let dir = cfg.out.join(&p.name);
                if rate < *best {
                    *best = rate;
                    checkpoint::save(
                        &dir.join("best"),
                        &p.store,
                        &p.optimizer,
                        &json!({"best": rate}),
                    )?;
                }
                checkpoint::save(
                    &dir.join("latest"),
                    &p.store,
                    &p.optimizer,
                    &json!({"best": *best}),
                )?;
                last.push(EvalResult {
                    name: p.name.clone(),
                    step: done,
                    error_rate: rate,
                });
            }
        }
    }
    eprintln!();
    Ok(last)
}

/// One utterance's result from [`evaluate_checkpoint`].
#[derive(Clone, Debug, PartialEq)]
pub struct Hypothesis {
    pub id: String,
    pub hyp: Vec<String>,
    pub reference: Vec<String>,
}

/// Decodes `data` with the pair saved in `checkpoint_dir` (an `OUT/<pair>/{best,latest}` folder)
/// for interface `itf`; returns the error rate (PER / CER) and every hypothesis.
pub fn evaluate_checkpoint(
    upstream: &Upstream,
    checkpoint_dir: &Path,
    itf: &InterfaceConfig,
    vocab: &Vocab,
    mut data: Dataset,
    batch_samples: usize,
    on_bad: OnBad,
) -> Result<(f64, Vec<Hypothesis>)> {
    let labels = vocab.encode_all(&mut data, on_bad)?;
    let mut pair = PrPair::new("eval", itf, vocab.len(), AdamConfig::adamw(1e-3), None, 0)?;
    checkpoint::load(checkpoint_dir, &mut pair.store, &mut pair.optimizer)?;
    let samples: Vec<usize> = data.utterances.iter().map(|u| u.samples).collect();
    let mut rate = ErrorRate::default();
    let mut out = Vec::new();
    for b in length_buckets(&samples, batch_samples, None) {
        let (stack, batch) = stack_of(upstream, &data, &b)?;
        for (hyp, &i) in pair.decode(&stack, &batch)?.iter().zip(&b) {
            rate.add(hyp, &labels[i]);
            let u = &data.utterances[i];
            out.push(Hypothesis {
                id: u.id.clone(),
                hyp: hyp.iter().map(|&t| vocab.tokens[t].clone()).collect(),
                reference: u.label.clone(),
            });
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok((rate.rate(), out))
}
