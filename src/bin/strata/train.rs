//! `strata train` (flags and/or a TOML config) and `strata eval`.

use super::{model_normalize, parse_normalize, USAGE};
use std::path::{Path, PathBuf};
use strata::models::asr_head::AsrHeadConfig;
use strata::models::interface::InterfaceConfig;
use strata::models::upstream::Upstream;
use strata::optim::{AdamConfig, Schedule};
use strata::train::data::{Dataset, Lexicon, OnBad, Task, Vocab};
use strata::train::features::{upstream_fingerprint, FeatureCache, StackSource};
use strata::train::metrics::{words_of, ErrorRate};
use strata::train::run::{AverageBy, TrainConfig, TrainDevice};
use strata::train::side_by_side::{CtcHead, HeadWidth, PairSpec};

/// The interfaces a name selects (also the pair's folder name): the paper's set, with the
/// parameters a sweep varies spelled in the name.
pub const INTERFACE_NAMES: &str = "ws, ws-large (WS with a head as large as hconv's pair), hconv \
(kernel 5, stride 3, depth floor(log3 L)) or hconv-kKsSdD with any of kernel K, stride S, depth D \
(e.g. hconv-k3s2, hconv-d1), concat, groupwsN (N groups, 2 <= N <= layers), \
single (the last layer) or single-N (layer N, 0 = the CNN features), cls, pca (PCA + Concat, \
D / L components per layer, fitted on the training features) or pcaN (N per layer)";

/// The pair a name selects: its interface, and the SUPERB head, or for `ws-large` (the paper's
/// "WS + Large DS") a head widened to the parameter count of the `hconv` pair.
pub fn pair_named(name: &str, layers: usize, dim: usize) -> Result<PairSpec, String> {
    if name == "ws-large" {
        return Ok(PairSpec {
            name: name.to_string(),
            interface: InterfaceConfig::weighted_sum(layers, dim),
            head_width: HeadWidth::MatchParams(InterfaceConfig::hconv(layers, dim)),
            ctc_head: CtcHead::Superb,
        });
    }
    Ok(PairSpec::new(name, interface_named(name, layers, dim)?))
}

fn interface_named(name: &str, layers: usize, dim: usize) -> Result<InterfaceConfig, String> {
    use strata::models::interface::{hconv_plan_for, ClsActivation, InterfaceKind};
    let unknown = || format!("unknown interface '{name}': use {INTERFACE_NAMES}");
    let number = |digits: &str| -> Result<usize, String> {
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(unknown());
        }
        digits.parse().map_err(|_| unknown())
    };
    let kind = match name {
        "ws" => InterfaceKind::WeightedSum,
        "hconv" => InterfaceKind::HConv {
            kernel: 5,
            stride: 3,
            depth: None,
        },
        "concat" => InterfaceKind::ConcatProj { out_dim: dim },
        "single" => InterfaceKind::SingleLayer { layer: -1 },
        "cls" => InterfaceKind::ClsPool {
            heads: if dim.is_multiple_of(8) { 8 } else { 1 },
            ffn_dim: 4 * dim,
            activation: ClsActivation::Gelu,
        },
        _ => {
            if let Some(rest) = name.strip_prefix("hconv-") {
                // kK, sS and dD in that order, each optional (kernel 5, stride 3, the official
                // depth): hconv-k3s2, hconv-d1, hconv-k3s2d2.
                let mut fields = [None; 3];
                let mut rest = rest;
                for (i, tag) in ['k', 's', 'd'].into_iter().enumerate() {
                    if let Some(r) = rest.strip_prefix(tag) {
                        let end = r.find(|c: char| !c.is_ascii_digit()).unwrap_or(r.len());
                        fields[i] = Some(number(&r[..end])?);
                        rest = &r[end..];
                    }
                }
                if !rest.is_empty() || fields.iter().all(Option::is_none) {
                    return Err(unknown());
                }
                let (kernel, stride, depth) =
                    (fields[0].unwrap_or(5), fields[1].unwrap_or(3), fields[2]);
                hconv_plan_for(layers, dim, kernel, stride, depth)
                    .map_err(|e| format!("interface '{name}': {e}"))?;
                InterfaceKind::HConv {
                    kernel,
                    stride,
                    depth,
                }
            } else if let Some(n) = name.strip_prefix("groupws") {
                let groups = number(n)?;
                if !(2..=layers).contains(&groups) {
                    return Err(format!("interface '{name}': GroupWS needs 2 to {layers} groups for {layers} layers"));
                }
                InterfaceKind::GroupWs {
                    groups,
                    out_dim: dim,
                }
            } else if let Some(n) = name.strip_prefix("pca") {
                let components = if n.is_empty() {
                    (dim / layers).max(1)
                } else {
                    number(n)?
                };
                if !(1..=dim).contains(&components) {
                    return Err(format!(
                        "interface '{name}': PCA + Concat takes 1 to {dim} components per layer"
                    ));
                }
                InterfaceKind::PcaConcat { components }
            } else if let Some(n) = name.strip_prefix("single-") {
                let layer = number(n)?;
                if layer >= layers {
                    return Err(format!(
                        "interface '{name}': the stack has layers 0..{} (0 = the CNN features)",
                        layers - 1
                    ));
                }
                InterfaceKind::SingleLayer {
                    layer: layer as isize,
                }
            } else {
                return Err(unknown());
            }
        }
    };
    Ok(InterfaceConfig::new(layers, dim, kind))
}

fn load_data(path: &Path, task: Task, on_bad: OnBad) -> Result<Dataset, String> {
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

/// `--lexicon a.txt,b.txt`: the files, made absolute (run.json records them for `eval`), read
/// as s3prl's G2P does. Only phone recognition from word transcripts takes one.
fn load_lexicon(list: &str, task: Task) -> Result<Lexicon, String> {
    if task != Task::Units {
        return Err(format!(
            "--lexicon maps word transcripts to phones for --task units, not --task {}",
            task_name(task)
        ));
    }
    let files = list
        .split(',')
        .map(|f| {
            let p = PathBuf::from(f.trim());
            std::fs::canonicalize(&p)
                .map_err(|e| format!("--lexicon {}: cannot read it: {e}", p.display()))
        })
        .collect::<Result<Vec<_>, String>>()?;
    Lexicon::load(&files).map_err(|e| e.to_string())
}

/// Word transcripts to phones, saying how many utterances the lexicon could not cover.
fn apply_lexicon(
    lex: &Lexicon,
    ds: &mut Dataset,
    path: &Path,
    on_bad: OnBad,
) -> Result<(), String> {
    let before = ds.skipped.len();
    lex.apply(ds, on_bad)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if ds.skipped.len() > before {
        let (id, why) = &ds.skipped[before];
        eprintln!(
            "{}: skipped {} utterances with words outside the lexicon (first: {id} - {why})",
            path.display(),
            ds.skipped.len() - before
        );
    }
    Ok(())
}

/// A set that is scored: for speaker verification a folder with wav.scp and trials, else as
/// [`load_data`].
fn load_scored_data(path: &Path, task: Task, on_bad: OnBad) -> Result<Dataset, String> {
    if task != Task::Speaker {
        return load_data(path, task, on_bad);
    }
    if !path.is_dir() {
        return Err(format!(
            "{}: a speaker-verification set is a folder with wav.scp and trials",
            path.display()
        ));
    }
    let ds = strata::train::data::load_verification_dir(path, on_bad).map_err(|e| e.to_string())?;
    for (id, why) in &ds.skipped {
        eprintln!("{}: skipped {id}: {why}", path.display());
    }
    Ok(ds)
}

pub fn parse_task(v: &str) -> Result<Task, String> {
    match v {
        "units" => Ok(Task::Units),
        "chars" => Ok(Task::Characters),
        "classify" => Ok(Task::Classification),
        "sv" => Ok(Task::Speaker),
        other => Err(format!(
            "--task takes units, chars, classify or sv, got '{other}'"
        )),
    }
}

fn task_name(t: Task) -> &'static str {
    match t {
        Task::Units => "units",
        Task::Characters => "chars",
        Task::Classification => "classify",
        Task::Speaker => "sv",
    }
}

/// `--head superb|mlsuperb|asr|asr-N`.
pub fn parse_head(v: &str) -> Result<CtcHead, String> {
    let asr_width = |w: &str| match w.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!(
            "--head {v}: asr-N takes N >= 1, the projector's and each LSTM direction's width"
        )),
    };
    match v {
        "superb" => Ok(CtcHead::Superb),
        "mlsuperb" => Ok(CtcHead::MlSuperb(Default::default())),
        "asr" => Ok(CtcHead::Asr(Default::default())),
        _ if v.starts_with("asr-") => {
            let n = asr_width(&v["asr-".len()..])?;
            Ok(CtcHead::Asr(AsrHeadConfig {
                project_dim: n,
                hidden: n,
                ..AsrHeadConfig::default()
            }))
        }
        other => Err(format!(
            "--head takes superb (SUPERB PR's head), mlsuperb (ML-SUPERB's transformer CTC head) or asr / asr-N (SUPERB ASR's BiLSTM head, 1024 or N wide), got '{other}'"
        )),
    }
}

fn head_name(h: CtcHead) -> String {
    match h {
        CtcHead::Superb => "superb".into(),
        CtcHead::MlSuperb(_) => "mlsuperb".into(),
        CtcHead::Asr(c) if c == AsrHeadConfig::default() => "asr".into(),
        CtcHead::Asr(c) => format!("asr-{}", c.hidden),
    }
}

/// Whether the task's labels are CTC token sequences (not one class or speaker each).
fn is_ctc(t: Task) -> bool {
    matches!(t, Task::Units | Task::Characters)
}

/// Every `strata train` setting, with its default.
struct TrainArgs {
    model: Option<PathBuf>,
    features: Option<PathBuf>,
    train: Option<PathBuf>,
    dev: Option<PathBuf>,
    out: Option<PathBuf>,
    vocab: Option<PathBuf>,
    /// Pronunciation lexicon files (`--lexicon a.txt,b.txt`): word transcripts to phones.
    lexicon: Option<String>,
    task: Task,
    interfaces: String,
    steps: u64,
    lr: f64,
    schedule: String,
    warmup: u64,
    optimizer: String,
    weight_decay: Option<f64>,
    batch_seconds: f64,
    accum: usize,
    clip: f64,
    eval_every: u64,
    save_every: u64,
    average_best: usize,
    average_by: AverageBy,
    seed: u64,
    device: String,
    normalize: Option<bool>,
    resume: bool,
    shuffle: bool,
    on_bad: OnBad,
    save_init: Option<PathBuf>,
    init_from: Option<PathBuf>,
    crop_seconds: Option<f64>,
    head: CtcHead,
}

/// Flags that take no value (TOML: `key = true`; `shuffle = false` is `--no-shuffle`).
const SWITCHES: [&str; 3] = ["--resume", "--no-shuffle", "--skip-bad"];
const VALUED: [&str; 30] = [
    "--model",
    "--features",
    "--train",
    "--dev",
    "--out",
    "--vocab",
    "--lexicon",
    "--task",
    "--interfaces",
    "--steps",
    "--lr",
    "--schedule",
    "--warmup",
    "--optimizer",
    "--weight-decay",
    "--batch-seconds",
    "--accum",
    "--clip",
    "--eval-every",
    "--save-every",
    "--average-best",
    "--average-by",
    "--seed",
    "--device",
    "--normalize",
    "--save-init",
    "--init-from",
    "--crop-seconds",
    "--head",
    "--config",
];

/// A TOML config as the equivalent flags. Keys are the flag names without the dashes ('_' or '-'),
/// e.g. `batch_seconds = 60`, `interfaces = ["ws", "hconv"]`, `resume = true`.
fn config_flags(path: &Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read the config: {e}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| format!("{}: not valid TOML: {e}", path.display()))?;
    let mut flags = Vec::new();
    for (key, value) in table {
        let flag = format!("--{}", key.replace('_', "-"));
        let bad = |what: &str| format!("{}: '{key}' {what}", path.display());
        if flag == "--config" {
            return Err(bad("cannot name another config"));
        }
        match value {
            toml::Value::Boolean(b) if flag == "--shuffle" => {
                if !b {
                    flags.push("--no-shuffle".to_string());
                }
            }
            toml::Value::Boolean(b) if SWITCHES.contains(&flag.as_str()) => {
                if b {
                    flags.push(flag);
                }
            }
            _ if !VALUED.contains(&flag.as_str()) => {
                return Err(bad("is not a train setting (see strata --help)"))
            }
            toml::Value::String(s) => flags.extend([flag, s]),
            toml::Value::Integer(i) => flags.extend([flag, i.to_string()]),
            toml::Value::Float(f) => flags.extend([flag, f.to_string()]),
            toml::Value::Array(a) => {
                let items = a
                    .iter()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| bad("must be a list of strings"))?;
                flags.extend([flag, items.join(",")]);
            }
            _ => return Err(bad("must be a string, number, boolean or list of strings")),
        }
    }
    Ok(flags)
}

fn parse_train(args: &[String]) -> Result<TrainArgs, String> {
    // A config's settings come first, so flags given on the command line override them.
    let mut all = Vec::new();
    if let Some(i) = args.iter().position(|a| a == "--config") {
        let file = args
            .get(i + 1)
            .ok_or_else(|| "--config needs a value".to_string())?;
        all = config_flags(Path::new(file))?;
    }
    all.extend(args.iter().cloned());
    let mut t = TrainArgs {
        model: None,
        features: None,
        train: None,
        dev: None,
        out: None,
        vocab: None,
        lexicon: None,
        task: Task::Units,
        interfaces: "ws,hconv".into(),
        steps: 1000,
        lr: 1e-3,
        schedule: "constant".into(),
        warmup: 0,
        optimizer: "adamw".into(),
        weight_decay: None,
        batch_seconds: 60.0,
        accum: 1,
        clip: 1.0,
        eval_every: 100,
        save_every: 0,
        average_best: 0,
        average_by: AverageBy::Error,
        seed: 0,
        device: "auto".into(),
        normalize: None,
        resume: false,
        shuffle: true,
        on_bad: OnBad::Fail,
        save_init: None,
        init_from: None,
        crop_seconds: None,
        head: CtcHead::Superb,
    };
    let mut it = all.iter();
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{a} needs a value"))
        };
        fn num<T: std::str::FromStr>(v: String, flag: &str) -> Result<T, String> {
            v.parse::<T>()
                .map_err(|_| format!("{flag} takes a non-negative number, got '{v}'"))
        }
        match a.as_str() {
            "--config" => {
                value()?;
            }
            "--model" => t.model = Some(PathBuf::from(value()?)),
            "--features" => t.features = Some(PathBuf::from(value()?)),
            "--train" => t.train = Some(PathBuf::from(value()?)),
            "--dev" => t.dev = Some(PathBuf::from(value()?)),
            "--out" => t.out = Some(PathBuf::from(value()?)),
            "--vocab" => t.vocab = Some(PathBuf::from(value()?)),
            "--lexicon" => t.lexicon = Some(value()?),
            "--task" => t.task = parse_task(&value()?)?,
            "--interfaces" => t.interfaces = value()?,
            "--steps" => t.steps = num(value()?, a)?,
            "--lr" => t.lr = num(value()?, a)?,
            "--schedule" => t.schedule = value()?,
            "--warmup" => t.warmup = num(value()?, a)?,
            "--optimizer" => t.optimizer = value()?,
            "--weight-decay" => t.weight_decay = Some(num(value()?, a)?),
            "--batch-seconds" => t.batch_seconds = num(value()?, a)?,
            "--crop-seconds" => {
                let v: f64 = num(value()?, a)?;
                if !(v.is_finite() && v * 16000.0 >= 400.0) {
                    return Err(format!(
                        "--crop-seconds takes at least 0.025 (one 25 ms frame), got {v}"
                    ));
                }
                t.crop_seconds = Some(v);
            }
            "--head" => t.head = parse_head(&value()?)?,
            "--accum" => t.accum = num(value()?, a)?,
            "--clip" => t.clip = num(value()?, a)?,
            "--eval-every" => t.eval_every = num(value()?, a)?,
            "--save-every" => t.save_every = num(value()?, a)?,
            "--average-best" => t.average_best = num(value()?, a)?,
            "--average-by" => {
                t.average_by = match value()?.as_str() {
                    "error" => AverageBy::Error,
                    "loss" => AverageBy::Loss,
                    other => {
                        return Err(format!(
                        "--average-by takes error or loss (the dev loss: CTC tasks), got '{other}'"
                    ))
                    }
                }
            }
            "--seed" => t.seed = num(value()?, a)?,
            "--device" => t.device = value()?,
            "--normalize" => t.normalize = parse_normalize(&value()?)?,
            "--save-init" => t.save_init = Some(PathBuf::from(value()?)),
            "--init-from" => t.init_from = Some(PathBuf::from(value()?)),
            "--resume" => t.resume = true,
            "--no-shuffle" => t.shuffle = false,
            "--skip-bad" => t.on_bad = OnBad::Skip,
            other => return Err(format!("unknown option '{other}' for train\n\n{USAGE}")),
        }
    }
    if t.head != CtcHead::Superb && !is_ctc(t.task) {
        return Err(format!(
            "--head {}: a CTC head, for --task units or chars (this run is --task {})",
            head_name(t.head),
            task_name(t.task)
        ));
    }
    let positive = t.batch_seconds.is_finite()
        && t.batch_seconds > 0.0
        && t.lr.is_finite()
        && t.lr > 0.0
        && t.steps > 0
        && t.accum > 0
        && t.clip.is_finite()
        && t.clip >= 0.0;
    if !positive {
        return Err(
            "--batch-seconds, --lr, --steps and --accum must be positive (and --clip >= 0)".into(),
        );
    }
    Ok(t)
}

/// The feature cache of data set `data` under `root` (named by the data folder's / manifest's
/// stem), built first when missing. Its upstream must be `upstream` when one is loaded.
fn cache_for(
    root: &Path,
    data: &Path,
    ds: &Dataset,
    upstream: Option<&Upstream>,
    normalize: bool,
) -> Result<FeatureCache, String> {
    let stem = data.file_stem().and_then(|s| s.to_str()).ok_or_else(|| {
        format!(
            "{}: cannot name a feature cache after this path",
            data.display()
        )
    })?;
    let dir = root.join(stem);
    if !FeatureCache::exists(&dir) {
        let up = upstream.ok_or_else(|| {
            format!(
                "{} holds no feature cache for {}: give --model to extract it first",
                dir.display(),
                data.display()
            )
        })?;
        super::extract::extract_cache(up, ds, &dir, strata::DType::F32, normalize)?;
    }
    let cache = FeatureCache::open(&dir).map_err(|e| e.to_string())?;
    if let Some(up) = upstream {
        if cache.upstream != upstream_fingerprint(up) || cache.normalize != normalize {
            return Err(format!(
                "{} was extracted by another upstream or input normalization than --model: delete it (or point --features elsewhere) to extract again",
                dir.display()
            ));
        }
    }
    cache.covers(ds).map_err(|e| e.to_string())?;
    Ok(cache)
}

pub fn train_cmd(args: &[String]) -> Result<(), String> {
    let t = parse_train(args)?;
    let need = |v: &Option<PathBuf>, flag: &str| {
        v.clone()
            .ok_or_else(|| format!("train needs {flag}\n\n{USAGE}"))
    };
    let (train_p, dev_p, out) = (
        need(&t.train, "--train DATA")?,
        need(&t.dev, "--dev DATA")?,
        need(&t.out, "--out DIR")?,
    );
    if t.model.is_none() && t.features.is_none() {
        return Err(format!(
            "train needs --model DIR (or --features DIR with extracted features)\n\n{USAGE}"
        ));
    }
    let device = parse_device(&t.device)?;
    // Before the data checks, which can take a while on a large corpus; the folder is locked
    // from here on (run.json and vocab.txt are written before `train` starts).
    if t.resume {
        strata::train::run::check_out_dir(&out, true).map_err(|e| e.to_string())?;
    } else {
        std::fs::create_dir_all(&out).map_err(|e| {
            let why = if out.exists() && !out.is_dir() {
                "it exists and is not a folder".to_string()
            } else {
                e.to_string()
            };
            format!(
                "--out {}: cannot create the run folder: {why}",
                out.display()
            )
        })?;
    }
    let _lock = strata::train::run::RunLock::acquire(&out).map_err(|e| e.to_string())?;
    strata::train::run::check_out_dir(&out, t.resume).map_err(|e| e.to_string())?;
    let upstream = match &t.model {
        Some(m) => Some(Upstream::load(m).map_err(|e| e.to_string())?),
        None => None,
    };
    let normalize = match &t.model {
        Some(m) => model_normalize(m, t.normalize)?,
        None => t.normalize.unwrap_or(false),
    };
    // Before the data checks, which take a while on a large corpus.
    let lexicon = match &t.lexicon {
        Some(list) => Some(load_lexicon(list, t.task)?),
        None => None,
    };
    let mut train = load_data(&train_p, t.task, t.on_bad)?;
    let mut dev = load_scored_data(&dev_p, t.task, t.on_bad)?;
    if let Some(lex) = &lexicon {
        apply_lexicon(lex, &mut train, &train_p, t.on_bad)?;
        apply_lexicon(lex, &mut dev, &dev_p, t.on_bad)?;
    }
    let ctc = is_ctc(t.task);
    let vocab = match &t.vocab {
        Some(p) => Vocab::from_file(p, ctc).map_err(|e| e.to_string())?,
        None => Vocab::from_dataset(&train, ctc),
    };
    let caches = match &t.features {
        Some(root) => Some((
            cache_for(root, &train_p, &train, upstream.as_ref(), normalize)?,
            cache_for(root, &dev_p, &dev, upstream.as_ref(), normalize)?,
        )),
        None => None,
    };
    let (train_src, dev_src) = match (&caches, &upstream) {
        (Some((a, b)), _) => (StackSource::Cache(a), StackSource::Cache(b)),
        (None, Some(u)) => (
            StackSource::Upstream(u, normalize),
            StackSource::Upstream(u, normalize),
        ),
        (None, None) => unreachable!("checked above: --model or --features"),
    };
    let (layers, dim) = (train_src.num_states(), train_src.hidden_size());
    // Which upstream made the hidden states (its config), so that eval and --resume can refuse
    // another one of the same shape.
    let fingerprint = match (&upstream, &caches) {
        (Some(u), _) => upstream_fingerprint(u),
        (None, Some((cache, _))) => cache.upstream.clone(),
        (None, None) => unreachable!("checked above: --model or --features"),
    };
    let mut interfaces = t
        .interfaces
        .split(',')
        .map(|n| pair_named(n.trim(), layers, dim))
        .collect::<Result<Vec<_>, String>>()?;
    for spec in &mut interfaces {
        spec.ctc_head = t.head;
    }
    let mut optimizer = match t.optimizer.as_str() {
        "adamw" => AdamConfig::adamw(t.lr),
        "adam" => AdamConfig::adam(t.lr),
        other => return Err(format!("--optimizer takes adamw or adam, got '{other}'")),
    };
    if let Some(wd) = t.weight_decay {
        optimizer.weight_decay = wd;
    }
    let schedule =
        Schedule::parse(&t.schedule, t.lr, t.warmup, t.steps).map_err(|e| e.to_string())?;
    if t.resume {
        check_resumable(
            &out,
            &vocab,
            (task_name(t.task), &head_name(t.head)),
            (t.average_best, t.average_by),
            normalize,
            &fingerprint,
            (layers, dim),
        )?;
    }
    std::fs::write(out.join("vocab.txt"), vocab.tokens.join("\n") + "\n")
        .map_err(|e| format!("{}: {e}", out.display()))?;
    let run = serde_json::json!({
        "task": task_name(t.task),
        "head": head_name(t.head),
        "interfaces": interfaces.iter().map(|p| p.name.clone()).collect::<Vec<_>>(),
        "model": t.model.as_ref().map(|m| m.display().to_string()),
        "normalize": normalize,
        "lexicon": lexicon.as_ref().map(|l| l.files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>()),
        "upstream": fingerprint,
        "layers": layers,
        "dim": dim,
        "steps": t.steps, "lr": t.lr, "schedule": t.schedule, "warmup": t.warmup,
        "optimizer": t.optimizer, "weight_decay": optimizer.weight_decay,
        "batch_seconds": t.batch_seconds, "crop_seconds": t.crop_seconds, "accum": t.accum,
        "clip": t.clip, "seed": t.seed, "average_best": t.average_best, "average_by": t.average_by.name(),
        "shuffle": t.shuffle, "device": t.device, "commit": strata::GIT_COMMIT,
    });
    std::fs::write(
        out.join("run.json"),
        serde_json::to_string_pretty(&run).expect("json"),
    )
    .map_err(|e| format!("{}: {e}", out.display()))?;
    eprintln!(
        "{} states x {dim} ({}); {} train / {} dev utterances; {} {}; pairs: {}",
        layers,
        match (&t.features, &t.model) {
            (Some(f), _) => format!("features in {}", f.display()),
            (None, Some(m)) => m.display().to_string(),
            _ => String::new(),
        },
        train.utterances.len(),
        dev.utterances.len(),
        vocab.len(),
        match t.task {
            Task::Speaker => "speakers",
            _ if ctc => "tokens",
            _ => "classes",
        },
        t.interfaces
    );
    let mut cfg = TrainConfig::new(t.task, interfaces, out.clone());
    cfg.optimizer = optimizer;
    cfg.schedule = schedule;
    cfg.clip = (t.clip > 0.0).then_some(t.clip);
    cfg.steps = t.steps;
    cfg.batch_samples = (t.batch_seconds * 16000.0) as usize;
    cfg.crop_samples = t.crop_seconds.map(|s| (s * 16000.0).round() as usize);
    cfg.accum = t.accum;
    cfg.eval_every = t.eval_every;
    cfg.save_every = t.save_every;
    cfg.average_best = t.average_best;
    cfg.average_by = t.average_by;
    cfg.seed = t.seed;
    cfg.shuffle = t.shuffle;
    cfg.resume = t.resume;
    cfg.on_bad = t.on_bad;
    cfg.save_init = t.save_init.clone();
    cfg.init_from = t.init_from.clone();
    cfg.progress = true;
    cfg.device = device;
    let results = strata::train::run::train(&train_src, &dev_src, train, dev, &vocab, &cfg)
        .map_err(|e| match e {
            // The options that size a micro-batch. A resumed run must keep its own, so the fix
            // is a new run.
            strata::Error::Allocation(_) => format!(
                "{e}\n(a micro-batch must fit the device: start a new run with a lower \
                 --batch-seconds or --crop-seconds, and --accum N to keep N times that per step)"
            ),
            other => other.to_string(),
        })?;
    let (metric, accuracy) = match t.task {
        Task::Speaker => ("dev EER", false),
        _ if ctc => ("dev error", false),
        _ => ("dev accuracy", true),
    };
    let shown = |rate: f64| 100.0 * if accuracy { 1.0 - rate } else { rate };
    println!(
        "{:<12} {:>12} {:>12} {:>8} {:>12} {:>16}",
        "interface", "itf params", "all params", "step", metric, "best (step)"
    );
    for r in &results {
        let best_step = r.best_step.map_or("?".to_string(), |s| s.to_string());
        println!(
            "{:<12} {:>12} {:>12} {:>8} {:>11.2}% {:>16}",
            r.name,
            r.interface_params,
            r.params,
            r.step,
            shown(r.error_rate),
            format!("{:.2}% ({best_step})", shown(r.best_error_rate))
        );
    }
    // The n-best average (ESPnet's model averaging), scored on dev after the last step.
    for r in &results {
        if let Some((rate, steps)) = &r.averaged {
            println!(
                "{} averaged over steps {steps:?} (OUT/{}/averaged): {metric} {:.2}%",
                r.name,
                r.name,
                shown(*rate)
            );
        }
    }
    // Which layers the weighted sums chose: what a layer-wise analysis starts from.
    for r in results {
        for (first, weights) in r.layer_weights.iter().flatten() {
            let top =
                (0..weights.len()).fold(0, |b, i| if weights[i] > weights[b] { i } else { b });
            let shown: Vec<String> = (weights.iter().enumerate())
                .map(|(i, w)| format!("{}:{:.1}", first + i, 100.0 * w))
                .collect();
            println!(
                "{} layer weights (%): {} (largest: layer {})",
                r.name,
                shown.join(" "),
                first + top
            );
        }
    }
    println!(
        "log: {}; curves: {}",
        out.join("log.jsonl").display(),
        out.join("curves.png").display()
    );
    Ok(())
}

/// A resumed run must read its labels and features as the run it continues did: the same
/// vocabulary (token order fixes the head's outputs), task, input normalization and stack shape.
/// Checked before run.json and vocab.txt are rewritten, so a refused resume changes nothing.
fn check_resumable(
    out: &Path,
    vocab: &Vocab,
    (task, head): (&str, &str),
    average_best: (usize, AverageBy),
    normalize: bool,
    upstream: &str,
    (layers, dim): (usize, usize),
) -> Result<(), String> {
    let vocab_path = out.join("vocab.txt");
    let recorded = std::fs::read_to_string(&vocab_path).map_err(|e| {
        format!(
            "{}: cannot read the run's vocabulary: {e}",
            vocab_path.display()
        )
    })?;
    let recorded: Vec<&str> = recorded.lines().collect();
    if recorded != vocab.tokens {
        return Err(format!(
            "{}: the run being resumed has {} tokens/classes, this data gives {} in a different order or set: resume with the same training data, or pass --vocab {}",
            vocab_path.display(),
            recorded.len(),
            vocab.len(),
            vocab_path.display()
        ));
    }
    let run_path = out.join("run.json");
    let run: serde_json::Value = std::fs::read_to_string(&run_path)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .ok_or_else(|| {
            format!(
                "{}: missing or not valid JSON: cannot resume without the run's settings",
                run_path.display()
            )
        })?;
    let now = serde_json::json!({
        "task": task, "head": head, "normalize": normalize, "layers": layers, "dim": dim,
        "upstream": upstream
    });
    for (key, value) in now.as_object().expect("object") {
        // Runs written before the upstream or the head was recorded are resumed without that
        // check (they had the SUPERB heads).
        let unrecorded = run[key].is_null()
            && (key == "upstream" || (key == "head" && head == head_name(CtcHead::Superb)));
        if run[key] != *value && !unrecorded {
            return Err(format!(
                "{}: the run being resumed has {key} = {}, this one {value}: resume with the same task, --head, upstream and --normalize",
                run_path.display(),
                run[key]
            ));
        }
    }
    // The kept n-best snapshots go on only under the same --average-best (train checks the
    // checkpoints too; this refuses before run.json is rewritten).
    let kept = run["average_best"].as_u64().unwrap_or(0);
    let by = run["average_by"].as_str().unwrap_or("error");
    if kept != average_best.0 as u64 || (kept > 0 && by != average_best.1.name()) {
        return Err(format!(
            "{}: the run being resumed kept its {kept} best evaluations by dev {by} (--average-best {kept} --average-by {by}), this one asks for {} by {}: resume with --average-best {kept} --average-by {by}",
            run_path.display(),
            average_best.0,
            average_best.1.name()
        ));
    }
    Ok(())
}

/// `--device auto|cpu|cuda|emulator`.
fn parse_device(name: &str) -> Result<TrainDevice, String> {
    Ok(match name {
        "cpu" => TrainDevice::Cpu,
        "auto" => TrainDevice::Auto,
        "cuda" => TrainDevice::Cuda,
        "emulator" => TrainDevice::Emulator,
        other => {
            return Err(format!(
                "unknown --device '{other}': use auto, cpu, cuda or emulator (the GPU kernels on the CPU, slow; for testing)"
            ))
        }
    })
}

pub fn eval_cmd(args: &[String]) -> Result<(), String> {
    let (mut model, mut run, mut pair, mut data, mut hyp) = (None, None, None, None, None);
    let mut features: Option<PathBuf> = None;
    let (mut task, mut which, mut on_bad, mut normalize) =
        (None, "best".to_string(), OnBad::Fail, None);
    let mut device = TrainDevice::Auto;
    let mut lexicon_flag: Option<String> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{a} needs a value"))
        };
        match a.as_str() {
            "--model" => model = Some(PathBuf::from(value()?)),
            "--features" => features = Some(PathBuf::from(value()?)),
            "--run" => run = Some(PathBuf::from(value()?)),
            "--pair" => pair = Some(value()?),
            "--data" => data = Some(PathBuf::from(value()?)),
            "--hyp" => hyp = Some(PathBuf::from(value()?)),
            "--lexicon" => lexicon_flag = Some(value()?),
            "--which" => {
                which = value()?;
                if !["best", "latest", "averaged"].contains(&which.as_str()) {
                    return Err(format!(
                        "--which takes best, latest or averaged (a run with --average-best), got '{which}'"
                    ));
                }
            }
            "--task" => task = Some(parse_task(&value()?)?),
            "--normalize" => normalize = parse_normalize(&value()?)?,
            "--skip-bad" => on_bad = OnBad::Skip,
            "--device" => device = parse_device(&value()?)?,
            other => return Err(format!("unknown option '{other}' for eval\n\n{USAGE}")),
        }
    }
    let need =
        |v: Option<PathBuf>, flag: &str| v.ok_or_else(|| format!("eval needs {flag}\n\n{USAGE}"));
    let (run, data) = (need(run, "--run OUT")?, need(data, "--data DATA")?);
    if model.is_none() && features.is_none() {
        return Err(format!(
            "eval needs --model DIR (or --features DIR with extracted features)\n\n{USAGE}"
        ));
    }
    let pair = pair.ok_or_else(|| {
        format!(
            "eval needs --pair NAME (an interface trained in {}; a list ws,hconv or all)",
            run.display()
        )
    })?;
    // The run's own settings, where it recorded them.
    let recorded: serde_json::Value = std::fs::read_to_string(run.join("run.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let task = match (task, recorded["task"].as_str()) {
        (Some(t), _) => t,
        (None, Some(t)) => parse_task(t)?,
        (None, None) => Task::Units,
    };
    // The head the run trained (runs that did not record it had the SUPERB heads).
    let head = match recorded["head"].as_str() {
        Some(h) => parse_head(h)?,
        None => CtcHead::Superb,
    };
    let normalize_flag = normalize;
    let normalize = match (normalize, recorded["normalize"].as_bool(), &model) {
        (Some(n), _, _) => n,
        (None, Some(n), _) => n,
        (None, None, Some(m)) => model_normalize(m, None)?,
        (None, None, None) => false,
    };
    let upstream = match &model {
        Some(m) => Some(Upstream::load(m).map_err(|e| e.to_string())?),
        None => None,
    };
    let ctc = is_ctc(task);
    let vocab = Vocab::from_file(&run.join("vocab.txt"), ctc).map_err(|e| e.to_string())?;
    let mut ds = load_scored_data(&data, task, on_bad)?;
    // The run's lexicon (recorded in run.json) maps the references' words to phones, unless
    // --lexicon names others.
    let recorded_lexicon: Option<Vec<PathBuf>> = recorded["lexicon"].as_array().map(|a| {
        a.iter()
            .filter_map(|f| f.as_str().map(PathBuf::from))
            .collect()
    });
    let lexicon = match (&lexicon_flag, recorded_lexicon) {
        (Some(list), _) => Some(load_lexicon(list, task)?),
        (None, Some(files)) if task == Task::Units => Some(Lexicon::load(&files).map_err(|e| {
            format!(
                "{e} (the lexicon {} records; --lexicon names another)",
                run.join("run.json").display()
            )
        })?),
        _ => None,
    };
    if let Some(lex) = &lexicon {
        apply_lexicon(lex, &mut ds, &data, on_bad)?;
    }
    let cache = match &features {
        Some(root) => Some(cache_for(root, &data, &ds, upstream.as_ref(), normalize)?),
        None => None,
    };
    // The hidden states, and what made them: they must come from the upstream (and input
    // normalization) the run trained on.
    let (source, made_by, normalized, what) = match (&cache, &upstream, &model) {
        (Some(c), _, _) => (
            StackSource::Cache(c),
            c.upstream.clone(),
            c.normalize,
            format!("the features in {}", c.dir.display()),
        ),
        (None, Some(u), Some(m)) => (
            StackSource::Upstream(u, normalize),
            upstream_fingerprint(u),
            normalize,
            format!("--model {}", m.display()),
        ),
        _ => unreachable!("checked above: --model or --features"),
    };
    if let Some(trained_on) = recorded["upstream"].as_str() {
        if trained_on != made_by {
            return Err(format!(
                "{}: the run was trained on the hidden states of another upstream than {what} (their configs differ): evaluate with the model it was trained on{}",
                run.join("run.json").display(),
                recorded["model"]
                    .as_str()
                    .map(|m| format!(" ({m})"))
                    .unwrap_or_default()
            ));
        }
    }
    if let (Some(c), Some(flag)) = (&cache, normalize_flag) {
        if flag != c.normalize {
            return Err(format!(
                "--normalize {}: the features in {} were extracted with input normalization {}",
                if flag { "on" } else { "off" },
                c.dir.display(),
                if c.normalize { "on" } else { "off" }
            ));
        }
    }
    if recorded["normalize"]
        .as_bool()
        .is_some_and(|n| n != normalized)
    {
        let on_off = |n: bool| if n { "on" } else { "off" };
        return Err(format!(
            "{}: the run was trained with input normalization {}, this evaluation has it {} ({what}): use the run's setting",
            run.join("run.json").display(),
            on_off(!normalized),
            on_off(normalized)
        ));
    }
    // `--pair all`: every pair of the run; otherwise a comma-separated list.
    let names: Vec<String> = if pair == "all" {
        let listed: Vec<String> = recorded["interfaces"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        if listed.is_empty() {
            return Err(format!(
                "--pair all: {} lists no interfaces; name the pairs (--pair ws,hconv)",
                run.join("run.json").display()
            ));
        }
        listed
    } else {
        pair.split(',').map(|n| n.trim().to_string()).collect()
    };
    if hyp.is_some() && names.len() > 1 {
        return Err(format!(
            "--hyp FILE takes one pair's hypotheses, and {} pairs are evaluated: leave it out (each goes to OUT/<pair>/hyp-{which}.tsv)",
            names.len()
        ));
    }
    let mut pairs = Vec::with_capacity(names.len());
    for name in &names {
        let mut spec = pair_named(name, source.num_states(), source.hidden_size())?;
        spec.ctc_head = head;
        pairs.push((run.join(name).join(&which), spec));
    }
    if let Some(note) = vocab.unknown_note(&ds, &data.display().to_string()) {
        eprintln!("{note}");
    }
    let results = strata::train::run::evaluate_checkpoints(
        &source,
        &pairs,
        task,
        &vocab,
        &ds,
        60 * 16000,
        device,
    )
    .map_err(|e| e.to_string())?;
    for (name, (rate, hyps)) in names.iter().zip(results) {
        let hyp = match &hyp {
            Some(h) => h.clone(),
            None => run.join(name).join(format!("hyp-{which}.tsv")),
        };
        let text: String = hyps
            .iter()
            .map(|h| format!("{}\t{}\t{}\n", h.id, h.hyp.join(" "), h.reference.join(" ")))
            .collect();
        std::fs::write(&hyp, text).map_err(|e| format!("{}: {e}", hyp.display()))?;
        let (metric, value, what) = match task {
            Task::Characters => ("CER", rate, "utterances"),
            Task::Units => ("PER", rate, "utterances"),
            Task::Classification => ("accuracy", 1.0 - rate, "utterances"),
            Task::Speaker => ("EER", rate, "trials"),
        };
        // Character recognition is also scored by words (SUPERB ASR's metric).
        let words = (task == Task::Characters).then(|| {
            let mut wer = ErrorRate::default();
            for h in &hyps {
                wer.add(&words_of(&h.hyp, "|"), &words_of(&h.reference, "|"));
            }
            format!(", WER {:.2}%", 100.0 * wer.rate())
        });
        println!(
            "{name} ({which}) on {}: {metric} {:.2}%{} over {} {what}; {} in {}",
            data.display(),
            100.0 * value,
            words.unwrap_or_default(),
            hyps.len(),
            if task == Task::Speaker {
                "scores"
            } else {
                "hypotheses"
            },
            hyp.display()
        );
    }
    Ok(())
}
