//! Data directories and manifests: what loads, what is rejected (naming the utterance), what is
//! skipped on request; the vocabulary; length-bucketed batching.

use std::path::{Path, PathBuf};
use strata::train::data::{length_buckets, load_kaldi_dir, load_tsv, OnBad, Task, Vocab, BLANK};

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("strata-data-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn wav(dir: &Path, name: &str, samples: usize, rate: u32, channels: u16) {
    let spec = hound::WavSpec {
        channels,
        sample_rate: rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(dir.join(name), spec).unwrap();
    for i in 0..samples * channels as usize {
        w.write_sample(((i as f32 * 0.01).sin() * 8000.0) as i16)
            .unwrap();
    }
    w.finalize().unwrap();
}

/// Each utterance's id and its (one) class, in order.
fn ids_and_classes(ds: &strata::train::data::Dataset) -> Vec<(&str, &str)> {
    ds.utterances
        .iter()
        .map(|u| (u.id.as_str(), u.label[0].as_str()))
        .collect()
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

#[test]
fn kaldi_dir_loads_and_bad_utterances_are_named_or_skipped() {
    let d = scratch("kaldi");
    wav(&d, "a.wav", 16000, 16000, 1);
    wav(&d, "b.wav", 8000, 16000, 1);
    // CRLF line ends and a UTF-8 byte-order mark, as Windows editors write them.
    write(&d, "wav.scp", "\u{feff}a a.wav\r\nb b.wav\r\n");
    write(&d, "text", "a h e l o\nb w o r l d\n");
    let ds = load_kaldi_dir(&d, Task::Units, OnBad::Fail).unwrap();
    assert_eq!(ds.utterances.len(), 2);
    assert_eq!(
        (ds.utterances[0].samples, ds.utterances[0].label.join(" ")),
        (16000, "h e l o".to_string())
    );

    // Characters: spaces become the word boundary '|'.
    write(&d, "text", "a hi there\nb x\n");
    let ds = load_kaldi_dir(&d, Task::Characters, OnBad::Fail).unwrap();
    assert_eq!(ds.utterances[0].label.concat(), "hi|there");

    // Bad audio and labels: an error naming the utterance, or a counted skip.
    wav(&d, "narrow.wav", 8000, 8000, 1);
    wav(&d, "stereo.wav", 8000, 16000, 2);
    wav(&d, "short.wav", 300, 16000, 1);
    write(&d, "junk.wav", "RIFFxxxxWAVE");
    for (id, file, needle) in [
        ("n", "narrow.wav", "8000 Hz"),
        ("s", "stereo.wav", "2 channels"),
        ("t", "short.wav", "300 samples"),
        ("m", "missing.wav", "cannot open"),
        ("j", "junk.wav", "not a readable WAV file"),
    ] {
        write(&d, "wav.scp", &format!("a a.wav\n{id} {file}\n"));
        write(&d, "text", &format!("a h i\n{id} x y\n"));
        let err = load_kaldi_dir(&d, Task::Units, OnBad::Fail)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("'{id}'")) && err.contains(needle),
            "{err}"
        );
        let ds = load_kaldi_dir(&d, Task::Units, OnBad::Skip).unwrap();
        assert_eq!((ds.utterances.len(), ds.skipped.len()), (1, 1));
        assert_eq!(ds.skipped[0].0, id);
    }
    write(&d, "wav.scp", "a a.wav\nb b.wav\n");
    write(&d, "text", "a h i\nb\n");
    assert!(load_kaldi_dir(&d, Task::Units, OnBad::Fail)
        .unwrap_err()
        .to_string()
        .contains("'b' has an empty label"));
    write(&d, "text", "a h i\n");
    assert!(load_kaldi_dir(&d, Task::Units, OnBad::Fail)
        .unwrap_err()
        .to_string()
        .contains("no line for utterance 'b'"));
    write(&d, "wav.scp", "a a.wav\na b.wav\n");
    assert!(load_kaldi_dir(&d, Task::Units, OnBad::Skip)
        .unwrap_err()
        .to_string()
        .contains("'a' appears twice"));
    write(&d, "wav.scp", "a sox x.flac -t wav - |\n");
    let err = load_kaldi_dir(&d, Task::Units, OnBad::Fail)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("utterance 'a'") && err.contains("runs no commands"),
        "{err}"
    );
    std::fs::remove_file(d.join("wav.scp")).unwrap();
    assert!(load_kaldi_dir(&d, Task::Units, OnBad::Fail)
        .unwrap_err()
        .to_string()
        .contains("wav.scp"));
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn classification_dirs_and_tsv_manifests() {
    let d = scratch("cls");
    wav(&d, "a.wav", 4000, 16000, 1);
    wav(&d, "b.wav", 6000, 16000, 1);
    write(&d, "wav.scp", "a a.wav\nb b.wav\n");
    write(&d, "utt2label", "a happy\nb sad\n");
    let ds = load_kaldi_dir(&d, Task::Classification, OnBad::Fail).unwrap();
    let vocab = Vocab::from_dataset(&ds, false);
    assert_eq!(vocab.tokens, vec!["happy", "sad"]);
    write(&d, "m.tsv", "path\tlabel\na.wav\tangry\nb.wav\tsad\n");
    let mut ds = load_tsv(&d.join("m.tsv"), Task::Classification, OnBad::Fail).unwrap();
    assert_eq!(ds.utterances.len(), 2);
    // 'angry' is outside the training vocabulary: an error naming it, or a skip.
    let err = vocab.encode(&ds.utterances[0]).unwrap_err().to_string();
    assert!(err.contains("'a.wav'") && err.contains("'angry'"), "{err}");
    let enc = vocab.encode_all(&mut ds, OnBad::Skip).unwrap();
    assert_eq!(
        (enc, ds.utterances.len(), ds.skipped.len()),
        (vec![vec![1]], 1, 1)
    );
    write(&d, "bad.tsv", "a.wav sad\n");
    assert!(
        load_tsv(&d.join("bad.tsv"), Task::Classification, OnBad::Fail)
            .unwrap_err()
            .to_string()
            .contains("line 1")
    );
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn ctc_vocabularies_start_with_the_blank() {
    let d = scratch("vocab");
    wav(&d, "a.wav", 4000, 16000, 1);
    write(&d, "wav.scp", "a a.wav\n");
    write(&d, "text", "a b a c\n");
    let ds = load_kaldi_dir(&d, Task::Units, OnBad::Fail).unwrap();
    let v = Vocab::from_dataset(&ds, true);
    assert_eq!(v.tokens, vec![BLANK, "a", "b", "c"]);
    assert_eq!(v.encode(&ds.utterances[0]).unwrap(), vec![2, 1, 3]);
    write(&d, "vocab.txt", "<blank>\nc\nb\na\n");
    assert_eq!(
        Vocab::from_file(&d.join("vocab.txt"), true)
            .unwrap()
            .encode(&ds.utterances[0])
            .unwrap(),
        vec![2, 3, 1]
    );
    write(&d, "vocab.txt", "c\nb\na\n");
    assert!(Vocab::from_file(&d.join("vocab.txt"), true)
        .unwrap_err()
        .to_string()
        .contains("blank"));
    write(&d, "vocab.txt", "<blank>\na\na\n");
    assert!(Vocab::from_file(&d.join("vocab.txt"), true)
        .unwrap_err()
        .to_string()
        .contains("twice"));
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn length_buckets_respect_the_budget_and_cover_every_utterance_once() {
    let mut rng = strata::rng::Rng::new(3);
    let samples: Vec<usize> = (0..200).map(|_| 400 + rng.below(200_000)).collect();
    let budget = 16000 * 30;
    for seed in [None, Some(1), Some(2)] {
        let batches = length_buckets(&samples, budget, seed);
        let mut seen: Vec<usize> = batches.concat();
        seen.sort();
        assert_eq!(seen, (0..200).collect::<Vec<_>>());
        for b in &batches {
            let total: usize = b.iter().map(|&i| samples[i]).sum();
            assert!(total <= budget || b.len() == 1, "batch of {total} samples");
        }
    }
    assert_eq!(
        length_buckets(&samples, budget, Some(7)),
        length_buckets(&samples, budget, Some(7))
    );
    assert_ne!(
        length_buckets(&samples, budget, Some(7)),
        length_buckets(&samples, budget, Some(8))
    );
    // Longer than the budget: a batch of its own.
    assert_eq!(
        length_buckets(&[10, 1000, 10], 100, None),
        vec![vec![0, 2], vec![1]]
    );
}

#[test]
fn kaldi_paths_relative_to_the_recipe_root_are_found_too() {
    // A Kaldi recipe writes wav.scp paths relative to its root (the current directory), not to
    // the data folder; the data folder is tried first, then the current directory.
    let d = scratch("recipe");
    let rel = PathBuf::from(format!("target/strata-data-{}-recipe", std::process::id()));
    std::fs::create_dir_all(&rel).unwrap();
    wav(&rel, "c.wav", 16000, 16000, 1);
    wav(&d, "a.wav", 8000, 16000, 1);
    let c = rel.join("c.wav");
    write(&d, "wav.scp", &format!("a a.wav\nc {}\n", c.display()));
    write(&d, "text", "a h i\nc x y\n");
    let ds = load_kaldi_dir(&d, Task::Units, OnBad::Fail).unwrap();
    assert_eq!(
        ds.utterances.iter().map(|u| u.samples).collect::<Vec<_>>(),
        [8000, 16000]
    );
    assert_eq!(ds.utterances[1].path, c);
    // Neither in the data folder nor from the current directory: the error names the former.
    write(&d, "wav.scp", "a a.wav\nc nowhere/c.wav\n");
    let err = load_kaldi_dir(&d, Task::Units, OnBad::Fail)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("'c'") && err.contains("nowhere/c.wav"),
        "{err}"
    );
    std::fs::remove_dir_all(&rel).unwrap();
}

#[test]
fn speaker_dirs_and_verification_trials() {
    use strata::train::data::{load_verification_dir, Trial, SPEAKER_MIN_SAMPLES};
    let d = scratch("sv");
    for (name, samples) in [("a", 8000), ("b", 9000), ("c", 7000), ("x", 6000)] {
        wav(&d, &format!("{name}.wav"), samples, 16000, 1);
    }
    wav(&d, "short.wav", SPEAKER_MIN_SAMPLES - 1, 16000, 1);
    // Training: utt2spk; every utterance long enough for the x-vector's windows.
    write(
        &d,
        "wav.scp",
        "a a.wav\nb b.wav\nc c.wav\nshort short.wav\n",
    );
    write(&d, "utt2spk", "a spk1\nb spk2\nc spk1\nshort spk2\n");
    let err = load_kaldi_dir(&d, Task::Speaker, OnBad::Fail)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("'short'") && err.contains("the speaker head needs at least 5200"),
        "{err}"
    );
    let ds = load_kaldi_dir(&d, Task::Speaker, OnBad::Skip).unwrap();
    assert_eq!((ds.utterances.len(), ds.skipped.len()), (3, 1));
    assert_eq!(Vocab::from_dataset(&ds, false).tokens, vec!["spk1", "spk2"]);
    // Verification: VoxCeleb's "label idA idB" and Kaldi's "idA idB target|nontarget" lines;
    // utterances no trial names (x) are left out.
    write(
        &d,
        "wav.scp",
        "a a.wav\nb b.wav\nc c.wav\nx x.wav\nshort short.wav\n",
    );
    write(&d, "trials", "1 a c\n0 a b\nb c nontarget\nc a target\n");
    let ds = load_verification_dir(&d, OnBad::Fail).unwrap();
    let ids: Vec<&str> = ds.utterances.iter().map(|u| u.id.as_str()).collect();
    assert_eq!(ids, ["a", "b", "c"]);
    let t = |a, b, target| Trial { a, b, target };
    assert_eq!(
        ds.trials,
        [t(0, 2, true), t(0, 1, false), t(1, 2, false), t(2, 0, true)]
    );
    // A trial with a too-short utterance: an error, or dropped with it.
    write(&d, "trials", "1 a c\n0 a short\n0 b c\n");
    let err = load_verification_dir(&d, OnBad::Fail)
        .unwrap_err()
        .to_string();
    assert!(err.contains("'short'"), "{err}");
    let ds = load_verification_dir(&d, OnBad::Skip).unwrap();
    assert_eq!(ds.trials, [t(0, 2, true), t(1, 2, false)]);
    assert!(
        ds.skipped
            .iter()
            .any(|(_, why)| why.contains("1 of 3 trials")),
        "{:?}",
        ds.skipped
    );
    // Bad trials files: named line, unknown utterance, one kind of trial only.
    for (text, want) in [
        ("1 a c\nsame a b\n", "line 2: 'same a b' is not a trial"),
        (
            "1 a c\n0 a nobody\n",
            "names utterance 'nobody', which wav.scp does not list",
        ),
        ("1 a c\n1 b b\n", "needs target and nontarget trials both"),
    ] {
        write(&d, "trials", text);
        let err = load_verification_dir(&d, OnBad::Fail)
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{text:?}: {err}");
    }
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn a_lexicon_maps_words_to_phones_and_names_what_it_lacks() {
    use strata::train::data::{Dataset, Lexicon, Utterance};
    let d = scratch("lexicon");
    write(
        &d,
        "a.txt",
        "HELLO hh ah l ow\nWORLD w er l d\nHELLO WRONG\n",
    );
    write(&d, "b.txt", "\nWORLD WRONG\nTHE dh ah\n");
    let lex = Lexicon::load(&[d.join("a.txt"), d.join("b.txt")]).unwrap();
    let words = |s: &str| s.split(' ').map(str::to_string).collect::<Vec<_>>();
    assert_eq!(
        lex.phones_of(&words("hello The world")).unwrap().join(" "),
        "hh ah l ow dh ah w er l d"
    );
    let unknown: Vec<String> = (0..7).map(|i| format!("w{i}")).collect();
    assert_eq!(lex.phones_of(&unknown).unwrap_err(), unknown);
    let utt = |id: &str, text: &str| Utterance {
        id: id.into(),
        path: d.join(format!("{id}.wav")),
        samples: 16000,
        label: words(text),
    };
    let set = || Dataset {
        utterances: vec![utt("u1", "hello w0 w1 w2 w3 w4 w5 w6"), utt("u2", "world")],
        ..Default::default()
    };
    let err = lex.apply(&mut set(), OnBad::Fail).unwrap_err().to_string();
    assert!(
        err.contains("'u1'") && err.contains("'w0'") && err.contains("and 2 more"),
        "{err}"
    );
    let mut ds = set();
    lex.apply(&mut ds, OnBad::Skip).unwrap();
    assert_eq!(ds.utterances.len(), 1);
    assert_eq!(ds.utterances[0].label.join(" "), "w er l d");
    assert_eq!(ds.skipped[0].0, "u1");
    let mut none = Dataset {
        utterances: vec![utt("u1", "w0")],
        ..Default::default()
    };
    let err = lex.apply(&mut none, OnBad::Skip).unwrap_err().to_string();
    assert!(err.contains("no utterance whose words"), "{err}");
    assert!(Lexicon::load(&[d.join("missing.txt")])
        .unwrap_err()
        .to_string()
        .contains("missing.txt"));
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn voxceleb_folders_as_they_ship_train_and_score_speakers() {
    use strata::train::data::{load_verification_dir, SPEAKER_MIN_SAMPLES};
    let d = scratch("voxceleb");
    let n = SPEAKER_MIN_SAMPLES + 100;
    let utterance = |set: &str, rel: &str| {
        let file = Path::new(set).join("wav").join(rel);
        std::fs::create_dir_all(d.join(file.parent().unwrap())).unwrap();
        wav(&d, file.to_str().unwrap(), n, 16000, 1);
    };
    // Training: wav/SPEAKER/VIDEO/UTT.wav; the speaker is the label, the path below wav/ the id.
    for rel in [
        "id10002/vidC/00001.wav",
        "id10001/vidA/00002.wav",
        "id10001/vidA/00001.wav",
        "id10001/vidB/00001.wav",
    ] {
        utterance("dev", rel);
    }
    write(&d.join("dev/wav/id10001/vidA"), "notes.txt", "not audio");
    let audio = strata::train::data::load_audio_only(&d.join("dev"), OnBad::Fail).unwrap();
    assert_eq!(audio.utterances[3].id, "id10002/vidC/00001.wav");
    for root in [d.join("dev"), d.join("dev/wav")] {
        let ds = load_kaldi_dir(&root, Task::Speaker, OnBad::Fail).unwrap();
        assert_eq!(
            ids_and_classes(&ds),
            [
                ("id10001/vidA/00001.wav", "id10001"),
                ("id10001/vidA/00002.wav", "id10001"),
                ("id10001/vidB/00001.wav", "id10001"),
                ("id10002/vidC/00001.wav", "id10002"),
            ]
        );
    }
    // Scoring: a trials list that names files below the folder (VoxCeleb's veri_test2.txt).
    for rel in [
        "id10270/v1/00001.wav",
        "id10270/v2/00002.wav",
        "id10271/v3/00001.wav",
    ] {
        utterance("test", rel);
    }
    let t = d.join("test");
    write(
        &t,
        "trials",
        "1 id10270/v1/00001.wav id10270/v2/00002.wav\n0 id10270/v1/00001.wav id10271/v3/00001.wav\n",
    );
    let ds = load_verification_dir(&t, OnBad::Fail).unwrap();
    assert_eq!(ds.utterances.len(), 3);
    assert_eq!(
        ds.trials.iter().map(|t| t.target).collect::<Vec<_>>(),
        [true, false]
    );
    let named = |i: usize| ds.utterances[i].id.as_str();
    assert_eq!(named(ds.trials[1].b), "id10271/v3/00001.wav");
    // A trial naming a file that is not there names it (or, skipping, drops the trial).
    write(
        &t,
        "trials",
        "1 id10270/v1/00001.wav id10270/v2/00002.wav\n0 id10270/v1/00001.wav id10271/v3/00001.wav\n0 id10270/v2/00002.wav id10999/gone/00001.wav\n",
    );
    let err = load_verification_dir(&t, OnBad::Fail)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("'id10999/gone/00001.wav'") && err.contains("cannot open"),
        "{err}"
    );
    let ds = load_verification_dir(&t, OnBad::Skip).unwrap();
    assert_eq!(ds.trials.len(), 2);
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn fluent_speech_commands_csv_manifests_classify_intents() {
    use strata::train::data::load_audio_only;
    // FSC as it ships: data/*.csv, paths relative to the corpus root, pandas' index column.
    let root = scratch("fsc");
    std::fs::create_dir_all(root.join("wavs/speakers/s1")).unwrap();
    std::fs::create_dir_all(root.join("data")).unwrap();
    for name in ["a", "b", "c"] {
        wav(
            &root.join("wavs/speakers/s1"),
            &format!("{name}.wav"),
            8000,
            16000,
            1,
        );
    }
    let csv = root.join("data/train_data.csv");
    write(
        &root.join("data"),
        "train_data.csv",
        ",path,speakerId,transcription,action,object,location\n\
         0,wavs/speakers/s1/a.wav,s1,\"Turn on the lights, \"\"please\"\"\",activate,lights,none\n\
         1,wavs/speakers/s1/b.wav,s1,Bring me my shoes,bring,shoes,none\n\
         2,wavs/speakers/s1/c.wav,s1,Kitchen lights off,deactivate,lights,kitchen\n",
    );
    let ds = load_tsv(&csv, Task::Classification, OnBad::Fail).unwrap();
    assert_eq!(
        ids_and_classes(&ds),
        [
            ("wavs/speakers/s1/a.wav", "activate+lights+none"),
            ("wavs/speakers/s1/b.wav", "bring+shoes+none"),
            ("wavs/speakers/s1/c.wav", "deactivate+lights+kitchen"),
        ]
    );
    assert_eq!(ds.utterances[2].path, root.join("wavs/speakers/s1/c.wav"));
    assert_eq!(
        load_audio_only(&csv, OnBad::Fail).unwrap().utterances.len(),
        3
    );
    let err = load_tsv(&csv, Task::Characters, OnBad::Fail)
        .unwrap_err()
        .to_string();
    assert!(err.contains("for --task classify"), "{err}");
    write(
        &root.join("data"),
        "bad.csv",
        "path,action,object\nwavs/speakers/s1/a.wav,x,y\n",
    );
    let err = load_tsv(
        &root.join("data/bad.csv"),
        Task::Classification,
        OnBad::Fail,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("no 'location' column"), "{err}");
    std::fs::remove_dir_all(&root).ok();
}
