//! The README's library example, compiled and run: an HConv interface + PR head trained with CTC
//! and AdamW on a (here random) hidden-state stack. `cargo run --release --example library`

use strata::models::{
    head::PrHead,
    interface::{self, InterfaceConfig},
};
use strata::optim::{clip_grad_norm, Adam, AdamConfig};
use strata::{rng::Rng, PackedBatch, ParamStore, Reduction, Tape, Tensor};

fn main() -> strata::Result<()> {
    let (l, d, vocab) = (13, 768, 42);
    let mut rng = Rng::new(0);
    let mut store = ParamStore::new();
    let hconv = interface::build(
        &InterfaceConfig::hconv(l, d),
        &mut store,
        "interface.",
        &mut rng,
    )?;
    let head = PrHead::new(
        &mut store,
        "head.",
        hconv.output_dim(),
        256,
        vocab,
        &mut rng,
    )?;
    let mut opt = Adam::new(AdamConfig::adamw(1e-3), &store)?;

    // One packed batch: utterances of 120 and 95 frames -> a frame-major stack [215, 13, 768].
    let batch = PackedBatch::from_lengths(&[120, 95])?;
    let stack = Tensor::from_vec(
        (0..215 * l * d).map(|_| rng.normal()).collect(),
        &[215, l, d],
    )?;
    let targets: Vec<Vec<usize>> = vec![(1..30).collect(), (5..25).collect()]; // 0 is the CTC blank

    for step in 0..3 {
        store.zero_grad();
        let mut tape = Tape::new();
        let s = tape.constant(stack.clone())?; // frozen upstream: no gradient
        let feats = hconv.forward(&mut tape, &store, s)?;
        let logits = head.forward(&mut tape, &store, feats)?;
        let lp = tape.log_softmax(logits)?;
        let loss = tape.ctc_loss(lp, &batch, &targets, Reduction::Mean, true)?;
        println!("step {step}: ctc loss {:.4}", tape.value(loss).item()?);
        tape.backward(loss, &mut store)?;
        drop(tape);
        clip_grad_norm(&mut store, 1.0)?;
        opt.step(&mut store)?;
    }
    Ok(())
}
