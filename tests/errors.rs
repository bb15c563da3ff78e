//! Bad input is an error that names the shapes or the value, never a panic.

use strata::models::head::PrHead;
use strata::models::interface::{self, ClsActivation, InterfaceConfig, InterfaceKind};
use strata::rng::Rng;
use strata::{Error, PackedBatch, ParamStore, Reduction, Tape, Tensor};

fn msg<T>(r: strata::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn interface_rejects_a_stack_of_the_wrong_shape() {
    let mut store = ParamStore::new();
    let itf = interface::build(
        &InterfaceConfig::hconv(13, 16),
        &mut store,
        "",
        &mut Rng::new(0),
    )
    .unwrap();
    for bad in [[4, 25, 16], [4, 13, 32]] {
        let mut tape = Tape::new();
        let s = tape.constant(Tensor::zeros(&bad)).unwrap();
        let m = msg(itf.forward(&mut tape, &store, s));
        assert!(
            m.contains("[frames, 13, 16]") && m.contains(&format!("{bad:?}")),
            "{m}"
        );
    }
}

#[test]
fn interface_rejects_nan_in_the_stack() {
    let mut store = ParamStore::new();
    let itf = interface::build(
        &InterfaceConfig::weighted_sum(3, 2),
        &mut store,
        "",
        &mut Rng::new(0),
    )
    .unwrap();
    let mut v = vec![0.0f32; 2 * 3 * 2];
    v[2 * 3 + 2 + 1] = f32::NAN; // frame 1, layer 1
    let mut tape = Tape::new();
    let s = tape
        .constant(Tensor::from_vec(v, &[2, 3, 2]).unwrap())
        .unwrap();
    let m = msg(itf.forward(&mut tape, &store, s));
    assert!(m.contains("frame 1, layer 1"), "{m}");
}

#[test]
fn impossible_interface_configs_are_rejected() {
    let cases = [
        InterfaceConfig::new(
            13,
            16,
            InterfaceKind::HConv {
                kernel: 5,
                stride: 1,
                depth: None,
            },
        ),
        InterfaceConfig::new(
            13,
            1,
            InterfaceKind::HConv {
                kernel: 5,
                stride: 3,
                depth: None,
            },
        ),
        InterfaceConfig::new(
            4,
            8,
            InterfaceKind::GroupWs {
                groups: 5,
                out_dim: 8,
            },
        ),
        // A mistyped kernel: refused by name, not an aborted allocation of its weights.
        InterfaceConfig::new(
            25,
            1024,
            InterfaceKind::HConv {
                kernel: 100_000,
                stride: 3,
                depth: None,
            },
        ),
        InterfaceConfig::new(4, 8, InterfaceKind::SingleLayer { layer: 4 }),
        InterfaceConfig::new(4, 8, InterfaceKind::SingleLayer { layer: -5 }),
        InterfaceConfig::new(
            4,
            8,
            InterfaceKind::ClsPool {
                heads: 3,
                ffn_dim: 8,
                activation: ClsActivation::Relu,
            },
        ),
        InterfaceConfig::new(0, 8, InterfaceKind::WeightedSum),
    ];
    for cfg in cases {
        let r = interface::build(&cfg, &mut ParamStore::new(), "", &mut Rng::new(0));
        assert!(
            matches!(r, Err(Error::Config(_))),
            "{cfg:?} should be rejected"
        );
    }
    // Negative single-layer indices count from the end, as in the official config (-1 = last).
    let ok = InterfaceConfig::new(4, 8, InterfaceKind::SingleLayer { layer: -1 });
    assert!(interface::build(&ok, &mut ParamStore::new(), "", &mut Rng::new(0)).is_ok());
}

fn logits_tape(frames: usize, v: usize) -> (Tape, strata::Var) {
    let mut tape = Tape::new();
    let x = tape
        .input_requiring_grad(Tensor::zeros(&[frames, v]))
        .unwrap();
    (tape, x)
}

#[test]
fn ctc_rejects_bad_targets() {
    let batch = PackedBatch::from_lengths(&[3, 2]).unwrap();
    let (mut tape, x) = logits_tape(5, 4);
    let m = msg(tape.ctc_loss(x, &batch, &[vec![1], vec![4]], Reduction::Mean, true));
    assert!(m.contains("utterance 1") && m.contains("label 4"), "{m}");
    let m = msg(tape.ctc_loss(x, &batch, &[vec![0], vec![1]], Reduction::Mean, true));
    assert!(m.contains("label 0") && m.contains("blank"), "{m}");
    let m = msg(tape.ctc_loss(x, &batch, &[vec![1], vec![1, 2, 3]], Reduction::Mean, true));
    assert!(
        m.contains("utterance 1") && m.contains("target length 3") && m.contains("input length 2"),
        "{m}"
    );
    let m = msg(tape.ctc_loss(x, &batch, &[vec![1]], Reduction::Mean, true));
    assert!(m.contains("2 utterances"), "{m}");
    let other = PackedBatch::from_lengths(&[3, 3]).unwrap();
    let m = msg(tape.ctc_loss(x, &other, &[vec![1], vec![1]], Reduction::Mean, true));
    assert!(
        m.contains("[6 frames, vocab]") && m.contains("[5, 4]"),
        "{m}"
    );
}

#[test]
fn cross_entropy_rejects_labels_outside_the_classes() {
    let (mut tape, x) = logits_tape(2, 3);
    let m = msg(tape.cross_entropy(x, &[0, 3], Reduction::Mean));
    assert!(
        m.contains("example 1") && m.contains("label 3") && m.contains("3 classes"),
        "{m}"
    );
    let m = msg(tape.cross_entropy(x, &[0], Reduction::Mean));
    assert!(m.contains("[1 labels, classes]"), "{m}");
}

#[test]
fn batches_need_frames() {
    assert!(msg(PackedBatch::from_lengths(&[3, 0])).contains("utterance 1 has 0 frames"));
    assert!(PackedBatch::from_lengths(&[]).is_err());
}

#[test]
fn op_shape_mismatches_name_both_shapes() {
    let mut tape = Tape::new();
    let x = tape.constant(Tensor::zeros(&[4, 5])).unwrap();
    let w = tape.constant(Tensor::zeros(&[3, 6])).unwrap();
    let m = msg(tape.linear(x, w, None));
    assert!(m.contains("[4, 5]") && m.contains("[3, 6]"), "{m}");
    let b = tape.constant(Tensor::zeros(&[4, 6])).unwrap();
    assert!(msg(tape.add(x, b)).contains("[4, 6]"));
    assert!(msg(Tensor::from_vec(vec![1.0; 5], &[2, 3])).contains("6 elements"));
    let half = Tensor::zeros(&[2]).to_dtype(strata::DType::BF16);
    assert!(msg(tape.constant(half)).contains("to_dtype"));
}

#[test]
fn parameter_files_that_do_not_fit_are_errors() {
    let mut store = ParamStore::new();
    PrHead::new(&mut store, "head.", 4, 8, 3, &mut Rng::new(0)).unwrap();
    assert!(
        msg(store.load_from_safetensors(b"not a safetensors file", "", "bad.safetensors"))
            .contains("bad.safetensors")
    );
    // A file written from a differently-shaped head: the mismatch names the parameter.
    let mut other = ParamStore::new();
    PrHead::new(&mut other, "head.", 4, 8, 5, &mut Rng::new(0)).unwrap();
    let dir = std::env::temp_dir().join(format!("strata-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("other.safetensors");
    other.save_safetensors(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let m = msg(store.load_from_safetensors(&bytes, "", "other.safetensors"));
    assert!(
        m.contains("head.out.weight") && m.contains("[3, 8]") && m.contains("[5, 8]"),
        "{m}"
    );
    let m = msg(store.load_from_safetensors(&bytes, "missing.", "other.safetensors"));
    assert!(
        m.contains("has no tensor 'missing.head.proj.weight'"),
        "{m}"
    );
    // A round trip restores the exact values.
    let mut same = ParamStore::new();
    PrHead::new(&mut same, "head.", 4, 8, 5, &mut Rng::new(7)).unwrap();
    same.load_from_safetensors(&bytes, "", "other.safetensors")
        .unwrap();
    for (a, b) in same.iter().zip(other.iter()) {
        assert_eq!(a.value.to_vec(), b.value.to_vec());
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn optimizer_rejects_bad_hyper_parameters() {
    let store = ParamStore::new();
    let mut cfg = strata::optim::AdamConfig::adamw(1e-3);
    cfg.beta1 = 1.0;
    assert!(strata::optim::Adam::new(cfg, &store).is_err());
    assert!(strata::optim::clip_grad_norm(&mut ParamStore::new(), 0.0).is_err());
}

#[test]
fn zero_width_inputs_are_errors_not_divisions_by_zero() {
    let mut tape = Tape::new();
    let x = tape.constant(Tensor::zeros(&[3, 0])).unwrap();
    let w = tape.constant(Tensor::zeros(&[2, 0])).unwrap();
    assert!(msg(tape.linear(x, w, None)).contains("at least one input feature"));
    assert!(msg(tape.layer_norm(x, None, 1e-5)).contains("non-empty last dimension"));
    assert!(msg(tape.softmax(x)).contains("non-empty last dimension"));
    assert!(msg(tape.log_softmax(x)).contains("non-empty last dimension"));
}
