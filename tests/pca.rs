//! PCA + Concat: the symmetric eigensolver on matrices with known or checkable decompositions,
//! the fit against PyTorch (tools/gen_pca_fixture.py: mean, covariance, torch.linalg.eigh in
//! float64), the interface's output, and its fitted values staying frozen through training and
//! checkpoints.

mod common;
use common::{rel_err, Fixture};
use strata::models::interface::{self, InterfaceConfig, InterfaceKind, PcaConcat, PcaFit};
use strata::ops::symmetric_eigen::symmetric_eigen;
use strata::optim::AdamConfig;
use strata::rng::Rng;
use strata::train::side_by_side::{HeadKind, Pair};
use strata::{PackedBatch, ParamStore, Tape, Tensor};

/// A random symmetric n x n matrix with entries in [-1, 1).
fn random_symmetric(n: usize, seed: u64) -> Vec<f64> {
    let mut rng = Rng::new(seed);
    let mut a = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let x = rng.next_f64() * 2.0 - 1.0;
            a[i * n + j] = x;
            a[j * n + i] = x;
        }
    }
    a
}

/// Checks A v = lambda v for every pair, V orthonormal, descending order, the sign rule and the
/// trace, to `tol` relative to the matrix's largest entry.
fn check_decomposition(a: &[f64], n: usize, tol: f64) {
    let eig = symmetric_eigen(a, n).unwrap();
    let scale = a.iter().fold(1e-300f64, |m, x| m.max(x.abs()));
    for i in 0..n {
        let v = &eig.vectors[i * n..(i + 1) * n];
        for r in 0..n {
            let av: f64 = (0..n).map(|c| a[r * n + c] * v[c]).sum();
            let err = (av - eig.values[i] * v[r]).abs();
            assert!(
                err <= tol * scale * n as f64,
                "n {n}: A v != lambda v for pair {i} ({err:e})"
            );
        }
        for j in 0..n {
            let dot: f64 = (0..n).map(|c| v[c] * eig.vectors[j * n + c]).sum();
            let want = if i == j { 1.0 } else { 0.0 };
            assert!(
                (dot - want).abs() <= tol * n as f64,
                "n {n}: v{i} . v{j} = {dot}"
            );
        }
        if i > 0 {
            assert!(eig.values[i] <= eig.values[i - 1], "n {n}: not descending");
        }
        let big = (0..n).fold(0, |b, c| if v[c].abs() > v[b].abs() { c } else { b });
        assert!(v[big] > 0.0, "n {n}: the largest entry of v{i} is negative");
    }
    let trace: f64 = (0..n).map(|i| a[i * n + i]).sum();
    let sum: f64 = eig.values.iter().sum();
    assert!(
        (trace - sum).abs() <= tol * scale * n as f64,
        "n {n}: trace {trace} vs {sum}"
    );
}

#[test]
fn symmetric_eigen_decomposes_random_degenerate_and_known_matrices() {
    for (n, seed) in [(1, 1), (2, 2), (3, 3), (5, 4), (17, 5), (64, 6), (200, 7)] {
        check_decomposition(&random_symmetric(n, seed), n, 1e-12);
    }
    // Repeated eigenvalues (a rotated diag(3, 3, 3, 1, 1, 0, ...)), a diagonal, zero, rank one.
    let n = 40;
    let q = symmetric_eigen(&random_symmetric(n, 9), n).unwrap().vectors;
    let spectrum: Vec<f64> = (0..n)
        .map(|i| match i {
            0..=2 => 3.0,
            3..=4 => 1.0,
            _ => 0.0,
        })
        .collect();
    let mut degenerate = vec![0f64; n * n];
    for r in 0..n {
        for c in 0..n {
            degenerate[r * n + c] = (0..n)
                .map(|k| q[k * n + r] * spectrum[k] * q[k * n + c])
                .sum();
        }
    }
    check_decomposition(&degenerate, n, 1e-12);
    let got = symmetric_eigen(&degenerate, n).unwrap().values;
    for (g, w) in got.iter().zip(&spectrum) {
        assert!((g - w).abs() < 1e-12, "{got:?}");
    }
    let diagonal: Vec<f64> = (0..n * n)
        .map(|i| {
            if i / n == i % n {
                (i / n) as f64 - 7.5
            } else {
                0.0
            }
        })
        .collect();
    check_decomposition(&diagonal, n, 1e-14);
    check_decomposition(&[0.0; 25], 5, 0.0);
    let u: Vec<f64> = (0..n).map(|i| (i as f64 * 0.37).sin()).collect();
    let rank_one: Vec<f64> = (0..n * n).map(|i| u[i / n] * u[i % n]).collect();
    check_decomposition(&rank_one, n, 1e-12);
    // [[2, 1], [1, 2]]: 3 with (1, 1) / sqrt 2, 1 with (1, -1) / sqrt 2 (the first of equal
    // magnitudes is the one made positive).
    let e = symmetric_eigen(&[2.0, 1.0, 1.0, 2.0], 2).unwrap();
    let h = std::f64::consts::FRAC_1_SQRT_2;
    assert!((e.values[0] - 3.0).abs() < 1e-15 && (e.values[1] - 1.0).abs() < 1e-15);
    for (g, w) in e.vectors.iter().zip([h, h, h, -h]) {
        assert!((g - w).abs() < 1e-15, "{:?}", e.vectors);
    }
    // Only the lower triangle is read: junk above the diagonal changes nothing.
    let n = 30;
    let clean = random_symmetric(n, 11);
    let mut junk = clean.clone();
    for r in 0..n {
        for c in r + 1..n {
            junk[r * n + c] = 1e3 * (r * n + c) as f64;
        }
    }
    let (a, b) = (
        symmetric_eigen(&clean, n).unwrap(),
        symmetric_eigen(&junk, n).unwrap(),
    );
    assert_eq!((a.values, a.vectors), (b.values, b.vectors));
    // Bad input: a clear error, not junk.
    let err = symmetric_eigen(&[1.0, f64::NAN, f64::NAN, 1.0], 2)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("NaN or Inf at row 0, column 1"), "{err}");
    assert!(symmetric_eigen(&[1.0; 5], 2).is_err());
}

fn fixture_fit() -> (Fixture, strata::models::interface::PcaBasis) {
    let fx = Fixture::load("pca.safetensors");
    let s = fx.shape("stack").to_vec();
    let stack = fx.f("stack");
    let mut fit = PcaFit::new(s[1], s[2]);
    // Two batches of different sizes: the sums carry over.
    let cut = 120 * s[1] * s[2];
    for (part, frames) in [(&stack[..cut], 120), (&stack[cut..], s[0] - 120)] {
        let t = Tensor::from_vec(part.to_vec(), &[frames, s[1], s[2]]).unwrap();
        fit.add(&t).unwrap();
    }
    assert_eq!(fit.frames(), s[0]);
    let basis = fit.finish().unwrap();
    (fx, basis)
}

#[test]
fn the_fit_matches_pytorch_and_the_interface_projects_each_layer() {
    let (fx, basis) = fixture_fit();
    let s = fx.shape("stack").to_vec();
    let (l, d, k) = (s[1], s[2], fx.shape("components")[1]);
    // Means of values ~200 from f32 data: well within f32 rounding of PyTorch's float64 means.
    let mean: Vec<f32> = basis.mean.iter().map(|&x| x as f32).collect();
    let e = rel_err(&mean, fx.f("mean"));
    eprintln!("means {e:e}");
    assert!(e < 1e-7, "means off by {e:e}");
    let values: Vec<f32> = (basis.layers_eigen.iter())
        .flat_map(|eig| eig.values.iter().map(|&x| x as f32))
        .collect();
    let e = rel_err(&values, fx.f("eigenvalues"));
    eprintln!("eigenvalues {e:e}");
    assert!(e < 1e-6, "eigenvalues off by {e:e}");
    let comps: Vec<f32> = (basis.layers_eigen.iter())
        .flat_map(|eig| eig.vectors[..k * d].iter().map(|&x| x as f32))
        .collect();
    let e = rel_err(&comps, fx.f("components"));
    eprintln!("components {e:e}");
    assert!(e < 1e-5, "components off by {e:e}");

    let cfg = InterfaceConfig::new(l, d, InterfaceKind::PcaConcat { components: k });
    let mut store = ParamStore::new();
    let itf = interface::build(&cfg, &mut store, "", &mut Rng::new(0)).unwrap();
    assert_eq!(itf.output_dim(), l * k);
    assert_eq!(store.num_scalars(), 0, "nothing of PCA + Concat is trained");
    // Unfitted, it refuses to run instead of projecting onto zeros.
    let mut tape = Tape::new();
    let x = tape.constant(fx.tensor("stack")).unwrap();
    let err = itf.forward(&mut tape, &store, x).err().unwrap().to_string();
    assert!(err.contains("PCA + Concat is not fitted"), "{err}");
    itf.as_pca().unwrap().set_fit(&mut store, &basis).unwrap();
    assert_eq!(itf.as_pca().unwrap().fitted_frames(&store), s[0]);
    // The stack gradient flows (a trainable upstream); the projections get none.
    let mut tape = Tape::new();
    let x = tape.input_requiring_grad(fx.tensor("stack")).unwrap();
    let y = itf.forward(&mut tape, &store, x).unwrap();
    assert_eq!(tape.shape(y), &[s[0], l * k]);
    let e = rel_err(&tape.value(y).to_vec(), fx.f("output"));
    eprintln!("output {e:e}");
    assert!(e < 1e-5, "PCA + Concat output off by {e:e}");
    assert!(tape.requires_grad(y));

    // Bad configurations and input.
    for components in [0, d + 1] {
        let cfg = InterfaceConfig::new(l, d, InterfaceKind::PcaConcat { components });
        let err = interface::build(&cfg, &mut ParamStore::new(), "", &mut Rng::new(0));
        assert!(err
            .err()
            .unwrap()
            .to_string()
            .contains("components per layer"));
    }
    let mut fit = PcaFit::new(l, d);
    let wrong = Tensor::zeros(&[3, l + 1, d]);
    assert!(fit
        .add(&wrong)
        .err()
        .unwrap()
        .to_string()
        .contains("PCA fit input"));
    let mut nan = vec![0f32; 2 * l * d];
    nan[l * d + d + 3] = f32::NAN;
    let nan = Tensor::from_vec(nan, &[2, l, d]).unwrap();
    let err = fit.add(&nan).err().unwrap().to_string();
    assert!(err.contains("NaN or Inf at frame 1, layer 1"), "{err}");
    fit.add(&Tensor::zeros(&[1, l, d])).unwrap();
    let err = fit.finish().err().unwrap().to_string();
    assert!(
        err.contains("1 frames: a covariance needs at least 2"),
        "{err}"
    );
}

#[test]
fn training_leaves_the_fitted_projection_alone() {
    let (fx, basis) = fixture_fit();
    let s = fx.shape("stack").to_vec();
    let cfg = InterfaceConfig::new(s[1], s[2], InterfaceKind::PcaConcat { components: 4 });
    let mut pair = Pair::new(
        "pca",
        &cfg,
        HeadKind::Classify { classes: 3 },
        AdamConfig::adamw(1e-2),
        Some(1.0),
        3,
    )
    .unwrap();
    let pca: &PcaConcat = pair.interface.as_pca().unwrap();
    pca.set_fit(&mut pair.store, &basis).unwrap();
    let before = pair.store.clone();
    let batch = PackedBatch::from_lengths(&[100, 120, 80]).unwrap();
    let targets = vec![vec![0], vec![2], vec![1]];
    for _ in 0..3 {
        pair.train_step(&fx.tensor("stack"), &batch, &targets)
            .unwrap();
    }
    for (old, new) in before.iter().zip(pair.store.iter()) {
        if new.frozen {
            assert_eq!(old.value.to_vec(), new.value.to_vec(), "{} moved", new.name);
        } else {
            assert_ne!(
                old.value.to_vec(),
                new.value.to_vec(),
                "{} did not train",
                new.name
            );
        }
    }
    assert_eq!(
        (pair
            .store
            .iter()
            .filter(|p| p.frozen)
            .map(|p| p.name.as_str()))
        .collect::<Vec<_>>(),
        [
            "interface.mean",
            "interface.components",
            "interface.fitted_frames"
        ]
    );
}
