//! A minimal reverse-mode autograd: trainable parameters live in a [`ParamStore`] (value + grad
//! accumulators); a [`Tape`] records each op's output and backward closure during one forward pass
//! and runs them in reverse from a scalar loss, adding parameter gradients into the store (so
//! several micro-batches accumulate until `zero_grad`). The upstream runs with `Tape::no_grad()`.
//! [`DeviceTape`] is the same scheme over device buffers (the GPU or the kernel emulator), with
//! the fused kernels as its ops; the training step on a device records its graph there.

mod device_tape;
mod ops;
mod params;
mod tape;

pub use device_tape::{DVar, DeviceGradients, DeviceParam, DeviceTape, Grad};
pub use params::{Param, ParamId, ParamStore};
pub use tape::{Gradients, Tape, Var};
