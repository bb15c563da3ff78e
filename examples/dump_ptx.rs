//! Writes the PTX NVRTC makes of every kernel file (sm_90) into a folder, for ptxas reports:
//! `cargo run --release --example dump_ptx -- OUT_DIR` (needs libnvrtc.so.13 on LD_LIBRARY_PATH).

use strata::runtime::{cuda, kernels};

fn main() {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "ptx".into());
    std::fs::create_dir_all(&dir).expect("output folder");
    for file in kernels::FILES {
        let (ptx, _) = cuda::compile(file, cuda::ARCH).unwrap_or_else(|e| panic!("{e}"));
        let path = format!("{dir}/{}.ptx", file.file.trim_end_matches(".cu"));
        std::fs::write(&path, ptx).expect("write PTX");
        println!("{path}");
    }
}
