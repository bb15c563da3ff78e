//! CPU forward + backward of the speaker-verification head (SUPERB SV: x-vector + AM-softmax,
//! 512 / 1500 wide, 1,211 speakers as VoxCeleb1's training set) on 768-dim interface features,
//! 8 utterances x 200 frames, in frames per second. PyTorch's CPU figure for the same work (the
//! s3prl modules, one padded batch of equal lengths) comes from tools/bench_heads_torch.py; both
//! go into RESULTS.md.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::time::Duration;
use strata::models::head::{SpeakerHead, SpeakerHeadConfig};
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

criterion_group!(benches, bench);
criterion_main!(benches);
