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

/// Kaldi folders `dir/<set>` of `n` tones each, utterance u `first + u * step` samples long and
/// transcribed `texts[u % len]`.
fn transcribed_tones(
    dir: &Path,
    sets: &[(&str, usize)],
    first: usize,
    step: usize,
    texts: &[&str],
) {
    for &(name, n) in sets {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        let (mut scp, mut text) = (String::new(), String::new());
        for u in 0..n {
            let tone: Vec<f32> = (0..first + step * u)
                .map(|i| (i as f32 * (0.03 + 0.01 * u as f32)).sin() * 0.3)
                .collect();
            write_wav(&d.join(format!("{u}.wav")), &tone, 16000, 1);
            scp.push_str(&format!("{name}{u} {u}.wav\n"));
            text.push_str(&format!("{name}{u} {}\n", texts[u % texts.len()]));
        }
        std::fs::write(d.join("wav.scp"), scp).unwrap();
        std::fs::write(d.join("text"), text).unwrap();
    }
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
    // f16 output, replacing the file above: only with --overwrite.
    let f16 = |extra: &[&str]| {
        let mut args = vec![
            "extract",
            "--model",
            &model,
            "--out",
            out.to_str().unwrap(),
            "--dtype",
            "f16",
            a.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        strata(&args)
    };
    let (ok, log) = f16(&[]);
    assert!(
        !ok && log.contains("already holds a file: pass --overwrite"),
        "{log}"
    );
    let (ok, log) = f16(&["--overwrite"]);
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

#[test]
fn train_runs_resumes_and_reports_the_dev_error() {
    let dir = scratch("train");
    transcribed_tones(
        &dir,
        &[("train", 8), ("dev", 3)],
        8000,
        500,
        &["a b", "b c a", "c"],
    );
    let model = format!(
        "{}/tests/fixtures/upstream/wavlm_group_postln",
        env!("CARGO_MANIFEST_DIR")
    );
    let out = dir.join("run");
    let (t, d, o) = (dir.join("train"), dir.join("dev"), out.clone());
    let base = [
        "train",
        "--model",
        &model,
        "--train",
        t.to_str().unwrap(),
        "--dev",
        d.to_str().unwrap(),
        "--out",
        o.to_str().unwrap(),
    ];
    let with = |extra: &[&str]| -> Vec<String> {
        base.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let run = |args: Vec<String>| strata(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let (ok, log) = run(with(&[
        "--steps",
        "4",
        "--eval-every",
        "2",
        "--batch-seconds",
        "2",
        "--interfaces",
        "ws,hconv,groupws2",
    ]));
    assert!(
        ok && log.contains("hconv") && log.contains("dev error"),
        "{log}"
    );
    let (ok, log) = run(with(&[
        "--steps",
        "6",
        "--eval-every",
        "2",
        "--batch-seconds",
        "2",
        "--interfaces",
        "ws,hconv,groupws2",
        "--resume",
    ]));
    assert!(ok, "{log}");
    let lines = std::fs::read_to_string(out.join("log.jsonl")).unwrap();
    assert_eq!(
        lines.lines().filter(|l| l.contains("\"loss\"")).count(),
        18,
        "3 pairs x 6 steps"
    );
    // The weighted sums' layer weights (softmax, in percent), per sum, and in every evaluation's
    // log line: the wavlm fixture has 4 states, groupws2 sums layers 0-1 and 2-3.
    for want in [
        "ws layer weights (%): 0:",
        "groupws2 layer weights (%): 0:",
        "groupws2 layer weights (%): 2:",
    ] {
        assert!(log.contains(want), "missing '{want}' in {log}");
    }
    assert!(!log.contains("hconv layer weights"), "{log}");
    for line in lines.lines().filter(|l| l.contains("dev_error_rate")) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let sums = v["layer_weights"].as_array().map(|a| a.len());
        let want = match v["pair"].as_str().unwrap() {
            "ws" => Some(1),
            "groupws2" => Some(2),
            _ => None,
        };
        assert_eq!(sums, want, "{line}");
        for sum in v["layer_weights"].as_array().into_iter().flatten() {
            let total: f64 = (sum["weights"].as_array().unwrap().iter())
                .map(|w| w.as_f64().unwrap())
                .sum();
            assert!((total - 1.0).abs() < 1e-6, "{line}");
        }
    }
    assert_eq!(
        std::fs::read_to_string(out.join("vocab.txt")).unwrap(),
        "<blank>\na\nb\nc\n"
    );
    let (ok, log) = strata(&[
        "train",
        "--model",
        &model,
        "--train",
        t.to_str().unwrap(),
        "--out",
        o.to_str().unwrap(),
    ]);
    assert!(!ok && log.contains("--dev"), "{log}");
    // A finished run is never overwritten by a new one, and a resume that does not match it is
    // refused before anything is rewritten.
    let (ok, log) = run(with(&["--steps", "2", "--interfaces", "ws"]));
    assert!(
        !ok && log.contains("already holds a training run (checkpoints of groupws2, hconv, ws)"),
        "{log}"
    );
    let recorded = std::fs::read_to_string(out.join("run.json")).unwrap();
    let (ok, log) = run(with(&[
        "--steps",
        "8",
        "--batch-seconds",
        "2",
        "--interfaces",
        "ws,hconv,groupws2",
        "--normalize",
        "on",
        "--resume",
    ]));
    assert!(
        !ok && log.contains("normalize = false, this one true"),
        "{log}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("run.json")).unwrap(),
        recorded
    );
    let (ok, log) = run(with(&[
        "--steps",
        "6",
        "--batch-seconds",
        "2",
        "--interfaces",
        "ws,hconv,groupws2",
        "--resume",
    ]));
    assert!(
        !ok && log.contains("at step 6 and this run stops at step 6 (--steps): nothing to train"),
        "{log}"
    );
    let (ok, log) = run(with(&["--resume"])
        .into_iter()
        .map(|a| a.replace("/run", "/nothing-here"))
        .collect());
    assert!(!ok && log.contains("nothing to resume"), "{log}");
    // A run killed before its first checkpoint left only a log: neither a new run nor a resume
    // may take the folder, and the resume's error says what happened.
    std::fs::create_dir_all(dir.join("logonly")).unwrap();
    std::fs::write(dir.join("logonly/log.jsonl"), "{\"step\":1,\"loss\":3.0}\n").unwrap();
    let (ok, log) = run(with(&["--resume"])
        .into_iter()
        .map(|a| a.replace("/run", "/logonly"))
        .collect());
    assert!(
        !ok && log.contains("stopped before its first checkpoint"),
        "{log}"
    );
    let (ok, log) = run(with(&[])
        .into_iter()
        .map(|a| a.replace("/run", "/logonly"))
        .collect());
    assert!(
        !ok && log.contains("holds a training run (a training log"),
        "{log}"
    );
    // A folder that a live process trains into is refused; a lock left behind by a process that
    // is gone is taken over, and released at the end.
    let locked = |extra: &[&str]| -> Vec<String> {
        with(extra)
            .into_iter()
            .map(|a| a.replace("/run", "/locked"))
            .collect()
    };
    std::fs::create_dir_all(dir.join("locked")).unwrap();
    std::fs::write(dir.join("locked/.lock"), std::process::id().to_string()).unwrap();
    let (ok, log) = run(locked(&["--steps", "1"]));
    let holder = format!("another process (pid {}) is training", std::process::id());
    assert!(!ok && log.contains(&holder), "{log}");
    std::fs::write(dir.join("locked/.lock"), "4294967295").unwrap();
    let (ok, log) = run(locked(&["--steps", "1", "--batch-seconds", "2"]));
    assert!(ok && !dir.join("locked/.lock").exists(), "{log}");
    let (ok, log) = run(with(&[])
        .into_iter()
        .map(|a| a.replace("/run", "/train/wav.scp"))
        .collect());
    assert!(
        !ok && log.contains("cannot create the run folder: it exists and is not a folder"),
        "{log}"
    );
    std::fs::remove_dir_all(&out).unwrap();
    // The device path from the CLI: the emulator runs the GPU kernels; no GPU is a clear error.
    let emu = dir.join("emulated");
    let mut args = with(&[
        "--steps",
        "2",
        "--eval-every",
        "2",
        "--batch-seconds",
        "2",
        "--interfaces",
        "ws-large,single,hconv-d1",
        "--device",
        "emulator",
    ]);
    args[8] = emu.to_str().unwrap().to_string();
    let (ok, log) = run(args.clone());
    assert!(
        ok && log.contains("training 3 of 3 pairs on kernel emulator"),
        "{log}"
    );
    assert!(emu.join("single/latest/state.json").exists());
    assert!(emu.join("ws-large/latest/state.json").exists());
    // CLS pooling on the emulated device too, in its own run folder.
    let cls: Vec<String> = args
        .iter()
        .map(|a| match a.as_str() {
            "ws-large,single,hconv-d1" => "cls".into(),
            "2" => "3".into(),
            _ => a.clone(),
        })
        .collect();
    let cls: Vec<String> = cls
        .into_iter()
        .map(|a| a.replace("/emulated", "/emulated-cls"))
        .collect();
    let (ok, log) = run(cls);
    assert!(ok && log.contains("training 1 of 1 pairs"), "{log}");
    if strata::runtime::Backend::cuda().is_err() {
        let (ok, log) = run(with(&["--steps", "1", "--device", "cuda"]));
        assert!(!ok && log.contains("--device cuda: no usable GPU"), "{log}");
    }
    let (ok, log) = run(with(&["--device", "gpu"]));
    assert!(!ok && log.contains("unknown --device 'gpu'"), "{log}");
    let (ok, log) = run(with(&["--interfaces", "hconvv"]));
    assert!(!ok && log.contains("unknown interface 'hconvv'"), "{log}");
    let (ok, log) = run(with(&["--interfaces", "ws,hconv,ws"]));
    assert!(!ok && log.contains("'ws' is listed twice"), "{log}");
    // The parameters a sweep varies, spelled in the interface's name.
    let (ok, log) = run(with(&["--interfaces", "groupws9"]));
    assert!(
        !ok && log.contains("GroupWS needs 2 to 4 groups for 4 layers"),
        "{log}"
    );
    let (ok, log) = run(with(&["--interfaces", "pca33"]));
    assert!(
        !ok && log.contains("PCA + Concat takes 1 to 32 components per layer"),
        "{log}"
    );
    let (ok, log) = run(with(&["--interfaces", "hconv-k3x"]));
    assert!(!ok && log.contains("hconv-kKsSdD"), "{log}");
    let (ok, log) = run(with(&["--interfaces", "hconv-d0"]));
    assert!(!ok && log.contains("depth >= 1"), "{log}");
    let (ok, log) = run(with(&[
        "--steps",
        "2",
        "--batch-seconds",
        "2",
        "--interfaces",
        "hconv-k3s2,groupws3,single-1,ws-large,hconv-d1",
    ]));
    assert!(
        ok && ["hconv-k3s2", "groupws3", "single-1", "ws-large", "hconv-d1"]
            .iter()
            .all(|p| out.join(p).join("latest/state.json").exists()),
        "{log}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn demo_runs_the_whole_pipeline_and_prints_its_table() {
    let (ok, log) = strata(&["demo", "--steps", "20"]);
    assert!(ok, "{log}");
    for want in ["random-init", "WS", "HConv", "dev PER", "interface params"] {
        assert!(log.contains(want), "missing '{want}' in {log}");
    }
    let (ok, log) = strata(&["demo", "--steps", "x"]);
    assert!(!ok && log.contains("--steps"), "{log}");
    // Every command's --help is the usage, not an unknown option.
    for cmd in ["demo", "extract", "train", "eval"] {
        let (ok, log) = strata(&[cmd, "--help"]);
        assert!(
            ok && log.contains("usage: strata demo") && log.contains("--interfaces LIST"),
            "{cmd}: {log}"
        );
    }
    let (ok, log) = strata(&["train", "--bogus"]);
    assert!(
        !ok && log.contains("unknown option '--bogus' for train"),
        "{log}"
    );
}

#[test]
fn train_from_a_toml_config_classifies_with_a_feature_cache_and_eval_reads_the_run() {
    let dir = scratch("toml");
    for (name, n) in [("train", 8usize), ("dev", 4)] {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        let (mut scp, mut labels) = (String::new(), String::new());
        for u in 0..n {
            let high = u % 2 == 0;
            let step = if high { 0.2 } else { 0.03 };
            let tone: Vec<f32> = (0..7000 + 300 * u)
                .map(|i| (i as f32 * step).sin() * 0.3)
                .collect();
            write_wav(&d.join(format!("{u}.wav")), &tone, 16000, 1);
            scp.push_str(&format!("{name}{u} {u}.wav\n"));
            labels.push_str(&format!(
                "{name}{u} {}\n",
                if high { "high" } else { "low" }
            ));
        }
        std::fs::write(d.join("wav.scp"), scp).unwrap();
        std::fs::write(d.join("utt2label"), labels).unwrap();
    }
    let model = format!(
        "{}/tests/fixtures/upstream/hubert_group_postln",
        env!("CARGO_MANIFEST_DIR")
    );
    let out = dir.join("run");
    let config = dir.join("run.toml");
    std::fs::write(
        &config,
        format!(
            "model = {model:?}\ntrain = {:?}\ndev = {:?}\nout = {:?}\nfeatures = {:?}\ntask = \"classify\"\n\
             interfaces = [\"ws\", \"hconv\"]\nsteps = 4\nbatch_seconds = 2\naccum = 2\nschedule = \"cosine\"\n\
             warmup = 1\neval_every = 2\nsave_init = {:?}\n",
            dir.join("train"),
            dir.join("dev"),
            out,
            dir.join("feats"),
            dir.join("init.safetensors"),
        ),
    )
    .unwrap();
    let cfg = config.to_str().unwrap();
    let (ok, log) = strata(&["train", "--config", cfg, "--steps", "3"]);
    assert!(
        ok && log.contains("dev accuracy") && log.contains("extracting"),
        "{log}"
    );
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(run["steps"], 3, "a flag overrides the config");
    assert_eq!(run["task"], "classify");
    assert!(dir.join("feats/train/index.json").exists() && dir.join("init.safetensors").exists());
    // A cache is replaced only when asked (extraction can take hours).
    let (ok, log) = strata(&[
        "extract",
        "--model",
        &model,
        "--data",
        dir.join("dev").to_str().unwrap(),
        "--out",
        dir.join("feats/train").to_str().unwrap(),
    ]);
    assert!(
        !ok && log.contains("already holds a feature cache of 8 utterances"),
        "{log}"
    );
    assert!(out.join("curves.png").exists());
    // The second run reads the cache without an upstream at all.
    let (ok, log) = strata(&[
        "train",
        "--features",
        dir.join("feats").to_str().unwrap(),
        "--train",
        dir.join("train").to_str().unwrap(),
        "--dev",
        dir.join("dev").to_str().unwrap(),
        "--out",
        dir.join("run2").to_str().unwrap(),
        "--task",
        "classify",
        "--steps",
        "2",
        "--batch-seconds",
        "2",
        "--interfaces",
        "ws,pca",
    ]);
    assert!(ok && !log.contains("extracting"), "{log}");
    // PCA + Concat fitted on the cache's training states, not trained.
    assert!(
        log.contains("PCA + Concat fitted on") && log.contains("\npca "),
        "{log}"
    );
    // `strata eval` of `pair` in the run folder `run` on the dev set; `source` is the model or
    // the feature cache (["--model", M] / ["--features", F]), `extra` further flags.
    let eval = |source: [&str; 2], run: &str, pair: &str, extra: &[&str]| {
        let (run, data) = (dir.join(run), dir.join("dev"));
        let mut args = vec![
            "eval",
            source[0],
            source[1],
            "--run",
            run.to_str().unwrap(),
            "--pair",
            pair,
            "--data",
            data.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        strata(&args)
    };
    let with_model = ["--model", model.as_str()];
    let (ok, log) = eval(with_model, "run", "hconv", &[]);
    assert!(
        ok && log.contains("accuracy") && log.contains("over 4 utterances"),
        "{log}"
    );
    // Every pair of the run from one upstream pass: the same result line for hconv.
    let hconv_line = log.lines().find(|l| l.starts_with("hconv (best)")).unwrap();
    let (ok, all) = eval(with_model, "run", "all", &[]);
    assert!(
        ok && all.lines().any(|l| l == hconv_line)
            && all.lines().any(|l| l.starts_with("ws (best)")),
        "{all}"
    );
    // The run trained from the cache alone recorded the upstream that made the cache.
    let (ok, log) = eval(with_model, "run2", "ws", &[]);
    assert!(ok && log.contains("over 4 utterances"), "{log}");
    // And eval reads the cache without an upstream too, with the same result.
    let feats = dir.join("feats");
    let (ok, from_cache) = eval(["--features", feats.to_str().unwrap()], "run2", "ws", &[]);
    assert!(ok, "{from_cache}");
    let accuracy = |log: &str| log.split("accuracy ").nth(1).map(|r| r[..6].to_string());
    assert!(accuracy(&log).is_some(), "{log}");
    assert_eq!(
        accuracy(&from_cache),
        accuracy(&log),
        "{from_cache} vs {log}"
    );
    // PCA + Concat's fitted projection comes back from its checkpoint: the same result from the
    // upstream and from the cache.
    let (ok, log) = eval(with_model, "run2", "pca", &[]);
    let (ok2, from_cache) = eval(["--features", feats.to_str().unwrap()], "run2", "pca", &[]);
    assert!(ok && ok2 && accuracy(&log).is_some(), "{log}");
    assert_eq!(accuracy(&from_cache), accuracy(&log), "{from_cache}");
    let (ok, log) = eval(with_model, "run2", "ws", &["--normalize", "on"]);
    assert!(
        !ok && log.contains("trained with input normalization off, this evaluation has it on"),
        "{log}"
    );
    // Another upstream is refused, even where its states have the same shape.
    let other = model.replace("hubert_group_postln", "wavlm_group_postln");
    let (ok, log) = eval(["--model", other.as_str()], "run", "ws", &[]);
    assert!(
        !ok && log.contains("another upstream than --model") && log.contains("hubert_group_postln"),
        "{log}"
    );
    // A class the training set never had counts as an error, and is named.
    let labels = std::fs::read_to_string(dir.join("dev/utt2label")).unwrap();
    std::fs::write(
        dir.join("dev/utt2label"),
        labels.replacen("dev0 high", "dev0 middle", 1),
    )
    .unwrap();
    let (ok, log) = eval(with_model, "run", "ws", &[]);
    assert!(
        ok && log.contains("1 of the 4 reference tokens") && log.contains("'middle' x1"),
        "{log}"
    );
    let hyps = std::fs::read_to_string(dir.join("run/ws/hyp-best.tsv")).unwrap();
    assert!(
        hyps.lines()
            .any(|l| l.starts_with("dev0\t") && l.ends_with("\tmiddle")),
        "{hyps}"
    );

    std::fs::write(&config, "stpes = 3\n").unwrap();
    let (ok, log) = strata(&["train", "--config", cfg]);
    assert!(
        !ok && log.contains("'stpes' is not a train setting"),
        "{log}"
    );
    std::fs::write(&config, "steps = [3\n").unwrap();
    let (ok, log) = strata(&["train", "--config", cfg]);
    assert!(!ok && log.contains("not valid TOML"), "{log}");
    let (ok, log) = strata(&[
        "train",
        "--features",
        dir.join("nothing").to_str().unwrap(),
        "--train",
        dir.join("train").to_str().unwrap(),
        "--dev",
        dir.join("dev").to_str().unwrap(),
        "--out",
        dir.join("run3").to_str().unwrap(),
        "--task",
        "classify",
    ]);
    assert!(!ok && log.contains("give --model"), "{log}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn speaker_verification_trains_on_utt2spk_and_scores_trials() {
    let dir = scratch("sv");
    // Harmonic tones: each "speaker" has its own pitch; dev speakers are unseen in training.
    let speaker_wav = |path: &Path, f0: f32, n: usize| {
        let tone: Vec<f32> = (0..n)
            .map(|i| {
                let t = i as f32 / 16000.0;
                (1..5)
                    .map(|k| (std::f32::consts::TAU * f0 * k as f32 * t).sin() / k as f32)
                    .sum::<f32>()
                    * 0.2
            })
            .collect();
        write_wav(path, &tone, 16000, 1);
    };
    let mut ids = Vec::new();
    for (set, speakers) in [
        ("train", vec![("s1", 100.0), ("s2", 150.0), ("s3", 210.0)]),
        ("dev", vec![("s4", 120.0), ("s5", 180.0)]),
    ] {
        let d = dir.join(set);
        std::fs::create_dir_all(&d).unwrap();
        let (mut scp, mut spk) = (String::new(), String::new());
        for (s, f0) in speakers {
            for u in 0..3 {
                let id = format!("{s}-{u}");
                speaker_wav(
                    &d.join(format!("{id}.wav")),
                    f0 * (1.0 + 0.01 * u as f32),
                    8000 + 1000 * u,
                );
                scp.push_str(&format!("{id} {id}.wav\n"));
                spk.push_str(&format!("{id} {s}\n"));
                if set == "dev" {
                    ids.push((id, s));
                }
            }
        }
        std::fs::write(d.join("wav.scp"), scp).unwrap();
        std::fs::write(d.join("utt2spk"), spk).unwrap();
    }
    let mut trials = String::new();
    for (i, (a, sa)) in ids.iter().enumerate() {
        for (b, sb) in &ids[i + 1..] {
            trials.push_str(&format!("{} {a} {b}\n", (sa == sb) as u8));
        }
    }
    std::fs::write(dir.join("dev/trials"), trials).unwrap();
    let model = format!(
        "{}/tests/fixtures/upstream/hubert_group_postln",
        env!("CARGO_MANIFEST_DIR")
    );
    let (train, dev, out) = (dir.join("train"), dir.join("dev"), dir.join("run"));
    let args = |dev: &Path, out: &Path, extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "train",
            "--model",
            &model,
            "--task",
            "sv",
            "--steps",
            "4",
            "--eval-every",
            "2",
            "--batch-seconds",
            "3",
            "--interfaces",
            "ws,hconv",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for s in [
            "--train",
            train.to_str().unwrap(),
            "--dev",
            dev.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]
        .iter()
        .chain(extra)
        {
            a.push(s.to_string());
        }
        a
    };
    let run = |a: Vec<String>| strata(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let (ok, log) = run(args(&dev, &out, &[]));
    assert!(
        ok && log.contains("3 speakers") && log.contains("dev EER"),
        "{log}"
    );
    // eval scores the trials with the best checkpoints: the EER the log recorded there.
    let (ok, eval) = strata(&[
        "eval",
        "--model",
        &model,
        "--run",
        out.to_str().unwrap(),
        "--pair",
        "all",
        "--data",
        dev.to_str().unwrap(),
    ]);
    assert!(ok, "{eval}");
    let logged = std::fs::read_to_string(out.join("log.jsonl")).unwrap();
    for pair in ["ws", "hconv"] {
        let best = (logged.lines())
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["pair"] == pair)
            .filter_map(|v| v["dev_eer"].as_f64())
            .fold(f64::INFINITY, f64::min);
        let want = format!(
            "{pair} (best) on {}: EER {:.2}% over 15 trials",
            dev.display(),
            100.0 * best
        );
        assert!(eval.contains(&want), "missing '{want}' in {eval}");
        let scores = std::fs::read_to_string(out.join(pair).join("hyp-best.tsv")).unwrap();
        assert_eq!(scores.lines().count(), 15);
        assert!(scores.starts_with("s4-0 s4-1\t"), "{scores}");
        assert!(
            scores.lines().next().unwrap().ends_with("\ttarget"),
            "{scores}"
        );
    }
    // s3prl's random 8 s training crops, here 0.4 s windows (the head needs 0.33 s).
    let (ok, log) = run(args(&dev, &dir.join("crop"), &["--crop-seconds", "0.4"]));
    assert!(ok && log.contains("dev EER"), "{log}");
    let run_json = std::fs::read_to_string(dir.join("crop/run.json")).unwrap();
    assert!(run_json.contains("\"crop_seconds\": 0.4"), "{run_json}");
    let (ok, log) = run(args(&dev, &dir.join("crop2"), &["--crop-seconds", "0.01"]));
    assert!(
        !ok && log.contains("--crop-seconds takes at least 0.025"),
        "{log}"
    );
    // A dev set without trials, or given as a manifest, is refused up front.
    std::fs::rename(dir.join("dev/trials"), dir.join("dev/trials.off")).unwrap();
    let (ok, log) = run(args(&dev, &dir.join("r2"), &[]));
    assert!(
        !ok && log.contains("trials") && log.contains("cannot read"),
        "{log}"
    );
    let manifest = dir.join("dev.tsv");
    std::fs::write(&manifest, "s4-0.wav\ts4\n").unwrap();
    let (ok, log) = run(args(&manifest, &dir.join("r3"), &[]));
    assert!(
        !ok && log.contains("a speaker-verification set is a folder with wav.scp and trials"),
        "{log}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// A character-recognition corpus of transcribed tones (6 train, 2 dev utterances) with the tiny
/// HuBERT fixture, for the CTC heads' CLI tests: `train` into an output folder under it (ws and
/// hconv pairs, 2 s batches) and the paths around it.
struct CharsRuns {
    dir: PathBuf,
    model: String,
}

impl CharsRuns {
    fn new(tag: &str) -> Self {
        let dir = scratch(tag);
        transcribed_tones(
            &dir,
            &[("train", 6), ("dev", 2)],
            9000,
            700,
            &["ab c", "ca", "b a"],
        );
        let model = format!(
            "{}/tests/fixtures/upstream/hubert_group_postln",
            env!("CARGO_MANIFEST_DIR")
        );
        CharsRuns { dir, model }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_str().unwrap().to_string()
    }

    /// `strata train` into the folder `out`, with `extra` after the common arguments.
    fn train(&self, out: &str, extra: &[&str]) -> (bool, String) {
        let (t, d, o) = (self.path("train"), self.path("dev"), self.path(out));
        let base = [
            "train",
            "--model",
            &self.model,
            "--train",
            &t,
            "--dev",
            &d,
            "--out",
            &o,
            "--task",
            "chars",
            "--batch-seconds",
            "2",
            "--interfaces",
            "ws,hconv",
        ];
        strata(&base.iter().chain(extra).copied().collect::<Vec<_>>())
    }

    /// The run.json that `train` wrote into `out`.
    fn recorded(&self, out: &str) -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(self.dir.join(out).join("run.json")).unwrap())
            .unwrap()
    }
}

#[test]
fn the_ml_superb_head_trains_from_the_cli_and_eval_and_resume_follow_the_run() {
    let runs = CharsRuns::new("mlsuperb");
    let (model, o, d) = (&runs.model, runs.path("run"), runs.path("dev"));
    let run = |extra: &[&str]| runs.train("run", extra);
    // With ESPnet's model averaging over the 2 best of 2 evaluations.
    let (ok, log) = run(&[
        "--head",
        "mlsuperb",
        "--steps",
        "2",
        "--eval-every",
        "1",
        "--average-best",
        "2",
        "--average-by",
        "loss",
    ]);
    assert!(
        ok && log.contains("dev error") && log.contains("ws averaged over steps ["),
        "{log}"
    );
    let recorded = runs.recorded("run");
    assert_eq!(recorded["head"], "mlsuperb");
    assert_eq!(recorded["average_best"], 2);
    assert_eq!(recorded["average_by"], "loss");
    // eval builds the head the run recorded (a SUPERB head would not find its parameters).
    let eval = |which: &str| {
        strata(&[
            "eval", "--model", model, "--run", &o, "--pair", "all", "--data", &d, "--device",
            "cpu", "--which", which,
        ])
    };
    let (ok, log) = eval("best");
    assert!(
        ok && log.contains("ws (best) on") && log.contains("CER"),
        "{log}"
    );
    let (ok, log) = eval("averaged");
    assert!(ok && log.contains("hconv (averaged) on"), "{log}");
    // A test utterance too short for the head's convolutions (0.1 s: 4 frames) is named.
    let short = runs.dir.join("short");
    std::fs::create_dir_all(&short).unwrap();
    write_wav(&short.join("s.wav"), &[0.1; 1600], 16000, 1);
    std::fs::write(short.join("wav.scp"), "tiny s.wav\n").unwrap();
    std::fs::write(short.join("text"), "tiny a\n").unwrap();
    let (ok, log) = strata(&[
        "eval",
        "--model",
        model,
        "--run",
        &o,
        "--pair",
        "ws",
        "--data",
        short.to_str().unwrap(),
    ]);
    assert!(
        !ok && log.contains("'tiny' has 4 frames, fewer than the 7"),
        "{log}"
    );
    // A resume must keep the head and the n-best averaging.
    let (ok, log) = run(&["--steps", "4", "--resume"]);
    assert!(
        !ok && log.contains("head = \"mlsuperb\", this one \"superb\""),
        "{log}"
    );
    let (ok, log) = run(&["--head", "mlsuperb", "--steps", "3", "--resume"]);
    assert!(
        !ok && log.contains("resume with --average-best 2 --average-by loss"),
        "{log}"
    );
    assert_eq!(
        runs.recorded("run")["average_best"],
        2,
        "a refused resume changes nothing"
    );
    let (ok, log) = run(&[
        "--head",
        "mlsuperb",
        "--steps",
        "3",
        "--average-best",
        "2",
        "--average-by",
        "loss",
        "--resume",
    ]);
    assert!(ok && log.contains("ws averaged over steps"), "{log}");
    // The head is for CTC tasks and takes known names only. (Its device path: tests/device_step.rs;
    // at the recipe's width one emulated step takes minutes.)
    let (ok, log) = runs.train("classify", &["--head", "mlsuperb", "--task", "classify"]);
    assert!(!ok && log.contains("for --task units or chars"), "{log}");
    let (ok, log) = run(&["--head", "espnet"]);
    assert!(
        !ok && log.contains("--head takes superb (SUPERB PR's head), mlsuperb"),
        "{log}"
    );
    std::fs::remove_dir_all(&runs.dir).ok();
}

#[test]
fn the_asr_head_trains_from_the_cli_and_eval_and_resume_follow_the_run() {
    let runs = CharsRuns::new("asr");
    let train = |out: &str, extra: &[&str]| {
        let args: Vec<&str> = ["--optimizer", "adam"]
            .iter()
            .chain(extra)
            .copied()
            .collect();
        runs.train(out, &args)
    };
    let run = |extra: &[&str]| train("run", extra);
    let (ok, log) = run(&["--head", "asr-16", "--steps", "2", "--eval-every", "1"]);
    assert!(ok && log.contains("dev error"), "{log}");
    assert_eq!(runs.recorded("run")["head"], "asr-16");
    // eval builds the head the run recorded, at its width.
    let (ok, log) = strata(&[
        "eval",
        "--model",
        &runs.model,
        "--run",
        &runs.path("run"),
        "--pair",
        "all",
        "--data",
        &runs.path("dev"),
    ]);
    assert!(
        ok && log.contains("hconv (best) on") && log.contains("CER") && log.contains("%, WER "),
        "{log}"
    );
    // A resume must keep the head, its width included; with it, the run goes on.
    let (ok, log) = run(&["--head", "asr", "--steps", "3", "--resume"]);
    assert!(
        !ok && log.contains("head = \"asr-16\", this one \"asr\""),
        "{log}"
    );
    let (ok, log) = run(&["--head", "asr-16", "--steps", "3", "--resume"]);
    assert!(ok && log.contains("step 3/3"), "{log}");
    // On the device path (emulated): a step and the final evaluation. ws-large is not defined
    // for this head; widths are numbers.
    let (ok, log) = train(
        "emulated",
        &["--head", "asr-16", "--steps", "1", "--device", "emulator"],
    );
    assert!(ok && log.contains("dev error"), "{log}");
    let (ok, log) = train(
        "other",
        &[
            "--head",
            "asr-16",
            "--steps",
            "1",
            "--interfaces",
            "ws-large",
        ],
    );
    assert!(!ok && log.contains("not the ASR head"), "{log}");
    let (ok, log) = train("other", &["--head", "asr-0"]);
    assert!(!ok && log.contains("asr-N takes N >= 1"), "{log}");
    std::fs::remove_dir_all(&runs.dir).ok();
}

#[test]
fn a_lexicon_turns_word_transcripts_into_phones_for_train_and_eval() {
    let runs = CharsRuns::new("lexicon");
    // s3prl's G2P: files in order, a word's first pronunciation kept, words upper-cased.
    let (lex1, lex2) = (runs.dir.join("lex1.txt"), runs.dir.join("lex2.txt"));
    std::fs::write(&lex1, "AB ae b\nC k iy\n\nCA k ae\nB b iy\nCA WRONG\n").unwrap();
    std::fs::write(&lex2, "A ey\nB WRONG\nAB WRONG\n").unwrap();
    let lexicons = format!("{},{}", lex1.display(), lex2.display());
    let units = [
        "--task",
        "units",
        "--steps",
        "2",
        "--lexicon",
        lexicons.as_str(),
    ];
    let (ok, log) = runs.train("run", &units);
    // The dev references are phones too: none outside the training phones.
    assert!(
        ok && log.contains("dev error") && !log.contains("not in the vocabulary"),
        "{log}"
    );
    let vocab = std::fs::read_to_string(runs.dir.join("run/vocab.txt")).unwrap();
    let mut tokens: Vec<&str> = vocab.lines().skip(1).collect();
    tokens.sort();
    assert_eq!(tokens, ["ae", "b", "ey", "iy", "k"], "{vocab}");
    let recorded = runs.recorded("run");
    assert_eq!(recorded["lexicon"].as_array().unwrap().len(), 2);
    // eval maps the references with the lexicon the run recorded.
    let eval = |extra: &[&str]| {
        let (r, d) = (runs.path("run"), runs.path("dev"));
        let base = [
            "eval",
            "--model",
            &runs.model,
            "--run",
            &r,
            "--pair",
            "ws",
            "--data",
            &d,
        ];
        strata(&base.iter().chain(extra).copied().collect::<Vec<_>>())
    };
    let (ok, log) = eval(&[]);
    assert!(
        ok && log.contains("ws (best) on")
            && log.contains("PER")
            && !log.contains("not in the vocabulary"),
        "{log}"
    );
    let (ok, log) = eval(&["--lexicon", "/no/such/lexicon.txt"]);
    assert!(!ok && log.contains("/no/such/lexicon.txt"), "{log}");

    // A word outside the lexicon names its utterance; --skip-bad leaves that utterance out.
    transcribed_tones(
        &runs.dir,
        &[("dev2", 3)],
        9000,
        700,
        &["ab zz c", "ca", "b"],
    );
    let d2 = runs.path("dev2");
    let with_dev2: Vec<&str> = units
        .iter()
        .copied()
        .chain(["--dev", d2.as_str()])
        .collect();
    let (ok, log) = runs.train("run2", &with_dev2);
    assert!(
        !ok && log.contains("'dev20'") && log.contains("'zz'") && log.contains("lex1.txt"),
        "{log}"
    );
    let skipping: Vec<&str> = with_dev2.iter().copied().chain(["--skip-bad"]).collect();
    let (ok, log) = runs.train("run3", &skipping);
    assert!(
        ok && log.contains("skipped 1 utterances with words outside the lexicon"),
        "{log}"
    );
    // Only word-to-phone tasks take a lexicon; a lexicon line needs phones.
    let (ok, log) = runs.train("run4", &["--lexicon", lexicons.as_str()]);
    assert!(
        !ok && log.contains("for --task units, not --task chars"),
        "{log}"
    );
    std::fs::write(&lex2, "A\n").unwrap();
    let (ok, log) = runs.train("run5", &units);
    assert!(
        !ok && log.contains("lex2.txt") && log.contains("line 1: 'A' has no phones"),
        "{log}"
    );
    std::fs::remove_dir_all(&runs.dir).ok();
}
