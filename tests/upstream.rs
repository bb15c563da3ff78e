//! Upstream encoders against `transformers` (tools/gen_upstream_fixtures.py): every hidden state
//! of every utterance, max abs error <= 1e-4 x that state's RMS, per layer. The utterances run as
//! one packed batch; HF ran each alone.

mod common;
use common::Fixture;
use std::path::PathBuf;
use strata::models::upstream::{relative_position_bucket, Upstream};

fn dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/upstream")
        .join(name)
}

fn check_model(name: &str) {
    let model = Upstream::load(&dir(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let waves = Fixture::load("upstream/waves.safetensors");
    let expected = Fixture::load(&format!(
        "upstream/{name}/expected_hidden_states.safetensors"
    ));
    let keys = ["wave0", "wave1", "wave2"];
    let inputs: Vec<&[f32]> = keys.iter().map(|k| waves.f(k)).collect();
    let (stack, batch) = model.forward(&inputs, &keys).unwrap();
    let (l, d) = (model.num_states(), model.hidden_size());
    assert_eq!(stack.shape()[1..], [l, d]);
    let all = stack.to_vec();
    let mut worst = 0f64;
    for (u, key) in keys.iter().enumerate() {
        let want = expected.f(key);
        let (s, e) = (batch.offsets()[u], batch.offsets()[u + 1]);
        assert_eq!(expected.shape(key)[0], e - s, "{name} {key}: frame count");
        let got = &all[s * l * d..e * l * d];
        for layer in 0..l {
            let pick = |v: &[f32]| -> Vec<f32> {
                v.chunks_exact(d)
                    .skip(layer)
                    .step_by(l)
                    .flatten()
                    .copied()
                    .collect()
            };
            let (g, w) = (pick(got), pick(want));
            let rms = (w.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / w.len() as f64).sqrt();
            let err = common::max_abs_diff(&g, &w);
            worst = worst.max(err / rms);
            assert!(
                err <= 1e-4 * rms,
                "{name} {key} layer {layer}: max abs error {err:.3e} > 1e-4 x RMS {rms:.3e}"
            );
        }
    }
    eprintln!("{name}: worst max-abs-error / RMS over states and utterances = {worst:.2e}");
    // In a batch, each utterance equals running it alone.
    let (alone, _) = model.forward(&inputs[1..2], &keys[1..2]).unwrap();
    let (s, e) = (batch.offsets()[1], batch.offsets()[2]);
    assert_eq!(
        alone.to_vec(),
        all[s * l * d..e * l * d].to_vec(),
        "{name}: batched != alone"
    );
}

#[test]
fn hubert_group_norm_post_ln_prefixed_checkpoint_with_weight_g_v() {
    check_model("hubert_group_postln");
}

#[test]
fn wav2vec2_layer_norm_pre_ln_conv_bias_bf16_sharded() {
    check_model("wav2vec2_layer_preln");
}

#[test]
fn wavlm_group_norm_post_ln() {
    check_model("wavlm_group_postln");
}

#[test]
fn wavlm_layer_norm_pre_ln_f16() {
    check_model("wavlm_layer_preln");
}

#[test]
fn wavlm_bucket_table_equals_torch() {
    let fx = Fixture::load("upstream/wavlm_buckets.safetensors");
    let (rel, want) = (fx.usizes("relative_position"), fx.usizes("bucket"));
    for (r, w) in rel.iter().zip(&want) {
        let r = *r as i64; // stored as i64; usize round trip keeps the bits
        assert_eq!(relative_position_bucket(r, 320, 800), *w, "distance {r}");
    }
}
