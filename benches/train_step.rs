//! Whole CPU training steps (`Pair::train_step`: interface, head, loss, backward, clip, AdamW) on
//! 8 utterances x 150 frames of a random 13 x 768 stack, CTC over 31 tokens: WS and HConv with the
//! SUPERB PR head, and WS with s3prl's ASR head (no dropout). Where the time goes is read with `perf`
//! on the same bench; results go to RESULTS.md.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::time::Duration;
use strata::models::asr_head::AsrHeadConfig;
use strata::models::interface::{InterfaceConfig, InterfaceKind};
use strata::optim::AdamConfig;
use strata::rng::Rng;
use strata::train::side_by_side::{CtcHead, HeadKind, Pair, PairSpec};
use strata::{PackedBatch, Tensor};

const L: usize = 13;
const D: usize = 768;
const UTTERANCES: usize = 8;
const FRAMES: usize = 150;
const VOCAB: usize = 31;

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("cpu_train_step_8x150_13x768");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(8));
    let batch = PackedBatch::from_lengths(&[FRAMES; UTTERANCES]).unwrap();
    let n = batch.total_frames();
    let mut rng = Rng::new(3);
    let stack =
        Tensor::from_vec((0..n * L * D).map(|_| rng.normal()).collect(), &[n, L, D]).unwrap();
    let targets: Vec<Vec<usize>> = (0..UTTERANCES)
        .map(|i| {
            (0..20)
                .map(|j| 1 + (i * 7 + j * 13) % (VOCAB - 1))
                .collect()
        })
        .collect();
    let hconv = InterfaceKind::HConv {
        kernel: 5,
        stride: 3,
        depth: None,
    };
    let mut asr = PairSpec::new("ws_asr", InterfaceConfig::weighted_sum(L, D));
    asr.ctc_head = CtcHead::Asr(AsrHeadConfig {
        dropout: 0.0,
        ..AsrHeadConfig::default()
    });
    let cases = [
        (
            "ws_pr_head",
            PairSpec::new("ws_pr", InterfaceConfig::weighted_sum(L, D)),
        ),
        (
            "hconv_pr_head",
            PairSpec::new("hconv_pr", InterfaceConfig::new(L, D, hconv)),
        ),
        ("ws_asr_head", asr),
    ];
    group.throughput(Throughput::Elements(n as u64));
    for (name, spec) in cases {
        let kind = HeadKind::Ctc { vocab: VOCAB };
        let mut pair = Pair::from_spec(&spec, kind, AdamConfig::adamw(1e-4), Some(1.0), 0).unwrap();
        group.bench_function(name, |b| {
            b.iter(|| pair.train_step(&stack, &batch, &targets).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
