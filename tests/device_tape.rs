//! The device tape (src/autograd/device_tape.rs) against the CPU tape on one small graph that
//! exercises what the tape itself does, beyond the kernels (tests/kernels.rs): a value feeding two
//! ops (its gradients summed), a parameter read by an op that does not fuse its gradient (the
//! tape adds it), a broadcast row, fp32 <-> bf16 casts that pass the gradient through, an input
//! leaf's returned gradient, and the loss seed. Then the tape's refusals, and the stack's own
//! gradient (a trainable upstream) back through WS (with and without normalize), two GroupWS
//! groups and an HConv conv. The device computes in bf16 with fp32 accumulation, so gradients
//! match within a bf16-sized margin (seen: at most 0.4% relative L2; bound 2%).

mod common;
use common::backends;
use strata::autograd::{DeviceParam, DeviceTape, ParamStore, Tape};
use strata::ops::ctc::Reduction;
use strata::runtime::Backend;
use strata::Tensor;

use half::bf16;

const ROWS: usize = 6;
const D: usize = 16;
const CLASSES: usize = 5;
const SEED: f32 = 0.5;

/// Deterministic values exactly representable in bf16 (so both paths read the same numbers).
fn values(len: usize, salt: u32, scale: f32) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let h = (i as u32)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(salt.wrapping_mul(40_503));
            let u = ((h >> 8) % 2001) as f32 / 1000.0 - 1.0;
            bf16::from_f32(u * scale).to_f32()
        })
        .collect()
}

/// The graph's parameters: (name, shape, values).
fn parameters() -> Vec<(&'static str, Vec<usize>, Vec<f32>)> {
    vec![
        ("w1", vec![D, D], values(D * D, 1, 0.4)),
        ("b1", vec![D], values(D, 2, 0.1)),
        ("t", vec![1, D], values(D, 3, 1.0)),
        (
            "ln_w",
            vec![D],
            values(D, 4, 0.5).iter().map(|v| v + 1.0).collect(),
        ),
        ("ln_b", vec![D], values(D, 5, 0.2)),
        ("w2", vec![CLASSES, D], values(CLASSES * D, 6, 0.5)),
        ("b2", vec![CLASSES], values(CLASSES, 7, 0.1)),
    ]
}

/// A run's loss, named parameter gradients and input gradient.
type Run = (f32, Vec<(String, Vec<f32>)>, Vec<f32>);

fn labels() -> Vec<usize> {
    (0..ROWS).map(|r| (r * 3 + 1) % CLASSES).collect()
}

/// The CPU tape's loss, parameter gradients (by name) and input gradient:
/// h = x W1^T + b1; h2 = h + LN(t) (every row); y = gelu(LN(h2; ln_w, ln_b)) + h2;
/// loss = SEED * CE(y W2^T + b2).
fn cpu(x: &[f32]) -> Run {
    let mut store = ParamStore::new();
    let ids: Vec<_> = parameters()
        .into_iter()
        .map(|(n, s, v)| store.add(n, Tensor::from_vec(v, &s).unwrap()).unwrap())
        .collect();
    let mut tape = Tape::new();
    let p: Vec<_> = ids.iter().map(|&id| tape.param(&store, id)).collect();
    let xv = tape
        .input_requiring_grad(Tensor::from_vec(x.to_vec(), &[ROWS, D]).unwrap())
        .unwrap();
    let h = tape.linear(xv, p[0], Some(p[1])).unwrap();
    let t = tape.layer_norm(p[2], None, 1e-5).unwrap();
    let t = tape.reshape(t, &[D]).unwrap();
    // The row broadcast as a Linear with an identity weight and the row as its bias.
    let eye: Vec<f32> = (0..D * D)
        .map(|i| if i / D == i % D { 1.0 } else { 0.0 })
        .collect();
    let eye = tape
        .constant(Tensor::from_vec(eye, &[D, D]).unwrap())
        .unwrap();
    let h2 = tape.linear(h, eye, Some(t)).unwrap();
    let n = tape.layer_norm(h2, Some((p[3], p[4])), 1e-5).unwrap();
    let a = tape.gelu(n).unwrap();
    let y = tape.add(a, h2).unwrap();
    let logits = tape.linear(y, p[5], Some(p[6])).unwrap();
    let ce = tape
        .cross_entropy(logits, &labels(), Reduction::Mean)
        .unwrap();
    let loss = tape.scale(ce, SEED).unwrap();
    let ce_value = tape.value(ce).item().unwrap();
    let grads = tape.backward(loss, &mut store).unwrap();
    let named = parameters()
        .iter()
        .zip(&ids)
        .map(|((n, _, _), &id)| (n.to_string(), store.grad(id).to_vec()))
        .collect();
    (ce_value, named, grads.get(xv).unwrap().to_vec())
}

/// The same graph on the device tape.
fn device(be: &Backend, x: &[f32]) -> Run {
    let params: Vec<DeviceParam> = parameters()
        .iter()
        .map(|(n, s, v)| DeviceParam::upload(be, n, v, s).unwrap())
        .collect();
    let x16: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
    let xb = be.upload(&x16).unwrap();
    let mut tape = DeviceTape::new(be);
    let p: Vec<_> = params.iter().map(|q| tape.param(q).unwrap()).collect();
    let xv = tape.input_requiring_grad(&xb, &[ROWS, D]).unwrap();
    let h = tape.linear(xv, p[0], p[1], true).unwrap();
    let t = tape.layer_norm(p[2], None, 1e-5).unwrap();
    let h2 = tape.add_row(h, t).unwrap();
    let n = tape.layer_norm(h2, Some((p[3], p[4])), 1e-5).unwrap();
    let a = tape.activation(n, true).unwrap();
    let y = tape.add(a, h2).unwrap();
    let y16 = tape.to_bf16(y).unwrap();
    let logits = tape.linear(y16, p[5], p[6], true).unwrap();
    let loss = tape.cross_entropy(logits, &labels()).unwrap();
    let value = tape.loss_value(loss).unwrap();
    let grads = tape.backward(loss, SEED).unwrap();
    let dx = grads
        .get(xv)
        .expect("the input's gradient")
        .download(be)
        .unwrap();
    let named = params
        .iter()
        .map(|q| (q.name.clone(), be.download(&q.grad).unwrap()))
        .collect();
    (value, named, dx)
}

fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

#[test]
fn the_device_tape_follows_the_cpu_tape() {
    let x = values(ROWS * D, 9, 1.0);
    let cpu_run = cpu(&x);
    for be in backends() {
        follows_the_cpu_tape_on(&be, &x, &cpu_run);
    }
}

fn follows_the_cpu_tape_on(be: &Backend, x: &[f32], (cpu_loss, cpu_grads, cpu_dx): &Run) {
    let (loss, grads, dx) = device(be, x);
    assert!(
        ((loss - *cpu_loss) / *cpu_loss).abs() < 1e-2,
        "loss {loss} vs the CPU's {cpu_loss}"
    );
    for ((name, got), (_, want)) in grads.iter().zip(cpu_grads) {
        let e = rel_l2(got, want);
        eprintln!("{}: {name}: relative L2 {e:.2e}", be.name());
        assert!(e < 0.02, "parameter {name}: relative L2 error {e:.4}");
        assert!(
            want.iter().any(|v| v.abs() > 1e-6),
            "{name}: a zero gradient"
        );
    }
    let e = rel_l2(&dx, cpu_dx);
    eprintln!(
        "{}: input: relative L2 {e:.2e}; loss {loss} vs {cpu_loss}",
        be.name()
    );
    assert!(e < 0.02, "input gradient: relative L2 error {e:.4}");

    // A second micro-batch accumulates into the same parameter gradients.
    let params: Vec<DeviceParam> = parameters()
        .iter()
        .map(|(n, s, v)| DeviceParam::upload(be, n, v, s).unwrap())
        .collect();
    let xb = be
        .upload(&x.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>())
        .unwrap();
    for _ in 0..2 {
        let mut tape = DeviceTape::new(be);
        let p: Vec<_> = params.iter().map(|q| tape.param(q).unwrap()).collect();
        let xv = tape.input(&xb, &[ROWS, D]).unwrap();
        let logits = tape.linear(xv, p[5], p[6], true).unwrap();
        let loss = tape.cross_entropy(logits, &labels()).unwrap();
        tape.backward(loss, 1.0).unwrap();
    }
    let mut tape = DeviceTape::new(be);
    let p5 = tape.param(&params[5]).unwrap();
    let p6 = tape.param(&params[6]).unwrap();
    let xv = tape.input(&xb, &[ROWS, D]).unwrap();
    let logits = tape.linear(xv, p5, p6, true).unwrap();
    let loss = tape.cross_entropy(logits, &labels()).unwrap();
    let two = be.download(&params[6].grad).unwrap();
    tape.backward(loss, 1.0).unwrap();
    let three = be.download(&params[6].grad).unwrap();
    for (a, b) in two.iter().zip(&three) {
        assert!(
            (b - a * 1.5).abs() <= 1e-5 * a.abs().max(1.0),
            "{a} then {b}"
        );
    }
}

#[test]
fn the_device_tape_refuses_misuse_with_named_errors() {
    for be in backends() {
        refuses_misuse_on(&be);
    }
}

fn refuses_misuse_on(be: &Backend) {
    let x16 = vec![bf16::from_f32(0.5); ROWS * D];
    let xb = be.upload(&x16).unwrap();
    let w = DeviceParam::upload(be, "w", &values(D * D, 1, 0.3), &[D, D]).unwrap();
    let b = DeviceParam::upload(be, "b", &values(D, 2, 0.1), &[D]).unwrap();
    let err = |r: strata::Result<strata::autograd::DVar>| r.expect_err("an error").to_string();

    // A shape that does not hold the buffer.
    let e = DeviceParam::upload(be, "bad", &[1.0; 3], &[2, 2])
        .err()
        .expect("3 values in [2, 2]");
    assert!(e.to_string().contains("'bad'"), "{e}");
    let mut tape = DeviceTape::new(be);
    assert!(err(tape.input(&xb, &[ROWS, D + 1])).contains("elements"));
    let e = err(tape.param_as(&b, &[2, D]));
    assert!(
        e.contains("'b'") && e.contains(&format!("{D} elements")),
        "{e}"
    );
    // Dtypes: the Linear reads bf16, log-softmax fp32 (LayerNorm either).
    let xv = tape.input(&xb, &[ROWS, D]).unwrap();
    let (wv, bv) = (tape.param(&w).unwrap(), tape.param(&b).unwrap());
    let h = tape.linear(xv, wv, bv, true).unwrap();
    let e = err(tape.linear(h, wv, bv, true));
    assert!(e.contains("linear") && e.contains("bf16"), "{e}");
    let e = err(tape.log_softmax(xv));
    assert!(e.contains("log_softmax") && e.contains("fp32"), "{e}");
    assert!(tape.layer_norm(xv, None, 1e-5).is_ok());
    // Shapes that do not chain, named with both.
    let e = err(tape.linear(xv, bv, wv, true));
    assert!(
        e.contains("linear") && e.contains(&format!("{:?}", [D])),
        "{e}"
    );
    // The frozen-stack ops refuse an input that needs a gradient.
    let stack = tape.input_requiring_grad(&xb, &[2, 3, D]).unwrap();
    let e = err(tape.select_layer(stack, 1));
    assert!(e.contains("select_layer") && e.contains("gradient"), "{e}");
    // Backward runs once, from a loss.
    let e = tape.backward(h, 1.0).err().expect("not a loss").to_string();
    assert!(e.contains("not a loss"), "{e}");
    let logits = tape.linear(xv, wv, bv, true).unwrap();
    let loss = tape.cross_entropy(logits, &[0; ROWS]).unwrap();
    tape.backward(loss, 1.0).unwrap();
    let e = tape.backward(loss, 1.0).err().expect("twice").to_string();
    assert!(e.contains("already"), "{e}");
    // The ML-SUPERB head's SpecAugment ops take taps and masks made for x's shape only.
    let batch = strata::PackedBatch::from_lengths(&[ROWS]).unwrap();
    let mut tape = DeviceTape::new(be);
    let x32 = tape
        .input(&xb, &[ROWS, D])
        .and_then(|v| tape.to_f32(v))
        .unwrap();
    // The identity on 5 frames, for a 6-frame x.
    let taps: Vec<_> = (0..ROWS - 1)
        .map(|f| [(f, 1.0), (f, 0.0), (f, 0.0), (f, 0.0)])
        .collect();
    let warp = strata::ops::device::DeviceTimeWarp::upload(be, &taps, ROWS - 1).unwrap();
    let e = err(tape.time_warp(x32, warp));
    assert!(
        e.contains("time_warp") && e.contains(&format!("{} frames", ROWS - 1)),
        "{e}"
    );
    let spans = vec![strata::models::mlsuperb_head::MaskedSpans::default()];
    let mask = strata::ops::device::DeviceSpecMask::upload(be, &spans, &batch, D / 2).unwrap();
    let e = err(tape.spec_mask(x32, mask));
    assert!(
        e.contains("spec_mask") && e.contains(&format!("[{ROWS}, {D}]")),
        "{e}"
    );

    // A no-grad tape computes values and refuses backward.
    let mut tape = DeviceTape::no_grad(be);
    let xv = tape.input(&xb, &[ROWS, D]).unwrap();
    let (wv, bv) = (tape.param(&w).unwrap(), tape.param(&b).unwrap());
    let logits = tape.linear(xv, wv, bv, true).unwrap();
    let loss = tape.cross_entropy(logits, &[1; ROWS]).unwrap();
    assert!(tape.loss_value(loss).unwrap().is_finite());
    let e = tape.backward(loss, 1.0).err().expect("no_grad").to_string();
    assert!(e.contains("no_grad"), "{e}");
}

/// The stack's own gradient (a trainable upstream): the interface's first op hands it back through
/// the tape. `interface` is "ws", "ws_norm", "groups" (two GroupWS groups, their stack gradients
/// summed by the op) or "hconv" (the first conv's input gradient).
fn stack_gradient_case(be: &Backend, interface: &str) {
    const N: usize = 5;
    const L: usize = 7;
    const W: usize = 24;
    let x = values(N * L * W, 11, 1.5);
    let groups: Vec<(usize, usize)> = match interface {
        "groups" => vec![(0, 3), (3, 4)],
        _ => vec![(0, L)],
    };
    let geom = strata::ops::layer_conv::ConvGeom {
        l_in: L,
        c_in: W,
        c_out: 8,
        kernel: 5,
        stride: 3,
        pad: 2,
    };
    let feat = match interface {
        "hconv" => geom.c_out * geom.l_out(),
        _ => groups.len() * W,
    };
    let normalize = interface == "ws_norm";
    let ws: Vec<Vec<f32>> = groups
        .iter()
        .enumerate()
        .map(|(g, &(_, k))| values(k, 20 + g as u32, 1.0))
        .collect();
    let conv_w = values(geom.c_out * W * geom.kernel, 30, 0.2);
    let conv_b = values(geom.c_out, 31, 0.1);
    let (head_w, head_b) = (values(CLASSES * feat, 32, 0.3), values(CLASSES, 33, 0.1));
    let labels: Vec<usize> = (0..N).map(|r| (r * 2 + 1) % CLASSES).collect();

    // CPU tape.
    let mut store = ParamStore::new();
    let add = |store: &mut ParamStore, name: &str, v: &[f32], s: &[usize]| {
        store
            .add(name, Tensor::from_vec(v.to_vec(), s).unwrap())
            .unwrap()
    };
    let w_ids: Vec<_> = ws
        .iter()
        .enumerate()
        .map(|(g, w)| add(&mut store, &format!("w{g}"), w, &[w.len()]))
        .collect();
    let cw = add(&mut store, "conv_w", &conv_w, &[geom.c_out, W, geom.kernel]);
    let cb = add(&mut store, "conv_b", &conv_b, &[geom.c_out]);
    let hw = add(&mut store, "head_w", &head_w, &[CLASSES, feat]);
    let hb = add(&mut store, "head_b", &head_b, &[CLASSES]);
    let mut tape = Tape::new();
    let xv = tape
        .input_requiring_grad(Tensor::from_vec(x.clone(), &[N, L, W]).unwrap())
        .unwrap();
    let xs = if normalize {
        tape.layer_norm(xv, None, 1e-5).unwrap()
    } else {
        xv
    };
    let feats = if interface == "hconv" {
        let (w, b) = (tape.param(&store, cw), tape.param(&store, cb));
        let y = tape.layer_conv(xs, w, b, geom.stride, geom.pad).unwrap();
        let y = tape.relu(y).unwrap();
        tape.flatten_channel_major(y).unwrap()
    } else {
        let parts: Vec<_> = groups
            .iter()
            .zip(&w_ids)
            .map(|(&(first, _), &id)| {
                let w = tape.param(&store, id);
                tape.layer_weighted_sum(xs, w, first).unwrap()
            })
            .collect();
        tape.concat_cols(&parts).unwrap()
    };
    let (w, b) = (tape.param(&store, hw), tape.param(&store, hb));
    let logits = tape.linear(feats, w, Some(b)).unwrap();
    let loss = tape
        .cross_entropy(logits, &labels, Reduction::Mean)
        .unwrap();
    let want_dx = tape
        .backward(loss, &mut store)
        .unwrap()
        .get(xv)
        .unwrap()
        .to_vec();
    let mut want_params: Vec<(&str, Vec<f32>)> = vec![("head_w", store.grad(hw).to_vec())];
    if interface == "hconv" {
        let g = strata::ops::device::hconv_weight_tap_major(store.grad(cw), &geom);
        want_params.push(("conv_w", g));
    } else {
        for (g, &id) in w_ids.iter().enumerate() {
            want_params.push((["w0", "w1"][g], store.grad(id).to_vec()));
        }
    }

    // Device tape.
    let dev: Vec<DeviceParam> = ws
        .iter()
        .enumerate()
        .map(|(g, w)| DeviceParam::upload(be, ["w0", "w1"][g], w, &[w.len()]).unwrap())
        .collect();
    let cw_tap = strata::ops::device::hconv_weight_tap_major(&conv_w, &geom);
    let dconv = [
        DeviceParam::upload(be, "conv_w", &cw_tap, &[geom.c_out, geom.kernel * W]).unwrap(),
        DeviceParam::upload(be, "conv_b", &conv_b, &[geom.c_out]).unwrap(),
    ];
    let dhead = [
        DeviceParam::upload(be, "head_w", &head_w, &[CLASSES, feat]).unwrap(),
        DeviceParam::upload(be, "head_b", &head_b, &[CLASSES]).unwrap(),
    ];
    let xb = be
        .upload(&x.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>())
        .unwrap();
    let mut tape = DeviceTape::new(be);
    let xv = tape.input_requiring_grad(&xb, &[N, L, W]).unwrap();
    let feats = if interface == "hconv" {
        let w = tape.param(&dconv[0]).unwrap();
        let b = tape.param(&dconv[1]).unwrap();
        tape.hconv_conv(xv, w, b, geom, true).unwrap()
    } else {
        let gs: Vec<_> = groups
            .iter()
            .zip(&dev)
            .map(|(&(first, k), p)| (first, k, tape.param(p).unwrap()))
            .collect();
        tape.layer_sums(xv, &gs, normalize).unwrap()
    };
    let w = tape.param(&dhead[0]).unwrap();
    let b = tape.param(&dhead[1]).unwrap();
    let logits = tape.linear(feats, w, b, true).unwrap();
    let loss = tape.cross_entropy(logits, &labels).unwrap();
    let grads = tape.backward(loss, 1.0).unwrap();
    let dx = grads
        .get(xv)
        .expect("the stack's gradient")
        .download(be)
        .unwrap();
    let e = rel_l2(&dx, &want_dx);
    eprintln!(
        "{}: {interface}: stack gradient relative L2 {e:.2e}",
        be.name()
    );
    assert!(
        e < 0.02,
        "{interface}: stack gradient off by {e:.4} (relative L2)"
    );
    let got = |name: &str| -> Vec<f32> {
        let p = dev.iter().chain(&dconv).chain(&dhead);
        be.download(&p.into_iter().find(|p| p.name == name).unwrap().grad)
            .unwrap()
    };
    for (name, want) in &want_params {
        let e = rel_l2(&got(name), want);
        eprintln!("{interface}: {name} relative L2 {e:.2e}");
        assert!(e < 0.02, "{interface}: {name} off by {e:.4}");
    }
}

#[test]
fn the_stack_gradient_comes_back_through_the_device_tape() {
    for be in backends() {
        for interface in ["ws", "ws_norm", "groups", "hconv"] {
            stack_gradient_case(&be, interface);
        }
    }
}

#[test]
fn dropout_on_the_device_tape_follows_the_cpu_tapes_mask() {
    let x = values(ROWS * D, 40, 2.0);
    let labels: Vec<usize> = (0..ROWS).map(|r| (r * 5) % D).collect();
    let (p, seed) = (0.3, 1234u64);
    // CPU: loss = CE(dropout(x)) over D classes.
    let mut store = ParamStore::new();
    let mut tape = Tape::new();
    let xv = tape
        .input_requiring_grad(Tensor::from_vec(x.clone(), &[ROWS, D]).unwrap())
        .unwrap();
    let y = tape.dropout(xv, p, seed).unwrap();
    let want_y = tape.value(y).to_vec();
    let loss = tape.cross_entropy(y, &labels, Reduction::Mean).unwrap();
    let want_dx = tape
        .backward(loss, &mut store)
        .unwrap()
        .get(xv)
        .unwrap()
        .to_vec();
    assert!(want_y.contains(&0.0) && want_y.iter().any(|&v| v != 0.0));
    for be in backends() {
        let xb = be
            .upload(&x.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>())
            .unwrap();
        let mut tape = DeviceTape::new(&be);
        let xv = tape.input_requiring_grad(&xb, &[ROWS, D]).unwrap();
        let x32 = tape.to_f32(xv).unwrap();
        let y = tape.dropout(x32, p, seed).unwrap();
        // x is bf16-exact, so the forward is the CPU's bit for bit: same mask, same scale.
        let got_y = be.download(tape.f32_value(y).unwrap()).unwrap();
        assert_eq!(got_y, want_y, "{}: dropout forward", be.name());
        // The backward goes through the loss's bf16 logit gradient: a bf16 margin.
        let loss = tape.cross_entropy(y, &labels).unwrap();
        let grads = tape.backward(loss, 1.0).unwrap();
        let dx = grads.get(xv).unwrap().download(&be).unwrap();
        let e = rel_l2(&dx, &want_dx);
        assert!(e < 1e-2, "{}: dropout backward off by {e:.4}", be.name());
        // Dropped elements get exactly no gradient.
        for ((g, y), x) in dx.iter().zip(&want_y).zip(&x) {
            let dropped = *y == 0.0 && *x != 0.0;
            assert!(
                !dropped || *g == 0.0,
                "{}: a dropped element has gradient {g}",
                be.name()
            );
        }
    }
}
