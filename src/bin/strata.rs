//! The strata command line.
//!
//!   strata demo [--steps N] [--seed S] [--lr X]             built-in default: no downloads, CPU
//!   strata extract --model DIR --out FILE [opts] A.wav ...  every hidden state of each file
//!   strata train --model DIR --train D --dev D --out DIR [opts]  interfaces + PR heads, CTC
//!   strata eval --model DIR --run OUT --pair NAME --data D [--which best|latest] [--hyp FILE]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;
use strata::models::interface::InterfaceConfig;
use strata::models::upstream::{Upstream, UpstreamConfig};
use strata::optim::AdamConfig;
use strata::train::data::length_buckets;
use strata::train::metrics::ErrorRate;
use strata::train::side_by_side::PrPair;
use strata::train::synthetic_speech;
use strata::{DType, PackedBatch};

const USAGE: &str = "usage: strata demo [--steps N] [--seed S] [--lr X]
       strata extract --model DIR --out FEATS.safetensors [--dtype f32|f16] [--normalize auto|on|off] A.wav [B.wav ...]
       strata train --model DIR --train DATA --dev DATA --out DIR [--task units|chars] [--interfaces ws,hconv]
                    [--steps N] [--lr X] [--batch-seconds S] [--clip C] [--eval-every N] [--seed S]
                    [--vocab FILE] [--resume] [--no-shuffle] [--skip-bad]
       strata eval --model DIR --run OUT --pair NAME --data DATA [--task units|chars] [--which best|latest]
                   [--hyp FILE] [--skip-bad]

  demo   makes a deterministic speech-like corpus in memory (16 phone-like units with transcripts),
         runs a tiny random-init HuBERT-shaped upstream (13 states x 64 dims) over it once, trains the
         weighted-sum (WS) and hierarchical-convolution (HConv) interfaces side by side, each with a
         SUPERB phone-recognition head (CTC), and prints dev PER, training speed and parameter counts.
         No downloads, CPU only, about 10 s.

  extract  runs a Hugging Face HuBERT / wav2vec2 / WavLM model directory (config.json +
         safetensors) on 16 kHz mono WAV files and writes, for each file, a tensor named by the
         file's stem with shape [frames, layers + 1, hidden] (every hidden state, as transformers'
         output_hidden_states). --normalize auto follows the directory's preprocessor_config.json
         (do_normalize), off when it has none.

  train  trains one or several interfaces (ws, hconv, concat, groupws2..4, single, cls), each with a
         SUPERB PR head and CTC, side by side from ONE upstream pass per batch, on the CPU. DATA is a
         Kaldi-style folder (wav.scp + text) or a TSV manifest (path<TAB>transcript). --task units
         splits transcripts on spaces (phones), chars uses characters ('|' between words). Writes
         OUT/log.jsonl (loss per pair per step, dev error rate per evaluation), OUT/vocab.txt and
         OUT/<pair>/{latest,best}/ checkpoints; --resume continues bit for bit from latest.
         Defaults: AdamW lr 1e-3, 60 s of audio per batch, clip 1, eval every 100 steps.

  eval   decodes DATA with a pair trained by `train` (OUT/<pair>/best by default, with
         OUT/vocab.txt), prints its error rate (PER, or CER with --task chars) and writes every
         utterance's hypothesis to --hyp (default OUT/<pair>/hyp-<which>.tsv: id, hypothesis,
         reference).";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("demo") => parse_demo(&args[1..])
            .and_then(|(steps, seed, lr)| demo(steps, seed, lr).map_err(|e| e.to_string())),
        Some("extract") => extract(&args[1..]),
        Some("train") => train_cmd(&args[1..]),
        Some("eval") => eval_cmd(&args[1..]),
        Some("--version") | Some("-V") => {
            println!(
                "strata {} ({})",
                env!("CARGO_PKG_VERSION"),
                strata::GIT_COMMIT
            );
            Ok(())
        }
        Some("--help") | Some("-h") | Some("help") => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(format!("unknown command '{other}'\n\n{USAGE}")),
        None => Err(USAGE.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn parse_demo(args: &[String]) -> Result<(u64, u64, f64), String> {
    let (mut steps, mut seed, mut lr) = (1000u64, 0u64, 2e-3f64);
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        if flag == "--lr" {
            lr = value
                .parse()
                .ok()
                .filter(|x: &f64| *x > 0.0)
                .ok_or_else(|| format!("--lr takes a positive number, got '{value}'"))?;
            continue;
        }
        let parsed: u64 = value
            .parse()
            .map_err(|_| format!("{flag} takes a non-negative integer, got '{value}'"))?;
        match flag.as_str() {
            "--steps" => steps = parsed,
            "--seed" => seed = parsed,
            _ => return Err(format!("unknown option '{flag}' for demo\n\n{USAGE}")),
        }
    }
    Ok((steps, seed, lr))
}

/// A hidden-state stack, its utterance layout and the unit targets.
type DemoBatch = (strata::Tensor, PackedBatch, Vec<Vec<usize>>);

/// Runs the frozen upstream once over a corpus, in length buckets of about `seconds` of audio: the
/// stacks are reused every epoch (the demo's in-memory feature cache).
fn upstream_batches(
    upstream: &Upstream,
    utts: &[synthetic_speech::SpeechUtterance],
    vocab: &[&str],
    seconds: f64,
    seed: u64,
) -> strata::Result<Vec<DemoBatch>> {
    let samples: Vec<usize> = utts.iter().map(|u| u.wave.len()).collect();
    let buckets = length_buckets(&samples, (seconds * 16000.0) as usize, Some(seed));
    buckets
        .iter()
        .map(|b| {
            let waves: Vec<&[f32]> = b.iter().map(|&i| utts[i].wave.as_slice()).collect();
            let names: Vec<&str> = b.iter().map(|&i| utts[i].id.as_str()).collect();
            let (stack, batch) = upstream.forward(&waves, &names)?;
            let targets = b
                .iter()
                .map(|&i| {
                    utts[i]
                        .units
                        .iter()
                        .map(|t| 1 + vocab.iter().position(|v| v == t).expect("a known unit"))
                        .collect()
                })
                .collect();
            Ok((stack, batch, targets))
        })
        .collect()
}

fn demo(steps: u64, seed: u64, lr: f64) -> strata::Result<()> {
    let config = UpstreamConfig::tiny();
    let upstream = Upstream::random(config.clone(), seed)?;
    let (layers, dim) = (upstream.num_states(), upstream.hidden_size());
    let units = synthetic_speech::unit_names();
    println!(
        "strata demo ({}): a tiny random-init HuBERT-shaped upstream ({} layers, {dim} dims, {} states)",
        strata::GIT_COMMIT,
        config.num_layers,
        layers
    );
    let t0 = Instant::now();
    let train = synthetic_speech::corpus(seed + 1, 320, "train");
    let dev = synthetic_speech::corpus(seed + 2, 80, "dev");
    let audio: f64 = train
        .iter()
        .chain(&dev)
        .map(|u| u.wave.len())
        .sum::<usize>() as f64
        / 16000.0;
    println!(
        "synthetic speech-like corpus: {} train / {} dev utterances of {} phone-like units, {audio:.0} s of audio",
        train.len(),
        dev.len(),
        units.len()
    );
    let train_batches = upstream_batches(&upstream, &train, &units, 8.0, seed)?;
    let dev_batches = upstream_batches(&upstream, &dev, &units, 8.0, seed)?;
    println!(
        "upstream pass over all audio, once (it is frozen): {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let opt = AdamConfig::adamw(lr);
    let vocab = units.len() + 1;
    let mut pairs = [
        PrPair::new(
            "WS",
            &InterfaceConfig::weighted_sum(layers, dim),
            vocab,
            opt,
            Some(1.0),
            seed,
        )?,
        PrPair::new(
            "HConv",
            &InterfaceConfig::hconv(layers, dim),
            vocab,
            opt,
            Some(1.0),
            seed,
        )?,
    ];
    let mut seconds = vec![0f64; pairs.len()];
    let mut frames = 0usize;
    let mut last = vec![0f32; pairs.len()];
    for step in 0..steps {
        // One stack per batch feeds every pair: the sweep costs one upstream pass.
        let (stack, batch, targets) = &train_batches[step as usize % train_batches.len()];
        frames += batch.total_frames();
        for (i, pair) in pairs.iter_mut().enumerate() {
            let t0 = Instant::now();
            last[i] = pair.train_step(stack, batch, targets)?;
            seconds[i] += t0.elapsed().as_secs_f64();
        }
        if (step + 1) % 100 == 0 || step + 1 == steps {
            let losses: Vec<String> = pairs
                .iter()
                .zip(&last)
                .map(|(p, l)| format!("{} {l:.3}", p.name))
                .collect();
            println!("step {:5}  ctc loss: {}", step + 1, losses.join(", "));
        }
    }
    println!();
    println!(
        "{:<8} {:>16} {:>10} {:>16}",
        "interface", "interface params", "dev PER", "train frames/s"
    );
    for (i, pair) in pairs.iter().enumerate() {
        let mut per = ErrorRate::default();
        for (stack, batch, targets) in &dev_batches {
            for (hyp, reference) in pair.decode(stack, batch)?.iter().zip(targets) {
                per.add(hyp, reference);
            }
        }
        let fps = if seconds[i] > 0.0 {
            frames as f64 / seconds[i]
        } else {
            0.0
        };
        println!(
            "{:<8} {:>16} {:>9.2}% {:>16.0}",
            pair.name,
            pair.interface_params(),
            100.0 * per.rate(),
            fps
        );
    }
    println!(
        "\nThese PERs describe synthetic audio through an UNTRAINED upstream: random features carry little\n\
         phone information (SUPERB's FBANK baseline scores 82% PER on real speech), so expect high\n\
         numbers. The demo shows the whole pipeline (audio -> upstream -> every hidden state -> WS and\n\
         HConv side by side -> PR heads -> CTC -> AdamW) running; use `strata train` with a real\n\
         checkpoint for real results."
    );
    Ok(())
}

struct ExtractArgs {
    model: PathBuf,
    out: PathBuf,
    dtype: DType,
    normalize: Option<bool>,
    wavs: Vec<PathBuf>,
}

fn parse_extract(args: &[String]) -> Result<ExtractArgs, String> {
    let (mut model, mut out, mut dtype, mut normalize, mut wavs) =
        (None, None, DType::F32, None, Vec::new());
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{a} needs a value"))
        };
        match a.as_str() {
            "--model" => model = Some(PathBuf::from(value()?)),
            "--out" => out = Some(PathBuf::from(value()?)),
            "--dtype" => {
                dtype = match value()?.as_str() {
                    "f32" => DType::F32,
                    "f16" => DType::F16,
                    other => return Err(format!("--dtype takes f32 or f16, got '{other}'")),
                }
            }
            "--normalize" => {
                normalize = match value()?.as_str() {
                    "auto" => None,
                    "on" => Some(true),
                    "off" => Some(false),
                    other => {
                        return Err(format!("--normalize takes auto, on or off, got '{other}'"))
                    }
                }
            }
            flag if flag.starts_with("--") => {
                return Err(format!("unknown option '{flag}' for extract\n\n{USAGE}"))
            }
            wav => wavs.push(PathBuf::from(wav)),
        }
    }
    let model = model.ok_or_else(|| format!("extract needs --model DIR\n\n{USAGE}"))?;
    let out = out.ok_or_else(|| format!("extract needs --out FEATS.safetensors\n\n{USAGE}"))?;
    if wavs.is_empty() {
        return Err(format!("extract needs at least one WAV file\n\n{USAGE}"));
    }
    Ok(ExtractArgs {
        model,
        out,
        dtype,
        normalize,
        wavs,
    })
}

/// do_normalize from the model directory's preprocessor_config.json, if it has one.
fn preprocessor_normalize(dir: &Path) -> Result<Option<bool>, String> {
    let p = dir.join("preprocessor_config.json");
    if !p.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: not valid JSON: {e}", p.display()))?;
    Ok(v.get("do_normalize").and_then(|b| b.as_bool()))
}

fn extract(args: &[String]) -> Result<(), String> {
    let a = parse_extract(args)?;
    let normalize = match a.normalize {
        Some(n) => n,
        None => preprocessor_normalize(&a.model)?.unwrap_or(false),
    };
    let mut names = std::collections::BTreeMap::new();
    for w in &a.wavs {
        let stem = w
            .file_stem()
            .and_then(|s| s.to_str())
            .ok_or_else(|| format!("{}: cannot name a tensor after this path", w.display()))?;
        if let Some(prev) = names.insert(stem.to_string(), w.clone()) {
            return Err(format!(
                "{} and {} share the stem '{stem}': output tensors are named by stem",
                prev.display(),
                w.display()
            ));
        }
    }
    let model = Upstream::load(&a.model).map_err(|e| e.to_string())?;
    eprintln!(
        "{}: {:?}, {} states x {} dims, input normalization {}",
        a.model.display(),
        model.config.model_type,
        model.num_states(),
        model.hidden_size(),
        if normalize { "on" } else { "off" }
    );
    let mut outputs: Vec<(String, strata::Tensor)> = Vec::new();
    let t0 = Instant::now();
    let mut audio_seconds = 0.0;
    for (stem, path) in &names {
        let mut wave = strata::audio::read_wav(path).map_err(|e| e.to_string())?;
        audio_seconds += wave.len() as f64 / 16000.0;
        if normalize {
            wave = strata::models::upstream::normalize_wave(&wave);
        }
        let label = path.display().to_string();
        let (stack, _) = model
            .forward(&[&wave], &[label.as_str()])
            .map_err(|e| e.to_string())?;
        outputs.push((stem.clone(), stack.to_dtype(a.dtype)));
    }
    let named: Vec<(String, &strata::Tensor)> =
        outputs.iter().map(|(n, t)| (n.clone(), t)).collect();
    strata::io::save_safetensors_atomic(&a.out, &named).map_err(|e| e.to_string())?;
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "wrote {} tensors to {} ({audio_seconds:.1} s of audio in {secs:.1} s)",
        outputs.len(),
        a.out.display()
    );
    Ok(())
}

fn interface_named(name: &str, layers: usize, dim: usize) -> Result<InterfaceConfig, String> {
    use strata::models::interface::{ClsActivation, InterfaceKind};
    let kind = match name {
        "ws" => InterfaceKind::WeightedSum,
        "hconv" => InterfaceKind::HConv { kernel: 5, stride: 3 },
        "concat" => InterfaceKind::ConcatProj { out_dim: dim },
        "groupws2" | "groupws3" | "groupws4" => InterfaceKind::GroupWs { groups: name[7..].parse().unwrap_or(2), out_dim: dim },
        "single" => InterfaceKind::SingleLayer { layer: -1 },
        "cls" => InterfaceKind::ClsPool { heads: if dim % 8 == 0 { 8 } else { 1 }, ffn_dim: 4 * dim, activation: ClsActivation::Gelu },
        other => return Err(format!("unknown interface '{other}': use ws, hconv, concat, groupws2, groupws3, groupws4, single or cls")),
    };
    Ok(InterfaceConfig::new(layers, dim, kind))
}

fn load_data(
    path: &Path,
    task: strata::train::data::Task,
    on_bad: strata::train::data::OnBad,
) -> Result<strata::train::data::Dataset, String> {
    let ds = if path.is_dir() {
        strata::train::data::load_kaldi_dir(path, task, on_bad)
    } else {
        strata::train::data::load_tsv(path, task, on_bad)
    }
    .map_err(|e| e.to_string())?;
    if !ds.skipped.is_empty() {
        eprintln!(
            "{}: skipped {} bad utterances (first: {} - {})",
            path.display(),
            ds.skipped.len(),
            ds.skipped[0].0,
            ds.skipped[0].1
        );
    }
    Ok(ds)
}

fn train_cmd(args: &[String]) -> Result<(), String> {
    use strata::train::data::{OnBad, Task, Vocab};
    let (mut model, mut train_p, mut dev_p, mut out, mut vocab_p) = (None, None, None, None, None);
    let (mut task, mut names, mut steps, mut lr, mut secs, mut clip, mut every, mut seed) = (
        Task::Units,
        "ws,hconv".to_string(),
        1000u64,
        1e-3f64,
        60.0f64,
        1.0f64,
        100u64,
        0u64,
    );
    let (mut resume, mut shuffle, mut on_bad) = (false, true, OnBad::Fail);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{a} needs a value"))
        };
        let num = |v: String, what: &str| {
            v.parse::<f64>()
                .map_err(|_| format!("{what} takes a number, got '{v}'"))
        };
        match a.as_str() {
            "--model" => model = Some(PathBuf::from(value()?)),
            "--train" => train_p = Some(PathBuf::from(value()?)),
            "--dev" => dev_p = Some(PathBuf::from(value()?)),
            "--out" => out = Some(PathBuf::from(value()?)),
            "--vocab" => vocab_p = Some(PathBuf::from(value()?)),
            "--task" => task = parse_task(&value()?)?,
            "--interfaces" => names = value()?,
            "--steps" => steps = num(value()?, "--steps")? as u64,
            "--lr" => lr = num(value()?, "--lr")?,
            "--batch-seconds" => secs = num(value()?, "--batch-seconds")?,
            "--clip" => clip = num(value()?, "--clip")?,
            "--eval-every" => every = num(value()?, "--eval-every")? as u64,
            "--seed" => seed = num(value()?, "--seed")? as u64,
            "--resume" => resume = true,
            "--no-shuffle" => shuffle = false,
            "--skip-bad" => on_bad = OnBad::Skip,
            other => return Err(format!("unknown option '{other}' for train\n\n{USAGE}")),
        }
    }
    let need =
        |v: Option<PathBuf>, flag: &str| v.ok_or_else(|| format!("train needs {flag}\n\n{USAGE}"));
    let (model, train_p, dev_p, out) = (
        need(model, "--model DIR")?,
        need(train_p, "--train DATA")?,
        need(dev_p, "--dev DATA")?,
        need(out, "--out DIR")?,
    );
    if secs.is_nan() || secs <= 0.0 || lr.is_nan() || lr <= 0.0 || steps == 0 {
        return Err("--batch-seconds, --lr and --steps must be positive".into());
    }
    let upstream = Upstream::load(&model).map_err(|e| e.to_string())?;
    let train = load_data(&train_p, task, on_bad)?;
    let dev = load_data(&dev_p, task, on_bad)?;
    let vocab = match &vocab_p {
        Some(p) => Vocab::from_file(p, true).map_err(|e| e.to_string())?,
        None => Vocab::from_dataset(&train, true),
    };
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    std::fs::write(out.join("vocab.txt"), vocab.tokens.join("\n") + "\n")
        .map_err(|e| format!("{}: {e}", out.display()))?;
    let interfaces = names
        .split(',')
        .map(|n| {
            interface_named(n.trim(), upstream.num_states(), upstream.hidden_size())
                .map(|c| (n.trim().to_string(), c))
        })
        .collect::<Result<Vec<_>, String>>()?;
    eprintln!(
        "{}: {:?}, {} states x {}; {} train / {} dev utterances; {} tokens; pairs: {names}",
        model.display(),
        upstream.config.model_type,
        upstream.num_states(),
        upstream.hidden_size(),
        train.utterances.len(),
        dev.utterances.len(),
        vocab.len()
    );
    let cfg = strata::train::run::TrainConfig {
        interfaces,
        optimizer: AdamConfig::adamw(lr),
        clip: (clip > 0.0).then_some(clip),
        steps,
        batch_samples: (secs * 16000.0) as usize,
        eval_every: every,
        seed,
        shuffle,
        out: out.clone(),
        resume,
        on_bad,
    };
    let results = strata::train::run::train(&upstream, train, dev, &vocab, &cfg)
        .map_err(|e| e.to_string())?;
    println!("{:<10} {:>8} {:>12}", "interface", "step", "dev error");
    for r in results {
        println!(
            "{:<10} {:>8} {:>11.2}%",
            r.name,
            r.step,
            100.0 * r.error_rate
        );
    }
    println!("log: {}", out.join("log.jsonl").display());
    Ok(())
}

fn eval_cmd(args: &[String]) -> Result<(), String> {
    use strata::train::data::{OnBad, Task, Vocab};
    let (mut model, mut run, mut pair, mut data, mut hyp) = (None, None, None, None, None);
    let (mut task, mut which, mut on_bad) = (Task::Units, "best".to_string(), OnBad::Fail);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{a} needs a value"))
        };
        match a.as_str() {
            "--model" => model = Some(PathBuf::from(value()?)),
            "--run" => run = Some(PathBuf::from(value()?)),
            "--pair" => pair = Some(value()?),
            "--data" => data = Some(PathBuf::from(value()?)),
            "--hyp" => hyp = Some(PathBuf::from(value()?)),
            "--which" => {
                which = value()?;
                if which != "best" && which != "latest" {
                    return Err(format!("--which takes best or latest, got '{which}'"));
                }
            }
            "--task" => task = parse_task(&value()?)?,
            "--skip-bad" => on_bad = OnBad::Skip,
            other => return Err(format!("unknown option '{other}' for eval\n\n{USAGE}")),
        }
    }
    let need =
        |v: Option<PathBuf>, flag: &str| v.ok_or_else(|| format!("eval needs {flag}\n\n{USAGE}"));
    let (model, run, data) = (
        need(model, "--model DIR")?,
        need(run, "--run OUT")?,
        need(data, "--data DATA")?,
    );
    let pair = pair.ok_or_else(|| {
        format!(
            "eval needs --pair NAME (an interface trained in {})",
            run.display()
        )
    })?;
    let upstream = Upstream::load(&model).map_err(|e| e.to_string())?;
    let vocab = Vocab::from_file(&run.join("vocab.txt"), true).map_err(|e| e.to_string())?;
    let itf = interface_named(&pair, upstream.num_states(), upstream.hidden_size())?;
    let ds = load_data(&data, task, on_bad)?;
    let ckpt = run.join(&pair).join(&which);
    let (rate, hyps) = strata::train::run::evaluate_checkpoint(
        &upstream,
        &ckpt,
        &itf,
        &vocab,
        ds,
        60 * 16000,
        on_bad,
    )
    .map_err(|e| e.to_string())?;
    let hyp = hyp.unwrap_or_else(|| run.join(&pair).join(format!("hyp-{which}.tsv")));
    let text: String = hyps
        .iter()
        .map(|h| format!("{}\t{}\t{}\n", h.id, h.hyp.join(" "), h.reference.join(" ")))
        .collect();
    std::fs::write(&hyp, text).map_err(|e| format!("{}: {e}", hyp.display()))?;
    let metric = if task == Task::Characters {
        "CER"
    } else {
        "PER"
    };
    println!(
        "{pair} ({which}) on {}: {metric} {:.2}% over {} utterances; hypotheses in {}",
        data.display(),
        100.0 * rate,
        hyps.len(),
        hyp.display()
    );
    Ok(())
}

fn parse_task(v: &str) -> Result<strata::train::data::Task, String> {
    match v {
        "units" => Ok(strata::train::data::Task::Units),
        "chars" => Ok(strata::train::data::Task::Characters),
        other => Err(format!("--task takes units or chars, got '{other}'")),
    }
}
