//! Heads, CTC and cross-entropy against PyTorch, plus the elementwise/norm ops on their own.
//! Tolerance 1e-5 relative to each tensor's scale.

mod common;
use common::{assert_close, split_targets, Fixture};
use strata::models::head::{PrHead, UtteranceClassifier};
use strata::rng::Rng;
use strata::{PackedBatch, ParamStore, Reduction, Tape};

const TOL: f64 = 1e-5;

#[test]
fn pr_head_with_ctc_matches_pytorch() {
    let fx = Fixture::load("heads.safetensors");
    let lengths = fx.usizes("lengths");
    let batch = PackedBatch::from_lengths(&lengths).unwrap();
    let targets = split_targets(&fx.usizes("targets"), &[2, 3, 1]);
    let mut store = ParamStore::new();
    let head = PrHead::new(&mut store, "", 10, 256, 7, &mut Rng::new(0)).unwrap();
    fx.load_params(&mut store, "pr.param.");
    let mut tape = Tape::new();
    let x = tape.input_requiring_grad(fx.tensor("pr.x")).unwrap();
    let logits = head.forward(&mut tape, &store, x).unwrap();
    assert_close(
        "pr logits",
        &tape.value(logits).to_vec(),
        fx.f("pr.logits"),
        TOL,
    );
    let lp = tape.log_softmax(logits).unwrap();
    let loss = tape
        .ctc_loss(lp, &batch, &targets, Reduction::Mean, true)
        .unwrap();
    assert_close("pr loss", &tape.value(loss).to_vec(), fx.f("pr.loss"), TOL);
    let g = tape.backward(loss, &mut store).unwrap();
    assert_close("pr dx", g.get(x).unwrap(), fx.f("pr.dx"), TOL);
    for p in store.iter() {
        assert_close(
            &format!("pr grad {}", p.name),
            &p.grad,
            fx.f(&format!("pr.grad.{}", p.name)),
            TOL,
        );
    }
}

#[test]
fn utterance_classifier_with_cross_entropy_matches_pytorch() {
    let fx = Fixture::load("heads.safetensors");
    let batch = PackedBatch::from_lengths(&fx.usizes("lengths")).unwrap();
    let mut store = ParamStore::new();
    let head = UtteranceClassifier::new(&mut store, "", 10, 256, 4, &mut Rng::new(0)).unwrap();
    fx.load_params(&mut store, "cls.param.");
    let mut tape = Tape::new();
    let x = tape.input_requiring_grad(fx.tensor("pr.x")).unwrap();
    let logits = head.forward(&mut tape, &store, x, &batch).unwrap();
    assert_close(
        "cls logits",
        &tape.value(logits).to_vec(),
        fx.f("cls.logits"),
        TOL,
    );
    let loss = tape
        .cross_entropy(logits, &fx.usizes("cls.labels"), Reduction::Mean)
        .unwrap();
    assert_close(
        "cls loss",
        &tape.value(loss).to_vec(),
        fx.f("cls.loss"),
        TOL,
    );
    let g = tape.backward(loss, &mut store).unwrap();
    assert_close("cls dx", g.get(x).unwrap(), fx.f("cls.dx"), TOL);
    for p in store.iter() {
        assert_close(
            &format!("cls grad {}", p.name),
            &p.grad,
            fx.f(&format!("cls.grad.{}", p.name)),
            TOL,
        );
    }
}

#[test]
fn ctc_matches_pytorch_on_repeats_blanks_impossible_and_mixed_lengths() {
    let fx = Fixture::load("losses.safetensors");
    for case in [
        "repeats",
        "blank_heavy",
        "impossible",
        "impossible2",
        "mixed",
    ] {
        let lengths = fx.usizes(&format!("ctc.{case}.lengths"));
        let tl = fx.usizes(&format!("ctc.{case}.target_lengths"));
        let targets = split_targets(&fx.usizes(&format!("ctc.{case}.targets")), &tl);
        let batch = PackedBatch::from_lengths(&lengths).unwrap();
        for (red, reduction) in [("mean", Reduction::Mean), ("sum", Reduction::Sum)] {
            let mut tape = Tape::new();
            let x = tape
                .input_requiring_grad(fx.tensor(&format!("ctc.{case}.logits")))
                .unwrap();
            let lp = tape.log_softmax(x).unwrap();
            let loss = tape
                .ctc_loss(lp, &batch, &targets, reduction, true)
                .unwrap();
            assert_close(
                &format!("ctc {case} {red} loss"),
                &tape.value(loss).to_vec(),
                fx.f(&format!("ctc.{case}.{red}.loss")),
                TOL,
            );
            let g = tape.backward(loss, &mut ParamStore::new()).unwrap();
            assert_close(
                &format!("ctc {case} {red} dlogits"),
                g.get(x).unwrap(),
                fx.f(&format!("ctc.{case}.{red}.dlogits")),
                TOL,
            );
        }
        // reduction='none': the per-utterance losses.
        let lp = strata::ops::softmax::log_softmax_forward(fx.f(&format!("ctc.{case}.logits")), 6);
        let flat: Vec<usize> = targets.concat();
        let mut toff = vec![0];
        for t in &targets {
            toff.push(toff.last().unwrap() + t.len());
        }
        let offs = batch.offsets();
        let r =
            strata::ops::ctc::forward_backward(&lp, 6, offs, &flat, &toff, 0, Reduction::Sum, true);
        assert_close(
            &format!("ctc {case} per-utterance"),
            &r.per_utterance,
            fx.f(&format!("ctc.{case}.none.loss")),
            TOL,
        );
    }
}

#[test]
fn ctc_without_zero_infinity_reports_inf_loss_and_nan_gradient() {
    let fx = Fixture::load("losses.safetensors");
    let lp = strata::ops::softmax::log_softmax_forward(fx.f("ctc.impossible2.logits"), 6);
    let r = strata::ops::ctc::forward_backward(
        &lp,
        6,
        &[0, 2, 7],
        &[2, 2, 2, 3],
        &[0, 2, 4],
        0,
        Reduction::Sum,
        false,
    );
    assert!(r.per_utterance[0].is_infinite() && r.loss.is_infinite());
    assert!(
        r.grad[..12].iter().all(|g| g.is_nan()),
        "no made-up gradient for an impossible alignment"
    );
    assert!(
        r.grad[12..].iter().all(|g| g.is_finite()),
        "the possible utterance keeps its gradient"
    );
}

#[test]
fn cross_entropy_matches_pytorch() {
    let fx = Fixture::load("losses.safetensors");
    for (red, reduction) in [("mean", Reduction::Mean), ("sum", Reduction::Sum)] {
        let mut tape = Tape::new();
        let x = tape.input_requiring_grad(fx.tensor("ce.logits")).unwrap();
        let loss = tape
            .cross_entropy(x, &fx.usizes("ce.labels"), reduction)
            .unwrap();
        assert_close(
            &format!("ce {red} loss"),
            &tape.value(loss).to_vec(),
            fx.f(&format!("ce.{red}.loss")),
            TOL,
        );
        let g = tape.backward(loss, &mut ParamStore::new()).unwrap();
        assert_close(
            &format!("ce {red} dlogits"),
            g.get(x).unwrap(),
            fx.f(&format!("ce.{red}.dlogits")),
            TOL,
        );
    }
}

#[test]
fn elementwise_and_norm_ops_match_pytorch() {
    let fx = Fixture::load("ops.safetensors");
    let r = fx.tensor("r");
    for name in [
        "gelu",
        "relu",
        "softmax",
        "log_softmax",
        "ln_affine",
        "ln_plain",
    ] {
        let mut tape = Tape::new();
        let mut store = ParamStore::new();
        let x = tape.input_requiring_grad(fx.tensor("x")).unwrap();
        let (w, b) = (
            store.add("w", fx.tensor("ln.weight")).unwrap(),
            store.add("b", fx.tensor("ln.bias")).unwrap(),
        );
        let y = match name {
            "gelu" => tape.gelu(x),
            "relu" => tape.relu(x),
            "softmax" => tape.softmax(x),
            "log_softmax" => tape.log_softmax(x),
            "ln_affine" => {
                let (w, b) = (tape.param(&store, w), tape.param(&store, b));
                tape.layer_norm(x, Some((w, b)), 1e-5)
            }
            _ => tape.layer_norm(x, None, 1e-5),
        }
        .unwrap();
        assert_close(
            &format!("{name} y"),
            &tape.value(y).to_vec(),
            fx.f(&format!("{name}.y")),
            TOL,
        );
        let loss = tape.dot_const(y, &r).unwrap();
        let g = tape.backward(loss, &mut store).unwrap();
        assert_close(
            &format!("{name} dx"),
            g.get(x).unwrap(),
            fx.f(&format!("{name}.dx")),
            TOL,
        );
        if name == "ln_affine" {
            assert_close("ln dweight", store.grad(w), fx.f("ln_affine.dweight"), TOL);
            assert_close("ln dbias", store.grad(b), fx.f("ln_affine.dbias"), TOL);
        }
    }
}

#[test]
fn speaker_head_with_am_softmax_matches_pytorch() {
    use common::check_vs_torch;
    use strata::models::head::{SpeakerHead, SpeakerHeadConfig};
    // tools/gen_speaker_fixture.py: s3prl's sv_voxceleb1 modules at width 16, last TDNN 24, in
    // float64 (the reference) and in float32 ("f32.": PyTorch's own float32 result). strata's
    // float32 error is held to twice PyTorch's (flash-attention's rule), or 1e-6.
    let fx = Fixture::load("speaker.safetensors");
    let check = |what: &str, got: &[f32], key: &str| check_vs_torch(&fx, what, got, key, 1e-6);
    let batch = PackedBatch::from_lengths(&fx.usizes("lengths")).unwrap();
    let labels = fx.usizes("labels");
    let config = SpeakerHeadConfig {
        width: 16,
        agg_width: 24,
        ..SpeakerHeadConfig::default()
    };
    let mut store = ParamStore::new();
    let head = SpeakerHead::new(&mut store, "head.", 12, config, 5, &mut Rng::new(0)).unwrap();
    fx.load_params(&mut store, "");
    let mut tape = Tape::new();
    let x = tape.input_requiring_grad(fx.tensor("x")).unwrap();
    let logits = head
        .am_logits(&mut tape, &store, x, &batch, &labels)
        .unwrap();
    let loss = tape
        .cross_entropy(logits, &labels, Reduction::Mean)
        .unwrap();
    check("loss", &tape.value(loss).to_vec(), "loss");
    let g = tape.backward(loss, &mut store).unwrap();
    check("dx", g.get(x).unwrap(), "grad.x");
    for p in store.iter() {
        check(&p.name, &p.grad, &format!("grad.{}", p.name));
    }
    let mut tape = Tape::no_grad();
    let x = tape.constant(fx.tensor("x")).unwrap();
    let e = head.embed(&mut tape, &store, x, &batch).unwrap();
    check("embedding", &tape.value(e).to_vec(), "embedding");
    // Too short for the TDNN windows (14 frames lost): an error naming the utterance.
    let short = PackedBatch::from_lengths(&[20, 14]).unwrap();
    let mut tape = Tape::no_grad();
    let x = tape.constant(strata::Tensor::zeros(&[34, 12])).unwrap();
    let err = head
        .embed(&mut tape, &store, x, &short)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("utterance 1 of the batch has 14 frames"),
        "{err}"
    );
}

#[test]
fn equal_error_rate_matches_sklearn_and_scipy() {
    use strata::train::metrics::{cosine, equal_error_rate};
    let fx = Fixture::load("speaker.safetensors");
    let scores: Vec<f64> = fx.f("eer.scores").iter().map(|&s| s as f64).collect();
    let targets: Vec<bool> = fx.usizes("eer.targets").iter().map(|&t| t == 1).collect();
    let eer = equal_error_rate(&scores, &targets).unwrap();
    let want = fx.f("eer.value")[0] as f64;
    assert!((eer - want).abs() < 1e-6, "EER {eer} vs scipy's {want}");
    // Perfect separation, total confusion, and what has no EER.
    assert_eq!(
        equal_error_rate(&[0.9, 0.8, 0.1, 0.2], &[true, true, false, false]),
        Some(0.0)
    );
    assert_eq!(
        equal_error_rate(&[0.1, 0.2, 0.9, 0.8], &[true, true, false, false]),
        Some(1.0)
    );
    assert_eq!(
        equal_error_rate(&[0.5; 4], &[true, false, true, false]),
        Some(0.5)
    );
    assert_eq!(equal_error_rate(&[0.5, 0.4], &[true, true]), None);
    assert!((cosine(&[1.0, 0.0], &[1.0, 1.0]) - 0.5f64.sqrt()).abs() < 1e-12);
    assert_eq!(cosine(&[0.0, 0.0], &[1.0, 1.0]), 0.0);
}
