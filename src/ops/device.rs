//! Typed launchers for the CUDA kernels (kernels/*.cu): shapes checked here, errors naming the
//! kernel and the sizes. Each runs on either backend (emulator or GPU); the CPU references they are
//! tested against live beside them in src/ops/ and src/optim/.

use crate::error::{Error, Result};
use crate::ops::layer_conv::ConvGeom;
use crate::optim::AdamConfig;
use crate::runtime::kernels::{
    ActivationParams, AdamMultiParams, AdamParams, AdamTensor, AddGradsParams, AddRowsParams,
    AmMarginParams, CastParams, ClipCoefParams, ClsAttnParams, ColSumParams, CrossEntropyParams,
    CtcParams, DropoutParams, HConvBwdParams, HConvFwdParams, HConvMaskParams, L2NormalizeParams,
    LayerNormBwdParams, LayerNormFwdParams, LayerNormReduceParams, LayerNormRowsParams,
    LayerSumBwdParams, LayerSumFwdParams, LayerSumReduceParams, LogSoftmaxParams, MeanPoolParams,
    PackedAttnParams, RowsGatherParams, RowsGatherSumParams, SelectLayerParams, SplitReduceParams,
    StatsPoolParams, SumSquaresMultiParams, SumSquaresParams, WidenParams,
};
use crate::runtime::{knobs, Backend, Buf};
use half::bf16;

mod lstm;
mod mlsuperb;
pub use lstm::{
    lstm_backward, lstm_backward_directions, lstm_forward, lstm_forward_directions,
    DeviceLstmSchedule, LstmBackDirection, LstmDirection, LstmStates,
};
pub use mlsuperb::{
    conv2d_patches, conv2d_patches_adjoint, scale_add_positions, utterance_center, DeviceSpecMask,
    DeviceTimeWarp,
};

const LAYER_SUM_BLOCK: u32 = 128;
/// Frames per block of the warp-per-layer WS backward (kernels/layer_sum.cu).
const LAYER_SUM_FRAMES_PER_BLOCK: usize = 8;
const MAX_LAYERS: usize = 64;
/// CTC_THREADS and CTC_GRAD_WARPS of kernels/ctc.cu.
const CTC_THREADS: u32 = 256;
const CTC_GRAD_WARPS: usize = 8;

/// `buf` must live on `be` and hold exactly `want` elements.
fn need<T>(be: &Backend, kernel: &str, what: &str, buf: &Buf<T>, want: usize) -> Result<()> {
    if !buf.is_on(be) {
        return Err(Error::Config(format!(
            "{kernel}: the {what} buffer belongs to another backend than {}",
            be.name()
        )));
    }
    if buf.len() == want {
        Ok(())
    } else {
        Err(Error::shape(
            format!("{kernel} {what}"),
            format!("{want} elements"),
            format!("{}", buf.len()),
        ))
    }
}

/// Shape of a layer-sum launch: stack [n, l, d], layers first..first+k.
#[derive(Clone, Copy, Debug)]
pub struct LayerSumShape {
    pub n: usize,
    pub l: usize,
    pub d: usize,
    pub first: usize,
    pub k: usize,
    pub normalize: bool,
}

impl LayerSumShape {
    fn check(&self, kernel: &str) -> Result<()> {
        if self.k == 0
            || self.first + self.k > self.l
            || self.k > MAX_LAYERS
            || self.n == 0
            || self.d == 0
        {
            return Err(Error::shape(
                kernel,
                format!("1 <= k <= {MAX_LAYERS} layers within L, n >= 1, d >= 1"),
                format!("{self:?}"),
            ));
        }
        if self.n > i32::MAX as usize || self.l * self.d > i32::MAX as usize {
            return Err(Error::shape(
                kernel,
                "sizes that fit in 32-bit indices per frame",
                format!("{self:?}"),
            ));
        }
        Ok(())
    }
}

/// Saved statistics of the per-layer norm, [n, k] each.
#[derive(Debug)]
pub struct LayerNormStats {
    pub mean: Buf<f32>,
    pub rstd: Buf<f32>,
}

/// Where a layer sum's [n, d] output (or its gradient) sits inside a row-major matrix with
/// `stride` columns, starting at column `offset`: [`Cols::own`] for a matrix of its own, or one
/// group's slice of GroupWS's concatenation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cols {
    pub stride: usize,
    pub offset: usize,
}

impl Cols {
    pub fn own(d: usize) -> Self {
        Cols {
            stride: d,
            offset: 0,
        }
    }

    fn check(&self, kernel: &str, what: &str, s: &LayerSumShape, buf_len: usize) -> Result<()> {
        // The vectorized paths move 8 bf16 / 4 fp32 at a time when d % 8 == 0: keep them aligned.
        let aligned = !s.d.is_multiple_of(8)
            || (self.stride.is_multiple_of(8) && self.offset.is_multiple_of(8));
        if self.offset + s.d > self.stride || !aligned || buf_len != s.n * self.stride {
            return Err(Error::shape(
                format!("{kernel} {what}"),
                format!(
                    "{} x {} elements holding columns {}..{} (offset and stride multiples of 8 when D is)",
                    s.n,
                    self.stride,
                    self.offset,
                    self.offset + s.d
                ),
                format!("{buf_len} elements, {self:?}"),
            ));
        }
        Ok(())
    }
}

/// out [n, d] bf16 = sum_j softmax(w)_j * (norm?)(x[:, first + j, :]).
pub fn layer_sum_forward(
    be: &Backend,
    x: &Buf<bf16>,
    w: &Buf<f32>,
    s: LayerSumShape,
) -> Result<(Buf<bf16>, Option<LayerNormStats>)> {
    let out = be.output::<bf16>(s.n * s.d)?;
    let stats = layer_sum_forward_into(be, x, w, s, &out, Cols::own(s.d))?;
    Ok((out, stats))
}

/// [`layer_sum_forward`] writing into columns `cols` of `out`.
pub fn layer_sum_forward_into(
    be: &Backend,
    x: &Buf<bf16>,
    w: &Buf<f32>,
    s: LayerSumShape,
    out: &Buf<bf16>,
    cols: Cols,
) -> Result<Option<LayerNormStats>> {
    const K: &str = "layer_sum_forward";
    s.check(K)?;
    need(be, K, "stack", x, s.n * s.l * s.d)?;
    need(be, K, "weights", w, s.k)?;
    if !out.is_on(be) {
        return Err(Error::Device(format!("{K}: out is on another backend")));
    }
    cols.check(K, "out", &s, out.len())?;
    let stats = if s.normalize {
        Some(LayerNormStats {
            mean: be.zeros(s.n * s.k)?,
            rstd: be.zeros(s.n * s.k)?,
        })
    } else {
        None
    };
    // With the norm (D % 8 == 0), each frame's k rows are read once into shared memory, where the
    // statistics and the sum read them (the stack read once instead of twice); up to the H100's
    // 227 KB a block (k x D bf16: 20 KB at HuBERT-Base's size, 50 KB at Large's).
    // STRATA_LAYER_SUM_UNSTAGED=1 reads the rows twice as before (the device script's comparison).
    static UNSTAGED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let unstaged = *UNSTAGED.get_or_init(|| knobs::flag("STRATA_LAYER_SUM_UNSTAGED", "1"));
    let bytes = s.k * s.d * 2;
    let staged = s.normalize && s.d.is_multiple_of(8) && bytes <= 227 * 1024 && !unstaged;
    let smem = if staged { bytes as u32 } else { 0 };
    let p = LayerSumFwdParams {
        x: be.ptr(x),
        w: be.ptr(w),
        out: be.ptr(out) + (cols.offset * 2) as u64,
        mean: stats.as_ref().map_or(0, |st| be.ptr(&st.mean)),
        rstd: stats.as_ref().map_or(0, |st| be.ptr(&st.rstd)),
        n: s.n as i32,
        l: s.l as i32,
        d: s.d as i32,
        first: s.first as i32,
        k: s.k as i32,
        normalize: s.normalize as i32,
        out_stride: cols.stride as i32,
        staged: staged as i32,
    };
    be.launch(K, (s.n as u32, 1, 1), (LAYER_SUM_BLOCK, 1, 1), smem, &p)?;
    Ok(stats)
}

/// Adds d loss / d w into `dw` [k]; returns d loss / d x [n, l, d] (fp32) when `need_dx`.
#[allow(clippy::too_many_arguments)]
pub fn layer_sum_backward(
    be: &Backend,
    x: &Buf<bf16>,
    w: &Buf<f32>,
    dout: &Buf<f32>,
    stats: Option<&LayerNormStats>,
    s: LayerSumShape,
    dw: &Buf<f32>,
    need_dx: bool,
) -> Result<Option<Buf<f32>>> {
    let dx = if need_dx {
        Some(be.zeros::<f32>(s.n * s.l * s.d)?)
    } else {
        None
    };
    let own = (dout, Cols::own(s.d));
    layer_sum_backward_into(be, x, w, own, stats, s, dw, dx.as_ref())?;
    Ok(dx)
}

/// [`layer_sum_backward`] reading the output gradient from columns `cols` of `dout` and writing
/// the stack gradient of layers first..first+k into `dx` [n, l, d] when given (its other layers
/// untouched: GroupWS's groups share one buffer).
#[allow(clippy::too_many_arguments)]
pub fn layer_sum_backward_into(
    be: &Backend,
    x: &Buf<bf16>,
    w: &Buf<f32>,
    (dout, cols): (&Buf<f32>, Cols),
    stats: Option<&LayerNormStats>,
    s: LayerSumShape,
    dw: &Buf<f32>,
    dx: Option<&Buf<f32>>,
) -> Result<()> {
    const K: &str = "layer_sum_backward";
    s.check(K)?;
    need(be, K, "stack", x, s.n * s.l * s.d)?;
    need(be, K, "weights", w, s.k)?;
    if !dout.is_on(be) {
        return Err(Error::Device(format!("{K}: dout is on another backend")));
    }
    cols.check(K, "dout", &s, dout.len())?;
    need(be, K, "dw", dw, s.k)?;
    if s.normalize != stats.is_some() {
        return Err(Error::Config(format!(
            "{K}: normalize = {} but statistics {}",
            s.normalize,
            if stats.is_some() { "given" } else { "missing" }
        )));
    }
    if let Some(st) = stats {
        need(be, K, "mean", &st.mean, s.n * s.k)?;
        need(be, K, "rstd", &st.rstd, s.n * s.k)?;
    }
    let dw_block = if dx.is_none() {
        layer_sum_dw_block(s)
    } else {
        None
    };
    // STRATA_LAYER_SUM_FRAMES=n: n frames a block instead (the device script's comparison).
    static FORCED_FRAMES: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let forced = *FORCED_FRAMES.get_or_init(|| knobs::number("STRATA_LAYER_SUM_FRAMES", 1..=65536));
    let frames_per_block = match (dw_block, forced) {
        (Some(_), Some(n)) => n,
        // One wave of blocks, each with an even share of the frames (kernels/layer_sum.cu).
        (Some((threads, smem)), None) => {
            let wave = be.resident_blocks("layer_sum_backward_dw", threads, smem)?;
            s.n.div_ceil(wave.max(1))
        }
        (None, _) => LAYER_SUM_FRAMES_PER_BLOCK,
    };
    let blocks = s.n.div_ceil(frames_per_block);
    // Both kernels write every block's partial of every layer.
    let partial = be.output::<f32>(blocks * s.k)?;
    if let Some(dx) = dx {
        need(be, K, "dx", dx, s.n * s.l * s.d)?;
    }
    let p = LayerSumBwdParams {
        x: be.ptr(x),
        w: be.ptr(w),
        dout: be.ptr(dout) + (cols.offset * 4) as u64,
        mean: stats.map_or(0, |st| be.ptr(&st.mean)),
        rstd: stats.map_or(0, |st| be.ptr(&st.rstd)),
        partial: be.ptr(&partial),
        dx: dx.map_or(0, |b| be.ptr(b)),
        n: s.n as i32,
        l: s.l as i32,
        d: s.d as i32,
        first: s.first as i32,
        k: s.k as i32,
        normalize: s.normalize as i32,
        dout_stride: cols.stride as i32,
        frames_per_block: frames_per_block as i32,
    };
    if let Some((threads, smem)) = dw_block {
        be.launch(
            "layer_sum_backward_dw",
            (blocks as u32, 1, 1),
            (threads, 1, 1),
            smem,
            &p,
        )?;
    } else {
        // Shared memory stages one dout row on the vectorised path (see the kernel).
        let smem = if s.d.is_multiple_of(8) && s.d <= 4096 {
            (s.d * 4) as u32
        } else {
            0
        };
        be.launch(K, (blocks as u32, 1, 1), (LAYER_SUM_BLOCK, 1, 1), smem, &p)?;
    }
    let r = LayerSumReduceParams {
        partial: be.ptr(&partial),
        w: be.ptr(w),
        dw: be.ptr(dw),
        n: blocks as i32,
        k: s.k as i32,
    };
    be.launch("layer_sum_reduce", (1, 1, 1), (256, 1, 1), 0, &r)
}

/// The block of `layer_sum_backward_dw` (threads, shared-memory bytes) for a shape, or None where
/// that kernel does not apply and the warp-per-layer backward runs: D not a multiple of 8, more
/// layers than LS_DW_LAYERS_PER_THREAD per thread in 512 threads, or the k x D/8 per-chunk sums over
/// 48 KB of shared memory. STRATA_LAYER_SUM_BWD=warp forces the warp-per-layer kernel (for the
/// device script's comparison of the two).
fn layer_sum_dw_block(s: LayerSumShape) -> Option<(u32, u32)> {
    const LAYERS_PER_THREAD: usize = 8; // LS_DW_LAYERS_PER_THREAD of kernels/layer_sum.cu
    static WARP_KERNEL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let forced = *WARP_KERNEL.get_or_init(|| knobs::flag("STRATA_LAYER_SUM_BWD", "warp"));
    if !s.d.is_multiple_of(8) || forced {
        return None;
    }
    let chunks = s.d / 8;
    // At least 128 threads, and enough layer groups that no thread owns more than 8 layers.
    let groups =
        s.k.div_ceil(LAYERS_PER_THREAD)
            .max(128usize.div_ceil(chunks));
    let threads = chunks * groups;
    let smem = s.k * chunks * 4;
    // At 86 registers a thread, 512 threads take 44K of an SM's 64K registers; a larger block
    // could not launch at all.
    (threads <= 512 && smem <= 48 * 1024).then_some((threads as u32, smem as u32))
}

/// Adam / AdamW step `t` (1-based) over a flat parameter buffer, as `crate::optim::Adam`.
/// `grad_scale` (one float on the device, e.g. the clip coefficient) multiplies every gradient.
#[allow(clippy::too_many_arguments)]
pub fn adam_step(
    be: &Backend,
    cfg: &AdamConfig,
    step: u64,
    param: &Buf<f32>,
    grad: &Buf<f32>,
    m: &Buf<f32>,
    v: &Buf<f32>,
    param_bf16: Option<&Buf<bf16>>,
    grad_scale: Option<&Buf<f32>>,
) -> Result<()> {
    const K: &str = "adam_step";
    let n = param.len();
    need(be, K, "grad", grad, n)?;
    need(be, K, "exp_avg", m, n)?;
    need(be, K, "exp_avg_sq", v, n)?;
    need(be, K, "param", param, n)?;
    if let Some(b) = param_bf16 {
        need(be, K, "bf16 copy", b, n)?;
    }
    if let Some(s) = grad_scale {
        need(be, K, "grad_scale", s, 1)?;
    }
    let sc = cfg.scalars(step)?;
    let p = AdamParams {
        param: be.ptr(param),
        grad: be.ptr(grad),
        m: be.ptr(m),
        v: be.ptr(v),
        param_bf16: param_bf16.map_or(0, |b| be.ptr(b)),
        grad_scale: grad_scale.map_or(0, |b| be.ptr(b)),
        n: n as i64,
        step_size: sc.step_size,
        bc2_sqrt: sc.bc2_sqrt,
        one_minus_beta1: sc.one_minus_beta1,
        beta2: sc.beta2,
        one_minus_beta2: sc.one_minus_beta2,
        eps: sc.eps,
        weight_decay: sc.weight_decay,
        decay: sc.decay,
        decoupled: cfg.decoupled as i32,
    };
    // A thread per 4 elements (kernels/adamw.cu), the grid striding past 4096 blocks.
    let blocks = n.div_ceil(4 * 256).clamp(1, 4096) as u32;
    be.launch(K, (blocks, 1, 1), (256, 1, 1), 0, &p)
}

/// The global L2 norm of `grad` and the clip coefficient min(max_norm / (norm + 1e-6), 1), both
/// left on the device (one float each).
pub fn clip_coefficient(
    be: &Backend,
    grad: &Buf<f32>,
    max_norm: f32,
) -> Result<(Buf<f32>, Buf<f32>)> {
    check_max_norm(max_norm)?;
    let n = grad.len();
    need(be, "clip_coefficient", "grad", grad, n)?;
    let parts = sum_squares_parts(n);
    let partial = be.zeros::<f32>(parts)?;
    let sp = SumSquaresParams {
        x: be.ptr(grad),
        partial: be.ptr(&partial),
        n: n as i64,
    };
    be.launch(
        "sum_squares_partial",
        (parts as u32, 1, 1),
        (256, 1, 1),
        0,
        &sp,
    )?;
    clip_from_partials(be, &partial, parts, max_norm)
}

/// [`clip_coefficient`] over several gradient buffers at once (a model's parameters): their
/// squares summed into one partial buffer, segment by segment, then one coefficient. The same
/// fixed order every time: deterministic.
pub fn clip_coefficient_multi(
    be: &Backend,
    grads: &[&Buf<f32>],
    max_norm: f32,
) -> Result<(Buf<f32>, Buf<f32>)> {
    check_max_norm(max_norm)?;
    if grads.is_empty() {
        return Err(Error::Config("clip: no gradients to clip".into()));
    }
    let parts: Vec<usize> = grads.iter().map(|g| sum_squares_parts(g.len())).collect();
    let total: usize = parts.iter().sum();
    let partial = be.zeros::<f32>(total)?;
    let mut at = 0usize;
    for (g, &n_parts) in grads.iter().zip(&parts) {
        need(be, "clip_coefficient", "grad", g, g.len())?;
        let sp = SumSquaresParams {
            x: be.ptr(*g),
            // This gradient's segment of the partial sums.
            partial: be.ptr(&partial) + (at * std::mem::size_of::<f32>()) as u64,
            n: g.len() as i64,
        };
        be.launch(
            "sum_squares_partial",
            (n_parts as u32, 1, 1),
            (256, 1, 1),
            0,
            &sp,
        )?;
        at += n_parts;
    }
    clip_from_partials(be, &partial, total, max_norm)
}

fn check_max_norm(max_norm: f32) -> Result<()> {
    if max_norm.is_nan() || max_norm <= 0.0 {
        return Err(Error::Config(format!(
            "clip: max_norm must be > 0, got {max_norm}"
        )));
    }
    Ok(())
}

/// The blocks (and partial sums) of the squared-sum pass over one gradient of `len` values.
fn sum_squares_parts(len: usize) -> usize {
    len.div_ceil(256).clamp(1, 1024)
}

/// The global norm and clip coefficient from the `total` squared-sum partials, reduced in order.
fn clip_from_partials(
    be: &Backend,
    partial: &Buf<f32>,
    total: usize,
    max_norm: f32,
) -> Result<(Buf<f32>, Buf<f32>)> {
    let norm = be.zeros::<f32>(1)?;
    let coef = be.zeros::<f32>(1)?;
    let cp = ClipCoefParams {
        partial: be.ptr(partial),
        parts: total as i32,
        max_norm,
        norm: be.ptr(&norm),
        coef: be.ptr(&coef),
    };
    be.launch("clip_coefficient", (1, 1, 1), (256, 1, 1), 0, &cp)?;
    Ok((norm, coef))
}

/// The `-D` constants that specialize kernels/hconv.cu's vectorized kernels to one conv's geometry.
pub fn hconv_defines(g: &ConvGeom) -> [(&'static str, i64); 8] {
    [
        ("HC_SPEC", 1),
        ("HC_C_IN", g.c_in as i64),
        ("HC_C_OUT", g.c_out as i64),
        ("HC_L_IN", g.l_in as i64),
        ("HC_L_OUT", g.l_out() as i64),
        ("HC_KERNEL", g.kernel as i64),
        ("HC_STRIDE", g.stride as i64),
        ("HC_PAD", g.pad as i64),
    ]
}

/// PyTorch's Conv1d weight [c_out, c_in, k] in the kernels' tap-major layout [c_out, k * c_in]
/// (fp32, e.g. for master weights).
pub fn hconv_weight_tap_major(w: &[f32], g: &ConvGeom) -> Vec<f32> {
    let mut out = vec![0f32; g.c_out * g.kernel * g.c_in];
    for o in 0..g.c_out {
        for c in 0..g.c_in {
            for k in 0..g.kernel {
                out[(o * g.kernel + k) * g.c_in + c] = w[(o * g.c_in + c) * g.kernel + k];
            }
        }
    }
    out
}

/// [`hconv_weight_tap_major`] in bf16: the weight the kernels read.
pub fn hconv_weight_for_kernel(w: &[f32], g: &ConvGeom) -> Vec<bf16> {
    hconv_weight_tap_major(w, g)
        .into_iter()
        .map(bf16::from_f32)
        .collect()
}

/// One HConv conv + bias + ReLU on tensor cores: x bf16 [n, l_in, c_in] -> y bf16 [n, l_out, c_out],
/// or channel-major flattened [n, c_out * l_out] when `flatten` (the last conv).
/// `w` comes from [`hconv_weight_for_kernel`].
pub fn hconv_conv_forward(
    be: &Backend,
    x: &Buf<bf16>,
    n: usize,
    g: &ConvGeom,
    w: &Buf<bf16>,
    bias: &Buf<f32>,
    flatten: bool,
) -> Result<Buf<bf16>> {
    hconv_conv_forward_on(be, tensor_core_path(), x, n, g, w, bias, flatten)
}

/// [`hconv_conv_forward`] on the tensor-core path `path` (for tests and benchmarks that compare
/// the two).
#[allow(clippy::too_many_arguments)]
pub fn hconv_conv_forward_on(
    be: &Backend,
    path: TensorCorePath,
    x: &Buf<bf16>,
    n: usize,
    g: &ConvGeom,
    w: &Buf<bf16>,
    bias: &Buf<f32>,
    flatten: bool,
) -> Result<Buf<bf16>> {
    match conv_forward(be, path, x, n, g, w, bias, flatten, true, false)? {
        LayerOut::Bf16(y) => Ok(y),
        LayerOut::F32(_) => unreachable!("asked for bf16"),
    }
}

/// A conv / Linear output: bf16 (the next tensor-core layer's operand) or fp32 (logits).
#[derive(Debug)]
pub enum LayerOut {
    Bf16(Buf<bf16>),
    F32(Buf<f32>),
}

impl LayerOut {
    pub fn into_bf16(self) -> Option<Buf<bf16>> {
        match self {
            LayerOut::Bf16(b) => Some(b),
            LayerOut::F32(_) => None,
        }
    }
    pub fn into_f32(self) -> Option<Buf<f32>> {
        match self {
            LayerOut::F32(b) => Some(b),
            LayerOut::Bf16(_) => None,
        }
    }
}

/// The tensor-core instruction of the vectorized conv kernels, forward and backward (HConv's convs
/// and the Linear layers): `mma.sync` (any GPU from sm_80, and the default) or Hopper's warpgroup
/// `wgmma` (sm_90a: H100 / H200), which reaches Hopper's matrix peak where `mma.sync` cannot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorCorePath {
    MmaSync,
    Wgmma,
}

/// Set once the device script has run the `wgmma` kernels on an H100 and they matched the CPU
/// reference there (kernels/wgmma.cu's self-test and tests/kernels.rs's HConv forward and backward
/// tests, which run both paths); until then `STRATA_TENSOR_CORES=wgmma` opts in.
pub const WGMMA_VERIFIED_ON_GPU: bool = false;

/// The path the conv kernels take: `STRATA_TENSOR_CORES=wgmma` or `=mma` when set (read once),
/// else `wgmma` once verified ([`WGMMA_VERIFIED_ON_GPU`]) and `mma.sync` before. (A GPU that is
/// not an sm_90 part fails to load the sm_90a build with an error naming the file and its target.)
pub fn tensor_core_path() -> TensorCorePath {
    // Read once: every conv launch asks.
    static PATH: std::sync::OnceLock<TensorCorePath> = std::sync::OnceLock::new();
    *PATH.get_or_init(
        || match knobs::choice("STRATA_TENSOR_CORES", &["wgmma", "mma"]) {
            Some("wgmma") => TensorCorePath::Wgmma,
            Some(_) => TensorCorePath::MmaSync,
            _ if WGMMA_VERIFIED_ON_GPU => TensorCorePath::Wgmma,
            _ => TensorCorePath::MmaSync,
        },
    )
}

/// Elements per block of adam_step_multi (ADAM_MULTI_CHUNK of kernels/adamw.cu).
const ADAM_MULTI_CHUNK: usize = 1024;

/// Staged buffers of each operand in kernels/hconv.cu's vectorized mma.sync kernels (its
/// `HV_STAGES`): their copies run `HV_STAGES - 1` K steps ahead of the math.
pub const HV_STAGES: usize = 4;

/// Staged buffers of each operand in kernels/hconv.cu's wgmma kernels (its `HW_STAGES`): one
/// step's wgmmas stay in flight, and the copies run `HW_STAGES - 2` steps ahead.
pub const HW_STAGES: usize = 5;

/// A pipeline depth: `default`, or on the GPU the environment's `var` (read once per variable;
/// the device script compares depths), from `least` to 8, compiled in as a `-D` define. The
/// emulator runs its one build's depth.
fn pipeline_stages(
    be: &Backend,
    cell: &'static std::sync::OnceLock<usize>,
    var: &str,
    default: usize,
    least: usize,
) -> usize {
    if !matches!(be, Backend::Cuda(_)) {
        return default;
    }
    *cell.get_or_init(|| knobs::number(var, least..=8).unwrap_or(default))
}

/// The vectorized mma.sync kernels' pipeline depth: [`HV_STAGES`], or `STRATA_HV_STAGES` on the
/// GPU (2 to 8).
fn hv_stages(be: &Backend) -> usize {
    static STAGES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    pipeline_stages(be, &STAGES, "STRATA_HV_STAGES", HV_STAGES, 2)
}

/// The wgmma kernels' pipeline depth: [`HW_STAGES`], or `STRATA_HW_STAGES` on the GPU (3 to 8).
fn hw_stages(be: &Backend) -> usize {
    static STAGES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    pipeline_stages(be, &STAGES, "STRATA_HW_STAGES", HW_STAGES, 3)
}

/// Dynamic shared memory of a vectorized mma.sync kernel at `stages`: per stage its two operand
/// tiles, [128][32 + 8] bf16 when staged [m or n][k] and [32][128 + 8] when staged [k][m or n]
/// (kernels/hconv.cu's HvTileMK and HvTileKN; the kernel traps if given less). A wgmma kernel's:
/// per stage two 128 x 32 tiles (HwTile).
pub fn hv_smem_bytes(kernel: &str, stages: usize) -> u32 {
    const MK: usize = 128 * 40 * 2;
    const KN: usize = 32 * 136 * 2;
    const HW: usize = 128 * 32 * 2;
    let per_stage = match kernel {
        "hconv_conv_forward_vec" => 2 * MK,
        "hconv_conv_backward_data_vec" => MK + KN,
        "hconv_conv_backward_weight_vec" => 2 * KN,
        "hconv_conv_forward_wgmma"
        | "hconv_conv_backward_data_wgmma"
        | "hconv_conv_backward_weight_wgmma" => 2 * HW,
        _ => unreachable!("{kernel} is not a vectorized tensor-core kernel"),
    };
    (stages * per_stage) as u32
}

/// A launch of a vectorized kernel on `path` (256 threads), on the GPU `-D` specialized to `spec`'s
/// geometry, with its pipeline's dynamic shared memory and any non-default depth.
fn hv_launch<P: crate::runtime::kernels::KernelParams + cudarc::driver::DeviceRepr>(
    be: &Backend,
    path: TensorCorePath,
    kernel: &'static str,
    spec: Option<&ConvGeom>,
    grid: (u32, u32, u32),
    params: &P,
) -> Result<()> {
    let mut defines: Vec<(&'static str, i64)> =
        spec.map(|g| hconv_defines(g).to_vec()).unwrap_or_default();
    let (define, stages, default) = match path {
        TensorCorePath::MmaSync => ("HV_STAGES", hv_stages(be), HV_STAGES),
        TensorCorePath::Wgmma => ("HW_STAGES", hw_stages(be), HW_STAGES),
    };
    if stages != default {
        defines.push((define, stages as i64));
    }
    let smem = hv_smem_bytes(kernel, stages);
    be.launch_specialized(kernel, &defines, grid, (256, 1, 1), smem, params)
}

/// The layer-axis conv kernels' forward with its options: `relu` after the bias, output in bf16
/// or (`out_f32`) fp32. Returns the one output buffer it made.
#[allow(clippy::too_many_arguments)]
fn conv_forward(
    be: &Backend,
    path: TensorCorePath,
    x: &Buf<bf16>,
    n: usize,
    g: &ConvGeom,
    w: &Buf<bf16>,
    bias: &Buf<f32>,
    flatten: bool,
    relu: bool,
    out_f32: bool,
) -> Result<LayerOut> {
    const K: &str = "hconv_conv_forward";
    if n == 0 || g.stride == 0 || g.l_in + 2 * g.pad < g.kernel || g.c_in == 0 || g.c_out == 0 {
        return Err(Error::shape(
            K,
            "n >= 1 and a kernel that fits the padded layers",
            format!("n = {n}, {g:?}"),
        ));
    }
    let l_out = g.l_out();
    // Row tiles of 64 run along grid.y, which CUDA caps at 65535 blocks.
    if (n * l_out).div_ceil(64) > 65535 || g.kernel * g.c_in > i32::MAX as usize {
        return Err(Error::shape(K, "at most 65535 x 64 output rows (frames x output positions) per launch: split the batch", format!("n = {n}, {g:?}")));
    }
    need(be, K, "x", x, n * g.l_in * g.c_in)?;
    need(be, K, "weight", w, g.c_out * g.kernel * g.c_in)?;
    need(be, K, "bias", bias, g.c_out)?;
    let size = n * l_out * g.c_out;
    let (y, y32) = if out_f32 {
        (None, Some(be.output::<f32>(size)?))
    } else {
        (Some(be.output::<bf16>(size)?), None)
    };
    let p = HConvFwdParams {
        x: be.ptr(x),
        w: be.ptr(w),
        bias: be.ptr(bias),
        y: y.as_ref().map_or(0, |b| be.ptr(b)),
        relu: relu as i32,
        y32: y32.as_ref().map_or(0, |b| be.ptr(b)),
        n: n as i32,
        l_in: g.l_in as i32,
        c_in: g.c_in as i32,
        c_out: g.c_out as i32,
        kernel: g.kernel as i32,
        stride: g.stride as i32,
        pad: g.pad as i32,
        l_out: l_out as i32,
        flatten: flatten as i32,
    };
    // Every real stack (D a multiple of 8) takes the vectorized kernel; others the general one.
    if g.c_in.is_multiple_of(8) {
        // Row tiles of 128 in position-major order (kernels/hconv.cu's HcFwdTile).
        let grid = (
            g.c_out.div_ceil(128) as u32,
            (n * l_out).div_ceil(128) as u32,
            1,
        );
        let kernel = match path {
            TensorCorePath::MmaSync => "hconv_conv_forward_vec",
            TensorCorePath::Wgmma => "hconv_conv_forward_wgmma",
        };
        hv_launch(be, path, kernel, Some(g), grid, &p)?;
    } else {
        let grid = (
            g.c_out.div_ceil(64) as u32,
            (n * l_out).div_ceil(64) as u32,
            1,
        );
        be.launch(K, grid, (128, 1, 1), 0, &p)?;
    }
    Ok(match (y, y32) {
        (Some(y), _) => LayerOut::Bf16(y),
        (None, Some(y32)) => LayerOut::F32(y32),
        (None, None) => unreachable!("one output is always made"),
    })
}

/// The kernel's tap-major weight gradient [c_out, k * c_in] in PyTorch's Conv1d layout
/// [c_out, c_in, k].
pub fn hconv_weight_grad_to_torch(dw: &[f32], g: &ConvGeom) -> Vec<f32> {
    let mut out = vec![0f32; g.c_out * g.c_in * g.kernel];
    for o in 0..g.c_out {
        for k in 0..g.kernel {
            for c in 0..g.c_in {
                out[(o * g.c_in + c) * g.kernel + k] = dw[(o * g.kernel + k) * g.c_in + c];
            }
        }
    }
    out
}

/// How the vectorized weight-gradient kernel splits its reduction over `rows` (frames x output
/// positions): into the number of chunks (at most 8, each at least 64 steps of 32 rows) whose
/// blocks, dW tiles x chunks, fill the waves of an H100 / H200 (132 SMs, 2 blocks each) best: the
/// fewest waves per unit of work, ceil(tiles x chunks / 264) / chunks, the smaller split on a tie.
/// HConv-Large's first conv has 320 tiles: unsplit, 1.2 waves of work take 2 waves of time; in 4
/// chunks, 5 waves of a quarter each. A function of the shape only, so the result is bitwise the
/// same on every GPU. Returns (chunks, rows per chunk, a multiple of 32).
pub fn weight_grad_split(rows: usize, g: &ConvGeom) -> (usize, usize) {
    const SLOTS: usize = 2 * 132;
    let tiles = g.c_out.div_ceil(128) * (g.kernel * g.c_in).div_ceil(128);
    let most = 8.min(rows / (32 * 64)).max(1);
    // Waves per chunk as the fraction waves / split, compared exactly: a / b < c / d <=> a d < c b.
    let waves = |split: usize| (tiles * split).div_ceil(SLOTS);
    let split = (1..=most)
        .min_by(|&a, &b| (waves(a) * b).cmp(&(waves(b) * a)))
        .unwrap_or(1);
    let per = rows.div_ceil(split).div_ceil(32) * 32;
    (rows.div_ceil(per.max(1)).max(1), per.max(32))
}

/// How the general (64 x 64 tile) weight-gradient kernel splits its reduction over `rows`: into
/// enough chunks for about four blocks per SM of an H100 (its blocks are small), each at least 64
/// steps of 32 rows, at most 64 chunks and 16M floats of partial sums. Its few tiles (a Linear
/// over 9-wide im2col patches, the ML-SUPERB head's first conv: 4) had each reduced some 300,000
/// rows alone. A function of the shape only (bitwise the same on every GPU). Returns (chunks, rows
/// per chunk, a multiple of 32).
pub fn general_weight_grad_split(rows: usize, g: &ConvGeom) -> (usize, usize) {
    const BLOCKS: usize = 4 * 132;
    let tiles = g.c_out.div_ceil(64) * (g.kernel * g.c_in).div_ceil(64);
    let wsize = g.c_out * g.kernel * g.c_in;
    let most = (rows / (32 * 64))
        .min(64)
        .min((16 << 20) / wsize.max(1))
        .max(1);
    let split = BLOCKS.div_ceil(tiles).clamp(1, most);
    let per = rows.div_ceil(split).div_ceil(32) * 32;
    (rows.div_ceil(per.max(1)).max(1), per.max(32))
}

/// Zeroed partial sums of a split weight-gradient reduction (dW, db), or None for one chunk.
fn split_partials(
    be: &Backend,
    split: usize,
    wsize: usize,
    c_out: usize,
) -> Result<Option<(Buf<f32>, Buf<f32>)>> {
    if split <= 1 {
        return Ok(None);
    }
    Ok(Some((
        be.zeros::<f32>(split * wsize)?,
        be.zeros::<f32>(split * c_out)?,
    )))
}

/// Adds a split reduction's partial sums into (dw, db), chunk by chunk in order.
fn reduce_split(
    be: &Backend,
    partial: Option<&(Buf<f32>, Buf<f32>)>,
    (dw, db): (&Buf<f32>, &Buf<f32>),
    (wsize, c_out): (usize, usize),
    split: usize,
) -> Result<()> {
    let Some((pdw, pdb)) = partial else {
        return Ok(());
    };
    for (part, out, count) in [(pdw, dw, wsize), (pdb, db, c_out)] {
        let rp = SplitReduceParams {
            partial: be.ptr(part),
            out: be.ptr(out),
            count: count as i64,
            split: split as i32,
        };
        let blocks = count.div_ceil(256).min(4096) as u32;
        be.launch("hconv_split_reduce", (blocks, 1, 1), (256, 1, 1), 0, &rp)?;
    }
    Ok(())
}

/// The vectorized dx kernels' row tiles: the input positions li of each phase
/// (li + pad) % stride, for every frame, in tiles of 128 rows (kernels/hconv.cu's hc_dx_phase).
pub fn dx_phase_tiles(n: usize, g: &ConvGeom) -> usize {
    (0..g.stride)
        .map(|ph| {
            let li0 = (ph + g.stride - g.pad % g.stride) % g.stride;
            let count = if li0 < g.l_in {
                (g.l_in - li0).div_ceil(g.stride)
            } else {
                0
            };
            (n * count).div_ceil(128)
        })
        .sum()
}

/// Buffers of one conv's forward, for its backward.
pub struct HConvSaved<'a> {
    /// The conv's input x [n, l_in, c_in] and its (post-ReLU) output y, flattened when `flatten`.
    pub x: &'a Buf<bf16>,
    pub y: &'a Buf<bf16>,
    /// Tap-major weight from [`hconv_weight_for_kernel`].
    pub w: &'a Buf<bf16>,
    pub flatten: bool,
}

/// Backward of one HConv conv + ReLU (+ flatten) given `dy`, the gradient of its output y:
/// ADDS the weight gradient (tap-major [c_out, k * c_in], see [`hconv_weight_grad_to_torch`]) to
/// `dw` and the bias gradient to `db` (given as `(dw, db)`) (deterministically: no atomics), and returns the input
/// gradient (bf16, [n, l_in, c_in]) when `want_dx` (every conv but the first of a frozen stack).
pub fn hconv_conv_backward(
    be: &Backend,
    saved: &HConvSaved,
    n: usize,
    g: &ConvGeom,
    dy: &Buf<bf16>,
    grads: (&Buf<f32>, &Buf<f32>),
    want_dx: bool,
) -> Result<Option<Buf<bf16>>> {
    hconv_conv_backward_on(be, tensor_core_path(), saved, n, g, dy, grads, want_dx)
}

/// [`hconv_conv_backward`] on the tensor-core path `path` (for tests and benchmarks that compare
/// the two).
#[allow(clippy::too_many_arguments)]
pub fn hconv_conv_backward_on(
    be: &Backend,
    path: TensorCorePath,
    saved: &HConvSaved,
    n: usize,
    g: &ConvGeom,
    dy: &Buf<bf16>,
    grads: (&Buf<f32>, &Buf<f32>),
    want_dx: bool,
) -> Result<Option<Buf<bf16>>> {
    let inputs = ConvBwdInputs {
        x: saved.x,
        relu_out: Some(saved.y),
        w: saved.w,
        flatten: saved.flatten,
    };
    conv_backward(be, path, &inputs, n, g, dy, grads, want_dx)
}

/// What the layer-axis conv backward reads: `relu_out` (the post-ReLU output) given means a ReLU
/// to undo, None means none (a Linear layer).
struct ConvBwdInputs<'a> {
    x: &'a Buf<bf16>,
    relu_out: Option<&'a Buf<bf16>>,
    w: &'a Buf<bf16>,
    flatten: bool,
}

#[allow(clippy::too_many_arguments)]
fn conv_backward(
    be: &Backend,
    path: TensorCorePath,
    saved: &ConvBwdInputs,
    n: usize,
    g: &ConvGeom,
    dy: &Buf<bf16>,
    (dw, db): (&Buf<f32>, &Buf<f32>),
    want_dx: bool,
) -> Result<Option<Buf<bf16>>> {
    const KD: &str = "hconv_conv_backward_data";
    const KW: &str = "hconv_conv_backward_weight";
    if n == 0 || g.stride == 0 || g.l_in + 2 * g.pad < g.kernel || g.c_in == 0 || g.c_out == 0 {
        return Err(Error::shape(
            KW,
            "n >= 1 and a kernel that fits the padded layers",
            format!("n = {n}, {g:?}"),
        ));
    }
    let l_out = g.l_out();
    let big = (n * g.l_in).div_ceil(64) > 65535
        || g.c_out.div_ceil(64) > 65535
        || (g.kernel * g.c_in.max(g.c_out.next_multiple_of(8))) > i32::MAX as usize;
    if big {
        return Err(Error::shape(
            KD,
            "at most 65535 x 64 rows (frames x layers) per launch: split the batch",
            format!("n = {n}, {g:?}"),
        ));
    }
    need(be, KW, "x", saved.x, n * g.l_in * g.c_in)?;
    if let Some(y) = saved.relu_out {
        need(be, KW, "y", y, n * l_out * g.c_out)?;
    }
    need(be, KW, "dy", dy, n * l_out * g.c_out)?;
    need(be, KW, "weight", saved.w, g.c_out * g.kernel * g.c_in)?;
    need(be, KW, "weight gradient", dw, g.c_out * g.kernel * g.c_in)?;
    need(be, KW, "bias gradient", db, g.c_out)?;
    let dx = if want_dx {
        Some(be.output::<bf16>(n * g.l_in * g.c_in)?)
    } else {
        None
    };
    let p = HConvBwdParams {
        x: be.ptr(saved.x),
        w: be.ptr(saved.w),
        y: saved.relu_out.map_or(0, |b| be.ptr(b)),
        dy: be.ptr(dy),
        dx: dx.as_ref().map_or(0, |b| be.ptr(b)),
        dw: be.ptr(dw),
        db: be.ptr(db),
        n: n as i32,
        l_in: g.l_in as i32,
        c_in: g.c_in as i32,
        c_out: g.c_out as i32,
        kernel: g.kernel as i32,
        stride: g.stride as i32,
        pad: g.pad as i32,
        l_out: l_out as i32,
        flatten: saved.flatten as i32,
        partial_dw: 0,
        partial_db: 0,
        split_rows: (n * l_out) as i64,
        split: 1,
        relu: saved.relu_out.is_some() as i32,
    };
    if g.c_in.is_multiple_of(8) {
        // Vectorized: the ReLU mask (and un-flatten) once, then both GEMMs read dpre, whose rows
        // are padded to 8 channels (kernels/hconv.cu's hc_pitch: HConv's D / 3 channels, a
        // Linear layer's classes).
        // A Linear layer's dy (no ReLU, one position, c_out % 8 == 0) is dpre as it lies: the pass
        // would copy it.
        let dy_is_dpre =
            saved.relu_out.is_none() && !saved.flatten && l_out == 1 && g.c_out.is_multiple_of(8);
        let dpre = if dy_is_dpre {
            None
        } else {
            let total = n * l_out * g.c_out.next_multiple_of(8);
            let dpre = be.output::<bf16>(total)?;
            let mp = HConvMaskParams {
                y: p.y,
                dy: p.dy,
                dpre: be.ptr(&dpre),
                n: p.n,
                c_out: p.c_out,
                l_out: p.l_out,
                flatten: p.flatten,
                relu: p.relu,
            };
            // A warp per row of dpre (8 frames a block) at each output position (grid.y).
            let blocks = n.div_ceil(8).min(65535) as u32;
            be.launch(
                "hconv_relu_mask",
                (blocks, l_out as u32, 1),
                (256, 1, 1),
                0,
                &mp,
            )?;
            Some(dpre)
        };
        let (split, split_rows) = weight_grad_split(n * l_out, g);
        let wsize = g.c_out * g.kernel * g.c_in;
        let partial = split_partials(be, split, wsize, g.c_out)?;
        let pv = HConvBwdParams {
            dy: dpre.as_ref().map_or(p.dy, |b| be.ptr(b)),
            flatten: 0,
            partial_dw: partial.as_ref().map_or(0, |b| be.ptr(&b.0)),
            partial_db: partial.as_ref().map_or(0, |b| be.ptr(&b.1)),
            split_rows: split_rows as i64,
            split: split as i32,
            ..p
        };
        let grid_w = (
            (g.kernel * g.c_in).div_ceil(128) as u32,
            g.c_out.div_ceil(128) as u32,
            split as u32,
        );
        let (weight_kernel, data_kernel) = match path {
            TensorCorePath::MmaSync => (
                "hconv_conv_backward_weight_vec",
                "hconv_conv_backward_data_vec",
            ),
            TensorCorePath::Wgmma => (
                "hconv_conv_backward_weight_wgmma",
                "hconv_conv_backward_data_wgmma",
            ),
        };
        hv_launch(be, path, weight_kernel, None, grid_w, &pv)?;
        reduce_split(be, partial.as_ref(), (dw, db), (wsize, g.c_out), split)?;
        if dx.is_some() {
            // Row tiles by phase (kernels/hconv.cu's HcDxPhase): each phase's rows in tiles of 128.
            let grid_d = (g.c_in.div_ceil(128) as u32, dx_phase_tiles(n, g) as u32, 1);
            hv_launch(be, path, data_kernel, Some(g), grid_d, &pv)?;
        }
        return Ok(dx);
    }
    let (split, split_rows) = general_weight_grad_split(n * l_out, g);
    let wsize = g.c_out * g.kernel * g.c_in;
    let partial = split_partials(be, split, wsize, g.c_out)?;
    let pg = HConvBwdParams {
        partial_dw: partial.as_ref().map_or(0, |b| be.ptr(&b.0)),
        partial_db: partial.as_ref().map_or(0, |b| be.ptr(&b.1)),
        split_rows: split_rows as i64,
        split: split as i32,
        ..p
    };
    let grid_w = (
        (g.kernel * g.c_in).div_ceil(64) as u32,
        g.c_out.div_ceil(64) as u32,
        split as u32,
    );
    be.launch(KW, grid_w, (128, 1, 1), 0, &pg)?;
    reduce_split(be, partial.as_ref(), (dw, db), (wsize, g.c_out), split)?;
    if dx.is_some() {
        let grid_d = (
            g.c_in.div_ceil(64) as u32,
            (n * g.l_in).div_ceil(64) as u32,
            1,
        );
        be.launch(KD, grid_d, (128, 1, 1), 0, &p)?;
    }
    Ok(dx)
}

/// What [`ctc_loss`] returns: the reduced loss (computed on the host from the per-utterance
/// values, the one device-to-host copy), each utterance's loss, and d loss / d log_probs on the
/// device.
#[derive(Debug)]
pub struct CtcOutput {
    pub loss: f32,
    pub per_utterance: Vec<f32>,
    pub grad: Buf<f32>,
}

/// CTC loss and gradient on the device (kernels/ctc.cu), blank 0, PyTorch's semantics; the same
/// contract and checks as the tape's `ctc_loss`. `log_probs` [frames, v] (log-softmax output),
/// packed as `batch`; `targets[u]` in 1..v, at most as long as utterance u and 1024 labels.
pub fn ctc_loss(
    be: &Backend,
    log_probs: &Buf<f32>,
    v: usize,
    batch: &crate::batch::PackedBatch,
    targets: &[Vec<usize>],
    reduction: crate::ops::ctc::Reduction,
    zero_infinity: bool,
) -> Result<CtcOutput> {
    const K: &str = "ctc_loss";
    let n = batch.num_utterances();
    need(be, K, "log_probs", log_probs, batch.total_frames() * v)?;
    if targets.len() != n || v < 2 {
        return Err(Error::shape(
            K,
            format!("{n} targets and a vocabulary of >= 2 (blank + labels)"),
            format!("{} targets, vocabulary {v}", targets.len()),
        ));
    }
    // One int buffer (one upload): input offsets, target offsets, the labels, and per label the
    // index of its next occurrence in its target (-1 at its last) and whether it is the first.
    let total_labels: usize = targets.iter().map(Vec::len).sum();
    let mut ints: Vec<i32> = Vec::with_capacity(2 * (n + 1) + 3 * total_labels);
    ints.extend(batch.offsets().iter().map(|&o| o as i32));
    ints.push(0);
    let mut scratch_offsets = Vec::with_capacity(n);
    let mut scratch = 0usize;
    for (u, t) in targets.iter().enumerate() {
        if let Some(&bad) = t.iter().find(|&&c| c == 0 || c >= v) {
            return Err(Error::value(
                "ctc target",
                format!("utterance {u} has label {bad}; labels must be in 1..{v} (0 is the blank)"),
            ));
        }
        if t.len() > batch.len_of(u) || t.len() > 1024 {
            return Err(Error::shape(
                K,
                format!(
                    "utterance {u}: a target of at most min(input length {}, 1024) labels",
                    batch.len_of(u)
                ),
                format!("target length {}", t.len()),
            ));
        }
        ints.push(ints[n + 1 + u] + t.len() as i32);
        scratch_offsets.push(scratch as i64);
        scratch += batch.len_of(u) * (2 * t.len() + 1);
    }
    if n == 0 || batch.total_frames() > i32::MAX as usize {
        return Err(Error::shape(
            K,
            "1 or more utterances, under 2^31 frames",
            format!("{n} utterances, {} frames", batch.total_frames()),
        ));
    }
    let labels_at = ints.len();
    ints.extend(targets.iter().flatten().map(|&c| c as i32));
    let mut next_same = vec![-1i32; total_labels];
    let mut first = vec![0i32; total_labels];
    // Walking each target backwards links every label to its next occurrence; what is left in
    // `earliest` at the end is each label's first occurrence.
    let mut earliest = vec![-1i32; v];
    let mut g0 = 0;
    for t in targets {
        for (i, &c) in t.iter().enumerate().rev() {
            next_same[g0 + i] = earliest[c];
            earliest[c] = i as i32;
        }
        for &c in t {
            if earliest[c] >= 0 {
                first[g0 + earliest[c] as usize] = 1;
                earliest[c] = -1;
            }
        }
        g0 += t.len();
    }
    let links_at = ints.len();
    ints.extend_from_slice(&next_same);
    let first_at = ints.len();
    ints.extend_from_slice(&first);
    let ib = be.upload(&ints)?;
    let sb = be.upload(&scratch_offsets)?;
    let (alpha, beta) = (be.output::<f32>(scratch)?, be.output::<f32>(scratch)?);
    let nll = be.output::<f32>(n)?;
    let grad = be.output::<f32>(batch.total_frames() * v)?;
    let at = |i: usize| be.ptr(&ib) + (i * 4) as u64;
    let p = CtcParams {
        lp: be.ptr(log_probs),
        input_offsets: at(0),
        targets: at(labels_at),
        target_offsets: at(n + 1),
        next_same: at(links_at),
        first: at(first_at),
        scratch_offsets: be.ptr(&sb),
        alpha: be.ptr(&alpha),
        beta: be.ptr(&beta),
        nll: be.ptr(&nll),
        grad: be.ptr(&grad),
        n: n as i32,
        frames: batch.total_frames() as i32,
        v: v as i32,
        blank: 0,
        mean: (reduction == crate::ops::ctc::Reduction::Mean) as i32,
        zero_infinity: zero_infinity as i32,
    };
    be.launch(
        "ctc_alpha_beta",
        (n as u32, 2, 1),
        (CTC_THREADS, 1, 1),
        0,
        &p,
    )?;
    let blocks = batch.total_frames().div_ceil(CTC_GRAD_WARPS);
    be.launch(
        "ctc_grad",
        (blocks as u32, 1, 1),
        (32 * CTC_GRAD_WARPS as u32, 1, 1),
        0,
        &p,
    )?;
    let per_utterance = be.download(&nll)?;
    let loss = per_utterance
        .iter()
        .zip(targets)
        .map(|(&l, t)| match reduction {
            crate::ops::ctc::Reduction::Mean => l * (1.0 / (t.len().max(1) * n) as f32),
            crate::ops::ctc::Reduction::Sum => l,
        })
        .sum();
    Ok(CtcOutput {
        loss,
        per_utterance,
        grad,
    })
}

/// Softmax cross-entropy of `logits` [rows, classes] against `labels` (each < classes) on the
/// device, fused with d loss / d logits (kernels/cross_entropy.cu). Returns the reduced loss
/// (summed on the host from the per-row losses) and the logit gradient on the device.
pub fn cross_entropy(
    be: &Backend,
    logits: &Buf<f32>,
    classes: usize,
    labels: &[usize],
    reduction: crate::ops::ctc::Reduction,
) -> Result<(f32, Buf<f32>)> {
    const K: &str = "cross_entropy_fwd_bwd";
    let rows = labels.len();
    if rows == 0 || classes == 0 || rows > i32::MAX as usize {
        return Err(Error::shape(
            K,
            "at least one row and one class",
            format!("{rows} rows, {classes} classes"),
        ));
    }
    need(be, K, "logits", logits, rows * classes)?;
    if let Some((i, &bad)) = labels.iter().enumerate().find(|(_, &y)| y >= classes) {
        return Err(Error::value(
            "class label",
            format!("example {i} has label {bad}; the head has {classes} classes (0..{classes})"),
        ));
    }
    let lab: Vec<i32> = labels.iter().map(|&y| y as i32).collect();
    let lb = be.upload(&lab)?;
    let loss_rows = be.zeros::<f32>(rows)?;
    let dlogits = be.zeros::<f32>(rows * classes)?;
    let mean = reduction == crate::ops::ctc::Reduction::Mean;
    let p = CrossEntropyParams {
        logits: be.ptr(logits),
        labels: be.ptr(&lb),
        loss_rows: be.ptr(&loss_rows),
        dlogits: be.ptr(&dlogits),
        rows: rows as i32,
        classes: classes as i32,
        mean: mean as i32,
    };
    be.launch(K, (rows as u32, 1, 1), (256, 1, 1), 0, &p)?;
    let per_row = be.download(&loss_rows)?;
    let total: f32 = per_row.iter().sum();
    let scale = if mean { 1.0 / rows as f32 } else { 1.0 };
    Ok((total * scale, dlogits))
}

fn rows_check(kernel: &str, rows: usize, d: usize) -> Result<()> {
    if rows == 0 || d == 0 || rows > 65535 * 1024 || rows * d > i32::MAX as usize {
        return Err(Error::shape(
            kernel,
            "1 to 2^31 elements, rows and columns >= 1",
            format!("{rows} x {d}"),
        ));
    }
    Ok(())
}

/// Log-softmax over the rows of `x` [rows, d] (kernels/softmax.cu).
pub fn log_softmax_forward(be: &Backend, x: &Buf<f32>, rows: usize, d: usize) -> Result<Buf<f32>> {
    const K: &str = "log_softmax_forward";
    rows_check(K, rows, d)?;
    need(be, K, "x", x, rows * d)?;
    let y = be.output::<f32>(rows * d)?;
    let p = LogSoftmaxParams {
        x: be.ptr(x),
        dy: 0,
        out: be.ptr(&y),
        rows: rows as i32,
        d: d as i32,
    };
    be.launch(K, (rows as u32, 1, 1), (256, 1, 1), 0, &p)?;
    Ok(y)
}

/// dx of log-softmax from its output `y` and the output gradient `dy`, both [rows, d].
pub fn log_softmax_backward(
    be: &Backend,
    y: &Buf<f32>,
    dy: &Buf<f32>,
    rows: usize,
    d: usize,
) -> Result<Buf<f32>> {
    const K: &str = "log_softmax_backward";
    rows_check(K, rows, d)?;
    need(be, K, "y", y, rows * d)?;
    need(be, K, "dy", dy, rows * d)?;
    let dx = be.output::<f32>(rows * d)?;
    let p = LogSoftmaxParams {
        x: be.ptr(y),
        dy: be.ptr(dy),
        out: be.ptr(&dx),
        rows: rows as i32,
        d: d as i32,
    };
    be.launch(K, (rows as u32, 1, 1), (256, 1, 1), 0, &p)?;
    Ok(dx)
}

/// The channel blocks of the pooling kernels that take 32 channels a block along grid.y.
pub(crate) fn pool_channel_blocks(kernel: &str, c: usize) -> Result<u32> {
    if c.div_ceil(32) > 65535 {
        return Err(Error::shape(
            kernel,
            "at most 65535 x 32 channels",
            format!("{c}"),
        ));
    }
    Ok(c.div_ceil(32) as u32)
}

fn pool_params(
    be: &Backend,
    kernel: &str,
    batch: &crate::batch::PackedBatch,
    c: usize,
) -> Result<(Buf<i32>, usize, usize)> {
    let (u, frames) = (batch.num_utterances(), batch.total_frames());
    rows_check(kernel, frames.max(u), c)?;
    let offsets: Vec<i32> = batch.offsets().iter().map(|&o| o as i32).collect();
    Ok((be.upload(&offsets)?, u, frames))
}

/// Mean of each utterance's frames: x [frames, c] -> [utterances, c] (kernels/pooling.cu).
pub fn mean_pool_forward(
    be: &Backend,
    x: &Buf<f32>,
    batch: &crate::batch::PackedBatch,
    c: usize,
) -> Result<Buf<f32>> {
    const K: &str = "mean_pool_forward";
    let (offsets, u, frames) = pool_params(be, K, batch, c)?;
    need(be, K, "x", x, frames * c)?;
    let y = be.output::<f32>(u * c)?;
    let p = MeanPoolParams {
        input: be.ptr(x),
        offsets: be.ptr(&offsets),
        out: be.ptr(&y),
        utterances: u as i32,
        frames: frames as i32,
        c: c as i32,
    };
    // A block of 8 warps per utterance and 32 channels (kernels/pooling.cu).
    let blocks = pool_channel_blocks(K, c)?;
    be.launch(K, (u as u32, blocks, 1), (256, 1, 1), 0, &p)?;
    Ok(y)
}

/// Backward of [`mean_pool_forward`]: dy [utterances, c] -> dx [frames, c].
pub fn mean_pool_backward(
    be: &Backend,
    dy: &Buf<f32>,
    batch: &crate::batch::PackedBatch,
    c: usize,
) -> Result<Buf<f32>> {
    const K: &str = "mean_pool_backward";
    let (offsets, u, frames) = pool_params(be, K, batch, c)?;
    need(be, K, "dy", dy, u * c)?;
    let dx = be.output::<f32>(frames * c)?;
    let p = MeanPoolParams {
        input: be.ptr(dy),
        offsets: be.ptr(&offsets),
        out: be.ptr(&dx),
        utterances: u as i32,
        frames: frames as i32,
        c: c as i32,
    };
    be.launch(K, (frames.min(65535) as u32, 1, 1), (256, 1, 1), 0, &p)?;
    Ok(dx)
}

/// Seeded inverted dropout of `x` (n elements) with the CPU's exact mask (kernels/dropout.cu,
/// src/ops/dropout.rs); the backward is the same call on dy with the same seed.
pub fn dropout(be: &Backend, x: &Buf<f32>, p: f64, seed: u64) -> Result<Buf<f32>> {
    const K: &str = "dropout_apply";
    if !(0.0..=1.0).contains(&p) {
        return Err(Error::value(
            "dropout probability",
            format!("{p} is not in [0, 1]"),
        ));
    }
    let n = x.len();
    if n == 0 || p >= 1.0 {
        // Everything dropped: no launch, so the zeros must come from the allocation.
        return be.zeros::<f32>(n);
    }
    let y = be.output::<f32>(n)?;
    let a = DropoutParams {
        x: be.ptr(x),
        y: be.ptr(&y),
        n: n as i64,
        seed,
        p,
        scale: (1.0 / (1.0 - p)) as f32,
    };
    be.launch(
        K,
        (n.div_ceil(256).min(65535) as u32, 1, 1),
        (256, 1, 1),
        0,
        &a,
    )?;
    Ok(y)
}

/// LayerNorm statistics saved by [`layernorm_forward`] for the backward.
pub struct LayerNormSavedBufs {
    pub mean: Buf<f32>,
    pub rstd: Buf<f32>,
}

/// LayerNorm of `x` [rows, d] with optional affine (weight, bias) (kernels/layernorm.cu).
pub fn layernorm_forward(
    be: &Backend,
    x: &Buf<f32>,
    rows: usize,
    d: usize,
    affine: Option<(&Buf<f32>, &Buf<f32>)>,
    eps: f64,
) -> Result<(Buf<f32>, LayerNormSavedBufs)> {
    match layernorm_forward_any(be, AnyBuf::F32(x), rows, d, affine, eps, false)? {
        (LayerOut::F32(y), saved) => Ok((y, saved)),
        (LayerOut::Bf16(_), _) => Err(Error::Config(
            "layernorm_forward: asked for fp32, wrote bf16".into(),
        )),
    }
}

/// [`layernorm_forward`] of fp32 or bf16 rows, into bf16 with `out_bf16`: the same fp32 math,
/// the input widened exactly and the output rounded once (what casts around the fp32 LayerNorm
/// give, in one pass).
pub fn layernorm_forward_any(
    be: &Backend,
    x: AnyBuf,
    rows: usize,
    d: usize,
    affine: Option<(&Buf<f32>, &Buf<f32>)>,
    eps: f64,
    out_bf16: bool,
) -> Result<(LayerOut, LayerNormSavedBufs)> {
    const K: &str = "layernorm_forward";
    rows_check(K, rows, d)?;
    x.need(be, K, "x", rows * d)?;
    if let Some((w, b)) = affine {
        need(be, K, "weight", w, d)?;
        need(be, K, "bias", b, d)?;
    }
    let y = if out_bf16 {
        LayerOut::Bf16(be.output::<bf16>(rows * d)?)
    } else {
        LayerOut::F32(be.output::<f32>(rows * d)?)
    };
    let saved = LayerNormSavedBufs {
        mean: be.output::<f32>(rows)?,
        rstd: be.output::<f32>(rows)?,
    };
    let (px, x_bf16) = x.parts(be);
    let p = LayerNormFwdParams {
        x: px,
        w: affine.map_or(0, |a| be.ptr(a.0)),
        b: affine.map_or(0, |a| be.ptr(a.1)),
        y: match &y {
            LayerOut::F32(y) => be.ptr(y),
            LayerOut::Bf16(y) => be.ptr(y),
        },
        mean: be.ptr(&saved.mean),
        rstd: be.ptr(&saved.rstd),
        rows: rows as i32,
        d: d as i32,
        eps: eps as f32,
        x_bf16,
        y_bf16: out_bf16 as i32,
    };
    be.launch(K, (rows as u32, 1, 1), (256, 1, 1), 0, &p)?;
    Ok((y, saved))
}

/// LayerNorm backward: returns dx; with affine, ADDS the weight and bias gradients to `dparams`.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    be: &Backend,
    x: &Buf<f32>,
    rows: usize,
    d: usize,
    weight: Option<&Buf<f32>>,
    saved: &LayerNormSavedBufs,
    dy: &Buf<f32>,
    dparams: Option<(&Buf<f32>, &Buf<f32>)>,
) -> Result<Buf<f32>> {
    layernorm_backward_with(
        be,
        AnyBuf::F32(x),
        rows,
        d,
        weight,
        saved,
        dy,
        dparams,
        true,
    )?
    .ok_or_else(|| Error::Config("layernorm_backward: dx was asked for".into()))
}

/// [`layernorm_backward`], dx only if `need_dx`: an input that takes no gradient (the frozen
/// stack CLS pooling normalizes, 208,000 rows at 32 x 500 frames of 13 layers) costs its
/// parameters' gradients alone, not a [rows, d] fp32 write.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward_with(
    be: &Backend,
    x: AnyBuf,
    rows: usize,
    d: usize,
    weight: Option<&Buf<f32>>,
    saved: &LayerNormSavedBufs,
    dy: &Buf<f32>,
    dparams: Option<(&Buf<f32>, &Buf<f32>)>,
    need_dx: bool,
) -> Result<Option<Buf<f32>>> {
    const K: &str = "layernorm_backward";
    if !need_dx && dparams.is_none() {
        return Err(Error::Config(format!(
            "{K}: neither dx nor the affine parameters' gradients asked for: nothing to compute"
        )));
    }
    rows_check(K, rows, d)?;
    x.need(be, K, "x", rows * d)?;
    need(be, K, "dy", dy, rows * d)?;
    need(be, K, "mean", &saved.mean, rows)?;
    need(be, K, "rstd", &saved.rstd, rows)?;
    if weight.is_some() != dparams.is_some() {
        return Err(Error::Config(format!(
            "{K}: the affine weight and its gradient buffers come together"
        )));
    }
    if let (Some(w), Some((dw, db))) = (weight, dparams) {
        need(be, K, "weight", w, d)?;
        need(be, K, "weight gradient", dw, d)?;
        need(be, K, "bias gradient", db, d)?;
    }
    // LN_ROWS_PER_BLOCK of kernels/layernorm.cu.
    let blocks = rows.div_ceil(8);
    let partial = match dparams {
        Some(_) => Some(be.zeros::<f32>(blocks * 2 * d)?),
        None => None,
    };
    let dx = need_dx.then(|| be.output::<f32>(rows * d)).transpose()?;
    let (px, x_bf16) = x.parts(be);
    let p = LayerNormBwdParams {
        x: px,
        w: weight.map_or(0, |w| be.ptr(w)),
        dy: be.ptr(dy),
        mean: be.ptr(&saved.mean),
        rstd: be.ptr(&saved.rstd),
        dx: dx.as_ref().map_or(0, |b| be.ptr(b)),
        partial: partial.as_ref().map_or(0, |b| be.ptr(b)),
        rows: rows as i32,
        d: d as i32,
        x_bf16,
    };
    be.launch(K, (blocks as u32, 1, 1), (256, 1, 1), 0, &p)?;
    if let (Some(part), Some((dw, db))) = (&partial, dparams) {
        let r = LayerNormReduceParams {
            partial: be.ptr(part),
            dw: be.ptr(dw),
            db: be.ptr(db),
            blocks: blocks as i32,
            d: d as i32,
        };
        // 8 warps per 32 columns (FRAME_SUM_WARPS of kernels/common.cuh).
        be.launch(
            "layernorm_param_reduce",
            (d.div_ceil(32) as u32, 1, 1),
            (256, 1, 1),
            0,
            &r,
        )?;
    }
    Ok(dx)
}

/// fp32 -> bf16 on the device (round to nearest even, as `half::bf16::from_f32`).
pub fn cast_to_bf16(be: &Backend, x: &Buf<f32>) -> Result<Buf<bf16>> {
    cast_to_bf16_scaled(be, x, 1.0)
}

/// bf16(scale * x): a gradient scaled on its way into a bf16 backward (1 / micro-batches).
pub fn cast_to_bf16_scaled(be: &Backend, x: &Buf<f32>, scale: f32) -> Result<Buf<bf16>> {
    const K: &str = "cast_f32_to_bf16";
    let n = x.len();
    need(be, K, "x", x, n)?;
    let y = be.output::<bf16>(n)?;
    let p = CastParams {
        x: be.ptr(x),
        y: be.ptr(&y),
        n: n as i64,
        scale,
    };
    // A thread per 4 values (kernels/convert.cu).
    launch_elementwise(be, K, n.div_ceil(4), &p)?;
    Ok(y)
}

/// bf16 -> fp32 on the device (exact).
pub fn cast_to_f32(be: &Backend, x: &Buf<bf16>) -> Result<Buf<f32>> {
    const K: &str = "cast_bf16_to_f32";
    let n = x.len();
    need(be, K, "x", x, n)?;
    let y = be.output::<f32>(n)?;
    let p = WidenParams {
        x: be.ptr(x),
        y: be.ptr(&y),
        n: n as i64,
    };
    launch_elementwise(be, K, n.div_ceil(4), &p)?;
    Ok(y)
}

/// A grid-stride elementwise kernel of `n` threads' work (256-thread blocks, at most 65535 of them:
/// the kernel strides past); nothing to do for 0.
fn launch_elementwise<P: crate::runtime::kernels::KernelParams + cudarc::driver::DeviceRepr>(
    be: &Backend,
    kernel: &'static str,
    n: usize,
    p: &P,
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let blocks = n.div_ceil(256).min(65535) as u32;
    be.launch(kernel, (blocks, 1, 1), (256, 1, 1), 0, p)
}

/// s3prl's `normalize` of a frozen bf16 stack: every row of `d` values LayerNorm-ed (no affine,
/// eps 1e-5, fp32 statistics), bf16 out.
pub fn layernorm_rows_bf16(
    be: &Backend,
    x: &Buf<bf16>,
    rows: usize,
    d: usize,
) -> Result<Buf<bf16>> {
    const K: &str = "layernorm_rows_bf16";
    rows_check(K, rows, d)?;
    need(be, K, "x", x, rows * d)?;
    let y = be.output::<bf16>(rows * d)?;
    let p = LayerNormRowsParams {
        x: be.ptr(x),
        y: be.ptr(&y),
        rows: rows as i64,
        d: d as i32,
        eps: 1e-5,
    };
    // LN_ROWS_WARPS rows (one warp each) per block.
    be.launch(K, (rows.div_ceil(8) as u32, 1, 1), (256, 1, 1), 0, &p)?;
    Ok(y)
}

/// The single-layer interface: layer `layer` of the bf16 stack [n, l, d] as [n, d]
/// (kernels/shape.cu). A negative `layer` counts from the end, as the CPU interface's.
pub fn select_layer(
    be: &Backend,
    x: &Buf<bf16>,
    n: usize,
    l: usize,
    d: usize,
    layer: i64,
) -> Result<Buf<bf16>> {
    const K: &str = "select_layer";
    let idx = if layer < 0 { l as i64 + layer } else { layer };
    if idx < 0 || idx >= l as i64 {
        return Err(Error::value(
            "layer",
            format!("{layer} is outside the stack's {l} layers"),
        ));
    }
    rows_check(K, n, l * d)?;
    need(be, K, "stack", x, n * l * d)?;
    let y = be.output::<bf16>(n * d)?;
    let p = SelectLayerParams {
        x: be.ptr(x),
        y: be.ptr(&y),
        n: n as i32,
        l: l as i32,
        d: d as i32,
        layer: idx as i32,
    };
    let per_row = if d.is_multiple_of(8) { d / 8 } else { d };
    be.launch(
        K,
        ((n * per_row).div_ceil(256).min(65535) as u32, 1, 1),
        (256, 1, 1),
        0,
        &p,
    )?;
    Ok(y)
}

/// A Linear layer's geometry as the layer-axis conv kernels see it: one layer, kernel 1.
fn linear_geom(in_f: usize, out_f: usize) -> ConvGeom {
    ConvGeom {
        l_in: 1,
        c_in: in_f,
        c_out: out_f,
        kernel: 1,
        stride: 1,
        pad: 0,
    }
}

/// y = x W^T + b on tensor cores: x bf16 [rows, in_f], `w` bf16 [out_f, in_f] (PyTorch's layout),
/// fp32 accumulation; y bf16, or fp32 with `out_f32` (logits). Runs the layer-axis conv kernels at
/// one layer and kernel 1, where their implicit GEMM is the plain GEMM.
#[allow(clippy::too_many_arguments)]
pub fn linear_forward(
    be: &Backend,
    x: &Buf<bf16>,
    rows: usize,
    in_f: usize,
    out_f: usize,
    w: &Buf<bf16>,
    b: &Buf<f32>,
    out_f32: bool,
) -> Result<LayerOut> {
    conv_forward(
        be,
        tensor_core_path(),
        x,
        rows,
        &linear_geom(in_f, out_f),
        w,
        b,
        false,
        false,
        out_f32,
    )
}

/// relu(x W^T + b) in bf16, the ReLU and the rounding in the GEMM's epilogue: what Linear (fp32
/// out), ReLU and a cast to bf16 compute in three passes over an fp32 [rows, out_f] (the same
/// values: ReLU and rounding to bf16 commute, and a positive float never rounds to a bf16 zero).
#[allow(clippy::too_many_arguments)]
pub fn linear_relu_forward(
    be: &Backend,
    x: &Buf<bf16>,
    rows: usize,
    in_f: usize,
    out_f: usize,
    w: &Buf<bf16>,
    b: &Buf<f32>,
) -> Result<Buf<bf16>> {
    match conv_forward(
        be,
        tensor_core_path(),
        x,
        rows,
        &linear_geom(in_f, out_f),
        w,
        b,
        false,
        true,
        false,
    )? {
        LayerOut::Bf16(y) => Ok(y),
        LayerOut::F32(_) => Err(Error::Config(
            "linear_relu_forward: the epilogue wrote fp32".into(),
        )),
    }
}

/// Backward of [`linear_relu_forward`] from dy (bf16 [rows, out_f]) through the ReLU's mask (its
/// output `y` > 0): ADDS dW and db to `grads`, returns dx (bf16 [rows, in_f]) when `want_dx`.
#[allow(clippy::too_many_arguments)]
pub fn linear_relu_backward(
    be: &Backend,
    x: &Buf<bf16>,
    y: &Buf<bf16>,
    rows: usize,
    in_f: usize,
    out_f: usize,
    w: &Buf<bf16>,
    dy: &Buf<bf16>,
    grads: (&Buf<f32>, &Buf<f32>),
    want_dx: bool,
) -> Result<Option<Buf<bf16>>> {
    let shape = (rows, in_f, out_f);
    linear_backward_masked(be, x, Some(y), shape, w, dy, grads, want_dx)
}

/// Backward of [`linear_forward`] from dy (bf16 [rows, out_f]): ADDS dW [out_f, in_f] and db to
/// `grads` (deterministic), returns dx (bf16 [rows, in_f]) when `want_dx`.
#[allow(clippy::too_many_arguments)]
pub fn linear_backward(
    be: &Backend,
    x: &Buf<bf16>,
    rows: usize,
    in_f: usize,
    out_f: usize,
    w: &Buf<bf16>,
    dy: &Buf<bf16>,
    grads: (&Buf<f32>, &Buf<f32>),
    want_dx: bool,
) -> Result<Option<Buf<bf16>>> {
    let shape = (rows, in_f, out_f);
    linear_backward_masked(be, x, None, shape, w, dy, grads, want_dx)
}

/// [`linear_backward`], dy first masked by `relu_out` > 0 where given; `shape`: (rows, in_f,
/// out_f).
#[allow(clippy::too_many_arguments)]
fn linear_backward_masked(
    be: &Backend,
    x: &Buf<bf16>,
    relu_out: Option<&Buf<bf16>>,
    (rows, in_f, out_f): (usize, usize, usize),
    w: &Buf<bf16>,
    dy: &Buf<bf16>,
    grads: (&Buf<f32>, &Buf<f32>),
    want_dx: bool,
) -> Result<Option<Buf<bf16>>> {
    let inputs = ConvBwdInputs {
        x,
        relu_out,
        w,
        flatten: false,
    };
    conv_backward(
        be,
        tensor_core_path(),
        &inputs,
        rows,
        &linear_geom(in_f, out_f),
        dy,
        grads,
        want_dx,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_grad_split_covers_every_row_once() {
        let g = |l_in, c_in, c_out| ConvGeom {
            l_in,
            c_in,
            c_out,
            kernel: 5,
            stride: 3,
            pad: 2,
        };
        // HuBERT-Base at 32 x 500 frames: 180 and 90 dW tiles -> 7 chunks (5 waves of a seventh:
        // 0.71, where 2 chunks took 2 waves of a half: 1.0) and 8 (3 waves of an eighth).
        assert_eq!(weight_grad_split(16000 * 5, &g(13, 768, 768)).0, 7);
        assert_eq!(weight_grad_split(16000 * 2, &g(5, 768, 384)).0, 8);
        // HuBERT-Large's first conv: 320 tiles -> 4 chunks (1.25 waves of time, unsplit 2).
        assert_eq!(weight_grad_split(16000 * 9, &g(25, 1024, 1024)).0, 4);
        // Few rows: no split.
        assert_eq!(weight_grad_split(15, &g(13, 768, 768)), (1, 32));
        // The general kernel: the ML-SUPERB head's first conv as a Linear over 9-wide patches
        // (32 x 249 x 39 rows, 4 tiles) -> 64 chunks; few rows, or a wide weight, fewer.
        let linear = linear_geom;
        assert_eq!(
            general_weight_grad_split(32 * 249 * 39, &linear(9, 256)).0,
            64
        );
        assert_eq!(general_weight_grad_split(9000, &linear(9, 20)).0, 4);
        assert_eq!(general_weight_grad_split(100, &linear(9, 20)).0, 1);
        assert_eq!(general_weight_grad_split(1 << 20, &linear(4001, 4001)).0, 1);
        for rows in [1usize, 31, 4096, 9000, 310_752] {
            for geom in [linear(9, 256), g(13, 100, 100), linear(4001, 3)] {
                let (split, per) = general_weight_grad_split(rows, &geom);
                assert!(per % 32 == 0 && split * per >= rows && (split - 1) * per < rows);
                assert!((1..=64).contains(&split));
            }
        }
        for rows in [1usize, 31, 4096, 5000, 80_000, 123_457] {
            for geom in [g(13, 768, 768), g(4, 24, 24), g(25, 1024, 1024)] {
                let (split, per) = weight_grad_split(rows, &geom);
                assert!(per % 32 == 0 && split * per >= rows && (split - 1) * per < rows);
                assert!((1..=8).contains(&split));
            }
        }
    }
}

/// Shape of CLS pooling's attention: n frames, each with the shared CLS token and `l` layer
/// tokens of width `d` in `heads` heads.
#[derive(Clone, Copy, Debug)]
pub struct ClsAttnShape {
    pub n: usize,
    pub l: usize,
    pub d: usize,
    pub heads: usize,
}

impl ClsAttnShape {
    fn check(&self, kernel: &str) -> Result<()> {
        if self.n == 0
            || self.heads == 0
            || !self.d.is_multiple_of(self.heads)
            || self.l + 1 > 96
            || self.n * self.l * self.d > i32::MAX as usize
        {
            return Err(Error::shape(
                kernel,
                "frames >= 1, D divisible by the heads, at most 95 layer tokens",
                format!("{self:?}"),
            ));
        }
        Ok(())
    }
    fn scale(&self) -> f32 {
        (1.0 / ((self.d / self.heads) as f64).sqrt()) as f32
    }
}

/// The CLS query's inputs: the projected query (fp32 [d]), the CLS token's key and value rows
/// (bf16 [d]) and the layer tokens' keys and values (bf16 [n, l, d]).
pub struct ClsAttnInputs<'a> {
    pub q: &'a Buf<f32>,
    pub k_cls: &'a Buf<bf16>,
    pub v_cls: &'a Buf<bf16>,
    pub k: &'a Buf<bf16>,
    pub v: &'a Buf<bf16>,
}

fn cls_attn_check(be: &Backend, k: &str, s: &ClsAttnShape, i: &ClsAttnInputs) -> Result<()> {
    s.check(k)?;
    need(be, k, "q", i.q, s.d)?;
    need(be, k, "k_cls", i.k_cls, s.d)?;
    need(be, k, "v_cls", i.v_cls, s.d)?;
    need(be, k, "k", i.k, s.n * s.l * s.d)?;
    need(be, k, "v", i.v, s.n * s.l * s.d)
}

fn cls_attn_block(s: &ClsAttnShape) -> u32 {
    32 * s.heads.min(8) as u32
}

/// Attention of the shared CLS query over each frame's tokens: (out bf16 [n, d], probabilities
/// fp32 [n, heads, l + 1]) (kernels/attention.cu).
pub fn cls_attention_forward(
    be: &Backend,
    s: ClsAttnShape,
    i: &ClsAttnInputs,
) -> Result<(Buf<bf16>, Buf<f32>)> {
    const K: &str = "cls_attention_forward";
    cls_attn_check(be, K, &s, i)?;
    let out = be.output::<bf16>(s.n * s.d)?;
    let probs = be.output::<f32>(s.n * s.heads * (s.l + 1))?;
    let p = ClsAttnParams {
        q: be.ptr(i.q),
        k_cls: be.ptr(i.k_cls),
        v_cls: be.ptr(i.v_cls),
        k: be.ptr(i.k),
        v: be.ptr(i.v),
        probs: be.ptr(&probs),
        out: be.ptr(&out),
        dout: 0,
        dk: 0,
        dv: 0,
        dq_part: 0,
        dk_cls_part: 0,
        dv_cls_part: 0,
        n: s.n as i32,
        l: s.l as i32,
        d: s.d as i32,
        h: s.heads as i32,
        scale: s.scale(),
    };
    be.launch(K, (s.n as u32, 1, 1), (cls_attn_block(&s), 1, 1), 0, &p)?;
    Ok((out, probs))
}

/// The gradients of [`cls_attention_forward`] given dout (fp32 [n, d]).
pub struct ClsAttnGrads {
    /// The layer tokens' key and value gradients, bf16 [n, l, d] (what the projections' backward
    /// reads).
    pub dk: Buf<bf16>,
    pub dv: Buf<bf16>,
    /// Summed over the frames (the query and the CLS rows are shared), fp32 [d].
    pub dq: Buf<f32>,
    pub dk_cls: Buf<f32>,
    pub dv_cls: Buf<f32>,
}

pub fn cls_attention_backward(
    be: &Backend,
    s: ClsAttnShape,
    i: &ClsAttnInputs,
    probs: &Buf<f32>,
    dout: &Buf<f32>,
) -> Result<ClsAttnGrads> {
    const K: &str = "cls_attention_backward";
    cls_attn_check(be, K, &s, i)?;
    need(be, K, "probs", probs, s.n * s.heads * (s.l + 1))?;
    need(be, K, "dout", dout, s.n * s.d)?;
    let parts: Vec<Buf<f32>> = (0..3)
        .map(|_| be.zeros::<f32>(s.n * s.d))
        .collect::<Result<_>>()?;
    let g = ClsAttnGrads {
        dk: be.output::<bf16>(s.n * s.l * s.d)?,
        dv: be.output::<bf16>(s.n * s.l * s.d)?,
        dq: be.zeros::<f32>(s.d)?,
        dk_cls: be.zeros::<f32>(s.d)?,
        dv_cls: be.zeros::<f32>(s.d)?,
    };
    let p = ClsAttnParams {
        q: be.ptr(i.q),
        k_cls: be.ptr(i.k_cls),
        v_cls: be.ptr(i.v_cls),
        k: be.ptr(i.k),
        v: be.ptr(i.v),
        probs: be.ptr(probs),
        out: 0,
        dout: be.ptr(dout),
        dk: be.ptr(&g.dk),
        dv: be.ptr(&g.dv),
        dq_part: be.ptr(&parts[0]),
        dk_cls_part: be.ptr(&parts[1]),
        dv_cls_part: be.ptr(&parts[2]),
        n: s.n as i32,
        l: s.l as i32,
        d: s.d as i32,
        h: s.heads as i32,
        scale: s.scale(),
    };
    be.launch(K, (s.n as u32, 1, 1), (cls_attn_block(&s), 1, 1), 0, &p)?;
    for (part, total) in parts.iter().zip([&g.dq, &g.dk_cls, &g.dv_cls]) {
        col_sum_accumulate(be, part, s.n, s.d, total)?;
    }
    Ok(g)
}

/// y [rows, c] = a (+ b) (+ v broadcast over the rows), fp32 (kernels/elementwise.cu).
pub fn add_rows(
    be: &Backend,
    a: &Buf<f32>,
    b: Option<&Buf<f32>>,
    v: Option<&Buf<f32>>,
    rows: usize,
    c: usize,
) -> Result<Buf<f32>> {
    const K: &str = "add_rows";
    rows_check(K, rows, c)?;
    need(be, K, "a", a, rows * c)?;
    if let Some(b) = b {
        need(be, K, "b", b, rows * c)?;
    }
    if let Some(v) = v {
        need(be, K, "v", v, c)?;
    }
    let y = be.output::<f32>(rows * c)?;
    let p = AddRowsParams {
        a: be.ptr(a),
        b: b.map_or(0, |b| be.ptr(b)),
        v: v.map_or(0, |v| be.ptr(v)),
        y: be.ptr(&y),
        rows: rows as i64,
        c: c as i32,
    };
    launch_elementwise(be, K, rows * c, &p)?;
    Ok(y)
}

/// A device buffer that a kernel reads in either dtype, fp32 or bf16 (widened exactly):
/// [`add_grads`]' gradients, LayerNorm's input.
#[derive(Clone, Copy)]
pub enum AnyBuf<'a> {
    F32(&'a Buf<f32>),
    Bf16(&'a Buf<bf16>),
}

impl AnyBuf<'_> {
    fn len(&self) -> usize {
        match self {
            AnyBuf::F32(b) => b.len(),
            AnyBuf::Bf16(b) => b.len(),
        }
    }

    /// [`need`] for either dtype.
    fn need(&self, be: &Backend, kernel: &str, what: &str, want: usize) -> Result<()> {
        match self {
            AnyBuf::F32(b) => need(be, kernel, what, b, want),
            AnyBuf::Bf16(b) => need(be, kernel, what, b, want),
        }
    }

    fn parts(&self, be: &Backend) -> (u64, i32) {
        match self {
            AnyBuf::F32(b) => (be.ptr(*b), 0),
            AnyBuf::Bf16(b) => (be.ptr(*b), 1),
        }
    }
}

/// a + b in fp32 (kernels/elementwise.cu), each fp32 or bf16: what `cast_to_f32` of each and
/// [`add_rows`] give, in one pass.
pub fn add_grads(be: &Backend, a: AnyBuf, b: AnyBuf) -> Result<Buf<f32>> {
    const K: &str = "add_grads";
    let n = a.len();
    b.need(be, K, "b", n)?;
    let y = be.output::<f32>(n)?;
    let ((pa, a_bf16), (pb, b_bf16)) = (a.parts(be), b.parts(be));
    let p = AddGradsParams {
        a: pa,
        b: pb,
        y: be.ptr(&y),
        n: n as i64,
        a_bf16,
        b_bf16,
    };
    // A thread per 4 values (kernels/elementwise.cu).
    launch_elementwise(be, K, n.div_ceil(4), &p)?;
    Ok(y)
}

/// out [c] += the sum of x's rows [rows, c] in a fixed order (deterministic): per column, 16
/// partial sums over the rows r = w (mod 16), each in row order, then added for w = 0, 1, ...
pub fn col_sum_accumulate(
    be: &Backend,
    x: &Buf<f32>,
    rows: usize,
    c: usize,
    out: &Buf<f32>,
) -> Result<()> {
    const K: &str = "col_sum_accumulate";
    rows_check(K, rows, c)?;
    need(be, K, "x", x, rows * c)?;
    need(be, K, "out", out, c)?;
    let p = ColSumParams {
        x: be.ptr(x),
        out: be.ptr(out),
        rows: rows as i64,
        c: c as i32,
    };
    // 16 warps per 32 columns (COL_SUM_WARPS of kernels/elementwise.cu).
    be.launch(K, (c.div_ceil(32) as u32, 1, 1), (512, 1, 1), 0, &p)
}

/// ReLU or exact GELU of fp32 x.
pub fn activation_forward(be: &Backend, x: &Buf<f32>, gelu: bool) -> Result<Buf<f32>> {
    activation(be, "activation_forward", x, None, gelu)
}

/// dx = dy * act'(x), x the pre-activation.
pub fn activation_backward(
    be: &Backend,
    x: &Buf<f32>,
    dy: &Buf<f32>,
    gelu: bool,
) -> Result<Buf<f32>> {
    activation(be, "activation_backward", x, Some(dy), gelu)
}

fn activation(
    be: &Backend,
    k: &'static str,
    x: &Buf<f32>,
    dy: Option<&Buf<f32>>,
    gelu: bool,
) -> Result<Buf<f32>> {
    let n = x.len();
    need(be, k, "x", x, n)?;
    if let Some(dy) = dy {
        need(be, k, "dy", dy, n)?;
    }
    let y = be.output::<f32>(n)?;
    let p = ActivationParams {
        x: be.ptr(x),
        dy: dy.map_or(0, |d| be.ptr(d)),
        y: be.ptr(&y),
        n: n as i64,
        gelu: gelu as i32,
    };
    launch_elementwise(be, k, n, &p)?;
    Ok(y)
}

/// The table of parameter buffers one [`adam_step_multi`] launch updates: (param, grad, exp_avg,
/// exp_avg_sq, optional bf16 copy) per tensor, checked and uploaded once. The table holds the
/// buffers' addresses: they must outlive it and not be replaced.
pub struct AdamTensors {
    table: Buf<AdamTensor>,
    count: usize,
    /// adam_step_multi's blocks: every tensor's ceil(n / ADAM_MULTI_CHUNK), at least one.
    blocks_total: usize,
    /// The squared-sum partials of all the gradients (see [`clip_coefficient_table`]).
    parts_total: usize,
}

/// One tensor for [`AdamTensors::new`]: (param, grad, exp_avg, exp_avg_sq, bf16 copy).
pub type AdamBufs<'a> = (
    &'a Buf<f32>,
    &'a Buf<f32>,
    &'a Buf<f32>,
    &'a Buf<f32>,
    Option<&'a Buf<bf16>>,
);

impl AdamTensors {
    /// Refuses a table built on another backend (its addresses mean nothing there).
    fn check_on(&self, be: &Backend, kernel: &str) -> Result<()> {
        if !self.table.is_on(be) {
            return Err(Error::Config(format!(
                "{kernel}: the tensor table belongs to another backend than {}",
                be.name()
            )));
        }
        Ok(())
    }

    pub fn new(be: &Backend, tensors: &[AdamBufs]) -> Result<Self> {
        const K: &str = "adam_step_multi";
        if tensors.is_empty() || tensors.len() > 65535 {
            return Err(Error::Config(format!(
                "{K}: 1 to 65535 tensors, got {}",
                tensors.len()
            )));
        }
        let mut rows = Vec::with_capacity(tensors.len());
        let mut parts_total = 0usize;
        let mut blocks_total = 0usize;
        for (i, &(p, g, m, v, copy)) in tensors.iter().enumerate() {
            let n = p.len();
            let what = |w: &str| format!("tensor {i} {w}");
            need(be, K, &what("param"), p, n)?;
            need(be, K, &what("grad"), g, n)?;
            need(be, K, &what("exp_avg"), m, n)?;
            need(be, K, &what("exp_avg_sq"), v, n)?;
            if let Some(c) = copy {
                need(be, K, &what("bf16 copy"), c, n)?;
            }
            rows.push(AdamTensor {
                param: be.ptr(p),
                grad: be.ptr(g),
                m: be.ptr(m),
                v: be.ptr(v),
                param_bf16: copy.map_or(0, |c| be.ptr(c)),
                n: n as i64,
                parts: sum_squares_parts(n) as i32,
                part_offset: parts_total as i32,
                block0: blocks_total as i32,
            });
            parts_total += sum_squares_parts(n);
            blocks_total += n.div_ceil(ADAM_MULTI_CHUNK).max(1);
        }
        if blocks_total > i32::MAX as usize {
            return Err(Error::Config(format!(
                "{K}: {blocks_total} blocks of {ADAM_MULTI_CHUNK} elements: at most 2^31 - 1; split the table"
            )));
        }
        Ok(AdamTensors {
            table: be.upload(&rows)?,
            count: rows.len(),
            blocks_total,
            parts_total,
        })
    }
}

/// [`clip_coefficient_multi`] over the gradients of an AdamW tensor table, in two launches (the
/// squared sums of every gradient, then the reduction), bit for bit the same.
pub fn clip_coefficient_table(
    be: &Backend,
    tensors: &AdamTensors,
    max_norm: f32,
) -> Result<(Buf<f32>, Buf<f32>)> {
    const K: &str = "sum_squares_multi";
    check_max_norm(max_norm)?;
    tensors.check_on(be, K)?;
    let partial = be.zeros::<f32>(tensors.parts_total)?;
    let p = SumSquaresMultiParams {
        tensors: be.ptr(&tensors.table),
        partial: be.ptr(&partial),
        count: tensors.count as i32,
    };
    // One block per partial (kernels/adamw.cu finds each block's tensor in the table).
    be.launch(K, (tensors.parts_total as u32, 1, 1), (256, 1, 1), 0, &p)?;
    clip_from_partials(be, &partial, tensors.parts_total, max_norm)
}

/// Adam / AdamW step `step` of every tensor in `tensors` in ONE launch, as [`adam_step`] per
/// tensor (bit for bit); `zero_grad` clears each gradient as it is consumed.
pub fn adam_step_multi(
    be: &Backend,
    cfg: &AdamConfig,
    step: u64,
    tensors: &AdamTensors,
    grad_scale: Option<&Buf<f32>>,
    zero_grad: bool,
) -> Result<()> {
    const K: &str = "adam_step_multi";
    tensors.check_on(be, K)?;
    if let Some(s) = grad_scale {
        need(be, K, "grad_scale", s, 1)?;
    }
    let sc = cfg.scalars(step)?;
    let p = AdamMultiParams {
        tensors: be.ptr(&tensors.table),
        count: tensors.count as i32,
        zero_grad: zero_grad as i32,
        grad_scale: grad_scale.map_or(0, |b| be.ptr(b)),
        step_size: sc.step_size,
        bc2_sqrt: sc.bc2_sqrt,
        one_minus_beta1: sc.one_minus_beta1,
        beta2: sc.beta2,
        one_minus_beta2: sc.one_minus_beta2,
        eps: sc.eps,
        weight_decay: sc.weight_decay,
        decay: sc.decay,
        decoupled: cfg.decoupled as i32,
    };
    be.launch(K, (tensors.blocks_total as u32, 1, 1), (256, 1, 1), 0, &p)
}

// ---- The speaker head (kernels/speaker.cu; CPU reference src/ops/speaker.rs) ----

/// A TDNN layer's windows: y[r] = x[idx[r]] for bf16 rows of `c` (idx built by
/// [`speaker_window_index`]).
pub fn rows_gather(be: &Backend, x: &Buf<bf16>, idx: &Buf<i32>, c: usize) -> Result<Buf<bf16>> {
    const K: &str = "rows_gather";
    let rows = idx.len();
    rows_check(K, rows, c)?;
    if !x.len().is_multiple_of(c) {
        return Err(Error::shape(
            K,
            format!("x [frames, {c}]"),
            format!("{} elements", x.len()),
        ));
    }
    need(be, K, "idx", idx, rows)?;
    let y = be.output::<bf16>(rows * c)?;
    let p = RowsGatherParams {
        x: be.ptr(x),
        idx: be.ptr(idx),
        y: be.ptr(&y),
        rows: rows as i32,
        c: c as i32,
    };
    launch_elementwise(be, K, rows * c, &p)?;
    Ok(y)
}

/// The backward of [`rows_gather`]: dx [frames, c] with dx[f] = sum over j of dy[inv[f * context
/// + j]] (-1 = nothing), summed in j order (no atomics: deterministic).
pub fn rows_gather_sum(
    be: &Backend,
    dy: &Buf<f32>,
    inv: &Buf<i32>,
    frames: usize,
    context: usize,
    c: usize,
) -> Result<Buf<f32>> {
    const K: &str = "rows_gather_sum";
    rows_check(K, frames, c)?;
    need(be, K, "inv", inv, frames * context)?;
    if !dy.len().is_multiple_of(c) {
        return Err(Error::shape(
            K,
            format!("dy [rows, {c}]"),
            format!("{} elements", dy.len()),
        ));
    }
    let dx = be.output::<f32>(frames * c)?;
    let p = RowsGatherSumParams {
        dy: be.ptr(dy),
        inv: be.ptr(inv),
        dx: be.ptr(&dx),
        frames: frames as i32,
        context: context as i32,
        c: c as i32,
    };
    launch_elementwise(be, K, frames * c, &p)?;
    Ok(dx)
}

/// The gather indices of a TDNN window of `context` frames `dilation` apart over each utterance
/// of `batch` (rows of the output in [frames', context] order), their inverse for the backward
/// ([frames, context], -1 where unused), and the output's utterance lengths. None when an
/// utterance is shorter than one window.
pub fn speaker_window_index(
    batch: &crate::batch::PackedBatch,
    context: usize,
    dilation: usize,
) -> Option<(Vec<i32>, Vec<i32>, Vec<usize>)> {
    let mut idx = Vec::new();
    let mut inv = vec![-1i32; batch.total_frames() * context];
    let mut lengths = Vec::new();
    for w in batch.offsets().windows(2) {
        let kept = crate::ops::speaker::context_frames(w[1] - w[0], context, dilation)?;
        for t in 0..kept {
            for j in 0..context {
                let src = w[0] + t + j * dilation;
                inv[src * context + j] = idx.len() as i32;
                idx.push(src as i32);
            }
        }
        lengths.push(kept);
    }
    Some((idx, inv, lengths))
}

/// Statistics pooling of fp32 x [frames, c]: [utterances, 2c], means then unbiased stds (each
/// utterance at least 2 frames).
pub fn stats_pool_forward(
    be: &Backend,
    x: &Buf<f32>,
    batch: &crate::batch::PackedBatch,
    c: usize,
) -> Result<Buf<f32>> {
    const K: &str = "stats_pool_forward";
    let (offsets, u, frames) = stats_params(be, K, batch, c)?;
    need(be, K, "x", x, frames * c)?;
    let y = be.output::<f32>(u * 2 * c)?;
    let p = StatsPoolParams {
        x: be.ptr(x),
        y: 0,
        dy: 0,
        out: be.ptr(&y),
        offsets: be.ptr(&offsets),
        utterances: u as i32,
        c: c as i32,
    };
    // A block of 8 warps per utterance and 32 channels (kernels/speaker.cu).
    be.launch(
        K,
        (u as u32, pool_channel_blocks(K, c)?, 1),
        (256, 1, 1),
        0,
        &p,
    )?;
    Ok(y)
}

/// The backward of [`stats_pool_forward`] given its input `x` and output `y`.
pub fn stats_pool_backward(
    be: &Backend,
    x: &Buf<f32>,
    y: &Buf<f32>,
    dy: &Buf<f32>,
    batch: &crate::batch::PackedBatch,
    c: usize,
) -> Result<Buf<f32>> {
    const K: &str = "stats_pool_backward";
    let (offsets, u, frames) = stats_params(be, K, batch, c)?;
    need(be, K, "x", x, frames * c)?;
    need(be, K, "y", y, u * 2 * c)?;
    need(be, K, "dy", dy, u * 2 * c)?;
    let dx = be.output::<f32>(frames * c)?;
    let p = StatsPoolParams {
        x: be.ptr(x),
        y: be.ptr(y),
        dy: be.ptr(dy),
        out: be.ptr(&dx),
        offsets: be.ptr(&offsets),
        utterances: u as i32,
        c: c as i32,
    };
    // A block of 8 warps per utterance and 32 channels (kernels/speaker.cu).
    be.launch(
        K,
        (u as u32, pool_channel_blocks(K, c)?, 1),
        (256, 1, 1),
        0,
        &p,
    )?;
    Ok(dx)
}

fn stats_params(
    be: &Backend,
    kernel: &str,
    batch: &crate::batch::PackedBatch,
    c: usize,
) -> Result<(Buf<i32>, usize, usize)> {
    if let Some(u) = (0..batch.num_utterances()).find(|&u| batch.len_of(u) < 2) {
        return Err(Error::shape(
            kernel,
            "at least 2 frames per utterance",
            format!("utterance {u}: {} frame(s)", batch.len_of(u)),
        ));
    }
    pool_params(be, kernel, batch, 2 * c)
}

/// F.normalize of each row of fp32 x [rows, c].
pub fn l2_normalize_forward(be: &Backend, x: &Buf<f32>, rows: usize, c: usize) -> Result<Buf<f32>> {
    l2_normalize(be, "l2_normalize_forward", x, None, rows, c)
}

/// The backward of [`l2_normalize_forward`].
pub fn l2_normalize_backward(
    be: &Backend,
    x: &Buf<f32>,
    dy: &Buf<f32>,
    rows: usize,
    c: usize,
) -> Result<Buf<f32>> {
    l2_normalize(be, "l2_normalize_backward", x, Some(dy), rows, c)
}

fn l2_normalize(
    be: &Backend,
    k: &'static str,
    x: &Buf<f32>,
    dy: Option<&Buf<f32>>,
    rows: usize,
    c: usize,
) -> Result<Buf<f32>> {
    rows_check(k, rows, c)?;
    need(be, k, "x", x, rows * c)?;
    if let Some(dy) = dy {
        need(be, k, "dy", dy, rows * c)?;
    }
    let out = be.output::<f32>(rows * c)?;
    let p = L2NormalizeParams {
        x: be.ptr(x),
        dy: dy.map_or(0, |d| be.ptr(d)),
        out: be.ptr(&out),
        rows: rows as i32,
        c: c as i32,
    };
    be.launch(k, (rows as u32, 1, 1), (256, 1, 1), 0, &p)?;
    Ok(out)
}

/// AM-softmax's logits from cosines [rows, classes]: scale (cos - margin [j = label]); with
/// `labels` None the backward, scale * dy.
pub fn am_margin(
    be: &Backend,
    x: &Buf<f32>,
    labels: Option<&Buf<i32>>,
    rows: usize,
    classes: usize,
    scale: f32,
    margin: f32,
) -> Result<Buf<f32>> {
    const K: &str = "am_margin";
    rows_check(K, rows, classes)?;
    need(be, K, "x", x, rows * classes)?;
    if let Some(l) = labels {
        need(be, K, "labels", l, rows)?;
    }
    let out = be.output::<f32>(rows * classes)?;
    let p = AmMarginParams {
        x: be.ptr(x),
        labels: labels.map_or(0, |l| be.ptr(l)),
        out: be.ptr(&out),
        rows: rows as i32,
        classes: classes as i32,
        backward: labels.is_none() as i32,
        scale,
        margin,
    };
    launch_elementwise(be, K, rows * classes, &p)?;
    Ok(out)
}

/// Shapes and inputs of the packed self-attention (kernels/attention.cu): q, k, v fp32
/// [frames, heads * head_dim] of a packed batch, each frame attending over its utterance.
pub struct PackedAttn<'a> {
    pub q: &'a Buf<f32>,
    pub k: &'a Buf<f32>,
    pub v: &'a Buf<f32>,
    pub batch: &'a crate::batch::PackedBatch,
    pub heads: usize,
    pub head_dim: usize,
    /// Dropout on the probabilities, the CPU's mask (`ops::attention::ProbDropout`).
    pub dropout: Option<crate::ops::attention::ProbDropout>,
}

const PACKED_ATTN_BLOCK: u32 = 128;
/// kernels/attention.cu's PT_TILE and PT_MAX_DH.
const PACKED_ATTN_TILE: usize = 16;
const PACKED_ATTN_TILED_MAX_DH: usize = 128;

/// Which packed self-attention kernels run: a block per (frame, head), each reading its
/// utterance's K and V rows for one query; or a block per tile of 16 rows of an (utterance,
/// head), those rows staged once per tile (heads up to 128 wide).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PackedAttnKernels {
    Rows,
    Tiled,
}

impl PackedAttnKernels {
    /// (forward, backward over queries, backward over keys).
    fn names(self) -> [&'static str; 3] {
        match self {
            PackedAttnKernels::Rows => [
                "packed_attention_forward",
                "packed_attention_backward_query",
                "packed_attention_backward_key",
            ],
            PackedAttnKernels::Tiled => [
                "packed_attention_tiled_forward",
                "packed_attention_tiled_backward_query",
                "packed_attention_tiled_backward_key",
            ],
        }
    }
}

impl PackedAttn<'_> {
    /// Checks the shapes; returns (offsets, probability offsets, probabilities' length).
    fn prepare(
        &self,
        be: &Backend,
        k: &str,
        kernels: PackedAttnKernels,
    ) -> Result<(Buf<i32>, Buf<i64>, usize)> {
        let (frames, w) = (self.batch.total_frames(), self.heads * self.head_dim);
        if self.heads == 0 || self.head_dim == 0 {
            return Err(Error::shape(
                k,
                "heads and head_dim >= 1",
                format!("{} x {}", self.heads, self.head_dim),
            ));
        }
        rows_check(k, frames * self.heads, w)?;
        if kernels == PackedAttnKernels::Tiled && !self.tiles_fit() {
            return Err(Error::shape(
                k,
                format!(
                    "heads at most {PACKED_ATTN_TILED_MAX_DH} wide and at most 65,535 heads and \
                     tiles of {PACKED_ATTN_TILE} rows (else the per-row kernels)"
                ),
                format!(
                    "{} heads of {}, the longest utterance {} frames",
                    self.heads,
                    self.head_dim,
                    self.longest()
                ),
            ));
        }
        let (offsets, _, _) = pool_params(be, k, self.batch, w)?;
        for (what, b) in [("q", self.q), ("k", self.k), ("v", self.v)] {
            need(be, k, what, b, frames * w)?;
        }
        if let Some(d) = self.dropout {
            if !(0.0..1.0).contains(&d.p) {
                return Err(Error::value(
                    k,
                    format!("dropout probability {} is outside [0, 1)", d.p),
                ));
            }
        }
        let mut prob_off = vec![0i64];
        for t in self.batch.lengths() {
            prob_off.push(prob_off.last().copied().unwrap_or(0) + (self.heads * t * t) as i64);
        }
        let total = *prob_off.last().unwrap_or(&0) as usize;
        Ok((offsets, be.upload(&prob_off)?, total))
    }

    fn params(&self, be: &Backend, offsets: &Buf<i32>, prob_off: &Buf<i64>) -> PackedAttnParams {
        let d = self
            .dropout
            .unwrap_or(crate::ops::attention::ProbDropout { p: 0.0, seed: 0 });
        PackedAttnParams {
            q: be.ptr(self.q),
            k: be.ptr(self.k),
            v: be.ptr(self.v),
            probs: 0,
            out: 0,
            dout: 0,
            ds: 0,
            dq: 0,
            dk: 0,
            dv: 0,
            offsets: be.ptr(offsets),
            prob_off: be.ptr(prob_off),
            utterances: self.batch.num_utterances() as i32,
            h: self.heads as i32,
            dh: self.head_dim as i32,
            dropout: (self.dropout.is_some() && d.p > 0.0) as i32,
            scale: (1.0 / (self.head_dim as f64).sqrt()) as f32,
            keep_scale: (1.0 / (1.0 - d.p)) as f32,
            seed: d.seed,
            p: d.p,
        }
    }

    /// The kernels [`Self::forward`] and [`Self::backward`] run: the tiled ones where they take
    /// the head width and the grid fits, unless STRATA_PACKED_ATTN=rows asks for the per-row
    /// kernels (the device script's comparison).
    pub fn default_kernels(&self) -> PackedAttnKernels {
        static ROWS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let forced = *ROWS.get_or_init(|| knobs::flag("STRATA_PACKED_ATTN", "rows"));
        if forced || !self.tiles_fit() {
            PackedAttnKernels::Rows
        } else {
            PackedAttnKernels::Tiled
        }
    }

    fn longest(&self) -> usize {
        self.batch.lengths().into_iter().max().unwrap_or(0)
    }

    /// Whether the tiled kernels take these shapes: heads up to PT_MAX_DH wide, and a grid
    /// (utterances, heads, tiles) within CUDA's limits.
    pub fn tiles_fit(&self) -> bool {
        let tiles = self.longest().div_ceil(PACKED_ATTN_TILE);
        self.head_dim <= PACKED_ATTN_TILED_MAX_DH
            && self.heads <= 65_535
            && tiles <= 65_535
            && self.batch.num_utterances() <= i32::MAX as usize
    }

    fn grid(&self, kernels: PackedAttnKernels) -> (u32, u32, u32) {
        match kernels {
            PackedAttnKernels::Rows => ((self.batch.total_frames() * self.heads) as u32, 1, 1),
            PackedAttnKernels::Tiled => (
                self.batch.num_utterances() as u32,
                self.heads as u32,
                self.longest().div_ceil(PACKED_ATTN_TILE).max(1) as u32,
            ),
        }
    }

    /// (out fp32 [frames, heads * head_dim], probabilities before dropout, per utterance
    /// [heads, t, t]).
    pub fn forward(&self, be: &Backend) -> Result<(Buf<f32>, Buf<f32>)> {
        self.forward_on(be, self.default_kernels())
    }

    /// [`Self::forward`] on the given kernels.
    pub fn forward_on(
        &self,
        be: &Backend,
        kernels: PackedAttnKernels,
    ) -> Result<(Buf<f32>, Buf<f32>)> {
        let k = kernels.names()[0];
        let (offsets, prob_off, total) = self.prepare(be, k, kernels)?;
        let out = be.output::<f32>(self.q.len())?;
        let probs = be.output::<f32>(total)?;
        let mut p = self.params(be, &offsets, &prob_off);
        (p.out, p.probs) = (be.ptr(&out), be.ptr(&probs));
        be.launch(k, self.grid(kernels), (PACKED_ATTN_BLOCK, 1, 1), 0, &p)?;
        Ok((out, probs))
    }

    /// (dq, dk, dv) given the forward's probabilities and dout (fp32 [frames, heads * head_dim]).
    pub fn backward(
        &self,
        be: &Backend,
        probs: &Buf<f32>,
        dout: &Buf<f32>,
    ) -> Result<(Buf<f32>, Buf<f32>, Buf<f32>)> {
        self.backward_on(be, probs, dout, self.default_kernels())
    }

    /// [`Self::backward`] on the given kernels (either kernels' probabilities: the layout is
    /// the same).
    pub fn backward_on(
        &self,
        be: &Backend,
        probs: &Buf<f32>,
        dout: &Buf<f32>,
        kernels: PackedAttnKernels,
    ) -> Result<(Buf<f32>, Buf<f32>, Buf<f32>)> {
        let [_, by_query, by_key] = kernels.names();
        let (offsets, prob_off, total) = self.prepare(be, by_query, kernels)?;
        need(be, by_query, "probs", probs, total)?;
        need(be, by_query, "dout", dout, self.q.len())?;
        let ds = be.output::<f32>(total)?;
        let n = self.q.len();
        let (dq, dk, dv) = (
            be.output::<f32>(n)?,
            be.output::<f32>(n)?,
            be.output::<f32>(n)?,
        );
        let mut p = self.params(be, &offsets, &prob_off);
        (p.probs, p.dout, p.ds) = (be.ptr(probs), be.ptr(dout), be.ptr(&ds));
        (p.dq, p.dk, p.dv) = (be.ptr(&dq), be.ptr(&dk), be.ptr(&dv));
        let (grid, block) = (self.grid(kernels), (PACKED_ATTN_BLOCK, 1, 1));
        be.launch(by_query, grid, block, 0, &p)?;
        be.launch(by_key, grid, block, 0, &p)?;
        Ok((dq, dk, dv))
    }
}
