//! SUPERB's ASR head (projector, bidirectional LSTMs, CTC) against s3prl's modules in PyTorch, and
//! its training-mode dropout.

mod common;
use common::{assert_close, check_vs_torch, learn_to_spell, spelled, split_targets, Fixture};
use strata::models::asr_head::{AsrHead, AsrHeadConfig};
use strata::rng::Rng;
use strata::{PackedBatch, ParamStore, Reduction, Tape, Tensor};

/// tools/gen_asr_fixture.py's sizes.
fn small_config() -> AsrHeadConfig {
    AsrHeadConfig {
        project_dim: 8,
        hidden: 6,
        layers: 2,
        ..AsrHeadConfig::default()
    }
}

#[test]
fn asr_head_with_ctc_matches_s3prl_in_pytorch() {
    // float64 PyTorch is the reference; strata's float32 error is held to twice PyTorch's own
    // float32 error (flash-attention's rule), or 2e-6 of the tensor's scale.
    let fx = Fixture::load("asr.safetensors");
    let check = |what: &str, got: &[f32], key: &str| check_vs_torch(&fx, what, got, key, 2e-6);
    let batch = PackedBatch::from_lengths(&fx.usizes("lengths")).unwrap();
    let targets = split_targets(&fx.usizes("targets"), &fx.usizes("target_lengths"));
    let mut store = ParamStore::new();
    let head = AsrHead::new(&mut store, "head.", 10, small_config(), 7, &mut Rng::new(0)).unwrap();
    assert_eq!(
        store.num_scalars(),
        AsrHead::num_params(10, &small_config(), 7)
    );
    fx.load_params(&mut store, "");
    let mut tape = Tape::new();
    let x = tape.input_requiring_grad(fx.tensor("x")).unwrap();
    let logits = head.forward(&mut tape, &store, x, &batch, None).unwrap();
    check("logits", &tape.value(logits).to_vec(), "logits");
    let lp = tape.log_softmax(logits).unwrap();
    let loss = tape
        .ctc_loss(lp, &batch, &targets, Reduction::Mean, true)
        .unwrap();
    check("loss", &tape.value(loss).to_vec(), "loss");
    let g = tape.backward(loss, &mut store).unwrap();
    check("dx", g.get(x).unwrap(), "grad.x");
    let mut checked = 0;
    for p in store.iter() {
        check(&p.name, &p.grad, &format!("grad.{}", p.name));
        checked += 1;
    }
    // projector, linear: 2 each; 2 layers x 2 directions x 4 tensors.
    assert_eq!(checked, 2 + 2 + 2 * 2 * 4);
}

#[test]
fn dropout_comes_from_the_training_seed_and_evaluation_has_none() {
    let mut store = ParamStore::new();
    let head = AsrHead::new(&mut store, "head.", 10, small_config(), 7, &mut Rng::new(1)).unwrap();
    let batch = PackedBatch::from_lengths(&[9, 14]).unwrap();
    let mut rng = Rng::new(5);
    let x = Tensor::from_vec((0..23 * 10).map(|_| rng.normal()).collect(), &[23, 10]).unwrap();
    let run = |train: Option<u64>| {
        let mut tape = Tape::no_grad();
        let xv = tape.constant(x.clone()).unwrap();
        let y = head.forward(&mut tape, &store, xv, &batch, train).unwrap();
        tape.value(y).to_vec()
    };
    let eval = run(None);
    assert_eq!(eval, run(None));
    assert_eq!(run(Some(3)), run(Some(3)));
    assert_ne!(run(Some(3)), run(Some(4)));
    assert_ne!(run(Some(3)), eval);
}

#[test]
fn utterances_of_a_packed_batch_do_not_see_each_other() {
    // Each utterance is its own sequence in both directions: alone or packed with others (in
    // any order), its outputs are the same (to rounding: the GEMMs block differently by rows).
    let mut store = ParamStore::new();
    let head = AsrHead::new(&mut store, "head.", 10, small_config(), 7, &mut Rng::new(2)).unwrap();
    let mut rng = Rng::new(6);
    let lengths = [5usize, 12, 1, 12];
    let xs: Vec<Vec<f32>> = (lengths.iter())
        .map(|&n| (0..n * 10).map(|_| rng.normal()).collect())
        .collect();
    let run = |parts: &[usize]| {
        let batch =
            PackedBatch::from_lengths(&parts.iter().map(|&u| lengths[u]).collect::<Vec<_>>())
                .unwrap();
        let data: Vec<f32> = parts.iter().flat_map(|&u| xs[u].clone()).collect();
        let frames = data.len() / 10;
        let mut tape = Tape::no_grad();
        let xv = tape
            .constant(Tensor::from_vec(data, &[frames, 10]).unwrap())
            .unwrap();
        let y = head.forward(&mut tape, &store, xv, &batch, None).unwrap();
        tape.value(y).to_vec()
    };
    let packed = run(&[0, 1, 2, 3]);
    let mut at = 0;
    for u in [0usize, 1, 2, 3] {
        let alone = run(&[u]);
        assert_close(
            &format!("utterance {u}"),
            &packed[at..at + alone.len()],
            &alone,
            1e-6,
        );
        at += alone.len();
    }
    let reordered = run(&[3, 2, 1, 0]);
    assert_close(
        "reordered",
        &reordered[..12 * 7],
        &packed[(5 + 12 + 1) * 7..],
        1e-6,
    );
}

#[test]
fn bad_sizes_are_refused_by_name() {
    let mut store = ParamStore::new();
    for bad in [
        AsrHeadConfig {
            hidden: 0,
            ..small_config()
        },
        AsrHeadConfig {
            dropout: 1.0,
            ..small_config()
        },
        // A width typed by mistake: refused before any allocation (W_hh alone would take 160 GB).
        AsrHeadConfig {
            hidden: 100_000,
            ..small_config()
        },
        AsrHeadConfig {
            layers: usize::MAX / 2,
            ..small_config()
        },
    ] {
        let err = AsrHead::new(&mut store, "head.", 10, bad, 7, &mut Rng::new(0))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("ASR head"), "{err}");
    }
    let head = AsrHead::new(&mut store, "head.", 10, small_config(), 7, &mut Rng::new(0)).unwrap();
    let batch = PackedBatch::from_lengths(&[4, 3]).unwrap();
    let mut tape = Tape::no_grad();
    let x = tape.constant(Tensor::zeros(&[6, 10])).unwrap();
    let err = head
        .forward(&mut tape, &store, x, &batch, None)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("lstm input") || err.contains("linear"),
        "{err}"
    );
}

#[test]
fn the_head_learns_to_transcribe_features_that_spell_the_tokens() {
    use strata::train::side_by_side::CtcHead;
    // Training as s3prl (dropout 0.2 after each LSTM layer), narrowed to 32 units. CTC's blank
    // plateau lasts some 250 steps here (CER 1.0, then 0.29 at step 315, 0 from step 400 in a
    // run without dropout); 600 steps leave room for other rounding (CPUs without AVX-512).
    let head = CtcHead::Asr(AsrHeadConfig {
        project_dim: 32,
        hidden: 32,
        ..AsrHeadConfig::default()
    });
    let (before, after) = learn_to_spell(head, 3e-3, 600);
    assert!(
        before > 0.5 && after < 0.2,
        "held-out CER {before} -> {after}"
    );
}

#[test]
fn a_pair_trains_with_dropout_and_scores_without() {
    use strata::models::interface::InterfaceConfig;
    use strata::optim::AdamConfig;
    use strata::train::side_by_side::{CtcHead, HeadKind, Pair, PairSpec};
    let mut rng = Rng::new(12);
    let codes: Vec<Vec<f32>> = (0..6)
        .map(|_| (0..16).map(|_| rng.normal()).collect())
        .collect();
    let (stack, batch, targets) = spelled(4, &mut rng, &codes);
    // The training loss against the mean of the per-utterance losses an evaluation scores (the
    // same 'mean' reduction): equal without dropout, apart with it.
    let gap = |dropout: f64| {
        let mut spec = PairSpec::new("ws", InterfaceConfig::weighted_sum(2, 16));
        spec.ctc_head = CtcHead::Asr(AsrHeadConfig {
            project_dim: 16,
            hidden: 8,
            dropout,
            ..AsrHeadConfig::default()
        });
        let kind = HeadKind::Ctc { vocab: 6 };
        let mut pair = Pair::from_spec(&spec, kind, AdamConfig::adam(1e-3), None, 1).unwrap();
        let (_, scored) = pair.decode_scored(&stack, &batch, Some(&targets)).unwrap();
        let scored = scored.unwrap();
        let eval = scored.iter().sum::<f64>() / scored.len() as f64;
        let train = pair.accumulate(&stack, &batch, &targets, 1.0).unwrap() as f64;
        (train - eval).abs() / eval
    };
    assert!(gap(0.0) < 1e-6, "{}", gap(0.0));
    // (At the initialisation the outputs are nearly uniform: dropout moves the loss ~4e-4.)
    assert!(gap(0.5) > 1e-4, "{}", gap(0.5));
}
