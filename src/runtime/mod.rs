//! Devices and the one launch interface both backends implement.
//! - [`Backend::Emulator`]: kernels/*.cu compiled for the host, threads as fibers (no GPU needed).
//! - [`Backend::Cuda`]: the same sources compiled by NVRTC, launched through cudarc.
//!
//! Kernels take one `#[repr(C)]` parameter struct ([`kernels::KernelParams`]) holding device
//! addresses from [`Backend::ptr`]; grid, block and shared memory are given as on the GPU.

pub mod cuda;
pub mod emulator;
pub mod kernels;
pub mod knobs;

pub use emulator::{emulated_profile_of, EmulatedKernel};

use crate::error::{Error, Result};
use crate::tensor::Device;
use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
use std::cell::{RefCell, UnsafeCell};

/// What one piece of work asked of its backend, counted on the calling thread by
/// [`traffic_of`]: each kernel's launches, the copies between host and device (each a wait for
/// the device, going down), the buffers allocated and the explicit waits. A training step's
/// contract (no host round-trip but the loss) is checked on it, and its launch count says how
/// much of a small step is launch overhead.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Traffic {
    /// (kernel, launches), in order of first launch.
    pub launches: Vec<(&'static str, usize)>,
    pub uploads: usize,
    pub upload_bytes: usize,
    pub downloads: usize,
    pub download_bytes: usize,
    pub allocations: usize,
    pub allocation_bytes: usize,
    pub synchronizes: usize,
    /// The host's wall time inside those calls.
    pub host: HostTime,
}

/// Host wall time spent inside the backend's calls, by kind ([`Traffic::host`]). On the GPU a
/// launch's is the driver's enqueueing (the kernel runs later) and a download's includes waiting
/// for the device to finish the work queued before it; in the emulator a launch's is the kernel's
/// whole run. A step whose GPU time is near its host time less the downloads' is host-bound: the
/// GPU waits for launches.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct HostTime {
    pub launch: std::time::Duration,
    /// Copies up, with their allocations.
    pub upload: std::time::Duration,
    pub allocate: std::time::Duration,
    pub download: std::time::Duration,
    pub synchronize: std::time::Duration,
}

impl HostTime {
    pub fn total(&self) -> std::time::Duration {
        self.launch + self.upload + self.allocate + self.download + self.synchronize
    }

    fn add(&mut self, other: &HostTime) {
        self.launch += other.launch;
        self.upload += other.upload;
        self.allocate += other.allocate;
        self.download += other.download;
        self.synchronize += other.synchronize;
    }
}

impl Traffic {
    /// Every kernel launch.
    pub fn total_launches(&self) -> usize {
        self.launches.iter().map(|(_, n)| n).sum()
    }

    /// The launches of `kernel`.
    pub fn launches_of(&self, kernel: &str) -> usize {
        self.launches
            .iter()
            .find(|(k, _)| *k == kernel)
            .map_or(0, |(_, n)| *n)
    }

    fn add(&mut self, other: &Traffic) {
        for &(k, n) in &other.launches {
            self.launch(k, n);
        }
        self.uploads += other.uploads;
        self.upload_bytes += other.upload_bytes;
        self.downloads += other.downloads;
        self.download_bytes += other.download_bytes;
        self.allocations += other.allocations;
        self.allocation_bytes += other.allocation_bytes;
        self.synchronizes += other.synchronizes;
        self.host.add(&other.host);
    }

    fn launch(&mut self, kernel: &'static str, n: usize) {
        match self.launches.iter_mut().find(|(k, _)| *k == kernel) {
            Some((_, count)) => *count += n,
            None => self.launches.push((kernel, n)),
        }
    }
}

thread_local! {
    /// The counts of the innermost [`traffic_of`] running on this thread, if any.
    static TRAFFIC: RefCell<Option<Traffic>> = const { RefCell::new(None) };
}

/// Runs `work` and returns what it asked of the backends on this thread ([`Traffic`]); launches
/// and copies from other threads are not counted. Nested calls each see their own work, which the
/// outer call's counts include.
pub fn traffic_of<R>(work: impl FnOnce() -> R) -> (R, Traffic) {
    let outer = TRAFFIC.with(|t| t.borrow_mut().replace(Traffic::default()));
    let r = work();
    let mine = TRAFFIC.with(|t| {
        let mut slot = t.borrow_mut();
        let mine = slot.take().unwrap_or_default();
        *slot = outer.map(|mut o| {
            o.add(&mine);
            o
        });
        mine
    });
    (r, mine)
}

/// Adds to the running [`traffic_of`]'s counts (none running: nothing, one thread-local read).
fn count(f: impl FnOnce(&mut Traffic)) {
    TRAFFIC.with(|t| {
        if let Some(traffic) = t.borrow_mut().as_mut() {
            f(traffic)
        }
    });
}

/// Runs `call` and, while a [`traffic_of`] runs on this thread, adds its wall time to the
/// [`HostTime`] field `kind` picks.
fn timed<R>(kind: fn(&mut HostTime) -> &mut std::time::Duration, call: impl FnOnce() -> R) -> R {
    let start = TRAFFIC
        .with(|t| t.borrow().is_some())
        .then(std::time::Instant::now);
    let r = call();
    if let Some(start) = start {
        let took = start.elapsed();
        count(|t| *kind(&mut t.host) += took);
    }
    r
}

/// What a caller asked for (`--device auto|cpu|cuda`) resolved to what exists.
pub fn resolve(requested: &str) -> std::result::Result<Device, String> {
    match requested {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(if cuda::CudaRuntime::probe().is_ok() {
            Device::Cuda(0)
        } else {
            Device::Cpu
        }),
        "cuda" => cuda::CudaRuntime::probe()
            .map(|_| Device::Cuda(0))
            .map_err(|why| format!("CUDA was requested but is unavailable: {why}")),
        other => Err(format!("unknown device '{other}': use auto, cpu or cuda")),
    }
}

pub enum Backend {
    Emulator,
    Cuda(cuda::CudaRuntime),
}

/// A buffer on a backend. Host buffers sit in an UnsafeCell because kernels write through the raw
/// addresses handed to them.
pub enum Buf<T> {
    Host(UnsafeCell<Vec<T>>),
    Cuda(CudaSlice<T>),
}

impl<T> std::fmt::Debug for Buf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let place = match self {
            Buf::Host(_) => "host",
            Buf::Cuda(_) => "cuda",
        };
        write!(
            f,
            "Buf<{}>({place}, {} elements)",
            std::any::type_name::<T>(),
            self.len()
        )
    }
}

impl<T> Buf<T> {
    pub fn len(&self) -> usize {
        match self {
            // SAFETY: reading the length while no kernel runs (launches are synchronous here).
            Buf::Host(v) => unsafe { (*v.get()).len() },
            Buf::Cuda(s) => s.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether this buffer lives on `be` (a kernel can only read its own backend's memory).
    pub fn is_on(&self, be: &Backend) -> bool {
        matches!(
            (self, be),
            (Buf::Host(_), Backend::Emulator) | (Buf::Cuda(_), Backend::Cuda(_))
        )
    }
}

fn device_err(e: impl std::fmt::Display) -> Error {
    Error::Device(e.to_string())
}

/// Bytes as a person reads them: "512 B", "9.4 MB", "1.26 GB".
pub fn readable_bytes(bytes: usize) -> String {
    match bytes {
        b if b >= 1_000_000_000 => format!("{:.2} GB", b as f64 / 1e9),
        b if b >= 1_000_000 => format!("{:.1} MB", b as f64 / 1e6),
        b if b >= 1_000 => format!("{:.1} kB", b as f64 / 1e3),
        b => format!("{b} B"),
    }
}

/// A buffer of `n` elements of T that could not be had, with its size, where, the memory the
/// GPU has left, and what to do.
fn allocation_err<T>(be: &Backend, n: usize, why: impl std::fmt::Display) -> Error {
    let size = match n.checked_mul(std::mem::size_of::<T>()) {
        Some(b) => readable_bytes(b),
        None => "more bytes than an address space holds".into(),
    };
    let ty = std::any::type_name::<T>()
        .rsplit("::")
        .next()
        .unwrap_or("?");
    let place = match be {
        Backend::Emulator => "in the kernel emulator's host memory".to_string(),
        Backend::Cuda(rt) => match rt.memory_info() {
            Some((free, total)) => format!(
                "on {} ({} free of {})",
                rt.device_name,
                readable_bytes(free),
                readable_bytes(total)
            ),
            None => format!("on {}", rt.device_name),
        },
    };
    Error::Allocation(format!(
        "allocating {n} {ty} ({size}) {place} failed: {why}; a smaller batch (fewer or shorter \
         utterances) needs less"
    ))
}

/// An empty host vector with room for the emulator's buffer of `n` elements, or an error where the
/// host cannot hold them (an allocation that fails would otherwise abort the process).
fn host_room<T>(be: &Backend, n: usize) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n)
        .map_err(|e| allocation_err::<T>(be, n, e))?;
    Ok(v)
}

/// The emulator's buffers: `n` copies of `fill` ([`host_room`]).
fn host_vec<T: Clone>(be: &Backend, n: usize, fill: T) -> Result<Vec<T>> {
    let mut v = host_room(be, n)?;
    v.resize(n, fill);
    Ok(v)
}

impl Backend {
    /// The first GPU, or the reason there is none.
    pub fn cuda() -> std::result::Result<Self, String> {
        cuda::CudaRuntime::probe().map(Backend::Cuda)
    }

    pub fn name(&self) -> String {
        match self {
            Backend::Emulator => "kernel emulator (CPU)".into(),
            Backend::Cuda(rt) => rt.device_name.clone(),
        }
    }

    pub fn upload<T: DeviceRepr + Clone>(&self, data: &[T]) -> Result<Buf<T>> {
        count(|t| {
            t.uploads += 1;
            t.upload_bytes += std::mem::size_of_val(data);
            t.allocations += 1;
            t.allocation_bytes += std::mem::size_of_val(data);
        });
        timed(
            |h| &mut h.upload,
            || match self {
                Backend::Emulator => {
                    let mut v = host_room(self, data.len())?;
                    v.extend_from_slice(data);
                    Ok(Buf::Host(UnsafeCell::new(v)))
                }
                Backend::Cuda(rt) => rt
                    .stream
                    .clone_htod(data)
                    .map(Buf::Cuda)
                    .map_err(|e| allocation_err::<T>(self, data.len(), e)),
            },
        )
    }

    pub fn zeros<T: DeviceRepr + ValidAsZeroBits + Clone + Default>(
        &self,
        n: usize,
    ) -> Result<Buf<T>> {
        count(|t| {
            t.allocations += 1;
            t.allocation_bytes += n * std::mem::size_of::<T>();
        });
        timed(
            |h| &mut h.allocate,
            || match self {
                Backend::Emulator => {
                    Ok(Buf::Host(UnsafeCell::new(host_vec(self, n, T::default())?)))
                }
                Backend::Cuda(rt) => rt
                    .stream
                    .alloc_zeros(n)
                    .map(Buf::Cuda)
                    .map_err(|e| allocation_err::<T>(self, n, e)),
            },
        )
    }

    /// A buffer of `n` elements that a kernel writes in full: on the GPU left uninitialised (no
    /// memset pass over memory that is about to be overwritten), in the emulator filled with 0xFF
    /// bytes (NaN for f32 and bf16) so that a kernel leaving any element unwritten fails its
    /// comparison in `cargo test` instead of passing on zeros.
    pub fn output<T: DeviceRepr + bytemuck::Pod>(&self, n: usize) -> Result<Buf<T>> {
        count(|t| {
            t.allocations += 1;
            t.allocation_bytes += n * std::mem::size_of::<T>();
        });
        timed(
            |h| &mut h.allocate,
            || match self {
                Backend::Emulator => {
                    let mut v = host_vec(self, n, T::zeroed())?;
                    bytemuck::cast_slice_mut::<T, u8>(&mut v).fill(0xFF);
                    Ok(Buf::Host(UnsafeCell::new(v)))
                }
                // SAFETY: the contents are unset until the kernel writes them; T is Pod, so
                // whatever the memory holds is a valid (if meaningless) value.
                Backend::Cuda(rt) => unsafe { rt.stream.alloc::<T>(n) }
                    .map(Buf::Cuda)
                    .map_err(|e| allocation_err::<T>(self, n, e)),
            },
        )
    }

    pub fn download<T: DeviceRepr + Clone + Default>(&self, b: &Buf<T>) -> Result<Vec<T>> {
        count(|t| {
            t.downloads += 1;
            t.download_bytes += b.len() * std::mem::size_of::<T>();
        });
        timed(
            |h| &mut h.download,
            || match (self, b) {
                // SAFETY: no kernel runs concurrently (emulator launches are synchronous).
                (Backend::Emulator, Buf::Host(v)) => Ok(unsafe { (*v.get()).clone() }),
                (Backend::Cuda(rt), Buf::Cuda(s)) => rt.stream.clone_dtoh(s).map_err(device_err),
                _ => Err(device_err("buffer belongs to another backend")),
            },
        )
    }

    /// The address a kernel parameter struct carries for `b`.
    pub fn ptr<T>(&self, b: &Buf<T>) -> u64 {
        match b {
            // SAFETY: only the address is taken; writes happen inside kernels, through the cell.
            Buf::Host(v) => unsafe { (*v.get()).as_mut_ptr() as u64 },
            Buf::Cuda(s) => match self {
                Backend::Cuda(rt) => {
                    use cudarc::driver::DevicePtr;
                    s.device_ptr(&rt.stream).0
                }
                Backend::Emulator => 0,
            },
        }
    }

    /// Launches a kernel by name. Errors name the kernel and its launch shape.
    pub fn launch<P: kernels::KernelParams + DeviceRepr>(
        &self,
        kernel: &'static str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: u32,
        params: &P,
    ) -> Result<()> {
        self.launch_specialized(kernel, &[], grid, block, smem, params)
    }

    /// A launch of the kernel compiled with `-D` constants on the GPU (a variant per distinct set,
    /// compiled on first use and disk-cached). The emulator runs its one build, in which the kernel
    /// reads the same values at run time: kernels use the geometry defines (HC_*) only as constants
    /// for values their parameters also carry (see kernels/hconv.cu), and STRATA_NO_SPECIALIZE=1
    /// turns them off. A tuning define (HV_STAGES, a pipeline depth) is a GPU-only variant of the
    /// build's default, which the emulator runs.
    pub fn launch_specialized<P: kernels::KernelParams + DeviceRepr>(
        &self,
        kernel: &'static str,
        defines: cuda::Defines,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: u32,
        params: &P,
    ) -> Result<()> {
        count(|t| t.launch(kernel, 1));
        let r = timed(
            |h| &mut h.launch,
            || match self {
                Backend::Emulator => emulator::launch(
                    kernel,
                    grid,
                    block,
                    smem,
                    params as *const P as *const std::ffi::c_void,
                ),
                Backend::Cuda(rt) => {
                    // Only the geometry (HC_*) is turned off: other defines (a pipeline depth) size
                    // the launch.
                    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
                    let off = *OFF.get_or_init(|| knobs::flag("STRATA_NO_SPECIALIZE", "1"));
                    let kept: Vec<(&'static str, i64)>;
                    let defines = if off {
                        kept = defines
                            .iter()
                            .filter(|(name, _)| !name.starts_with("HC_"))
                            .copied()
                            .collect();
                        &kept[..]
                    } else {
                        defines
                    };
                    rt.launch(kernel, defines, grid, block, smem, params)
                }
            },
        );
        r.map_err(|e| device_err(format!("{kernel} (grid {grid:?}, block {block:?}): {e}")))
    }

    /// How many blocks of `kernel` (`threads` threads, `smem` bytes of dynamic shared memory) run
    /// at once: on the GPU its SM count times the kernel's occupancy; the emulator answers an
    /// H100's 132 SMs at one block each (kernels sized by it then see the GPU's block counts).
    pub fn resident_blocks(&self, kernel: &'static str, threads: u32, smem: u32) -> Result<usize> {
        match self {
            Backend::Emulator => Ok(132),
            Backend::Cuda(rt) => rt
                .resident_blocks(kernel, threads, smem)
                .map_err(device_err),
        }
    }

    /// Waits for every launched kernel; reports an asynchronous kernel failure.
    pub fn synchronize(&self) -> Result<()> {
        count(|t| t.synchronizes += 1);
        timed(
            |h| &mut h.synchronize,
            || match self {
                Backend::Emulator => Ok(()),
                Backend::Cuda(rt) => rt
                    .stream
                    .synchronize()
                    .map_err(|e| device_err(format!("a kernel failed: {e}"))),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // An allocation the host cannot make is an error naming its size and the fix, where the
    // emulator's `vec!` used to abort the whole process.
    #[test]
    fn an_allocation_too_large_is_an_error_not_an_abort() {
        let be = Backend::Emulator;
        let n = usize::MAX / 2;
        let errors = [
            be.output::<f32>(n).err().map(|e| e.to_string()),
            be.zeros::<u16>(n).err().map(|e| e.to_string()),
        ];
        assert!(matches!(be.output::<f32>(n), Err(Error::Allocation(_))));
        for e in errors {
            let e = e.expect("refused");
            assert!(e.contains(&format!("allocating {n} ")), "{e}");
            assert!(e.contains("kernel emulator"), "{e}");
            assert!(e.contains("smaller batch"), "{e}");
        }
        assert!(be.output::<f32>(3).is_ok());
        assert_eq!(readable_bytes(1_264_000_000), "1.26 GB");
        assert_eq!(readable_bytes(9_437_184), "9.4 MB");
        assert_eq!(readable_bytes(512), "512 B");
    }

    #[test]
    fn traffic_counts_this_threads_work_and_nests() {
        use std::time::Duration;
        let be = Backend::Emulator;
        let ((), outer) = traffic_of(|| {
            let b = be.upload(&[1f32, 2.0, 3.0]).unwrap();
            let ((), inner) = traffic_of(|| {
                be.download(&b).unwrap();
                be.zeros::<u16>(5).unwrap();
                be.synchronize().unwrap();
            });
            assert_eq!(
                (inner.uploads, inner.downloads, inner.download_bytes),
                (0, 1, 12)
            );
            assert_eq!((inner.allocations, inner.allocation_bytes), (1, 10));
            assert!(inner.host.download > Duration::ZERO && inner.host.allocate > Duration::ZERO);
            assert_eq!(
                (inner.host.launch, inner.host.upload),
                (Duration::ZERO, Duration::ZERO)
            );
            // Another thread's work is its own.
            std::thread::scope(|s| {
                s.spawn(|| Backend::Emulator.upload(&[0u8; 64]).unwrap());
            });
        });
        assert_eq!((outer.uploads, outer.upload_bytes), (1, 12));
        assert_eq!((outer.downloads, outer.synchronizes), (1, 1));
        assert_eq!((outer.allocations, outer.allocation_bytes), (2, 22));
        // The outer work's time includes the inner's, and a launch's is the emulated kernel's run.
        assert!(outer.host.upload > Duration::ZERO && outer.host.download > Duration::ZERO);
        assert!(outer.host.total() > outer.host.upload);
        let out = be.zeros::<f32>(64).unwrap();
        let p = kernels::SelftestSerialParams {
            out: be.ptr(&out),
            n: 100_000,
            mode: 0,
        };
        let (r, ran) = traffic_of(|| be.launch("selftest_serial", (2, 1, 1), (32, 1, 1), 0, &p));
        r.unwrap();
        assert!(
            ran.host.launch >= Duration::from_micros(50),
            "{:?}",
            ran.host
        );
        assert_eq!(ran.host.total(), ran.host.launch);
        // Nothing is counted outside traffic_of.
        be.upload(&[0u8; 8]).unwrap();
        assert_eq!(traffic_of(|| ()).1, Traffic::default());
    }
}
