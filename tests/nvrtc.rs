//! Every kernel file compiles with NVRTC for sm_90 (sm_90a where it uses wgmma; no GPU needed,
//! only libnvrtc). CI installs
//! NVRTC and sets STRATA_REQUIRE_NVRTC=1, so there a missing NVRTC fails the test; on a machine
//! without it the test says so and passes.

use strata::runtime::{cuda, kernels};

#[test]
fn every_kernel_compiles_for_sm90_and_the_cache_is_checked() {
    if let Err(why) = cuda::nvrtc_version() {
        if std::env::var("STRATA_REQUIRE_NVRTC").is_ok_and(|v| v == "1") {
            panic!("STRATA_REQUIRE_NVRTC=1 but NVRTC is unavailable: {why}");
        }
        eprintln!("skipped: {why}");
        return;
    }
    let dir = std::env::temp_dir().join(format!("strata-nvrtc-cache-{}", std::process::id()));
    std::env::set_var("STRATA_KERNEL_CACHE", &dir);
    // Beside the cache checks (a thread of its own: twice as many compiles), every file and every
    // specialization below compiled fresh: NVRTC warnings fail, and so does ptxas's note that it
    // serialized a production kernel's wgmmas (its other performance notes, and the self-test's,
    // are shown).
    std::thread::scope(|scope| {
        scope.spawn(compile_without_warnings);
        cache_checks(&dir);
    });
    std::fs::remove_dir_all(&dir).ok();
}

/// Whether ptxas says it serialized wgmma instructions (notes C7514 to C7520: accumulators read
/// or a wait injected inside the pipeline, a dependence in a divergent path): a wgmma kernel that
/// keeps a group in flight then runs as if it waited for each.
fn serializes_wgmma(file: &kernels::KernelFile, log: &str) -> bool {
    file.file != "wgmma.cu"
        && log.lines().any(|l| {
            l.contains("Potential Performance Loss: wgmma")
                || l.contains("warpgroup.wait is injected")
        })
}

fn compile_without_warnings() {
    for file in kernels::FILES {
        let log = cuda::compile_log(file, cuda::arch_of(file), &[]).unwrap();
        assert!(
            !log.contains("warning") && !serializes_wgmma(file, &log),
            "{}: NVRTC warns:\n{log}",
            file.file
        );
        if !log.is_empty() {
            eprintln!("{} ({}): {log}", file.file, cuda::arch_of(file));
        }
    }
    for g in hconv_specializations() {
        let defines = strata::ops::device::hconv_defines(&g);
        for file in kernels::FILES.iter().filter(|f| f.file == "hconv.cu") {
            let arch = cuda::arch_of(file);
            let log = cuda::compile_log(file, arch, &defines).unwrap();
            assert!(
                !log.contains("warning") && !serializes_wgmma(file, &log),
                "{g:?} ({arch}): NVRTC warns:\n{log}"
            );
        }
    }
}

/// HConv's convs on HuBERT-Base and -Large stacks.
fn hconv_specializations() -> Vec<strata::ops::layer_conv::ConvGeom> {
    [(13usize, 768usize), (25, 1024)]
        .iter()
        .flat_map(|&(l, d)| {
            strata::models::interface::hconv_plan(l, d, 5, 3)
                .unwrap()
                .convs
        })
        .collect()
}

fn cache_checks(dir: &std::path::Path) {
    for file in kernels::FILES {
        let (ptx, hit) = cuda::compile(file, cuda::arch_of(file)).unwrap_or_else(|e| panic!("{e}"));
        assert!(!hit, "{}: fresh cache", file.file);
        for k in file.kernels {
            assert!(
                ptx.contains(&format!(".entry {k}(")),
                "{}: PTX has no entry {k}",
                file.file
            );
        }
        let (again, hit) = cuda::compile(file, cuda::arch_of(file)).unwrap();
        assert!(
            hit && again == ptx,
            "{}: second compile comes from the cache",
            file.file
        );
        // The same compile left the machine code for the target GPU in the cache too.
        let (cubin, hit) = cuda::compile_cubin_with(file, cuda::arch_of(file), &[]).unwrap();
        assert!(
            hit && cubin.starts_with(b"\x7fELF"),
            "{}: its cubin is cached, an ELF image",
            file.file
        );
    }
    // Specializations: HConv's vectorized kernels with HuBERT-Base / Large geometry as -D
    // constants (compiled without warnings above: a constant redefined by the source made the
    // kernels' spec check trap on every launch) are cached apart from the plain build, and differ
    // from it.
    let hconv = kernels::file_of("hconv_conv_forward_vec").unwrap();
    let (plain, _) = cuda::compile(hconv, cuda::ARCH).unwrap();
    for g in hconv_specializations() {
        let defines = strata::ops::device::hconv_defines(&g);
        let (ptx, hit) = cuda::compile_with(hconv, cuda::ARCH, &defines)
            .unwrap_or_else(|e| panic!("{g:?}: {e}"));
        assert!(!hit && ptx != plain, "{g:?}: a variant of its own");
        let (_, hit) = cuda::compile_with(hconv, cuda::ARCH, &defines).unwrap();
        assert!(hit, "{g:?}: cached");
    }
    // A damaged cache entry is recompiled, never trusted. The damaged one is adamw.cu's: a file
    // with a single (unspecialized) entry, so the plain compile below must meet it.
    let file = kernels::file_of("adam_step").unwrap();
    // Its PTX entry (the cubin beside it has the same stem; the directory's order is arbitrary).
    let entry = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            let name = p.file_name().unwrap().to_str().unwrap();
            name.starts_with("adamw-") && name.ends_with(".ptx")
        })
        .expect("adamw.cu's PTX cache entry");
    let text = std::fs::read_to_string(&entry).unwrap();
    std::fs::write(&entry, &text[..text.len() / 2]).unwrap();
    let (_, hit) = cuda::compile(file, cuda::arch_of(file)).unwrap();
    assert!(!hit, "a truncated entry must be recompiled");
    // Likewise a cubin with one byte changed (its hash no longer matches).
    let cubin_entry = entry.with_extension("cubin");
    let mut bytes = std::fs::read(&cubin_entry).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&cubin_entry, &bytes).unwrap();
    let (cubin, hit) = cuda::compile_cubin_with(file, cuda::arch_of(file), &[]).unwrap();
    assert!(
        !hit && cubin.starts_with(b"\x7fELF"),
        "a damaged cubin must be recompiled"
    );
    let (_, hit) = cuda::compile_cubin_with(file, cuda::arch_of(file), &[]).unwrap();
    assert!(hit, "the recompiled cubin is cached again");
}
