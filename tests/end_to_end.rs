//! 20 training steps of HConv + PR head + CTC + clip 1.0 + AdamW from PyTorch's initial parameters on
//! a fixed packed batch: the loss at every step matches PyTorch's to 1e-4 relative.

mod common;
use common::{split_targets, Fixture};
use strata::models::head::PrHead;
use strata::models::interface::{self, InterfaceConfig};
use strata::optim::{clip_grad_norm, Adam, AdamConfig};
use strata::rng::Rng;
use strata::{PackedBatch, ParamStore, Reduction, Tape};

#[test]
fn hconv_pr_ctc_adamw_loss_trajectory_matches_pytorch() {
    let fx = Fixture::load("end_to_end.safetensors");
    let (l, d, v) = (13, 24, 8);
    let mut rng = Rng::new(0);
    let mut store = ParamStore::new();
    let itf = interface::build(
        &InterfaceConfig::hconv(l, d),
        &mut store,
        "interface.",
        &mut rng,
    )
    .unwrap();
    let head = PrHead::new(&mut store, "head.", itf.output_dim(), 256, v, &mut rng).unwrap();
    fx.load_params(&mut store, "init.");
    let batch = PackedBatch::from_lengths(&fx.usizes("lengths")).unwrap();
    let targets = split_targets(&fx.usizes("targets"), &fx.usizes("target_lengths"));
    let stack = fx.tensor("stack");
    let mut opt = Adam::new(AdamConfig::adamw(2e-3), &store).unwrap();
    let want = fx.f("losses");
    let mut worst = 0f32;
    for (step, &want_loss) in want.iter().enumerate() {
        store.zero_grad();
        let mut tape = Tape::new();
        let s = tape.constant(stack.clone()).unwrap();
        let feats = itf.forward(&mut tape, &store, s).unwrap();
        let logits = head.forward(&mut tape, &store, feats).unwrap();
        let lp = tape.log_softmax(logits).unwrap();
        let loss = tape
            .ctc_loss(lp, &batch, &targets, Reduction::Mean, true)
            .unwrap();
        let got = tape.value(loss).item().unwrap();
        tape.backward(loss, &mut store).unwrap();
        drop(tape);
        clip_grad_norm(&mut store, 1.0).unwrap();
        opt.step(&mut store).unwrap();
        let rel = ((got - want_loss) / want_loss).abs();
        worst = worst.max(rel);
        assert!(
            rel <= 1e-4,
            "step {step}: loss {got} vs PyTorch {want_loss} (rel {rel:.2e})"
        );
    }
    eprintln!("worst per-step relative loss error over 20 steps: {worst:.2e}");
    assert!(
        want[19] < 0.5 * want[0],
        "the fixture itself shows learning"
    );
    for p in store.iter() {
        common::assert_close(
            &format!("final {}", p.name),
            &p.value.to_vec(),
            fx.f(&format!("final.{}", p.name)),
            1e-4,
        );
    }
}
