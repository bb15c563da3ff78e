//! The feature cache: every hidden state of a data set, extracted once by the frozen upstream and
//! stored as safetensors shards, so training can run many epochs without rerunning the upstream.
//!
//! A cache directory holds `shard-NNNNN.safetensors` files (one tensor per utterance, named by its
//! id, [frames, L, D], f16 or f32) and `index.json` (format, the upstream's identity, L, D, dtype,
//! input normalization, and each utterance's shard and frame count). Shards and the index are
//! written atomically, the index last, so a cache with an index is complete. Reading seeks to a
//! tensor's bytes (from the shard header), never loads a whole shard.

use crate::batch::PackedBatch;
use crate::error::{Error, Result};
use crate::models::upstream::Upstream;
use crate::tensor::{DType, Tensor};
use crate::train::data::Dataset;
use half::f16;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

const FORMAT: &str = "strata-features-1";
/// Audio per extraction batch and per shard (samples / stored bytes).
const BATCH_SAMPLES: usize = 16000 * 60;
const SHARD_BYTES: usize = 1 << 30;

fn io_err(path: &Path, detail: impl Into<String>) -> Error {
    Error::Io {
        path: path.display().to_string(),
        detail: detail.into(),
    }
}

/// What identifies an upstream's features: its config, as text (two caches of different models
/// never mix).
pub fn upstream_fingerprint(upstream: &Upstream) -> String {
    format!("{:?}", upstream.config)
}

/// Reads an utterance's audio, normalized when asked.
pub fn read_wave(path: &Path, normalize: bool) -> Result<Vec<f32>> {
    let w = crate::audio::read_audio(path)?;
    Ok(if normalize {
        crate::models::upstream::normalize_wave(&w)
    } else {
        w
    })
}

/// Runs `upstream` over every utterance of `ds` and writes the cache to `dir` (replacing an older
/// cache there). Returns the frames written.
pub fn extract_dataset(
    upstream: &Upstream,
    ds: &Dataset,
    dir: &Path,
    dtype: DType,
    normalize: bool,
    mut progress: impl FnMut(usize, usize),
) -> Result<usize> {
    if !matches!(dtype, DType::F32 | DType::F16) {
        return Err(Error::Config(
            "feature caches are stored as f32 or f16".into(),
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, format!("cannot create: {e}")))?;
    // An older cache's index goes first: shards are about to be replaced, and a crash midway must
    // leave "no cache" (extracted again next time), never an index over other shards.
    match std::fs::remove_file(dir.join("index.json")) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(io_err(
                dir,
                format!("cannot replace the old index.json: {e}"),
            ))
        }
        _ => {}
    }
    let samples: Vec<usize> = ds.utterances.iter().map(|u| u.samples).collect();
    let batches = crate::train::data::length_buckets(&samples, BATCH_SAMPLES, None);
    let (l, d) = (upstream.num_states(), upstream.hidden_size());
    let mut entries = Vec::new();
    let mut shard: Vec<(String, Tensor)> = Vec::new();
    let (mut shard_bytes, mut shard_no, mut frames) = (0usize, 0usize, 0usize);
    let flush = |shard: &mut Vec<(String, Tensor)>, no: usize| -> Result<()> {
        let named: Vec<(String, &Tensor)> = shard.iter().map(|(n, t)| (n.clone(), t)).collect();
        crate::io::save_safetensors_atomic(
            &dir.join(format!("shard-{no:05}.safetensors")),
            &named,
        )?;
        shard.clear();
        Ok(())
    };
    for (done, b) in batches.iter().enumerate() {
        let waves: Vec<Vec<f32>> = b
            .iter()
            .map(|&i| read_wave(&ds.utterances[i].path, normalize))
            .collect::<Result<_>>()?;
        let refs: Vec<&[f32]> = waves.iter().map(Vec::as_slice).collect();
        let names: Vec<&str> = b.iter().map(|&i| ds.utterances[i].id.as_str()).collect();
        let (stack, batch) = upstream.forward(&refs, &names)?;
        let data = stack.to_vec();
        for (k, &i) in b.iter().enumerate() {
            let (lo, hi) = (batch.offsets()[k], batch.offsets()[k + 1]);
            let t = Tensor::from_vec(data[lo * l * d..hi * l * d].to_vec(), &[hi - lo, l, d])?
                .to_dtype(dtype);
            shard_bytes += t.numel() * dtype.size_in_bytes();
            frames += hi - lo;
            entries.push(json!({"id": ds.utterances[i].id, "shard": shard_no, "frames": hi - lo}));
            shard.push((ds.utterances[i].id.clone(), t));
            if shard_bytes >= SHARD_BYTES {
                flush(&mut shard, shard_no)?;
                shard_no += 1;
                shard_bytes = 0;
            }
        }
        progress(done + 1, batches.len());
    }
    let shards = if shard.is_empty() {
        shard_no
    } else {
        flush(&mut shard, shard_no)?;
        shard_no + 1
    };
    let index = json!({
        "format": FORMAT,
        "upstream": upstream_fingerprint(upstream),
        "layers": l,
        "dim": d,
        "dtype": if dtype == DType::F16 { "f16" } else { "f32" },
        "normalize": normalize,
        "shards": shards,
        "utterances": entries,
    });
    let tmp = dir.join("index.json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&index).expect("json"))
        .and_then(|_| std::fs::rename(&tmp, dir.join("index.json")))
        .map_err(|e| io_err(dir, format!("cannot write index.json: {e}")))?;
    Ok(frames)
}

/// Where one utterance's tensor lies.
struct Entry {
    shard: usize,
    frames: usize,
    /// Byte range in the shard file.
    start: u64,
    end: u64,
    f16: bool,
}

/// An opened cache.
pub struct FeatureCache {
    pub dir: PathBuf,
    pub layers: usize,
    pub dim: usize,
    pub upstream: String,
    pub normalize: bool,
    entries: HashMap<String, Entry>,
}

/// The (header length, header JSON) of a safetensors file.
fn shard_header(path: &Path) -> Result<(u64, Value)> {
    let mut f = std::fs::File::open(path).map_err(|e| io_err(path, format!("cannot open: {e}")))?;
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .map_err(|e| io_err(path, format!("not a safetensors file: {e}")))?;
    let n = u64::from_le_bytes(n);
    if n > 100 << 20 {
        return Err(io_err(path, "not a safetensors file (header too large)"));
    }
    let mut h = vec![0u8; n as usize];
    f.read_exact(&mut h)
        .map_err(|e| io_err(path, format!("truncated safetensors header: {e}")))?;
    let v = serde_json::from_slice(&h)
        .map_err(|e| io_err(path, format!("damaged safetensors header: {e}")))?;
    Ok((8 + n, v))
}

impl FeatureCache {
    /// Frames of utterance `id` (None: not in the cache).
    pub fn frames(&self, id: &str) -> Option<usize> {
        self.entries.get(id).map(|e| e.frames)
    }

    /// Utterances held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn exists(dir: &Path) -> bool {
        dir.join("index.json").is_file()
    }

    pub fn open(dir: &Path) -> Result<Self> {
        let ip = dir.join("index.json");
        let bad = |what: &str| {
            io_err(
                &ip,
                format!(
                    "{what}: the feature cache is damaged; delete {} and extract again",
                    dir.display()
                ),
            )
        };
        let text = std::fs::read_to_string(&ip).map_err(|e| {
            io_err(
                &ip,
                format!(
                    "cannot read ({e}): is {} a feature cache made by `strata extract --data`?",
                    dir.display()
                ),
            )
        })?;
        let v: Value = serde_json::from_str(&text).map_err(|_| bad("not valid JSON"))?;
        if v["format"] != FORMAT {
            return Err(bad(&format!(
                "format is {}, expected {FORMAT}",
                v["format"]
            )));
        }
        let num = |k: &str| {
            v[k].as_u64()
                .map(|x| x as usize)
                .ok_or_else(|| bad(&format!("no '{k}'")))
        };
        let (layers, dim, shards) = (num("layers")?, num("dim")?, num("shards")?);
        let f16 = match v["dtype"].as_str() {
            Some("f16") => true,
            Some("f32") => false,
            _ => return Err(bad("dtype is neither f16 nor f32")),
        };
        let width = if f16 { 2 } else { 4 };
        let mut offsets: Vec<HashMap<String, (u64, u64)>> = Vec::new();
        for s in 0..shards {
            let path = dir.join(format!("shard-{s:05}.safetensors"));
            let (base, header) = shard_header(&path)?;
            let map = header
                .as_object()
                .ok_or_else(|| bad("a shard header is not an object"))?
                .iter()
                .filter(|(k, _)| *k != "__metadata__")
                .map(|(k, t)| {
                    let o = &t["data_offsets"];
                    match (o[0].as_u64(), o[1].as_u64()) {
                        (Some(a), Some(b)) if a <= b => Ok((k.clone(), (base + a, base + b))),
                        _ => Err(bad(&format!("tensor '{k}' has no data offsets"))),
                    }
                })
                .collect::<Result<_>>()?;
            offsets.push(map);
        }
        let mut entries = HashMap::new();
        for u in v["utterances"]
            .as_array()
            .ok_or_else(|| bad("no utterance list"))?
        {
            let (Some(id), Some(shard), Some(frames)) =
                (u["id"].as_str(), u["shard"].as_u64(), u["frames"].as_u64())
            else {
                return Err(bad("an utterance entry lacks id, shard or frames"));
            };
            let (shard, frames) = (shard as usize, frames as usize);
            let &(start, end) = offsets
                .get(shard)
                .and_then(|m| m.get(id))
                .ok_or_else(|| bad(&format!("utterance '{id}' is not in its shard")))?;
            if end - start != (frames * layers * dim * width) as u64 {
                return Err(bad(&format!("utterance '{id}' has the wrong byte size")));
            }
            entries.insert(
                id.to_string(),
                Entry {
                    shard,
                    frames,
                    start,
                    end,
                    f16,
                },
            );
        }
        Ok(FeatureCache {
            dir: dir.to_path_buf(),
            layers,
            dim,
            upstream: v["upstream"].as_str().unwrap_or("").to_string(),
            normalize: v["normalize"].as_bool().unwrap_or(false),
            entries,
        })
    }

    /// Errors unless every utterance of `ds` is in the cache.
    pub fn covers(&self, ds: &Dataset) -> Result<()> {
        match ds.utterances.iter().find(|u| !self.entries.contains_key(&u.id)) {
            None => Ok(()),
            Some(u) => Err(io_err(
                &self.dir,
                format!(
                    "the feature cache has no utterance '{}': it was extracted from other data; delete it to extract again",
                    u.id
                ),
            )),
        }
    }

    /// The packed f32 stack of utterances `ids`, in order.
    pub fn stack(&self, ids: &[&str]) -> Result<(Tensor, PackedBatch)> {
        let (l, d) = (self.layers, self.dim);
        let mut data = Vec::new();
        let mut lengths = Vec::new();
        let mut open: Option<(usize, std::fs::File)> = None;
        for id in ids {
            let e = self.entries.get(*id).ok_or_else(|| {
                io_err(
                    &self.dir,
                    format!("the feature cache has no utterance '{id}'"),
                )
            })?;
            let path = self.dir.join(format!("shard-{:05}.safetensors", e.shard));
            if open.as_ref().map(|o| o.0) != Some(e.shard) {
                let f = std::fs::File::open(&path)
                    .map_err(|err| io_err(&path, format!("cannot open: {err}")))?;
                open = Some((e.shard, f));
            }
            let f = &mut open.as_mut().expect("just opened").1;
            let mut bytes = vec![0u8; (e.end - e.start) as usize];
            f.seek(SeekFrom::Start(e.start))
                .and_then(|_| f.read_exact(&mut bytes))
                .map_err(|err| {
                    io_err(
                        &path,
                        format!("truncated shard ({err}): delete the cache and extract again"),
                    )
                })?;
            if e.f16 {
                data.extend(
                    bytes
                        .chunks_exact(2)
                        .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()),
                );
            } else {
                data.extend(
                    bytes
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                );
            }
            lengths.push(e.frames);
        }
        let batch = PackedBatch::from_lengths(&lengths)?;
        Ok((
            Tensor::from_vec(data, &[batch.total_frames(), l, d])?,
            batch,
        ))
    }
}

/// Where a training run's hidden states come from.
pub enum StackSource<'a> {
    /// Run the upstream on each batch's audio (normalized when the flag says so).
    Upstream(&'a Upstream, bool),
    /// Read them from a feature cache of the data set.
    Cache(&'a FeatureCache),
}

impl StackSource<'_> {
    pub fn num_states(&self) -> usize {
        match self {
            StackSource::Upstream(u, _) => u.num_states(),
            StackSource::Cache(c) => c.layers,
        }
    }
    pub fn hidden_size(&self) -> usize {
        match self {
            StackSource::Upstream(u, _) => u.hidden_size(),
            StackSource::Cache(c) => c.dim,
        }
    }

    /// Upstream frames of utterance `i` of `ds`.
    pub fn frames_of(&self, ds: &Dataset, i: usize) -> Result<usize> {
        let u = &ds.utterances[i];
        match self {
            StackSource::Upstream(up, _) => Ok(up.config.num_frames(u.samples)),
            StackSource::Cache(c) => c.frames(&u.id).ok_or_else(|| {
                Error::value(
                    "feature cache",
                    format!(
                        "{} holds no states for '{}': extract the data set again",
                        c.dir.display(),
                        u.id
                    ),
                )
            }),
        }
    }

    /// The stack of utterances `idx` of `ds`.
    pub fn stack(&self, ds: &Dataset, idx: &[usize]) -> Result<(Tensor, PackedBatch)> {
        let names: Vec<&str> = idx.iter().map(|&i| ds.utterances[i].id.as_str()).collect();
        match self {
            StackSource::Upstream(up, normalize) => {
                let waves: Vec<Vec<f32>> = idx
                    .iter()
                    .map(|&i| read_wave(&ds.utterances[i].path, *normalize))
                    .collect::<Result<_>>()?;
                let refs: Vec<&[f32]> = waves.iter().map(Vec::as_slice).collect();
                up.forward(&refs, &names)
            }
            StackSource::Cache(c) => c.stack(&names),
        }
    }

    /// [`StackSource::stack`] of a (start, length) window of each utterance's audio (samples).
    /// Only the upstream can: a cache holds the states of whole utterances.
    pub fn stack_cropped(
        &self,
        ds: &Dataset,
        idx: &[usize],
        windows: &[(usize, usize)],
    ) -> Result<(Tensor, PackedBatch)> {
        let StackSource::Upstream(up, normalize) = self else {
            return Err(Error::Config(
                "a feature cache cannot crop utterances: run the upstream on each batch".into(),
            ));
        };
        let names: Vec<&str> = idx.iter().map(|&i| ds.utterances[i].id.as_str()).collect();
        let mut waves = Vec::with_capacity(idx.len());
        for (&i, &(start, len)) in idx.iter().zip(windows) {
            // The upstream's input normalization sees the crop, as it would in s3prl.
            let wave = read_wave(&ds.utterances[i].path, false)?;
            let crop = wave.get(start..start + len).ok_or_else(|| {
                Error::value(
                    "training crop",
                    format!(
                        "'{}': samples {start}..{} of {}: the file changed since it was checked",
                        ds.utterances[i].id,
                        start + len,
                        wave.len()
                    ),
                )
            })?;
            waves.push(if *normalize {
                crate::models::upstream::normalize_wave(crop)
            } else {
                crop.to_vec()
            });
        }
        let refs: Vec<&[f32]> = waves.iter().map(Vec::as_slice).collect();
        up.forward(&refs, &names)
    }
}
