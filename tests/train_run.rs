//! `train::run`: an upstream (the small HuBERT fixture) on WAV files of a Kaldi dir, WS and HConv
//! side by side. A run stopped after 3 steps and resumed logs exactly the losses of an
//! uninterrupted 6-step run (with warm-up + decay and gradient accumulation); training from an f32
//! feature cache logs exactly the losses of running the upstream; `init_from` a `save_init` file
//! reproduces a run under another seed; gradient accumulation over two halves gives the whole
//! batch's gradients; classification (utt2label) trains and reports accuracy.

use std::path::{Path, PathBuf};
use strata::models::interface::{InterfaceConfig, InterfaceKind};
use strata::models::upstream::Upstream;
use strata::optim::{AdamConfig, Schedule};
use strata::train::data::{load_audio_only, load_kaldi_dir, OnBad, Task, Vocab};
use strata::train::features::{extract_dataset, FeatureCache, StackSource};
use strata::train::run::{train, TrainConfig};
use strata::train::side_by_side::{CtcHead, HeadKind, HeadWidth, Pair, PairSpec};

fn corpus(dir: &Path, n: usize, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = strata::rng::Rng::new(seed);
    let (mut scp, mut text, mut labels) = (String::new(), String::new(), String::new());
    for u in 0..n {
        let len = 6000 + rng.below(10000);
        let tone = rng.below(5);
        let f0 = 100.0 + 40.0 * tone as f32;
        let samples: Vec<f32> = (0..len)
            .map(|i| 0.3 * (i as f32 * f0 * 2.0 * std::f32::consts::PI / 16000.0).sin())
            .collect();
        strata::audio::write_wav_pcm16(&dir.join(format!("u{u}.wav")), &samples).unwrap();
        scp.push_str(&format!("u{u} u{u}.wav\n"));
        let phones: Vec<&str> = (0..2 + rng.below(3))
            .map(|_| ["a", "e", "i", "o"][rng.below(4)])
            .collect();
        text.push_str(&format!("u{u} {}\n", phones.join(" ")));
        labels.push_str(&format!("u{u} {}\n", if tone < 2 { "low" } else { "high" }));
    }
    std::fs::write(dir.join("wav.scp"), scp).unwrap();
    std::fs::write(dir.join("text"), text).unwrap();
    std::fs::write(dir.join("utt2label"), labels).unwrap();
}

fn config(out: &Path, steps: u64, resume: bool) -> TrainConfig {
    let mut c = TrainConfig::new(
        Task::Units,
        vec![
            PairSpec::new("ws", InterfaceConfig::weighted_sum(4, 32)),
            PairSpec::new("hconv", InterfaceConfig::hconv(4, 32)),
        ],
        out.to_path_buf(),
    );
    c.schedule = Schedule::parse("linear", 1e-3, 2, 6).unwrap();
    c.steps = steps;
    c.batch_samples = 16000 * 2;
    c.accum = 2;
    c.eval_every = 3;
    c.seed = 5;
    c.resume = resume;
    c
}

fn losses(out: &Path) -> Vec<String> {
    std::fs::read_to_string(out.join("log.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| l.contains("\"loss\""))
        .map(str::to_string)
        .collect()
}

fn fixture() -> Upstream {
    Upstream::load(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/upstream/hubert_group_postln"),
    )
    .unwrap()
}

fn scratch(tag: &str) -> PathBuf {
    let root = std::env::temp_dir().join(format!("strata-train-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    corpus(&root.join("train"), 10, 1);
    corpus(&root.join("dev"), 4, 2);
    root
}

#[test]
fn train_resume_is_bit_for_bit_and_writes_checkpoints_and_curves() {
    let root = scratch("resume");
    let upstream = fixture();
    let src = StackSource::Upstream(&upstream, false);
    let load = |d: &str| load_kaldi_dir(&root.join(d), Task::Units, OnBad::Fail).unwrap();
    let vocab = Vocab::from_dataset(&load("train"), true);
    // WS and HConv, and PCA + Concat, whose fit a resume must take from the checkpoints.
    let config = |out: &Path, steps: u64, resume: bool| {
        let mut c = config(out, steps, resume);
        let mut pca = InterfaceConfig::new(4, 32, InterfaceKind::PcaConcat { components: 5 });
        // Fitted on the normalized states, as it then projects them.
        pca.normalize = true;
        c.interfaces.push(PairSpec::new("pca", pca));
        c
    };

    let straight = root.join("straight");
    let result = train(
        &src,
        &src,
        load("train"),
        load("dev"),
        &vocab,
        &config(&straight, 6, false),
    )
    .unwrap();
    assert_eq!(result.len(), 3);
    assert!(result
        .iter()
        .all(|r| r.step == 6 && r.error_rate.is_finite()));
    for pair in ["ws", "hconv", "pca"] {
        assert!(straight.join(pair).join("latest/state.json").exists());
        assert!(straight.join(pair).join("best/state.json").exists());
    }
    // Normalized frames have zero mean over D in every layer, so the fitted means do too.
    let saved = std::fs::read_dir(straight.join("pca/latest"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("params-")
        })
        .unwrap();
    let bytes = std::fs::read(&saved).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mean: Vec<f32> = (st.tensor("interface.mean").unwrap().data().chunks(4))
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert_eq!(mean.len(), 4 * 32);
    for layer in mean.chunks(32) {
        let (sum, size) = (
            layer.iter().sum::<f32>(),
            layer.iter().map(|x| x.abs()).sum::<f32>(),
        );
        assert!(size > 1.0 && sum.abs() < 1e-4 * size, "{layer:?}");
    }
    let png = std::fs::read(straight.join("curves.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");

    let resumed = root.join("resumed");
    train(
        &src,
        &src,
        load("train"),
        load("dev"),
        &vocab,
        &config(&resumed, 3, false),
    )
    .unwrap();
    // As if the run had logged steps 4 and 5 and then died before its next checkpoint: the resume
    // redoes them and must not log them twice.
    let log = resumed.join("log.jsonl");
    let mut text = std::fs::read_to_string(&log).unwrap();
    text.push_str(
        "{\"step\":4,\"pair\":\"ws\",\"loss\":9.0}\n{\"step\":5,\"pair\":\"ws\",\"loss\":9.0}\n",
    );
    std::fs::write(&log, text).unwrap();
    let resumed_result = train(
        &src,
        &src,
        load("train"),
        load("dev"),
        &vocab,
        &config(&resumed, 6, true),
    )
    .unwrap();
    // The best dev rate and its step carry across the resume (the best at step 3 was recorded
    // in the checkpoint the resume started from).
    let summary = |r: &[strata::train::run::EvalResult]| -> Vec<(String, u64, Option<u64>, usize)> {
        r.iter()
            .map(|e| {
                assert!(e.best_error_rate <= e.error_rate && e.interface_params < e.params);
                assert_eq!(e.interface_params == 0, e.name == "pca");
                (
                    e.name.clone(),
                    e.best_error_rate.to_bits(),
                    e.best_step,
                    e.params,
                )
            })
            .collect()
    };
    assert_eq!(summary(&result), summary(&resumed_result));
    assert!(result.iter().all(|r| matches!(r.best_step, Some(3 | 6))));
    let mut changed = config(&resumed, 8, true);
    changed.accum = 3;
    let err = train(&src, &src, load("train"), load("dev"), &vocab, &changed)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("accum = 2") && err.contains("this one 3"),
        "{err}"
    );
    let (a, b) = (losses(&straight), losses(&resumed));
    assert_eq!(a.len(), 18, "3 pairs x 6 steps");
    assert!(
        a[0].contains("\"lr\":0.0005"),
        "warm-up halves the first rate: {}",
        a[0]
    );
    assert_eq!(
        a, b,
        "a resumed run logs exactly the uninterrupted run's losses"
    );

    // Interfaces must fit the upstream.
    let mut bad = config(&root.join("bad"), 1, false);
    bad.interfaces = vec![PairSpec::new("ws", InterfaceConfig::weighted_sum(13, 768))];
    let err = train(&src, &src, load("train"), load("dev"), &vocab, &bad)
        .unwrap_err()
        .to_string();
    assert!(err.contains("13 x 768") && err.contains("4 x 32"), "{err}");
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn save_every_checkpoints_let_a_run_that_died_between_evaluations_resume_bit_for_bit() {
    let root = scratch("save-every");
    let upstream = fixture();
    let src = StackSource::Upstream(&upstream, false);
    let load = |d: &str| load_kaldi_dir(&root.join(d), Task::Units, OnBad::Fail).unwrap();
    let vocab = Vocab::from_dataset(&load("train"), true);
    let straight = root.join("straight");
    train(
        &src,
        &src,
        load("train"),
        load("dev"),
        &vocab,
        &config(&straight, 6, false),
    )
    .unwrap();

    // Evaluation only at the end, checkpoints every 2 steps; the run dies at its first
    // evaluation (a dev file vanished after the data check), after logging step 5.
    let died = root.join("died");
    let mut cfg = config(&died, 5, false);
    cfg.eval_every = 0;
    cfg.save_every = 2;
    let dev = load("dev");
    let gone = dev.utterances[0].path.clone();
    let kept = root.join("kept.wav");
    std::fs::rename(&gone, &kept).unwrap();
    let err = train(&src, &src, load("train"), dev, &vocab, &cfg)
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot open"), "{err}");
    std::fs::rename(&kept, &gone).unwrap();
    let state = std::fs::read_to_string(died.join("ws/latest/state.json")).unwrap();
    assert!(
        state.contains("params-4"),
        "the last save is step 4's: {state}"
    );
    assert_eq!(
        losses(&died).len(),
        10,
        "steps 1..5 of both pairs were logged"
    );

    let mut resume = config(&died, 6, true);
    resume.eval_every = 0;
    resume.save_every = 2;
    train(&src, &src, load("train"), load("dev"), &vocab, &resume).unwrap();
    assert_eq!(
        losses(&straight),
        losses(&died),
        "resumed from step 4, the run logs the uninterrupted run's losses"
    );
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn a_diverged_pair_stops_the_run_before_a_checkpoint_takes_its_parameters() {
    let root = scratch("diverged");
    let upstream = fixture();
    let src = StackSource::Upstream(&upstream, false);
    let load = |d: &str| load_kaldi_dir(&root.join(d), Task::Units, OnBad::Fail).unwrap();
    let vocab = Vocab::from_dataset(&load("train"), true);
    // A finite first loss, then an update that overflows the parameters (no clipping).
    let mut cfg = config(&root.join("out"), 3, false);
    cfg.schedule = Schedule::parse("constant", 1e39, 0, 3).unwrap();
    cfg.clip = None;
    cfg.eval_every = 1;
    let err = train(&src, &src, load("train"), load("dev"), &vocab, &cfg)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("non-finite values") && err.contains("after step 1"),
        "{err}"
    );
    assert!(!root.join("out/ws/latest").exists() && !root.join("out/hconv/latest").exists());
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn feature_cache_and_init_files_reproduce_runs_exactly() {
    let root = scratch("features");
    let upstream = fixture();
    let online = StackSource::Upstream(&upstream, false);
    let load = |d: &str| load_kaldi_dir(&root.join(d), Task::Units, OnBad::Fail).unwrap();
    let vocab = Vocab::from_dataset(&load("train"), true);
    let mut a = config(&root.join("a"), 4, false);
    a.save_init = Some(root.join("init.safetensors"));
    train(&online, &online, load("train"), load("dev"), &vocab, &a).unwrap();

    for set in ["train", "dev"] {
        let ds = load_audio_only(&root.join(set), OnBad::Fail).unwrap();
        extract_dataset(
            &upstream,
            &ds,
            &root.join("feats").join(set),
            strata::DType::F32,
            false,
            |_, _| {},
        )
        .unwrap();
    }
    let (tc, dc) = (
        FeatureCache::open(&root.join("feats/train")).unwrap(),
        FeatureCache::open(&root.join("feats/dev")).unwrap(),
    );
    let mut b = config(&root.join("b"), 4, false);
    b.seed = 5;
    b.init_from = Some(root.join("init.safetensors"));
    train(
        &StackSource::Cache(&tc),
        &StackSource::Cache(&dc),
        load("train"),
        load("dev"),
        &vocab,
        &b,
    )
    .unwrap();
    assert_eq!(
        losses(&root.join("a")),
        losses(&root.join("b")),
        "f32 features = the upstream"
    );
    // A cache holds whole utterances' states: no training crops from it.
    let mut cropped = config(&root.join("cropped"), 4, false);
    (cropped.task, cropped.crop_samples) = (Task::Classification, Some(4000));
    let err = train(
        &StackSource::Cache(&tc),
        &StackSource::Cache(&dc),
        load("train"),
        load("dev"),
        &vocab,
        &cropped,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("needs the upstream run on each batch"),
        "{err}"
    );

    // Another seed would draw other parameters (and the same data order, which depends on the
    // seed too, is kept by fixing shuffle off in both): init_from makes them equal.
    let mut c = config(&root.join("c"), 4, false);
    c.shuffle = false;
    c.save_init = Some(root.join("init-c.safetensors"));
    train(&online, &online, load("train"), load("dev"), &vocab, &c).unwrap();
    let mut d = config(&root.join("d"), 4, false);
    d.shuffle = false;
    d.seed = 99;
    d.init_from = Some(root.join("init-c.safetensors"));
    train(&online, &online, load("train"), load("dev"), &vocab, &d).unwrap();
    assert_eq!(losses(&root.join("c")), losses(&root.join("d")));
    let mut e = config(&root.join("e"), 4, false);
    e.shuffle = false;
    e.seed = 99;
    train(&online, &online, load("train"), load("dev"), &vocab, &e).unwrap();
    assert_ne!(
        losses(&root.join("c")),
        losses(&root.join("e")),
        "the seed matters without init_from"
    );

    // A cache of other data is refused, naming the utterance.
    let mut other = load("dev");
    other.utterances[0].id = "nope".into();
    let err = dc.covers(&other).unwrap_err().to_string();
    assert!(err.contains("'nope'"), "{err}");
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn accumulating_two_halves_equals_one_step_on_the_whole_batch() {
    let upstream = fixture();
    let waves: Vec<Vec<f32>> = (0..4)
        .map(|u| {
            (0..5200 + 700 * u)
                .map(|i| (i as f32 * (0.02 + 0.01 * u as f32)).sin() * 0.3)
                .collect()
        })
        .collect();
    let refs: Vec<&[f32]> = waves.iter().map(Vec::as_slice).collect();
    let targets: Vec<Vec<usize>> = vec![vec![1, 2], vec![2, 3, 1], vec![3], vec![1, 1]];
    let names = ["a", "b", "c", "d"];
    let (whole, wb) = upstream.forward(&refs, &names).unwrap();
    let (h1, b1) = upstream.forward(&refs[..2], &names[..2]).unwrap();
    let (h2, b2) = upstream.forward(&refs[2..], &names[2..]).unwrap();
    for head in [
        HeadKind::Ctc { vocab: 4 },
        HeadKind::Classify { classes: 4 },
        HeadKind::Speaker { speakers: 4 },
    ] {
        let t: Vec<Vec<usize>> = match head {
            HeadKind::Ctc { .. } => targets.clone(),
            HeadKind::Classify { .. } | HeadKind::Speaker { .. } => {
                vec![vec![0], vec![3], vec![1], vec![3]]
            }
        };
        let new = || {
            Pair::new(
                "p",
                &InterfaceConfig::hconv(4, 32),
                head,
                AdamConfig::adamw(1e-2),
                Some(1.0),
                3,
            )
            .unwrap()
        };
        // Gradients, not parameters after an Adam step: Adam's first step is ~lr * sign(g), which
        // flips on rounding wherever g is ~0.
        let mut one = new();
        one.accumulate(&whole, &wb, &t, 1.0).unwrap();
        let mut two = new();
        two.accumulate(&h1, &b1, &t[..2], 0.5).unwrap();
        two.accumulate(&h2, &b2, &t[2..], 0.5).unwrap();
        for (p, q) in one.store.iter().zip(two.store.iter()) {
            let scale = p.grad.iter().fold(1e-12f32, |m, g| m.max(g.abs()));
            // NaN-aware: f32::max would skip a NaN gradient.
            let worst =
                p.grad
                    .iter()
                    .zip(&q.grad)
                    .map(|(a, b)| (a - b).abs())
                    .fold(
                        0f32,
                        |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
                    );
            assert!(
                worst / scale < 1e-5,
                "{head:?} {}: {worst} of {scale}",
                p.name
            );
        }
    }
}

#[test]
fn ws_large_has_the_weighted_sum_and_a_head_as_large_as_the_hconv_pair() {
    // The paper's "WS + Large DS": the WS baseline given HConv's parameter budget downstream.
    for (layers, dim) in [(13, 768), (25, 1024)] {
        for head in [
            HeadKind::Ctc { vocab: 41 },
            HeadKind::Classify { classes: 4 },
        ] {
            let opt = AdamConfig::adamw(1e-3);
            let hconv = Pair::new(
                "hconv",
                &InterfaceConfig::hconv(layers, dim),
                head,
                opt,
                None,
                0,
            )
            .unwrap();
            let spec = PairSpec {
                name: "ws-large".into(),
                interface: InterfaceConfig::weighted_sum(layers, dim),
                head_width: HeadWidth::MatchParams(InterfaceConfig::hconv(layers, dim)),
                ctc_head: CtcHead::Superb,
            };
            let large = Pair::from_spec(&spec, head, opt, None, 0).unwrap();
            let outputs = match head {
                HeadKind::Ctc { vocab } => vocab,
                HeadKind::Classify { classes } => classes,
                HeadKind::Speaker { .. } => unreachable!("not among the heads above"),
            };
            let hidden = large
                .store
                .value(large.store.id("head.proj.weight").unwrap())
                .shape()[0];
            // WS's L weights, Linear(D, h) and Linear(h, V), counted by hand.
            let expected = layers + hidden * (dim + 1) + outputs * (hidden + 1);
            assert_eq!(large.store.num_scalars(), expected);
            assert_eq!(large.interface_params(), layers);
            let gap = large
                .store
                .num_scalars()
                .abs_diff(hconv.store.num_scalars());
            assert!(
                gap <= (dim + 1 + outputs) / 2,
                "{layers} x {dim}, {head:?}: ws-large {} vs hconv {} parameters (hidden {hidden})",
                large.store.num_scalars(),
                hconv.store.num_scalars()
            );
            if (layers, head) == (13, HeadKind::Ctc { vocab: 41 }) {
                // (4,424,832 + 256 (768 + 1 + 41) + 41 - 13 - 41) / (768 + 1 + 41), rounded.
                assert_eq!(hidden, 5719);
            }
            assert!(hidden > 4000, "{hidden}");
        }
    }
    // Nothing to match against: an interface smaller than WS's own pair is refused, not shrunk.
    let spec = PairSpec {
        name: "ws-small".into(),
        interface: InterfaceConfig::hconv(13, 768),
        head_width: HeadWidth::MatchParams(InterfaceConfig::weighted_sum(13, 768)),
        ctc_head: CtcHead::Superb,
    };
    let err = Pair::from_spec(
        &spec,
        HeadKind::Ctc { vocab: 41 },
        AdamConfig::adamw(1e-3),
        None,
        0,
    )
    .err()
    .expect("a narrower head is refused")
    .to_string();
    assert!(err.contains("narrower than the SUPERB head's 256"), "{err}");
}

#[test]
fn classification_trains_on_utt2label_and_reports_accuracy() {
    let root = scratch("classify");
    let upstream = fixture();
    let src = StackSource::Upstream(&upstream, false);
    let load = |d: &str| load_kaldi_dir(&root.join(d), Task::Classification, OnBad::Fail).unwrap();
    let vocab = Vocab::from_dataset(&load("train"), false);
    assert_eq!(vocab.tokens, ["high", "low"]);
    let mut c = TrainConfig::new(
        Task::Classification,
        vec![PairSpec::new("ws", InterfaceConfig::weighted_sum(4, 32))],
        root.join("run"),
    );
    c.steps = 30;
    c.eval_every = 30;
    c.batch_samples = 16000 * 4;
    c.schedule = Schedule::constant(1e-2);
    let r = train(&src, &src, load("train"), load("dev"), &vocab, &c).unwrap();
    let log = std::fs::read_to_string(root.join("run/log.jsonl")).unwrap();
    assert!(log.contains("dev_accuracy"), "{log}");
    let l = losses(&root.join("run"));
    let first: f64 = serde_json::from_str::<serde_json::Value>(&l[0]).unwrap()["loss"]
        .as_f64()
        .unwrap();
    let last: f64 = serde_json::from_str::<serde_json::Value>(l.last().unwrap()).unwrap()["loss"]
        .as_f64()
        .unwrap();
    assert!(last < first, "cross-entropy falls: {first} -> {last}");
    assert!((0.0..=1.0).contains(&r[0].error_rate));
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn cropped_training_draws_windows_resumes_bit_for_bit_and_is_refused_where_it_cannot_hold() {
    use strata::train::run::crop_window;
    // Windows: whole when short enough; else inside the utterance, the same for the same
    // (seed, micro-batch, utterance), and not the same everywhere.
    assert_eq!(crop_window(0, 5, 2, 3000, 4000), (0, 3000));
    let starts: Vec<usize> = (0..50)
        .map(|n| {
            let (start, len) = crop_window(7, n, 3, 10_000, 4000);
            assert!(len == 4000 && start + len <= 10_000);
            assert_eq!(crop_window(7, n, 3, 10_000, 4000), (start, len));
            start
        })
        .collect();
    assert!(starts.iter().any(|&s| s != starts[0]), "{starts:?}");

    let root = scratch("crop");
    let upstream = fixture();
    let src = StackSource::Upstream(&upstream, false);
    let load = |d: &str| load_kaldi_dir(&root.join(d), Task::Classification, OnBad::Fail).unwrap();
    let vocab = Vocab::from_dataset(&load("train"), false);
    let cfg = |out: &Path, steps: u64, resume: bool| {
        let mut c = TrainConfig::new(
            Task::Classification,
            vec![PairSpec::new("ws", InterfaceConfig::weighted_sum(4, 32))],
            out.to_path_buf(),
        );
        (c.steps, c.eval_every, c.resume) = (steps, 2, resume);
        c.batch_samples = 16000 * 2;
        c.crop_samples = Some(4000);
        c
    };
    let run = |c: &TrainConfig| train(&src, &src, load("train"), load("dev"), &vocab, c);
    let (straight, resumed) = (root.join("straight"), root.join("resumed"));
    run(&cfg(&straight, 4, false)).unwrap();
    run(&cfg(&resumed, 2, false)).unwrap();
    run(&cfg(&resumed, 4, true)).unwrap();
    assert_eq!(
        losses(&straight),
        losses(&resumed),
        "a resumed run crops alike"
    );
    // Every utterance (6000-16000 samples) was cut to 4000 samples: 12 frames each.
    for line in losses(&straight) {
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["frames"].as_u64().unwrap() % 12, 0, "{line}");
    }
    // A different crop length is another run.
    let mut other = cfg(&resumed, 6, true);
    other.crop_samples = Some(5000);
    let err = run(&other).unwrap_err().to_string();
    assert!(err.contains("crop_samples"), "{err}");
    // Transcripts do not fit a window; a cache holds whole utterances.
    let mut ctc = cfg(&root.join("ctc"), 2, false);
    ctc.task = Task::Units;
    let units = |d: &str| load_kaldi_dir(&root.join(d), Task::Units, OnBad::Fail).unwrap();
    let ctc_vocab = Vocab::from_dataset(&units("train"), true);
    let err = train(&src, &src, units("train"), units("dev"), &ctc_vocab, &ctc)
        .unwrap_err()
        .to_string();
    assert!(err.contains("utterance-level tasks"), "{err}");
    std::fs::remove_dir_all(&root).ok();
}

/// The trainer on the device path (the kernel emulator here; the same code drives the GPU): WS,
/// HConv and GroupWS pairs follow the CPU run's losses within bf16 margins, step by step, with
/// warm-up + decay and two micro-batches per step; a device run stopped after 3 steps and resumed
/// from its checkpoints logs exactly the uninterrupted device run's losses (parameters and Adam
/// state go through the checkpoint); the checkpoint evaluates on the CPU.
#[test]
fn the_device_step_trains_resumes_bit_for_bit_and_follows_the_cpu_run() {
    use strata::train::run::TrainDevice;
    let root = scratch("device");
    let upstream = fixture();
    let src = StackSource::Upstream(&upstream, false);
    let load = |d: &str| load_kaldi_dir(&root.join(d), Task::Units, OnBad::Fail).unwrap();
    let vocab = Vocab::from_dataset(&load("train"), true);
    let cfg = |out: &Path, steps: u64, resume: bool, device: TrainDevice| {
        let mut c = config(out, steps, resume);
        c.interfaces.push(PairSpec::new(
            "groupws",
            InterfaceConfig::new(
                4,
                32,
                InterfaceKind::GroupWs {
                    groups: 2,
                    out_dim: 32,
                },
            ),
        ));
        c.device = device;
        c.average_best = 2;
        c
    };
    let run = |out: &Path, steps: u64, resume: bool, device: TrainDevice| {
        train(
            &src,
            &src,
            load("train"),
            load("dev"),
            &vocab,
            &cfg(out, steps, resume, device),
        )
        .unwrap()
    };
    let (cpu, dev) = (root.join("cpu"), root.join("emulated"));
    run(&cpu, 6, false, TrainDevice::Cpu);
    let results = run(&dev, 6, false, TrainDevice::Emulator);
    assert!(results.iter().all(|r| r.error_rate.is_finite()));
    let loss = |l: &str| -> f64 {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        v["loss"].as_f64().unwrap()
    };
    let (a, b) = (losses(&cpu), losses(&dev));
    assert_eq!(a.len(), 18, "3 pairs x 6 steps");
    for (x, y) in a.iter().zip(&b) {
        let (lx, ly) = (loss(x), loss(y));
        assert!(
            (lx - ly).abs() <= 1e-2 * lx.abs(),
            "device loss within 1% of the CPU's: {x} vs {y}"
        );
    }
    assert_ne!(
        a, b,
        "the device run really ran on the device (bf16 differs)"
    );

    let resumed = root.join("resumed");
    run(&resumed, 3, false, TrainDevice::Emulator);
    run(&resumed, 6, true, TrainDevice::Emulator);
    assert_eq!(
        losses(&dev),
        losses(&resumed),
        "a resumed device run logs exactly the uninterrupted device run's losses"
    );
    // The latest checkpoints decoded on the emulated device reproduce the dev rates the run
    // logged at its last step; on the CPU they decode too.
    let logged: Vec<serde_json::Value> = std::fs::read_to_string(dev.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v["step"] == 6 && v.get("dev_error_rate").is_some())
        .collect();
    assert_eq!(logged.len(), 3);
    for (i, spec) in cfg(&dev, 6, false, TrainDevice::Cpu)
        .interfaces
        .iter()
        .enumerate()
    {
        let eval = |device| {
            strata::train::run::evaluate_checkpoint(
                &src,
                &dev.join(&spec.name).join("latest"),
                spec,
                Task::Units,
                &vocab,
                load("dev"),
                16000 * 2,
                device,
            )
            .unwrap()
        };
        let (rate, hyps) = eval(TrainDevice::Emulator);
        assert_eq!(hyps.len(), 4);
        assert_eq!(logged[i]["pair"], spec.name.as_str());
        assert_eq!(
            rate,
            logged[i]["dev_error_rate"].as_f64().unwrap(),
            "{}: device eval of the checkpoint = the logged dev rate",
            spec.name
        );
        assert!(eval(TrainDevice::Cpu).0.is_finite());
        // The n-best average was scored on the emulated device as its checkpoint scores there.
        let (averaged, steps) = results[i].averaged.clone().unwrap();
        assert_eq!(steps.len(), 2);
        let (rate, _) = strata::train::run::evaluate_checkpoint(
            &src,
            &dev.join(&spec.name).join("averaged"),
            spec,
            Task::Units,
            &vocab,
            load("dev"),
            16000 * 2,
            TrainDevice::Emulator,
        )
        .unwrap();
        assert_eq!(rate, averaged, "{}", spec.name);
    }
    // The dev losses of the device run follow the CPU run's.
    let dev_losses = |out: &Path| -> Vec<f64> {
        (std::fs::read_to_string(out.join("log.jsonl"))
            .unwrap()
            .lines())
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["dev_loss"].as_f64())
        .collect()
    };
    let (a, b) = (dev_losses(&cpu), dev_losses(&dev));
    assert_eq!(a.len(), 6, "3 pairs x 2 evaluations");
    for (x, y) in a.iter().zip(&b) {
        assert!(
            (x - y).abs() <= 2e-2 * x,
            "dev loss {x} (CPU) vs {y} (device)"
        );
    }
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn the_ml_superb_head_trains_resumes_bit_for_bit_and_refuses_utterances_it_cannot_align() {
    use strata::models::mlsuperb_head::MlSuperbHeadConfig;
    let root = scratch("mlsuperb");
    // A short utterance (18 frames -> 6 after the head's subsampling) with 8 phones: the SUPERB
    // head (18 frames) can align it, the ML-SUPERB head cannot.
    let samples: Vec<f32> = (0..6000).map(|i| 0.1 * (i as f32 * 0.05).sin()).collect();
    strata::audio::write_wav_pcm16(&root.join("train/long.wav"), &samples).unwrap();
    let append = |file: &str, line: &str| {
        let p = root.join("train").join(file);
        let text = std::fs::read_to_string(&p).unwrap() + line;
        std::fs::write(p, text).unwrap();
    };
    append("wav.scp", "long long.wav\n");
    append("text", "long a e i o a e i o\n");
    let upstream = fixture();
    let src = StackSource::Upstream(&upstream, false);
    let load = |d: &str, on_bad| load_kaldi_dir(&root.join(d), Task::Units, on_bad).unwrap();
    let vocab = Vocab::from_dataset(&load("train", OnBad::Fail), true);
    let head = CtcHead::MlSuperb(MlSuperbHeadConfig {
        width: 32,
        heads: 4,
        ffn: 64,
        ..MlSuperbHeadConfig::default()
    });
    let config = |out: &Path, steps: u64, resume: bool, on_bad| {
        let mut c = config(out, steps, resume);
        c.interfaces.truncate(1);
        c.interfaces[0].ctc_head = head;
        c.on_bad = on_bad;
        c
    };
    let err = train(
        &src,
        &src,
        load("train", OnBad::Fail),
        load("dev", OnBad::Fail),
        &vocab,
        &config(&root.join("refused"), 1, false, OnBad::Fail),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("'long' has 8 label tokens, more than the 6 frames")
            && err.contains("--skip-bad"),
        "{err}"
    );
    let run = |out: &Path, steps: u64, resume: bool| {
        train(
            &src,
            &src,
            load("train", OnBad::Fail),
            load("dev", OnBad::Fail),
            &vocab,
            &config(out, steps, resume, OnBad::Skip),
        )
        .unwrap()
    };
    let straight = root.join("straight");
    let result = run(&straight, 6, false);
    assert!(result[0].error_rate.is_finite() && result[0].params > result[0].interface_params);
    let resumed = root.join("resumed");
    run(&resumed, 3, false);
    run(&resumed, 6, true);
    let (a, b) = (losses(&straight), losses(&resumed));
    assert_eq!(a.len(), 6);
    assert_eq!(
        a, b,
        "dropout and SpecAugment masks follow the step: a resumed run logs the same losses"
    );
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn the_asr_head_trains_and_resumes_bit_for_bit() {
    use strata::models::asr_head::AsrHeadConfig;
    let root = scratch("asr");
    let upstream = fixture();
    let src = StackSource::Upstream(&upstream, false);
    let load = |d: &str| load_kaldi_dir(&root.join(d), Task::Units, OnBad::Fail).unwrap();
    let vocab = Vocab::from_dataset(&load("train"), true);
    let run = |out: &Path, steps: u64, resume: bool| {
        let mut c = config(out, steps, resume);
        for p in &mut c.interfaces {
            p.ctc_head = CtcHead::Asr(AsrHeadConfig {
                project_dim: 24,
                hidden: 16,
                ..AsrHeadConfig::default()
            });
        }
        train(&src, &src, load("train"), load("dev"), &vocab, &c).unwrap()
    };
    let straight = root.join("straight");
    let result = run(&straight, 6, false);
    assert!(result.iter().all(|r| r.error_rate.is_finite()));
    let resumed = root.join("resumed");
    run(&resumed, 3, false);
    run(&resumed, 6, true);
    let (a, b) = (losses(&straight), losses(&resumed));
    assert_eq!(a.len(), 12, "6 steps of 2 pairs");
    assert_eq!(
        a, b,
        "the dropout masks follow the step: a resumed run logs the same losses"
    );
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn a_transcript_longer_than_its_frames_stops_the_superb_head_before_the_first_step() {
    let root = scratch("toolong");
    // 6000 samples: 18 frames at 50 Hz, and 20 phones.
    let samples: Vec<f32> = (0..6000).map(|i| 0.1 * (i as f32 * 0.07).sin()).collect();
    strata::audio::write_wav_pcm16(&root.join("train/fast.wav"), &samples).unwrap();
    for (file, line) in [
        ("wav.scp", "fast fast.wav\n"),
        ("text", "fast a e i o a e i o a e i o a e i o a e i o\n"),
    ] {
        let p = root.join("train").join(file);
        std::fs::write(&p, std::fs::read_to_string(&p).unwrap() + line).unwrap();
    }
    let upstream = fixture();
    let src = StackSource::Upstream(&upstream, false);
    let load = |d: &str| load_kaldi_dir(&root.join(d), Task::Units, OnBad::Fail).unwrap();
    let vocab = Vocab::from_dataset(&load("train"), true);
    let out = root.join("run");
    let err = train(
        &src,
        &src,
        load("train"),
        load("dev"),
        &vocab,
        &config(&out, 2, false),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("'fast' has 20 label tokens, more than the 18 frames"),
        "{err}"
    );
    assert!(!out.join("log.jsonl").exists(), "refused before any step");
    let mut skip = config(&out, 2, false);
    skip.on_bad = OnBad::Skip;
    train(&src, &src, load("train"), load("dev"), &vocab, &skip).unwrap();
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn ws_large_with_the_ml_superb_head_widens_its_transformer_to_the_hconv_pairs_size() {
    // The paper reports "WS + Large DS" on ML-SUPERB mono-1h.
    use strata::models::mlsuperb_head::MlSuperbHeadConfig;
    let (layers, dim, head) = (13, 768, HeadKind::Ctc { vocab: 41 });
    let opt = AdamConfig::adamw(1e-3);
    let ml = CtcHead::MlSuperb(MlSuperbHeadConfig::default());
    let mut hconv = PairSpec::new("hconv", InterfaceConfig::hconv(layers, dim));
    hconv.ctc_head = ml;
    let hconv = Pair::from_spec(&hconv, head, opt, None, 0).unwrap();
    let spec = PairSpec {
        name: "ws-large".into(),
        interface: InterfaceConfig::weighted_sum(layers, dim),
        head_width: HeadWidth::MatchParams(InterfaceConfig::hconv(layers, dim)),
        ctc_head: ml,
    };
    let large = Pair::from_spec(&spec, head, opt, None, 0).unwrap();
    let width = |p: &Pair| {
        p.store
            .value(p.store.id("head.ctc_lo.weight").unwrap())
            .shape()[1]
    };
    assert_eq!(width(&hconv), 256);
    let w = width(&large);
    assert!(w > 256 && w % 8 == 0, "{w}");
    let (a, b) = (large.store.num_scalars(), hconv.store.num_scalars());
    // One step of 8 in width adds ~70 x 2 x 8 x w scalars; the match is within half of that.
    assert!(
        a.abs_diff(b) <= 70 * 8 * w,
        "ws-large {a} vs hconv {b} (width {w})"
    );
    eprintln!("ML-SUPERB ws-large: width {w}, {a} scalars vs hconv's {b}");
}

#[test]
fn the_n_best_evaluations_are_kept_averaged_scored_and_survive_a_resume() {
    use strata::train::run::{evaluate_checkpoint, AverageBy, TrainDevice};
    let root = scratch("nbest");
    let upstream = fixture();
    let src = StackSource::Upstream(&upstream, false);
    let load = |d: &str| load_kaldi_dir(&root.join(d), Task::Units, OnBad::Fail).unwrap();
    let vocab = Vocab::from_dataset(&load("train"), true);
    let cfg = |out: &Path, steps: u64, resume: bool| {
        let mut c = config(out, steps, resume);
        c.schedule = Schedule::constant(2e-2);
        (c.eval_every, c.average_best) = (1, 2);
        c
    };
    let straight = root.join("straight");
    let result = train(
        &src,
        &src,
        load("train"),
        load("dev"),
        &vocab,
        &cfg(&straight, 6, false),
    )
    .unwrap();
    let log = std::fs::read_to_string(straight.join("log.jsonl")).unwrap();
    let entries: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for r in &result {
        // The two lowest dev error rates of the log (the earlier step first on a tie).
        let mut evals: Vec<(f64, u64)> = (entries.iter())
            .filter(|e| e["pair"] == r.name.as_str() && e["dev_error_rate"].is_number())
            .map(|e| {
                (
                    e["dev_error_rate"].as_f64().unwrap(),
                    e["step"].as_u64().unwrap(),
                )
            })
            .collect();
        eprintln!("{}: dev error rates (rate, step) {evals:?}", r.name);
        assert_eq!(evals.len(), 6);
        evals.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
        let want: Vec<u64> = evals[..2].iter().map(|e| e.1).collect();
        let (rate, steps) = r.averaged.clone().expect("averaged after the last step");
        assert_eq!(steps, want, "{}", r.name);
        // Only those snapshots are kept.
        let dir = straight.join(&r.name);
        let mut kept: Vec<String> = std::fs::read_dir(dir.join("nbest"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        kept.sort();
        let mut named: Vec<String> = want.iter().map(|s| format!("step-{s}")).collect();
        named.sort();
        assert_eq!(kept, named);
        // The averaged parameters are the snapshots' mean, and score what the run reported.
        let params = |d: &Path, step: u64| -> Vec<(String, Vec<f32>)> {
            let mut t: Vec<(String, Vec<f32>)> =
                strata::io::load_safetensors(&d.join(format!("params-{step}.safetensors")))
                    .unwrap()
                    .into_iter()
                    .map(|(n, t)| (n, t.to_vec()))
                    .collect();
            t.sort_by(|a, b| a.0.cmp(&b.0));
            t
        };
        let snaps: Vec<_> = (want.iter())
            .map(|&s| params(&dir.join("nbest").join(format!("step-{s}")), s))
            .collect();
        let averaged = params(&dir.join("averaged"), 6);
        assert_eq!(averaged.len(), snaps[0].len());
        let mut moved = false;
        for (i, (name, avg)) in averaged.iter().enumerate() {
            let (a, b) = (&snaps[0][i].1, &snaps[1][i].1);
            moved |= a != b;
            for ((x, y), m) in a.iter().zip(b).zip(avg) {
                assert_eq!(*m, ((*x as f64 + *y as f64) / 2.0) as f32, "{name}");
            }
        }
        assert!(moved, "the snapshots differ");
        let spec = PairSpec::new(
            &r.name,
            if r.name == "ws" {
                InterfaceConfig::weighted_sum(4, 32)
            } else {
                InterfaceConfig::hconv(4, 32)
            },
        );
        let (scored, _) = evaluate_checkpoint(
            &src,
            &dir.join("averaged"),
            &spec,
            Task::Units,
            &vocab,
            load("dev"),
            16000 * 2,
            TrainDevice::Cpu,
        )
        .unwrap();
        assert_eq!(scored, rate, "{}", r.name);
        assert!(log.contains(&format!("\"averaged_dev_error_rate\":{rate}")));
    }
    // Ranked by the dev loss (logged at each evaluation of a CTC task) instead.
    let by_loss = root.join("by-loss");
    let mut c = cfg(&by_loss, 6, false);
    c.average_by = AverageBy::Loss;
    let ranked = train(&src, &src, load("train"), load("dev"), &vocab, &c).unwrap();
    let log = std::fs::read_to_string(by_loss.join("log.jsonl")).unwrap();
    for r in &ranked {
        let mut evals: Vec<(f64, u64)> = (log.lines())
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|e| e["pair"] == r.name.as_str() && e["dev_loss"].is_number())
            .map(|e| (e["dev_loss"].as_f64().unwrap(), e["step"].as_u64().unwrap()))
            .collect();
        assert_eq!(evals.len(), 6, "a dev loss at every evaluation");
        evals.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
        let want: Vec<u64> = evals[..2].iter().map(|e| e.1).collect();
        assert_eq!(r.averaged.as_ref().unwrap().1, want, "{}", r.name);
    }
    // The loss criterion is for CTC tasks.
    let mut c = cfg(&root.join("classify"), 2, false);
    (c.task, c.average_by) = (Task::Classification, AverageBy::Loss);
    let classes =
        |d: &str| load_kaldi_dir(&root.join(d), Task::Classification, OnBad::Fail).unwrap();
    let labels = Vocab::from_dataset(&classes("train"), false);
    let err = train(&src, &src, classes("train"), classes("dev"), &labels, &c)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--average-by loss is for the CTC tasks"),
        "{err}"
    );
    // Stopped after 3 steps and resumed to 6: the same snapshots and the same average.
    let resumed = root.join("resumed");
    train(
        &src,
        &src,
        load("train"),
        load("dev"),
        &vocab,
        &cfg(&resumed, 3, false),
    )
    .unwrap();
    let again = train(
        &src,
        &src,
        load("train"),
        load("dev"),
        &vocab,
        &cfg(&resumed, 6, true),
    )
    .unwrap();
    for (a, b) in result.iter().zip(&again) {
        assert_eq!(a.averaged, b.averaged, "{}", a.name);
    }
    std::fs::remove_dir_all(&root).ok();
}
