//! The kernel sources (embedded, so a binary compiles them anywhere) and the Rust mirrors of
//! their parameter structs. Each `#[repr(C)]` struct here matches the C struct of the same name in
//! kernels/*.cu field by field: pointers as u64, `int` as i32, `int64_t` as i64.

/// kernels/common.cuh, prepended to every source for NVRTC.
pub const COMMON: &str = include_str!("../../kernels/common.cuh");

pub struct KernelFile {
    pub file: &'static str,
    pub source: &'static str,
    pub kernels: &'static [&'static str],
    /// The target it needs instead of the default (crate::runtime::cuda::ARCH): "sm_90a" for
    /// Hopper-only instructions (wgmma), which then run on sm_90 GPUs (H100, H200) only.
    pub arch: Option<&'static str>,
}

pub const FILES: &[KernelFile] = &[
    KernelFile {
        file: "layer_sum.cu",
        source: include_str!("../../kernels/layer_sum.cu"),
        kernels: &[
            "layer_sum_forward",
            "layer_sum_backward",
            "layer_sum_backward_dw",
            "layer_sum_reduce",
        ],
        arch: None,
    },
    KernelFile {
        file: "adamw.cu",
        source: include_str!("../../kernels/adamw.cu"),
        kernels: &[
            "adam_step",
            "adam_step_multi",
            "sum_squares_partial",
            "sum_squares_multi",
            "clip_coefficient",
        ],
        arch: None,
    },
    KernelFile {
        file: "hconv.cu",
        source: include_str!("../../kernels/hconv.cu"),
        kernels: &[
            "hconv_conv_forward",
            "hconv_conv_forward_vec",
            "hconv_conv_backward_data",
            "hconv_conv_backward_weight",
            "hconv_relu_mask",
            "hconv_conv_backward_data_vec",
            "hconv_conv_backward_weight_vec",
            "hconv_split_reduce",
        ],
        arch: None,
    },
    // hconv.cu again, for sm_90a: the same source, whose Hopper-only kernel exists in this build.
    KernelFile {
        file: "hconv.cu",
        source: include_str!("../../kernels/hconv.cu"),
        kernels: &[
            "hconv_conv_forward_wgmma",
            "hconv_conv_backward_data_wgmma",
            "hconv_conv_backward_weight_wgmma",
        ],
        arch: Some("sm_90a"),
    },
    KernelFile {
        file: "ctc.cu",
        source: include_str!("../../kernels/ctc.cu"),
        kernels: &["ctc_alpha_beta", "ctc_grad"],
        arch: None,
    },
    KernelFile {
        file: "cross_entropy.cu",
        source: include_str!("../../kernels/cross_entropy.cu"),
        kernels: &["cross_entropy_fwd_bwd"],
        arch: None,
    },
    KernelFile {
        file: "softmax.cu",
        source: include_str!("../../kernels/softmax.cu"),
        kernels: &["log_softmax_forward", "log_softmax_backward"],
        arch: None,
    },
    KernelFile {
        file: "pooling.cu",
        source: include_str!("../../kernels/pooling.cu"),
        kernels: &[
            "mean_pool_forward",
            "mean_pool_backward",
            "utterance_center",
        ],
        arch: None,
    },
    KernelFile {
        file: "dropout.cu",
        source: include_str!("../../kernels/dropout.cu"),
        kernels: &["dropout_apply"],
        arch: None,
    },
    KernelFile {
        file: "layernorm.cu",
        source: include_str!("../../kernels/layernorm.cu"),
        kernels: &[
            "layernorm_forward",
            "layernorm_backward",
            "layernorm_param_reduce",
            "layernorm_rows_bf16",
        ],
        arch: None,
    },
    KernelFile {
        file: "convert.cu",
        source: include_str!("../../kernels/convert.cu"),
        kernels: &["cast_f32_to_bf16", "cast_bf16_to_f32"],
        arch: None,
    },
    KernelFile {
        file: "attention.cu",
        source: include_str!("../../kernels/attention.cu"),
        kernels: &[
            "cls_attention_forward",
            "cls_attention_backward",
            "packed_attention_forward",
            "packed_attention_backward_query",
            "packed_attention_backward_key",
            "packed_attention_tiled_forward",
            "packed_attention_tiled_backward_query",
            "packed_attention_tiled_backward_key",
        ],
        arch: None,
    },
    KernelFile {
        file: "elementwise.cu",
        source: include_str!("../../kernels/elementwise.cu"),
        kernels: &[
            "add_rows",
            "add_grads",
            "col_sum_accumulate",
            "activation_forward",
            "activation_backward",
        ],
        arch: None,
    },
    KernelFile {
        file: "shape.cu",
        source: include_str!("../../kernels/shape.cu"),
        kernels: &["select_layer"],
        arch: None,
    },
    KernelFile {
        file: "speaker.cu",
        source: include_str!("../../kernels/speaker.cu"),
        kernels: &[
            "rows_gather",
            "rows_gather_sum",
            "stats_pool_forward",
            "stats_pool_backward",
            "l2_normalize_forward",
            "l2_normalize_backward",
            "am_margin",
        ],
        arch: None,
    },
    KernelFile {
        file: "conv2d.cu",
        source: include_str!("../../kernels/conv2d.cu"),
        kernels: &["conv2d_patches", "conv2d_patches_adjoint"],
        arch: None,
    },
    KernelFile {
        file: "mlsuperb.cu",
        source: include_str!("../../kernels/mlsuperb.cu"),
        kernels: &["row_mix", "specaug_mask", "scale_add_positions"],
        arch: None,
    },
    KernelFile {
        file: "lstm.cu",
        source: include_str!("../../kernels/lstm.cu"),
        kernels: &["lstm_step_forward", "lstm_step_backward", "lstm_transpose"],
        arch: None,
    },
    KernelFile {
        file: "selftest.cu",
        source: include_str!("../../kernels/selftest.cu"),
        kernels: &[
            "selftest_collectives",
            "selftest_mma",
            "selftest_divergent_barrier",
            "selftest_unordered",
            "selftest_ldmatrix",
            "selftest_shared_bounds",
            "selftest_serial",
        ],
        arch: None,
    },
    KernelFile {
        file: "wgmma.cu",
        source: include_str!("../../kernels/wgmma.cu"),
        kernels: &["selftest_wgmma"],
        arch: Some("sm_90a"),
    },
];

/// The file that defines `kernel`.
pub fn file_of(kernel: &str) -> Option<&'static KernelFile> {
    FILES.iter().find(|f| f.kernels.contains(&kernel))
}

/// Full NVRTC source of a kernel file: the common header inlined, no include paths needed.
pub fn nvrtc_source(file: &KernelFile) -> String {
    format!(
        "#define STRATA_COMMON_INCLUDED\n{COMMON}\n#line 1 \"{}\"\n{}",
        file.file, file.source
    )
}

/// Marker for kernel parameter structs.
///
/// # Safety
/// The type must be `#[repr(C)]`, `Copy`, and match its C struct exactly.
pub unsafe trait KernelParams: Copy + 'static {}

macro_rules! params {
    ($($name:ident { $($field:ident : $ty:ty),* $(,)? })*) => {
        $(
            #[repr(C)]
            #[derive(Clone, Copy, Debug)]
            pub struct $name { $(pub $field: $ty),* }
            // SAFETY: repr(C), Copy, and mirrors the C struct of the same name.
            unsafe impl KernelParams for $name {}
            // SAFETY: plain data passed by value to the kernel.
            unsafe impl cudarc::driver::DeviceRepr for $name {}
        )*
    };
}

params! {
    LayerSumFwdParams { x: u64, w: u64, out: u64, mean: u64, rstd: u64, n: i32, l: i32, d: i32, first: i32, k: i32, normalize: i32, out_stride: i32, staged: i32 }
    LayerSumBwdParams { x: u64, w: u64, dout: u64, mean: u64, rstd: u64, partial: u64, dx: u64, n: i32, l: i32, d: i32, first: i32, k: i32, normalize: i32, dout_stride: i32, frames_per_block: i32 }
    LayerSumReduceParams { partial: u64, w: u64, dw: u64, n: i32, k: i32 }
    AdamParams {
        param: u64, grad: u64, m: u64, v: u64, param_bf16: u64, grad_scale: u64, n: i64,
        step_size: f32, bc2_sqrt: f32, one_minus_beta1: f32, beta2: f32, one_minus_beta2: f32, eps: f32,
        weight_decay: f32, decay: f32, decoupled: i32,
    }
    AdamMultiParams {
        tensors: u64, count: i32, zero_grad: i32, grad_scale: u64, step_size: f32, bc2_sqrt: f32,
        one_minus_beta1: f32, beta2: f32, one_minus_beta2: f32, eps: f32, weight_decay: f32, decay: f32,
        decoupled: i32,
    }
    // One row of adam_step_multi's tensor table (device memory, not a launch parameter).
    AdamTensor { param: u64, grad: u64, m: u64, v: u64, param_bf16: u64, n: i64, parts: i32, part_offset: i32, block0: i32 }
    SumSquaresParams { x: u64, partial: u64, n: i64 }
    SumSquaresMultiParams { tensors: u64, partial: u64, count: i32 }
    ClipCoefParams { partial: u64, parts: i32, max_norm: f32, norm: u64, coef: u64 }
    SelftestParams { input: u64, out: u64, n: i32 }
    SelftestMmaParams { a: u64, bt: u64, c: u64, d: u64 }
    SelftestLdmatrixParams { tile: u64, out: u64 }
    SelftestSerialParams { out: u64, n: i32, mode: i32 }
    SelftestWgmmaParams { a: u64, bt: u64, d: u64, k: i32, mode: i32, n: i32 }
    HConvFwdParams {
        x: u64, w: u64, bias: u64, y: u64, n: i32, l_in: i32, c_in: i32, c_out: i32, kernel: i32, stride: i32,
        pad: i32, l_out: i32, flatten: i32, relu: i32, y32: u64,
    }
    HConvMaskParams { y: u64, dy: u64, dpre: u64, n: i32, c_out: i32, l_out: i32, flatten: i32, relu: i32 }
    HConvBwdParams {
        x: u64, w: u64, y: u64, dy: u64, dx: u64, dw: u64, db: u64, n: i32, l_in: i32, c_in: i32, c_out: i32,
        kernel: i32, stride: i32, pad: i32, l_out: i32, flatten: i32, partial_dw: u64, partial_db: u64,
        split_rows: i64, split: i32, relu: i32,
    }
    SplitReduceParams { partial: u64, out: u64, count: i64, split: i32 }
    CrossEntropyParams { logits: u64, labels: u64, loss_rows: u64, dlogits: u64, rows: i32, classes: i32, mean: i32 }
    LogSoftmaxParams { x: u64, dy: u64, out: u64, rows: i32, d: i32 }
    MeanPoolParams { input: u64, offsets: u64, out: u64, utterances: i32, frames: i32, c: i32 }
    CenterParams { x: u64, y: u64, offsets: u64, utterances: i32, c: i32 }
    PatchParams {
        x: u64, patches: u64, dpatches: u64, dx: u64, in_offsets: u64, out_offsets: u64, utterances: i32,
        frames: i32, out_frames: i32, freq: i32, out_freq: i32, c: i32, k: i32, stride: i32,
    }
    RowMixParams { x: u64, y: u64, row_ptr: u64, src: u64, w: u64, rows: i64, c: i32 }
    SpecMaskParams { x: u64, y: u64, row_code: u64, chan_keep: u64, rows: i64, c: i32 }
    PositionsParams { x: u64, y: u64, offsets: u64, rates: u64, rows: i64, utterances: i32, d: i32, scale: f32 }
    LstmStepParams {
        pre: u64, w: u64, dout: u64, h: u64, c: u64, gates: u64, h_prev: u64, dz: u64, dc_carry: u64,
        sched: u64, step: i32, n: i32, running: i32, hidden: i32, h_stride: i32, h_col: i32,
    }
    // Both directions of a bidirectional layer in one launch (grid.z = directions).
    LstmPairParams { dir: [LstmStepParams; 2] }
    LstmTransposeParams { w: u64, wt: u64, rows: i32, cols: i32 }
    DropoutParams { x: u64, y: u64, n: i64, seed: u64, p: f64, scale: f32 }
    LayerNormFwdParams {
        x: u64, w: u64, b: u64, y: u64, mean: u64, rstd: u64, rows: i32, d: i32, eps: f32,
        x_bf16: i32, y_bf16: i32,
    }
    LayerNormBwdParams {
        x: u64, w: u64, dy: u64, mean: u64, rstd: u64, dx: u64, partial: u64, rows: i32, d: i32,
        x_bf16: i32,
    }
    LayerNormReduceParams { partial: u64, dw: u64, db: u64, blocks: i32, d: i32 }
    CastParams { x: u64, y: u64, n: i64, scale: f32 }
    WidenParams { x: u64, y: u64, n: i64 }
    LayerNormRowsParams { x: u64, y: u64, rows: i64, d: i32, eps: f32 }
    ClsAttnParams {
        q: u64, k_cls: u64, v_cls: u64, k: u64, v: u64, probs: u64, out: u64, dout: u64, dk: u64, dv: u64,
        dq_part: u64, dk_cls_part: u64, dv_cls_part: u64, n: i32, l: i32, d: i32, h: i32, scale: f32,
    }
    PackedAttnParams {
        q: u64, k: u64, v: u64, probs: u64, out: u64, dout: u64, ds: u64, dq: u64, dk: u64, dv: u64,
        offsets: u64, prob_off: u64, utterances: i32, h: i32, dh: i32, dropout: i32, scale: f32,
        keep_scale: f32, seed: u64, p: f64,
    }
    AddRowsParams { a: u64, b: u64, v: u64, y: u64, rows: i64, c: i32 }
    AddGradsParams { a: u64, b: u64, y: u64, n: i64, a_bf16: i32, b_bf16: i32 }
    ColSumParams { x: u64, out: u64, rows: i64, c: i32 }
    ActivationParams { x: u64, dy: u64, y: u64, n: i64, gelu: i32 }
    RowsGatherParams { x: u64, idx: u64, y: u64, rows: i32, c: i32 }
    RowsGatherSumParams { dy: u64, inv: u64, dx: u64, frames: i32, context: i32, c: i32 }
    StatsPoolParams { x: u64, y: u64, dy: u64, out: u64, offsets: u64, utterances: i32, c: i32 }
    L2NormalizeParams { x: u64, dy: u64, out: u64, rows: i32, c: i32 }
    AmMarginParams { x: u64, labels: u64, out: u64, rows: i32, classes: i32, backward: i32, scale: f32, margin: f32 }
    SelectLayerParams { x: u64, y: u64, n: i32, l: i32, d: i32, layer: i32 }
    CtcParams {
        lp: u64, input_offsets: u64, targets: u64, target_offsets: u64, next_same: u64, first: u64,
        scratch_offsets: u64, alpha: u64, beta: u64, nll: u64, grad: u64,
        n: i32, frames: i32, v: i32, blank: i32, mean: i32, zero_infinity: i32,
    }
}
