//! The kernel emulator backend: kernels/*.cu compiled by the host C++ compiler (build.rs) and run
//! with each block's threads as cooperative fibers (src/runtime/emulator/emulator.cpp). It runs the
//! same kernel code as the GPU, so `cargo test` checks every kernel on machines with no GPU, and
//! fails a launch where the GPU would fault or refuse (misaligned 16-byte accesses, launch shapes
//! and shared memory past CUDA's limits; see kernels/README.md). Threads and blocks run in orders
//! that vary, so a race on a missing barrier or across blocks changes results. What it cannot
//! show: races that need true concurrency, memory-model bugs, speed.

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
    strata_emu_add_rows,
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
    strata_emu_selftest_wgmma,
);

/// Runs `kernel` to completion. `params` must be the kernel's parameter struct, its pointers valid
/// host pointers covering everything the kernel touches.
pub(crate) fn launch(
    kernel: &str,
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
