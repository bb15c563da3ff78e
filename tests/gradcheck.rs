//! Finite-difference gradient checks in f64 for every reference op: the analytic backward of each
//! op against central differences of its forward, through the probe loss sum(r * f(x)).

use strata::ops::{self, attention::AttnGeom, layer_conv::ConvGeom};

/// Deterministic pseudo-random values in (-1, 1).
fn rand_vec(n: usize, seed: u64) -> Vec<f64> {
    let mut rng = strata::rng::Rng::new(seed);
    (0..n)
        .map(|_| rng.uniform(-1.0, 1.0) as f64 + 1e-3 * rng.next_f64())
        .collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Checks `analytic` = d loss / d x at up to 40 evenly spread coordinates, loss(x) a scalar.
#[track_caller]
fn check(what: &str, x: &[f64], analytic: &[f64], loss: impl Fn(&[f64]) -> f64) {
    assert_eq!(x.len(), analytic.len(), "{what}: gradient length");
    let h = 1e-5;
    let step = (x.len() / 40).max(1);
    let mut xp = x.to_vec();
    for i in (0..x.len()).step_by(step) {
        xp[i] = x[i] + h;
        let up = loss(&xp);
        xp[i] = x[i] - h;
        let down = loss(&xp);
        xp[i] = x[i];
        let numeric = (up - down) / (2.0 * h);
        let err = (numeric - analytic[i]).abs();
        assert!(
            err <= 1e-6 * (1.0 + numeric.abs()),
            "{what}[{i}]: analytic {} vs numeric {numeric}",
            analytic[i]
        );
    }
}

#[test]
fn linear() {
    let (rows, i, o) = (4, 5, 3);
    let (x, w, b, r) = (
        rand_vec(rows * i, 1),
        rand_vec(o * i, 2),
        rand_vec(o, 3),
        rand_vec(rows * o, 4),
    );
    let (dx, dw, db) = ops::linear::backward(&x, rows, i, &w, o, &r, true);
    check("linear dx", &x, &dx.unwrap(), |x| {
        dot(&r, &ops::linear::forward(x, rows, i, &w, o, Some(&b)))
    });
    check("linear dw", &w, &dw, |w| {
        dot(&r, &ops::linear::forward(&x, rows, i, w, o, Some(&b)))
    });
    check("linear db", &b, &db, |b| {
        dot(&r, &ops::linear::forward(&x, rows, i, &w, o, Some(b)))
    });
}

#[test]
fn activations() {
    // Keep ReLU inputs away from its kink.
    let x: Vec<f64> = rand_vec(30, 5)
        .iter()
        .map(|v| if v.abs() < 0.05 { v + 0.1 } else { *v } * 3.0)
        .collect();
    let r = rand_vec(30, 6);
    let y = ops::activation::relu_forward(&x);
    check("relu", &x, &ops::activation::relu_backward(&y, &r), |x| {
        dot(&r, &ops::activation::relu_forward(x))
    });
    check("gelu", &x, &ops::activation::gelu_backward(&x, &r), |x| {
        dot(&r, &ops::activation::gelu_forward(x))
    });
}

#[test]
fn layer_norm() {
    let d = 7;
    let (x, w, b, r) = (
        rand_vec(4 * d, 7),
        rand_vec(d, 8),
        rand_vec(d, 9),
        rand_vec(4 * d, 10),
    );
    let f = |x: &[f64], w: &[f64], b: &[f64]| {
        dot(&r, &ops::layernorm::forward(x, d, Some((w, b)), 1e-5).0)
    };
    let (_, saved) = ops::layernorm::forward(&x, d, Some((&w, &b)), 1e-5);
    let (dx, dp) = ops::layernorm::backward(&x, d, Some(&w), &saved, &r);
    let (dw, db) = dp.unwrap();
    check("ln dx", &x, &dx, |x| f(x, &w, &b));
    check("ln dw", &w, &dw, |w| f(&x, w, &b));
    check("ln db", &b, &db, |b| f(&x, &w, b));
    let (_, saved) = ops::layernorm::forward(&x, d, None, 1e-5);
    let (dx, _) = ops::layernorm::backward(&x, d, None, &saved, &r);
    check("ln plain dx", &x, &dx, |x| {
        dot(&r, &ops::layernorm::forward(x, d, None, 1e-5).0)
    });
}

#[test]
fn softmax_and_log_softmax() {
    let d = 6;
    let (x, r) = (rand_vec(3 * d, 11), rand_vec(3 * d, 12));
    let y = ops::softmax::softmax_forward(&x, d);
    check(
        "softmax",
        &x,
        &ops::softmax::softmax_backward(&y, &r, d),
        |x| dot(&r, &ops::softmax::softmax_forward(x, d)),
    );
    let y = ops::softmax::log_softmax_forward(&x, d);
    check(
        "log_softmax",
        &x,
        &ops::softmax::log_softmax_backward(&y, &r, d),
        |x| dot(&r, &ops::softmax::log_softmax_forward(x, d)),
    );
}

#[test]
fn dropout() {
    let (x, r) = (rand_vec(50, 13), rand_vec(50, 14));
    check("dropout", &x, &ops::dropout::backward(&r, 0.3, 99), |x| {
        dot(&r, &ops::dropout::forward(x, 0.3, 99))
    });
}

#[test]
fn masked_mean_pooling() {
    let (c, offsets) = (3, [0usize, 2, 7, 8]);
    let (x, r) = (rand_vec(8 * c, 15), rand_vec(3 * c, 16));
    check(
        "mean_pool",
        &x,
        &ops::pooling::mean_backward(&r, c, &offsets),
        |x| dot(&r, &ops::pooling::mean_forward(x, c, &offsets)),
    );
}

#[test]
fn layer_axis_convolution() {
    for (i, g) in [
        ConvGeom {
            l_in: 13,
            c_in: 4,
            c_out: 5,
            kernel: 5,
            stride: 3,
            pad: 2,
        },
        ConvGeom {
            l_in: 5,
            c_in: 3,
            c_out: 2,
            kernel: 5,
            stride: 3,
            pad: 2,
        },
        ConvGeom {
            l_in: 7,
            c_in: 2,
            c_out: 3,
            kernel: 4,
            stride: 2,
            pad: 2,
        },
        ConvGeom {
            l_in: 2,
            c_in: 3,
            c_out: 3,
            kernel: 5,
            stride: 3,
            pad: 2,
        },
    ]
    .into_iter()
    .enumerate()
    {
        // n = 1 takes the one-sequence strided-GEMM forward; n = 3 a GEMM per output position.
        for n in [1usize, 3] {
            let seed = 20 + 4 * i as u64 + n as u64;
            let (x, w, b) = (
                rand_vec(n * g.l_in * g.c_in, seed),
                rand_vec(g.c_out * g.c_in * g.kernel, seed + 1),
                rand_vec(g.c_out, seed + 2),
            );
            let r = rand_vec(n * g.l_out() * g.c_out, seed + 3);
            let (dx, dw, db) = ops::layer_conv::backward(&x, n, &w, &g, &r, true);
            let f = |x: &[f64], w: &[f64], b: &[f64]| {
                dot(&r, &ops::layer_conv::forward(x, n, w, b, &g))
            };
            check(&format!("conv{i} dx"), &x, &dx.unwrap(), |x| f(x, &w, &b));
            check(&format!("conv{i} dw"), &w, &dw, |w| f(&x, w, &b));
            check(&format!("conv{i} db"), &b, &db, |b| f(&x, &w, b));
        }
    }
}

#[test]
fn layer_weighted_sum_over_a_range() {
    let (n, l, d) = (4, 7, 5);
    for (first, k) in [(0usize, 7usize), (2, 3)] {
        let (x, w, r) = (
            rand_vec(n * l * d, 40 + first as u64),
            rand_vec(k, 41),
            rand_vec(n * d, 42),
        );
        let (dw, dx) = ops::layer_sum::backward(&x, l, d, first, &w, &r, true);
        check("ws dw", &w, &dw, |w| {
            dot(&r, &ops::layer_sum::forward(&x, l, d, first, w))
        });
        check("ws dx", &x, &dx.unwrap(), |x| {
            dot(&r, &ops::layer_sum::forward(x, l, d, first, &w))
        });
    }
}

#[test]
fn attention() {
    let g = AttnGeom {
        sq: 2,
        sk: 5,
        heads: 2,
        head_dim: 3,
    };
    let n = 3;
    let e = g.heads * g.head_dim;
    let (q, k, v) = (
        rand_vec(n * g.sq * e, 50),
        rand_vec(n * g.sk * e, 51),
        rand_vec(n * g.sk * e, 52),
    );
    let r = rand_vec(n * g.sq * e, 53);
    let (_, probs) = ops::attention::forward(&q, &k, &v, n, &g);
    let (dq, dk, dv) = ops::attention::backward(&q, &k, &v, &probs, &r, n, &g);
    let f = |q: &[f64], k: &[f64], v: &[f64]| dot(&r, &ops::attention::forward(q, k, v, n, &g).0);
    check("attn dq", &q, &dq, |q| f(q, &k, &v));
    check("attn dk", &k, &dk, |k| f(&q, k, &v));
    check("attn dv", &v, &dv, |v| f(&q, &k, v));
}

#[test]
fn ctc() {
    let v = 5;
    let offsets = [0usize, 6, 10];
    let targets = [1usize, 1, 2, 3];
    let toff = [0usize, 3, 4];
    let raw = rand_vec(10 * v, 60);
    // The loss is defined for any log-probabilities, normalised or not.
    let lp: Vec<f64> = ops::softmax::log_softmax_forward(&raw, v);
    for red in [ops::ctc::Reduction::Mean, ops::ctc::Reduction::Sum] {
        let res = ops::ctc::forward_backward(&lp, v, &offsets, &targets, &toff, 0, red, false);
        check("ctc dlp", &lp, &res.grad, |lp| {
            ops::ctc::forward_backward(lp, v, &offsets, &targets, &toff, 0, red, false).loss
        });
    }
}

#[test]
fn cross_entropy() {
    let (x, labels) = (rand_vec(4 * 6, 61), [0usize, 5, 2, 2]);
    for red in [ops::ctc::Reduction::Mean, ops::ctc::Reduction::Sum] {
        let (_, g) = ops::cross_entropy::forward_backward(&x, 6, &labels, red);
        check("ce", &x, &g, |x| {
            ops::cross_entropy::forward_backward(x, 6, &labels, red).0
        });
    }
}

#[test]
fn shape_ops() {
    use ops::shape::*;
    let (l, d, n) = (4, 3, 2);
    let x = rand_vec(n * l * d, 70);
    let r = rand_vec(n * d, 71);
    check(
        "select_layer",
        &x,
        &select_layer_backward(&r, l, d, 2),
        |x| dot(&r, &select_layer(x, l, d, 2)),
    );
    let r = rand_vec(n * l * d, 72);
    check(
        "flatten",
        &x,
        &flatten_channel_major_backward(&r, l, d),
        |x| dot(&r, &flatten_channel_major(x, l, d)),
    );
    let tok = rand_vec(d, 73);
    let r = rand_vec(n * (l + 1) * d, 74);
    let (dx, dt) = prepend_token_backward(&r, l, d);
    check("prepend dx", &x, &dx, |x| {
        dot(&r, &prepend_token(x, l, d, &tok))
    });
    check("prepend dtoken", &tok, &dt, |t| {
        dot(&r, &prepend_token(&x, l, d, t))
    });
    let (a, b) = (rand_vec(3 * 2, 75), rand_vec(3 * 4, 76));
    let r = rand_vec(3 * 6, 77);
    let parts = split_cols(&r, &[2, 4], 3);
    check("concat a", &a, &parts[0], |a| {
        dot(&r, &concat_cols(&[a, &b], &[2, 4], 3))
    });
    check("concat b", &b, &parts[1], |b| {
        dot(&r, &concat_cols(&[&a, b], &[2, 4], 3))
    });
}

#[test]
fn speaker_head_ops() {
    use ops::speaker::*;
    // Three utterances (9, 12, 10 frames), c = 3: TDNN context 3, dilation 2 keeps 5, 8, 6.
    let (c, offsets) = (3, vec![0, 9, 21, 31]);
    let x = rand_vec(31 * c, 21);
    let (y, out_offsets) = time_context_forward(&x, c, &offsets, 3, 2);
    assert_eq!(out_offsets, vec![0, 5, 13, 19]);
    // Frame 1 of utterance 1 is input frames 10, 12, 14 side by side.
    assert_eq!(
        &y[6 * 9..7 * 9],
        [&x[30..33], &x[36..39], &x[42..45]].concat()
    );
    let r = rand_vec(y.len(), 22);
    let dx = time_context_backward(&r, c, &offsets, &out_offsets, 3, 2);
    check("time context dx", &x, &dx, |x| {
        dot(&r, &time_context_forward(x, c, &offsets, 3, 2).0)
    });
    assert_eq!(context_frames(14, 5, 1), Some(10));
    assert_eq!(context_frames(4, 5, 1), None);
    assert_eq!(context_frames(4, 3, 2), None);

    let y = stats_pool_forward(&x, c, &offsets);
    // Utterance 0, feature 0: mean and unbiased std by hand.
    let f0: Vec<f64> = (0..9).map(|t| x[t * c]).collect();
    let m = f0.iter().sum::<f64>() / 9.0;
    let s = (f0.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / 8.0).sqrt();
    assert!((y[0] - m).abs() < 1e-12 && (y[c] - s).abs() < 1e-12);
    let r = rand_vec(y.len(), 23);
    let dx = stats_pool_backward(&r, &x, &y, c, &offsets);
    check("stats pool dx", &x, &dx, |x| {
        dot(&r, &stats_pool_forward(x, c, &offsets))
    });

    // A channel constant over an utterance (a silent ReLU unit): torch's std backward gives it
    // no std gradient, only the mean's 1 / n (seen in the venv: zeros(5, 3) -> 0.2 each).
    let mut flat = x.clone();
    (0..9).for_each(|t| flat[t * c + 1] = 0.0);
    let y = stats_pool_forward(&flat, c, &offsets);
    let ones = vec![1.0; y.len()];
    let dx = stats_pool_backward(&ones, &flat, &y, c, &offsets);
    assert_eq!(y[c + 1], 0.0);
    assert!(
        (0..9).all(|t| (dx[t * c + 1] - 1.0 / 9.0).abs() < 1e-15),
        "{dx:?}"
    );
    assert!(dx.iter().all(|v| v.is_finite()));

    let y = l2_normalize_forward(&x, c);
    let norm: f64 = y[..c].iter().map(|v| v * v).sum();
    assert!((norm - 1.0).abs() < 1e-12);
    let r = rand_vec(y.len(), 24);
    let dx = l2_normalize_backward(&r, &x, c);
    check("l2 normalize dx", &x, &dx, |x| {
        dot(&r, &l2_normalize_forward(x, c))
    });
}

#[test]
fn ml_superb_head_ops() {
    // Packed self-attention over utterances of 3, 5 and 1 frames, with and without dropout on
    // the probabilities (a fixed seed makes the dropped function deterministic).
    let offsets = [0usize, 3, 8, 9];
    let (heads, hd) = (2, 3);
    let n = 9 * heads * hd;
    let (q, k, v, r) = (
        rand_vec(n, 41),
        rand_vec(n, 42),
        rand_vec(n, 43),
        rand_vec(n, 44),
    );
    for drop in [None, Some(ops::attention::ProbDropout { p: 0.3, seed: 9 })] {
        let f = |q: &[f64], k: &[f64], v: &[f64]| {
            ops::attention::packed_forward((q, k, v), &offsets, heads, hd, drop).0
        };
        let (_, probs) = ops::attention::packed_forward((&q, &k, &v), &offsets, heads, hd, drop);
        let (dq, dk, dv) =
            ops::attention::packed_backward((&q, &k, &v), &probs, &r, &offsets, heads, hd, drop);
        check("packed attention dq", &q, &dq, |q| dot(&r, &f(q, &k, &v)));
        check("packed attention dk", &k, &dk, |k| dot(&r, &f(&q, k, &v)));
        check("packed attention dv", &v, &dv, |v| dot(&r, &f(&q, &k, v)));
    }
    // Utterance mean normalization.
    let x = rand_vec(9 * 4, 45);
    let r = rand_vec(9 * 4, 46);
    let dx = ops::pooling::center(&r, 4, &offsets);
    check("utterance centering", &x, &dx, |x| {
        dot(&r, &ops::pooling::center(x, 4, &offsets))
    });
    // SpecAugment's time warp: a linear map of frames, backward its transpose.
    let taps = ops::resample::time_warp_taps(2, 9, 4, 6);
    let x = rand_vec(11 * 3, 49);
    let r = rand_vec(9 * 3, 50);
    let dx = ops::resample::mix_backward(&r, 3, &taps, 11);
    check("time warp", &x, &dx, |x| {
        dot(&r, &ops::resample::mix_forward(x, 3, &taps))
    });
    // Conv2d patches (stride 2, 2 channels over 6 features), utterances of 4 and 5 frames.
    let g = ops::conv2d::PatchGeom {
        freq: 6,
        channels: 2,
        kernel: 3,
        stride: 2,
    };
    let offsets = [0usize, 4, 9];
    let x = rand_vec(9 * 12, 47);
    let (y, outs) = ops::conv2d::patches_forward(&x, &offsets, &g);
    let r = rand_vec(y.len(), 48);
    let dx = ops::conv2d::patches_backward(&r, &offsets, &outs, &g);
    check("conv2d patches", &x, &dx, |x| {
        dot(&r, &ops::conv2d::patches_forward(x, &offsets, &g).0)
    });
}

#[test]
fn lstm_through_time() {
    // Utterances of 3, 5, 1 and 5 frames (unsorted, a tie, a single frame), both directions: the
    // gradients of the gate pre-activations and of W_hh through the whole recurrence.
    let offsets = [0usize, 3, 8, 9, 14];
    let hidden = 3;
    let pre = rand_vec(14 * 4 * hidden, 51);
    let w_hh = rand_vec(4 * hidden * hidden, 52);
    let r = rand_vec(14 * hidden, 53);
    for reverse in [false, true] {
        let f = |pre: &[f64], w: &[f64]| ops::lstm::forward(pre, w, &offsets, hidden, reverse).0;
        let (h, saved) = ops::lstm::forward(&pre, &w_hh, &offsets, hidden, reverse);
        let (dpre, dw) = ops::lstm::backward(&r, &h, &saved, &w_hh, &offsets, hidden, reverse);
        check("lstm d pre", &pre, &dpre, |p| dot(&r, &f(p, &w_hh)));
        check("lstm d w_hh", &w_hh, &dw, |w| dot(&r, &f(&pre, w)));
    }
}

#[test]
fn per_layer_projections_equal_each_layers_linear_side_by_side() {
    let (n, l, d, k) = (5usize, 4usize, 7usize, 3usize);
    let (x, w, b, r) = (
        rand_vec(n * l * d, 90),
        rand_vec(l * k * d, 91),
        rand_vec(l * k, 92),
        rand_vec(n * l * k, 93),
    );
    let y = ops::linear::per_layer_forward(&x, (n, l, d), &w, &b, k);
    // The composition it replaces: each layer copied out, its Linear, the outputs concatenated.
    let parts: Vec<Vec<f64>> = (0..l)
        .map(|li| {
            let xl = ops::shape::select_layer(&x, l, d, li);
            let (wl, bl) = (&w[li * k * d..(li + 1) * k * d], &b[li * k..(li + 1) * k]);
            ops::linear::forward(&xl, n, d, wl, k, Some(bl))
        })
        .collect();
    let views: Vec<&[f64]> = parts.iter().map(|p| p.as_slice()).collect();
    let want = ops::shape::concat_cols(&views, &vec![k; l], n);
    for (i, (a, e)) in y.iter().zip(&want).enumerate() {
        assert!((a - e).abs() <= 1e-12, "y[{i}] = {a}, per layer {e}");
    }
    let dx = ops::linear::per_layer_backward_input(&r, (n, l, d), &w, k);
    check("per-layer projections dx", &x, &dx, |x| {
        dot(&r, &ops::linear::per_layer_forward(x, (n, l, d), &w, &b, k))
    });
}

/// The tape's op over [`ops::linear::per_layer_forward`]: the stack's gradient reaches the input.
#[test]
fn layer_projections_on_the_tape_pass_the_stack_gradient() {
    use strata::{ParamStore, Tape, Tensor};
    let (n, l, d, k) = (3usize, 5usize, 4usize, 2usize);
    let f32s = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
    let (x, w, b, r) = (
        f32s(rand_vec(n * l * d, 94)),
        f32s(rand_vec(l * k * d, 95)),
        f32s(rand_vec(l * k, 96)),
        f32s(rand_vec(n * l * k, 97)),
    );
    let mut tape = Tape::new();
    let xs = tape
        .input_requiring_grad(Tensor::from_vec(x.clone(), &[n, l, d]).unwrap())
        .unwrap();
    let (wt, bt) = (
        Tensor::from_vec(w.clone(), &[l, k, d]).unwrap(),
        Tensor::from_vec(b.clone(), &[l, k]).unwrap(),
    );
    let y = tape.layer_projections(xs, &wt, &bt).unwrap();
    assert_eq!(tape.shape(y), &[n, l * k]);
    let probe = Tensor::from_vec(r.clone(), &[n, l * k]).unwrap();
    let loss = tape.dot_const(y, &probe).unwrap();
    let grads = tape.backward(loss, &mut ParamStore::new()).unwrap();
    let want = ops::linear::per_layer_backward_input(&r, (n, l, d), &w, k);
    assert_eq!(
        grads.get(xs).expect("the stack's gradient"),
        want.as_slice()
    );
    // Weights that do not fit the stack are an error naming the op.
    let bad = Tensor::from_vec(vec![0.0; l * k * (d + 1)], &[l, k, d + 1]).unwrap();
    let err = tape
        .layer_projections(xs, &bad, &bt)
        .unwrap_err()
        .to_string();
    assert!(err.contains("layer_projections"), "{err}");
}

/// No frames in, no frames out: the ops that read the stack through per-position or per-layer
/// views return empty results rather than slicing past empty buffers.
#[test]
fn stack_ops_take_zero_frames() {
    let g = ConvGeom {
        l_in: 13,
        c_in: 4,
        c_out: 3,
        kernel: 5,
        stride: 3,
        pad: 2,
    };
    let w = rand_vec(g.c_out * g.c_in * g.kernel, 1);
    let b = rand_vec(g.c_out, 2);
    assert!(ops::layer_conv::forward::<f64>(&[], 0, &w, &b, &g).is_empty());
    let (dx, dw, db) = ops::layer_conv::backward::<f64>(&[], 0, &w, &g, &[], true);
    assert!(dx.unwrap().is_empty());
    assert!(dw.iter().chain(&db).all(|&v| v == 0.0));
    let (l, d, k) = (13usize, 4usize, 2usize);
    let (pw, pb) = (rand_vec(l * k * d, 3), rand_vec(l * k, 4));
    assert!(ops::linear::per_layer_forward::<f64>(&[], (0, l, d), &pw, &pb, k).is_empty());
    assert!(ops::linear::per_layer_backward_input::<f64>(&[], (0, l, d), &pw, k).is_empty());
}
