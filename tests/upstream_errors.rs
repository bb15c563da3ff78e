//! A broken model directory or bad audio is an error that names the problem.

use std::path::{Path, PathBuf};
use strata::models::upstream::Upstream;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/upstream")
        .join(name)
}

/// A scratch copy of a fixture model directory.
fn scratch(name: &str, tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("strata-upstream-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture(name).join(f), dir.join(f)).unwrap();
    }
    dir
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
}

fn load_err(dir: &Path) -> String {
    match Upstream::load(dir) {
        Ok(_) => panic!("{} should not load", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn config_problems_are_named() {
    let dir = scratch("wavlm_group_postln", "cfg");
    edit_config(&dir, |v| v["model_type"] = "wav2vec2-conformer".into());
    assert!(load_err(&dir).contains("model_type 'wav2vec2-conformer' is not supported"));
    edit_config(&dir, |v| {
        v["model_type"] = "wavlm".into();
        v["conv_pos_batch_norm"] = true.into();
    });
    assert!(load_err(&dir).contains("conv_pos_batch_norm"));
    edit_config(&dir, |v| {
        v["conv_pos_batch_norm"] = false.into();
        v["hidden_act"] = "relu".into();
    });
    assert!(load_err(&dir).contains("hidden_act 'relu'"));
    edit_config(&dir, |v| {
        v["hidden_act"] = "gelu".into();
        v["hidden_size"] = "big".into();
    });
    assert!(load_err(&dir).contains("'hidden_size' must be a non-negative integer"));
    std::fs::write(dir.join("config.json"), "{ not json").unwrap();
    assert!(load_err(&dir).contains("not valid JSON"));
    std::fs::remove_file(dir.join("config.json")).unwrap();
    assert!(load_err(&dir).contains("config.json"));
    assert!(load_err(&dir.join("nope")).contains("is not a directory"));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn weight_problems_are_named() {
    let dir = scratch("wavlm_group_postln", "weights");
    // The config says 48 hidden units, the weights have 32.
    edit_config(&dir, |v| v["hidden_size"] = 48.into());
    let m = load_err(&dir);
    assert!(
        m.contains("feature_projection.projection.weight") && m.contains("[48, 16]"),
        "{m}"
    );
    edit_config(&dir, |v| v["hidden_size"] = 32.into());
    // Drop one tensor.
    let tensors = strata::io::load_safetensors(&dir.join("model.safetensors")).unwrap();
    let kept: Vec<(String, &strata::Tensor)> = tensors
        .iter()
        .filter(|(n, _)| n != "encoder.layers.1.attention.gru_rel_pos_const")
        .map(|(n, t)| (n.clone(), t))
        .collect();
    strata::io::save_safetensors_atomic(&dir.join("model.safetensors"), &kept).unwrap();
    let m = load_err(&dir);
    assert!(
        m.contains("no tensor 'encoder.layers.1.attention.gru_rel_pos_const'")
            && m.contains("[1, 4, 1, 1]"),
        "{m}"
    );
    // A truncated file.
    let bytes = std::fs::read(fixture("wavlm_group_postln").join("model.safetensors")).unwrap();
    std::fs::write(dir.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    assert!(load_err(&dir).contains("not a valid safetensors file"));
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    assert!(
        load_err(&dir).contains("has neither model.safetensors nor model.safetensors.index.json")
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_audio_is_named() {
    let model = Upstream::load(&fixture("hubert_group_postln")).unwrap();
    let short = vec![0.1f32; 399];
    let ok = vec![0.1f32; 400];
    let err = model
        .forward(&[&ok, &short], &["a.wav", "b.wav"])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("utterance 1 (b.wav) has 399 samples") && err.contains("at least 400"),
        "{err}"
    );
    let mut nan = vec![0.1f32; 800];
    nan[123] = f32::NAN;
    let err = model.forward(&[&nan], &["c.wav"]).unwrap_err().to_string();
    assert!(err.contains("c.wav") && err.contains("sample 123"), "{err}");
    assert!(model.forward(&[], &[]).is_err());
    // Exactly one frame's worth of audio gives one frame.
    let (stack, batch) = model.forward(&[&ok], &["a.wav"]).unwrap();
    assert_eq!((stack.shape()[0], batch.num_utterances()), (1, 1));
}

#[test]
fn frame_counts_follow_the_hf_formula() {
    let model = Upstream::load(&fixture("hubert_group_postln")).unwrap();
    let cfg = &model.config;
    assert_eq!(cfg.min_samples(), 400);
    for samples in [400usize, 719, 720, 16000, 16001, 12345, 48000] {
        // T = floor((L - 400) / 320) + 1 for the real conv stack.
        assert_eq!(
            cfg.num_frames(samples),
            (samples - 400) / 320 + 1,
            "{samples} samples"
        );
    }
    assert_eq!(cfg.num_frames(399), 0);
}
