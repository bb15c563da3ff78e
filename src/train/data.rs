//! Training data: Kaldi-style directories (`wav.scp` + `text`, `utt2label` or `utt2spk`; a
//! verification set: `wav.scp` + `trials`), TSV manifests (`path<TAB>label`), and three corpora
//! as they ship: LibriSpeech (`*.trans.txt` beside the `.flac` files), VoxCeleb
//! (`wav/SPEAKER/VIDEO/UTT.wav`, trials by path) and Fluent Speech Commands (`data/*.csv`). All
//! are checked up front: every audio file must be a readable 16 kHz mono WAV or FLAC of at least
//! one frame (400 samples) and every label non-empty. A bad utterance is an error naming it, or,
//! when the caller asks for [`OnBad::Skip`], a counted skip with its reason. Also the vocabulary
//! (built from the training labels or read from a file), the pronunciation [`Lexicon`] (words to
//! phones, as s3prl's PR), and length-bucketed batching by total audio length.
//!
//! Relative audio paths are resolved against the data directory (Kaldi) or the manifest's folder;
//! where no file is there but one is at the path taken from the current directory (Kaldi recipes
//! write wav.scp paths relative to the recipe's root), that one is used.

use crate::error::{Error, Result};
use crate::rng::Rng;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// What the labels are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    /// Space-separated units (phones, words) for CTC.
    Units,
    /// Characters for CTC; a space becomes the word-boundary token `|`.
    Characters,
    /// One class name per utterance.
    Classification,
    /// Speaker verification: trained on the training speakers (`utt2spk`), scored on `trials`.
    Speaker,
}

/// Audio samples the x-vector head needs per utterance: its 16 frames
/// ([`crate::models::head::XVECTOR_MIN_FRAMES`]) of a 25 ms window at a 20 ms hop.
pub const SPEAKER_MIN_SAMPLES: usize = 400 + (crate::models::head::XVECTOR_MIN_FRAMES - 1) * 320;

/// One verification trial: utterances `a` and `b` (indices into the data set), same speaker or
/// not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trial {
    pub a: usize,
    pub b: usize,
    pub target: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnBad {
    Fail,
    Skip,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Utterance {
    pub id: String,
    pub path: PathBuf,
    pub samples: usize,
    /// Tokens (CTC tasks) or a single class name.
    pub label: Vec<String>,
}

#[derive(Clone, Debug, Default)]
pub struct Dataset {
    pub utterances: Vec<Utterance>,
    /// (utterance id, reason) of every skipped utterance.
    pub skipped: Vec<(String, String)>,
    /// A verification set's trials (empty otherwise).
    pub trials: Vec<Trial>,
}

fn io_err(path: &Path, detail: impl Into<String>) -> Error {
    Error::Io {
        path: path.display().to_string(),
        detail: detail.into(),
    }
}

fn read_lines(path: &Path) -> Result<Vec<(usize, String)>> {
    let text =
        std::fs::read_to_string(path).map_err(|e| io_err(path, format!("cannot read: {e}")))?;
    // Windows editors start UTF-8 files with a byte-order mark; it is not part of the first id.
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    Ok(text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| (i + 1, l.to_string()))
        .collect())
}

/// "id rest" lines into a map, rejecting duplicate ids.
fn id_map(path: &Path) -> Result<Vec<(String, String)>> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (no, line) in read_lines(path)? {
        let line = line.trim();
        let (id, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        if !seen.insert(id.to_string()) {
            return Err(io_err(
                path,
                format!("line {no}: utterance '{id}' appears twice"),
            ));
        }
        out.push((id.to_string(), rest.trim().to_string()));
    }
    Ok(out)
}

fn tokens(label: &str, task: Task) -> Vec<String> {
    match task {
        Task::Units => label.split_whitespace().map(str::to_string).collect(),
        Task::Characters => {
            let words: Vec<&str> = label.split_whitespace().collect();
            words
                .join(" ")
                .chars()
                .map(|c| {
                    if c == ' ' {
                        "|".to_string()
                    } else {
                        c.to_string()
                    }
                })
                .collect()
        }
        Task::Classification | Task::Speaker => {
            let l = label.trim();
            if l.is_empty() {
                vec![]
            } else {
                vec![l.to_string()]
            }
        }
    }
}

/// Checks one utterance's audio and label; Err(reason) for a bad one.
fn check(
    id: &str,
    path: &Path,
    label: Option<&[String]>,
    min_samples: usize,
) -> std::result::Result<usize, String> {
    let samples = crate::audio::audio_samples(path).map_err(|e| e.to_string())?;
    if samples < 400 {
        return Err(format!(
            "{}: {samples} samples; at least 400 (one 25 ms frame at 16 kHz) are needed",
            path.display()
        ));
    }
    if samples < min_samples {
        return Err(format!(
            "{}: {samples} samples; the speaker head needs at least {min_samples} ({:.2} s)",
            path.display(),
            min_samples as f64 / 16000.0
        ));
    }
    if label.is_some_and(|l| l.is_empty()) {
        return Err(format!("utterance '{id}' has an empty label"));
    }
    Ok(samples)
}

fn build(
    entries: Vec<(String, PathBuf, Vec<String>)>,
    on_bad: OnBad,
    labelled: bool,
    min_samples: usize,
) -> Result<Dataset> {
    let mut ds = Dataset::default();
    for (id, path, label) in entries {
        match check(
            &id,
            &path,
            labelled.then_some(label.as_slice()),
            min_samples,
        ) {
            Ok(samples) => ds.utterances.push(Utterance {
                id,
                path,
                samples,
                label,
            }),
            Err(reason) => match on_bad {
                OnBad::Fail => {
                    return Err(Error::value(
                        "utterance",
                        format!("'{id}': {reason} (or ask to skip bad utterances)"),
                    ))
                }
                OnBad::Skip => ds.skipped.push((id, reason)),
            },
        }
    }
    if ds.utterances.is_empty() {
        return Err(Error::value(
            "dataset",
            format!("no usable utterance ({} skipped)", ds.skipped.len()),
        ));
    }
    Ok(ds)
}

/// A pronunciation lexicon, for phone recognition from word transcripts as s3prl's SUPERB PR
/// prepares LibriSpeech (its G2P: each line "WORD PHONE PHONE ...", the files read in order, a
/// word's first pronunciation kept, transcripts upper-cased and looked up word by word; s3prl
/// ships librispeech-lexicon-200k-g2p.txt and librispeech-lexicon-allothers-g2p.txt).
#[derive(Clone, Debug, Default)]
pub struct Lexicon {
    phones: HashMap<String, Vec<String>>,
    /// The files, as given (named in errors).
    pub files: Vec<PathBuf>,
}

impl Lexicon {
    /// Reads the files in order; a word's first pronunciation wins. Blank lines are skipped; a
    /// line with a word but no phones is an error naming the file and line.
    pub fn load(files: &[PathBuf]) -> Result<Lexicon> {
        if files.is_empty() {
            return Err(Error::Config("a lexicon needs at least one file".into()));
        }
        let mut phones: HashMap<String, Vec<String>> = HashMap::new();
        for file in files {
            for (no, line) in read_lines(file)? {
                let mut words = line.split_whitespace();
                let Some(word) = words.next() else { continue };
                let pron: Vec<String> = words.map(str::to_string).collect();
                if pron.is_empty() {
                    return Err(io_err(
                        file,
                        format!("line {no}: '{word}' has no phones (a line is WORD PHONE ...)"),
                    ));
                }
                phones.entry(word.to_string()).or_insert(pron);
            }
        }
        Ok(Lexicon {
            phones,
            files: files.to_vec(),
        })
    }

    /// The phones of a transcript's words (upper-cased, as s3prl looks them up), or the words
    /// the lexicon lacks.
    pub fn phones_of(&self, words: &[String]) -> std::result::Result<Vec<String>, Vec<String>> {
        let mut out = Vec::new();
        let mut unknown = Vec::new();
        for w in words {
            match self.phones.get(&w.to_uppercase()) {
                Some(p) => out.extend(p.iter().cloned()),
                None => unknown.push(w.clone()),
            }
        }
        if unknown.is_empty() {
            Ok(out)
        } else {
            Err(unknown)
        }
    }

    /// Replaces each utterance's words by their phones. An utterance with a word the lexicon lacks
    /// is an error naming it and the words, or (`OnBad::Skip`) skipped with that reason.
    pub fn apply(&self, ds: &mut Dataset, on_bad: OnBad) -> Result<()> {
        let files: Vec<String> = self.files.iter().map(|f| f.display().to_string()).collect();
        let mut kept = Vec::with_capacity(ds.utterances.len());
        for mut u in std::mem::take(&mut ds.utterances) {
            match self.phones_of(&u.label) {
                Ok(p) => {
                    u.label = p;
                    kept.push(u);
                }
                Err(unknown) => {
                    let shown: Vec<String> =
                        unknown.iter().take(5).map(|w| format!("'{w}'")).collect();
                    let more = match unknown.len() {
                        n if n > 5 => format!(" and {} more", n - 5),
                        _ => String::new(),
                    };
                    let reason = format!(
                        "{}{more} not in the lexicon ({})",
                        shown.join(", "),
                        files.join(", ")
                    );
                    match on_bad {
                        OnBad::Fail => {
                            return Err(Error::value(
                                "utterance",
                                format!(
                                    "'{}': {reason}: add the words to a lexicon file (or ask to \
                                     skip bad utterances)",
                                    u.id
                                ),
                            ))
                        }
                        OnBad::Skip => ds.skipped.push((u.id, reason)),
                    }
                }
            }
        }
        if kept.is_empty() {
            return Err(Error::value(
                "dataset",
                format!(
                    "no utterance whose words are all in the lexicon ({} skipped)",
                    ds.skipped.len()
                ),
            ));
        }
        ds.utterances = kept;
        Ok(())
    }
}

fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    let in_base = base.join(p);
    if !in_base.exists() && p.exists() {
        p.to_path_buf()
    } else {
        in_base
    }
}

/// A Kaldi-style directory: `wav.scp` ("id path") and `text` ("id tokens...") for CTC tasks,
/// `utt2label` ("id class") for classification or `utt2spk` for speakers. Of piped wav.scp
/// entries ("cmd |") only a FLAC decode to stdout is read (as its file). Without wav.scp, a
/// LibriSpeech folder (CTC tasks) or a VoxCeleb folder (speakers) as it ships.
pub fn load_kaldi_dir(dir: &Path, task: Task, on_bad: OnBad) -> Result<Dataset> {
    match shipped_layout(dir) {
        Some(Shipped::VoxCeleb(root)) if task == Task::Speaker => load_voxceleb(&root, on_bad),
        Some(Shipped::LibriSpeech) => load_librispeech(dir, Some(task), on_bad),
        _ => load_kaldi(dir, Some(task), on_bad),
    }
}

/// A corpus folder as it ships, read without a wav.scp.
enum Shipped {
    /// Its speakers' folder (`wav/` or the folder itself).
    VoxCeleb(PathBuf),
    LibriSpeech,
}

/// Which corpus layout a folder without wav.scp has: VoxCeleb first (two folder listings), then
/// LibriSpeech (a walk to its first transcript).
fn shipped_layout(dir: &Path) -> Option<Shipped> {
    if !dir.is_dir() || dir.join("wav.scp").exists() {
        return None;
    }
    if let Some(root) = voxceleb_root(dir) {
        return Some(Shipped::VoxCeleb(root));
    }
    (!librispeech_transcripts(dir, 1).is_empty()).then_some(Shipped::LibriSpeech)
}

/// Where a VoxCeleb folder as it ships keeps its speakers (`wav/` below `dir`, or `dir`
/// itself): the folder holding `idNNNNN` speaker folders; None for other folders.
fn voxceleb_root(dir: &Path) -> Option<PathBuf> {
    let is_speaker = |name: &str| {
        name.len() > 2 && name.starts_with("id") && name[2..].bytes().all(|b| b.is_ascii_digit())
    };
    [dir.join("wav"), dir.to_path_buf()]
        .into_iter()
        .find(|root| {
            std::fs::read_dir(root).is_ok_and(|entries| {
                entries
                    .flatten()
                    .any(|e| e.path().is_dir() && is_speaker(&e.file_name().to_string_lossy()))
            })
        })
}

/// Speaker-labelled training audio from VoxCeleb as it ships: `root/SPEAKER/VIDEO/UTT.wav`, each
/// utterance's id its path below `root` (as VoxCeleb's trial lists name them), its label the
/// speaker folder.
fn load_voxceleb(root: &Path, on_bad: OnBad) -> Result<Dataset> {
    let sorted = |d: &Path| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(d)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect();
        v.sort();
        v
    };
    let mut entries = Vec::new();
    for speaker in sorted(root).into_iter().filter(|p| p.is_dir()) {
        let spk = speaker
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        for video in sorted(&speaker).into_iter().filter(|p| p.is_dir()) {
            for file in sorted(&video) {
                let is_audio = file.extension().is_some_and(|e| {
                    e.eq_ignore_ascii_case("wav") || e.eq_ignore_ascii_case("flac")
                });
                if !is_audio {
                    continue;
                }
                let id = file
                    .strip_prefix(root)
                    .unwrap_or(&file)
                    .to_string_lossy()
                    .replace('\\', "/");
                entries.push((id, file, vec![spk.clone()]));
            }
        }
    }
    build(entries, on_bad, true, SPEAKER_MIN_SAMPLES)
}

/// The `*.trans.txt` files below `dir` in path order (at most `limit`), at most four levels down
/// (the corpus root, a split, a speaker, a chapter), so that a wrong folder is not walked whole.
fn librispeech_transcripts(dir: &Path, limit: usize) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), 0)];
    while let Some((d, depth)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        for p in paths.into_iter().rev() {
            if p.is_dir() {
                if depth < 4 {
                    stack.push((p, depth + 1));
                }
            } else if p.to_string_lossy().ends_with(".trans.txt") {
                found.push(p);
            }
        }
        if found.len() >= limit {
            break;
        }
    }
    found.sort();
    found.truncate(limit);
    found
}

/// A LibriSpeech folder (a split such as train-clean-100, or the whole corpus): each line
/// "UTTERANCE WORDS.." of every transcript file, its audio UTTERANCE.flac beside the file. As a
/// Kaldi folder's `text` for the CTC tasks (and [`Lexicon`] for phones); without a task, the
/// audio only.
fn load_librispeech(dir: &Path, task: Option<Task>, on_bad: OnBad) -> Result<Dataset> {
    if let Some(t @ (Task::Classification | Task::Speaker)) = task {
        return Err(io_err(
            dir,
            format!(
                "is a LibriSpeech folder (transcripts, no wav.scp): it has no labels for {t:?}; \
                 use a Kaldi folder or a manifest"
            ),
        ));
    }
    let mut entries = Vec::new();
    let mut seen = HashSet::new();
    for file in librispeech_transcripts(dir, usize::MAX) {
        let folder = file.parent().unwrap_or(dir);
        for (no, line) in read_lines(&file)? {
            let line = line.trim();
            let (id, words) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
            if !seen.insert(id.to_string()) {
                return Err(io_err(
                    &file,
                    format!("line {no}: utterance '{id}' appears twice in the folder"),
                ));
            }
            let label = task.map_or_else(Vec::new, |t| tokens(words, t));
            entries.push((id.to_string(), folder.join(format!("{id}.flac")), label));
        }
    }
    let min = task.map_or(400, min_samples);
    build(entries, on_bad, task.is_some(), min)
}

/// The audio of a data set (Kaldi folder or TSV manifest) without its labels: for feature
/// extraction, which needs only ids and files.
pub fn load_audio_only(path: &Path, on_bad: OnBad) -> Result<Dataset> {
    match shipped_layout(path) {
        Some(Shipped::VoxCeleb(root)) => load_voxceleb(&root, on_bad),
        Some(Shipped::LibriSpeech) => load_librispeech(path, None, on_bad),
        None if path.is_dir() => load_kaldi(path, None, on_bad),
        None => load_manifest(path, None, on_bad),
    }
}

/// The audio file of a wav.scp entry. Kaldi's and ESPnet's LibriSpeech recipes write each entry
/// as a command that decodes the utterance's FLAC to standard output (`flac -c -d -s F.flac |`):
/// strata reads FLAC itself, so such an entry is read as F.flac. Any other command is an error:
/// strata runs no commands.
fn scp_audio_path(dir: &Path, id: &str, entry: &str) -> Result<String> {
    let Some(command) = entry.strip_suffix('|') else {
        if entry.is_empty() {
            return Err(io_err(
                &dir.join("wav.scp"),
                format!("utterance '{id}' has no audio path"),
            ));
        }
        return Ok(entry.to_string());
    };
    let words: Vec<&str> = command.split_whitespace().collect();
    let is_flac_program = |w: &str| w == "flac" || w.ends_with("/flac");
    // Flags that only make flac decode, quietly, to standard output (-c -d -s, combined or not).
    let decode_flag = |w: &str| {
        matches!(w, "--stdout" | "--decode" | "--silent" | "--force")
            || (w.len() > 1
                && w.starts_with('-')
                && !w.starts_with("--")
                && w[1..].chars().all(|c| matches!(c, 'c' | 'd' | 's' | 'f')))
    };
    if let Some((first, rest)) = words.split_first() {
        let files: Vec<&&str> = rest.iter().filter(|w| !w.starts_with('-')).collect();
        let flags_ok = rest
            .iter()
            .filter(|w| w.starts_with('-'))
            .all(|w| decode_flag(w));
        let decodes = rest.iter().any(|w| {
            *w == "--decode" || (w.starts_with('-') && !w.starts_with("--") && w.contains('d'))
        });
        if is_flac_program(first) && flags_ok && decodes && files.len() == 1 {
            let file = files[0];
            if file.to_ascii_lowercase().ends_with(".flac") {
                return Ok(file.to_string());
            }
        }
    }
    Err(io_err(
        &dir.join("wav.scp"),
        format!(
            "utterance '{id}': '{entry}' is a command; strata reads audio files (16 kHz mono \
             WAV or FLAC) and runs no commands: write the audio to files (an entry \
             `flac -c -d -s F.flac |`, as Kaldi's and ESPnet's LibriSpeech recipes write, is \
             read as F.flac)"
        ),
    ))
}

fn load_kaldi(dir: &Path, task: Option<Task>, on_bad: OnBad) -> Result<Dataset> {
    if !dir.join("wav.scp").exists() {
        return Err(io_err(
            dir,
            "has no wav.scp: a data folder is a Kaldi folder (wav.scp and text, utt2label or \
             utt2spk) or LibriSpeech as it ships (*.trans.txt beside the .flac files)",
        ));
    }
    let scp = id_map(&dir.join("wav.scp"))?;
    let Some(task) = task else {
        let entries = scp
            .into_iter()
            .map(|(id, path)| {
                let p = resolve(dir, &scp_audio_path(dir, &id, &path)?);
                Ok((id, p, Vec::new()))
            })
            .collect::<Result<_>>()?;
        return build(entries, on_bad, false, 400);
    };
    let label_file = dir.join(match task {
        Task::Classification => "utt2label",
        Task::Speaker => "utt2spk",
        Task::Units | Task::Characters => "text",
    });
    let labels: HashMap<String, String> = id_map(&label_file)?.into_iter().collect();
    let mut entries = Vec::new();
    for (id, path) in scp {
        let path = scp_audio_path(dir, &id, &path)?;
        let label = match labels.get(&id) {
            Some(l) => tokens(l, task),
            None => match on_bad {
                OnBad::Fail => {
                    return Err(io_err(
                        &label_file,
                        format!("has no line for utterance '{id}' (listed in wav.scp)"),
                    ))
                }
                OnBad::Skip => Vec::new(),
            },
        };
        entries.push((id, resolve(dir, &path), label));
    }
    build(entries, on_bad, true, min_samples(task))
}

fn min_samples(task: Task) -> usize {
    if task == Task::Speaker {
        SPEAKER_MIN_SAMPLES
    } else {
        400
    }
}

/// A verification set: a Kaldi-style folder with `wav.scp` and `trials`, one trial per line,
/// either "1 idA idB" / "0 idA idB" (VoxCeleb's lists, s3prl) or "idA idB target|nontarget"
/// (Kaldi). Utterances no trial names are left out; with [`OnBad::Skip`], trials naming a bad
/// utterance are dropped with it (each skip is listed in `skipped`).
pub fn load_verification_dir(dir: &Path, on_bad: OnBad) -> Result<Dataset> {
    let path = dir.join("trials");
    let mut pairs = Vec::new();
    for (no, line) in read_lines(&path)? {
        let f: Vec<&str> = line.split_whitespace().collect();
        let bad = || {
            io_err(
                &path,
                format!("line {no}: '{line}' is not a trial: write '1 idA idB' / '0 idA idB' or 'idA idB target' / 'idA idB nontarget'"),
            )
        };
        let trial = match f.as_slice() {
            ["1", a, b] => (a.to_string(), b.to_string(), true),
            ["0", a, b] => (a.to_string(), b.to_string(), false),
            [a, b, "target"] => (a.to_string(), b.to_string(), true),
            [a, b, "nontarget"] => (a.to_string(), b.to_string(), false),
            _ => return Err(bad()),
        };
        pairs.push(trial);
    }
    if !pairs.iter().any(|t| t.2) || !pairs.iter().any(|t| !t.2) {
        return Err(io_err(
            &path,
            "needs target and nontarget trials both: an equal error rate weighs one kind against the other",
        ));
    }
    let named: HashSet<&str> = pairs
        .iter()
        .flat_map(|t| [t.0.as_str(), t.1.as_str()])
        .collect();
    // Without wav.scp, the trials name audio files by their paths below the folder (or its
    // wav/), as VoxCeleb's lists do ("1 id10270/x6uYqmx31kE/00001.wav id10270/...").
    let scp = if dir.join("wav.scp").exists() {
        id_map(&dir.join("wav.scp"))?
    } else {
        // Relative to `dir`, as a wav.scp path would be.
        let below = match voxceleb_root(dir) {
            Some(root) if root == dir.join("wav") => "wav/",
            _ => "",
        };
        let mut ids: Vec<&str> = named.iter().copied().collect();
        ids.sort();
        ids.into_iter()
            .map(|id| (id.to_string(), format!("{below}{id}")))
            .collect()
    };
    let known: HashSet<&str> = scp.iter().map(|(id, _)| id.as_str()).collect();
    // The first unknown id in file order, so the message does not depend on hashing.
    let in_order = pairs.iter().flat_map(|t| [t.0.as_str(), t.1.as_str()]);
    if let Some(missing) = in_order.into_iter().find(|id| !known.contains(id)) {
        return Err(io_err(
            &path,
            format!("names utterance '{missing}', which wav.scp does not list"),
        ));
    }
    let entries = (scp.iter())
        .filter(|(id, _)| named.contains(id.as_str()))
        .map(|(id, p)| (id.clone(), resolve(dir, p), Vec::new()))
        .collect();
    let mut ds = build(entries, on_bad, false, SPEAKER_MIN_SAMPLES)?;
    let index: HashMap<&str, usize> = (ds.utterances.iter().enumerate())
        .map(|(i, u)| (u.id.as_str(), i))
        .collect();
    let mut trials = Vec::new();
    let mut dropped = 0;
    for (a, b, target) in &pairs {
        match (index.get(a.as_str()), index.get(b.as_str())) {
            (Some(&a), Some(&b)) => trials.push(Trial {
                a,
                b,
                target: *target,
            }),
            _ => dropped += 1,
        }
    }
    if dropped > 0 {
        ds.skipped.push((
            "trials".into(),
            format!(
                "{dropped} of {} trials name a skipped utterance and were dropped",
                pairs.len()
            ),
        ));
    }
    if !trials.iter().any(|t| t.target) || !trials.iter().any(|t| !t.target) {
        return Err(io_err(
            &path,
            "no target or no nontarget trial is left after the skipped utterances",
        ));
    }
    ds.trials = trials;
    Ok(ds)
}

/// A TSV manifest: `path<TAB>label` per line (an optional header `path<TAB>label` is skipped); the
/// utterance id is the path as written.
pub fn load_tsv(manifest: &Path, task: Task, on_bad: OnBad) -> Result<Dataset> {
    load_manifest(manifest, Some(task), on_bad)
}

/// The fields of one CSV line (RFC 4180: commas; a quoted field may hold commas and doubled
/// quotes).
fn csv_fields(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        let field = fields.last_mut().expect("one field at least");
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            '"' => quoted = !quoted,
            ',' if !quoted => fields.push(String::new()),
            _ => field.push(c),
        }
    }
    fields
}

/// Fluent Speech Commands as it ships: data/{train,valid,test}_data.csv with a header naming
/// `path` (relative to the corpus root, the folder above data/) and the `action`, `object` and
/// `location` slots, which make one class "action+object+location" for intent classification
/// (s3prl scores the three slots together: an utterance is right when all three are). Without a
/// task, the audio only.
fn load_csv_manifest(manifest: &Path, task: Option<Task>, on_bad: OnBad) -> Result<Dataset> {
    if let Some(t @ (Task::Units | Task::Characters | Task::Speaker)) = task {
        return Err(io_err(
            manifest,
            format!(
                "a .csv manifest is read as Fluent Speech Commands' (path, action, object, \
                 location) for --task classify, not {t:?}: use a TSV manifest (path<TAB>label) or \
                 a Kaldi folder"
            ),
        ));
    }
    let lines = read_lines(manifest)?;
    let Some((_, header)) = lines.first() else {
        return Err(io_err(manifest, "is empty"));
    };
    let names = csv_fields(header);
    let column = |name: &str| {
        names.iter().position(|n| n.trim() == name).ok_or_else(|| {
            io_err(
                manifest,
                format!(
                    "its header has no '{name}' column (Fluent Speech Commands' has path, action, \
                     object, location)"
                ),
            )
        })
    };
    let path_col = column("path")?;
    let slots = match task {
        Some(_) => Some([column("action")?, column("object")?, column("location")?]),
        None => None,
    };
    let base = manifest.parent().unwrap_or(Path::new("."));
    let root = base.parent().unwrap_or(base);
    let mut entries = Vec::new();
    let mut seen = HashSet::new();
    for (no, line) in &lines[1..] {
        let f = csv_fields(line);
        let field = |i: usize| {
            f.get(i).map(|v| v.trim()).ok_or_else(|| {
                io_err(
                    manifest,
                    format!(
                        "line {no}: {} fields, the header has {}",
                        f.len(),
                        names.len()
                    ),
                )
            })
        };
        let path = field(path_col)?;
        if !seen.insert(path.to_string()) {
            return Err(io_err(
                manifest,
                format!("line {no}: '{path}' appears twice"),
            ));
        }
        let label = match slots {
            Some(cols) => vec![cols
                .iter()
                .map(|&c| field(c))
                .collect::<Result<Vec<_>>>()?
                .join("+")],
            None => Vec::new(),
        };
        // The corpus root first (where FSC's paths start), then beside the manifest.
        let file = if root.join(path).exists() || !base.join(path).exists() {
            resolve(root, path)
        } else {
            base.join(path)
        };
        entries.push((path.to_string(), file, label));
    }
    build(entries, on_bad, task.is_some(), 400)
}

fn load_manifest(manifest: &Path, task: Option<Task>, on_bad: OnBad) -> Result<Dataset> {
    if manifest
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"))
    {
        return load_csv_manifest(manifest, task, on_bad);
    }
    let base = manifest.parent().unwrap_or(Path::new("."));
    let mut entries = Vec::new();
    let mut seen = HashSet::new();
    for (no, line) in read_lines(manifest)? {
        let split = match task {
            Some(_) => line.split_once('\t'),
            None => Some(line.split_once('\t').unwrap_or((line.as_str(), ""))),
        };
        let Some((path, label)) = split else {
            return Err(io_err(
                manifest,
                format!("line {no}: expected 'path<TAB>label', got '{line}'"),
            ));
        };
        if no == 1 && path.trim() == "path" {
            continue;
        }
        if !seen.insert(path.to_string()) {
            return Err(io_err(
                manifest,
                format!("line {no}: '{path}' appears twice"),
            ));
        }
        entries.push((
            path.to_string(),
            resolve(base, path.trim()),
            task.map(|t| tokens(label, t)).unwrap_or_default(),
        ));
    }
    build(
        entries,
        on_bad,
        task.is_some(),
        task.map_or(400, min_samples),
    )
}

/// Token <-> index. For CTC the blank `<blank>` is index 0.
#[derive(Clone, Debug, PartialEq)]
pub struct Vocab {
    pub tokens: Vec<String>,
    index: HashMap<String, usize>,
}

pub const BLANK: &str = "<blank>";

impl Vocab {
    fn from_tokens(tokens: Vec<String>) -> Result<Self> {
        let mut index = HashMap::new();
        for (i, t) in tokens.iter().enumerate() {
            if index.insert(t.clone(), i).is_some() {
                return Err(Error::value(
                    "vocabulary",
                    format!("token '{t}' is listed twice"),
                ));
            }
        }
        Ok(Vocab { tokens, index })
    }

    /// Every label token of the training set, sorted; `ctc` puts the blank first.
    pub fn from_dataset(ds: &Dataset, ctc: bool) -> Self {
        let mut set: Vec<String> = ds
            .utterances
            .iter()
            .flat_map(|u| u.label.iter().cloned())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        set.sort();
        let tokens = if ctc {
            std::iter::once(BLANK.to_string()).chain(set).collect()
        } else {
            set
        };
        Self::from_tokens(tokens).expect("a set has no duplicates")
    }

    /// One token per line, in index order (the blank, for CTC, must be the first line).
    pub fn from_file(path: &Path, ctc: bool) -> Result<Self> {
        let tokens: Vec<String> = read_lines(path)?
            .into_iter()
            .map(|(_, l)| l.trim().to_string())
            .collect();
        if ctc && tokens.first().map(String::as_str) != Some(BLANK) {
            return Err(io_err(
                path,
                format!("a CTC vocabulary starts with the blank '{BLANK}' on its first line"),
            ));
        }
        Self::from_tokens(tokens).map_err(|e| io_err(path, e.to_string()))
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Label indices of an utterance; a token outside the vocabulary is an error naming both.
    pub fn encode(&self, u: &Utterance) -> Result<Vec<usize>> {
        u.label
            .iter()
            .map(|t| {
                self.index.get(t).copied().ok_or_else(|| {
                    Error::value(
                        "label",
                        format!(
                            "utterance '{}' has '{t}', which is not in the vocabulary",
                            u.id
                        ),
                    )
                })
            })
            .collect()
    }

    /// Stands for a reference token outside the vocabulary when scoring: no hypothesis holds it,
    /// so it counts as an error, as it would for any system that cannot output it.
    pub const UNKNOWN: usize = usize::MAX;

    /// Label indices for scoring (dev and test references), where a token outside the vocabulary
    /// is [`Vocab::UNKNOWN`] rather than an error: a test set may hold a rare phone or class that
    /// the training set lacks, and skipping its utterances would flatter the error rate.
    pub fn encode_reference(&self, u: &Utterance) -> Vec<usize> {
        u.label
            .iter()
            .map(|t| self.index.get(t).copied().unwrap_or(Self::UNKNOWN))
            .collect()
    }

    /// The reference tokens of `ds` outside the vocabulary, with their counts, most frequent
    /// first, and the total number of reference tokens.
    pub fn unknown_tokens(&self, ds: &Dataset) -> (Vec<(String, usize)>, usize) {
        let mut counts: HashMap<&str, usize> = HashMap::new();
        let mut total = 0;
        for t in ds.utterances.iter().flat_map(|u| &u.label) {
            total += 1;
            if !self.index.contains_key(t) {
                *counts.entry(t).or_default() += 1;
            }
        }
        let mut unknown: Vec<(String, usize)> = counts
            .into_iter()
            .map(|(t, n)| (t.to_string(), n))
            .collect();
        unknown.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        (unknown, total)
    }

    /// A one-line note on the reference tokens of `ds` outside the vocabulary, if any.
    pub fn unknown_note(&self, ds: &Dataset, what: &str) -> Option<String> {
        let (unknown, total) = self.unknown_tokens(ds);
        if unknown.is_empty() {
            return None;
        }
        let n: usize = unknown.iter().map(|u| u.1).sum();
        let listed: Vec<String> = unknown
            .iter()
            .take(5)
            .map(|(t, c)| format!("'{t}' x{c}"))
            .collect();
        Some(format!(
            "note: {n} of the {total} reference tokens of {what} are not in the vocabulary ({}{}); they count as errors",
            listed.join(", "),
            if unknown.len() > 5 { ", ..." } else { "" }
        ))
    }

    /// Encodes every utterance; with [`OnBad::Skip`] utterances with unknown tokens are dropped and
    /// recorded in `skipped`.
    pub fn encode_all(&self, ds: &mut Dataset, on_bad: OnBad) -> Result<Vec<Vec<usize>>> {
        let mut kept = Vec::new();
        let mut out = Vec::new();
        for u in ds.utterances.drain(..) {
            match self.encode(&u) {
                Ok(e) => {
                    out.push(e);
                    kept.push(u);
                }
                Err(e) if on_bad == OnBad::Skip => ds.skipped.push((u.id.clone(), e.to_string())),
                Err(e) => return Err(e),
            }
        }
        ds.utterances = kept;
        Ok(out)
    }
}

/// Batches of utterance indices with at most `max_samples` audio samples each (an utterance longer
/// than that gets a batch of its own): sorted by length so a batch holds similar lengths, then the
/// batch order shuffled with `seed` (None keeps it sorted). Every index appears exactly once.
pub fn length_buckets(samples: &[usize], max_samples: usize, seed: Option<u64>) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..samples.len()).collect();
    order.sort_by_key(|&i| (samples[i], i));
    let mut batches: Vec<Vec<usize>> = Vec::new();
    let mut current = Vec::new();
    let mut total = 0;
    for i in order {
        if !current.is_empty() && total + samples[i] > max_samples {
            batches.push(std::mem::take(&mut current));
            total = 0;
        }
        current.push(i);
        total += samples[i];
    }
    if !current.is_empty() {
        batches.push(current);
    }
    if let Some(seed) = seed {
        let mut rng = Rng::new(seed);
        for i in (1..batches.len()).rev() {
            batches.swap(i, rng.below(i + 1));
        }
    }
    batches
}
