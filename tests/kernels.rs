//! Every CUDA kernel against its CPU reference. Always on the kernel emulator (no GPU needed);
//! also on the GPU when STRATA_TEST_CUDA=1 (the device script sets it), where sizes grow to real
//! ones (HuBERT-Base / Large stacks, 32 x 500 frames).
//! fp32 results: 1e-5 relative to the tensor's scale. bf16 results: flash-attention's rule, error
//! vs the fp32 reference at most 2x that of a naive bf16 computation (+1e-6).

mod common;
use common::{abs_diff, backends, max_abs_diff, on_gpu, rel_err};
use half::bf16;
use strata::ops::device::{self, LayerSumShape};
use strata::optim::{clip_grad_norm, Adam, AdamConfig};
use strata::rng::Rng;
use strata::runtime::{Backend, Buf};
use strata::{ParamStore, Tensor};

fn randn(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.normal()).collect()
}

fn to_bf16(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

fn round_bf16(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

#[track_caller]
fn assert_fa_rule(what: &str, got: &[f32], reference: &[f32], naive: &[f32]) {
    let (e, en) = (max_abs_diff(got, reference), max_abs_diff(naive, reference));
    eprintln!("{what}: error {e:.3e}, naive bf16 error {en:.3e}");
    assert!(
        e <= 2.0 * en + 1e-6,
        "{what}: error {e:.3e} > 2 x naive bf16 error {en:.3e}"
    );
}

#[test]
fn emulator_collectives_and_barriers_behave_like_cuda() {
    use strata::runtime::kernels::SelftestParams;
    for be in backends() {
        let n = 200; // two blocks of 128, the second partly empty
        let input: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let inb = be.upload(&input).unwrap();
        let out = be.zeros::<f32>(4 * n).unwrap();
        let p = SelftestParams {
            input: be.ptr(&inb),
            out: be.ptr(&out),
            n: n as i32,
        };
        be.launch("selftest_collectives", (2, 1, 1), (128, 1, 1), 0, &p)
            .unwrap();
        be.synchronize().unwrap();
        let o = be.download(&out).unwrap();
        let val = |i: usize| if i < n { i as f32 } else { 0.0 };
        for i in 0..n {
            let (lane, warp0) = (i % 32, i - i % 32);
            assert_eq!(
                o[4 * i],
                val(warp0 + (lane ^ 5)),
                "{}: xor shuffle at {i}",
                be.name()
            );
            let down = if lane + 3 < 32 { val(i + 3) } else { val(i) };
            assert_eq!(o[4 * i + 1], down, "{}: shuffle down at {i}", be.name());
            let wsum: f32 = (warp0..warp0 + 32).map(val).sum();
            assert_eq!(o[4 * i + 2], wsum, "{}: warp sum at {i}", be.name());
            let b0 = i - i % 128;
            let bsum: f32 = (b0..b0 + 128).map(val).sum();
            assert_eq!(o[4 * i + 3], bsum, "{}: block sum at {i}", be.name());
        }
    }
    // A barrier that only half the block reaches is reported, not a hang (emulator only: on a GPU
    // it is undefined behaviour).
    let be = Backend::Emulator;
    let out = be.zeros::<f32>(1).unwrap();
    let p = SelftestParams {
        input: 0,
        out: be.ptr(&out),
        n: 0,
    };
    let err = be
        .launch("selftest_divergent_barrier", (1, 1, 1), (64, 1, 1), 0, &p)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("deadlock") && err.contains("selftest_divergent_barrier"),
        "{err}"
    );
    // Races that a fixed thread or block order would hide change results: each block sweeps its
    // threads in the order opposite to its neighbour's, so a read of a slot not yet written
    // (poisoned: NaN) happens for lower neighbours in some blocks and upper ones in others, and
    // the blocks run out of order (some find their predecessor's flag still 0).
    let blocks = 4;
    let out = be.zeros::<f32>(130 * blocks).unwrap();
    let p = SelftestParams {
        input: 0,
        out: be.ptr(&out),
        n: 0,
    };
    be.launch(
        "selftest_unordered",
        (blocks as u32, 1, 1),
        (64, 1, 1),
        0,
        &p,
    )
    .unwrap();
    let o = be.download(&out).unwrap();
    let (mut unwritten, mut written) = ([0; 2], [0; 2]);
    for b in 0..blocks {
        // Threads 1..62: their neighbours' order is the sweep's (0 and 63 wrap around).
        for t in 1..63 {
            for side in 0..2 {
                let v = o[2 * (64 * b + t) + side];
                let want = [(t + 63) % 64, (t + 1) % 64][side] as f32 + 1.0;
                if v.is_nan() {
                    unwritten[side] += 1;
                } else {
                    assert_eq!(
                        v, want,
                        "block {b} thread {t} side {side}: a value never written"
                    );
                    written[side] += 1;
                }
            }
        }
    }
    assert!(
        unwritten.iter().chain(&written).all(|&n| n > 0),
        "neighbour reads not yet written (lower, upper): {unwritten:?}, written: {written:?}"
    );
    let seen = &o[129 * blocks..130 * blocks];
    assert!(
        seen.contains(&0.0) && seen[1..].contains(&1.0),
        "blocks that found their predecessor done: {seen:?}"
    );
    let err = be
        .launch("no_such_kernel", (1, 1, 1), (1, 1, 1), 0, &p)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no_such_kernel"), "{err}");
}

/// The shapes to test on a backend: small ones everywhere, real ones on the GPU.
fn layer_sum_cases(gpu: bool) -> Vec<(usize, usize, usize)> {
    let mut v = vec![
        (1, 2, 768),
        (5, 7, 1024),
        (3, 13, 100),
        (4, 25, 1024),
        (1001, 13, 96),
        (21, 25, 40),
    ];
    // STRATA_TEST_SMALL=1 (the sanitizer runs) keeps to the small cases.
    if gpu && !std::env::var("STRATA_TEST_SMALL").is_ok_and(|v| v == "1") {
        v.extend([(16000, 13, 768), (16000, 25, 1024), (2001, 25, 1000)]);
    }
    v
}

#[test]
fn layer_sum_forward_and_backward_match_the_cpu_reference() {
    for be in backends() {
        let gpu = matches!(be, Backend::Cuda(_));
        for (n, l, d) in layer_sum_cases(gpu) {
            for normalize in [false, true] {
                // A sub-range (GroupWS) too, except at the real sizes, where the f64 CPU reference
                // of each case already costs seconds.
                let ranges = if n > 5000 {
                    vec![(0, l)]
                } else {
                    vec![(0, l), (l / 3, (l - l / 3).clamp(1, 4))]
                };
                for (first, k) in ranges {
                    check_layer_sum(&be, n, l, d, first, k, normalize);
                }
            }
        }
    }
}

fn check_layer_sum(
    be: &Backend,
    n: usize,
    l: usize,
    d: usize,
    first: usize,
    k: usize,
    normalize: bool,
) {
    let tag = format!(
        "{} n={n} L={l} D={d} layers {first}..{} norm={normalize}",
        be.name(),
        first + k
    );
    let seed = (n * 31 + l * 7 + d + first) as u64;
    // bf16 stack with a per-layer offset and scale, so the norm matters.
    let raw: Vec<f32> = randn(n * l * d, seed)
        .iter()
        .enumerate()
        .map(|(i, v)| v * (1.0 + ((i / d) % l) as f32 * 0.3) + ((i / d) % l) as f32 * 0.5)
        .collect();
    let xb = to_bf16(&raw);
    let x: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect(); // exactly what the kernel reads
    let w: Vec<f32> = randn(k, seed + 1);
    let dout: Vec<f32> = randn(n * d, seed + 2);

    // fp32 CPU reference.
    let (xin, stats) = if normalize {
        let (y, s) = strata::ops::layernorm::forward(&x, d, None, 1e-5);
        (y, Some(s))
    } else {
        (x.clone(), None)
    };
    let reference = strata::ops::layer_sum::forward(&xin, l, d, first, &w);
    // Gradients: the same reference code in f64 (the f32 one sums n*d products sequentially and is
    // itself ~1e-5 off at these sizes; the kernel's blocked sums are closer to exact).
    let f64s = |v: &[f32]| -> Vec<f64> { v.iter().map(|&a| a as f64).collect() };
    let (x64, w64, d64) = (f64s(&x), f64s(&w), f64s(&dout));
    let (xin64, stats64) = if normalize {
        let (y, s) = strata::ops::layernorm::forward(&x64, d, None, 1e-5);
        (y, Some(s))
    } else {
        (x64.clone(), None)
    };
    let (dw64, dxn64) = strata::ops::layer_sum::backward(&xin64, l, d, first, &w64, &d64, true);
    let dx64 = match &stats64 {
        Some(s) => strata::ops::layernorm::backward(&x64, d, None, s, &dxn64.unwrap()).0,
        None => dxn64.unwrap(),
    };
    let f32s = |v: &[f64]| -> Vec<f32> { v.iter().map(|&a| a as f32).collect() };
    let (dw_ref, dx_ref) = (f32s(&dw64), f32s(&dx64));
    let _ = &stats;
    // Naive bf16: every product and partial sum rounded to bf16.
    let mut p = vec![0f32; k];
    let m = w.iter().fold(f32::MIN, |a, &b| a.max(b));
    let s: f32 = w.iter().map(|v| (v - m).exp()).sum();
    p.iter_mut()
        .zip(&w)
        .for_each(|(pj, wj)| *pj = round_bf16((wj - m).exp() / s));
    let naive: Vec<f32> = (0..n * d)
        .map(|i| {
            let (f, e) = (i / d, i % d);
            let mut acc = 0f32;
            for j in 0..k {
                let v = round_bf16(xin[(f * l + first + j) * d + e]);
                acc = round_bf16(acc + round_bf16(p[j] * v));
            }
            acc
        })
        .collect();

    let xbuf = be.upload(&xb).unwrap();
    let wbuf = be.upload(&w).unwrap();
    let shape = LayerSumShape {
        n,
        l,
        d,
        first,
        k,
        normalize,
    };
    let (out, st) = device::layer_sum_forward(be, &xbuf, &wbuf, shape).unwrap();
    let got: Vec<f32> = be
        .download(&out)
        .unwrap()
        .iter()
        .map(|v| v.to_f32())
        .collect();
    assert_fa_rule(&format!("{tag} forward"), &got, &reference, &naive);

    let dbuf = be.upload(&dout).unwrap();
    let dw = be.zeros::<f32>(k).unwrap();
    let dx = device::layer_sum_backward(be, &xbuf, &wbuf, &dbuf, st.as_ref(), shape, &dw, true)
        .unwrap()
        .unwrap();
    be.synchronize().unwrap();
    let e = rel_err(&be.download(&dw).unwrap(), &dw_ref);
    assert!(e <= 1e-5, "{tag} dw: relative error {e:.2e}");
    let e = rel_err(&be.download(&dx).unwrap(), &dx_ref);
    assert!(e <= 1e-5, "{tag} dx: relative error {e:.2e}");
    // A frozen stack (no dx): D % 8 == 0 takes the chunk-per-thread weight-gradient kernel.
    let dw = be.zeros::<f32>(k).unwrap();
    let none = device::layer_sum_backward(be, &xbuf, &wbuf, &dbuf, st.as_ref(), shape, &dw, false)
        .unwrap();
    assert!(none.is_none());
    let e = rel_err(&be.download(&dw).unwrap(), &dw_ref);
    assert!(e <= 1e-5, "{tag} dw (frozen stack): relative error {e:.2e}");
}

#[test]
fn adam_and_clip_kernels_match_the_cpu_optimizer() {
    for be in backends() {
        let n = if matches!(be, Backend::Cuda(_)) {
            7_000_003
        } else {
            20_011
        };
        for cfg in [
            AdamConfig::adamw(1e-3),
            AdamConfig {
                weight_decay: 0.1,
                ..AdamConfig::adam(3e-3)
            },
        ] {
            let init = randn(n, 5);
            let mut store = ParamStore::new();
            let id = store
                .add("p", Tensor::from_vec(init.clone(), &[n]).unwrap())
                .unwrap();
            let mut opt = Adam::new(cfg, &store).unwrap();
            let (param, m, v) = (
                be.upload(&init).unwrap(),
                be.zeros::<f32>(n).unwrap(),
                be.zeros::<f32>(n).unwrap(),
            );
            let copy = be.zeros::<bf16>(n).unwrap();
            for step in 1..=3u64 {
                let g: Vec<f32> = randn(n, 100 + step).iter().map(|x| x * 3.0).collect();
                store.get_mut(id).grad = g.clone();
                let cpu_norm = clip_grad_norm(&mut store, 1.0).unwrap();
                opt.step(&mut store).unwrap();
                let gbuf = be.upload(&g).unwrap();
                let (norm, coef) = device::clip_coefficient(&be, &gbuf, 1.0).unwrap();
                device::adam_step(
                    &be,
                    &cfg,
                    step,
                    &param,
                    &gbuf,
                    &m,
                    &v,
                    Some(&copy),
                    Some(&coef),
                )
                .unwrap();
                be.synchronize().unwrap();
                let gpu_norm = be.download(&norm).unwrap()[0] as f64;
                assert!(
                    ((gpu_norm - cpu_norm) / cpu_norm).abs() < 1e-5,
                    "{}: norm {gpu_norm} vs {cpu_norm}",
                    be.name()
                );
                let got = be.download(&param).unwrap();
                let want = store.value(id).to_vec();
                let e = rel_err(&got, &want);
                assert!(
                    e <= 1e-5,
                    "{} step {step} {cfg:?}: relative error {e:.2e}",
                    be.name()
                );
                // Element by element as well: the kernel takes 4 at a time and the tail (n % 4
                // elements) alone, where a wrong element hides in the norm of 20,011.
                for (k, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-5 * b.abs() + 1e-7,
                        "{} step {step}: element {k} of {n}: {a} vs {b}",
                        be.name()
                    );
                }
                let c = be.download(&copy).unwrap();
                assert!(
                    c.iter().zip(&got).all(|(b, p)| *b == bf16::from_f32(*p)),
                    "bf16 copy is the rounded master weight"
                );
            }
        }
    }
}

#[test]
fn launch_errors_name_the_kernel_and_sizes() {
    let be = Backend::Emulator;
    let x: Buf<bf16> = be.zeros(10).unwrap();
    let w = be.zeros::<f32>(3).unwrap();
    let shape = LayerSumShape {
        n: 2,
        l: 3,
        d: 4,
        first: 0,
        k: 3,
        normalize: false,
    };
    let err = device::layer_sum_forward(&be, &x, &w, shape)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("layer_sum_forward stack")
            && err.contains("24 elements")
            && err.contains("10"),
        "{err}"
    );
    let shape = LayerSumShape {
        n: 2,
        l: 3,
        d: 4,
        first: 2,
        k: 3,
        normalize: false,
    };
    assert!(device::layer_sum_forward(&be, &x, &w, shape).is_err());

    // A 16-byte access off its alignment faults on the GPU ("misaligned address"); the emulator
    // reports it too instead of copying bytes. Planted: the stack one bf16 past its start, at
    // D = 8 (the vectorized path).
    let x: Buf<bf16> = be.zeros(2 * 3 * 8 + 8).unwrap();
    let out: Buf<bf16> = be.zeros(2 * 8).unwrap();
    let p = strata::runtime::kernels::LayerSumFwdParams {
        x: be.ptr(&x) + 2,
        w: be.ptr(&w),
        out: be.ptr(&out),
        mean: 0,
        rstd: 0,
        n: 2,
        l: 3,
        d: 8,
        first: 0,
        k: 3,
        normalize: 0,
        out_stride: 8,
        staged: 0,
    };
    let err = be
        .launch("layer_sum_forward", (2, 1, 1), (128, 1, 1), 0, &p)
        .expect_err("a misaligned vector load must fail the launch")
        .to_string();
    assert!(
        err.contains("layer_sum_forward")
            && err.contains("misaligned address: load_bf16x8 of 16 bytes")
            && err.contains("2 bytes past"),
        "{err}"
    );
    // The same launch from the aligned start runs.
    let p = strata::runtime::kernels::LayerSumFwdParams { x: be.ptr(&x), ..p };
    be.launch("layer_sum_forward", (2, 1, 1), (128, 1, 1), 0, &p)
        .unwrap();
    // Launch shapes the GPU refuses are refused here too: grid.y past 65535, a block of more
    // than 1024 threads, dynamic shared memory past the H100's 227 KB a block (launches past
    // 48 KB opt in to it).
    for (grid, block, smem, want) in [
        ((1, 65536, 1), (128, 1, 1), 0, "y and z in 1..65535"),
        ((2, 1, 1), (64, 32, 1), 0, "1..1024 threads"),
        ((2, 1, 1), (128, 1, 1), 227 * 1024 + 4, "at most 232448"),
    ] {
        let err = be
            .launch("layer_sum_forward", grid, block, smem, &p)
            .expect_err(want)
            .to_string();
        assert!(err.contains(want), "{err}");
    }

    // The vectorized HConv kernels stage their tiles in dynamic shared memory that the host sizes
    // (device::hv_smem_bytes) apart from the kernels' layouts: a launch with exactly that size
    // runs, one byte less fails naming the size the kernel needs (on the GPU it traps).
    use strata::runtime::kernels::{HConvBwdParams, HConvFwdParams};
    let (xb, wb, yb, db) = (
        be.zeros::<bf16>(64).unwrap(),
        be.zeros::<bf16>(64).unwrap(),
        be.zeros::<bf16>(64).unwrap(),
        be.zeros::<f32>(64).unwrap(),
    );
    let fwd = HConvFwdParams {
        x: be.ptr(&xb),
        w: be.ptr(&wb),
        bias: be.ptr(&db),
        y: be.ptr(&yb),
        n: 1,
        l_in: 1,
        c_in: 8,
        c_out: 8,
        kernel: 1,
        stride: 1,
        pad: 0,
        l_out: 1,
        flatten: 0,
        relu: 0,
        y32: 0,
    };
    let bwd = HConvBwdParams {
        x: be.ptr(&xb),
        w: be.ptr(&wb),
        y: 0,
        dy: be.ptr(&yb),
        dx: be.ptr(&xb),
        dw: be.ptr(&db),
        db: be.ptr(&db),
        n: 1,
        l_in: 1,
        c_in: 8,
        c_out: 8,
        kernel: 1,
        stride: 1,
        pad: 0,
        l_out: 1,
        flatten: 0,
        partial_dw: 0,
        partial_db: 0,
        split_rows: 1,
        split: 1,
        relu: 0,
    };
    for kernel in [
        "hconv_conv_forward_vec",
        "hconv_conv_backward_data_vec",
        "hconv_conv_backward_weight_vec",
    ] {
        let need = device::hv_smem_bytes(kernel, device::HV_STAGES);
        let launch = |smem| {
            if kernel == "hconv_conv_forward_vec" {
                be.launch(kernel, (1, 1, 1), (256, 1, 1), smem, &fwd)
            } else {
                be.launch(kernel, (1, 1, 1), (256, 1, 1), smem, &bwd)
            }
        };
        launch(need).unwrap_or_else(|e| panic!("{kernel} with {need} bytes: {e}"));
        let err = launch(need - 1)
            .expect_err("too little shared memory must fail the launch")
            .to_string();
        assert!(
            err.contains(kernel) && err.contains(&format!("needs {need} bytes")),
            "{err}"
        );
    }
}

// More memory than the backend has is an allocation error with the sizes, and the backend works
// on afterwards (on the GPU: the failed cuMemAllocAsync leaves the context usable). The
// emulator's request overflows the address space (a real 4 TB reserve could be granted by an
// overcommitting kernel and then filled); the GPU's is 4 TB.
#[test]
fn allocations_beyond_the_backend_are_errors_and_the_backend_goes_on() {
    for be in backends() {
        let n = match be {
            Backend::Emulator => usize::MAX / 8,
            Backend::Cuda(_) => 1 << 40,
        };
        let tag = be.name();
        let err = be.output::<f32>(n).expect_err("refused");
        assert!(matches!(err, strata::Error::Allocation(_)), "{tag}: {err}");
        let text = err.to_string();
        assert!(
            text.contains(&format!("allocating {n} f32")) && text.contains("smaller batch"),
            "{tag}: {text}"
        );
        if let Backend::Cuda(_) = be {
            assert!(
                text.contains("free of"),
                "{tag}: the GPU's memory left: {text}"
            );
        }
        assert!(be.zeros::<bf16>(n).is_err(), "{tag}");
        let x = be.upload(&[1.0f32, -2.0, 3.0]).unwrap();
        let y = device::activation_forward(&be, &x, false).unwrap();
        assert_eq!(be.download(&y).unwrap(), vec![1.0, 0.0, 3.0], "{tag}");
    }
}

#[test]
fn the_cuda_probe_never_panics_and_auto_falls_back_to_the_cpu() {
    use strata::runtime::resolve;
    use strata::Device;
    match Backend::cuda() {
        Err(why) => {
            assert!(!why.is_empty());
            assert_eq!(resolve("auto").unwrap(), Device::Cpu);
            let err = resolve("cuda").unwrap_err();
            assert!(err.contains("unavailable") && err.contains(&why), "{err}");
        }
        Ok(_) => assert_eq!(resolve("cuda").unwrap(), Device::Cuda(0)),
    }
    assert_eq!(resolve("cpu").unwrap(), Device::Cpu);
    assert!(resolve("tpu").unwrap_err().contains("unknown device 'tpu'"));
}

#[test]
fn tensor_core_mma_wrapper_computes_a_16x16_by_16x8_product() {
    use strata::runtime::kernels::SelftestMmaParams;
    for be in backends() {
        let a: Vec<f32> = randn(16 * 16, 70).iter().map(|&v| round_bf16(v)).collect();
        let bt: Vec<f32> = randn(8 * 16, 71).iter().map(|&v| round_bf16(v)).collect();
        let c: Vec<f32> = randn(16 * 8, 72);
        let (ab, bb, cb) = (
            be.upload(&to_bf16(&a)).unwrap(),
            be.upload(&to_bf16(&bt)).unwrap(),
            be.upload(&c).unwrap(),
        );
        let d = be.zeros::<f32>(16 * 8).unwrap();
        let p = SelftestMmaParams {
            a: be.ptr(&ab),
            bt: be.ptr(&bb),
            c: be.ptr(&cb),
            d: be.ptr(&d),
        };
        be.launch("selftest_mma", (1, 1, 1), (32, 1, 1), 0, &p)
            .unwrap();
        be.synchronize().unwrap();
        let got = be.download(&d).unwrap();
        for i in 0..16 {
            for j in 0..8 {
                let want: f64 = c[i * 8 + j] as f64
                    + (0..16)
                        .map(|k| a[i * 16 + k] as f64 * bt[j * 16 + k] as f64)
                        .sum::<f64>();
                let g = got[i * 8 + j] as f64;
                assert!(
                    (g - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "{}: D[{i}][{j}] = {g}, want {want}",
                    be.name()
                );
            }
        }
    }
}

/// The tensor-core paths of the vectorized conv kernels to test on a backend: both in the emulator;
/// on a GPU, mma.sync, plus wgmma with STRATA_TEST_WGMMA=1, or wgmma alone with
/// STRATA_TEST_WGMMA=only. The device script runs the wgmma tests in a process of their own until
/// they have passed on an H100 once: a fault there (a bad descriptor) would poison the CUDA
/// context for every test after it.
fn tensor_core_paths(be: &Backend) -> Vec<device::TensorCorePath> {
    use device::TensorCorePath::{MmaSync, Wgmma};
    if !matches!(be, Backend::Cuda(_)) {
        return vec![MmaSync, Wgmma];
    }
    match std::env::var("STRATA_TEST_WGMMA").as_deref() {
        Ok("1") => vec![MmaSync, Wgmma],
        Ok("only") => vec![Wgmma],
        _ => vec![MmaSync],
    }
}

fn wgmma_on_gpu() -> bool {
    std::env::var("STRATA_TEST_WGMMA").is_ok_and(|v| v == "1" || v == "only")
}

/// The Hopper warpgroup MMA wrapper (kernels/wgmma.cu, sm_90a): one warpgroup's 64 x K by K x N
/// product through shared-memory descriptors, N = 64 and 128 (the m64n64k16 and m64n128k16
/// instructions), K = 16 (one step) and 64 (four accumulating steps), the operands K-major or
/// MN-major (transposed), staged in different core-matrix arrangements.
/// In the emulator this checks the kernel against the layout common.cuh documents; on an H100 it
/// checks that layout against the hardware's.
#[test]
fn warpgroup_mma_wrapper_computes_64_by_n_products_from_descriptors() {
    use strata::runtime::kernels::SelftestWgmmaParams;
    for be in backends() {
        if matches!(be, Backend::Cuda(_)) && !wgmma_on_gpu() {
            eprintln!("wgmma on the GPU skipped: STRATA_TEST_WGMMA=1 runs it (in its own process)");
            continue;
        }
        for (n, k, mode) in [64usize, 128].into_iter().flat_map(|n| {
            [16usize, 64]
                .into_iter()
                .flat_map(move |k| (0..3).map(move |m| (n, k, m)))
        }) {
            let a: Vec<f32> = randn(64 * k, 80 + k as u64)
                .iter()
                .map(|&v| round_bf16(v))
                .collect();
            let bt: Vec<f32> = randn(n * k, 81 + k as u64)
                .iter()
                .map(|&v| round_bf16(v))
                .collect();
            let (ab, bb) = (
                be.upload(&to_bf16(&a)).unwrap(),
                be.upload(&to_bf16(&bt)).unwrap(),
            );
            let d = be.output::<f32>(64 * n).unwrap();
            let p = SelftestWgmmaParams {
                a: be.ptr(&ab),
                bt: be.ptr(&bb),
                d: be.ptr(&d),
                k: k as i32,
                mode,
                n: n as i32,
            };
            be.launch("selftest_wgmma", (1, 1, 1), (128, 1, 1), 0, &p)
                .unwrap();
            be.synchronize().unwrap();
            let got = be.download(&d).unwrap();
            let want = wgmma_product_under(WgmmaReading::Documented, &a, &bt, n, k, mode);
            if let Some((i, j)) = (0..64 * n).map(|e| (e / n, e % n)).find(|&(i, j)| {
                let (g, w) = (got[i * n + j] as f64, want[i * n + j]);
                g.is_nan() || (g - w).abs() > 1e-5 * (1.0 + w.abs())
            }) {
                panic!(
                    "{} N = {n}, K = {k}, mode {mode}: D[{i}][{j}] = {}, want {}; {}",
                    be.name(),
                    got[i * n + j],
                    want[i * n + j],
                    wgmma_diagnosis(&got, &a, &bt, n, k, mode)
                );
            }
        }
    }
}

/// Ways the hardware might read the self-test's shared memory, for a failure's diagnosis: the
/// layout common.cuh documents, with the descriptor's two offsets swapped, with the MN-major core
/// matrices' interior transposed, or both.
#[derive(Clone, Copy, Debug, PartialEq)]
enum WgmmaReading {
    Documented,
    OffsetsSwapped,
    MnInteriorTransposed,
    Both,
}

/// D = A B^T as the hardware would compute it reading selftest_wgmma's staged operands (zeroed,
/// then staged by the documented layout, as the kernel does) under `reading`; NaN where a read
/// falls outside the staged arrays.
fn wgmma_product_under(
    reading: WgmmaReading,
    a: &[f32],
    bt: &[f32],
    n: usize,
    k: usize,
    mode: i32,
) -> Vec<f64> {
    use WgmmaReading::*;
    let offset = |row: usize, q: usize, lbo: usize, sbo: usize, mn: bool| {
        (row / 8) * sbo
            + (q / 8) * lbo
            + if mn {
                (q % 8) * 16 + (row % 8) * 2
            } else {
                (row % 8) * 16 + (q % 8) * 2
            }
    };
    // (lbo, sbo, MN-major) of A and B, as kernels/wgmma.cu stages them.
    let (a_mn, b_mn) = (mode == 2, mode >= 1);
    let a_geo = if a_mn {
        (8 * 128, 128)
    } else {
        (128, (k / 8) * 128)
    };
    let b_geo = if b_mn {
        (128, (k / 8) * 128)
    } else {
        ((n / 8) * 128, 128)
    };
    // The kernel's arrays: sa 64 x 64, sb 128 x 64 bf16.
    let stage = |x: &[f32], rows: usize, (lbo, sbo): (usize, usize), mn: bool| {
        let mut smem = vec![
            0f64;
            if std::ptr::eq(x, bt) {
                128 * 64
            } else {
                64 * 64
            }
        ];
        for row in 0..rows {
            for q in 0..k {
                smem[offset(row, q, lbo, sbo, mn) / 2] = x[row * k + q] as f64;
            }
        }
        smem
    };
    let (sa, sb) = (stage(a, 64, a_geo, a_mn), stage(bt, n, b_geo, b_mn));
    let read = |smem: &[f64], (lbo, sbo): (usize, usize), mn: bool, row: usize, q: usize| {
        // Step q / 16's descriptor starts (q / 16) * 2 K core matrices on, by the documented lbo.
        let start = (q / 16) * 2 * lbo;
        let (l, s) = if matches!(reading, OffsetsSwapped | Both) {
            (sbo, lbo)
        } else {
            (lbo, sbo)
        };
        let mn_interior = mn && !matches!(reading, MnInteriorTransposed | Both);
        let at = start + offset(row, q % 16, l, s, mn_interior);
        smem.get(at / 2).copied().unwrap_or(f64::NAN)
    };
    let mut d = vec![0f64; 64 * n];
    for i in 0..64 {
        for j in 0..n {
            d[i * n + j] = (0..k)
                .map(|q| read(&sa, a_geo, a_mn, i, q) * read(&sb, b_geo, b_mn, j, q))
                .sum();
        }
    }
    d
}

/// Which reading the GPU's result matches, so that a failed self-test says how to fix the layout.
fn wgmma_diagnosis(got: &[f32], a: &[f32], bt: &[f32], n: usize, k: usize, mode: i32) -> String {
    use WgmmaReading::*;
    let matches: Vec<WgmmaReading> = [Documented, OffsetsSwapped, MnInteriorTransposed, Both]
        .into_iter()
        .filter(|&r| {
            let d = wgmma_product_under(r, a, bt, n, k, mode);
            got.iter()
                .zip(&d)
                .all(|(&g, &w)| (g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()))
        })
        .collect();
    if matches.is_empty() {
        "the result matches none of the readings tried (offsets swapped, MN-major interior transposed, both): check the fragment layout".into()
    } else {
        format!("the result matches the reading(s) {matches:?}")
    }
}

/// HConv's whole conv stack on the device vs the CPU interface (fp32), by the flash-attention rule
/// against a naive bf16 computation. References cost seconds per frame at 13 x 768 (the naive one
/// rounds every product), so they use a few sample frames of large batches.
#[test]
fn hconv_forward_on_tensor_cores_matches_the_cpu_reference() {
    use strata::models::interface::hconv_plan;
    for be in backends() {
        let gpu = matches!(be, Backend::Cuda(_));
        // D = 100 takes the general kernel (not a multiple of 8), the others the vectorized one;
        // 200 and 40 leave ragged tiles; 150 frames x 13 layers span several row tiles.
        let mut cases = vec![
            (3usize, 13usize, 768usize, 5usize, 3usize),
            (4, 7, 100, 5, 3),
            (2, 25, 1024, 5, 3),
            (3, 7, 40, 3, 2),
            (1, 13, 200, 5, 3),
            (150, 13, 96, 5, 3),
            // L = 2: kernel 3, stride 2 is one conv to a single position (5 / 3 has depth 0).
            (5, 2, 768, 3, 2),
        ];
        // STRATA_TEST_SMALL=1 (the sanitizer runs) keeps to the small cases.
        if gpu && !std::env::var("STRATA_TEST_SMALL").is_ok_and(|v| v == "1") {
            cases.extend([(16000, 13, 768, 5, 3), (16000, 25, 1024, 5, 3)]);
        }
        // mma.sync, and Hopper's wgmma (see tensor_core_paths).
        let paths = tensor_core_paths(&be);
        for ((n, l, d, kernel, stride), path) in cases
            .into_iter()
            .flat_map(|c| paths.clone().into_iter().map(move |p| (c, p)))
        {
            let tag = format!(
                "{} {path:?} n={n} L={l} D={d} k={kernel} s={stride}",
                be.name()
            );
            let plan = hconv_plan(l, d, kernel, stride).unwrap();
            let mut rng = Rng::new((n + l + d) as u64);
            let x: Vec<f32> = (0..n * l * d).map(|_| round_bf16(rng.normal())).collect();
            let weights: Vec<(Vec<f32>, Vec<f32>)> = plan
                .convs
                .iter()
                .map(|g| {
                    let bound = 1.0 / ((g.c_in * g.kernel) as f64).sqrt();
                    let w: Vec<f32> = rng
                        .uniform_vec(g.c_out * g.c_in * g.kernel, bound)
                        .iter()
                        .map(|&v| round_bf16(v))
                        .collect();
                    (w, rng.uniform_vec(g.c_out, bound))
                })
                .collect();
            // Device: every conv, the last one flattening.
            let mut h = be.upload(&to_bf16(&x)).unwrap();
            for (i, (g, (w, b))) in plan.convs.iter().zip(&weights).enumerate() {
                let wb = be.upload(&device::hconv_weight_for_kernel(w, g)).unwrap();
                let bb = be.upload(b).unwrap();
                let last = i + 1 == plan.convs.len();
                h = device::hconv_conv_forward_on(&be, path, &h, n, g, &wb, &bb, last).unwrap();
            }
            be.synchronize().unwrap();
            let got: Vec<f32> = be
                .download(&h)
                .unwrap()
                .iter()
                .map(|v| v.to_f32())
                .collect();
            let out_dim = plan.output_dim();
            assert_eq!(got.len(), n * out_dim, "{tag}: output size");
            // References on sample frames.
            let frames: Vec<usize> = if n <= 8 {
                (0..n).collect()
            } else {
                vec![0, 1, n / 2, n - 1]
            };
            let (mut ours, mut reference, mut naive) = (Vec::new(), Vec::new(), Vec::new());
            for &f in &frames {
                let xf = &x[f * l * d..(f + 1) * l * d];
                let (mut r32, mut rb) = (xf.to_vec(), xf.to_vec());
                for (g, (w, b)) in plan.convs.iter().zip(&weights) {
                    r32 = strata::ops::activation::relu_forward(&strata::ops::layer_conv::forward(
                        &r32, 1, w, b, g,
                    ));
                    rb = naive_bf16_conv(&rb, w, b, g);
                }
                let (l_last, c_last) = (plan.l_last, plan.c_last);
                reference.extend(strata::ops::shape::flatten_channel_major(
                    &r32, l_last, c_last,
                ));
                naive.extend(strata::ops::shape::flatten_channel_major(
                    &rb, l_last, c_last,
                ));
                ours.extend_from_slice(&got[f * out_dim..(f + 1) * out_dim]);
            }
            assert_fa_rule(&tag, &ours, &reference, &naive);
        }
    }
}

/// One conv + bias + ReLU in bf16 arithmetic: every product and partial sum rounded (one frame).
fn naive_bf16_conv(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    g: &strata::ops::layer_conv::ConvGeom,
) -> Vec<f32> {
    let l_out = g.l_out();
    let mut y = vec![0f32; l_out * g.c_out];
    for lo in 0..l_out {
        for o in 0..g.c_out {
            let mut acc = 0f32;
            for k in 0..g.kernel {
                let li = (lo * g.stride + k) as isize - g.pad as isize;
                if li < 0 || li as usize >= g.l_in {
                    continue;
                }
                for c in 0..g.c_in {
                    acc = round_bf16(
                        acc + round_bf16(
                            x[li as usize * g.c_in + c] * w[(o * g.c_in + c) * g.kernel + k],
                        ),
                    );
                }
            }
            y[lo * g.c_out + o] = round_bf16(round_bf16(acc + b[o]).max(0.0));
        }
    }
    y
}

/// HConv backward on tensor cores, conv by conv down the stack (each conv's dy is the device's dx
/// of the conv above, the last conv's is random), against references computed from the very bf16
/// tensors the kernels read: the CPU engine's fp32 conv backward, and a naive bf16 one. dW and db
/// accumulate in fp32 from exact bf16 products, so they must match the fp32 reference to 1e-4 of
/// scale; dx (stored bf16) within one bf16 rounding; all three also by the flash-attention rule.
/// Running the weight kernel twice accumulates exactly twice (deterministic, no atomics).
#[test]
fn hconv_backward_on_tensor_cores_matches_the_cpu_reference() {
    use strata::models::interface::hconv_plan;
    for be in backends() {
        let gpu = matches!(be, Backend::Cuda(_));
        let mut cases = vec![
            (3usize, 13usize, 768usize, 5usize, 3usize),
            (1, 13, 100, 5, 3),
            (4, 7, 100, 5, 3),
            (2, 25, 1024, 5, 3),
            (3, 7, 40, 3, 2),
            (2500, 4, 24, 3, 2),
            // L = 2: kernel 3, stride 2 is one conv to a single position (5 / 3 has depth 0).
            (5, 2, 768, 3, 2),
        ];
        // On the GPU, thousands of frames at real sizes (the CPU references bound how many).
        if gpu && !std::env::var("STRATA_TEST_SMALL").is_ok_and(|v| v == "1") {
            cases.extend([(4000, 13, 768, 5, 3), (2000, 25, 1024, 5, 3)]);
        }
        // mma.sync, and Hopper's wgmma (see tensor_core_paths).
        let paths = tensor_core_paths(&be);
        for ((n, l, d, kernel, stride), path) in cases
            .into_iter()
            .flat_map(|c| paths.clone().into_iter().map(move |p| (c, p)))
        {
            let tag = format!(
                "{} {path:?} n={n} L={l} D={d} k={kernel} s={stride}",
                be.name()
            );
            let started = std::time::Instant::now();
            let plan = hconv_plan(l, d, kernel, stride).unwrap();
            // The naive bf16 reference is a scalar loop: only where it takes seconds at most.
            let with_naive = n * l * d * d * kernel < 2_000_000_000;
            let mut rng = Rng::new((7 * n + l + d) as u64);
            let x: Vec<f32> = (0..n * l * d).map(|_| round_bf16(rng.normal())).collect();
            let params: Vec<(Vec<f32>, Vec<f32>)> = plan
                .convs
                .iter()
                .map(|g| {
                    let bound = 1.0 / ((g.c_in * g.kernel) as f64).sqrt();
                    let w = rng.uniform_vec(g.c_out * g.c_in * g.kernel, bound);
                    (
                        w.iter().map(|&v| round_bf16(v)).collect(),
                        rng.uniform_vec(g.c_out, bound),
                    )
                })
                .collect();
            // Forward on the device, keeping every conv's input and output.
            let mut acts = vec![be.upload(&to_bf16(&x)).unwrap()];
            let mut wbufs = Vec::new();
            for (i, (g, (w, b))) in plan.convs.iter().zip(&params).enumerate() {
                let wb = be.upload(&device::hconv_weight_for_kernel(w, g)).unwrap();
                let bb = be.upload(b).unwrap();
                let last = i + 1 == plan.convs.len();
                let y = device::hconv_conv_forward_on(&be, path, &acts[i], n, g, &wb, &bb, last)
                    .unwrap();
                acts.push(y);
                wbufs.push(wb);
            }
            let down = |b: &Buf<bf16>| -> Vec<f32> {
                be.download(b).unwrap().iter().map(|v| v.to_f32()).collect()
            };
            let mut dy_host: Vec<f32> = (0..n * plan.output_dim())
                .map(|_| round_bf16(rng.normal()))
                .collect();
            let mut dy = be.upload(&to_bf16(&dy_host)).unwrap();
            for i in (0..plan.convs.len()).rev() {
                let g = &plan.convs[i];
                let last = i + 1 == plan.convs.len();
                let ctag = format!("{tag} conv{i}");
                let (dw, db) = (
                    be.zeros::<f32>(g.c_out * g.kernel * g.c_in).unwrap(),
                    be.zeros::<f32>(g.c_out).unwrap(),
                );
                let saved = device::HConvSaved {
                    x: &acts[i],
                    y: &acts[i + 1],
                    w: &wbufs[i],
                    flatten: last,
                };
                let grads = (&dw, &db);
                let dx = device::hconv_conv_backward_on(&be, path, &saved, n, g, &dy, grads, true)
                    .unwrap()
                    .expect("asked for dx");
                be.synchronize().unwrap();
                let dw_tap = be.download(&dw).unwrap();
                let got_dw = device::hconv_weight_grad_to_torch(&dw_tap, g);
                let got_db = be.download(&db).unwrap();
                let got_dx = down(&dx);
                // References from the same bf16 tensors; dpre in [n, l_out, c_out] layout.
                let (xi, yi) = (down(&acts[i]), down(&acts[i + 1]));
                let l_out = g.l_out();
                let unflat = |v: &[f32]| -> Vec<f32> {
                    if !last {
                        return v.to_vec();
                    }
                    let mut out = vec![0f32; v.len()];
                    for f in 0..n {
                        for lo in 0..l_out {
                            for c in 0..g.c_out {
                                out[(f * l_out + lo) * g.c_out + c] =
                                    v[(f * g.c_out + c) * l_out + lo];
                            }
                        }
                    }
                    out
                };
                let dpre: Vec<f32> = unflat(&dy_host)
                    .iter()
                    .zip(unflat(&yi))
                    .map(|(&d, y)| if y > 0.0 { d } else { 0.0 })
                    .collect();
                let (rdx, rdw, rdb) =
                    strata::ops::layer_conv::backward(&xi, n, &params[i].0, g, &dpre, true);
                let rdx = rdx.unwrap();

                let scale = |v: &[f32]| v.iter().fold(1e-30f32, |m, x| m.max(x.abs()));
                let close = |what: &str, got: &[f32], want: &[f32]| {
                    let e = max_abs_diff(got, want);
                    assert!(
                        e <= 1e-4 * scale(want) as f64,
                        "{ctag} {what}: {e:.3e} of scale {:.3e}",
                        scale(want)
                    );
                };
                close("dW", &got_dw, &rdw);
                close("db", &got_db, &rdb);
                for (k, (&a, &b)) in got_dx.iter().zip(&rdx).enumerate() {
                    assert!(
                        (a - b).abs() <= b.abs() / 256.0 + 1e-5 * scale(&rdx),
                        "{ctag} dx[{k}] = {a}, fp32 reference {b}"
                    );
                }
                if with_naive {
                    let (ndx, ndw, ndb) = naive_bf16_conv_backward(&xi, n, &params[i].0, g, &dpre);
                    assert_fa_rule(&format!("{ctag} dW"), &got_dw, &rdw, &ndw);
                    assert_fa_rule(&format!("{ctag} db"), &got_db, &rdb, &ndb);
                    assert_fa_rule(&format!("{ctag} dx"), &got_dx, &rdx, &ndx);
                }
                if i == 0 && n <= 4 {
                    // Accumulation: a second call adds exactly the same amounts again.
                    device::hconv_conv_backward_on(&be, path, &saved, n, g, &dy, grads, false)
                        .unwrap();
                    be.synchronize().unwrap();
                    let (dw2, db2) = (be.download(&dw).unwrap(), be.download(&db).unwrap());
                    for (t, o) in dw2.iter().chain(&db2).zip(dw_tap.iter().chain(&got_db)) {
                        assert_eq!(
                            *t,
                            2.0 * o,
                            "{ctag}: dW and db accumulate deterministically"
                        );
                    }
                }
                dy_host = got_dx;
                dy = dx;
            }
            // Seen on the GPU script's log (--nocapture), where a slow case would otherwise hide.
            eprintln!("{tag}: {:.1} s", started.elapsed().as_secs_f64());
        }
    }
}

/// One conv's backward in bf16 arithmetic, every product and partial sum rounded:
/// (dx [n, l_in, c_in], dw [c_out, c_in, k], db [c_out]) from dpre [n, l_out, c_out].
fn naive_bf16_conv_backward(
    x: &[f32],
    n: usize,
    w: &[f32],
    g: &strata::ops::layer_conv::ConvGeom,
    dpre: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let l_out = g.l_out();
    let mut dx = vec![0f32; n * g.l_in * g.c_in];
    let mut dw = vec![0f32; g.c_out * g.c_in * g.kernel];
    let mut db = vec![0f32; g.c_out];
    for f in 0..n {
        for lo in 0..l_out {
            for o in 0..g.c_out {
                let d = dpre[(f * l_out + lo) * g.c_out + o];
                if d == 0.0 {
                    continue;
                }
                db[o] = round_bf16(db[o] + d);
                for k in 0..g.kernel {
                    let li = (lo * g.stride + k) as isize - g.pad as isize;
                    if li < 0 || li as usize >= g.l_in {
                        continue;
                    }
                    let li = li as usize;
                    for c in 0..g.c_in {
                        let wi = (o * g.c_in + c) * g.kernel + k;
                        let xi = (f * g.l_in + li) * g.c_in + c;
                        dw[wi] = round_bf16(dw[wi] + round_bf16(d * x[xi]));
                        dx[xi] = round_bf16(dx[xi] + round_bf16(d * w[wi]));
                    }
                }
            }
        }
    }
    (dx, dw, db)
}

/// ldmatrix.x4 (plain and .trans) against the PTX ISA fragment layout: lane l receives, from matrix
/// j, row l / 4 elements 2 (l % 4), +1 (plain) or column l / 4 rows 2 (l % 4), +1 (transposed).
#[test]
fn ldmatrix_wrappers_follow_the_ptx_fragment_layout() {
    use strata::runtime::kernels::SelftestLdmatrixParams;
    for be in backends() {
        let tile: Vec<bf16> = (0..256).map(|e| bf16::from_f32(e as f32)).collect();
        let tb = be.upload(&tile).unwrap();
        let out = be.zeros::<u32>(256).unwrap();
        let p = SelftestLdmatrixParams {
            tile: be.ptr(&tb),
            out: be.ptr(&out),
        };
        be.launch("selftest_ldmatrix", (1, 1, 1), (32, 1, 1), 0, &p)
            .unwrap();
        be.synchronize().unwrap();
        let got = be.download(&out).unwrap();
        let pair = |w: u32| {
            (
                bf16::from_bits((w & 0xffff) as u16).to_f32() as usize,
                bf16::from_bits((w >> 16) as u16).to_f32() as usize,
            )
        };
        for lane in 0..32 {
            for j in 0..4 {
                let (row, col) = (8 * j + lane / 4, 2 * (lane % 4));
                assert_eq!(
                    pair(got[4 * lane + j]),
                    (row * 8 + col, row * 8 + col + 1),
                    "{} plain lane {lane} matrix {j}",
                    be.name()
                );
                let (r0, c) = (8 * j + 2 * (lane % 4), lane / 4);
                assert_eq!(
                    pair(got[128 + 4 * lane + j]),
                    (r0 * 8 + c, (r0 + 1) * 8 + c),
                    "{} trans lane {lane} matrix {j}",
                    be.name()
                );
            }
        }
    }
}

/// cp.async, ldmatrix and wgmma operands past the block's shared memory: the GPU raises an illegal
/// address; the emulator fails the launch with the access named (it had written host memory past
/// the allocation, silently or crashing the process: seen with a wrong staging offset in a wgmma
/// kernel). The GPU runs the in-range case only (its error would poison the context).
#[test]
fn shared_memory_accesses_out_of_range_fail_the_launch() {
    use strata::runtime::kernels::SelftestParams;
    for be in backends() {
        let words: Vec<f32> = (0..4).map(|i| f32::from_bits(0x3f80_0000 + i)).collect();
        let input = be.upload(&words).unwrap();
        let out = be.zeros::<f32>(4).unwrap();
        let launch = |offset: i32| {
            let p = SelftestParams {
                input: be.ptr(&input),
                out: be.ptr(&out),
                n: offset,
            };
            be.launch("selftest_shared_bounds", (1, 1, 1), (32, 1, 1), 64, &p)
        };
        // The last 16 bytes of 64: in range. Every lane points at the same row, so lanes 0..3
        // hold its words 0..3: the copied words (bf16 pairs) in order.
        launch(48).unwrap();
        be.synchronize().unwrap();
        let got: Vec<u32> = be
            .download(&out)
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect();
        let want: Vec<u32> = words.iter().map(|v| v.to_bits()).collect();
        assert_eq!(got, want, "{}: the row read back", be.name());
        if matches!(be, Backend::Cuda(_)) {
            continue;
        }
        let err = launch(64)
            .expect_err("a copy past the dynamic shared memory must fail the launch")
            .to_string();
        assert!(
            err.contains("selftest_shared_bounds")
                && err.contains(
                    "out-of-range shared address: cp.async shared destination of 16 bytes"
                )
                && err.contains("offset 64 of the block's 64 bytes"),
            "{err}"
        );
        // And the emulator goes on: the in-range launch runs again.
        launch(0).unwrap();
    }
}

/// CTC on the device (alpha and beta blocks per utterance, then a warp per frame) against the CPU reference (itself checked against
/// PyTorch): repeated labels, a blank-heavy target, an empty target, an impossible alignment with
/// and without zero_infinity, mixed lengths, both reductions; fp32, 1e-5 of scale.
#[test]
fn ctc_kernel_matches_the_cpu_reference() {
    use strata::ops::ctc::{forward_backward, Reduction};
    use strata::PackedBatch;
    for be in backends() {
        let gpu = matches!(be, Backend::Cuda(_));
        // (lengths, targets, vocabulary)
        let mut cases: Vec<(Vec<usize>, Vec<Vec<usize>>, usize)> = vec![
            (
                vec![12, 7, 9],
                vec![vec![1, 1, 2], vec![3], vec![2, 3, 2, 1]],
                5,
            ),
            (vec![30], vec![vec![4; 10]], 6), // every label repeated: blanks between all
            (vec![5, 6], vec![vec![], vec![1, 2]], 3),
            (vec![3, 10], vec![vec![1, 1], vec![2, 2, 2]], 4), // repeats need blanks: 3 and 5 frames
            (vec![2, 8], vec![vec![1, 1], vec![1]], 3),        // "1 1" in 2 frames: impossible
            (vec![1, 1, 2], vec![vec![1], vec![], vec![2]], 3), // one- and two-frame inputs
            (
                vec![200, 150],
                vec![
                    (0..60).map(|i| 1 + (i * 7) % 29).collect(),
                    (0..40).map(|i| 1 + i % 3).collect(),
                ],
                30,
            ),
            // More extended-target positions than threads (S = 301, and S = 2049 at the longest
            // target the kernel takes): each thread owns several.
            (
                vec![400, 1100],
                vec![
                    (0..150).map(|i| 1 + (i * 5) % 39).collect(),
                    (0..1024).map(|i| 1 + (i * 11 + i / 7) % 39).collect(),
                ],
                40,
            ),
        ];
        if gpu && !std::env::var("STRATA_TEST_SMALL").is_ok_and(|v| v == "1") {
            let mut rng = Rng::new(11);
            let lens: Vec<usize> = (0..32).map(|_| 300 + rng.below(200)).collect();
            let tg = lens
                .iter()
                .map(|&l| (0..l / 4).map(|_| 1 + rng.below(70)).collect())
                .collect();
            cases.push((lens, tg, 71));
        }
        for (lens, targets, v) in cases {
            let batch = PackedBatch::from_lengths(&lens).unwrap();
            let raw = randn(batch.total_frames() * v, lens.len() as u64 + v as u64);
            let lp = strata::ops::softmax::log_softmax_forward(&raw, v);
            let lpb = be.upload(&lp).unwrap();
            let mut flat = Vec::new();
            let mut toff = vec![0];
            for t in &targets {
                flat.extend_from_slice(t);
                toff.push(flat.len());
            }
            for reduction in [Reduction::Mean, Reduction::Sum] {
                for zero_inf in [true, false] {
                    let tag = format!(
                        "{} lens {:?} v {v} {reduction:?} zero_infinity {zero_inf}",
                        be.name(),
                        &lens[..lens.len().min(4)]
                    );
                    let want = forward_backward(
                        &lp,
                        v,
                        batch.offsets(),
                        &flat,
                        &toff,
                        0,
                        reduction,
                        zero_inf,
                    );
                    let got = device::ctc_loss(&be, &lpb, v, &batch, &targets, reduction, zero_inf)
                        .unwrap();
                    be.synchronize().unwrap();
                    let g = be.download(&got.grad).unwrap();
                    for (u, (a, b)) in got
                        .per_utterance
                        .iter()
                        .zip(&want.per_utterance)
                        .enumerate()
                    {
                        let ok = (a.is_infinite() && b.is_infinite())
                            || (a - b).abs() <= 1e-5 * b.abs().max(1.0);
                        assert!(ok, "{tag}: utterance {u} loss {a} vs {b}");
                    }
                    let same = (got.loss.is_infinite() && want.loss.is_infinite())
                        || (got.loss - want.loss).abs() <= 1e-5 * want.loss.abs().max(1.0);
                    assert!(same, "{tag}: loss {} vs {}", got.loss, want.loss);
                    // The gradient against an f64 evaluation: log-space recursions over hundreds
                    // of frames lose ~1e-5 in f32 whatever the summation order, so the bound is
                    // the CPU f32 reference's own error (x2, floor 1e-5 of scale).
                    let lp64: Vec<f64> = lp.iter().map(|&x| x as f64).collect();
                    let exact = forward_backward(
                        &lp64,
                        v,
                        batch.offsets(),
                        &flat,
                        &toff,
                        0,
                        reduction,
                        zero_inf,
                    );
                    let scale = exact
                        .grad
                        .iter()
                        .filter(|x| x.is_finite())
                        .fold(1e-30f64, |m, x| m.max(x.abs()));
                    let err = |v: &[f32]| {
                        v.iter()
                            .zip(&exact.grad)
                            .fold(0f64, |m, (&a, &b)| m.max(abs_diff(a as f64, b)))
                    };
                    let (e_gpu, e_cpu) = (err(&g), err(&want.grad));
                    eprintln!(
                        "{tag}: grad error {:.2e}, CPU f32 {:.2e} (of scale {scale:.2e})",
                        e_gpu / scale,
                        e_cpu / scale
                    );
                    assert!(
                        e_gpu <= (2.0 * e_cpu).max(1e-5 * scale),
                        "{tag}: grad error {e_gpu:.3e} vs CPU f32 {e_cpu:.3e}"
                    );
                    for (i, (a, b)) in g.iter().zip(&want.grad).enumerate() {
                        assert_eq!(a.is_nan(), b.is_nan(), "{tag}: grad[{i}] = {a}, want {b}");
                    }
                }
            }
        }
        // A NaN log-probability (a diverged model) is not an impossible alignment: even under
        // zero_infinity its utterance's loss and gradient stay NaN, as in PyTorch, so the run
        // stops instead of training on zeros.
        let batch = PackedBatch::from_lengths(&[4, 5]).unwrap();
        let mut lp = strata::ops::softmax::log_softmax_forward(&randn(27, 3), 3);
        lp[4] = f32::NAN;
        let targets = vec![vec![1, 2], vec![2]];
        let got = device::ctc_loss(
            &be,
            &be.upload(&lp).unwrap(),
            3,
            &batch,
            &targets,
            Reduction::Sum,
            true,
        )
        .unwrap();
        let g = be.download(&got.grad).unwrap();
        let want = forward_backward(
            &lp,
            3,
            batch.offsets(),
            &[1, 2, 2],
            &[0, 2, 3],
            0,
            Reduction::Sum,
            true,
        );
        assert!(
            want.per_utterance[0].is_nan()
                && want.loss.is_nan()
                && want.per_utterance[1].is_finite()
        );
        assert!(
            got.per_utterance[0].is_nan() && got.loss.is_nan(),
            "{}: {:?}",
            be.name(),
            got.per_utterance
        );
        assert!(
            (got.per_utterance[1] - want.per_utterance[1]).abs()
                <= 1e-5 * want.per_utterance[1].abs()
        );
        assert!(
            g[..12].iter().all(|x| x.is_nan()) && g[12..].iter().all(|x| x.is_finite()),
            "{g:?}"
        );
        assert!(
            want.grad[..12].iter().all(|x| x.is_nan())
                && want.grad[12..].iter().all(|x| x.is_finite())
        );
        // Bad targets are refused with the utterance named.
        let batch = PackedBatch::from_lengths(&[3]).unwrap();
        let lpb = be.upload(&[-1.0f32; 9]).unwrap();
        let err = device::ctc_loss(&be, &lpb, 3, &batch, &[vec![0]], Reduction::Mean, true)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("utterance 0") && err.contains("blank"),
            "{err}"
        );
        let err = device::ctc_loss(
            &be,
            &lpb,
            3,
            &batch,
            &[vec![1, 2, 1, 2]],
            Reduction::Mean,
            true,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("target length 4"), "{err}");
    }
}

/// Fused softmax cross-entropy on the device against the CPU reference: loss and dlogits, both
/// reductions, 2 to 1251 classes (VoxCeleb1 speakers), rows from 1 to 300; fp32, 1e-5 of scale.
#[test]
fn cross_entropy_kernel_matches_the_cpu_reference() {
    use strata::ops::ctc::Reduction;
    for be in backends() {
        for (rows, classes) in [(1usize, 2usize), (7, 4), (32, 1251), (300, 31)] {
            let x: Vec<f32> = randn(rows * classes, (rows + classes) as u64)
                .iter()
                .map(|v| 4.0 * v)
                .collect();
            let mut rng = Rng::new(rows as u64);
            let labels: Vec<usize> = (0..rows).map(|_| rng.below(classes)).collect();
            let xb = be.upload(&x).unwrap();
            for reduction in [Reduction::Mean, Reduction::Sum] {
                let tag = format!("{} {rows} x {classes} {reduction:?}", be.name());
                let (loss, d) =
                    device::cross_entropy(&be, &xb, classes, &labels, reduction).unwrap();
                let (want, wd) =
                    strata::ops::cross_entropy::forward_backward(&x, classes, &labels, reduction);
                let got = be.download(&d).unwrap();
                assert!(
                    rel_err(&[loss], &[want]) < 1e-5,
                    "{tag}: loss {loss} vs {want}"
                );
                assert!(
                    rel_err(&got, &wd) < 1e-5,
                    "{tag}: dlogits {}",
                    rel_err(&got, &wd)
                );
            }
        }
        let xb = be.upload(&[0.0f32; 6]).unwrap();
        let err = device::cross_entropy(&be, &xb, 3, &[0, 3], Reduction::Mean)
            .unwrap_err()
            .to_string();
        assert!(err.contains("example 1 has label 3"), "{err}");
    }
}

/// Log-softmax (forward, backward) and masked mean pooling (forward, backward) on the device
/// against the CPU references; fp32, 1e-5 of scale.
#[test]
fn log_softmax_and_mean_pool_kernels_match_the_cpu_references() {
    use strata::PackedBatch;
    for be in backends() {
        for (rows, d) in [(1usize, 2usize), (37, 43), (300, 71), (3, 1251)] {
            let tag = format!("{} log_softmax {rows} x {d}", be.name());
            let x: Vec<f32> = randn(rows * d, 3).iter().map(|v| 5.0 * v).collect();
            let dy = randn(rows * d, 4);
            let (xb, dyb) = (be.upload(&x).unwrap(), be.upload(&dy).unwrap());
            let y = device::log_softmax_forward(&be, &xb, rows, d).unwrap();
            let want = strata::ops::softmax::log_softmax_forward(&x, d);
            let got = be.download(&y).unwrap();
            assert!(
                rel_err(&got, &want) < 1e-5,
                "{tag}: forward {}",
                rel_err(&got, &want)
            );
            let dx = be
                .download(&device::log_softmax_backward(&be, &y, &dyb, rows, d).unwrap())
                .unwrap();
            let want = strata::ops::softmax::log_softmax_backward(&want, &dy, d);
            assert!(
                rel_err(&dx, &want) < 1e-5,
                "{tag}: backward {}",
                rel_err(&dx, &want)
            );
        }
        // 40 and 3 channels: partial blocks of 32; 300 frames over the 8 warps.
        for (lens, c) in [
            (vec![1usize], 3usize),
            (vec![5, 1, 17], 256),
            (vec![300, 2, 77, 4], 40),
        ] {
            let tag = format!("{} mean_pool {lens:?} x {c}", be.name());
            let batch = PackedBatch::from_lengths(&lens).unwrap();
            let x = randn(batch.total_frames() * c, 5);
            let dy = randn(lens.len() * c, 6);
            let y = device::mean_pool_forward(&be, &be.upload(&x).unwrap(), &batch, c).unwrap();
            let want = strata::ops::pooling::mean_forward(&x, c, batch.offsets());
            let got = be.download(&y).unwrap();
            assert!(
                rel_err(&got, &want) < 1e-5,
                "{tag}: forward {}",
                rel_err(&got, &want)
            );
            let dx = device::mean_pool_backward(&be, &be.upload(&dy).unwrap(), &batch, c).unwrap();
            let want = strata::ops::pooling::mean_backward(&dy, c, batch.offsets());
            let got = be.download(&dx).unwrap();
            assert!(
                rel_err(&got, &want) < 1e-5,
                "{tag}: backward {}",
                rel_err(&got, &want)
            );
        }
    }
}

/// Dropout's mask on the device is the CPU's bit for bit; LayerNorm forward / backward (with and
/// without affine) matches the CPU reference to 1e-5 of scale, parameter gradients included.
#[test]
fn dropout_and_layernorm_kernels_match_the_cpu_references() {
    for be in backends() {
        let x = randn(10_000, 8);
        let xb = be.upload(&x).unwrap();
        for (p, seed) in [(0.0, 1u64), (0.1, 7), (0.5, 123_456_789), (1.0, 3)] {
            let got = be
                .download(&device::dropout(&be, &xb, p, seed).unwrap())
                .unwrap();
            let want = strata::ops::dropout::forward(&x, p, seed);
            assert_eq!(
                got,
                want,
                "{} dropout p={p}: the CPU's mask and scale exactly",
                be.name()
            );
        }
        // 700 rows: 88 partials of the affine gradients over 8 warps; d = 40, a partial column
        // block of 32.
        for (rows, d, affine) in [
            (1usize, 2usize, true),
            (37, 768, true),
            (20, 100, false),
            (3, 1024, false),
            (700, 40, true),
        ] {
            let tag = format!("{} layernorm {rows} x {d} affine {affine}", be.name());
            let x: Vec<f32> = randn(rows * d, 9).iter().map(|v| 3.0 * v + 1.0).collect();
            let (w, b) = (randn(d, 10), randn(d, 11));
            let dy = randn(rows * d, 12);
            let (xb, wb, bb, dyb) = (
                be.upload(&x).unwrap(),
                be.upload(&w).unwrap(),
                be.upload(&b).unwrap(),
                be.upload(&dy).unwrap(),
            );
            let (y, saved) =
                device::layernorm_forward(&be, &xb, rows, d, affine.then_some((&wb, &bb)), 1e-5)
                    .unwrap();
            let (want_y, want_saved) =
                strata::ops::layernorm::forward(&x, d, affine.then_some((&w[..], &b[..])), 1e-5);
            let got = be.download(&y).unwrap();
            assert!(
                rel_err(&got, &want_y) < 1e-5,
                "{tag}: forward {}",
                rel_err(&got, &want_y)
            );
            // bf16 rows in, bf16 out: bit for bit the casts around the fp32 LayerNorm; and the
            // backward reading the bf16 rows as the fp32 one reads their widened copy.
            let x16 = be.upload(&to_bf16(&x)).unwrap();
            let x16_wide = device::cast_to_f32(&be, &x16).unwrap();
            let aff = affine.then_some((&wb, &bb));
            let (y_wide, saved_wide) =
                device::layernorm_forward(&be, &x16_wide, rows, d, aff, 1e-5).unwrap();
            let want16 = be
                .download(&device::cast_to_bf16(&be, &y_wide).unwrap())
                .unwrap();
            let (y16, saved16) = device::layernorm_forward_any(
                &be,
                device::AnyBuf::Bf16(&x16),
                rows,
                d,
                aff,
                1e-5,
                true,
            )
            .unwrap();
            let device::LayerOut::Bf16(y16) = y16 else {
                panic!("{tag}: bf16 out asked for")
            };
            let got16 = be.download(&y16).unwrap();
            assert!(
                got16
                    .iter()
                    .zip(&want16)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{tag}: bf16 in and out"
            );
            assert_eq!(
                be.download(&saved16.rstd).unwrap(),
                be.download(&saved_wide.rstd).unwrap(),
                "{tag}"
            );
            let dx_of = |x: device::AnyBuf| {
                device::layernorm_backward_with(&be, x, rows, d, None, &saved16, &dyb, None, true)
                    .unwrap()
                    .map(|dx| be.download(&dx).unwrap())
            };
            assert_eq!(
                dx_of(device::AnyBuf::Bf16(&x16)),
                dx_of(device::AnyBuf::F32(&x16_wide)),
                "{tag}: backward from bf16 rows"
            );
            let (dw, db) = (be.zeros::<f32>(d).unwrap(), be.zeros::<f32>(d).unwrap());
            let dx = device::layernorm_backward(
                &be,
                &xb,
                rows,
                d,
                affine.then_some(&wb),
                &saved,
                &dyb,
                affine.then_some((&dw, &db)),
            )
            .unwrap();
            let (want_dx, want_dp) =
                strata::ops::layernorm::backward(&x, d, affine.then_some(&w[..]), &want_saved, &dy);
            let got = be.download(&dx).unwrap();
            // dx = rstd (g - mean(g) - x̂ mean(g x̂)), g = dy (· w): its terms are of size
            // rstd |g| and cancel (at d = 2 exactly: dx is rounding noise around 0), so the
            // error is measured against the terms' scale where that is the larger.
            let terms = (0..rows)
                .map(|r| {
                    let row = &x[r * d..(r + 1) * d];
                    let mean = row.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
                    let var =
                        row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
                    let g = (0..d).map(|i| (dy[r * d + i] * if affine { w[i] } else { 1.0 }).abs());
                    g.fold(0f64, |m, v| m.max(v as f64)) / (var + 1e-5).sqrt()
                })
                .fold(0f64, f64::max);
            let scale = want_dx.iter().fold(terms, |m, &v| m.max(v.abs() as f64));
            let err = max_abs_diff(&got, &want_dx) / scale;
            assert!(err < 1e-5, "{tag}: dx {err} of the terms' scale {scale}");
            if let Some((wdw, wdb)) = want_dp {
                let (gdw, gdb) = (be.download(&dw).unwrap(), be.download(&db).unwrap());
                assert!(
                    rel_err(&gdw, &wdw) < 1e-5,
                    "{tag}: dweight {}",
                    rel_err(&gdw, &wdw)
                );
                assert!(
                    rel_err(&gdb, &wdb) < 1e-5,
                    "{tag}: dbias {}",
                    rel_err(&gdb, &wdb)
                );
                // Without dx (an input that needs no gradient): the same parameter gradients,
                // added again, and no dx.
                let none = device::layernorm_backward_with(
                    &be,
                    device::AnyBuf::F32(&xb),
                    rows,
                    d,
                    Some(&wb),
                    &saved,
                    &dyb,
                    Some((&dw, &db)),
                    false,
                )
                .unwrap();
                assert!(none.is_none(), "{tag}");
                let (twice_w, twice_b) = (be.download(&dw).unwrap(), be.download(&db).unwrap());
                for (t, o) in twice_w.iter().chain(&twice_b).zip(gdw.iter().chain(&gdb)) {
                    assert_eq!(*t, 2.0 * o, "{tag}: parameter gradients without dx");
                }
            } else {
                let err = device::layernorm_backward_with(
                    &be,
                    device::AnyBuf::F32(&xb),
                    rows,
                    d,
                    None,
                    &saved,
                    &dyb,
                    None,
                    false,
                )
                .err()
                .unwrap()
                .to_string();
                assert!(err.contains("nothing to compute"), "{tag}: {err}");
            }
        }
    }
}

/// Linear layers on the layer-axis conv kernels (one layer, kernel 1): forward (bf16 and fp32
/// outputs) and backward against the CPU engine's Linear in f64 from the same bf16 tensors. fp32
/// results to 1e-5 (forward) / 1e-4 (dW, db) of scale; bf16 results within one bf16 rounding.
/// Output widths 3 and 71 take the general kernels, 40 and 256 the vectorized ones. Also the
/// fp32 -> bf16 cast, against half's rounding.
#[test]
fn linear_and_cast_on_the_device_match_the_cpu_reference() {
    for be in backends() {
        // 9 inputs: the general kernels (in_f % 8 != 0), at 9000 rows with the weight gradient's
        // reduction split in 4 chunks.
        for (rows, in_f, out_f) in [
            (1usize, 24usize, 3usize),
            (5, 768, 256),
            (300, 256, 71),
            (1000, 64, 40),
            (9000, 9, 20),
        ] {
            let tag = format!("{} linear {rows} x {in_f} -> {out_f}", be.name());
            let mut rng = Rng::new((rows + in_f + out_f) as u64);
            let x: Vec<f32> = (0..rows * in_f).map(|_| round_bf16(rng.normal())).collect();
            let bound = 1.0 / (in_f as f64).sqrt();
            let w: Vec<f32> = rng
                .uniform_vec(out_f * in_f, bound)
                .iter()
                .map(|&v| round_bf16(v))
                .collect();
            let b = rng.uniform_vec(out_f, bound);
            let dy: Vec<f32> = (0..rows * out_f)
                .map(|_| round_bf16(rng.normal()))
                .collect();
            let f64s = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<f64>>();
            let want_y = strata::ops::linear::forward(
                &f64s(&x),
                rows,
                in_f,
                &f64s(&w),
                out_f,
                Some(&f64s(&b)),
            );
            let (rdx, rdw, rdb) = strata::ops::linear::backward(
                &f64s(&x),
                rows,
                in_f,
                &f64s(&w),
                out_f,
                &f64s(&dy),
                true,
            );
            let scale = |v: &[f64]| v.iter().fold(1e-30f64, |m, a| m.max(a.abs()));
            let (xb, wb, bb, dyb) = (
                be.upload(&to_bf16(&x)).unwrap(),
                be.upload(&to_bf16(&w)).unwrap(),
                be.upload(&b).unwrap(),
                be.upload(&to_bf16(&dy)).unwrap(),
            );
            let y32 = device::linear_forward(&be, &xb, rows, in_f, out_f, &wb, &bb, true)
                .unwrap()
                .into_f32()
                .unwrap();
            let y32 = be.download(&y32).unwrap();
            for (k, (&a, &r)) in y32.iter().zip(&want_y).enumerate() {
                assert!(
                    (a as f64 - r).abs() <= 1e-5 * scale(&want_y),
                    "{tag}: y32[{k}] = {a}, want {r}"
                );
            }
            let y16 = device::linear_forward(&be, &xb, rows, in_f, out_f, &wb, &bb, false)
                .unwrap()
                .into_bf16();
            let got: Vec<f32> = be
                .download(&y16.unwrap())
                .unwrap()
                .iter()
                .map(|v| v.to_f32())
                .collect();
            for (k, (&a, &r)) in got.iter().zip(&want_y).enumerate() {
                assert!(
                    (a as f64 - r).abs() <= r.abs() / 256.0 + 1e-5 * scale(&want_y),
                    "{tag}: y[{k}] = {a}, want {r}"
                );
            }
            let (dw, db) = (
                be.zeros::<f32>(out_f * in_f).unwrap(),
                be.zeros::<f32>(out_f).unwrap(),
            );
            let dx =
                device::linear_backward(&be, &xb, rows, in_f, out_f, &wb, &dyb, (&dw, &db), true)
                    .unwrap()
                    .unwrap();
            let (gdw, gdb) = (be.download(&dw).unwrap(), be.download(&db).unwrap());
            let gdx: Vec<f32> = be
                .download(&dx)
                .unwrap()
                .iter()
                .map(|v| v.to_f32())
                .collect();
            let rdx = rdx.unwrap();
            for (what, got, want) in [("dW", &gdw, &rdw), ("db", &gdb, &rdb)] {
                let e = max_abs_diff(got, want);
                assert!(
                    e <= 1e-4 * scale(want),
                    "{tag}: {what} error {e:.3e} of scale {:.3e}",
                    scale(want)
                );
            }
            for (k, (&a, &r)) in gdx.iter().zip(&rdx).enumerate() {
                assert!(
                    (a as f64 - r).abs() <= r.abs() / 256.0 + 1e-5 * scale(&rdx),
                    "{tag}: dx[{k}] = {a}, want {r}"
                );
            }
            // Linear + ReLU with its epilogue in bf16: exactly the fp32 Linear's output through
            // ReLU, rounded; its backward exactly the Linear's backward from dy masked by y > 0.
            let got = be
                .download(
                    &device::linear_relu_forward(&be, &xb, rows, in_f, out_f, &wb, &bb).unwrap(),
                )
                .unwrap();
            let want: Vec<bf16> = y32.iter().map(|&v| bf16::from_f32(v.max(0.0))).collect();
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{tag}: linear_relu_forward"
            );
            assert!(
                want.iter().any(|v| v.to_f32() == 0.0) && want.iter().any(|v| v.to_f32() > 0.0)
            );
            let yb = be.upload(&got).unwrap();
            let masked: Vec<bf16> = to_bf16(&dy)
                .iter()
                .zip(&got)
                .map(|(&d, y)| if y.to_f32() > 0.0 { d } else { bf16::ZERO })
                .collect();
            let grads = |relu: bool| {
                let (dw, db) = (
                    be.zeros::<f32>(out_f * in_f).unwrap(),
                    be.zeros::<f32>(out_f).unwrap(),
                );
                let dx = if relu {
                    device::linear_relu_backward(
                        &be,
                        &xb,
                        &yb,
                        rows,
                        in_f,
                        out_f,
                        &wb,
                        &dyb,
                        (&dw, &db),
                        true,
                    )
                } else {
                    let dm = be.upload(&masked).unwrap();
                    device::linear_backward(&be, &xb, rows, in_f, out_f, &wb, &dm, (&dw, &db), true)
                }
                .unwrap()
                .unwrap();
                let bits = |v: Vec<bf16>| v.iter().map(|x| x.to_bits() as u32).collect::<Vec<_>>();
                let fbits = |v: Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                (
                    fbits(be.download(&dw).unwrap()),
                    fbits(be.download(&db).unwrap()),
                    bits(be.download(&dx).unwrap()),
                )
            };
            assert!(grads(true) == grads(false), "{tag}: linear_relu_backward");
        }
        let v: Vec<f32> = randn(1000, 13)
            .iter()
            .map(|x| x * 100.0)
            .chain([f32::INFINITY, -0.0, 1e-40])
            .collect();
        let got = be
            .download(&device::cast_to_bf16(&be, &be.upload(&v).unwrap()).unwrap())
            .unwrap();
        let want = to_bf16(&v);
        assert!(
            got.iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{}: cast",
            be.name()
        );
    }
}

/// The single-layer and Concat + Proj interfaces on the device: the layer gather against the CPU
/// reference (exact: a copy), and Concat + Proj as a Linear over the frame-major stack against the
/// CPU interface through the tape, from the same bf16 values (fp32 out, 1e-5 of scale).
#[test]
fn single_layer_and_concat_proj_on_the_device_match_the_cpu_interfaces() {
    use strata::models::interface::{self, InterfaceConfig, InterfaceKind};
    use strata::{ParamStore, Tape};
    for be in backends() {
        for (n, l, d) in [(1usize, 2usize, 8usize), (33, 7, 40), (10, 13, 100)] {
            let tag = format!("{} n={n} L={l} D={d}", be.name());
            let x: Vec<f32> = randn(n * l * d, 21)
                .iter()
                .map(|&v| round_bf16(v))
                .collect();
            let xb = be.upload(&to_bf16(&x)).unwrap();
            for layer in [0i64, -1, (l / 2) as i64] {
                let got: Vec<f32> = be
                    .download(&device::select_layer(&be, &xb, n, l, d, layer).unwrap())
                    .unwrap()
                    .iter()
                    .map(|v| v.to_f32())
                    .collect();
                let idx = if layer < 0 { l - 1 } else { layer as usize };
                assert_eq!(
                    got,
                    strata::ops::shape::select_layer(&x, l, d, idx),
                    "{tag} layer {layer}"
                );
            }
            assert!(
                device::select_layer(&be, &xb, n, l, d, l as i64).is_err(),
                "{tag}: out of range"
            );
            // Concat + Proj with bf16-valued weights, as the device holds them.
            let out = 24;
            let mut store = ParamStore::new();
            let cfg = InterfaceConfig::new(l, d, InterfaceKind::ConcatProj { out_dim: out });
            let itf = interface::build(&cfg, &mut store, "i.", &mut Rng::new(5)).unwrap();
            let (wid, bid) = (
                store.id("i.proj.weight").unwrap(),
                store.id("i.proj.bias").unwrap(),
            );
            let w: Vec<f32> = store
                .value(wid)
                .to_vec()
                .iter()
                .map(|&v| round_bf16(v))
                .collect();
            store
                .set_value(wid, Tensor::from_vec(w.clone(), &[out, l * d]).unwrap())
                .unwrap();
            let b = store.value(bid).to_vec();
            let mut tape = Tape::no_grad();
            let s = tape
                .constant(Tensor::from_vec(x.clone(), &[n, l, d]).unwrap())
                .unwrap();
            let y = itf.forward(&mut tape, &store, s).unwrap();
            let want = tape.value(y).to_vec();
            let got = device::linear_forward(
                &be,
                &xb,
                n,
                l * d,
                out,
                &be.upload(&to_bf16(&w)).unwrap(),
                &be.upload(&b).unwrap(),
                true,
            )
            .unwrap()
            .into_f32()
            .unwrap();
            let got = be.download(&got).unwrap();
            assert!(
                rel_err(&got, &want) < 1e-5,
                "{tag}: concat + proj {}",
                rel_err(&got, &want)
            );
        }
    }
}

/// The step's glue kernels: bf16 -> fp32 (exact), the scaled fp32 -> bf16 cast, the bf16 row
/// LayerNorm of a frozen stack (s3prl `normalize`: one bf16 rounding of the f64 reference, flash-
/// attention rule vs a naive bf16 computation) and the layer sums writing into / reading from
/// column slices of a wider matrix (GroupWS's concatenation: bitwise the plain launch's values).
#[test]
fn cast_row_norm_and_column_slice_layer_sums_match_their_references() {
    for be in backends() {
        let tag = be.name();
        // Lengths that are not multiples of 4: the kernels' tails (they take 4 values a thread).
        let v = to_bf16(&randn(3001, 21));
        let got = be
            .download(&device::cast_to_f32(&be, &be.upload(&v).unwrap()).unwrap())
            .unwrap();
        assert!(
            got.len() == v.len()
                && got
                    .iter()
                    .zip(&v)
                    .all(|(a, b)| a.to_bits() == b.to_f32().to_bits()),
            "{tag}: widening cast"
        );
        let x = randn(2003, 22);
        let got = be
            .download(&device::cast_to_bf16_scaled(&be, &be.upload(&x).unwrap(), 0.25).unwrap())
            .unwrap();
        assert!(
            got.len() == x.len()
                && got
                    .iter()
                    .zip(&x)
                    .all(|(a, &b)| a.to_bits() == bf16::from_f32(0.25 * b).to_bits()),
            "{tag}: scaled cast"
        );
        for (rows, d) in [(1usize, 8usize), (7 * 13, 768), (50, 100)] {
            // Rows with an offset and a scale, as hidden states have.
            let xs: Vec<f32> = randn(rows * d, 23)
                .iter()
                .enumerate()
                .map(|(i, &z)| 3.0 + (i / d) as f32 * 0.1 + 2.0 * z)
                .collect();
            let xb = to_bf16(&xs);
            let x64: Vec<f64> = xb.iter().map(|v| v.to_f32() as f64).collect();
            let want = strata::ops::layernorm::forward(&x64, d, None, 1e-5).0;
            let want32: Vec<f32> = want.iter().map(|&w| w as f32).collect();
            let got: Vec<f32> = be
                .download(
                    &device::layernorm_rows_bf16(&be, &be.upload(&xb).unwrap(), rows, d).unwrap(),
                )
                .unwrap()
                .iter()
                .map(|v| v.to_f32())
                .collect();
            // Naive: statistics in bf16 arithmetic.
            let naive: Vec<f32> = xb
                .chunks(d)
                .flat_map(|r| {
                    let m = r.iter().fold(0f32, |s, v| round_bf16(s + v.to_f32())) / d as f32;
                    let m = round_bf16(m);
                    let var = r.iter().fold(0f32, |s, v| {
                        round_bf16(s + round_bf16((v.to_f32() - m).powi(2)))
                    }) / d as f32;
                    let rs = round_bf16(1.0 / (round_bf16(var) + 1e-5).sqrt());
                    r.iter()
                        .map(move |v| round_bf16(round_bf16(v.to_f32() - m) * rs))
                        .collect::<Vec<_>>()
                })
                .collect();
            assert_fa_rule(
                &format!("{tag} row norm {rows} x {d}"),
                &got,
                &want32,
                &naive,
            );
        }
        // Layer sums into columns 2..3 of a [n, 3 * d] matrix, and back from them.
        let (n, l, d) = (40usize, 7usize, 32usize);
        let xb = be.upload(&to_bf16(&randn(n * l * d, 24))).unwrap();
        let w = be.upload(&randn(3, 25)).unwrap();
        for normalize in [false, true] {
            let s = LayerSumShape {
                n,
                l,
                d,
                first: 2,
                k: 3,
                normalize,
            };
            let (plain, st) = device::layer_sum_forward(&be, &xb, &w, s).unwrap();
            let plain = be.download(&plain).unwrap();
            let wide = be.zeros::<bf16>(n * 3 * d).unwrap();
            let cols = device::Cols {
                stride: 3 * d,
                offset: 2 * d,
            };
            let st2 = device::layer_sum_forward_into(&be, &xb, &w, s, &wide, cols).unwrap();
            let wide_h = be.download(&wide).unwrap();
            for f in 0..n {
                assert!(
                    wide_h[f * 3 * d..f * 3 * d + 2 * d]
                        .iter()
                        .all(|v| v.to_bits() == 0)
                        && wide_h[f * 3 * d + 2 * d..(f + 1) * 3 * d]
                            .iter()
                            .zip(&plain[f * d..(f + 1) * d])
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{tag}: frame {f} of the column-slice layer sum"
                );
            }
            let g = randn(n * 3 * d, 26);
            let g_own: Vec<f32> = g.chunks(3 * d).flat_map(|r| r[2 * d..].to_vec()).collect();
            let (dw1, dw2) = (be.zeros::<f32>(3).unwrap(), be.zeros::<f32>(3).unwrap());
            let dx1 = device::layer_sum_backward(
                &be,
                &xb,
                &w,
                &be.upload(&g_own).unwrap(),
                st.as_ref(),
                s,
                &dw1,
                true,
            )
            .unwrap()
            .unwrap();
            let dx2 = be.zeros::<f32>(n * l * d).unwrap();
            device::layer_sum_backward_into(
                &be,
                &xb,
                &w,
                (&be.upload(&g).unwrap(), cols),
                st2.as_ref(),
                s,
                &dw2,
                Some(&dx2),
            )
            .unwrap();
            assert_eq!(
                be.download(&dw1).unwrap(),
                be.download(&dw2).unwrap(),
                "{tag}: dw"
            );
            assert_eq!(
                be.download(&dx1).unwrap(),
                be.download(&dx2).unwrap(),
                "{tag}: dx"
            );
            // A frozen stack reading the slice: the weight-gradient-only kernel (its own order of
            // summation, so close rather than bit-equal).
            let dw3 = be.zeros::<f32>(3).unwrap();
            device::layer_sum_backward_into(
                &be,
                &xb,
                &w,
                (&be.upload(&g).unwrap(), cols),
                st2.as_ref(),
                s,
                &dw3,
                None,
            )
            .unwrap();
            let e = rel_err(&be.download(&dw3).unwrap(), &be.download(&dw1).unwrap());
            assert!(e <= 1e-5, "{tag}: dw without dx, relative error {e:.2e}");
            // A slice that does not fit, or a misaligned one, is an error naming the kernel.
            let bad = device::Cols {
                stride: 3 * d,
                offset: 2 * d + 4,
            };
            let e = device::layer_sum_forward_into(&be, &xb, &w, s, &wide, bad)
                .unwrap_err()
                .to_string();
            assert!(e.contains("layer_sum_forward out"), "{e}");
        }
    }
}

/// CLS pooling's fused attention (one shared query over the shared CLS row + each frame's L layer
/// rows) against the CPU attention with sq = 1 on the same bf16 values materialized per frame, in
/// f64: the bf16 output by the flash-attention rule, the fp32 gradients (probabilities, dq and the
/// CLS rows' summed dk / dv) to 1e-5 of scale and the layer rows' bf16 dk / dv within one bf16
/// rounding. Also the elementwise glue: activations, add_rows, col_sum_accumulate.
#[test]
fn cls_attention_and_elementwise_kernels_match_the_cpu_references() {
    use strata::ops::attention::{self, AttnGeom};
    for be in backends() {
        let tag = be.name();
        let big = on_gpu() && !std::env::var("STRATA_TEST_SMALL").is_ok_and(|v| v == "1");
        let mut cases = vec![
            (1usize, 2usize, 8usize, 1usize),
            (9, 7, 40, 4),
            (5, 40, 64, 2),
        ];
        if big {
            cases.push((16000, 13, 768, 12));
        }
        for (n, l, d, heads) in cases {
            let s = l + 1;
            let q = randn(d, 31);
            let kc = to_bf16(&randn(d, 32));
            let vc = to_bf16(&randn(d, 33));
            let k = to_bf16(&randn(n * l * d, 34));
            let v = to_bf16(&randn(n * l * d, 35));
            let dout = randn(n * d, 36);
            let shape = device::ClsAttnShape { n, l, d, heads };
            let bufs = (
                be.upload(&q).unwrap(),
                be.upload(&kc).unwrap(),
                be.upload(&vc).unwrap(),
                be.upload(&k).unwrap(),
                be.upload(&v).unwrap(),
            );
            let inputs = device::ClsAttnInputs {
                q: &bufs.0,
                k_cls: &bufs.1,
                v_cls: &bufs.2,
                k: &bufs.3,
                v: &bufs.4,
            };
            let (out, probs) = device::cls_attention_forward(&be, shape, &inputs).unwrap();
            let g = device::cls_attention_backward(
                &be,
                shape,
                &inputs,
                &probs,
                &be.upload(&dout).unwrap(),
            )
            .unwrap();
            // The reference: per frame, tokens [cls; layers], in f64 (and the naive bf16 output).
            let f = |b: &[bf16]| -> Vec<f64> { b.iter().map(|x| x.to_f32() as f64).collect() };
            let tokens = |cls: &[bf16], rows: &[bf16]| -> Vec<f64> {
                (0..n)
                    .flat_map(|fr| {
                        let mut t = f(cls);
                        t.extend(f(&rows[fr * l * d..(fr + 1) * l * d]));
                        t
                    })
                    .collect()
            };
            let (k64, v64) = (tokens(&kc, &k), tokens(&vc, &v));
            let q64: Vec<f64> = (0..n).flat_map(|_| q.iter().map(|&x| x as f64)).collect();
            let geom = AttnGeom {
                sq: 1,
                sk: s,
                heads,
                head_dim: d / heads,
            };
            let (want_out, want_p) = attention::forward(&q64, &k64, &v64, n, &geom);
            let d64: Vec<f64> = dout.iter().map(|&x| x as f64).collect();
            let (dq, dk, dv) = attention::backward(&q64, &k64, &v64, &want_p, &d64, n, &geom);
            let to32 = |v: &[f64]| -> Vec<f32> { v.iter().map(|&x| x as f32).collect() };
            let got_out: Vec<f32> = be
                .download(&out)
                .unwrap()
                .iter()
                .map(|x| x.to_f32())
                .collect();
            // The naive bf16 computation: probabilities and products rounded to bf16.
            let naive_out: Vec<f32> = {
                let pb: Vec<f64> = want_p
                    .iter()
                    .map(|&p| round_bf16(p as f32) as f64)
                    .collect();
                let dh = d / heads;
                (0..n * d)
                    .map(|i| {
                        let (fr, c) = (i / d, i % d);
                        let h = c / dh;
                        let mut acc = 0f32;
                        for j in 0..s {
                            let p = pb[(fr * heads + h) * s + j] as f32;
                            acc =
                                round_bf16(acc + round_bf16(p * v64[(fr * s + j) * d + c] as f32));
                        }
                        acc
                    })
                    .collect()
            };
            assert_fa_rule(
                &format!("{tag} cls attention out {n} x {l} x {d} / {heads}"),
                &got_out,
                &to32(&want_out),
                &naive_out,
            );
            let scale = |v: &[f64]| v.iter().fold(1e-30f64, |m, x| m.max(x.abs()));
            let close = |what: &str, got: &[f32], want: &[f64], tol: f64| {
                let sc = scale(want);
                for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
                    assert!(
                        (a as f64 - b).abs() <= tol * sc,
                        "{tag} {n} x {l} x {d} / {heads}: {what}[{i}] = {a}, want {b}"
                    );
                }
            };
            close("probs", &be.download(&probs).unwrap(), &want_p, 1e-5);
            // dq summed over the frames; the CLS rows' dk / dv summed likewise.
            let sum_frames = |x: &[f64], row: usize, rows_per_frame: usize| -> Vec<f64> {
                (0..d)
                    .map(|c| {
                        (0..n)
                            .map(|fr| x[(fr * rows_per_frame + row) * d + c])
                            .sum()
                    })
                    .collect()
            };
            close(
                "dq",
                &be.download(&g.dq).unwrap(),
                &sum_frames(&dq, 0, 1),
                1e-5,
            );
            close(
                "dk_cls",
                &be.download(&g.dk_cls).unwrap(),
                &sum_frames(&dk, 0, s),
                1e-5,
            );
            close(
                "dv_cls",
                &be.download(&g.dv_cls).unwrap(),
                &sum_frames(&dv, 0, s),
                1e-5,
            );
            let layer_rows = |x: &[f64]| -> Vec<f64> {
                (0..n)
                    .flat_map(|fr| x[(fr * s + 1) * d..(fr + 1) * s * d].to_vec())
                    .collect()
            };
            for (what, got, want) in [
                ("dk", &g.dk, layer_rows(&dk)),
                ("dv", &g.dv, layer_rows(&dv)),
            ] {
                let sc = scale(&want);
                let got: Vec<f32> = be
                    .download(got)
                    .unwrap()
                    .iter()
                    .map(|x| x.to_f32())
                    .collect();
                for (i, (&a, &b)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (a as f64 - b).abs() <= b.abs() / 256.0 + 1e-5 * sc,
                        "{tag} {n} x {l} x {d} / {heads}: {what}[{i}] = {a}, want {b}"
                    );
                }
            }
        }
        // Elementwise glue.
        let x = randn(5000, 41);
        let dy = randn(5000, 42);
        let xb = be.upload(&x).unwrap();
        let dyb = be.upload(&dy).unwrap();
        for gelu in [false, true] {
            let y = be
                .download(&device::activation_forward(&be, &xb, gelu).unwrap())
                .unwrap();
            let dx = be
                .download(&device::activation_backward(&be, &xb, &dyb, gelu).unwrap())
                .unwrap();
            let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
            let dy64: Vec<f64> = dy.iter().map(|&v| v as f64).collect();
            let (wy, wdx) = if gelu {
                (
                    strata::ops::activation::gelu_forward(&x64),
                    strata::ops::activation::gelu_backward(&x64, &dy64),
                )
            } else {
                let wy = strata::ops::activation::relu_forward(&x64);
                let wdx = strata::ops::activation::relu_backward(&wy, &dy64);
                (wy, wdx)
            };
            for (got, want, what) in [(&y, &wy, "y"), (&dx, &wdx, "dx")] {
                let sc = want.iter().fold(0f64, |m, v| m.max(v.abs()));
                let err = max_abs_diff(got, want);
                assert!(
                    err <= 1e-5 * sc,
                    "{tag} activation gelu={gelu} {what}: error {err:.3e}"
                );
            }
        }
        let (rows, c) = (50usize, 100usize);
        let a = randn(rows * c, 43);
        let b = randn(rows * c, 44);
        let vrow = randn(c, 45);
        let y = be
            .download(
                &device::add_rows(
                    &be,
                    &be.upload(&a).unwrap(),
                    Some(&be.upload(&b).unwrap()),
                    Some(&be.upload(&vrow).unwrap()),
                    rows,
                    c,
                )
                .unwrap(),
            )
            .unwrap();
        assert!(
            y.iter()
                .enumerate()
                .all(|(i, &v)| v == a[i] + b[i] + vrow[i % c]),
            "{tag}: add_rows"
        );
        // Two uses' gradients summed in fp32, each fp32 or bf16 (widened exactly).
        {
            use device::AnyBuf;
            let (a16, b16) = (to_bf16(&a), to_bf16(&b));
            let (fa, fb) = (be.upload(&a).unwrap(), be.upload(&b).unwrap());
            let (ha, hb) = (be.upload(&a16).unwrap(), be.upload(&b16).unwrap());
            for (ga, gb, wa, wb) in [
                (AnyBuf::F32(&fa), AnyBuf::F32(&fb), a.clone(), b.clone()),
                (
                    AnyBuf::Bf16(&ha),
                    AnyBuf::F32(&fb),
                    a16.iter().map(|v| v.to_f32()).collect(),
                    b.clone(),
                ),
                (
                    AnyBuf::F32(&fa),
                    AnyBuf::Bf16(&hb),
                    a.clone(),
                    b16.iter().map(|v| v.to_f32()).collect(),
                ),
                (
                    AnyBuf::Bf16(&ha),
                    AnyBuf::Bf16(&hb),
                    a16.iter().map(|v| v.to_f32()).collect(),
                    b16.iter().map(|v| v.to_f32()).collect::<Vec<f32>>(),
                ),
            ] {
                let got = be
                    .download(&device::add_grads(&be, ga, gb).unwrap())
                    .unwrap();
                assert!(
                    got.iter()
                        .zip(wa.iter().zip(&wb))
                        .all(|(g, (x, y))| *g == x + y),
                    "{tag}: add_grads"
                );
            }
            // A length that is not a multiple of 4: the kernel's tail.
            let odd = |v: &[f32]| be.upload(&v[..4999]).unwrap();
            let got = be
                .download(
                    &device::add_grads(&be, AnyBuf::F32(&odd(&a)), AnyBuf::F32(&odd(&b))).unwrap(),
                )
                .unwrap();
            assert!(
                got.iter().enumerate().all(|(i, g)| *g == a[i] + b[i]) && got.len() == 4999,
                "{tag}: add_grads, 4999 values"
            );
            let short = be.upload(&a[..10]).unwrap();
            let err = device::add_grads(&be, AnyBuf::F32(&short), AnyBuf::Bf16(&hb))
                .err()
                .unwrap()
                .to_string();
            assert!(err.contains("add_grads b"), "{tag}: {err}");
        }
        let out = be.upload(&vrow).unwrap();
        device::col_sum_accumulate(&be, &be.upload(&a).unwrap(), rows, c, &out).unwrap();
        let got = be.download(&out).unwrap();
        // Bit for bit the documented order: 16 sums over the rows r = w (mod 16), then in order.
        for col in 0..c {
            let mut s = 0f32;
            for w in 0..16 {
                let mut part = 0f32;
                for r in (w..rows).step_by(16) {
                    part += a[r * c + col];
                }
                s += part;
            }
            assert_eq!(got[col], vrow[col] + s, "{tag}: col_sum column {col}");
        }
    }
}

/// Multi-tensor AdamW / Adam: one launch over several separate buffers (sizes from 1 to 3 blocks'
/// worth and more, with and without a bf16 copy and a clip coefficient) gives bit for bit what
/// adam_step gives per tensor, and zeroes each gradient when asked.
#[test]
fn multi_tensor_adam_equals_the_per_tensor_kernel_and_zeroes_gradients() {
    for be in backends() {
        let tag = be.name();
        let sizes = [1usize, 255, 256, 1000, 1024, 2049, 70_001];
        for (cfg, scaled) in [
            (AdamConfig::adamw(1e-3), true),
            (AdamConfig::adam(3e-3), false),
        ] {
            let mut cfg = cfg;
            cfg.weight_decay = 0.05;
            let make = |seed: u64| -> Vec<[Buf<f32>; 4]> {
                sizes
                    .iter()
                    .enumerate()
                    .map(|(i, &n)| {
                        let s = seed + 10 * i as u64;
                        let v: Vec<f32> = randn(n, s + 3).iter().map(|x| x.abs()).collect();
                        [
                            be.upload(&randn(n, s)).unwrap(),
                            be.upload(&randn(n, s + 1)).unwrap(),
                            be.upload(&randn(n, s + 2)).unwrap(),
                            be.upload(&v).unwrap(),
                        ]
                    })
                    .collect()
            };
            let (one, multi) = (make(50), make(50));
            let copies: Vec<Buf<bf16>> = sizes.iter().map(|&n| be.zeros(n).unwrap()).collect();
            let copies_m: Vec<Buf<bf16>> = sizes.iter().map(|&n| be.zeros(n).unwrap()).collect();
            let scale = be.upload(&[0.7f32]).unwrap();
            let scale = scaled.then_some(&scale);
            let table = device::AdamTensors::new(
                &be,
                &multi
                    .iter()
                    .enumerate()
                    .map(|(i, [p, g, m, v])| (p, g, m, v, (i % 2 == 0).then(|| &copies_m[i])))
                    .collect::<Vec<_>>(),
            )
            .unwrap();
            // The global gradient norm over the table in two launches: bit for bit the
            // per-tensor launches', and the f64 norm to fp32 rounding.
            let grads: Vec<&Buf<f32>> = multi.iter().map(|t| &t[1]).collect();
            let (n1, c1) = device::clip_coefficient_multi(&be, &grads, 1.5).unwrap();
            let (n2, c2) = device::clip_coefficient_table(&be, &table, 1.5).unwrap();
            let bits = |b: &Buf<f32>| be.download(b).unwrap()[0].to_bits();
            assert_eq!(bits(&n1), bits(&n2), "{tag}: table norm");
            assert_eq!(bits(&c1), bits(&c2), "{tag}: table clip coefficient");
            let want: f64 = grads
                .iter()
                .flat_map(|g| be.download(g).unwrap())
                .map(|x| (x as f64) * (x as f64))
                .sum::<f64>()
                .sqrt();
            let got = f32::from_bits(bits(&n2)) as f64;
            assert!(
                (got - want).abs() <= 1e-5 * want,
                "{tag}: norm {got} vs {want}"
            );
            for step in 1..=3u64 {
                for (i, [p, g, m, v]) in one.iter().enumerate() {
                    device::adam_step(
                        &be,
                        &cfg,
                        step,
                        p,
                        g,
                        m,
                        v,
                        (i % 2 == 0).then(|| &copies[i]),
                        scale,
                    )
                    .unwrap();
                }
                // Zeroing only on the last step, so both see the same gradients before it.
                device::adam_step_multi(&be, &cfg, step, &table, scale, step == 3).unwrap();
            }
            for (i, (a, b)) in one.iter().zip(&multi).enumerate() {
                for k in [0, 2, 3] {
                    let (x, y) = (be.download(&a[k]).unwrap(), be.download(&b[k]).unwrap());
                    assert!(
                        x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
                        "{tag}: tensor {i} buffer {k} differs"
                    );
                }
                assert!(
                    be.download(&b[1]).unwrap().iter().all(|&g| g == 0.0),
                    "{tag}: tensor {i}'s gradient zeroed"
                );
                if i % 2 == 0 {
                    assert_eq!(
                        be.download(&copies[i]).unwrap(),
                        be.download(&copies_m[i]).unwrap(),
                        "{tag}: bf16 copy {i}"
                    );
                }
            }
        }
    }
}

/// The speaker head's kernels (kernels/speaker.cu) against src/ops/speaker.rs: the TDNN window
/// gather exactly (a bf16 copy) and its backward, statistics pooling, row L2 normalization and the
/// AM-softmax margin, fp32 to 1e-5 of scale. Lengths include the shortest utterance a window
/// allows and ones much longer; widths of 1, 7 and 512 channels.
#[test]
fn speaker_head_kernels_match_the_cpu_references() {
    use strata::ops::speaker as cpu;
    use strata::PackedBatch;
    for be in backends() {
        for (lens, c, context, dilation) in [
            (vec![5usize], 1usize, 5usize, 1usize),
            (vec![9, 12, 30], 7, 3, 2),
            (vec![40, 7, 300], 512, 3, 3),
        ] {
            let tag = format!(
                "{} {lens:?} x {c}, window {context} / {dilation}",
                be.name()
            );
            let batch = PackedBatch::from_lengths(&lens).unwrap();
            let frames = batch.total_frames();
            let x = randn(frames * c, 31);
            // The gather is a copy of bf16 rows: exactly the CPU's windows of the rounded input.
            let xr: Vec<f32> = x.iter().map(|&v| round_bf16(v)).collect();
            let (want, out_offsets) =
                cpu::time_context_forward(&xr, c, batch.offsets(), context, dilation);
            let (idx, inv, lengths) =
                device::speaker_window_index(&batch, context, dilation).unwrap();
            let out_lengths: Vec<usize> = out_offsets.windows(2).map(|w| w[1] - w[0]).collect();
            assert_eq!(lengths, out_lengths, "{tag}");
            let y = device::rows_gather(
                &be,
                &be.upload(&to_bf16(&x)).unwrap(),
                &be.upload(&idx).unwrap(),
                c,
            )
            .unwrap();
            let got: Vec<f32> = be
                .download(&y)
                .unwrap()
                .iter()
                .map(|v| v.to_f32())
                .collect();
            assert_eq!(got, want, "{tag}: windows");
            let dy = randn(want.len(), 32);
            let dx = device::rows_gather_sum(
                &be,
                &be.upload(&dy).unwrap(),
                &be.upload(&inv).unwrap(),
                frames,
                context,
                c,
            )
            .unwrap();
            let want = cpu::time_context_backward(
                &dy,
                c,
                batch.offsets(),
                &out_offsets,
                context,
                dilation,
            );
            let e = rel_err(&be.download(&dx).unwrap(), &want);
            assert!(e < 1e-6, "{tag}: window backward {e:e}");

            // Statistics pooling (every utterance >= 2 frames here); the last channel constant
            // (std 0: no std gradient, as torch) where there is more than one.
            let mut x = x.clone();
            if c > 1 {
                (0..frames).for_each(|f| x[f * c + c - 1] = 0.5);
            }
            let xb = be.upload(&x).unwrap();
            let y = device::stats_pool_forward(&be, &xb, &batch, c).unwrap();
            let want_y = cpu::stats_pool_forward(&x, c, batch.offsets());
            let got_y = be.download(&y).unwrap();
            let e = rel_err(&got_y, &want_y);
            assert!(e < 1e-5, "{tag}: stats pool {e:e}");
            let dy = randn(want_y.len(), 33);
            let dx = device::stats_pool_backward(&be, &xb, &y, &be.upload(&dy).unwrap(), &batch, c)
                .unwrap();
            let want = cpu::stats_pool_backward(&dy, &x, &want_y, c, batch.offsets());
            assert!(want.iter().all(|v| v.is_finite()), "{tag}");
            let e = rel_err(&be.download(&dx).unwrap(), &want);
            assert!(e < 1e-5, "{tag}: stats pool backward {e:e}");

            // Row L2 normalization, a zero row included (the 1e-12 clamp).
            let rows = lens.len() + 1;
            let mut v = randn(rows * c, 34);
            v[..c].iter_mut().for_each(|a| *a = 0.0);
            let vb = be.upload(&v).unwrap();
            let got = be
                .download(&device::l2_normalize_forward(&be, &vb, rows, c).unwrap())
                .unwrap();
            let e = rel_err(&got, &cpu::l2_normalize_forward(&v, c));
            assert!(e < 1e-5, "{tag}: l2 normalize {e:e}");
            let dy = randn(rows * c, 35);
            let got = be
                .download(
                    &device::l2_normalize_backward(&be, &vb, &be.upload(&dy).unwrap(), rows, c)
                        .unwrap(),
                )
                .unwrap();
            let want = cpu::l2_normalize_backward(&dy, &v, c);
            // The zero row's gradient is dy / 1e-12: compare the others, then that row exactly.
            let e = rel_err(&got[c..], &want[c..]);
            assert!(e < 1e-5, "{tag}: l2 normalize backward {e:e}");
            assert!(
                got[..c]
                    .iter()
                    .zip(&want[..c])
                    .all(|(a, b)| (a - b).abs() <= 1e-6 * b.abs()),
                "{tag}"
            );
        }
        // The margin: only each row's label loses m, everything times s; backward s * dy.
        let (rows, classes) = (3usize, 5usize);
        let cos = randn(rows * classes, 36);
        let labels = [4i32, 0, 2];
        let out = device::am_margin(
            &be,
            &be.upload(&cos).unwrap(),
            Some(&be.upload(&labels).unwrap()),
            rows,
            classes,
            30.0,
            0.4,
        )
        .unwrap();
        let got = be.download(&out).unwrap();
        for r in 0..rows {
            for j in 0..classes {
                let m = if j as i32 == labels[r] { 0.4 } else { 0.0 };
                assert_eq!(got[r * classes + j], 30.0 * (cos[r * classes + j] - m));
            }
        }
        let back = device::am_margin(
            &be,
            &be.upload(&cos).unwrap(),
            None,
            rows,
            classes,
            30.0,
            0.4,
        )
        .unwrap();
        let got = be.download(&back).unwrap();
        assert!(got.iter().zip(&cos).all(|(g, c)| *g == 30.0 * c));
    }
}

#[test]
fn packed_self_attention_matches_the_cpu_reference_with_and_without_dropout() {
    use device::PackedAttnKernels;
    use strata::ops::attention::{packed_backward, packed_forward, ProbDropout};
    for be in backends() {
        let tag = be.name();
        // Head sizes: 8 and 5 (16 and 25 thread groups share each sum over the rows, some with
        // no row), 32 (4 groups, as ML-SUPERB's heads), 130 (more than the block: one feature a
        // thread, strided; past the tiled kernels' 128). The tiled kernels stage 56 key rows
        // (35 query rows in backward_key) a chunk at 128 wide: 70 frames take two chunks and a
        // partial tile of 6 rows.
        let mut cases = vec![
            (vec![1usize, 5, 37], 2usize, 8usize),
            (vec![20, 3], 4, 5),
            (vec![70, 9], 2, 32),
            (vec![70, 17], 1, 128),
            (vec![30, 7], 1, 130),
        ];
        if on_gpu() && !std::env::var("STRATA_TEST_SMALL").is_ok_and(|v| v == "1") {
            cases.push((vec![250; 8], 8, 32));
        }
        for (lengths, heads, dh) in cases {
            let batch = strata::PackedBatch::from_lengths(&lengths).unwrap();
            let n = batch.total_frames() * heads * dh;
            let (q, k, v, dout) = (randn(n, 61), randn(n, 62), randn(n, 63), randn(n, 64));
            let kernels = [PackedAttnKernels::Rows, PackedAttnKernels::Tiled];
            for (dropout, kernels) in [None, Some(ProbDropout { p: 0.25, seed: 77 })]
                .into_iter()
                .flat_map(|d| kernels.map(|k| (d, k)))
            {
                let bufs = [&q, &k, &v, &dout].map(|x| be.upload(x).unwrap());
                let attn = device::PackedAttn {
                    q: &bufs[0],
                    k: &bufs[1],
                    v: &bufs[2],
                    batch: &batch,
                    heads,
                    head_dim: dh,
                    dropout,
                };
                if kernels == PackedAttnKernels::Tiled && !attn.tiles_fit() {
                    assert!(dh > 128, "the tiled kernels take heads up to 128 wide");
                    let err = attn.forward_on(&be, kernels).err().unwrap().to_string();
                    assert!(err.contains("packed_attention_tiled_forward"), "{err}");
                    assert_eq!(attn.default_kernels(), PackedAttnKernels::Rows);
                    continue;
                }
                let (out, probs) = attn.forward_on(&be, kernels).unwrap();
                let (dq, dk, dv) = attn.backward_on(&be, &probs, &bufs[3], kernels).unwrap();
                let offsets = batch.offsets();
                let (want_out, want_probs) =
                    packed_forward((&q, &k, &v), offsets, heads, dh, dropout);
                let (wq, wk, wv) = packed_backward(
                    (&q, &k, &v),
                    &want_probs,
                    &dout,
                    offsets,
                    heads,
                    dh,
                    dropout,
                );
                let what =
                    format!("{tag} {kernels:?} {lengths:?} x {heads} heads, dropout {dropout:?}");
                for (name, got, want) in [
                    ("out", &out, &want_out),
                    ("probs", &probs, &want_probs),
                    ("dq", &dq, &wq),
                    ("dk", &dk, &wk),
                    ("dv", &dv, &wv),
                ] {
                    let got = be.download(got).unwrap();
                    common::assert_close(&format!("{what}: {name}"), &got, want, 1e-5);
                }
            }
        }
        // Shapes that do not match are refused by name.
        let batch = strata::PackedBatch::from_lengths(&[4]).unwrap();
        let small = be.upload(&randn(4 * 6, 1)).unwrap();
        let err = device::PackedAttn {
            q: &small,
            k: &small,
            v: &small,
            batch: &batch,
            heads: 2,
            head_dim: 4,
            dropout: None,
        }
        .forward(&be)
        .err()
        .unwrap()
        .to_string();
        // The kernel (tiled here, per-row under STRATA_PACKED_ATTN=rows) and the input.
        assert!(
            err.contains("packed_attention_") && err.contains("forward q"),
            "{err}"
        );
    }
}

#[test]
fn mlsuperb_head_kernels_match_the_cpu_references() {
    use strata::models::mlsuperb_head::{
        positions, specaug_mask, specaug_spans, time_warp, SpecAugmentConfig,
    };
    use strata::ops::conv2d::{patches_backward, patches_forward, PatchGeom};
    use strata::ops::{pooling, resample};
    for be in backends() {
        let tag = be.name();
        let big = on_gpu() && !std::env::var("STRATA_TEST_SMALL").is_ok_and(|v| v == "1");
        // Frame-level ops: centering, time warp, masks, positions.
        // 40 channels: two blocks of 32 in the centering.
        let mut cases = vec![
            (vec![30usize, 8, 17], 24usize),
            (vec![12], 7),
            (vec![9, 4], 40),
        ];
        if big {
            cases.push((vec![500; 32], 768));
        }
        for (lengths, d) in cases {
            let batch = strata::PackedBatch::from_lengths(&lengths).unwrap();
            let n = batch.total_frames();
            let what = format!("{tag} {} utterances x {d}", lengths.len());
            let x = randn(n * d, 91);
            let xb = be.upload(&x).unwrap();
            let got = device::utterance_center(&be, &xb, &batch, d).unwrap();
            let want = pooling::center(&x, d, batch.offsets());
            common::assert_close(
                &format!("{what}: center"),
                &be.download(&got).unwrap(),
                &want,
                1e-6,
            );

            let taps = time_warp(5, &batch, 17);
            let warp = device::DeviceTimeWarp::upload(&be, &taps, n).unwrap();
            let got = be.download(&warp.forward(&be, &xb, d).unwrap()).unwrap();
            common::assert_close(
                &format!("{what}: warp"),
                &got,
                &resample::mix_forward(&x, d, &taps),
                1e-6,
            );
            let got = be.download(&warp.backward(&be, &xb, d).unwrap()).unwrap();
            common::assert_close(
                &format!("{what}: warp backward"),
                &got,
                &resample::mix_backward(&x, d, &taps, n),
                1e-6,
            );

            let cfg = SpecAugmentConfig {
                freq_width: (0, d / 3),
                time_ratio: (0.0, 0.2),
                ..SpecAugmentConfig::default()
            };
            let spans = specaug_spans(&cfg, &batch, d, 23);
            assert!(spans.iter().any(|s| !s.frames.is_empty()));
            let mask = device::DeviceSpecMask::upload(&be, &spans, &batch, d).unwrap();
            let got = be.download(&mask.apply(&be, &xb).unwrap()).unwrap();
            let m = specaug_mask(&cfg, &batch, d, 23).unwrap().to_vec();
            let want: Vec<f32> = x.iter().zip(&m).map(|(a, b)| a * b).collect();
            assert_eq!(got, want, "{what}: masks");

            let got = device::scale_add_positions(&be, &xb, &batch, d, 4.0).unwrap();
            let pe = positions(&batch, d).unwrap().to_vec();
            let want: Vec<f32> = x.iter().zip(&pe).map(|(a, p)| a * 4.0 + p).collect();
            common::assert_close(
                &format!("{what}: positions"),
                &be.download(&got).unwrap(),
                &want,
                1e-5,
            );
        }
        // The convolutions' patches: Conv2dSubsampling2's two (1 channel at stride 2; channels
        // in 16-byte vectors at stride 1), an odd channel count, and 8 channels at stride 2; and
        // patch rows wider than a warp's one pass (32 chunks or elements), whose lanes step on
        // through the row: 40 channels (360 wide, 120 a time offset: a lane's step crosses two)
        // and 5 (45 wide, one at a time).
        let mut convs = vec![
            (vec![7usize, 12, 9], 11usize, 1usize, 2usize),
            (vec![5, 9], 6, 16, 1),
            (vec![4, 6], 5, 3, 1),
            (vec![6, 9], 7, 8, 2),
            (vec![5, 7], 6, 40, 1),
            (vec![4, 6], 5, 5, 2),
        ];
        if big {
            convs.push((vec![249; 32], 80, 1, 2));
            convs.push((vec![124; 32], 39, 256, 1));
        }
        for (lengths, freq, channels, stride) in convs {
            let batch = strata::PackedBatch::from_lengths(&lengths).unwrap();
            let g = PatchGeom {
                freq,
                channels,
                kernel: 3,
                stride,
            };
            let what = format!("{tag} patches {lengths:?} x {freq} x {channels} / {stride}");
            let x: Vec<f32> = randn(batch.total_frames() * freq * channels, 92)
                .into_iter()
                .map(round_bf16)
                .collect();
            let xb = be.upload(&to_bf16(&x)).unwrap();
            let (patches, out) = device::conv2d_patches(&be, &xb, &batch, &g).unwrap();
            let (want, outs) = patches_forward(&x, batch.offsets(), &g);
            assert_eq!(out.offsets(), &outs[..], "{what}: output offsets");
            let got: Vec<f32> = be
                .download(&patches)
                .unwrap()
                .iter()
                .map(|v| v.to_f32())
                .collect();
            assert_eq!(got, want, "{what}: patches");
            let dy: Vec<f32> = randn(want.len(), 93).into_iter().map(round_bf16).collect();
            let dyb = be.upload(&to_bf16(&dy)).unwrap();
            let got = device::conv2d_patches_adjoint(&be, &dyb, &batch, &g).unwrap();
            common::assert_close(
                &format!("{what}: adjoint"),
                &be.download(&got).unwrap(),
                &patches_backward(&dy, batch.offsets(), &outs, &g),
                1e-6,
            );
        }
        // An utterance shorter than the kernel is refused by name.
        let batch = strata::PackedBatch::from_lengths(&[5, 2]).unwrap();
        let g = PatchGeom {
            freq: 4,
            channels: 1,
            kernel: 3,
            stride: 1,
        };
        let xb = be.upload(&to_bf16(&randn(7 * 4, 1))).unwrap();
        let err = device::conv2d_patches(&be, &xb, &batch, &g)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("conv2d_patches") && err.contains("[5, 2]"),
            "{err}"
        );
    }
}

#[test]
fn lstm_step_kernels_match_the_cpu_reference() {
    // One direction's recurrence and its backpropagation through time against `ops::lstm`: mixed
    // lengths (ties, one frame), both directions, H not a multiple of the warp; 35 utterances (two
    // blocks of them) with H = 70 (units past the last tile of 8, a partial chunk of 64, and 4H
    // one too); at real size on a GPU (s3prl's 1024 units, 8 utterances of 150 frames).
    use strata::ops::lstm;
    for be in backends() {
        let tag = be.name();
        let big = on_gpu() && !std::env::var("STRATA_TEST_SMALL").is_ok_and(|v| v == "1");
        let many: Vec<usize> = (0..35).map(|i| 1 + (i * 7) % 6).collect();
        let mut cases = vec![
            (vec![11usize, 7, 1, 11, 4], 6usize),
            (vec![9, 3], 37),
            (many, 70),
        ];
        if big {
            cases.push((vec![150; 8], 1024));
        }
        for (lengths, hidden) in cases {
            let batch = strata::PackedBatch::from_lengths(&lengths).unwrap();
            let n = batch.total_frames();
            let pre: Vec<f32> = randn(n * 4 * hidden, 95);
            let w_scale = 1.0 / (hidden as f32).sqrt();
            let w: Vec<f32> = randn(4 * hidden * hidden, 96)
                .iter()
                .map(|v| v * w_scale)
                .collect();
            let dout = randn(n * hidden, 97);
            for reverse in [false, true] {
                let what = format!("{tag} lengths {lengths:?} H {hidden} reverse {reverse}");
                let (h, saved) = lstm::forward(&pre, &w, batch.offsets(), hidden, reverse);
                let (dz, _) =
                    lstm::backward(&dout, &h, &saved, &w, batch.offsets(), hidden, reverse);
                let sched = device::DeviceLstmSchedule::upload(&be, &batch, reverse).unwrap();
                let (pre_d, w_d) = (be.upload(&pre).unwrap(), be.upload(&w).unwrap());
                // The direction's half of a [frames, 2H] output (forward left, reverse right).
                let cols = device::Cols {
                    stride: 2 * hidden,
                    offset: if reverse { hidden } else { 0 },
                };
                let half = |wide: &[f32]| -> Vec<f32> {
                    (wide.chunks(2 * hidden))
                        .flat_map(|r| r[cols.offset..cols.offset + hidden].to_vec())
                        .collect()
                };
                let h_d = be.upload(&vec![f32::NAN; n * 2 * hidden]).unwrap();
                let states =
                    device::lstm_forward(&be, &pre_d, &w_d, &sched, hidden, (&h_d, cols)).unwrap();
                let got = |b: &strata::runtime::Buf<f32>| be.download(b).unwrap();
                common::assert_close(&format!("{what}: h"), &half(&got(&h_d)), &h, 1e-5);
                common::assert_close(&format!("{what}: c"), &got(&states.c), &saved.cells, 1e-5);
                common::assert_close(
                    &format!("{what}: gates"),
                    &got(&states.gates),
                    &saved.gates,
                    1e-5,
                );
                // Each row's previous state: W_hh's gradient is dz^T h_prev.
                let mut h_prev = vec![0f32; n * hidden];
                for u in 0..lengths.len() {
                    let (a, b) = (batch.offsets()[u], batch.offsets()[u + 1]);
                    for r in a..b {
                        let p = if reverse { r + 1 } else { r.wrapping_sub(1) };
                        if (a..b).contains(&p) {
                            h_prev[r * hidden..(r + 1) * hidden]
                                .copy_from_slice(&h[p * hidden..(p + 1) * hidden]);
                        }
                    }
                }
                common::assert_close(
                    &format!("{what}: h_prev"),
                    &got(&states.h_prev),
                    &h_prev,
                    1e-5,
                );
                // dout's other half is junk the kernel must not read.
                let mut wide = vec![f32::NAN; n * 2 * hidden];
                for (r, row) in wide.chunks_mut(2 * hidden).enumerate() {
                    row[cols.offset..cols.offset + hidden]
                        .copy_from_slice(&dout[r * hidden..(r + 1) * hidden]);
                }
                let dout_d = be.upload(&wide).unwrap();
                let dz_d =
                    device::lstm_backward(&be, (&dout_d, cols), &states, &w_d, &sched, hidden)
                        .unwrap();
                common::assert_close(&format!("{what}: dz"), &got(&dz_d), &dz, 1e-5);
            }
            // Both directions stepped in one launch a step (as the bidirectional layer runs them),
            // each with its own inputs and W_hh: bit for bit the directions run alone.
            let inputs = [(95u64, 96u64, false), (195, 196, true)].map(|(sp, sw, reverse)| {
                let w: Vec<f32> = randn(4 * hidden * hidden, sw)
                    .iter()
                    .map(|v| v / (hidden as f32).sqrt())
                    .collect();
                (
                    be.upload(&randn(n * 4 * hidden, sp)).unwrap(),
                    be.upload(&w).unwrap(),
                    device::DeviceLstmSchedule::upload(&be, &batch, reverse).unwrap(),
                    device::Cols {
                        stride: 2 * hidden,
                        offset: if reverse { hidden } else { 0 },
                    },
                )
            });
            let dout_d = be.upload(&randn(n * 2 * hidden, 98)).unwrap();
            let got = |b: &strata::runtime::Buf<f32>| be.download(b).unwrap();
            let h_alone = be.upload(&vec![f32::NAN; n * 2 * hidden]).unwrap();
            let alone: Vec<_> = inputs
                .iter()
                .map(|(pre, w, sched, cols)| {
                    let st = device::lstm_forward(&be, pre, w, sched, hidden, (&h_alone, *cols))
                        .unwrap();
                    let dz = device::lstm_backward(&be, (&dout_d, *cols), &st, w, sched, hidden)
                        .unwrap();
                    (got(&st.c), got(&st.gates), got(&st.h_prev), got(&dz))
                })
                .collect();
            let h_pair = be.upload(&vec![f32::NAN; n * 2 * hidden]).unwrap();
            let dirs: Vec<device::LstmDirection> = inputs
                .iter()
                .map(|(pre, w_hh, sched, cols)| device::LstmDirection {
                    pre,
                    w_hh,
                    sched,
                    cols: *cols,
                })
                .collect();
            let states = device::lstm_forward_directions(&be, &dirs, hidden, &h_pair).unwrap();
            let back: Vec<device::LstmBackDirection> = inputs
                .iter()
                .zip(&states)
                .map(
                    |((_, w_hh, sched, cols), states)| device::LstmBackDirection {
                        w_hh,
                        sched,
                        cols: *cols,
                        states,
                    },
                )
                .collect();
            let dzs = device::lstm_backward_directions(&be, &dout_d, &back, hidden).unwrap();
            let tag = format!("{tag} lengths {lengths:?} H {hidden}: both directions at once");
            assert!(
                got(&h_pair)
                    .iter()
                    .zip(got(&h_alone))
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{tag}: h"
            );
            for (d, (st, dz)) in states.iter().zip(&dzs).enumerate() {
                let want = &alone[d];
                assert!(
                    got(&st.c) == want.0 && got(&st.gates) == want.1,
                    "{tag}: c, gates of {d}"
                );
                assert!(
                    got(&st.h_prev) == want.2 && got(dz) == want.3,
                    "{tag}: h_prev, dz of {d}"
                );
            }
        }
    }
}

/// A profile (CudaRuntime::profile_start / profile_take, what `STRATA_PROFILE=1 gpu_bench step`
/// prints) counts each kernel's launches and gives each a GPU time; GPU only.
#[test]
fn a_profile_counts_each_kernels_launches() {
    for be in backends() {
        let Backend::Cuda(rt) = &be else { continue };
        let x = be.upload(&randn(1 << 20, 5)).unwrap();
        rt.profile_start();
        for seed in 0..3 {
            device::dropout(&be, &x, 0.1, seed).unwrap();
        }
        let layers = LayerSumShape {
            n: 1024,
            l: 4,
            d: 256,
            first: 0,
            k: 4,
            normalize: false,
        };
        let stack = be.upload(&to_bf16(&randn(1024 * 4 * 256, 6))).unwrap();
        let w = be.upload(&[0.1f32, 0.2, 0.3, 0.4]).unwrap();
        device::layer_sum_forward(&be, &stack, &w, layers).unwrap();
        let profile = rt.profile_take().unwrap();
        let launches = |k: &str| profile.iter().find(|t| t.kernel == k).map(|t| t.launches);
        assert_eq!(launches("dropout_apply"), Some(3), "{profile:?}");
        assert_eq!(launches("layer_sum_forward"), Some(1), "{profile:?}");
        assert!(
            profile.iter().all(|t| t.ms > 0.0 && t.ms.is_finite()),
            "{profile:?}"
        );
        assert!(
            profile.windows(2).all(|p| p[0].ms >= p[1].ms),
            "largest first"
        );
        assert!(rt.profile_take().unwrap().is_empty(), "the profile ended");
    }
}
