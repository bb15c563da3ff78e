//! The README's library example, compiled and run: an upstream (a Hugging Face model directory
//! given as the first argument, or a tiny random-init one) runs on audio to the stack of every
//! hidden state; an HConv interface + PR head is trained on it with CTC and AdamW.
//! `cargo run --release --example library [MODEL_DIR]`

use strata::models::upstream::{Upstream, UpstreamConfig};
use strata::models::{
    head::PrHead,
    interface::{self, InterfaceConfig},
};
use strata::optim::{clip_grad_norm, Adam, AdamConfig};
use strata::{rng::Rng, ParamStore, Reduction, Tape};

fn main() -> strata::Result<()> {
    let upstream = match std::env::args().nth(1) {
        Some(dir) => Upstream::load(std::path::Path::new(&dir))?,
        None => Upstream::random(UpstreamConfig::tiny(), 0)?,
    };
    // Two utterances of 16 kHz mono audio (from strata::audio::read_audio in real use).
    let a: Vec<f32> = (0..24000).map(|i| (i as f32 * 0.05).sin() * 0.3).collect();
    let b: Vec<f32> = (0..16000).map(|i| (i as f32 * 0.11).sin() * 0.3).collect();
    // The frozen upstream's every hidden state, packed frame-major: [frames, L, D].
    let (stack, batch) = upstream.forward(&[&a, &b], &["a", "b"])?;
    let (l, d, vocab) = (upstream.num_states(), upstream.hidden_size(), 42);
    println!(
        "stack {:?}, utterance offsets {:?}",
        stack.shape(),
        batch.offsets()
    );

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
    let targets: Vec<Vec<usize>> = vec![(1..20).collect(), (5..15).collect()]; // 0 is the CTC blank

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
    store.save_safetensors(&std::env::temp_dir().join("strata-library-example.safetensors"))?;
    Ok(())
}
