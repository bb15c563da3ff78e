//! CPU forward + backward of every interface on a HuBERT-Base-sized stack (13 x 768), frozen
//! upstream (no stack gradient), in frames per second. PCA + Concat (fitted on the bench's own
//! stack first) and the single layer train nothing: forward only. PyTorch's CPU figure for the same work comes
//! from tools/bench_interfaces_torch.py; both go into RESULTS.md.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::time::Duration;
use strata::models::interface::{self, ClsActivation, InterfaceConfig, InterfaceKind, PcaFit};
use strata::rng::Rng;
use strata::{ParamStore, Tape, Tensor};

const L: usize = 13;
const D: usize = 768;

fn cases() -> Vec<(&'static str, InterfaceKind, usize)> {
    vec![
        ("ws", InterfaceKind::WeightedSum, 2048),
        (
            "hconv",
            InterfaceKind::HConv {
                kernel: 5,
                stride: 3,
                depth: None,
            },
            256,
        ),
        ("concat_proj", InterfaceKind::ConcatProj { out_dim: D }, 256),
        (
            "group_ws3",
            InterfaceKind::GroupWs {
                groups: 3,
                out_dim: D,
            },
            1024,
        ),
        (
            "single_layer",
            InterfaceKind::SingleLayer { layer: -1 },
            2048,
        ),
        (
            "cls_pool",
            InterfaceKind::ClsPool {
                heads: 12,
                ffn_dim: 3072,
                activation: ClsActivation::Gelu,
            },
            256,
        ),
        (
            "pca_concat",
            InterfaceKind::PcaConcat { components: D / L },
            1024,
        ),
    ]
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("interface_fwd_bwd_13x768");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    for (name, kind, frames) in cases() {
        let cfg = InterfaceConfig::new(L, D, kind);
        let mut rng = Rng::new(0);
        let mut store = ParamStore::new();
        let itf = interface::build(&cfg, &mut store, "", &mut rng).unwrap();
        let stack = Tensor::from_vec(
            (0..frames * L * D).map(|_| rng.normal()).collect(),
            &[frames, L, D],
        )
        .unwrap();
        let probe = Tensor::from_vec(
            (0..frames * itf.output_dim())
                .map(|_| rng.normal())
                .collect(),
            &[frames, itf.output_dim()],
        )
        .unwrap();
        if let Some(pca) = itf.as_pca() {
            let mut fit = PcaFit::new(L, D);
            fit.add(&stack).unwrap();
            pca.set_fit(&mut store, &fit.finish().unwrap()).unwrap();
        }
        group.throughput(Throughput::Elements(frames as u64));
        group.bench_function(BenchmarkId::new(name, frames), |b| {
            b.iter(|| {
                let mut tape = Tape::new();
                let s = tape.constant(stack.clone()).unwrap();
                let out = itf.forward(&mut tape, &store, s).unwrap();
                if store.num_scalars() == 0 {
                    return; // single layer, PCA + Concat: nothing to train, forward only
                }
                let loss = tape.dot_const(out, &probe).unwrap();
                tape.backward(loss, &mut store).unwrap();
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
