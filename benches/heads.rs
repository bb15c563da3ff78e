//! CPU forward + backward of the heads beyond SUPERB's two Linear layers, on 768-dim interface
//! features, in frames per second:
//! - the speaker-verification head (SUPERB SV: x-vector + AM-softmax, 512 / 1500 wide, 1,211
//!   speakers as VoxCeleb1's training set), 8 utterances x 200 frames;
//! - the ML-SUPERB head (ESPnet's Conv2d subsampling + 2 transformer blocks + CTC, 100 characters)
//!   without dropout and SpecAugment (the same arithmetic as an evaluation forward),
//!   8 utterances x 250 frames (5 s each);
//! - the SUPERB ASR head (projector to 1024, 2 bidirectional LSTM layers of 1024, CTC over 31
//!   characters) without dropout, 8 utterances x 150 frames (3 s each).
//!
//! PyTorch's CPU figures for the same work (the s3prl / ESPnet modules, one padded batch of equal
//! lengths) come from tools/bench_heads_torch.py; both go into RESULTS.md.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::time::Duration;
use strata::models::asr_head::{AsrHead, AsrHeadConfig};
use strata::models::head::{SpeakerHead, SpeakerHeadConfig};
use strata::models::mlsuperb_head::{MlSuperbHead, MlSuperbHeadConfig};
use strata::rng::Rng;
use strata::{PackedBatch, ParamStore, Reduction, Tape, Tensor};

fn bench(c: &mut Criterion) {
    let (utterances, frames, dim, speakers) = (8, 200, 768, 1211);
    let mut rng = Rng::new(0);
    let mut store = ParamStore::new();
    let config = SpeakerHeadConfig::default();
    let head = SpeakerHead::new(&mut store, "", dim, config, speakers, &mut rng).unwrap();
    let batch = PackedBatch::from_lengths(&vec![frames; utterances]).unwrap();
    let n = utterances * frames;
    let x = Tensor::from_vec((0..n * dim).map(|_| rng.normal()).collect(), &[n, dim]).unwrap();
    let labels: Vec<usize> = (0..utterances).map(|u| (u * 151) % speakers).collect();
    let mut group = c.benchmark_group("speaker_head_fwd_bwd_768");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .throughput(Throughput::Elements(n as u64));
    group.bench_function("xvector_amsoftmax_8x200", |b| {
        b.iter(|| {
            let mut tape = Tape::new();
            let xv = tape.constant(x.clone()).unwrap();
            let logits = head
                .am_logits(&mut tape, &store, xv, &batch, &labels)
                .unwrap();
            let loss = tape
                .cross_entropy(logits, &labels, Reduction::Mean)
                .unwrap();
            tape.backward(loss, &mut store).unwrap();
        })
    });
    group.finish();
}

fn bench_mlsuperb(c: &mut Criterion) {
    let (utterances, frames, dim, vocab) = (8, 250, 768, 100);
    let mut rng = Rng::new(0);
    let mut store = ParamStore::new();
    let config = MlSuperbHeadConfig {
        dropout: 0.0,
        attention_dropout: 0.0,
        specaug: None,
        ..MlSuperbHeadConfig::default()
    };
    let head = MlSuperbHead::new(&mut store, "", dim, config, vocab, &mut rng).unwrap();
    let batch = PackedBatch::from_lengths(&vec![frames; utterances]).unwrap();
    let n = utterances * frames;
    let x = Tensor::from_vec((0..n * dim).map(|_| rng.normal()).collect(), &[n, dim]).unwrap();
    let targets: Vec<Vec<usize>> = (0..utterances)
        .map(|u| {
            (0..60)
                .map(|i| 1 + (u * 7 + i * 13) % (vocab - 1))
                .collect()
        })
        .collect();
    let mut group = c.benchmark_group("mlsuperb_head_fwd_bwd_768");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(6))
        .throughput(Throughput::Elements(n as u64));
    group.bench_function("conv2d2_2blocks_ctc_8x250", |b| {
        b.iter(|| {
            let mut tape = Tape::new();
            let xv = tape.constant(x.clone()).unwrap();
            let (logits, out) = head.forward(&mut tape, &store, xv, &batch, None).unwrap();
            let lp = tape.log_softmax(logits).unwrap();
            let sum = tape
                .ctc_loss(lp, &out, &targets, Reduction::Sum, true)
                .unwrap();
            let loss = tape.scale(sum, 1.0 / utterances as f32).unwrap();
            tape.backward(loss, &mut store).unwrap();
        })
    });
    group.finish();
}

fn bench_asr(c: &mut Criterion) {
    let (utterances, frames, dim, vocab) = (8, 150, 768, 31);
    let mut rng = Rng::new(0);
    let mut store = ParamStore::new();
    let config = AsrHeadConfig {
        dropout: 0.0,
        ..AsrHeadConfig::default()
    };
    let head = AsrHead::new(&mut store, "", dim, config, vocab, &mut rng).unwrap();
    let batch = PackedBatch::from_lengths(&vec![frames; utterances]).unwrap();
    let n = utterances * frames;
    let x = Tensor::from_vec((0..n * dim).map(|_| rng.normal()).collect(), &[n, dim]).unwrap();
    let targets: Vec<Vec<usize>> = (0..utterances)
        .map(|u| {
            (0..40)
                .map(|i| 1 + (u * 7 + i * 13) % (vocab - 1))
                .collect()
        })
        .collect();
    let mut group = c.benchmark_group("asr_head_fwd_bwd_768");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(10))
        .throughput(Throughput::Elements(n as u64));
    group.bench_function("bilstm2x1024_ctc_8x150", |b| {
        b.iter(|| {
            let mut tape = Tape::new();
            let xv = tape.constant(x.clone()).unwrap();
            let logits = head.forward(&mut tape, &store, xv, &batch, None).unwrap();
            let lp = tape.log_softmax(logits).unwrap();
            let loss = tape
                .ctc_loss(lp, &batch, &targets, Reduction::Mean, true)
                .unwrap();
            tape.backward(loss, &mut store).unwrap();
        })
    });
    group.finish();
}

criterion_group!(benches, bench, bench_mlsuperb, bench_asr);
criterion_main!(benches);
