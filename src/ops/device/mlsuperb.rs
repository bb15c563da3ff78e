//! Launchers for the ML-SUPERB head's own kernels: the im2col patches of its two convolutions and
//! their adjoint (kernels/conv2d.cu), each utterance minus its mean (kernels/pooling.cu), and the
//! per-frame glue of kernels/mlsuperb.cu (SpecAugment's time warp and masks, the scaled positional
//! encoding). CPU references: `ops::conv2d`, `ops::pooling::center`, `ops::resample`,
//! `models::mlsuperb_head::{specaug_spans, positions}`.

use super::{launch_elementwise, need, pool_params, rows_check};
use crate::batch::PackedBatch;
use crate::error::{Error, Result};
use crate::models::mlsuperb_head::{position_rates, MaskedSpans};
use crate::ops::conv2d::{out_offsets, PatchGeom};
use crate::ops::resample::Taps;
use crate::runtime::kernels::{
    CenterParams, PatchParams, PositionsParams, RowMixParams, SpecMaskParams,
};
use crate::runtime::{Backend, Buf};
use half::bf16;

/// Each utterance's frames minus its mean frame: x fp32 [frames, c] (self-adjoint: also the
/// backward, applied to dy).
pub fn utterance_center(
    be: &Backend,
    x: &Buf<f32>,
    batch: &PackedBatch,
    c: usize,
) -> Result<Buf<f32>> {
    const K: &str = "utterance_center";
    let (offsets, u, frames) = pool_params(be, K, batch, c)?;
    need(be, K, "x", x, frames * c)?;
    let y = be.output::<f32>(frames * c)?;
    let p = CenterParams {
        x: be.ptr(x),
        y: be.ptr(&y),
        offsets: be.ptr(&offsets),
        utterances: u as i32,
        c: c as i32,
    };
    // A block of 8 warps per utterance and 32 channels (kernels/pooling.cu).
    let blocks = super::pool_channel_blocks(K, c)?;
    be.launch(K, (u as u32, blocks, 1), (256, 1, 1), 0, &p)?;
    Ok(y)
}

/// A convolution's patch geometry checked against a batch: the output batch and feature positions.
fn patch_shape(k: &str, batch: &PackedBatch, g: &PatchGeom) -> Result<(PackedBatch, usize)> {
    let outs = out_offsets(batch.offsets(), g).ok_or_else(|| {
        Error::shape(
            k,
            format!(
                "utterances of at least {} frames and {} features",
                g.kernel, g.kernel
            ),
            format!(
                "lengths {:?}, {} features, stride {}",
                batch.lengths(),
                g.freq,
                g.stride
            ),
        )
    })?;
    let lengths: Vec<usize> = outs.windows(2).map(|w| w[1] - w[0]).collect();
    let out_freq = g.out_len(g.freq).unwrap_or(0);
    Ok((PackedBatch::from_lengths(&lengths)?, out_freq))
}

/// The launch parameters of both patch kernels (pointers to fill in by the caller).
fn patch_params(
    be: &Backend,
    k: &str,
    batch: &PackedBatch,
    out: &PackedBatch,
    g: &PatchGeom,
    out_freq: usize,
) -> Result<(PatchParams, Buf<i32>, Buf<i32>)> {
    let (in_off, u, frames) = pool_params(be, k, batch, g.freq * g.channels)?;
    let (out_off, _, out_frames) = pool_params(be, k, out, g.patch_width())?;
    rows_check(k, out_frames * out_freq, g.patch_width())?;
    let p = PatchParams {
        x: 0,
        patches: 0,
        dpatches: 0,
        dx: 0,
        in_offsets: be.ptr(&in_off),
        out_offsets: be.ptr(&out_off),
        utterances: u as i32,
        frames: frames as i32,
        out_frames: out_frames as i32,
        freq: g.freq as i32,
        out_freq: out_freq as i32,
        c: g.channels as i32,
        k: g.kernel as i32,
        stride: g.stride as i32,
    };
    Ok((p, in_off, out_off))
}

/// im2col: x bf16 [frames, freq, c] of `batch` -> (patches bf16 [frames' * freq', k * k * c], the
/// batch of frames'), as `ops::conv2d::patches_forward`.
pub fn conv2d_patches(
    be: &Backend,
    x: &Buf<bf16>,
    batch: &PackedBatch,
    g: &PatchGeom,
) -> Result<(Buf<bf16>, PackedBatch)> {
    const K: &str = "conv2d_patches";
    let (out, out_freq) = patch_shape(K, batch, g)?;
    let (mut p, _in_off, _out_off) = patch_params(be, K, batch, &out, g, out_freq)?;
    need(be, K, "x", x, batch.total_frames() * g.freq * g.channels)?;
    let n = out.total_frames() * out_freq * g.patch_width();
    let patches = be.output::<bf16>(n)?;
    (p.x, p.patches) = (be.ptr(x), be.ptr(&patches));
    // A warp per patch row, 8 rows a block (kernels/conv2d.cu).
    let rows = out.total_frames() * out_freq;
    be.launch(
        K,
        (rows.div_ceil(8).min(65535) as u32, 1, 1),
        (256, 1, 1),
        0,
        &p,
    )?;
    Ok((patches, out))
}

/// The adjoint of [`conv2d_patches`]: the patches' gradient (bf16, as the Linear backward gives
/// it) summed back into x's, fp32 [frames, freq, c].
pub fn conv2d_patches_adjoint(
    be: &Backend,
    dpatches: &Buf<bf16>,
    batch: &PackedBatch,
    g: &PatchGeom,
) -> Result<Buf<f32>> {
    const K: &str = "conv2d_patches_adjoint";
    let (out, out_freq) = patch_shape(K, batch, g)?;
    let (mut p, _in_off, _out_off) = patch_params(be, K, batch, &out, g, out_freq)?;
    need(
        be,
        K,
        "dpatches",
        dpatches,
        out.total_frames() * out_freq * g.patch_width(),
    )?;
    let n = batch.total_frames() * g.freq * g.channels;
    let dx = be.output::<f32>(n)?;
    (p.dpatches, p.dx) = (be.ptr(dpatches), be.ptr(&dx));
    // A thread per 8 channels where they come 16 bytes at a time (kernels/conv2d.cu).
    let vec = if g.channels.is_multiple_of(8) { 8 } else { 1 };
    launch_elementwise(be, K, n / vec, &p)?;
    Ok(dx)
}

/// A row mix as CSR on the device: output row r is sum over its taps of w * x[src].
struct Csr {
    row_ptr: Buf<i32>,
    src: Buf<i32>,
    w: Buf<f32>,
    rows: usize,
}

impl Csr {
    fn upload(be: &Backend, rows: &[Vec<(usize, f32)>]) -> Result<Self> {
        let mut row_ptr = vec![0i32];
        let (mut src, mut w) = (Vec::new(), Vec::new());
        for r in rows {
            for &(s, x) in r {
                src.push(s as i32);
                w.push(x);
            }
            row_ptr.push(src.len() as i32);
        }
        // An empty buffer is refused by some backends: keep one unused tap.
        if src.is_empty() {
            (src, w) = (vec![0], vec![0.0]);
        }
        Ok(Csr {
            row_ptr: be.upload(&row_ptr)?,
            src: be.upload(&src)?,
            w: be.upload(&w)?,
            rows: rows.len(),
        })
    }

    fn apply(&self, be: &Backend, x: &Buf<f32>, in_rows: usize, c: usize) -> Result<Buf<f32>> {
        const K: &str = "row_mix";
        rows_check(K, self.rows.max(in_rows), c)?;
        need(be, K, "x", x, in_rows * c)?;
        let y = be.output::<f32>(self.rows * c)?;
        let p = RowMixParams {
            x: be.ptr(x),
            y: be.ptr(&y),
            row_ptr: be.ptr(&self.row_ptr),
            src: be.ptr(&self.src),
            w: be.ptr(&self.w),
            rows: self.rows as i64,
            c: c as i32,
        };
        launch_elementwise(be, K, self.rows * c, &p)?;
        Ok(y)
    }
}

/// SpecAugment's time warp on the device: the CPU's taps (`mlsuperb_head::time_warp`) and their
/// transpose (each input frame's (output frame, weight) list, in output order: the order in which
/// the CPU's backward adds them), uploaded once per step.
pub struct DeviceTimeWarp {
    forward: Csr,
    backward: Csr,
}

impl DeviceTimeWarp {
    /// Taps of the rows of an input of `in_rows` frames.
    pub fn upload(be: &Backend, taps: &[Taps], in_rows: usize) -> Result<Self> {
        if let Some(&(f, _)) = taps.iter().flatten().find(|&&(f, _)| f >= in_rows) {
            return Err(Error::shape(
                "time warp taps",
                format!("frames below {in_rows}"),
                format!("frame {f}"),
            ));
        }
        let forward: Vec<Vec<(usize, f32)>> = taps.iter().map(|t| t.to_vec()).collect();
        let mut backward = vec![Vec::new(); in_rows];
        for (r, t) in taps.iter().enumerate() {
            for &(f, w) in t {
                backward[f].push((r, w));
            }
        }
        Ok(DeviceTimeWarp {
            forward: Csr::upload(be, &forward)?,
            backward: Csr::upload(be, &backward)?,
        })
    }

    /// (output rows, input rows).
    pub fn rows(&self) -> (usize, usize) {
        (self.forward.rows, self.backward.rows)
    }

    /// y = warp(x), fp32 [frames, c].
    pub fn forward(&self, be: &Backend, x: &Buf<f32>, c: usize) -> Result<Buf<f32>> {
        self.forward.apply(be, x, self.backward.rows, c)
    }

    /// dx = warp^T(dy).
    pub fn backward(&self, be: &Backend, dy: &Buf<f32>, c: usize) -> Result<Buf<f32>> {
        self.backward.apply(be, dy, self.forward.rows, c)
    }
}

/// SpecAugment's masks on the device: per frame its utterance or -1 (time-masked), per utterance
/// its feature keep row. Applying is its own adjoint.
pub struct DeviceSpecMask {
    row_code: Buf<i32>,
    chan_keep: Buf<f32>,
    rows: usize,
    c: usize,
}

impl DeviceSpecMask {
    /// The masks of `spans` (one per utterance of `batch`) over features of width `c`.
    pub fn upload(
        be: &Backend,
        spans: &[MaskedSpans],
        batch: &PackedBatch,
        c: usize,
    ) -> Result<Self> {
        const K: &str = "specaug_mask";
        if spans.len() != batch.num_utterances() {
            return Err(Error::shape(
                K,
                format!("spans for {} utterances", batch.num_utterances()),
                format!("{}", spans.len()),
            ));
        }
        let mut row_code = Vec::with_capacity(batch.total_frames());
        let mut chan_keep = vec![1f32; spans.len() * c];
        for (u, s) in spans.iter().enumerate() {
            let t = batch.len_of(u);
            let bad = |&(a, b): &(usize, usize), len| a > b || b > len;
            if s.features.iter().any(|r| bad(r, c)) || s.frames.iter().any(|r| bad(r, t)) {
                return Err(Error::shape(
                    K,
                    format!("spans within {c} features and {t} frames (utterance {u})"),
                    format!("{s:?}"),
                ));
            }
            let mut codes = vec![u as i32; t];
            for &(a, b) in &s.frames {
                codes[a..b].iter_mut().for_each(|v| *v = -1);
            }
            row_code.extend(codes);
            for &(a, b) in &s.features {
                chan_keep[u * c + a..u * c + b]
                    .iter_mut()
                    .for_each(|v| *v = 0.0);
            }
        }
        Ok(DeviceSpecMask {
            row_code: be.upload(&row_code)?,
            chan_keep: be.upload(&chan_keep)?,
            rows: batch.total_frames(),
            c,
        })
    }

    /// The [frames, c] it masks.
    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.c)
    }

    /// x * mask, fp32 [frames, c].
    pub fn apply(&self, be: &Backend, x: &Buf<f32>) -> Result<Buf<f32>> {
        const K: &str = "specaug_mask";
        rows_check(K, self.rows, self.c)?;
        need(be, K, "x", x, self.rows * self.c)?;
        let y = be.output::<f32>(self.rows * self.c)?;
        let p = SpecMaskParams {
            x: be.ptr(x),
            y: be.ptr(&y),
            row_code: be.ptr(&self.row_code),
            chan_keep: be.ptr(&self.chan_keep),
            rows: self.rows as i64,
            c: self.c as i32,
        };
        launch_elementwise(be, K, self.rows * self.c, &p)?;
        Ok(y)
    }
}

/// y = x * scale + ESPnet's positional encoding (positions restarting in each utterance), x fp32
/// [frames, d]. The backward is dx = scale * dy.
pub fn scale_add_positions(
    be: &Backend,
    x: &Buf<f32>,
    batch: &PackedBatch,
    d: usize,
    scale: f32,
) -> Result<Buf<f32>> {
    const K: &str = "scale_add_positions";
    let (offsets, u, frames) = pool_params(be, K, batch, d)?;
    need(be, K, "x", x, frames * d)?;
    let rates = be.upload(&position_rates(d))?;
    let y = be.output::<f32>(frames * d)?;
    let p = PositionsParams {
        x: be.ptr(x),
        y: be.ptr(&y),
        offsets: be.ptr(&offsets),
        rates: be.ptr(&rates),
        rows: frames as i64,
        utterances: u as i32,
        d: d as i32,
        scale,
    };
    launch_elementwise(be, K, frames * d, &p)?;
    Ok(y)
}
