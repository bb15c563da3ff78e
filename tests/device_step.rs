//! A whole HConv + PR head + CTC + clip + AdamW training step on the device path (here the kernel
//! emulator; the GPU with STRATA_TEST_CUDA=1) against the CPU path, from the same initial
//! parameters, for 20 steps on the synthetic stack corpus: the device computes in bf16 with fp32
//! accumulation, so its losses follow the CPU's fp32 losses within a bf16-sized margin (1%; seen:
//! 8e-6 at the first step, at most 2.2e-3 over the 20).

use strata::models::interface::InterfaceConfig;
use strata::optim::AdamConfig;
use strata::runtime::Backend;
use strata::train::device_step::DeviceHConvPr;
use strata::train::side_by_side::{HeadKind, Pair};
use strata::train::synthetic::{self, SyntheticWorld};
use strata::PackedBatch;

#[test]
fn twenty_device_steps_follow_the_cpu_losses() {
    // As tests/kernels.rs: the emulator always, the GPU when asked for; the device script skips
    // the emulator half (STRATA_TEST_EMULATOR=0), which CI runs.
    let gpu = std::env::var("STRATA_TEST_CUDA").is_ok_and(|v| v == "1");
    let mut backends = Vec::new();
    if !(gpu && std::env::var("STRATA_TEST_EMULATOR").is_ok_and(|v| v == "0")) {
        backends.push(Backend::Emulator);
    }
    if gpu {
        backends.push(Backend::cuda().expect("STRATA_TEST_CUDA=1 needs a GPU"));
    }
    let (layers, dim, phones) = (13, 64, 20);
    let world = SyntheticWorld::new(3, layers, dim, phones);
    let corpus = world.corpus(4, 64);
    let batches: Vec<_> = corpus
        .utterances
        .chunks(16)
        .map(|chunk| {
            let refs: Vec<_> = chunk.iter().collect();
            let (stack, lengths) = synthetic::pack(&refs);
            let batch = PackedBatch::from_lengths(&lengths).unwrap();
            let targets: Vec<Vec<usize>> = chunk.iter().map(|u| u.phones.clone()).collect();
            (stack, batch, targets)
        })
        .collect();
    for be in backends {
        let new_pair = || {
            Pair::new(
                "hconv",
                &InterfaceConfig::hconv(layers, dim),
                HeadKind::Ctc { vocab: phones + 1 },
                AdamConfig::adamw(2e-3),
                Some(1.0),
                7,
            )
            .unwrap()
        };
        let mut cpu = new_pair();
        let mut dev = DeviceHConvPr::from_pair(&be, &new_pair(), layers, dim).unwrap();
        let mut worst = 0f32;
        let (mut first, mut last) = (0f32, 0f32);
        for step in 0..20 {
            let (stack, batch, targets) = &batches[step % batches.len()];
            let want = cpu.train_step(stack, batch, targets).unwrap();
            let got = dev.train_step(&be, stack, batch, targets).unwrap();
            let rel = (got - want).abs() / want.abs();
            eprintln!(
                "{} step {:2}: cpu {want:.5} device {got:.5} (rel {rel:.2e})",
                be.name(),
                step + 1
            );
            worst = worst.max(rel);
            if step == 0 {
                first = want;
            }
            last = want;
        }
        assert!(last < 0.9 * first, "the run learns: {first} -> {last}");
        assert!(
            worst < 1e-2,
            "{}: device losses within 1% of the CPU's, worst {worst:.3e}",
            be.name()
        );
    }
}

#[test]
fn the_device_step_refuses_what_it_cannot_run_yet() {
    let be = Backend::Emulator;
    let pair = |itf: InterfaceConfig| {
        Pair::new(
            "p",
            &itf,
            HeadKind::Ctc { vocab: 5 },
            AdamConfig::adamw(1e-3),
            None,
            0,
        )
        .unwrap()
    };
    let err = |r: strata::Result<DeviceHConvPr>| r.err().expect("refused").to_string();
    let e = err(DeviceHConvPr::from_pair(
        &be,
        &pair(InterfaceConfig::weighted_sum(7, 16)),
        7,
        16,
    ));
    assert!(e.contains("only HConv"), "{e}");
    let e = err(DeviceHConvPr::from_pair(
        &be,
        &pair(InterfaceConfig::hconv(7, 16)),
        13,
        16,
    ));
    assert!(e.contains("7 x 16") && e.contains("13 x 16"), "{e}");
    let classifier = Pair::new(
        "c",
        &InterfaceConfig::hconv(7, 16),
        HeadKind::Classify { classes: 3 },
        AdamConfig::adamw(1e-3),
        None,
        0,
    )
    .unwrap();
    let e = err(DeviceHConvPr::from_pair(&be, &classifier, 7, 16));
    assert!(e.contains("PR head"), "{e}");
}
