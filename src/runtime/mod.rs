//! Devices. The CPU engine runs everywhere; the CUDA backend (cudarc + NVRTC) and the kernel
//! emulator come with the GPU path. Until then CUDA is reported unavailable with the reason.

use crate::tensor::Device;

/// What a caller asked for (`--device auto|cpu|cuda`) resolved to what exists.
pub fn resolve(requested: &str) -> Result<Device, String> {
    match requested {
        "cpu" | "auto" => Ok(Device::Cpu),
        "cuda" => Err("CUDA was requested but this build of strata has no CUDA backend yet; use --device cpu or auto".into()),
        other => Err(format!("unknown device '{other}': use auto, cpu or cuda")),
    }
}
