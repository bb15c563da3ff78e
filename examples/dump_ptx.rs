//! Writes the PTX NVRTC makes of every kernel file (for sm_90, or the file's own target: sm_90a),
//! and of HConv's HuBERT-Base specializations, into a folder, for ptxas reports, with
//! dynamic_smem.txt: the dynamic shared memory the host gives the kernels that take it by size
//! (ptxas sees only static shared memory):
//! `cargo run --release --example dump_ptx -- OUT_DIR` (needs libnvrtc.so.13 on LD_LIBRARY_PATH).

use strata::runtime::{cuda, kernels};

fn main() {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "ptx".into());
    std::fs::create_dir_all(&dir).expect("output folder");
    for file in kernels::FILES {
        let (ptx, _) = cuda::compile(file, cuda::arch_of(file)).unwrap_or_else(|e| panic!("{e}"));
        // A file built for two targets (hconv.cu) gets one PTX per target.
        let stem = file.file.trim_end_matches(".cu");
        let path = match file.arch {
            Some(arch) => format!("{dir}/{stem}.{arch}.ptx"),
            None => format!("{dir}/{stem}.ptx"),
        };
        std::fs::write(&path, ptx).expect("write PTX");
        println!("{path}");
    }
    // HConv's vectorized kernels specialized to HuBERT-Base's two convs, as the GPU runs them
    // (the sm_90 build with mma.sync, the sm_90a build with wgmma).
    let plan = strata::models::interface::hconv_plan(13, 768, 5, 3).expect("plan");
    for kernel in ["hconv_conv_forward_vec", "hconv_conv_forward_wgmma"] {
        let hconv = kernels::file_of(kernel).expect("hconv.cu");
        let arch = cuda::arch_of(hconv);
        for (i, g) in plan.convs.iter().enumerate() {
            let defines = strata::ops::device::hconv_defines(g);
            let (ptx, _) =
                cuda::compile_with(hconv, arch, &defines).unwrap_or_else(|e| panic!("{e}"));
            let path = format!("{dir}/hconv-base-conv{i}.{arch}.ptx");
            std::fs::write(&path, ptx).expect("write PTX");
            println!("{path}");
        }
    }
    use strata::ops::device::{HV_STAGES, HW_STAGES};
    let lines: Vec<String> = [
        ("hconv_conv_forward_vec", HV_STAGES),
        ("hconv_conv_backward_data_vec", HV_STAGES),
        ("hconv_conv_backward_weight_vec", HV_STAGES),
        ("hconv_conv_forward_wgmma", HW_STAGES),
        ("hconv_conv_backward_data_wgmma", HW_STAGES),
        ("hconv_conv_backward_weight_wgmma", HW_STAGES),
    ]
    .iter()
    .map(|&(k, stages)| {
        let bytes = strata::ops::device::hv_smem_bytes(k, stages);
        format!("{k}: {bytes} bytes of dynamic shared memory ({stages} pipeline stages)\n")
    })
    .collect();
    std::fs::write(format!("{dir}/dynamic_smem.txt"), lines.concat()).expect("write");
}
