//! The CUDA backend over cudarc: a probe that never panics, NVRTC compilation on first use with a
//! disk cache, one stream, launches of the kernels in src/runtime/kernels.rs.
//!
//! The cache key is a hash of (source, compile options, NVRTC version, architecture). A variant
//! has two entries, its PTX and its machine code (cubin, which NVRTC assembles anyway when the
//! target is a real architecture): on a GPU of the target architecture the cubin loads with no
//! compile, elsewhere the driver compiles the PTX. Entries are written atomically and carry their
//! key in a header line (and an end marker, or the cubin's length and hash), so a truncated,
//! corrupt or stale entry is recompiled, never trusted.

use super::kernels::{self, KernelFile};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaStream, LaunchConfig, PushKernelArg,
};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
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
    /// The GPU's compute capability: kernels compiled for exactly it load as machine code.
    capability: (i32, i32),
    /// Streaming multiprocessors: with a kernel's occupancy, how many blocks run at once.
    sm_count: usize,
    /// [`CudaRuntime::resident_blocks`]'s answers by (kernel, threads, shared memory): a function
    /// of those only, asked at every WS backward.
    resident: Mutex<Vec<(LaunchShape, usize)>>,
    /// Each launch's kernel and start / end events while a profile is taken
    /// ([`CudaRuntime::profile_start`] .. [`CudaRuntime::profile_take`]).
    profile: Mutex<Option<Vec<TimedLaunch>>>,
    /// Whether a profile is being taken: read on every launch, so that an unprofiled launch (all
    /// but a profile run's) takes no lock for it.
    profiling: AtomicBool,
}

/// A kernel at a block size: (kernel, threads, bytes of dynamic shared memory).
type LaunchShape = (&'static str, u32, u32);

/// A profiled launch: the kernel and the events recorded before and after it.
type TimedLaunch = (&'static str, CudaEvent, CudaEvent);

/// One kernel's share of a profile: its launches and their summed GPU time.
#[derive(Clone, Debug)]
pub struct KernelTime {
    pub kernel: &'static str,
    pub launches: usize,
    pub ms: f64,
}

/// The compute capability a real target names: "sm_90" and "sm_90a" are (9, 0).
fn capability_of(arch: &str) -> Option<(i32, i32)> {
    let n: i32 = arch
        .strip_prefix("sm_")?
        .trim_end_matches(|c: char| c.is_ascii_alphabetic())
        .parse()
        .ok()?;
    Some((n / 10, n % 10))
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
    let entry = CacheEntry::new(file, arch, defines)?;
    if let Some(ptx) = entry.read_ptx() {
        return Ok((ptx, true));
    }
    Ok((entry.compile()?.ptx, false))
}

/// The machine code (cubin) of [`compile_with`]'s compile, for a GPU of exactly `arch`: loading it
/// costs no compile, where PTX costs the driver a PTX-to-machine-code pass in every process (~5 s
/// for hconv.cu). Returns (cubin, cache hit).
pub fn compile_cubin_with(
    file: &KernelFile,
    arch: &'static str,
    defines: Defines,
) -> Result<(Vec<u8>, bool), String> {
    let entry = CacheEntry::new(file, arch, defines)?;
    if let Some(cubin) = entry.read_cubin() {
        return Ok((cubin, true));
    }
    Ok((entry.compile()?.cubin, false))
}

/// What one NVRTC compile for a real architecture (sm_XX) gives: the PTX, and the machine code
/// NVRTC assembled from it on the way.
struct Compiled {
    ptx: String,
    cubin: Vec<u8>,
    /// NVRTC's messages (warnings) on a successful compile; empty for a clean one.
    log: String,
}

/// One kernel variant's pair of disk cache entries, `<stem>-<key>.ptx` (text between a header
/// line and an end marker) and `<stem>-<key>.cubin` (a header line with the length and hash of
/// the bytes after it). Either is used only when whole and of this key.
struct CacheEntry<'a> {
    file: &'a KernelFile,
    arch: &'static str,
    src: String,
    opts: Vec<String>,
    header: String,
    stem: PathBuf,
}

const PTX_TRAILER: &str = "\n// strata end\n";

impl<'a> CacheEntry<'a> {
    fn new(file: &'a KernelFile, arch: &'static str, defines: Defines) -> Result<Self, String> {
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
            "// strata kernel cache {key} {} nvrtc {version} {arch}",
            file.file
        );
        let stem = cache_dir().join(format!("{}-{key}", file.file.trim_end_matches(".cu")));
        Ok(CacheEntry {
            file,
            arch,
            src,
            opts,
            header,
            stem,
        })
    }

    fn path(&self, ext: &str) -> PathBuf {
        self.stem.with_extension(ext)
    }

    fn read_ptx(&self) -> Option<String> {
        let text = std::fs::read_to_string(self.path("ptx")).ok()?;
        let body = text
            .strip_prefix(&self.header)?
            .strip_prefix('\n')?
            .strip_suffix(PTX_TRAILER)?;
        Some(body.to_string())
    }

    fn read_cubin(&self) -> Option<Vec<u8>> {
        let bytes = std::fs::read(self.path("cubin")).ok()?;
        let line_end = bytes.iter().position(|&b| b == b'\n')?;
        let line = std::str::from_utf8(&bytes[..line_end]).ok()?;
        let mut rest = line
            .strip_prefix(&self.header)?
            .strip_prefix(" cubin ")?
            .split(' ');
        let (len, hash) = (rest.next()?.parse::<usize>().ok()?, rest.next()?);
        let body = &bytes[line_end + 1..];
        (body.len() == len && format!("{:016x}", fnv1a(&[body])) == hash).then(|| body.to_vec())
    }

    /// Compiles with NVRTC and writes both entries (atomically: a temporary file renamed).
    fn compile(&self) -> Result<Compiled, String> {
        let (file, arch) = (self.file.file, self.arch);
        let c = std::panic::catch_unwind(|| nvrtc_compile(&self.src, arch, &self.opts))
            .map_err(|_| format!("NVRTC panicked compiling {file}"))?
            .map_err(|e| format!("NVRTC could not compile {file} for {arch}: {e}"))?;
        let mut cubin_entry = format!(
            "{} cubin {} {:016x}\n",
            self.header,
            c.cubin.len(),
            fnv1a(&[&c.cubin])
        )
        .into_bytes();
        cubin_entry.extend_from_slice(&c.cubin);
        let ptx_entry = format!("{}\n{}{PTX_TRAILER}", self.header, c.ptx).into_bytes();
        if std::fs::create_dir_all(cache_dir()).is_ok() {
            for (ext, bytes) in [("ptx", ptx_entry), ("cubin", cubin_entry)] {
                let path = self.path(ext);
                let tmp = path.with_extension(format!("{ext}.tmp{}", std::process::id()));
                if std::fs::write(&tmp, bytes).is_ok() {
                    let _ = std::fs::rename(&tmp, &path);
                }
            }
        }
        Ok(c)
    }
}

/// NVRTC's log of a fresh compile of `file` for `arch` with `defines` (no cache; empty when the
/// compile is clean): warnings, and ptxas's notes. Our kernels compile without warnings, which the
/// tests enforce (one was a `-D` specialization constant quietly redefined by the source).
pub fn compile_log(
    file: &KernelFile,
    arch: &'static str,
    defines: Defines,
) -> Result<String, String> {
    let entry = CacheEntry::new(file, arch, defines)?;
    nvrtc_compile(&entry.src, arch, &entry.opts).map(|c| c.log)
}

/// NVRTC's log of `prog`, empty when there is none.
///
/// # Safety
/// `prog` is a live NVRTC program.
unsafe fn program_log(prog: cudarc::nvrtc::sys::nvrtcProgram) -> String {
    match cudarc::nvrtc::result::get_program_log(prog) {
        Ok(log) if !log.is_empty() => std::ffi::CStr::from_ptr(log.as_ptr())
            .to_string_lossy()
            .trim()
            .to_string(),
        _ => String::new(),
    }
}

/// One NVRTC compile of `src` for the real architecture `arch`, returning its PTX and cubin.
fn nvrtc_compile(src: &str, arch: &str, opts: &[String]) -> Result<Compiled, String> {
    use cudarc::nvrtc::{result, sys};
    let c_src = std::ffi::CString::new(src).map_err(|_| "a NUL byte in the source")?;
    let prog = result::create_program(&c_src, None).map_err(|e| e.to_string())?;
    let mut options = vec![format!("--gpu-architecture={arch}")];
    options.extend(opts.iter().cloned());
    // SAFETY: `prog` was created above and is destroyed once, at the end; the buffers handed to
    // NVRTC are sized by the size queries just before.
    let out = unsafe {
        let out = match result::compile_program(prog, &options) {
            Err(e) => Err(format!("{e}: {}", program_log(prog))),
            Ok(()) => result::get_ptx(prog)
                .map_err(|e| format!("reading the PTX: {e}"))
                .and_then(|ptx| {
                    let ptx = std::ffi::CStr::from_ptr(ptx.as_ptr())
                        .to_string_lossy()
                        .into_owned();
                    let mut size = 0usize;
                    sys::nvrtcGetCUBINSize(prog, &mut size)
                        .result()
                        .map_err(|e| format!("reading the cubin size: {e}"))?;
                    let mut cubin = vec![0u8; size];
                    sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr().cast())
                        .result()
                        .map_err(|e| format!("reading the cubin: {e}"))?;
                    Ok(Compiled {
                        ptx,
                        cubin,
                        log: program_log(prog),
                    })
                }),
        };
        let _ = result::destroy_program(prog);
        out
    };
    out
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
        let r = unsafe {
            match sys::cuDeviceGetDefaultMemPool(&mut pool, device) {
                sys::CUresult::CUDA_SUCCESS => sys::cuMemPoolSetAttribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    &mut threshold as *mut u64 as *mut std::ffi::c_void,
                ),
                other => other,
            }
        };
        if r != sys::CUresult::CUDA_SUCCESS {
            eprintln!(
                "strata: the GPU's memory pool keeps no freed memory ({r:?}): each step's buffers \
                 may be mapped again after every wait for the device"
            );
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
        let capability = ctx.compute_capability().unwrap_or((0, 0));
        use cudarc::driver::sys::CUdevice_attribute_enum::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT as SMS;
        let sm_count = ctx
            .attribute(SMS)
            .map_err(|e| format!("reading the GPU's multiprocessor count: {e}"))?
            .max(1) as usize;
        Ok(CudaRuntime {
            ctx,
            stream,
            functions: Mutex::new(HashMap::new()),
            profile: Mutex::new(None),
            profiling: AtomicBool::new(false),
            device_name,
            capability,
            sm_count,
            resident: Mutex::new(Vec::new()),
        })
    }

    /// How many blocks of `kernel` (its build without defines) fit on the GPU at once at `threads`
    /// threads and `smem` bytes of dynamic shared memory a block: the SM count times the
    /// occupancy the driver computes from its registers and shared memory.
    pub fn resident_blocks(
        &self,
        kernel: &'static str,
        threads: u32,
        smem: u32,
    ) -> Result<usize, String> {
        let key = (kernel, threads, smem);
        let poisoned = |_| "occupancy cache lock poisoned".to_string();
        let known = self.resident.lock().map_err(poisoned)?;
        if let Some(&(_, n)) = known.iter().find(|(k, _)| *k == key) {
            return Ok(n);
        }
        drop(known);
        let f = self.function(kernel, &[])?;
        let per_sm = f
            .occupancy_max_active_blocks_per_multiprocessor(threads, smem as usize, None)
            .map_err(|e| format!("occupancy of {kernel} at {threads} threads: {e}"))?;
        let n = self.sm_count * per_sm.max(1) as usize;
        self.resident.lock().map_err(poisoned)?.push((key, n));
        Ok(n)
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
        let load_ptx = || -> Result<_, String> {
            let (ptx, _) = compile_with(file, arch, defines)?;
            self.ctx
                .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
                .map_err(|e| {
                    format!(
                        "loading {} (PTX for {arch}) on {}: {e}",
                        file.file, self.device_name
                    )
                })
        };
        // Machine code on the GPU it was made for; PTX (compiled by the driver at load) on a
        // GPU of another architecture, or should the machine code not load.
        let module = if capability_of(arch) == Some(self.capability) {
            let (cubin, _) = compile_cubin_with(file, arch, defines)?;
            match self.ctx.load_module(cudarc::nvrtc::Ptx::from_binary(cubin)) {
                Ok(m) => m,
                Err(e) => {
                    eprintln!(
                        "strata: the machine code of {} for {arch} did not load on {} ({e}); \
                         loading its PTX instead",
                        file.file, self.device_name
                    );
                    load_ptx().map_err(|p| {
                        format!("{p} (after its machine code for {arch} did not load: {e})")
                    })?
                }
            }
        } else {
            load_ptx()?
        };
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
        if smem > 48 * 1024 {
            // Past 48 KB of dynamic shared memory a kernel must opt in, or its launch fails.
            use cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES as MAX_DYNAMIC_SMEM;
            f.set_attribute(MAX_DYNAMIC_SMEM, smem as i32)
                .map_err(|e| {
                    format!(
                        "{kernel}: raising its dynamic shared memory to {smem} bytes failed: {e}"
                    )
                })?;
        }
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: block,
            shared_mem_bytes: smem,
        };
        let mut b = self.stream.launch_builder(&f);
        b.arg(params);
        let mut launch = || {
            // SAFETY: `params` mirrors the kernel's parameter struct (KernelParams) and its
            // pointers are live device allocations of the sizes the kernel reads (the typed
            // wrappers' contract).
            unsafe { b.launch(cfg) }.map(|_| ()).map_err(|e| {
                format!("launch of {kernel} (grid {grid:?}, block {block:?}) failed: {e}")
            })
        };
        if !self.profiling.load(Ordering::Relaxed) {
            return launch();
        }
        let mut profile = self
            .profile
            .lock()
            .map_err(|_| "profile lock poisoned".to_string())?;
        let event = || {
            let e = self
                .ctx
                .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| format!("profiling {kernel}: {e}"))?;
            e.record(&self.stream)
                .map_err(|e| format!("profiling {kernel}: {e}"))?;
            Ok::<_, String>(e)
        };
        let start = profile.is_some().then(event).transpose()?;
        launch()?;
        if let (Some(list), Some(start)) = (profile.as_mut(), start) {
            list.push((kernel, start, event()?));
        }
        Ok(())
    }

    /// (free, total) bytes of the GPU's memory, for the message of an allocation that failed;
    /// None where the driver cannot say.
    pub fn memory_info(&self) -> Option<(usize, usize)> {
        self.ctx.bind_to_thread().ok()?;
        std::panic::catch_unwind(|| cudarc::driver::result::mem_get_info().ok())
            .ok()
            .flatten()
    }

    /// The device's default memory pool (where every buffer comes from): (bytes it holds from the
    /// driver now, its release threshold), or None where it cannot be read. Holding steady across
    /// steps means freed buffers are reused; falling back after each wait for the device would
    /// mean the pool gives memory back and every step maps it again.
    pub fn pool_state(&self) -> Option<(u64, u64)> {
        use cudarc::driver::sys;
        self.ctx.bind_to_thread().ok()?;
        let device = self.ctx.cu_device();
        std::panic::catch_unwind(|| {
            let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
            let (mut reserved, mut threshold) = (0u64, 0u64);
            // SAFETY: the context is current on this thread; the out-pointers are valid u64s, as
            // these two attributes take.
            unsafe {
                if sys::cuDeviceGetDefaultMemPool(&mut pool, device) != sys::CUresult::CUDA_SUCCESS
                {
                    return None;
                }
                for (attr, out) in [
                    (
                        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT,
                        &mut reserved,
                    ),
                    (
                        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                        &mut threshold,
                    ),
                ] {
                    let r = sys::cuMemPoolGetAttribute(
                        pool,
                        attr,
                        out as *mut u64 as *mut std::ffi::c_void,
                    );
                    if r != sys::CUresult::CUDA_SUCCESS {
                        return None;
                    }
                }
            }
            Some((reserved, threshold))
        })
        .ok()
        .flatten()
    }

    /// Starts timing every launch on the GPU (an event pair around each; for profiles, not for
    /// timed runs: the events cost launch time).
    pub fn profile_start(&self) {
        if let Ok(mut p) = self.profile.lock() {
            *p = Some(Vec::new());
            self.profiling.store(true, Ordering::Relaxed);
        }
    }

    /// Ends the profile: per kernel, its launches and summed GPU time, the largest first.
    pub fn profile_take(&self) -> Result<Vec<KernelTime>, String> {
        let taken = self
            .profile
            .lock()
            .map_err(|_| "profile lock poisoned".to_string())?
            .take()
            .unwrap_or_default();
        self.profiling.store(false, Ordering::Relaxed);
        let mut by_kernel: Vec<KernelTime> = Vec::new();
        for (kernel, start, end) in taken {
            let ms = start
                .elapsed_ms(&end)
                .map_err(|e| format!("profile of {kernel}: {e}"))? as f64;
            match by_kernel.iter_mut().find(|k| k.kernel == kernel) {
                Some(k) => {
                    k.launches += 1;
                    k.ms += ms;
                }
                None => by_kernel.push(KernelTime {
                    kernel,
                    launches: 1,
                    ms,
                }),
            }
        }
        by_kernel.sort_by(|a, b| b.ms.total_cmp(&a.ms));
        Ok(by_kernel)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn real_targets_name_their_compute_capability() {
        assert_eq!(super::capability_of("sm_90"), Some((9, 0)));
        assert_eq!(super::capability_of("sm_90a"), Some((9, 0)));
        assert_eq!(super::capability_of("sm_100a"), Some((10, 0)));
        assert_eq!(super::capability_of("sm_86"), Some((8, 6)));
        assert_eq!(super::capability_of("compute_90"), None);
    }
}
