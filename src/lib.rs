//! strata: exact CPU references and CUDA kernels for the interfaces between frozen
//! self-supervised speech upstreams (HuBERT, wav2vec2/XLSR, WavLM) and downstream heads.
//!
//! Layers, bottom to top:
//! - [`tensor`], [`runtime`]: tensors and devices (CPU; CUDA through cudarc + NVRTC; the kernel
//!   emulator that runs kernels/*.cu on the CPU).
//! - [`ops`]: each op's readable CPU reference, forward and backward, generic over f32/f64.
//! - [`autograd`]: a minimal tape and parameter store; [`optim`]: Adam/AdamW, grad clipping.
//! - [`models`]: the interfaces (WS, HConv, Concat+Proj, GroupWS, single layer, CLS pooling),
//!   the SUPERB heads (PR, ASR, utterance classifier, SV), the ML-SUPERB head, and the upstream
//!   encoders; losses (CTC, cross-entropy) are tape ops.
//! - [`train`]: metrics, the synthetic demo corpus, the side-by-side trainer; `src/bin/strata.rs`.

// Docs write tensor shapes in brackets ([frames, L, D]); they are not intra-doc links.
#![allow(rustdoc::broken_intra_doc_links)]

pub mod audio;
pub mod autograd;
pub mod batch;
pub mod error;
pub mod io;
pub mod models;
pub mod ops;
pub mod optim;
pub mod rng;
pub mod runtime;
pub mod tensor;
pub mod train;

pub use autograd::{ParamId, ParamStore, Tape, Var};
pub use batch::PackedBatch;
pub use error::{Error, Result};
pub use ops::ctc::Reduction;
pub use tensor::{DType, Device, Tensor};

/// The git commit this build came from ("unknown" outside a git checkout).
pub const GIT_COMMIT: &str = env!("STRATA_GIT_COMMIT");
