//! The kernel emulator backend: kernels/*.cu compiled by the host C++ compiler (build.rs) and run
//! with each block's threads as cooperative fibers (src/runtime/emulator/emulator.cpp). It runs the
//! same kernel code as the GPU, so `cargo test` checks every kernel on machines with no GPU, and
//! fails a launch where the GPU would fault or refuse (misaligned 16-byte accesses, launch shapes
//! and shared memory past CUDA's limits; see kernels/README.md). Threads and blocks run in orders
//! that vary, so a race on a missing barrier or across blocks changes results. What it cannot
//! show: races that need true concurrency, memory-model bugs, speed. What it can time
//! ([`emulated_profile_of`]): each launch's CPU work and its blocks' critical paths, which show a
//! kernel whose work runs in a few threads (a latency floor on any GPU), not how fast it runs.

use std::ffi::{c_char, c_void};

type EmuFn =
    unsafe extern "C" fn(u32, u32, u32, u32, u32, u32, u32, *const c_void, *mut c_char, u32) -> i32;

macro_rules! entries {
    ($($name:ident),* $(,)?) => {
        mod ffi {
            use std::ffi::{c_char, c_void};
            extern "C" {
                $(
                    #[allow(improper_ctypes)]
                    pub fn $name(gx: u32, gy: u32, gz: u32, bx: u32, by: u32, bz: u32, smem: u32,
                                 params: *const c_void, err: *mut c_char, errlen: u32) -> i32;
                )*
            }
        }
        fn entry(kernel: &str) -> Option<EmuFn> {
            $(
                if stringify!($name).strip_prefix("strata_emu_") == Some(kernel) {
                    return Some(ffi::$name);
                }
            )*
            None
        }
    };
}

entries!(
    strata_emu_layer_sum_forward,
    strata_emu_layer_sum_backward,
    strata_emu_layer_sum_backward_dw,
    strata_emu_layer_sum_reduce,
    strata_emu_adam_step,
    strata_emu_adam_step_multi,
    strata_emu_sum_squares_partial,
    strata_emu_sum_squares_multi,
    strata_emu_clip_coefficient,
    strata_emu_hconv_conv_forward,
    strata_emu_hconv_conv_forward_vec,
    strata_emu_hconv_conv_forward_wgmma,
    strata_emu_hconv_conv_backward_data,
    strata_emu_hconv_conv_backward_weight,
    strata_emu_hconv_relu_mask,
    strata_emu_hconv_conv_backward_data_vec,
    strata_emu_hconv_conv_backward_weight_vec,
    strata_emu_hconv_conv_backward_data_wgmma,
    strata_emu_hconv_conv_backward_weight_wgmma,
    strata_emu_hconv_split_reduce,
    strata_emu_ctc_alpha_beta,
    strata_emu_ctc_grad,
    strata_emu_cross_entropy_fwd_bwd,
    strata_emu_log_softmax_forward,
    strata_emu_log_softmax_backward,
    strata_emu_mean_pool_forward,
    strata_emu_mean_pool_backward,
    strata_emu_utterance_center,
    strata_emu_conv2d_patches,
    strata_emu_conv2d_patches_adjoint,
    strata_emu_row_mix,
    strata_emu_specaug_mask,
    strata_emu_scale_add_positions,
    strata_emu_lstm_step_forward,
    strata_emu_lstm_step_backward,
    strata_emu_lstm_transpose,
    strata_emu_dropout_apply,
    strata_emu_cast_f32_to_bf16,
    strata_emu_cast_bf16_to_f32,
    strata_emu_select_layer,
    strata_emu_cls_attention_forward,
    strata_emu_cls_attention_backward,
    strata_emu_packed_attention_forward,
    strata_emu_packed_attention_backward_query,
    strata_emu_packed_attention_backward_key,
    strata_emu_packed_attention_tiled_forward,
    strata_emu_packed_attention_tiled_backward_query,
    strata_emu_packed_attention_tiled_backward_key,
    strata_emu_add_rows,
    strata_emu_add_grads,
    strata_emu_col_sum_accumulate,
    strata_emu_activation_forward,
    strata_emu_activation_backward,
    strata_emu_layernorm_forward,
    strata_emu_layernorm_backward,
    strata_emu_layernorm_param_reduce,
    strata_emu_layernorm_rows_bf16,
    strata_emu_rows_gather,
    strata_emu_rows_gather_sum,
    strata_emu_stats_pool_forward,
    strata_emu_stats_pool_backward,
    strata_emu_l2_normalize_forward,
    strata_emu_l2_normalize_backward,
    strata_emu_am_margin,
    strata_emu_selftest_collectives,
    strata_emu_selftest_mma,
    strata_emu_selftest_divergent_barrier,
    strata_emu_selftest_unordered,
    strata_emu_selftest_ldmatrix,
    strata_emu_selftest_shared_bounds,
    strata_emu_selftest_serial,
    strata_emu_selftest_wgmma,
);

extern "C" {
    fn strata_emu_set_timing(on: i32);
    fn strata_emu_last_timing(
        work_ns: *mut u64,
        critical_ns: *mut u64,
        median_ns: *mut u64,
        phases: *mut u64,
    );
}

/// One kernel's launches in an [`emulated_profile_of`], timed on the CPU by the emulator.
#[derive(Clone, Debug, PartialEq)]
pub struct EmulatedKernel {
    pub kernel: &'static str,
    pub launches: usize,
    /// Blocks over all its launches.
    pub blocks: u64,
    /// CPU time of all its threads' code, summed (the emulator runs them one after another).
    pub work_ms: f64,
    /// Its launches' critical paths, summed: a launch's is its longest block's, in which a warp
    /// takes as long as its slowest lane, warps run side by side between barriers and the phases
    /// between barriers one after another. Host CPU time, but a thread's serial chain of work runs
    /// no faster on a GPU thread: a kernel whose critical path is a large part of its work runs in
    /// a handful of threads, however many the GPU has. (The emulated tensor-core instructions are
    /// computed by one lane in software: their kernels' paths say little.) Wall-clock time: a
    /// timer interrupt or a paused virtual CPU inside any block's run adds to it (on the 2-core
    /// development VM, ~0.1 ms a launch).
    pub critical_ms: f64,
    /// The launches' median blocks' critical paths, summed: unmoved by a pause in a few blocks.
    /// Near `critical_ms` when the blocks are alike.
    pub median_critical_ms: f64,
    /// Its launches' most barrier phases in a block (one more than the block's __syncthreads
    /// passed), summed: the steps a block cannot overlap, each at least a barrier's latency on a
    /// GPU and a memory round trip where the phase loads what the one before stored. Counted, not
    /// timed: unmoved by the host's noise or the emulator's cost per thread.
    pub phases: u64,
}

thread_local! {
    /// The launches of the innermost [`emulated_profile_of`] running on this thread, if any.
    static PROFILE: std::cell::RefCell<Option<Vec<EmulatedKernel>>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `work` with every emulator launch it makes on this thread timed: per kernel, in order of
/// first launch, its launches, blocks, CPU work and critical path ([`EmulatedKernel`]). A profile
/// inside another counts its launches for itself only.
pub fn emulated_profile_of<R>(work: impl FnOnce() -> R) -> (R, Vec<EmulatedKernel>) {
    let outer = PROFILE.with(|p| p.borrow_mut().replace(Vec::new()));
    let r = work();
    let mine = PROFILE.with(|p| std::mem::replace(&mut *p.borrow_mut(), outer));
    (r, mine.unwrap_or_default())
}

/// Runs `kernel` to completion. `params` must be the kernel's parameter struct, its pointers valid
/// host pointers covering everything the kernel touches.
pub(crate) fn launch(
    kernel: &'static str,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    smem: u32,
    params: *const c_void,
) -> Result<(), String> {
    let f =
        entry(kernel).ok_or_else(|| format!("kernel '{kernel}' is not built into the emulator"))?;
    // `__shared__` is function-static storage in the emulator, one copy per process: two launches
    // of one kernel from two threads (parallel tests) would share it. One launch at a time.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut err = [0 as c_char; 512];
    let timed = PROFILE.with(|p| p.borrow().is_some());
    // SAFETY: sets a flag of this thread's launches.
    unsafe { strata_emu_set_timing(timed as i32) };
    // SAFETY: the entry runs the kernel body on `params` (the caller's contract) and writes at most
    // errlen bytes of message.
    let rc = unsafe {
        f(
            grid.0,
            grid.1,
            grid.2,
            block.0,
            block.1,
            block.2,
            smem,
            params,
            err.as_mut_ptr(),
            err.len() as u32,
        )
    };
    if timed && rc == 0 {
        let (mut work, mut critical, mut median, mut phases) = (0u64, 0u64, 0u64, 0u64);
        // SAFETY: valid out-pointers; the figures are this thread's last launch's.
        unsafe { strata_emu_last_timing(&mut work, &mut critical, &mut median, &mut phases) };
        let blocks = grid.0 as u64 * grid.1 as u64 * grid.2 as u64;
        PROFILE.with(|p| {
            let mut p = p.borrow_mut();
            let list = p.as_mut().expect("checked above: a profile is running");
            let entry = match list.iter().position(|k| k.kernel == kernel) {
                Some(i) => &mut list[i],
                None => {
                    list.push(EmulatedKernel {
                        kernel,
                        launches: 0,
                        blocks: 0,
                        work_ms: 0.0,
                        critical_ms: 0.0,
                        median_critical_ms: 0.0,
                        phases: 0,
                    });
                    list.last_mut().expect("just pushed")
                }
            };
            entry.launches += 1;
            entry.blocks += blocks;
            entry.work_ms += work as f64 * 1e-6;
            entry.critical_ms += critical as f64 * 1e-6;
            entry.median_critical_ms += median as f64 * 1e-6;
            entry.phases += phases;
        });
    }
    if rc == 0 {
        Ok(())
    } else {
        // SAFETY: the emulator writes a NUL-terminated message on failure.
        let msg = unsafe { std::ffi::CStr::from_ptr(err.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        Err(msg)
    }
}
