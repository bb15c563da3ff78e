//! The kernel emulator's launch timing (strata::runtime::emulated_profile_of), alone in its test
//! binary (cargo runs test binaries one at a time): it measures wall-clock time, which the other
//! tests' threads, running beside it in one binary, would stretch.

use strata::runtime::Backend;

/// The emulator's launch timing (what examples/emu_profile.rs prints) on work of known shapes
/// (kernels/selftest.cu's selftest_serial), 15 like blocks a launch: a chain of n steps in one
/// thread is a block's critical path; the same n shared by 256 threads is a 256th of it; two
/// chains of n / 2, one after the other across a barrier, add up to it though each ran in another
/// thread. The timing is wall-clock, so a block whose run the OS paused has a longer path: the
/// median blocks' are compared, the best of three launches, with wide margins.
#[test]
fn the_emulators_timing_finds_work_that_runs_in_few_threads() {
    let be = Backend::Emulator;
    let (n, blocks, threads) = (1_000_000i32, 15u32, 256u32);
    let out = be.zeros::<f32>((blocks * threads) as usize).unwrap();
    let median_path = |mode: i32| {
        let p = strata::runtime::kernels::SelftestSerialParams {
            out: be.ptr(&out),
            n,
            mode,
        };
        let (r, profile) = strata::runtime::emulated_profile_of(|| {
            be.launch("selftest_serial", (blocks, 1, 1), (threads, 1, 1), 0, &p)
        });
        r.unwrap();
        assert_eq!(profile.len(), 1, "{profile:?}");
        let k = &profile[0];
        assert_eq!(
            (k.kernel, k.launches, k.blocks),
            ("selftest_serial", 1, blocks as u64)
        );
        assert!(
            k.median_critical_ms > 0.0
                && k.median_critical_ms <= k.critical_ms
                && k.critical_ms <= k.work_ms,
            "{k:?}"
        );
        // One phase, two across mode 2's barrier.
        assert_eq!(k.phases, if mode == 2 { 2 } else { 1 }, "{k:?}");
        let v = be.download(&out).unwrap();
        assert!(v.iter().all(|x| x.is_finite()), "the chains ran");
        k.median_critical_ms
    };
    // Best of three, each in the direction a pause cannot fake: pauses lengthen paths, so the
    // shortest spread chain and the longest pair of phases (against one thread's shortest chain).
    let chain = (0..3).map(|_| median_path(0)).fold(f64::MAX, f64::min);
    let spread = (0..3).map(|_| median_path(1)).fold(f64::MAX, f64::min) / chain;
    assert!(
        spread < 0.1,
        "a chain spread over 256 threads: {spread:.3} of one thread's"
    );
    let phases = (0..3).map(|_| median_path(2)).fold(0.0, f64::max) / chain;
    assert!(
        phases > 0.7,
        "two chains across a barrier: {phases:.3} of one thread's"
    );
    // A profile holds the launches made inside it only, and one inside another keeps its own.
    let (((), inner), outer) = strata::runtime::emulated_profile_of(|| {
        let p = strata::runtime::kernels::SelftestSerialParams {
            out: be.ptr(&out),
            n: 1000,
            mode: 1,
        };
        be.launch("selftest_serial", (2, 1, 1), (32, 1, 1), 0, &p)
            .unwrap();
        strata::runtime::emulated_profile_of(|| {
            be.launch("selftest_serial", (3, 1, 1), (32, 1, 1), 0, &p)
                .unwrap();
        })
    });
    assert_eq!((outer.len(), outer[0].blocks), (1, 2), "{outer:?}");
    assert!(outer[0].median_critical_ms <= outer[0].critical_ms);
    assert_eq!((inner.len(), inner[0].blocks), (1, 3), "{inner:?}");
}
