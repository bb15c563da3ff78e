//! The CUDA backend over cudarc: a probe that never panics, NVRTC compilation on first use with a
//! disk cache, one stream, launches of the kernels in src/runtime/kernels.rs.
//!
//! The cache key is a hash of (source, compile options, NVRTC version, architecture); an entry is
//! written atomically and carries its key in a header line and an end marker, so a truncated,
//! corrupt or stale entry is recompiled, never trusted.

use super::kernels::{self, KernelFile};
use cudarc::driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

pub const ARCH: &str = "sm_90";

/// The target a kernel file compiles for: its own (sm_90a for wgmma) or [`ARCH`].
pub fn arch_of(file: &KernelFile) -> &'static str {
    file.arch.unwrap_or(ARCH)
}

pub struct CudaRuntime {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    /// Loaded kernels by "name|defines".
    functions: Mutex<HashMap<String, CudaFunction>>,
    pub device_name: String,
}

/// Whether the CUDA 13 driver and NVRTC libraries can be loaded (cudarc panics on a missing one,
/// so the check runs inside catch_unwind).
pub fn libraries_present() -> Result<(), String> {
    let r = std::panic::catch_unwind(|| unsafe {
        (
            cudarc::driver::sys::is_culib_present(),
            cudarc::nvrtc::sys::is_culib_present(),
        )
    });
    match r {
        Ok((true, true)) => Ok(()),
        Ok((false, _)) => Err("the CUDA driver library (libcuda.so.1) was not found: no NVIDIA driver on this machine".into()),
        Ok((true, false)) => Err("NVRTC (libnvrtc.so.13, CUDA 13) was not found: install it (pip install nvidia-cuda-nvrtc==13.0.*) and add its lib folder to LD_LIBRARY_PATH".into()),
        Err(_) => Err("loading the CUDA libraries failed (a library of another CUDA version?)".into()),
    }
}

/// NVRTC's (major, minor), if NVRTC loads.
pub fn nvrtc_version() -> Result<(i32, i32), String> {
    libraries_nvrtc_only()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC is loaded (checked above); the out-pointers are valid.
    let r = std::panic::catch_unwind(move || unsafe {
        cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor);
        (major, minor)
    });
    r.map_err(|_| "nvrtcVersion failed".to_string())
}

fn libraries_nvrtc_only() -> Result<(), String> {
    match std::panic::catch_unwind(|| unsafe { cudarc::nvrtc::sys::is_culib_present() }) {
        Ok(true) => Ok(()),
        _ => Err("NVRTC (libnvrtc.so.13, CUDA 13) was not found: install it (pip install nvidia-cuda-nvrtc==13.0.*) and add its lib folder to LD_LIBRARY_PATH".into()),
    }
}

fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn cache_dir() -> PathBuf {
    if let Ok(d) = std::env::var("STRATA_KERNEL_CACHE") {
        return PathBuf::from(d);
    }
    let base = std::env::var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|_| std::env::var("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|_| std::env::temp_dir());
    base.join("strata").join("kernels")
}

fn compile_options() -> Vec<String> {
    vec!["--std=c++17".into(), "-lineinfo".into()]
}

/// Compiles a kernel file to PTX for `arch`, through the disk cache. Returns (ptx, cache hit).
pub fn compile(file: &KernelFile, arch: &'static str) -> Result<(String, bool), String> {
    compile_with(file, arch, &[])
}

/// `-D NAME=value` options of a specialization.
pub type Defines<'a> = &'a [(&'static str, i64)];

/// [`compile`] with `-D` constants (a specialization: the kernel file decides what they mean).
/// The defines are part of the compile options, so of the cache key.
pub fn compile_with(
    file: &KernelFile,
    arch: &'static str,
    defines: Defines,
) -> Result<(String, bool), String> {
    let src = kernels::nvrtc_source(file);
    let mut opts = compile_options();
    opts.extend(defines.iter().map(|(k, v)| format!("-D{k}={v}")));
    let (major, minor) = nvrtc_version()?;
    let version = format!("{major}.{minor}");
    let key = format!(
        "{:016x}",
        fnv1a(&[
            src.as_bytes(),
            opts.join(" ").as_bytes(),
            version.as_bytes(),
            arch.as_bytes()
        ])
    );
    let header = format!(
        "// strata kernel cache {key} {} nvrtc {version} {arch}\n",
        file.file
    );
    const TRAILER: &str = "\n// strata end\n";
    let path = cache_dir().join(format!("{}-{key}.ptx", file.file.trim_end_matches(".cu")));
    if let Ok(text) = std::fs::read_to_string(&path) {
        if let Some(body) = text
            .strip_prefix(&header)
            .and_then(|t| t.strip_suffix(TRAILER))
        {
            return Ok((body.to_string(), true));
        }
        // Stale or damaged: fall through and recompile over it.
    }
    let options = cudarc::nvrtc::CompileOptions {
        arch: Some(arch),
        options: opts,
        ..Default::default()
    };
    let ptx = std::panic::catch_unwind(|| cudarc::nvrtc::compile_ptx_with_opts(&src, options))
        .map_err(|_| format!("NVRTC panicked compiling {}", file.file))?
        .map_err(|e| format!("NVRTC could not compile {} for {arch}: {e}", file.file))?;
    let body = ptx.to_src();
    if let Some(dir) = path.parent() {
        if std::fs::create_dir_all(dir).is_ok() {
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            if std::fs::write(&tmp, format!("{header}{body}{TRAILER}")).is_ok() {
                let _ = std::fs::rename(&tmp, &path);
            }
        }
    }
    Ok((body, false))
}

/// The activation / gradient pool: buffers come from cudarc's stream-ordered allocator
/// (cuMemAllocAsync on the device's default memory pool), and freed memory stays in that pool for
/// the next step's buffers instead of going back to the driver at every synchronize (the default
/// release threshold is 0). Best effort: without pool support allocation still works, unpooled.
fn keep_freed_memory(ctx: &CudaContext) {
    use cudarc::driver::sys;
    if ctx.bind_to_thread().is_err() {
        return;
    }
    let device = ctx.cu_device();
    // cudarc panics on a driver symbol it cannot load: contain that like the probe does.
    let _ = std::panic::catch_unwind(|| {
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        let mut threshold: u64 = u64::MAX;
        // SAFETY: the context is current on this thread; the out-pointer and the attribute value
        // (a u64, as CU_MEMPOOL_ATTR_RELEASE_THRESHOLD takes) are valid for the calls.
        unsafe {
            if sys::cuDeviceGetDefaultMemPool(&mut pool, device) == sys::CUresult::CUDA_SUCCESS {
                let _ = sys::cuMemPoolSetAttribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    &mut threshold as *mut u64 as *mut std::ffi::c_void,
                );
            }
        }
    });
}

impl CudaRuntime {
    /// The first GPU, or the reason there is none. Never panics.
    pub fn probe() -> Result<Self, String> {
        libraries_present()?;
        let ctx = std::panic::catch_unwind(|| CudaContext::new(0))
            .map_err(|_| "initialising CUDA panicked".to_string())?
            .map_err(|e| format!("no usable GPU: {e}"))?;
        // One stream: per-launch event tracking of every buffer would only cost time.
        // SAFETY: strata uses a single stream per context.
        unsafe { ctx.disable_event_tracking() };
        keep_freed_memory(&ctx);
        let stream = ctx.default_stream();
        let device_name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        Ok(CudaRuntime {
            ctx,
            stream,
            functions: Mutex::new(HashMap::new()),
            device_name,
        })
    }

    fn function(&self, kernel: &'static str, defines: Defines) -> Result<CudaFunction, String> {
        let variant = |k: &str| {
            let d: Vec<String> = defines.iter().map(|(n, v)| format!("{n}={v}")).collect();
            format!("{k}|{}", d.join(","))
        };
        let mut cache = self
            .functions
            .lock()
            .map_err(|_| "kernel cache lock poisoned".to_string())?;
        if let Some(f) = cache.get(&variant(kernel)) {
            return Ok(f.clone());
        }
        let file = kernels::file_of(kernel).ok_or_else(|| format!("no kernel named '{kernel}'"))?;
        let arch = arch_of(file);
        let (ptx, _) = compile_with(file, arch, defines)?;
        let module = self
            .ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
            .map_err(|e| {
                format!(
                    "loading {} (compiled for {arch}) on {}: {e}",
                    file.file, self.device_name
                )
            })?;
        for &k in file.kernels {
            let f = module
                .load_function(k)
                .map_err(|e| format!("{}: no function {k}: {e}", file.file))?;
            cache.insert(variant(k), f);
        }
        cache
            .get(&variant(kernel))
            .cloned()
            .ok_or_else(|| format!("no kernel named '{kernel}'"))
    }

    pub fn launch<P: kernels::KernelParams + cudarc::driver::DeviceRepr>(
        &self,
        kernel: &'static str,
        defines: Defines,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: u32,
        params: &P,
    ) -> Result<(), String> {
        let f = self.function(kernel, defines)?;
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: block,
            shared_mem_bytes: smem,
        };
        let mut b = self.stream.launch_builder(&f);
        b.arg(params);
        // SAFETY: `params` mirrors the kernel's parameter struct (KernelParams) and its pointers
        // are live device allocations of the sizes the kernel reads (the typed wrappers' contract).
        unsafe { b.launch(cfg) }.map_err(|e| {
            format!("launch of {kernel} (grid {grid:?}, block {block:?}) failed: {e}")
        })?;
        Ok(())
    }
}
