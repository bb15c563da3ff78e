//! The `strata` binary end to end: `extract` on WAV files reproduces transformers' hidden states;
//! wrong audio formats and bad arguments fail with a message naming the problem.

mod common;
use common::Fixture;
use std::path::{Path, PathBuf};
use std::process::Command;

fn strata(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(args)
        .output()
        .expect("runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("strata-cli-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write_wav(path: &Path, samples: &[f32], rate: u32, channels: u16) {
    let spec = hound::WavSpec {
        channels,
        sample_rate: rate,
        bits_per_sample: 32,
        sample_format: hound::SampleFormat::Float,
    };
    let mut w = hound::WavWriter::create(path, spec).unwrap();
    for &s in samples {
        for _ in 0..channels {
            w.write_sample(s).unwrap();
        }
    }
    w.finalize().unwrap();
}

#[test]
fn extract_writes_every_hidden_state_of_each_file() {
    let dir = scratch("extract");
    let waves = Fixture::load("upstream/waves.safetensors");
    let (a, b) = (dir.join("first.wav"), dir.join("second.wav"));
    write_wav(&a, waves.f("wave0"), 16000, 1);
    write_wav(&b, waves.f("wave1"), 16000, 1);
    let model = format!(
        "{}/tests/fixtures/upstream/wavlm_layer_preln",
        env!("CARGO_MANIFEST_DIR")
    );
    let out = dir.join("feats.safetensors");
    let (ok, log) = strata(&[
        "extract",
        "--model",
        &model,
        "--out",
        out.to_str().unwrap(),
        a.to_str().unwrap(),
        b.to_str().unwrap(),
    ]);
    assert!(ok, "{log}");
    let got = strata::io::load_safetensors(&out).unwrap();
    let expected = Fixture::load("upstream/wavlm_layer_preln/expected_hidden_states.safetensors");
    for (name, key) in [("first", "wave0"), ("second", "wave1")] {
        let t = &got
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no tensor {name} in {got:?}"))
            .1;
        assert_eq!(t.shape(), expected.shape(key));
        let e = common::rel_err(&t.to_vec(), expected.f(key));
        assert!(e < 1e-4, "{name}: relative error {e:.2e}");
    }
    // f16 output.
    let (ok, log) = strata(&[
        "extract",
        "--model",
        &model,
        "--out",
        out.to_str().unwrap(),
        "--dtype",
        "f16",
        a.to_str().unwrap(),
    ]);
    assert!(ok, "{log}");
    let bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("first").unwrap().dtype(), safetensors::Dtype::F16);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn extract_rejects_bad_audio_and_arguments() {
    let dir = scratch("bad");
    let model = format!(
        "{}/tests/fixtures/upstream/hubert_group_postln",
        env!("CARGO_MANIFEST_DIR")
    );
    let out = dir.join("o.safetensors");
    let o = out.to_str().unwrap();
    let tone: Vec<f32> = (0..8000).map(|i| (i as f32 * 0.05).sin() * 0.3).collect();
    let cases: Vec<(&str, PathBuf, &str)> = vec![
        ("8k", dir.join("narrow.wav"), "sample rate is 8000 Hz"),
        ("stereo", dir.join("stereo.wav"), "has 2 channels"),
        ("short", dir.join("short.wav"), "has 300 samples"),
        ("missing", dir.join("missing.wav"), "cannot open"),
    ];
    for (kind, path, needle) in &cases {
        match *kind {
            "8k" => write_wav(path, &tone, 8000, 1),
            "stereo" => write_wav(path, &tone, 16000, 2),
            "short" => write_wav(path, &tone[..300], 16000, 1),
            _ => {}
        }
        let (ok, log) = strata(&[
            "extract",
            "--model",
            &model,
            "--out",
            o,
            path.to_str().unwrap(),
        ]);
        assert!(
            !ok && log.contains(needle)
                && log.contains(path.file_name().unwrap().to_str().unwrap()),
            "{kind}: {log}"
        );
        assert!(!out.exists(), "{kind}: no output file on failure");
    }
    let good = dir.join("good.wav");
    write_wav(&good, &tone, 16000, 1);
    let sub = dir.join("sub");
    std::fs::create_dir_all(&sub).unwrap();
    write_wav(&sub.join("good.wav"), &tone, 16000, 1);
    let (ok, log) = strata(&[
        "extract",
        "--model",
        &model,
        "--out",
        o,
        good.to_str().unwrap(),
        sub.join("good.wav").to_str().unwrap(),
    ]);
    assert!(!ok && log.contains("share the stem 'good'"), "{log}");
    let (ok, log) = strata(&["extract", "--out", o, good.to_str().unwrap()]);
    assert!(!ok && log.contains("--model"), "{log}");
    let (ok, log) = strata(&[
        "extract",
        "--model",
        dir.to_str().unwrap(),
        "--out",
        o,
        good.to_str().unwrap(),
    ]);
    assert!(!ok && log.contains("config.json"), "{log}");
    let (ok, log) = strata(&["frobnicate"]);
    assert!(!ok && log.contains("unknown command 'frobnicate'"), "{log}");
    std::fs::remove_dir_all(&dir).ok();
}
