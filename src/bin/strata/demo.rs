//! `strata demo`: the built-in default. A deterministic speech-like corpus made in memory, a tiny
//! random-init upstream run over it once, WS and HConv trained side by side with PR heads: on the
//! CPU, or on the GPU with `--device cuda` (the device step, bf16; `auto` picks the GPU once the
//! device step is verified on one).

use std::time::Instant;
use strata::models::interface::InterfaceConfig;
use strata::models::upstream::{Upstream, UpstreamConfig};
use strata::optim::AdamConfig;
use strata::runtime::Backend;
use strata::train::data::length_buckets;
use strata::train::device_step::{upload_stack, DevicePair};
use strata::train::metrics::ErrorRate;
use strata::train::side_by_side::{HeadKind, Pair};
use strata::train::synthetic_speech;
use strata::PackedBatch;

pub struct DemoArgs {
    pub steps: u64,
    pub seed: u64,
    pub lr: f64,
    /// auto | cpu | cuda | emulator, as `train --device`.
    pub device: String,
}

pub fn parse_demo(args: &[String]) -> Result<DemoArgs, String> {
    let (mut steps, mut seed, mut lr) = (1000u64, 0u64, 2e-3f64);
    let mut device = "auto".to_string();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        if flag == "--device" {
            if !["auto", "cpu", "cuda", "emulator"].contains(&value.as_str()) {
                return Err(format!(
                    "unknown --device '{value}': use auto, cpu, cuda or emulator"
                ));
            }
            device = value.clone();
            continue;
        }
        if flag == "--lr" {
            lr = value
                .parse()
                .ok()
                .filter(|x: &f64| *x > 0.0)
                .ok_or_else(|| format!("--lr takes a positive number, got '{value}'"))?;
            continue;
        }
        let parsed: u64 = value
            .parse()
            .map_err(|_| format!("{flag} takes a non-negative integer, got '{value}'"))?;
        match flag.as_str() {
            "--steps" => steps = parsed,
            "--seed" => seed = parsed,
            _ => {
                return Err(format!(
                    "unknown option '{flag}' for demo\n\n{}",
                    super::USAGE
                ))
            }
        }
    }
    Ok(DemoArgs {
        steps,
        seed,
        lr,
        device,
    })
}

/// A hidden-state stack, its utterance layout and the unit targets.
type DemoBatch = (strata::Tensor, PackedBatch, Vec<Vec<usize>>);

/// Runs the frozen upstream once over a corpus, in length buckets of about `seconds` of audio: the
/// stacks are reused every epoch (the demo's in-memory feature cache).
fn upstream_batches(
    upstream: &Upstream,
    utts: &[synthetic_speech::SpeechUtterance],
    vocab: &[&str],
    seconds: f64,
    seed: u64,
) -> strata::Result<Vec<DemoBatch>> {
    let samples: Vec<usize> = utts.iter().map(|u| u.wave.len()).collect();
    let buckets = length_buckets(&samples, (seconds * 16000.0) as usize, Some(seed));
    buckets
        .iter()
        .map(|b| {
            let waves: Vec<&[f32]> = b.iter().map(|&i| utts[i].wave.as_slice()).collect();
            let names: Vec<&str> = b.iter().map(|&i| utts[i].id.as_str()).collect();
            let (stack, batch) = upstream.forward(&waves, &names)?;
            let targets = b
                .iter()
                .map(|&i| {
                    utts[i]
                        .units
                        .iter()
                        .map(|t| 1 + vocab.iter().position(|v| v == t).expect("a known unit"))
                        .collect()
                })
                .collect();
            Ok((stack, batch, targets))
        })
        .collect()
}

pub fn demo(args: &DemoArgs) -> strata::Result<()> {
    let (steps, seed, lr) = (args.steps, args.seed, args.lr);
    let backend = match args.device.as_str() {
        "cpu" => None,
        "emulator" => Some(Backend::Emulator),
        "cuda" => Some(Backend::cuda().map_err(|why| {
            strata::Error::Device(format!("--device cuda: no usable GPU ({why})"))
        })?),
        _ => strata::train::device_step::auto_backend(),
    };
    let config = UpstreamConfig::tiny();
    let upstream = Upstream::random(config.clone(), seed)?;
    let (layers, dim) = (upstream.num_states(), upstream.hidden_size());
    let units = synthetic_speech::unit_names();
    println!(
        "strata demo ({}): a tiny random-init HuBERT-shaped upstream ({} layers, {dim} dims, {} states)",
        strata::GIT_COMMIT,
        config.num_layers,
        layers
    );
    let t0 = Instant::now();
    let train = synthetic_speech::corpus(seed + 1, 320, "train");
    let dev = synthetic_speech::corpus(seed + 2, 80, "dev");
    let audio: f64 = train
        .iter()
        .chain(&dev)
        .map(|u| u.wave.len())
        .sum::<usize>() as f64
        / 16000.0;
    println!(
        "synthetic speech-like corpus: {} train / {} dev utterances of {} phone-like units, {audio:.0} s of audio",
        train.len(),
        dev.len(),
        units.len()
    );
    let train_batches = upstream_batches(&upstream, &train, &units, 8.0, seed)?;
    let dev_batches = upstream_batches(&upstream, &dev, &units, 8.0, seed)?;
    println!(
        "upstream pass over all audio, once (it is frozen): {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let opt = AdamConfig::adamw(lr);
    let vocab = units.len() + 1;
    let mut pairs = [
        Pair::new(
            "WS",
            &InterfaceConfig::weighted_sum(layers, dim),
            HeadKind::Ctc { vocab },
            opt,
            Some(1.0),
            seed,
        )?,
        Pair::new(
            "HConv",
            &InterfaceConfig::hconv(layers, dim),
            HeadKind::Ctc { vocab },
            opt,
            Some(1.0),
            seed,
        )?,
    ];
    // On a device, each pair trains as its device copy, and the (frozen) stacks go up once.
    let on_device = match &backend {
        Some(be) => {
            println!("training on {} (bf16 device step)", be.name());
            let pairs: Vec<DevicePair> = pairs
                .iter()
                .map(|p| DevicePair::from_pair(be, p))
                .collect::<strata::Result<_>>()?;
            let up = |bs: &[DemoBatch]| -> strata::Result<Vec<_>> {
                bs.iter().map(|(s, _, _)| upload_stack(be, s)).collect()
            };
            Some((be, pairs, up(&train_batches)?, up(&dev_batches)?))
        }
        None => {
            println!("training on the CPU (f32 reference engine)");
            None
        }
    };
    let mut on_device = on_device;
    let mut seconds = vec![0f64; pairs.len()];
    let mut frames = 0usize;
    let mut last = vec![0f32; pairs.len()];
    for step in 0..steps {
        // One stack per batch feeds every pair: the sweep costs one upstream pass.
        let b = step as usize % train_batches.len();
        let (stack, batch, targets) = &train_batches[b];
        frames += batch.total_frames();
        for (i, pair) in pairs.iter_mut().enumerate() {
            let t0 = Instant::now();
            last[i] = match &mut on_device {
                Some((be, dp, xs, _)) => dp[i].train_step_on(be, &xs[b], batch, targets)?,
                None => pair.train_step(stack, batch, targets)?,
            };
            seconds[i] += t0.elapsed().as_secs_f64();
        }
        if (step + 1) % 100 == 0 || step + 1 == steps {
            let losses: Vec<String> = pairs
                .iter()
                .zip(&last)
                .map(|(p, l)| format!("{} {l:.3}", p.name))
                .collect();
            println!("step {:5}  ctc loss: {}", step + 1, losses.join(", "));
        }
    }
    println!();
    println!(
        "{:<8} {:>16} {:>10} {:>16}",
        "interface", "interface params", "dev PER", "train frames/s"
    );
    for (i, pair) in pairs.iter().enumerate() {
        let mut per = ErrorRate::default();
        for (b, (stack, batch, targets)) in dev_batches.iter().enumerate() {
            let hyps = match &on_device {
                Some((be, dp, _, xs)) => dp[i].decode_on(be, &xs[b], batch)?,
                None => pair.decode(stack, batch)?,
            };
            for (hyp, reference) in hyps.iter().zip(targets) {
                per.add(hyp, reference);
            }
        }
        let fps = if seconds[i] > 0.0 {
            frames as f64 / seconds[i]
        } else {
            0.0
        };
        println!(
            "{:<8} {:>16} {:>9.2}% {:>16.0}",
            pair.name,
            pair.interface_params(),
            100.0 * per.rate(),
            fps
        );
    }
    println!(
        "\nThese PERs describe synthetic audio through an UNTRAINED upstream: random features carry little\n\
         phone information (SUPERB's FBANK baseline scores 82% PER on real speech), so expect high\n\
         numbers. The demo shows the whole pipeline (audio -> upstream -> every hidden state -> WS and\n\
         HConv side by side -> PR heads -> CTC -> AdamW) running; use `strata train` with a real\n\
         checkpoint for real results."
    );
    Ok(())
}
