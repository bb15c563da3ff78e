//! Shared test helpers: reading the PyTorch fixtures (tools/gen_fixtures.py), comparing tensors,
//! and the device backends a test runs on.
#![allow(dead_code)]

use std::collections::HashMap;
use strata::runtime::Backend;
use strata::{ParamStore, Tensor};

pub struct Fixture {
    pub name: String,
    floats: HashMap<String, (Vec<usize>, Vec<f32>)>,
    ints: HashMap<String, Vec<i64>>,
}

impl Fixture {
    pub fn load(file: &str) -> Fixture {
        let path = format!("{}/tests/fixtures/{file}", env!("CARGO_MANIFEST_DIR"));
        let bytes = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{path}: {e} (regenerate: python tools/gen_fixtures.py)"));
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("valid safetensors");
        let mut floats = HashMap::new();
        let mut ints = HashMap::new();
        for (k, v) in st.tensors() {
            match v.dtype() {
                safetensors::Dtype::F32 => {
                    let d = v
                        .data()
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect();
                    floats.insert(k.clone(), (v.shape().to_vec(), d));
                }
                safetensors::Dtype::I64 => {
                    let d = v
                        .data()
                        .chunks_exact(8)
                        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                        .collect();
                    ints.insert(k.clone(), d);
                }
                other => panic!("{file}: tensor {k} has unexpected dtype {other:?}"),
            }
        }
        Fixture {
            name: file.to_string(),
            floats,
            ints,
        }
    }

    pub fn has(&self, key: &str) -> bool {
        self.floats.contains_key(key) || self.ints.contains_key(key)
    }

    pub fn keys(&self) -> Vec<String> {
        let mut k: Vec<String> = self
            .floats
            .keys()
            .chain(self.ints.keys())
            .cloned()
            .collect();
        k.sort();
        k
    }

    pub fn f(&self, key: &str) -> &[f32] {
        &self
            .floats
            .get(key)
            .unwrap_or_else(|| panic!("{}: no tensor {key}", self.name))
            .1
    }

    pub fn shape(&self, key: &str) -> &[usize] {
        &self
            .floats
            .get(key)
            .unwrap_or_else(|| panic!("{}: no tensor {key}", self.name))
            .0
    }

    pub fn tensor(&self, key: &str) -> Tensor {
        Tensor::from_vec(self.f(key).to_vec(), self.shape(key)).unwrap()
    }

    pub fn usizes(&self, key: &str) -> Vec<usize> {
        self.ints
            .get(key)
            .unwrap_or_else(|| panic!("{}: no int tensor {key}", self.name))
            .iter()
            .map(|&v| v as usize)
            .collect()
    }

    /// Sets every parameter of `store` from `prefix + name`.
    pub fn load_params(&self, store: &mut ParamStore, prefix: &str) {
        let ids: Vec<_> = store.ids().collect();
        for id in ids {
            let key = format!("{prefix}{}", store.get(id).name);
            store
                .set_value(id, self.tensor(&key))
                .unwrap_or_else(|e| panic!("{key}: {e}"));
        }
    }
}

/// |a - b|, NaN-aware: 0 where both are NaN or equal (infinities of one sign), infinite where
/// only one is NaN or the infinities differ. (`f64::max` skips NaN: folding plain differences
/// with it would pass an output full of NaN.)
pub fn abs_diff(a: f64, b: f64) -> f64 {
    if a == b || (a.is_nan() && b.is_nan()) {
        0.0
    } else {
        let d = (a - b).abs();
        if d.is_nan() {
            f64::INFINITY
        } else {
            d
        }
    }
}

/// max|got - want|, NaN-aware ([`abs_diff`]).
pub fn max_abs_diff<A: Copy + Into<f64>, B: Copy + Into<f64>>(got: &[A], want: &[B]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    got.iter()
        .zip(want)
        .fold(0f64, |m, (&a, &b)| m.max(abs_diff(a.into(), b.into())))
}

/// max|got - want| / max|want|: the error relative to the tensor's scale (elementwise relative
/// error is meaningless for entries that are zero up to rounding). A NaN where the reference has
/// none is an infinite error.
pub fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let scale = want.iter().fold(0f64, |m, &v| m.max((v as f64).abs()));
    let err = max_abs_diff(got, want);
    if scale == 0.0 {
        err
    } else {
        err / scale
    }
}

/// Holds strata's float32 result to twice PyTorch's own float32 error, both measured against a
/// fixture's float64 reference `key` (PyTorch's float32 result under "f32.`key`"):
/// flash-attention's rule, with `floor` (relative to the tensor's scale) for results at float32's
/// rounding floor.
#[track_caller]
pub fn check_vs_torch(fx: &Fixture, what: &str, got: &[f32], key: &str, floor: f64) {
    let ours = rel_err(got, fx.f(key));
    let torch = rel_err(fx.f(&format!("f32.{key}")), fx.f(key));
    eprintln!("{what}: strata {ours:.2e}, torch f32 {torch:.2e}");
    assert!(
        ours <= (2.0 * torch).max(floor),
        "{what}: error {ours:.3e} vs PyTorch float32's {torch:.3e}"
    );
}

#[track_caller]
pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f64) {
    assert!(
        got.iter().all(|v| v.is_finite()),
        "{what}: non-finite values"
    );
    let e = rel_err(got, want);
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.0e}");
}

/// Splits packed targets by their lengths.
pub fn split_targets(flat: &[usize], lengths: &[usize]) -> Vec<Vec<usize>> {
    let mut out = Vec::new();
    let mut o = 0;
    for &l in lengths {
        out.push(flat[o..o + l].to_vec());
        o += l;
    }
    out
}

/// Whether the GPU was asked for (STRATA_TEST_CUDA=1, as the device script sets).
pub fn on_gpu() -> bool {
    std::env::var("STRATA_TEST_CUDA").is_ok_and(|v| v == "1")
}

/// The device backends a test runs on: the kernel emulator always, plus the GPU when asked for
/// (then it must exist). The device script skips the emulator half (STRATA_TEST_EMULATOR=0),
/// which CI runs.
pub fn backends() -> Vec<Backend> {
    let mut v = Vec::new();
    if !(on_gpu() && std::env::var("STRATA_TEST_EMULATOR").is_ok_and(|v| v == "0")) {
        v.push(Backend::Emulator);
    }
    if on_gpu() {
        v.push(
            Backend::cuda().unwrap_or_else(|why| panic!("STRATA_TEST_CUDA=1 but no GPU: {why}")),
        );
    }
    v
}

/// Utterances whose frames spell their transcript: each token held for 8-12 frames of its own
/// random vector plus noise, stacked as 2 identical layers of 16 features.
pub fn spelled(
    n: usize,
    rng: &mut strata::rng::Rng,
    codes: &[Vec<f32>],
) -> (Tensor, strata::PackedBatch, Vec<Vec<usize>>) {
    let (mut data, mut lengths, mut targets) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..n {
        let mut target: Vec<usize> = Vec::new();
        while target.len() < 4 + rng.below(3) {
            let t = 1 + rng.below(codes.len() - 1);
            if target.last() != Some(&t) {
                target.push(t);
            }
        }
        let mut frames = 0;
        for &t in &target {
            for _ in 0..8 + rng.below(5) {
                let f: Vec<f32> = codes[t].iter().map(|c| c + 0.3 * rng.normal()).collect();
                data.extend_from_slice(&f);
                data.extend_from_slice(&f);
                frames += 1;
            }
        }
        lengths.push(frames);
        targets.push(target);
    }
    let total = lengths.iter().sum::<usize>();
    (
        Tensor::from_vec(data, &[total, 2, 16]).unwrap(),
        strata::PackedBatch::from_lengths(&lengths).unwrap(),
        targets,
    )
}

/// A WS pair (2 x 16 stacks) with `head`, trained with Adam at `lr` (clip 5) for `steps` steps of 8
/// fresh utterances whose features spell their tokens (5 of 6 tokens, [`spelled`]): its held-out
/// CER (6 utterances) before and after. Prints both and the mean loss of the first and last 10
/// steps.
pub fn learn_to_spell(
    head: strata::train::side_by_side::CtcHead,
    lr: f64,
    steps: usize,
) -> (f64, f64) {
    use strata::models::interface::InterfaceConfig;
    use strata::optim::AdamConfig;
    use strata::train::metrics::ErrorRate;
    use strata::train::side_by_side::{HeadKind, Pair, PairSpec};
    let mut rng = strata::rng::Rng::new(11);
    let codes: Vec<Vec<f32>> = (0..6)
        .map(|_| (0..16).map(|_| rng.normal()).collect())
        .collect();
    let mut spec = PairSpec::new("ws", InterfaceConfig::weighted_sum(2, 16));
    spec.ctc_head = head;
    let kind = HeadKind::Ctc { vocab: 6 };
    let mut pair = Pair::from_spec(&spec, kind, AdamConfig::adam(lr), Some(5.0), 1).unwrap();
    let (test_stack, test_batch, test_targets) = spelled(6, &mut rng, &codes);
    let cer = |pair: &Pair| {
        let mut rate = ErrorRate::default();
        for (hyp, reference) in
            (pair.decode(&test_stack, &test_batch).unwrap().iter()).zip(&test_targets)
        {
            rate.add(hyp, reference);
        }
        rate.rate()
    };
    let before = cer(&pair);
    let mut losses = Vec::new();
    for _ in 0..steps {
        let (stack, batch, targets) = spelled(8, &mut rng, &codes);
        losses.push(pair.train_step(&stack, &batch, &targets).unwrap());
    }
    let after = cer(&pair);
    let mean = |l: &[f32]| l.iter().sum::<f32>() / l.len() as f32;
    eprintln!(
        "CER {before:.2} -> {after:.2}; loss {:.2} -> {:.2}",
        mean(&losses[..10]),
        mean(&losses[steps - 10..])
    );
    (before, after)
}
