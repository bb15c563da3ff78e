//! The strata command line.
//!
//!   strata demo [--steps N] [--seed S]    built-in default: no downloads, CPU

use std::process::ExitCode;
use std::time::Instant;
use strata::models::interface::InterfaceConfig;
use strata::optim::AdamConfig;
use strata::train::metrics::ErrorRate;
use strata::train::side_by_side::PrPair;
use strata::train::synthetic::{self, SyntheticCorpus};
use strata::PackedBatch;

const USAGE: &str = "usage: strata demo [--steps N] [--seed S]

  demo   trains the weighted-sum (WS) and hierarchical-convolution (HConv) interfaces side by side,
         each with a SUPERB phone-recognition head (CTC), on a built-in synthetic hidden-state corpus
         (13 layers x 64 dims), and prints dev PER, training speed and parameter counts.
         No downloads, CPU only.";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("demo") => parse_demo(&args[1..])
            .and_then(|(steps, seed)| demo(steps, seed).map_err(|e| e.to_string())),
        Some("--version") | Some("-V") => {
            println!(
                "strata {} ({})",
                env!("CARGO_PKG_VERSION"),
                strata::GIT_COMMIT
            );
            Ok(())
        }
        Some("--help") | Some("-h") | Some("help") => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(format!("unknown command '{other}'\n\n{USAGE}")),
        None => Err(USAGE.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn parse_demo(args: &[String]) -> Result<(u64, u64), String> {
    let (mut steps, mut seed) = (400u64, 0u64);
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let parsed: u64 = value
            .parse()
            .map_err(|_| format!("{flag} takes a non-negative integer, got '{value}'"))?;
        match flag.as_str() {
            "--steps" => steps = parsed,
            "--seed" => seed = parsed,
            _ => return Err(format!("unknown option '{flag}' for demo\n\n{USAGE}")),
        }
    }
    Ok((steps, seed))
}

fn batches(
    corpus: &SyntheticCorpus,
    size: usize,
) -> Vec<(strata::Tensor, PackedBatch, Vec<Vec<usize>>)> {
    corpus
        .utterances
        .chunks(size)
        .map(|chunk| {
            let refs: Vec<_> = chunk.iter().collect();
            let (stack, lengths) = synthetic::pack(&refs);
            let batch =
                PackedBatch::from_lengths(&lengths).expect("synthetic utterances have frames");
            (
                stack,
                batch,
                chunk.iter().map(|u| u.phones.clone()).collect(),
            )
        })
        .collect()
}

fn demo(steps: u64, seed: u64) -> strata::Result<()> {
    let (layers, dim, phones) = (13, 64, 20);
    println!("strata demo ({}): synthetic stack corpus, L = {layers}, D = {dim}, {phones} phones + blank", strata::GIT_COMMIT);
    let world = synthetic::SyntheticWorld::new(seed, layers, dim, phones);
    let train = world.corpus(seed + 1, 320);
    let dev = world.corpus(seed + 2, 80);
    let train_batches = batches(&train, 16);
    let dev_batches = batches(&dev, 16);
    let opt = AdamConfig::adamw(2e-3);
    let mut pairs = [
        PrPair::new(
            "WS",
            &InterfaceConfig::weighted_sum(layers, dim),
            phones + 1,
            opt,
            Some(1.0),
            seed,
        )?,
        PrPair::new(
            "HConv",
            &InterfaceConfig::hconv(layers, dim),
            phones + 1,
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
    Ok(())
}
