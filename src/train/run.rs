//! `strata train`: one source of hidden states (the upstream run on each batch, or a feature cache)
//! feeds every interface + head pair; CTC recognition (phones / characters), utterance
//! classification or speaker verification; PCA + Concat fitted before the first step; gradient
//! accumulation, a learning-rate schedule and clipping; a JSONL log line per pair per step; dev
//! PER / CER / accuracy / EER every `eval_every` steps and at the end, with loss and metric curves
//! redrawn as PNG; each pair's checkpoint (latest, and best by dev error) in its own
//! folder; `resume` continues bit for bit from the latest checkpoints.
//!
//! The step runs on the CPU (the f32 reference engine) or on a device backend ([`TrainDevice`]):
//! each pair then trains as a [`DevicePair`] (bf16 compute, fp32 masters and Adam state on the
//! device), the micro-batch's stack going up once for all pairs and only the loss coming down;
//! dev decoding runs there too, and the parameters and optimizer state come back into the CPU
//! pair only to be checkpointed, so checkpoints, `eval` and `--resume` are the same on both.

use crate::autograd::Tape;
use crate::error::{Error, Result};
use crate::models::interface::{PcaFit, PCA_FIT_FRAMES};
use crate::models::mlsuperb_head::{mlsuperb_frames, MLSUPERB_MIN_FRAMES};
use crate::optim::{AdamConfig, Schedule};
use crate::runtime::Backend;
use crate::train::checkpoint;
use crate::train::data::{length_buckets, Dataset, OnBad, Task, Vocab};
use crate::train::device_step::{upload_stack, DevicePair};
use crate::train::features::StackSource;
use crate::train::metrics::{cosine, equal_error_rate, ErrorRate};
use crate::train::side_by_side::{CtcHead, HeadKind, Pair, PairSpec};
use serde_json::json;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

pub struct TrainConfig {
    pub task: Task,
    /// The pairs trained side by side.
    pub interfaces: Vec<PairSpec>,
    /// Adam / AdamW hyper-parameters; the learning rate of each step comes from `schedule`.
    pub optimizer: AdamConfig,
    pub schedule: Schedule,
    pub clip: Option<f64>,
    /// Optimizer steps.
    pub steps: u64,
    /// Audio samples per micro-batch.
    pub batch_samples: usize,
    /// Micro-batches per optimizer step.
    pub accum: usize,
    /// Dev evaluation (and the latest / best checkpoints) every this many steps and at the end;
    /// 0: at the end only.
    pub eval_every: u64,
    /// Also write the latest checkpoints every this many steps between evaluations, so a stopped
    /// run loses at most this many steps; 0: with the evaluations only.
    pub save_every: u64,
    pub seed: u64,
    pub shuffle: bool,
    pub out: PathBuf,
    pub resume: bool,
    pub on_bad: OnBad,
    /// Write every pair's initial parameters here (names `<pair>.<parameter>`).
    pub save_init: Option<PathBuf>,
    /// Start every pair from the parameters in this file (same naming) instead of a random init.
    pub init_from: Option<PathBuf>,
    /// Draw a progress line on stderr.
    pub progress: bool,
    /// Where the training step runs.
    pub device: TrainDevice,
    /// Crop every longer training utterance to a random window of this many samples at each step
    /// (s3prl's SV loader: 8 s); the window is a function of the seed, the micro-batch and the
    /// utterance, so a resumed run crops alike. Needs the upstream run on each batch.
    pub crop_samples: Option<usize>,
    /// Keep the parameters of the evaluations with the N lowest dev error rates (or dev losses,
    /// `average_by`) in `OUT/<pair>/nbest/step-<S>` and, at the end, write their average to
    /// `OUT/<pair>/averaged` and score it on dev: ESPnet's `keep_nbest_models` + model averaging
    /// (ML-SUPERB's recipe averages 5). 0: off.
    pub average_best: usize,
    /// What "best" means for `average_best`: the dev error rate, or the dev loss (ESPnet's
    /// `best_model_criterion` in ML-SUPERB's recipe; CTC tasks).
    pub average_by: AverageBy,
}

/// The criterion of [`TrainConfig::average_best`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AverageBy {
    Error,
    Loss,
}

impl AverageBy {
    pub fn name(self) -> &'static str {
        match self {
            AverageBy::Error => "error",
            AverageBy::Loss => "loss",
        }
    }
}

/// Where the training step runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrainDevice {
    /// The CPU reference engine (f32).
    Cpu,
    /// The GPU when there is one and the device step is verified on GPUs
    /// ([`crate::train::device_step::VERIFIED_ON_GPU`]; pairs without a device path stay on the
    /// CPU, with a note), else the CPU.
    Auto,
    /// The GPU; an error when there is none or a pair has no device path.
    Cuda,
    /// The GPU kernels run by the kernel emulator on the CPU: slow, for tests and debugging.
    Emulator,
}

impl TrainConfig {
    /// Defaults for everything but the task, the pairs and the output folder.
    pub fn new(task: Task, interfaces: Vec<PairSpec>, out: PathBuf) -> Self {
        TrainConfig {
            task,
            interfaces,
            optimizer: AdamConfig::adamw(1e-3),
            schedule: Schedule::constant(1e-3),
            clip: Some(1.0),
            steps: 1000,
            batch_samples: 60 * 16000,
            accum: 1,
            eval_every: 100,
            save_every: 0,
            seed: 0,
            shuffle: true,
            out,
            resume: false,
            on_bad: OnBad::Fail,
            save_init: None,
            init_from: None,
            progress: false,
            device: TrainDevice::Cpu,
            crop_samples: None,
            average_best: 0,
            average_by: AverageBy::Error,
        }
    }

    pub fn head_kind(&self, vocab: &Vocab) -> HeadKind {
        head_kind(self.task, vocab)
    }
}

/// The head a task trains: the utterance classifier over the classes, or the PR head over the
/// CTC vocabulary.
pub fn head_kind(task: Task, vocab: &Vocab) -> HeadKind {
    match task {
        Task::Classification => HeadKind::Classify {
            classes: vocab.len(),
        },
        Task::Speaker => HeadKind::Speaker {
            speakers: vocab.len(),
        },
        _ => HeadKind::Ctc { vocab: vocab.len() },
    }
}

/// One pair's dev result. `error_rate` is PER / CER, or 1 - accuracy for classification.
#[derive(Clone, Debug)]
pub struct EvalResult {
    pub name: String,
    pub step: u64,
    pub error_rate: f64,
    /// The lowest dev error rate so far and its step (the `best` checkpoint; the step is unknown
    /// for a run resumed from checkpoints written before it was recorded).
    pub best_error_rate: f64,
    pub best_step: Option<u64>,
    /// Trainable scalars of the interface, and of interface + head.
    pub interface_params: usize,
    pub params: usize,
    /// The interface's layer weights, softmax-normalized, as (first layer, weights) per weighted
    /// sum (WS, GroupWS; see [`crate::models::interface::Interface::layer_weights`]).
    pub layer_weights: Option<Vec<(usize, Vec<f32>)>>,
    /// With [`TrainConfig::average_best`], after the last step: the averaged parameters' dev
    /// error rate and the steps averaged.
    pub averaged: Option<(f64, Vec<u64>)>,
}

/// The state a pair's `latest` checkpoint carries for a resume: its best dev error rate and step,
/// the n-best list ((criterion value, step), lowest first) with its settings, and the data order.
fn resume_state(
    best: f64,
    best_step: Option<u64>,
    (nbest, (n, by)): (&[(f64, u64)], (usize, AverageBy)),
    order: &serde_json::Value,
) -> serde_json::Value {
    json!({
        "best": best,
        "best_step": best_step,
        "nbest": nbest,
        "average_best": n,
        "average_by": by.name(),
        "order": order,
    })
}

/// Enters (value, step) into `list`, the `n` lowest values so far (ascending; on a tie the earlier
/// step stays ahead, and a full list takes only a strictly lower value). Returns whether it
/// entered and the step it pushed out.
fn enter_nbest(list: &mut Vec<(f64, u64)>, n: usize, rate: f64, step: u64) -> (bool, Option<u64>) {
    if n == 0 || (list.len() >= n && list.last().is_some_and(|&(worst, _)| rate >= worst)) {
        return (false, None);
    }
    let at = list.partition_point(|&(r, _)| r <= rate);
    list.insert(at, (rate, step));
    let out = (list.len() > n)
        .then(|| list.pop().map(|(_, s)| s))
        .flatten();
    (true, out)
}

/// The folder of a pair's n-best snapshot of `step`.
fn nbest_dir(pair_dir: &Path, step: u64) -> PathBuf {
    pair_dir.join("nbest").join(format!("step-{step}"))
}

/// The element-wise mean (in f64) of the parameters saved in `snapshots`, as a copy of `pair`'s
/// store (names and shapes checked by the checkpoint loader).
fn averaged_store(pair: &Pair, snapshots: &[PathBuf]) -> Result<crate::autograd::ParamStore> {
    if snapshots.is_empty() {
        return Err(Error::Config(format!(
            "'{}': no n-best snapshot to average (no evaluation was kept)",
            pair.name
        )));
    }
    let mut sums: Vec<Vec<f64>> = pair
        .store
        .iter()
        .map(|q| vec![0.0; q.value.numel()])
        .collect();
    for dir in snapshots {
        let (mut store, mut opt) = (pair.store.clone(), pair.optimizer.clone());
        checkpoint::load(dir, &mut store, &mut opt)?;
        for (sum, q) in sums.iter_mut().zip(store.iter()) {
            for (s, v) in sum.iter_mut().zip(q.value.to_vec()) {
                *s += v as f64;
            }
        }
    }
    let mut avg = pair.store.clone();
    let ids: Vec<_> = avg.ids().collect();
    for (id, sum) in ids.into_iter().zip(sums) {
        let shape = avg.value(id).shape().to_vec();
        let mean = sum
            .iter()
            .map(|s| (s / snapshots.len() as f64) as f32)
            .collect();
        avg.set_value(id, crate::Tensor::from_vec(mean, &shape)?)?;
    }
    Ok(avg)
}

fn log_line(out: &Path, v: serde_json::Value) -> Result<()> {
    let path = out.join("log.jsonl");
    let err = |e: std::io::Error| Error::Io {
        path: path.display().to_string(),
        detail: format!("cannot write the log: {e}"),
    };
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(err)?;
    writeln!(f, "{v}").map_err(err)
}

#[allow(clippy::too_many_arguments)]
fn evaluate(
    source: &StackSource,
    pairs: &[Pair],
    on_device: &[Option<DevicePair>],
    backend: Option<&Backend>,
    dev: &Dataset,
    dev_labels: &[Vec<usize>],
    batch_samples: usize,
    with_loss: bool,
) -> Result<Vec<(f64, Option<f64>)>> {
    let mut rates = vec![ErrorRate::default(); pairs.len()];
    let mut losses = vec![(0f64, 0usize); pairs.len()];
    let mut embeddings = vec![vec![Vec::new(); dev.utterances.len()]; pairs.len()];
    decode_all(
        source,
        pairs,
        on_device,
        backend,
        dev,
        batch_samples,
        with_loss.then_some(dev_labels),
        |k, i, out| match out {
            Decoded::Tokens(hyp, loss) => {
                rates[k].add(hyp, &dev_labels[i]);
                if let Some(l) = loss {
                    losses[k].0 += l;
                    losses[k].1 += 1;
                }
            }
            Decoded::Embedding(e) => embeddings[k][i] = e.to_vec(),
        },
    )?;
    (pairs.iter().zip(&rates).zip(&embeddings).zip(&losses))
        .map(|(((p, rate), emb), &(sum, n))| {
            let loss = (n > 0).then(|| sum / n as f64);
            match p.head_kind() {
                HeadKind::Speaker { .. } => Ok((verification_scores(dev, emb)?.0, None)),
                _ => Ok((rate.rate(), loss)),
            }
        })
        .collect()
}

/// What a pair makes of an utterance for scoring: a hypothesis (token ids, or a one-element
/// class list) or a speaker embedding.
enum Decoded<'a> {
    /// The hypothesis and, when targets were given to a CTC head, the utterance's loss.
    Tokens(&'a [usize], Option<f64>),
    Embedding(&'a [f32]),
}

/// The equal error rate of `data`'s trials scored by the cosine similarity of `embeddings` (one
/// per utterance), and every trial's score.
fn verification_scores(data: &Dataset, embeddings: &[Vec<f32>]) -> Result<(f64, Vec<f64>)> {
    let scores: Vec<f64> = (data.trials.iter())
        .map(|t| cosine(&embeddings[t.a], &embeddings[t.b]))
        .collect();
    let targets: Vec<bool> = data.trials.iter().map(|t| t.target).collect();
    let eer = equal_error_rate(&scores, &targets).ok_or_else(|| {
        Error::value(
            "verification trials",
            "an equal error rate needs target and nontarget trials both: give the set a trials file with both",
        )
    })?;
    Ok((eer, scores))
}

/// Decodes every utterance of `data` with every pair (on the device where the pair is there),
/// reading or computing each batch's hidden states once; `visit(pair, utterance, hypothesis)`.
/// With `targets` (one per utterance of `data`), CTC heads also give each utterance's loss.
#[allow(clippy::too_many_arguments)]
fn decode_all(
    source: &StackSource,
    pairs: &[Pair],
    on_device: &[Option<DevicePair>],
    backend: Option<&Backend>,
    data: &Dataset,
    batch_samples: usize,
    targets: Option<&[Vec<usize>]>,
    mut visit: impl FnMut(usize, usize, Decoded),
) -> Result<()> {
    let samples: Vec<usize> = data.utterances.iter().map(|u| u.samples).collect();
    for b in length_buckets(&samples, batch_samples, None) {
        let (stack, batch) = source.stack(data, &b)?;
        let x = device_stack(backend, on_device, &stack)?;
        let batch_targets: Option<Vec<Vec<usize>>> =
            targets.map(|t| b.iter().map(|&i| t[i].clone()).collect());
        for (k, (p, d)) in pairs.iter().zip(on_device).enumerate() {
            if let HeadKind::Speaker { .. } = p.head_kind() {
                let embeddings = match (d, backend, &x) {
                    (Some(d), Some(be), Some(x)) => d.embed_on(be, x, &batch)?,
                    _ => p.embed(&stack, &batch)?,
                };
                for (e, &i) in embeddings.iter().zip(&b) {
                    visit(k, i, Decoded::Embedding(e));
                }
                continue;
            }
            let t = batch_targets.as_deref();
            let (hyps, losses) = match (d, backend, &x) {
                (Some(d), Some(be), Some(x)) => d.decode_scored_on(be, x, &batch, t)?,
                _ => p.decode_scored(&stack, &batch, t)?,
            };
            for (j, (hyp, &i)) in hyps.iter().zip(&b).enumerate() {
                visit(k, i, Decoded::Tokens(hyp, losses.as_ref().map(|l| l[j])));
            }
        }
    }
    Ok(())
}

/// The stack sent up once for every pair that trains on the device (None: no pair does).
fn device_stack(
    backend: Option<&Backend>,
    on_device: &[Option<DevicePair>],
    stack: &crate::Tensor,
) -> Result<Option<crate::runtime::Buf<half::bf16>>> {
    match backend {
        Some(be) if on_device.iter().any(Option::is_some) => Ok(Some(upload_stack(be, stack)?)),
        _ => Ok(None),
    }
}

/// The backend a run's device asks for (None: the CPU), and each pair's device copy (None: that
/// pair trains on the CPU).
fn device_pairs(
    device: TrainDevice,
    pairs: &[Pair],
) -> Result<(Option<Backend>, Vec<Option<DevicePair>>)> {
    let be = match device {
        TrainDevice::Cpu => None,
        TrainDevice::Emulator => Some(Backend::Emulator),
        TrainDevice::Cuda => Some(Backend::cuda().map_err(|why| {
            Error::Device(format!(
                "--device cuda: no usable GPU ({why}); use --device cpu or auto"
            ))
        })?),
        TrainDevice::Auto => crate::train::device_step::auto_backend(),
    };
    let Some(be) = be else {
        return Ok((None, pairs.iter().map(|_| None).collect()));
    };
    let mut on_device = Vec::new();
    for p in pairs {
        match DevicePair::from_pair(&be, p) {
            Ok(d) => on_device.push(Some(d)),
            Err(e) if device == TrainDevice::Auto => {
                eprintln!("note: {e}; '{}' trains on the CPU", p.name);
                on_device.push(None);
            }
            Err(e) => return Err(e),
        }
    }
    Ok((Some(be), on_device))
}

fn format_duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// The progress line: step, bar, each pair's loss, frames/s, ETA.
fn progress_line(done: u64, total: u64, losses: &[(String, f32)], fps: f64, eta: f64) -> String {
    let width = 20;
    let filled = (done as usize * width / total.max(1) as usize).min(width);
    let losses: Vec<String> = losses.iter().map(|(n, l)| format!("{n} {l:.3}")).collect();
    format!(
        "step {done}/{total} [{}{}] loss {} | {fps:.0} frames/s | ETA {}",
        "#".repeat(filled),
        "-".repeat(width - filled),
        losses.join(", "),
        format_duration(eta)
    )
}

/// Drops the log lines of steps after `step` (a run stopped after its last checkpoint logged steps
/// that the resumed run redoes, bit for bit): without this they would appear twice. Rewritten
/// through a temporary file and a rename.
fn truncate_log(out: &Path, step: u64) -> Result<()> {
    let path = out.join("log.jsonl");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_none_or(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    if kept.len() == text.len() {
        return Ok(());
    }
    let tmp = out.join("log.jsonl.tmp");
    std::fs::write(&tmp, kept)
        .and_then(|_| std::fs::rename(&tmp, &path))
        .map_err(|e| Error::Io {
            path: path.display().to_string(),
            detail: format!("cannot rewrite the log for the resume: {e}"),
        })
}

/// The (start, length) in samples of utterance `utterance`'s training crop in micro-batch
/// `micro_batch`: the whole utterance when it is no longer than `crop`, else a window drawn from a
/// generator seeded by (seed, micro-batch, utterance), so a resumed run draws the same.
pub fn crop_window(
    seed: u64,
    micro_batch: u64,
    utterance: usize,
    samples: usize,
    crop: usize,
) -> (usize, usize) {
    if samples <= crop {
        return (0, samples);
    }
    let key = seed
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(micro_batch.wrapping_mul(0xbf58_476d_1ce4_e5b9))
        .wrapping_add(utterance as u64);
    let start = crate::rng::Rng::new(key).below(samples - crop + 1);
    (start, crop)
}

/// Fits the PCA + Concat pairs not fitted yet (none loaded by `--init-from`): one pass over the
/// first [`PCA_FIT_FRAMES`] training frames in the first epoch's batch order (normalized for the
/// pairs that normalize).
fn fit_pca(
    pairs: &mut [Pair],
    source: &StackSource,
    train: &Dataset,
    batches: &[Vec<usize>],
    progress: bool,
) -> Result<()> {
    let wanted: Vec<usize> = (0..pairs.len())
        .filter(|&i| {
            (pairs[i].interface.as_pca()).is_some_and(|p| p.fitted_frames(&pairs[i].store) == 0)
        })
        .collect();
    if wanted.is_empty() {
        return Ok(());
    }
    let (l, d) = (source.num_states(), source.hidden_size());
    // One fit per normalization setting.
    let normalized: Vec<bool> = (pairs.iter())
        .map(|p| p.interface.config().normalize)
        .collect();
    let mut fits: Vec<(bool, PcaFit)> = Vec::new();
    for &i in &wanted {
        if !fits.iter().any(|f| f.0 == normalized[i]) {
            fits.push((normalized[i], PcaFit::new(l, d)));
        }
    }
    for b in batches {
        let (stack, _) = source.stack(train, b)?;
        for (normalize, fit) in &mut fits {
            if *normalize {
                let mut t = Tape::no_grad();
                let x = t.constant(stack.clone())?;
                let y = t.layer_norm(x, None, 1e-5)?;
                fit.add(t.value(y))?;
            } else {
                fit.add(&stack)?;
            }
        }
        if fits[0].1.frames() >= PCA_FIT_FRAMES {
            break;
        }
    }
    for (normalize, fit) in &fits {
        let basis = fit.finish()?;
        if progress {
            eprintln!(
                "PCA + Concat fitted on {} training frames{}",
                basis.frames,
                if *normalize { " (normalized)" } else { "" }
            );
        }
        for &i in &wanted {
            if normalized[i] == *normalize {
                let pair = &mut pairs[i];
                let pca = pair.interface.as_pca().expect("filtered above");
                pca.set_fit(&mut pair.store, &basis)?;
            }
        }
    }
    Ok(())
}

/// Frames the pairs' CTC heads emit for an utterance of `frames` upstream frames: the fewest
/// over the pairs (None: too short for one of the heads).
fn ctc_head_frames(specs: &[PairSpec], frames: usize) -> Option<usize> {
    specs
        .iter()
        .map(|s| match s.ctc_head {
            CtcHead::Superb | CtcHead::Asr(_) => Some(frames),
            CtcHead::MlSuperb(_) => mlsuperb_frames(frames),
        })
        .try_fold(usize::MAX, |m, f| f.map(|f| m.min(f)))
}

/// Why utterance `i` of `ds` does not suit the CTC heads (None: it does): too short for the
/// ML-SUPERB head's convolutions or, given its `tokens` (training), more tokens than the frames
/// the heads emit (a CTC alignment needs a frame per token; ESPnet would zero such a loss
/// silently).
fn ctc_misfit(
    src: &StackSource,
    ds: &Dataset,
    i: usize,
    tokens: usize,
    specs: &[PairSpec],
) -> Result<Option<String>> {
    let frames = src.frames_of(ds, i)?;
    Ok(match ctc_head_frames(specs, frames) {
        None => Some(format!(
            "{frames} frames, fewer than the {MLSUPERB_MIN_FRAMES} the ML-SUPERB head's convolutions need"
        )),
        Some(out) if tokens > out => Some(format!(
            "{tokens} label tokens, more than the {out} frames the CTC head emits for its audio (CTC needs a frame per token)"
        )),
        Some(_) => None,
    })
}

/// The error naming utterance `i`'s misfit `why`, then `fix`.
fn misfit_error(ds: &Dataset, i: usize, why: &str, fix: &str) -> Error {
    Error::value(
        "utterance",
        format!("'{}' has {why}: {fix}", ds.utterances[i].id),
    )
}

/// Checks before training that every utterance of `ds` suits the CTC heads ([`ctc_misfit`];
/// `labels` for training, None for a dev set, whose transcripts need not align). A misfit fails
/// up front, naming the utterance and then `fix`, or with `OnBad::Skip` is left out and listed in
/// `ds.skipped`.
fn fit_ctc_heads(
    src: &StackSource,
    ds: &mut Dataset,
    labels: Option<&mut Vec<Vec<usize>>>,
    specs: &[PairSpec],
    (on_bad, fix): (OnBad, &str),
) -> Result<()> {
    let mut keep = Vec::with_capacity(ds.utterances.len());
    for i in 0..ds.utterances.len() {
        let tokens = labels.as_ref().map_or(0, |l| l[i].len());
        match ctc_misfit(src, ds, i, tokens, specs)? {
            None => keep.push(true),
            Some(why) if on_bad == OnBad::Skip => {
                ds.skipped.push((ds.utterances[i].id.clone(), why));
                keep.push(false);
            }
            Some(why) => return Err(misfit_error(ds, i, &why, fix)),
        }
    }
    let mut flags = keep.iter();
    ds.utterances
        .retain(|_| *flags.next().expect("one flag each"));
    if let Some(l) = labels {
        let mut flags = keep.iter();
        l.retain(|_| *flags.next().expect("one flag each"));
    }
    Ok(())
}

/// Every pair's parameters in one safetensors file, named `<pair>.<parameter>`.
fn save_pairs(path: &Path, pairs: &[Pair]) -> Result<()> {
    let named: Vec<(String, &crate::Tensor)> = pairs
        .iter()
        .flat_map(|p| {
            p.store
                .iter()
                .map(move |q| (format!("{}.{}", p.name, q.name), &q.value))
        })
        .collect();
    crate::io::save_safetensors_atomic(path, &named)
}

fn load_pairs(path: &Path, pairs: &mut [Pair]) -> Result<()> {
    let bytes = std::fs::read(path).map_err(|e| Error::Io {
        path: path.display().to_string(),
        detail: format!("cannot read the initial parameters: {e}"),
    })?;
    for p in pairs.iter_mut() {
        p.store.load_from_safetensors(
            &bytes,
            &format!("{}.", p.name),
            &path.display().to_string(),
        )?;
    }
    Ok(())
}

/// Held while a run writes to its folder, so that a second `strata train` into the same folder (a
/// job resubmitted while the first still runs) fails at once instead of interleaving checkpoints
/// and log lines. The lock is `OUT/.lock` holding the writer's process id; one left behind by a
/// process that no longer exists (killed) is taken over. Re-entrant within a process: the CLI
/// holds it while it writes run.json and vocab.txt, and [`train`] takes it again.
pub struct RunLock {
    path: PathBuf,
    owned: bool,
}

impl RunLock {
    pub fn acquire(out: &Path) -> Result<RunLock> {
        let path = out.join(".lock");
        let me = std::process::id();
        let io = |detail: String| Error::Io {
            path: path.display().to_string(),
            detail,
        };
        for _ in 0..3 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    write!(f, "{me}").map_err(|e| io(format!("cannot write the run lock: {e}")))?;
                    return Ok(RunLock { path, owned: true });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let holder = std::fs::read_to_string(&path)
                        .ok()
                        .and_then(|t| t.trim().parse::<u32>().ok());
                    match holder {
                        Some(pid) if pid == me => return Ok(RunLock { path, owned: false }),
                        // Linux: a live process has /proc/<pid>; elsewhere every lock is stale.
                        Some(pid) if Path::new(&format!("/proc/{pid}")).exists() => {
                            return Err(Error::Config(format!(
                                "{}: another process (pid {pid}) is training into this folder; wait for it or stop it (if it is not strata, delete {})",
                                out.display(),
                                path.display()
                            )))
                        }
                        _ => {
                            // Left by a process that is gone (or unreadable): take it over.
                            let _ = std::fs::remove_file(&path);
                        }
                    }
                }
                Err(e) => return Err(io(format!("cannot create the run lock: {e}"))),
            }
        }
        Err(io(
            "could not take the run lock (it keeps reappearing)".into()
        ))
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        if self.owned {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Checks that `out` may take this run before anything is written there: a new run (`resume`
/// false) must not land on a folder that already holds one (its log or a pair's checkpoints would
/// be overwritten or mixed with the new run's), and a resumed run needs a checkpoint to continue.
pub fn check_out_dir(out: &Path, resume: bool) -> Result<()> {
    let log = out.join("log.jsonl");
    let has_log = std::fs::metadata(&log).is_ok_and(|m| m.len() > 0);
    let mut checkpointed: Vec<String> = std::fs::read_dir(out)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("latest").is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    checkpointed.sort();
    if !resume && (has_log || !checkpointed.is_empty()) {
        let what = if checkpointed.is_empty() {
            "a training log (log.jsonl)".to_string()
        } else {
            format!("checkpoints of {}", checkpointed.join(", "))
        };
        return Err(Error::Config(format!(
            "{} already holds a training run ({what}): --resume continues it; to start a new run, choose another output folder or delete that one",
            out.display()
        )));
    }
    if resume && checkpointed.is_empty() {
        let fix = if has_log {
            "the run stopped before its first checkpoint: delete the folder to start over (--save-every N checkpoints between evaluations)"
        } else {
            "run without --resume to start"
        };
        return Err(Error::Config(format!(
            "{}: nothing to resume (no <pair>/latest checkpoint there): {fix}",
            out.display()
        )));
    }
    Ok(())
}

/// Trains every pair for `cfg.steps` optimizer steps; returns the last dev evaluation.
/// `train_src` / `dev_src` give the hidden states of the training and dev sets.
pub fn train(
    train_src: &StackSource,
    dev_src: &StackSource,
    mut train: Dataset,
    mut dev: Dataset,
    vocab: &Vocab,
    cfg: &TrainConfig,
) -> Result<Vec<EvalResult>> {
    std::fs::create_dir_all(&cfg.out).map_err(|e| Error::Io {
        path: cfg.out.display().to_string(),
        detail: format!("cannot create: {e}"),
    })?;
    let _lock = RunLock::acquire(&cfg.out)?;
    check_out_dir(&cfg.out, cfg.resume)?;
    if cfg.accum == 0 || cfg.steps == 0 || cfg.batch_samples == 0 {
        return Err(Error::Config(
            "steps, batch size and gradient-accumulation micro-batches must be at least 1".into(),
        ));
    }
    let mut train_labels = vocab.encode_all(&mut train, cfg.on_bad)?;
    if matches!(cfg.task, Task::Units | Task::Characters) {
        let before = (train.skipped.len(), dev.skipped.len());
        let specs = &cfg.interfaces;
        let bad = (cfg.on_bad, "leave it out, or pass --skip-bad");
        fit_ctc_heads(train_src, &mut train, Some(&mut train_labels), specs, bad)?;
        fit_ctc_heads(dev_src, &mut dev, None, specs, bad)?;
        for (ds, was, what) in [(&train, before.0, "training"), (&dev, before.1, "dev")] {
            if cfg.progress && ds.skipped.len() > was {
                eprintln!(
                    "skipped {} {what} utterance(s) the CTC head cannot take, e.g. {}: {}",
                    ds.skipped.len() - was,
                    ds.skipped[was].0,
                    ds.skipped[was].1
                );
            }
        }
    }
    let dev_labels: Vec<Vec<usize>> = dev
        .utterances
        .iter()
        .map(|u| vocab.encode_reference(u))
        .collect();
    if let Some(note) = vocab.unknown_note(&dev, "the dev set") {
        if cfg.progress {
            eprintln!("{note}");
        }
    }
    // The dev loss (CTC tasks) needs every dev reference token in the vocabulary.
    let ctc_task = matches!(cfg.task, Task::Units | Task::Characters);
    let dev_loss =
        ctc_task && (dev_labels.iter().flatten()).all(|&t| (1..vocab.len()).contains(&t));
    if cfg.average_best > 0 && cfg.average_by == AverageBy::Loss && !dev_loss {
        return Err(Error::Config(if ctc_task {
            "--average-by loss needs the dev loss, and the dev set has reference tokens outside the vocabulary (see the note above): use --average-by error, or a vocabulary that covers them (--vocab)".into()
        } else {
            "--average-by loss is for the CTC tasks (units, chars): use --average-by error".into()
        }));
    }
    if train.utterances.is_empty() || dev.utterances.is_empty() {
        return Err(Error::value(
            "dataset",
            "no usable training or dev utterance left",
        ));
    }
    if cfg.crop_samples.is_some() && matches!(train_src, StackSource::Cache(_)) {
        return Err(Error::Config(
            "cropping training utterances needs the upstream run on each batch: a feature cache holds whole utterances' states, which a crop of the audio would change; train with --model and without --features".into(),
        ));
    }
    if cfg.crop_samples.is_some() && matches!(cfg.task, Task::Units | Task::Characters) {
        return Err(Error::Config(
            "cropping training utterances is for utterance-level tasks (classify, sv): a transcript does not match a window of its audio".into(),
        ));
    }
    if cfg.crop_samples == Some(0) {
        return Err(Error::Config(
            "a training crop needs at least one sample".into(),
        ));
    }
    if cfg.task == Task::Speaker && dev.trials.is_empty() {
        return Err(Error::value(
            "dev set",
            "speaker verification is scored on trials: the dev folder needs wav.scp and a trials file (load it with load_verification_dir)",
        ));
    }
    let (layers, dim) = (train_src.num_states(), train_src.hidden_size());
    if (dev_src.num_states(), dev_src.hidden_size()) != (layers, dim) {
        return Err(Error::Config(format!(
            "the dev hidden states are {} x {} but the training ones are {layers} x {dim}: use features of one upstream",
            dev_src.num_states(),
            dev_src.hidden_size()
        )));
    }
    let mut pairs = Vec::new();
    for (i, PairSpec { name, .. }) in cfg.interfaces.iter().enumerate() {
        let bad = name.is_empty() || name.contains(['/', '\\', '.']) || name.trim() != name;
        if bad || cfg.interfaces[..i].iter().any(|p| &p.name == name) {
            return Err(Error::Config(format!(
                "pair name '{name}' is {}: each pair needs its own name (it names its checkpoint folder)",
                if bad { "not a plain folder name" } else { "listed twice" }
            )));
        }
    }
    if cfg.interfaces.is_empty() {
        return Err(Error::Config("no interface to train".into()));
    }
    for spec in &cfg.interfaces {
        let (name, itf) = (&spec.name, &spec.interface);
        if itf.layers != layers || itf.dim != dim {
            return Err(Error::Config(format!(
                "interface '{name}' is for {} x {} states but the upstream gives {layers} x {dim}",
                itf.layers, itf.dim
            )));
        }
        pairs.push(Pair::from_spec(
            spec,
            cfg.head_kind(vocab),
            cfg.optimizer,
            cfg.clip,
            cfg.seed,
        )?);
    }
    // Where to continue: (step, best error rate per pair).
    let mut start = 0u64;
    let mut best = vec![f64::INFINITY; pairs.len()];
    let mut best_step: Vec<Option<u64>> = vec![None; pairs.len()];
    let mut nbest: Vec<Vec<(f64, u64)>> = vec![Vec::new(); pairs.len()];
    // What fixes the data order and the step's meaning: a resumed run must use the same.
    let order = json!({
        "seed": cfg.seed,
        "shuffle": cfg.shuffle,
        "batch_samples": cfg.batch_samples,
        "accum": cfg.accum,
        "train_utterances": train.utterances.len(),
        "crop_samples": cfg.crop_samples,
    });
    if cfg.resume {
        for (i, p) in pairs.iter_mut().enumerate() {
            let dir = cfg.out.join(&p.name).join("latest");
            let extra = checkpoint::load(&dir, &mut p.store, &mut p.optimizer)?;
            p.steps = p.optimizer.step;
            best[i] = extra["best"].as_f64().unwrap_or(f64::INFINITY);
            best_step[i] = extra["best_step"].as_u64();
            // The n-best list goes on as it was kept (checkpoints from before --average-best have
            // none: 0).
            let was = extra["average_best"].as_u64().unwrap_or(0) as usize;
            let by = extra["average_by"].as_str().unwrap_or("error");
            if was != cfg.average_best || (was > 0 && by != cfg.average_by.name()) {
                return Err(Error::Config(format!(
                    "{}: the run being resumed kept its {was} best evaluations by dev {by} (--average-best {was} --average-by {by}), this one asks for {} by {}: resume with --average-best {was} --average-by {by}",
                    dir.display(),
                    cfg.average_best,
                    cfg.average_by.name()
                )));
            }
            for e in extra["nbest"].as_array().into_iter().flatten() {
                if let (Some(rate), Some(step)) = (e[0].as_f64(), e[1].as_u64()) {
                    nbest[i].push((rate, step));
                }
            }
            if let Some(saved) = extra.get("order").and_then(|o| o.as_object()) {
                for (key, was) in saved {
                    if order[key.as_str()] != *was {
                        return Err(Error::Config(format!(
                            "{}: the run being resumed used {key} = {was}, this one {}: resume with the same settings (and data) to continue bit for bit",
                            dir.display(),
                            order[key.as_str()]
                        )));
                    }
                }
            }
        }
        start = pairs[0].steps;
        if pairs.iter().any(|p| p.steps != start) {
            return Err(Error::Config(
                "the pairs' checkpoints are at different steps: resume needs one consistent run"
                    .into(),
            ));
        }
        if start >= cfg.steps {
            return Err(Error::Config(format!(
                "{}: the checkpoints are at step {start} and this run stops at step {} (--steps): nothing to train; raise --steps to continue, or evaluate them with `strata eval`",
                cfg.out.display(),
                cfg.steps
            )));
        }
        truncate_log(&cfg.out, start)?;
    } else {
        if let Some(path) = &cfg.init_from {
            load_pairs(path, &mut pairs)?;
        }
        // Planned on the whole lengths, not the training crops: the fit reads whole utterances.
        let samples: Vec<usize> = train.utterances.iter().map(|u| u.samples).collect();
        let first_epoch =
            length_buckets(&samples, cfg.batch_samples, cfg.shuffle.then_some(cfg.seed));
        fit_pca(&mut pairs, train_src, &train, &first_epoch, cfg.progress)?;
        if let Some(path) = &cfg.save_init {
            save_pairs(path, &pairs)?;
        }
    }
    let (backend, mut on_device) = device_pairs(cfg.device, &pairs)?;
    if let Some(be) = &backend {
        let n = on_device.iter().filter(|d| d.is_some()).count();
        if cfg.progress {
            eprintln!("training {n} of {} pairs on {}", pairs.len(), be.name());
        }
    }
    // Batches are planned on the cropped lengths.
    let samples: Vec<usize> = (train.utterances.iter())
        .map(|u| cfg.crop_samples.map_or(u.samples, |c| u.samples.min(c)))
        .collect();
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
    let terminal = std::io::stderr().is_terminal();
    let report_every = if terminal { 1 } else { (cfg.steps / 20).max(1) };
    for step in start..cfg.steps {
        let lr = cfg.schedule.lr_at(step);
        let mut sums = vec![0f64; pairs.len()];
        let mut frames = 0usize;
        for micro in 0..cfg.accum as u64 {
            // The data order is a function of (seed, micro-batch number) only, so a resumed run
            // sees the same batches.
            let n = step * cfg.accum as u64 + micro;
            let (epoch, pos) = (n / per_epoch, (n % per_epoch) as usize);
            if cached.as_ref().map(|c| c.0) != Some(epoch) {
                cached = Some((epoch, epoch_batches(epoch)));
            }
            let b = &cached.as_ref().expect("just filled").1[pos];
            let (stack, batch) = match cfg.crop_samples {
                None => train_src.stack(&train, b)?,
                Some(crop) => {
                    let windows: Vec<(usize, usize)> = (b.iter())
                        .map(|&i| crop_window(cfg.seed, n, i, train.utterances[i].samples, crop))
                        .collect();
                    train_src.stack_cropped(&train, b, &windows)?
                }
            };
            let targets: Vec<Vec<usize>> = b.iter().map(|&i| train_labels[i].clone()).collect();
            frames += batch.total_frames();
            let scale = 1.0 / cfg.accum as f32;
            let x = device_stack(backend.as_ref(), &on_device, &stack)?;
            for ((p, d), sum) in pairs.iter_mut().zip(&mut on_device).zip(&mut sums) {
                *sum += match (d, &backend, &x) {
                    (Some(d), Some(be), Some(x)) => {
                        d.accumulate_on(be, x, &batch, &targets, scale)?
                    }
                    _ => p.accumulate(&stack, &batch, &targets, scale)?,
                } as f64;
            }
        }
        frames_done += frames;
        let mut losses = Vec::new();
        for ((p, d), sum) in pairs.iter_mut().zip(&mut on_device).zip(&sums) {
            match (d, &backend) {
                (Some(d), Some(be)) => d.apply(be, lr)?,
                _ => p.apply(lr)?,
            }
            let loss = (sum / cfg.accum as f64) as f32;
            log_line(
                &cfg.out,
                json!({"step": step + 1, "pair": p.name, "loss": loss, "lr": lr, "frames": frames}),
            )?;
            losses.push((p.name.clone(), loss));
        }
        let done = step + 1;
        if cfg.progress && (done % report_every == 0 || done == cfg.steps) {
            let elapsed = t0.elapsed().as_secs_f64().max(1e-9);
            let fps = frames_done as f64 / elapsed;
            let eta = elapsed / (done - start) as f64 * (cfg.steps - done) as f64;
            let line = progress_line(done, cfg.steps, &losses, fps, eta);
            if terminal {
                eprint!("\r{line}  ");
            } else {
                eprintln!("{line}");
            }
        }
        let every = |n: u64| n > 0 && done % n == 0;
        let eval_now = every(cfg.eval_every) || done == cfg.steps;
        if !eval_now && !every(cfg.save_every) {
            continue;
        }
        // Checkpoints are written from the CPU pairs: bring the device's state back first.
        if let Some(be) = &backend {
            for (p, d) in pairs.iter_mut().zip(&on_device) {
                if let Some(d) = d {
                    d.write_to(be, p)?;
                }
            }
        }
        // A diverged pair (a finite loss, then an overflowing update) must not overwrite its
        // last good checkpoint with NaN / Inf parameters.
        for p in &pairs {
            if let Some(q) = p
                .store
                .iter()
                .find(|q| q.value.data().iter().any(|x| !x.is_finite()))
            {
                return Err(Error::value(
                    "parameters",
                    format!(
                        "'{}' has non-finite values in {} after step {done} (the model diverged): lower the learning rate or clip gradients; its checkpoints keep their last good state",
                        p.name, q.name
                    ),
                ));
            }
        }
        if !eval_now {
            for (i, p) in pairs.iter().enumerate() {
                checkpoint::save(
                    &cfg.out.join(&p.name).join("latest"),
                    &p.store,
                    &p.optimizer,
                    &resume_state(
                        best[i],
                        best_step[i],
                        (&nbest[i], (cfg.average_best, cfg.average_by)),
                        &order,
                    ),
                )?;
            }
            continue;
        }
        let scores = evaluate(
            dev_src,
            &pairs,
            &on_device,
            backend.as_ref(),
            &dev,
            &dev_labels,
            cfg.batch_samples,
            dev_loss,
        )?;
        last.clear();
        for (i, (p, &(rate, loss))) in pairs.iter().zip(&scores).enumerate() {
            let (best, best_step) = (&mut best[i], &mut best_step[i]);
            let mut entry = json!({"step": done, "pair": p.name, "dev_error_rate": rate});
            if let Some(l) = loss {
                entry["dev_loss"] = json!(l);
            }
            if cfg.task == Task::Classification {
                entry["dev_accuracy"] = json!(1.0 - rate);
            }
            if cfg.task == Task::Speaker {
                entry["dev_eer"] = json!(rate);
            }
            let layer_weights = p.interface.layer_weights(&p.store);
            if let Some(sums) = &layer_weights {
                // One list per weighted sum, indexed from its first layer.
                entry["layer_weights"] = json!(sums
                    .iter()
                    .map(|(first, w)| json!({"first_layer": first, "weights": w}))
                    .collect::<Vec<_>>());
            }
            log_line(&cfg.out, entry)?;
            let dir = cfg.out.join(&p.name);
            if rate < *best {
                *best = rate;
                *best_step = Some(done);
                checkpoint::save(
                    &dir.join("best"),
                    &p.store,
                    &p.optimizer,
                    &json!({"best": rate, "best_step": done, "order": order}),
                )?;
            }
            // A snapshot enters the n best before `latest` lists it, and one pushed out is removed
            // after: a crash in between leaves a spare folder, never a listed one missing.
            let criterion = match (cfg.average_by, loss) {
                (AverageBy::Loss, Some(l)) => l,
                _ => rate,
            };
            let (entered, out) = enter_nbest(&mut nbest[i], cfg.average_best, criterion, done);
            if entered {
                checkpoint::save(
                    &nbest_dir(&dir, done),
                    &p.store,
                    &p.optimizer,
                    &json!({"dev_error_rate": rate, "dev_loss": loss, "step": done}),
                )?;
            }
            checkpoint::save(
                &dir.join("latest"),
                &p.store,
                &p.optimizer,
                &resume_state(
                    *best,
                    *best_step,
                    (&nbest[i], (cfg.average_best, cfg.average_by)),
                    &order,
                ),
            )?;
            if let Some(step) = out {
                remove_snapshot(&nbest_dir(&dir, step))?;
            }
            last.push(EvalResult {
                name: p.name.clone(),
                step: done,
                error_rate: rate,
                best_error_rate: *best,
                best_step: *best_step,
                interface_params: p.interface_params(),
                params: p.store.num_scalars(),
                layer_weights,
                averaged: None,
            });
        }
        crate::train::plot::write_curves(&cfg.out)?;
    }
    if cfg.progress && terminal {
        eprintln!();
    }
    if cfg.average_best > 0 && !last.is_empty() {
        let device = (&backend, on_device.as_slice());
        average_and_score(
            cfg,
            &mut pairs,
            &nbest,
            &mut last,
            device,
            dev_src,
            &dev,
            &dev_labels,
        )?;
    }
    Ok(last)
}

fn remove_snapshot(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::Io {
            path: dir.display().to_string(),
            detail: format!("cannot remove the n-best snapshot: {e}"),
        }),
        _ => Ok(()),
    }
}

/// After the last step: each pair's n-best snapshots averaged into `OUT/<pair>/averaged`, scored
/// on dev (on the device when the pair trained there: `trained_on`), logged and added to its
/// result.
#[allow(clippy::too_many_arguments)]
fn average_and_score(
    cfg: &TrainConfig,
    pairs: &mut [Pair],
    nbest: &[Vec<(f64, u64)>],
    last: &mut [EvalResult],
    (backend, trained_on): (&Option<Backend>, &[Option<DevicePair>]),
    dev_src: &StackSource,
    dev: &Dataset,
    dev_labels: &[Vec<usize>],
) -> Result<()> {
    let (mut steps, mut trained) = (Vec::new(), Vec::new());
    for (p, list) in pairs.iter_mut().zip(nbest) {
        let dir = cfg.out.join(&p.name);
        let kept: Vec<u64> = list.iter().map(|&(_, s)| s).collect();
        let snapshots: Vec<PathBuf> = kept.iter().map(|&s| nbest_dir(&dir, s)).collect();
        let avg = averaged_store(p, &snapshots)?;
        checkpoint::save(
            &dir.join("averaged"),
            &avg,
            &p.optimizer,
            &json!({"averaged_steps": kept}),
        )?;
        // Scored in place of the trained parameters, which come back right after.
        trained.push(std::mem::replace(&mut p.store, avg));
        steps.push(kept);
    }
    let on_device: Vec<Option<DevicePair>> = (pairs.iter().zip(trained_on))
        .map(|(p, on)| match (backend, on) {
            (Some(be), Some(_)) => DevicePair::from_pair(be, p).map(Some),
            _ => Ok(None),
        })
        .collect::<Result<_>>()?;
    let scores = evaluate(
        dev_src,
        pairs,
        &on_device,
        backend.as_ref(),
        dev,
        dev_labels,
        cfg.batch_samples,
        false,
    );
    for (p, store) in pairs.iter_mut().zip(trained) {
        p.store = store;
    }
    for ((r, (rate, _)), kept) in last.iter_mut().zip(scores?).zip(steps) {
        log_line(
            &cfg.out,
            json!({"step": r.step, "pair": r.name, "averaged_dev_error_rate": rate, "averaged_steps": kept}),
        )?;
        r.averaged = Some((rate, kept));
    }
    Ok(())
}

/// One utterance's result from [`evaluate_checkpoint`].
#[derive(Clone, Debug, PartialEq)]
pub struct Hypothesis {
    pub id: String,
    pub hyp: Vec<String>,
    pub reference: Vec<String>,
}

/// Decodes `data` with the pair saved in `checkpoint_dir` (an `OUT/<pair>/{best,latest}` folder)
/// for `pair`, on `device` (the device step's decoding reproduces the dev rates a device
/// run logged); returns the error rate (PER / CER, or 1 - accuracy) and every hypothesis.
/// Reference tokens outside the vocabulary count as errors ([`Vocab::encode_reference`]).
#[allow(clippy::too_many_arguments)]
pub fn evaluate_checkpoint(
    source: &StackSource,
    checkpoint_dir: &Path,
    pair: &PairSpec,
    task: Task,
    vocab: &Vocab,
    data: Dataset,
    batch_samples: usize,
    device: TrainDevice,
) -> Result<(f64, Vec<Hypothesis>)> {
    let mut all = evaluate_checkpoints(
        source,
        &[(checkpoint_dir.to_path_buf(), pair.clone())],
        task,
        vocab,
        &data,
        batch_samples,
        device,
    )?;
    Ok(all.remove(0))
}

/// [`evaluate_checkpoint`] for several pairs (checkpoint folder, interface) at once: each batch's
/// hidden states are read or computed once and decoded by every pair, as in training. Results
/// in the order of `pairs`.
pub fn evaluate_checkpoints(
    source: &StackSource,
    pairs: &[(PathBuf, PairSpec)],
    task: Task,
    vocab: &Vocab,
    data: &Dataset,
    batch_samples: usize,
    device: TrainDevice,
) -> Result<Vec<(f64, Vec<Hypothesis>)>> {
    if matches!(task, Task::Units | Task::Characters) {
        // An utterance too short for a head fails here by name, not mid-way by batch index.
        let specs: Vec<PairSpec> = pairs.iter().map(|(_, s)| s.clone()).collect();
        let fix = "leave it out of the evaluated set (no hypothesis can be made for it)";
        for i in 0..data.utterances.len() {
            if let Some(why) = ctc_misfit(source, data, i, 0, &specs)? {
                return Err(misfit_error(data, i, &why, fix));
            }
        }
    }
    let labels: Vec<Vec<usize>> = data
        .utterances
        .iter()
        .map(|u| vocab.encode_reference(u))
        .collect();
    let mut loaded = Vec::with_capacity(pairs.len());
    for (dir, spec) in pairs {
        let mut pair = Pair::from_spec(
            spec,
            head_kind(task, vocab),
            AdamConfig::adamw(1e-3),
            None,
            0,
        )?;
        checkpoint::load(dir, &mut pair.store, &mut pair.optimizer)?;
        loaded.push(pair);
    }
    let (backend, on_device) = device_pairs(device, &loaded)?;
    let mut rates = vec![ErrorRate::default(); loaded.len()];
    let mut outs: Vec<Vec<Hypothesis>> = vec![Vec::new(); loaded.len()];
    let mut embeddings = vec![vec![Vec::new(); data.utterances.len()]; loaded.len()];
    decode_all(
        source,
        &loaded,
        &on_device,
        backend.as_ref(),
        data,
        batch_samples,
        None,
        |k, i, out| match out {
            Decoded::Tokens(hyp, _) => {
                rates[k].add(hyp, &labels[i]);
                let u = &data.utterances[i];
                outs[k].push(Hypothesis {
                    id: u.id.clone(),
                    hyp: hyp.iter().map(|&t| vocab.tokens[t].clone()).collect(),
                    reference: u.label.clone(),
                });
            }
            Decoded::Embedding(e) => embeddings[k][i] = e.to_vec(),
        },
    )?;
    let mut results = Vec::with_capacity(loaded.len());
    for (((p, rate), mut out), emb) in loaded.iter().zip(&rates).zip(outs).zip(&embeddings) {
        if let HeadKind::Speaker { .. } = p.head_kind() {
            // One line per trial, in the trials file's order: "idA idB", score, target or not.
            let (eer, scores) = verification_scores(data, emb)?;
            let lines = (data.trials.iter().zip(scores))
                .map(|(t, score)| Hypothesis {
                    id: format!("{} {}", data.utterances[t.a].id, data.utterances[t.b].id),
                    hyp: vec![format!("{score:.6}")],
                    reference: vec![if t.target { "target" } else { "nontarget" }.into()],
                })
                .collect();
            results.push((eer, lines));
        } else {
            out.sort_by(|a, b| a.id.cmp(&b.id));
            results.push((rate.rate(), out));
        }
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_n_best_list_keeps_the_lowest_rates_and_the_earlier_step_on_ties() {
        use super::enter_nbest;
        let mut l = Vec::new();
        assert_eq!(enter_nbest(&mut l, 2, 0.5, 1), (true, None));
        assert_eq!(enter_nbest(&mut l, 2, 0.5, 2), (true, None));
        // Full: a tie with the worst does not enter; a lower rate pushes the worst out.
        assert_eq!(enter_nbest(&mut l, 2, 0.5, 3), (false, None));
        assert_eq!(enter_nbest(&mut l, 2, 0.4, 4), (true, Some(2)));
        assert_eq!(l, vec![(0.4, 4), (0.5, 1)]);
        assert_eq!(enter_nbest(&mut l, 0, 0.1, 5), (false, None));
        assert_eq!(enter_nbest(&mut l, 3, 0.45, 6), (true, None));
        assert_eq!(l, vec![(0.4, 4), (0.45, 6), (0.5, 1)]);
    }

    #[test]
    fn progress_line_shows_bar_losses_speed_and_eta() {
        let l = super::progress_line(
            5,
            20,
            &[("ws".into(), 1.5), ("hconv".into(), 1.25)],
            1234.4,
            75.0,
        );
        assert_eq!(
            l,
            "step 5/20 [#####---------------] loss ws 1.500, hconv 1.250 | 1234 frames/s | ETA 1m15s"
        );
    }
}
