//! `strata demo`: the built-in default. A deterministic speech-like corpus made in memory, a tiny
//! random-init upstream run over it once, WS and HConv trained side by side with PR heads.

use std::time::Instant;
use strata::models::interface::InterfaceConfig;
use strata::models::upstream::{Upstream, UpstreamConfig};
use strata::optim::AdamConfig;
use strata::train::data::length_buckets;
use strata::train::metrics::ErrorRate;
use strata::train::side_by_side::{HeadKind, Pair};
use strata::train::synthetic_speech;
use strata::PackedBatch;

pub fn parse_demo(args: &[String]) -> Result<(u64, u64, f64), String> {
    let (mut steps, mut seed, mut lr) = (1000u64, 0u64, 2e-3f64);
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
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
    Ok((steps, seed, lr))
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

pub fn demo(steps: u64, seed: u64, lr: f64) -> strata::Result<()> {
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
    let mut seconds = vec![0f64; pairs.len()];
    let mut frames = 0usize;
    let mut last = vec![0f32; pairs.len()];
    for step in 0..steps {
        // One stack per batch feeds every pair: the sweep costs one upstream pass.
        let (stack, batch, targets) = &train_batches[step as usize % train_batches.len()];
        frames += batch.total_frames();
        for (i, pair) in pairs.iter_mut().enumerate() {
            let t0 = Instant::now();
            last[i] = pair.train_step(stack, batch, targets)?;
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
        for (stack, batch, targets) in &dev_batches {
            for (hyp, reference) in pair.decode(stack, batch)?.iter().zip(targets) {
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
