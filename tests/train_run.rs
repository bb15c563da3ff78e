//! `train::run`: an upstream (the small HuBERT fixture) on WAV files of a Kaldi dir, WS and HConv
//! side by side; a run stopped after 3 steps and resumed logs exactly the losses of an
//! uninterrupted 6-step run; checkpoints and the dev error rate are written.

use std::path::{Path, PathBuf};
use strata::models::interface::InterfaceConfig;
use strata::models::upstream::Upstream;
use strata::optim::AdamConfig;
use strata::train::data::{load_kaldi_dir, OnBad, Task, Vocab};
use strata::train::run::{train, TrainConfig};

fn corpus(dir: &Path, n: usize, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = strata::rng::Rng::new(seed);
    let (mut scp, mut text) = (String::new(), String::new());
    for u in 0..n {
        let len = 6000 + rng.below(10000);
        let f0 = 100.0 + 40.0 * rng.below(5) as f32;
        let samples: Vec<f32> = (0..len)
            .map(|i| 0.3 * (i as f32 * f0 * 2.0 * std::f32::consts::PI / 16000.0).sin())
            .collect();
        strata::audio::write_wav_pcm16(&dir.join(format!("u{u}.wav")), &samples).unwrap();
        scp.push_str(&format!("u{u} u{u}.wav\n"));
        let phones: Vec<&str> = (0..2 + rng.below(3))
            .map(|_| ["a", "e", "i", "o"][rng.below(4)])
            .collect();
        text.push_str(&format!("u{u} {}\n", phones.join(" ")));
    }
    std::fs::write(dir.join("wav.scp"), scp).unwrap();
    std::fs::write(dir.join("text"), text).unwrap();
}

fn config(out: &Path, steps: u64, resume: bool) -> TrainConfig {
    TrainConfig {
        interfaces: vec![
            ("ws".into(), InterfaceConfig::weighted_sum(4, 32)),
            ("hconv".into(), InterfaceConfig::hconv(4, 32)),
        ],
        optimizer: AdamConfig::adamw(1e-3),
        clip: Some(1.0),
        steps,
        batch_samples: 16000 * 3,
        eval_every: 3,
        seed: 5,
        shuffle: true,
        out: out.to_path_buf(),
        resume,
        on_bad: OnBad::Fail,
    }
}

fn losses(out: &Path) -> Vec<String> {
    std::fs::read_to_string(out.join("log.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| l.contains("\"loss\""))
        .map(str::to_string)
        .collect()
}

#[test]
fn train_resume_is_bit_for_bit_and_writes_checkpoints() {
    let root: PathBuf = std::env::temp_dir().join(format!("strata-train-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    corpus(&root.join("train"), 10, 1);
    corpus(&root.join("dev"), 4, 2);
    let upstream = Upstream::load(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/upstream/hubert_group_postln"),
    )
    .unwrap();
    let load = |d: &str| load_kaldi_dir(&root.join(d), Task::Units, OnBad::Fail).unwrap();
    let vocab = Vocab::from_dataset(&load("train"), true);

    let straight = root.join("straight");
    let result = train(
        &upstream,
        load("train"),
        load("dev"),
        &vocab,
        &config(&straight, 6, false),
    )
    .unwrap();
    assert_eq!(result.len(), 2);
    assert!(result
        .iter()
        .all(|r| r.step == 6 && r.error_rate.is_finite()));
    for pair in ["ws", "hconv"] {
        assert!(straight.join(pair).join("latest/state.json").exists());
        assert!(straight.join(pair).join("best/state.json").exists());
    }

    let resumed = root.join("resumed");
    train(
        &upstream,
        load("train"),
        load("dev"),
        &vocab,
        &config(&resumed, 3, false),
    )
    .unwrap();
    train(
        &upstream,
        load("train"),
        load("dev"),
        &vocab,
        &config(&resumed, 6, true),
    )
    .unwrap();
    let (a, b) = (losses(&straight), losses(&resumed));
    assert_eq!(a.len(), 12, "2 pairs x 6 steps");
    assert_eq!(
        a, b,
        "a resumed run logs exactly the uninterrupted run's losses"
    );

    // Interfaces must fit the upstream.
    let mut bad = config(&root.join("bad"), 1, false);
    bad.interfaces = vec![("ws".into(), InterfaceConfig::weighted_sum(13, 768))];
    let err = train(&upstream, load("train"), load("dev"), &vocab, &bad)
        .unwrap_err()
        .to_string();
    assert!(err.contains("13 x 768") && err.contains("4 x 32"), "{err}");
    std::fs::remove_dir_all(&root).ok();
}
