//! Adam / AdamW against torch.optim over 10 steps, clip_grad_norm_ against PyTorch, and the tape's
//! gradient bookkeeping (accumulation across micro-batches, zero_grad, no-grad mode).

mod common;
use common::{assert_close, Fixture};
use strata::optim::{clip_grad_norm, Adam, AdamConfig};
use strata::{ParamStore, Reduction, Tape, Tensor};

fn store_from(fx: &Fixture, prefix: &str) -> ParamStore {
    let mut store = ParamStore::new();
    for i in 0..3 {
        store
            .add(&format!("p{i}"), fx.tensor(&format!("{prefix}{i}")))
            .unwrap();
    }
    store
}

fn set_grads(store: &mut ParamStore, fx: &Fixture, prefix: &str) {
    for (i, id) in store.ids().collect::<Vec<_>>().into_iter().enumerate() {
        store.get_mut(id).grad = fx.f(&format!("{prefix}{i}")).to_vec();
    }
}

#[test]
fn adam_and_adamw_match_torch_for_ten_steps() {
    let fx = Fixture::load("optim.safetensors");
    for (name, cfg) in [
        (
            "adamw",
            AdamConfig {
                lr: 1e-2,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.01,
                decoupled: true,
            },
        ),
        (
            "adam_l2",
            AdamConfig {
                lr: 3e-3,
                beta1: 0.8,
                beta2: 0.99,
                eps: 1e-6,
                weight_decay: 0.1,
                decoupled: false,
            },
        ),
    ] {
        let mut store = store_from(&fx, &format!("{name}.init."));
        let mut opt = Adam::new(cfg, &store).unwrap();
        for step in 0..10 {
            set_grads(&mut store, &fx, &format!("{name}.step{step}.grad."));
            opt.step(&mut store).unwrap();
            for (i, p) in store.iter().enumerate() {
                assert_close(
                    &format!("{name} step {step} param {i}"),
                    &p.value.to_vec(),
                    fx.f(&format!("{name}.step{step}.param.{i}")),
                    1e-6,
                );
            }
        }
    }
}

#[test]
fn clip_grad_norm_matches_torch() {
    let fx = Fixture::load("optim.safetensors");
    for name in ["clip", "noclip"] {
        let mut store = store_from(&fx, &format!("{name}.grad."));
        set_grads(&mut store, &fx, &format!("{name}.grad."));
        let max_norm = if name == "clip" { 1.0 } else { 1e3 };
        let total = clip_grad_norm(&mut store, max_norm).unwrap();
        assert_close(
            &format!("{name} total norm"),
            &[total as f32],
            fx.f(&format!("{name}.total")),
            1e-6,
        );
        for (i, p) in store.iter().enumerate() {
            assert_close(
                &format!("{name} grad {i}"),
                &p.grad,
                fx.f(&format!("{name}.clipped.{i}")),
                1e-6,
            );
        }
    }
}

/// Two micro-batches with 'sum' reduction accumulate to exactly the gradient of the whole batch.
#[test]
fn gradients_accumulate_across_micro_batches_until_zero_grad() {
    let mut store = ParamStore::new();
    let w = store
        .add(
            "w",
            Tensor::from_vec(vec![0.3, -0.2, 0.5, 0.1, 0.7, -0.4], &[3, 2]).unwrap(),
        )
        .unwrap();
    let x_all = [1.0f32, 2.0, -1.0, 0.5, 0.3, 0.3, 2.0, -2.0];
    let labels = [0usize, 2, 1, 2];
    let run = |store: &mut ParamStore, rows: std::ops::Range<usize>| {
        let mut tape = Tape::new();
        let x = tape
            .constant(
                Tensor::from_vec(
                    x_all[rows.start * 2..rows.end * 2].to_vec(),
                    &[rows.len(), 2],
                )
                .unwrap(),
            )
            .unwrap();
        let wv = tape.param(store, w);
        let logits = tape.linear(x, wv, None).unwrap();
        let loss = tape
            .cross_entropy(logits, &labels[rows], Reduction::Sum)
            .unwrap();
        tape.backward(loss, store).unwrap();
    };
    run(&mut store, 0..4);
    let full = store.grad(w).to_vec();
    store.zero_grad();
    assert!(store.grad(w).iter().all(|&g| g == 0.0));
    run(&mut store, 0..2);
    run(&mut store, 2..4);
    assert_close("accumulated", store.grad(w), &full, 1e-6);
    // A tape's backward runs once; a second call is an error, not silently nothing.
    let mut tape = Tape::new();
    let x = tape
        .constant(Tensor::from_vec(x_all.to_vec(), &[4, 2]).unwrap())
        .unwrap();
    let wv = tape.param(&store, w);
    let logits = tape.linear(x, wv, None).unwrap();
    let loss = tape.cross_entropy(logits, &labels, Reduction::Sum).unwrap();
    tape.backward(loss, &mut store).unwrap();
    assert!(tape
        .backward(loss, &mut store)
        .unwrap_err()
        .to_string()
        .contains("already ran"));
}

#[test]
fn no_grad_tape_records_nothing_to_differentiate() {
    let mut store = ParamStore::new();
    let w = store
        .add("w", Tensor::from_vec(vec![1.0, 2.0], &[1, 2]).unwrap())
        .unwrap();
    let mut tape = Tape::no_grad();
    let x = tape
        .constant(Tensor::from_vec(vec![1.0, 1.0], &[1, 2]).unwrap())
        .unwrap();
    let wv = tape.param(&store, w);
    let y = tape.linear(x, wv, None).unwrap();
    assert_eq!(tape.value(y).to_vec(), vec![3.0]);
    assert!(!tape.requires_grad(y));
    assert!(tape.backward(y, &mut store).is_err());
}

/// The update runs in parallel chunks of a tensor: a tensor of many chunks steps exactly as the
/// same values cut into tensors of one chunk each, for Adam and AdamW.
#[test]
fn adam_steps_a_large_tensor_as_its_pieces_bit_for_bit() {
    let (n, piece) = (100_003usize, 1_000usize);
    let mut rng = strata::rng::Rng::new(5);
    let values: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
    let grads: Vec<Vec<f32>> = (0..3)
        .map(|_| (0..n).map(|_| rng.normal()).collect())
        .collect();
    for config in [AdamConfig::adam(1e-2), AdamConfig::adamw(1e-2)] {
        let config = AdamConfig {
            weight_decay: 0.1,
            ..config
        };
        let mut whole = ParamStore::new();
        let id = whole
            .add("w", Tensor::from_vec(values.clone(), &[n]).unwrap())
            .unwrap();
        let mut pieces = ParamStore::new();
        let ids: Vec<_> = values
            .chunks(piece)
            .enumerate()
            .map(|(i, c)| {
                let t = Tensor::from_vec(c.to_vec(), &[c.len()]).unwrap();
                pieces.add(&format!("p{i}"), t).unwrap()
            })
            .collect();
        let (mut opt_whole, mut opt_pieces) = (
            Adam::new(config, &whole).unwrap(),
            Adam::new(config, &pieces).unwrap(),
        );
        for g in &grads {
            whole.get_mut(id).grad = g.clone();
            for (i, &pid) in ids.iter().enumerate() {
                pieces.get_mut(pid).grad = g[i * piece..((i + 1) * piece).min(n)].to_vec();
            }
            opt_whole.step(&mut whole).unwrap();
            opt_pieces.step(&mut pieces).unwrap();
        }
        let got = whole.get(id).value.to_vec();
        let want: Vec<f32> = ids
            .iter()
            .flat_map(|&pid| pieces.get(pid).value.to_vec())
            .collect();
        assert_eq!(got.len(), want.len());
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                a.to_bits(),
                b.to_bits(),
                "{config:?} element {i}: {a} vs {b}"
            );
        }
        assert_ne!(got, values, "the steps moved the values");
    }
}

/// The norm of gradients many chunks long (and not a multiple of the summing lanes) against a
/// plain f64 sum, and the clip scaling each gradient by max_norm / total.
#[test]
fn clip_grad_norm_of_long_gradients() {
    let mut rng = strata::rng::Rng::new(11);
    let mut store = ParamStore::new();
    let lens = [200_005usize, 3, 70_001];
    let grads: Vec<Vec<f32>> = lens
        .iter()
        .map(|&n| (0..n).map(|_| rng.normal()).collect())
        .collect();
    for (i, g) in grads.iter().enumerate() {
        let id = store
            .add(&format!("p{i}"), Tensor::zeros(&[g.len()]))
            .unwrap();
        store.get_mut(id).grad = g.clone();
    }
    let want = grads
        .iter()
        .map(|g| {
            let n = g.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
            (n as f32 as f64).powi(2)
        })
        .sum::<f64>()
        .sqrt();
    let total = clip_grad_norm(&mut store, 1.0).unwrap();
    assert!((total - want).abs() <= 1e-6 * want, "{total} vs {want}");
    let coef = (1.0 / (total + 1e-6)) as f32;
    for (p, g) in store.iter().zip(&grads) {
        let scaled: Vec<f32> = g.iter().map(|&x| x * coef).collect();
        assert_eq!(p.grad, scaled);
    }
}

/// A gradient of the wrong length is an error naming the parameter, not a partial step.
#[test]
fn adam_rejects_a_gradient_that_does_not_fit_its_parameter() {
    let mut store = ParamStore::new();
    let id = store
        .add("head.w", Tensor::from_vec(vec![0.5; 6], &[2, 3]).unwrap())
        .unwrap();
    let mut opt = Adam::new(AdamConfig::adamw(1e-2), &store).unwrap();
    store.get_mut(id).grad = vec![0.1; 5];
    let err = opt.step(&mut store).unwrap_err().to_string();
    assert!(err.contains("head.w") && err.contains("6 values"), "{err}");
    assert_eq!(
        store.get(id).value.to_vec(),
        vec![0.5; 6],
        "nothing stepped"
    );
}
