//! Audio input: FLAC decodes to exactly the samples of the same audio as WAV (16- and 24-bit,
//! fixtures written by libsndfile: tools/gen_audio_fixtures.py); the format is read from the
//! file's first bytes; bad files (8 kHz, stereo, truncated anywhere, not audio) are errors that
//! name the file and the fix, never fewer samples than the header promised.

use std::path::{Path, PathBuf};
use strata::audio::{audio_samples, read_audio};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/audio")
        .join(name)
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("strata-audio-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn flac_reads_as_the_same_samples_as_wav() {
    for depth in ["pcm16", "pcm24"] {
        let flac = read_audio(&fixture(&format!("{depth}.flac"))).unwrap();
        let wav = read_audio(&fixture(&format!("{depth}.wav"))).unwrap();
        assert_eq!(flac.len(), 8000, "{depth}");
        let differ = flac
            .iter()
            .zip(&wav)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(differ, 0, "{depth}: samples that differ from the WAV's");
        assert_eq!(
            audio_samples(&fixture(&format!("{depth}.flac"))).unwrap(),
            8000
        );
        // Scaled as soundfile reads it: the largest sample well inside [-1, 1), not integers.
        let peak = flac.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(peak > 0.3 && peak < 1.0, "{depth}: peak {peak}");
    }
}

#[test]
fn the_format_comes_from_the_first_bytes_not_the_name() {
    let d = scratch("names");
    let renamed = d.join("actually_flac.wav");
    std::fs::copy(fixture("pcm16.flac"), &renamed).unwrap();
    assert_eq!(
        read_audio(&renamed).unwrap(),
        read_audio(&fixture("pcm16.wav")).unwrap()
    );
    for (name, bytes) in [
        ("text.flac", b"hello, not audio".as_slice()),
        ("empty.wav", b"".as_slice()),
    ] {
        std::fs::write(d.join(name), bytes).unwrap();
        let err = read_audio(&d.join(name)).unwrap_err().to_string();
        assert!(
            err.contains(name) && err.contains("not a readable WAV or FLAC file"),
            "{err}"
        );
    }
}

#[test]
fn flac_that_is_not_16khz_mono_is_an_error_with_the_fix() {
    for (name, needle) in [
        ("narrow.flac", "sample rate is 8000 Hz"),
        ("stereo.flac", "has 2 channels"),
    ] {
        for err in [
            read_audio(&fixture(name)).unwrap_err().to_string(),
            audio_samples(&fixture(name)).unwrap_err().to_string(),
        ] {
            assert!(
                err.contains(name) && err.contains(needle) && err.contains("out.flac"),
                "{err}"
            );
        }
    }
}

#[test]
fn truncated_flac_is_an_error_wherever_it_is_cut() {
    let d = scratch("truncated");
    let bytes = std::fs::read(fixture("pcm16.flac")).unwrap();
    let cut = d.join("cut.flac");
    // Mid-frame, and in the header.
    for at in [bytes.len() * 2 / 3, bytes.len() - 3, 30] {
        std::fs::write(&cut, &bytes[..at]).unwrap();
        let err = read_audio(&cut).unwrap_err().to_string();
        assert!(
            err.contains("cut.flac") && err.contains("FLAC"),
            "cut at {at}: {err}"
        );
    }
    // At a frame boundary (a frame starts with the sync code 0xFFF8 after the metadata): the
    // decoder ends there without complaint, so the header's sample count must catch it.
    let mut by_count = 0;
    for at in (42..bytes.len() - 1).filter(|&i| bytes[i] == 0xff && bytes[i + 1] == 0xf8) {
        std::fs::write(&cut, &bytes[..at]).unwrap();
        let err = read_audio(&cut)
            .expect_err("a FLAC cut short must not read")
            .to_string();
        by_count += err.contains("of the 8000 samples") as usize;
    }
    assert!(
        by_count > 0,
        "no cut at a frame boundary was found by the count"
    );
}

#[test]
fn a_data_dir_takes_flac_utterances() {
    use strata::train::data::{load_kaldi_dir, OnBad, Task};
    let d = scratch("kaldi");
    std::fs::copy(fixture("pcm16.flac"), d.join("a.flac")).unwrap();
    std::fs::copy(fixture("pcm24.wav"), d.join("b.wav")).unwrap();
    std::fs::write(d.join("wav.scp"), "a a.flac\nb b.wav\n").unwrap();
    std::fs::write(d.join("text"), "a h i\nb y o\n").unwrap();
    let ds = load_kaldi_dir(&d, Task::Units, OnBad::Fail).unwrap();
    let lengths: Vec<usize> = ds.utterances.iter().map(|u| u.samples).collect();
    assert_eq!(lengths, [8000, 8000]);
    assert_eq!(
        strata::train::features::read_wave(&ds.utterances[0].path, false).unwrap(),
        read_audio(&fixture("pcm16.wav")).unwrap()
    );

    // Kaldi's and ESPnet's LibriSpeech wav.scp: a flac decode to stdout per utterance, read as
    // its file (strata runs no commands).
    let abs = d.join("a.flac").display().to_string();
    for entry in [
        "flac -c -d -s a.flac |".to_string(),
        format!("/usr/bin/flac -cds {abs} |"),
        "flac --decode --stdout --silent a.flac|".to_string(),
    ] {
        std::fs::write(d.join("wav.scp"), format!("a {entry}\nb b.wav\n")).unwrap();
        let ds = load_kaldi_dir(&d, Task::Units, OnBad::Fail).unwrap();
        assert_eq!(ds.utterances[0].path, d.join("a.flac"), "{entry}");
        assert_eq!(ds.utterances[0].samples, 8000, "{entry}");
    }
    // Anything else with a pipe is a command: an error naming the utterance (encoding to stdout,
    // another program, two files, a file that is not FLAC).
    for entry in [
        "flac -c a.flac |",
        "sox a.flac -t wav - |",
        "flac -c -d a.flac b.flac |",
        "flac -c -d -s b.wav |",
        "flac -c -d -s --totally-silent a.flac |",
    ] {
        std::fs::write(d.join("wav.scp"), format!("a {entry}\nb b.wav\n")).unwrap();
        let err = load_kaldi_dir(&d, Task::Units, OnBad::Fail)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("utterance 'a'") && err.contains("runs no commands"),
            "{entry}: {err}"
        );
    }
}

#[test]
fn a_librispeech_folder_as_it_ships_is_a_data_set() {
    use strata::train::data::{load_audio_only, load_kaldi_dir, OnBad, Task};
    // root/SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt beside SPEAKER-CHAPTER-UTT.flac.
    let root = scratch("librispeech").join("dev-clean");
    let chapter = |spk: &str, ch: &str, lines: &[(&str, &str, &str)]| {
        let d = root.join(spk).join(ch);
        std::fs::create_dir_all(&d).unwrap();
        let mut text = String::new();
        for (utt, words, audio) in lines {
            std::fs::copy(fixture(audio), d.join(format!("{utt}.flac"))).unwrap();
            text.push_str(&format!("{utt} {words}\n"));
        }
        std::fs::write(d.join(format!("{spk}-{ch}.trans.txt")), text).unwrap();
    };
    chapter(
        "19",
        "198",
        &[
            ("19-198-0001", "THE WORLD", "pcm24.flac"),
            ("19-198-0000", "HELLO WORLD", "pcm16.flac"),
        ],
    );
    chapter("26", "495", &[("26-495-0000", "IT'S", "pcm16.flac")]);
    let ds = load_kaldi_dir(&root, Task::Characters, OnBad::Fail).unwrap();
    let got: Vec<(String, String, usize)> = ds
        .utterances
        .iter()
        .map(|u| (u.id.clone(), u.label.concat(), u.samples))
        .collect();
    assert_eq!(
        got,
        [
            ("19-198-0001".to_string(), "THE|WORLD".to_string(), 8000),
            ("19-198-0000".to_string(), "HELLO|WORLD".to_string(), 8000),
            ("26-495-0000".to_string(), "IT'S".to_string(), 8000),
        ]
    );
    let words = load_kaldi_dir(&root, Task::Units, OnBad::Fail).unwrap();
    assert_eq!(words.utterances[1].label, ["HELLO", "WORLD"]);
    assert_eq!(
        load_audio_only(&root, OnBad::Fail)
            .unwrap()
            .utterances
            .len(),
        3
    );
    let err = load_kaldi_dir(&root, Task::Classification, OnBad::Fail)
        .unwrap_err()
        .to_string();
    assert!(err.contains("LibriSpeech folder"), "{err}");
    // A transcript line without its audio names the utterance, or is skipped.
    std::fs::remove_file(root.join("26/495/26-495-0000.flac")).unwrap();
    let err = load_kaldi_dir(&root, Task::Characters, OnBad::Fail)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("'26-495-0000'") && err.contains("cannot open"),
        "{err}"
    );
    let ds = load_kaldi_dir(&root, Task::Characters, OnBad::Skip).unwrap();
    assert_eq!((ds.utterances.len(), ds.skipped.len()), (2, 1));
    // Neither layout: the message says what a data folder holds.
    let empty = scratch("neither");
    let err = load_kaldi_dir(&empty, Task::Units, OnBad::Fail)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no wav.scp") && err.contains("trans.txt"),
        "{err}"
    );
    std::fs::remove_dir_all(root.parent().unwrap()).ok();
}
