//! Where a device training step's kernels run in few threads, found without a GPU: one step of
//! each benchmark row of `gpu_bench step` (an interface + head pair on a bf16 stack, CTC, backward,
//! clip, AdamW) in the kernel emulator, with each launch timed (strata::runtime::emulated_profile_of).
//! Per kernel: launches, blocks, the CPU time of all its threads' code, and its critical path (a
//! block's chain of work, warps side by side between barriers: the longest block's, and the median
//! block's, which a preempted run does not move), and the barrier phases a block goes through (a
//! count: each phase is at least a barrier's latency on a GPU, and a memory round trip when it
//! loads what the one before stored; the emulator's time per thread grows with a block's size,
//! the phases do not). A critical path that is a
//! large part of a kernel's work means that work runs in a handful of threads: no GPU runs a chain
//! of dependent steps faster than a CPU core does, so the critical path is a rough floor on that
//! kernel's GPU time. CPU times, not GPU times: the emulated tensor-core instructions, computed in
//! software by one lane, inflate their kernels' paths.
//!
//!   cargo run --release --example emu_profile [UTTERANCES] [FRAMES] [ROW...]
//!
//! Each figure is the smaller of two steps' (wall-clock timing counts a preempted fiber's pause).
//! Defaults: 4 utterances of 500 frames (the benchmark's 32 x 500 takes minutes per row here; the
//! critical paths along the frame axis are those of the benchmark's), every row. Rows: ws, hconv,
//! cls, mlsuperb, asr.

use half::bf16;
use strata::models::asr_head::AsrHeadConfig;
use strata::models::interface::{ClsActivation, InterfaceConfig, InterfaceKind};
use strata::models::mlsuperb_head::MlSuperbHeadConfig;
use strata::optim::AdamConfig;
use strata::runtime::{emulated_profile_of, Backend};
use strata::train::device_step::DevicePair;
use strata::train::side_by_side::{CtcHead, HeadKind, Pair, PairSpec};

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("emu_profile: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> strata::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let number = |i: usize, default: usize| -> strata::Result<usize> {
        match args.get(i) {
            Some(a) => a.parse().map_err(|_| {
                strata::Error::Config(format!(
                    "'{a}' is not a count: emu_profile [UTTERANCES] [FRAMES] [ROW...]"
                ))
            }),
            None => Ok(default),
        }
    };
    let (utts, t) = (number(0, 4)?, number(1, 500)?);
    let rows: Vec<&str> = match args.get(2..) {
        Some(r) if !r.is_empty() => r.iter().map(String::as_str).collect(),
        _ => vec!["ws", "hconv", "cls", "mlsuperb", "asr"],
    };
    let (l, d, vocab, labels) = (13usize, 768usize, 71usize, 120usize);
    let batch = strata::PackedBatch::from_lengths(&vec![t; utts])?;
    let targets: Vec<Vec<usize>> = (0..utts)
        .map(|i| {
            (0..labels.min(t / 4))
                .map(|j| 1 + (i * 7 + j * 13) % (vocab - 1))
                .collect()
        })
        .collect();
    let be = Backend::Emulator;
    let kind = HeadKind::Ctc { vocab };
    let adam = AdamConfig::adamw(1e-3);
    for row in rows {
        let pair = match row {
            "ws" => Pair::new(
                row,
                &InterfaceConfig::weighted_sum(l, d),
                kind,
                adam,
                Some(1.0),
                0,
            )?,
            "hconv" => Pair::new(row, &InterfaceConfig::hconv(l, d), kind, adam, Some(1.0), 0)?,
            "cls" => {
                let cls = InterfaceKind::ClsPool {
                    heads: 8,
                    ffn_dim: 4 * d,
                    activation: ClsActivation::Gelu,
                };
                Pair::new(
                    row,
                    &InterfaceConfig::new(l, d, cls),
                    kind,
                    adam,
                    Some(1.0),
                    0,
                )?
            }
            "mlsuperb" | "asr" => {
                let mut spec = PairSpec::new(row, InterfaceConfig::weighted_sum(l, d));
                spec.ctc_head = if row == "asr" {
                    CtcHead::Asr(AsrHeadConfig {
                        dropout: 0.0,
                        ..AsrHeadConfig::default()
                    })
                } else {
                    CtcHead::MlSuperb(MlSuperbHeadConfig {
                        dropout: 0.0,
                        attention_dropout: 0.0,
                        specaug: None,
                        ..MlSuperbHeadConfig::default()
                    })
                };
                Pair::from_spec(&spec, kind, adam, Some(1.0), 0)?
            }
            other => {
                return Err(strata::Error::Config(format!(
                    "unknown row '{other}': use ws, hconv, cls, mlsuperb or asr"
                )))
            }
        };
        let mut dev = DevicePair::from_pair(&be, &pair)?;
        let n = batch.total_frames();
        let x: Vec<bf16> = (0..n * l * d)
            .map(|i| bf16::from_f32(((i % 17) as f32 - 8.0) * 0.1))
            .collect();
        let x0 = be.upload(&x)?;
        // Two steps, each kernel's smaller figures: a fiber run that the OS preempted counts the
        // pause (the emulator times wall clock), rarely in both.
        let started = std::time::Instant::now();
        let mut kernels: Vec<strata::runtime::EmulatedKernel> = Vec::new();
        for _ in 0..2 {
            let (loss, step) =
                emulated_profile_of(|| dev.train_step_on(&be, &x0, &batch, &targets));
            loss?;
            if kernels.is_empty() {
                kernels = step;
                continue;
            }
            for (k, again) in kernels.iter_mut().zip(step) {
                k.work_ms = k.work_ms.min(again.work_ms);
                k.critical_ms = k.critical_ms.min(again.critical_ms);
                k.median_critical_ms = k.median_critical_ms.min(again.median_critical_ms);
            }
        }
        let wall = started.elapsed().as_secs_f64() * 1e3 / 2.0;
        kernels.sort_by(|a, b| b.median_critical_ms.total_cmp(&a.median_critical_ms));
        let (work, critical, median): (f64, f64, f64) =
            kernels.iter().fold((0.0, 0.0, 0.0), |(w, c, m), k| {
                (w + k.work_ms, c + k.critical_ms, m + k.median_critical_ms)
            });
        println!(
            "{row}: {utts} x {t} frames, {} launches; emulated {wall:.0} ms a step, kernel work \
             {work:.1} ms, critical paths {critical:.2} ms (longest blocks), {median:.2} ms \
             (median blocks)",
            kernels.iter().map(|k| k.launches).sum::<usize>()
        );
        println!(
            "  {:<34} {:>8} {:>8} {:>10} {:>12} {:>12} {:>10} {:>8}",
            "kernel",
            "launches",
            "blocks",
            "work ms",
            "longest ms",
            "median ms",
            "med/work",
            "phases"
        );
        for k in &kernels {
            println!(
                "  {:<34} {:>8} {:>8} {:>10.2} {:>12.3} {:>12.3} {:>10.4} {:>8}",
                k.kernel,
                k.launches,
                k.blocks,
                k.work_ms,
                k.critical_ms,
                k.median_critical_ms,
                k.median_critical_ms / k.work_ms.max(1e-12),
                k.phases
            );
        }
    }
    Ok(())
}
