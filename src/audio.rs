//! WAV input: 16 kHz mono, PCM (8/16/24/32-bit) or 32-bit float, read with `hound`. Anything else
//! is an error that names the file and says how to convert it.

use crate::error::{Error, Result};
use std::path::Path;

pub const SAMPLE_RATE: u32 = 16_000;

/// Opens a WAV file and checks it is 16 kHz mono; errors name the file and the fix.
fn open_checked(path: &Path) -> Result<hound::WavReader<std::io::BufReader<std::fs::File>>> {
    let p = path.display().to_string();
    let io = |detail: String| Error::Io {
        path: p.clone(),
        detail,
    };
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
    if spec.sample_rate != SAMPLE_RATE {
        return Err(io(format!(
            "sample rate is {} Hz; strata needs 16 kHz audio (convert: sox {p} -r 16000 out.wav)",
            spec.sample_rate
        )));
    }
    if spec.channels != 1 {
        return Err(io(format!(
            "has {} channels; strata needs mono audio (convert: sox {p} -c 1 out.wav)",
            spec.channels
        )));
    }
    Ok(reader)
}

/// Samples scaled to [-1, 1) as soundfile / torchaudio do (PCM divided by 2^(bits-1)).
pub fn read_wav(path: &Path) -> Result<Vec<f32>> {
    let p = path.display().to_string();
    let io = |detail: String| Error::Io {
        path: p.clone(),
        detail,
    };
    let reader = open_checked(path)?;
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
    let samples = samples.map_err(|e| io(format!("damaged WAV data: {e}")))?;
    if let Some(i) = samples.iter().position(|x| !x.is_finite()) {
        return Err(io(format!("has NaN or Inf at sample {i}")));
    }
    Ok(samples)
}

/// The duration of a WAV file in samples, from its header (no samples read), with the same
/// 16 kHz mono checks as [`read_wav`].
pub fn wav_samples(path: &Path) -> Result<usize> {
    let reader = open_checked(path)?;
    Ok(reader.duration() as usize)
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
