//! Audio input: 16 kHz mono WAV (PCM 8/16/24/32-bit or 32-bit float, read with `hound`) or FLAC
//! (any bit depth, read with `claxon`: LibriSpeech, and so SUPERB's PR and ASR, ships FLAC), told
//! apart by their first bytes. Anything else is an error that names the file and says how to
//! convert it.

use crate::error::{Error, Result};
use std::io::Read;
use std::path::Path;

pub const SAMPLE_RATE: u32 = 16_000;

/// The file formats strata reads, by their magic bytes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Container {
    Wav,
    Flac,
}

/// An `Error::Io` naming `path`.
fn io_error(path: &Path, detail: String) -> Error {
    Error::Io {
        path: path.display().to_string(),
        detail,
    }
}

/// WAV ("RIFF") or FLAC ("fLaC") by the file's first four bytes, whatever its name says.
fn container_of(path: &Path) -> Result<Container> {
    let io = |detail: String| io_error(path, detail);
    let mut file = std::fs::File::open(path).map_err(|e| io(format!("cannot open: {e}")))?;
    let mut magic = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match file.read(&mut magic[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io(format!("cannot read: {e}"))),
        }
    }
    match &magic[..got] {
        b"RIFF" => Ok(Container::Wav),
        b"fLaC" => Ok(Container::Flac),
        _ => Err(io(
            "not a readable WAV or FLAC file (neither a RIFF nor a fLaC header; truncated, or \
             another format: convert with sox or ffmpeg to 16 kHz mono WAV or FLAC)"
                .into(),
        )),
    }
}

/// The 16 kHz mono checks, with the sox line that converts the file (to its own format).
fn check_layout(path: &Path, sample_rate: u32, channels: u32) -> Result<()> {
    let p = path.display().to_string();
    let ext = match path.extension().and_then(|e| e.to_str()) {
        Some(e) if e.eq_ignore_ascii_case("flac") => "flac",
        _ => "wav",
    };
    if sample_rate != SAMPLE_RATE {
        return Err(io_error(
            path,
            format!(
                "sample rate is {sample_rate} Hz; strata needs 16 kHz audio \
                 (convert: sox {p} -r 16000 out.{ext})"
            ),
        ));
    }
    if channels != 1 {
        return Err(io_error(
            path,
            format!(
                "has {channels} channels; strata needs mono audio (convert: sox {p} -c 1 out.{ext})"
            ),
        ));
    }
    Ok(())
}

/// Opens a WAV file and checks it is 16 kHz mono; errors name the file and the fix.
fn open_wav(path: &Path) -> Result<hound::WavReader<std::io::BufReader<std::fs::File>>> {
    let io = |detail: String| io_error(path, detail);
    // Opened here, not by hound, so that a file that cannot be opened and one whose bytes are not
    // a WAV header (hound reports both as I/O errors) get different messages.
    let file = std::fs::File::open(path).map_err(|e| io(format!("cannot open: {e}")))?;
    let reader = hound::WavReader::new(std::io::BufReader::new(file)).map_err(|e| match e {
        hound::Error::IoError(e) => io(format!(
            "not a readable WAV file: {e} (truncated, or not a WAV file)"
        )),
        other => io(format!("not a readable WAV file: {other}")),
    })?;
    let spec = reader.spec();
    check_layout(path, spec.sample_rate, spec.channels as u32)?;
    Ok(reader)
}

/// Opens a FLAC file and checks it is 16 kHz mono, as [`open_wav`].
fn open_flac(path: &Path) -> Result<claxon::FlacReader<std::fs::File>> {
    let reader = claxon::FlacReader::open(path)
        .map_err(|e| io_error(path, format!("not a readable FLAC file: {e}")))?;
    let info = reader.streaminfo();
    check_layout(path, info.sample_rate, info.channels)?;
    Ok(reader)
}

/// A 16 kHz mono WAV or FLAC file's samples scaled to [-1, 1) as soundfile / torchaudio do
/// (integer samples divided by 2^(bits-1)). A file that ends before the sample count its header
/// gives is an error, as are NaN or Inf samples.
pub fn read_audio(path: &Path) -> Result<Vec<f32>> {
    let samples = match container_of(path)? {
        Container::Wav => read_wav(path)?,
        Container::Flac => read_flac(path)?,
    };
    if let Some(i) = samples.iter().position(|x| !x.is_finite()) {
        return Err(io_error(path, format!("has NaN or Inf at sample {i}")));
    }
    Ok(samples)
}

fn read_wav(path: &Path) -> Result<Vec<f32>> {
    let io = |detail: String| io_error(path, detail);
    let reader = open_wav(path)?;
    let spec = reader.spec();
    let samples: std::result::Result<Vec<f32>, hound::Error> = match spec.sample_format {
        hound::SampleFormat::Float if spec.bits_per_sample == 32 => {
            reader.into_samples::<f32>().collect()
        }
        hound::SampleFormat::Int if (1..=32).contains(&spec.bits_per_sample) => {
            let scale = 1.0 / (1u64 << (spec.bits_per_sample - 1)) as f64;
            reader
                .into_samples::<i32>()
                .map(|s| s.map(|v| (v as f64 * scale) as f32))
                .collect()
        }
        _ => {
            return Err(io(format!(
                "{}-bit {:?} samples are not supported: use PCM or 32-bit float",
                spec.bits_per_sample, spec.sample_format
            )))
        }
    };
    samples.map_err(|e| io(format!("damaged WAV data: {e}")))
}

fn read_flac(path: &Path) -> Result<Vec<f32>> {
    let io = |detail: String| io_error(path, detail);
    let mut reader = open_flac(path)?;
    let info = reader.streaminfo();
    if !(1..=32).contains(&info.bits_per_sample) {
        return Err(io(format!(
            "{}-bit FLAC samples are not supported",
            info.bits_per_sample
        )));
    }
    let scale = 1.0 / (1u64 << (info.bits_per_sample - 1)) as f64;
    let mut samples = Vec::with_capacity(info.samples.unwrap_or(0) as usize);
    let mut blocks = reader.blocks();
    let mut buffer = Vec::new();
    loop {
        let block = blocks
            .read_next_or_eof(buffer)
            .map_err(|e| io(format!("damaged FLAC data: {e}")))?;
        let Some(block) = block else { break };
        samples.extend(block.channel(0).iter().map(|&v| (v as f64 * scale) as f32));
        buffer = block.into_buffer();
    }
    // The decoder stops quietly where the data stops at a frame boundary: a file cut there is
    // found by the count its header promised.
    if let Some(total) = info.samples {
        if (samples.len() as u64) < total {
            return Err(io(format!(
                "damaged FLAC data: {} of the {total} samples its header gives (truncated?)",
                samples.len()
            )));
        }
    }
    Ok(samples)
}

/// The duration of a 16 kHz mono WAV or FLAC file in samples, from its header (no samples read;
/// a FLAC header without the count: decoded), with the same checks as [`read_audio`].
pub fn audio_samples(path: &Path) -> Result<usize> {
    match container_of(path)? {
        Container::Wav => Ok(open_wav(path)?.duration() as usize),
        Container::Flac => match open_flac(path)?.streaminfo().samples {
            Some(n) => Ok(n as usize),
            None => Ok(read_flac(path)?.len()),
        },
    }
}

/// Writes 16 kHz mono PCM16 (for tests and synthetic corpora).
pub fn write_wav_pcm16(path: &Path, samples: &[f32]) -> Result<()> {
    let p = path.display().to_string();
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: SAMPLE_RATE,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let err = |e: hound::Error| Error::Io {
        path: p.clone(),
        detail: format!("cannot write WAV: {e}"),
    };
    let mut w = hound::WavWriter::create(path, spec).map_err(err)?;
    for &s in samples {
        w.write_sample((s.clamp(-1.0, 1.0) * 32767.0).round() as i16)
            .map_err(err)?;
    }
    w.finalize().map_err(err)
}
