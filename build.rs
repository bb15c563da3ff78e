//! Builds the kernel emulator (every kernels/*.cu compiled by the host C++ compiler against
//! src/runtime/emulator/shim.h) and records the git commit the crate was built from.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-changed=.git/HEAD");
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=STRATA_GIT_COMMIT={commit}");

    println!("cargo:rerun-if-changed=src/runtime/emulator");
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .define("STRATA_EMULATOR", None)
        .include("kernels")
        .file("src/runtime/emulator/emulator.cpp")
        .file("src/runtime/emulator/kernels.cpp")
        .flag_if_supported("-fno-fast-math")
        .flag_if_supported("-ffp-contract=off")
        .warnings(true)
        // `#pragma unroll` is for NVRTC; the host compiler has no use for it.
        .flag_if_supported("-Wno-unknown-pragmas")
        .compile("strata_emulator");
}
