//! The ML-SUPERB head (ESPnet's transformer CTC downstream) against PyTorch, and its training-mode
//! behaviour (SpecAugment and dropout drawn from a seed).

mod common;
use common::{check_vs_torch, learn_to_spell, split_targets, Fixture};
use strata::models::mlsuperb_head::{MlSuperbHead, MlSuperbHeadConfig};
use strata::rng::Rng;
use strata::{PackedBatch, ParamStore, Reduction, Tape, Tensor};

/// tools/gen_mlsuperb_fixture.py's sizes.
fn small_config() -> MlSuperbHeadConfig {
    MlSuperbHeadConfig {
        preencoder_dim: 16,
        width: 16,
        heads: 4,
        ffn: 32,
        blocks: 2,
        ..MlSuperbHeadConfig::default()
    }
}

fn small_head(store: &mut ParamStore) -> MlSuperbHead {
    MlSuperbHead::new(store, "head.", 12, small_config(), 7, &mut Rng::new(0)).unwrap()
}

#[test]
fn ml_superb_head_with_ctc_matches_espnet_in_pytorch() {
    // float64 PyTorch is the reference; strata's float32 error is held to twice PyTorch's own
    // float32 error (flash-attention's rule), or 2e-6 of the tensor's scale: through some 20
    // layers both sit at 0.3-1.7e-6, float32's rounding floor.
    let fx = Fixture::load("mlsuperb.safetensors");
    let check = |what: &str, got: &[f32], key: &str| check_vs_torch(&fx, what, got, key, 2e-6);
    let batch = PackedBatch::from_lengths(&fx.usizes("lengths")).unwrap();
    let targets = split_targets(&fx.usizes("targets"), &fx.usizes("target_lengths"));
    let mut store = ParamStore::new();
    let head = small_head(&mut store);
    fx.load_params(&mut store, "");
    let mut tape = Tape::new();
    let x = tape.input_requiring_grad(fx.tensor("x")).unwrap();
    let (logits, out) = head.forward(&mut tape, &store, x, &batch, None).unwrap();
    assert_eq!(out.lengths(), fx.usizes("out_lengths"));
    check("logits", &tape.value(logits).to_vec(), "logits");
    let lp = tape.log_softmax(logits).unwrap();
    let sum = tape
        .ctc_loss(lp, &out, &targets, Reduction::Sum, true)
        .unwrap();
    let loss = tape.scale(sum, 1.0 / 3.0).unwrap();
    check("loss", &tape.value(loss).to_vec(), "loss");
    let g = tape.backward(loss, &mut store).unwrap();
    check("dx", g.get(x).unwrap(), "grad.x");
    let mut checked = 0;
    for p in store.iter() {
        checked += 1;
        if p.name.ends_with("linear_k.bias") {
            // Zero in exact arithmetic (a shift shared by every key leaves the softmax as it
            // is): both float32 results are rounding noise, so hold it to zero against the
            // scale of the key weights' gradient.
            let w = p.name.replace("bias", "weight");
            let scale = fx
                .f(&format!("grad.{w}"))
                .iter()
                .fold(0f32, |m, v| m.max(v.abs()));
            let worst = p.grad.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(worst <= 1e-5 * scale, "{}: {worst} vs {scale}", p.name);
            continue;
        }
        check(&p.name, &p.grad, &format!("grad.{}", p.name));
    }
    // preencoder, 2 convolutions, embed.out, 2 x 8 block layers, after_norm, ctc_lo: 2 each.
    assert_eq!(checked, 2 * (4 + 2 * 8 + 2));
}

#[test]
fn too_short_utterances_are_refused_by_name() {
    let mut store = ParamStore::new();
    let head = small_head(&mut store);
    let batch = PackedBatch::from_lengths(&[20, 6]).unwrap();
    let mut tape = Tape::no_grad();
    let x = tape.constant(Tensor::zeros(&[26, 12])).unwrap();
    let err = head
        .forward(&mut tape, &store, x, &batch, None)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("utterance 1 of the batch has 6 frames") && err.contains("at least 7"),
        "{err}"
    );
}

#[test]
fn training_masks_come_from_the_seed_and_evaluation_has_none() {
    let mut store = ParamStore::new();
    let head = MlSuperbHead::new(
        &mut store,
        "head.",
        12,
        MlSuperbHeadConfig {
            dropout: 0.3,
            attention_dropout: 0.3,
            ..small_config()
        },
        7,
        &mut Rng::new(1),
    )
    .unwrap();
    let batch = PackedBatch::from_lengths(&[40, 25]).unwrap();
    let mut rng = Rng::new(5);
    let x = Tensor::from_vec((0..65 * 12).map(|_| rng.normal()).collect(), &[65, 12]).unwrap();
    let run = |train: Option<u64>| {
        let mut tape = Tape::no_grad();
        let xv = tape.constant(x.clone()).unwrap();
        let (y, _) = head.forward(&mut tape, &store, xv, &batch, train).unwrap();
        tape.value(y).to_vec()
    };
    let eval = run(None);
    assert_eq!(eval, run(None));
    assert_eq!(run(Some(3)), run(Some(3)));
    assert_ne!(run(Some(3)), run(Some(4)));
    assert_ne!(run(Some(3)), eval);
    // Without dropout and SpecAugment a training forward is the evaluation one.
    let mut plain = ParamStore::new();
    let quiet = MlSuperbHead::new(
        &mut plain,
        "head.",
        12,
        MlSuperbHeadConfig {
            dropout: 0.0,
            attention_dropout: 0.0,
            specaug: None,
            ..small_config()
        },
        7,
        &mut Rng::new(1),
    )
    .unwrap();
    let run_quiet = |train: Option<u64>| {
        let mut tape = Tape::no_grad();
        let xv = tape.constant(x.clone()).unwrap();
        let (y, _) = quiet.forward(&mut tape, &plain, xv, &batch, train).unwrap();
        tape.value(y).to_vec()
    };
    assert_eq!(run_quiet(Some(3)), run_quiet(None));
}

#[test]
fn time_warp_is_pytorchs_bicubic_interpolation_of_each_side_of_the_center() {
    use strata::ops::resample::{mix_forward, time_warp_taps};
    let fx = Fixture::load("mlsuperb.safetensors");
    for i in 0..4 {
        let geom = fx.usizes(&format!("warp{i}.geom"));
        let (t, center, warped) = (geom[0], geom[1], geom[2]);
        // Two frames before the utterance: taps address the packed batch.
        let mut x = vec![9.0f32; 2 * 6];
        x.extend_from_slice(fx.f(&format!("warp{i}.x")));
        let y = mix_forward(&x, 6, &time_warp_taps(2, t, center, warped));
        common::assert_close(
            &format!("warp {geom:?}"),
            &y,
            fx.f(&format!("warp{i}.y")),
            1e-6,
        );
    }
}

#[test]
fn the_head_learns_to_transcribe_features_that_spell_the_tokens() {
    use strata::models::mlsuperb_head::SpecAugmentConfig;
    use strata::train::side_by_side::CtcHead;
    // Training as the recipe (dropout, time warp, masks), feature masks narrowed to 16 features.
    let head = CtcHead::MlSuperb(MlSuperbHeadConfig {
        width: 32,
        heads: 4,
        ffn: 64,
        specaug: Some(SpecAugmentConfig {
            freq_width: (0, 3),
            ..SpecAugmentConfig::default()
        }),
        ..MlSuperbHeadConfig::default()
    });
    let (before, after) = learn_to_spell(head, 2e-3, 150);
    assert!(
        before > 0.5 && after < 0.2,
        "held-out CER {before} -> {after}"
    );
}
