//! Builds the kernel emulator (every kernels/*.cu compiled by the host C++ compiler against
//! src/runtime/emulator/shim.h) and records the git commit the crate was built from.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=kernels");
    // The commit moves on every commit, checkout and pull while .git/HEAD may stay "ref: ...";
    // .git/logs/HEAD records each move.
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/logs/HEAD");
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=STRATA_GIT_COMMIT={commit}");

    println!("cargo:rerun-if-changed=src/runtime/emulator");
    build_emulator();
}

/// FNV-1a over every file under `dirs` (names and contents, in sorted order) and `extra`.
fn sources_hash(dirs: &[&str], extra: &[String]) -> u64 {
    fn walk(dir: &Path, files: &mut Vec<PathBuf>) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, files);
                } else {
                    files.push(p);
                }
            }
        }
    }
    let mut files = Vec::new();
    for d in dirs {
        walk(Path::new(d), &mut files);
    }
    files.sort();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for f in &files {
        eat(f.to_string_lossy().as_bytes());
        eat(&std::fs::read(f).unwrap_or_default());
    }
    for x in extra {
        eat(x.as_bytes());
    }
    h
}

/// The emulator library. The script also reruns when only the commit moved; the C++ (~40 s) is
/// then not recompiled if its sources, compiler settings and profile are unchanged.
fn build_emulator() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    let hash = sources_hash(
        &["kernels", "src/runtime/emulator"],
        &[
            env("CXX"),
            env("CXXFLAGS"),
            env("OPT_LEVEL"),
            env("PROFILE"),
            env("TARGET"),
            env("DEBUG"),
        ],
    )
    .to_string();
    let stamp = out.join("strata_emulator.stamp");
    if out.join("libstrata_emulator.a").exists()
        && std::fs::read_to_string(&stamp).is_ok_and(|s| s == hash)
    {
        for k in ["CXX", "CXXFLAGS"] {
            println!("cargo:rerun-if-env-changed={k}");
        }
        println!("cargo:rustc-link-lib=static=strata_emulator");
        println!("cargo:rustc-link-search=native={}", out.display());
        println!("cargo:rustc-link-lib=stdc++");
        return;
    }
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
    std::fs::write(&stamp, hash).expect("write the emulator's build stamp");
}
